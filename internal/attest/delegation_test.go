package attest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
)

func TestDelegation(t *testing.T) {
	ctx := context.Background()
	users := newTestIssuer(t, rsaTestKey(0, "users"))
	other := newTestIssuer(t, rsaTestKey(1, "other"))
	d, err := NewDelegation("X-On-Behalf-Of", []*OIDC{newTestOIDC(t, ctx, users, nil)})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	user := map[string]any{"iss": users.url, "aud": testAudience, "sub": "alice@example.com", "groups": []any{"sre"},
		"iat": now.Unix(), "exp": now.Add(time.Minute).Unix()}
	good := mint(t, users.published[0], user)
	expired := mint(t, users.published[0], with(user, "exp", now.Add(-time.Hour).Unix()))
	foreign := mint(t, other.published[0], with(user, "iss", other.url))

	tests := []struct {
		name    string
		header  string
		wantSub string
		wantErr error
	}{
		{"absent", "", "", nil},
		{"bare token", good, "alice@example.com", nil},
		{"bearer token", "Bearer " + good, "alice@example.com", nil},
		{"expired", expired, "", broker.ErrInvalidEvidence},
		{"untrusted issuer", foreign, "", broker.ErrInvalidEvidence},
		{"not a token", "hunter2", "", broker.ErrInvalidEvidence},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := d.Delegate(ctx, broker.NewSecret(tt.header))
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				assertNoLeak(t, err, tt.header, "hunter2")
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Sub != tt.wantSub {
				t.Fatalf("sub = %q, want %q", got.Sub, tt.wantSub)
			}
			if tt.wantSub != "" && got.Claims["groups"] == nil {
				t.Fatal("delegator claims are missing")
			}
		})
	}
	if _, err := NewDelegation("", []*OIDC{newTestOIDC(t, ctx, users, nil)}); err == nil {
		t.Fatal("empty header accepted")
	}
	if _, err := NewDelegation("X-A", nil); err == nil {
		t.Fatal("no issuers accepted")
	}
}
