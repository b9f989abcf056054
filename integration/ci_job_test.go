package integration

// A simulated CI job (issue 8): a process that holds nothing but a GitHub
// Actions-shaped OIDC token clones a private repository, pushes to it and
// calls two APIs through the real broker binary, which mints a GitHub App
// installation token and an OAuth2 client-credentials token per job and
// injects them. The job's environment, command line, output and files must
// hold no credential; a job of another repository is refused.
//
// What is real and what is local:
//   - the broker binary, git (+ git http-backend), curl and sh are the real
//     programs; the OAuth2 provider is the real npm package oidc-provider
//     (testservers.StartOIDCProvider, installed by scripts/oidc-provider.sh);
//     the internal API verifies its JWT access tokens against the
//     provider's JWKS.
//   - the OIDC issuer is test-local (attest_oidc_test.go says why: GitHub's
//     token.actions.githubusercontent.com cannot run here) and mints tokens
//     with the claims of a GitHub Actions job.
//   - the GitHub App API and the git host are local too, because no GitHub
//     server can run here (github.com is a hosted service; GitHub Enterprise
//     Server is an appliance no reachable registry ships):
//     testservers.GitHub implements the documented installation lookup and
//     access-token endpoints, verifies the app JWT's RS256 signature with the
//     app's public key, and its git front accepts only the installation
//     tokens it issued (Basic x-access-token:<token>), for the repository
//     and permission they were issued for.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/broker/internal/testservers"
)

// ciConfig is the broker of the CI quick start (deploy/ci/github-actions),
// pointed at the local servers. __APP_KEY__ and __IDP_SECRET__ are file
// paths filled in by the test.
const ciConfig = `
listen:
  proxy: {{.Proxy}}
  admin: {{.Admin}}
ca:
  cert: {{.CACert}}
  key: {{.CAKey}}
attestors:
  - {type: oidc, name: github-actions, issuer: "http://127.0.0.1:{{index .Ports "issuer"}}", audiences: [keygate]}
egress:
  allow_cidrs: [127.0.0.1/32]
  ca_bundle: {{.Bundle}}
credentials:
  github-repo:
    source: github_app
    app_id: 31337
    private_key: file:__APP_KEY__
    api_url: https://localhost:{{index .Ports "api"}}
    repositories: '[workload.claims.repository]'
    permissions: >-
      request.path.endsWith("/git-receive-pack") || request.query == "service=git-receive-pack"
      ? {"contents": "write"} : {"contents": "read"}
    cache: 50m
  internal-api:
    source: oauth2
    token_url: http://127.0.0.1:{{index .Ports "idp"}}/token
    client_id: ci-broker
    client_secret: file:__IDP_SECRET__
    scopes_expr: 'request.method in ["GET", "HEAD"] ? ["read"] : ["read", "write"]'
    resource: https://internal-api.example
    cache: 4m
rules:
  - name: app-git-fetch
    hosts: [localhost]
    ports: [{{index .Ports "git"}}]
    when: >-
      workload.method == "oidc" && workload.claims.repository == "acme/app" &&
      request.path.startsWith("/acme/app.git/") &&
      !(request.path.endsWith("/git-receive-pack") || request.query == "service=git-receive-pack")
    inject: {credential: github-repo, as: basic}
  - name: app-git-push-main
    hosts: [localhost]
    ports: [{{index .Ports "git"}}]
    when: >-
      workload.method == "oidc" && workload.claims.repository == "acme/app" &&
      workload.claims.ref == "refs/heads/main" &&
      has(workload.claims.environment) && workload.claims.environment == "production" &&
      request.path.startsWith("/acme/app.git/")
    inject: {credential: github-repo, as: basic}
  - name: app-github-api-read
    hosts: [localhost]
    ports: [{{index .Ports "api"}}]
    when: >-
      workload.method == "oidc" && workload.claims.repository == "acme/app" &&
      request.method in ["GET", "HEAD"]
    inject: {credential: github-repo, as: bearer}
  - name: app-internal-api
    hosts: [localhost]
    ports: [{{index .Ports "internal"}}]
    when: >-
      workload.method == "oidc" && workload.claims.repository == "acme/app" &&
      has(workload.claims.environment) && workload.claims.environment == "production"
    inject: {credential: internal-api, as: bearer}
`

// jobScript is what the CI job runs: no secret in it, none given to it.
const jobScript = `set -eu
git clone -q "$REPO_URL" app
cd app
echo "built by CI job $$" > BUILD
git add BUILD
git -c user.name=ci -c user.email=ci@example.invalid commit -q -m "ci: build"
git push -q origin HEAD:refs/heads/main
cd ..
curl -sSf "$API_URL/repos/acme/app"
echo
curl -sSf "$INTERNAL_URL/v1/builds"
`

type ciWorld struct {
	h         *harness
	w         *secretWatch
	is        *testIssuer
	gh        *testservers.GitHub
	api, git  *upstream
	internal  *upstream
	idp       *testservers.OIDCProvider
	b         *brokerProc
	bare      string // the private repository on the git host
	secret    string // the OAuth2 client secret (a canary)
	mu        sync.Mutex
	oauthToks []string // access tokens the internal API accepted
}

func newCIWorld(t *testing.T) *ciWorld {
	t.Helper()
	requireTool(t, "git")
	requireTool(t, "curl")
	h := newHarness(t)
	cw := &ciWorld{h: h, w: newSecretWatch(h)}
	cw.is = newTestIssuer(t, cw.w)
	cw.secret = cw.w.credential()

	cw.gh = testservers.NewGitHub(t, "31337", testservers.GitHubInstallation{ID: 9001, Account: "acme",
		Repos: []string{"app"}, Perms: map[string]string{"contents": "write", "metadata": "read"}})
	cw.api = cw.w.upstream(newUpstream(t, "github-api", cw.gh.Handler()))

	// The private repository acme/app with one commit.
	root := filepath.Join(h.dir, "github-repos")
	cw.bare = filepath.Join(root, "acme", "app.git")
	seed := filepath.Join(h.dir, "seed")
	for _, args := range [][]string{
		{"init", "-q", "--bare", "-b", "main", cw.bare},
		{"init", "-q", "-b", "main", seed},
		{"-C", seed, "commit", "-q", "--allow-empty", "-m", "first"},
		{"-C", seed, "push", "-q", cw.bare, "HEAD:refs/heads/main"},
	} {
		mustRunGit(t, h.dir, args...)
	}
	cw.git = cw.w.upstream(newUpstream(t, "github-git", cw.gh.GitHandler(t, root, nil)))

	cw.idp = testservers.StartOIDCProvider(t, testservers.OIDCProviderOptions{
		Clients:  []testservers.OIDCClient{{ID: "ci-broker", Secret: cw.secret, AuthMethod: "client_secret_basic"}},
		Resource: "https://internal-api.example",
	})
	verify := cw.idp.ResourceVerifier()
	cw.internal = cw.w.upstream(newUpstream(t, "internal-api", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
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
		cw.mu.Lock()
		cw.oauthToks = append(cw.oauthToks, tok)
		cw.mu.Unlock()
		fmt.Fprintf(w, "internal-api: hello %v (scope %v)\n", claims["client_id"], claims["scope"])
	})))

	keyFile := filepath.Join(h.dir, "broker-secrets", "github-app.pem")
	secretFile := filepath.Join(h.dir, "broker-secrets", "idp-client-secret")
	if err := os.MkdirAll(filepath.Dir(keyFile), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, cw.gh.KeyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(secretFile, []byte(cw.secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := strings.NewReplacer("__APP_KEY__", keyFile, "__IDP_SECRET__", secretFile).Replace(ciConfig)
	cw.b = h.start(brokerSpec{name: "ci", config: cfg}, map[string]int{
		"issuer": cw.is.port(), "api": cw.api.port(), "git": cw.git.port(), "internal": cw.internal.port(),
		"idp": atoiPort(t, strings.TrimPrefix(cw.idp.Issuer, "http://")),
	})
	waitReadyz(t, cw.b, testTimeout)
	return cw
}

func mustRunGit(t *testing.T, dir string, args ...string) {
	t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	cmd.Env = cleanEnv(dir, "GIT_CONFIG_NOSYSTEM=1", "GIT_AUTHOR_NAME=seed", "GIT_AUTHOR_EMAIL=seed@example.invalid",
		"GIT_COMMITTER_NAME=seed", "GIT_COMMITTER_EMAIL=seed@example.invalid")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("git %v: %v\n%s", args, err, out)
	}
}

// ciJob is one run of jobScript with nothing but the OIDC token.
type ciJob struct {
	dir    string
	env    []string
	argv   []string
	code   int
	stdout string
	stderr string
}

// runJob runs the job the way the quick start sets it up: HTTPS_PROXY with
// the OIDC token as the proxy password, the broker CA in every client's
// CA variable, and the URLs it works on. Nothing else.
func (cw *ciWorld) runJob(t *testing.T, oidcToken string) *ciJob {
	t.Helper()
	dir := t.TempDir()
	script := filepath.Join(dir, "job.sh")
	if err := os.WriteFile(script, []byte(jobScript), 0o755); err != nil {
		t.Fatal(err)
	}
	ca := cw.h.caPEM()
	j := &ciJob{dir: dir, argv: []string{"sh", script}}
	j.env = cleanEnv(dir,
		"HTTPS_PROXY=http://token:"+oidcToken+"@"+cw.b.proxyAddr,
		"GIT_HTTP_PROXY_AUTHMETHOD=basic",
		"SSL_CERT_FILE="+ca, "CURL_CA_BUNDLE="+ca, "GIT_SSL_CAINFO="+ca, "AWS_CA_BUNDLE="+ca, "NODE_EXTRA_CA_CERTS="+ca,
		"GIT_CONFIG_NOSYSTEM=1", "GIT_TERMINAL_PROMPT=0",
		fmt.Sprintf("REPO_URL=https://localhost:%d/acme/app.git", cw.git.port()),
		fmt.Sprintf("API_URL=https://localhost:%d", cw.api.port()),
		fmt.Sprintf("INTERNAL_URL=https://localhost:%d", cw.internal.port()),
	)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, j.argv[0], j.argv[1:]...)
	cmd.Dir, cmd.Env = dir, j.env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	j.stdout, j.stderr = out.String(), errb.String()
	cw.h.record("ci job stdout", out.Bytes())
	cw.h.record("ci job stderr", errb.Bytes())
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		t.Fatalf("the CI job did not finish within 90s\nstderr: %s", j.stderr)
	case errors.As(err, &ee):
		j.code = ee.ExitCode()
	case err != nil:
		t.Fatal(err)
	}
	return j
}

// expectNoCredential asserts the job's environment, argv, output and every
// file it left behind (including .git/) hold none of the credentials the
// broker minted or holds, in any common encoding.
func (cw *ciWorld) expectNoCredential(t *testing.T, j *ciJob) {
	t.Helper()
	type secret struct{ what, v string }
	var secrets []secret
	for _, it := range cw.gh.Issued() {
		secrets = append(secrets, secret{"GitHub installation token", it.Token})
	}
	cw.mu.Lock()
	for _, tok := range cw.oauthToks {
		secrets = append(secrets, secret{"OAuth2 access token", tok})
		if i := strings.LastIndexByte(tok, '.'); i > 0 {
			secrets = append(secrets, secret{"OAuth2 access token signature", tok[i+1:]})
		}
	}
	cw.mu.Unlock()
	secrets = append(secrets, secret{"OAuth2 client secret", cw.secret})
	keyLines := strings.Split(strings.TrimSpace(string(cw.gh.KeyPEM)), "\n")
	secrets = append(secrets, secret{"GitHub App private key", keyLines[len(keyLines)/2]})

	places := map[string][]byte{
		"environment": []byte(strings.Join(j.env, "\n")),
		"argv":        []byte(strings.Join(j.argv, " ")),
		"stdout":      []byte(j.stdout),
		"stderr":      []byte(j.stderr),
	}
	_ = filepath.WalkDir(j.dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		if b, err := os.ReadFile(p); err == nil {
			places["file "+strings.TrimPrefix(p, j.dir)] = b
		}
		return nil
	})
	for where, data := range places {
		for _, s := range secrets {
			for _, n := range secretNeedles(s.v) {
				if bytes.Contains(data, []byte(n)) {
					t.Errorf("SECRET LEAK: the job's %s contains a %s", where, s.what)
				}
			}
		}
	}
}

func TestCIJobNeverSeesASecret(t *testing.T) {
	cw := newCIWorld(t)

	job := cw.runJob(t, cw.is.mint(cw.is.githubClaims("acme/app")))
	if job.code != 0 {
		t.Fatalf("CI job of acme/app: exit %d\nstdout:\n%s\nstderr:\n%s\nbroker:\n%s", job.code, job.stdout, job.stderr, redactCanary(string(cw.b.output())))
	}
	if !strings.Contains(job.stdout, `"full_name":"acme/app"`) || !strings.Contains(job.stdout, "internal-api: hello ci-broker (scope read)") {
		t.Errorf("job output lacks the API answers:\n%s", job.stdout)
	}
	// The push reached the private repository.
	log, err := exec.Command("git", "--git-dir", cw.bare, "log", "--format=%s", "main").Output()
	if err != nil || !strings.Contains(string(log), "ci: build") {
		t.Errorf("the push did not land: %v\n%s", err, log)
	}

	// What was minted: one read and one write installation token, each for
	// acme/app only; one OAuth2 token (the job's API calls are cached).
	var read, write int
	for _, it := range cw.gh.Issued() {
		if strings.Join(it.Repos, ",") != "app" || it.Account != "acme" {
			t.Errorf("an installation token covers %s %v", it.Account, it.Repos)
		}
		switch fmt.Sprint(it.Perms) {
		case "map[contents:read]":
			read++
		case "map[contents:write]":
			write++
		default:
			t.Errorf("an installation token has permissions %v", it.Perms)
		}
	}
	// The cache key is (credential, rule, caller, parameters): the fetch
	// and API rules each got their read token, the push rule its write one,
	// and every later request of a rule reused its token.
	if read != 2 || write != 1 {
		t.Errorf("%d read and %d write tokens minted, want 2 (fetch rule, API rule) and 1 (push rule)", read, write)
	}
	for _, r := range cw.git.requests() {
		if len(r.Auth) != 1 || !strings.HasPrefix(r.Auth[0], "Basic ") {
			t.Errorf("git %s %s reached the server with %d Authorization values", r.Method, r.Path, len(r.Auth))
		}
	}
	cw.expectNoCredential(t, job)

	// The audit lines name the minted credentials by kind and fingerprint.
	out := string(cw.b.output())
	for _, want := range []string{`"credential.kind":"github_app"`, `"credential.kind":"oauth2"`, `"rule":"app-git-push-main"`, `"rule":"app-git-fetch"`} {
		if !strings.Contains(out, want) {
			t.Errorf("broker output lacks %s", want)
		}
	}

	t.Run("a job of another repository is refused", func(t *testing.T) {
		gitBefore, apiBefore, intBefore, minted := cw.git.count(), cw.api.count(), cw.internal.count(), len(cw.gh.Issued())
		other := cw.runJob(t, cw.is.mint(cw.is.githubClaims("evil/app")))
		if other.code == 0 {
			t.Fatalf("the job of evil/app succeeded:\n%s", other.stdout)
		}
		if !strings.Contains(other.stderr, "403") {
			t.Errorf("git did not report the broker's 403:\n%s", other.stderr)
		}
		if cw.git.count() != gitBefore || cw.api.count() != apiBefore || cw.internal.count() != intBefore || len(cw.gh.Issued()) != minted {
			t.Errorf("the refused job reached an upstream or had a token minted")
		}
		cw.expectNoCredential(t, other)
	})

	t.Run("a job on another branch can fetch but not push", func(t *testing.T) {
		claims := withClaims(cw.is.githubClaims("acme/app"), map[string]any{"ref": "refs/heads/feature", "environment": nil,
			"sub": "repo:acme/app:ref:refs/heads/feature"})
		branch := cw.runJob(t, cw.is.mint(claims))
		if branch.code == 0 {
			t.Fatal("a feature-branch job pushed to main")
		}
		if !strings.Contains(branch.stderr, "403") {
			t.Errorf("git push did not report the broker's 403:\nstdout:\n%s\nstderr:\n%s", branch.stdout, branch.stderr)
		}
		if _, err := os.Stat(filepath.Join(branch.dir, "app", ".git")); err != nil {
			t.Errorf("the clone (fetch rule) should have worked: %v", err)
		}
		cw.expectNoCredential(t, branch)
	})
}

// tokenFaultConfig: an oauth2 credential on a token endpoint whose answer
// the test switches, and a github_app credential on the GitHub stand-in,
// each in front of its own recording upstream.
const tokenFaultConfig = baseConfig + `
credentials:
  api:
    source: oauth2
    token_url: http://127.0.0.1:{{index .Ports "idp"}}/token
    client_id: kg
    client_secret: file:__IDP_SECRET__
    cache: none
  gh:
    source: github_app
    app_id: 7
    private_key: file:__APP_KEY__
    api_url: https://localhost:{{index .Ports "ghapi"}}
    repositories: [acme/app]
    permissions: {contents: read}
    cache: none
rules:
  - name: oauth-api
    hosts: [localhost]
    ports: [{{index .Ports "api"}}]
    inject: {credential: api, as: bearer}
  - name: github-api
    hosts: [localhost]
    ports: [{{index .Ports "gh"}}]
    inject: {credential: gh, as: bearer}
`

// TestCITokenSourceFaults: bad answers from a token endpoint or from the
// GitHub API become a clear 502/503 for the workload through the real
// broker binary; nothing is forwarded, and neither the client secret nor a
// refused token appears in any response or in the broker's output.
//
// The token endpoint here is an httptest server, not oidc-provider: a
// certified provider cannot be made to answer garbage, drop expires_in or
// put CR/LF in a token, which is exactly what this test needs. The
// provider's own refusals (invalid_client, invalid_target) are covered
// against the real one in internal/inject.
func TestCITokenSourceFaults(t *testing.T) {
	h := newHarness(t)
	w := newSecretWatch(h)
	secret := w.credential()
	badToken := w.credential()

	var mu sync.Mutex
	mode := "ok"
	idpSrv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		mu.Lock()
		m := mode
		mu.Unlock()
		rw.Header().Set("Content-Type", "application/json")
		switch m {
		case "ok":
			fmt.Fprint(rw, `{"access_token":"fine-token-123","token_type":"Bearer","expires_in":300}`)
		case "no-expires-in":
			fmt.Fprint(rw, `{"access_token":"fine-token-456","token_type":"Bearer"}`)
		case "oauth-error":
			rw.WriteHeader(http.StatusUnauthorized)
			fmt.Fprintf(rw, `{"error":"invalid_client","error_description":"client secret %s is wrong"}`, secret)
		case "invalid-json":
			fmt.Fprintf(rw, `{"access_token":"%s", "expires_in": `, badToken)
		case "crlf-token":
			fmt.Fprintf(rw, `{"access_token":"%s\r\nX-Injected: yes","token_type":"Bearer","expires_in":300}`, badToken)
		case "server-error":
			rw.WriteHeader(http.StatusBadGateway)
			fmt.Fprint(rw, `upstream of the idp is down`)
		}
	})}
	idpLn := listenLoopback(t)
	go func() { _ = idpSrv.Serve(idpLn) }()
	t.Cleanup(func() { _ = idpSrv.Close() })

	gh := testservers.NewGitHub(t, "7", testservers.GitHubInstallation{ID: 3, Account: "acme", Repos: []string{"app"},
		Perms: map[string]string{"contents": "read"}})
	ghAPI := w.upstream(newUpstream(t, "github-api", gh.Handler()))
	api := w.upstream(newUpstream(t, "api", nil))
	ghUp := w.upstream(newUpstream(t, "gh-upstream", nil))

	dir := filepath.Join(h.dir, "broker-secrets")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	keyFile, secretFile := filepath.Join(dir, "app.pem"), filepath.Join(dir, "idp")
	if err := os.WriteFile(keyFile, gh.KeyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(secretFile, []byte(secret), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := strings.NewReplacer("__APP_KEY__", keyFile, "__IDP_SECRET__", secretFile).Replace(tokenFaultConfig)
	b := h.start(brokerSpec{name: "faults", config: cfg}, map[string]int{
		"idp": atoiPort(t, idpLn.Addr().String()), "ghapi": ghAPI.port(), "api": api.port(), "gh": ghUp.port()})
	c := h.goClient(b)
	get := func(u *upstream) (*http.Response, []byte) {
		t.Helper()
		resp, err := c.Get(fmt.Sprintf("https://localhost:%d/v1/x", u.port()))
		if err != nil {
			t.Fatalf("GET: %v", err)
		}
		defer resp.Body.Close()
		var body bytes.Buffer
		_, _ = body.ReadFrom(resp.Body)
		h.recordResponse("GET through the broker", resp, body.Bytes())
		return resp, body.Bytes()
	}

	for _, tc := range []struct {
		mode   string
		status int
		code   string
		msg    string
	}{
		{"oauth-error", 503, "credential_unavailable", "the token endpoint answered 401 invalid_client"},
		{"invalid-json", 502, "credential_malformed", "not a usable token response"},
		{"crlf-token", 502, "credential_malformed", "control characters"},
		{"server-error", 503, "credential_unavailable", "the token endpoint answered 502"},
		{"down", 503, "credential_unavailable", "the token endpoint is unreachable"},
	} {
		t.Run("oauth2 "+tc.mode, func(t *testing.T) {
			mu.Lock()
			mode = tc.mode
			mu.Unlock()
			if tc.mode == "down" {
				_ = idpSrv.Close()
			}
			before := api.count()
			resp, body := get(api)
			expectRefusal(t, tc.mode, resp, body, tc.status, tc.code)
			if !strings.Contains(string(body), tc.msg) {
				t.Errorf("body %s, want %q", redactCanary(string(body)), tc.msg)
			}
			if api.count() != before {
				t.Errorf("the request was forwarded")
			}
		})
		if tc.mode == "oauth-error" {
			// Before "down" closes the endpoint: the fallbacks that work.
			for _, ok := range []string{"ok", "no-expires-in"} {
				t.Run("oauth2 "+ok, func(t *testing.T) {
					mu.Lock()
					mode = ok
					mu.Unlock()
					resp, _ := get(api)
					if resp.StatusCode != 200 {
						t.Fatalf("status %d", resp.StatusCode)
					}
					line := b.auditLine(t, resp.Header.Get("X-Keygate-Request-Id"))
					exp, _ := time.Parse(time.RFC3339, fmt.Sprint(line["credential.expires"]))
					want := 300 * time.Second
					if ok == "no-expires-in" {
						want = time.Minute // inject.DefaultOAuth2Lifetime
					}
					if d := time.Until(exp); d > want+time.Second || d < want-10*time.Second {
						t.Errorf("credential.expires %v is %v away, want about %v", line["credential.expires"], d, want)
					}
				})
			}
		}
	}

	for _, tc := range []struct {
		name   string
		fault  func(http.ResponseWriter, *http.Request) bool
		status int
		code   string
		msg    string
	}{
		{"not installed (404)", func(rw http.ResponseWriter, r *http.Request) bool {
			if !strings.HasSuffix(r.URL.Path, "/installation") {
				return false
			}
			rw.WriteHeader(http.StatusNotFound)
			fmt.Fprint(rw, `{"message":"Not Found"}`)
			return true
		}, 503, "credential_unavailable", "GitHub App 7 is not installed on acme/app"},
		{"token with CR LF", func(rw http.ResponseWriter, r *http.Request) bool {
			if !strings.HasSuffix(r.URL.Path, "/access_tokens") {
				return false
			}
			rw.WriteHeader(http.StatusCreated)
			fmt.Fprintf(rw, `{"token":"%s\r\nX-Injected: yes","expires_at":"2099-01-01T00:00:00Z"}`, badToken)
			return true
		}, 502, "credential_malformed", "control characters"},
		{"invalid JSON", func(rw http.ResponseWriter, r *http.Request) bool {
			if !strings.HasSuffix(r.URL.Path, "/access_tokens") {
				return false
			}
			rw.WriteHeader(http.StatusCreated)
			fmt.Fprintf(rw, `{"token":"%s",`, badToken)
			return true
		}, 502, "credential_malformed", "not the JSON it documents"},
	} {
		t.Run("github_app "+tc.name, func(t *testing.T) {
			gh.Fault = tc.fault
			defer func() { gh.Fault = nil }()
			resp, body := get(ghUp)
			expectRefusal(t, tc.name, resp, body, tc.status, tc.code)
			if !strings.Contains(string(body), tc.msg) {
				t.Errorf("body %s, want %q", redactCanary(string(body)), tc.msg)
			}
			ghUp.expectNone(t, false)
		})
	}
	// And the healthy path for comparison: one request, one minted token.
	resp, _ := get(ghUp)
	if resp.StatusCode != 200 || ghUp.count() != 1 || len(gh.Issued()) != 1 {
		t.Errorf("healthy github_app: status %d, %d forwarded, %d minted", resp.StatusCode, ghUp.count(), len(gh.Issued()))
	}
}

func listenLoopback(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}
