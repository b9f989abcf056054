package broker

import "fmt"

// redacted is what every printed form of a Secret shows.
const redacted = "REDACTED"

// Secret holds a credential value. Every way of printing it — String,
// GoString, any fmt verb, JSON, text and zap (via Stringer) — yields REDACTED, so a Secret
// that strays into a log line, an error or a response leaks nothing.
type Secret struct {
	v string
}

// NewSecret wraps a credential value.
func NewSecret(v string) Secret { return Secret{v: v} }

// Reveal returns the value. Call it only where the value leaves the broker:
// an injector writing a request, or a protocol handshake.
func (s Secret) Reveal() string { return s.v }

// IsZero reports whether the secret is empty.
func (s Secret) IsZero() bool { return s.v == "" }

// Len is the length of the value, for validation without revealing it.
func (s Secret) Len() int { return len(s.v) }

func (Secret) String() string               { return redacted }
func (Secret) GoString() string             { return redacted }
func (Secret) Format(f fmt.State, _ rune)   { _, _ = f.Write([]byte(redacted)) }
func (Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }
func (Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }
