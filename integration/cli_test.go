package integration

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// TestCLIValidate: `broker validate` prints every problem of a broken
// file as file:line: message and exits 1; a good file exits 0; `broker
// run` refuses the broken file too.
func TestCLIValidate(t *testing.T) {
	t.Parallel()
	broken := filepath.Join("testdata", "broken.yaml")
	good := filepath.Join("testdata", "good.yaml")

	wantLines := []struct {
		line int
		has  string
	}{
		{4, "colour"},                            // unknown key
		{10, "is not a duration"},                // bad duration
		{14, `rule "bad-cel"`},                   // bad CEL
		{17, `credential "nope" is not defined`}, // missing credential
	}
	check := func(t *testing.T, res cliResult) {
		t.Helper()
		if res.code != 1 {
			t.Fatalf("exit %d, want 1\nstdout: %s\nstderr: %s", res.code, res.stdout, res.stderr)
		}
		var problems []string
		for _, l := range strings.Split(strings.TrimSpace(res.stderr), "\n") {
			if strings.HasPrefix(l, broken+":") {
				problems = append(problems, l)
			}
		}
		if len(problems) != len(wantLines) {
			t.Errorf("%d problem lines, want %d:\n%s", len(problems), len(wantLines), res.stderr)
		}
		lineRE := regexp.MustCompile(`^` + regexp.QuoteMeta(broken) + `:(\d+): (.+)$`)
		for _, w := range wantLines {
			found := false
			for _, p := range problems {
				m := lineRE.FindStringSubmatch(p)
				if m != nil && m[1] == strconv.Itoa(w.line) && strings.Contains(m[2], w.has) {
					found = true
				}
			}
			if !found {
				t.Errorf("no problem %q at %s:%d in:\n%s", w.has, broken, w.line, res.stderr)
			}
		}
		if strings.Contains(res.stderr, "panic") || strings.Contains(res.stderr, "goroutine ") {
			t.Errorf("the broker panicked:\n%s", res.stderr)
		}
	}

	t.Run("validate broken", func(t *testing.T) {
		check(t, runBroker(t, nil, "validate", "--config", broken))
	})
	t.Run("run broken", func(t *testing.T) {
		check(t, runBroker(t, nil, "run", "--config", broken))
	})
	t.Run("validate good", func(t *testing.T) {
		res := runBroker(t, []string{"KG_E2E_TOKEN=dummy"}, "validate", "--config", good)
		if res.code != 0 {
			t.Fatalf("exit %d, want 0\n%s%s", res.code, res.stdout, res.stderr)
		}
		if !strings.Contains(res.stdout, "ok") {
			t.Errorf("stdout %q, want an ok summary", res.stdout)
		}
	})
	t.Run("validate good without its secret", func(t *testing.T) {
		// The env: variable is unset: a problem at the credential's line,
		// exit 1, never a panic.
		res := runBroker(t, nil, "validate", "--config", good)
		if res.code != 1 {
			t.Fatalf("exit %d, want 1\n%s%s", res.code, res.stdout, res.stderr)
		}
		if !strings.Contains(res.stderr, good+":10: ") || strings.Contains(res.stderr, "panic") {
			t.Errorf("want one problem at %s:10, got:\n%s", good, res.stderr)
		}
	})
	t.Run("validate missing file", func(t *testing.T) {
		res := runBroker(t, nil, "validate", "--config", filepath.Join(t.TempDir(), "nope.yaml"))
		if res.code != 1 {
			t.Errorf("exit %d, want 1\n%s", res.code, res.stderr)
		}
	})
	t.Run("validate without --config", func(t *testing.T) {
		if res := runBroker(t, nil, "validate"); res.code != 2 {
			t.Errorf("exit %d, want 2 (usage)\n%s", res.code, res.stderr)
		}
	})
}

// TestCLIExplain: the deciding rule, the credential, and why each other
// candidate did not decide; JSON form too. It contacts nothing and needs no
// secret.
func TestCLIExplain(t *testing.T) {
	t.Parallel()
	good := filepath.Join("testdata", "good.yaml")
	id := `{"id":"build-farm","method":"cidr"}`
	res := runBroker(t, nil, "explain", "--config", good, "--identity", id, "--method", "GET", "--url", "https://api.example.com/v1/items")
	if res.code != 0 {
		t.Fatalf("exit %d\n%s%s", res.code, res.stdout, res.stderr)
	}
	for _, want := range []string{
		"decision:   allow", "rule:       reads", "credential: api-token (source static), injected as bearer",
		"candidates:", "block-metadata", "host does not match", "ci-writes", "when is false",
	} {
		if !strings.Contains(res.stdout, want) {
			t.Errorf("explain output lacks %q:\n%s", want, res.stdout)
		}
	}

	res = runBroker(t, nil, "explain", "--json", "--config", good, "--identity", id, "--method", "POST", "--url", "https://api.example.com/v1/items")
	if res.code != 0 {
		t.Fatalf("exit %d\n%s%s", res.code, res.stdout, res.stderr)
	}
	var out struct {
		Decision   string `json:"decision"`
		Rule       string `json:"rule"`
		Candidates []struct{ Rule, Reason string }
	}
	if err := json.Unmarshal([]byte(res.stdout), &out); err != nil {
		t.Fatalf("--json output: %v\n%s", err, res.stdout)
	}
	if out.Decision != "allow" || out.Rule != "ci-writes" || len(out.Candidates) < 2 {
		t.Errorf("POST: %+v, want allow by ci-writes with candidates", out)
	}

	res = runBroker(t, nil, "explain", "--config", good, "--identity", id, "--method", "GET", "--url", "https://169.254.169.254/latest/meta-data")
	if res.code != 0 || !strings.Contains(res.stdout, "decision:   deny") || !strings.Contains(res.stdout, "rule:       block-metadata") {
		t.Errorf("metadata: exit %d, want deny by block-metadata:\n%s%s", res.code, res.stdout, res.stderr)
	}
	res = runBroker(t, nil, "explain", "--config", good, "--identity", id, "--method", "GET", "--url", "https://unknown.example.net/")
	if res.code != 0 || !strings.Contains(res.stdout, "decision:   deny") || !strings.Contains(res.stdout, "(default deny)") {
		t.Errorf("no rule: exit %d, want default deny:\n%s%s", res.code, res.stdout, res.stderr)
	}
	if res := runBroker(t, nil, "explain", "--config", good, "--identity", "not json", "--url", "https://x.example.com/"); res.code != 1 {
		t.Errorf("bad --identity: exit %d, want 1", res.code)
	}
}

// TestCLICAInit: `broker ca init` writes ca.pem and a 0600 key and never
// overwrites.
func TestCLICAInit(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "ca")
	res := runBroker(t, nil, "ca", "init", "--dir", dir)
	if res.code != 0 {
		t.Fatalf("exit %d\n%s", res.code, res.stderr)
	}
	fi, err := os.Stat(filepath.Join(dir, "ca-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if m := fi.Mode().Perm(); m != 0o600 {
		t.Errorf("ca-key.pem mode %o, want 600", m)
	}
	cert, _ := os.ReadFile(filepath.Join(dir, "ca.pem"))
	key, _ := os.ReadFile(filepath.Join(dir, "ca-key.pem"))
	if !bytes.Contains(cert, []byte("BEGIN CERTIFICATE")) || len(key) == 0 {
		t.Fatalf("ca.pem / ca-key.pem missing or not PEM")
	}
	if strings.Contains(res.stdout, string(key)) {
		t.Errorf("ca init printed the private key")
	}

	res = runBroker(t, nil, "ca", "init", "--dir", dir)
	if res.code != 1 {
		t.Errorf("second ca init: exit %d, want 1\n%s", res.code, res.stderr)
	}
	cert2, _ := os.ReadFile(filepath.Join(dir, "ca.pem"))
	key2, _ := os.ReadFile(filepath.Join(dir, "ca-key.pem"))
	if !bytes.Equal(cert, cert2) || !bytes.Equal(key, key2) {
		t.Errorf("second ca init overwrote the CA")
	}
	if res := runBroker(t, nil, "ca", "init"); res.code != 2 {
		t.Errorf("ca init without --dir: exit %d, want 2", res.code)
	}
}

// TestCLIMisc: version and usage exit codes.
func TestCLIMisc(t *testing.T) {
	t.Parallel()
	res := runBroker(t, nil, "version")
	if res.code != 0 || !strings.Contains(res.stdout, runtime.Version()) {
		t.Errorf("version: exit %d, output %q (want 0 and the Go version)", res.code, res.stdout)
	}
	for _, args := range [][]string{{"frobnicate"}, {}, {"ca"}, {"ca", "destroy"}, {"run", "--no-such-flag"}} {
		if res := runBroker(t, nil, args...); res.code != 2 {
			t.Errorf("broker %q: exit %d, want 2 (usage)\n%s", args, res.code, res.stderr)
		}
	}
}
