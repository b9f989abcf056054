package inject

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
)

// The tests in this file run against a real Vault whose database engine
// manages users in a real PostgreSQL (newDBLab, vault_dynamic_test.go).

// bodyRecorder keeps the body of every request whose path has a prefix.
type bodyRecorder struct {
	rt     http.RoundTripper
	prefix string
	mu     sync.Mutex
	bodies []string
}

func (b *bodyRecorder) RoundTrip(r *http.Request) (*http.Response, error) {
	if strings.HasPrefix(r.URL.Path, b.prefix) {
		var body []byte
		if r.Body != nil {
			body, _ = io.ReadAll(r.Body)
			r.Body.Close()
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		b.mu.Lock()
		b.bodies = append(b.bodies, string(body))
		b.mu.Unlock()
	}
	return b.rt.RoundTrip(r)
}

// leaseExpiry asks Vault (as root) when a lease ends.
func (l *dbLab) leaseExpiry(t *testing.T, leaseID string) time.Time {
	t.Helper()
	out := l.Must("PUT", "sys/leases/lookup", map[string]any{"lease_id": leaseID})
	s, _ := out["data"].(map[string]any)["expire_time"].(string)
	exp, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("lease lookup: expire_time %q: %v", s, err)
	}
	return exp
}

// leaseIDs lists the live leases of the role (as root), full ids.
func (l *dbLab) leaseIDs(t *testing.T) []string {
	t.Helper()
	code, out, err := l.Do("LIST", "sys/leases/lookup/database/creds/app-ro/", nil)
	if err != nil {
		t.Fatal(err)
	}
	if code == 404 {
		return nil
	}
	var ids []string
	for _, k := range out["data"].(map[string]any)["keys"].([]any) {
		ids = append(ids, "database/creds/app-ro/"+k.(string))
	}
	return ids
}

// eventually polls cond for up to 5 s (Vault revokes leases in the
// background after a token revocation).
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 5s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRenewCappedByMaxTTL (SECURITY-TESTS §4): the broker renews a lease
// without asking for an increment and takes the lease_duration Vault
// returns, which Vault caps at the role's max_ttl: the credential's
// Expires matches Vault's own expire_time and never passes issue+max_ttl.
func TestRenewCappedByMaxTTL(t *testing.T) {
	l := newDBLab(t, "10s", "12s")
	l.Must("PUT", "sys/policies/acl/db", map[string]any{"policy": `
path "database/creds/app-ro" { capabilities = ["read"] }
path "sys/leases/renew/database/creds/app-ro/*" { capabilities = ["update"] }
path "sys/leases/revoke/database/creds/app-ro/*" { capabilities = ["update"] }
`})
	rf, sf := l.enableAppRole(t, "db", nil)
	rec := &bodyRecorder{prefix: "/v1/sys/leases/renew/"}
	v, err := NewVault(VaultOptions{Name: "legacy", Address: l.Addr, Auth: VaultAuth{Method: VaultAuthAppRole, RoleIDFile: rf, SecretIDFile: sf},
		WrapTransport: func(rt http.RoundTripper) http.RoundTripper { rec.rt = rt; return rec }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = v.Close(ctx)
	})
	d := dynSource(t, v, VaultDynamicOptions{})
	issued := time.Now()
	c, err := d.Credential(context.Background(), vaultCaller, broker.Grant{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Release(context.Background())
	ids := l.leaseIDs(t)
	if len(ids) != 1 {
		t.Fatalf("%d leases", len(ids))
	}
	maxEnd := issued.Add(12 * time.Second)

	time.Sleep(5 * time.Second) // a default increment (10s) would now pass max_ttl by about 3s
	exp, err := d.Renew(context.Background(), c)
	if err != nil {
		t.Fatalf("Renew: %v", err)
	}
	if exp.After(maxEnd.Add(time.Second)) {
		t.Fatalf("renewed to %s after issue, past max_ttl 12s", exp.Sub(issued))
	}
	if vaultExp := l.leaseExpiry(t, ids[0]); exp.Sub(vaultExp).Abs() > 1500*time.Millisecond {
		t.Fatalf("broker expiry %s, Vault's %s", exp.Format(time.RFC3339Nano), vaultExp.Format(time.RFC3339Nano))
	}
	if time.Until(exp) > 8500*time.Millisecond {
		t.Fatalf("renewed for %s: not capped", time.Until(exp))
	}
	// The broker asked for nothing: no increment in the renew call.
	rec.mu.Lock()
	bodies := append([]string(nil), rec.bodies...)
	rec.mu.Unlock()
	if len(bodies) != 1 {
		t.Fatalf("%d renew calls", len(bodies))
	}
	if strings.Contains(bodies[0], "increment") {
		t.Fatalf("renew body %q requests an increment", bodies[0])
	}
	// Renewing at the cap does not extend the lease.
	exp2, err := d.Renew(context.Background(), c)
	if err != nil {
		t.Fatalf("second Renew: %v", err)
	}
	if exp2.After(maxEnd.Add(time.Second)) {
		t.Fatalf("second renewal ends %s after issue", exp2.Sub(issued))
	}
}

// TestVaultTokenIsPerIncarnation (SECURITY-TESTS §4, T-B10, F-12, F-14):
// each broker incarnation (a Vault connection that logs in: jwt,
// kubernetes, approle) reads with its own token, so ending one
// incarnation revokes every lease it created — including one-shot leases
// whose requests never released them (in flight, or lost in a crash of
// that process: the token's TTL then bounds them) — and nothing of another
// incarnation. (token_file is different: the token is shared by every
// incarnation and is not revoked at Close; docs/threat-catalogue.md.)
func TestVaultTokenIsPerIncarnation(t *testing.T) {
	l := newDBLab(t, "5m", "1h")
	v1, _ := l.brokerConn(t)
	v2, _ := l.brokerConn(t)
	c1, err := dynSource(t, v1, VaultDynamicOptions{}).Credential(context.Background(), vaultCaller, broker.Grant{})
	if err != nil {
		t.Fatal(err)
	}
	c2, err := dynSource(t, v2, VaultDynamicOptions{}).Credential(context.Background(), vaultCaller, broker.Grant{})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Release(context.Background())
	t1, t2 := v1.client.Token(), v2.client.Token()
	if t1 == "" || t2 == "" || t1 == t2 || t1 == l.RootToken || t2 == l.RootToken {
		t.Fatal("the two incarnations do not hold distinct tokens of their own")
	}
	for _, tok := range []string{t1, t2} {
		if code, _, _ := l.Do("GET", "auth/token/lookup-self", nil, tok); code != 200 {
			t.Fatalf("lookup-self: HTTP %d", code)
		}
	}
	if err := l.canLogin(c1); err != nil {
		t.Fatal(err)
	}
	if err := l.canLogin(c2); err != nil {
		t.Fatal(err)
	}

	// Incarnation 1 ends without releasing c1 (its request never finished).
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := v1.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if code, _, _ := l.Do("GET", "auth/token/lookup-self", nil, t1); code != 403 {
		t.Fatalf("incarnation 1's token still valid (HTTP %d)", code)
	}
	eventually(t, "incarnation 1's unreleased lease revoked with its token", func() bool { return l.canLogin(c1) != nil })
	eventually(t, "one lease left", func() bool { return len(l.leaseIDs(t)) == 1 })
	if err := l.canLogin(c2); err != nil {
		t.Fatalf("incarnation 2's user was revoked too: %v", err)
	}
	if code, _, _ := l.Do("GET", "auth/token/lookup-self", nil, t2); code != 200 {
		t.Fatalf("incarnation 2's token revoked (HTTP %d)", code)
	}
}

// TestRevokeOnShutdown (SECURITY-TESTS §4, F-12): the broker's shutdown
// sequence (config.Runtime.Close: credential caches, then Vault
// connections) revokes the cached shared lease explicitly, revokes the
// broker's own token (revoke-self) and with it a one-shot lease still in
// use, all within the 10 s exit budget. The process-level SIGTERM path is
// covered by internal/config TestRuntimeVault and integration
// TestSIGTERMUnderLoad.
func TestRevokeOnShutdown(t *testing.T) {
	l := newDBLab(t, "5m", "1h")
	v, vc := l.brokerConn(t)
	d := dynSource(t, v, VaultDynamicOptions{})
	cached := NewCache("orders-db", d, CacheOptions{TTL: time.Hour, ShareLeases: true, Renew: d.Renew})
	oneShot := NewCache("orders-db-once", dynSource(t, v, VaultDynamicOptions{}), CacheOptions{})
	shared, err := cached.Credential(context.Background(), vaultCaller, broker.Grant{Credential: "orders-db", Rule: "r"})
	if err != nil {
		t.Fatal(err)
	}
	shared.Release(context.Background()) // the request ended; the lease stays cached
	inflight, err := oneShot.Credential(context.Background(), vaultCaller, broker.Grant{Credential: "orders-db-once", Rule: "r"})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(l.leaseIDs(t)); n != 2 {
		t.Fatalf("%d leases before shutdown", n)
	}

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second) // ExitTimeout
	defer cancel()
	for _, cl := range []Closer{cached.(Closer), oneShot.(Closer), v} {
		if err := cl.Close(ctx); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
	took := time.Since(start)
	if n := vc.count("PUT /v1/sys/leases/revoke/"); n != 1 {
		t.Fatalf("%d explicit lease revocations, want 1 (the cached lease)", n)
	}
	if n := vc.count("PUT /v1/auth/token/revoke-self"); n != 1 {
		t.Fatalf("%d token revocations, want 1", n)
	}
	eventually(t, "every lease revoked", func() bool { return len(l.leaseIDs(t)) == 0 })
	if l.canLogin(shared) == nil || l.canLogin(inflight) == nil {
		t.Fatal("a database user still logs in after shutdown")
	}
	t.Logf("shutdown revoked 2 leases and the token in %s", took)
}

// TestVaultTokenFileChildToken (SECURITY-TESTS §4, N-01 for token_file):
// with child_token_ttl the process works under its own child of the file's
// token. A dynamic lease it leaves behind is revoked with that child at
// Close, while the file's token (possibly shared with other processes)
// stays valid; without a Close the child is bounded by its TTL.
func TestVaultTokenFileChildToken(t *testing.T) {
	l := newDBLab(t, "5m", "1h")
	file := l.file(t, "root-token", l.RootToken)
	v, _ := l.conn(t, VaultOptions{Auth: VaultAuth{Method: VaultAuthTokenFile, TokenFile: file, ChildTTL: 2 * time.Minute}})
	c, err := dynSource(t, v, VaultDynamicOptions{}).Credential(context.Background(), vaultCaller, broker.Grant{})
	if err != nil {
		t.Fatal(err)
	}
	child := v.client.Token()
	if child == "" || child == l.RootToken {
		t.Fatal("the process works under the file's token, not a child of its own")
	}
	code, out, err := l.Do("GET", "auth/token/lookup-self", nil, child)
	if err != nil || code != 200 {
		t.Fatalf("child lookup-self: HTTP %d %v", code, err)
	}
	data, _ := out["data"].(map[string]any)
	ttl, _ := data["ttl"].(float64)
	renewable, _ := data["renewable"].(bool)
	if ttl <= 0 || ttl > 120 || !renewable {
		t.Fatalf("child token ttl %vs renewable %v, want ≤ 120 s and renewable", ttl, renewable)
	}
	if err := l.canLogin(c); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := v.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if code, _, _ := l.Do("GET", "auth/token/lookup-self", nil, child); code != 403 {
		t.Fatalf("the child token is still valid after Close (HTTP %d)", code)
	}
	eventually(t, "the lease left behind is revoked with the child", func() bool { return l.canLogin(c) != nil })
	if code, _, _ := l.Do("GET", "auth/token/lookup-self", nil, l.RootToken); code != 200 {
		t.Fatalf("the file's own token was revoked (HTTP %d)", code)
	}
}

func TestVaultChildTTLOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		a    VaultAuth
		want string
	}{
		{"negative", VaultAuth{Method: VaultAuthTokenFile, TokenFile: "f", ChildTTL: -time.Minute}, "must be positive"},
		{"too short", VaultAuth{Method: VaultAuthTokenFile, TokenFile: "f", ChildTTL: time.Second}, "at least 1m"},
		{"login method", VaultAuth{Method: VaultAuthAppRole, RoleIDFile: "r", SecretIDFile: "s", ChildTTL: time.Hour}, "token_file only"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkVaultAuth(tc.a)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("checkVaultAuth = %v, want an error containing %q", err, tc.want)
			}
		})
	}
	if err := checkVaultAuth(VaultAuth{Method: VaultAuthTokenFile, TokenFile: "f", ChildTTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
}
