package attest

import (
	"encoding/base64"
	"fmt"
	"strings"

	"github.com/keygate/broker/internal/broker"
)

// ProxyToken extracts a bearer token from a Proxy-Authorization value. Two
// forms are accepted, scheme names case-insensitively (RFC 9110 §11.1):
//
//   - "Bearer <tok>";
//   - "Basic base64(user:tok)", which is what curl, Go's net/http and most
//     other clients send for a proxy URL such as
//     HTTPS_PROXY=http://token:<jwt>@host:port. The user part is ignored; the
//     token is everything after the first colon (RFC 7617 forbids a colon in
//     the user part).
//
// It returns ("", broker.ErrNoEvidence) when the value is empty (no header),
// and an error wrapping broker.ErrInvalidEvidence when a value is present but
// garbled: no credentials after the scheme, bad base64, no colon, an empty
// token, a token with spaces or control characters, or another scheme. A
// returned token is never empty and never holds a space or control
// character. Errors name the problem only, never any part of the value.
func ProxyToken(v broker.Secret) (broker.Secret, error) {
	s := v.Reveal()
	if s == "" {
		return broker.Secret{}, broker.ErrNoEvidence
	}
	scheme, creds, ok := strings.Cut(s, " ")
	if !ok {
		return broker.Secret{}, errProxyNoCreds
	}
	creds = strings.Trim(creds, " \t")
	var tok string
	switch {
	case strings.EqualFold(scheme, "Bearer"):
		tok = creds
	case strings.EqualFold(scheme, "Basic"):
		raw, err := base64.StdEncoding.DecodeString(creds)
		if err != nil {
			return broker.Secret{}, errProxyBase64
		}
		_, pass, ok := strings.Cut(string(raw), ":")
		if !ok {
			return broker.Secret{}, errProxyNoColon
		}
		tok = pass
	default:
		return broker.Secret{}, errProxyScheme
	}
	if tok == "" {
		return broker.Secret{}, errProxyEmpty
	}
	for i := 0; i < len(tok); i++ {
		if c := tok[i]; c <= ' ' || c == 0x7f {
			return broker.Secret{}, errProxyBadChar
		}
	}
	return broker.NewSecret(tok), nil
}

// Rejection reasons: fixed strings, never any part of the value.
var (
	errProxyNoCreds = proxyAuthError("no credentials after the scheme")
	errProxyBase64  = proxyAuthError("basic credentials are not base64")
	errProxyNoColon = proxyAuthError("basic credentials have no colon")
	errProxyScheme  = proxyAuthError("unsupported scheme")
	errProxyEmpty   = proxyAuthError("empty token")
	errProxyBadChar = proxyAuthError("token holds a space or control character")
)

func proxyAuthError(reason string) error {
	return fmt.Errorf("attest: proxy-authorization: %s: %w", reason, broker.ErrInvalidEvidence)
}
