package testservers

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	jose "github.com/go-jose/go-jose/v4"

	"github.com/keygate/broker/internal/canarytest"
)

// OIDCProviderVersion must match scripts/oidc-provider.sh and
// oidcprovider/package.json.
const OIDCProviderVersion = "9.13.3"

// OIDCClient is one client registered at the provider.
type OIDCClient struct {
	ID string `json:"client_id"`
	// Secret, for client_secret_basic and client_secret_post.
	Secret string `json:"client_secret,omitempty"`
	// AuthMethod is client_secret_basic, client_secret_post or
	// private_key_jwt.
	AuthMethod string `json:"token_endpoint_auth_method"`
	// JWKS holds the client's public keys, for private_key_jwt.
	JWKS *jose.JSONWebKeySet `json:"jwks,omitempty"`
}

// OIDCProviderOptions configure StartOIDCProvider.
type OIDCProviderOptions struct {
	Clients []OIDCClient
	// Resource is the one resource server (RFC 8707) tokens are for, and
	// their aud; "" means https://api.example.test.
	Resource string
	// Scopes the resource server knows; nil means read and write.
	Scopes []string
	// AccessTokenTTL; 0 means 5 minutes.
	AccessTokenTTL time.Duration
}

// OIDCProvider is a running oidc-provider (the npm package, an OpenID
// Certified provider) on 127.0.0.1 over plain http, issuing JWT access
// tokens (RFC 9068, ES256) with the client-credentials grant.
type OIDCProvider struct {
	Issuer   string // http://127.0.0.1:PORT
	TokenURL string
	JWKSURL  string
	Resource string
	Scopes   []string
	LogFile  string

	t      testing.TB
	node   string
	module string
	cfg    string
	addr   string
	mu     sync.Mutex
	cmd    *exec.Cmd
	done   <-chan struct{}
}

// npmCacheDir is where scripts/*.sh install npm packages.
func npmCacheDir() string {
	return filepath.Join(filepath.Dir(cacheDir()), "npm")
}

// StartOIDCProvider starts oidc-provider with the given clients and stops it
// when the test ends. Without node or the installed package the test is
// skipped (failed in CI), naming scripts/oidc-provider.sh.
func StartOIDCProvider(t testing.TB, o OIDCProviderOptions) *OIDCProvider {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		Missing(t, "node is not installed (apt-get install nodejs npm; then scripts/oidc-provider.sh)")
	}
	module := filepath.Join(npmCacheDir(), "oidc-provider-"+OIDCProviderVersion, "node_modules", "oidc-provider", "lib", "index.js")
	if _, err := os.Stat(module); err != nil {
		Missing(t, "%s not found; install it with scripts/oidc-provider.sh (make deps)", module)
	}
	if o.Resource == "" {
		o.Resource = "https://api.example.test"
	}
	if o.Scopes == nil {
		o.Scopes = []string{"read", "write"}
	}
	if o.AccessTokenTTL == 0 {
		o.AccessTokenTTL = 5 * time.Minute
	}
	dir := t.TempDir()
	p := &OIDCProvider{
		Resource: o.Resource,
		Scopes:   o.Scopes,
		LogFile:  filepath.Join(dir, "oidc-provider.log"),
		t:        t,
		node:     node,
		module:   module,
		cfg:      filepath.Join(dir, "config.json"),
		addr:     freeAddr(t),
	}
	_, port, _ := net.SplitHostPort(p.addr)
	p.Issuer = "http://" + p.addr
	p.TokenURL = p.Issuer + "/token"
	p.JWKSURL = p.Issuer + "/jwks"
	clients := o.Clients
	for _, c := range clients {
		if c.Secret != "" {
			canarytest.Register("oidc-client-secret ("+c.ID+")", c.Secret)
		}
	}
	if clients == nil {
		clients = []OIDCClient{}
	}
	cfg, err := json.Marshal(map[string]any{
		"port":             mustAtoi(port),
		"issuer":           p.Issuer,
		"resource":         o.Resource,
		"scopes":           o.Scopes,
		"access_token_ttl": int(o.AccessTokenTTL / time.Second),
		"clients":          clients,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p.cfg, cfg, 0o600); err != nil {
		t.Fatal(err)
	}
	p.Start()
	t.Cleanup(p.Stop)
	return p
}

func mustAtoi(s string) int {
	n := 0
	for _, c := range s {
		n = n*10 + int(c-'0')
	}
	return n
}

// serverScript is server.mjs next to this file.
func serverScript() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "oidcprovider", "server.mjs")
}

// Start (re)starts the provider on the same address and waits for its
// discovery document. A restarted provider has a new signing key and has
// forgotten every token (in-memory storage).
func (p *OIDCProvider) Start() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		return
	}
	cmd := exec.Command(p.node, serverScript(), p.cfg)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + filepath.Dir(p.cfg),
		"OIDC_PROVIDER_MODULE=" + p.module, "NODE_ENV=test"}
	p.cmd, p.done = cmd, startLogged(p.t, "oidc-provider", cmd, p.LogFile)
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{Proxy: nil}}
	defer client.CloseIdleConnections()
	waitHTTP(p.t, "oidc-provider", client, p.Issuer+"/.well-known/openid-configuration", p.done, p.LogFile)
}

// Stop ends the provider (SIGKILL) and waits until its port is free.
func (p *OIDCProvider) Stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return
	}
	kill(p.cmd, p.done, p.addr)
	p.cmd = nil
}

// Log is what the provider printed.
func (p *OIDCProvider) Log() string {
	b, _ := os.ReadFile(p.LogFile)
	return string(b)
}

// ResourceVerifier is what a resource server does with a bearer token from
// this provider: verify the JWT access token's signature against the
// provider's JWKS (fetched over HTTP, refreshed on an unknown kid), its
// issuer, that its aud is the resource, and its expiry (go-oidc's
// verifier, ES256 only). It returns the token's claims.
func (p *OIDCProvider) ResourceVerifier() func(ctx context.Context, token string) (map[string]any, error) {
	keys := oidc.NewRemoteKeySet(context.Background(), p.JWKSURL)
	v := oidc.NewVerifier(p.Issuer, keys, &oidc.Config{ClientID: p.Resource, SupportedSigningAlgs: []string{"ES256"}})
	return func(ctx context.Context, token string) (map[string]any, error) {
		tok, err := v.Verify(ctx, token)
		if err != nil {
			return nil, err
		}
		var claims map[string]any
		if err := tok.Claims(&claims); err != nil {
			return nil, err
		}
		return claims, nil
	}
}
