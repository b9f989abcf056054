package integration

// Release gate (SECURITY-TESTS.md §8 items 6 and 12) against the real broker
// binary:
//
//   - TestUpstreamVerifyEndToEnd (T-C1): bad upstream certificates are a 502
//     upstream_tls and the credential is never written; the Postgres, Vault
//     and STS variants hold the broker's other upstream clients to the same;
//   - TestRefusesBuiltinCAEndToEnd (T-C2): goproxy's public CA, and a CA key
//     others can read, stop `broker run` and `broker validate`;
//   - TestNoEnvProxyEndToEnd (T-A3): proxy variables in the broker's own
//     environment are ignored, and the broker never connects to itself;
//   - TestCredentialBoundToIdentityEndToEnd (T-B7): no request field lets
//     one local uid obtain another's credential;
//   - TestPGLeaseExpiryEndToEnd (F-13, T-F3): a PostgreSQL session through
//     the broker runs as the Vault-made user whatever the client asked for,
//     and ends when that user's lease expires.

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/elazarl/goproxy"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/testservers"
)

// ---- a test PKI whose CA key the test holds (the harness's upstream CA
// key is not kept), for certificates that are wrong in one way each.

type gatePKI struct {
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	bundle string // PEM file of the CA, for egress.ca_bundle
	serial int64
}

func newGatePKI(t *testing.T) *gatePKI {
	t.Helper()
	cert, key, der, err := newCA("keygate gate test CA")
	if err != nil {
		t.Fatal(err)
	}
	return &gatePKI{cert: cert, key: key, bundle: writeCertPEM(t, filepath.Join(t.TempDir(), "gate-ca.pem"), der), serial: 1}
}

// leaf is a server certificate for dns and ips, valid from nb to na,
// signed by the gate CA or, when selfSigned, by its own key.
func (p *gatePKI) leaf(t *testing.T, dns []string, ips []net.IP, nb, na time.Time, selfSigned bool) tls.Certificate {
	t.Helper()
	p.serial++
	c, err := signLeaf(p.cert, p.key, p.serial, "keygate gate upstream", dns, ips, nb, na, selfSigned)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// certUpstream is upstreamAt with a given certificate: a recording TLS
// server on addr ("" for 127.0.0.1:0). An httptest server, because the
// point is to present exactly this certificate and count what reaches the
// handler, which no real server here does more simply.
// next answers after the request is recorded; nil answers "hello".
func certUpstream(t *testing.T, name, addr string, cert tls.Certificate, next http.Handler) *upstream {
	t.Helper()
	if next == nil {
		next = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprintf(w, "hello from %s\n", name) })
	}
	// The broker's refused handshakes would fill the test log.
	return serveUpstream(t, name, addr, &cert, log.New(io.Discard, "", 0), next)
}

// ---- T-C1

// upstreamVerifyConfig: one rule per upstream port, each injecting the
// canary; the broker trusts only the gate CA for upstreams.
const upstreamVerifyConfig = `
listen: {proxy: "{{.Proxy}}", admin: "{{.Admin}}"}
ca: {cert: "{{.CACert}}", key: "{{.CAKey}}"}
attestors:
  - {type: cidr, identities: [{id: e2e-workload, cidrs: [127.0.0.0/8]}]}
egress:
  allow_cidrs: [127.0.0.1/32]
  connect_ports: [{{index .Ports "good"}}, {{index .Ports "self"}}, {{index .Ports "wrongname"}}, {{index .Ports "expired"}}, {{index .Ports "notyet"}}, {{index .Ports "otherca"}}]
  ca_bundle: "@BUNDLE@"
credentials:
  api-token: {source: static, value: env:KG_E2E_TOKEN}
rules:
  - name: api
    hosts: [localhost]
    ports: [{{index .Ports "good"}}, {{index .Ports "self"}}, {{index .Ports "wrongname"}}, {{index .Ports "expired"}}, {{index .Ports "notyet"}}, {{index .Ports "otherca"}}]
    inject: {credential: api-token, as: bearer}
`

// TestUpstreamVerifyEndToEnd (T-C1): the upstream presents (a) a
// self-signed certificate, (b) a valid certificate for another name, (c) an
// expired one, (d) one not valid yet, (e) one from a CA the broker does not
// trust. Each is a 502 upstream_tls, the upstream's handler never runs (the
// credential is never written) and the canary is in no response. A
// correct certificate from the same CA gets 200 with exactly one injected
// Authorization (the control that shows the setup can succeed). The same
// holds for a broker whose environment carries the usual "skip
// verification" and "extra CA" variables of other tools, which the broker
// must ignore.
func TestUpstreamVerifyEndToEnd(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	pki := newGatePKI(t)
	other := newGatePKI(t) // a CA the broker does not trust
	now := time.Now()
	lo := []net.IP{net.ParseIP("127.0.0.1")}
	ok := func() (time.Time, time.Time) { return now.Add(-time.Hour), now.Add(time.Hour) }
	nb, na := ok()
	ups := map[string]*upstream{
		"good":      certUpstream(t, "good", "", pki.leaf(t, []string{"localhost"}, lo, nb, na, false), nil),
		"self":      certUpstream(t, "self-signed", "", pki.leaf(t, []string{"localhost"}, lo, nb, na, true), nil),
		"wrongname": certUpstream(t, "wrong-name", "", pki.leaf(t, []string{"evil.test"}, nil, nb, na, false), nil),
		"expired":   certUpstream(t, "expired", "", pki.leaf(t, []string{"localhost"}, lo, now.Add(-48*time.Hour), now.Add(-time.Hour), false), nil),
		"notyet":    certUpstream(t, "not-yet-valid", "", pki.leaf(t, []string{"localhost"}, lo, now.Add(time.Hour), now.Add(48*time.Hour), false), nil),
		"otherca":   certUpstream(t, "other-ca", "", other.leaf(t, []string{"localhost"}, lo, nb, na, false), nil),
	}
	// The self-signed certificate, in files the hostile environment names.
	selfPEM := writeCertPEM(t, filepath.Join(t.TempDir(), "self.pem"), ups["self"].srv.TLS.Certificates[0].Certificate[0])
	ports := map[string]int{}
	for k, u := range ups {
		ports[k] = u.port()
	}
	cfg := strings.ReplaceAll(upstreamVerifyConfig, "@BUNDLE@", pki.bundle)
	brokers := []struct {
		name string
		env  []string
	}{
		{"clean env", nil},
		{"hostile env", []string{
			"VAULT_SKIP_VERIFY=true", "VAULT_CACERT=" + selfPEM, "AWS_CA_BUNDLE=" + selfPEM,
			"CURL_CA_BUNDLE=" + selfPEM, "REQUESTS_CA_BUNDLE=" + selfPEM, "NODE_EXTRA_CA_CERTS=" + selfPEM,
			"NODE_TLS_REJECT_UNAUTHORIZED=0", "GIT_SSL_NO_VERIFY=1", "PGSSLMODE=disable",
		}},
	}
	for bi, bc := range brokers {
		b := h.start(brokerSpec{name: fmt.Sprintf("upstream-verify-%d", bi), config: cfg,
			env: append([]string{tokenEnv + "=" + h.canary}, bc.env...)}, ports)
		client := h.goClient(b)
		t.Run(bc.name, func(t *testing.T) {
			for _, tc := range []struct{ key, what string }{
				{"self", "self-signed"},
				{"wrongname", "valid certificate for another name"},
				{"expired", "expired"},
				{"notyet", "not yet valid"},
				{"otherca", "signed by an untrusted CA"},
			} {
				t.Run(tc.what, func(t *testing.T) {
					u := ups[tc.key]
					before, conns := u.count(), u.conns.Load()
					target := fmt.Sprintf("https://localhost:%d/verify-%d", u.port(), bi)
					for _, m := range []string{http.MethodGet, http.MethodPost} {
						var body []byte
						if m == http.MethodPost {
							body = []byte(`{"amount": 1}`)
						}
						resp, rb, d := doVia(t, h, client, m, target, body)
						expectCode(t, m+" "+tc.what, resp, rb, d, http.StatusBadGateway, "upstream_tls", failBudget)
						if bytes.Contains(rb, []byte(h.canary)) {
							t.Errorf("%s %s: the response body holds the credential", m, tc.what)
						}
						if rid := resp.Header.Get("X-Keygate-Request-Id"); rid != "" {
							line := b.auditLine(t, rid)
							if e, _ := line["error"].(string); line["status"] != float64(http.StatusBadGateway) || !strings.Contains(e, "upstream_tls") {
								t.Errorf("%s %s: audit status %v error %q, want 502 and upstream_tls", m, tc.what, line["status"], redactCanary(e))
							}
						}
					}
					if n := u.count() - before; n != 0 {
						t.Errorf("the %s upstream's handler ran %d times, want 0 (the credential was written)", tc.what, n)
					}
					// The broker did connect (so the refusal is the
					// certificate's, not a dial failure).
					if u.conns.Load() == conns {
						t.Errorf("the %s upstream saw no connection: the 502 is not about its certificate", tc.what)
					}
				})
			}
			t.Run("control: trusted certificate", func(t *testing.T) {
				u := ups["good"]
				before := u.count()
				resp, _, _ := doVia(t, h, client, http.MethodGet, fmt.Sprintf("https://localhost:%d/good-%d", u.port(), bi), nil)
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("trusted upstream: HTTP %d, want 200", resp.StatusCode)
				}
				reqs := u.requests()[before:]
				if len(reqs) != 1 || len(reqs[0].Auth) != 1 || reqs[0].Auth[0] != h.bearer() {
					t.Errorf("trusted upstream: %d requests, want 1 with exactly the injected Authorization", len(reqs))
				}
			})
		})
	}
	for k, u := range ups {
		t.Logf("T-C1 %s upstream: handler runs=%d connections=%d", k, u.count(), u.conns.Load())
	}
}

// pgVerifyConfig: three listeners in front of one real PostgreSQL (TLS on,
// certificate for 127.0.0.1 and localhost, signed by its test CA), each
// verify-full: "good" trusts the server's CA, "wrongname" checks another
// name, "untrusted" trusts only a CA that did not sign the server.
const pgVerifyConfig = `
listen: {proxy: "{{.Proxy}}", admin: "{{.Admin}}"}
ca: {cert: "{{.CACert}}", key: "{{.CAKey}}"}
attestors:
  - {type: cidr, identities: [{id: e2e-workload, cidrs: [127.0.0.0/8]}]}
egress: {allow_cidrs: [127.0.0.1/32]}
credentials:
  orders-db: {source: static, values: {username: env:KG_PG_USER, password: env:KG_PG_PASSWORD}}
databases:
  - {name: good, listen: "127.0.0.1:{{index .Ports "good"}}", upstream: "127.0.0.1:@PGPORT@", credential: orders-db, tls: verify-full, ca_bundle: "@PGCA@"}
  - {name: wrongname, listen: "127.0.0.1:{{index .Ports "wrongname"}}", upstream: "127.0.0.1:@PGPORT@", credential: orders-db, tls: verify-full, ca_bundle: "@PGCA@", server_name: evil.test}
  - {name: untrusted, listen: "127.0.0.1:{{index .Ports "untrusted"}}", upstream: "127.0.0.1:@PGPORT@", credential: orders-db, tls: verify-full, ca_bundle: "@OTHERCA@"}
rules:
  - name: orders
    hosts: [127.0.0.1]
    when: 'request.protocol == "postgres" && request.database == "postgres"'
`

// TestUpstreamVerifyPostgresEndToEnd (T-C1, the PostgreSQL upstream
// client): a real PostgreSQL whose certificate does not match the
// configured name, or is not signed by the configured CA, is refused by
// the broker before it authenticates: psql fails, and the server's log
// shows no session authorized for the role whose password is the canary.
// The same server through a correctly configured listener works (the
// control).
func TestUpstreamVerifyPostgresEndToEnd(t *testing.T) {
	t.Parallel()
	psqlBin := requireTool(t, "psql")
	pg := testservers.StartPostgresWith(t, testservers.PostgresOptions{TLS: true})
	h := newHarness(t)
	const role = "verify_jit"
	pgSetup(t, pg, fmt.Sprintf(`CREATE ROLE %s LOGIN PASSWORD '%s'`, role, h.canary))
	other := newGatePKI(t)
	cfg := strings.NewReplacer("@PGPORT@", strconv.Itoa(pg.Port), "@PGCA@", pg.CAFile, "@OTHERCA@", other.bundle).Replace(pgVerifyConfig)
	ports := map[string]int{}
	for _, k := range []string{"good", "wrongname", "untrusted"} {
		ports[k] = atoiPort(t, freeAddr(t))
	}
	b := h.start(brokerSpec{name: "pg-verify", config: cfg, env: []string{"KG_PG_USER=" + role, "KG_PG_PASSWORD=" + h.canary}}, ports)
	waitReadyz(t, b, testTimeout)
	authorized := func() int {
		return strings.Count(pg.Log(), "connection authorized: user="+role+" ")
	}
	for _, tc := range []struct {
		listener string
		ok       bool
	}{{"wrongname", false}, {"untrusted", false}, {"good", true}} {
		t.Run(tc.listener, func(t *testing.T) {
			before := authorized()
			conn := pgConnString(ports[tc.listener], "postgres", "postgres", h.caPEM())
			res := h.runTool(psqlBin, []string{"PGCONNECT_TIMEOUT=5"}, "", "-X", "-tA", "-d", conn, "-c", "SELECT current_user")
			// The server logs "connection authorized" as the session starts;
			// give a refused attempt time to show up if it got that far.
			time.Sleep(200 * time.Millisecond)
			n := authorized() - before
			if tc.ok {
				if res.code != 0 || strings.TrimSpace(res.stdout) != role {
					t.Fatalf("control: psql exit %d %q %s", res.code, res.stdout, redactCanary(res.stderr))
				}
				if n != 1 {
					t.Errorf("control: the server logged %d authorized sessions for the role, want 1 (the log check would prove nothing)", n)
				}
				return
			}
			if res.code == 0 {
				t.Fatalf("psql through the %s listener succeeded (current_user %q): the broker authenticated to an unverified server", tc.listener, res.stdout)
			}
			if n != 0 {
				t.Errorf("the server logged %d authorized sessions for the role through the %s listener, want 0", n, tc.listener)
			}
			t.Logf("T-C1 postgres %s: psql exit %d: %s; sessions authorized upstream: %d", tc.listener, res.code, firstLine(redactCanary(res.stderr)), n)
		})
	}
}

// vaultVerifyConfig: three Vault entries reaching the same real Vault
// through TLS fronts; the broker trusts the gate CA for each.
const vaultVerifyConfig = `
listen: {proxy: "{{.Proxy}}", admin: "{{.Admin}}"}
ca: {cert: "{{.CACert}}", key: "{{.CAKey}}"}
attestors:
  - {type: cidr, identities: [{id: e2e-workload, cidrs: [127.0.0.0/8]}]}
egress: {allow_cidrs: [127.0.0.1/32], connect_ports: [{{index .Ports "up"}}], ca_bundle: "{{.Bundle}}"}
vaults:
  good: {address: "https://localhost:{{index .Ports "good"}}", ca_bundle: "@GATECA@", timeout: 2s, auth: {method: approle, role_id_file: "@ROLE@", secret_id_file: "@SECRET@"}}
  self: {address: "https://localhost:{{index .Ports "self"}}", ca_bundle: "@GATECA@", timeout: 2s, auth: {method: approle, role_id_file: "@ROLE@", secret_id_file: "@SECRET@"}}
  wrongname: {address: "https://localhost:{{index .Ports "wrongname"}}", ca_bundle: "@GATECA@", timeout: 2s, auth: {method: approle, role_id_file: "@ROLE@", secret_id_file: "@SECRET@"}}
credentials:
  kv-good: {source: vault_kv, vault: good, path: secret/data/app/github, field: token, cache: none}
  kv-self: {source: vault_kv, vault: self, path: secret/data/app/github, field: token, cache: none}
  kv-wrongname: {source: vault_kv, vault: wrongname, path: secret/data/app/github, field: token, cache: none}
rules:
  - {name: good, hosts: [localhost], ports: [{{index .Ports "up"}}], when: 'request.path == "/good"', inject: {credential: kv-good, as: bearer}}
  - {name: self, hosts: [localhost], ports: [{{index .Ports "up"}}], when: 'request.path == "/self"', inject: {credential: kv-self, as: bearer}}
  - {name: wrongname, hosts: [localhost], ports: [{{index .Ports "up"}}], when: 'request.path == "/wrongname"', inject: {credential: kv-wrongname, as: bearer}}
`

// TestUpstreamVerifyVaultEndToEnd (T-C1, the Vault client): the broker
// reaches a real Vault through a TLS front that presents a self-signed
// certificate, or a gate-CA certificate for another name; its environment
// says VAULT_SKIP_VERIFY=true and names the self-signed certificate as
// VAULT_CACERT (use_env is off, so both must be ignored). Each is a 503
// credential_unavailable, the front's handler never runs (the AppRole
// secret id is never sent) and the upstream sees nothing. Through a front
// with a correct certificate the canary, read from Vault, is injected (the
// control). The fronts are httptest reverse proxies because the dev-mode
// Vault testservers starts speaks plain HTTP; what they present is the
// point of the test.
func TestUpstreamVerifyVaultEndToEnd(t *testing.T) {
	t.Parallel()
	v := testservers.StartVault(t)
	h := newHarness(t)
	w := &vaultWorld{h: h, v: v, dir: t.TempDir()}
	w.auditLog = filepath.Join(w.dir, "vault-audit.log")
	w.seed()
	t.Cleanup(func() { h.sweepFor(t, "the AppRole secret id", w.secretID) })
	pki := newGatePKI(t)
	target, err := url.Parse(v.Addr)
	if err != nil {
		t.Fatal(err)
	}
	fronts := verifyFronts(t, pki, "vault-front-", func() http.Handler { return httputil.NewSingleHostReverseProxy(target) })
	selfPEM := writeCertPEM(t, filepath.Join(t.TempDir(), "self.pem"), fronts["self"].srv.TLS.Certificates[0].Certificate[0])
	up := newUpstream(t, "vault-verify", nil)
	cfg := strings.NewReplacer("@GATECA@", pki.bundle, "@ROLE@", w.roleFile, "@SECRET@", w.secretFile).Replace(vaultVerifyConfig)
	b := h.start(brokerSpec{name: "vault-verify", config: cfg, env: []string{"VAULT_SKIP_VERIFY=true", "VAULT_CACERT=" + selfPEM,
		"VAULT_ADDR=https://localhost:" + strconv.Itoa(fronts["self"].port())}},
		map[string]int{"up": up.port(), "good": fronts["good"].port(), "self": fronts["self"].port(), "wrongname": fronts["wrongname"].port()})
	checkFronts(t, h, h.goClient(b), up, fronts, "Vault", "the AppRole secret id", func(t *testing.T) {
		expectOneInjected(t, up, "/good", h.canary)
	})
	t.Logf("T-C1 vault: front handler runs good=%d self=%d wrongname=%d", fronts["good"].count(), fronts["self"].count(), fronts["wrongname"].count())
}

// verifyFronts are three TLS fronts (prefix+name) of one backend, each
// passing to a fresh next(): "good" with a gate-CA certificate for
// localhost, "self" with a self-signed one, "wrongname" with a gate-CA
// certificate for evil.test.
func verifyFronts(t *testing.T, pki *gatePKI, prefix string, next func() http.Handler) map[string]*upstream {
	t.Helper()
	now := time.Now()
	nb, na := now.Add(-time.Hour), now.Add(time.Hour)
	lo := []net.IP{net.ParseIP("127.0.0.1")}
	fronts := map[string]*upstream{}
	for name, cert := range map[string]tls.Certificate{
		"good":      pki.leaf(t, []string{"localhost"}, lo, nb, na, false),
		"self":      pki.leaf(t, []string{"localhost"}, lo, nb, na, true),
		"wrongname": pki.leaf(t, []string{"evil.test"}, nil, nb, na, false),
	} {
		fronts[name] = certUpstream(t, prefix+name, "", cert, next())
	}
	return fronts
}

// checkFronts runs the T-C1 checks of a credential backend reached
// through verifyFronts (backend names it, sent is what its client would
// have written): through "self" and "wrongname" the request is a 503
// credential_unavailable, the front saw a connection but its handler
// never ran, and the upstream saw nothing; through "good" (the control)
// it is a 200 that went through the front, and control checks what the
// upstream got.
func checkFronts(t *testing.T, h *harness, client *http.Client, up *upstream, fronts map[string]*upstream, backend, sent string, control func(t *testing.T)) {
	t.Helper()
	for _, name := range []string{"self", "wrongname"} {
		t.Run(name, func(t *testing.T) {
			resp, body, d := doVia(t, h, client, http.MethodGet, fmt.Sprintf("https://localhost:%d/%s", up.port(), name), nil)
			expectCode(t, "GET /"+name, resp, body, d, http.StatusServiceUnavailable, "credential_unavailable", failBudget)
			if n := fronts[name].count(); n != 0 {
				t.Errorf("the %s %s front's handler ran %d times, want 0 (%s was sent)", name, backend, n, sent)
			}
			if fronts[name].conns.Load() == 0 {
				t.Errorf("the %s %s front saw no connection: the refusal is not about its certificate", name, backend)
			}
			if n := len(authFor(up, "/"+name)); n != 0 {
				t.Errorf("the upstream saw %d requests for /%s, want 0", n, name)
			}
		})
	}
	t.Run("control", func(t *testing.T) {
		resp, _, _ := doVia(t, h, client, http.MethodGet, fmt.Sprintf("https://localhost:%d/good", up.port()), nil)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("through the trusted front: HTTP %d (%s), want 200", resp.StatusCode, resp.Header.Get("X-Keygate-Error"))
		}
		control(t)
		if fronts["good"].count() == 0 {
			t.Errorf("the trusted front saw no request: the control did not go through %s", backend)
		}
	})
}

// writeCertPEM writes the DER certificate to path as PEM and returns path.
func writeCertPEM(t *testing.T, path string, der []byte) string {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// joinBundles writes the PEM files one after the other into a new file
// and returns its path.
func joinBundles(t *testing.T, files ...string) string {
	t.Helper()
	var bundle []byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		bundle = append(append(bundle, b...), '\n')
	}
	out := filepath.Join(t.TempDir(), "bundle.pem")
	if err := os.WriteFile(out, bundle, 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

// stsVerifyConfig: three aws_sts credentials whose endpoints are TLS
// fronts of one real MinIO STS; each is injected as SigV4 into the
// recording upstream on its own path.
const stsVerifyConfig = `
listen: {proxy: "{{.Proxy}}", admin: "{{.Admin}}"}
ca: {cert: "{{.CACert}}", key: "{{.CAKey}}"}
attestors:
  - {type: cidr, identities: [{id: e2e-workload, cidrs: [127.0.0.0/8]}]}
egress: {allow_cidrs: [127.0.0.1/32], connect_ports: [{{index .Ports "up"}}], ca_bundle: "@BUNDLE@"}
credentials:
  sts-good: {source: aws_sts, role_arn: "arn:aws:iam::123456789012:role/ci", endpoint: "https://localhost:{{index .Ports "good"}}", duration: 15m, cache: none, timeout: 2s}
  sts-self: {source: aws_sts, role_arn: "arn:aws:iam::123456789012:role/ci", endpoint: "https://localhost:{{index .Ports "self"}}", duration: 15m, cache: none, timeout: 2s}
  sts-wrongname: {source: aws_sts, role_arn: "arn:aws:iam::123456789012:role/ci", endpoint: "https://localhost:{{index .Ports "wrongname"}}", duration: 15m, cache: none, timeout: 2s}
rules:
  - {name: good, hosts: [localhost], ports: [{{index .Ports "up"}}], when: 'request.path == "/good"', inject: {credential: sts-good, as: {sigv4: {service: s3, region: us-east-1}}}}
  - {name: self, hosts: [localhost], ports: [{{index .Ports "up"}}], when: 'request.path == "/self"', inject: {credential: sts-self, as: {sigv4: {service: s3, region: us-east-1}}}}
  - {name: wrongname, hosts: [localhost], ports: [{{index .Ports "up"}}], when: 'request.path == "/wrongname"', inject: {credential: sts-wrongname, as: {sigv4: {service: s3, region: us-east-1}}}}
`

// TestUpstreamVerifySTSEndToEnd (T-C1, the STS client): the broker calls a
// real MinIO STS (AssumeRole, signed with MinIO's root keys) through TLS
// fronts presenting a self-signed certificate, or a gate-CA certificate
// for another name, with AWS_CA_BUNDLE in its environment naming the
// self-signed certificate (the AWS SDK's variable; the broker must not let
// it widen trust). Each is a 503 credential_unavailable, the front's
// handler never runs (the signed AssumeRole, which carries the root access
// key id, is never sent) and the upstream sees nothing. Through a correct
// front the upstream gets a SigV4 request with a session token (the
// control). The fronts are httptest reverse proxies: presenting a chosen
// certificate in front of the real STS is their whole job.
func TestUpstreamVerifySTSEndToEnd(t *testing.T) {
	t.Parallel()
	m := testservers.StartMinIO(t, testservers.MinIOOptions{})
	h := newHarness(t)
	t.Cleanup(func() { h.sweepFor(t, "the MinIO root password", m.RootPassword) })
	pki := newGatePKI(t)
	target, err := url.Parse(m.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	fronts := verifyFronts(t, pki, "sts-front-", func() http.Handler {
		// The Host header the broker signed is kept (SigV4 covers it).
		rp := httputil.NewSingleHostReverseProxy(target)
		rp.Transport = &http.Transport{Proxy: nil, TLSClientConfig: &tls.Config{RootCAs: m.CAPool, ServerName: "127.0.0.1"}}
		return rp
	})
	selfPEM := writeCertPEM(t, filepath.Join(t.TempDir(), "self.pem"), fronts["self"].srv.TLS.Certificates[0].Certificate[0])
	// Egress trusts the gate CA (the fronts) and the harness upstream CA.
	bundleFile := joinBundles(t, pki.bundle, upstreamBundle)
	up := newUpstream(t, "sts-verify", nil)
	cfg := strings.ReplaceAll(stsVerifyConfig, "@BUNDLE@", bundleFile)
	b := h.start(brokerSpec{name: "sts-verify", config: cfg, env: []string{
		"AWS_ACCESS_KEY_ID=" + m.RootUser, "AWS_SECRET_ACCESS_KEY=" + m.RootPassword, "AWS_CA_BUNDLE=" + selfPEM,
	}}, map[string]int{"up": up.port(), "good": fronts["good"].port(), "self": fronts["self"].port(), "wrongname": fronts["wrongname"].port()})
	checkFronts(t, h, h.goClient(b), up, fronts, "STS", "the signed AssumeRole", func(t *testing.T) {
		var got *seenRequest
		for _, r := range up.requests() {
			if r.Path == "/good" {
				got = &r
			}
		}
		if got == nil || len(got.Auth) != 1 || !strings.HasPrefix(got.Auth[0], "AWS4-HMAC-SHA256 ") || got.Header.Get("X-Amz-Security-Token") == "" {
			t.Error("the upstream did not get one SigV4 Authorization with a session token from the STS credential")
		}
	})
	t.Logf("T-C1 sts: front handler runs good=%d self=%d wrongname=%d; TLS connections self=%d wrongname=%d",
		fronts["good"].count(), fronts["self"].count(), fronts["wrongname"].count(), fronts["self"].conns.Load(), fronts["wrongname"].conns.Load())
}

// ---- T-C2

// caRefusalConfig is a complete, otherwise valid config naming a CA.
const caRefusalConfig = `
listen: {proxy: "%s", admin: "%s"}
ca: {cert: "%s", key: "%s"}
attestors:
  - {type: cidr, identities: [{id: e2e-workload, cidrs: [127.0.0.0/8]}]}
egress: {allow_cidrs: [127.0.0.1/32]}
credentials:
  api-token: {source: static, value: env:KG_E2E_TOKEN}
rules:
  - name: api
    hosts: [localhost]
    inject: {credential: api-token, as: bearer}
`

// TestRefusesBuiltinCAEndToEnd (T-C2): `broker run` and `broker validate`
// exit 1 naming the problem when the MITM CA is goproxy's built-in one
// (its key is public), when a certificate carries goproxy's key under a
// new name, when the CA was issued by goproxy's CA, when the key file is
// readable by group or others (0644, 0640) and when it belongs to another
// uid. A private CA with a 0600 key passes validate (the control).
func TestRefusesBuiltinCAEndToEnd(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	write := func(name string, data []byte, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // exact, whatever the umask
			t.Fatal(err)
		}
		return p
	}
	gpCert := write("goproxy-ca.pem", goproxy.CA_CERT, 0o644)
	gpKey := write("goproxy-ca-key.pem", goproxy.CA_KEY, 0o600)

	// goproxy's key pair, parsed, for the derived variants.
	pair, err := tls.X509KeyPair(goproxy.CA_CERT, goproxy.CA_KEY)
	if err != nil {
		t.Fatal(err)
	}
	gpParsed, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := func(cn string) *x509.Certificate {
		return &x509.Certificate{
			SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: cn, Organization: []string{"Acme"}},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		}
	}
	pemCert := func(der []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}) }
	pemKey := func(k any) []byte {
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	}
	// (1) goproxy's key under a new, innocent-looking name, self-signed.
	tmpl := caTmpl("Acme Internal Proxy CA")
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pair.PrivateKey.(crypto.Signer).Public(), pair.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	renamedCert := write("renamed-ca.pem", pemCert(der), 0o644)
	// (2) a CA with its own key, issued by goproxy's CA.
	subKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err = x509.CreateCertificate(rand.Reader, caTmpl("Acme Sub CA"), gpParsed, &subKey.PublicKey, pair.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	subCert := write("sub-ca.pem", pemCert(der), 0o644)
	subKeyFile := write("sub-ca-key.pem", pemKey(subKey), 0o600)

	// A private CA made by the broker itself, with its key in several modes.
	caDir := filepath.Join(dir, "private")
	if res := runBroker(t, nil, "ca", "init", "--dir", caDir); res.code != 0 {
		t.Fatalf("broker ca init: exit %d %s", res.code, res.stderr)
	}
	privCert := filepath.Join(caDir, "ca.pem")
	privKeyPEM, err := os.ReadFile(filepath.Join(caDir, "ca-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	canarytest.Register("T-C2 private CA key", string(privKeyPEM))
	key0600 := write("key-0600.pem", privKeyPEM, 0o600)
	key0644 := write("key-0644.pem", privKeyPEM, 0o644)
	key0640 := write("key-0640.pem", privKeyPEM, 0o640)
	keyOther := write("key-other-uid.pem", privKeyPEM, 0o600)
	otherOwner := os.Geteuid() == 0
	if otherOwner {
		if err := os.Chown(keyOther, nobodyUID, nobodyUID); err != nil {
			t.Fatal(err)
		}
	}

	cases := []struct {
		name, cert, key string
		want            string // in the output; "" for the control
		skip            bool
	}{
		{"goproxy built-in CA", gpCert, gpKey, "goproxy's built-in CA", false},
		{"goproxy key under a new name", renamedCert, gpKey, "goproxy's built-in CA", false},
		{"CA issued by goproxy's CA", subCert, subKeyFile, "goproxy's built-in CA", false},
		{"key mode 0644", privCert, key0644, "has mode 0644", false},
		{"key mode 0640", privCert, key0640, "has mode 0640", false},
		{"key owned by another uid", privCert, keyOther, fmt.Sprintf("owned by uid %d", nobodyUID), !otherOwner},
		{"control: private CA, key 0600", privCert, key0600, "", false},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.skip {
				testservers.Missing(t, "needs root to give the key file to another uid")
			}
			cfg := write(fmt.Sprintf("config-%d.yaml", i), []byte(fmt.Sprintf(caRefusalConfig, freeAddr(t), freeAddr(t), tc.cert, tc.key)), 0o600)
			env := []string{tokenEnv + "=" + canarytest.New("T-C2 static credential")}
			for _, cmd := range []string{"validate", "run"} {
				if tc.want == "" && cmd == "run" {
					continue // serving is covered by every other test
				}
				start := time.Now()
				res := runBroker(t, env, cmd, "--config", cfg)
				out := res.stdout + res.stderr
				canarytest.Observe("broker "+cmd+" output ("+t.Name()+")", []byte(out))
				if bytes.Contains([]byte(out), []byte("PRIVATE KEY")) {
					t.Errorf("broker %s printed a private key", cmd)
				}
				if tc.want == "" {
					if res.code != 0 {
						t.Errorf("broker %s on a sound CA: exit %d\n%s", cmd, res.code, out)
					}
					continue
				}
				if res.code != 1 {
					t.Errorf("broker %s: exit %d, want 1\n%s", cmd, res.code, out)
				}
				if !strings.Contains(out, tc.want) {
					t.Errorf("broker %s: output does not name the problem (%q):\n%s", cmd, tc.want, out)
				}
				t.Logf("broker %s refused in %v: %s", cmd, time.Since(start).Round(time.Millisecond), firstLine(out))
			}
		})
	}
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// ---- T-A3

// noEnvProxyConfig: the upstream on the machine's non-loopback address
// (where Go's ProxyFromEnvironment would use the proxy; it skips loopback
// targets) and on localhost, both injecting the canary; a plain-HTTP
// upstream on the same address (HTTP_PROXY's case); and a rule that would
// inject the canary into the broker's own ports, so that only the
// self-connection guard stands between a client and a loop.
const noEnvProxyConfig = `
listen: {proxy: "{{.Proxy}}", admin: "{{.Admin}}"}
ca: {cert: "{{.CACert}}", key: "{{.CAKey}}"}
attestors:
  - {type: cidr, identities: [{id: e2e-workload, cidrs: [127.0.0.0/8]}]}
egress:
  allow_cidrs: [127.0.0.1/32, @EXT@/32]
  connect_ports: [{{index .Ports "ext"}}, {{index .Ports "lo"}}, {{.ProxyPort}}, {{.AdminPort}}]
  ca_bundle: "@BUNDLE@"
credentials:
  api-token: {source: static, value: env:KG_E2E_TOKEN}
rules:
  - name: ext
    hosts: ["@EXT@"]
    ports: [{{index .Ports "ext"}}]
    inject: {credential: api-token, as: bearer}
  - name: ext-plain
    hosts: ["@EXT@"]
    ports: [{{index .Ports "plain"}}]
    allow_plaintext: true
    inject: {credential: api-token, as: bearer}
  - name: lo
    hosts: [localhost]
    ports: [{{index .Ports "lo"}}]
    inject: {credential: api-token, as: bearer}
  - name: self
    hosts: [localhost, 127.0.0.1]
    ports: [{{.ProxyPort}}, {{.AdminPort}}]
    allow_plaintext: true
    inject: {credential: api-token, as: bearer}
`

// externalIPv4 is an IPv4 address of this machine that is not loopback
// and can be listened on, or nil.
func externalIPv4() net.IP {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil
	}
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok || ipn.IP.To4() == nil || ipn.IP.IsLoopback() || ipn.IP.IsLinkLocalUnicast() {
			continue
		}
		ln, err := net.Listen("tcp", net.JoinHostPort(ipn.IP.String(), "0"))
		if err != nil {
			continue
		}
		ln.Close()
		return ipn.IP.To4()
	}
	return nil
}

// TestNoEnvProxyEndToEnd (T-A3): the broker runs with HTTPS_PROXY,
// HTTP_PROXY and ALL_PROXY (upper and lower case) naming a recording
// listener. Requests through the broker to an upstream on the machine's
// non-loopback address (HTTPS, and plain HTTP with allow_plaintext) and on
// localhost reach the real upstream with the credential, and the env proxy
// accepts no connection. A CONNECT or absolute-form request to the
// broker's own proxy and admin ports is 403 egress_denied although a rule
// would inject the credential there, and the broker serves no request it
// sent itself (every audit line is one a client saw the answer to).
func TestNoEnvProxyEndToEnd(t *testing.T) {
	t.Parallel()
	ext := externalIPv4()
	if ext == nil {
		testservers.Missing(t, "no non-loopback IPv4 address: Go ignores env proxies for loopback targets, so the test would prove nothing")
	}
	h := newHarness(t)
	pki := newGatePKI(t)
	nb, na := time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	cert := pki.leaf(t, []string{"localhost"}, []net.IP{net.ParseIP("127.0.0.1"), ext}, nb, na, false)
	extUp := certUpstream(t, "ext", net.JoinHostPort(ext.String(), "0"), cert, nil)
	loUp := certUpstream(t, "lo", "", cert, nil)
	plainUp := upstreamAt(t, "ext-plain", net.JoinHostPort(ext.String(), "0"), true, nil)
	envProxy := newCanaryListener(t, "127.0.0.1")
	pu := fmt.Sprintf("http://127.0.0.1:%d", envProxy.port())
	var env []string
	for _, k := range []string{"HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"} {
		env = append(env, k+"="+pu, strings.ToLower(k)+"="+pu)
	}
	cfg := strings.NewReplacer("@EXT@", ext.String(), "@BUNDLE@", pki.bundle).Replace(noEnvProxyConfig)
	b := h.start(brokerSpec{name: "no-env-proxy", config: cfg, env: append(env, tokenEnv+"="+h.canary)},
		map[string]int{"ext": extUp.port(), "lo": loUp.port(), "plain": plainUp.port()})
	client := h.goClient(b)

	for _, tc := range []struct {
		what, url string
		up        *upstream
	}{
		{"https to the non-loopback address", fmt.Sprintf("https://%s/env-proxy", net.JoinHostPort(ext.String(), strconv.Itoa(extUp.port()))), extUp},
		{"plain http to the non-loopback address", fmt.Sprintf("http://%s/env-proxy", net.JoinHostPort(ext.String(), strconv.Itoa(plainUp.port()))), plainUp},
		{"https to localhost", fmt.Sprintf("https://localhost:%d/env-proxy", loUp.port()), loUp},
	} {
		t.Run(tc.what, func(t *testing.T) {
			for i := 0; i < 2; i++ { // the second on a kept-alive connection
				resp, _, _ := doVia(t, h, client, http.MethodGet, tc.url, nil)
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("request %d: HTTP %d (%s), want 200 from the real upstream", i, resp.StatusCode, resp.Header.Get("X-Keygate-Error"))
				}
			}
			tc.up.expectInjected(t, 2, h.bearer())
		})
	}
	if n := envProxy.conns.Load(); n != 0 {
		t.Errorf("the proxy named by the broker's environment accepted %d connections, want 0", n)
	}

	t.Run("self connections", func(t *testing.T) {
		linesBefore := len(auditIDs(b))
		var seen []string // request ids the client was answered with
		collect := func() {
			h.mu.Lock()
			defer h.mu.Unlock()
			for _, e := range h.transcript {
				for _, l := range strings.Split(string(e.data), "\n") {
					if v, ok := strings.CutPrefix(l, "X-Keygate-Request-Id: "); ok {
						seen = append(seen, strings.TrimSpace(v))
					}
				}
			}
		}
		admin, proxy := portOf(b.adminAddr), portOf(b.proxyAddr)
		targets := []string{"127.0.0.1:" + proxy, "127.0.0.1:" + admin, "localhost:" + proxy, "localhost:" + admin}
		for _, hp := range targets {
			t.Run(hp, func(t *testing.T) { h.expectEgressDenied(t, b, hp) })
		}
		collect()
		ids := auditIDs(b)[linesBefore:]
		known := map[string]bool{}
		for _, id := range seen {
			known[id] = true
		}
		loops := 0
		for _, id := range ids {
			if !known[id] {
				loops++
			}
		}
		if loops != 0 {
			t.Errorf("%d of %d audit lines are requests no client sent (the broker connected to itself)", loops, len(ids))
		}
		if len(ids) == 0 {
			t.Error("no audit line for the self-connection attempts: the loop count proves nothing")
		}
		// expectEgressDenied sends an absolute-form GET and a CONNECT each.
		t.Logf("T-A3 self connections: attempts=%d audit_lines=%d loops=%d", 2*len(targets), len(ids), loops)
	})
	if n := envProxy.conns.Load(); n != 0 {
		t.Errorf("the env proxy accepted %d connections, want 0", n)
	}
	t.Logf("T-A3: env proxy connections=%d, upstream requests ext=%d plain=%d lo=%d", envProxy.conns.Load(), extUp.count(), plainUp.count(), loUp.count())
}

// auditIDs returns the request ids of the broker's audit lines, in order.
func auditIDs(b *brokerProc) []string {
	var out []string
	for _, m := range b.auditDecisions() {
		id, _ := m["request_id"].(string)
		out = append(out, id)
	}
	return out
}

// ---- T-B7

// curlAsResult is one curl run as some uid.
type curlAsResult struct {
	status, connect int
	rid             string
}

// curlAs runs curl as uid (0: as the test) through the broker for target,
// with extra curl arguments. It is safe from several goroutines: it fails
// no test itself.
func (p *processWorld) curlAs(uid int, target string, extra ...string) (curlAsResult, error) {
	args := append([]string{"-o", "/dev/null", "--proxy", p.b.proxyURL(), "--cacert", p.ca,
		"-w", "status=%{http_code}\nconnect=%{http_connect}\nrid=%header{x-keygate-request-id}\n"}, extra...)
	args = curlArgs(append(args, target)...)
	name := p.curl
	if uid != 0 {
		id := strconv.Itoa(uid)
		args = append([]string{"--reuid=" + id, "--regid=" + id, "--clear-groups", "--", p.curl}, args...)
		name = p.setpriv
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = cleanEnv(p.pub)
	cmd.Dir = p.pub
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	p.h.record("curl as uid "+strconv.Itoa(uid)+" stdout", out.Bytes())
	p.h.record("curl as uid "+strconv.Itoa(uid)+" stderr", errb.Bytes())
	var ee *exec.ExitError
	if ctx.Err() != nil {
		return curlAsResult{}, fmt.Errorf("curl as uid %d did not finish within %v", uid, testTimeout)
	}
	if err != nil && !errors.As(err, &ee) {
		return curlAsResult{}, fmt.Errorf("curl as uid %d: %w", uid, err)
	}
	var r curlAsResult
	for _, l := range strings.Split(out.String(), "\n") {
		k, v, _ := strings.Cut(l, "=")
		switch k {
		case "status":
			r.status, _ = strconv.Atoi(v)
		case "connect":
			r.connect, _ = strconv.Atoi(v)
		case "rid":
			r.rid = v
		}
	}
	return r, nil
}

// TestCredentialBoundToIdentityEndToEnd (T-B7): in the process-uid world
// (uid 65534 gets nobody-token; root's curl gets root-curl-token, root's
// other programs root-other-token), curl as uid 65534 tries to obtain a
// root credential through every field it controls: the path, a query
// parameter, headers naming the rule or the credential, forged identity
// headers (X-Keygate-*, X-Broker-Identity, X-Forwarded-*, the delegation
// header) on the CONNECT and on the inner request, a bogus
// Proxy-Authorization, and Host / URL host variants. The upstream only
// ever sees nobody's credential or nothing: root's credentials are counted
// at the upstream and must be 0 for every nobody request. Then root and
// nobody requests run interleaved, and each gets exactly its own.
func TestCredentialBoundToIdentityEndToEnd(t *testing.T) {
	t.Parallel()
	p := newProcessWorld(t)
	port := p.up.port()
	base := fmt.Sprintf("https://localhost:%d", port)
	rootID := "unix:uid:0"
	forged := []string{
		"X-Keygate-Workload: " + rootID, "X-Keygate-Identity: " + rootID, "X-Keygate-Workload-Id: " + rootID,
		"X-Keygate-Uid: 0", "X-Keygate-Rule: root-curl", "X-Keygate-Credential: root-curl-token",
		"X-Broker-Identity: " + rootID, "X-Forwarded-User: root", "X-Forwarded-For: 127.0.0.1",
		"X-Keygate-On-Behalf-Of: root", "X-Spiffe-Id: spiffe://example.org/root",
	}
	hdr := func(kind string, lines ...string) []string {
		var out []string
		for _, l := range lines {
			out = append(out, kind, l)
		}
		return out
	}
	type vector struct {
		name   string
		target string
		extra  []string
	}
	vectors := []vector{
		{"control", base + "/b7-control", nil},
		{"path names the credential", base + "/root-curl-token/b7-path", nil},
		{"path names the rule", base + "/rules/root-curl/b7-path-rule", nil},
		{"query parameters", base + "/b7-query?credential=root-curl-token&rule=root-curl&uid=0&identity=unix:uid:0", nil},
		{"inner headers name rule and credential", base + "/b7-inner-headers", hdr("-H", forged...)},
		{"CONNECT headers forge the identity", base + "/b7-connect-headers", hdr("--proxy-header", forged...)},
		{"bogus Proxy-Authorization bearer", base + "/b7-proxy-auth-bearer", hdr("--proxy-header", "Proxy-Authorization: Bearer root-curl-token")},
		{"bogus Proxy-Authorization basic", base + "/b7-proxy-auth-basic", []string{"--proxy-user", "root:root-curl-token"}},
		{"Host header LOCALHOST", base + "/b7-host-upper", hdr("-H", fmt.Sprintf("Host: LOCALHOST:%d", port))},
		{"Host header localhost.", base + "/b7-host-dot", hdr("-H", fmt.Sprintf("Host: localhost.:%d", port))},
		{"Host header 127.0.0.1", base + "/b7-host-ip", hdr("-H", fmt.Sprintf("Host: 127.0.0.1:%d", port))},
		{"URL host 127.0.0.1", fmt.Sprintf("https://127.0.0.1:%d/b7-url-ip", port), nil},
		{"URL host LOCALHOST.", fmt.Sprintf("https://LOCALHOST.:%d/b7-url-dot", port), nil},
		{"client sends its own Authorization", base + "/b7-own-auth", hdr("-H", "Authorization: Bearer root-curl-token")},
	}
	for _, v := range vectors {
		t.Run(v.name, func(t *testing.T) {
			r, err := p.curlAs(nobodyUID, v.target, v.extra...)
			if err != nil {
				t.Fatal(err)
			}
			u, err := url.Parse(v.target)
			if err != nil {
				t.Fatal(err)
			}
			got := authFor(p.up, u.Path)
			switch {
			case len(got) == 0:
				if v.name == "control" {
					t.Fatalf("control: nobody's request did not reach the upstream (status %d connect %d)", r.status, r.connect)
				}
				t.Logf("%s: refused (status %d, CONNECT %d), upstream saw nothing", v.name, r.status, r.connect)
			case len(got) > 1:
				t.Errorf("%s: the upstream saw %d requests, want at most 1", v.name, len(got))
			default:
				a := got[0]
				if len(a) != 1 || a[0] != "Bearer "+p.nobody {
					t.Errorf("%s: the upstream got Authorization %s; want exactly nobody's credential",
						v.name, describeCreds(a, p.nobody, p.rootCurl, p.oth))
				}
				if r.rid != "" {
					if line := p.b.auditLine(t, r.rid); line["workload.id"] != "unix:uid:65534" || line["credential.name"] != "nobody-token" {
						t.Errorf("%s: audit workload %v credential %v, want unix:uid:65534 / nobody-token", v.name, line["workload.id"], line["credential.name"])
					}
				}
				t.Logf("%s: status %d, upstream got nobody's credential", v.name, r.status)
			}
		})
	}

	t.Run("interleaved root and nobody", func(t *testing.T) {
		const n = 4
		type job struct {
			uid  int
			path string
		}
		var jobs []job
		for i := 0; i < n; i++ {
			jobs = append(jobs, job{nobodyUID, fmt.Sprintf("/b7-mix-nobody-%d", i)}, job{0, fmt.Sprintf("/b7-mix-root-%d", i)})
		}
		errs := make([]error, len(jobs))
		var wg sync.WaitGroup
		for i, j := range jobs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = p.curlAs(j.uid, base+j.path)
			}()
		}
		wg.Wait()
		for i, j := range jobs {
			if errs[i] != nil {
				t.Fatal(errs[i])
			}
			want := p.nobody
			if j.uid == 0 {
				want = p.rootCurl
			}
			got := authFor(p.up, j.path)
			if len(got) != 1 || len(got[0]) != 1 || got[0][0] != "Bearer "+want {
				var a []string
				if len(got) == 1 {
					a = got[0]
				}
				t.Errorf("%s (uid %d): %d requests, Authorization %s; want exactly the requester's", j.path, j.uid, len(got), describeCreds(a, p.nobody, p.rootCurl, p.oth))
			}
		}
	})

	// Per-credential counts at the upstream, over every request of the test.
	counts := map[string]int{}
	for _, r := range p.up.requests() {
		nobodyReq := !strings.HasPrefix(r.Path, "/b7-mix-root-")
		for _, a := range r.Auth {
			switch a {
			case "Bearer " + p.nobody:
				counts["nobody-token"]++
			case "Bearer " + p.rootCurl:
				counts["root-curl-token"]++
				if nobodyReq {
					t.Errorf("CONFUSED DEPUTY: nobody's request %s reached the upstream with root-curl-token", r.Path)
				}
			case "Bearer " + p.oth:
				counts["root-other-token"]++
				t.Errorf("CONFUSED DEPUTY: request %s reached the upstream with root-other-token", r.Path)
			default:
				counts["other"]++
			}
		}
		if len(r.Auth) == 0 {
			counts["none"]++
		}
		for k := range r.Header {
			if strings.HasPrefix(strings.ToLower(k), "x-keygate-") || strings.EqualFold(k, "X-Broker-Identity") {
				counts["forwarded forged header "+k]++
			}
		}
	}
	t.Logf("T-B7 upstream credential counts: %v (requests %d)", counts, p.up.count())
	for k, n := range counts {
		// The broker's own header namespace is the broker's: a forged
		// X-Keygate-* header must not reach the upstream as if it had
		// vouched for it.
		if strings.HasPrefix(k, "forwarded forged header X-Keygate-") {
			t.Errorf("%s reached the upstream %d times", strings.TrimPrefix(k, "forwarded forged header "), n)
		}
	}
	if counts["root-curl-token"] != 4 {
		t.Errorf("root-curl-token reached the upstream %d times, want exactly the 4 interleaved root requests", counts["root-curl-token"])
	}
	if counts["other"] != 0 {
		t.Errorf("%d Authorization values at the upstream are none of the broker's credentials (a client-sent value was forwarded)", counts["other"])
	}
}

// describeCreds names Authorization values by owner without printing them.
func describeCreds(vals []string, nobody, rootCurl, rootOther string) string {
	out := fmt.Sprintf("%d value(s):", len(vals))
	for _, v := range vals {
		switch v {
		case "Bearer " + nobody:
			out += " [nobody's]"
		case "Bearer " + rootCurl:
			out += " [ROOT-CURL's]"
		case "Bearer " + rootOther:
			out += " [ROOT-OTHER's]"
		default:
			out += fmt.Sprintf(" %q", redactCanary(v))
		}
	}
	return out
}

// ---- F-13 / T-F3

// pgLeaseConfig: a databases: entry whose credential is a Vault dynamic
// database user with a short lease.
const pgLeaseConfig = `
listen: {proxy: "{{.Proxy}}", admin: "{{.Admin}}"}
ca: {cert: "{{.CACert}}", key: "{{.CAKey}}"}
attestors:
  - {type: cidr, identities: [{id: e2e-workload, cidrs: [127.0.0.0/8]}]}
egress: {allow_cidrs: [127.0.0.1/32]}
vaults:
  main:
    address: "@VAULT@"
    timeout: 5s
    auth: {method: approle, role_id_file: "@ROLE@", secret_id_file: "@SECRET@"}
credentials:
  orders-db: {source: vault_dynamic, vault: main, path: database/creds/app, cache: none}
databases:
  - name: orders
    listen: "127.0.0.1:{{index .Ports "db"}}"
    upstream: "127.0.0.1:@PGPORT@"
    credential: orders-db
    tls: verify-full
    ca_bundle: "@PGCA@"
rules:
  - name: orders
    hosts: [127.0.0.1]
    when: 'request.protocol == "postgres" && request.database == "postgres"'
`

// TestPGLeaseExpiryEndToEnd (F-13, T-F3, T-B10): the real broker binary in
// front of a real PostgreSQL, with its credential from the real Vault
// database engine on a 4 s lease. A client that asks for user=postgres
// (the superuser) gets the Vault-made user (SELECT current_user), and a
// pg_sleep(60) in that same session is ended by the broker within TTL + 2 s
// (pgx: FATAL 57P01, or the connection closed; psql: the broker's FATAL),
// after which pg_stat_activity shows no backend for the user. The dynamic
// password appears in no output.
func TestPGLeaseExpiryEndToEnd(t *testing.T) {
	t.Parallel()
	psqlBin := requireTool(t, "psql")
	const ttl = 4 * time.Second
	v := testservers.StartVault(t)
	pg := testservers.StartPostgresWith(t, testservers.PostgresOptions{TLS: true})
	h := newHarness(t)
	dir := t.TempDir()
	auditLog := filepath.Join(dir, "vault-audit.log")
	// log_raw: the test reads the dynamic passwords from it, to sweep for them.
	v.MustEventually("PUT", "sys/audit/file", map[string]any{"type": "file",
		"options": map[string]any{"file_path": auditLog, "log_raw": true}})
	secs := strconv.Itoa(int(ttl / time.Second))
	vaultPostgres(v, pg, secs+"s", secs+"s")
	role := newAppRole(t, v, dir, dbCredsPolicy, "1h")
	cfg := strings.NewReplacer("@VAULT@", v.Addr, "@ROLE@", role.roleFile, "@SECRET@", role.secretFile,
		"@PGPORT@", strconv.Itoa(pg.Port), "@PGCA@", pg.CAFile).Replace(pgLeaseConfig)
	// Registered before the broker starts, so it runs after the broker
	// has stopped and flushed its output.
	t.Cleanup(func() {
		h.sweepFor(t, "the AppRole secret id", role.secretID)
		for i, pw := range vaultDBPasswords(t, auditLog) {
			canarytest.Register("F-13 dynamic database password", pw)
			h.sweepFor(t, fmt.Sprintf("dynamic database password #%d", i+1), pw)
		}
	})
	dbPort := atoiPort(t, freeAddr(t))
	b := h.start(brokerSpec{name: "pg-lease", config: cfg}, map[string]int{"db": dbPort})
	waitReadyz(t, b, testTimeout)
	// sinceLease is how long ago Vault issued its latest database user (its
	// audit log's response time): the lease's TTL runs from there.
	sinceLease := func() time.Duration {
		ts := vaultDBIssues(t, auditLog)
		if len(ts) == 0 {
			t.Fatal("Vault's audit log shows no database user issued")
		}
		return time.Since(ts[len(ts)-1])
	}

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, pg.DSN(pg.User, pg.Password, "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(context.Background())
	backends := func(user string) int {
		var n int
		if err := admin.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE usename = $1`, user).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	noBackend := func(user string) time.Duration {
		d, ok := pollUntil(2*time.Second, func() bool { return backends(user) == 0 })
		if !ok {
			t.Errorf("%d backends for the JIT user remain in pg_stat_activity 2s after the session ended", backends(user))
		}
		return d
	}

	t.Run("pgx", func(t *testing.T) {
		cc, err := pgx.ParseConfig(fmt.Sprintf("host=localhost port=%d user=postgres dbname=postgres sslmode=verify-full sslrootcert=%s connect_timeout=5",
			dbPort, h.caPEM()))
		if err != nil {
			t.Fatal(err)
		}
		// The broker listens on 127.0.0.1 only; the name stays localhost for
		// verify-full against the broker's leaf.
		cc.LookupFunc = func(context.Context, string) ([]string, error) { return []string{"127.0.0.1"}, nil }
		start := time.Now()
		c, err := pgx.ConnectConfig(ctx, cc)
		if err != nil {
			t.Fatalf("connect through the broker: %v", err)
		}
		defer c.Close(context.Background())
		var user string
		if err := c.QueryRow(ctx, "SELECT current_user").Scan(&user); err != nil {
			t.Fatalf("SELECT current_user: %v", err)
		}
		if user == "postgres" || !strings.HasPrefix(user, "v-") {
			t.Fatalf("current_user %q: the client's user=postgres was not replaced by a Vault-made user", user)
		}
		if n := backends(user); n != 1 {
			t.Errorf("during the session: %d backends for the JIT user, want 1", n)
		}
		_, err = c.Exec(ctx, "SELECT pg_sleep(60)")
		elapsed, lease := time.Since(start), sinceLease()
		if err == nil {
			t.Fatal("pg_sleep(60) finished: the session outlived its lease")
		}
		var pe *pgconn.PgError
		code := "closed"
		switch {
		case errors.As(err, &pe) && (pe.Code == "57P01" || pe.Code == "08006"):
			code = pe.Code
		case errors.As(err, &pe):
			t.Errorf("pg_sleep ended with SQLSTATE %s %q, want 57P01 or 08006", pe.Code, pe.Message)
		case !c.IsClosed() && ctx.Err() == nil:
			t.Errorf("pg_sleep failed (%v) but the connection is still open", err)
		}
		checkLeaseEnd(t, "pgx", lease, elapsed, ttl)
		gone := noBackend(user)
		t.Logf("F-13 pgx: user=postgres -> current_user=JIT (v-...); pg_sleep(60) ended with %s %v after the lease was issued, %v after connect started (lease %v); no backend %v later",
			code, lease.Round(time.Millisecond), elapsed.Round(time.Millisecond), ttl, gone.Round(time.Millisecond))
	})

	t.Run("psql", func(t *testing.T) {
		conn := pgConnString(dbPort, "postgres", "postgres", h.caPEM())
		start := time.Now()
		res := h.runTool(psqlBin, []string{"PGCONNECT_TIMEOUT=5"}, "", "-X", "-tA", "-v", "ON_ERROR_STOP=1", "-d", conn,
			"-c", "SELECT current_user", "-c", "SELECT pg_sleep(60)")
		elapsed, lease := time.Since(start), sinceLease()
		user := strings.TrimSpace(res.stdout)
		if res.code == 0 {
			t.Fatalf("psql: pg_sleep(60) finished")
		}
		if !strings.HasPrefix(user, "v-") {
			t.Fatalf("psql: current_user %q, want the Vault-made user (stderr %s)", user, redactCanary(res.stderr))
		}
		if !strings.Contains(res.stderr, "FATAL") || !strings.Contains(res.stderr, "lease expired") {
			t.Errorf("psql said %q, want the broker's FATAL naming the expired lease", redactCanary(res.stderr))
		}
		checkLeaseEnd(t, "psql", lease, elapsed, ttl)
		gone := noBackend(user)
		t.Logf("F-13 psql: ended %v after the lease was issued, %v after psql started (lease %v): %s; no backend %v later",
			lease.Round(time.Millisecond), elapsed.Round(time.Millisecond), ttl, firstLine(redactCanary(res.stderr)), gone.Round(time.Millisecond))
	})

	// One audit line per session, each naming the lease expiry.
	var expired int
	pollUntil(testTimeout, func() bool {
		expired = 0
		for _, m := range b.auditDecisions() {
			if e, _ := m["error"].(string); m["listener"] == "db:orders" && strings.Contains(e, "lease expired") {
				expired++
			}
		}
		return expired >= 2
	})
	if expired != 2 {
		t.Errorf("%d database audit lines name the lease expiry, want 2", expired)
	}
}

// checkLeaseEnd: the session ended within TTL + 2 s of the lease's issue
// (the F-13 bound) and not before the lease could have run out (a session
// that dies early for another reason is not this defence). lease is the
// time from issue to the end; total from the client's start, which also
// holds the broker's Vault login and fetch, so it only gets a looser
// bound.
func checkLeaseEnd(t *testing.T, what string, lease, total, ttl time.Duration) {
	t.Helper()
	if lease > ttl+2*time.Second {
		t.Errorf("%s: the session ended %v after its lease was issued, want within the %v lease + 2s", what, lease.Round(time.Millisecond), ttl)
	}
	if lease < ttl-500*time.Millisecond {
		t.Errorf("%s: the session ended %v after its lease was issued, before the %v lease ran out", what, lease.Round(time.Millisecond), ttl)
	}
	if total > ttl+2*time.Second+testTimeout/2 {
		t.Errorf("%s: the session ended %v after the client started", what, total.Round(time.Millisecond))
	}
}

// vaultDBIssues returns the times Vault answered database/creds/app, from
// its audit log, in log order.
func vaultDBIssues(t *testing.T, auditLog string) []time.Time {
	t.Helper()
	entries, err := readVaultAudit(auditLog, "response", "database/creds/app")
	if err != nil {
		t.Fatalf("vault audit log: %v", err)
	}
	var out []time.Time
	for _, e := range entries {
		out = append(out, e.Time)
	}
	return out
}

// vaultDBPasswords reads the dynamic database passwords Vault issued from
// its raw audit log.
func vaultDBPasswords(t *testing.T, auditLog string) []string {
	entries, err := readVaultAudit(auditLog, "response", "database/creds/app")
	if err != nil {
		t.Errorf("vault audit log: %v", err)
		return nil
	}
	var out []string
	for _, e := range entries {
		if pw, _ := e.Response.Data["password"].(string); pw != "" {
			out = append(out, pw)
		}
	}
	if len(out) == 0 {
		t.Error("Vault's audit log shows no dynamic password issued: the sweep would prove nothing")
	}
	return out
}
