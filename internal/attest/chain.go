package attest

import (
	"context"
	"errors"
	"fmt"

	"github.com/keygate/broker/internal/broker"
)

// Named is an attestor with a name for errors and metrics.
type Named struct {
	Name     string
	Attestor broker.Attestor
}

// Chain tries attestors in order; the first that applies decides.
type Chain struct {
	attestors []Named
	onFailure func(method string)
}

// NewChain builds a chain. onFailure, if set, is called with the attestor's
// name whenever evidence is rejected or an attestor fails.
func NewChain(onFailure func(method string), attestors ...Named) *Chain {
	return &Chain{attestors: attestors, onFailure: onFailure}
}

// Attest implements broker.Attestor.
func (c *Chain) Attest(ctx context.Context, ev broker.Evidence) (broker.Identity, error) {
	for _, a := range c.attestors {
		id, err := a.Attestor.Attest(ctx, ev)
		if errors.Is(err, broker.ErrNoEvidence) {
			continue
		}
		if err == nil && id.IsZero() {
			err = fmt.Errorf("attest: %s returned an empty identity: %w", a.Name, broker.ErrInvalidEvidence)
		}
		if err != nil {
			if c.onFailure != nil {
				c.onFailure(a.Name)
			}
			return broker.Identity{}, fmt.Errorf("attest: %s: %w", a.Name, err)
		}
		return id, nil
	}
	return broker.Identity{}, broker.ErrNoEvidence
}
