package rules

import (
	"context"
	"testing"

	"github.com/keygate/broker/internal/broker"
)

// A caller no attestor vouched for matches only rules that opt in; a rule
// with no `when` must not silently serve anonymous callers.
func TestAnonymousCallers(t *testing.T) {
	set, errs := Compile([]Spec{
		{Name: "attested-only", Hosts: []string{"api.example.com"}},
		{Name: "public", Hosts: []string{"status.example.com"}, AllowAnonymous: true},
	}, Options{})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	target := func(host string) broker.Target {
		return broker.Target{Phase: broker.PhaseRequest, Protocol: broker.ProtocolHTTPS, Host: host, Port: 443, Method: "GET", Path: "/"}
	}
	attested := broker.Identity{ID: "w", Method: broker.MethodCIDR}
	tests := []struct {
		name string
		id   broker.Identity
		host string
		want broker.Action
	}{
		{"anonymous skips a plain rule", broker.Anonymous, "api.example.com", broker.Deny},
		{"anonymous matches an opted-in rule", broker.Anonymous, "status.example.com", broker.Allow},
		{"attested matches a plain rule", attested, "api.example.com", broker.Allow},
		{"attested matches an opted-in rule", attested, "status.example.com", broker.Allow},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, _ := set.Decide(context.Background(), tt.id, target(tt.host))
			if d.Action != tt.want {
				t.Fatalf("action = %v, want %v", d.Action, tt.want)
			}
		})
	}
	ex := set.Explain(broker.Anonymous, target("api.example.com"))
	if len(ex.Candidates) == 0 || ex.Candidates[0].Reason == "" {
		t.Fatal("explain does not say why an anonymous caller skipped the rule")
	}
}
