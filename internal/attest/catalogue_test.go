package attest

import (
	"context"
	"errors"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/rules"
)

// TestAttestation (SECURITY-TESTS T-F1): through the attestor chain the
// broker builds (SPIFFE first, then a CIDR fallback covering the caller's
// address) and the pipeline: an expired SVID, an SVID of another trust
// domain and one signed by a CA that is not (or no longer) in the bundle
// are 407 — never a fall-through to the address — and the source address
// alone never satisfies a rule written for a SPIFFE ID: a CIDR identity
// cannot even be named like one. Rotation of the bundle itself (old CA
// removed) is TestSPIFFEWorkloadAPIBundleRotation; an SVID expiring during
// a tunnel is intercept TestTunnelEndsWhenIdentityExpires.
func TestAttestation(t *testing.T) {
	w := newSPIFFEWorld(t, nil)
	const app = "spiffe://example.org/ns/a/sa/one"
	cidr, err := NewCIDR([]CIDREntry{{ID: "local", CIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}})
	if err != nil {
		t.Fatal(err)
	}
	chain := NewChain(nil, Named{Name: "spiffe", Attestor: w.a}, Named{Name: "cidr", Attestor: cidr})
	set, errs := rules.Compile([]rules.Spec{
		{Name: "app", Hosts: []string{"api.example.com"}, When: `workload.id == "` + app + `"`},
	}, rules.Options{})
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	p := &broker.Pipeline{Attestor: chain, Policy: set}
	now := time.Now()
	good, _ := w.ca.leaf(t, app, now.Add(-time.Minute), now.Add(time.Hour))
	expired, _ := w.ca.leaf(t, app, now.Add(-2*time.Hour), now.Add(-time.Minute))
	notYet, _ := w.ca.leaf(t, app, now.Add(time.Hour), now.Add(2*time.Hour))
	foreignTD, _ := w.foreign.leaf(t, "spiffe://other.org/ns/a/sa/one", now.Add(-time.Minute), now.Add(time.Hour))
	// Our trust domain's name, signed by a CA the bundle does not hold (a
	// rotated-out or a rogue authority).
	unknownCA, _ := w.foreign.leaf(t, app, now.Add(-time.Minute), now.Add(time.Hour))
	loopback := netip.MustParseAddrPort("127.0.0.1:40000")

	tests := []struct {
		name   string
		ev     broker.Evidence
		status int // 0: allowed
	}{
		{"valid SVID", withRemote(tlsEvidence(good), loopback), 0},
		{"expired SVID", withRemote(tlsEvidence(expired), loopback), http.StatusProxyAuthRequired},
		{"SVID not yet valid", withRemote(tlsEvidence(notYet), loopback), http.StatusProxyAuthRequired},
		{"other trust domain", withRemote(tlsEvidence(foreignTD), loopback), http.StatusProxyAuthRequired},
		{"CA not in the bundle", withRemote(tlsEvidence(unknownCA), loopback), http.StatusProxyAuthRequired},
		{"source address only", broker.Evidence{Listener: "proxy", Remote: loopback}, http.StatusForbidden},
		{"address plus a claimed identity header", broker.Evidence{Listener: "proxy", Remote: loopback,
			ProxyAuthorization: broker.NewSecret("Basic " + app)}, http.StatusProxyAuthRequired},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tg := broker.Target{Phase: broker.PhaseRequest, Protocol: broker.ProtocolHTTPS, Host: "api.example.com", Port: 443, Method: "GET", Path: "/"}
			id, err := p.Attest(context.Background(), tt.ev)
			if err == nil {
				_, err = p.Decide(context.Background(), id, tg)
			}
			if tt.status == 0 {
				if err != nil || id.ID != app || id.Method != broker.MethodSPIFFEX509 {
					t.Fatalf("identity %q/%s, err %v: want an allowed %s", id.ID, id.Method, err, app)
				}
				return
			}
			var be *broker.Error
			if !errors.As(err, &be) || be.Status() != tt.status {
				t.Fatalf("identity %q/%s, err %v: want HTTP %d", id.ID, id.Method, err, tt.status)
			}
			if id.ID == app {
				t.Fatal("the rule's identity was granted without a valid SVID")
			}
		})
	}

	t.Run("a cidr identity cannot be named like a proven one", func(t *testing.T) {
		for _, name := range []string{app, "repo:acme/app:ref:refs/heads/main", "system:serviceaccount:ns:sa", "unix:uid:0"} {
			if _, err := NewCIDR([]CIDREntry{{ID: name, CIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}}}); err == nil {
				t.Errorf("cidr identity %q accepted", name)
			}
		}
	})
}

func withRemote(ev broker.Evidence, remote netip.AddrPort) broker.Evidence {
	ev.Remote = remote
	return ev
}
