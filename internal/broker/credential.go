package broker

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"hash"
	"io"
	"sort"
	"sync"
	"time"
)

// Well-known credential field names. Sources fill what they have; injectors
// read what they need and fail closed when it is missing.
const (
	FieldToken    = "token"
	FieldUsername = "username"
	FieldPassword = "password"

	// AWS credentials (aws_sts, or static for tests): read by the sigv4
	// injector.
	FieldAccessKeyID     = "access_key_id"
	FieldSecretAccessKey = "secret_access_key"
	FieldSessionToken    = "session_token"
)

// Credential is one fetched or minted credential, used for one request (or
// one cached span) and then dropped.
type Credential struct {
	Name    string            // the config name of the credential
	Kind    string            // the source type: static, vault_kv, aws_sts, ...
	Fields  map[string]Secret // the values
	Expires time.Time         // zero: no expiry known
	Meta    map[string]string // non-secret audit details (a path, a lease id prefix)
	// Release, when set, is called once the request or session that used the
	// credential is done (for example to revoke a one-shot lease).
	Release func(ctx context.Context)
}

// Field returns a named value and whether it is present and non-empty.
func (c Credential) Field(name string) (Secret, bool) {
	s, ok := c.Fields[name]
	return s, ok && !s.IsZero()
}

// Expired reports whether the credential must no longer be used at now.
func (c Credential) Expired(now time.Time) bool {
	return !c.Expires.IsZero() && !now.Before(c.Expires)
}

// Grant is what a Source is asked to produce for a caller.
type Grant struct {
	Rule       string
	Credential string
	Target     Target
	Params     map[string]string
}

// CacheKey binds a cached credential to the credential name, the caller and
// the grant parameters, so one workload never receives another's credential.
func (g Grant) CacheKey(id Identity) string {
	keys := make([]string, 0, len(g.Params))
	for k := range g.Params {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := []string{g.Credential, g.Rule, id.Key()}
	for _, k := range keys {
		parts = append(parts, k, g.Params[k])
	}
	return lengthPrefixed(parts...)
}

// Source fetches or mints one credential. It does no caching of its own
// (a decorator does) and never puts a value in an error.
type Source interface {
	Credential(ctx context.Context, id Identity, g Grant) (Credential, error)
}

// Fingerprinter names a credential in the audit log without revealing it: a
// truncated HMAC under a key that lives only in this process.
type Fingerprinter struct {
	macs sync.Pool // keyed hash.Hash, reset per use: no per-request allocation
}

// NewFingerprinter draws a fresh per-process key.
func NewFingerprinter() *Fingerprinter {
	k := make([]byte, 32)
	_, _ = rand.Read(k) // crypto/rand.Read never fails on supported platforms
	return &Fingerprinter{macs: sync.Pool{New: func() any { return hmac.New(sha256.New, k) }}}
}

// Fingerprint returns 16 hex characters identifying the credential's values.
func (f *Fingerprinter) Fingerprint(c Credential) string {
	if f == nil || len(c.Fields) == 0 {
		return ""
	}
	var one [1]string
	names := one[:0]
	for n := range c.Fields {
		names = append(names, n)
	}
	sort.Strings(names)
	m := f.macs.Get().(hash.Hash)
	defer f.macs.Put(m)
	m.Reset()
	var sum [sha256.Size]byte
	for _, n := range names {
		_, _ = io.WriteString(m, lengthPrefixed(n, c.Fields[n].Reveal()))
	}
	return hex.EncodeToString(m.Sum(sum[:0])[:8])
}
