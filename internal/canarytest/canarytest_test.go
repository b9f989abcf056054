package canarytest

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"
)

// helperEnv makes the test binary a child that plants (or does not plant)
// a leak through its real stdout/stderr under Run; see TestMain.
const helperEnv = "KEYGATE_CANARYTEST_HELPER"

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		os.Exit(Run(func() int { return helper(mode) }))
	}
	os.Exit(Main(m))
}

// helper writes a canary (or clean text) the way a leaking test would.
func helper(mode string) int {
	c := New("helper-canary")
	fmt.Println("helper-marker-stdout")
	switch mode {
	case "stderr":
		fmt.Fprintf(os.Stderr, "error: upstream said %s\n", c)
	case "stdout-base64":
		fmt.Printf("Authorization: Basic %s\n", base64.StdEncoding.EncodeToString([]byte("u:"+c)))
	case "child":
		// A child process inherits fd 2: its output is captured too.
		cmd := exec.Command("/bin/sh", "-c", `printf 'child says %s\n' "$SECRET" >&2`)
		cmd.Env = append(os.Environ(), "SECRET="+c)
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "helper: child:", err)
			return 3
		}
	case "late":
		// Seen before it is registered: the final sweep still finds it.
		v := "late-secret-" + hex.EncodeToString([]byte("0123456789"))
		fmt.Fprintln(os.Stderr, "backend printed", v)
		Register("late-secret", v)
	case "clean":
		fmt.Fprintln(os.Stderr, "helper-marker-stderr")
	}
	return 0
}

func TestMainSweepsRealFDs(t *testing.T) {
	for _, tc := range []struct {
		mode     string
		wantLeak string // "" = clean run
	}{
		{"stderr", "SECRET LEAK: helper-canary found in stderr"},
		{"stdout-base64", "SECRET LEAK: helper-canary found in stdout"},
		{"child", "SECRET LEAK: helper-canary found in stderr"},
		{"late", "SECRET LEAK: late-secret found in stderr"},
		{"clean", ""},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), helperEnv+"="+tc.mode)
			var out, errb bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errb
			done := make(chan error, 1)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			go func() { done <- cmd.Wait() }()
			var err error
			select {
			case err = <-done:
			case <-time.After(60 * time.Second):
				_ = cmd.Process.Kill()
				t.Fatal("helper did not exit within 60s")
			}
			// Forwarding is unchanged: the child's own output still arrives.
			if !strings.Contains(out.String(), "helper-marker-stdout") {
				t.Errorf("stdout was not forwarded: %q", out.String())
			}
			if tc.wantLeak == "" {
				if err != nil || strings.Contains(errb.String(), "SECRET LEAK") {
					t.Fatalf("clean run: err %v, stderr %q", err, errb.String())
				}
				if !strings.Contains(errb.String(), "helper-marker-stderr") {
					t.Errorf("stderr was not forwarded: %q", errb.String())
				}
				return
			}
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
				t.Fatalf("leaking run: exit %v, want exit status 1", err)
			}
			if !strings.Contains(errb.String(), tc.wantLeak) {
				t.Fatalf("report missing %q in stderr", tc.wantLeak)
			}
			// The report lines never contain a secret value.
			for _, line := range strings.Split(errb.String(), "\n") {
				if strings.HasPrefix(line, "canarytest:") && (strings.Contains(line, "CANARY-") || strings.Contains(line, "late-secret-")) {
					t.Errorf("report line carries a secret value")
				}
			}
		})
	}
}

func TestEveryFormIsFound(t *testing.T) {
	// A value with characters that escaping changes.
	const special = "s3cr3t/with+plus=and space?&"
	for _, tc := range []struct {
		name   string
		secret string
		leak   func(v string) string
	}{
		{"raw", "", func(v string) string { return "token=" + v }},
		{"query", special, func(v string) string { return "https://x/?a=" + url.QueryEscape(v) }},
		{"path", special, func(v string) string { return "https://x/" + url.PathEscape(v) }},
		{"hex", "", func(v string) string { return "dump " + hex.EncodeToString([]byte(v)) }},
		{"HEX", "", func(v string) string { return "dump " + strings.ToUpper(hex.EncodeToString([]byte(v))) }},
		{"json", "", func(v string) string { return `{"password":"` + v + `"}` }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := NewRegistry(1 << 20)
			v := tc.secret
			if v == "" {
				v = r.New("form")
			} else {
				r.Register("form", v)
			}
			r.Observe("resp", []byte(tc.leak(v)))
			if leaks, _ := r.Sweep(); len(leaks) != 1 || leaks[0] != (Leak{"form", "resp"}) {
				t.Fatalf("leaks %v, want one in resp", leaks)
			}
		})
	}
	// base64, both alphabets, every alignment inside longer base64 text.
	for pad := 0; pad < 3; pad++ {
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding, base64.RawStdEncoding} {
			t.Run(fmt.Sprintf("base64-pad%d", pad), func(t *testing.T) {
				r := NewRegistry(1 << 20)
				v := r.New("b64")
				prefix := strings.Repeat("u", pad+3) + ":"
				r.Observe("basic", []byte("Basic "+enc.EncodeToString([]byte(prefix+v+"?suffix"))))
				if leaks, _ := r.Sweep(); len(leaks) != 1 {
					t.Fatalf("base64 with %d-byte prefix not found: %v", len(prefix), leaks)
				}
			})
		}
	}
}

func TestCleanOutputPasses(t *testing.T) {
	r := NewRegistry(1 << 20)
	v := r.New("clean")
	other := NewRegistry(1 << 20).New("clean") // same shape, different value
	r.Observe("resp", []byte("Authorization: Bearer "+other+" REDACTED "+v[:20]))
	r.Writer("stderr").Write([]byte(strings.Repeat("log line without secrets\n", 1000)))
	if leaks, dropped := r.Sweep(); len(leaks) != 0 || dropped != 0 {
		t.Fatalf("clean data: leaks %v, dropped %d", leaks, dropped)
	}
	if n, seen := r.Stats(); n != 1 || seen == 0 {
		t.Fatalf("stats: %d canaries, %d bytes", n, seen)
	}
}

func TestStreamSplitAcrossWrites(t *testing.T) {
	r := NewRegistry(1 << 20)
	v := r.New("split")
	w := r.Writer("stdout")
	line := "x-api-key: " + v + "\n"
	for i := 0; i < len(line); i += 5 {
		_, _ = w.Write([]byte(line[i:min(i+5, len(line))]))
	}
	if leaks, _ := r.Sweep(); len(leaks) != 1 || leaks[0].Source != "stdout" {
		t.Fatalf("split needle: leaks %v", leaks)
	}
}

func TestDocumentsDoNotJoin(t *testing.T) {
	r := NewRegistry(1 << 20)
	v := r.New("join")
	r.Observe("resp", []byte(v[:20]))
	r.Observe("resp", []byte(v[20:]))
	if leaks, _ := r.Sweep(); len(leaks) != 0 {
		t.Fatalf("two documents were joined: %v", leaks)
	}
}

func TestRetentionBudget(t *testing.T) {
	r := NewRegistry(64)
	early := r.New("early")
	r.Observe("big", bytes.Repeat([]byte("a"), 100)) // over budget: not kept
	r.Observe("big", []byte("leak "+early))          // not kept, scanned now
	late := "late-" + strings.Repeat("z", 20)
	r.Observe("big", []byte("leak "+late))
	r.Register("late", late) // registered after its only copy was dropped
	leaks, dropped := r.Sweep()
	if len(leaks) != 1 || leaks[0].Label != "early" {
		t.Fatalf("leaks %v: want only the early canary (scanned on arrival)", leaks)
	}
	if dropped == 0 {
		t.Fatal("dropped bytes not counted")
	}
	var b bytes.Buffer
	if n := r.Report(&b); n != 1 || !strings.Contains(b.String(), "retention budget") {
		t.Fatalf("report: %d leaks, %q", n, b.String())
	}
}

func TestShortSecretRefused(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("Register accepted a secret too short to sweep")
		}
	}()
	NewRegistry(1).Register("short", "abc")
}

func TestCanaryShape(t *testing.T) {
	r := NewRegistry(1)
	a, b := r.New("vault root/token"), r.New("vault root/token")
	if a == b {
		t.Fatal("two canaries are equal")
	}
	if !strings.HasPrefix(a, "CANARY-vault-root-token-") || len(a) != len("CANARY-vault-root-token-")+32 {
		t.Fatalf("unexpected canary shape (len %d)", len(a))
	}
	if url.QueryEscape(a) != a {
		t.Fatal("canary needs escaping")
	}
}

// TestForwarderFuncName keeps ForwarderFunc (for goroutine-leak checks)
// equal to the real name of the running forwarders.
func TestForwarderFuncName(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("stdout/stderr capture is Linux-only")
	}
	buf := make([]byte, 1<<20)
	stacks := string(buf[:runtime.Stack(buf, true)])
	if n := strings.Count(stacks, ForwarderFunc+"("); n != 2 {
		t.Fatalf("%d goroutines in %s, want 2 (stdout and stderr)", n, ForwarderFunc)
	}
}

// BenchmarkObserve: scanning cost per observed byte with 1000 canaries
// registered (it must not grow with the number of canaries).
func BenchmarkObserve(b *testing.B) {
	r := NewRegistry(0) // nothing retained: the on-arrival scan only
	for i := 0; i < 1000; i++ {
		r.New("bench")
	}
	data := bytes.Repeat([]byte(`{"level":"info","msg":"decision","request_id":"0123456789abcdef","rule":"api"}`+"\n"), 1<<14)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		r.Observe("bench", data)
	}
}
