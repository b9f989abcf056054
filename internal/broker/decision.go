package broker

import (
	"context"
	"net/http"
)

// Action is what a Decision does with a connection or request.
type Action int

const (
	// Deny is the zero Action: nothing is forwarded.
	Deny Action = iota
	// Tunnel splices bytes to the destination without looking inside; no
	// credential is ever injected into a tunnel.
	Tunnel
	// Allow forwards (and, for CONNECT, intercepts) so each inner request can
	// be decided and injected.
	Allow
)

func (a Action) String() string {
	switch a {
	case Tunnel:
		return "tunnel"
	case Allow:
		return "allow"
	}
	return "deny"
}

// Decision is a policy verdict. The zero Decision denies.
type Decision struct {
	Action         Action
	Rule           string     // the deciding rule; empty for the default deny
	Inject         *Injection // nil: forward without a credential
	AllowPlaintext bool       // inject even into a plain http:// request
	Reason         string     // why, for the audit line and explain; never secret
}

// Allowed reports whether the decision lets traffic through at all.
func (d Decision) Allowed() bool { return d.Action == Allow || d.Action == Tunnel }

// Injection names the credential a rule grants and how it is written.
type Injection struct {
	Credential string
	Injector   Injector
	Params     map[string]string // rule-specific parameters; part of the cache key
}

// Policy decides. It is called at CONNECT (PhaseConnect) and again for every
// request (PhaseRequest). An error denies.
type Policy interface {
	Decide(ctx context.Context, id Identity, t Target) (Decision, error)
}

// Injector writes a credential into one request. It first deletes every
// variant of the slots it owns (any case of the header, every repeated
// value, named query parameters), then sets exactly one value.
type Injector interface {
	Inject(r *http.Request, c Credential) error
	// Kind names the injector for the audit line and explain.
	Kind() string
}
