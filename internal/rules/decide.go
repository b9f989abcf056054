package rules

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"

	"github.com/keygate/broker/internal/broker"
)

// Decision reasons. They name no request data, so they are safe in the
// audit line and in responses.
const (
	reasonNoMatch       = "no rule matched"
	reasonAllow         = "rule matched"
	reasonDeny          = "deny rule matched"
	reasonTunnel        = "tunnel rule matched"
	reasonIntercept     = "intercept: rule depends on request fields"
	reasonInterceptDeny = "intercept: an earlier deny rule depends on request fields"
	reasonWhenError     = "when error"
	reasonBadPhase      = "invalid target phase"
	reasonInternal      = "internal error"
	reasonNoRules       = "no rule set loaded"
)

// Explanation is a dry-run decision with, for every rule in order, why it
// did or did not decide.
type Explanation struct {
	Decision   broker.Decision
	Err        error // the evaluation error behind a deny, if any
	Candidates []Candidate
}

// Candidate is one rule's part in an Explanation.
type Candidate struct {
	Rule    string
	Matched bool // host, port and when all matched (or, at CONNECT, the rule decided)
	Reason  string
}

// Decide implements broker.Policy: the first rule whose host, port and
// `when` match decides; nothing matching denies. Any evaluation error
// denies, naming the rule, and is returned wrapped.
//
// At CONNECT (broker.PhaseConnect) the request-only fields (method, path,
// query, headers, database, user) are unknown and `when` is partially
// evaluated. A rule whose outcome depends on them does not decide by
// itself: if it is an allow rule, the connection is intercepted (Allow,
// attributed to the first such rule, no credential yet) so that each
// request is decided again; if it is a deny rule, the rules after it are
// consulted, but a later tunnel becomes an intercept so the deny rule still
// sees every request.
func (s *Set) Decide(ctx context.Context, id broker.Identity, t broker.Target) (d broker.Decision, err error) {
	// cel-go recovers its own panics; this covers everything else, since a
	// panic here would take down the connection handler, not deny.
	defer func() {
		if p := recover(); p != nil {
			d = broker.Decision{Reason: reasonInternal}
			err = fmt.Errorf("rules: internal error while deciding: %v", p)
		}
	}()
	if s == nil {
		return broker.Decision{Reason: reasonNoRules}, errors.New("rules: no rule set loaded")
	}
	if ctx == nil {
		ctx = context.Background()
	}
	return s.decide(ctx, id, t, nil)
}

// Explain decides like Decide, without side effects, and says for every
// rule why it did not decide.
func (s *Set) Explain(id broker.Identity, t broker.Target) (ex Explanation) {
	defer func() {
		if p := recover(); p != nil {
			ex = Explanation{Decision: broker.Decision{Reason: reasonInternal},
				Err: fmt.Errorf("rules: internal error while explaining: %v", p)}
		}
	}()
	if s == nil {
		return Explanation{Decision: broker.Decision{Reason: reasonNoRules}, Err: errors.New("rules: no rule set loaded")}
	}
	tr := &tracer{noted: make([]bool, len(s.rules)), cands: make([]Candidate, len(s.rules))}
	ex.Decision, ex.Err = s.decide(context.Background(), id, t, tr)
	host := lookupHost(t.Host)
	ex.Candidates = tr.cands
	for i, r := range s.rules {
		c := &ex.Candidates[i]
		c.Rule = r.name
		switch {
		case tr.noted[i]:
		case !r.matchesHost(host):
			c.Reason = "host does not match"
		case tr.decided:
			c.Reason = "not reached: earlier rule decided"
		default:
			c.Reason = "not evaluated: " + ex.Decision.Reason
		}
	}
	return ex
}

// tracer records, for Explain, what decide concluded about each rule it
// looked at. Decide passes nil and pays nothing.
type tracer struct {
	noted   []bool
	cands   []Candidate
	decided bool // a rule decided (as opposed to running out of rules)
}

func (tr *tracer) note(i int, matched bool, reason string) {
	if tr == nil {
		return
	}
	tr.noted[i] = true
	tr.cands[i].Matched = matched
	tr.cands[i].Reason = reason
}

func (tr *tracer) decide(i int, reason string) {
	if tr == nil {
		return
	}
	tr.note(i, true, reason)
	tr.decided = true
}

type result uint8

const (
	resFalse result = iota
	resTrue
	resUnknown // depends on request fields not known at CONNECT
)

// decide is the one decision procedure behind Decide and Explain.
func (s *Set) decide(ctx context.Context, id broker.Identity, t broker.Target, tr *tracer) (broker.Decision, error) {
	var connect bool
	switch t.Phase {
	case broker.PhaseConnect:
		connect = true
	case broker.PhaseRequest:
	default:
		return broker.Decision{Reason: reasonBadPhase}, fmt.Errorf("rules: target phase %v is neither connect nor request", t.Phase)
	}

	var c candidates
	s.ix.lookup(lookupHost(t.Host), &c)

	var act any // built on first use: rules without `when` never need it
	var lv *lazyVars
	firstUnknown := -1
	unknownDeny := false
	for {
		i, ok := c.next()
		if !ok {
			break
		}
		r := s.rules[i]
		if id.Method == broker.MethodAnonymous && !r.allowAnonymous {
			if tr != nil {
				tr.note(i, false, "caller is anonymous and the rule does not set allow_anonymous")
			}
			continue
		}
		if ports, anyPort := s.ports(r, t, connect); !anyPort && !containsInt(ports, t.Port) {
			if tr != nil {
				tr.note(i, false, portReason(t, ports))
			}
			continue
		}
		if r.full != nil {
			if act == nil {
				a, v, err := s.activation(id, t, connect)
				if err != nil {
					tr.decide(i, "when error: "+err.Error())
					return broker.Decision{Rule: r.name, Reason: reasonWhenError}, fmt.Errorf("rules: rule %q: %w", r.name, err)
				}
				act, lv = a, v
			}
			// The loop bounds apply to each evaluation, not to the decision.
			lv.loops = loopCounter{}
			res, err := r.eval(ctx, act, connect)
			if err != nil {
				tr.decide(i, "when error: "+err.Error())
				return broker.Decision{Rule: r.name, Reason: reasonWhenError}, fmt.Errorf("rules: rule %q: when: %w", r.name, err)
			}
			switch res {
			case resFalse:
				tr.note(i, false, "when is false")
				continue
			case resUnknown:
				// Only possible at CONNECT. A deny rule that may apply
				// to some requests forces interception below; an allow
				// rule that may apply means "intercept and ask again".
				if r.action == broker.Deny {
					unknownDeny = true
					tr.note(i, false, "when depends on request fields; each request is judged")
				} else {
					if firstUnknown < 0 {
						firstUnknown = i
					}
					tr.note(i, false, "when depends on request fields")
				}
				continue
			}
		}
		if connect && firstUnknown >= 0 {
			tr.note(i, true, fmt.Sprintf("matches, but earlier rule %q depends on request fields", s.rules[firstUnknown].name))
			return s.intercept(firstUnknown, tr), nil
		}
		if connect && unknownDeny && r.action == broker.Tunnel {
			// A tunnel would hide the requests that deny rule must see.
			tr.decide(i, "decides, intercepted instead of tunnelled: an earlier deny rule depends on request fields")
			return broker.Decision{Action: broker.Allow, Rule: r.name, Reason: reasonInterceptDeny}, nil
		}
		tr.decide(i, "decides")
		return r.decision(), nil
	}
	if firstUnknown >= 0 {
		return s.intercept(firstUnknown, tr), nil
	}
	return broker.Decision{Reason: reasonNoMatch}, nil
}

// intercept is the CONNECT decision when rule i may allow some requests:
// intercept, so each request is decided on its own. No credential is named
// because no request has matched yet.
func (s *Set) intercept(i int, tr *tracer) broker.Decision {
	tr.decide(i, "decides: when depends on request fields, so the connection is intercepted and each request decided")
	return broker.Decision{Action: broker.Allow, Rule: s.rules[i].name, Reason: reasonIntercept}
}

func (r *rule) decision() broker.Decision {
	switch r.action {
	case broker.Allow:
		return broker.Decision{Action: broker.Allow, Rule: r.name, Inject: r.inject,
			AllowPlaintext: r.allowPlaintext, Reason: reasonAllow}
	case broker.Tunnel:
		return broker.Decision{Action: broker.Tunnel, Rule: r.name, Reason: reasonTunnel}
	}
	return broker.Decision{Action: broker.Deny, Rule: r.name, Reason: reasonDeny}
}

func (r *rule) matchesHost(host string) bool {
	for _, p := range r.hosts {
		if p.matches(host) {
			return true
		}
	}
	return false
}

// ports returns the ports rule r accepts for t, or anyPort.
func (s *Set) ports(r *rule, t broker.Target, connect bool) (ports []int, anyPort bool) {
	switch {
	case r.ports != nil:
		return r.ports, false
	case t.Protocol == broker.ProtocolPostgres:
		return nil, true
	case connect || t.Protocol == broker.ProtocolHTTPS:
		return s.connectPorts, false
	case t.Protocol == broker.ProtocolHTTP:
		return s.httpPorts, false
	}
	return nil, false // unknown protocol: only explicit ports match
}

func portReason(t broker.Target, ports []int) string {
	if len(ports) == 0 {
		return fmt.Sprintf("protocol %q has no default ports; the rule lists none", t.Protocol)
	}
	return fmt.Sprintf("port %d not in %v", t.Port, ports)
}

func containsInt(l []int, v int) bool {
	for _, x := range l {
		if x == v {
			return true
		}
	}
	return false
}

func (s *Set) activation(id broker.Identity, t broker.Target, connect bool) (any, *lazyVars, error) {
	v := vars(id, t, s.clock.Now(), connect)
	if connect {
		unknowns := s.unknowns
		if id.Delegator.Sub == "" {
			unknowns = s.unknownsNoDelegator
		}
		a, err := cel.PartialVars(v, unknowns...)
		if err != nil {
			return nil, nil, fmt.Errorf("building variables: %w", err)
		}
		return a, v, nil
	}
	a, err := cel.NewActivation(v)
	if err != nil {
		return nil, nil, fmt.Errorf("building variables: %w", err)
	}
	return a, v, nil
}

func (r *rule) eval(ctx context.Context, act any, connect bool) (result, error) {
	prg := r.full
	if connect {
		prg = r.partial
	}
	val, _, err := prg.ContextEval(ctx, act)
	if err != nil {
		return resFalse, err
	}
	if types.IsUnknown(val) {
		if connect {
			return resUnknown, nil
		}
		return resFalse, errors.New("result is unknown at request phase")
	}
	b, ok := val.(types.Bool)
	if !ok {
		return resFalse, fmt.Errorf("result has type %s, not bool", val.Type())
	}
	if b {
		return resTrue, nil
	}
	return resFalse, nil
}
