package integration

import (
	"crypto/subtle"
	"fmt"
	"net/http"
	"net/http/cgi"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/broker/internal/testservers"
)

// gitConfig injects a Basic credential (user and token from the broker's
// environment) into every request to the git server.
const gitConfig = baseConfig + `
credentials:
  git-token:
    source: static
    values: {username: env:GIT_USER, password: env:GIT_TOKEN}
rules:
  - name: git
    hosts: [localhost]
    ports: [{{index .Ports "git"}}]
    when: 'request.method in ["GET", "POST"]'
    inject: {credential: git-token, as: basic}
`

// TestGitCloneThroughBroker: a real `git clone` over smart HTTP (git
// http-backend behind net/http/cgi, TLS, Basic auth required) succeeds
// with no credential anywhere in git's environment, command line or
// configuration; the broker adds it.
func TestGitCloneThroughBroker(t *testing.T) {
	t.Parallel()
	git := requireTool(t, "git")
	h := newHarness(t)

	execPath := strings.TrimSpace(h.runTool(git, nil, "", "--exec-path").stdout)
	backend := filepath.Join(execPath, "git-http-backend")
	if _, err := os.Stat(backend); err != nil {
		testservers.Missing(t, "git-http-backend not found (%v)", err)
	}

	// A bare repository with one commit.
	repos := filepath.Join(h.dir, "repos")
	work := filepath.Join(h.dir, "work")
	gitEnv := []string{"GIT_CONFIG_NOSYSTEM=1", "GIT_TERMINAL_PROMPT=0"}
	mustGit := func(dir string, args ...string) {
		t.Helper()
		if res := h.runTool(git, gitEnv, dir, args...); res.code != 0 {
			t.Fatalf("git %s: exit %d\n%s", strings.Join(args, " "), res.code, res.stderr)
		}
	}
	if err := os.MkdirAll(repos, 0o755); err != nil {
		t.Fatal(err)
	}
	mustGit(repos, "init", "-q", "--bare", "repo.git")
	mustGit(repos, "--git-dir=repo.git", "symbolic-ref", "HEAD", "refs/heads/main")
	mustGit(h.dir, "init", "-q", "work")
	if err := os.WriteFile(filepath.Join(work, "README"), []byte("keygate e2e\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	mustGit(work, "add", "README")
	mustGit(work, "-c", "user.name=e2e", "-c", "user.email=e2e@example.invalid", "commit", "-q", "-m", "first")
	mustGit(work, "push", "-q", filepath.Join(repos, "repo.git"), "HEAD:refs/heads/main")

	// The git server: smart HTTP that demands exactly the Basic credential.
	want := []byte(h.basic())
	backendHandler := &cgi.Handler{
		Path: backend,
		Env:  []string{"GIT_PROJECT_ROOT=" + repos, "GIT_HTTP_EXPORT_ALL=1", "GIT_CONFIG_NOSYSTEM=1", "HOME=" + h.dir},
	}
	server := newUpstream(t, "git", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		auth := r.Header.Values("Authorization")
		if len(auth) != 1 || subtle.ConstantTimeCompare([]byte(auth[0]), want) != 1 {
			w.Header().Set("WWW-Authenticate", `Basic realm="e2e git"`)
			http.Error(w, "authentication required", http.StatusUnauthorized)
			return
		}
		backendHandler.ServeHTTP(w, r)
	}))
	repoURL := fmt.Sprintf("https://localhost:%d/repo.git", server.port())

	// Control: without the broker the server refuses (and git, with no
	// credential and no prompt, gives up).
	res := h.runTool(git, gitEnv, h.dir, "-c", "http.sslCAInfo="+upstreamBundle, "-c", "credential.helper=",
		"clone", "-q", repoURL, filepath.Join(h.dir, "direct"))
	if res.code == 0 {
		t.Fatalf("git clone without the broker succeeded: the server does not demand a credential")
	}
	direct := server.count()

	b := h.start(brokerSpec{name: "git", config: gitConfig,
		env: []string{"GIT_USER=" + gitUser, "GIT_TOKEN=" + h.canary}},
		map[string]int{"git": server.port()})

	dest := filepath.Join(h.dir, "clone")
	res = h.runTool(git, gitEnv, h.dir,
		"-c", "http.proxy="+b.proxyURL(), "-c", "http.sslCAInfo="+h.caPEM(), "-c", "credential.helper=",
		"clone", repoURL, dest)
	if res.code != 0 {
		t.Fatalf("git clone through the broker: exit %d\n%s", res.code, redactCanary(res.stderr))
	}
	got, err := os.ReadFile(filepath.Join(dest, "README"))
	if err != nil || string(got) != "keygate e2e\n" {
		t.Errorf("cloned README = %q, %v", got, err)
	}
	cfg, err := os.ReadFile(filepath.Join(dest, ".git", "config"))
	if err != nil {
		t.Fatal(err)
	}
	h.record("clone/.git/config", cfg)
	if strings.Contains(string(cfg), "@localhost") {
		t.Errorf(".git/config has userinfo in the remote URL:\n%s", redactCanary(string(cfg)))
	}

	reqs := server.requests()[direct:]
	if len(reqs) < 2 {
		t.Errorf("git server saw %d requests through the broker, want the ref advertisement and a fetch", len(reqs))
	}
	for i, r := range reqs {
		if len(r.Auth) != 1 || r.Auth[0] != h.basic() {
			t.Errorf("request %d (%s %s): Authorization = %s", i, r.Method, r.Path, describeAuth(r.Auth, h.basic()))
		}
	}
}
