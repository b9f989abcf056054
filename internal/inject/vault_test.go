package inject

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/testservers"
)

// The Vault tests talk to a real Vault server (dev mode, started by
// internal/testservers from the binary scripts/vault.sh builds). Where a
// test needs Vault to misbehave in ways a real Vault cannot be made to (a
// redirect to another host, a 500, a garbage or oversized body), it puts a
// small httptest server in front of nothing and says so.

// vaultCounter records every request the broker's Vault client sends.
type vaultCounter struct {
	rt http.RoundTripper
	mu sync.Mutex
	n  map[string]int    // "METHOD /v1/path" -> count
	hd []http.Header     // headers of every request
	tk map[string]string // path -> last X-Vault-Token
}

func (c *vaultCounter) RoundTrip(r *http.Request) (*http.Response, error) {
	c.mu.Lock()
	if c.n == nil {
		c.n, c.tk = map[string]int{}, map[string]string{}
	}
	c.n[r.Method+" "+r.URL.Path]++
	c.hd = append(c.hd, r.Header.Clone())
	c.tk[r.URL.Path] = r.Header.Get("X-Vault-Token")
	c.mu.Unlock()
	return c.rt.RoundTrip(r)
}

// count sums the requests whose "METHOD /v1/path" starts with prefix.
func (c *vaultCounter) count(prefix string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for k, v := range c.n {
		if strings.HasPrefix(k, prefix) {
			n += v
		}
	}
	return n
}

func (c *vaultCounter) headers() []http.Header {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]http.Header(nil), c.hd...)
}

func (c *vaultCounter) reset() {
	c.mu.Lock()
	c.n, c.hd, c.tk = map[string]int{}, nil, map[string]string{}
	c.mu.Unlock()
}

// vaultLab is a running Vault with helpers to configure it as root.
type vaultLab struct {
	*testservers.Vault
	dir string
}

func newVaultLab(t testing.TB) *vaultLab {
	t.Helper()
	return &vaultLab{Vault: testservers.StartVault(t), dir: t.TempDir()}
}

// file writes content to a new file in the lab's directory.
func (l *vaultLab) file(t testing.TB, name, content string) string {
	t.Helper()
	p := filepath.Join(l.dir, name)
	if err := os.WriteFile(p, []byte(content+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// policyToken creates a policy and a token holding only it.
func (l *vaultLab) policyToken(t testing.TB, name, hcl string, extra map[string]any) string {
	t.Helper()
	l.Must("PUT", "sys/policies/acl/"+name, map[string]any{"policy": hcl})
	body := map[string]any{"policies": []string{name}, "no_default_policy": false}
	for k, v := range extra {
		body[k] = v
	}
	out := l.Must("POST", "auth/token/create", body)
	return out["auth"].(map[string]any)["client_token"].(string)
}

// put writes a KV v2 secret under secret/.
func (l *vaultLab) put(t testing.TB, path string, data map[string]any) {
	t.Helper()
	l.MustEventually("POST", "secret/data/"+path, map[string]any{"data": data})
}

// conn builds a connection to the lab, counting its requests.
func (l *vaultLab) conn(t testing.TB, o VaultOptions) (*Vault, *vaultCounter) {
	t.Helper()
	if o.Address == "" && !o.UseEnv {
		o.Address = l.Addr
	}
	return newVaultConn(t, o)
}

func newVaultConn(t testing.TB, o VaultOptions) (*Vault, *vaultCounter) {
	t.Helper()
	vc := &vaultCounter{}
	o.WrapTransport = func(rt http.RoundTripper) http.RoundTripper { vc.rt = rt; return vc }
	if o.Name == "" {
		o.Name = "legacy"
	}
	v, err := NewVault(o)
	if err != nil {
		t.Fatalf("NewVault: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = v.Close(ctx)
	})
	return v, vc
}

// rootConn is a connection logged in with the root token (token_file).
func (l *vaultLab) rootConn(t testing.TB) (*Vault, *vaultCounter) {
	t.Helper()
	return l.conn(t, VaultOptions{Auth: VaultAuth{Method: VaultAuthTokenFile, TokenFile: l.file(t, "root-token", l.RootToken)}})
}

func vaultErrCode(t testing.TB, err error, code string) *broker.Error {
	t.Helper()
	var be *broker.Error
	if !errors.As(err, &be) || be.Code != code {
		t.Fatalf("error %v, want *broker.Error code %s", err, code)
	}
	return be
}

var vaultCaller = broker.Identity{ID: "spiffe://example.org/ci/build", Method: broker.MethodSPIFFEX509, TrustDomain: "example.org"}

func kvSource(t testing.TB, v *Vault, o VaultKVOptions) broker.Source {
	t.Helper()
	s, err := NewVaultKV(v, "api-key", o)
	if err != nil {
		t.Fatalf("NewVaultKV: %v", err)
	}
	return s
}

// NewVault does no network I/O: `broker validate` builds sources offline.
func TestVaultConstructionIsOffline(t *testing.T) {
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { calls.Add(1) }))
	defer srv.Close()
	v, _ := newVaultConn(t, VaultOptions{Address: srv.URL, Auth: VaultAuth{Method: VaultAuthAppRole,
		RoleIDFile: "/nonexistent/role", SecretIDFile: "/nonexistent/secret"}})
	if _, err := NewVaultKV(v, "k", VaultKVOptions{Path: "secret/data/x", Field: "k"}); err != nil {
		t.Fatal(err)
	}
	if _, err := NewVaultDynamic(v, "d", VaultDynamicOptions{Path: "database/creds/ro"}); err != nil {
		t.Fatal(err)
	}
	if v.Ready() {
		t.Fatal("Ready before any login")
	}
	if n := calls.Load(); n != 0 {
		t.Fatalf("construction made %d requests", n)
	}
}

func TestVaultOptionsRejected(t *testing.T) {
	tok := VaultAuth{Method: VaultAuthTokenFile, TokenFile: "/t"}
	for name, o := range map[string]VaultOptions{
		"no address":          {Auth: tok},
		"http off loopback":   {Address: "http://vault.example:8200", Auth: tok},
		"userinfo":            {Address: "https://u:p@vault.example", Auth: tok},
		"path":                {Address: "https://vault.example/v1/secret", Auth: tok},
		"no auth":             {Address: "https://vault.example"},
		"unknown auth":        {Address: "https://vault.example", Auth: VaultAuth{Method: "userpass"}},
		"jwt without role":    {Address: "https://vault.example", Auth: VaultAuth{Method: VaultAuthJWT, Token: FileToken("/t")}},
		"jwt without token":   {Address: "https://vault.example", Auth: VaultAuth{Method: VaultAuthJWT, Role: "r"}},
		"approle half":        {Address: "https://vault.example", Auth: VaultAuth{Method: VaultAuthAppRole, RoleIDFile: "/r"}},
		"mount traversal":     {Address: "https://vault.example", Auth: VaultAuth{Method: VaultAuthAppRole, RoleIDFile: "/r", SecretIDFile: "/s", Mount: "../sys"}},
		"ca bundle not a PEM": {Address: "https://vault.example", Auth: tok, CABundle: "/dev/null"},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := NewVault(o); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}

// VAULT_* and proxy variables change nothing unless UseEnv says so.
func TestVaultIgnoresEnvironment(t *testing.T) {
	l := newVaultLab(t)
	c := canary(t)
	l.put(t, "app/key", map[string]any{"api_key": c})
	l.put(t, "other/key", map[string]any{"api_key": "other"})
	limited := l.policyToken(t, "app-only", `path "secret/data/app/*" { capabilities = ["read"] }`, nil)

	t.Setenv("VAULT_ADDR", "http://127.0.0.1:1")
	t.Setenv("VAULT_TOKEN", l.RootToken) // valid, and more powerful than the broker's own
	t.Setenv("VAULT_NAMESPACE", "evil")
	t.Setenv("VAULT_WRAP_TTL", "5m")
	t.Setenv("VAULT_HEADERS", `{"X-From-Env":"1"}`)
	t.Setenv("VAULT_SKIP_VERIFY", "true")
	t.Setenv("VAULT_MAX_RETRIES", "9")
	t.Setenv("HTTP_PROXY", "http://127.0.0.1:1")
	t.Setenv("HTTPS_PROXY", "http://127.0.0.1:1")

	t.Run("without use_env", func(t *testing.T) {
		v, vc := l.conn(t, VaultOptions{Auth: VaultAuth{Method: VaultAuthTokenFile, TokenFile: l.file(t, "limited", limited)}})
		cr, err := kvSource(t, v, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key"}).Credential(context.Background(), vaultCaller, broker.Grant{})
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		if got, _ := cr.Field(broker.FieldToken); got.Reveal() != c {
			t.Fatal("wrong value")
		}
		// The env's root token would read this; the broker's own cannot.
		_, err = kvSource(t, v, VaultKVOptions{Path: "secret/data/other/key", Field: "api_key"}).Credential(context.Background(), vaultCaller, broker.Grant{})
		if be := vaultErrCode(t, err, broker.CodeCredentialUnavailable); !strings.Contains(be.Message, "permission denied") {
			t.Fatalf("other path: %v", err)
		}
		for _, h := range vc.headers() {
			for _, k := range []string{"X-From-Env", "X-Vault-Namespace", "X-Vault-Wrap-Ttl"} {
				if h.Get(k) != "" {
					t.Fatalf("request carried %s from the environment", k)
				}
			}
			if h.Get("X-Vault-Token") == l.RootToken {
				t.Fatal("request carried VAULT_TOKEN")
			}
		}
		// No address from the environment either.
		if _, err := NewVault(VaultOptions{Auth: VaultAuth{Method: VaultAuthTokenFile, TokenFile: "/t"}}); err == nil {
			t.Fatal("NewVault took VAULT_ADDR")
		}
	})

	t.Run("use_env refuses VAULT_SKIP_VERIFY", func(t *testing.T) {
		_, err := NewVault(VaultOptions{UseEnv: true, Auth: VaultAuth{Method: VaultAuthTokenFile, TokenFile: "/t"}})
		if err == nil || !strings.Contains(err.Error(), "VAULT_SKIP_VERIFY") {
			t.Fatalf("err = %v", err)
		}
	})

	t.Run("use_env takes VAULT_ADDR, never VAULT_TOKEN", func(t *testing.T) {
		t.Setenv("VAULT_SKIP_VERIFY", "")
		t.Setenv("VAULT_NAMESPACE", "")
		t.Setenv("VAULT_ADDR", l.Addr)
		v, vc := l.conn(t, VaultOptions{UseEnv: true, Auth: VaultAuth{Method: VaultAuthTokenFile, TokenFile: l.file(t, "limited2", limited)}})
		if _, err := kvSource(t, v, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key"}).Credential(context.Background(), vaultCaller, broker.Grant{}); err != nil {
			t.Fatalf("read: %v", err)
		}
		_, err := kvSource(t, v, VaultKVOptions{Path: "secret/data/other/key", Field: "api_key"}).Credential(context.Background(), vaultCaller, broker.Grant{})
		vaultErrCode(t, err, broker.CodeCredentialUnavailable)
		for _, h := range vc.headers() {
			if h.Get("X-Vault-Token") == l.RootToken || h.Get("X-From-Env") != "" {
				t.Fatal("use_env let VAULT_TOKEN or VAULT_HEADERS through")
			}
		}
	})
}

// fakeVault is an httptest server standing in for a misbehaving Vault:
// a real Vault cannot be made to redirect to another host, answer 500 or
// send garbage. lookup-self answers like Vault so token_file logins work.
func fakeVault(t *testing.T, data http.HandlerFunc) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/auth/token/lookup-self":
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprint(w, `{"data":{"ttl":0,"renewable":false,"policies":["root"]}}`)
		case "/v1/sys/internal/ui/mounts/secret/data/app/key":
			fmt.Fprint(w, `{"data":{"path":"secret/","type":"kv","options":{"version":"2"}}}`)
		default:
			data(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// T-B2 / F-05: the token never follows a redirect to another host.
func TestVaultNoRedirectFollow(t *testing.T) {
	var seen, withToken atomic.Int64
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen.Add(1)
		if r.Header.Get("X-Vault-Token") != "" {
			withToken.Add(1)
		}
		fmt.Fprint(w, `{"data":{"data":{"api_key":"from-the-other-host"}}}`)
	}))
	defer other.Close()
	for _, code := range []int{301, 302, 307, 308} {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			srv := fakeVault(t, func(w http.ResponseWriter, r *http.Request) {
				http.Redirect(w, r, other.URL+r.URL.Path, code)
			})
			dir := t.TempDir()
			tf := filepath.Join(dir, "tok")
			tok := canary(t)
			os.WriteFile(tf, []byte(tok), 0o600)
			v, _ := newVaultConn(t, VaultOptions{Address: srv.URL, Auth: VaultAuth{Method: VaultAuthTokenFile, TokenFile: tf}})
			_, err := kvSource(t, v, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key"}).Credential(context.Background(), vaultCaller, broker.Grant{})
			be := vaultErrCode(t, err, broker.CodeCredentialUnavailable)
			if !strings.Contains(be.Message, "redirect") {
				t.Fatalf("message %q does not say redirect", be.Message)
			}
			assertNoCanary(t, tok, err)
			if n := withToken.Load(); n != 0 {
				t.Fatalf("the other host received %d requests with the token", n)
			}
			if n := seen.Load(); n != 0 {
				t.Fatalf("the other host received %d requests", n)
			}
		})
	}
	t.Run("login redirected", func(t *testing.T) {
		srv := fakeVault(t, func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, other.URL+r.URL.Path, http.StatusTemporaryRedirect)
		})
		dir := t.TempDir()
		secretID := canary(t)
		rf, sf := filepath.Join(dir, "role"), filepath.Join(dir, "secret")
		os.WriteFile(rf, []byte("role-id"), 0o600)
		os.WriteFile(sf, []byte(secretID), 0o600)
		v, _ := newVaultConn(t, VaultOptions{Address: srv.URL, Auth: VaultAuth{Method: VaultAuthAppRole, RoleIDFile: rf, SecretIDFile: sf}})
		_, err := kvSource(t, v, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key", KVVersion: 2}).Credential(context.Background(), vaultCaller, broker.Grant{})
		vaultErrCode(t, err, broker.CodeCredentialUnavailable)
		assertNoCanary(t, secretID, err)
		if n := seen.Load(); n != 0 {
			t.Fatalf("the other host received %d requests (the secret id would have travelled)", n)
		}
	})
}

// F-01..F-03 at the source: every failure is a 503 credential_unavailable
// (502 credential_malformed when Vault answered with garbage)
// within a bounded time, with at most two attempts per call, and no secret,
// token or response body in the error.
func TestVaultFaults(t *testing.T) {
	c := canary(t)
	tok := canary(t)
	dir := t.TempDir()
	tf := filepath.Join(dir, "tok")
	os.WriteFile(tf, []byte(tok), 0o600)

	fakes := map[string]http.HandlerFunc{
		// A 500 whose body quotes the request and a secret.
		"500": func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(500)
			fmt.Fprintf(w, `{"errors":["internal error reading %s: %s"]}`, r.URL.Path, c)
		},
		"503 sealed": func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(503)
			fmt.Fprintf(w, `{"errors":["Vault is sealed %s"]}`, c)
		},
		"garbage JSON": func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, `{"data": {"data": {"api_key": "%s"`, c)
		},
		"not JSON": func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%s <html>", c)
		},
		"oversized": func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, `{"data":{"data":{"api_key":"%s%s"}}}`, c, strings.Repeat("A", MaxVaultResponse))
		},
		"400 echoing the request": func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(400)
			fmt.Fprintf(w, `{"errors":["bad request with token %s"]}`, r.Header.Get("X-Vault-Token"))
		},
	}
	for name, h := range fakes {
		t.Run(name, func(t *testing.T) {
			var hits atomic.Int64
			srv := fakeVault(t, func(w http.ResponseWriter, r *http.Request) { hits.Add(1); h(w, r) })
			v, _ := newVaultConn(t, VaultOptions{Address: srv.URL, Auth: VaultAuth{Method: VaultAuthTokenFile, TokenFile: tf}})
			start := time.Now()
			_, err := kvSource(t, v, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key"}).Credential(context.Background(), vaultCaller, broker.Grant{})
			if d := time.Since(start); d > 2500*time.Millisecond {
				t.Fatalf("took %s", d)
			}
			want := broker.CodeCredentialUnavailable
			if name == "not JSON" || name == "oversized" {
				want = broker.CodeCredentialMalformed // Vault answered, with garbage (F-03)
			}
			be := vaultErrCode(t, err, want)
			assertNoCanary(t, c, err, be.Message)
			assertNoCanary(t, tok, err, be.Message)
			if n := hits.Load(); n > 2 {
				t.Fatalf("%d attempts, want at most 2", n)
			}
			t.Logf("%s -> %s", name, be.Message)
		})
	}

	t.Run("vault stopped, then back", func(t *testing.T) {
		l := newVaultLab(t)
		v, vc := l.rootConn(t)
		src := kvSource(t, v, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key"})
		l.put(t, "app/key", map[string]any{"api_key": c})
		if _, err := src.Credential(context.Background(), vaultCaller, broker.Grant{}); err != nil {
			t.Fatal(err)
		}
		l.Stop()
		vc.reset()
		start := time.Now()
		_, err := src.Credential(context.Background(), vaultCaller, broker.Grant{})
		if d := time.Since(start); d > 2500*time.Millisecond {
			t.Fatalf("took %s", d)
		}
		be := vaultErrCode(t, err, broker.CodeCredentialUnavailable)
		if !strings.Contains(be.Message, "unreachable") {
			t.Fatalf("message %q", be.Message)
		}
		if n := vc.count(""); n > 3 {
			t.Fatalf("%d connection attempts, want at most 3", n)
		}
		assertNoCanary(t, c, err)
		assertNoCanary(t, l.RootToken, err)
		// Vault returns (dev mode: empty again); the next request succeeds
		// without a new connection.
		l.Start()
		l.put(t, "app/key", map[string]any{"api_key": c})
		cr, err := src.Credential(context.Background(), vaultCaller, broker.Grant{})
		if err != nil {
			t.Fatalf("after Vault came back: %v", err)
		}
		if got, _ := cr.Field(broker.FieldToken); got.Reveal() != c {
			t.Fatal("wrong value after restart")
		}
	})

	t.Run("vault hangs", func(t *testing.T) {
		block := make(chan struct{})
		srv := fakeVault(t, func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-block:
			case <-r.Context().Done():
			}
		})
		defer close(block)
		v, _ := newVaultConn(t, VaultOptions{Address: srv.URL, Timeout: 500 * time.Millisecond,
			Auth: VaultAuth{Method: VaultAuthTokenFile, TokenFile: tf}})
		start := time.Now()
		_, err := kvSource(t, v, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key"}).Credential(context.Background(), vaultCaller, broker.Grant{})
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("took %s with a 500ms timeout", d)
		}
		be := vaultErrCode(t, err, broker.CodeCredentialUnavailable)
		if !strings.Contains(be.Message, "in time") {
			t.Fatalf("message %q", be.Message)
		}
	})
}

// signJWT signs claims with an RSA key (RS256).
func signJWT(t testing.TB, key *rsa.PrivateKey, claims map[string]any) string {
	t.Helper()
	return signJWTKid(t, key, "", claims)
}

// signJWTKid is signJWT with a kid header (none when kid is empty).
func signJWTKid(t testing.TB, key *rsa.PrivateKey, kid string, claims map[string]any) string {
	t.Helper()
	opts := (&jose.SignerOptions{}).WithType("JWT")
	if kid != "" {
		opts = opts.WithHeader("kid", kid)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: key}, opts)
	if err != nil {
		t.Fatal(err)
	}
	payload, _ := json.Marshal(claims)
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

// enableJWT mounts Vault's jwt auth method at mount, trusting a key the
// test generated (jwt_validation_pubkeys: real Vault code, no issuer
// needed), with a role "broker" granting policy.
func (l *vaultLab) enableJWT(t testing.TB, mount, policy string) *rsa.PrivateKey {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	pubPEM := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	l.Must("POST", "sys/auth/"+mount, map[string]any{"type": "jwt"})
	l.Must("POST", "auth/"+mount+"/config", map[string]any{"jwt_validation_pubkeys": []string{pubPEM}, "bound_issuer": "https://issuer.test"})
	l.Must("POST", "auth/"+mount+"/role/broker", map[string]any{
		"role_type": "jwt", "bound_audiences": []string{"vault"}, "user_claim": "sub",
		"bound_subject": "spiffe://example.org/keygate", "token_policies": []string{policy}, "token_ttl": "1h",
	})
	return key
}

func brokerJWT(t testing.TB, key *rsa.PrivateKey, aud string) string {
	now := time.Now()
	return signJWT(t, key, map[string]any{"iss": "https://issuer.test", "sub": "spiffe://example.org/keygate",
		"aud": aud, "iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(5 * time.Minute).Unix()})
}

const kvReadPolicy = `path "secret/data/app/*" { capabilities = ["read"] }`

// The broker logs in with its own signed JWT (no static token anywhere):
// jwt auth, and the kubernetes method's login shape.
func TestVaultJWTLogin(t *testing.T) {
	l := newVaultLab(t)
	c := canary(t)
	l.put(t, "app/key", map[string]any{"api_key": c})
	l.Must("PUT", "sys/policies/acl/kv-read", map[string]any{"policy": kvReadPolicy})

	for _, method := range []string{VaultAuthJWT, VaultAuthKubernetes} {
		t.Run(method, func(t *testing.T) {
			// Vault's kubernetes method verifies tokens with a Kubernetes
			// TokenReview, which needs a cluster; the jwt method mounted at
			// kubernetes/ takes the same login body ({role, jwt}), so the
			// broker's kubernetes login is exercised against real Vault code.
			key := l.enableJWT(t, method, "kv-read")
			jwtFile := l.file(t, method+".jwt", brokerJWT(t, key, "vault"))
			v, vc := l.conn(t, VaultOptions{Auth: VaultAuth{Method: method, Role: "broker", Token: FileToken(jwtFile)}})
			cr, err := kvSource(t, v, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key"}).Credential(context.Background(), vaultCaller, broker.Grant{})
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			if got, _ := cr.Field(broker.FieldToken); got.Reveal() != c {
				t.Fatal("wrong value")
			}
			if n := vc.count("PUT /v1/auth/" + method + "/login"); n != 1 {
				t.Fatalf("%d logins", n)
			}
			if !v.Ready() {
				t.Fatal("not Ready after login")
			}

			bad := brokerJWT(t, key, "not-vault")
			badFile := l.file(t, method+"-bad.jwt", bad)
			v2, _ := l.conn(t, VaultOptions{Auth: VaultAuth{Method: method, Role: "broker", Token: FileToken(badFile)}})
			_, err = kvSource(t, v2, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key"}).Credential(context.Background(), vaultCaller, broker.Grant{})
			be := vaultErrCode(t, err, broker.CodeCredentialUnavailable)
			if !strings.Contains(be.Message, "login with "+method+" failed") {
				t.Fatalf("message %q", be.Message)
			}
			assertNoCanary(t, bad, err)
			if v2.Ready() {
				t.Fatal("Ready without a token")
			}
		})
	}
}

// enableAppRole creates role "broker" and returns the role id and
// secret id files.
func (l *vaultLab) enableAppRole(t testing.TB, policy string, extra map[string]any) (roleFile, secretFile string) {
	t.Helper()
	if code, _, _ := l.Do("GET", "auth/approle/role", nil); code == 404 || code == 400 || code == 405 {
		l.Do("POST", "sys/auth/approle", map[string]any{"type": "approle"})
	}
	role := map[string]any{"token_policies": []string{policy}, "token_ttl": "1h", "secret_id_ttl": "1h"}
	for k, v := range extra {
		role[k] = v
	}
	l.Must("POST", "auth/approle/role/broker", role)
	roleID := l.Must("GET", "auth/approle/role/broker/role-id", nil)["data"].(map[string]any)["role_id"].(string)
	secretID := l.Must("POST", "auth/approle/role/broker/secret-id", nil)["data"].(map[string]any)["secret_id"].(string)
	canarytest.Register("vault approle secret-id", secretID) // Vault-issued: swept too
	return l.file(t, "role-id", roleID), l.file(t, "secret-id", secretID)
}

func TestVaultAppRoleLogin(t *testing.T) {
	l := newVaultLab(t)
	c := canary(t)
	l.put(t, "app/key", map[string]any{"api_key": c})
	l.Must("PUT", "sys/policies/acl/kv-read", map[string]any{"policy": kvReadPolicy})
	rf, sf := l.enableAppRole(t, "kv-read", nil)
	v, vc := l.conn(t, VaultOptions{Auth: VaultAuth{Method: VaultAuthAppRole, RoleIDFile: rf, SecretIDFile: sf}})
	if v.Ready() {
		t.Fatal("Ready before login")
	}
	cr, err := kvSource(t, v, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key"}).Credential(context.Background(), vaultCaller, broker.Grant{})
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if got, _ := cr.Field(broker.FieldToken); got.Reveal() != c {
		t.Fatal("wrong value")
	}
	if n := vc.count("PUT /v1/auth/approle/login"); n != 1 {
		t.Fatalf("%d logins", n)
	}
	if !v.Ready() {
		t.Fatal("not Ready")
	}

	// Close revokes the broker's own token (and with it its leases).
	tok := v.client.Token()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := v.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if code, _, _ := l.Do("GET", "auth/token/lookup-self", nil, tok); code != 403 {
		t.Fatalf("the broker's token still works after Close (HTTP %d)", code)
	}
	if v.Ready() {
		t.Fatal("Ready after Close")
	}
}

// Start logs in in the background so /readyz turns ready before traffic.
func TestVaultStartReady(t *testing.T) {
	l := newVaultLab(t)
	l.Must("PUT", "sys/policies/acl/kv-read", map[string]any{"policy": kvReadPolicy})
	rf, sf := l.enableAppRole(t, "kv-read", nil)
	v, _ := l.conn(t, VaultOptions{Auth: VaultAuth{Method: VaultAuthAppRole, RoleIDFile: rf, SecretIDFile: sf}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	v.Start(ctx)
	deadline := time.Now().Add(10 * time.Second)
	for !v.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("not Ready 10s after Start")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// F-04: a 403 (token revoked behind the broker's back) re-authenticates
// once and retries once; if the re-login fails too, 503 and no loop.
func TestVaultReauthOn403(t *testing.T) {
	l := newVaultLab(t)
	c := canary(t)
	l.put(t, "app/key", map[string]any{"api_key": c})
	l.Must("PUT", "sys/policies/acl/kv-read", map[string]any{"policy": kvReadPolicy})
	rf, sf := l.enableAppRole(t, "kv-read", nil)
	v, vc := l.conn(t, VaultOptions{Auth: VaultAuth{Method: VaultAuthAppRole, RoleIDFile: rf, SecretIDFile: sf}})
	src := kvSource(t, v, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key", KVVersion: 2})
	read := func() error {
		_, err := src.Credential(context.Background(), vaultCaller, broker.Grant{})
		return err
	}
	if err := read(); err != nil {
		t.Fatal(err)
	}
	revoke := func() {
		l.Must("POST", "auth/token/revoke", map[string]any{"token": v.client.Token()})
	}

	t.Run("re-login succeeds", func(t *testing.T) {
		revoke()
		vc.reset()
		if err := read(); err != nil {
			t.Fatalf("read after revocation: %v", err)
		}
		if n := vc.count("PUT /v1/auth/approle/login"); n != 1 {
			t.Fatalf("%d logins, want 1", n)
		}
		if n := vc.count("GET /v1/secret/data/app/key"); n != 2 {
			t.Fatalf("%d reads, want 2 (403, then the retry)", n)
		}
	})

	t.Run("re-login fails", func(t *testing.T) {
		revoke()
		l.Must("DELETE", "auth/approle/role/broker", nil) // the secret id no longer logs in
		vc.reset()
		start := time.Now()
		err := read()
		be := vaultErrCode(t, err, broker.CodeCredentialUnavailable)
		if !strings.Contains(be.Message, "login with approle failed") {
			t.Fatalf("message %q", be.Message)
		}
		if time.Since(start) > 2500*time.Millisecond {
			t.Fatal("too slow")
		}
		if n := vc.count("PUT /v1/auth/approle/login"); n != 1 {
			t.Fatalf("%d logins, want exactly 1 (re-authenticate once, never loop)", n)
		}
		if n := vc.count("GET /v1/secret/data/app/key"); n != 1 {
			t.Fatalf("%d reads, want 1", n)
		}
		sid, _ := os.ReadFile(sf)
		assertNoCanary(t, strings.TrimSpace(string(sid)), err)
		assertNoCanary(t, c, err)
	})
}

// A renewable token is renewed by the lifetime watcher and, at its max
// TTL, replaced by a new login without a failed request.
func TestVaultTokenRenewal(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for a token's max TTL")
	}
	l := newVaultLab(t)
	c := canary(t)
	l.put(t, "app/key", map[string]any{"api_key": c})
	l.Must("PUT", "sys/policies/acl/kv-read", map[string]any{"policy": kvReadPolicy})
	rf, sf := l.enableAppRole(t, "kv-read", map[string]any{"token_ttl": "2s", "token_max_ttl": "4s"})
	v, vc := l.conn(t, VaultOptions{Auth: VaultAuth{Method: VaultAuthAppRole, RoleIDFile: rf, SecretIDFile: sf}})
	src := kvSource(t, v, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key", KVVersion: 2})
	if _, err := src.Credential(context.Background(), vaultCaller, broker.Grant{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for vc.count("PUT /v1/auth/approle/login") < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("no re-login at max TTL; renewals %d", vc.count("PUT /v1/auth/token/renew-self"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if vc.count("PUT /v1/auth/token/renew-self") == 0 {
		t.Fatal("the token was never renewed")
	}
	if _, err := src.Credential(context.Background(), vaultCaller, broker.Grant{}); err != nil {
		t.Fatalf("read with the new token: %v", err)
	}
	if n := vc.count("GET /v1/secret/data/app/key"); n != 2 {
		t.Fatalf("%d reads, want 2 (no 403 and retry)", n)
	}
	if !v.Ready() {
		t.Fatal("not Ready")
	}
}

// TLS to Vault is verified against the configured roots, never skipped; a
// failed verification is not retried and sends no token. (An httptest TLS
// server: the dev-mode Vault of the other tests serves plain http on
// loopback.)
func TestVaultTLS(t *testing.T) {
	var withToken atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Vault-Token") != "" {
			withToken.Add(1)
		}
		switch r.URL.Path {
		case "/v1/auth/token/lookup-self":
			fmt.Fprint(w, `{"data":{"ttl":0,"renewable":false}}`)
		default:
			fmt.Fprint(w, `{"data":{"data":{"api_key":"tls-ok"}}}`)
		}
	}))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshake is expected
	srv.StartTLS()
	defer srv.Close()
	dir := t.TempDir()
	tf := filepath.Join(dir, "tok")
	os.WriteFile(tf, []byte("s.token"), 0o600)
	caFile := filepath.Join(dir, "ca.pem")
	os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600)
	auth := VaultAuth{Method: VaultAuthTokenFile, TokenFile: tf}
	o := VaultKVOptions{Path: "secret/data/app/key", Field: "api_key", KVVersion: 2}

	t.Run("trusted via ca_bundle", func(t *testing.T) {
		v, _ := newVaultConn(t, VaultOptions{Address: srv.URL, CABundle: caFile, Auth: auth})
		cr, err := kvSource(t, v, o).Credential(context.Background(), vaultCaller, broker.Grant{})
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := cr.Field(broker.FieldToken); got.Reveal() != "tls-ok" {
			t.Fatal("wrong value")
		}
	})
	t.Run("untrusted certificate", func(t *testing.T) {
		t.Setenv("VAULT_SKIP_VERIFY", "true") // ignored
		t.Setenv("VAULT_CACERT", caFile)      // ignored
		withToken.Store(0)
		v, vc := newVaultConn(t, VaultOptions{Address: srv.URL, Auth: auth})
		_, err := kvSource(t, v, o).Credential(context.Background(), vaultCaller, broker.Grant{})
		be := vaultErrCode(t, err, broker.CodeCredentialUnavailable)
		if !strings.Contains(be.Message, "TLS certificate did not verify") {
			t.Fatalf("message %q", be.Message)
		}
		if n := vc.count(""); n != 1 {
			t.Fatalf("%d attempts, want 1 (no retry after a verification failure)", n)
		}
		if withToken.Load() != 0 {
			t.Fatal("the token reached an unverified server")
		}
	})
}

// The jwt login against Vault configured with a local OIDC issuer's
// discovery document (oidc_discovery_url), as a CI platform or a cluster
// issuer would be: Vault fetches the issuer's keys itself.
func TestVaultJWTLoginOIDCDiscovery(t *testing.T) {
	l := newVaultLab(t)
	c := canary(t)
	l.put(t, "app/key", map[string]any{"api_key": c})
	l.Must("PUT", "sys/policies/acl/kv-read", map[string]any{"policy": kvReadPolicy})
	is := newOIDCIssuer(t)
	l.Must("POST", "sys/auth/jwt-oidc", map[string]any{"type": "jwt"})
	l.Must("POST", "auth/jwt-oidc/config", map[string]any{"oidc_discovery_url": is.srv.URL, "bound_issuer": is.srv.URL})
	l.Must("POST", "auth/jwt-oidc/role/broker", map[string]any{
		"role_type": "jwt", "bound_audiences": []string{"vault"}, "user_claim": "sub",
		"bound_subject": "system:serviceaccount:keygate:broker", "token_policies": []string{"kv-read"}, "token_ttl": "1h",
	})
	now := time.Now()
	tok := is.mint(t, map[string]any{"iss": is.srv.URL, "sub": "system:serviceaccount:keygate:broker", "aud": "vault",
		"iat": now.Unix(), "exp": now.Add(5 * time.Minute).Unix()})
	v, vc := l.conn(t, VaultOptions{Auth: VaultAuth{Method: VaultAuthJWT, Mount: "jwt-oidc", Role: "broker",
		Token: FileToken(l.file(t, "oidc.jwt", tok))}})
	cr, err := kvSource(t, v, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key"}).Credential(context.Background(), vaultCaller, broker.Grant{})
	if err != nil {
		t.Fatalf("read after an OIDC-discovery jwt login: %v", err)
	}
	if got, _ := cr.Field(broker.FieldToken); got.Reveal() != c {
		t.Fatal("wrong value")
	}
	if n := vc.count("PUT /v1/auth/jwt-oidc/login"); n != 1 {
		t.Fatalf("%d logins, want 1", n)
	}
	// A token from another issuer's key is refused by Vault.
	forged := newOIDCIssuer(t).mint(t, map[string]any{"iss": is.srv.URL, "sub": "system:serviceaccount:keygate:broker",
		"aud": "vault", "iat": now.Unix(), "exp": now.Add(5 * time.Minute).Unix()})
	v2, _ := l.conn(t, VaultOptions{Auth: VaultAuth{Method: VaultAuthJWT, Mount: "jwt-oidc", Role: "broker",
		Token: FileToken(l.file(t, "forged.jwt", forged))}})
	_, err = kvSource(t, v2, VaultKVOptions{Path: "secret/data/app/key", Field: "api_key"}).Credential(context.Background(), vaultCaller, broker.Grant{})
	vaultErrCode(t, err, broker.CodeCredentialUnavailable)
	assertNoCanary(t, forged, err)
}
