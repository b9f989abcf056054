// Package integration holds keygate's end-to-end tests: the real broker
// binary, started as a subprocess, in front of real TLS upstreams and driven
// by real clients (curl, git, Go's net/http and hand-written wire bytes).
//
// Name resolution: the tests never touch /etc/hosts and need no DNS. The
// allowed upstream is always "localhost" (resolved by the broker from the
// machine's /etc/hosts, which maps it to 127.0.0.1 on every system we run
// on), and "evil" destinations are spelled as the IP literal 127.0.0.1 on a
// second port, or as a name such as evil.test where the broker must refuse
// before it would ever resolve anything (SNI, Host header). This keeps the
// tests parallel-safe and leaves the machine untouched.
//
// Real parts: curl, git (+ git http-backend) and the broker binary are the
// real programs. The upstreams are Go httptest TLS servers because their job
// is to record exactly what reached them; there is no off-the-shelf server
// that does that better.
package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/testservers"
)

// brokerBin is the broker binary built once by TestMain.
var brokerBin string

// moduleRoot is the directory holding go.mod.
var moduleRoot string

// TestMain runs the suite under the secret sweep (canarytest): broker
// output, transcripts and metrics scrapes are Observed by the harness, and
// the test process's own stdout/stderr are captured.
func TestMain(m *testing.M) {
	os.Exit(canarytest.Run(func() int { return runMain(m) }))
}

func runMain(m *testing.M) int {
	tmp, err := os.MkdirTemp("", "keygate-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	defer os.RemoveAll(tmp)

	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration: go env GOMOD:", err)
		return 1
	}
	moduleRoot = filepath.Dir(strings.TrimSpace(string(gomod)))
	if moduleRoot == "." || moduleRoot == "" {
		fmt.Fprintln(os.Stderr, "integration: not inside a Go module")
		return 1
	}

	brokerBin = filepath.Join(tmp, "broker")
	args := []string{"build", "-o", brokerBin}
	// KEYGATE_E2E_RACE=1 builds the broker itself with the race detector,
	// so the end-to-end traffic also hunts data races in the broker.
	if os.Getenv("KEYGATE_E2E_RACE") == "1" {
		args = append(args, "-race")
	}
	args = append(args, "./cmd/broker")
	build := exec.Command("go", args...)
	build.Dir = moduleRoot
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "integration: go build ./cmd/broker: %v\n%s", err, out)
		return 1
	}
	if err := initTestPKI(tmp); err != nil {
		fmt.Fprintln(os.Stderr, "integration: test PKI:", err)
		return 1
	}
	return m.Run()
}

// requireTool returns the path of a client program. When it is missing the
// test fails in CI (CI=true) and is skipped elsewhere.
func requireTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		testservers.Missing(t, "%s is not installed (apt-get install %s)", name, name)
	}
	return p
}

// cleanEnv is the environment for client subprocesses: no proxy variables
// and no user configuration leak in from the machine running the tests.
func cleanEnv(home string, extra ...string) []string {
	env := []string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + home,
		"LANG=C",
		"LC_ALL=C",
	}
	if v := os.Getenv("TMPDIR"); v != "" {
		env = append(env, "TMPDIR="+v)
	}
	return append(env, extra...)
}
