package testservers

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// The pinned oidc-provider version is the same in the script, the
// package.json (and its lockfile) and this package.
func TestOIDCProviderPinned(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	for _, f := range []struct{ path, want string }{
		{"scripts/oidc-provider.sh", "OIDC_PROVIDER_VERSION:-" + OIDCProviderVersion + "}"},
		{"internal/testservers/oidcprovider/package.json", `"oidc-provider": "` + OIDCProviderVersion + `"`},
		{"internal/testservers/oidcprovider/package-lock.json", `"node_modules/oidc-provider": {
      "version": "` + OIDCProviderVersion + `"`},
	} {
		b, err := os.ReadFile(filepath.Join(root, f.path))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(b), f.want) {
			t.Errorf("%s does not pin oidc-provider %s", f.path, OIDCProviderVersion)
		}
	}
}

// The provider issues verifiable JWT access tokens to a client that
// authenticates, and refuses one that does not.
func TestOIDCProviderServes(t *testing.T) {
	p := StartOIDCProvider(t, OIDCProviderOptions{Clients: []OIDCClient{{ID: "c1", Secret: "s3cret-s3cret", AuthMethod: "client_secret_basic"}}})
	token := func(secret string) (int, map[string]any) {
		req, _ := http.NewRequest(http.MethodPost, p.TokenURL, strings.NewReader(url.Values{"grant_type": {"client_credentials"}, "scope": {"read"}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.SetBasicAuth("c1", secret)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var m map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&m)
		return resp.StatusCode, m
	}
	st, m := token("s3cret-s3cret")
	if st != 200 {
		t.Fatalf("token: %d %v\n%s", st, m, p.Log())
	}
	claims, err := p.ResourceVerifier()(context.Background(), m["access_token"].(string))
	if err != nil || claims["scope"] != "read" || claims["aud"] != p.Resource {
		t.Fatalf("verify: %v %v", claims, err)
	}
	if st, m := token("wrong"); st != 401 || m["error"] != "invalid_client" {
		t.Errorf("wrong secret: %d %v", st, m)
	}
}

// The GitHub stand-in checks the app JWT, answers 404 for an app not
// installed, and accepts only tokens it issued, until they expire.
func TestGitHubStandIn(t *testing.T) {
	now := time.Now()
	g := NewGitHub(t, "77", GitHubInstallation{ID: 1, Account: "acme", Repos: []string{"app"}, Perms: map[string]string{"contents": "read"}})
	g.Now = func() time.Time { return now }
	srv := httptest.NewServer(g.Handler())
	defer srv.Close()
	sign := func(k *rsa.PrivateKey, iss string, iat, exp time.Time) string {
		s, _ := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: k}, nil)
		raw, _ := jwt.Signed(s).Claims(jwt.Claims{Issuer: iss, IssuedAt: jwt.NewNumericDate(iat), Expiry: jwt.NewNumericDate(exp)}).Serialize()
		return raw
	}
	call := func(method, path, jwtTok string) (int, map[string]any) {
		req, _ := http.NewRequest(method, srv.URL+path, nil)
		req.Header.Set("Authorization", "Bearer "+jwtTok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var m map[string]any
		_ = json.NewDecoder(resp.Body).Decode(&m)
		return resp.StatusCode, m
	}
	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	good := sign(g.Key, "77", now.Add(-time.Minute), now.Add(9*time.Minute))
	for _, tc := range []struct {
		name string
		jwt  string
	}{
		{"other key", sign(other, "77", now.Add(-time.Minute), now.Add(9*time.Minute))},
		{"other app", sign(g.Key, "78", now.Add(-time.Minute), now.Add(9*time.Minute))},
		{"too long", sign(g.Key, "77", now.Add(-time.Minute), now.Add(11*time.Minute))},
		{"expired", sign(g.Key, "77", now.Add(-20*time.Minute), now.Add(-time.Minute))},
	} {
		if st, _ := call("GET", "/repos/acme/app/installation", tc.jwt); st != 401 {
			t.Errorf("%s: %d, want 401", tc.name, st)
		}
	}
	if st, _ := call("GET", "/repos/acme/nope/installation", good); st != 404 {
		t.Errorf("not installed: %d", st)
	}
	st, m := call("POST", "/app/installations/1/access_tokens", good)
	if st != 201 {
		t.Fatalf("access_tokens: %d %v", st, m)
	}
	tok := m["token"].(string)
	if _, ok := g.Lookup(tok); !ok {
		t.Fatal("issued token unknown")
	}
	if _, ok := g.Lookup(tok + "x"); ok {
		t.Fatal("a token it did not issue is accepted")
	}
	now = now.Add(2 * time.Hour)
	if _, ok := g.Lookup(tok); ok {
		t.Fatal("an expired token is accepted")
	}
}
