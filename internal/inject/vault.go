package inject

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/api"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"

	"github.com/keygate/broker/internal/broker"
)

// Vault auth methods for the broker's own login.
const (
	VaultAuthJWT        = "jwt"
	VaultAuthKubernetes = "kubernetes"
	VaultAuthAppRole    = "approle"
	VaultAuthTokenFile  = "token_file"
)

// Vault connection defaults and limits.
const (
	// DefaultVaultTimeout bounds one Vault call (a read, a login, a
	// revoke), retries included.
	DefaultVaultTimeout = 10 * time.Second
	// MaxVaultResponse bounds what is read from Vault for one call.
	MaxVaultResponse = 1 << 20
	// vaultTokenMargin: a token this close to its expiry (at most a quarter
	// of its TTL) is treated as expired, so a read never starts with a token
	// about to die.
	vaultTokenMargin = 2 * time.Second
)

// VaultAuth is how the broker logs in to Vault. Exactly the fields of the
// method apply.
type VaultAuth struct {
	Method string // VaultAuthJWT, VaultAuthKubernetes, VaultAuthAppRole, VaultAuthTokenFile
	// Mount is the auth mount path; "" is the method's default
	// (jwt, kubernetes, approle).
	Mount string
	// Role is the Vault role (jwt, kubernetes).
	Role string
	// Token is the broker's own JWT (jwt: a JWT-SVID or a token file;
	// kubernetes: the projected service-account token file).
	Token TokenSource
	// RoleIDFile and SecretIDFile hold the AppRole credentials (approle).
	RoleIDFile, SecretIDFile string
	// TokenFile holds a Vault token (token_file; for development, or a
	// token written by a Vault Agent).
	TokenFile string
	// ChildTTL (token_file only), when set, makes this process work under
	// a child token of the file's token, created at each login with this
	// TTL: revoked at shutdown, and after a crash gone at its TTL, with
	// every lease it created (SECURITY-TESTS §4). The file's token needs
	// the auth/token/create capability.
	ChildTTL time.Duration
}

// VaultOptions configure NewVault.
type VaultOptions struct {
	// Name is the connection's config name, used in errors and logs.
	Name string
	// Address is the Vault URL: https, or http on loopback only. With
	// UseEnv it may be empty (VAULT_ADDR).
	Address string
	// CABundle is a PEM file of roots for Vault's certificate; CAPool is the
	// same as a pool. Both empty: the system roots.
	CABundle string
	CAPool   *x509.CertPool
	// Namespace is the Vault Enterprise namespace ("" for none).
	Namespace string
	// Timeout bounds one Vault call; 0 means DefaultVaultTimeout.
	Timeout time.Duration
	// UseEnv lets the VAULT_* variables the Vault CLI reads (VAULT_ADDR,
	// VAULT_CACERT, VAULT_CAPATH, VAULT_CLIENT_CERT, VAULT_CLIENT_KEY,
	// VAULT_TLS_SERVER_NAME, VAULT_NAMESPACE) configure the connection
	// where the options leave a setting empty. Even then VAULT_TOKEN is
	// never used (Auth logs in), VAULT_SKIP_VERIFY=true is refused, no
	// proxy is used and redirects are never followed.
	UseEnv bool
	Auth   VaultAuth
	// WrapTransport, when set, wraps the connection's HTTP transport (tests
	// count the calls reaching Vault with it).
	WrapTransport func(http.RoundTripper) http.RoundTripper
	// Logger receives renewal and revocation failures; nil discards them.
	Logger *zap.Logger
	// Clock decides token and lease expiry; nil is the wall clock.
	Clock broker.Clock
}

// Vault is one connection to a Vault server with the broker's own login,
// shared by every vault_kv and vault_dynamic source that names it.
//
// NewVault does no network I/O (`broker validate` builds it offline). The
// first call that needs a token logs in (or Start does, in the
// background); concurrent callers share one login. A renewable token is
// kept alive with api.LifetimeWatcher; when renewal ends (max TTL reached,
// or renewing failed) the broker logs in again. A call answered 403
// re-authenticates once and is retried once; a second 403 fails closed.
//
// The connection never follows a redirect (the token must not travel to
// another host), never uses a proxy, reads at most MaxVaultResponse bytes
// per response and retries a failed call at most once (connection error or
// 5xx), so a Vault outage costs each fetch at most two attempts.
type Vault struct {
	name    string
	o       VaultOptions
	client  *api.Client
	timeout time.Duration
	log     *zap.Logger
	clock   broker.Clock

	sf singleflight.Group

	mu       sync.Mutex
	gen      uint64        // counts logins; a 403 re-authenticates only if no login happened since the failed call
	hasToken bool          // a token is set on client
	expires  time.Time     // the token's end; zero: no expiry
	margin   time.Duration // a token this close to expires is not used
	loggedIn bool          // the token came from a login (revoked at Close)
	watcher  *api.LifetimeWatcher
	mounts   []kvMountInfo // KV mounts seen (vault_kv version detection)
	closed   bool
	stop     chan struct{}
	bg       sync.WaitGroup
}

var errVaultRedirect = errors.New("vault answered with a redirect, which is never followed")
var errVaultTooLarge = fmt.Errorf("vault response larger than %d bytes", MaxVaultResponse)

// NewVault builds a connection from its options. It reads the CA bundle
// but contacts nothing.
func NewVault(o VaultOptions) (*Vault, error) {
	if o.Name == "" {
		o.Name = "vault"
	}
	if err := checkVaultAuth(o.Auth); err != nil {
		return nil, fmt.Errorf("inject: vault %q: %w", o.Name, err)
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultVaultTimeout
	}
	if o.Clock == nil {
		o.Clock = broker.SystemClock{}
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	cfg, err := vaultConfig(o)
	if err != nil {
		return nil, fmt.Errorf("inject: vault %q: %w", o.Name, err)
	}
	if err := CheckVaultAddress(cfg.Address); err != nil {
		return nil, fmt.Errorf("inject: vault %q: %w", o.Name, err)
	}
	// api.NewClient evaluates api.DefaultConfig (which parses VAULT_*) and
	// applies VAULT_TOKEN, VAULT_NAMESPACE and VAULT_HEADERS to the client;
	// all three are undone below. A malformed VAULT_* value still makes
	// DefaultConfig, and so NewClient, fail.
	client, err := api.NewClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("inject: vault %q: building the client: %w", o.Name, err)
	}
	client.ClearToken()
	ns := o.Namespace
	if ns == "" && o.UseEnv {
		ns = client.Namespace() // VAULT_NAMESPACE
	}
	client.SetHeaders(http.Header{api.RequestHeaderName: []string{"true"}})
	if ns != "" {
		client.SetNamespace(ns)
	}
	// DefaultWrappingLookupFunc reads VAULT_WRAP_TTL: never wrap.
	client.SetWrappingLookupFunc(func(string, string) string { return "" })
	return &Vault{name: o.Name, o: o, client: client, timeout: o.Timeout, log: o.Logger.With(zap.String("vault", o.Name)),
		clock: o.Clock, stop: make(chan struct{})}, nil
}

func checkVaultAuth(a VaultAuth) error {
	switch {
	case a.ChildTTL < 0:
		return errors.New("auth child_token_ttl must be positive")
	case a.ChildTTL > 0 && a.Method != VaultAuthTokenFile:
		return errors.New("auth child_token_ttl applies to token_file only (a login already gives this process its own token)")
	case a.ChildTTL > 0 && a.ChildTTL < time.Minute:
		return errors.New("auth child_token_ttl must be at least 1m")
	}
	switch a.Method {
	case VaultAuthJWT, VaultAuthKubernetes:
		if a.Role == "" {
			return fmt.Errorf("auth %s needs a role", a.Method)
		}
		if a.Token == nil {
			return fmt.Errorf("auth %s needs the broker's own token", a.Method)
		}
	case VaultAuthAppRole:
		if a.RoleIDFile == "" || a.SecretIDFile == "" {
			return errors.New("auth approle needs role_id_file and secret_id_file")
		}
	case VaultAuthTokenFile:
		if a.TokenFile == "" {
			return errors.New("auth token_file needs token_file")
		}
	case "":
		return errors.New("auth method is not set (jwt, kubernetes, approle or token_file)")
	default:
		return fmt.Errorf("auth method %q is not one of jwt, kubernetes, approle, token_file", a.Method)
	}
	if strings.Contains(a.Mount, "..") || strings.HasPrefix(a.Mount, "/") || strings.ContainsAny(a.Mount, "?#%\\ ") {
		return fmt.Errorf("auth mount %q is not a Vault path", a.Mount)
	}
	return nil
}

// CheckVaultAddress wants an http(s) URL without credentials, query or
// fragment; plain http only on loopback (the token would travel in clear).
func CheckVaultAddress(s string) error {
	if s == "" {
		return errors.New("address is empty")
	}
	const want = "a Vault URL like https://vault.example:8200"
	if u, err := url.Parse(s); err == nil && u.Path != "" && u.Path != "/" {
		return fmt.Errorf("address %q is not %s", s, want)
	}
	if err := CheckServiceURL(s, want, "on loopback"); err != nil {
		return fmt.Errorf("address %w", err)
	}
	return nil
}

// vaultConfig builds the api.Config without reading the environment
// (unless UseEnv): api.DefaultConfig would read VAULT_* and the proxy
// variables.
func vaultConfig(o VaultOptions) (*api.Config, error) {
	var tr *http.Transport
	var cfg *api.Config
	if o.UseEnv {
		cfg = api.DefaultConfig()
		if cfg.Error != nil {
			return nil, fmt.Errorf("reading VAULT_* from the environment: %w", cfg.Error)
		}
		var ok bool
		if tr, ok = cfg.HttpClient.Transport.(*http.Transport); !ok {
			return nil, errors.New("unexpected transport from the environment's config")
		}
		if tr.TLSClientConfig != nil && tr.TLSClientConfig.InsecureSkipVerify {
			return nil, errors.New("VAULT_SKIP_VERIFY is set: keygate never disables TLS verification")
		}
		if o.Address != "" {
			cfg.Address = o.Address
		}
	} else {
		tr = &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			TLSClientConfig:     &tls.Config{MinVersion: tls.VersionTLS12},
			TLSHandshakeTimeout: 5 * time.Second,
			ForceAttemptHTTP2:   true,
			MaxIdleConns:        16,
			MaxIdleConnsPerHost: 16,
			IdleConnTimeout:     90 * time.Second,
		}
		cfg = &api.Config{Address: o.Address}
	}
	tr.Proxy = nil // never a proxy, whatever the environment says
	if tr.TLSClientConfig == nil {
		tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	switch {
	case o.CABundle == "" && o.UseEnv && tr.TLSClientConfig.RootCAs != nil:
		// VAULT_CACERT / VAULT_CAPATH set the roots.
	case o.CAPool != nil:
		tr.TLSClientConfig.RootCAs = o.CAPool
	case o.CABundle != "":
		pem, err := os.ReadFile(o.CABundle)
		if err != nil {
			return nil, fmt.Errorf("ca_bundle: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ca_bundle: %s holds no PEM certificate", o.CABundle)
		}
		tr.TLSClientConfig.RootCAs = pool
	}
	var rt http.RoundTripper = tr
	if o.WrapTransport != nil {
		rt = o.WrapTransport(rt)
	}
	cfg.HttpClient = &http.Client{
		Transport:     limitTransport{rt},
		CheckRedirect: func(*http.Request, []*http.Request) error { return errVaultRedirect },
	}
	cfg.DisableRedirects = true
	cfg.Timeout = o.Timeout
	cfg.MaxRetries = 1
	cfg.MinRetryWait = 100 * time.Millisecond
	cfg.MaxRetryWait = 400 * time.Millisecond
	cfg.CheckRetry = vaultRetry
	cfg.Limiter = nil
	cfg.SRVLookup = false
	return cfg, nil
}

// vaultRetry retries a call once after a connection error or a 5xx; never
// after a redirect, a TLS failure or the caller giving up.
func vaultRetry(ctx context.Context, resp *http.Response, err error) (bool, error) {
	if ctx.Err() != nil {
		return false, ctx.Err()
	}
	if err != nil {
		var cv *tls.CertificateVerificationError
		if errors.Is(err, errVaultRedirect) || errors.Is(err, errVaultTooLarge) || errors.As(err, &cv) {
			return false, err
		}
		return true, nil
	}
	if resp.StatusCode >= 500 && resp.StatusCode != http.StatusNotImplemented {
		return true, nil
	}
	return false, nil
}

// limitTransport caps every response body at MaxVaultResponse.
type limitTransport struct{ rt http.RoundTripper }

func (l limitTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := l.rt.RoundTrip(r)
	if err == nil && resp.Body != nil {
		resp.Body = &limitedBody{rc: resp.Body, left: MaxVaultResponse}
	}
	return resp, err
}

type limitedBody struct {
	rc   io.ReadCloser
	left int64
}

func (b *limitedBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		// One byte more than the limit tells "exactly at the limit" from
		// "over it".
		var one [1]byte
		if n, _ := b.rc.Read(one[:]); n > 0 {
			return 0, errVaultTooLarge
		}
		return 0, io.EOF
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.rc.Read(p)
	b.left -= int64(n)
	return n, err
}

func (b *limitedBody) Close() error { return b.rc.Close() }

// Name is the connection's config name.
func (v *Vault) Name() string { return v.name }

// Ready reports whether the broker holds a Vault token that has not
// expired (for /readyz). Before the first login it is false.
func (v *Vault) Ready() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.hasToken && !v.closed && (v.expires.IsZero() || v.clock.Now().Before(v.expires))
}

// Start logs in in the background, retrying with backoff (1s doubling to
// 30s) until a login succeeds, ctx ends or Close is called, so /readyz
// turns ready without waiting for the first request. It returns at once.
func (v *Vault) Start(ctx context.Context) {
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return
	}
	v.bg.Add(1)
	v.mu.Unlock()
	go func() {
		defer v.bg.Done()
		wait := time.Second
		for {
			if _, err := v.token(ctx); err == nil {
				return
			} else {
				v.log.Warn("vault login failed; retrying", zap.Duration("in", wait), zap.String("reason", vaultReason(err)))
			}
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-v.stop:
				t.Stop()
				return
			case <-t.C:
			}
			wait = min(2*wait, 30*time.Second)
		}
	}()
}

// Close stops renewal and, when the token came from a login (not
// token_file), revokes it, which also revokes every lease Vault issued to
// it. Later calls fail.
func (v *Vault) Close(ctx context.Context) error {
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return nil
	}
	v.closed = true
	close(v.stop)
	if v.watcher != nil {
		v.watcher.Stop()
		v.watcher = nil
	}
	revoke := v.loggedIn && v.hasToken
	v.mu.Unlock()
	var err error
	if revoke {
		if rerr := v.client.Auth().Token().RevokeSelfWithContext(ctx, ""); rerr != nil {
			err = fmt.Errorf("inject: vault %q: revoking the broker's token: %s", v.name, vaultReason(rerr))
		}
	}
	v.mu.Lock()
	v.hasToken = false
	v.client.ClearToken()
	v.mu.Unlock()
	if werr := waitCtx(ctx, &v.bg); err == nil {
		err = werr
	}
	return err
}

// token returns the login generation of a valid token, logging in first
// when there is none (or it has expired).
func (v *Vault) token(ctx context.Context) (uint64, error) {
	v.mu.Lock()
	if v.closed {
		v.mu.Unlock()
		return 0, errVaultClosed
	}
	if v.hasToken && (v.expires.IsZero() || v.clock.Now().Before(v.expires.Add(-v.margin))) {
		gen := v.gen
		v.mu.Unlock()
		return gen, nil
	}
	v.mu.Unlock()
	return v.login(ctx)
}

var errVaultClosed = errors.New("the vault connection is closed")

// reauth logs in again after a 403, unless a login happened since the call
// that failed (generation gen) started.
func (v *Vault) reauth(ctx context.Context, gen uint64) error {
	v.mu.Lock()
	cur := v.gen
	v.mu.Unlock()
	if cur != gen {
		return nil
	}
	_, err := v.login(ctx)
	return err
}

// login runs one login for all concurrent callers, detached from the
// first caller's cancellation and bounded by the timeout; a caller that
// gives up returns at once.
func (v *Vault) login(ctx context.Context) (uint64, error) {
	ch := v.sf.DoChan("login", func() (any, error) {
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), v.timeout)
		defer cancel()
		return v.doLogin(lctx)
	})
	select {
	case <-ctx.Done():
		return 0, ctx.Err()
	case r := <-ch:
		if r.Err != nil {
			return 0, r.Err
		}
		return r.Val.(uint64), nil
	}
}

// vaultLoginError is a failed login; the reason is already summarised.
type vaultLoginError struct {
	method string
	reason string
	err    error
}

func (e *vaultLoginError) Error() string {
	return "login with " + e.method + " failed: " + e.reason
}

func (e *vaultLoginError) Unwrap() error { return e.err }

func (v *Vault) doLogin(ctx context.Context) (uint64, error) {
	a := v.o.Auth
	fail := func(reason string, err error) (uint64, error) {
		return 0, &vaultLoginError{method: a.Method, reason: reason, err: err}
	}
	var secret *api.Secret
	var err error
	switch a.Method {
	case VaultAuthTokenFile:
		tok, rerr := FileToken(a.TokenFile).Token(ctx)
		if rerr != nil {
			return fail("reading the token file "+a.TokenFile, nil)
		}
		// Look the token up with its own authority before using it, to
		// learn its TTL and whether it renews.
		r := v.client.NewRequest(http.MethodGet, "/v1/auth/token/lookup-self")
		r.ClientToken = tok.Reveal()
		//lint:ignore SA1019 the raw response (status, body size) is needed to summarise failures without echoing bodies; Logical() would parse and wrap them
		resp, rerr := v.client.RawRequestWithContext(ctx, r)
		if resp != nil {
			defer resp.Body.Close()
		}
		if rerr != nil {
			return fail(vaultReason(rerr), rerr)
		}
		look, perr := api.ParseSecret(resp.Body)
		if perr != nil || look == nil {
			return fail("unreadable token lookup", perr)
		}
		ttl, _ := look.TokenTTL()
		renewable, _ := look.TokenIsRenewable()
		secret = &api.Secret{Auth: &api.SecretAuth{ClientToken: tok.Reveal(), Renewable: renewable,
			LeaseDuration: int(ttl / time.Second)}}
		if a.ChildTTL > 0 {
			if secret, err = v.childToken(ctx, tok.Reveal(), a.ChildTTL); err != nil {
				return fail("creating this process's child token: "+vaultReason(err), err)
			}
		}
	default:
		var body map[string]any
		mount := a.Mount
		if mount == "" {
			mount = a.Method
		}
		switch a.Method {
		case VaultAuthJWT, VaultAuthKubernetes:
			jwt, terr := a.Token.Token(ctx)
			if terr != nil {
				// TokenSource errors name the file or the Workload API, never
				// the token.
				return fail("the broker's own token: "+terr.Error(), nil)
			}
			body = map[string]any{"role": a.Role, "jwt": jwt.Reveal()}
		case VaultAuthAppRole:
			roleID, rerr := FileToken(a.RoleIDFile).Token(ctx)
			if rerr != nil {
				return fail("reading role_id_file "+a.RoleIDFile, nil)
			}
			secretID, serr := FileToken(a.SecretIDFile).Token(ctx)
			if serr != nil {
				return fail("reading secret_id_file "+a.SecretIDFile, nil)
			}
			body = map[string]any{"role_id": roleID.Reveal(), "secret_id": secretID.Reveal()}
		}
		r := v.client.NewRequest(http.MethodPut, "/v1/auth/"+strings.Trim(mount, "/")+"/login")
		r.ClientToken = "" // a login carries no token
		if jerr := r.SetJSONBody(body); jerr != nil {
			return fail("encoding the login", nil)
		}
		//lint:ignore SA1019 the raw response (status, body size) is needed to summarise failures without echoing bodies; Logical() would parse and wrap them
		resp, rerr := v.client.RawRequestWithContext(ctx, r)
		if resp != nil {
			defer resp.Body.Close()
		}
		if rerr != nil {
			return fail(vaultReason(rerr), rerr)
		}
		secret, err = api.ParseSecret(resp.Body)
		if err != nil {
			return fail(vaultReason(err), err)
		}
	}
	if secret == nil || secret.Auth == nil || secret.Auth.ClientToken == "" {
		return fail("Vault returned no token", nil)
	}
	now := v.clock.Now()
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return 0, errVaultClosed
	}
	if v.watcher != nil {
		v.watcher.Stop()
		v.watcher = nil
	}
	v.client.SetToken(secret.Auth.ClientToken)
	v.gen++
	v.hasToken = true
	// A token from a login, or a child made for this process, is ours to
	// revoke at Close; the file's own token may be shared.
	v.loggedIn = a.Method != VaultAuthTokenFile || a.ChildTTL > 0
	v.expires = time.Time{}
	if d := secret.Auth.LeaseDuration; d > 0 {
		ttl := time.Duration(d) * time.Second
		v.expires = now.Add(ttl)
		v.margin = min(vaultTokenMargin, ttl/4)
	}
	if secret.Auth.Renewable && secret.Auth.LeaseDuration > 0 {
		w, werr := v.client.NewLifetimeWatcher(&api.LifetimeWatcherInput{Secret: secret})
		if werr == nil {
			v.watcher = w
			v.bg.Add(1)
			go v.watch(w, v.gen)
		}
	}
	return v.gen, nil
}

// watch follows one token's renewals. When renewal ends (the token reached
// its max TTL, or renewing failed until the end was near) it logs in again;
// if that fails the next call that needs a token tries again.
func (v *Vault) watch(w *api.LifetimeWatcher, gen uint64) {
	defer v.bg.Done()
	go w.Start()
	for {
		select {
		case <-v.stop:
			w.Stop()
			return
		case r := <-w.RenewCh():
			if r == nil || r.Secret == nil || r.Secret.Auth == nil {
				continue
			}
			v.mu.Lock()
			if v.gen == gen && r.Secret.Auth.LeaseDuration > 0 {
				v.expires = v.clock.Now().Add(time.Duration(r.Secret.Auth.LeaseDuration) * time.Second)
			}
			v.mu.Unlock()
		case err := <-w.DoneCh():
			v.mu.Lock()
			current := v.gen == gen && !v.closed
			v.mu.Unlock()
			if !current {
				return
			}
			if err != nil {
				v.log.Info("vault token renewal ended; logging in again", zap.String("reason", vaultReason(err)))
			}
			ctx, cancel := context.WithTimeout(context.Background(), v.timeout)
			if _, err := v.login(ctx); err != nil {
				v.log.Warn("vault login after renewal ended failed; the next request retries", zap.String("reason", vaultReason(err)))
			}
			cancel()
			return
		}
	}
}

// call runs fn with a valid token. On a 403 it re-authenticates once and
// runs fn once more; a second 403 is returned as is (fail closed).
func (v *Vault) call(ctx context.Context, fn func(context.Context) (*api.Secret, error)) (*api.Secret, error) {
	gen, err := v.token(ctx)
	if err != nil {
		return nil, err
	}
	s, err := fn(ctx)
	if !isVaultStatus(err, http.StatusForbidden) {
		return s, err
	}
	if rerr := v.reauth(ctx, gen); rerr != nil {
		return nil, rerr
	}
	return fn(ctx)
}

// read is a GET of path (no /v1/ prefix) with optional query values.
func (v *Vault) read(ctx context.Context, path string, q map[string][]string) (*api.Secret, error) {
	return v.call(ctx, func(ctx context.Context) (*api.Secret, error) {
		return v.client.Logical().ReadWithDataWithContext(ctx, path, q)
	})
}

// write is a PUT of path with a JSON body.
func (v *Vault) write(ctx context.Context, path string, body map[string]any) (*api.Secret, error) {
	return v.call(ctx, func(ctx context.Context) (*api.Secret, error) {
		return v.client.Logical().WriteWithContext(ctx, path, body)
	})
}

func isVaultStatus(err error, code int) bool {
	var re *api.ResponseError
	return errors.As(err, &re) && re.StatusCode == code
}

// vaultReason summarises a failed Vault call in a fixed vocabulary: status
// codes and error classes, never a response body (Vault error messages can
// quote the request) and never a URL.
func vaultReason(err error) string {
	var re *api.ResponseError
	var le *vaultLoginError
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	var ne net.Error
	switch {
	case err == nil:
		return "no error"
	case errors.As(err, &le):
		return le.Error()
	case errors.Is(err, errVaultClosed):
		return errVaultClosed.Error()
	case errors.Is(err, errVaultRedirect):
		return "Vault answered with a redirect, which is never followed"
	case errors.Is(err, errVaultTooLarge):
		return "Vault's response is too large"
	case errors.Is(err, errVaultGarbage):
		return "Vault sent an unexpected response"
	case errors.As(err, &re):
		switch re.StatusCode {
		case http.StatusForbidden:
			return "permission denied (HTTP 403)"
		case http.StatusNotFound:
			return "not found (HTTP 404)"
		case http.StatusTooManyRequests:
			return "rate limited (HTTP 429)"
		case http.StatusServiceUnavailable:
			return "Vault is unavailable or sealed (HTTP 503)"
		}
		if re.StatusCode >= 500 {
			return fmt.Sprintf("Vault server error (HTTP %d)", re.StatusCode)
		}
		return fmt.Sprintf("rejected by Vault (HTTP %d)", re.StatusCode)
	case broker.IsCertificateError(err):
		return "Vault's TLS certificate did not verify"
	case errors.Is(err, context.DeadlineExceeded):
		return "Vault did not answer in time"
	case errors.Is(err, context.Canceled):
		return "the request was canceled"
	case errors.As(err, &se), errors.As(err, &te), errors.Is(err, io.ErrUnexpectedEOF):
		return "Vault sent an unreadable response"
	case errors.As(err, &ne) && ne.Timeout():
		return "Vault did not answer in time"
	case errors.As(err, &ne), errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
		return "Vault is unreachable"
	}
	return "the Vault call failed"
}

// vaultError is the *broker.Error for a failed call on behalf of credential
// cred: 503 credential_unavailable (502 credential_malformed for a bad
// answer, see vaultBadAnswer) whose message names the operation and
// the path, and a cause that holds the same summary (never a body, a token
// or a full lease id).
func (v *Vault) vaultError(cred, op string, err error) error {
	reason := vaultReason(err)
	be := &broker.Error{Code: broker.CodeCredentialUnavailable,
		Message: fmt.Sprintf("credential %q: Vault %q: %s: %s", cred, v.name, op, reason),
		Err:     fmt.Errorf("inject: vault %q (%s): %s: %s", v.name, v.client.Address(), op, reason)}
	if isVaultStatus(err, http.StatusTooManyRequests) {
		be.RetryAfter = time.Second
	}
	if vaultBadAnswer(err) {
		be.Code = broker.CodeCredentialMalformed
	}
	return be
}

// vaultBadAnswer reports whether Vault did answer, but with something
// that is no usable answer (too large, not JSON, not the expected shape):
// 502 credential_malformed rather than 503 (SECURITY-TESTS F-03).
func vaultBadAnswer(err error) bool {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	return errors.Is(err, errVaultTooLarge) || errors.Is(err, errVaultGarbage) ||
		errors.As(err, &se) || errors.As(err, &te)
}

// childToken creates, with parent's authority, a renewable child token of
// ttl for this process only.
func (v *Vault) childToken(ctx context.Context, parent string, ttl time.Duration) (*api.Secret, error) {
	r := v.client.NewRequest(http.MethodPost, "/v1/auth/token/create")
	r.ClientToken = parent
	if err := r.SetJSONBody(map[string]any{
		"ttl": fmt.Sprintf("%ds", int(ttl/time.Second)), "renewable": true,
		"display_name": "keygate", "meta": map[string]string{"keygate": "incarnation"},
	}); err != nil {
		return nil, err
	}
	//lint:ignore SA1019 the raw response (status, body size) is needed to summarise failures without echoing bodies; Logical() would parse and wrap them
	resp, err := v.client.RawRequestWithContext(ctx, r)
	if resp != nil {
		defer resp.Body.Close()
	}
	if err != nil {
		return nil, err
	}
	return api.ParseSecret(resp.Body)
}
