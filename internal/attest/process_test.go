//go:build linux

package attest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/testservers"
)

// --- parsers -----------------------------------------------------------------

func TestParseProcNetTCPLine(t *testing.T) {
	le := binary.LittleEndian
	ap := netip.MustParseAddrPort
	tests := []struct {
		name, line string
		want       procNetEntry
		ok         bool
	}{
		{"header", "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode", procNetEntry{}, false},
		{"listener",
			"   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0",
			procNetEntry{ap("127.0.0.1:8080"), ap("0.0.0.0:0"), 0x0A, 0, 12345}, true},
		{"established",
			"   1: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 23456 1 0000000000000000 20 4 30 10 -1",
			procNetEntry{ap("127.0.0.1:54321"), ap("127.0.0.1:8080"), 0x01, 1000, 23456}, true},
		{"time-wait has no inode",
			"   3: 0200000A:C350 0101A8C0:01BB 06 00000000:00000000 03:000008EA 00000000     0        0 0 3 00000000218f3375",
			procNetEntry{ap("10.0.0.2:50000"), ap("192.168.1.1:443"), 0x06, 0, 0}, true},
		{"ipv6 loopback",
			"   2: 00000000000000000000000001000000:D433 00000000000000000000000001000000:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 45679 1 0000000000000000 20 4 30 10 -1",
			procNetEntry{ap("[::1]:54323"), ap("[::1]:8080"), 0x01, 1000, 45679}, true},
		{"ipv4-mapped",
			"   1: 0000000000000000FFFF00000100007F:D432 0000000000000000FFFF00000100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 45678 1 0000000000000000 20 4 30 10 -1",
			procNetEntry{ap("[::ffff:127.0.0.1]:54322"), ap("[::ffff:127.0.0.1]:8080"), 0x01, 1000, 45678}, true},
		{"ipv6 global",
			"   3: B80D0120000000000000000001000000:0050 B80D0120000000000000000002000000:C351 01 00000000:00000000 00:00000000 00000000     0        0 56789 1 0000000000000000 20 4 30 10 -1",
			procNetEntry{ap("[2001:db8::1]:80"), ap("[2001:db8::2]:50001"), 0x01, 0, 56789}, true},
		{"mixed families", "   0: 0100007F:1F90 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 1", procNetEntry{}, false},
		{"short address", "   0: 01007F:1F90 00000000:0000 0A 0:0 0:0 0 0 0 1", procNetEntry{}, false},
		{"bad hex", "   0: 0100007G:1F90 00000000:0000 0A 0:0 0:0 0 0 0 1", procNetEntry{}, false},
		{"long port", "   0: 0100007F:11F90 00000000:0000 0A 0:0 0:0 0 0 0 1", procNetEntry{}, false},
		{"uid overflow", "   0: 0100007F:1F90 00000000:0000 0A 0:0 0:0 0 4294967296 0 1", procNetEntry{}, false},
		{"too few fields", "   0: 0100007F:1F90 00000000:0000 0A", procNetEntry{}, false},
		{"no colon after slot", "   0 0100007F:1F90 00000000:0000 0A 0:0 0:0 0 0 0 1", procNetEntry{}, false},
		{"empty", "", procNetEntry{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := parseProcNetTCPLine([]byte(tt.line), le)
			if ok != tt.ok || (ok && got != tt.want) {
				t.Fatalf("got %+v %v, want %+v %v", got, ok, tt.want, tt.ok)
			}
		})
	}
}

func TestFindProcNetSocket(t *testing.T) {
	ap := netip.MustParseAddrPort
	tests := []struct {
		file    string
		local   netip.AddrPort
		remotes []netip.AddrPort
		inode   uint64 // 0: not found
	}{
		{"proc_net_tcp", ap("127.0.0.1:54321"), []netip.AddrPort{ap("127.0.0.1:8080")}, 23456},
		{"proc_net_tcp", ap("[::ffff:127.0.0.1]:54321"), []netip.AddrPort{ap("[::ffff:127.0.0.1]:8080")}, 23456},
		{"proc_net_tcp", ap("127.0.0.1:54321"), []netip.AddrPort{ap("10.9.9.9:1"), ap("127.0.0.1:8080")}, 23456},
		{"proc_net_tcp", ap("127.0.0.1:8080"), []netip.AddrPort{ap("127.0.0.1:54321")}, 23457}, // the other end
		{"proc_net_tcp", ap("127.0.0.1:8080"), []netip.AddrPort{ap("0.0.0.0:0")}, 0},           // listener skipped
		{"proc_net_tcp", ap("10.0.0.2:50000"), []netip.AddrPort{ap("192.168.1.1:443")}, 0},     // time-wait skipped
		{"proc_net_tcp", ap("10.0.0.2:50001"), []netip.AddrPort{ap("192.168.1.1:443")}, 4294967296},
		{"proc_net_tcp", ap("127.0.0.1:54321"), []netip.AddrPort{ap("127.0.0.1:8081")}, 0},
		{"proc_net_tcp6", ap("127.0.0.1:54322"), []netip.AddrPort{ap("127.0.0.1:8080")}, 45678}, // dual-stack
		{"proc_net_tcp6", ap("[::1]:54323"), []netip.AddrPort{ap("[::1]:8080")}, 45679},
		{"proc_net_tcp6", ap("[2001:db8::1]:80"), []netip.AddrPort{ap("[2001:db8::2]:50001")}, 56789},
		{"proc_net_tcp6", ap("[::1]:54323"), []netip.AddrPort{ap("127.0.0.1:8080")}, 0},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s/%s", tt.file, tt.local), func(t *testing.T) {
			f, err := os.Open(filepath.Join("testdata", "process", tt.file))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			e, ok, err := findProcNetSocket(f, binary.LittleEndian, tt.local, tt.remotes)
			if err != nil {
				t.Fatal(err)
			}
			if ok != (tt.inode != 0) || e.inode != tt.inode {
				t.Fatalf("got %+v %v, want inode %d", e, ok, tt.inode)
			}
		})
	}
}

const (
	cid1 = "4f1d3c5e8a9b0c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192a3b"
	cid2 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	pod1 = "6b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
)

func TestParseCgroup(t *testing.T) {
	podU := strings.ReplaceAll(pod1, "-", "_")
	tests := []struct {
		name, data string
		cid, pod   string
	}{
		{"none v2", "0::/\n", "", ""},
		{"systemd session", "0::/user.slice/user-1000.slice/session-2.scope\n", "", ""},
		{"empty", "", "", ""},
		{"docker v1 cgroupfs", "12:pids:/docker/" + cid1 + "\n11:memory:/docker/" + cid1 + "\n1:name=systemd:/docker/" + cid1 + "\n", cid1, ""},
		{"docker v2 systemd", "0::/system.slice/docker-" + cid1 + ".scope\n", cid1, ""},
		{"docker v2 cgroupfs", "0::/docker/" + cid1 + "\n", cid1, ""},
		{"containerd kubepods cgroupfs v1",
			"12:cpuset:/kubepods/burstable/pod" + pod1 + "/" + cid1 + "\n4:memory:/kubepods/burstable/pod" + pod1 + "/" + cid1 + "\n", cid1, pod1},
		{"containerd kubepods systemd v2",
			"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + podU + ".slice/cri-containerd-" + cid1 + ".scope\n", cid1, pod1},
		{"guaranteed qos systemd", "0::/kubepods.slice/kubepods-pod" + podU + ".slice/cri-containerd-" + cid2 + ".scope\n", cid2, pod1},
		{"cri-o v2", "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + podU + ".slice/crio-" + cid1 + ".scope\n", cid1, pod1},
		{"cri-o conmon is not the container", "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + podU + ".slice/crio-conmon-" + cid1 + ".scope\n", "", pod1},
		{"podman nested", "0::/machine.slice/libpod-" + cid2 + ".scope/container\n", cid2, ""},
		{"hybrid prefers v2", "1:name=systemd:/docker/" + cid1 + "\n0::/system.slice/docker-" + cid2 + ".scope\n", cid2, ""},
		{"hybrid v2 empty falls back to v1", "1:name=systemd:/docker/" + cid1 + "\n0::/\n", cid1, ""},
		{"docker in docker: innermost", "0::/docker/" + cid1 + "/docker/" + cid2 + "\n", cid2, ""},
		{"kind node", "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod" + podU + ".slice/cri-containerd-" + cid1 + ".scope\n", cid1, pod1},
		{"pod uid needs kubepods", "0::/system.slice/pod" + pod1 + "/x\n", "", ""},
		{"pod slice without container", "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + podU + ".slice\n", "", pod1},
		{"uppercase id rejected", "0::/docker/" + strings.ToUpper(cid1) + "\n", "", ""},
		{"short id rejected", "0::/docker/" + cid1[:63] + "\n", "", ""},
		{"user delegation ignored", "0::/user.slice/user-1000.slice/user@1000.service/app.slice/docker-" + cid1 + ".scope\n", "", ""},
		{"user delegation ignored for pods", "0::/user.slice/user-1000.slice/user@1000.service/kubepods/pod" + pod1 + "/" + cid1 + "\n", "", ""},
		{"path with colon", "0::/weird:name/docker-" + cid1 + ".scope\n", cid1, ""},
		{"garbage", "not a cgroup file\n::\n", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cid, pod := parseCgroup([]byte(tt.data))
			if cid != tt.cid || pod != tt.pod {
				t.Fatalf("got (%q, %q), want (%q, %q)", cid, pod, tt.cid, tt.pod)
			}
		})
	}
}

func statLine(pid int, comm string, start uint64) string {
	// Fields 3..52 as in a real /proc/<pid>/stat; field 22 is starttime.
	f := []string{"S", "1", "1", "1", "0", "-1", "4194560", "100", "0", "0", "0", "0", "0", "0", "0", "20", "0", "1", "0",
		strconv.FormatUint(start, 10), "1000000", "100", "18446744073709551615", "1", "1", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "17", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0", "0"}
	return fmt.Sprintf("%d (%s) %s\n", pid, comm, strings.Join(f, " "))
}

func TestParseStatStartTime(t *testing.T) {
	tests := []struct {
		name, data string
		want       uint64
		ok         bool
	}{
		{"plain", statLine(42, "curl", 692927), 692927, true},
		{"spaces and parens in comm", statLine(42, "a) b (c) 1 2 3", 12345), 12345, true},
		{"comm that is just parens", statLine(7, ")))", 99), 99, true},
		{"real kernel line", "18308 (cat) R 18303 18303 12236 0 -1 4194304 121 0 0 0 0 0 0 0 20 0 1 0 692927 3 0", 692927, true},
		{"no comm", "42 curl S 1 2 3", 0, false},
		{"truncated", "42 (curl) S 1 1 1 0 -1", 0, false},
		{"not a number", strings.Replace(statLine(42, "x", 5), " 5 ", " x ", 1), 0, false},
		{"empty", "", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStatStartTime([]byte(tt.data))
			if (err == nil) != tt.ok || got != tt.want {
				t.Fatalf("got %d, %v; want %d ok=%v", got, err, tt.want, tt.ok)
			}
		})
	}
}

func TestParseStatusIDs(t *testing.T) {
	uid, gid, err := parseStatusIDs([]byte("Name:\tcurl\nUmask:\t0022\nState:\tS (sleeping)\nUid:\t1000\t0\t0\t0\nGid:\t1001\t65534\t65534\t65534\nGroups:\t\n"))
	if err != nil || uid != 0 || gid != 65534 {
		t.Fatalf("effective ids: got %d %d %v", uid, gid, err)
	}
	for _, bad := range []string{"Name:\tx\n", "Uid:\t1\nGid:\t1\t1\n", "Uid:\t1\tx\nGid:\t1\t1\n", "Uid:\t1\t1\n"} {
		if _, _, err := parseStatusIDs([]byte(bad)); err == nil {
			t.Errorf("%q: want error", bad)
		}
	}
}

func FuzzParseProcNetTCP(f *testing.F) {
	for _, name := range []string{"proc_net_tcp", "proc_net_tcp6"} {
		b, err := os.ReadFile(filepath.Join("testdata", "process", name))
		if err != nil {
			f.Fatal(err)
		}
		for line := range bytes.SplitSeq(b, []byte{'\n'}) {
			f.Add(line)
		}
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		if bytes.IndexByte(line, '\n') >= 0 {
			return // never a line: findProcNetSocket splits the file on '\n' first
		}
		for _, order := range []binary.ByteOrder{binary.LittleEndian, binary.BigEndian} {
			e, ok := parseProcNetTCPLine(line, order)
			if !ok {
				continue
			}
			if !e.local.IsValid() || !e.remote.IsValid() || e.local.Addr().Is4() != e.remote.Addr().Is4() {
				t.Fatalf("accepted an invalid entry %+v", e)
			}
			// An accepted line is found again by its own addresses.
			got, found, err := findProcNetSocket(bytes.NewReader(line), order, e.local, []netip.AddrPort{e.remote})
			if err == nil && (e.state != tcpListen && e.inode != 0) && (!found || got != e) {
				t.Fatalf("entry %+v not found again: %+v %v", e, got, found)
			}
		}
	})
}

func FuzzParseCgroup(f *testing.F) {
	podU := strings.ReplaceAll(pod1, "-", "_")
	for _, s := range []string{
		"0::/\n",
		"12:pids:/docker/" + cid1 + "\n",
		"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + podU + ".slice/cri-containerd-" + cid1 + ".scope\n",
		"4:memory:/kubepods/burstable/pod" + pod1 + "/" + cid1 + "\n",
		"0::/user.slice/user-1000.slice/user@1000.service/app.slice/docker-" + cid1 + ".scope\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cid, pod := parseCgroup(data)
		if cid != "" && !isHexID(cid) {
			t.Fatalf("container id %q is not 64 lower-case hex digits", cid)
		}
		if pod != "" && (!isUUID(pod) || strings.ToLower(pod) != pod) {
			t.Fatalf("pod uid %q is not a lower-case UUID", pod)
		}
		if (cid != "" || pod != "") && !bytes.Contains(data, []byte(cid)) && !bytes.Contains(data, []byte(strings.ReplaceAll(pod, "-", "_"))) {
			t.Fatalf("ids %q %q do not come from the input", cid, pod)
		}
	})
}

// --- fake /proc: the pid-reuse window ----------------------------------------

// fakeProc builds ProcRoot/<pid>/{stat,status,cgroup,exe,fd/<fd>} for the
// parsers and the reuse checks; the real paths are tested further down.
type fakeProc struct {
	t    *testing.T
	root string
	exe  string // the file /proc/<pid>/exe points to
}

func newFakeProc(t *testing.T) *fakeProc {
	root := t.TempDir()
	exe := filepath.Join(t.TempDir(), "fake-binary")
	if err := os.WriteFile(exe, []byte("#!/bin/false\nnot really a program\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return &fakeProc{t: t, root: root, exe: exe}
}

func (f *fakeProc) write(pid int, name, content string) {
	f.t.Helper()
	p := filepath.Join(f.root, strconv.Itoa(pid), name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeProc) link(pid int, name, target string) {
	f.t.Helper()
	p := filepath.Join(f.root, strconv.Itoa(pid), name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		f.t.Fatal(err)
	}
	_ = os.Remove(p)
	if err := os.Symlink(target, p); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fakeProc) process(pid int, start uint64, socketFD int, inode uint64) {
	f.write(pid, "stat", statLine(pid, "fake (worker) 1", start))
	f.write(pid, "status", "Name:\tfake\nUid:\t1000\t1000\t1000\t1000\nGid:\t1001\t1001\t1001\t1001\n")
	f.write(pid, "cgroup", "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"+strings.ReplaceAll(pod1, "-", "_")+".slice/cri-containerd-"+cid1+".scope\n")
	f.link(pid, "exe", f.exe)
	f.link(pid, "fd/0", "/dev/null")
	f.link(pid, "fd/"+strconv.Itoa(socketFD), socketLinkName(inode))
}

func newTestProcess(t testing.TB, root string) *Process {
	t.Helper()
	p, err := NewProcess(ProcessOptions{ProcRoot: root})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestProcessInspectReuseGuard(t *testing.T) {
	fp := newFakeProc(t)
	fp.process(42, 1000, 7, 777)
	p := newTestProcess(t, fp.root)
	want := sha256.Sum256([]byte("#!/bin/false\nnot really a program\n"))
	noop := func() error { return nil }

	t.Run("stable process", func(t *testing.T) {
		info, pod, start, err := p.inspect(42, 0, noop)
		if err != nil {
			t.Fatal(err)
		}
		if info.PID != 42 || info.UID != 1000 || info.GID != 1001 || info.Exe != fp.exe ||
			info.SHA256 != hex.EncodeToString(want[:]) || info.ContainerID != cid1 || pod != pod1 || start != 1000 {
			t.Fatalf("got %+v pod=%q start=%d", info, pod, start)
		}
	})
	t.Run("pid reused while reading", func(t *testing.T) {
		_, _, _, err := p.inspect(42, 0, func() error {
			fp.write(42, "stat", statLine(42, "other", 1001))
			return nil
		})
		if !errors.Is(err, broker.ErrInvalidEvidence) || !strings.Contains(err.Error(), "reused") {
			t.Fatalf("want reuse rejected, got %v", err)
		}
		fp.write(42, "stat", statLine(42, "fake (worker) 1", 1000))
	})
	t.Run("exec while reading", func(t *testing.T) {
		_, _, _, err := p.inspect(42, 0, func() error {
			fp.link(42, "exe", "/usr/bin/true")
			return nil
		})
		if !errors.Is(err, broker.ErrInvalidEvidence) || !strings.Contains(err.Error(), "executed another program") {
			t.Fatalf("want exec rejected, got %v", err)
		}
		fp.link(42, "exe", fp.exe)
	})
	t.Run("cached owner with another start time", func(t *testing.T) {
		if _, _, _, err := p.inspect(42, 999, noop); !errors.Is(err, errStaleOwner) {
			t.Fatalf("want errStaleOwner, got %v", err)
		}
	})
	t.Run("verify fails", func(t *testing.T) {
		gone := processInvalid("process 42 no longer holds the connection")
		if _, _, _, err := p.inspect(42, 0, func() error { return gone }); !errors.Is(err, gone) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("process gone", func(t *testing.T) {
		if _, _, _, err := p.inspect(4242, 0, noop); !errors.Is(err, broker.ErrInvalidEvidence) {
			t.Fatalf("want ErrInvalidEvidence, got %v", err)
		}
	})
}

func TestProcessFindOwnerFakeProc(t *testing.T) {
	fp := newFakeProc(t)
	fp.process(42, 1000, 7, 777)
	fp.process(43, 1000, 3, 888)
	p := newTestProcess(t, fp.root)
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(fp.root, "43"), &st); err != nil {
		t.Fatal(err)
	}
	own, err := p.findOwner(context.Background(), peerSocket{inode: 888, uid: st.Uid}, true)
	if err != nil || own.pid != 43 || own.fd != 3 {
		t.Fatalf("got %+v %v", own, err)
	}
	// Another uid's processes are not searched.
	if _, err := p.findOwner(context.Background(), peerSocket{inode: 888, uid: st.Uid + 1}, true); err == nil && st.Uid != 0 {
		t.Fatal("found a process of another uid")
	}
	_, err = p.findOwner(context.Background(), peerSocket{inode: 999, uid: st.Uid}, true)
	if !errors.Is(err, broker.ErrInvalidEvidence) || !strings.Contains(err.Error(), "local peer not found") {
		t.Fatalf("want local peer not found, got %v", err)
	}
	// holdsSocket follows a descriptor that moved.
	fp.link(43, "fd/3", "/dev/null")
	fp.link(43, "fd/9", socketLinkName(888))
	if fd, ok := p.holdsSocket(43, 3, socketLinkName(888)); !ok || fd != 9 {
		t.Fatalf("holdsSocket = %d %v", fd, ok)
	}
}

func TestProcessExeHashCache(t *testing.T) {
	p, err := NewProcess(ProcessOptions{HashCacheSize: 2})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var paths []string
	for i := range 3 {
		path := filepath.Join(dir, strconv.Itoa(i))
		if err := os.WriteFile(path, []byte(strings.Repeat("x", i+1)), 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, path)
	}
	for _, path := range paths {
		if _, err := p.exeHash(path); err != nil {
			t.Fatal(err)
		}
	}
	if n := p.hashes.len(); n != 2 {
		t.Fatalf("cache holds %d, want 2 (bounded)", n)
	}
	// A changed file (size/mtime/ctime) is a new key and is hashed again.
	if err := os.WriteFile(paths[2], []byte("changed"), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := p.exeHash(paths[2])
	want := sha256.Sum256([]byte("changed"))
	if err != nil || got != hex.EncodeToString(want[:]) {
		t.Fatalf("got %s %v", got, err)
	}
	if _, err := NewProcess(ProcessOptions{HashCacheSize: -1}); err == nil {
		t.Fatal("negative cache size accepted")
	}
}

// --- real sockets and processes ----------------------------------------------

// requireRoot skips the uid-switching tests when not root, except in CI where
// they must run.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	testservers.Missing(t, "not root: cannot start processes under another uid (set CI=true to make this a failure)")
}

// tcpPair is a loopback listener whose accepted connections are handed to the
// test, so it can attest them while the client is still connected.
type tcpPair struct {
	ln       net.Listener
	accepted chan net.Conn
}

func listenTCP(t testing.TB, network, addr string) *tcpPair {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		testservers.Missing(t, "listen %s %s: %v", network, addr, err)
	}
	tp := &tcpPair{ln: ln, accepted: make(chan net.Conn, 4)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				close(tp.accepted)
				return
			}
			tp.accepted <- c
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return tp
}

func (tp *tcpPair) port() int { return tp.ln.Addr().(*net.TCPAddr).Port }

func (tp *tcpPair) next(t testing.TB) net.Conn {
	t.Helper()
	select {
	case c := <-tp.accepted:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("no connection accepted")
		return nil
	}
}

func evidenceOf(c net.Conn) broker.Evidence {
	ev := broker.Evidence{Listener: "proxy", Conn: c}
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		ev.Remote = ta.AddrPort()
		ev.Local = c.LocalAddr().(*net.TCPAddr).AddrPort()
	}
	return ev
}

func fileSHA256(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func selfExe(t testing.TB) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if exe, err = filepath.EvalSymlinks(exe); err != nil {
		t.Fatal(err)
	}
	return exe
}

// cgroupOf reads a live process's cgroup file, to compare with the identity
// once the process has gone.
func cgroupOf(pid int) []byte {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	return b
}

func checkIdentity(t *testing.T, id broker.Identity, cg []byte, pid, uid, gid int, exe string) {
	t.Helper()
	if id.Method != broker.MethodProcess || id.ID != "unix:uid:"+strconv.Itoa(uid) || id.TrustDomain != "" || id.Process == nil {
		t.Fatalf("identity %+v", id)
	}
	pi := id.Process
	if pi.PID != pid || pi.UID != uid || pi.GID != gid || pi.Exe != exe {
		t.Fatalf("process %+v, want pid %d uid %d gid %d exe %s", *pi, pid, uid, gid, exe)
	}
	if want := fileSHA256(t, exe); pi.SHA256 != want {
		t.Fatalf("sha256 %s, want %s", pi.SHA256, want)
	}
	if cid, pod := parseCgroup(cg); pi.ContainerID != cid || (pod == "") != (id.Claims["pod_uid"] == nil) {
		t.Fatalf("container %q claims %v, want %q %q", pi.ContainerID, id.Claims, cid, pod)
	}
}

func TestProcessAttestSelf(t *testing.T) {
	for _, tc := range []struct{ name, network, addr string }{
		{"ipv4", "tcp4", "127.0.0.1:0"},
		{"ipv6", "tcp6", "[::1]:0"},
		{"dual-stack listener, ipv4 client", "tcp", "[::]:0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tp := listenTCP(t, tc.network, tc.addr)
			dial := net.JoinHostPort("127.0.0.1", strconv.Itoa(tp.port()))
			if tc.network == "tcp6" {
				dial = net.JoinHostPort("::1", strconv.Itoa(tp.port()))
			}
			client, err := net.Dial("tcp", dial)
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()
			server := tp.next(t)
			defer server.Close()

			for _, mode := range []string{"netlink", "procfs"} {
				p := newTestProcess(t, "")
				if mode == "procfs" {
					p.sys.netlink.Store(netlinkBroken)
				}
				for range 2 { // the second time from the owner cache
					id, err := p.Attest(context.Background(), evidenceOf(server))
					if err != nil {
						t.Fatalf("%s: %v", mode, err)
					}
					checkIdentity(t, id, cgroupOf(os.Getpid()), os.Getpid(), os.Geteuid(), os.Getegid(), selfExe(t))
				}
				if p.owners.len() != 1 {
					t.Fatalf("%s: owner cache holds %d", mode, p.owners.len())
				}
				if mode == "netlink" && p.sys.netlink.Load() != netlinkWorks {
					t.Logf("NETLINK_SOCK_DIAG unavailable here; the procfs fallback answered")
				}
			}
		})
	}
}

func TestProcessAttestEvidenceFromConnOnly(t *testing.T) {
	tp := listenTCP(t, "tcp4", "127.0.0.1:0")
	client, err := net.Dial("tcp", tp.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server := tp.next(t)
	defer server.Close()
	id, err := newTestProcess(t, "").Attest(context.Background(), broker.Evidence{Conn: server})
	if err != nil || id.Process.PID != os.Getpid() {
		t.Fatalf("got %+v %v", id, err)
	}
}

func TestProcessAttestHostAddress(t *testing.T) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	var host netip.Addr
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap().Is4() && !ip.IsLoopback() && !ip.IsLinkLocalUnicast() {
				host = ip.Unmap()
				break
			}
		}
	}
	if !host.IsValid() {
		testservers.Missing(t, "no non-loopback IPv4 address on this host")
	}
	tp := listenTCP(t, "tcp4", "0.0.0.0:0")
	client, err := net.Dial("tcp", netip.AddrPortFrom(host, uint16(tp.port())).String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server := tp.next(t)
	defer server.Close()
	ev := evidenceOf(server)
	if ev.Remote.Addr().IsLoopback() {
		testservers.Missing(t, "the kernel routed the host address over loopback source")
	}
	id, err := newTestProcess(t, "").Attest(context.Background(), ev)
	if err != nil {
		t.Fatal(err)
	}
	checkIdentity(t, id, cgroupOf(os.Getpid()), os.Getpid(), os.Geteuid(), os.Getegid(), selfExe(t))
}

func TestProcessNotLocal(t *testing.T) {
	p := newTestProcess(t, "")
	// A connection whose evidence names another client (a local proxy
	// reporting its own caller): the local process is the proxy, not the
	// caller, so the attestor does not apply.
	tp := listenTCP(t, "tcp4", "127.0.0.1:0")
	client, err := net.Dial("tcp", tp.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server := tp.next(t)
	defer server.Close()
	for _, remote := range []string{"192.0.2.1:40000", "127.0.0.1:1"} {
		ev := evidenceOf(server)
		ev.Remote = netip.MustParseAddrPort(remote)
		if _, err := p.Attest(context.Background(), ev); !errors.Is(err, broker.ErrNoEvidence) {
			t.Fatalf("proxied %s: want ErrNoEvidence, got %v", remote, err)
		}
	}

	for _, ev := range []broker.Evidence{
		{},
		{Remote: netip.MustParseAddrPort("192.0.2.1:40000"), Local: netip.MustParseAddrPort("127.0.0.1:15080")},
		{Remote: netip.MustParseAddrPort("[2001:db8::1]:40000"), Local: netip.MustParseAddrPort("[::1]:15080")},
	} {
		if _, err := p.Attest(context.Background(), ev); !errors.Is(err, broker.ErrNoEvidence) {
			t.Fatalf("%v: want ErrNoEvidence, got %v", ev.Remote, err)
		}
	}
}

func TestProcessLocalPeerNotFound(t *testing.T) {
	for _, mode := range []string{"netlink", "procfs"} {
		p := newTestProcess(t, "")
		if mode == "procfs" {
			p.sys.netlink.Store(netlinkBroken)
		}
		_, err := p.Attest(context.Background(), broker.Evidence{
			Remote: netip.MustParseAddrPort("127.0.0.1:1"),
			Local:  netip.MustParseAddrPort("127.0.0.1:2"),
		})
		if !errors.Is(err, broker.ErrInvalidEvidence) || !strings.Contains(err.Error(), "local peer") {
			t.Fatalf("%s: want local peer not found, got %v", mode, err)
		}
	}
}

// setprivCmd runs argv as uid/gid 65534 with no supplementary groups.
func setprivCmd(t *testing.T, argv ...string) *exec.Cmd {
	t.Helper()
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		testservers.Missing(t, "setpriv not installed")
	}
	return exec.Command(setpriv, append([]string{"--reuid=65534", "--regid=65534", "--clear-groups"}, argv...)...)
}

func lookExe(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		testservers.Missing(t, "%s not installed", name)
	}
	if path, err = filepath.EvalSymlinks(path); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestProcessAttestOtherUID connects from real child processes running as
// nobody (65534), with two different executables.
func TestProcessAttestOtherUID(t *testing.T) {
	requireRoot(t)
	tp := listenTCP(t, "tcp4", "127.0.0.1:0")
	port := strconv.Itoa(tp.port())
	bash, curl := lookExe(t, "bash"), lookExe(t, "curl")
	clients := []struct {
		name string
		exe  string
		argv []string
	}{
		// read is a builtin: bash itself holds the socket, no child shares it.
		{"bash", bash, []string{bash, "-c", "exec 3<>/dev/tcp/127.0.0.1/" + port + "; read -t 20 -u 3 line"}},
		{"curl", curl, []string{curl, "-s", "-o", "/dev/null", "--max-time", "20", "http://127.0.0.1:" + port + "/"}},
	}
	p := newTestProcess(t, "")
	for _, c := range clients {
		t.Run(c.name, func(t *testing.T) {
			cmd := setprivCmd(t, c.argv...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			server := tp.next(t)
			id, err := p.Attest(context.Background(), evidenceOf(server))
			cg := cgroupOf(cmd.Process.Pid)
			server.Write([]byte("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"))
			server.Close()
			if werr := cmd.Wait(); werr != nil {
				t.Logf("%s: %v %s", c.name, werr, stderr.String())
			}
			if err != nil {
				t.Fatal(err)
			}
			checkIdentity(t, id, cg, cmd.Process.Pid, 65534, 65534, c.exe)
		})
	}
}

// TestProcessAttestSocketUIDMismatch: a socket created (TCP) or connected
// (Unix) as root by a process that then became nobody is rejected: the
// kernel's record of the socket's uid is not the process's effective uid.
// Over TCP the owner search only covers processes owned by the socket's uid
// (or root), so there the rejection reads "local peer not found".
func TestProcessAttestSocketUIDMismatch(t *testing.T) {
	requireRoot(t)
	run := func(t *testing.T, mode, addr string, accept func() net.Conn) {
		cmd := exec.Command(selfExe(t), "-test.run=^TestProcessHelper$")
		cmd.Env = append(os.Environ(), "KEYGATE_PROCESS_HELPER="+mode, "KEYGATE_PROCESS_HELPER_ADDR="+addr)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		server := accept()
		// The helper writes one byte once it has become nobody.
		if _, err := io.ReadFull(server, make([]byte, 1)); err != nil {
			t.Fatalf("helper: %v", err)
		}
		_, err := newTestProcess(t, "").Attest(context.Background(), evidenceOf(server))
		server.Close()
		if werr := cmd.Wait(); werr != nil {
			t.Fatalf("helper: %v\n%s", werr, out.String())
		}
		if !errors.Is(err, broker.ErrInvalidEvidence) || !(strings.Contains(err.Error(), "differs") || strings.Contains(err.Error(), "local peer not found")) {
			t.Fatalf("want the uid change rejected, got %v", err)
		}
		t.Log(err)
	}
	t.Run("tcp", func(t *testing.T) {
		tp := listenTCP(t, "tcp4", "127.0.0.1:0")
		run(t, "tcp-setuid-after-socket", tp.ln.Addr().String(), func() net.Conn { return tp.next(t) })
	})
	t.Run("unix", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "s")
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		run(t, "unix-setuid-after-connect", path, func() net.Conn {
			c, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			return c
		})
	})
}

// TestProcessHelper is not a test: it is the child process of the tests above.
func TestProcessHelper(t *testing.T) {
	mode, addr := os.Getenv("KEYGATE_PROCESS_HELPER"), os.Getenv("KEYGATE_PROCESS_HELPER_ADDR")
	becomeNobody := func() {
		if err := syscall.Setgid(65534); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Setuid(65534); err != nil {
			t.Fatal(err)
		}
	}
	var fd int
	var err error
	switch mode {
	case "":
		t.Skip("helper process only")
	case "tcp-setuid-after-socket":
		ap := netip.MustParseAddrPort(addr)
		if fd, err = syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0); err != nil {
			t.Fatal(err)
		}
		becomeNobody()
		err = syscall.Connect(fd, &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()})
	case "unix-setuid-after-connect":
		if fd, err = syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0); err != nil {
			t.Fatal(err)
		}
		err = syscall.Connect(fd, &syscall.SockaddrUnix{Name: addr})
		becomeNobody()
	case "transparent":
		transparentHelper(t)
		return
	default:
		t.Fatalf("unknown helper mode %q", mode)
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := syscall.Write(fd, []byte{'!'}); err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	syscall.Read(fd, b[:]) // until the test closes its end
}

// TestProcessAttestTransparent: in transparent mode the caller's socket is
// connected to the original destination, not to the broker's address; the
// attestor finds it through SO_ORIGINAL_DST (or an Evidence.Local that
// already holds the original destination). Runs in a private network
// namespace with a real iptables REDIRECT rule.
func TestProcessAttestTransparent(t *testing.T) {
	requireRoot(t)
	for _, tool := range []string{"unshare", "iptables", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			testservers.Missing(t, "%s not installed", tool)
		}
	}
	cmd := exec.Command("unshare", "--net", selfExe(t), "-test.run=^TestProcessHelper$", "-test.v")
	cmd.Env = append(os.Environ(), "KEYGATE_PROCESS_HELPER=transparent")
	out, err := cmd.CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("transparent: ok")) {
		t.Fatalf("helper: %v\n%s", err, out)
	}
}

// transparentHelper runs inside a fresh network namespace.
func transparentHelper(t *testing.T) {
	run := func(argv ...string) {
		if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", argv, err, out)
		}
	}
	run("ip", "link", "set", "lo", "up")
	run("ip", "route", "add", "192.0.2.0/24", "dev", "lo", "src", "127.0.0.1")
	tp := listenTCP(t, "tcp4", "127.0.0.1:0")
	run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "192.0.2.10", "--dport", "80",
		"-j", "REDIRECT", "--to-ports", strconv.Itoa(tp.port()))
	client, err := net.Dial("tcp", "192.0.2.10:80")
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server := tp.next(t)
	defer server.Close()
	if od, ok := originalDst(server.(*net.TCPConn)); !ok || od != netip.MustParseAddrPort("192.0.2.10:80") {
		t.Fatalf("SO_ORIGINAL_DST = %v %v", od, ok)
	}
	for _, mode := range []string{"netlink", "procfs"} {
		p := newTestProcess(t, "")
		if mode == "procfs" {
			p.sys.netlink.Store(netlinkBroken)
		}
		ev := evidenceOf(server) // Local is the redirect port
		evOrig := ev
		evOrig.Local, evOrig.Conn = netip.MustParseAddrPort("192.0.2.10:80"), nil
		for _, e := range []broker.Evidence{ev, evOrig} {
			id, err := p.Attest(context.Background(), e)
			if err != nil {
				t.Fatalf("%s: %v", mode, err)
			}
			if id.Process.PID != os.Getpid() {
				t.Fatalf("%s: pid %d", mode, id.Process.PID)
			}
		}
	}
	fmt.Println("transparent: ok")
}

func TestProcessAttestUnix(t *testing.T) {
	dir, err := os.MkdirTemp("", "keygate-process-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "proxy.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := os.Chmod(path, 0o777); err != nil {
		t.Fatal(err)
	}
	p := newTestProcess(t, "")
	accept := func() *net.UnixConn {
		t.Helper()
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}

	t.Run("self", func(t *testing.T) {
		client, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()
		server := accept()
		defer server.Close()
		// Remote/Local are meaningless for a Unix socket; the conn decides.
		id, err := p.Attest(context.Background(), broker.Evidence{Conn: server, Remote: netip.MustParseAddrPort("192.0.2.1:1")})
		if err != nil {
			t.Fatal(err)
		}
		checkIdentity(t, id, cgroupOf(os.Getpid()), os.Getpid(), os.Geteuid(), os.Getegid(), selfExe(t))
	})
	t.Run("curl as nobody", func(t *testing.T) {
		requireRoot(t)
		curl := lookExe(t, "curl")
		cmd := setprivCmd(t, curl, "-s", "-o", "/dev/null", "--max-time", "20", "--unix-socket", path, "http://keygate/")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		server := accept()
		id, err := p.Attest(context.Background(), broker.Evidence{Conn: server})
		cg := cgroupOf(cmd.Process.Pid)
		server.Write([]byte("HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"))
		server.Close()
		cmd.Wait()
		if err != nil {
			t.Fatal(err)
		}
		checkIdentity(t, id, cg, cmd.Process.Pid, 65534, 65534, curl)
	})
	t.Run("peer exited", func(t *testing.T) {
		cmd := exec.Command(lookExe(t, "curl"), "-s", "-o", "/dev/null", "--max-time", "20", "--unix-socket", path, "http://keygate/")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		server := accept()
		defer server.Close()
		server.Write([]byte("HTTP/1.1 204 No Content\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"))
		cmd.Wait() // curl has exited and been reaped: its pid may be reused
		_, err := p.Attest(context.Background(), broker.Evidence{Conn: server})
		if !errors.Is(err, broker.ErrInvalidEvidence) {
			t.Fatalf("want ErrInvalidEvidence for a vanished peer, got %v", err)
		}
	})
}

func TestProcessChainRejectsUnmappedLocal(t *testing.T) {
	// A caller that is local but cannot be mapped must not fall through to
	// a weaker method.
	cidr, err := NewCIDR([]CIDREntry{{ID: "local", CIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}})
	if err != nil {
		t.Fatal(err)
	}
	chain := NewChain(nil, Named{"process", newTestProcess(t, "")}, Named{"cidr", cidr})
	_, err = chain.Attest(context.Background(), broker.Evidence{
		Remote: netip.MustParseAddrPort("127.0.0.1:1"), Local: netip.MustParseAddrPort("127.0.0.1:2"),
	})
	if !errors.Is(err, broker.ErrInvalidEvidence) {
		t.Fatalf("got %v", err)
	}
	id, err := chain.Attest(context.Background(), broker.Evidence{Remote: netip.MustParseAddrPort("192.0.2.1:1")})
	if !errors.Is(err, broker.ErrNoEvidence) {
		t.Fatalf("remote caller: got %+v %v", id, err)
	}
}

func TestProcessAttestConcurrent(t *testing.T) {
	tp := listenTCP(t, "tcp4", "127.0.0.1:0")
	p := newTestProcess(t, "")
	const n = 8
	var servers []net.Conn
	for range n {
		c, err := net.Dial("tcp", tp.ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		s := tp.next(t)
		defer s.Close()
		servers = append(servers, s)
	}
	errs := make(chan error, n*4)
	for i := range n * 4 {
		go func() {
			id, err := p.Attest(context.Background(), evidenceOf(servers[i%n]))
			if err == nil && id.Process.PID != os.Getpid() {
				err = fmt.Errorf("pid %d", id.Process.PID)
			}
			errs <- err
		}()
	}
	for range n * 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// BenchmarkProcessAttest attests a real loopback TCP connection from this
// process. "cached": owner and exe hash cached (the same connection attested
// again); "new-owner": the inode→pid mapping is searched every time (a new
// connection), exe hash still cached; "procfs": as new-owner but with the
// /proc/net/tcp fallback instead of netlink.
func BenchmarkProcessAttest(b *testing.B) {
	tp := listenTCP(b, "tcp4", "127.0.0.1:0")
	client, err := net.Dial("tcp", tp.ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	server := tp.next(b)
	defer server.Close()
	ev := evidenceOf(server)
	for _, mode := range []string{"cached", "new-owner", "new-owner-not-recent", "procfs"} {
		b.Run(mode, func(b *testing.B) {
			p := newTestProcess(b, "")
			if mode == "procfs" {
				p.sys.netlink.Store(netlinkBroken)
			}
			if _, err := p.Attest(context.Background(), ev); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if mode != "cached" {
					p.owners = newProcLRU[uint64, ownerEntry](ownerCacheSize)
				}
				if mode == "new-owner-not-recent" {
					p.recent = nil
				}
				if _, err := p.Attest(context.Background(), ev); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
