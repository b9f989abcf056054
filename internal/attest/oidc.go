// OIDC attestor: a caller proves itself with a JWT from a configured OpenID
// Connect issuer (GitHub Actions, GitLab CI, Kubernetes service accounts, any
// OIDC issuer), one attestor per issuer.
//
// Security contract:
//
//   - Evidence is a JWT in Proxy-Authorization: "Bearer <jwt>", or the password
//     of the Basic credentials a client sends for a proxy URL
//     (HTTPS_PROXY=http://token:<jwt>@host:port); see ProxyToken.
//   - Routing only: the unverified payload is read to see whether iss is this
//     attestor's issuer. A value that is not a compact JWS with a JSON-object
//     payload, or names another issuer, gives ErrNoEvidence, so attestors for
//     several issuers can be chained. Nothing unverified reaches an Identity.
//   - Verified, in full, before an Identity is returned: a single signature by
//     a key from the issuer's JWKS (found by discovery at
//     Issuer + /.well-known/openid-configuration, whose issuer must equal
//     Issuer exactly); alg in the configured asymmetric allow-list (never
//     "none", never HS*), and matching the key's type and the JWK's own alg
//     when it names one; iss equal to Issuer; aud containing one of Audiences;
//     exp present; exp, nbf and iat within Skew of the Clock; sub non-empty.
//     Anything else wrong is an error wrapping broker.ErrInvalidEvidence (deny).
//   - A token over 64 KiB is rejected before any parsing.
//   - Errors carry a short fixed reason. They never contain the token, a
//     header value (kid included) or a claim value.
//   - Issuer and jwks_uri must be https; plain http is accepted only for a
//     loopback host (local development and tests).
//   - Keys: only RSA (>= 2048 bits), ECDSA and Ed25519 public keys with use
//     "sig" or no use are kept; symmetric and other keys in the JWKS are
//     ignored, so an HS* token can never be checked against a public key.
//
// Availability and refresh:
//
//   - NewOIDC needs no network. It starts one background fetch (discovery +
//     JWKS); Attest fetches on demand if no key set is cached yet; Ready
//     starts a background retry while not ready. A broker therefore starts,
//     and becomes ready, even if the issuer is briefly down. Until a key set
//     has been fetched, a token from this issuer is denied with an error
//     wrapping ErrIssuerUnavailable (internal failure, not ErrInvalidEvidence).
//   - The JWKS is cached. A token whose kid is not cached triggers one
//     refresh; then the kid is still unknown → ErrInvalidEvidence. A token
//     with a cached kid whose signature does not verify is rejected without a
//     refresh (it is forged or corrupt; refreshing cannot help).
//   - Every fetch attempt (discovery, JWKS; success or failure) is rate-limited
//     to one per minRefreshInterval (10s) per attestor and collapsed by
//     singleflight, so a flood of tokens with garbage kids, or traffic while the
//     issuer is down, costs the issuer at most one request every 10s. The price:
//     for up to 10s after a refresh, a token signed with a key the issuer has
//     only just published is rejected.
//   - A key set older than jwksMaxAge (15m) is refreshed in the background
//     while the old one keeps serving, so a key the issuer removes stops being
//     trusted within about that time; if the refresh fails the old set stays.
//   - Discovery succeeds once; afterwards only the JWKS is fetched.
//
// Why not go-oidc's IDTokenVerifier and RemoteKeySet (v3.21.0): go-oidc is used
// for discovery (NewProvider, with its exact issuer check). Its RemoteKeySet
// caches keys and collapses concurrent fetches (an in-flight request is
// shared), but it re-fetches the JWKS on every verification that the cache
// cannot satisfy — an unknown kid and also a bad signature under a known kid —
// with no minimum interval, so N garbage-kid tokens in sequence cause N
// fetches; it never expires cached keys, so a key removed from the JWKS stays
// trusted until a miss happens to refresh it. IDTokenVerifier checks exp with
// no skew and nbf with a fixed 5 minutes, supports a single audience, and its
// error strings quote the token's iss and aud values. Verification here is
// therefore done with go-jose directly against a small key cache with the
// rate limit above.
package attest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	jose "github.com/go-jose/go-jose/v4"
	"golang.org/x/sync/singleflight"

	"github.com/keygate/broker/internal/broker"
)

const (
	defaultOIDCSkew    = 30 * time.Second
	maxOIDCSkew        = 5 * time.Minute
	minRefreshInterval = 10 * time.Second
	jwksMaxAge         = 15 * time.Minute
	refreshTimeout     = 30 * time.Second // cap per refresh, whatever the HTTP client's timeout
	defaultHTTPTimeout = 10 * time.Second
	maxTokenBytes      = 64 << 10
	maxJWKSBytes       = 1 << 20
	minRSABits         = 2048
)

// ErrIssuerUnavailable is wrapped by Attest when the issuer's keys have never
// been fetched (discovery or JWKS failing): an internal failure that denies,
// distinct from rejected evidence.
var ErrIssuerUnavailable = errors.New("attest: oidc: issuer unavailable")

// Rejection reasons. Fixed strings: they never hold token material.
var (
	errOIDCTooLarge     = oidcInvalid("token too large")
	errOIDCMalformed    = oidcInvalid("malformed token")
	errOIDCAlg          = oidcInvalid("signing algorithm not allowed")
	errOIDCUnknownKid   = oidcInvalid("unknown key id")
	errOIDCSignature    = oidcInvalid("signature does not verify")
	errOIDCNoExp        = oidcInvalid("token has no exp")
	errOIDCTimeClaim    = oidcInvalid("malformed time claim")
	errOIDCExpired      = oidcInvalid("token expired")
	errOIDCNotYetValid  = oidcInvalid("token not yet valid")
	errOIDCIssuedFuture = oidcInvalid("token issued in the future")
	errOIDCAudience     = oidcInvalid("audience not accepted")
	errOIDCNoSub        = oidcInvalid("token has no sub")

	errRefreshLimited = errors.New("last fetch attempt less than 10s ago")
)

func oidcInvalid(reason string) error {
	return fmt.Errorf("attest: oidc: %s: %w", reason, broker.ErrInvalidEvidence)
}

// allowedOIDCAlgs are the asymmetric JWS algorithms an attestor may be
// configured with. "none" and HS* are absent on purpose.
var allowedOIDCAlgs = map[string]bool{
	"RS256": true, "RS384": true, "RS512": true,
	"PS256": true, "PS384": true, "PS512": true,
	"ES256": true, "ES384": true, "ES512": true,
	"EdDSA": true,
}

// OIDCOptions configures one OIDC attestor.
type OIDCOptions struct {
	Name       string        // attestor name, e.g. "github"
	Issuer     string        // exact iss; discovery at Issuer + /.well-known/openid-configuration
	Audiences  []string      // token aud must contain one of them (required, non-empty)
	Algorithms []string      // allowed JWS algs; default RS256, ES256 (never "none", never HS*)
	Skew       time.Duration // default 30s, max 5m
	HTTPClient *http.Client  // for discovery/JWKS; nil → no proxy, 10s timeout
	Clock      broker.Clock  // nil → system clock
	// Offline validates the options and builds nothing that fetches: for
	// `broker validate`, which must contact no issuer. NewOIDC returns nil.
	Offline bool
}

// OIDC attests callers by a JWT from one OIDC issuer. See the file comment
// for the security contract and refresh behaviour.
type OIDC struct {
	name      string
	issuer    string
	audiences []string
	algs      []jose.SignatureAlgorithm
	skew      time.Duration
	client    *http.Client
	clock     broker.Clock
	base      context.Context // values for fetches; never cancelled

	keys  atomic.Pointer[keySnapshot] // nil until the first successful fetch
	ready atomic.Bool
	sf    singleflight.Group

	mu          sync.Mutex
	jwksURL     string    // "" until discovery succeeds
	lastAttempt time.Time // last fetch attempt, for the rate limit
	lastErr     error     // why the last attempt failed; nil after a success
}

// keySnapshot is an immutable fetched key set.
type keySnapshot struct {
	byKid     map[string][]jose.JSONWebKey
	all       []jose.JSONWebKey
	fetchedAt time.Time
}

func (s *keySnapshot) lookup(kid string) []jose.JSONWebKey {
	if kid == "" {
		return s.all
	}
	return s.byKid[kid]
}

// NewOIDC validates the options and returns an attestor. It does not need the
// issuer to be reachable: it starts a background fetch of discovery + JWKS
// and returns at once; a failed fetch is retried on later calls to Attest and
// Ready (at most once per 10s). ctx supplies values only: its cancellation
// is ignored, because the attestor outlives the call that builds it (a
// config-load context must not silently disable key refresh). Every fetch is
// bounded by the HTTP client's timeout and by 30s; no goroutine runs between
// fetches, so a discarded attestor leaks nothing.
func NewOIDC(ctx context.Context, o OIDCOptions) (*OIDC, error) {
	if o.Name == "" {
		return nil, errors.New("attest: oidc: name is empty")
	}
	if err := checkFetchURL(o.Issuer, true); err != nil {
		return nil, fmt.Errorf("attest: oidc %q: issuer: %w", o.Name, err)
	}
	if len(o.Audiences) == 0 {
		return nil, fmt.Errorf("attest: oidc %q: audiences is empty", o.Name)
	}
	for _, aud := range o.Audiences {
		if aud == "" {
			return nil, fmt.Errorf("attest: oidc %q: empty audience", o.Name)
		}
	}
	names := o.Algorithms
	if len(names) == 0 {
		names = []string{"RS256", "ES256"}
	}
	var algs []jose.SignatureAlgorithm
	for _, n := range names {
		if !allowedOIDCAlgs[n] {
			return nil, fmt.Errorf("attest: oidc %q: algorithm %q not allowed (asymmetric JWS algorithms only)", o.Name, n)
		}
		if !slices.Contains(algs, jose.SignatureAlgorithm(n)) {
			algs = append(algs, jose.SignatureAlgorithm(n))
		}
	}
	skew := o.Skew
	switch {
	case skew == 0:
		skew = defaultOIDCSkew
	case skew < 0 || skew > maxOIDCSkew:
		return nil, fmt.Errorf("attest: oidc %q: skew %v out of range (0, %v]", o.Name, skew, maxOIDCSkew)
	}
	client := o.HTTPClient
	if client == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.Proxy = nil // never send issuer traffic through an env proxy (possibly ourselves)
		client = &http.Client{Transport: tr, Timeout: defaultHTTPTimeout}
	}
	clock := o.Clock
	if clock == nil {
		clock = broker.SystemClock{}
	}
	if o.Offline {
		return nil, nil
	}
	a := &OIDC{
		name:      o.Name,
		issuer:    o.Issuer,
		audiences: slices.Clone(o.Audiences),
		algs:      algs,
		skew:      skew,
		client:    client,
		clock:     clock,
		base:      context.WithoutCancel(ctx),
	}
	a.kick()
	return a, nil
}

// Ready reports whether discovery and the JWKS have been fetched successfully
// at least once. While not ready, it starts a background retry (subject to
// the rate limit), so a readiness probe alone brings the attestor up.
func (a *OIDC) Ready() bool {
	if a.ready.Load() {
		return true
	}
	a.kick()
	return false
}

// Attest implements broker.Attestor.
func (a *OIDC) Attest(ctx context.Context, ev broker.Evidence) (broker.Identity, error) {
	tok, err := ProxyToken(ev.ProxyAuthorization)
	if err != nil {
		return broker.Identity{}, err
	}
	raw := tok.Reveal()
	if len(raw) > maxTokenBytes {
		return broker.Identity{}, errOIDCTooLarge
	}
	payload, claims, ok := peekJWT(raw)
	if !ok {
		return broker.Identity{}, broker.ErrNoEvidence
	}
	if iss, _ := claims["iss"].(string); iss != a.issuer {
		return broker.Identity{}, broker.ErrNoEvidence
	}

	// From here on the token claims to be ours: verify it fully.
	jws, err := jose.ParseSignedCompact(raw, a.algs)
	if err != nil {
		if _, ok := errors.AsType[*jose.ErrUnexpectedSignatureAlgorithm](err); ok {
			return broker.Identity{}, errOIDCAlg
		}
		return broker.Identity{}, errOIDCMalformed
	}
	if len(jws.Signatures) != 1 {
		return broker.Identity{}, errOIDCMalformed
	}
	h := jws.Signatures[0].Header
	verified, err := a.verify(ctx, jws, h.KeyID, h.Algorithm)
	if err != nil {
		return broker.Identity{}, err
	}
	// The claims used are the ones decoded while routing; make sure they are
	// exactly the bytes the signature covers.
	if !bytes.Equal(verified, payload) {
		return broker.Identity{}, errOIDCMalformed
	}
	if err := a.checkClaims(claims); err != nil {
		return broker.Identity{}, err
	}
	exp, _, _ := numericDate(claims, "exp") // present and valid: checkClaims passed
	return broker.Identity{
		ID:          claims["sub"].(string),
		Method:      broker.MethodOIDC,
		TrustDomain: a.issuer,
		Claims:      claims,
		// The same boundary checkClaims applies, so a tunnel opened with this
		// token stops serving exactly when a new CONNECT would be refused.
		Expires: time.Unix(0, int64(exp*1e9)).Add(a.skew),
	}, nil
}

// peekJWT decodes, without verifying anything, the payload of a compact JWS:
// three non-empty base64url parts whose middle one is a JSON object.
func peekJWT(raw string) ([]byte, map[string]any, bool) {
	head, rest, ok1 := strings.Cut(raw, ".")
	body, sig, ok2 := strings.Cut(rest, ".")
	if !ok1 || !ok2 || head == "" || body == "" || strings.Contains(sig, ".") {
		return nil, nil, false
	}
	payload, err := base64.RawURLEncoding.DecodeString(body)
	if err != nil {
		return nil, nil, false
	}
	var claims map[string]any
	if err := json.Unmarshal(payload, &claims); err != nil || claims == nil {
		return nil, nil, false
	}
	return payload, claims, true
}

// verify checks the signature against the cached key set, refreshing it once
// (rate-limited) when the kid is unknown.
func (a *OIDC) verify(ctx context.Context, jws *jose.JSONWebSignature, kid, alg string) ([]byte, error) {
	ks := a.keys.Load()
	if ks == nil {
		var err error
		if ks, err = a.refresh(ctx); ks == nil {
			return nil, a.unavailable(err)
		}
	} else if a.clock.Now().Sub(ks.fetchedAt) > jwksMaxAge {
		a.kick() // background; keep serving with the current set
	}
	cands := ks.lookup(kid)
	if len(cands) == 0 && kid != "" {
		// A refresh that is rate-limited or fails leaves the kid unknown.
		fresh, _ := a.refresh(ctx)
		if ctx.Err() != nil {
			return nil, fmt.Errorf("attest: oidc: waiting for key refresh: %w", ctx.Err())
		}
		if fresh != nil {
			cands = fresh.lookup(kid)
		}
		if len(cands) == 0 {
			return nil, errOIDCUnknownKid
		}
	}
	for _, k := range cands {
		if k.Algorithm != "" && k.Algorithm != alg {
			continue
		}
		if payload, err := jws.Verify(k.Key); err == nil {
			return payload, nil
		}
	}
	return nil, errOIDCSignature
}

// checkClaims checks the time claims, audience and subject. iss was checked
// when routing.
func (a *OIDC) checkClaims(c map[string]any) error {
	now := a.clock.Now()
	t := float64(now.Unix()) + float64(now.Nanosecond())/1e9
	skew := a.skew.Seconds()
	exp, ok, err := numericDate(c, "exp")
	switch {
	case err != nil:
		return err
	case !ok:
		return errOIDCNoExp
	case t >= exp+skew:
		return errOIDCExpired
	}
	if nbf, ok, err := numericDate(c, "nbf"); err != nil {
		return err
	} else if ok && t+skew < nbf {
		return errOIDCNotYetValid
	}
	if iat, ok, err := numericDate(c, "iat"); err != nil {
		return err
	} else if ok && iat > t+skew {
		return errOIDCIssuedFuture
	}
	if !a.audienceOK(c["aud"]) {
		return errOIDCAudience
	}
	if sub, _ := c["sub"].(string); sub == "" {
		return errOIDCNoSub
	}
	return nil
}

func numericDate(c map[string]any, name string) (float64, bool, error) {
	v, present := c[name]
	if !present {
		return 0, false, nil
	}
	f, ok := v.(float64)
	if !ok {
		return 0, false, errOIDCTimeClaim
	}
	return f, true, nil
}

// audienceOK reports whether aud (a string or an array, RFC 7519 §4.1.3)
// names one of the configured audiences.
func (a *OIDC) audienceOK(aud any) bool {
	switch v := aud.(type) {
	case string:
		return slices.Contains(a.audiences, v)
	case []any:
		for _, e := range v {
			if s, ok := e.(string); ok && slices.Contains(a.audiences, s) {
				return true
			}
		}
	}
	return false
}

func (a *OIDC) unavailable(cause error) error {
	msg := "no key set fetched yet"
	if errors.Is(cause, errRefreshLimited) {
		a.mu.Lock()
		if a.lastErr != nil {
			cause = fmt.Errorf("%w; last attempt: %w", cause, a.lastErr)
		}
		a.mu.Unlock()
	}
	if cause != nil {
		msg = cause.Error()
		if len(msg) > 256 {
			msg = msg[:256] + "..."
		}
	}
	return fmt.Errorf("%w: %s (%s): %s", ErrIssuerUnavailable, a.name, a.issuer, msg)
}

// limited reports whether a fetch was attempted less than
// minRefreshInterval ago.
func (a *OIDC) limited(now time.Time) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return !a.lastAttempt.IsZero() && now.Sub(a.lastAttempt) < minRefreshInterval
}

// kick starts a background refresh unless one is running or the rate limit
// forbids it.
func (a *OIDC) kick() {
	if a.limited(a.clock.Now()) {
		return
	}
	a.sf.DoChan("refresh", a.doRefresh) // result channel is buffered; dropping it is fine
}

// refresh joins or starts a refresh and returns the key set current after it
// (possibly unchanged, possibly nil) with the refresh error, if any. The fetch
// itself runs on the attestor's base context, so one caller giving up does
// not cancel it for the others.
func (a *OIDC) refresh(ctx context.Context) (*keySnapshot, error) {
	ch := a.sf.DoChan("refresh", a.doRefresh)
	select {
	case <-ctx.Done():
		return a.keys.Load(), ctx.Err()
	case r := <-ch:
		return a.keys.Load(), r.Err
	}
}

func (a *OIDC) doRefresh() (any, error) {
	err := a.fetch()
	a.mu.Lock()
	if !errors.Is(err, errRefreshLimited) {
		a.lastErr = err
	}
	a.mu.Unlock()
	return nil, err
}

func (a *OIDC) fetch() error {
	now := a.clock.Now()
	a.mu.Lock()
	if !a.lastAttempt.IsZero() && now.Sub(a.lastAttempt) < minRefreshInterval {
		a.mu.Unlock()
		return errRefreshLimited
	}
	a.lastAttempt = now
	jwksURL := a.jwksURL
	a.mu.Unlock()

	ctx, cancel := context.WithTimeout(a.base, refreshTimeout)
	defer cancel()
	if jwksURL == "" {
		u, err := a.discover(ctx)
		if err != nil {
			return err
		}
		a.mu.Lock()
		a.jwksURL = u
		a.mu.Unlock()
		jwksURL = u
	}
	keys, err := a.fetchJWKS(ctx, jwksURL)
	if err != nil {
		return err
	}
	ks := &keySnapshot{byKid: map[string][]jose.JSONWebKey{}, all: keys, fetchedAt: a.clock.Now()}
	for _, k := range keys {
		ks.byKid[k.KeyID] = append(ks.byKid[k.KeyID], k)
	}
	a.keys.Store(ks)
	a.ready.Store(true)
	return nil
}

// discover fetches the discovery document with go-oidc, which requires its
// issuer to equal ours exactly, and returns the checked jwks_uri.
func (a *OIDC) discover(ctx context.Context) (string, error) {
	p, err := oidc.NewProvider(oidc.ClientContext(ctx, a.client), a.issuer)
	if err != nil {
		return "", fmt.Errorf("discovery: %w", err)
	}
	var doc struct {
		JWKSURL string `json:"jwks_uri"`
	}
	if err := p.Claims(&doc); err != nil {
		return "", fmt.Errorf("discovery: %w", err)
	}
	if err := checkFetchURL(doc.JWKSURL, false); err != nil {
		return "", fmt.Errorf("discovery: jwks_uri: %w", err)
	}
	return doc.JWKSURL, nil
}

func (a *OIDC) fetchJWKS(ctx context.Context, u string) ([]jose.JSONWebKey, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("jwks: %w", err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := a.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("jwks: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("jwks: status %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBytes+1))
	if err != nil {
		return nil, fmt.Errorf("jwks: %w", err)
	}
	if len(body) > maxJWKSBytes {
		return nil, errors.New("jwks: document too large")
	}
	return parseJWKS(body)
}

// parseJWKS keeps the usable signature keys of a JWK set and skips the rest
// (unknown key types, encryption keys, symmetric keys, short RSA keys), as
// RFC 7517 §5 asks, rather than failing the whole set.
func parseJWKS(body []byte) ([]jose.JSONWebKey, error) {
	var set struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(body, &set); err != nil || set.Keys == nil {
		return nil, errors.New("jwks: not a JSON Web Key Set")
	}
	var keys []jose.JSONWebKey
	for _, raw := range set.Keys {
		var k jose.JSONWebKey
		if err := k.UnmarshalJSON(raw); err != nil {
			continue
		}
		if k.Use != "" && k.Use != "sig" {
			continue
		}
		k = k.Public() // a public-only view, even if the issuer leaked a private key
		if !k.Valid() {
			continue
		}
		switch pub := k.Key.(type) {
		case *rsa.PublicKey:
			if pub.N.BitLen() < minRSABits {
				continue
			}
		case *ecdsa.PublicKey, ed25519.PublicKey:
		default:
			continue
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// checkFetchURL accepts an absolute https URL, or http for a loopback host.
// An issuer additionally may not carry a query or fragment (it is compared
// with iss verbatim and extended with the discovery path).
func checkFetchURL(raw string, issuer bool) error {
	if raw == "" {
		return errors.New("empty URL")
	}
	u, err := url.Parse(raw)
	if err != nil {
		return errors.New("not a URL")
	}
	if u.Host == "" || u.User != nil || u.Opaque != "" {
		return errors.New("must be an absolute URL with a host and no user info")
	}
	if issuer && (u.RawQuery != "" || u.Fragment != "" || u.ForceQuery) {
		return errors.New("must not have a query or fragment")
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if isLoopbackHost(u.Hostname()) {
			return nil
		}
		return errors.New("must be https (http only for a loopback host)")
	default:
		return errors.New("must be https")
	}
}

func isLoopbackHost(h string) bool {
	if strings.EqualFold(h, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(h)
	return err == nil && ip.Unmap().IsLoopback()
}
