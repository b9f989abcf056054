package broker

import "fmt"

// redacted is what every printed form of a Secret shows.
const redacted = "REDACTED"

// Secret holds a credential value. Every way of printing it — String,
// GoString, any fmt verb, JSON, text and zap (via Stringer) — yields REDACTED, so a Secret
// that strays into a log line, an error or a response leaks nothing.
//
// The value sits behind a pointer because fmt bypasses the methods above in
// two cases and prints fields by reflection: a bad verb (fmt.Errorf("%w", s))
// and a Secret held in an unexported struct field. Reflection prints a nested
// pointer as an address, never as the string it points to.
type Secret struct {
	v *string
}

// NewSecret wraps a credential value.
func NewSecret(v string) Secret {
	if v == "" {
		return Secret{}
	}
	return Secret{v: &v}
}

// Reveal returns the value. Call it only where the value leaves the broker:
// an injector writing a request, or a protocol handshake.
func (s Secret) Reveal() string {
	if s.v == nil {
		return ""
	}
	return *s.v
}

// IsZero reports whether the secret is empty.
func (s Secret) IsZero() bool { return s.v == nil }

// Len is the length of the value, for validation without revealing it.
func (s Secret) Len() int { return len(s.Reveal()) }

func (Secret) String() string               { return redacted }
func (Secret) GoString() string             { return redacted }
func (Secret) Format(f fmt.State, _ rune)   { _, _ = f.Write([]byte(redacted)) }
func (Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }
func (Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }
