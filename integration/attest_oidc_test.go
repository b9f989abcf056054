package integration

// End-to-end tests of the oidc attestor (DESIGN.md §2, §5, §6; issue 3
// items 2 and 6, "Real parts", "Bad input").
//
// The issuer is a fake, on purpose and by necessity: GitHub Actions
// (token.actions.githubusercontent.com) and a Kubernetes API server's
// service-account issuer cannot run here (no network, no cluster). The
// stand-in is an httptest server on 127.0.0.1 that serves exactly what those
// issuers serve to a relying party — /.well-known/openid-configuration and a
// JWKS — and tokens signed with go-jose that carry the claims of a GitHub
// Actions job token and of a projected Kubernetes service-account token. The
// broker, its discovery (go-oidc), key fetching and verification (go-jose)
// and the clients (curl, Go's net/http, raw CONNECT bytes) are the real
// programs.
//
// Tokens are bearer secrets. Every token a test mints is scanned for (raw,
// URL-escaped, base64 at every alignment, and its signature segment alone)
// in the broker's output, in everything the broker answered, and in every
// header an upstream received; see secretWatch.

import (
	"bufio"
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/keygate/broker/internal/canarytest"
)

// ---- secret watch: tokens and extra credentials must never leak

// secretWatch scans, at cleanup (after every broker stopped), for secrets
// the harness does not know about: OIDC tokens (which must appear nowhere
// but in the client's own request: not in the broker's output, not in any
// response, not in any header an upstream received) and extra credential
// canaries (which the upstream legitimately receives, so only the broker's
// output and the responses are scanned for them).
type secretWatch struct {
	h *harness

	mu     sync.Mutex
	tokens []string
	creds  []string
	ups    []*upstream
}

// newSecretWatch must be called right after newHarness and before any broker
// starts, so that its cleanup runs after the brokers' (cleanups run last in,
// first out) and before the harness's own canary scan.
func newSecretWatch(h *harness) *secretWatch {
	w := &secretWatch{h: h}
	h.t.Cleanup(w.scan)
	return w
}

func (w *secretWatch) token(tok string) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.tokens = append(w.tokens, tok)
	return tok
}

// credential returns a fresh canary credential value and watches it.
func (w *secretWatch) credential() string {
	c := canarytest.New("oidc attest credential (" + w.h.t.Name() + ")")
	w.mu.Lock()
	defer w.mu.Unlock()
	w.creds = append(w.creds, c)
	return c
}

func (w *secretWatch) upstream(u *upstream) *upstream {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.ups = append(w.ups, u)
	return u
}

// tokenNeedles are the spellings of a token that must not appear: those of
// secretNeedles plus the signature segment alone (the part that makes a
// copied token usable).
func tokenNeedles(tok string) []string {
	n := secretNeedles(tok)
	if i := strings.LastIndexByte(tok, '.'); i >= 0 && len(tok)-i-1 >= 16 {
		n = append(n, tok[i+1:])
	}
	return n
}

func (w *secretWatch) scan() {
	t, h := w.h.t, w.h
	w.mu.Lock()
	tokens, creds, ups := w.tokens, w.creds, w.ups
	w.mu.Unlock()

	type needle struct{ what, s string }
	var tokNeedles, allNeedles []needle
	for i, tok := range tokens {
		for _, n := range tokenNeedles(tok) {
			tokNeedles = append(tokNeedles, needle{fmt.Sprintf("OIDC token #%d", i+1), n})
		}
	}
	allNeedles = append(allNeedles, tokNeedles...)
	for i, c := range creds {
		for _, n := range secretNeedles(c) {
			allNeedles = append(allNeedles, needle{fmt.Sprintf("credential canary #%d", i+1), n})
		}
	}
	check := func(where string, data []byte, needles []needle) {
		for _, n := range needles {
			if bytes.Contains(data, []byte(n.s)) {
				t.Errorf("SECRET LEAK: %s contains %s (or an encoding of it)", where, n.what)
				return
			}
		}
	}
	h.mu.Lock()
	for _, e := range h.transcript {
		check(e.what, e.data, allNeedles)
	}
	for _, b := range h.brokers {
		check("broker output ("+b.name+")", b.output(), allNeedles)
	}
	h.mu.Unlock()
	for _, u := range ups {
		for i, r := range u.requests() {
			var hb bytes.Buffer
			fmt.Fprintf(&hb, "%s %s\nHost: %s\n", r.Method, r.Path, r.Host)
			_ = r.Header.Write(&hb)
			check(fmt.Sprintf("%s upstream request %d", u.name, i), hb.Bytes(), tokNeedles)
			if v := r.Header.Values("Proxy-Authorization"); len(v) > 0 {
				t.Errorf("%s upstream request %d received a Proxy-Authorization header", u.name, i)
			}
		}
	}
}

// ---- a test-local OIDC issuer

// signingKey is one issuer key.
type signingKey struct {
	kid  string
	alg  jose.SignatureAlgorithm
	priv crypto.Signer
}

func newRSAKey(t *testing.T, kid string) *signingKey {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return &signingKey{kid: kid, alg: jose.RS256, priv: k}
}

func newECKey(t *testing.T, kid string) *signingKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &signingKey{kid: kid, alg: jose.ES256, priv: k}
}

func (k *signingKey) publicJWK() jose.JSONWebKey {
	return jose.JSONWebKey{Key: k.priv.Public(), KeyID: k.kid, Algorithm: string(k.alg), Use: "sig"}
}

// sign makes a compact JWS over claims with header kid (none when empty).
func (k *signingKey) sign(t *testing.T, kid string, claims map[string]any) string {
	t.Helper()
	opts := (&jose.SignerOptions{}).WithType("JWT")
	if kid != "" {
		opts = opts.WithHeader("kid", kid)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: k.alg, Key: k.priv}, opts)
	if err != nil {
		t.Fatal(err)
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	obj, err := signer.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	s, err := obj.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// testIssuer serves discovery and a JWKS on a fixed 127.0.0.1 port. It can
// be taken down and brought back on the same port, and rotate its key.
type testIssuer struct {
	t     *testing.T
	watch *secretWatch
	addr  string // 127.0.0.1:port
	url   string // http://127.0.0.1:port — the exact iss

	mu        sync.Mutex
	signing   *signingKey
	published []*signingKey
	srv       *httptest.Server

	discoveryFetches atomic.Int64
	jwksFetches      atomic.Int64
}

// newTestIssuer starts an issuer with one RSA key (GitHub signs with RS256).
func newTestIssuer(t *testing.T, w *secretWatch) *testIssuer {
	t.Helper()
	is := newStoppedIssuer(t, w, freeAddr(t))
	is.up()
	return is
}

// newStoppedIssuer prepares an issuer for addr without listening: its keys
// exist and tokens can be minted, but every fetch is refused.
func newStoppedIssuer(t *testing.T, w *secretWatch, addr string) *testIssuer {
	t.Helper()
	k := newRSAKey(t, "gh-key-1")
	is := &testIssuer{t: t, watch: w, addr: addr, url: "http://" + addr, signing: k, published: []*signingKey{k}}
	t.Cleanup(is.down)
	return is
}

func (is *testIssuer) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/openid-configuration", func(w http.ResponseWriter, _ *http.Request) {
		is.discoveryFetches.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"issuer":                                is.url,
			"jwks_uri":                              is.url + "/.well-known/jwks",
			"subject_types_supported":               []string{"public", "pairwise"},
			"response_types_supported":              []string{"id_token"},
			"claims_supported":                      []string{"sub", "aud", "exp", "iat", "iss", "jti", "nbf", "ref", "repository", "repository_owner", "workflow", "job_workflow_ref", "environment", "actor"},
			"id_token_signing_alg_values_supported": []string{"RS256"},
			"scopes_supported":                      []string{"openid"},
		})
	})
	mux.HandleFunc("GET /.well-known/jwks", func(w http.ResponseWriter, _ *http.Request) {
		is.jwksFetches.Add(1)
		is.mu.Lock()
		var set jose.JSONWebKeySet
		for _, k := range is.published {
			set.Keys = append(set.Keys, k.publicJWK())
		}
		is.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(set)
	})
	return mux
}

// up starts serving on the issuer's address (again).
func (is *testIssuer) up() {
	is.t.Helper()
	var ln net.Listener
	var err error
	for i := 0; i < 50; i++ { // the old socket may linger for a moment
		if ln, err = net.Listen("tcp", is.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		is.t.Fatalf("issuer: listen on %s again: %v", is.addr, err)
	}
	srv := httptest.NewUnstartedServer(is.handler())
	_ = srv.Listener.Close()
	srv.Listener = ln
	srv.Config.ReadHeaderTimeout = 5 * time.Second
	srv.Start()
	is.mu.Lock()
	is.srv = srv
	is.mu.Unlock()
}

func (is *testIssuer) down() {
	is.mu.Lock()
	srv := is.srv
	is.srv = nil
	is.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

func (is *testIssuer) port() int {
	p, _ := strconv.Atoi(portOf(is.addr))
	return p
}

// rotate publishes a new key, withdraws the old one, and signs with the new.
func (is *testIssuer) rotate(k *signingKey) {
	is.mu.Lock()
	defer is.mu.Unlock()
	is.signing = k
	is.published = []*signingKey{k}
}

func (is *testIssuer) key() *signingKey {
	is.mu.Lock()
	defer is.mu.Unlock()
	return is.signing
}

// mint signs claims with the current key; the token is watched for leaks.
func (is *testIssuer) mint(claims map[string]any) string {
	k := is.key()
	return is.watch.token(k.sign(is.t, k.kid, claims))
}

// githubClaims are the claims of a GitHub Actions job token
// (docs.github.com, "About security hardening with OpenID Connect") for a
// push to main of repo, minted for audience keygate, valid for 10 minutes.
func (is *testIssuer) githubClaims(repo string) map[string]any {
	now := time.Now()
	owner, _, _ := strings.Cut(repo, "/")
	jti := make([]byte, 8)
	_, _ = rand.Read(jti)
	return map[string]any{
		"iss":                   is.url,
		"aud":                   "keygate",
		"sub":                   "repo:" + repo + ":ref:refs/heads/main",
		"jti":                   hex.EncodeToString(jti),
		"iat":                   now.Add(-time.Minute).Unix(),
		"nbf":                   now.Add(-time.Minute).Unix(),
		"exp":                   now.Add(10 * time.Minute).Unix(),
		"ref":                   "refs/heads/main",
		"ref_type":              "branch",
		"ref_protected":         "true",
		"sha":                   "e3b0c44298fc1c149afbf4c8996fb92427ae41e4",
		"repository":            repo,
		"repository_id":         "690102",
		"repository_owner":      owner,
		"repository_owner_id":   "1342004",
		"repository_visibility": "private",
		"run_id":                "7264528881",
		"run_number":            "42",
		"run_attempt":           "1",
		"runner_environment":    "github-hosted",
		"actor":                 "octocat",
		"actor_id":              "583231",
		"workflow":              "CI",
		"workflow_ref":          repo + "/.github/workflows/ci.yml@refs/heads/main",
		"job_workflow_ref":      repo + "/.github/workflows/ci.yml@refs/heads/main",
		"event_name":            "push",
		"environment":           "production",
	}
}

// k8sClaims are the claims of a projected Kubernetes service-account token
// (audience keygate, one hour) for namespace/name.
func (is *testIssuer) k8sClaims(namespace, name string) map[string]any {
	now := time.Now()
	return map[string]any{
		"iss": is.url,
		"aud": []string{"keygate"},
		"sub": "system:serviceaccount:" + namespace + ":" + name,
		"iat": now.Add(-time.Minute).Unix(),
		"nbf": now.Add(-time.Minute).Unix(),
		"exp": now.Add(time.Hour).Unix(),
		"kubernetes.io": map[string]any{
			"namespace":      namespace,
			"pod":            map[string]any{"name": name + "-7d9c6b7f5-x2x8q", "uid": "0b3f5c8e-2f4a-4c1e-9a57-2d0f1f6b8e11"},
			"serviceaccount": map[string]any{"name": name, "uid": "5c1c7a0e-9e36-4d6a-8b0e-7f7b3a2e6d90"},
			"node":           map[string]any{"name": "node-1", "uid": "a9d0e1c2-3b4f-4a5e-8c6d-7e8f9a0b1c2d"},
		},
	}
}

// withClaims returns a copy of claims with changes applied (a nil value deletes).
func withClaims(claims map[string]any, changes map[string]any) map[string]any {
	out := make(map[string]any, len(claims))
	for k, v := range claims {
		out[k] = v
	}
	for k, v := range changes {
		if v == nil {
			delete(out, k)
		} else {
			out[k] = v
		}
	}
	return out
}

// unsignedJWT builds a compact JWS by hand: header and claims as given, and
// sig computed by sign over "header.payload" (nil: empty signature).
func unsignedJWT(t *testing.T, header, claims map[string]any, sign func([]byte) []byte) string {
	t.Helper()
	hb, err := json.Marshal(header)
	if err != nil {
		t.Fatal(err)
	}
	cb, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	in := base64.RawURLEncoding.EncodeToString(hb) + "." + base64.RawURLEncoding.EncodeToString(cb)
	var sig []byte
	if sign != nil {
		sig = sign([]byte(in))
	}
	return in + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// ---- configs

// oidcCredEnv are the variables of the two credentials the OIDC configs
// grant: app-token for acme/app, other-token for acme/other.
const (
	oidcAppEnv   = "KG_E2E_APP_TOKEN"
	oidcOtherEnv = "KG_E2E_OTHER_TOKEN"
	oidcWeakEnv  = "KG_E2E_WEAK_TOKEN"
	oidcK8sEnv   = "KG_E2E_K8S_TOKEN"
)

// oidcConfig: one oidc attestor for the test issuer (audience keygate) and,
// when Ports.cidr is 1, a cidr attestor for loopback after it. acme/app gets
// app-token, acme/other gets other-token; with the cidr fallback, cidr
// callers get weak-token.
const oidcConfig = `
listen:
  proxy: {{.Proxy}}
  admin: {{.Admin}}
ca:
  cert: {{.CACert}}
  key: {{.CAKey}}
attestors:
  - {type: oidc, name: github, issuer: "http://127.0.0.1:{{index .Ports "issuer"}}", audiences: [keygate]}
{{- if eq (index .Ports "cidr") 1}}
  - type: cidr
    identities: [{id: e2e-workload, cidrs: [127.0.0.0/8]}]
{{- end}}
egress:
  allow_cidrs: [127.0.0.1/32]
  ca_bundle: {{.Bundle}}
credentials:
  app-token: {source: static, value: env:KG_E2E_APP_TOKEN}
  other-token: {source: static, value: env:KG_E2E_OTHER_TOKEN}
  weak-token: {source: static, value: env:KG_E2E_WEAK_TOKEN}
rules:
  - name: acme-app
    hosts: [localhost]
    ports: [{{index .Ports "upstream"}}]
    when: 'workload.method == "oidc" && workload.claims.repository == "acme/app"'
    inject: {credential: app-token, as: bearer}
  - name: acme-other
    hosts: [localhost]
    ports: [{{index .Ports "upstream"}}]
    when: 'workload.method == "oidc" && workload.claims.repository == "acme/other"'
    inject: {credential: other-token, as: bearer}
  - name: weak-fallback
    hosts: [localhost]
    ports: [{{index .Ports "upstream"}}]
    when: 'workload.method == "cidr"'
    inject: {credential: weak-token, as: bearer}
`

// oidcWorld is one broker in front of one upstream with the OIDC config.
type oidcWorld struct {
	h      *harness
	w      *secretWatch
	is     *testIssuer
	up     *upstream
	b      *brokerProc
	app    string // credential values
	other  string
	weak   string
	target string // https://localhost:port
}

// newOIDCWorld builds the world; issuer is started unless stopped is set;
// cidr adds the loopback cidr attestor after the oidc one. The broker is
// started but readiness is not awaited.
func newOIDCWorld(t *testing.T, cidr, stopped bool) *oidcWorld {
	t.Helper()
	h := newHarness(t)
	w := newSecretWatch(h)
	o := &oidcWorld{h: h, w: w, app: w.credential(), other: w.credential(), weak: w.credential()}
	if stopped {
		o.is = newStoppedIssuer(t, w, freeAddr(t))
	} else {
		o.is = newTestIssuer(t, w)
	}
	o.up = w.upstream(newUpstream(t, "api", nil))
	o.target = fmt.Sprintf("https://localhost:%d", o.up.port())
	c := 0
	if cidr {
		c = 1
	}
	o.b = h.start(brokerSpec{name: "oidc", config: oidcConfig,
		env: []string{oidcAppEnv + "=" + o.app, oidcOtherEnv + "=" + o.other, oidcWeakEnv + "=" + o.weak}},
		map[string]int{"issuer": o.is.port(), "upstream": o.up.port(), "cidr": c})
	return o
}

// ---- clients

// connectWith sends CONNECT with extra raw header lines (each without CRLF)
// and reads the answer, like harness.connect.
func (h *harness) connectWith(b *brokerProc, authority string, lines ...string) connectResult {
	t := h.t
	t.Helper()
	c, err := net.DialTimeout("tcp", b.proxyAddr, testTimeout)
	if err != nil {
		t.Fatalf("dial proxy: %v", err)
	}
	_ = c.SetDeadline(time.Now().Add(testTimeout))
	var req strings.Builder
	req.WriteString("CONNECT " + authority + " HTTP/1.1\r\nHost: " + authority + "\r\n")
	for _, l := range lines {
		req.WriteString(l + "\r\n")
	}
	req.WriteString("\r\n")
	if _, err := io.WriteString(c, req.String()); err != nil {
		c.Close()
		t.Fatalf("write CONNECT: %v", err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		c.Close()
		t.Fatalf("CONNECT %s: reading the answer: %v", authority, err)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		c.Close()
		h.recordResponse("CONNECT "+authority, resp, body)
		return connectResult{resp: resp, body: body}
	}
	h.recordResponse("CONNECT "+authority, resp, nil)
	if br.Buffered() > 0 {
		c.Close()
		t.Fatalf("CONNECT %s: %d unexpected bytes after 200", authority, br.Buffered())
	}
	t.Cleanup(func() { c.Close() })
	return connectResult{conn: c, resp: resp}
}

// rawGet does CONNECT localhost:port with the given header lines and, if the
// tunnel is granted, one GET path inside it (with inner extra header lines).
// It returns the CONNECT refusal or the inner response.
func (o *oidcWorld) rawGet(path string, connectLines []string, innerLines ...string) (*http.Response, []byte) {
	t := o.h.t
	t.Helper()
	cr := o.h.connectWith(o.b, fmt.Sprintf("localhost:%d", o.up.port()), connectLines...)
	if cr.conn == nil {
		return cr.resp, cr.body
	}
	tc, err := o.h.tlsClient(cr.conn, "localhost")
	if err != nil {
		t.Fatalf("TLS in the tunnel: %v", err)
	}
	raw := fmt.Sprintf("GET %s HTTP/1.1\r\nHost: localhost:%d\r\n", path, o.up.port())
	for _, l := range innerLines {
		raw += l + "\r\n"
	}
	raw += "Connection: close\r\n\r\n"
	return o.h.rawExchange(tc, "GET "+path, raw)
}

func bearerLine(tok string) string { return "Proxy-Authorization: Bearer " + tok }

func basicLine(user, pass string) string {
	return "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
}

// tokenClient is net/http through the broker, presenting tok either as the
// password of the proxy URL (Basic, as for HTTPS_PROXY=http://token:JWT@…)
// or as a Bearer Proxy-Authorization on CONNECT.
func (o *oidcWorld) tokenClient(tok string, asProxyURL bool) *http.Client {
	pu, err := url.Parse(o.b.proxyURL())
	if err != nil {
		o.h.t.Fatal(err)
	}
	tr := &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: o.h.caPool(), MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout: testTimeout,
	}
	if asProxyURL {
		pu.User = url.UserPassword("token", tok)
	} else {
		tr.ProxyConnectHeader = http.Header{"Proxy-Authorization": {"Bearer " + tok}}
	}
	tr.Proxy = http.ProxyURL(pu)
	o.h.t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: testTimeout}
}

func (o *oidcWorld) goGet(c *http.Client, path string) (*http.Response, []byte) {
	t := o.h.t
	t.Helper()
	resp, err := c.Get(o.target + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	o.h.recordResponse("go GET "+path, resp, body)
	return resp, body
}

// curlOut is what curlVia returns: exit code and the -w fields.
type curlOut struct {
	code                 int
	status, connect      int
	requestID, stderrMsg string
}

// curlVia runs curl through the broker with the given proxy URL (as --proxy,
// or as HTTPS_PROXY when viaEnv) and parses -w fields. No -v: curl would
// print the Proxy-Authorization it sends, and the transcript is scanned for
// the token.
func (h *harness) curlVia(curl, proxyURL string, viaEnv bool, target string) curlOut {
	h.t.Helper()
	var env []string
	args := []string{"-o", "/dev/null", "--cacert", h.caPEM(),
		"-w", "status=%{http_code}\nconnect=%{http_connect}\nrid=%header{x-keygate-request-id}\n"}
	if viaEnv {
		env = []string{"HTTPS_PROXY=" + proxyURL}
	} else {
		args = append(args, "--proxy", proxyURL)
	}
	res := h.runTool(curl, env, "", curlArgs(append(args, target)...)...)
	out := curlOut{code: res.code, stderrMsg: res.stderr}
	fields := map[string]string{}
	for _, l := range strings.Split(res.stdout, "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			fields[k] = v
		}
	}
	out.status, _ = strconv.Atoi(fields["status"])
	out.connect, _ = strconv.Atoi(fields["connect"])
	out.requestID = fields["rid"]
	return out
}

// authFor returns the Authorization values of every request the upstream
// received for path.
func authFor(u *upstream, path string) [][]string {
	var out [][]string
	for _, r := range u.requests() {
		if r.Path == path {
			out = append(out, r.Auth)
		}
	}
	return out
}

// expectOneInjected asserts the upstream received exactly one request for
// path carrying exactly one Authorization, "Bearer "+want; others are the
// credentials that must not be there (confused deputy).
func expectOneInjected(t *testing.T, u *upstream, path, want string, others ...string) {
	t.Helper()
	got := authFor(u, path)
	if len(got) != 1 {
		t.Errorf("upstream received %d requests for %s, want 1", len(got), path)
		return
	}
	a := got[0]
	if len(a) != 1 || a[0] != "Bearer "+want {
		desc := fmt.Sprintf("%d value(s)", len(a))
		for _, v := range a {
			for i, o := range others {
				if strings.Contains(v, o) {
					desc += fmt.Sprintf(" [ANOTHER CALLER'S CREDENTIAL #%d]", i+1)
				}
			}
		}
		t.Errorf("upstream request %s: Authorization %s, want exactly the granted credential", path, desc)
	}
}

// ---- admin endpoint helpers

func adminGet(t *testing.T, b *brokerProc, path string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil}}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://" + b.adminAddr + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// waitReadyz polls /readyz until it answers 200 and returns how long that
// took; it fails the test after d.
func waitReadyz(t *testing.T, b *brokerProc, d time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		code, _ := adminGet(t, b, "/readyz")
		if code == http.StatusOK {
			return time.Since(start)
		}
		if time.Since(start) > d {
			t.Fatalf("/readyz still %d after %v", code, d)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// attestFailures reads keygate_attestation_failures_total{method=...}.
func attestFailures(t *testing.T, b *brokerProc, method string) int {
	t.Helper()
	code, body := adminGet(t, b, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	re := regexp.MustCompile(`(?m)^keygate_attestation_failures_total\{method="` + regexp.QuoteMeta(method) + `"\} (\d+)`)
	m := re.FindStringSubmatch(body)
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// expect407 asserts an attestation refusal: 407 with Proxy-Authenticate, the
// JSON body of §7, and an audit line whose error holds reason and no part of
// the token. It returns the audit line.
func expect407(t *testing.T, b *brokerProc, what string, resp *http.Response, body []byte, reason, tok string) map[string]any {
	t.Helper()
	expectRefusal(t, what, resp, body, http.StatusProxyAuthRequired, "unauthenticated")
	if resp.StatusCode != http.StatusProxyAuthRequired {
		return nil
	}
	if resp.Header.Get("Proxy-Authenticate") == "" {
		t.Errorf("%s: 407 without Proxy-Authenticate", what)
	}
	line := b.auditLine(t, resp.Header.Get("X-Keygate-Request-Id"))
	errField, _ := line["error"].(string)
	if !strings.Contains(errField, reason) {
		t.Errorf("%s: audit error %q, want it to give the reason %q", what, errField, reason)
	}
	if line["status"] != float64(http.StatusProxyAuthRequired) || line["decision"] != "deny" {
		t.Errorf("%s: audit status %v decision %v, want 407 deny", what, line["status"], line["decision"])
	}
	// A caller no attestor applies to is audited as the anonymous identity
	// (issue 3: only rules that allow anonymous callers match it); a
	// rejected caller has no identity at all.
	if (line["workload.id"] != "" && line["workload.id"] != "anonymous") || line["credential.name"] != "" {
		t.Errorf("%s: audit line names workload %v / credential %v for an unattested caller", what, line["workload.id"], line["credential.name"])
	}
	if tok != "" {
		for _, n := range tokenNeedles(tok) {
			if strings.Contains(errField, n) {
				t.Errorf("%s: SECRET LEAK: the audit error field contains the token", what)
				break
			}
		}
	}
	return line
}

// ---- tests

// TestOIDCGitHubTokens: GitHub-Actions-shaped tokens through every client
// form (curl with the token as the proxy URL password, by flag and by
// HTTPS_PROXY; Go's net/http with the proxy URL and with a Bearer
// ProxyConnectHeader; raw CONNECT with Bearer and lower-case bearer). Each
// caller gets its repository's credential and never the other's; the audit
// line names sub and method oidc; keys are fetched once, not per request.
func TestOIDCGitHubTokens(t *testing.T) {
	t.Parallel()
	curl := requireTool(t, "curl")
	o := newOIDCWorld(t, false, false)
	waitReadyz(t, o.b, testTimeout)

	appSub, otherSub := "repo:acme/app:ref:refs/heads/main", "repo:acme/other:ref:refs/heads/main"
	type client struct {
		name string
		get  func(t *testing.T, tok, path string) (status int, requestID string)
	}
	clients := []client{
		{"curl --proxy http://token:JWT@", func(t *testing.T, tok, path string) (int, string) {
			pu := "http://token:" + tok + "@" + o.b.proxyAddr
			r := o.h.curlVia(curl, pu, false, o.target+path)
			if r.code != 0 {
				t.Errorf("curl exit %d: %s", r.code, redactCanary(r.stderrMsg))
			}
			return r.status, r.requestID
		}},
		{"curl HTTPS_PROXY=http://token:JWT@", func(t *testing.T, tok, path string) (int, string) {
			pu := "http://token:" + tok + "@" + o.b.proxyAddr
			r := o.h.curlVia(curl, pu, true, o.target+path)
			if r.code != 0 {
				t.Errorf("curl exit %d: %s", r.code, redactCanary(r.stderrMsg))
			}
			return r.status, r.requestID
		}},
		{"go proxy URL userinfo", func(t *testing.T, tok, path string) (int, string) {
			resp, _ := o.goGet(o.tokenClient(tok, true), path)
			return resp.StatusCode, resp.Header.Get("X-Keygate-Request-Id")
		}},
		{"go ProxyConnectHeader Bearer", func(t *testing.T, tok, path string) (int, string) {
			resp, _ := o.goGet(o.tokenClient(tok, false), path)
			return resp.StatusCode, resp.Header.Get("X-Keygate-Request-Id")
		}},
		{"raw CONNECT Bearer", func(t *testing.T, tok, path string) (int, string) {
			resp, _ := o.rawGet(path, []string{bearerLine(tok)})
			return resp.StatusCode, resp.Header.Get("X-Keygate-Request-Id")
		}},
		{"raw CONNECT lower-case bearer", func(t *testing.T, tok, path string) (int, string) {
			resp, _ := o.rawGet(path, []string{"proxy-authorization: bearer " + tok})
			return resp.StatusCode, resp.Header.Get("X-Keygate-Request-Id")
		}},
	}
	for i, c := range clients {
		t.Run(c.name, func(t *testing.T) {
			for _, tc := range []struct {
				repo, sub, rule, cred, want, notWant string
			}{
				{"acme/app", appSub, "acme-app", "app-token", o.app, o.other},
				{"acme/other", otherSub, "acme-other", "other-token", o.other, o.app},
			} {
				tok := o.is.mint(o.is.githubClaims(tc.repo))
				path := fmt.Sprintf("/c%d/%s", i, strings.ReplaceAll(tc.repo, "/", "-"))
				status, rid := c.get(t, tok, path)
				if status != http.StatusOK {
					t.Errorf("%s: status %d, want 200", tc.repo, status)
					continue
				}
				expectOneInjected(t, o.up, path, tc.want, tc.notWant)
				if rid == "" {
					t.Errorf("%s: no X-Keygate-Request-Id", tc.repo)
					continue
				}
				line := o.b.auditLine(t, rid)
				for k, v := range map[string]any{"workload.id": tc.sub, "workload.method": "oidc", "rule": tc.rule,
					"credential.name": tc.cred, "decision": "allow", "status": float64(200), "error": "", "path": path} {
					if line[k] != v {
						t.Errorf("%s: audit %s = %#v, want %#v", tc.repo, k, line[k], v)
					}
				}
			}
		})
	}

	// Inside a tunnel attested as acme/other, a Proxy-Authorization with
	// acme/app's token on the inner request changes nothing: the identity
	// is the CONNECT's, and the header is not forwarded.
	t.Run("inner Proxy-Authorization cannot switch identity", func(t *testing.T) {
		otherTok := o.is.mint(o.is.githubClaims("acme/other"))
		appTok := o.is.mint(o.is.githubClaims("acme/app"))
		resp, _ := o.rawGet("/switch", []string{bearerLine(otherTok)}, bearerLine(appTok))
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d, want 200", resp.StatusCode)
		}
		expectOneInjected(t, o.up, "/switch", o.other, o.app)
	})

	// Keys are cached: one discovery, one JWKS fetch for all of the above.
	if d, j := o.is.discoveryFetches.Load(), o.is.jwksFetches.Load(); d != 1 || j != 1 {
		t.Errorf("issuer saw %d discovery and %d JWKS fetches, want 1 and 1 (keys must be cached)", d, j)
	}
}

// TestOIDCRejectedTokens (issue 3 "Bad input"): every bad token or garbled
// Proxy-Authorization is answered 407 with Proxy-Authenticate, nothing
// reaches the upstream (not even a TCP connection), and the audit line's
// error gives the reason without the token. Tokens with a kid the issuer
// never published do not make the broker hammer the issuer.
func TestOIDCRejectedTokens(t *testing.T) {
	t.Parallel()
	curl := requireTool(t, "curl")
	o := newOIDCWorld(t, false, false)
	waitReadyz(t, o.b, testTimeout)
	is := o.is
	good := is.githubClaims("acme/app")
	now := time.Now()
	ourKey := is.key()
	attacker := newRSAKey(t, "attacker-key")

	// The classic RS256→HS256 confusion: HMAC keyed with the issuer's
	// public key, which anyone can download.
	pubDER, err := x509.MarshalPKIXPublicKey(ourKey.priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	hs256 := func(in []byte) []byte { m := hmac.New(sha256.New, pubPEM); m.Write(in); return m.Sum(nil) }

	corrupt := func(tok string) string {
		i := strings.LastIndexByte(tok, '.')
		sig, _ := base64.RawURLEncoding.DecodeString(tok[i+1:])
		sig[len(sig)/2] ^= 0x55
		return tok[:i+1] + base64.RawURLEncoding.EncodeToString(sig)
	}
	w := o.w
	valid := is.mint(good)

	cases := []struct {
		name   string
		lines  []string // CONNECT header lines
		tok    string   // the token in them, for the leak check
		reason string   // substring of the audit error
		// oidcFailure: counted in keygate_attestation_failures_total{method="oidc"}
		// (evidence for this attestor was rejected, not absent).
		oidcFailure bool
	}{
		{name: "expired", tok: is.mint(withClaims(good, map[string]any{"iat": now.Add(-time.Hour).Unix(), "nbf": now.Add(-time.Hour).Unix(), "exp": now.Add(-10 * time.Minute).Unix()})), reason: "token expired", oidcFailure: true},
		{name: "not yet valid", tok: is.mint(withClaims(good, map[string]any{"nbf": now.Add(10 * time.Minute).Unix()})), reason: "not yet valid", oidcFailure: true},
		{name: "issued in the future", tok: is.mint(withClaims(good, map[string]any{"iat": now.Add(10 * time.Minute).Unix()})), reason: "issued in the future", oidcFailure: true},
		{name: "no exp", tok: is.mint(withClaims(good, map[string]any{"exp": nil})), reason: "no exp", oidcFailure: true},
		{name: "wrong audience", tok: is.mint(withClaims(good, map[string]any{"aud": "sts.amazonaws.com"})), reason: "audience not accepted", oidcFailure: true},
		{name: "audience list without keygate", tok: is.mint(withClaims(good, map[string]any{"aud": []string{"a", "b"}})), reason: "audience not accepted", oidcFailure: true},
		{name: "no sub", tok: is.mint(withClaims(good, map[string]any{"sub": ""})), reason: "no sub", oidcFailure: true},
		{name: "wrong issuer: another key, our kid", tok: w.token(attacker.sign(t, ourKey.kid, good)), reason: "signature does not verify", oidcFailure: true},
		{name: "wrong issuer: another key, its own kid", tok: w.token(attacker.sign(t, attacker.kid, good)), reason: "unknown key id", oidcFailure: true},
		{name: "wrong issuer: another key, no kid", tok: w.token(attacker.sign(t, "", good)), reason: "signature does not verify", oidcFailure: true},
		{name: "unknown kid", tok: w.token(newECKey(t, "never-published").sign(t, "never-published", good)), reason: "unknown key id", oidcFailure: true},
		{name: "alg none", tok: w.token(unsignedJWT(t, map[string]any{"alg": "none", "typ": "JWT"}, good, nil)), reason: "algorithm not allowed", oidcFailure: true},
		{name: "alg none with our kid", tok: w.token(unsignedJWT(t, map[string]any{"alg": "none", "typ": "JWT", "kid": ourKey.kid}, good, nil)), reason: "algorithm not allowed", oidcFailure: true},
		{name: "HS256 keyed with the public key", tok: w.token(unsignedJWT(t, map[string]any{"alg": "HS256", "typ": "JWT", "kid": ourKey.kid}, good, hs256)), reason: "algorithm not allowed", oidcFailure: true},
		{name: "corrupted signature", tok: w.token(corrupt(is.mint(good))), reason: "signature does not verify", oidcFailure: true},
		{name: "signature stripped", tok: w.token(valid[:strings.LastIndexByte(valid, '.')+1]), reason: "signature does not verify", oidcFailure: true},
		// Garbled Proxy-Authorization values.
		{name: "Bearer without a token", lines: []string{"Proxy-Authorization: Bearer"}, reason: "no credentials after the scheme", oidcFailure: true},
		{name: "Basic not base64", lines: []string{"Proxy-Authorization: Basic %%%not-base64%%%"}, reason: "not base64", oidcFailure: true},
		{name: "Basic without colon", lines: []string{"Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte("tokenonly"))}, reason: "no colon", oidcFailure: true},
		{name: "Basic empty password", lines: []string{basicLine("token", "")}, reason: "empty token", oidcFailure: true},
		{name: "unsupported scheme", lines: []string{"Proxy-Authorization: Negotiate YIIGhgYJKoZIhvcSAQICAQBuggZ1MIIGcaADAgEFoQMCAQ6iBwMF"}, reason: "unsupported scheme", oidcFailure: true},
		{name: "two Proxy-Authorization headers", lines: []string{bearerLine(valid), bearerLine(valid)}, tok: valid, reason: "space or control character", oidcFailure: true},
		// Not evidence for this attestor, and no other attestor applies.
		{name: "no Proxy-Authorization", lines: []string{}, reason: "could not be attested"},
		{name: "Bearer that is not a JWT", lines: []string{"Proxy-Authorization: Bearer opaque-token-0123456789"}, reason: "could not be attested"},
		{name: "token of a foreign issuer", tok: w.token(attacker.sign(t, attacker.kid, withClaims(good, map[string]any{"iss": "https://token.actions.githubusercontent.com"}))), reason: "could not be attested"},
	}
	failuresBefore := attestFailures(t, o.b, "oidc")
	jwksBefore := is.jwksFetches.Load()
	wantFailures := 0
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			lines := tc.lines
			if lines == nil {
				lines = []string{bearerLine(tc.tok)}
			}
			if tc.oidcFailure {
				wantFailures++
			}
			resp, body := o.rawGet("/must-not-arrive", lines)
			line := expect407(t, o.b, tc.name, resp, body, tc.reason, tc.tok)
			if m := line["workload.method"]; line != nil && m != "" && !(m == "anonymous" && !tc.oidcFailure) {
				t.Errorf("audit workload.method = %v for a rejected caller", m)
			}
		})
	}

	// curl with a token as the proxy URL password: the same refusal at
	// CONNECT; curl reports it and sends nothing on.
	t.Run("curl proxy URL with an expired token", func(t *testing.T) {
		expired := is.mint(withClaims(good, map[string]any{"exp": now.Add(-10 * time.Minute).Unix()}))
		r := o.h.curlVia(curl, "http://token:"+expired+"@"+o.b.proxyAddr, false, o.target+"/must-not-arrive")
		if r.code == 0 || r.connect != http.StatusProxyAuthRequired {
			t.Errorf("curl exit %d, CONNECT answer %d; want a failure with 407", r.code, r.connect)
		}
		wantFailures++
	})

	if got := attestFailures(t, o.b, "oidc") - failuresBefore; got != wantFailures {
		t.Errorf("keygate_attestation_failures_total{method=\"oidc\"} rose by %d, want %d", got, wantFailures)
	}
	// The unknown kids may cost at most one JWKS refresh (rate limit).
	if n := is.jwksFetches.Load() - jwksBefore; n > 1 {
		t.Errorf("unknown kids caused %d JWKS fetches, want at most 1", n)
	}
	o.up.expectNone(t, true)
}

// TestOIDCWithCIDRFallback: with a cidr attestor after the oidc one, a caller
// without a token, or whose token is not for this issuer, is attested by
// network position (weak) and gets only the weak rule's credential; a token
// for this issuer that fails verification is refused with 407 and never
// falls through to the weaker method (DESIGN.md §2 chain semantics).
func TestOIDCWithCIDRFallback(t *testing.T) {
	t.Parallel()
	o := newOIDCWorld(t, true, false)
	waitReadyz(t, o.b, testTimeout)
	good := o.is.githubClaims("acme/app")
	foreign := newECKey(t, "foreign")

	cases := []struct {
		name   string
		lines  []string
		status int
		method string // audit workload.method
		cred   string // credential the upstream must see
		reason string // for 407
	}{
		{name: "no token", lines: nil, status: 200, method: "cidr", cred: o.weak},
		{name: "valid token", lines: []string{bearerLine(o.is.mint(good))}, status: 200, method: "oidc", cred: o.app},
		{name: "valid token as proxy URL password", lines: []string{basicLine("token", o.is.mint(good))}, status: 200, method: "oidc", cred: o.app},
		{name: "expired token", lines: []string{bearerLine(o.is.mint(withClaims(good, map[string]any{"exp": time.Now().Add(-time.Hour).Unix()})))}, status: 407, reason: "token expired"},
		{name: "wrong audience", lines: []string{bearerLine(o.is.mint(withClaims(good, map[string]any{"aud": "other"})))}, status: 407, reason: "audience not accepted"},
		{name: "forged signature", lines: []string{bearerLine(o.w.token(foreign.sign(t, o.is.key().kid, good)))}, status: 407, reason: "signature does not verify"},
		{name: "alg none", lines: []string{bearerLine(o.w.token(unsignedJWT(t, map[string]any{"alg": "none"}, good, nil)))}, status: 407, reason: "algorithm not allowed"},
		{name: "garbled header", lines: []string{"Proxy-Authorization: Basic ###"}, status: 407, reason: "not base64"},
		// Documented routing (internal/attest/oidc.go): a value that is not
		// a JWT, or a JWT naming another issuer, is not evidence for this
		// attestor, so the next one decides. The caller gains nothing it
		// would not have had without the header.
		{name: "foreign issuer token", lines: []string{bearerLine(o.w.token(foreign.sign(t, "foreign", withClaims(good, map[string]any{"iss": "https://issuer.invalid"}))))}, status: 200, method: "cidr", cred: o.weak},
		{name: "opaque bearer", lines: []string{"Proxy-Authorization: Bearer opaque-0123456789abcdef"}, status: 200, method: "cidr", cred: o.weak},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := fmt.Sprintf("/case%d", i)
			resp, body := o.rawGet(path, tc.lines)
			if tc.status == http.StatusProxyAuthRequired {
				expect407(t, o.b, tc.name, resp, body, tc.reason, "")
				if n := len(authFor(o.up, path)); n != 0 {
					t.Errorf("upstream received %d requests", n)
				}
				return
			}
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d (%s)", resp.StatusCode, tc.status, body)
			}
			others := []string{o.app, o.other, o.weak}
			expectOneInjected(t, o.up, path, tc.cred, others...)
			line := o.b.auditLine(t, resp.Header.Get("X-Keygate-Request-Id"))
			if line["workload.method"] != tc.method {
				t.Errorf("audit workload.method = %v, want %s", line["workload.method"], tc.method)
			}
		})
	}
}

// TestOIDCKeyRotation: the issuer publishes a new key and withdraws the old
// one; tokens signed with the new key are accepted without restarting the
// broker (after at most the 10 s refresh rate limit), and once the broker has
// refreshed, tokens signed with the withdrawn key are refused.
func TestOIDCKeyRotation(t *testing.T) {
	t.Parallel()
	o := newOIDCWorld(t, false, false)
	waitReadyz(t, o.b, testTimeout)
	pid := o.b.cmd.Process.Pid

	oldTok := o.is.mint(o.is.githubClaims("acme/app"))
	if resp, _ := o.rawGet("/before", []string{bearerLine(oldTok)}); resp.StatusCode != http.StatusOK {
		t.Fatalf("before rotation: status %d, want 200", resp.StatusCode)
	}

	o.is.rotate(newECKey(t, "gh-key-2"))
	newTok := o.is.mint(o.is.githubClaims("acme/app"))
	// The broker refreshes on an unknown kid, at most once per 10 s.
	deadline := time.Now().Add(15 * time.Second)
	var status, tries int
	for time.Now().Before(deadline) {
		tries++
		resp, _ := o.rawGet(fmt.Sprintf("/after-%d", tries), []string{bearerLine(newTok)})
		if status = resp.StatusCode; status == http.StatusOK {
			break
		}
		if status != http.StatusProxyAuthRequired {
			t.Fatalf("new-key token: status %d while waiting for the refresh, want 407 or 200", status)
		}
		time.Sleep(250 * time.Millisecond)
	}
	if status != http.StatusOK {
		t.Fatalf("a token signed with the rotated-in key is still refused after 15 s")
	}
	expectOneInjected(t, o.up, fmt.Sprintf("/after-%d", tries), o.app)
	if o.b.exited() || o.b.cmd.Process.Pid != pid {
		t.Fatalf("the broker restarted")
	}

	// The withdrawn key is no longer trusted.
	resp, body := o.rawGet("/old-key", []string{bearerLine(oldTok)})
	expect407(t, o.b, "token signed with the withdrawn key", resp, body, "unknown key id", oldTok)
	if n := o.is.jwksFetches.Load(); n != 2 {
		t.Errorf("issuer saw %d JWKS fetches, want 2 (start and one refresh)", n)
	}
}

// TestOIDCIssuerDownAtStart (issue 3 "Bad input"): a broker started while
// its issuer is unreachable serves /healthz but not /readyz, and refuses
// token callers (503 attestation_unavailable, Retry-After) and callers
// without a token (407); nothing is forwarded. When the issuer comes up on
// the same address, the broker becomes ready by itself within seconds and
// the same token is accepted.
func TestOIDCIssuerDownAtStart(t *testing.T) {
	t.Parallel()
	o := newOIDCWorld(t, false, true)
	tok := o.is.mint(o.is.githubClaims("acme/app"))

	for i := 0; i < 3; i++ {
		if code, _ := adminGet(t, o.b, "/readyz"); code != http.StatusServiceUnavailable {
			t.Fatalf("/readyz = %d with the issuer down, want 503", code)
		}
		time.Sleep(100 * time.Millisecond)
	}
	resp, body := o.rawGet("/down", []string{bearerLine(tok)})
	expectRefusal(t, "token while the issuer is down", resp, body, http.StatusServiceUnavailable, "attestation_unavailable")
	if resp.Header.Get("Retry-After") == "" {
		t.Errorf("503 without Retry-After")
	}
	if line := o.b.auditLine(t, resp.Header.Get("X-Keygate-Request-Id")); !strings.Contains(fmt.Sprint(line["error"]), "issuer unavailable") {
		t.Errorf("audit error %q, want it to say the issuer is unavailable", line["error"])
	}
	resp, body = o.rawGet("/down-anon", nil)
	expect407(t, o.b, "no token while the issuer is down", resp, body, "could not be attested", "")
	o.up.expectNone(t, true)

	o.is.up()
	took := waitReadyz(t, o.b, 15*time.Second)
	t.Logf("ready %v after the issuer came up", took.Round(100*time.Millisecond))
	resp, _ = o.rawGet("/up", []string{bearerLine(tok)})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("after the issuer came up: status %d, want 200", resp.StatusCode)
	}
	expectOneInjected(t, o.up, "/up", o.app, o.other)
}

// oidcTwoIssuersConfig chains two oidc attestors (GitHub-shaped and
// Kubernetes-shaped issuers). Rules pin the issuer with
// workload.trust_domain, so a claim one issuer's tokens carry cannot be
// forged by the other issuer.
const oidcTwoIssuersConfig = `
listen:
  proxy: {{.Proxy}}
  admin: {{.Admin}}
ca:
  cert: {{.CACert}}
  key: {{.CAKey}}
attestors:
  - {type: oidc, name: github, issuer: "http://127.0.0.1:{{index .Ports "github"}}", audiences: [keygate], algorithms: [RS256, ES256]}
  - {type: oidc, name: kubernetes, issuer: "http://127.0.0.1:{{index .Ports "k8s"}}", audiences: [keygate, other-aud]}
egress:
  allow_cidrs: [127.0.0.1/32]
  ca_bundle: {{.Bundle}}
credentials:
  app-token: {source: static, value: env:KG_E2E_APP_TOKEN}
  k8s-token: {source: static, value: env:KG_E2E_K8S_TOKEN}
rules:
  - name: acme-app
    hosts: [localhost]
    ports: [{{index .Ports "upstream"}}]
    when: 'workload.method == "oidc" && workload.trust_domain == "http://127.0.0.1:{{index .Ports "github"}}" && workload.claims.repository == "acme/app"'
    inject: {credential: app-token, as: bearer}
  - name: payments-api
    hosts: [localhost]
    ports: [{{index .Ports "upstream"}}]
    when: >-
      workload.method == "oidc" && workload.trust_domain == "http://127.0.0.1:{{index .Ports "k8s"}}" &&
      workload.claims["kubernetes.io"].namespace == "payments" &&
      workload.claims["kubernetes.io"].serviceaccount.name == "api"
    inject: {credential: k8s-token, as: bearer}
`

// TestOIDCTwoIssuers: a GitHub-shaped and a Kubernetes-SA-shaped issuer in
// one chain. Each token is routed to its issuer's attestor; a Kubernetes
// token carrying a GitHub claim does not get the GitHub rule's credential;
// a token claiming the GitHub issuer but signed with the (also trusted)
// Kubernetes issuer's key is refused.
func TestOIDCTwoIssuers(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	w := newSecretWatch(h)
	gh := newTestIssuer(t, w)
	k8s := newStoppedIssuer(t, w, freeAddr(t))
	k8s.rotate(newECKey(t, "k8s-sa-key"))
	k8s.up()
	up := w.upstream(newUpstream(t, "api", nil))
	app, kc := w.credential(), w.credential()
	b := h.start(brokerSpec{name: "two-issuers", config: oidcTwoIssuersConfig,
		env: []string{oidcAppEnv + "=" + app, oidcK8sEnv + "=" + kc}},
		map[string]int{"github": gh.port(), "k8s": k8s.port(), "upstream": up.port()})
	o := &oidcWorld{h: h, w: w, is: gh, up: up, b: b, target: fmt.Sprintf("https://localhost:%d", up.port())}
	waitReadyz(t, b, testTimeout)

	forgedRepo := withClaims(k8s.k8sClaims("dev", "builder"), map[string]any{"repository": "acme/app"})
	cases := []struct {
		name   string
		tok    string
		status int
		sub    string
		cred   string
		reason string
	}{
		{name: "github token", tok: gh.mint(gh.githubClaims("acme/app")), status: 200, sub: "repo:acme/app:ref:refs/heads/main", cred: app},
		{name: "kubernetes token", tok: k8s.mint(k8s.k8sClaims("payments", "api")), status: 200, sub: "system:serviceaccount:payments:api", cred: kc},
		{name: "kubernetes token, other namespace", tok: k8s.mint(k8s.k8sClaims("dev", "api")), status: 403},
		{name: "kubernetes token with a repository claim", tok: k8s.mint(forgedRepo), status: 403},
		{name: "github iss, kubernetes key and kid", tok: w.token(k8s.key().sign(t, k8s.key().kid, gh.githubClaims("acme/app"))), status: 407, reason: "unknown key id"},
		{name: "github iss, kubernetes key, github kid", tok: w.token(k8s.key().sign(t, gh.key().kid, gh.githubClaims("acme/app"))), status: 407, reason: "signature does not verify"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := fmt.Sprintf("/case%d", i)
			resp, body := o.rawGet(path, []string{bearerLine(tc.tok)})
			switch tc.status {
			case http.StatusProxyAuthRequired:
				expect407(t, b, tc.name, resp, body, tc.reason, tc.tok)
			case http.StatusForbidden:
				expectRefusal(t, tc.name, resp, body, http.StatusForbidden, "denied")
				line := b.auditLine(t, resp.Header.Get("X-Keygate-Request-Id"))
				if line["workload.method"] != "oidc" || line["credential.name"] != "" {
					t.Errorf("audit: method %v credential %v, want oidc and none", line["workload.method"], line["credential.name"])
				}
			default:
				if resp.StatusCode != tc.status {
					t.Fatalf("status %d, want %d (%s)", resp.StatusCode, tc.status, body)
				}
				expectOneInjected(t, up, path, tc.cred, app, kc)
				line := b.auditLine(t, resp.Header.Get("X-Keygate-Request-Id"))
				if line["workload.id"] != tc.sub || line["workload.method"] != "oidc" {
					t.Errorf("audit workload %v/%v, want %s/oidc", line["workload.id"], line["workload.method"], tc.sub)
				}
			}
			if tc.status != http.StatusOK {
				if n := len(authFor(up, path)); n != 0 {
					t.Errorf("upstream received %d requests", n)
				}
			}
		})
	}
	for name, is := range map[string]*testIssuer{"github": gh, "kubernetes": k8s} {
		if n := is.jwksFetches.Load(); n < 1 || n > 2 {
			t.Errorf("%s issuer: %d JWKS fetches, want 1 (or 2 after one unknown-kid refresh)", name, n)
		}
	}
}

// TestOIDCTokenExpiryInsideTunnel (SECURITY-TESTS.md T-F1): the token is
// verified at CONNECT, and every request inside the intercepted tunnel checks
// that it has not expired since; once it has (exp + skew), nothing more is
// forwarded on that tunnel: 407 and the connection is closed.
func TestOIDCTokenExpiryInsideTunnel(t *testing.T) {
	t.Parallel()
	o := newOIDCWorld(t, false, false)
	waitReadyz(t, o.b, testTimeout)
	// The broker allows 30 s of clock skew: this token is accepted for about
	// 5 s more.
	exp := time.Now().Add(-25 * time.Second)
	tok := o.is.mint(withClaims(o.is.githubClaims("acme/app"), map[string]any{"exp": exp.Unix()}))
	cr := o.h.connectWith(o.b, fmt.Sprintf("localhost:%d", o.up.port()), bearerLine(tok))
	if cr.conn == nil {
		t.Fatalf("CONNECT with a still-valid token: %s", cr.resp.Status)
	}
	tc, err := o.h.tlsClient(cr.conn, "localhost")
	if err != nil {
		t.Fatalf("TLS in the tunnel: %v", err)
	}
	get := func(path string) (int, error) {
		_ = tc.SetDeadline(time.Now().Add(testTimeout))
		if _, err := fmt.Fprintf(tc, "GET %s HTTP/1.1\r\nHost: localhost:%d\r\n\r\n", path, o.up.port()); err != nil {
			return 0, err
		}
		resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
		if err != nil {
			return 0, err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		o.h.recordResponse("GET "+path, resp, body)
		return resp.StatusCode, nil
	}
	if status, err := get("/while-valid"); err != nil || status != http.StatusOK {
		t.Fatalf("request while the token is valid: status %d, err %v; want 200", status, err)
	}
	expectOneInjected(t, o.up, "/while-valid", o.app)

	time.Sleep(time.Until(exp.Add(30*time.Second + 1500*time.Millisecond)))
	resp, body := o.rawGet("/fresh-connect", []string{bearerLine(tok)})
	expect407(t, o.b, "fresh CONNECT with the expired token", resp, body, "token expired", tok)

	status, err := get("/after-expiry")
	if n := len(authFor(o.up, "/after-expiry")); n != 0 || (err == nil && status == http.StatusOK) {
		t.Errorf("SECURITY: after the attesting token expired, a request on the same tunnel got status %d (err %v) "+
			"and the upstream received it %d time(s) with the credential injected; want it refused and nothing forwarded", status, err, n)
	}
}
