package inject

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/testservers"
)

// vault_dynamic against a real Vault whose database secrets engine manages
// users in a real PostgreSQL (a temporary cluster), checked with psql.

type dbLab struct {
	*vaultLab
	pg *testservers.Postgres
}

// newDBLab configures the database engine (TESTING.md §1) with a role
// "app-ro" of the given TTLs.
func newDBLab(t *testing.T, ttl, maxTTL string) *dbLab {
	t.Helper()
	pg := testservers.StartPostgres(t)
	l := newVaultLab(t)
	l.Must("POST", "sys/mounts/database", map[string]any{"type": "database"})
	l.Must("POST", "database/config/pg", map[string]any{
		"plugin_name":             "postgresql-database-plugin",
		"connection_url":          fmt.Sprintf("postgresql://{{username}}:{{password}}@127.0.0.1:%d/postgres?sslmode=disable", pg.Port),
		"username":                pg.User,
		"password":                pg.Password,
		"allowed_roles":           "app-ro",
		"password_authentication": "scram-sha-256",
	})
	l.Must("POST", "database/roles/app-ro", map[string]any{
		"db_name": "pg",
		"creation_statements": []string{`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'; ` +
			`GRANT pg_read_all_data TO "{{name}}";`},
		"default_ttl": ttl,
		"max_ttl":     maxTTL,
	})
	return &dbLab{vaultLab: l, pg: pg}
}

// brokerConn logs in with AppRole under a policy that can read the role's
// credentials and renew and revoke only their leases.
func (l *dbLab) brokerConn(t *testing.T) (*Vault, *vaultCounter) {
	t.Helper()
	l.Must("PUT", "sys/policies/acl/db", map[string]any{"policy": `
path "database/creds/app-ro" { capabilities = ["read"] }
path "sys/leases/renew/database/creds/app-ro/*" { capabilities = ["update"] }
path "sys/leases/revoke/database/creds/app-ro/*" { capabilities = ["update"] }
path "secret/data/*" { capabilities = ["read"] }
`})
	rf, sf := l.enableAppRole(t, "db", nil)
	return l.conn(t, VaultOptions{Auth: VaultAuth{Method: VaultAuthAppRole, RoleIDFile: rf, SecretIDFile: sf}})
}

func (l *dbLab) canLogin(c broker.Credential) error {
	u, _ := c.Field(broker.FieldUsername)
	p, _ := c.Field(broker.FieldPassword)
	canarytest.Register("vault dynamic postgres password", p.Reveal()) // Vault-issued: swept too
	out, err := l.pg.PSQL(u.Reveal(), p.Reveal(), "SELECT current_user")
	if err == nil && out != u.Reveal() {
		return fmt.Errorf("logged in as %q", out)
	}
	return err
}

// leaseCount lists the live leases of the role (as root).
func (l *dbLab) leaseCount(t *testing.T) int {
	t.Helper()
	code, out, err := l.Do("LIST", "sys/leases/lookup/database/creds/app-ro/", nil)
	if err != nil {
		t.Fatal(err)
	}
	if code == 404 {
		return 0
	}
	keys, _ := out["data"].(map[string]any)["keys"].([]any)
	return len(keys)
}

func dynSource(t *testing.T, v *Vault, o VaultDynamicOptions) *VaultDynamic {
	t.Helper()
	if o.Path == "" {
		o.Path = "database/creds/app-ro"
	}
	d, err := NewVaultDynamic(v, "orders-db", o)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// cache: none: a dynamic user works until the request ends; Release
// revokes the lease and psql can no longer log in.
func TestVaultDynamicOneShot(t *testing.T) {
	l := newDBLab(t, "5m", "1h")
	v, vc := l.brokerConn(t)
	src := NewCache("orders-db", dynSource(t, v, VaultDynamicOptions{}), CacheOptions{})
	before := time.Now()
	cr, err := src.Credential(context.Background(), vaultCaller, broker.Grant{Credential: "orders-db"})
	if err != nil {
		t.Fatalf("Credential: %v", err)
	}
	if cr.Kind != KindVaultDynamic || cr.Release == nil {
		t.Fatalf("kind %q, release %v", cr.Kind, cr.Release != nil)
	}
	if d := cr.Expires.Sub(before); d < 4*time.Minute || d > 6*time.Minute {
		t.Fatalf("expires in %s, want the lease's 5m", d)
	}
	lease := cr.Meta["lease"]
	suffix := lease[strings.LastIndexByte(lease, '/')+1:]
	if !strings.HasPrefix(lease, "database/creds/app-ro/") || len(suffix) != 8 {
		t.Fatalf("Meta lease %q is not the path plus 8 characters", lease)
	}
	if cr.Meta["vault_path"] != "database/creds/app-ro" {
		t.Fatalf("vault_path %q", cr.Meta["vault_path"])
	}
	if err := l.canLogin(cr); err != nil {
		t.Fatalf("psql with the dynamic user: %v", err)
	}
	// It plugs into the basic injector like any credential.
	req, _ := http.NewRequest("GET", "https://api.internal/", nil)
	if err := Basic().Inject(req, cr); err != nil {
		t.Fatal(err)
	}
	u, _ := cr.Field(broker.FieldUsername)
	p, _ := cr.Field(broker.FieldPassword)
	if want := "Basic " + base64.StdEncoding.EncodeToString([]byte(u.Reveal()+":"+p.Reveal())); req.Header.Get("Authorization") != want {
		t.Fatal("basic header")
	}
	if n := l.leaseCount(t); n != 1 {
		t.Fatalf("%d leases before Release", n)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cr.Release(ctx) // what the proxy does when the request ends
	if n := vc.count("PUT /v1/sys/leases/revoke/database/creds/app-ro/"); n != 1 {
		t.Fatalf("%d revocations", n)
	}
	if n := l.leaseCount(t); n != 0 {
		t.Fatalf("%d leases after Release", n)
	}
	err = l.canLogin(cr)
	if err == nil || !strings.Contains(err.Error(), "password authentication failed") {
		t.Fatalf("psql after revocation: %v", err)
	}
	cr.Release(ctx) // idempotent
	if n := vc.count("PUT /v1/sys/leases/revoke/"); n != 1 {
		t.Fatalf("%d revocations after a second Release", n)
	}
}

// A cached lease is shared, renewed while it is used (so it outlives its
// first TTL) and revoked when the cache closes.
func TestVaultDynamicCachedLease(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for a lease's TTL")
	}
	l := newDBLab(t, "4s", "1h")
	v, vc := l.brokerConn(t)
	d := dynSource(t, v, VaultDynamicOptions{Fields: map[string]string{"username": "username", "password": "password"}})
	src := NewCache("orders-db", d, CacheOptions{TTL: time.Hour, Margin: time.Second, ShareLeases: true, Renew: d.Renew})
	g := broker.Grant{Credential: "orders-db", Rule: "r"}
	first, err := src.Credential(context.Background(), vaultCaller, g)
	if err != nil {
		t.Fatal(err)
	}
	first.Release(context.Background()) // the request ends; the lease stays cached
	if n := l.leaseCount(t); n != 1 {
		t.Fatalf("%d leases", n)
	}
	firstExpiry := first.Expires
	// Use it past half its lifetime: a hit renews it in the background.
	deadline := time.Now().Add(10 * time.Second)
	for vc.count("PUT /v1/sys/leases/renew/") == 0 {
		if time.Now().After(deadline) {
			t.Fatal("never renewed")
		}
		cr, err := src.Credential(context.Background(), vaultCaller, g)
		if err != nil {
			t.Fatal(err)
		}
		cr.Release(context.Background())
		time.Sleep(250 * time.Millisecond)
	}
	// Past the first lease's expiry the same user is still served and
	// still logs in.
	time.Sleep(time.Until(firstExpiry) + 500*time.Millisecond)
	cr, err := src.Credential(context.Background(), vaultCaller, g)
	if err != nil {
		t.Fatal(err)
	}
	u1, _ := first.Field(broker.FieldUsername)
	u2, _ := cr.Field(broker.FieldUsername)
	if u1.Reveal() != u2.Reveal() {
		t.Fatal("a new lease was minted instead of renewing the cached one")
	}
	if !cr.Expires.After(firstExpiry) {
		t.Fatalf("expiry %s not extended past %s", cr.Expires, firstExpiry)
	}
	if err := l.canLogin(cr); err != nil {
		t.Fatalf("psql with the renewed user: %v", err)
	}
	if n := vc.count("GET /v1/database/creds/app-ro"); n != 1 {
		t.Fatalf("%d leases minted, want 1", n)
	}
	cr.Release(context.Background())

	// Close revokes the cached lease.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := src.(Closer).Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if n := vc.count("PUT /v1/sys/leases/revoke/"); n != 1 {
		t.Fatalf("%d revocations at Close", n)
	}
	if err := l.canLogin(cr); err == nil {
		t.Fatal("the cached user still logs in after Close")
	}
	if n := l.leaseCount(t); n != 0 {
		t.Fatalf("%d leases after Close", n)
	}
}

func TestVaultDynamicErrors(t *testing.T) {
	l := newDBLab(t, "5m", "1h")
	v, _ := l.brokerConn(t)
	c := canary(t)
	l.put(t, "static", map[string]any{"api_key": c})

	t.Run("a read without a lease", func(t *testing.T) {
		_, err := dynSource(t, v, VaultDynamicOptions{Path: "secret/data/static"}).Credential(context.Background(), vaultCaller, broker.Grant{})
		be := vaultErrCode(t, err, broker.CodeCredentialUnavailable)
		if !strings.Contains(be.Message, "no lease") {
			t.Fatalf("message %q", be.Message)
		}
		assertNoCanary(t, c, err)
	})
	t.Run("a missing field gives the lease back", func(t *testing.T) {
		_, err := dynSource(t, v, VaultDynamicOptions{Fields: map[string]string{"password": "passwd"}}).Credential(context.Background(), vaultCaller, broker.Grant{})
		be := vaultErrCode(t, err, broker.CodeCredentialMalformed) // Vault answered without the key (F-03)
		if !strings.Contains(be.Message, `"passwd"`) || !strings.Contains(be.Message, "database/creds/app-ro") {
			t.Fatalf("message %q", be.Message)
		}
		deadline := time.Now().Add(5 * time.Second)
		for l.leaseCount(t) != 0 {
			if time.Now().After(deadline) {
				t.Fatal("the unusable lease was not revoked")
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	t.Run("a role the broker may not read", func(t *testing.T) {
		_, err := dynSource(t, v, VaultDynamicOptions{Path: "database/creds/admin"}).Credential(context.Background(), vaultCaller, broker.Grant{})
		be := vaultErrCode(t, err, broker.CodeCredentialUnavailable)
		if !strings.Contains(be.Message, "permission denied") {
			t.Fatalf("message %q", be.Message)
		}
	})
	t.Run("the full lease id never appears", func(t *testing.T) {
		cr, err := dynSource(t, v, VaultDynamicOptions{}).Credential(context.Background(), vaultCaller, broker.Grant{})
		if err != nil {
			t.Fatal(err)
		}
		defer cr.Release(context.Background())
		_, out, _ := l.Do("LIST", "sys/leases/lookup/database/creds/app-ro/", nil)
		full := out["data"].(map[string]any)["keys"].([]any)[0].(string)
		for k, m := range cr.Meta {
			if strings.Contains(m, full) {
				t.Fatalf("Meta %s holds the full lease id", k)
			}
		}
		if len(full) <= 8 || !strings.HasSuffix(cr.Meta["lease"], full[:8]) {
			t.Fatalf("lease prefix %q does not match lease %q...", cr.Meta["lease"], full[:8])
		}
	})
}

func TestLeasePrefix(t *testing.T) {
	for in, want := range map[string]string{
		"database/creds/app-ro/AbCdEfGhIjKlMnOpQrStUvWx": "database/creds/app-ro/AbCdEfGh",
		"aws/creds/ci/short":                             "aws/creds/ci/short",
		"nolease":                                        "nolease",
		"x/":                                             "x/",
	} {
		if got := LeasePrefix(in); got != want {
			t.Errorf("LeasePrefix(%q) = %q, want %q", in, got, want)
		}
	}
}
