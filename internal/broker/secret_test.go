package broker

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/keygate/broker/internal/canarytest"
)

var canary = canarytest.New("broker secret")

func TestSecretNeverPrints(t *testing.T) {
	s := NewSecret(canary)
	c := Credential{Name: "n", Fields: map[string]Secret{FieldToken: s}}
	forms := map[string]string{
		"%v":       fmt.Sprintf("%v", s),
		"%s":       fmt.Sprintf("%s", s),
		"%q":       fmt.Sprintf("%q", s),
		"%x":       fmt.Sprintf("%x", s),
		"%#v":      fmt.Sprintf("%#v", s),
		"%+v cred": fmt.Sprintf("%+v", c),
		"%#v cred": fmt.Sprintf("%#v", c),
		"error":    fmt.Errorf("wrapped: %v", s).Error(),
		"String":   s.String(),
	}
	//lint:ignore SA1026 the error path matters too: marshalling a credential with a Release func fails, and its message must not leak the secret
	b, err := json.Marshal(c)
	forms["json"] = string(b)
	if err != nil {
		forms["json error"] = err.Error()
	}
	tb, _ := s.MarshalText()
	forms["text"] = string(tb)

	core, logs := observer.New(zap.DebugLevel)
	zap.New(core).Info("x", zap.Any("secret", s), zap.Any("cred", c), zap.Stringer("s", s))
	for _, e := range logs.All() {
		forms["zap"] = fmt.Sprint(e.ContextMap())
	}
	for name, out := range forms {
		t.Run(name, func(t *testing.T) {
			if strings.Contains(out, canary) {
				t.Fatalf("secret printed: %s", out)
			}
		})
	}
	if s.Reveal() != canary {
		t.Fatal("Reveal lost the value")
	}
}

func TestFingerprint(t *testing.T) {
	f := NewFingerprinter()
	a := Credential{Fields: map[string]Secret{"token": NewSecret("a")}}
	b := Credential{Fields: map[string]Secret{"token": NewSecret("b")}}
	if f.Fingerprint(a) == f.Fingerprint(b) || len(f.Fingerprint(a)) != 16 {
		t.Fatal("fingerprints must differ per value and be 16 hex characters")
	}
	if first, again := f.Fingerprint(a), f.Fingerprint(a); first != again {
		t.Fatal("fingerprint is not stable within a process")
	}
	if NewFingerprinter().Fingerprint(a) == f.Fingerprint(a) {
		t.Fatal("two processes share a fingerprint key")
	}
	if f.Fingerprint(Credential{}) != "" {
		t.Fatal("an empty credential has a fingerprint")
	}
}

func TestCacheKeySeparatesCallers(t *testing.T) {
	g := Grant{Credential: "c", Params: map[string]string{"a": "1"}}
	a := Identity{ID: "a", Method: MethodCIDR}
	b := Identity{ID: "b", Method: MethodCIDR}
	tests := []struct {
		name string
		x, y string
	}{
		{"identity", g.CacheKey(a), g.CacheKey(b)},
		{"method", g.CacheKey(a), g.CacheKey(Identity{ID: "a", Method: MethodOIDC})},
		{"delegator", g.CacheKey(a), g.CacheKey(Identity{ID: "a", Method: MethodCIDR, Delegator: Delegator{Sub: "u"}})},
		{"params", g.CacheKey(a), Grant{Credential: "c", Params: map[string]string{"a": "2"}}.CacheKey(a)},
		{"credential", g.CacheKey(a), Grant{Credential: "d", Params: g.Params}.CacheKey(a)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.x == tt.y {
				t.Fatal("keys collide")
			}
		})
	}
}

func TestErrorStatus(t *testing.T) {
	tests := map[string]int{
		CodeUnauthenticated: 407, CodeDenied: 403, CodeMisdirected: 421, CodeCredentialUnavailable: 503,
		CodeUpstreamUnreachable: 502, CodeUpstreamTimeout: 504, CodeHeaderTooLarge: 431, "unknown": 500,
		CodeRuleError: 403, CodeDNSFailure: 502, CodeTunnelLimit: 503, CodeRateLimited: 503,
	}
	for code, want := range tests {
		t.Run(code, func(t *testing.T) {
			if got := NewError(code, "m", nil).Status(); got != want {
				t.Fatalf("status = %d, want %d", got, want)
			}
		})
	}
	e := AsError(errors.New("plain"))
	if e.Code != CodeInternal || e.Status() != 500 {
		t.Fatal("a plain error is not internal")
	}
}
