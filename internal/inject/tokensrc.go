package inject

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/keygate/broker/internal/broker"
)

// Shared by the token-minting sources (oauth2, github_app): secrets given
// as functions, private keys from PEM, bounded reads of JSON answers, and
// error summaries that never carry a value.

// SecretFunc yields a secret the broker itself holds (a client secret, a
// private key in PEM). The config layer builds it from a reference resolved
// at load (env:, file:) or from another credential read per call (a
// vault_kv secret). Its errors never contain the value.
type SecretFunc func(ctx context.Context) (broker.Secret, error)

// StaticSecret is a SecretFunc for a value resolved once.
func StaticSecret(s broker.Secret) SecretFunc {
	return func(context.Context) (broker.Secret, error) { return s, nil }
}

// maxTokenResponse bounds what is read from a token endpoint or the GitHub
// API: 1 MiB, like golang.org/x/oauth2.
const maxTokenResponse = 1 << 20

// DefaultTokenTimeout bounds one call of an oauth2 or github_app source
// (all its HTTP round trips).
const DefaultTokenTimeout = 10 * time.Second

// signingKey is a parsed private key and the JWS algorithm it signs with.
type signingKey struct {
	alg jose.SignatureAlgorithm
	key crypto.Signer
}

// ParsePrivateKeyPEM reads one PEM private key: PKCS#8 ("PRIVATE KEY"),
// PKCS#1 ("RSA PRIVATE KEY", what GitHub hands out) or SEC 1 ("EC PRIVATE
// KEY"). RSA keys sign RS256, P-256/P-384/P-521 keys ES256/ES384/ES512 and
// Ed25519 keys EdDSA. Encrypted PEM is refused. The error never contains
// key material.
func ParsePrivateKeyPEM(data []byte) (jose.SignatureAlgorithm, crypto.Signer, error) {
	k, err := parseSigningKey(data)
	if err != nil {
		return "", nil, err
	}
	return k.alg, k.key, nil
}

func parseSigningKey(data []byte) (signingKey, error) {
	block, rest := pem.Decode(data)
	if block == nil {
		return signingKey{}, errors.New("private key is not PEM (want -----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----)")
	}
	if _, enc := block.Headers["DEK-Info"]; enc || block.Type == "ENCRYPTED PRIVATE KEY" {
		return signingKey{}, errors.New("private key is encrypted; give it unencrypted (from a file only the broker can read, or from Vault)")
	}
	if p, _ := pem.Decode(rest); p != nil {
		return signingKey{}, errors.New("private key PEM holds more than one block")
	}
	var key any
	var err error
	format := ""
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		format = "PKCS #8"
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		format = "PKCS #1"
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
		format = "SEC 1"
	default:
		return signingKey{}, fmt.Errorf("PEM block %q is not a private key", block.Type)
	}
	if err != nil {
		// Only the format: the parser's details say nothing useful.
		return signingKey{}, fmt.Errorf("private key does not parse as %s (%s)", format, block.Type)
	}
	switch k := key.(type) {
	case *rsa.PrivateKey:
		if k.N.BitLen() < 2048 {
			return signingKey{}, fmt.Errorf("RSA private key has %d bits; at least 2048 are required", k.N.BitLen())
		}
		return signingKey{alg: jose.RS256, key: k}, nil
	case *ecdsa.PrivateKey:
		switch k.Curve {
		case elliptic.P256():
			return signingKey{alg: jose.ES256, key: k}, nil
		case elliptic.P384():
			return signingKey{alg: jose.ES384, key: k}, nil
		case elliptic.P521():
			return signingKey{alg: jose.ES512, key: k}, nil
		}
		return signingKey{}, errors.New("EC private key is not on P-256, P-384 or P-521")
	case ed25519.PrivateKey:
		return signingKey{alg: jose.EdDSA, key: k}, nil
	}
	return signingKey{}, fmt.Errorf("private key of type %T cannot sign a JWT", key)
}

// keyMemo parses a PEM key once per distinct value (a key read from Vault
// per call is parsed again only when it changes).
type keyMemo struct {
	mu  sync.Mutex
	sum [sha256.Size]byte
	key signingKey
}

func (m *keyMemo) get(pemData broker.Secret) (signingKey, error) {
	sum := sha256.Sum256([]byte(pemData.Reveal()))
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.key.key != nil && sum == m.sum {
		return m.key, nil
	}
	k, err := parseSigningKey([]byte(pemData.Reveal()))
	if err != nil {
		return signingKey{}, err
	}
	m.sum, m.key = sum, k
	return k, nil
}

// signJWT signs claims as a compact JWS with typ JWT.
func signTokenJWT(k signingKey, claims map[string]any, typ string) (string, error) {
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: k.alg, Key: k.key}, (&jose.SignerOptions{}).WithType(jose.ContentType(typ)))
	if err != nil {
		return "", fmt.Errorf("building the JWT signer: %w", err)
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		return "", err
	}
	obj, err := signer.Sign(payload)
	if err != nil {
		return "", fmt.Errorf("signing the JWT: %w", err)
	}
	return obj.CompactSerialize()
}

// readBody reads at most maxTokenResponse bytes; more is an error.
func readBody(r io.Reader) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, maxTokenResponse+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxTokenResponse {
		return nil, fmt.Errorf("response is larger than %d bytes", maxTokenResponse)
	}
	return b, nil
}

// redactAll replaces every secret (and its common encodings) in s, then
// makes s one bounded line: for messages quoted from a backend, which may
// echo the request that carried a secret.
func redactAll(s string, max int, secrets ...string) string {
	for _, sec := range secrets {
		if len(sec) < 4 {
			continue
		}
		for _, form := range secretForms(sec) {
			s = strings.ReplaceAll(s, form, "REDACTED")
		}
	}
	return oneLine(s, max)
}

// retryAfter reads a Retry-After header in seconds (the HTTP-date form is
// ignored), bounded to a minute.
func retryAfter(h http.Header) time.Duration {
	v := strings.TrimSpace(h.Get("Retry-After"))
	if v == "" {
		return 0
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0
	}
	return min(time.Duration(n)*time.Second, time.Minute)
}

// checkToken validates a minted token before it is cached: present, no
// control characters, short enough for an Authorization header. The error
// is a 502 credential_malformed that never holds the value.
func checkToken(cred, what, tok string) error {
	if tok == "" {
		return &broker.Error{Code: broker.CodeCredentialMalformed,
			Message: fmt.Sprintf("credential %q: %s holds no token", cred, what)}
	}
	if err := checkValue(tok); err != nil {
		return &broker.Error{Code: broker.CodeCredentialMalformed,
			Message: fmt.Sprintf("credential %q: the token in %s %v; it is not used", cred, what, err)}
	}
	if len(tok) > MaxValueLen-len("Bearer ") {
		return &broker.Error{Code: broker.CodeCredentialMalformed,
			Message: fmt.Sprintf("credential %q: the token in %s is longer than %d bytes; it is not used", cred, what, MaxValueLen-len("Bearer "))}
	}
	return nil
}

// secretForms are the spellings of a secret redactAll removes.
func secretForms(s string) []string {
	return []string{s, url.QueryEscape(s), base64.StdEncoding.EncodeToString([]byte(s)),
		base64.RawURLEncoding.EncodeToString([]byte(s))}
}

// StringListParam decodes the JSON array of strings a list expression
// yields (rules.ValueStringList). The error never quotes the input.
func StringListParam(js string) ([]string, error) {
	var out []string
	dec := json.NewDecoder(strings.NewReader(js))
	if err := dec.Decode(&out); err != nil {
		return nil, errors.New("is not a list of strings")
	}
	if dec.More() {
		return nil, errors.New("has data after the list")
	}
	if out == nil {
		out = []string{}
	}
	return out, nil
}
