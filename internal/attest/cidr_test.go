package attest

import (
	"context"
	"errors"
	"net/netip"
	"testing"

	"github.com/keygate/broker/internal/broker"
)

func mustPrefixes(t *testing.T, ss ...string) []netip.Prefix {
	t.Helper()
	out := make([]netip.Prefix, 0, len(ss))
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func TestCIDRAttest(t *testing.T) {
	c, err := NewCIDR([]CIDREntry{
		{ID: "build-farm", CIDRs: mustPrefixes(t, "10.20.0.0/16")},
		{ID: "build-farm-gpu", CIDRs: mustPrefixes(t, "10.20.7.0/24")},
		{ID: "local", CIDRs: mustPrefixes(t, "127.0.0.0/8", "::1/128")},
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		remote string
		want   string // "" means ErrNoEvidence
	}{
		{"10.20.1.2:5000", "build-farm"},
		{"10.20.7.9:5000", "build-farm-gpu"},
		{"127.0.0.1:1", "local"},
		{"[::1]:1", "local"},
		{"[::ffff:127.0.0.1]:1", "local"},
		{"10.21.0.1:1", ""},
		{"192.0.2.1:1", ""},
	}
	for _, tt := range tests {
		t.Run(tt.remote, func(t *testing.T) {
			id, err := c.Attest(context.Background(), broker.Evidence{Remote: netip.MustParseAddrPort(tt.remote)})
			if tt.want == "" {
				if !errors.Is(err, broker.ErrNoEvidence) {
					t.Fatalf("want ErrNoEvidence, got %v %+v", err, id)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if id.ID != tt.want || id.Method != broker.MethodCIDR {
				t.Fatalf("got %+v, want %s/cidr", id, tt.want)
			}
		})
	}
}

func TestNewCIDRRejects(t *testing.T) {
	tests := map[string][]CIDREntry{
		"empty id":     {{ID: "", CIDRs: mustPrefixes(t, "10.0.0.0/8")}},
		"no cidrs":     {{ID: "a"}},
		"shared range": {{ID: "a", CIDRs: mustPrefixes(t, "10.0.0.0/8")}, {ID: "b", CIDRs: mustPrefixes(t, "10.0.0.0/8")}},
	}
	for name, entries := range tests {
		t.Run(name, func(t *testing.T) {
			if _, err := NewCIDR(entries); err == nil {
				t.Fatal("want error")
			}
		})
	}
}

type fixed struct {
	id  broker.Identity
	err error
}

func (f fixed) Attest(context.Context, broker.Evidence) (broker.Identity, error) { return f.id, f.err }

func TestChain(t *testing.T) {
	good := broker.Identity{ID: "w", Method: broker.MethodCIDR}
	invalid := errors.Join(broker.ErrInvalidEvidence, errors.New("expired"))
	tests := []struct {
		name      string
		chain     []Named
		wantID    string
		wantErr   error
		wantFails int
	}{
		{"empty chain denies", nil, "", broker.ErrNoEvidence, 0},
		{"skips non-applicable", []Named{{"a", fixed{err: broker.ErrNoEvidence}}, {"b", fixed{id: good}}}, "w", nil, 0},
		{"invalid stops the chain", []Named{{"a", fixed{err: invalid}}, {"b", fixed{id: good}}}, "", broker.ErrInvalidEvidence, 1},
		{"empty identity is invalid", []Named{{"a", fixed{}}, {"b", fixed{id: good}}}, "", broker.ErrInvalidEvidence, 1},
		{"internal error stops", []Named{{"a", fixed{err: errors.New("boom")}}, {"b", fixed{id: good}}}, "", nil, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fails := 0
			c := NewChain(func(string) { fails++ }, tt.chain...)
			id, err := c.Attest(context.Background(), broker.Evidence{})
			if id.ID != tt.wantID {
				t.Fatalf("id = %q, want %q", id.ID, tt.wantID)
			}
			if tt.wantID == "" && err == nil {
				t.Fatal("want an error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if fails != tt.wantFails {
				t.Fatalf("failures = %d, want %d", fails, tt.wantFails)
			}
		})
	}
}
