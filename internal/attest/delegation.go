package attest

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/keygate/broker/internal/broker"
)

// Delegation verifies the token of a user on whose behalf a workload calls
// (an agent acting for a person, a CI job for its triggering actor). The
// verified user becomes broker.Delegator, separate from the workload: a rule
// can require both. The token is checked against the configured issuers
// exactly as workload OIDC tokens are; it never reaches the upstream.
type Delegation struct {
	header    string
	verifiers []*OIDC
}

// NewDelegation builds a verifier for header, trusting the given issuers.
func NewDelegation(header string, verifiers []*OIDC) (*Delegation, error) {
	if strings.TrimSpace(header) == "" {
		return nil, errors.New("attest: delegation: header is empty")
	}
	if len(verifiers) == 0 {
		return nil, errors.New("attest: delegation: no issuers")
	}
	return &Delegation{header: header, verifiers: verifiers}, nil
}

// Header is the request header that carries the user token.
func (d *Delegation) Header() string { return d.header }

// Delegate verifies a header value: a bare JWT or "Bearer <jwt>". An empty
// value is no delegation (the zero Delegator, nil). A token no configured
// issuer accepts wraps broker.ErrInvalidEvidence; the token is never part
// of an error.
func (d *Delegation) Delegate(ctx context.Context, raw broker.Secret) (broker.Delegator, error) {
	v := strings.TrimSpace(raw.Reveal())
	if v == "" {
		return broker.Delegator{}, nil
	}
	if scheme, rest, ok := strings.Cut(v, " "); ok && strings.EqualFold(scheme, "Bearer") {
		v = strings.TrimSpace(rest)
	}
	ev := broker.Evidence{ProxyAuthorization: broker.NewSecret("Bearer " + v)}
	for _, o := range d.verifiers {
		id, err := o.Attest(ctx, ev)
		if errors.Is(err, broker.ErrNoEvidence) {
			continue
		}
		if err != nil {
			return broker.Delegator{}, fmt.Errorf("attest: delegation: %w", err)
		}
		return broker.Delegator{Sub: id.ID, Claims: id.Claims, Expires: id.Expires}, nil
	}
	return broker.Delegator{}, fmt.Errorf("attest: delegation: token is not from a trusted issuer: %w", broker.ErrInvalidEvidence)
}
