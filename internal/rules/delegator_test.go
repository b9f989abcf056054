package rules

import (
	"context"
	"testing"

	"github.com/keygate/broker/internal/broker"
)

// At CONNECT a tunnel has no delegator yet: the requests inside it may each
// carry an on-behalf-of token, so a rule on delegator must intercept and
// decide per request rather than deny the whole tunnel.
func TestDelegatorUnknownAtConnect(t *testing.T) {
	set, errs := Compile([]Spec{{Name: "for-alice", Hosts: []string{"api.example.com"}, When: `delegator.sub == "alice"`}}, Options{})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	id := broker.Identity{ID: "w", Method: broker.MethodCIDR}
	connect := broker.Target{Phase: broker.PhaseConnect, Protocol: broker.ProtocolHTTPS, Host: "api.example.com", Port: 443}
	request := connect
	request.Phase, request.Method, request.Path = broker.PhaseRequest, "GET", "/"
	tests := []struct {
		name      string
		delegator string
		target    broker.Target
		want      broker.Action
	}{
		{"connect without delegator intercepts", "", connect, broker.Allow},
		{"connect as bob denies", "bob", connect, broker.Deny},
		{"connect as alice allows", "alice", connect, broker.Allow},
		{"request as alice allows", "alice", request, broker.Allow},
		{"request as bob denies", "bob", request, broker.Deny},
		{"request without delegator denies", "", request, broker.Deny},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := id
			id.Delegator.Sub = tt.delegator
			d, _ := set.Decide(context.Background(), id, tt.target)
			if d.Action != tt.want {
				t.Fatalf("action = %v, want %v", d.Action, tt.want)
			}
		})
	}
}
