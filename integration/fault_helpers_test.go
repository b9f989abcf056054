package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/testservers"
)

// The fault matrix (SECURITY-TESTS.md §5) runs the real broker binary
// against real backends with a toxiproxy fault proxy
// (testservers.FaultProxy) between the broker and the backend: the broker
// knows only the proxy's address. Faults are switched on the proxy (down,
// hang, latency, reset) or on the real server itself (stopped, restarted,
// its token revoked, bad values stored).

// vaultWorld is a real dev-mode Vault behind a fault proxy, seeded with an
// AppRole login for the broker, a KV secret holding the harness canary and
// a file audit device (what the backend saw, request by request), plus a
// recording upstream and the broker.
type vaultWorld struct {
	h      *harness
	v      *testservers.Vault
	fp     *testservers.FaultProxy
	up     *upstream
	b      *brokerProc
	client *http.Client

	dir      string
	auditLog string
	*appRole // the broker's login; replaced when seed runs again
}

// vaultFaultConfig: one rule per path prefix, each with its own
// credential. The Vault timeout is the catalogue's fetch budget (2s), so a
// failure answers within 2.5s.
const vaultFaultConfig = `
listen: {proxy: "{{.Proxy}}", admin: "{{.Admin}}"}
ca: {cert: "{{.CACert}}", key: "{{.CAKey}}"}
attestors:
  - {type: cidr, identities: [{id: ci-runner, cidrs: [127.0.0.1/32]}]}
egress: {allow_cidrs: [127.0.0.1/32], connect_ports: [{{index .Ports "up"}}], ca_bundle: "{{.Bundle}}"}
vaults:
  main:
    address: "http://@VAULT@"
    timeout: 2s
    auth: {method: approle, role_id_file: "@ROLE@", secret_id_file: "@SECRET@"}
credentials:
  kv: {source: vault_kv, vault: main, path: secret/data/app/github, field: token, cache: none}
  kv-cached: {source: vault_kv, vault: main, path: secret/data/app/github, field: token, cache: 5m}
  missing: {source: vault_kv, vault: main, path: secret/data/app/missing, field: token, cache: none}
  empty: {source: vault_kv, vault: main, path: secret/data/app/empty, field: token, cache: none}
  crlf: {source: vault_kv, vault: main, path: secret/data/app/crlf, field: token, cache: none}
  big: {source: vault_kv, vault: main, path: secret/data/app/big, field: token, cache: none}
  huge: {source: vault_kv, vault: main, path: secret/data/app/huge, field: token, cache: none}
rules:
`

// vaultFaultRoutes are the credentials of vaultFaultConfig, each reached
// through its own rule at GET /NAME.
var vaultFaultRoutes = []string{"kv", "kv-cached", "missing", "empty", "crlf", "big", "huge"}

// vaultFaultRules renders one rule per route.
func vaultFaultRules() string {
	var b strings.Builder
	for _, p := range vaultFaultRoutes {
		fmt.Fprintf(&b, "  - name: %s\n    hosts: [localhost]\n    ports: [{{index .Ports \"up\"}}]\n    when: 'request.path == \"/%s\"'\n    inject: {credential: %s, as: bearer}\n", p, p, p)
	}
	return b.String()
}

func newVaultWorld(t *testing.T) *vaultWorld {
	t.Helper()
	return newVaultWorldVia(t, nil)
}

// newVaultWorldVia is newVaultWorld with the broker pointed at front(v)
// (host:port) instead of the fault proxy.
func newVaultWorldVia(t *testing.T, front func(v *testservers.Vault) string) *vaultWorld {
	t.Helper()
	v := testservers.StartVault(t)
	h := newHarness(t)
	w := &vaultWorld{h: h, v: v, dir: t.TempDir()}
	w.fp = testservers.StartFaultProxy(t, v.HostPort)
	addr := w.fp.Addr
	if front != nil {
		addr = front(v)
	}
	w.up = newUpstream(t, "vault-fault", nil)
	w.auditLog = filepath.Join(w.dir, "vault-audit.log")
	w.seed()
	cfg := strings.NewReplacer("@VAULT@", addr, "@ROLE@", w.roleFile,
		"@SECRET@", w.secretFile).Replace(vaultFaultConfig)
	cfg += vaultFaultRules()
	w.b = h.start(brokerSpec{name: "vault-fault", config: cfg}, map[string]int{"up": w.up.port()})
	waitReadyz(t, w.b, testTimeout)
	w.client = h.goClient(w.b)
	// Neither the AppRole secret id nor Vault's root token may reach a
	// client or the broker's output.
	t.Cleanup(func() {
		h.sweepFor(t, "the AppRole secret id", w.secretID)
		h.sweepFor(t, "the Vault root token", v.RootToken)
		toks := w.brokerTokens(t)
		if len(toks) == 0 {
			t.Error("Vault's raw audit log shows no token issued to the broker: the token sweep would prove nothing")
		}
		for i, tok := range toks {
			h.sweepFor(t, fmt.Sprintf("the broker's Vault token #%d", i+1), tok)
		}
	})
	return w
}

// seed (re)creates everything the broker needs in Vault (dev mode starts
// empty after a restart) and writes the AppRole files the broker reads at
// each login.
func (w *vaultWorld) seed() {
	v := w.v
	// log_raw: the log (in the test's temp dir) shows the tokens Vault
	// issued to the broker, so the sweep can look for them.
	v.MustEventually("PUT", "sys/audit/file", map[string]any{"type": "file",
		"options": map[string]any{"file_path": w.auditLog, "log_raw": true}})
	w.appRole = newAppRole(w.h.t, v, w.dir, kvReadPolicy, "10m")
	v.MustEventually("POST", "secret/data/app/github", map[string]any{"data": map[string]any{"token": w.h.canary}})
}

// kvReadPolicy lets the broker's AppRole read the KV v2 secrets under
// secret/data/app/.
const kvReadPolicy = `path "secret/data/app/*" { capabilities = ["read"] }`

// dbCredsPolicy lets the broker's AppRole take, renew and revoke users of
// the database engine's role app.
const dbCredsPolicy = `
path "database/creds/app" { capabilities = ["read"] }
path "sys/leases/renew/database/creds/app/*" { capabilities = ["update"] }
path "sys/leases/revoke/database/creds/app/*" { capabilities = ["update"] }
`

// appRole is the broker's AppRole login to a real Vault: policy and role
// "keygate", and the role-id and secret-id files the broker reads at each
// login.
type appRole struct {
	vault                *testservers.Vault
	roleID               string
	roleFile, secretFile string
	secretID             string // the latest issued; registered with canarytest
}

// newAppRole writes policy as "keygate", enables AppRole (dev mode starts
// without it, after a restart too), creates role "keygate" whose tokens
// live tokenTTL, and writes its files into dir with a fresh secret id.
func newAppRole(t *testing.T, v *testservers.Vault, dir, policy, tokenTTL string) *appRole {
	t.Helper()
	v.Must("PUT", "sys/policy/keygate", map[string]any{"policy": policy})
	v.MustEventually("POST", "sys/auth/approle", map[string]any{"type": "approle"})
	v.Must("POST", "auth/approle/role/keygate", map[string]any{"token_policies": []string{"keygate"}, "token_ttl": tokenTTL})
	a := &appRole{vault: v, roleFile: filepath.Join(dir, "role-id"), secretFile: filepath.Join(dir, "secret-id")}
	a.roleID = v.Must("GET", "auth/approle/role/keygate/role-id", nil)["data"].(map[string]any)["role_id"].(string)
	a.newSecretID(t)
	return a
}

// newSecretID issues a new secret id for the role and (re)writes both
// files.
func (a *appRole) newSecretID(t *testing.T) {
	t.Helper()
	a.secretID = a.vault.Must("POST", "auth/approle/role/keygate/secret-id", nil)["data"].(map[string]any)["secret_id"].(string)
	canarytest.Register("AppRole secret id ("+t.Name()+")", a.secretID)
	for p, s := range map[string]string{a.roleFile: a.roleID, a.secretFile: a.secretID} {
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// vaultPostgres mounts Vault's database engine on pg (connection "pg")
// with role "app": a LOGIN role valid until its lease ends, for
// defaultTTL (max maxTTL).
func vaultPostgres(v *testservers.Vault, pg *testservers.Postgres, defaultTTL, maxTTL string) {
	v.MustEventually("POST", "sys/mounts/database", map[string]any{"type": "database"})
	v.Must("POST", "database/config/pg", map[string]any{
		"plugin_name":             "postgresql-database-plugin",
		"connection_url":          fmt.Sprintf("postgresql://{{username}}:{{password}}@127.0.0.1:%d/postgres?sslmode=disable", pg.Port),
		"username":                pg.User,
		"password":                pg.Password,
		"allowed_roles":           "app",
		"password_authentication": "scram-sha-256",
	})
	v.Must("POST", "database/roles/app", map[string]any{"db_name": "pg", "default_ttl": defaultTTL, "max_ttl": maxTTL,
		"creation_statements": []string{`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`}})
}

// get sends GET https://localhost:up/path through the broker and returns
// the response, its body and how long it took.
func (w *vaultWorld) get(t *testing.T, path string) (*http.Response, []byte, time.Duration) {
	t.Helper()
	return doVia(t, w.h, w.client, http.MethodGet, fmt.Sprintf("https://localhost:%d%s", w.up.port(), path), nil)
}

func doVia(t *testing.T, h *harness, c *http.Client, method, url string, body []byte) (*http.Response, []byte, time.Duration) {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body == nil {
		req.Body = nil
	}
	start := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s through the broker: %v", method, url, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	d := time.Since(start)
	if err != nil {
		t.Fatalf("%s %s: reading the body: %v", method, url, err)
	}
	h.recordResponse(method+" "+url, resp, b)
	return resp, b, d
}

// auditReads returns the times of the requests Vault's audit log shows
// for path (for example "auth/approle/login" or "secret/data/app/github"),
// in log order.
func (w *vaultWorld) auditReads(t *testing.T, path string) []time.Time {
	t.Helper()
	entries, err := readVaultAudit(w.auditLog, "request", path)
	if err != nil {
		t.Fatalf("vault audit log: %v", err)
	}
	var out []time.Time
	for _, e := range entries {
		out = append(out, e.Time)
	}
	return out
}

// brokerTokens returns every token Vault issued at an AppRole login, read
// from the raw audit log.
func (w *vaultWorld) brokerTokens(t *testing.T) []string {
	t.Helper()
	entries, err := readVaultAudit(w.auditLog, "response", "auth/approle/login")
	if err != nil {
		t.Errorf("vault audit log: %v", err)
		return nil
	}
	var out []string
	for _, e := range entries {
		if e.Response.Auth.ClientToken != "" {
			out = append(out, e.Response.Auth.ClientToken)
		}
	}
	return out
}

// vaultAuditEntry is one line of Vault's file audit log, as far as the
// tests read it (the response's token and password need log_raw).
type vaultAuditEntry struct {
	Time    time.Time `json:"time"`
	Type    string    `json:"type"` // "request" or "response"
	Request struct {
		Path      string `json:"path"`
		Operation string `json:"operation"`
	} `json:"request"`
	Response struct {
		Auth struct {
			ClientToken string `json:"client_token"`
		} `json:"auth"`
		Data map[string]any `json:"data"`
	} `json:"response"`
}

// readVaultAudit returns the entries of type typ for the request path in
// the Vault audit log file, in log order.
func readVaultAudit(file, typ, path string) ([]vaultAuditEntry, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var out []vaultAuditEntry
	for _, line := range bytes.Split(data, []byte("\n")) {
		var e vaultAuditEntry
		if json.Unmarshal(line, &e) == nil && e.Type == typ && e.Request.Path == path {
			out = append(out, e)
		}
	}
	return out, nil
}

// auditCount is len(auditReads).
func (w *vaultWorld) auditCount(t *testing.T, path string) int {
	t.Helper()
	return len(w.auditReads(t, path))
}

// revokeBrokerTokens revokes, as root, every live token that came from the
// broker's AppRole login, and returns how many there were. The broker is
// not told.
func (w *vaultWorld) revokeBrokerTokens(t *testing.T) int {
	t.Helper()
	accs := approleAccessors(t, w.v)
	for _, acc := range accs {
		w.v.Must("POST", "auth/token/revoke-accessor", map[string]any{"accessor": acc})
	}
	return len(accs)
}

// approleAccessors returns the accessors of the live tokens made by an
// AppRole login (the broker's), via the root token.
func approleAccessors(t *testing.T, v *testservers.Vault) []string {
	t.Helper()
	code, out, err := v.Do("LIST", "auth/token/accessors", nil)
	if err != nil || code != http.StatusOK {
		t.Fatalf("LIST auth/token/accessors: %d %v", code, err)
	}
	keys, _ := out["data"].(map[string]any)["keys"].([]any)
	var found []string
	for _, k := range keys {
		acc, _ := k.(string)
		code, info, err := v.Do("POST", "auth/token/lookup-accessor", map[string]any{"accessor": acc})
		if err != nil || code != http.StatusOK {
			continue
		}
		if d, _ := info["data"].(map[string]any); d != nil && d["path"] == "auth/approle/login" {
			found = append(found, acc)
		}
	}
	return found
}

// sweepFor fails the test if secret appears in a client transcript or a
// broker's output (the harness sweeps the canary itself).
func (h *harness) sweepFor(t *testing.T, what, secret string) {
	if secret == "" {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, e := range h.transcript {
		if bytes.Contains(e.data, []byte(secret)) {
			t.Errorf("SECRET LEAK: %s contains %s", e.what, what)
		}
	}
	for _, b := range h.brokers {
		if bytes.Contains(b.output(), []byte(secret)) {
			t.Errorf("SECRET LEAK: broker output (%s) contains %s", b.name, what)
		}
	}
}

// expectCode asserts a broker refusal with status and code, answered
// within limit.
func expectCode(t *testing.T, what string, resp *http.Response, body []byte, d time.Duration, status int, code string, limit time.Duration) {
	t.Helper()
	expectRefusal(t, what, resp, body, status, code)
	if d > limit {
		t.Errorf("%s: answered after %v, want within %v", what, d.Round(time.Millisecond), limit)
	}
}

// metricValue reads one unlabelled sample (for example go_goroutines)
// from the broker's /metrics.
func metricValue(t *testing.T, b *brokerProc, name string) float64 {
	t.Helper()
	code, body := adminGet(t, b, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: HTTP %d", code)
	}
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` ([0-9.e+]+)$`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("/metrics has no %s", name)
	}
	f, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// auditDurations returns the duration the broker's audit lines ("msg":
// "decision") report for each request to path matched by rule (CONNECT
// and tunnel lines have no path).
func auditDurations(b *brokerProc, rule, path string) []time.Duration {
	var out []time.Duration
	for _, m := range b.auditDecisions() {
		if m["rule"] == rule && m["path"] == path {
			ms, _ := m["duration_ms"].(float64)
			out = append(out, time.Duration(ms*float64(time.Millisecond)))
		}
	}
	return out
}

// checkBurst asserts that every request of a burst failed closed with 503
// credential_unavailable within failBudget as the broker measured it (its
// audit line's duration), and within failBudget+clientSlack as the client
// saw it: the client side adds the scheduling of 200 reader goroutines
// (under -race) on a shared machine, which is not the broker's time. It
// returns the worst client and broker times.
func checkBurst(t *testing.T, b *brokerProc, rule, path string, res []burstResult) (client, broker time.Duration) {
	t.Helper()
	const clientSlack = time.Second
	bad := 0
	for i, r := range res {
		client = max(client, r.d)
		if r.err != nil || r.status != http.StatusServiceUnavailable || r.code != "credential_unavailable" || r.d > failBudget+clientSlack {
			bad++
			if bad <= 5 {
				t.Errorf("request %d: HTTP %d %q after %v (err %v); want 503 credential_unavailable within %v",
					i, r.status, r.code, r.d.Round(time.Millisecond), r.err, failBudget)
			}
		}
	}
	if bad > 0 {
		t.Errorf("%d of %d requests did not fail closed in time", bad, len(res))
	}
	var ds []time.Duration
	pollUntil(testTimeout, func() bool { ds = auditDurations(b, rule, path); return len(ds) >= len(res) })
	if len(ds) != len(res) {
		t.Errorf("%d audit lines for rule %s, want %d", len(ds), rule, len(res))
	}
	for _, d := range ds {
		broker = max(broker, d)
	}
	if broker > failBudget {
		t.Errorf("the broker took up to %v to fail a request, want within %v", broker.Round(time.Millisecond), failBudget)
	}
	return client, broker
}

// sampleMetric reads name from /metrics after d, off the test goroutine;
// the channel yields -1 when it could not.
func sampleMetric(t *testing.T, b *brokerProc, name string, d time.Duration) <-chan float64 {
	out := make(chan float64, 1)
	go func() {
		time.Sleep(d)
		v := -1.0
		if code, body := adminGet(t, b, "/metrics"); code == http.StatusOK {
			re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` ([0-9.e+]+)$`)
			if m := re.FindStringSubmatch(body); m != nil {
				v, _ = strconv.ParseFloat(m[1], 64)
			}
		}
		out <- v
	}()
	return out
}

// fdCount is the number of open file descriptors of the broker process.
func fdCount(t *testing.T, b *brokerProc) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", b.cmd.Process.Pid))
	if err != nil {
		testservers.Missing(t, "no /proc fd listing for the broker: %v", err)
	}
	return len(ents)
}

// pollUntil polls cond every 100ms until it is true or d passes; it returns
// how long it took and whether cond held.
func pollUntil(d time.Duration, cond func() bool) (time.Duration, bool) {
	start := time.Now()
	for {
		if cond() {
			return time.Since(start), true
		}
		if time.Since(start) > d {
			return time.Since(start), false
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// tunnel is one workload connection: CONNECT through the broker plus the
// workload's TLS handshake, ready for a request.
type tunnel struct {
	conn *tls.Conn
	br   *bufio.Reader
}

// openTunnels opens n tunnels to authority one after the other, so a
// burst can later send n requests at the same instant.
func (h *harness) openTunnels(t *testing.T, b *brokerProc, authority string, n int) []*tunnel {
	t.Helper()
	host, _, _ := strings.Cut(authority, ":")
	out := make([]*tunnel, 0, n)
	for i := 0; i < n; i++ {
		cr := h.connect(b, authority)
		if cr.conn == nil {
			t.Fatalf("CONNECT %s: HTTP %d", authority, cr.resp.StatusCode)
		}
		tc, err := h.tlsClient(cr.conn, host)
		if err != nil {
			t.Fatalf("tunnel %d: TLS handshake: %v", i, err)
		}
		out = append(out, &tunnel{conn: tc, br: bufio.NewReader(tc)})
	}
	return out
}

// burstResult is one request of a burst.
type burstResult struct {
	status int
	code   string
	d      time.Duration
	err    error
}

// burst sends raw on every tunnel at once (after a shared start signal)
// and reads one response from each.
func (h *harness) burst(tunnels []*tunnel, raw string) []burstResult {
	res := make([]burstResult, len(tunnels))
	var ready, done sync.WaitGroup
	start := make(chan struct{})
	for i, tn := range tunnels {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			ready.Done()
			<-start
			_ = tn.conn.SetDeadline(time.Now().Add(testTimeout))
			t0 := time.Now()
			if _, err := io.WriteString(tn.conn, raw); err != nil {
				res[i].err = err
				return
			}
			resp, err := http.ReadResponse(tn.br, nil)
			if err != nil {
				res[i].err = err
				return
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			res[i] = burstResult{status: resp.StatusCode, code: resp.Header.Get("X-Keygate-Error"), d: time.Since(t0)}
			h.recordResponse(fmt.Sprintf("burst response %d", i), resp, body)
		}()
	}
	ready.Wait()
	close(start)
	done.Wait()
	return res
}

// closeTunnels closes every tunnel.
func closeTunnels(ts []*tunnel) {
	for _, tn := range ts {
		_ = tn.conn.Close()
	}
}

// row logs one line of measured figures for docs/reliability.md.
func row(t *testing.T, id string, format string, args ...any) {
	t.Helper()
	t.Logf("FAULT-ROW %s: %s", id, fmt.Sprintf(format, args...))
}

// stsWorld is a real MinIO whose STS (AssumeRole) the broker reaches only
// through a fault proxy; S3 itself is reached directly, so MinIO still
// verifies every signature the broker writes with the credentials it got.
type stsWorld struct {
	h      *harness
	m      *testservers.MinIO
	fp     *testservers.FaultProxy
	up     *upstream
	b      *brokerProc
	client *s3.Client // the workload: dummy keys, through the broker
	root   *s3.Client // setup and inspection: MinIO's root user, direct
}

const stsFaultConfig = `
listen: {proxy: "{{.Proxy}}", admin: "{{.Admin}}"}
ca: {cert: "{{.CACert}}", key: "{{.CAKey}}"}
attestors:
  - {type: cidr, identities: [{id: ci-runner, cidrs: [127.0.0.1/32]}]}
egress:
  allow_cidrs: [127.0.0.1/32]
  connect_ports: [{{index .Ports "minio"}}, {{index .Ports "up"}}]
  ca_bundle: "@BUNDLE@"
credentials:
  sts-cached: {source: aws_sts, role_arn: "arn:aws:iam::123456789012:role/ci", endpoint: "https://@STS@", duration: 15m, cache: 10m, timeout: 2s}
  sts-fresh: {source: aws_sts, role_arn: "arn:aws:iam::123456789012:role/ci", endpoint: "https://@STS@", duration: 15m, cache: none, timeout: 2s}
  sts-slow: {source: aws_sts, role_arn: "arn:aws:iam::123456789012:role/ci", endpoint: "https://@STS@", duration: 15m, cache: 10m, timeout: 2s}
rules:
  - name: slow
    hosts: [localhost]
    ports: [{{index .Ports "up"}}]
    when: 'request.path == "/sts-slow"'
    inject: {credential: sts-slow, as: {sigv4: {service: s3, region: us-east-1}}}
  - name: fresh
    hosts: [localhost]
    ports: [{{index .Ports "minio"}}]
    when: 'request.path.startsWith("/bucket-c")'
    inject: {credential: sts-fresh, as: {sigv4: {service: s3, region: us-east-1}}}
  - name: cached
    hosts: [localhost]
    ports: [{{index .Ports "minio"}}]
    inject: {credential: sts-cached, as: {sigv4: {service: s3, region: us-east-1}}}
`

func newSTSWorld(t *testing.T) *stsWorld {
	t.Helper()
	m := testservers.StartMinIO(t, testservers.MinIOOptions{})
	h := newHarness(t)
	w := &stsWorld{h: h, m: m, up: newUpstream(t, "sts-fault", nil)}
	w.fp = testservers.StartFaultProxy(t, m.Addr)
	// One bundle: MinIO's test CA (STS, S3) and the recording upstream's.
	bundleFile := joinBundles(t, m.CAFile, upstreamBundle)
	cfg := strings.NewReplacer("@BUNDLE@", bundleFile, "@STS@", w.fp.Addr).Replace(stsFaultConfig)
	spec := brokerSpec{name: "sts-fault", config: cfg,
		env: []string{"AWS_ACCESS_KEY_ID=" + m.RootUser, "AWS_SECRET_ACCESS_KEY=" + m.RootPassword}}
	w.b = h.start(spec, map[string]int{"minio": atoiPort(t, m.Addr), "up": w.up.port()})
	t.Cleanup(func() { h.sweepFor(t, "the MinIO root password", m.RootPassword) })
	w.client = workloadS3(h, w.b, atoiPort(t, m.Addr))
	w.root = rootS3(t, m, "bucket-a", "bucket-c")
	return w
}

// put stores key in bucket through the broker and returns how long the
// call took and the SDK error.
func (w *stsWorld) put(bucket, key string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	start := time.Now()
	_, err := w.client.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String(bucket), Key: aws.String(key),
		Body: strings.NewReader("fault matrix")})
	return time.Since(start), err
}

// stored reports whether MinIO holds bucket/key (asked as root, directly).
func (w *stsWorld) stored(bucket, key string) bool {
	_, err := w.root.HeadObject(context.Background(), &s3.HeadObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
	return err == nil
}
