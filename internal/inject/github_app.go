package inject

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/keygate/broker/internal/broker"
)

// KindGitHubApp is the Credential.Kind of a github_app source.
const KindGitHubApp = "github_app"

// DefaultGitHubAPI is api_url's default. GitHub Enterprise Server uses
// https://HOST/api/v3.
const DefaultGitHubAPI = "https://api.github.com"

// GitHubTokenUser is the user name GitHub expects with an installation
// token in Basic authentication (git over HTTPS).
const GitHubTokenUser = "x-access-token"

// Grant parameters a github_app source reads, computed per request by
// WithParams from the credential's repositories and permissions
// expressions, so that they are part of the cache key: a token minted for
// one repository set or permission set is never handed out for another.
const (
	// ParamGitHubRepositories: canonical (sorted, lower-case, unique)
	// "owner/repo" names joined by ",", or one "owner" alone (every
	// repository the installation on that account can reach).
	ParamGitHubRepositories = "github.repositories"
	// ParamGitHubPermissions: canonical JSON object of permission → level.
	ParamGitHubPermissions = "github.permissions"
)

// appJWTLifetime: GitHub accepts an app JWT for at most 10 minutes; iat is
// set 60 s in the past against clock drift, so exp is 9 minutes ahead.
const (
	appJWTBackdate = 60 * time.Second
	appJWTLifetime = 9 * time.Minute
	maxRepos       = 100
	maxPermissions = 50
)

// GitHubAppOptions configure NewGitHubApp.
type GitHubAppOptions struct {
	// AppID is the app's ID or client ID (the JWT's iss).
	AppID string
	// PrivateKey is the app's RSA private key in PEM.
	PrivateKey SecretFunc
	// APIURL is the REST API root; "" means DefaultGitHubAPI.
	APIURL string
	// InstallationID, when set, is the only installation the source uses:
	// without repositories it is used directly, with repositories the
	// installation found for them must be this one.
	InstallationID int64
	// Repositories and Permissions apply when the grant carries no
	// ParamGitHubRepositories / ParamGitHubPermissions.
	Repositories []string
	Permissions  map[string]string
	// HTTPClient is the broker's own client (no proxy, no redirects).
	HTTPClient *http.Client
	// Timeout bounds one call (installation lookup and token exchange);
	// 0 means DefaultTokenTimeout.
	Timeout time.Duration
	// Clock sets the app JWT's iat/exp and judges expires_at.
	Clock broker.Clock
}

type githubApp struct {
	name   string
	o      GitHubAppOptions
	api    string
	key    keyMemo
	repos  string // canonical static repositories
	perms  string // canonical static permissions
	client *http.Client
}

// NewGitHubApp returns a source that mints a GitHub App installation
// access token per call (no caching of its own; wrap it with NewCache). It
// does no network I/O here.
//
// Per call: sign the app JWT (RS256, iat now-60s, exp now+9m, iss the app
// id); find the installation (GET /repos/{owner}/{repo}/installation, or
// /orgs/{org}/installation for an account-wide token, or InstallationID);
// POST /app/installations/{id}/access_tokens with the repository names and
// permissions; check the token and expires_at. The credential has fields
// token, username (x-access-token) and password (the token), so it can be
// injected as bearer (API calls) or basic (git over HTTPS).
func NewGitHubApp(name string, o GitHubAppOptions) (broker.Source, error) {
	if err := CheckGitHubAppID(o.AppID); err != nil {
		return nil, fmt.Errorf("inject: credential %q: app_id %w", name, err)
	}
	if o.PrivateKey == nil {
		return nil, fmt.Errorf("inject: credential %q: private_key is required", name)
	}
	if o.APIURL == "" {
		o.APIURL = DefaultGitHubAPI
	}
	if err := checkTokenURL(o.APIURL); err != nil {
		return nil, fmt.Errorf("inject: credential %q: api_url %w", name, err)
	}
	if u, _ := url.Parse(o.APIURL); u.RawQuery != "" {
		return nil, fmt.Errorf("inject: credential %q: api_url must not have a query", name)
	}
	if o.InstallationID < 0 {
		return nil, fmt.Errorf("inject: credential %q: installation_id must be positive", name)
	}
	s := &githubApp{name: name, o: o, api: strings.TrimSuffix(o.APIURL, "/")}
	var err error
	if len(o.Repositories) > 0 {
		if s.repos, err = CanonicalRepositories(o.Repositories); err != nil {
			return nil, fmt.Errorf("inject: credential %q: repositories: %w", name, err)
		}
	}
	if len(o.Permissions) > 0 {
		if s.perms, err = CanonicalPermissions(o.Permissions); err != nil {
			return nil, fmt.Errorf("inject: credential %q: permissions: %w", name, err)
		}
	}
	if o.Timeout <= 0 {
		s.o.Timeout = DefaultTokenTimeout
	}
	if o.Clock == nil {
		s.o.Clock = broker.SystemClock{}
	}
	s.client = o.HTTPClient
	if s.client == nil {
		s.client = &http.Client{Transport: &http.Transport{Proxy: nil},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	}
	return s, nil
}

// CheckGitHubAppID accepts a numeric app ID or a client ID (Iv1.…, Iv23…).
func CheckGitHubAppID(id string) error {
	if id == "" {
		return errors.New("is required (the app's ID or client ID)")
	}
	if len(id) > 64 || strings.Trim(id, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.") != "" {
		return fmt.Errorf("%q is not a GitHub App ID or client ID", id)
	}
	return nil
}

// validOwner: a GitHub user or organisation login (1-39 of A-Z a-z 0-9 and
// '-', not starting with '-'). Enterprise Server also allows '_'.
func validOwner(s string) bool {
	if s == "" || len(s) > 39 || s[0] == '-' {
		return false
	}
	return strings.Trim(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") == ""
}

// validRepoName: 1-100 of A-Z a-z 0-9 . _ -, not "." or "..".
func validRepoName(s string) bool {
	if s == "" || len(s) > 100 || s == "." || s == ".." {
		return false
	}
	return strings.Trim(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") == ""
}

// CanonicalRepositories validates "owner/repo" names (all of one owner, as
// a token is for one installation) or a single "owner" (account-wide), and
// returns them lower-cased (GitHub names are case-insensitive), sorted,
// unique, joined by ",". Errors give positions, not names (they may come
// from request data).
func CanonicalRepositories(repos []string) (string, error) {
	if len(repos) == 0 {
		return "", errors.New("no repository")
	}
	if len(repos) > maxRepos {
		return "", fmt.Errorf("%d repositories, more than GitHub accepts in one token (%d)", len(repos), maxRepos)
	}
	out := make([]string, 0, len(repos))
	owner := ""
	for i, r := range repos {
		o, name, hasSlash := strings.Cut(r, "/")
		switch {
		case !hasSlash:
			if len(repos) != 1 || !validOwner(o) {
				return "", fmt.Errorf("entry %d is not owner/repo (an owner alone, for an account-wide token, must be the only entry)", i+1)
			}
		case !validOwner(o) || !validRepoName(name):
			return "", fmt.Errorf("entry %d is not a repository name owner/repo", i+1)
		}
		o = strings.ToLower(o)
		if owner != "" && o != owner {
			return "", fmt.Errorf("entry %d has another owner than entry 1; one token covers the repositories of one account", i+1)
		}
		owner = o
		out = append(out, strings.ToLower(r))
	}
	slices.Sort(out)
	return strings.Join(slices.Compact(out), ","), nil
}

// RepositoriesParam turns the JSON array a repositories expression yields
// into the value of ParamGitHubRepositories.
func RepositoriesParam(js string) (string, error) {
	list, err := StringListParam(js)
	if err != nil {
		return "", fmt.Errorf("repositories %w", err)
	}
	return CanonicalRepositories(list)
}

// Permission levels an installation token can be narrowed to.
var permissionLevels = map[string]bool{"read": true, "write": true, "admin": true}

// CanonicalPermissions validates permission → level (names of a-z, 0-9
// and '_'; levels read, write, admin) and returns the canonical JSON
// object (sorted keys). An empty map is "{}": the installation's own
// permissions.
func CanonicalPermissions(p map[string]string) (string, error) {
	if len(p) > maxPermissions {
		return "", fmt.Errorf("%d permissions, more than %d", len(p), maxPermissions)
	}
	for _, k := range slices.Sorted(maps.Keys(p)) {
		if k == "" || len(k) > 64 || strings.Trim(k, "abcdefghijklmnopqrstuvwxyz0123456789_") != "" {
			return "", errors.New("a permission name is not 1-64 of a-z, 0-9 and _ (e.g. contents, pull_requests)")
		}
		if !permissionLevels[p[k]] {
			return "", fmt.Errorf("permission %q: the level must be read, write or admin", k)
		}
	}
	b, err := json.Marshal(p) // encoding/json sorts map keys
	if err != nil {
		return "", err
	}
	return string(b), nil
}

// PermissionsParam turns the JSON object a permissions expression yields
// into the value of ParamGitHubPermissions.
func PermissionsParam(js string) (string, error) {
	var m map[string]string
	dec := json.NewDecoder(strings.NewReader(js))
	if err := dec.Decode(&m); err != nil || dec.More() {
		return "", errors.New("permissions is not an object of permission name to level (read, write or admin)")
	}
	if m == nil {
		m = map[string]string{}
	}
	return CanonicalPermissions(m)
}

func (s *githubApp) Credential(ctx context.Context, _ broker.Identity, g broker.Grant) (broker.Credential, error) {
	repos, perms := s.repos, s.perms
	if p, ok := g.Params[ParamGitHubRepositories]; ok {
		canon, err := CanonicalRepositories(strings.Split(p, ","))
		if err != nil {
			return broker.Credential{}, s.deny("repositories", err)
		}
		repos = canon
	}
	if p, ok := g.Params[ParamGitHubPermissions]; ok {
		canon, err := PermissionsParam(p)
		if err != nil {
			return broker.Credential{}, s.deny("permissions", err)
		}
		perms = canon
	}
	if repos == "" && s.o.InstallationID == 0 {
		return broker.Credential{}, &broker.Error{Code: broker.CodeDenied,
			Message: fmt.Sprintf("credential %q: no repository for this request and no installation_id", s.name)}
	}
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()

	pemKey, err := s.o.PrivateKey(ctx)
	if err != nil {
		var be *broker.Error
		msg := fmt.Sprintf("credential %q: the app's private key is unavailable", s.name)
		if errors.As(err, &be) {
			msg += ": " + be.Message
		}
		return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialUnavailable, Message: msg, Err: err}
	}
	k, err := s.key.get(pemKey)
	if err != nil {
		return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialUnavailable,
			Message: fmt.Sprintf("credential %q: the app's private key is not usable", s.name), Err: err}
	}
	now := s.o.Clock.Now()
	jwt, err := signTokenJWT(k, map[string]any{
		"iat": now.Add(-appJWTBackdate).Unix(),
		"exp": now.Add(appJWTLifetime).Unix(),
		"iss": s.o.AppID,
	}, "JWT")
	if err != nil {
		return broker.Credential{}, &broker.Error{Code: broker.CodeInternal,
			Message: fmt.Sprintf("credential %q: signing the app JWT failed", s.name), Err: err}
	}

	var names []string
	inst := s.o.InstallationID
	if repos != "" {
		list := strings.Split(repos, ",")
		owner, _, _ := strings.Cut(list[0], "/")
		path := "/orgs/" + url.PathEscape(owner) + "/installation"
		if strings.Contains(list[0], "/") {
			o, r, _ := strings.Cut(list[0], "/")
			path = "/repos/" + url.PathEscape(o) + "/" + url.PathEscape(r) + "/installation"
			for _, full := range list {
				_, n, _ := strings.Cut(full, "/")
				names = append(names, n)
			}
		}
		var found struct {
			ID int64 `json:"id"`
		}
		if err := s.call(ctx, jwt, http.MethodGet, path, nil, http.StatusOK, &found); err != nil {
			return broker.Credential{}, err
		}
		if found.ID <= 0 {
			return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialMalformed,
				Message: fmt.Sprintf("credential %q: GitHub's answer to GET %s has no installation id", s.name, path)}
		}
		if inst != 0 && found.ID != inst {
			return broker.Credential{}, &broker.Error{Code: broker.CodeDenied,
				Message: fmt.Sprintf("credential %q: %s belongs to installation %d, not to the configured installation_id %d", s.name, list[0], found.ID, inst)}
		}
		inst = found.ID
	}

	body := map[string]any{}
	if len(names) > 0 {
		body["repositories"] = names
	}
	var permMap map[string]string
	if perms != "" && perms != "{}" {
		_ = json.Unmarshal([]byte(perms), &permMap) // canonical: always decodes
		body["permissions"] = permMap
	}
	var tok struct {
		Token     string    `json:"token"`
		ExpiresAt time.Time `json:"expires_at"`
	}
	path := "/app/installations/" + strconv.FormatInt(inst, 10) + "/access_tokens"
	if err := s.call(ctx, jwt, http.MethodPost, path, body, http.StatusCreated, &tok); err != nil {
		return broker.Credential{}, err
	}
	if err := checkToken(s.name, "GitHub's access token response", tok.Token); err != nil {
		return broker.Credential{}, err
	}
	if tok.ExpiresAt.IsZero() {
		return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialMalformed,
			Message: fmt.Sprintf("credential %q: GitHub's access token response has no expires_at; the token is not used", s.name)}
	}
	if !s.o.Clock.Now().Before(tok.ExpiresAt) {
		return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialMalformed,
			Message: fmt.Sprintf("credential %q: GitHub issued a token that has already expired (expires_at %s); it is not used", s.name, tok.ExpiresAt.UTC().Format(time.RFC3339))}
	}
	meta := map[string]string{"app_id": s.o.AppID, "installation_id": strconv.FormatInt(inst, 10)}
	if repos != "" {
		meta["repositories"] = repos
	}
	if perms != "" {
		meta["permissions"] = perms
	}
	return broker.Credential{
		Name: s.name,
		Kind: KindGitHubApp,
		Fields: map[string]broker.Secret{
			broker.FieldToken:    broker.NewSecret(tok.Token),
			broker.FieldUsername: broker.NewSecret(GitHubTokenUser),
			broker.FieldPassword: broker.NewSecret(tok.Token),
		},
		Expires: tok.ExpiresAt,
		Meta:    meta,
	}, nil
}

func (s *githubApp) deny(what string, err error) error {
	return &broker.Error{Code: broker.CodeDenied,
		Message: fmt.Sprintf("credential %q: the %s computed for this request are not valid: %v", s.name, what, err)}
}

// call makes one GitHub API request authenticated with the app JWT and
// decodes a want-status JSON answer into out. Failures are summarised:
// status, GitHub's message (one bounded line, with the JWT removed) in the
// log only, and a fixed message for the workload.
func (s *githubApp) call(ctx context.Context, jwt, method, path string, in any, want int, out any) error {
	var rd *bytes.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return &broker.Error{Code: broker.CodeInternal, Message: "encoding a GitHub API request failed", Err: err}
		}
		rd = bytes.NewReader(b)
	} else {
		rd = bytes.NewReader(nil)
	}
	req, err := http.NewRequestWithContext(ctx, method, s.api+path, rd)
	if err != nil {
		return &broker.Error{Code: broker.CodeInternal, Message: fmt.Sprintf("credential %q: building %s %s failed", s.name, method, path), Err: err}
	}
	req.Header.Set("Authorization", "Bearer "+jwt)
	req.Header.Set("Accept", "application/vnd.github+json")
	req.Header.Set("X-GitHub-Api-Version", "2022-11-28")
	req.Header.Set("User-Agent", "keygate-broker")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	op := method + " " + path
	resp, err := s.client.Do(req)
	if err != nil {
		why := "is unreachable"
		if ctx.Err() != nil {
			why = fmt.Sprintf("did not answer within %s", s.o.Timeout)
		}
		var ue *url.Error
		cause := err
		if errors.As(err, &ue) {
			cause = errors.New("inject: github_app " + op + ": " + redactAll(ue.Err.Error(), 300, jwt))
		}
		return &broker.Error{Code: broker.CodeCredentialUnavailable,
			Message: fmt.Sprintf("credential %q: the GitHub API %s (%s)", s.name, why, op), Err: cause}
	}
	defer resp.Body.Close()
	body, err := readBody(resp.Body)
	if err != nil {
		return &broker.Error{Code: broker.CodeCredentialUnavailable,
			Message: fmt.Sprintf("credential %q: reading GitHub's answer to %s failed", s.name, op), Err: err}
	}
	if resp.StatusCode != want {
		return s.apiErr(op, resp, body, jwt)
	}
	if err := json.Unmarshal(body, out); err != nil {
		return &broker.Error{Code: broker.CodeCredentialMalformed,
			Message: fmt.Sprintf("credential %q: GitHub's answer to %s is not the JSON it documents", s.name, op),
			Err:     errors.New("inject: github_app: " + jsonErrSummary(err))}
	}
	return nil
}

// apiErr maps a GitHub API failure to a 503 with a reason the operator can
// act on.
func (s *githubApp) apiErr(op string, resp *http.Response, body []byte, jwt string) error {
	var ge struct {
		Message string `json:"message"`
	}
	_ = json.Unmarshal(body, &ge)
	st := resp.StatusCode
	msg := fmt.Sprintf("credential %q: the GitHub API answered %d to %s", s.name, st, op)
	switch {
	case st == http.StatusNotFound && strings.HasSuffix(op, "/installation"):
		msg = fmt.Sprintf("credential %q: GitHub App %s is not installed on %s (404 from %s)", s.name, s.o.AppID, installTarget(op), op)
	case st == http.StatusNotFound:
		msg += ": the installation does not exist (uninstalled?)"
	case st == http.StatusUnauthorized:
		msg += ": GitHub refused the app JWT (check app_id and private_key, and the broker's clock)"
	case st == http.StatusUnprocessableEntity:
		msg += ": GitHub refused the repositories or permissions asked for (not granted to the installation?)"
	case st >= 300 && st < 400:
		msg += " (a redirect; the broker does not follow redirects from the GitHub API)"
	}
	be := &broker.Error{Code: broker.CodeCredentialUnavailable, Message: msg,
		Err: fmt.Errorf("inject: github_app %s: status %d: %s", op, st, redactAll(ge.Message, 200, jwt))}
	if st == http.StatusTooManyRequests || st == http.StatusForbidden || st == http.StatusServiceUnavailable {
		be.RetryAfter = retryAfter(resp.Header)
		if be.RetryAfter == 0 && resp.Header.Get("X-RateLimit-Remaining") == "0" {
			if reset, err := strconv.ParseInt(resp.Header.Get("X-RateLimit-Reset"), 10, 64); err == nil {
				be.RetryAfter = min(max(time.Until(time.Unix(reset, 0)), time.Second), time.Minute)
			}
		}
	}
	return be
}

func installTarget(op string) string {
	p := strings.TrimSuffix(strings.TrimPrefix(op, "GET "), "/installation")
	if r, ok := strings.CutPrefix(p, "/repos/"); ok {
		return r
	}
	return strings.TrimPrefix(p, "/orgs/")
}

// jsonErrSummary names a JSON decoding failure without quoting input.
func jsonErrSummary(err error) string {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return fmt.Sprintf("invalid JSON at offset %d", se.Offset)
	case errors.As(err, &te):
		return fmt.Sprintf("field %q has the wrong type (%s)", te.Field, te.Value)
	}
	var pe *time.ParseError
	if errors.As(err, &pe) {
		return "a time is not RFC 3339"
	}
	return "invalid JSON"
}
