package config

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/testservers"
)

// Config-level tests of the oauth2 and github_app sources: a broker built
// from a file, serving for real, against the real oidc-provider and the
// local GitHub App API stand-in (testservers/githubapp.go says why it is
// local), with the app's key read from a real Vault.

// fixedClock is a settable clock for a served broker.
type fixedClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fixedClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fixedClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// startWith is start with a clock (nil: the wall clock).
func startWith(t testing.TB, path string, clock broker.Clock) *started {
	t.Helper()
	c, err := LoadFile(path)
	if err != nil {
		t.Fatalf("LoadFile: %v", err)
	}
	log, logs := newBufferLogger()
	rt, err := build(t, c, BuildOptions{Logger: log, Clock: clock})
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &started{rt: rt, cancel: cancel, done: make(chan error, 1), logs: logs}
	go func() { s.done <- rt.Run(ctx) }()
	t.Cleanup(func() { s.stop(t) })
	return s
}

// resourceServer verifies the bearer token of every request against the
// provider and records the verified claims.
type resourceServer struct {
	mu     sync.Mutex
	claims []map[string]any
	tokens map[string]bool
	srv    *httptest.Server
}

func newResourceServer(t *testing.T, p *testservers.OIDCProvider) *resourceServer {
	verify := p.ResourceVerifier()
	rs := &resourceServer{tokens: map[string]bool{}}
	rs.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		auth := r.Header.Values("Authorization")
		tok, ok := "", len(auth) == 1
		if ok {
			tok, ok = strings.CutPrefix(auth[0], "Bearer ")
		}
		claims, err := verify(r.Context(), tok)
		if !ok || err != nil {
			http.Error(w, "invalid token", http.StatusUnauthorized)
			return
		}
		rs.mu.Lock()
		rs.claims = append(rs.claims, claims)
		rs.tokens[tok] = true
		rs.mu.Unlock()
		_, _ = fmt.Fprintf(w, "hello %v with %v\n", claims["client_id"], claims["scope"])
	}))
	t.Cleanup(rs.srv.Close)
	return rs
}

func (rs *resourceServer) seen() (int, int, map[string]any) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	var last map[string]any
	if len(rs.claims) > 0 {
		last = rs.claims[len(rs.claims)-1]
	}
	return len(rs.claims), len(rs.tokens), last
}

func TestOAuth2FromConfig(t *testing.T) {
	clientSecret := canarytest.New("config oauth client secret")
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	p := testservers.StartOIDCProvider(t, testservers.OIDCProviderOptions{Clients: []testservers.OIDCClient{
		{ID: "kg-reader", Secret: clientSecret, AuthMethod: "client_secret_basic"},
		{ID: "kg-jwt", AuthMethod: "private_key_jwt", JWKS: &jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), Algorithm: "ES256", Use: "sig"}}}},
	}})
	rs := newResourceServer(t, p)
	dir := t.TempDir()
	writeCertPEM(t, dir, "trust/upstream.pem", rs.srv.Certificate())
	writeFile(t, dir, "secrets/idp", clientSecret+"\n", 0o600)
	writeFile(t, dir, "secrets/client.pem", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})), 0o600)
	port := portOf(t, rs.srv.URL)
	cfg := fmt.Sprintf(`listen:
  proxy: 127.0.0.1:0
  admin: 127.0.0.1:0
ca: {ephemeral: true, cert_out: ca.pem}
attestors:
  - type: cidr
    identities: [{id: local, cidrs: [127.0.0.0/8]}]
egress:
  allow_cidrs: [127.0.0.1/32]
  ca_bundle: trust/upstream.pem
credentials:
  api-reader:
    source: oauth2
    token_url: %[1]s
    client_id: kg-reader
    client_secret: file:secrets/idp
    scopes: [read]
    cache: 1h
  api-jwt:
    source: oauth2
    token_url: %[1]s
    client_id: kg-jwt
    auth_method: private_key_jwt
    private_key: file:secrets/client.pem
    scopes_expr: 'request.method in ["GET", "HEAD"] ? ["read"] : ["read", "write"]'
    resource: https://api.example.test
    cache: 1h
rules:
  - name: reader
    hosts: [127.0.0.1]
    ports: [%[2]s]
    when: 'request.path.startsWith("/reader/")'
    inject: {credential: api-reader, as: bearer}
  - name: jwt-client
    hosts: [127.0.0.1]
    ports: [%[2]s]
    when: 'request.path.startsWith("/v1/")'
    inject: {credential: api-jwt, as: bearer}
`, p.TokenURL, port)
	path := writeFile(t, dir, "keygate.yaml", cfg, 0o644)
	if ps := loadAndBuild(t, path); ps != nil {
		t.Fatalf("broker validate: %v", ps)
	}
	clock := &fixedClock{t: time.Now()}
	s := startWith(t, path, clock)
	c := s.client(t)
	do := func(method, path string) (int, string, http.Header) {
		t.Helper()
		req, _ := http.NewRequest(method, rs.srv.URL+path, nil)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		mustNotContain(t, "response", string(b)+fmt.Sprint(resp.Header), clientSecret)
		return resp.StatusCode, string(b), resp.Header
	}

	if st, body, _ := do("GET", "/reader/items"); st != 200 || !strings.Contains(body, "hello kg-reader with read") {
		t.Fatalf("reader: %d %s", st, body)
	}
	if st, body, _ := do("GET", "/v1/items"); st != 200 || !strings.Contains(body, "hello kg-jwt with read") {
		t.Fatalf("private_key_jwt GET: %d %s\n%s", st, body, p.Log())
	}
	if st, body, _ := do("POST", "/v1/items"); st != 200 || !strings.Contains(body, "hello kg-jwt with read write") {
		t.Fatalf("private_key_jwt POST: %d %s", st, body)
	}
	for i := 0; i < 3; i++ {
		do("GET", "/v1/items")
		do("POST", "/v1/items")
	}
	reqs, toks, _ := rs.seen()
	if reqs != 9 || toks != 3 {
		t.Errorf("resource server: %d requests with %d distinct tokens, want 9 with 3 (reader, jwt read, jwt read write)", reqs, toks)
	}

	// Five minutes on (the tokens live 300 s, the cache margin is 30 s)
	// with the provider down: 503, and nothing reaches the resource server.
	p.Stop()
	clock.advance(5 * time.Minute)
	st, body, h := do("GET", "/v1/items")
	if st != http.StatusServiceUnavailable || h.Get("X-Keygate-Error") != broker.CodeCredentialUnavailable ||
		!strings.Contains(body, "token endpoint is unreachable") {
		t.Errorf("provider down, token expired: %d %s %v", st, body, h.Get("X-Keygate-Error"))
	}
	if n, _, _ := rs.seen(); n != reqs {
		t.Errorf("a request reached the resource server with a stale or no token")
	}
	p.Start()
	// (The reader: a client assertion signed on this test's advanced clock
	// would be refused by the provider, which runs on the real one.)
	if st, body, _ := do("GET", "/reader/items"); st != 200 {
		t.Errorf("after the provider is back: %d %s", st, body)
	}
	if _, toks2, _ := rs.seen(); toks2 != toks+1 {
		t.Errorf("after expiry: %d distinct tokens, want a new one (%d)", toks2, toks+1)
	}
	mustNotContain(t, "broker log", s.logs.String(), clientSecret)
	if !strings.Contains(s.logs.String(), `"credential.kind":"oauth2"`) {
		t.Errorf("audit lines do not name the oauth2 kind")
	}
}

func TestGitHubAppFromConfig(t *testing.T) {
	gh := testservers.NewGitHub(t, "424242",
		testservers.GitHubInstallation{ID: 5, Account: "acme", Repos: []string{"app", "lib"},
			Perms: map[string]string{"contents": "write", "metadata": "read"}})
	api := httptest.NewTLSServer(gh.Handler())
	defer api.Close()
	v := testservers.StartVault(t)
	v.Must("POST", "secret/data/github-app", map[string]any{"data": map[string]any{"private_key": string(gh.KeyPEM)}})

	dir := t.TempDir()
	writeCertPEM(t, dir, "trust/upstream.pem", api.Certificate())
	writeFile(t, dir, "vault-token", v.RootToken+"\n", 0o600)
	cfg := fmt.Sprintf(`listen:
  proxy: 127.0.0.1:0
  admin: 127.0.0.1:0
ca: {ephemeral: true, cert_out: ca.pem}
attestors:
  - type: cidr
    identities: [{id: local, cidrs: [127.0.0.0/8]}]
egress:
  allow_cidrs: [127.0.0.1/32]
  ca_bundle: trust/upstream.pem
vaults:
  legacy: {address: %[1]s, auth: {method: token_file, token_file: vault-token}}
credentials:
  app-key: {source: vault_kv, vault: legacy, path: secret/data/github-app, field: private_key, cache: 10m}
  gh:
    source: github_app
    app_id: 424242
    private_key: {credential: app-key}
    api_url: %[2]s
    repositories: '["acme/" + request.path.split("/")[3]]'
    permissions: 'request.method == "GET" ? {"metadata": "read"} : {"contents": "write"}'
    cache: 50m
rules:
  - name: github-api
    hosts: [127.0.0.1]
    ports: [%[3]s]
    when: 'request.path.startsWith("/repos/acme/")'
    inject: {credential: gh, as: bearer}
`, v.Addr, api.URL, portOf(t, api.URL))
	path := writeFile(t, dir, "keygate.yaml", cfg, 0o644)
	s := start(t, path)
	c := s.client(t)
	get := func(path string) (int, string, string) {
		t.Helper()
		resp, err := c.Get(api.URL + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), resp.Header.Get("X-Keygate-Error")
	}
	for i := 0; i < 3; i++ {
		if st, body, _ := get("/repos/acme/app"); st != 200 || !strings.Contains(body, `"full_name":"acme/app"`) {
			t.Fatalf("GET /repos/acme/app: %d %s\n%s", st, body, s.logs.String())
		}
	}
	if st, _, _ := get("/repos/acme/lib"); st != 200 {
		t.Errorf("GET /repos/acme/lib: %d", st)
	}
	issued := gh.Issued()
	if len(issued) != 2 {
		t.Fatalf("%d tokens minted, want 2 (one per repository, cached)", len(issued))
	}
	for _, it := range issued {
		if len(it.Repos) != 1 || fmt.Sprint(it.Perms) != "map[metadata:read]" {
			t.Errorf("token for %v %v, want one repository, metadata: read", it.Repos, it.Perms)
		}
		mustNotContain(t, "broker log", s.logs.String(), it.Token)
	}
	// Not installed there: 503 naming the reason; nothing forwarded.
	st, body, _ := get("/repos/acme/../nope")
	_ = body
	if st == 200 {
		t.Errorf("a path walking out of the repository was served")
	}
	gh.Fault = func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasSuffix(r.URL.Path, "/installation") {
			w.WriteHeader(http.StatusNotFound)
			_ = json.NewEncoder(w).Encode(map[string]string{"message": "Not Found"})
			return true
		}
		return false
	}
	st, body, code := get("/repos/acme/infra")
	if st != http.StatusServiceUnavailable || code != broker.CodeCredentialUnavailable || !strings.Contains(body, "GitHub App 424242 is not installed on acme/infra") {
		t.Errorf("not installed: %d %s %s", st, code, body)
	}
	mustNotContain(t, "broker log", s.logs.String(), "BEGIN RSA PRIVATE KEY")
	mustNotContain(t, "broker log", s.logs.String(), "ghs_")
}

func TestTokenSourcesValidate(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "keys/bad.pem", "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n", 0o600)
	writeFile(t, dir, "keys/not-pem", "hunter2\n", 0o600)
	cfg := minimalHead + `credentials:
  missing-secret: {source: oauth2, token_url: "https://idp.example/token", client_id: kg, client_secret: env:KG_TEST_NOT_SET}
  broken-key: {source: github_app, app_id: 1, private_key: file:keys/bad.pem, installation_id: 3}
  not-a-key: {source: oauth2, token_url: "https://idp.example/token", client_id: kg, auth_method: private_key_jwt, private_key: file:keys/not-pem}
  no-key-file: {source: github_app, app_id: 1, private_key: file:keys/none.pem, installation_id: 3}
`
	path := writeFile(t, dir, "keygate.yaml", cfg, 0o644)
	ps := loadAndBuild(t, path)
	want := []string{
		`8: credential "missing-secret": client_secret: env:KG_TEST_NOT_SET: environment variable is not set`,
		`9: credential "broken-key": private_key: private key does not parse as PKCS #1`,
		`10: credential "not-a-key": private_key: private key is not PEM`,
		`11: credential "no-key-file": private_key: file:`,
	}
	got := ps.Error()
	for _, w := range want {
		if !strings.Contains(got, w) {
			t.Errorf("missing %q in\n%s", w, got)
		}
	}
	if len(ps) != len(want) {
		t.Errorf("%d problems, want %d:\n%s", len(ps), len(want), got)
	}
	if strings.Contains(got, "hunter2") || strings.Contains(got, "AAAA") {
		t.Errorf("problems quote key material:\n%s", got)
	}
}
