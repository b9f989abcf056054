//go:build linux

package harden

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestProcStatusAfterApply (SECURITY-TESTS T-B11) checks Apply the way an
// operator or an attacker on the host sees it: through the child's /proc
// files read by another process, not through the syscalls Apply used.
// The child applies the hardening, reports, and waits on stdin.
func TestProcStatusAfterApply(t *testing.T) {
	if os.Getenv("KEYGATE_HARDEN_PROC_CHILD") == "1" {
		if _, err := Apply(); err != nil {
			os.Stdout.WriteString("ERR " + err.Error() + "\n")
			return
		}
		os.Stdout.WriteString("READY\n")
		_, _ = io.Copy(io.Discard, os.Stdin) // until the parent closes stdin
		return
	}
	bin := os.Args[0]
	var attr *syscall.SysProcAttr
	if os.Geteuid() == 0 {
		// As root every /proc file is root's anyway; run the child as
		// nobody, so the owner change PR_SET_DUMPABLE causes is visible.
		bin = copyExecutable(t, bin)
		attr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	}
	cmd := exec.Command(bin, "-test.run", "^TestProcStatusAfterApply$")
	cmd.Env = append(os.Environ(), "KEYGATE_HARDEN_PROC_CHILD=1")
	cmd.SysProcAttr = attr
	cmd.Dir = filepath.Dir(bin)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = stdin.Close()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}()
	line := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- strings.TrimSpace(l)
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case l := <-line:
		if l != "READY" {
			t.Fatalf("child: %q", l)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("the child did not report within 60s")
	}
	proc := filepath.Join("/proc", strconv.Itoa(cmd.Process.Pid))

	// RLIMIT_CORE 0 soft and hard: "Max core file size  0  0  bytes".
	limits, err := os.ReadFile(filepath.Join(proc, "limits"))
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, l := range strings.Split(string(limits), "\n") {
		if rest, ok := strings.CutPrefix(l, "Max core file size"); ok {
			found = true
			if f := strings.Fields(rest); len(f) < 2 || f[0] != "0" || f[1] != "0" {
				t.Errorf("core limit %q, want soft and hard 0", strings.TrimSpace(rest))
			}
		}
	}
	if !found {
		t.Fatalf("no core limit line in %s/limits", proc)
	}

	// Not dumping a core right now, and not dumpable: the kernel hands
	// /proc/PID of a non-dumpable process to root:root, so a same-uid
	// process can no longer open its mem or environ.
	status, err := os.ReadFile(filepath.Join(proc, "status"))
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := statusField(string(status), "CoreDumping"); ok && v != "0" {
		t.Errorf("CoreDumping %q", v)
	}
	fi, err := os.Stat(filepath.Join(proc, "environ"))
	if err != nil {
		t.Fatal(err)
	}
	if uid := fileUID(fi); uid != 0 {
		t.Errorf("/proc/PID/environ of the hardened child is owned by uid %d, want 0 (PR_SET_DUMPABLE 0)", uid)
	}
	if os.Geteuid() != 0 {
		// Same uid, not root: reading the child's environ must fail.
		if _, err := os.ReadFile(filepath.Join(proc, "environ")); err == nil {
			t.Error("a same-uid process read the hardened child's environ")
		}
	}
}

func statusField(status, name string) (string, bool) {
	for _, l := range strings.Split(status, "\n") {
		if v, ok := strings.CutPrefix(l, name+":"); ok {
			return strings.TrimSpace(v), true
		}
	}
	return "", false
}

func fileUID(fi os.FileInfo) uint32 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Uid
	}
	return ^uint32(0)
}

// copyExecutable copies the test binary where uid 65534 can run it (the
// go test build directory is private to the user).
func copyExecutable(t *testing.T, src string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "keygate-harden-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "harden.test")
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}
