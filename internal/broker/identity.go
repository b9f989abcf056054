package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Attestation methods, as rules see them in workload.method.
const (
	MethodSPIFFEX509 = "spiffe-x509"
	MethodSPIFFEJWT  = "spiffe-jwt"
	MethodOIDC       = "oidc"
	MethodProcess    = "process"
	MethodCIDR       = "cidr" // weak: network position only
	// MethodAnonymous marks a caller no attestor vouched for. Only rules
	// that explicitly allow anonymous callers can match it.
	MethodAnonymous = "anonymous"
)

// Anonymous is the identity of a caller no attestor applies to.
var Anonymous = Identity{ID: "anonymous", Method: MethodAnonymous}

// ErrNoEvidence means an attestor does not apply to this caller; the chain
// tries the next one.
var ErrNoEvidence = errors.New("attest: no evidence for this method")

// ErrInvalidEvidence means evidence was presented and rejected; the chain
// stops and the caller is denied. Attestors wrap it with the reason.
var ErrInvalidEvidence = errors.New("attest: invalid evidence")

// Identity is an attested caller. The zero Identity is unauthenticated.
type Identity struct {
	ID          string         // SPIFFE ID, token subject or configured name
	Method      string         // one of the Method* constants
	TrustDomain string         // SPIFFE trust domain or token issuer
	Claims      map[string]any // verified token claims
	Process     *ProcessInfo   // local peer, when known
	Delegator   Delegator      // verified on-behalf-of user; zero when absent
	// Expires is when the evidence stops being valid (a token's exp, an
	// SVID's NotAfter); zero when the evidence does not expire (cidr,
	// process). A tunnel re-checks it for every request inside.
	Expires time.Time
}

// ExpiredAt reports whether the identity, or its delegator, is no longer
// valid at now.
func (i Identity) ExpiredAt(now time.Time) bool {
	for _, e := range []time.Time{i.Expires, i.Delegator.Expires} {
		if !e.IsZero() && !now.Before(e) {
			return true
		}
	}
	return false
}

// ProcessInfo describes the local process behind a connection.
type ProcessInfo struct {
	PID         int
	UID, GID    int
	Exe         string
	SHA256      string
	ContainerID string
}

// IsZero reports whether no attestor vouched for the caller.
func (i Identity) IsZero() bool { return i.ID == "" || i.Method == "" }

// Key identifies the caller for cache keys: two callers with different keys
// never share a cached credential.
func (i Identity) Key() string {
	return lengthPrefixed(i.Method, i.TrustDomain, i.ID, i.Delegator.Sub)
}

// lengthPrefixed joins parts so that no two different lists give the same
// string, whatever bytes the parts hold.
func lengthPrefixed(parts ...string) string {
	var b strings.Builder
	for _, p := range parts {
		b.WriteString(strconv.Itoa(len(p)))
		b.WriteByte(':')
		b.WriteString(p)
	}
	return b.String()
}

// Delegator is a verified user on whose behalf the workload calls. The zero
// value means none.
type Delegator struct {
	Sub     string
	Claims  map[string]any
	Expires time.Time // when the user's token stops being valid
}

// Evidence is what a listener knows about a caller before any rule runs.
type Evidence struct {
	Listener           string
	Remote             netip.AddrPort
	Local              netip.AddrPort
	TLS                *tls.ConnectionState // client leg of a TLS listener, else nil
	ProxyAuthorization Secret               // raw Proxy-Authorization header, if any
	Conn               net.Conn             // for peer-credential lookups; may be nil
}

// Attestor proves who a caller is.
//
// It returns ErrNoEvidence when it does not apply, an error wrapping
// ErrInvalidEvidence when evidence is present but rejected, and any other
// error for an internal failure (which also denies).
type Attestor interface {
	Attest(ctx context.Context, ev Evidence) (Identity, error)
}
