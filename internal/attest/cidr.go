package attest

import (
	"context"
	"fmt"
	"net/netip"
	"strings"

	"github.com/keygate/broker/internal/broker"
)

// CIDREntry maps source address ranges to a named identity.
type CIDREntry struct {
	ID    string
	CIDRs []netip.Prefix
}

// CIDR attests callers by source address. It proves network position only,
// so its identities carry method "cidr" and rules should treat them as weak.
type CIDR struct {
	entries []CIDREntry
}

// NewCIDR validates the entries: every entry needs an id without ':' (so it
// can never equal a SPIFFE ID, a token subject or a process identity) and
// at least one prefix, and a prefix may belong to one identity only, so an
// address never has two names.
func NewCIDR(entries []CIDREntry) (*CIDR, error) {
	seen := map[netip.Prefix]string{}
	for i, e := range entries {
		if e.ID == "" {
			return nil, fmt.Errorf("attest: cidr identity %d: id is empty", i)
		}
		if strings.ContainsRune(e.ID, ':') {
			// SPIFFE IDs, token subjects (repo:..., system:serviceaccount:...)
			// and process identities (unix:uid:...) all contain ':'; a
			// network position must never carry a name a rule wrote for a
			// proven identity (SECURITY-TESTS T-F1).
			return nil, fmt.Errorf("attest: cidr identity %q: an id must not contain ':' (it would look like a SPIFFE ID or a token subject)", e.ID)
		}
		if len(e.CIDRs) == 0 {
			return nil, fmt.Errorf("attest: cidr identity %q: no cidrs", e.ID)
		}
		for _, p := range e.CIDRs {
			p = p.Masked()
			if other, ok := seen[p]; ok && other != e.ID {
				return nil, fmt.Errorf("attest: cidr %s is claimed by both %q and %q", p, other, e.ID)
			}
			seen[p] = e.ID
		}
	}
	return &CIDR{entries: entries}, nil
}

// Attest implements broker.Attestor. The most specific (longest) matching
// prefix wins, so a narrow range can carve an identity out of a broad one.
func (c *CIDR) Attest(_ context.Context, ev broker.Evidence) (broker.Identity, error) {
	addr := ev.Remote.Addr().Unmap()
	if !addr.IsValid() {
		return broker.Identity{}, broker.ErrNoEvidence
	}
	best, bestBits := "", -1
	for _, e := range c.entries {
		for _, p := range e.CIDRs {
			if p.Contains(addr) && p.Bits() > bestBits {
				best, bestBits = e.ID, p.Bits()
			}
		}
	}
	if best == "" {
		return broker.Identity{}, broker.ErrNoEvidence
	}
	return broker.Identity{ID: best, Method: broker.MethodCIDR}, nil
}
