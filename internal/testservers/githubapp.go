package testservers

// Why this server is local: no GitHub server can run here. github.com is a
// hosted service the tests cannot reach (no network), and GitHub Enterprise
// Server is a virtual-machine appliance that no reachable registry (Go
// module proxy, Debian, npm) ships. So this file implements, from GitHub's
// REST API documentation ("Authenticating as a GitHub App", "REST API
// endpoints for GitHub Apps", API version 2022-11-28), exactly the
// endpoints keygate's github_app source calls — and checks what GitHub
// checks:
//
//   - GET /repos/{owner}/{repo}/installation and GET /orgs/{org}/installation,
//     authenticated with the app JWT;
//   - POST /app/installations/{installation_id}/access_tokens with optional
//     repositories (names, in the installation's account) and permissions,
//     answering 201 {token, expires_at, permissions, repository_selection,
//     repositories}; 422 for a repository or permission the installation
//     does not have;
//   - the app JWT must be RS256, signed by the app's private key (verified
//     with its public key), iss the app ID, iat not in the future (60 s
//     leeway), exp after now and at most 10 minutes after iat.
//
// Installation tokens it issued are accepted by GET /repos/{owner}/{repo}
// (the REST API, Bearer or "token" scheme) and by GitHub.GitHandler, a git
// smart-HTTP server (git http-backend, the real program) that takes them as
// Basic x-access-token:<token>, like github.com: reads need contents read,
// pushes contents write, each for a repository the token covers. Nothing
// else is accepted.

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/cgi"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/keygate/broker/internal/canarytest"
)

// GitHubInstallation is one installation of the app on an account.
type GitHubInstallation struct {
	ID      int64
	Account string            // owner login
	Repos   []string          // repository names (without owner) it can reach
	Perms   map[string]string // what the app was granted: permission → level
}

// IssuedToken is an installation token the server minted.
type IssuedToken struct {
	Token        string
	Installation int64
	Account      string
	Repos        []string // names it covers (all of the installation's when none were asked)
	Perms        map[string]string
	ExpiresAt    time.Time
}

// GitHub is the local GitHub App API stand-in.
type GitHub struct {
	AppID  string
	Key    *rsa.PrivateKey
	KeyPEM []byte // PKCS#1, as GitHub hands out app keys
	// TokenTTL is the life of an installation token (GitHub: 1 hour).
	TokenTTL time.Duration
	// Now is the server's clock (nil: time.Now): tests on a fake clock
	// give the broker and the stand-in the same one.
	Now func() time.Time
	// Fault, when set, may answer a request itself (return true) before
	// the normal handling: for fault injection.
	Fault func(w http.ResponseWriter, r *http.Request) bool

	mu            sync.Mutex
	installations []GitHubInstallation
	issued        map[string]*IssuedToken
	Lookups       atomic.Int64 // installation lookups answered
	Exchanges     atomic.Int64 // access_tokens calls answered 201
	BadJWTs       atomic.Int64
}

// NewGitHub makes the stand-in with a fresh 2048-bit app key.
func NewGitHub(t testing.TB, appID string, installs ...GitHubInstallation) *GitHub {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)})
	// The sweep looks for a line of the key body: any copy of the PEM (or
	// of its base64) contains it.
	canarytest.Register("github-app-private-key", strings.Split(string(keyPEM), "\n")[2])
	return &GitHub{
		AppID:         appID,
		Key:           k,
		KeyPEM:        keyPEM,
		TokenTTL:      time.Hour,
		installations: installs,
		issued:        map[string]*IssuedToken{},
	}
}

// Issued lists the tokens minted so far.
func (g *GitHub) Issued() []IssuedToken {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]IssuedToken, 0, len(g.issued))
	for _, t := range g.issued {
		out = append(out, *t)
	}
	slices.SortFunc(out, func(a, b IssuedToken) int { return strings.Compare(a.Token, b.Token) })
	return out
}

// Revoke forgets a token (DELETE /installation/token).
func (g *GitHub) Revoke(token string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.issued, token)
}

func ghError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"message": msg,
		"documentation_url": "https://docs.github.com/rest", "status": strconv.Itoa(status)})
}

// checkAppJWT verifies the Authorization: Bearer app JWT.
func (g *GitHub) checkAppJWT(r *http.Request) bool {
	raw, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return false
	}
	tok, err := jwt.ParseSigned(raw, []jose.SignatureAlgorithm{jose.RS256})
	if err != nil {
		return false
	}
	var c jwt.Claims
	if err := tok.Claims(&g.Key.PublicKey, &c); err != nil {
		return false
	}
	now := g.now()
	if c.Issuer != g.AppID || c.IssuedAt == nil || c.Expiry == nil {
		return false
	}
	iat, exp := c.IssuedAt.Time(), c.Expiry.Time()
	if iat.After(now.Add(60*time.Second)) || !exp.After(now) || exp.Sub(iat) > 10*time.Minute {
		return false
	}
	return true
}

func (g *GitHub) installationFor(account, repo string) (GitHubInstallation, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, in := range g.installations {
		if !strings.EqualFold(in.Account, account) {
			continue
		}
		if repo == "" || slices.ContainsFunc(in.Repos, func(r string) bool { return strings.EqualFold(r, repo) }) {
			return in, true
		}
	}
	return GitHubInstallation{}, false
}

// Handler serves the REST API endpoints described at the top of the file.
func (g *GitHub) Handler() http.Handler {
	mux := http.NewServeMux()
	app := func(h http.HandlerFunc) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			if g.Fault != nil && g.Fault(w, r) {
				return
			}
			if !g.checkAppJWT(r) {
				g.BadJWTs.Add(1)
				ghError(w, http.StatusUnauthorized, "A JSON web token could not be decoded")
				return
			}
			h(w, r)
		}
	}
	lookup := func(w http.ResponseWriter, account, repo string) {
		in, ok := g.installationFor(account, repo)
		if !ok {
			ghError(w, http.StatusNotFound, "Not Found")
			return
		}
		g.Lookups.Add(1)
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"id": in.ID, "app_id": g.AppID, "target_type": "Organization",
			"account":     map[string]any{"login": in.Account},
			"permissions": in.Perms, "repository_selection": "selected",
		})
	}
	mux.HandleFunc("GET /repos/{owner}/{repo}/installation", app(func(w http.ResponseWriter, r *http.Request) {
		lookup(w, r.PathValue("owner"), r.PathValue("repo"))
	}))
	mux.HandleFunc("GET /orgs/{org}/installation", app(func(w http.ResponseWriter, r *http.Request) {
		lookup(w, r.PathValue("org"), "")
	}))
	mux.HandleFunc("POST /app/installations/{id}/access_tokens", app(func(w http.ResponseWriter, r *http.Request) {
		id, _ := strconv.ParseInt(r.PathValue("id"), 10, 64)
		var in GitHubInstallation
		found := false
		g.mu.Lock()
		for _, x := range g.installations {
			if x.ID == id {
				in, found = x, true
			}
		}
		g.mu.Unlock()
		if !found {
			ghError(w, http.StatusNotFound, "Not Found")
			return
		}
		var body struct {
			Repositories []string          `json:"repositories"`
			Permissions  map[string]string `json:"permissions"`
		}
		if r.ContentLength > 0 {
			if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&body); err != nil {
				ghError(w, http.StatusBadRequest, "Problems parsing JSON")
				return
			}
		}
		repos := in.Repos
		if len(body.Repositories) > 0 {
			for _, name := range body.Repositories {
				if !slices.ContainsFunc(in.Repos, func(r string) bool { return strings.EqualFold(r, name) }) {
					ghError(w, http.StatusUnprocessableEntity, "There is at least one repository that does not exist or is not accessible to the parent installation.")
					return
				}
			}
			repos = body.Repositories
		}
		perms := in.Perms
		if len(body.Permissions) > 0 {
			for p, lvl := range body.Permissions {
				if !levelCovers(in.Perms[p], lvl) {
					ghError(w, http.StatusUnprocessableEntity, "The permissions requested are not granted to this installation.")
					return
				}
			}
			perms = body.Permissions
		}
		b := make([]byte, 18)
		_, _ = rand.Read(b)
		it := &IssuedToken{
			Token:        "ghs_" + strings.TrimRight(base64.RawURLEncoding.EncodeToString(b), "=") + "KG" + hex.EncodeToString(b[:4]),
			Installation: in.ID, Account: in.Account, Repos: repos, Perms: perms,
			ExpiresAt: g.now().Add(g.TokenTTL).UTC().Truncate(time.Second),
		}
		canarytest.Register("github-installation-token", it.Token)
		g.mu.Lock()
		g.issued[it.Token] = it
		g.mu.Unlock()
		g.Exchanges.Add(1)
		list := make([]map[string]any, 0, len(repos))
		for _, n := range repos {
			list = append(list, map[string]any{"name": n, "full_name": in.Account + "/" + n, "private": true})
		}
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		w.WriteHeader(http.StatusCreated)
		_ = json.NewEncoder(w).Encode(map[string]any{
			"token": it.Token, "expires_at": it.ExpiresAt.Format(time.RFC3339),
			"permissions": perms, "repository_selection": "selected", "repositories": list,
		})
	}))
	mux.HandleFunc("GET /repos/{owner}/{repo}", func(w http.ResponseWriter, r *http.Request) {
		if g.Fault != nil && g.Fault(w, r) {
			return
		}
		owner, repo := r.PathValue("owner"), r.PathValue("repo")
		tok, ok := g.tokenFromAPIAuth(r.Header.Values("Authorization"))
		if !ok {
			ghError(w, http.StatusUnauthorized, "Bad credentials")
			return
		}
		if !tok.covers(owner, repo) || !levelCovers(tok.Perms["metadata"], "read") && !levelCovers(tok.Perms["contents"], "read") {
			ghError(w, http.StatusNotFound, "Not Found")
			return
		}
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		_ = json.NewEncoder(w).Encode(map[string]any{"name": repo, "full_name": tok.Account + "/" + repo, "private": true})
	})
	return mux
}

func (g *GitHub) now() time.Time {
	if g.Now != nil {
		return g.Now()
	}
	return time.Now()
}

func levelCovers(have, want string) bool {
	rank := map[string]int{"read": 1, "write": 2, "admin": 3}
	return rank[have] >= rank[want] && rank[want] > 0
}

func (t *IssuedToken) covers(owner, repo string) bool {
	return strings.EqualFold(owner, t.Account) &&
		slices.ContainsFunc(t.Repos, func(r string) bool { return strings.EqualFold(r, repo) })
}

// Lookup returns the live token a credential value names.
func (g *GitHub) Lookup(token string) (*IssuedToken, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for k, t := range g.issued {
		if subtle.ConstantTimeCompare([]byte(k), []byte(token)) == 1 && g.now().Before(t.ExpiresAt) {
			c := *t
			return &c, true
		}
	}
	return nil, false
}

// tokenFromAPIAuth accepts exactly one "Bearer T" or "token T".
func (g *GitHub) tokenFromAPIAuth(vals []string) (*IssuedToken, bool) {
	if len(vals) != 1 {
		return nil, false
	}
	scheme, tok, ok := strings.Cut(vals[0], " ")
	if !ok || !(strings.EqualFold(scheme, "bearer") || strings.EqualFold(scheme, "token")) {
		return nil, false
	}
	return g.Lookup(tok)
}

// GitHandler serves git smart HTTP for bare repositories under root, laid
// out as root/{owner}/{repo}.git, through the real git http-backend. Every
// request needs exactly one Authorization: Basic x-access-token:<token>
// with a token this server issued for that repository: contents read to
// fetch, contents write to push (git-receive-pack). Anything else gets 401
// with a Basic challenge, or 404 for a repository the token does not cover
// (as github.com answers). seen, when set, is called with the token of
// each accepted request.
func (g *GitHub) GitHandler(t testing.TB, root string, seen func(*IssuedToken)) http.Handler {
	t.Helper()
	git, err := exec.LookPath("git")
	if err != nil {
		Missing(t, "git is not installed: %v", err)
	}
	out, err := exec.Command(git, "--exec-path").Output()
	if err != nil {
		t.Fatalf("git --exec-path: %v", err)
	}
	backend := filepath.Join(strings.TrimSpace(string(out)), "git-http-backend")
	if _, err := os.Stat(backend); err != nil {
		Missing(t, "git-http-backend not found: %v", err)
	}
	cgiHandler := &cgi.Handler{
		Path: backend,
		Env: []string{"GIT_PROJECT_ROOT=" + root, "GIT_HTTP_EXPORT_ALL=1", "GIT_CONFIG_NOSYSTEM=1",
			"HOME=" + root, "REMOTE_USER=" + GitHubTokenUser},
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		challenge := func() {
			w.Header().Set("WWW-Authenticate", `Basic realm="GitHub"`)
			http.Error(w, "Invalid username or token. Password authentication is not supported for Git operations.", http.StatusUnauthorized)
		}
		vals := r.Header.Values("Authorization")
		if len(vals) != 1 {
			challenge()
			return
		}
		user, pass, ok := parseBasic(vals[0])
		if !ok || user != GitHubTokenUser {
			challenge()
			return
		}
		tok, ok := g.Lookup(pass)
		if !ok {
			challenge()
			return
		}
		parts := strings.SplitN(strings.TrimPrefix(r.URL.Path, "/"), "/", 3)
		if len(parts) < 3 || !strings.HasSuffix(parts[1], ".git") {
			http.NotFound(w, r)
			return
		}
		owner, repo := parts[0], strings.TrimSuffix(parts[1], ".git")
		if !tok.covers(owner, repo) || !levelCovers(tok.Perms["contents"], "read") {
			http.Error(w, "Repository not found.", http.StatusNotFound)
			return
		}
		push := r.URL.Query().Get("service") == "git-receive-pack" || strings.HasSuffix(r.URL.Path, "/git-receive-pack")
		if push && !levelCovers(tok.Perms["contents"], "write") {
			http.Error(w, "Permission to "+owner+"/"+repo+" denied to "+GitHubTokenUser+".", http.StatusForbidden)
			return
		}
		if seen != nil {
			seen(tok)
		}
		cgiHandler.ServeHTTP(w, r)
	})
}

// GitHubTokenUser is the Basic user name for installation tokens.
const GitHubTokenUser = "x-access-token"

func parseBasic(v string) (user, pass string, ok bool) {
	raw, ok := strings.CutPrefix(v, "Basic ")
	if !ok {
		return "", "", false
	}
	b, err := base64.StdEncoding.DecodeString(raw)
	if err != nil {
		return "", "", false
	}
	user, pass, ok = strings.Cut(string(b), ":")
	return user, pass, ok
}

// String describes the stand-in for failure messages (no key material).
func (g *GitHub) String() string {
	return fmt.Sprintf("local GitHub App API (app %s)", g.AppID)
}
