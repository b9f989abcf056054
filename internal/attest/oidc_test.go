package attest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/testservers"
)

// The test-local issuer below stands in for the real GitHub Actions
// (https://token.actions.githubusercontent.com) and Kubernetes
// service-account issuers, which cannot run on this machine (see
// ../shared/TESTING.md §6). It serves the same two documents they do —
// /.well-known/openid-configuration and a JWKS — over TLS, and mints tokens
// shaped like theirs, signed with go-jose.

const testAudience = "keygate"

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

type testKey struct {
	kid  string
	alg  jose.SignatureAlgorithm
	priv crypto.Signer
}

// RSA key generation is slow under -race: make the few keys the tests need
// once per process.
var testRSAKeys = sync.OnceValue(func() []*rsa.PrivateKey {
	keys := make([]*rsa.PrivateKey, 3)
	for i := range keys {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			panic(err)
		}
		keys[i] = k
	}
	return keys
})

func rsaTestKey(i int, kid string) *testKey {
	return &testKey{kid: kid, alg: jose.RS256, priv: testRSAKeys()[i]}
}

func ecTestKey(tb testing.TB, kid string) *testKey {
	tb.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	return &testKey{kid: kid, alg: jose.ES256, priv: k}
}

type testIssuer struct {
	srv *httptest.Server
	url string

	mu               sync.Mutex
	published        []*testKey
	discoveredIssuer string // "" → url

	down          atomic.Bool // abort every connection
	jwksFail      atomic.Bool // JWKS answers 503
	discoveryHits atomic.Int64
	jwksHits      atomic.Int64
}

func newTestIssuer(tb testing.TB, keys ...*testKey) *testIssuer {
	tb.Helper()
	iss := &testIssuer{published: keys}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		iss.discoveryHits.Add(1)
		if iss.down.Load() {
			panic(http.ErrAbortHandler)
		}
		iss.mu.Lock()
		issuer := iss.discoveredIssuer
		iss.mu.Unlock()
		if issuer == "" {
			issuer = iss.url
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"issuer":                                issuer,
			"jwks_uri":                              iss.url + "/.well-known/jwks",
			"response_types_supported":              []string{"id_token"},
			"subject_types_supported":               []string{"public"},
			"id_token_signing_alg_values_supported": []string{"RS256", "ES256"},
		})
	})
	mux.HandleFunc("GET /.well-known/jwks", func(w http.ResponseWriter, r *http.Request) {
		iss.jwksHits.Add(1)
		if iss.down.Load() {
			panic(http.ErrAbortHandler)
		}
		if iss.jwksFail.Load() {
			http.Error(w, "unavailable", http.StatusServiceUnavailable)
			return
		}
		iss.mu.Lock()
		var set jose.JSONWebKeySet
		for _, k := range iss.published {
			set.Keys = append(set.Keys, jose.JSONWebKey{Key: k.priv.Public(), KeyID: k.kid, Algorithm: string(k.alg), Use: "sig"})
		}
		iss.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(set)
	})
	iss.srv = httptest.NewTLSServer(mux)
	iss.url = iss.srv.URL
	tb.Cleanup(iss.srv.Close)
	return iss
}

func (i *testIssuer) publish(keys ...*testKey) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.published = keys
}

// mint signs claims with k; k.kid == "" leaves the kid header out.
func mint(tb testing.TB, k *testKey, claims map[string]any) string {
	tb.Helper()
	jwk := jose.JSONWebKey{Key: k.priv, KeyID: k.kid}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: k.alg, Key: jwk}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		tb.Fatal(err)
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		tb.Fatal(err)
	}
	obj, err := signer.Sign(payload)
	if err != nil {
		tb.Fatal(err)
	}
	s, err := obj.CompactSerialize()
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

func b64(v any) string {
	var b []byte
	switch v := v.(type) {
	case []byte:
		b = v
	case string:
		b = []byte(v)
	default:
		var err error
		if b, err = json.Marshal(v); err != nil {
			panic(err)
		}
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// githubClaims is shaped like a GitHub Actions OIDC token.
func githubClaims(iss string, now time.Time) map[string]any {
	return map[string]any{
		"iss":                   iss,
		"aud":                   testAudience,
		"sub":                   "repo:acme/app:ref:refs/heads/main",
		"repository":            "acme/app",
		"repository_owner":      "acme",
		"ref":                   "refs/heads/main",
		"sha":                   "0123456789abcdef0123456789abcdef01234567",
		"workflow":              "ci",
		"job_workflow_ref":      "acme/app/.github/workflows/ci.yml@refs/heads/main",
		"environment":           "production",
		"actor":                 "octocat",
		"event_name":            "push",
		"runner_environment":    "github-hosted",
		"run_id":                "9876543210",
		"jti":                   "5f1b8e2c-0000-4000-8000-000000000001",
		"iat":                   now.Add(-10 * time.Second).Unix(),
		"nbf":                   now.Add(-10 * time.Second).Unix(),
		"exp":                   now.Add(5 * time.Minute).Unix(),
		"repository_visibility": "private",
	}
}

// k8sClaims is shaped like a projected Kubernetes service-account token.
func k8sClaims(iss string, now time.Time) map[string]any {
	return map[string]any{
		"iss": iss,
		"aud": []string{"https://kubernetes.default.svc", testAudience},
		"sub": "system:serviceaccount:ns:sa",
		"kubernetes.io": map[string]any{
			"namespace":      "ns",
			"serviceaccount": map[string]any{"name": "sa", "uid": "2f0a2ac6-0000-4000-8000-00000000000a"},
			"pod":            map[string]any{"name": "app-7d9f", "uid": "8c1e9b1d-0000-4000-8000-00000000000b"},
			"node":           map[string]any{"name": "node-1", "uid": "3b7c5d2e-0000-4000-8000-00000000000c"},
		},
		"iat": now.Unix(),
		"nbf": now.Unix(),
		"exp": now.Add(time.Hour).Unix(),
	}
}

func with(c map[string]any, kv ...any) map[string]any {
	out := make(map[string]any, len(c))
	for k, v := range c {
		out[k] = v
	}
	for i := 0; i < len(kv); i += 2 {
		if kv[i+1] == nil {
			delete(out, kv[i].(string))
			continue
		}
		out[kv[i].(string)] = kv[i+1]
	}
	return out
}

func bearer(tok string) broker.Evidence {
	return broker.Evidence{ProxyAuthorization: broker.NewSecret("Bearer " + tok)}
}

// basicProxy is the header curl (and Go's net/http) send for a proxy URL
// http://token:<jwt>@host: "Basic " + standard padded base64 of "user:password".
func basicProxy(tok string) broker.Evidence {
	return broker.Evidence{ProxyAuthorization: broker.NewSecret("Basic " + base64.StdEncoding.EncodeToString([]byte("token:"+tok)))}
}

func rawHeader(v string) broker.Evidence {
	return broker.Evidence{ProxyAuthorization: broker.NewSecret(v)}
}

func newTestOIDC(tb testing.TB, ctx context.Context, iss *testIssuer, clock broker.Clock, mutate ...func(*OIDCOptions)) *OIDC {
	tb.Helper()
	o := OIDCOptions{
		Name:       "test",
		Issuer:     iss.url,
		Audiences:  []string{testAudience},
		HTTPClient: iss.srv.Client(),
		Clock:      clock,
	}
	for _, m := range mutate {
		m(&o)
	}
	a, err := NewOIDC(ctx, o)
	if err != nil {
		tb.Fatal(err)
	}
	return a
}

// assertNoLeak fails if the error text contains any of the strings.
func assertNoLeak(t *testing.T, err error, secrets ...string) {
	t.Helper()
	if err == nil {
		return
	}
	for _, s := range secrets {
		if s != "" && strings.Contains(err.Error(), s) {
			t.Fatalf("error %q leaks %q", err, s)
		}
	}
}

func TestOIDCAttestAccepts(t *testing.T) {
	clock := newFakeClock()
	rk := rsaTestKey(0, "rsa-1")
	ek := ecTestKey(t, "ec-1")
	iss := newTestIssuer(t, rk, ek)
	a := newTestOIDC(t, t.Context(), iss, clock)
	now := clock.Now()
	noKid := &testKey{alg: rk.alg, priv: rk.priv}

	tests := []struct {
		name      string
		ev        broker.Evidence
		wantSub   string
		wantClaim map[string]any
	}{
		{"github bearer", bearer(mint(t, rk, githubClaims(iss.url, now))), "repo:acme/app:ref:refs/heads/main", map[string]any{
			"repository": "acme/app", "ref": "refs/heads/main", "workflow": "ci",
			"job_workflow_ref": "acme/app/.github/workflows/ci.yml@refs/heads/main",
			"environment":      "production", "actor": "octocat",
		}},
		{"github proxy-url basic", basicProxy(mint(t, rk, githubClaims(iss.url, now))), "repo:acme/app:ref:refs/heads/main", map[string]any{"repository": "acme/app"}},
		{"kubernetes bearer ES256", bearer(mint(t, ek, k8sClaims(iss.url, now))), "system:serviceaccount:ns:sa", nil},
		{"kubernetes proxy-url basic", basicProxy(mint(t, ek, k8sClaims(iss.url, now))), "system:serviceaccount:ns:sa", nil},
		{"lowercase bearer scheme", rawHeader("bearer " + mint(t, rk, githubClaims(iss.url, now))), "repo:acme/app:ref:refs/heads/main", nil},
		{"no kid header: every key is tried", bearer(mint(t, noKid, githubClaims(iss.url, now))), "repo:acme/app:ref:refs/heads/main", nil},
		{"expired within skew", bearer(mint(t, rk, with(githubClaims(iss.url, now), "exp", now.Add(-20*time.Second).Unix()))), "repo:acme/app:ref:refs/heads/main", nil},
		{"nbf within skew", bearer(mint(t, rk, with(githubClaims(iss.url, now), "nbf", now.Add(20*time.Second).Unix(), "iat", now.Add(20*time.Second).Unix()))), "repo:acme/app:ref:refs/heads/main", nil},
		{"no nbf and no iat", bearer(mint(t, rk, with(githubClaims(iss.url, now), "nbf", nil, "iat", nil))), "repo:acme/app:ref:refs/heads/main", nil},
		{"aud array with ours", bearer(mint(t, rk, with(githubClaims(iss.url, now), "aud", []string{"other", testAudience}))), "repo:acme/app:ref:refs/heads/main", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := a.Attest(t.Context(), tt.ev)
			if err != nil {
				t.Fatalf("Attest: %v", err)
			}
			if id.ID != tt.wantSub || id.Method != broker.MethodOIDC || id.TrustDomain != iss.url {
				t.Fatalf("identity = %q/%q/%q, want %q/oidc/%q", id.ID, id.Method, id.TrustDomain, tt.wantSub, iss.url)
			}
			if id.Claims["sub"] != tt.wantSub || id.Claims["iss"] != iss.url {
				t.Fatalf("claims sub/iss = %v/%v", id.Claims["sub"], id.Claims["iss"])
			}
			if _, ok := id.Claims["exp"].(float64); !ok {
				t.Fatalf("exp claim is %T, want float64 (decoded JSON)", id.Claims["exp"])
			}
			for k, v := range tt.wantClaim {
				if id.Claims[k] != v {
					t.Errorf("claim %s = %v, want %v", k, id.Claims[k], v)
				}
			}
		})
	}

	t.Run("kubernetes nested claims", func(t *testing.T) {
		id, err := a.Attest(t.Context(), bearer(mint(t, ek, k8sClaims(iss.url, now))))
		if err != nil {
			t.Fatal(err)
		}
		kio, _ := id.Claims["kubernetes.io"].(map[string]any)
		sa, _ := kio["serviceaccount"].(map[string]any)
		if kio["namespace"] != "ns" || sa["name"] != "sa" {
			t.Fatalf("kubernetes.io claims = %v", id.Claims["kubernetes.io"])
		}
	})
	if got := iss.jwksHits.Load(); got != 1 {
		t.Errorf("JWKS fetched %d times, want 1", got)
	}
	if !a.Ready() {
		t.Error("Ready() = false after successful attestations")
	}
}

func TestOIDCAttestRejects(t *testing.T) {
	canary := canarytest.New("attest oidc claim")
	clock := newFakeClock()
	rk := rsaTestKey(0, "rsa-1")
	ek := ecTestKey(t, "ec-1")
	iss := newTestIssuer(t, rk, ek)
	a := newTestOIDC(t, t.Context(), iss, clock)
	rsaOnly := newTestOIDC(t, t.Context(), iss, clock, func(o *OIDCOptions) { o.Algorithms = []string{"RS256"} })
	now := clock.Now()
	gh := with(githubClaims(iss.url, now), "canary", canary)

	attacker := &testKey{kid: rk.kid, alg: jose.RS256, priv: testRSAKeys()[1]} // known kid, wrong key
	attackerEC := ecTestKey(t, rk.kid)                                         // known RSA kid, EC signature
	unknown := &testKey{kid: canary, alg: jose.RS256, priv: testRSAKeys()[1]}  // kid nobody published

	// alg "none": hand-crafted, since no library will sign it.
	noneHeader := b64(map[string]any{"alg": "none", "typ": "JWT", "kid": rk.kid})
	algNone := noneHeader + "." + b64(gh) + "."
	algNoneSig := noneHeader + "." + b64(gh) + "." + b64(canary)

	// Algorithm confusion: HS256 keyed with the issuer's public key bytes,
	// which an attacker can download, under the real key's kid.
	der, err := x509.MarshalPKIXPublicKey(rk.priv.Public())
	if err != nil {
		t.Fatal(err)
	}
	pemKey := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	jwkJSON, err := json.Marshal(jose.JSONWebKey{Key: rk.priv.Public(), KeyID: rk.kid, Algorithm: "RS256", Use: "sig"})
	if err != nil {
		t.Fatal(err)
	}
	hs256 := func(key []byte) string {
		in := b64(map[string]any{"alg": "HS256", "typ": "JWT", "kid": rk.kid}) + "." + b64(gh)
		m := hmac.New(sha256.New, key)
		m.Write([]byte(in))
		return in + "." + b64(m.Sum(nil))
	}

	valid := mint(t, rk, gh)
	parts := strings.Split(valid, ".")
	tampered := parts[0] + "." + b64(with(gh, "sub", "repo:acme/other:ref:refs/heads/main")) + "." + parts[2]
	canarySig := parts[0] + "." + parts[1] + "." + canary
	badB64Sig := parts[0] + "." + parts[1] + ".!!!" + canary
	badHeader := b64("{not json") + "." + parts[1] + "." + parts[2]

	tests := []struct {
		name string
		a    *OIDC
		ev   broker.Evidence
		want error // a specific reason; all wrap ErrInvalidEvidence
	}{
		{"expired beyond skew", a, bearer(mint(t, rk, with(gh, "exp", now.Add(-31*time.Second).Unix()))), errOIDCExpired},
		{"expired long ago", a, basicProxy(mint(t, rk, with(gh, "exp", now.Add(-time.Hour).Unix()))), errOIDCExpired},
		{"not yet valid", a, bearer(mint(t, rk, with(gh, "nbf", now.Add(time.Minute).Unix()))), errOIDCNotYetValid},
		{"issued in the future", a, bearer(mint(t, rk, with(gh, "iat", now.Add(time.Minute).Unix()))), errOIDCIssuedFuture},
		{"no exp", a, bearer(mint(t, rk, with(gh, "exp", nil))), errOIDCNoExp},
		{"exp is a string", a, bearer(mint(t, rk, with(gh, "exp", "tomorrow"))), errOIDCTimeClaim},
		{"wrong aud", a, bearer(mint(t, rk, with(gh, "aud", "someone-else"))), errOIDCAudience},
		{"wrong aud array", a, bearer(mint(t, rk, with(gh, "aud", []string{"a", "b"}))), errOIDCAudience},
		{"no aud", a, bearer(mint(t, rk, with(gh, "aud", nil))), errOIDCAudience},
		{"missing sub", a, bearer(mint(t, rk, with(gh, "sub", nil))), errOIDCNoSub},
		{"empty sub", a, bearer(mint(t, rk, with(gh, "sub", ""))), errOIDCNoSub},
		{"numeric sub", a, bearer(mint(t, rk, with(gh, "sub", 42))), errOIDCNoSub},
		{"alg none, empty signature", a, bearer(algNone), errOIDCAlg},
		{"alg none, with signature", a, bearer(algNoneSig), errOIDCAlg},
		{"HS256 keyed with public key PEM", a, bearer(hs256(pemKey)), errOIDCAlg},
		{"HS256 keyed with public key DER", a, bearer(hs256(der)), errOIDCAlg},
		{"HS256 keyed with public JWK", a, bearer(hs256(jwkJSON)), errOIDCAlg},
		{"ES256 when only RS256 allowed", rsaOnly, bearer(mint(t, ek, gh)), errOIDCAlg},
		{"another key under a known kid", a, bearer(mint(t, attacker, gh)), errOIDCSignature},
		{"EC signature under an RSA kid", a, bearer(mint(t, attackerEC, gh)), errOIDCSignature},
		{"tampered payload", a, bearer(tampered), errOIDCSignature},
		{"canary as signature part", a, bearer(canarySig), errOIDCMalformed},
		{"signature not base64", a, basicProxy(badB64Sig), errOIDCMalformed},
		{"header not JSON", a, bearer(badHeader), errOIDCMalformed},
		{"unknown kid", a, bearer(mint(t, unknown, gh)), errOIDCUnknownKid},
		{"token too large", a, bearer(parts[0] + "." + b64(with(gh, "pad", strings.Repeat("x", maxTokenBytes))) + "." + parts[2]), errOIDCTooLarge},
		// Garbled Proxy-Authorization: rejected before any token parsing.
		{"scheme only", a, rawHeader("Bearer"), broker.ErrInvalidEvidence},
		{"bearer with empty token", a, rawHeader("Bearer   "), broker.ErrInvalidEvidence},
		{"bearer with two words", a, rawHeader("Bearer " + valid + " " + canary), broker.ErrInvalidEvidence},
		{"basic not base64", a, rawHeader("Basic !!" + canary), broker.ErrInvalidEvidence},
		{"basic without colon", a, rawHeader("Basic " + base64.StdEncoding.EncodeToString([]byte(canary))), broker.ErrInvalidEvidence},
		{"basic with empty password", a, rawHeader("Basic " + base64.StdEncoding.EncodeToString([]byte(valid+":"))), broker.ErrInvalidEvidence},
		{"basic password with CRLF", a, rawHeader("Basic " + base64.StdEncoding.EncodeToString([]byte("token:"+valid+"\r\nX: "+canary))), broker.ErrInvalidEvidence},
		{"other scheme", a, rawHeader("Digest username=\"" + canary + "\""), broker.ErrInvalidEvidence},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := tt.a.Attest(t.Context(), tt.ev)
			if !errors.Is(err, broker.ErrInvalidEvidence) || !errors.Is(err, tt.want) {
				t.Fatalf("err = %v (identity %q), want %v", err, id.ID, tt.want)
			}
			if !id.IsZero() {
				t.Fatalf("identity %+v returned with an error", id)
			}
			tok := tt.ev.ProxyAuthorization.Reveal()
			assertNoLeak(t, err, canary, tok, valid, parts[1], parts[2], "acme", "octocat", rk.kid)
		})
	}
}

func TestOIDCNoEvidence(t *testing.T) {
	clock := newFakeClock()
	rk := rsaTestKey(0, "rsa-1")
	iss := newTestIssuer(t, rk)
	foreign := newTestIssuer(t, rsaTestKey(1, "foreign-1"))
	a := newTestOIDC(t, t.Context(), iss, clock)
	now := clock.Now()

	tests := []struct {
		name string
		ev   broker.Evidence
	}{
		{"no header", broker.Evidence{}},
		{"foreign issuer token", bearer(mint(t, rsaTestKey(1, "foreign-1"), githubClaims(foreign.url, now)))},
		{"foreign issuer, proxy-url form", basicProxy(mint(t, rsaTestKey(1, "foreign-1"), githubClaims(foreign.url, now)))},
		{"issuer differs by trailing slash", bearer(mint(t, rk, githubClaims(iss.url+"/", now)))},
		{"no iss claim", bearer(mint(t, rk, with(githubClaims(iss.url, now), "iss", nil)))},
		{"non-JWT bearer", bearer("ghp_0123456789abcdefABCDEF")},
		{"non-JWT proxy password", basicProxy("s3cret")},
		{"two parts", bearer("abc.def")},
		{"three parts, payload not base64", bearer("abc.!!!.def")},
		{"payload not JSON", bearer(b64("{") + "." + b64("not json") + "." + b64("sig"))},
		{"payload JSON null", bearer(b64("{}") + ".bnVsbA." + b64("sig"))},
		{"payload JSON array", bearer(b64("{}") + "." + b64([]string{"iss"}) + "." + b64("sig"))},
		{"five parts (JWE-like)", bearer("a.b.c.d.e")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := a.Attest(t.Context(), tt.ev)
			if err != broker.ErrNoEvidence {
				t.Fatalf("err = %v, want ErrNoEvidence", err)
			}
		})
	}
	if got := foreign.discoveryHits.Load() + foreign.jwksHits.Load(); got != 0 {
		t.Errorf("foreign issuer contacted %d times", got)
	}
}

// TestOIDCChain: attestors for two issuers chain on ErrNoEvidence; rejected
// evidence stops the chain and never falls through to a weaker method.
func TestOIDCChain(t *testing.T) {
	clock := newFakeClock()
	k1, k2 := rsaTestKey(0, "gh-1"), ecTestKey(t, "k8s-1")
	gh, k8s := newTestIssuer(t, k1), newTestIssuer(t, k2)
	a1 := newTestOIDC(t, t.Context(), gh, clock, func(o *OIDCOptions) { o.Name = "github" })
	a2 := newTestOIDC(t, t.Context(), k8s, clock, func(o *OIDCOptions) { o.Name = "kubernetes" })
	cidr, err := NewCIDR([]CIDREntry{{ID: "anywhere", CIDRs: mustPrefixes(t, "0.0.0.0/0")}})
	if err != nil {
		t.Fatal(err)
	}
	chain := NewChain(nil, Named{"github", a1}, Named{"kubernetes", a2}, Named{"cidr", cidr})
	now := clock.Now()
	ev := func(e broker.Evidence) broker.Evidence {
		e.Remote = netip.MustParseAddrPort("192.0.2.1:5000")
		return e
	}
	tests := []struct {
		name     string
		ev       broker.Evidence
		wantID   string
		wantMeth string
		wantErr  error
	}{
		{"github token", ev(bearer(mint(t, k1, githubClaims(gh.url, now)))), "repo:acme/app:ref:refs/heads/main", broker.MethodOIDC, nil},
		{"kubernetes token", ev(bearer(mint(t, k2, k8sClaims(k8s.url, now)))), "system:serviceaccount:ns:sa", broker.MethodOIDC, nil},
		{"no token", ev(broker.Evidence{}), "anywhere", broker.MethodCIDR, nil},
		{"expired kubernetes token", ev(bearer(mint(t, k2, with(k8sClaims(k8s.url, now), "exp", now.Add(-time.Hour).Unix())))), "", "", broker.ErrInvalidEvidence},
		{"github token signed by kubernetes key", ev(bearer(mint(t, &testKey{kid: k1.kid, alg: jose.ES256, priv: k2.priv}, githubClaims(gh.url, now)))), "", "", broker.ErrInvalidEvidence},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := chain.Attest(t.Context(), tt.ev)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil || id.ID != tt.wantID || id.Method != tt.wantMeth {
				t.Fatalf("got %q/%q, %v; want %q/%q", id.ID, id.Method, err, tt.wantID, tt.wantMeth)
			}
		})
	}
}

// TestOIDCUnknownKidFlood: a flood of tokens with garbage kids costs the
// issuer at most one JWKS fetch per 10s.
func TestOIDCUnknownKidFlood(t *testing.T) {
	clock := newFakeClock()
	rk := rsaTestKey(0, "rsa-1")
	iss := newTestIssuer(t, rk)
	a := newTestOIDC(t, t.Context(), iss, clock)
	gh := githubClaims(iss.url, clock.Now())
	if _, err := a.Attest(t.Context(), bearer(mint(t, rk, gh))); err != nil {
		t.Fatal(err)
	}
	ek := ecTestKey(t, "")
	flood := func(t *testing.T, n int) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for i := range n {
			tok := mint(t, &testKey{kid: fmt.Sprintf("garbage-%d-%s", i, rand.Text()), alg: jose.ES256, priv: ek.priv}, gh)
			wg.Go(func() {
				_, err := a.Attest(t.Context(), bearer(tok))
				if !errors.Is(err, errOIDCUnknownKid) {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Errorf("garbage kid: err = %v, want unknown key id", err)
		}
	}
	tests := []struct {
		name     string
		advance  time.Duration
		wantJWKS int64
	}{
		{"within 10s of the last fetch: no fetch", 0, 1},
		{"still within 10s", 9 * time.Second, 1},
		{"after 10s: exactly one fetch for 100 tokens", 2 * time.Second, 2},
		{"right after: none", time.Second, 2},
		{"next window: one more", 10 * time.Second, 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock.Advance(tt.advance)
			flood(t, 100)
			if got := iss.jwksHits.Load(); got != tt.wantJWKS {
				t.Fatalf("JWKS fetched %d times, want %d", got, tt.wantJWKS)
			}
		})
	}
	if got := iss.discoveryHits.Load(); got != 1 {
		t.Errorf("discovery fetched %d times, want 1", got)
	}
}

func TestOIDCKeyRotation(t *testing.T) {
	clock := newFakeClock()
	oldKey, newKey := rsaTestKey(0, "2026-04"), rsaTestKey(2, "2026-05")
	iss := newTestIssuer(t, oldKey)
	a := newTestOIDC(t, t.Context(), iss, clock)
	claims := func() map[string]any { return githubClaims(iss.url, clock.Now()) }

	if _, err := a.Attest(t.Context(), bearer(mint(t, oldKey, claims()))); err != nil {
		t.Fatalf("old key before rotation: %v", err)
	}
	iss.publish(newKey)

	// The refresh for the new kid is rate-limited right after the first fetch.
	if _, err := a.Attest(t.Context(), bearer(mint(t, newKey, claims()))); !errors.Is(err, errOIDCUnknownKid) {
		t.Fatalf("new key within 10s of the last fetch: err = %v, want unknown key id", err)
	}
	clock.Advance(minRefreshInterval + time.Second)
	id, err := a.Attest(t.Context(), bearer(mint(t, newKey, claims())))
	if err != nil {
		t.Fatalf("new key after refresh: %v", err)
	}
	if id.ID != "repo:acme/app:ref:refs/heads/main" {
		t.Fatalf("id = %q", id.ID)
	}
	if got := iss.jwksHits.Load(); got != 2 {
		t.Fatalf("JWKS fetched %d times, want 2", got)
	}
	// The old key was removed by the issuer and is no longer trusted.
	if _, err := a.Attest(t.Context(), bearer(mint(t, oldKey, claims()))); !errors.Is(err, errOIDCUnknownKid) {
		t.Fatalf("removed key: err = %v, want unknown key id", err)
	}
}

// TestOIDCStaleKeySetRefreshed: a key the issuer drops stops verifying after
// jwksMaxAge even if no unknown kid ever forces a refresh.
func TestOIDCStaleKeySetRefreshed(t *testing.T) {
	clock := newFakeClock()
	k1, k2 := rsaTestKey(0, "k1"), rsaTestKey(2, "k2")
	iss := newTestIssuer(t, k1, k2)
	a := newTestOIDC(t, t.Context(), iss, clock)
	claims := func() map[string]any { return githubClaims(iss.url, clock.Now()) }
	if _, err := a.Attest(t.Context(), bearer(mint(t, k1, claims()))); err != nil {
		t.Fatal(err)
	}
	iss.publish(k2) // k1 withdrawn (say, compromised)
	clock.Advance(jwksMaxAge - time.Minute)
	if _, err := a.Attest(t.Context(), bearer(mint(t, k1, claims()))); err != nil {
		t.Fatalf("before max age the cached set serves: %v", err)
	}
	clock.Advance(2 * time.Minute)
	// Still served from the stale set while a background refresh runs.
	if _, err := a.Attest(t.Context(), bearer(mint(t, k1, claims()))); err != nil {
		t.Fatalf("stale set must keep serving: %v", err)
	}
	waitFor(t, func() bool { return len(a.keys.Load().lookup("k1")) == 0 })
	if _, err := a.Attest(t.Context(), bearer(mint(t, k1, claims()))); !errors.Is(err, errOIDCUnknownKid) {
		t.Fatalf("withdrawn key after refresh: err = %v, want unknown key id", err)
	}
	if _, err := a.Attest(t.Context(), bearer(mint(t, k2, claims()))); err != nil {
		t.Fatalf("remaining key: %v", err)
	}
}

func TestOIDCIssuerUnavailable(t *testing.T) {
	rk := rsaTestKey(0, "rsa-1")
	isUnavailable := func(t *testing.T, err error) {
		t.Helper()
		if err == nil || errors.Is(err, broker.ErrNoEvidence) || errors.Is(err, broker.ErrInvalidEvidence) || !errors.Is(err, ErrIssuerUnavailable) {
			t.Fatalf("err = %v, want ErrIssuerUnavailable (internal failure, deny)", err)
		}
	}

	t.Run("down at start, back later", func(t *testing.T) {
		clock := newFakeClock()
		iss := newTestIssuer(t, rk)
		iss.down.Store(true)
		a := newTestOIDC(t, t.Context(), iss, clock)
		tok := func() string { return mint(t, rk, githubClaims(iss.url, clock.Now())) }
		for range 50 {
			_, err := a.Attest(t.Context(), bearer(tok()))
			isUnavailable(t, err)
			if !strings.Contains(err.Error(), "discovery") {
				t.Fatalf("error %q does not say what failed", err)
			}
		}
		if a.Ready() {
			t.Fatal("Ready() = true while the issuer is down")
		}
		if got := iss.discoveryHits.Load(); got != 1 {
			t.Fatalf("discovery tried %d times for 50 calls within 10s, want 1", got)
		}
		// Not-our-issuer evidence is unaffected by the outage.
		if _, err := a.Attest(t.Context(), bearer("opaque")); err != broker.ErrNoEvidence {
			t.Fatalf("non-JWT while down: %v", err)
		}
		iss.down.Store(false)
		_, err := a.Attest(t.Context(), bearer(tok()))
		isUnavailable(t, err) // retry is rate-limited
		clock.Advance(minRefreshInterval)
		id, err := a.Attest(t.Context(), bearer(tok()))
		if err != nil || id.ID == "" {
			t.Fatalf("after the issuer came back: %v", err)
		}
		if !a.Ready() {
			t.Fatal("Ready() = false after a successful fetch")
		}
		// Down again: the cached keys keep serving.
		iss.down.Store(true)
		clock.Advance(jwksMaxAge + time.Minute)
		if _, err := a.Attest(t.Context(), bearer(tok())); err != nil {
			t.Fatalf("cached keys while the issuer is down again: %v", err)
		}
		if !a.Ready() {
			t.Fatal("Ready() flipped to false on a later outage")
		}
	})

	t.Run("Ready alone retries", func(t *testing.T) {
		clock := newFakeClock()
		iss := newTestIssuer(t, rk)
		iss.down.Store(true)
		a := newTestOIDC(t, t.Context(), iss, clock)
		_, _ = a.refresh(t.Context()) // joins the start-up fetch and waits for it to fail
		if got := iss.discoveryHits.Load(); got != 1 {
			t.Fatalf("discovery tried %d times, want 1", got)
		}
		if a.Ready() {
			t.Fatal("ready while down")
		}
		iss.down.Store(false)
		clock.Advance(minRefreshInterval)
		waitFor(t, a.Ready)
		if _, err := a.Attest(t.Context(), bearer(mint(t, rk, githubClaims(iss.url, clock.Now())))); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("JWKS failing, discovery fine", func(t *testing.T) {
		clock := newFakeClock()
		iss := newTestIssuer(t, rk)
		iss.jwksFail.Store(true)
		a := newTestOIDC(t, t.Context(), iss, clock)
		_, err := a.Attest(t.Context(), bearer(mint(t, rk, githubClaims(iss.url, clock.Now()))))
		isUnavailable(t, err)
		iss.jwksFail.Store(false)
		clock.Advance(minRefreshInterval)
		if _, err := a.Attest(t.Context(), bearer(mint(t, rk, githubClaims(iss.url, clock.Now())))); err != nil {
			t.Fatal(err)
		}
		if d, j := iss.discoveryHits.Load(), iss.jwksHits.Load(); d != 1 || j != 2 {
			t.Fatalf("discovery %d, JWKS %d fetches; want 1, 2", d, j)
		}
	})

	t.Run("discovery names another issuer", func(t *testing.T) {
		clock := newFakeClock()
		iss := newTestIssuer(t, rk)
		iss.discoveredIssuer = "https://evil.example"
		a := newTestOIDC(t, t.Context(), iss, clock)
		_, err := a.Attest(t.Context(), bearer(mint(t, rk, githubClaims(iss.url, clock.Now()))))
		isUnavailable(t, err)
		if iss.jwksHits.Load() != 0 || a.Ready() {
			t.Fatal("keys fetched from an issuer whose discovery document names another issuer")
		}
	})

	t.Run("caller context cancelled while waiting", func(t *testing.T) {
		clock := newFakeClock()
		block := make(chan struct{})
		srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-block }))
		t.Cleanup(srv.Close)
		t.Cleanup(func() { close(block) })
		a, err := NewOIDC(t.Context(), OIDCOptions{Name: "slow", Issuer: srv.URL, Audiences: []string{testAudience}, HTTPClient: srv.Client(), Clock: clock})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
		defer cancel()
		_, err = a.Attest(ctx, bearer(mint(t, rk, githubClaims(srv.URL, clock.Now()))))
		isUnavailable(t, err)
	})
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// noNetwork fails every request at once.
var noNetwork = &http.Client{Transport: roundTripperFunc(func(*http.Request) (*http.Response, error) {
	return nil, errors.New("no network in this test")
})}

func TestNewOIDCOptions(t *testing.T) {
	ok := OIDCOptions{Name: "github", Issuer: "https://token.actions.githubusercontent.com", Audiences: []string{"keygate"}}
	tests := []struct {
		name   string
		mutate func(*OIDCOptions)
		ok     bool
	}{
		{"valid", func(*OIDCOptions) {}, true},
		{"http loopback issuer", func(o *OIDCOptions) { o.Issuer = "http://127.0.0.1:8080" }, true},
		{"http localhost issuer", func(o *OIDCOptions) { o.Issuer = "http://localhost:8080/realm" }, true},
		{"all asymmetric algs", func(o *OIDCOptions) {
			o.Algorithms = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
		}, true},
		{"max skew", func(o *OIDCOptions) { o.Skew = 5 * time.Minute }, true},
		{"no name", func(o *OIDCOptions) { o.Name = "" }, false},
		{"no issuer", func(o *OIDCOptions) { o.Issuer = "" }, false},
		{"http issuer", func(o *OIDCOptions) { o.Issuer = "http://issuer.example" }, false},
		{"relative issuer", func(o *OIDCOptions) { o.Issuer = "token.actions.githubusercontent.com" }, false},
		{"issuer with query", func(o *OIDCOptions) { o.Issuer = "https://issuer.example/?a=b" }, false},
		{"issuer with userinfo", func(o *OIDCOptions) { o.Issuer = "https://u:p@issuer.example" }, false},
		{"no audiences", func(o *OIDCOptions) { o.Audiences = nil }, false},
		{"empty audience", func(o *OIDCOptions) { o.Audiences = []string{"keygate", ""} }, false},
		{"alg none", func(o *OIDCOptions) { o.Algorithms = []string{"RS256", "none"} }, false},
		{"alg HS256", func(o *OIDCOptions) { o.Algorithms = []string{"HS256"} }, false},
		{"alg lowercase", func(o *OIDCOptions) { o.Algorithms = []string{"rs256"} }, false},
		{"negative skew", func(o *OIDCOptions) { o.Skew = -time.Second }, false},
		{"skew over 5m", func(o *OIDCOptions) { o.Skew = 5*time.Minute + time.Second }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := ok
			tt.mutate(&o)
			o.HTTPClient = noNetwork
			a, err := NewOIDC(t.Context(), o)
			if tt.ok != (err == nil) {
				t.Fatalf("err = %v, want ok=%v", err, tt.ok)
			}
			if err == nil && a.Ready() {
				t.Fatal("ready without a fetch")
			}
		})
	}
	t.Run("defaults", func(t *testing.T) {
		o := ok
		o.Issuer = "http://127.0.0.1:1" // default client: keep its start-up fetch off the network
		a, err := NewOIDC(t.Context(), o)
		if err != nil {
			t.Fatal(err)
		}
		if a.skew != 30*time.Second || len(a.algs) != 2 || a.algs[0] != jose.RS256 || a.algs[1] != jose.ES256 {
			t.Fatalf("skew %v algs %v", a.skew, a.algs)
		}
		tr, isTransport := a.client.Transport.(*http.Transport)
		if !isTransport || tr.Proxy != nil || a.client.Timeout != 10*time.Second {
			t.Fatalf("default client must ignore env proxies and time out after 10s")
		}
	})
}

func TestParseJWKSSkipsUnusableKeys(t *testing.T) {
	rk := testRSAKeys()[0]
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	mk := func(k jose.JSONWebKey) json.RawMessage {
		b, err := json.Marshal(k)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	set := map[string]any{"keys": []json.RawMessage{
		mk(jose.JSONWebKey{Key: rk.Public(), KeyID: "good-rsa", Use: "sig"}),
		mk(jose.JSONWebKey{Key: ek.Public(), KeyID: "good-ec"}),
		mk(jose.JSONWebKey{Key: ek, KeyID: "leaked-private"}), // kept, as its public half only
		mk(jose.JSONWebKey{Key: rk.Public(), KeyID: "enc", Use: "enc"}),
		mk(jose.JSONWebKey{Key: small.Public(), KeyID: "short-rsa"}),
		mk(jose.JSONWebKey{Key: []byte("symmetric-secret"), KeyID: "oct", Algorithm: "HS256"}),
		json.RawMessage(`{"kty":"OKP","crv":"X448","x":"AAAA","kid":"x448"}`),
		json.RawMessage(`{"kty":"EC","crv":"secp256k1","alg":"ES256K","kid":"k1"}`),
	}}
	body, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := parseJWKS(body)
	if err != nil {
		t.Fatal(err)
	}
	var kids []string
	for _, k := range keys {
		if !k.IsPublic() {
			t.Errorf("key %s is not public-only", k.KeyID)
		}
		kids = append(kids, k.KeyID)
	}
	if got := strings.Join(kids, ","); got != "good-rsa,good-ec,leaked-private" {
		t.Fatalf("kept %s", got)
	}
	for _, bad := range []string{``, `[]`, `{}`, `{"keys":{}}`, `not json`} {
		if _, err := parseJWKS([]byte(bad)); err == nil {
			t.Errorf("parseJWKS(%q) succeeded", bad)
		}
	}
}

// TestOIDCProxyURLClients builds Proxy-Authorization the way real clients do
// for HTTPS_PROXY=http://token:<jwt>@host:port — Go's net/http and, when
// installed, curl — and attests what they actually sent.
func TestOIDCProxyURLClients(t *testing.T) {
	clock := newFakeClock()
	rk := rsaTestKey(0, "rsa-1")
	iss := newTestIssuer(t, rk)
	a := newTestOIDC(t, t.Context(), iss, clock)
	jwt := mint(t, rk, githubClaims(iss.url, clock.Now()))

	var mu sync.Mutex
	var got string
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = r.Header.Get("Proxy-Authorization")
		mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(proxy.Close)
	proxyURL, err := url.Parse(proxy.URL)
	if err != nil {
		t.Fatal(err)
	}
	proxyURL.User = url.UserPassword("token", jwt)

	clients := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"go net/http", func(t *testing.T) {
			c := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(proxyURL)}}
			resp, err := c.Get("http://upstream.invalid/")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
		}},
		{"curl", func(t *testing.T) {
			if _, err := exec.LookPath("curl"); err != nil {
				testservers.Missing(t, "curl not installed")
			}
			out, err := exec.CommandContext(t.Context(), "curl", "-sS", "--noproxy", "", "-x", proxyURL.String(), "http://upstream.invalid/").CombinedOutput()
			if err != nil {
				t.Fatalf("curl: %v: %s", err, out)
			}
		}},
		{"bearer header", func(t *testing.T) {
			req, err := http.NewRequest(http.MethodGet, "http://upstream.invalid/", nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Proxy-Authorization", "Bearer "+jwt)
			c := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: proxyURL.Host})}}
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
		}},
	}
	for _, c := range clients {
		t.Run(c.name, func(t *testing.T) {
			mu.Lock()
			got = ""
			mu.Unlock()
			c.run(t)
			mu.Lock()
			header := got
			mu.Unlock()
			if header == "" {
				t.Fatal("client sent no Proxy-Authorization")
			}
			id, err := a.Attest(t.Context(), rawHeader(header))
			if err != nil {
				t.Fatalf("Attest(%s header): %v", c.name, err)
			}
			if id.ID != "repo:acme/app:ref:refs/heads/main" {
				t.Fatalf("id = %q", id.ID)
			}
		})
	}
}

// BenchmarkOIDCAttest measures one attestation with a cached JWKS and
// asserts that the JWKS endpoint is fetched once, not per request.
func BenchmarkOIDCAttest(b *testing.B) {
	for _, alg := range []string{"RS256", "ES256"} {
		b.Run(alg, func(b *testing.B) {
			clock := newFakeClock()
			k := rsaTestKey(0, "bench")
			if alg == "ES256" {
				k = ecTestKey(b, "bench")
			}
			iss := newTestIssuer(b, k)
			a := newTestOIDC(b, b.Context(), iss, clock)
			ev := bearer(mint(b, k, githubClaims(iss.url, clock.Now())))
			if _, err := a.Attest(b.Context(), ev); err != nil {
				b.Fatal(err)
			}
			if got := iss.jwksHits.Load(); got != 1 {
				b.Fatalf("setup: JWKS fetched %d times, want 1", got)
			}
			ctx := b.Context()
			n := 0
			b.ReportAllocs()
			for b.Loop() {
				if _, err := a.Attest(ctx, ev); err != nil {
					b.Fatal(err)
				}
				n++
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(n), "ns/attestation")
			if got := iss.jwksHits.Load(); got != 1 {
				b.Fatalf("JWKS fetched %d times over %d attestations, want 1", got, n)
			}
		})
	}
}
