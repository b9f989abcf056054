package inject

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/keygate/broker/internal/broker"
)

// KindOAuth2 is the Credential.Kind of an oauth2 source.
const KindOAuth2 = "oauth2"

// Client authentication methods at the token endpoint (RFC 6749 §2.3,
// OpenID Connect Core §9, RFC 7523 §2.2).
const (
	AuthClientSecretBasic = "client_secret_basic"
	AuthClientSecretPost  = "client_secret_post"
	AuthPrivateKeyJWT     = "private_key_jwt"
)

// ParamOAuth2Scopes is the grant parameter holding the scopes computed for
// a request (scopes_expr): canonical (sorted, without duplicates) and
// space-separated, so it is part of the cache key. When present it
// replaces the static scopes; present and empty means "no scope
// parameter".
const ParamOAuth2Scopes = "oauth2.scopes"

// DefaultOAuth2Lifetime is the lifetime assumed for a token whose response
// has no expires_in (RFC 6749 §5.1 only recommends it). It is short on
// purpose: the broker cannot know when such a token really expires, so it
// keeps it for at most this long (minus the cache margin) and then mints a
// new one.
const DefaultOAuth2Lifetime = time.Minute

// clientAssertionType is RFC 7523 §2.2's client_assertion_type.
const clientAssertionType = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

// assertionLifetime is how long a private_key_jwt client assertion is valid.
const assertionLifetime = time.Minute

// Scope limits: a scope is a scope-token of RFC 6749 §3.3.
const (
	maxScopes   = 64
	maxScopeLen = 256
)

// OAuth2Options configure NewOAuth2.
type OAuth2Options struct {
	// TokenURL is the token endpoint (https, or http on loopback).
	TokenURL string
	ClientID string
	// AuthMethod is one of AuthClientSecretBasic (the default),
	// AuthClientSecretPost or AuthPrivateKeyJWT.
	AuthMethod string
	// ClientSecret is required for the client_secret_* methods.
	ClientSecret SecretFunc
	// PrivateKey (PEM) signs the client assertion for private_key_jwt.
	PrivateKey SecretFunc
	// Scopes are requested when the grant carries no ParamOAuth2Scopes.
	Scopes []string
	// Audience and Resource are sent as the audience (a common extension)
	// and resource (RFC 8707) parameters when set.
	Audience string
	Resource string
	// HTTPClient is the broker's own client (no proxy, no redirects
	// followed: a redirect would carry the client secret elsewhere); nil
	// means such a client with the system roots.
	HTTPClient *http.Client
	// Timeout bounds one token request; 0 means DefaultTokenTimeout.
	Timeout time.Duration
	// Clock computes expiry from expires_in; nil means the wall clock.
	Clock broker.Clock
}

type oauth2Source struct {
	name string
	o    OAuth2Options
	key  keyMemo
}

// NewOAuth2 returns a source that runs the OAuth2 client-credentials grant
// (golang.org/x/oauth2/clientcredentials) once per call: no caching of its
// own, wrap it with NewCache. It does no network I/O here.
//
// The token is the credential's "token" field; Expires is the call's time
// plus expires_in, or plus DefaultOAuth2Lifetime when the response has
// none. A response whose token is empty, has control characters, is too
// long for a header or is not of type Bearer, whose expires_in is negative
// or which is not a token response at all is a 502 credential_malformed;
// an unreachable endpoint or an OAuth error response (RFC 6749 §5.2) is a
// 503 credential_unavailable naming the HTTP status and the OAuth error
// code. No error holds the client secret, the client assertion or the
// token.
func NewOAuth2(name string, o OAuth2Options) (broker.Source, error) {
	if err := checkTokenURL(o.TokenURL); err != nil {
		return nil, fmt.Errorf("inject: credential %q: token_url %w", name, err)
	}
	if o.ClientID == "" {
		return nil, fmt.Errorf("inject: credential %q: client_id is required", name)
	}
	if err := checkValue(o.ClientID); err != nil {
		return nil, fmt.Errorf("inject: credential %q: client_id %w", name, err)
	}
	if o.AuthMethod == "" {
		o.AuthMethod = AuthClientSecretBasic
	}
	switch o.AuthMethod {
	case AuthClientSecretBasic, AuthClientSecretPost:
		if o.ClientSecret == nil {
			return nil, fmt.Errorf("inject: credential %q: %s needs a client secret", name, o.AuthMethod)
		}
	case AuthPrivateKeyJWT:
		if o.PrivateKey == nil {
			return nil, fmt.Errorf("inject: credential %q: private_key_jwt needs a private key", name)
		}
	default:
		return nil, fmt.Errorf("inject: credential %q: auth_method %q is not client_secret_basic, client_secret_post or private_key_jwt", name, o.AuthMethod)
	}
	scopes, err := CanonicalScopes(o.Scopes)
	if err != nil {
		return nil, fmt.Errorf("inject: credential %q: scopes: %w", name, err)
	}
	o.Scopes = strings.Fields(scopes)
	if o.Timeout <= 0 {
		o.Timeout = DefaultTokenTimeout
	}
	if o.Clock == nil {
		o.Clock = broker.SystemClock{}
	}
	if o.HTTPClient == nil {
		o.HTTPClient = &http.Client{Transport: &http.Transport{Proxy: nil},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	}
	return &oauth2Source{name: name, o: o}, nil
}

// checkTokenURL wants an absolute https URL (http on loopback only)
// without userinfo or fragment.
func checkTokenURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || u.User != nil || u.Fragment != "" {
		return fmt.Errorf("%q is not an absolute URL without credentials", s)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if ip := net.ParseIP(u.Hostname()); (ip != nil && ip.IsLoopback()) || u.Hostname() == "localhost" {
			return nil
		}
	}
	return fmt.Errorf("%q must be https (http only on loopback)", s)
}

// CanonicalScopes validates scope-tokens (RFC 6749 §3.3: printable ASCII
// without space, '"' and '\') and returns them sorted, without duplicates,
// space-separated: the form used in cache keys and on the wire. Errors
// give the position of a bad scope, never its text (a scope may be derived
// from request data).
func CanonicalScopes(scopes []string) (string, error) {
	if len(scopes) > maxScopes {
		return "", fmt.Errorf("%d scopes, more than %d", len(scopes), maxScopes)
	}
	out := make([]string, 0, len(scopes))
	for i, s := range scopes {
		if s == "" {
			return "", fmt.Errorf("scope %d is empty", i+1)
		}
		if len(s) > maxScopeLen {
			return "", fmt.Errorf("scope %d is longer than %d bytes", i+1, maxScopeLen)
		}
		for j := 0; j < len(s); j++ {
			if c := s[j]; c <= 0x20 || c >= 0x7f || c == '"' || c == '\\' {
				return "", fmt.Errorf("scope %d has a character outside RFC 6749's scope-token set (printable ASCII except space, '\"' and '\\')", i+1)
			}
		}
		out = append(out, s)
	}
	slices.Sort(out)
	return strings.Join(slices.Compact(out), " "), nil
}

// ScopesParam turns the JSON array a scopes expression yields into the
// value of ParamOAuth2Scopes.
func ScopesParam(js string) (string, error) {
	list, err := StringListParam(js)
	if err != nil {
		return "", fmt.Errorf("scopes %w", err)
	}
	return CanonicalScopes(list)
}

func (s *oauth2Source) Credential(ctx context.Context, _ broker.Identity, g broker.Grant) (broker.Credential, error) {
	scopes := s.o.Scopes
	if p, ok := g.Params[ParamOAuth2Scopes]; ok {
		canon, err := CanonicalScopes(strings.Fields(p))
		if err != nil {
			return broker.Credential{}, &broker.Error{Code: broker.CodeDenied,
				Message: fmt.Sprintf("credential %q: the scopes computed for this request are not valid: %v", s.name, err)}
		}
		scopes = strings.Fields(canon)
	}
	ctx, cancel := context.WithTimeout(ctx, s.o.Timeout)
	defer cancel()

	cfg := &clientcredentials.Config{
		ClientID: s.o.ClientID,
		TokenURL: s.o.TokenURL,
		Scopes:   scopes,
	}
	params := url.Values{}
	if s.o.Audience != "" {
		params.Set("audience", s.o.Audience)
	}
	if s.o.Resource != "" {
		params.Set("resource", s.o.Resource)
	}
	var secrets []string // redacted from anything quoted from the endpoint
	switch s.o.AuthMethod {
	case AuthClientSecretBasic, AuthClientSecretPost:
		sec, err := s.o.ClientSecret(ctx)
		if err != nil {
			return broker.Credential{}, s.ownSecretErr("client secret", err)
		}
		if sec.IsZero() {
			return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialUnavailable,
				Message: fmt.Sprintf("credential %q: the client secret is empty", s.name)}
		}
		cfg.ClientSecret = sec.Reveal()
		secrets = append(secrets, cfg.ClientSecret)
		cfg.AuthStyle = oauth2.AuthStyleInHeader
		if s.o.AuthMethod == AuthClientSecretPost {
			cfg.AuthStyle = oauth2.AuthStyleInParams
		}
	case AuthPrivateKeyJWT:
		pemKey, err := s.o.PrivateKey(ctx)
		if err != nil {
			return broker.Credential{}, s.ownSecretErr("private key", err)
		}
		k, err := s.key.get(pemKey)
		if err != nil {
			return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialUnavailable,
				Message: fmt.Sprintf("credential %q: the private key for private_key_jwt is not usable", s.name), Err: err}
		}
		assertion, err := s.clientAssertion(k)
		if err != nil {
			return broker.Credential{}, &broker.Error{Code: broker.CodeInternal,
				Message: fmt.Sprintf("credential %q: signing the client assertion failed", s.name), Err: err}
		}
		secrets = append(secrets, assertion)
		// client_id in the body (RFC 7521 §4.2 allows it), no secret.
		cfg.AuthStyle = oauth2.AuthStyleInParams
		params.Set("client_assertion_type", clientAssertionType)
		params.Set("client_assertion", assertion)
	}
	if len(params) > 0 {
		cfg.EndpointParams = params
	}
	issued := s.o.Clock.Now()
	tok, err := cfg.Token(context.WithValue(ctx, oauth2.HTTPClient, s.o.HTTPClient))
	if err != nil {
		return broker.Credential{}, s.tokenErr(ctx, err, secrets)
	}
	return s.credential(tok, issued, scopes, secrets)
}

// clientAssertion is the RFC 7523 §3 JWT: iss = sub = client_id, aud = the
// token endpoint, a fresh jti, valid for a minute.
func (s *oauth2Source) clientAssertion(k signingKey) (string, error) {
	now := s.o.Clock.Now()
	jti := make([]byte, 16)
	if _, err := rand.Read(jti); err != nil {
		return "", err
	}
	return signTokenJWT(k, map[string]any{
		"iss": s.o.ClientID,
		"sub": s.o.ClientID,
		"aud": s.o.TokenURL,
		"jti": hex.EncodeToString(jti),
		"iat": now.Unix(),
		"nbf": now.Add(-5 * time.Second).Unix(),
		"exp": now.Add(assertionLifetime).Unix(),
	}, "JWT")
}

func (s *oauth2Source) ownSecretErr(what string, err error) error {
	var be *broker.Error
	if errors.As(err, &be) {
		return &broker.Error{Code: broker.CodeCredentialUnavailable, RetryAfter: be.RetryAfter,
			Message: fmt.Sprintf("credential %q: its %s is unavailable: %s", s.name, what, be.Message), Err: be.Err}
	}
	return &broker.Error{Code: broker.CodeCredentialUnavailable,
		Message: fmt.Sprintf("credential %q: its %s is unavailable", s.name, what), Err: err}
}

// tokenErr summarises a failed token request in a fixed vocabulary. An
// OAuth error response gives its status and error code (checked against
// RFC 6749's character set); its description goes to the log only, with
// the client secret and assertion removed. x/oauth2's own error strings,
// which can quote the response body, are never used as they are.
func (s *oauth2Source) tokenErr(ctx context.Context, err error, secrets []string) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		status := 0
		var h http.Header
		if re.Response != nil {
			status, h = re.Response.StatusCode, re.Response.Header
		}
		code := re.ErrorCode
		if !validOAuthErrorCode(code) || redactAll(code, 64, secrets...) != code {
			// Not RFC 6749's character set, or an endpoint echoing the
			// secret it was sent: not repeated.
			code = ""
		}
		msg := fmt.Sprintf("credential %q: the token endpoint answered %d", s.name, status)
		if code != "" {
			msg += " " + code
		}
		if status >= 300 && status < 400 {
			msg += " (a redirect; the broker does not follow redirects from a token endpoint)"
		}
		cause := fmt.Sprintf("inject: oauth2 token request: status %d", status)
		if code != "" {
			cause += ", error " + code
		}
		if d := redactAll(re.ErrorDescription, 200, secrets...); d != "" {
			cause += ": " + d
		}
		be := &broker.Error{Code: broker.CodeCredentialUnavailable, Message: msg, Err: errors.New(cause)}
		if status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable {
			be.RetryAfter = retryAfter(h)
		}
		if status >= 200 && status < 300 && code == "" {
			// A 2xx that x/oauth2 still called a failure: not a token response.
			be.Code = broker.CodeCredentialMalformed
		}
		return be
	}
	var ue *url.Error
	if errors.As(err, &ue) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		why := "is unreachable"
		if ctx.Err() != nil || errors.Is(err, context.DeadlineExceeded) {
			why = fmt.Sprintf("did not answer within %s", s.o.Timeout)
		}
		cause := err
		if ue != nil {
			// url.Error prints the URL (no secret: it has no query or
			// userinfo) and the transport error.
			cause = fmt.Errorf("inject: oauth2 token request: %s", redactAll(ue.Err.Error(), 300, secrets...))
		}
		return &broker.Error{Code: broker.CodeCredentialUnavailable,
			Message: fmt.Sprintf("credential %q: the token endpoint %s", s.name, why), Err: cause}
	}
	// Anything else is x/oauth2 failing to read a 2xx answer: not JSON or
	// form data, or no access_token.
	return &broker.Error{Code: broker.CodeCredentialMalformed,
		Message: fmt.Sprintf("credential %q: the token endpoint's answer is not a usable token response", s.name),
		Err:     errors.New("inject: oauth2: " + redactAll(strings.TrimPrefix(err.Error(), "oauth2: "), 200, secrets...))}
}

// validOAuthErrorCode: RFC 6749 §5.2, error = 1*(%x20-21 / %x23-5B / %x5D-7E),
// bounded.
func validOAuthErrorCode(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// credential checks a token response and builds the credential.
func (s *oauth2Source) credential(tok *oauth2.Token, issued time.Time, scopes, secrets []string) (broker.Credential, error) {
	// An endpoint that echoes what it was sent must not get the client
	// secret or assertion into a token, a message or the audit line.
	for _, sec := range secrets {
		if len(sec) >= 4 && strings.Contains(tok.AccessToken, sec) {
			return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialMalformed,
				Message: fmt.Sprintf("credential %q: the token endpoint answered with the client's own secret as the token; it is not used", s.name)}
		}
	}
	secrets = append(secrets, tok.AccessToken)
	if err := checkToken(s.name, "the token response", tok.AccessToken); err != nil {
		return broker.Credential{}, err
	}
	if tt := tok.TokenType; tt != "" && !strings.EqualFold(tt, "bearer") {
		if !validOAuthErrorCode(tt) || redactAll(tt, 64, secrets...) != tt {
			tt = "(not shown)"
		}
		return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialMalformed,
			Message: fmt.Sprintf("credential %q: the token endpoint issued a %q token; only Bearer tokens can be injected", s.name, tt)}
	}
	secs, known, err := expiresIn(tok.Extra("expires_in"))
	if err != nil {
		return broker.Credential{}, &broker.Error{Code: broker.CodeCredentialMalformed,
			Message: fmt.Sprintf("credential %q: the token response's expires_in %v", s.name, err)}
	}
	life := DefaultOAuth2Lifetime
	if known {
		life = time.Duration(secs) * time.Second
	}
	meta := map[string]string{"client_id": s.o.ClientID, "token_url": s.o.TokenURL}
	if !known {
		meta["expires_in"] = "absent; assumed " + DefaultOAuth2Lifetime.String()
	}
	if granted, ok := tok.Extra("scope").(string); ok && granted != "" {
		meta["scope"] = redactAll(granted, 256, secrets...)
	} else if len(scopes) > 0 {
		meta["scope"] = strings.Join(scopes, " ")
	}
	return broker.Credential{
		Name:    s.name,
		Kind:    KindOAuth2,
		Fields:  map[string]broker.Secret{broker.FieldToken: broker.NewSecret(tok.AccessToken)},
		Expires: issued.Add(life),
		Meta:    meta,
	}, nil
}

// expiresIn reads expires_in as a JSON number, a numeric string (some
// servers send one) or absent/null/0 (unknown). Negative or fractional
// values are errors.
func expiresIn(v any) (int64, bool, error) {
	var n float64
	switch x := v.(type) {
	case nil:
		return 0, false, nil
	case float64:
		n = x
	case int64: // form-encoded answers (oauth2.Token.Extra parses numbers)
		n = float64(x)
	case json.Number:
		f, err := x.Float64()
		if err != nil {
			return 0, false, errors.New("is not a number")
		}
		n = f
	case string:
		if x == "" {
			return 0, false, nil
		}
		f, err := strconv.ParseFloat(x, 64)
		if err != nil {
			return 0, false, errors.New("is not a number")
		}
		n = f
	default:
		return 0, false, errors.New("is not a number")
	}
	switch {
	case math.IsNaN(n) || math.IsInf(n, 0) || n != math.Trunc(n):
		return 0, false, errors.New("is not a whole number of seconds")
	case n < 0:
		return 0, false, errors.New("is negative")
	case n == 0:
		return 0, false, nil
	case n > math.MaxInt32:
		n = math.MaxInt32
	}
	return int64(n), true, nil
}
