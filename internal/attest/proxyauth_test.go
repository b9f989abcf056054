package attest

import (
	"encoding/base64"
	"errors"
	"strings"
	"testing"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
)

func basicOf(userPass string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(userPass))
}

func TestProxyToken(t *testing.T) {
	const jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
	tests := []struct {
		name    string
		header  string
		want    string
		wantErr error // nil: want is returned
	}{
		{"bearer", "Bearer " + jwt, jwt, nil},
		{"bearer lowercase", "bearer " + jwt, jwt, nil},
		{"bearer upper", "BEARER " + jwt, jwt, nil},
		{"bearer extra spaces", "Bearer   " + jwt + "  ", jwt, nil},
		{"basic proxy url", basicOf("token:" + jwt), jwt, nil},
		{"basic any user", basicOf("x-access-token:" + jwt), jwt, nil},
		{"basic empty user", basicOf(":" + jwt), jwt, nil},
		{"basic lowercase", "basic " + base64.StdEncoding.EncodeToString([]byte("token:"+jwt)), jwt, nil},
		{"basic password with colon", basicOf("token:a:b"), "a:b", nil},
		{"absent", "", "", broker.ErrNoEvidence},
		{"scheme only", "Bearer", "", broker.ErrInvalidEvidence},
		{"bearer empty", "Bearer ", "", broker.ErrInvalidEvidence},
		{"bearer two words", "Bearer a b", "", broker.ErrInvalidEvidence},
		{"bearer tab inside", "Bearer a\tb", "", broker.ErrInvalidEvidence},
		{"bearer NUL", "Bearer a\x00b", "", broker.ErrInvalidEvidence},
		{"basic bad base64", "Basic !!!!", "", broker.ErrInvalidEvidence},
		{"basic unpadded base64", "Basic " + base64.RawStdEncoding.EncodeToString([]byte("token:abcde")), "", broker.ErrInvalidEvidence},
		{"basic no colon", basicOf("tokenonly"), "", broker.ErrInvalidEvidence},
		{"basic empty password", basicOf("token:"), "", broker.ErrInvalidEvidence},
		{"basic password with CRLF", basicOf("token:abc\r\nX-Injected: 1"), "", broker.ErrInvalidEvidence},
		{"basic password with space", basicOf("token:a b"), "", broker.ErrInvalidEvidence},
		{"basic empty", "Basic ", "", broker.ErrInvalidEvidence},
		{"digest", `Digest username="u"`, "", broker.ErrInvalidEvidence},
		{"leading space", " Bearer " + jwt, "", broker.ErrInvalidEvidence},
		{"bare token", jwt, "", broker.ErrInvalidEvidence},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ProxyToken(broker.NewSecret(tt.header))
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				if !got.IsZero() {
					t.Fatal("token returned with an error")
				}
				if tt.header != "" && strings.Contains(err.Error(), strings.TrimSpace(tt.header)) {
					t.Fatalf("error %q contains the header", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Reveal() != tt.want {
				t.Fatalf("token = %q, want %q", got.Reveal(), tt.want)
			}
		})
	}
}

func TestProxyTokenErrorNeverLeaks(t *testing.T) {
	const canary = "CANARY-4f1b9c2d7e"
	canarytest.Register("attest proxy-auth credential", canary)
	for _, h := range []string{
		"Bearer " + canary + " extra",
		"Basic " + canary + "!!",
		basicOf(canary),
		basicOf(canary + ":"),
		basicOf("token:" + canary + "\n"),
		"Negotiate " + canary,
	} {
		_, err := ProxyToken(broker.NewSecret(h))
		if !errors.Is(err, broker.ErrInvalidEvidence) {
			t.Fatalf("%q: err = %v, want invalid evidence", h, err)
		}
		if strings.Contains(err.Error(), canary) || strings.Contains(err.Error(), "4f1b9c") {
			t.Fatalf("error %q leaks the canary", err)
		}
	}
}

// FuzzProxyToken: never panics; an accepted token is non-empty, holds no
// CR, LF, space or other control character, and round-trips through both
// header forms; a rejection is ErrNoEvidence (empty value only) or
// ErrInvalidEvidence and does not quote the value.
func FuzzProxyToken(f *testing.F) {
	for _, s := range []string{
		"", "Bearer abc.def.ghi", "bearer x", "Basic " + base64.StdEncoding.EncodeToString([]byte("token:abc")),
		"Basic dG9rZW46", "Basic !!", "Bearer", "Bearer a b", "Digest x", "Basic " + base64.StdEncoding.EncodeToString([]byte("u:a\r\nb")),
		"Bearer \x00", "Basic =", "BASIC " + base64.StdEncoding.EncodeToString([]byte(":x")),
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := ProxyToken(broker.NewSecret(s))
		if err != nil {
			switch {
			case s == "" && err == broker.ErrNoEvidence:
			case s != "" && errors.Is(err, broker.ErrInvalidEvidence):
			default:
				t.Fatalf("ProxyToken(%q): unexpected error %v", s, err)
			}
			fixed := false
			for _, e := range []error{broker.ErrNoEvidence, errProxyNoCreds, errProxyBase64, errProxyNoColon, errProxyScheme, errProxyEmpty, errProxyBadChar} {
				fixed = fixed || err == e
			}
			if !fixed {
				t.Fatalf("ProxyToken(%q): error %q is not one of the fixed reasons", s, err)
			}
			return
		}
		v := tok.Reveal()
		if v == "" {
			t.Fatalf("ProxyToken(%q) returned an empty token", s)
		}
		if strings.ContainsAny(v, "\r\n") {
			t.Fatalf("ProxyToken(%q) returned a token with CR/LF", s)
		}
		for i := 0; i < len(v); i++ {
			if v[i] <= ' ' || v[i] == 0x7f {
				t.Fatalf("ProxyToken(%q) returned a token with byte %#x", s, v[i])
			}
		}
		for _, h := range []string{"Bearer " + v, basicOf("token:" + v)} {
			again, err := ProxyToken(broker.NewSecret(h))
			if err != nil || again.Reveal() != v {
				t.Fatalf("round trip of %q via %q: %q, %v", v, h, again.Reveal(), err)
			}
		}
	})
}
