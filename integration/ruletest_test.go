package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestRuleTestCLI: `broker test` on the examples' tests exits 0; on a file
// with a wrong expectation it exits 1 and prints the diff on stdout; on an
// invalid file it exits 1 with file:line on stderr; with no file, 2.
func TestRuleTestCLI(t *testing.T) {
	t.Parallel()
	examples, err := filepath.Glob(filepath.Join(moduleRoot, "configs", "tests", "*.yaml"))
	if err != nil || len(examples) == 0 {
		t.Fatalf("no example rule tests: %v", err)
	}
	cfg := filepath.Join(moduleRoot, "configs", "github-api.yaml")
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	failing := write("failing.yaml", `config: `+cfg+`
tests:
  - name: runner reads
    identity: {id: ci-runner, method: cidr}
    request: {method: GET, url: "https://api.github.com/repos/acme/app"}
    expect: {decision: allow, rule: github-read, credential: github-readonly}
  - name: laptop expected to read
    identity: {id: laptop, method: cidr}
    request: {method: GET, url: "https://api.github.com/repos/acme/app"}
    expect: {decision: allow, rule: github-read, credential: github-readonly}
`)
	invalid := write("invalid.yaml", `config: `+cfg+`
tests:
  - name: typo
    identity: {id: ci-runner, method: cidr}
    request: {method: GET, url: "https://api.github.com/"}
    expect: {decision: allow, rule: github-read, credentail: github-readonly}
`)

	t.Run("examples pass", func(t *testing.T) {
		res := runBroker(t, nil, append([]string{"test"}, examples...)...)
		if res.code != 0 || !strings.Contains(res.stdout, " passed, 0 failed") || strings.Contains(res.stdout, "FAIL") {
			t.Fatalf("exit %d, want 0\nstdout:\n%s\nstderr:\n%s", res.code, res.stdout, res.stderr)
		}
	})
	t.Run("failing file", func(t *testing.T) {
		res := runBroker(t, nil, "test", failing)
		if res.code != 1 {
			t.Fatalf("exit %d, want 1\nstdout:\n%s\nstderr:\n%s", res.code, res.stdout, res.stderr)
		}
		for _, want := range []string{
			"PASS runner reads\n",
			"FAIL laptop expected to read\n",
			failing + ":7\n",
			`decision: want allow, got deny (rule "github-writes-refused", reason "deny rule matched")`,
			`rule: want "github-read", got "github-writes-refused"`,
			`credential: want "github-readonly", got "" (none)`,
			"1 passed, 1 failed\n",
		} {
			if !strings.Contains(res.stdout, want) {
				t.Errorf("stdout lacks %q:\n%s", want, res.stdout)
			}
		}
	})
	t.Run("config flag after the file", func(t *testing.T) {
		pass := write("pass.yaml", `tests:
  - name: runner reads
    identity: {id: ci-runner, method: cidr}
    request: {connect: "api.github.com:443"}
    expect: {decision: allow, rule: github-read}
`)
		res := runBroker(t, nil, "test", pass, "--config", cfg)
		if res.code != 0 || !strings.Contains(res.stdout, "PASS runner reads\n1 passed, 0 failed\n") {
			t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", res.code, res.stdout, res.stderr)
		}
	})
	t.Run("invalid file", func(t *testing.T) {
		res := runBroker(t, nil, "test", invalid)
		if res.code != 1 || !strings.Contains(res.stderr, invalid+":6: field credentail not found in expect") {
			t.Fatalf("exit %d, want 1 with file:line\nstdout:\n%s\nstderr:\n%s", res.code, res.stdout, res.stderr)
		}
	})
	t.Run("usage", func(t *testing.T) {
		if res := runBroker(t, nil, "test"); res.code != 2 {
			t.Fatalf("exit %d, want 2\n%s", res.code, res.stderr)
		}
		if res := runBroker(t, nil, "test", "--bogus", failing); res.code != 2 {
			t.Fatalf("exit %d, want 2\n%s", res.code, res.stderr)
		}
	})
}
