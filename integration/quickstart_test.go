package integration

import (
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/testservers"
)

// The quick start's fixed addresses (configs/quickstart.yaml).
var quickstartAddrs = []string{"127.0.0.1:15080", "127.0.0.1:15090", "127.0.0.1:15443"}

// TestQuickstart: `broker run` with no config serves the embedded quick
// start; the curl command it prints works as printed (the demo upstream
// answers "authorized":true), and the /admin example is refused with 403.
// The demo token never reaches curl or the log.
func TestQuickstart(t *testing.T) {
	t.Parallel()
	curl := requireTool(t, "curl")
	for _, a := range quickstartAddrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			testservers.Missing(t, "quick start address %s is in use (%v)", a, err)
		}
		ln.Close()
	}
	h := newHarness(t)
	tmp := filepath.Join(h.dir, "tmp")
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		t.Fatal(err)
	}
	b := h.launch(brokerSpec{name: "quickstart"}, []string{"run"}, quickstartAddrs[0], quickstartAddrs[1],
		[]string{"TMPDIR=" + tmp, "BROKER_CONFIG="})
	if err := b.waitHealthy(testTimeout); err != nil {
		t.Fatalf("quick start: %v\n%s", err, b.output())
	}

	// The demo token is this test's secret: it must never be shown.
	tokFile := filepath.Join(tmp, "keygate-quickstart", "demo-token")
	tok, err := os.ReadFile(tokFile)
	if err != nil {
		t.Fatalf("demo token file: %v", err)
	}
	h.canary = strings.TrimSpace(string(tok))
	if len(h.canary) < 16 {
		t.Fatalf("demo token is only %d characters", len(h.canary))
	}
	canarytest.Register("quickstart demo token", h.canary) // broker-generated: swept too

	stdout := waitFor(t, &b.stdout, "/admin\n")
	cmds := regexp.MustCompile(`(?m)^\s+(curl --cacert \S+ --proxy \S+ (\S+))$`).FindAllStringSubmatch(stdout, -1)
	if len(cmds) != 2 {
		t.Fatalf("want two curl commands in the quick start text, found %d:\n%s", len(cmds), stdout)
	}
	for _, c := range cmds {
		fields := strings.Fields(c[1])
		args := append([]string{"-q", "-sS", "--max-time", "8"}, fields[1:]...)
		res := h.runTool(curl, nil, "", append(args, "-w", "\nstatus=%{http_code}")...)
		status := parseCurlStatus(t, res.stdout)
		switch {
		case strings.HasSuffix(c[2], "/headers"):
			if res.code != 0 || status != 200 || !strings.Contains(res.stdout, `"authorized":true`) {
				t.Errorf("%s\nexit %d, status %d, output:\n%s%s", c[1], res.code, status, res.stdout, res.stderr)
			}
		case strings.HasSuffix(c[2], "/admin"):
			if status != 403 || !strings.Contains(res.stdout, `"error":"denied"`) {
				t.Errorf("%s\nstatus %d, want 403 denied:\n%s", c[1], status, res.stdout)
			}
		default:
			t.Errorf("unexpected command %q", c[1])
		}
	}
}

// waitFor polls a buffer until it contains want and returns its content.
func waitFor(t *testing.T, buf *syncBuffer, want string) string {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for {
		s := string(buf.Bytes())
		if strings.Contains(s, want) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %q in:\n%s", want, s)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
