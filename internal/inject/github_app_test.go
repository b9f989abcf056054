package inject

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/testservers"
)

// The github_app source is tested against testservers.GitHub, a local
// stand-in for the GitHub REST API endpoints it calls (no GitHub server can
// run here; githubapp.go says why). It verifies the app JWT's RS256
// signature with the app's public key, issues tokens, and accepts only the
// tokens it issued.

type ghWorld struct {
	gh   *testservers.GitHub
	srv  *httptest.Server
	hits atomic.Int64
}

func newGHWorld(t *testing.T) *ghWorld {
	t.Helper()
	w := &ghWorld{gh: testservers.NewGitHub(t, "123456",
		testservers.GitHubInstallation{ID: 41, Account: "acme", Repos: []string{"app", "lib", "infra"},
			Perms: map[string]string{"contents": "write", "metadata": "read", "issues": "write"}},
		testservers.GitHubInstallation{ID: 77, Account: "other", Repos: []string{"tool"},
			Perms: map[string]string{"contents": "read", "metadata": "read"}},
	)}
	h := w.gh.Handler()
	w.srv = httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		w.hits.Add(1)
		h.ServeHTTP(rw, r)
	}))
	t.Cleanup(w.srv.Close)
	return w
}

func (w *ghWorld) source(t *testing.T, o GitHubAppOptions) broker.Source {
	t.Helper()
	if o.AppID == "" {
		o.AppID = w.gh.AppID
	}
	if o.PrivateKey == nil {
		o.PrivateKey = StaticSecret(broker.NewSecret(string(w.gh.KeyPEM)))
	}
	o.APIURL = w.srv.URL
	src, err := NewGitHubApp("gh", o)
	if err != nil {
		t.Fatal(err)
	}
	return src
}

func TestGitHubAppMintsNarrowTokens(t *testing.T) {
	w := newGHWorld(t)
	ctx := context.Background()
	cases := []struct {
		name      string
		o         GitHubAppOptions
		params    map[string]string
		account   string
		repos     []string
		perms     map[string]string
		install   string
		lookupURL string
	}{
		{"static repository and permissions", GitHubAppOptions{Repositories: []string{"acme/app"}, Permissions: map[string]string{"contents": "read"}},
			nil, "acme", []string{"app"}, map[string]string{"contents": "read"}, "41", ""},
		{"per request (params win)", GitHubAppOptions{Repositories: []string{"acme/app"}},
			map[string]string{ParamGitHubRepositories: "acme/lib,acme/infra", ParamGitHubPermissions: `{"contents":"write","metadata":"read"}`},
			"acme", []string{"infra", "lib"}, map[string]string{"contents": "write", "metadata": "read"}, "41", ""},
		{"mixed case names", GitHubAppOptions{Repositories: []string{"ACME/App"}, Permissions: map[string]string{"metadata": "read"}},
			nil, "acme", []string{"app"}, map[string]string{"metadata": "read"}, "41", ""},
		{"organisation-wide", GitHubAppOptions{Repositories: []string{"other"}},
			nil, "other", []string{"tool"}, map[string]string{"contents": "read", "metadata": "read"}, "77", ""},
		{"installation_id only", GitHubAppOptions{InstallationID: 77, Permissions: map[string]string{"metadata": "read"}},
			nil, "other", []string{"tool"}, map[string]string{"metadata": "read"}, "77", ""},
		{"installation_id pinned and matching", GitHubAppOptions{InstallationID: 41, Repositories: []string{"acme/app"}},
			nil, "acme", []string{"app"}, map[string]string{"contents": "write", "metadata": "read", "issues": "write"}, "41", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			clock := newFakeClock()
			clock.t = time.Now()
			tc.o.Clock = clock
			c, err := w.source(t, tc.o).Credential(ctx, idA, broker.Grant{Rule: "r", Credential: "gh", Params: tc.params})
			if err != nil {
				t.Fatalf("Credential: %v", err)
			}
			tok := token(t, c)
			it, ok := w.gh.Lookup(tok)
			if !ok {
				t.Fatal("GitHub does not know the token")
			}
			if it.Account != tc.account || strings.Join(it.Repos, ",") != strings.Join(tc.repos, ",") || fmt.Sprint(it.Perms) != fmt.Sprint(tc.perms) {
				t.Errorf("token for %s %v %v, want %s %v %v", it.Account, it.Repos, it.Perms, tc.account, tc.repos, tc.perms)
			}
			if !c.Expires.Equal(it.ExpiresAt) {
				t.Errorf("Expires %v, want expires_at %v", c.Expires, it.ExpiresAt)
			}
			if u, _ := c.Field(broker.FieldUsername); u.Reveal() != GitHubTokenUser {
				t.Errorf("username %q", u.Reveal())
			}
			if p, _ := c.Field(broker.FieldPassword); p.Reveal() != tok {
				t.Error("password is not the token")
			}
			if c.Kind != KindGitHubApp || c.Meta["installation_id"] != tc.install || c.Meta["app_id"] != "123456" {
				t.Errorf("kind %q meta %v", c.Kind, c.Meta)
			}
			// Both injections GitHub accepts.
			r := newReq(t, "https://github.com/acme/app.git/info/refs")
			if err := Basic().Inject(r, c); err != nil {
				t.Fatal(err)
			}
			if want := "Basic " + base64.StdEncoding.EncodeToString([]byte("x-access-token:"+tok)); r.Header.Get("Authorization") != want {
				t.Errorf("basic injection: %q", r.Header.Get("Authorization"))
			}
			if err := Bearer().Inject(r, c); err != nil || r.Header.Get("Authorization") != "Bearer "+tok {
				t.Errorf("bearer injection: %v", err)
			}
		})
	}
}

func TestGitHubAppRefusals(t *testing.T) {
	w := newGHWorld(t)
	ctx := context.Background()
	_, strangerPEM := rsaKeyPEM(t)
	_, ecPEM := ecKeyPEM(t)
	cases := []struct {
		name   string
		o      GitHubAppOptions
		params map[string]string
		fault  func(http.ResponseWriter, *http.Request) bool
		code   string
		msg    string
	}{
		{"not installed on the repository (404)", GitHubAppOptions{Repositories: []string{"acme/secret-project"}}, nil, nil,
			broker.CodeCredentialUnavailable, `GitHub App 123456 is not installed on acme/secret-project (404 from GET /repos/acme/secret-project/installation)`},
		{"not installed on the organisation (404)", GitHubAppOptions{Repositories: []string{"nobody"}}, nil, nil,
			broker.CodeCredentialUnavailable, "is not installed on nobody"},
		{"app JWT signed by another key (401)", GitHubAppOptions{Repositories: []string{"acme/app"}, PrivateKey: StaticSecret(broker.NewSecret(strangerPEM))}, nil, nil,
			broker.CodeCredentialUnavailable, "GitHub refused the app JWT"},
		{"wrong app id (401)", GitHubAppOptions{AppID: "999", Repositories: []string{"acme/app"}}, nil, nil,
			broker.CodeCredentialUnavailable, "answered 401"},
		{"permission the installation lacks (422)", GitHubAppOptions{Repositories: []string{"other/tool"}, Permissions: map[string]string{"contents": "write"}}, nil, nil,
			broker.CodeCredentialUnavailable, "answered 422"},
		{"installation_id mismatch", GitHubAppOptions{InstallationID: 77, Repositories: []string{"acme/app"}}, nil, nil,
			broker.CodeDenied, "not to the configured installation_id 77"},
		{"unknown installation_id", GitHubAppOptions{InstallationID: 5}, nil, nil,
			broker.CodeCredentialUnavailable, "does not exist"},
		{"repositories of two owners", GitHubAppOptions{}, map[string]string{ParamGitHubRepositories: "acme/app,other/tool"}, nil,
			broker.CodeDenied, "another owner"},
		{"repository name with a path", GitHubAppOptions{}, map[string]string{ParamGitHubRepositories: "acme/../admin"}, nil,
			broker.CodeDenied, "not a repository name"},
		{"bad permission level", GitHubAppOptions{Repositories: []string{"acme/app"}}, map[string]string{ParamGitHubPermissions: `{"contents":"all"}`}, nil,
			broker.CodeDenied, "read, write or admin"},
		{"EC key (GitHub needs RS256)", GitHubAppOptions{Repositories: []string{"acme/app"}, PrivateKey: StaticSecret(broker.NewSecret(ecPEM))}, nil, nil,
			broker.CodeCredentialUnavailable, "answered 401"},
		{"server error", GitHubAppOptions{Repositories: []string{"acme/app"}}, nil, replyWith(500, "application/json", `{"message":"Server Error"}`),
			broker.CodeCredentialUnavailable, "answered 500"},
		{"invalid JSON", GitHubAppOptions{Repositories: []string{"acme/app"}}, nil, onTokens(201, `{"token": "ghs_x", `),
			broker.CodeCredentialMalformed, "not the JSON it documents"},
		{"token with CR LF", GitHubAppOptions{Repositories: []string{"acme/app"}}, nil, onTokens(201, `{"token":"ghs_a\r\nX-Evil: 1","expires_at":"2099-01-01T00:00:00Z"}`),
			broker.CodeCredentialMalformed, "control characters"},
		{"empty token", GitHubAppOptions{Repositories: []string{"acme/app"}}, nil, onTokens(201, `{"token":"","expires_at":"2099-01-01T00:00:00Z"}`),
			broker.CodeCredentialMalformed, "holds no token"},
		{"missing expires_at", GitHubAppOptions{Repositories: []string{"acme/app"}}, nil, onTokens(201, `{"token":"ghs_noexpiry"}`),
			broker.CodeCredentialMalformed, "no expires_at"},
		{"expires_at not a time", GitHubAppOptions{Repositories: []string{"acme/app"}}, nil, onTokens(201, `{"token":"ghs_x","expires_at":"tomorrow"}`),
			broker.CodeCredentialMalformed, "not the JSON it documents"},
		{"already expired", GitHubAppOptions{Repositories: []string{"acme/app"}}, nil, onTokens(201, `{"token":"ghs_old","expires_at":"2001-01-01T00:00:00Z"}`),
			broker.CodeCredentialMalformed, "already expired"},
		{"200 instead of 201", GitHubAppOptions{Repositories: []string{"acme/app"}}, nil, onTokens(200, `{"token":"ghs_x","expires_at":"2099-01-01T00:00:00Z"}`),
			broker.CodeCredentialUnavailable, "answered 200"},
		{"redirect is not followed", GitHubAppOptions{Repositories: []string{"acme/app"}}, nil, func(rw http.ResponseWriter, r *http.Request) bool {
			http.Redirect(rw, r, "https://evil.example/steal", http.StatusTemporaryRedirect)
			return true
		}, broker.CodeCredentialUnavailable, "does not follow redirects"},
		{"rate limited", GitHubAppOptions{Repositories: []string{"acme/app"}}, nil, func(rw http.ResponseWriter, r *http.Request) bool {
			rw.Header().Set("Retry-After", "30")
			return replyWith(429, "application/json", `{"message":"API rate limit exceeded"}`)(rw, r)
		}, broker.CodeCredentialUnavailable, "answered 429"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w.gh.Fault = tc.fault
			defer func() { w.gh.Fault = nil }()
			before := len(w.gh.Issued())
			_, err := w.source(t, tc.o).Credential(ctx, idA, broker.Grant{Rule: "r", Credential: "gh", Params: tc.params})
			be := expectCode(t, err, tc.code)
			if !strings.Contains(be.Message, tc.msg) {
				t.Errorf("message %q, want %q", be.Message, tc.msg)
			}
			if tc.name == "rate limited" && be.RetryAfter != 30*time.Second {
				t.Errorf("RetryAfter %v", be.RetryAfter)
			}
			for _, leak := range []string{"ghs_", "BEGIN", "\r", "\n", "X-Evil", "eyJ"} {
				if strings.Contains(err.Error(), leak) {
					t.Errorf("error holds %q: %v", leak, err)
				}
			}
			if tc.fault == nil && len(w.gh.Issued()) != before {
				t.Errorf("a refused call still minted a token")
			}
		})
	}
}

func replyWith(status int, ctype, body string) func(http.ResponseWriter, *http.Request) bool {
	return func(rw http.ResponseWriter, _ *http.Request) bool {
		rw.Header().Set("Content-Type", ctype)
		rw.WriteHeader(status)
		_, _ = io.WriteString(rw, body)
		return true
	}
}

// onTokens replaces only the access_tokens answer.
func onTokens(status int, body string) func(http.ResponseWriter, *http.Request) bool {
	return func(rw http.ResponseWriter, r *http.Request) bool {
		if !strings.HasSuffix(r.URL.Path, "/access_tokens") {
			return false
		}
		return replyWith(status, "application/json", body)(rw, r)
	}
}

// TestGitHubAppAppJWT: the JWT GitHub receives is RS256, iss = app id, iat
// 60 s back, exp at most 10 minutes after iat (checked by the stand-in;
// here on a skewed fake clock the stand-in must refuse it).
func TestGitHubAppAppJWT(t *testing.T) {
	w := newGHWorld(t)
	clock := newFakeClock()
	clock.t = time.Now().Add(-20 * time.Minute) // the broker's clock is 20 minutes slow
	_, err := w.source(t, GitHubAppOptions{Repositories: []string{"acme/app"}, Clock: clock}).Credential(context.Background(), idA, grant)
	be := expectCode(t, err, broker.CodeCredentialUnavailable)
	if !strings.Contains(be.Message, "clock") {
		t.Errorf("message %q should point at the clock", be.Message)
	}
	if w.gh.BadJWTs.Load() != 1 {
		t.Errorf("BadJWTs %d", w.gh.BadJWTs.Load())
	}
}

// TestGitHubAppCachedPerParams: through WithParams and the cache, one token
// per (repositories, permissions) set and caller, reused until a margin
// before expires_at.
func TestGitHubAppCachedPerParams(t *testing.T) {
	w := newGHWorld(t)
	clock := newFakeClock()
	clock.t = time.Now()
	w.gh.Now = clock.Now
	raw := w.source(t, GitHubAppOptions{Clock: clock})
	perm := "read"
	src := WithParams(NewCache("gh", raw, CacheOptions{TTL: 2 * time.Hour, Clock: clock}),
		func(_ context.Context, id broker.Identity, _ broker.Target) (map[string]string, error) {
			return map[string]string{ParamGitHubRepositories: id.Claims["repository"].(string),
				ParamGitHubPermissions: `{"contents":"` + perm + `"}`}, nil
		})
	job := func(repo string) broker.Identity {
		return broker.Identity{ID: "repo:" + repo + ":ref:refs/heads/main", Method: broker.MethodOIDC, Claims: map[string]any{"repository": repo}}
	}
	ctx := context.Background()
	get := func(id broker.Identity) string {
		t.Helper()
		c, err := src.Credential(ctx, id, grant)
		if err != nil {
			t.Fatal(err)
		}
		return token(t, c)
	}
	a1, a2 := get(job("acme/app")), get(job("acme/app"))
	if a1 != a2 || w.gh.Exchanges.Load() != 1 {
		t.Fatalf("same job, same params: %d exchanges", w.gh.Exchanges.Load())
	}
	lib := get(job("acme/lib"))
	if lib == a1 {
		t.Fatal("another repository got the same token")
	}
	if it, _ := w.gh.Lookup(lib); strings.Join(it.Repos, ",") != "lib" {
		t.Errorf("acme/lib's token covers %v", it.Repos)
	}
	perm = "write"
	if get(job("acme/app")) == a1 {
		t.Fatal("other permissions reused the read token")
	}
	if w.gh.Exchanges.Load() != 3 {
		t.Errorf("%d exchanges, want 3", w.gh.Exchanges.Load())
	}
	// GitHub tokens live an hour: at 59m29s still cached, at 59m31s renewed.
	perm = "read"
	clock.Advance(time.Hour - DefaultMargin - time.Second)
	if get(job("acme/app")) != a1 {
		t.Error("renewed before the margin")
	}
	clock.Advance(2 * time.Second)
	if get(job("acme/app")) == a1 {
		t.Error("served a token inside its expiry margin")
	}
}

func TestGitHubAppOptions(t *testing.T) {
	key := StaticSecret(broker.NewSecret("x"))
	for _, tc := range []struct {
		name string
		o    GitHubAppOptions
		want string
	}{
		{"no app id", GitHubAppOptions{PrivateKey: key}, "app_id"},
		{"bad app id", GitHubAppOptions{AppID: "12/3", PrivateKey: key}, "not a GitHub App ID"},
		{"no key", GitHubAppOptions{AppID: "1"}, "private_key"},
		{"http api", GitHubAppOptions{AppID: "1", PrivateKey: key, APIURL: "http://github.example"}, "must be https"},
		{"bad repos", GitHubAppOptions{AppID: "1", PrivateKey: key, Repositories: []string{"a/b/c"}}, "repositories"},
		{"bad perms", GitHubAppOptions{AppID: "1", PrivateKey: key, Permissions: map[string]string{"Contents": "read"}}, "permissions"},
		{"negative installation", GitHubAppOptions{AppID: "1", PrivateKey: key, InstallationID: -1}, "installation_id"},
		{"client id form", GitHubAppOptions{AppID: "Iv23liABC.x", PrivateKey: key}, ""},
		{"GHES", GitHubAppOptions{AppID: "1", PrivateKey: key, APIURL: "https://ghe.example/api/v3"}, ""},
	} {
		_, err := NewGitHubApp("x", tc.o)
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: error %v, want %q", tc.name, err, tc.want)
		}
	}
}

func TestCanonicalRepositories(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want string
		err  string
	}{
		{[]string{"acme/app"}, "acme/app", ""},
		{[]string{"Acme/App", "acme/lib", "acme/app"}, "acme/app,acme/lib", ""},
		{[]string{"acme"}, "acme", ""},
		{[]string{"my_ghes-org/repo.name_1"}, "my_ghes-org/repo.name_1", ""},
		{nil, "", "no repository"},
		{[]string{"acme", "acme/app"}, "", "must be the only entry"},
		{[]string{"acme/app", "other/app"}, "", "another owner"},
		{[]string{"acme/.."}, "", "not a repository name"},
		{[]string{"acme/a/b"}, "", "not a repository name"},
		{[]string{"-acme/app"}, "", "not a repository name"},
		{[]string{"acme/app%2f"}, "", "not a repository name"},
		{[]string{"acme/ap p"}, "", "not a repository name"},
		{[]string{"/app"}, "", "not a repository name"},
		{[]string{""}, "", "not owner/repo"},
	} {
		got, err := CanonicalRepositories(tc.in)
		if got != tc.want || (tc.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("CanonicalRepositories(%q) = %q, %v; want %q, %q", tc.in, got, err, tc.want, tc.err)
		}
	}
}

// FuzzGitHubParams: whatever the repositories and permissions expressions
// yield, the parameters are refused or canonical fixed points that cannot
// walk a URL path.
func FuzzGitHubParams(f *testing.F) {
	for _, s := range [][2]string{{`["acme/app"]`, `{"contents":"read"}`}, {`["acme"]`, `{}`}, {`["a/b","A/c"]`, `{"issues":"write","contents":"read"}`},
		{`["a/../b"]`, `{"x":1}`}, {`"acme/app"`, `[]`}, {`["a/b%2f"]`, `{"contents":"admin"}`}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, repos, perms string) {
		if r, err := RepositoriesParam(repos); err == nil {
			again, err := CanonicalRepositories(strings.Split(r, ","))
			if err != nil || again != r {
				t.Fatalf("repositories not canonical: %q -> %q %v", r, again, err)
			}
			for _, full := range strings.Split(r, ",") {
				if strings.Contains(full, "..") && !strings.Contains(full, "/") || strings.Count(full, "/") > 1 ||
					strings.ContainsAny(full, "%?#\\ \x00") || strings.HasPrefix(full, "/") {
					t.Fatalf("unsafe repository %q", full)
				}
				if _, name, ok := strings.Cut(full, "/"); ok && (name == "." || name == "..") {
					t.Fatalf("unsafe repository %q", full)
				}
			}
		}
		if p, err := PermissionsParam(perms); err == nil {
			var m map[string]string
			if json.Unmarshal([]byte(p), &m) != nil {
				t.Fatalf("permissions %q do not decode", p)
			}
			again, err := CanonicalPermissions(m)
			if err != nil || again != p {
				t.Fatalf("permissions not canonical: %q -> %q %v", p, again, err)
			}
		}
	})
}

// FuzzGitHubTokenResponse: any access_tokens answer gives a credential that
// can be injected, expiring in the future, or a malformed/unavailable error
// without the token.
func FuzzGitHubTokenResponse(f *testing.F) {
	f.Add(201, `{"token":"ghs_abc","expires_at":"2099-01-01T00:00:00Z"}`)
	f.Add(201, `{"token":"ghs_a\nb","expires_at":"2099-01-01T00:00:00Z"}`)
	f.Add(201, `{"token":"ghs_abc","expires_at":"2001-01-01T00:00:00Z"}`)
	f.Add(201, `{"token":1}`)
	f.Add(422, `{"message":"ghs_secret"}`)
	f.Add(201, `null`)
	gh := testservers.NewGitHub(f, "1", testservers.GitHubInstallation{ID: 9, Account: "acme", Repos: []string{"app"}, Perms: map[string]string{"contents": "read"}})
	f.Fuzz(func(t *testing.T, status int, body string) {
		if status < 100 || status > 599 {
			return
		}
		client := &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
			st, b := status, body
			if strings.HasSuffix(r.URL.Path, "/installation") {
				st, b = 200, `{"id":9}`
			}
			return &http.Response{StatusCode: st, Status: fmt.Sprint(st), Header: http.Header{"Content-Type": {"application/json"}},
				Body: io.NopCloser(strings.NewReader(b)), Request: r}, nil
		}), CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		src, err := NewGitHubApp("gh", GitHubAppOptions{AppID: "1", PrivateKey: StaticSecret(broker.NewSecret(string(gh.KeyPEM))),
			Repositories: []string{"acme/app"}, HTTPClient: client, APIURL: "https://api.github.test"})
		if err != nil {
			t.Fatal(err)
		}
		c, err := src.Credential(context.Background(), idA, grant)
		if err != nil {
			be := expectCodeIn(t, err, broker.CodeCredentialMalformed, broker.CodeCredentialUnavailable)
			// The workload's message never quotes the answer; the log's
			// cause is one bounded line.
			if strings.Contains(be.Message, "ghs_") || strings.ContainsAny(err.Error(), "\r\n") || len(err.Error()) > 800 {
				t.Fatalf("error leaks or is unbounded: %q", err)
			}
			return
		}
		if err := CheckValue("Bearer " + token(t, c)); err != nil {
			t.Fatalf("accepted a token that cannot be injected: %v", err)
		}
		if !c.Expires.After(time.Now()) {
			t.Fatalf("accepted an expired token")
		}
	})
}

func expectCodeIn(t *testing.T, err error, codes ...string) *broker.Error {
	t.Helper()
	be := broker.AsError(err)
	for _, c := range codes {
		if be.Code == c {
			return be
		}
	}
	t.Fatalf("code %s (%v), want one of %v", be.Code, err, codes)
	return nil
}

// TestGitHubAppTokenWorksForGit: the minted token, written by the Basic
// injector, is what the git smart-HTTP stand-in (the real git
// http-backend) needs for a clone; a token for another repository is
// refused. (integration/ci_job_test.go does this through the broker.)
func TestGitHubAppTokenWorksForGit(t *testing.T) {
	w := newGHWorld(t)
	git, err := exec.LookPath("git")
	if err != nil {
		testservers.Missing(t, "git is not installed")
	}
	root := t.TempDir()
	run := func(dir string, args ...string) {
		t.Helper()
		cmd := exec.Command(git, args...)
		cmd.Dir = dir
		cmd.Env = []string{"HOME=" + root, "GIT_CONFIG_NOSYSTEM=1", "PATH=" + os.Getenv("PATH")}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
	}
	if err := os.MkdirAll(filepath.Join(root, "acme"), 0o755); err != nil {
		t.Fatal(err)
	}
	run(filepath.Join(root, "acme"), "init", "-q", "--bare", "app.git")
	gitSrv := httptest.NewServer(w.gh.GitHandler(t, root, nil))
	defer gitSrv.Close()
	for _, tc := range []struct {
		repos  string
		status int
	}{{"acme/app", 200}, {"acme/lib", 404}} {
		c, err := w.source(t, GitHubAppOptions{Permissions: map[string]string{"contents": "read"}}).Credential(context.Background(), idA,
			broker.Grant{Params: map[string]string{ParamGitHubRepositories: tc.repos}})
		if err != nil {
			t.Fatal(err)
		}
		r, _ := http.NewRequest(http.MethodGet, gitSrv.URL+"/acme/app.git/info/refs?service=git-upload-pack", nil)
		if err := Basic().Inject(r, c); err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.status {
			t.Errorf("token for %s: status %d, want %d", tc.repos, resp.StatusCode, tc.status)
		}
	}
}
