package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keygate/broker/internal/testservers"
)

// SPIFFE end to end: a real SPIRE server and agent (v1.13.3, built from the
// Go module proxy by scripts/spire.sh into a version-keyed cache), join-token
// node attestation and the unix workload attestor. Two workloads running as
// uid 1001 and 1002 fetch their X509-SVIDs from the agent and call through
// the broker's proxy_tls listener with curl --proxy https://...
// --proxy-cert/--proxy-key/--proxy-cacert; the broker (uid 0) takes its own
// SVID and the bundle from the same agent. A JWT-SVID fetched from the agent
// is accepted as Proxy-Authorization on the plain listener.

const spireVersion = "v1.13.3"

const (
	spiffeUIDOne = 1001
	spiffeUIDTwo = 1002
	spiffeIDOne  = "spiffe://example.org/workload/one"
	spiffeIDTwo  = "spiffe://example.org/workload/two"
	spiffeIDSelf = "spiffe://example.org/keygate"
)

// spireBinDir is where scripts/spire.sh caches the SPIRE binaries
// (KEYGATE_SPIRE_BIN overrides it).
func spireBinDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("KEYGATE_SPIRE_BIN")
	if dir == "" {
		cache := os.Getenv("XDG_CACHE_HOME")
		if cache == "" {
			home, _ := os.UserHomeDir()
			cache = filepath.Join(home, ".cache")
		}
		dir = filepath.Join(cache, "keygate", "bin", "spire-"+spireVersion)
	}
	for _, b := range []string{"spire-server", "spire-agent"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			msg := fmt.Sprintf("SPIRE %s binaries not found in %s; build them with scripts/spire.sh (run by scripts/deps.sh, ~8 min once)", spireVersion, dir)
			testservers.Missing(t, "%s", msg)
		}
	}
	return dir
}

func spiffeRequireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	msg := "SPIFFE integration tests need root (workloads run as uid 1001 and 1002 via setpriv)"
	testservers.Missing(t, "%s", msg)
}

// spire is a running SPIRE server + agent in a temp dir.
type spire struct {
	bin, dir    string
	serverSock  string
	agentSock   string
	server, agt *exec.Cmd
	logs        *syncBuffer
}

func (s *spire) serverBin() string { return filepath.Join(s.bin, "spire-server") }
func (s *spire) agentBin() string  { return filepath.Join(s.bin, "spire-agent") }

// startSPIRE runs server and agent with random ports and registers the two
// workloads and the broker.
func startSPIRE(t *testing.T) *spire { return startSPIREWith(t, "") }

// startSPIREWith is startSPIRE with the server's jwt_issuer set (the iss
// claim of JWT-SVIDs), when jwtIssuer is not empty.
func startSPIREWith(t *testing.T, jwtIssuer string) *spire {
	t.Helper()
	s := &spire{bin: spireBinDir(t), logs: &syncBuffer{}}
	// Short path (unix socket limit) that every uid can traverse.
	dir, err := os.MkdirTemp("", "kgspire-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	s.dir = dir
	s.serverSock = filepath.Join(dir, "server.sock")
	s.agentSock = filepath.Join(dir, "agent.sock")
	port := portOf(freeAddr(t))
	server := fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = "%s"
  socket_path = "%s"
  trust_domain = "example.org"
  data_dir = "%s/server-data"
  log_level = "INFO"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1h"%s
}
plugins {
  DataStore "sql" { plugin_data { database_type = "sqlite3"  connection_string = "%s/server-data/datastore.sqlite3" } }
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "memory" { plugin_data {} }
}
`, port, s.serverSock, dir, issuerLine(jwtIssuer), dir)
	agent := fmt.Sprintf(`agent {
  data_dir = "%s/agent-data"
  log_level = "INFO"
  server_address = "127.0.0.1"
  server_port = "%s"
  socket_path = "%s"
  trust_domain = "example.org"
  insecure_bootstrap = true
}
plugins {
  NodeAttestor "join_token" { plugin_data {} }
  KeyManager "memory" { plugin_data {} }
  WorkloadAttestor "unix" { plugin_data {} }
}
`, dir, port, s.agentSock)
	for name, body := range map[string]string{"server.conf": server, "agent.conf": agent} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}

	s.server = s.spawn(t, s.serverBin(), "run", "-config", filepath.Join(dir, "server.conf"))
	s.poll(t, "spire-server healthcheck", func() bool {
		return exec.Command(s.serverBin(), "healthcheck", "-socketPath", s.serverSock).Run() == nil
	})
	out := s.run(t, s.serverBin(), "token", "generate", "-socketPath", s.serverSock, "-spiffeID", "spiffe://example.org/host", "-ttl", "600")
	fields := strings.Fields(out)
	if len(fields) < 2 || fields[0] != "Token:" {
		t.Fatalf("spire-server token generate: unexpected output %q", out)
	}
	token := fields[1]
	for _, e := range []struct {
		id, selector string
		extra        []string
	}{
		{spiffeIDOne, "unix:uid:" + strconv.Itoa(spiffeUIDOne), nil},
		{spiffeIDTwo, "unix:uid:" + strconv.Itoa(spiffeUIDTwo), nil},
		// The broker's own SVID; curl checks the proxy's name against it.
		{spiffeIDSelf, "unix:uid:0", []string{"-dns", "localhost"}},
	} {
		args := append([]string{"entry", "create", "-socketPath", s.serverSock, "-parentID", "spiffe://example.org/host",
			"-spiffeID", e.id, "-selector", e.selector, "-x509SVIDTTL", "600"}, e.extra...)
		s.run(t, s.serverBin(), args...)
	}
	s.agt = s.spawn(t, s.agentBin(), "run", "-config", filepath.Join(dir, "agent.conf"), "-joinToken", token)
	s.poll(t, "spire-agent healthcheck", func() bool {
		return exec.Command(s.agentBin(), "healthcheck", "-socketPath", s.agentSock).Run() == nil
	})
	return s
}

func (s *spire) spawn(t *testing.T, bin string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Dir = s.dir
	cmd.Stdout, cmd.Stderr = s.logs, s.logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", filepath.Base(bin), err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
	})
	return cmd
}

func (s *spire) run(t *testing.T, bin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(bin), args[0], err, out)
	}
	return string(out)
}

// poll waits up to 30 s for ok.
func (s *spire) poll(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not ready within 30s\nSPIRE logs:\n%s", what, s.logs.Bytes())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// asUID runs the SPIRE agent CLI as uid (via setpriv), so the unix workload
// attestor sees that uid; it retries until the agent issues an identity.
func (s *spire) asUID(t *testing.T, setpriv string, uid int, args ...string) string {
	t.Helper()
	id := strconv.Itoa(uid)
	full := append([]string{"--reuid=" + id, "--regid=" + id, "--clear-groups", "--", s.agentBin()}, args...)
	var out []byte
	s.poll(t, fmt.Sprintf("spire-agent %s as uid %d", args[1], uid), func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		cmd := exec.CommandContext(ctx, setpriv, full...)
		cmd.Dir = s.dir
		var err error
		out, err = cmd.CombinedOutput()
		return err == nil
	})
	return string(out)
}

// fetchX509 writes uid's SVID, key and bundle into a fresh directory it owns.
func (s *spire) fetchX509(t *testing.T, setpriv string, uid int) string {
	t.Helper()
	dir := filepath.Join(s.dir, "svid-"+strconv.Itoa(uid))
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, uid, uid); err != nil {
		t.Fatal(err)
	}
	s.asUID(t, setpriv, uid, "api", "fetch", "x509", "-timeout", "2s", "-socketPath", s.agentSock, "-write", dir)
	for _, f := range []string{"svid.0.pem", "svid.0.key", "bundle.0.pem"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Fatalf("spire-agent api fetch x509 wrote no %s: %v", f, err)
		}
	}
	return dir
}

// fetchJWT returns a JWT-SVID for uid with audience aud.
func (s *spire) fetchJWT(t *testing.T, setpriv string, uid int, aud string) string {
	t.Helper()
	out := s.asUID(t, setpriv, uid, "api", "fetch", "jwt", "-timeout", "2s", "-audience", aud, "-socketPath", s.agentSock)
	lines := strings.Split(out, "\n")
	for i, l := range lines {
		if strings.HasPrefix(strings.TrimSpace(l), "token(") && i+1 < len(lines) {
			if tok := strings.TrimSpace(lines[i+1]); strings.Count(tok, ".") == 2 {
				return tok
			}
		}
	}
	t.Fatalf("no token in spire-agent api fetch jwt output (%d lines)", len(lines))
	return ""
}

const spiffeConfig = `
listen:
  proxy: {{.Proxy}}
  proxy_tls: 127.0.0.1:{{index .Ports "tls"}}
  admin: {{.Admin}}
ca:
  cert: {{.CACert}}
  key: {{.CAKey}}
attestors:
  - {type: spiffe, trust_domain: example.org, bundle: workload_api, socket: "unix://@AGENT_SOCK@"}
egress:
  allow_cidrs: [127.0.0.1/32]
  ca_bundle: {{.Bundle}}
credentials:
  one-token: {source: static, value: env:KG_E2E_SPIFFE_ONE}
  two-token: {source: static, value: env:KG_E2E_SPIFFE_TWO}
  jwt-token: {source: static, value: env:KG_E2E_SPIFFE_JWT}
rules:
  - name: one
    hosts: [localhost]
    ports: [{{index .Ports "upstream"}}]
    when: 'workload.method == "spiffe-x509" && workload.id == "` + spiffeIDOne + `"'
    inject: {credential: one-token, as: bearer}
  - name: two
    hosts: [localhost]
    ports: [{{index .Ports "upstream"}}]
    when: 'workload.method == "spiffe-x509" && workload.id == "` + spiffeIDTwo + `"'
    inject: {credential: two-token, as: bearer}
  - name: jwt-one
    hosts: [localhost]
    ports: [{{index .Ports "upstream"}}]
    when: 'workload.method == "spiffe-jwt" && workload.id == "` + spiffeIDOne + `" && workload.trust_domain == "example.org"'
    inject: {credential: jwt-token, as: bearer}
`

func randomCred(t *testing.T, prefix string) string {
	t.Helper()
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return prefix + hex.EncodeToString(b)
}

// TestSPIFFEWithSPIRE: two workloads with their own SVIDs each get their
// own credential through proxy_tls, never the other's; a client without a
// certificate is refused at the handshake; a JWT-SVID on the plain listener
// is attested as spiffe-jwt.
func TestSPIFFEWithSPIRE(t *testing.T) {
	t.Parallel()
	spiffeRequireRoot(t)
	curl := requireTool(t, "curl")
	setpriv := requireTool(t, "setpriv")
	sp := startSPIRE(t)

	h := newHarness(t)
	one, two, jwtCred := h.canary, randomCred(t, "CRED-TWO-"), randomCred(t, "CRED-JWT-")
	up := newUpstream(t, "api", nil)
	tlsPort, _ := strconv.Atoi(portOf(freeAddr(t)))
	cfg := strings.ReplaceAll(spiffeConfig, "@AGENT_SOCK@", sp.agentSock)
	b := h.start(brokerSpec{name: "spiffe", config: cfg, env: []string{
		"KG_E2E_SPIFFE_ONE=" + one, "KG_E2E_SPIFFE_TWO=" + two, "KG_E2E_SPIFFE_JWT=" + jwtCred,
	}}, map[string]int{"upstream": up.port(), "tls": tlsPort})

	// Readiness follows the broker's own SVID from the agent.
	sp.poll(t, "broker /readyz", func() bool {
		resp, err := http.Get("http://" + b.adminAddr + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})

	pub := filepath.Join(sp.dir, "pub")
	if err := os.Mkdir(pub, 0o755); err != nil {
		t.Fatal(err)
	}
	brokerCA := filepath.Join(pub, "broker-ca.pem")
	caData, err := os.ReadFile(h.caPEM())
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(brokerCA, caData, 0o644); err != nil {
		t.Fatal(err)
	}
	proxyTLS := fmt.Sprintf("https://localhost:%d", tlsPort)

	// curlAs runs curl as uid for path; svidDir "" presents no certificate.
	curlAs := func(uid int, svidDir, path string, extra ...string) toolResult {
		args := []string{"--reuid=" + strconv.Itoa(uid), "--regid=" + strconv.Itoa(uid), "--clear-groups", "--", curl}
		args = append(args, curlArgs(extra...)...)
		args = append(args, "-o", "/dev/null", "--cacert", brokerCA,
			"-w", "status=%{http_code}\nconnect=%{http_connect}\nrid=%header{x-keygate-request-id}\n",
			fmt.Sprintf("https://localhost:%d%s", up.port(), path))
		return h.runTool(setpriv, nil, pub, args...)
	}
	connectStatus := func(out string) int {
		for _, l := range strings.Split(out, "\n") {
			if v, ok := strings.CutPrefix(l, "connect="); ok {
				n, _ := strconv.Atoi(v)
				return n
			}
		}
		return 0
	}
	fields := func(out string) (int, string) {
		m := map[string]string{}
		for _, l := range strings.Split(out, "\n") {
			if k, v, ok := strings.Cut(l, "="); ok {
				m[k] = v
			}
		}
		n, _ := strconv.Atoi(m["status"])
		return n, m["rid"]
	}
	expectAuth := func(t *testing.T, path, want string) {
		t.Helper()
		var got [][]string
		for _, r := range up.requests() {
			if r.Path == path {
				got = append(got, r.Auth)
			}
		}
		if len(got) != 1 {
			t.Fatalf("upstream saw %d requests for %s, want 1", len(got), path)
		}
		if len(got[0]) != 1 || got[0][0] != "Bearer "+want {
			names := map[string]string{"Bearer " + one: "one-token", "Bearer " + two: "two-token", "Bearer " + jwtCred: "jwt-token"}
			var desc []string
			for _, v := range got[0] {
				if n, ok := names[v]; ok {
					desc = append(desc, n)
				} else {
					desc = append(desc, "<other>")
				}
			}
			t.Errorf("%s: upstream Authorization = %v, want exactly the rule's credential", path, desc)
		}
	}
	checkAudit := func(t *testing.T, rid string, want map[string]any) {
		t.Helper()
		if rid == "" {
			t.Fatal("no X-Keygate-Request-Id")
		}
		line := b.auditLine(t, rid)
		for k, v := range want {
			if line[k] != v {
				t.Errorf("audit %s = %#v, want %#v", k, line[k], v)
			}
		}
	}

	dirOne := sp.fetchX509(t, setpriv, spiffeUIDOne)
	dirTwo := sp.fetchX509(t, setpriv, spiffeUIDTwo)
	for _, tc := range []struct {
		name       string
		uid        int
		dir, id    string
		rule, want string
	}{
		{"workload one", spiffeUIDOne, dirOne, spiffeIDOne, "one", one},
		{"workload two", spiffeUIDTwo, dirTwo, spiffeIDTwo, "two", two},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := "/x509/" + tc.rule
			res := curlAs(tc.uid, tc.dir, path, "--proxy", proxyTLS,
				"--proxy-cert", filepath.Join(tc.dir, "svid.0.pem"), "--proxy-key", filepath.Join(tc.dir, "svid.0.key"),
				"--proxy-cacert", filepath.Join(tc.dir, "bundle.0.pem"))
			if res.code != 0 {
				t.Fatalf("curl exit %d\n%s", res.code, redactCanary(res.stderr))
			}
			status, rid := fields(res.stdout)
			if status != http.StatusOK {
				t.Fatalf("status %d, want 200", status)
			}
			expectAuth(t, path, tc.want)
			checkAudit(t, rid, map[string]any{
				"workload.id": tc.id, "workload.method": "spiffe-x509", "rule": tc.rule, "decision": "allow",
			})
		})
	}

	t.Run("no client certificate", func(t *testing.T) {
		before := up.count()
		res := curlAs(spiffeUIDOne, dirOne, "/x509/none", "--proxy", proxyTLS,
			"--proxy-cacert", filepath.Join(dirOne, "bundle.0.pem"))
		if res.code == 0 {
			t.Fatalf("curl without a client certificate succeeded: %s", res.stdout)
		}
		// 35: handshake failed; 56: TLS 1.3 delivers the server's
		// "certificate required" alert on the first read.
		if (res.code != 35 && res.code != 56) || !strings.Contains(strings.ToLower(res.stderr), "alert") {
			t.Errorf("curl exit %d, want a TLS alert from the proxy (35 or 56)\n%s", res.code, res.stderr)
		}
		if up.count() != before {
			t.Error("a request reached the upstream")
		}
	})

	t.Run("jwt-svid on the plain listener", func(t *testing.T) {
		tok := sp.fetchJWT(t, setpriv, spiffeUIDOne, "keygate")
		h.record("jwt-svid", []byte(tok))
		res := curlAs(spiffeUIDOne, "", "/jwt/one", "--proxy", b.proxyURL(),
			"--proxy-header", "Proxy-Authorization: Bearer "+tok)
		if res.code != 0 {
			t.Fatalf("curl exit %d\n%s", res.code, redactCanary(res.stderr))
		}
		status, rid := fields(res.stdout)
		if status != http.StatusOK {
			t.Fatalf("status %d, want 200", status)
		}
		expectAuth(t, "/jwt/one", jwtCred)
		checkAudit(t, rid, map[string]any{
			"workload.id": spiffeIDOne, "workload.method": "spiffe-jwt", "rule": "jwt-one", "decision": "allow",
		})
		if bytes.Contains(b.output(), []byte(tok)) {
			t.Error("the broker logged the JWT-SVID")
		}

		// Wrong audience: rejected with 407, nothing forwarded.
		bad := sp.fetchJWT(t, setpriv, spiffeUIDTwo, "someone-else")
		before := up.count()
		res = curlAs(spiffeUIDTwo, "", "/jwt/bad", "--proxy", b.proxyURL(),
			"--proxy-header", "Proxy-Authorization: Bearer "+bad)
		if status, _ := fields(res.stdout); status != http.StatusProxyAuthRequired && connectStatus(res.stdout) != http.StatusProxyAuthRequired {
			t.Errorf("wrong audience: status %d, CONNECT status %d (curl exit %d), want 407", status, connectStatus(res.stdout), res.code)
		}
		if up.count() != before {
			t.Error("a request with a rejected JWT-SVID reached the upstream")
		}
	})
}

func issuerLine(iss string) string {
	if iss == "" {
		return ""
	}
	return fmt.Sprintf("\n  jwt_issuer = %q", iss)
}
