package integration

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/keygate/broker/internal/canarytest"
)

// TestNoSecretInLogs (SECURITY-TESTS T-B4): the real broker binary is
// driven down its failure paths while it holds canary credentials, and the
// suite-wide sweep (canarytest, run by TestMain) must have seen the
// broker's output, the workload's transcript and a /metrics scrape for
// them, so the package-level "no canary anywhere" verdict is not vacuous.
//
// Failure paths, each with a canary credential in play:
//   - upstream refused: the rule injects the static canary, the port is
//     closed;
//   - upstream TLS failure: the upstream's certificate is not signed by
//     the egress CA bundle;
//   - rule error: the rule's `when` fails at run time;
//   - credential source failure: a vault_kv credential whose AppRole
//     secret-id is a canary, against a Vault address nothing listens on.
//
// Each refusal must carry X-Keygate-Error and a request id whose audit line
// records the failure; nothing may reach the upstream. The harness checks
// every transcript entry and broker output for both canaries per test; the
// sweep checks them for every registered secret at the end of the run.
func TestNoSecretInLogs(t *testing.T) {
	t.Parallel()
	ran := false
	t.Run("failure-paths", func(t *testing.T) {
		ran = true
		h := newHarness(t)
		up := newUpstream(t, "allowed", nil)
		// An httptest TLS server with its own self-signed certificate: the
		// point is a certificate the broker must not trust, which no real
		// server here provides more simply.
		untrusted := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			t.Errorf("the untrusted upstream received %s %s", r.Method, r.URL.Path)
		}))
		t.Cleanup(untrusted.Close)
		closed := portOf(freeAddr(t)) // nothing listens there
		vaultDown := freeAddr(t)

		secretID := canarytest.New("approle secret-id (" + t.Name() + ")")
		dir := t.TempDir()
		roleFile, secretFile := filepath.Join(dir, "role-id"), filepath.Join(dir, "secret-id")
		for p, s := range map[string]string{roleFile: "keygate-role", secretFile: secretID} {
			if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		cfg := baseConfig + `
vaults:
  down:
    address: "http://` + vaultDown + `"
    auth: {method: approle, role_id_file: "` + roleFile + `", secret_id_file: "` + secretFile + `"}
credentials:
  api-token: {source: static, value: env:KG_E2E_TOKEN}
  vault-key: {source: vault_kv, vault: down, path: secret/data/app/key, field: token, cache: none}
rules:
  - name: refused
    hosts: [localhost]
    ports: [{{index .Ports "closed"}}]
    inject: {credential: api-token, as: bearer}
  - name: tls
    hosts: [localhost]
    ports: [{{index .Ports "untrusted"}}]
    inject: {credential: api-token, as: bearer}
  - name: rule-error
    hosts: [localhost]
    ports: [{{index .Ports "allowed"}}]
    when: 'request.path == "/rule-error" && int(request.path) > 0'
    inject: {credential: api-token, as: bearer}
  - name: vault
    hosts: [localhost]
    ports: [{{index .Ports "allowed"}}]
    when: 'request.path == "/vault"'
    inject: {credential: vault-key, as: bearer}
`
		untrustedPort, _ := strconv.Atoi(portOf(untrusted.Listener.Addr().String()))
		closedPort, _ := strconv.Atoi(closed)
		b := h.start(brokerSpec{name: "failures", config: cfg, env: []string{tokenEnv + "=" + h.canary}},
			map[string]int{"allowed": up.port(), "untrusted": untrustedPort, "closed": closedPort})

		for _, tc := range []struct {
			name, path string
			port       int
			code       string // X-Keygate-Error; "" = any code
		}{
			{"upstream refused", "/refused", closedPort, "upstream_unreachable"},
			{"upstream TLS failure", "/tls", untrustedPort, "upstream_tls"},
			{"rule error", "/rule-error", up.port(), ""},
			{"credential source failure", "/vault", up.port(), "credential_unavailable"},
		} {
			// No subtests: the harness helpers fail h.t, which must be the
			// goroutine's own test.
			resp, body := h.failingRequest(b, tc.name, tc.port, tc.path)
			got := resp.Header.Get("X-Keygate-Error")
			if resp.StatusCode < 400 || got == "" || (tc.code != "" && got != tc.code) {
				t.Errorf("%s: status %d, X-Keygate-Error %q; want a refusal with %q (body %q)",
					tc.name, resp.StatusCode, got, tc.code, redactCanary(string(body)))
				continue
			}
			// The failure reached the broker's log: the sweep has something
			// to look at for this path.
			line := b.auditLine(t, resp.Header.Get("X-Keygate-Request-Id"))
			if e, _ := line["error"].(string); e == "" {
				t.Errorf("%s: audit line records no error (decision %v)", tc.name, line["decision"])
			}
		}
		if n := up.count(); n != 0 {
			t.Errorf("the upstream received %d request(s); every path must fail before it", n)
		}
		// Per-test check for the second canary (the harness checks its own).
		t.Cleanup(func() {
			for _, n := range secretNeedles(secretID) {
				if bytes.Contains(b.output(), []byte(n)) {
					t.Errorf("SECRET LEAK: the broker output contains the AppRole secret-id (or an encoding of it)")
					return
				}
			}
		})
	})
	if !ran {
		t.Fatal("the failure-path subtest did not run")
	}
	// The subtest's cleanups (broker stop with a /metrics scrape, the
	// harness scan) have run: the sweep must have been handed all three.
	prefix := t.Name() + "/failure-paths"
	for _, src := range []string{"broker output (" + prefix, "transcript (" + prefix, "broker metrics (" + prefix} {
		if canarytest.Seen(src) == 0 {
			t.Errorf("the secret sweep saw no bytes from %q: the check would be vacuous", src+"…)")
		}
	}
}

// failingRequest sends GET path to localhost:port through the broker: a
// CONNECT, then (when the tunnel opens) the request inside TLS. It returns
// the broker's answer to whichever step it refused.
func (h *harness) failingRequest(b *brokerProc, what string, port int, path string) (*http.Response, []byte) {
	t := h.t
	t.Helper()
	authority := fmt.Sprintf("localhost:%d", port)
	cr := h.connect(b, authority)
	if cr.conn == nil {
		return cr.resp, cr.body
	}
	tc, err := h.tlsClient(cr.conn, "localhost")
	if err != nil {
		t.Fatalf("%s: TLS with the broker: %v", what, err)
	}
	defer tc.Close()
	return h.rawExchange(tc, what, "GET "+path+" HTTP/1.1\r\nHost: "+authority+"\r\nConnection: close\r\n\r\n")
}
