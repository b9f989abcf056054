package inject

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/testservers"
)

// The oauth2 source is tested against a real, OpenID Certified provider:
// the npm package oidc-provider (scripts/oidc-provider.sh installs it,
// testservers.StartOIDCProvider starts it on 127.0.0.1). It issues JWT
// access tokens for one resource server; the tests verify every token the
// source returns the way a resource server would, against the provider's
// JWKS. Fault modes no real provider produces on demand (garbage, CR/LF in
// a token, no expires_in, a redirect) use httptest servers, below.

// countingClient is the broker's kind of client (no proxy, no redirects)
// counting the requests it sends.
func countingClient(n *atomic.Int64) *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
			n.Add(1)
			return (&http.Transport{Proxy: nil}).RoundTrip(r)
		}),
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func ecKeyPEM(t testing.TB) (*ecdsa.PrivateKey, string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return k, string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
}

func rsaKeyPEM(t testing.TB) (*rsa.PrivateKey, string) {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return k, string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)}))
}

// oidcWorld is a running oidc-provider with one client per auth method.
type oidcWorld struct {
	p              *testservers.OIDCProvider
	basicSecret    string
	postSecret     string
	ecPEM, rsaPEM  string
	verify         func(ctx context.Context, token string) (map[string]any, error)
	requests       atomic.Int64
	client         *http.Client
	ecKey          *ecdsa.PrivateKey
	rsaKey         *rsa.PrivateKey
	strangerKeyPEM string
}

func newOIDCWorld(t *testing.T) *oidcWorld {
	t.Helper()
	w := &oidcWorld{basicSecret: canary(t) + "-basic", postSecret: canary(t) + "-post"}
	w.ecKey, w.ecPEM = ecKeyPEM(t)
	w.rsaKey, w.rsaPEM = rsaKeyPEM(t)
	_, w.strangerKeyPEM = ecKeyPEM(t)
	jwks := &jose.JSONWebKeySet{Keys: []jose.JSONWebKey{
		{Key: w.ecKey.Public(), Algorithm: "ES256", Use: "sig"},
		{Key: w.rsaKey.Public(), Algorithm: "RS256", Use: "sig"},
	}}
	w.p = testservers.StartOIDCProvider(t, testservers.OIDCProviderOptions{
		Clients: []testservers.OIDCClient{
			{ID: "kg-basic", Secret: w.basicSecret, AuthMethod: AuthClientSecretBasic},
			{ID: "kg-post", Secret: w.postSecret, AuthMethod: AuthClientSecretPost},
			{ID: "kg-jwt", AuthMethod: AuthPrivateKeyJWT, JWKS: jwks},
		},
		Resource:       "https://api.example.test",
		Scopes:         []string{"read", "write"},
		AccessTokenTTL: 300 * time.Second,
	})
	w.verify = w.p.ResourceVerifier()
	w.client = countingClient(&w.requests)
	return w
}

func (w *oidcWorld) source(t *testing.T, o OAuth2Options) broker.Source {
	t.Helper()
	o.TokenURL = w.p.TokenURL
	if o.HTTPClient == nil {
		o.HTTPClient = w.client
	}
	src, err := NewOAuth2("api", o)
	if err != nil {
		t.Fatal(err)
	}
	return src
}

func TestOAuth2AgainstOIDCProvider(t *testing.T) {
	w := newOIDCWorld(t)
	ctx := context.Background()
	cases := []struct {
		name      string
		o         OAuth2Options
		params    map[string]string
		wantScope string
	}{
		{"client_secret_basic, static scopes", OAuth2Options{ClientID: "kg-basic", ClientSecret: StaticSecret(broker.NewSecret(w.basicSecret)),
			Scopes: []string{"read", "write"}}, nil, "read write"},
		{"client_secret_post, resource", OAuth2Options{ClientID: "kg-post", AuthMethod: AuthClientSecretPost,
			ClientSecret: StaticSecret(broker.NewSecret(w.postSecret)), Scopes: []string{"read"}, Resource: "https://api.example.test"}, nil, "read"},
		{"private_key_jwt ES256", OAuth2Options{ClientID: "kg-jwt", AuthMethod: AuthPrivateKeyJWT,
			PrivateKey: StaticSecret(broker.NewSecret(w.ecPEM)), Scopes: []string{"write"}}, nil, "write"},
		{"private_key_jwt RS256", OAuth2Options{ClientID: "kg-jwt", AuthMethod: AuthPrivateKeyJWT,
			PrivateKey: StaticSecret(broker.NewSecret(w.rsaPEM)), Scopes: []string{"read"}}, nil, "read"},
		{"scopes narrowed per request", OAuth2Options{ClientID: "kg-basic", ClientSecret: StaticSecret(broker.NewSecret(w.basicSecret)),
			Scopes: []string{"read", "write"}}, map[string]string{ParamOAuth2Scopes: "read"}, "read"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			src := w.source(t, tc.o)
			before := time.Now()
			c, err := src.Credential(ctx, idA, broker.Grant{Rule: "r", Credential: "api", Params: tc.params})
			if err != nil {
				t.Fatalf("Credential: %v\nprovider log:\n%s", err, w.p.Log())
			}
			tok := token(t, c)
			claims, err := w.verify(ctx, tok)
			if err != nil {
				t.Fatalf("the resource server rejects the token: %v", err)
			}
			if claims["client_id"] != tc.o.ClientID || claims["scope"] != tc.wantScope {
				t.Errorf("token claims client_id=%v scope=%v, want %s %q", claims["client_id"], claims["scope"], tc.o.ClientID, tc.wantScope)
			}
			if c.Kind != KindOAuth2 || c.Meta["scope"] != tc.wantScope {
				t.Errorf("kind %q meta %v", c.Kind, c.Meta)
			}
			if d := c.Expires.Sub(before); d < 290*time.Second || d > 310*time.Second {
				t.Errorf("Expires is %v after the call, want expires_in (300s)", d)
			}
			r := newReq(t, "https://api.example.test/v1/items")
			if err := Bearer().Inject(r, c); err != nil || r.Header.Get("Authorization") != "Bearer "+tok {
				t.Errorf("bearer injection: %v", err)
			}
		})
	}

	t.Run("refusals name the OAuth error, never the secret", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			o    OAuth2Options
			want string
		}{
			{"wrong secret", OAuth2Options{ClientID: "kg-basic", ClientSecret: StaticSecret(broker.NewSecret(w.postSecret))}, "401 invalid_client"},
			{"unknown client", OAuth2Options{ClientID: "kg-nobody", ClientSecret: StaticSecret(broker.NewSecret(w.basicSecret))}, "401 invalid_client"},
			{"unregistered key", OAuth2Options{ClientID: "kg-jwt", AuthMethod: AuthPrivateKeyJWT, PrivateKey: StaticSecret(broker.NewSecret(w.strangerKeyPEM))}, "401 invalid_client"},
			{"unknown resource", OAuth2Options{ClientID: "kg-basic", ClientSecret: StaticSecret(broker.NewSecret(w.basicSecret)), Resource: "https://other.example.test"}, "400 invalid_target"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				_, err := w.source(t, tc.o).Credential(ctx, idA, grant)
				be := expectCode(t, err, broker.CodeCredentialUnavailable)
				if !strings.Contains(be.Message, tc.want) {
					t.Errorf("message %q, want %q", be.Message, tc.want)
				}
				assertNoCanary(t, "CANARY-", err, be.Message)
			})
		}
	})

	t.Run("cached until the margin, then never stale", func(t *testing.T) {
		clock := newFakeClock()
		raw := w.source(t, OAuth2Options{ClientID: "kg-basic", ClientSecret: StaticSecret(broker.NewSecret(w.basicSecret)), Clock: clock})
		src := NewCache("api", raw, CacheOptions{TTL: time.Hour, Clock: clock})
		n0 := w.requests.Load()
		first, err := src.Credential(ctx, idA, grant)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 5; i++ {
			c, err := src.Credential(ctx, idA, grant)
			if err != nil || token(t, c) != token(t, first) {
				t.Fatalf("hit %d: %v / another token", i, err)
			}
		}
		if n := w.requests.Load() - n0; n != 1 {
			t.Errorf("%d token requests for 6 calls, want 1", n)
		}
		// 300s token, 30s margin: at 269s still cached; at 271s a new one.
		clock.Advance(269 * time.Second)
		if c, err := src.Credential(ctx, idA, grant); err != nil || token(t, c) != token(t, first) {
			t.Fatalf("inside the token's life: %v", err)
		}
		w.p.Stop()
		clock.Advance(2 * time.Second)
		_, err = src.Credential(ctx, idA, grant)
		be := expectCode(t, err, broker.CodeCredentialUnavailable)
		if !strings.Contains(be.Message, "unreachable") {
			t.Errorf("message %q", be.Message)
		}
		w.p.Start()
		c, err := src.Credential(ctx, idA, grant)
		if err != nil {
			t.Fatalf("after the provider is back: %v", err)
		}
		if token(t, c) == token(t, first) {
			t.Error("served the old token after its margin")
		}
		if _, err := w.verify(ctx, token(t, c)); err != nil {
			t.Errorf("new token: %v", err)
		}
	})
}

func expectCode(t *testing.T, err error, code string) *broker.Error {
	t.Helper()
	var be *broker.Error
	if !errors.As(err, &be) {
		t.Fatalf("error %v is not a *broker.Error", err)
	}
	if be.Code != code {
		t.Fatalf("code %s (%s), want %s", be.Code, be.Message, code)
	}
	return be
}

// fakeTokenEndpoint answers every token request with status, content type
// and body, and records the requests.
type fakeTokenEndpoint struct {
	srv   *httptest.Server
	hits  atomic.Int64
	reply func(w http.ResponseWriter, r *http.Request)
}

func newFakeTokenEndpoint(t *testing.T, status int, ctype, body string) *fakeTokenEndpoint {
	f := &fakeTokenEndpoint{}
	f.reply = func(w http.ResponseWriter, _ *http.Request) {
		if ctype != "" {
			w.Header().Set("Content-Type", ctype)
		}
		w.WriteHeader(status)
		_, _ = io.WriteString(w, body)
	}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.hits.Add(1)
		f.reply(w, r)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func TestOAuth2BadResponses(t *testing.T) {
	secret := canary(t)
	const js = "application/json"
	cases := []struct {
		name       string
		status     int
		ctype      string
		body       string
		code       string
		msg        string
		retryAfter bool
	}{
		{"invalid JSON", 200, js, `{"access_token": "abc", `, broker.CodeCredentialMalformed, "not a usable token response", false},
		{"HTML", 200, "text/html", `<html>login</html>`, broker.CodeCredentialMalformed, "not a usable token response", false},
		{"no access_token", 200, js, `{"token_type":"Bearer","expires_in":300}`, broker.CodeCredentialMalformed, "not a usable token response", false},
		{"empty access_token", 200, js, `{"access_token":"","expires_in":300}`, broker.CodeCredentialMalformed, "not a usable token response", false},
		{"CR LF in the token", 200, js, `{"access_token":"abc\r\nX-Evil: 1","token_type":"Bearer","expires_in":300}`, broker.CodeCredentialMalformed, "control characters", false},
		{"NUL in the token", 200, js, `{"access_token":"abc\u0000def","token_type":"Bearer","expires_in":300}`, broker.CodeCredentialMalformed, "control characters", false},
		{"huge token", 200, js, `{"access_token":"` + strings.Repeat("a", 9000) + `","expires_in":300}`, broker.CodeCredentialMalformed, "longer than", false},
		{"not a bearer token", 200, js, `{"access_token":"abc","token_type":"DPoP","expires_in":300}`, broker.CodeCredentialMalformed, `"DPoP" token`, false},
		{"negative expires_in", 200, js, `{"access_token":"abc","token_type":"Bearer","expires_in":-5}`, broker.CodeCredentialMalformed, "is negative", false},
		{"expires_in not a number", 200, js, `{"access_token":"abc","expires_in":"soon"}`, broker.CodeCredentialMalformed, "not a usable token response", false},
		{"OAuth error", 400, js, `{"error":"invalid_scope","error_description":"scope admin is not allowed for ` + secret + `"}`, broker.CodeCredentialUnavailable, "answered 400 invalid_scope", false},
		{"OAuth error in a 200", 200, js, `{"error":"invalid_client"}`, broker.CodeCredentialUnavailable, "answered 200 invalid_client", false},
		{"error code with CR LF is not repeated", 401, js, `{"error":"bad\r\ncode"}`, broker.CodeCredentialUnavailable, "answered 401", false},
		{"server error", 500, "text/plain", "boom " + secret, broker.CodeCredentialUnavailable, "answered 500", false},
		{"throttled", 429, js, `{"error":"slow_down"}`, broker.CodeCredentialUnavailable, "answered 429 slow_down", true},
		{"redirect", 307, "", "", broker.CodeCredentialUnavailable, "does not follow redirects", false},
		{"secret echoed as the token", 200, js, `{"access_token":"` + secret + `","expires_in":300}`, broker.CodeCredentialMalformed, "client's own secret", false},
		{"secret echoed as the error code", 401, js, `{"error":"` + secret + `"}`, broker.CodeCredentialUnavailable, "answered 401", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeTokenEndpoint(t, tc.status, tc.ctype, tc.body)
			if tc.status == 307 {
				other := newFakeTokenEndpoint(t, 200, js, `{"access_token":"stolen","expires_in":300}`)
				f.reply = func(w http.ResponseWriter, r *http.Request) {
					http.Redirect(w, r, other.srv.URL+"/token", http.StatusTemporaryRedirect)
				}
				t.Cleanup(func() {
					if other.hits.Load() != 0 {
						t.Errorf("the redirect target received %d requests (with the client secret)", other.hits.Load())
					}
				})
			}
			if tc.retryAfter {
				inner := f.reply
				f.reply = func(w http.ResponseWriter, r *http.Request) { w.Header().Set("Retry-After", "7"); inner(w, r) }
			}
			src, err := NewOAuth2("api", OAuth2Options{TokenURL: f.srv.URL + "/token", ClientID: "kg",
				ClientSecret: StaticSecret(broker.NewSecret(secret))})
			if err != nil {
				t.Fatal(err)
			}
			c, err := src.Credential(context.Background(), idA, grant)
			if err == nil {
				t.Fatalf("got a credential (%d fields), want %s", len(c.Fields), tc.code)
			}
			be := expectCode(t, err, tc.code)
			if !strings.Contains(be.Message, tc.msg) {
				t.Errorf("message %q, want it to contain %q", be.Message, tc.msg)
			}
			if tc.retryAfter && be.RetryAfter != 7*time.Second {
				t.Errorf("RetryAfter %v, want 7s", be.RetryAfter)
			}
			if f.hits.Load() != 1 {
				t.Errorf("%d token requests, want 1 (no retry)", f.hits.Load())
			}
			assertNoCanary(t, secret, err, be.Message)
			for _, leak := range []string{"\r", "\n", "abc\r", "X-Evil", "stolen", strings.Repeat("a", 100)} {
				if strings.Contains(err.Error(), leak) {
					t.Errorf("error repeats response data %q: %s", leak, err)
				}
			}
		})
	}
}

func TestOAuth2MissingExpiresIn(t *testing.T) {
	clock := newFakeClock()
	f := newFakeTokenEndpoint(t, 200, "application/json", `{"access_token":"tok-without-expiry","token_type":"bearer"}`)
	raw, err := NewOAuth2("api", OAuth2Options{TokenURL: f.srv.URL, ClientID: "kg", ClientSecret: StaticSecret(broker.NewSecret("s3cret")), Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	c, err := raw.Credential(context.Background(), idA, grant)
	if err != nil {
		t.Fatal(err)
	}
	if want := clock.Now().Add(DefaultOAuth2Lifetime); !c.Expires.Equal(want) {
		t.Errorf("Expires %v, want the assumed lifetime %v", c.Expires, want)
	}
	if !strings.Contains(c.Meta["expires_in"], "assumed") {
		t.Errorf("meta %v does not say the lifetime was assumed", c.Meta)
	}
	// Through the cache: kept for the assumed lifetime minus the margin only.
	src := NewCache("api", raw, CacheOptions{TTL: time.Hour, Clock: clock})
	for i := 0; i < 3; i++ {
		if _, err := src.Credential(context.Background(), idA, grant); err != nil {
			t.Fatal(err)
		}
	}
	clock.Advance(DefaultOAuth2Lifetime - DefaultMargin)
	if _, err := src.Credential(context.Background(), idA, grant); err != nil {
		t.Fatal(err)
	}
	if got := f.hits.Load(); got != 3 { // raw call, first cached fetch, refetch after the margin
		t.Errorf("%d token requests, want 3", got)
	}
}

func TestOAuth2ExpiresInForms(t *testing.T) {
	for _, tc := range []struct {
		body string
		want time.Duration
	}{
		{`{"access_token":"t","expires_in":120}`, 120 * time.Second},
		{`{"access_token":"t","expires_in":"120"}`, 120 * time.Second},
		{`{"access_token":"t","expires_in":0}`, DefaultOAuth2Lifetime},
		{`{"access_token":"t","expires_in":null}`, DefaultOAuth2Lifetime},
	} {
		clock := newFakeClock()
		f := newFakeTokenEndpoint(t, 200, "application/json", tc.body)
		src, _ := NewOAuth2("api", OAuth2Options{TokenURL: f.srv.URL, ClientID: "kg", ClientSecret: StaticSecret(broker.NewSecret("s")), Clock: clock})
		c, err := src.Credential(context.Background(), idA, grant)
		if err != nil {
			t.Fatalf("%s: %v", tc.body, err)
		}
		if got := c.Expires.Sub(clock.Now()); got != tc.want {
			t.Errorf("%s: lifetime %v, want %v", tc.body, got, tc.want)
		}
	}
	// Form-encoded answers (RFC 6749 allows only JSON, some servers send this).
	f := newFakeTokenEndpoint(t, 200, "application/x-www-form-urlencoded", "access_token=formtok&token_type=bearer&expires_in=90")
	clock := newFakeClock()
	src, _ := NewOAuth2("api", OAuth2Options{TokenURL: f.srv.URL, ClientID: "kg", ClientSecret: StaticSecret(broker.NewSecret("s")), Clock: clock})
	c, err := src.Credential(context.Background(), idA, grant)
	if err != nil || token(t, c) != "formtok" || c.Expires.Sub(clock.Now()) != 90*time.Second {
		t.Errorf("form answer: %v %v", err, c.Expires.Sub(clock.Now()))
	}
}

// TestOAuth2Wire checks what is sent: the auth method, scopes, audience
// and resource, and the private_key_jwt assertion (RFC 7523).
func TestOAuth2Wire(t *testing.T) {
	ecKey, ecPEM := ecKeyPEM(t)
	var got url.Values
	var gotAuth string
	f := newFakeTokenEndpoint(t, 200, "application/json", `{"access_token":"t","expires_in":60}`)
	f.reply = func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		got, gotAuth = r.PostForm, r.Header.Get("Authorization")
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"access_token":"t","expires_in":60}`)
	}
	ctx := context.Background()
	mk := func(o OAuth2Options) broker.Source {
		o.TokenURL, o.ClientID = f.srv.URL+"/oauth/token", "kg client"
		src, err := NewOAuth2("api", o)
		if err != nil {
			t.Fatal(err)
		}
		return src
	}
	if _, err := mk(OAuth2Options{ClientSecret: StaticSecret(broker.NewSecret("p@ss:word")), Scopes: []string{"b", "a", "b"},
		Audience: "https://aud.example", Resource: "https://res.example"}).Credential(ctx, idA, grant); err != nil {
		t.Fatal(err)
	}
	wantBasic := "Basic " + base64.StdEncoding.EncodeToString([]byte(url.QueryEscape("kg client")+":"+url.QueryEscape("p@ss:word")))
	if gotAuth != wantBasic || got.Get("client_secret") != "" || got.Get("grant_type") != "client_credentials" ||
		got.Get("scope") != "a b" || got.Get("audience") != "https://aud.example" || got.Get("resource") != "https://res.example" {
		t.Errorf("basic: auth %q form %v", gotAuth, got)
	}
	if _, err := mk(OAuth2Options{AuthMethod: AuthClientSecretPost, ClientSecret: StaticSecret(broker.NewSecret("pw"))}).Credential(ctx, idA,
		broker.Grant{Params: map[string]string{ParamOAuth2Scopes: ""}}); err != nil {
		t.Fatal(err)
	}
	if gotAuth != "" || got.Get("client_id") != "kg client" || got.Get("client_secret") != "pw" || got.Has("scope") {
		t.Errorf("post: auth %q form %v", gotAuth, got)
	}
	clock := newFakeClock()
	if _, err := mk(OAuth2Options{AuthMethod: AuthPrivateKeyJWT, PrivateKey: StaticSecret(broker.NewSecret(ecPEM)), Clock: clock}).Credential(ctx, idA, grant); err != nil {
		t.Fatal(err)
	}
	if gotAuth != "" || got.Get("client_secret") != "" || got.Get("client_assertion_type") != clientAssertionType || got.Get("client_id") != "kg client" {
		t.Fatalf("private_key_jwt: auth %q form %v", gotAuth, got)
	}
	jws, err := jose.ParseSignedCompact(got.Get("client_assertion"), []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatal(err)
	}
	payload, err := jws.Verify(&ecKey.PublicKey)
	if err != nil {
		t.Fatalf("assertion signature: %v", err)
	}
	for _, want := range []string{`"iss":"kg client"`, `"sub":"kg client"`, `"aud":"` + f.srv.URL + `/oauth/token"`,
		fmt.Sprintf(`"exp":%d`, clock.Now().Add(time.Minute).Unix()), `"jti":"`} {
		if !strings.Contains(string(payload), want) {
			t.Errorf("assertion %s lacks %s", payload, want)
		}
	}
	first := got.Get("client_assertion")
	if _, err := mk(OAuth2Options{AuthMethod: AuthPrivateKeyJWT, PrivateKey: StaticSecret(broker.NewSecret(ecPEM)), Clock: clock}).Credential(ctx, idA, grant); err != nil {
		t.Fatal(err)
	}
	if got.Get("client_assertion") == first {
		t.Error("two token requests reused one client assertion (jti must be fresh)")
	}
}

func TestOAuth2Options(t *testing.T) {
	sec := StaticSecret(broker.NewSecret("s"))
	for _, tc := range []struct {
		name string
		o    OAuth2Options
		want string
	}{
		{"no url", OAuth2Options{ClientID: "c", ClientSecret: sec}, "token_url"},
		{"plain http elsewhere", OAuth2Options{TokenURL: "http://idp.example/token", ClientID: "c", ClientSecret: sec}, "must be https"},
		{"userinfo", OAuth2Options{TokenURL: "https://u:p@idp.example/token", ClientID: "c", ClientSecret: sec}, "without credentials"},
		{"no client id", OAuth2Options{TokenURL: "https://idp.example/token", ClientSecret: sec}, "client_id"},
		{"no secret", OAuth2Options{TokenURL: "https://idp.example/token", ClientID: "c"}, "needs a client secret"},
		{"no key", OAuth2Options{TokenURL: "https://idp.example/token", ClientID: "c", AuthMethod: AuthPrivateKeyJWT}, "needs a private key"},
		{"bad method", OAuth2Options{TokenURL: "https://idp.example/token", ClientID: "c", AuthMethod: "tls_client_auth", ClientSecret: sec}, "auth_method"},
		{"bad scope", OAuth2Options{TokenURL: "https://idp.example/token", ClientID: "c", ClientSecret: sec, Scopes: []string{"a b"}}, "scope 1"},
		{"ok on loopback http", OAuth2Options{TokenURL: "http://127.0.0.1:9/token", ClientID: "c", ClientSecret: sec}, ""},
	} {
		_, err := NewOAuth2("x", tc.o)
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: error %v, want %q", tc.name, err, tc.want)
		}
	}
}

func TestCanonicalScopes(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want string
		err  bool
	}{
		{nil, "", false},
		{[]string{"write", "read", "write"}, "read write", false},
		{[]string{"repo:read", "https://graph.example/.default"}, "https://graph.example/.default repo:read", false},
		{[]string{""}, "", true},
		{[]string{"a b"}, "", true},
		{[]string{`a"b`}, "", true},
		{[]string{`a\b`}, "", true},
		{[]string{"é"}, "", true},
		{[]string{"a\nb"}, "", true},
		{[]string{strings.Repeat("x", 257)}, "", true},
	} {
		got, err := CanonicalScopes(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("CanonicalScopes(%q) = %q, %v", tc.in, got, err)
		}
	}
}

// FuzzScopesParam: whatever a scopes expression yields, the parameter is
// either refused or canonical (a fixed point) and made only of valid
// scope-tokens.
func FuzzScopesParam(f *testing.F) {
	for _, s := range []string{`["read","write"]`, `[]`, `["b","a","b"]`, `["a b"]`, `{"a":1}`, `["\u0000"]`, `"read"`, `[1]`, `["x"] []`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, js string) {
		p, err := ScopesParam(js)
		if err != nil {
			if strings.Contains(err.Error(), js) && len(js) > 8 {
				t.Fatalf("error quotes the input: %v", err)
			}
			return
		}
		again, err := CanonicalScopes(strings.Fields(p))
		if err != nil || again != p {
			t.Fatalf("not canonical: %q -> %q, %v", p, again, err)
		}
		for i := 0; i < len(p); i++ {
			if c := p[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' {
				t.Fatalf("byte %q in %q", c, p)
			}
		}
	})
}

// FuzzOAuth2TokenResponse: any token endpoint answer gives either a
// credential that can be injected as is, expiring in the future, or a
// credential_malformed / credential_unavailable error that holds neither
// the client secret nor the response's token.
func FuzzOAuth2TokenResponse(f *testing.F) {
	for _, s := range []struct {
		status int
		ctype  string
		body   string
	}{
		{200, "application/json", `{"access_token":"abc","token_type":"Bearer","expires_in":300}`},
		{200, "application/json", `{"access_token":"abc\r\n","expires_in":300}`},
		{200, "application/json", `{"access_token":"abc","expires_in":-1}`},
		{200, "application/json", `{"access_token":"abc","expires_in":1e400}`},
		{200, "application/json", `{"access_token":"abc","expires_in":"12.5"}`},
		{200, "application/x-www-form-urlencoded", `access_token=abc&expires_in=5`},
		{400, "application/json", `{"error":"invalid_client","error_description":"SECRET-fuzz-client"}`},
		{200, "text/plain", `garbage`},
		{302, "", ``},
	} {
		f.Add(s.status, s.ctype, s.body)
	}
	const secret = "SECRET-fuzz-client"
	f.Fuzz(func(t *testing.T, status int, ctype, body string) {
		if status < 100 || status > 599 {
			return
		}
		client := &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
			h := http.Header{}
			if ctype != "" {
				h.Set("Content-Type", ctype)
			}
			return &http.Response{StatusCode: status, Status: fmt.Sprint(status), Header: h,
				Body: io.NopCloser(strings.NewReader(body)), Request: r}, nil
		}), CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		clock := newFakeClock()
		src, err := NewOAuth2("api", OAuth2Options{TokenURL: "https://idp.example/token", ClientID: "kg",
			ClientSecret: StaticSecret(broker.NewSecret(secret)), HTTPClient: client, Clock: clock})
		if err != nil {
			t.Fatal(err)
		}
		c, err := src.Credential(context.Background(), idA, grant)
		if err != nil {
			var be *broker.Error
			if !errors.As(err, &be) || (be.Code != broker.CodeCredentialMalformed && be.Code != broker.CodeCredentialUnavailable) {
				t.Fatalf("error %v is not malformed/unavailable", err)
			}
			if strings.Contains(err.Error(), secret) || strings.Contains(be.Message, secret) {
				t.Fatalf("error holds the client secret: %v", err)
			}
			return
		}
		tok := token(t, c)
		if strings.Contains(tok, secret) || strings.Contains(c.Meta["scope"], secret) {
			t.Fatalf("accepted a token or scope holding the client secret")
		}
		if err := CheckValue("Bearer " + tok); err != nil {
			t.Fatalf("accepted a token that cannot be injected: %v", err)
		}
		if !c.Expires.After(clock.Now()) {
			t.Fatalf("accepted a token that expires at %v (now %v)", c.Expires, clock.Now())
		}
	})
}

// BenchmarkOAuth2CachedToken is the hot path: a cached oauth2 token, no
// token-endpoint call, through the cache and the scopes decorator.
func BenchmarkOAuth2CachedToken(b *testing.B) {
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		hits.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"access_token":"bench-token","token_type":"Bearer","expires_in":3600}`)
	}))
	defer srv.Close()
	raw, err := NewOAuth2("api", OAuth2Options{TokenURL: srv.URL, ClientID: "kg", ClientSecret: StaticSecret(broker.NewSecret("s"))})
	if err != nil {
		b.Fatal(err)
	}
	src := WithParams(NewCache("api", raw, CacheOptions{TTL: time.Hour}),
		func(context.Context, broker.Identity, broker.Target) (map[string]string, error) {
			return map[string]string{ParamOAuth2Scopes: "read"}, nil
		})
	ctx := context.Background()
	inj := Bearer()
	r := httptest.NewRequest(http.MethodGet, "https://api.example.test/v1/items", nil)
	if _, err := src.Credential(ctx, idA, grant); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		c, err := src.Credential(ctx, idA, grant)
		if err != nil {
			b.Fatal(err)
		}
		if err := inj.Inject(r, c); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if hits.Load() != 1 {
		b.Fatalf("%d token requests, want 1", hits.Load())
	}
}

// TestTokenSourcesVerifyTLS (T-C1): a token endpoint or GitHub API whose
// certificate the broker does not trust gets nothing: not the client
// secret, not the app JWT; the caller gets 503.
func TestTokenSourcesVerifyTLS(t *testing.T) {
	var hits atomic.Int64
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		hits.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"access_token":"t","expires_in":60,"id":1,"token":"t","expires_at":"2099-01-01T00:00:00Z"}`)
	}))
	defer srv.Close()
	secret := canary(t)
	oa, err := NewOAuth2("api", OAuth2Options{TokenURL: srv.URL + "/token", ClientID: "kg", ClientSecret: StaticSecret(broker.NewSecret(secret))})
	if err != nil {
		t.Fatal(err)
	}
	_, err = oa.Credential(context.Background(), idA, grant)
	be := expectCode(t, err, broker.CodeCredentialUnavailable)
	assertNoCanary(t, secret, err, be.Message)
	_, keyPEM := rsaKeyPEM(t)
	gh, err := NewGitHubApp("gh", GitHubAppOptions{AppID: "1", PrivateKey: StaticSecret(broker.NewSecret(keyPEM)), APIURL: srv.URL, InstallationID: 1})
	if err != nil {
		t.Fatal(err)
	}
	_, err = gh.Credential(context.Background(), idA, grant)
	expectCode(t, err, broker.CodeCredentialUnavailable)
	if hits.Load() != 0 {
		t.Errorf("the untrusted server answered %d requests", hits.Load())
	}
}
