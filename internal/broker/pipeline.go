package broker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"
)

// Pipeline runs one CONNECT or one request through attestation, policy,
// credential fetch and injection. It knows nothing of listeners or proxies;
// package intercept (and dbproxy) drive it.
type Pipeline struct {
	Attestor Attestor
	Policy   Policy
	Sources  map[string]Source // by credential name
	Clock    Clock
}

// Attest identifies the caller. Any failure is a 407.
func (p *Pipeline) Attest(ctx context.Context, ev Evidence) (Identity, error) {
	if p.Attestor == nil {
		return Identity{}, NewError(CodeUnauthenticated, "no attestor is configured", nil)
	}
	id, err := p.Attestor.Attest(ctx, ev)
	switch {
	case errors.Is(err, ErrNoEvidence):
		// No attestor applies: the caller is anonymous. Only rules that allow
		// anonymous callers can match; any denial is then a 407 (Decide).
		return Anonymous, nil
	case errors.Is(err, ErrInvalidEvidence):
		return Identity{}, NewError(CodeUnauthenticated, "caller evidence was rejected", err)
	case err != nil:
		// The attestor could not decide (an issuer's keys are unreachable):
		// the caller is not at fault and may retry.
		return Identity{}, &Error{Code: CodeAttestUnavailable, Message: "caller attestation is unavailable", RetryAfter: 5 * time.Second, Err: err}
	case id.IsZero():
		return Identity{}, NewError(CodeUnauthenticated, "caller could not be attested", nil)
	}
	return id, nil
}

// Decide asks the policy and turns every non-allow outcome into an *Error.
// The returned Decision is valid (its Rule set) even alongside an error.
func (p *Pipeline) Decide(ctx context.Context, id Identity, t Target) (Decision, error) {
	if p.Policy == nil {
		return Decision{}, NewError(CodeDenied, "no policy is loaded", nil)
	}
	d, err := p.Policy.Decide(ctx, id, t)
	if err != nil {
		// Fail closed, under its own code: the operator must tell a broken
		// rule from an intended denial (SECURITY-TESTS F-11, T-B8).
		return Decision{Rule: d.Rule}, &Error{Code: CodeRuleError, Message: "rule evaluation failed", Rule: d.Rule, Err: err}
	}
	if !d.Allowed() {
		if id.Method == MethodAnonymous {
			// Tell an anonymous caller to authenticate, not that it is
			// forbidden: with evidence, a rule might allow it.
			return d, &Error{Code: CodeUnauthenticated, Message: "caller could not be attested", Rule: d.Rule}
		}
		msg := "no rule allows this request"
		if d.Rule != "" {
			msg = "denied by rule " + d.Rule
		}
		return d, &Error{Code: CodeDenied, Message: msg, Rule: d.Rule}
	}
	return d, nil
}

// Authorize decides one request and, when the rule grants a credential,
// fetches it and injects it into r. On any error r must not be forwarded.
// The caller calls Credential.Release (if set) when the request is done.
func (p *Pipeline) Authorize(ctx context.Context, id Identity, t Target, r *http.Request) (Decision, Credential, error) {
	d, err := p.Decide(ctx, id, t)
	if err != nil {
		return d, Credential{}, err
	}
	if d.Inject == nil || d.Action == Tunnel {
		return d, Credential{}, nil
	}
	if t.Protocol != ProtocolHTTPS && !d.AllowPlaintext {
		return d, Credential{}, &Error{Code: CodePlaintextDenied, Rule: d.Rule,
			Message: "rule " + d.Rule + " injects a credential and this request is not over TLS"}
	}
	c, err := p.credential(ctx, id, t, d)
	if err != nil {
		return d, Credential{}, err
	}
	if d.Inject.Injector == nil {
		releaseNow(c)
		return d, Credential{}, &Error{Code: CodeInternal, Rule: d.Rule, Message: "rule " + d.Rule + " has no injector"}
	}
	if err := d.Inject.Injector.Inject(r, c); err != nil {
		releaseNow(c)
		// An injector that refuses the request itself (a pre-signed URL, a
		// body over the signing limit) says so with its own *Error.
		var be *Error
		if errors.As(err, &be) {
			if be.Rule == "" {
				be.Rule = d.Rule
			}
			return d, Credential{}, be
		}
		return d, Credential{}, &Error{Code: CodeCredentialMalformed, Rule: d.Rule,
			Message: fmt.Sprintf("credential %q could not be injected", c.Name), Err: err}
	}
	return d, c, nil
}

func (p *Pipeline) credential(ctx context.Context, id Identity, t Target, d Decision) (Credential, error) {
	name := d.Inject.Credential
	src, ok := p.Sources[name]
	if !ok || src == nil {
		return Credential{}, &Error{Code: CodeCredentialUnavailable, Rule: d.Rule,
			Message: fmt.Sprintf("credential %q is not configured", name)}
	}
	c, err := src.Credential(ctx, id, Grant{Rule: d.Rule, Credential: name, Target: t, Params: d.Inject.Params})
	if err != nil {
		var be *Error
		if errors.As(err, &be) {
			if be.Rule == "" {
				be.Rule = d.Rule
			}
			return Credential{}, be
		}
		return Credential{}, &Error{Code: CodeCredentialUnavailable, Rule: d.Rule,
			Message: fmt.Sprintf("credential %q is unavailable", name), Err: err}
	}
	if c.Name == "" {
		c.Name = name
	}
	if c.Expired(p.now()) {
		releaseNow(c)
		return Credential{}, &Error{Code: CodeCredentialUnavailable, Rule: d.Rule,
			Message: fmt.Sprintf("credential %q has expired", name)}
	}
	return c, nil
}

func (p *Pipeline) now() time.Time {
	if p.Clock == nil {
		return SystemClock{}.Now()
	}
	return p.Clock.Now()
}

func releaseNow(c Credential) {
	if c.Release != nil {
		c.Release(context.Background())
	}
}
