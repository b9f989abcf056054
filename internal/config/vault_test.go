package config

import (
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/testservers"
)

// Every vault key in its documented form builds in a dry run.
func TestVaultConfigFixture(t *testing.T) {
	path := stageFixture(t, "vault", fixtureSetup{bundle: "certs/vault-ca.pem"})
	c, err := LoadFile(path)
	if err != nil {
		t.Fatalf("LoadFile: %v", err)
	}
	if len(c.Vaults) != 5 || len(c.Credentials) != 6 {
		t.Fatalf("decoded %d vaults, %d credentials", len(c.Vaults), len(c.Credentials))
	}
	l := c.Vaults["legacy"]
	if l.Auth.JWTSVID == nil || l.Auth.JWTSVID.Audience != "vault" || time.Duration(l.Timeout) != 5*time.Second || l.Namespace != "team-a" {
		t.Errorf("legacy decoded as %+v", l)
	}
	if k := c.Credentials["team-key"]; k.Version != 3 || k.KVVersion != 2 {
		t.Errorf("team-key decoded as %+v", k)
	}
	if _, err := c.Policy(nil); err != nil {
		t.Fatalf("Policy: %v", err)
	}
	if _, err := build(t, c, BuildOptions{Logger: zap.NewNop(), DryRun: true}); err != nil {
		t.Fatalf("Build(DryRun): %v", err)
	}
}

// `broker validate` (a dry-run Build) and even a real Build never contact
// Vault: the login waits for Run or the first request.
func TestVaultConfigBuildsOffline(t *testing.T) {
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { calls.Add(1) }))
	defer srv.Close()
	dir := t.TempDir()
	cfg := minimalHead + fmt.Sprintf(`vaults:
  a: {address: %[1]q, auth: {method: approle, role_id_file: role, secret_id_file: secret}}
  b: {address: %[1]q, auth: {method: jwt, role: keygate, token_file: jwt}}
  c: {address: %[1]q, auth: {method: token_file, token_file: token}}
credentials:
  kv: {source: vault_kv, vault: a, path: secret/data/x, field: token, cache: 5m}
  tmpl: {source: vault_kv, vault: b, path: "secret/data/{{workload.claims.team}}"}
  db: {source: vault_dynamic, vault: c, path: database/creds/ro}
rules:
  - {name: kv, hosts: [a.example.com], inject: {credential: kv, as: bearer}}
  - {name: db, hosts: [b.example.com], inject: {credential: db, as: basic}}
`, srv.URL)
	path := writeFile(t, dir, "keygate.yaml", cfg, 0o644)
	if ps := loadAndBuild(t, path); len(ps) > 0 {
		t.Fatalf("validate: %v", ps)
	}
	c, err := LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	rt, err := build(t, c, BuildOptions{Logger: zap.NewNop()})
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	rt.closeListeners()
	if n := calls.Load(); n != 0 {
		t.Fatalf("building made %d Vault requests", n)
	}
}

// A broker built from a config file, against a real Vault whose database
// engine manages users in a real PostgreSQL: a KV API key and dynamic
// database users are injected, the one-shot lease is revoked when its
// request ends, a cached lease and the broker's own token are revoked at
// shutdown, and a stopped Vault is a 503 with nothing forwarded.
func TestRuntimeVault(t *testing.T) {
	vs := testservers.StartVault(t)
	pg := testservers.StartPostgres(t)
	apiKey := canarytest.New("config vault api key")
	vs.MustEventually("POST", "secret/data/app/github", map[string]any{"data": map[string]any{"token": apiKey}})
	vs.Must("POST", "sys/mounts/database", map[string]any{"type": "database"})
	vs.Must("POST", "database/config/pg", map[string]any{
		"plugin_name":             "postgresql-database-plugin",
		"connection_url":          fmt.Sprintf("postgresql://{{username}}:{{password}}@127.0.0.1:%d/postgres?sslmode=disable", pg.Port),
		"username":                pg.User,
		"password":                pg.Password,
		"allowed_roles":           "app-ro",
		"password_authentication": "scram-sha-256",
	})
	vs.Must("POST", "database/roles/app-ro", map[string]any{"db_name": "pg", "default_ttl": "5m", "max_ttl": "1h",
		"creation_statements": []string{`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`}})
	vs.Must("PUT", "sys/policies/acl/keygate", map[string]any{"policy": `
path "secret/data/app/*" { capabilities = ["read"] }
path "database/creds/app-ro" { capabilities = ["read"] }
path "sys/leases/renew/database/creds/app-ro/*" { capabilities = ["update"] }
path "sys/leases/revoke/database/creds/app-ro/*" { capabilities = ["update"] }
`})
	vs.Must("POST", "sys/auth/approle", map[string]any{"type": "approle"})
	vs.Must("POST", "auth/approle/role/keygate", map[string]any{"token_policies": []string{"keygate"}, "token_ttl": "1h"})
	roleID := vs.Must("GET", "auth/approle/role/keygate/role-id", nil)["data"].(map[string]any)["role_id"].(string)
	secretID := vs.Must("POST", "auth/approle/role/keygate/secret-id", nil)["data"].(map[string]any)["secret_id"].(string)

	var up upstreamLog
	upSrv := httptest.NewTLSServer(up.handler())
	defer upSrv.Close()
	dir := t.TempDir()
	writeCertPEM(t, dir, "trust/upstream.pem", upSrv.Certificate())
	writeFile(t, dir, "vault/role-id", roleID+"\n", 0o600)
	writeFile(t, dir, "vault/secret-id", secretID+"\n", 0o600)
	port := portOf(t, upSrv.URL)
	cfg := fmt.Sprintf(`listen:
  proxy: 127.0.0.1:0
  admin: 127.0.0.1:0
ca: {ephemeral: true, cert_out: ca.pem}
attestors:
  - type: cidr
    identities: [{id: local, cidrs: [127.0.0.0/8]}]
egress:
  allow_cidrs: [127.0.0.1/32]
  ca_bundle: trust/upstream.pem
vaults:
  legacy:
    address: %[1]s
    timeout: 2s
    auth: {method: approle, role_id_file: vault/role-id, secret_id_file: vault/secret-id}
credentials:
  github: {source: vault_kv, vault: legacy, path: secret/data/app/github, field: token, cache: 1m}
  db-once: {source: vault_dynamic, vault: legacy, path: database/creds/app-ro, cache: none}
  db-cached: {source: vault_dynamic, vault: legacy, path: database/creds/app-ro, cache: 10m}
rules:
  - {name: kv, hosts: [127.0.0.1], ports: [%[2]s], when: 'request.path == "/kv"', inject: {credential: github, as: bearer}}
  - {name: db-once, hosts: [127.0.0.1], ports: [%[2]s], when: 'request.path == "/db"', inject: {credential: db-once, as: basic}}
  - {name: db-cached, hosts: [127.0.0.1], ports: [%[2]s], when: 'request.path == "/dbc"', inject: {credential: db-cached, as: basic}}
`, vs.Addr, port)
	s := start(t, writeFile(t, dir, "keygate.yaml", cfg, 0o644))
	client := s.client(t)

	// Run logs in before any request: /readyz turns ready.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if code, _ := s.admin(t, "/readyz"); code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("/readyz not ready 10s after Run: the vault login did not happen")
		}
		time.Sleep(50 * time.Millisecond)
	}

	get := func(t *testing.T, path string) (int, string) {
		t.Helper()
		resp, err := client.Get(upSrv.URL + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		mustNotContain(t, "response", string(b), apiKey)
		return resp.StatusCode, resp.Header.Get("X-Keygate-Error")
	}
	basicUser := func(t *testing.T, path string) (user, pass string) {
		t.Helper()
		raw, _ := strings.CutPrefix(up.last(t, path).Header.Get("Authorization"), "Basic ")
		b, err := base64.StdEncoding.DecodeString(raw)
		if err != nil {
			t.Fatalf("upstream Authorization is not basic: %v", err)
		}
		user, pass, _ = strings.Cut(string(b), ":")
		return user, pass
	}
	loginFailsSoon := func(t *testing.T, user, pass string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			_, err := pg.PSQL(user, pass, "SELECT 1")
			if err != nil && strings.Contains(err.Error(), "password authentication failed") {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s still logs in 5s after its lease should have been revoked (%v)", user, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}

	t.Run("KV API key as bearer", func(t *testing.T) {
		if code, e := get(t, "/kv"); code != 200 {
			t.Fatalf("status %d %s", code, e)
		}
		if got := up.last(t, "/kv").Header.Get("Authorization"); got != "Bearer "+apiKey {
			t.Fatal("upstream did not receive the Vault secret")
		}
		logs := s.logs.String()
		if !strings.Contains(logs, `"credential.vault_path":"secret/data/app/github"`) {
			t.Errorf("the audit line lacks credential.vault_path:\n%s", logs)
		}
	})

	t.Run("one-shot lease revoked when the request ends", func(t *testing.T) {
		if code, e := get(t, "/db"); code != 200 {
			t.Fatalf("status %d %s", code, e)
		}
		user, pass := basicUser(t, "/db")
		if !strings.HasPrefix(user, "v-") {
			t.Fatalf("user %q is not a Vault dynamic user", user)
		}
		loginFailsSoon(t, user, pass)
		if !strings.Contains(s.logs.String(), `"credential.lease":"database/creds/app-ro/`) {
			t.Error("the audit line lacks credential.lease")
		}
	})

	var cachedUser, cachedPass string
	t.Run("cached lease shared", func(t *testing.T) {
		get(t, "/dbc")
		cachedUser, cachedPass = basicUser(t, "/dbc")
		get(t, "/dbc")
		if u, _ := basicUser(t, "/dbc"); u != cachedUser {
			t.Fatal("a cached lease was not reused")
		}
		if _, err := pg.PSQL(cachedUser, cachedPass, "SELECT 1"); err != nil {
			t.Fatalf("the cached user cannot log in: %v", err)
		}
	})

	t.Run("shutdown revokes the cached lease", func(t *testing.T) {
		s.stop(t)
		loginFailsSoon(t, cachedUser, cachedPass)
		code, out, err := vs.Do("LIST", "sys/leases/lookup/database/creds/app-ro/", nil)
		if err != nil || (code != 404 && len(out["data"].(map[string]any)["keys"].([]any)) != 0) {
			t.Fatalf("leases left after shutdown: HTTP %d %v %v", code, out, err)
		}
	})

	t.Run("vault down: not ready, 503, nothing forwarded", func(t *testing.T) {
		vs.Stop()
		s2 := start(t, writeFile(t, dir, "keygate.yaml", cfg, 0o644))
		client = s2.client(t)
		before := up.count("/db")
		begin := time.Now()
		code, e := get(t, "/db")
		if code != 503 || e != "credential_unavailable" {
			t.Fatalf("status %d %s, want 503 credential_unavailable", code, e)
		}
		if d := time.Since(begin); d > 3*time.Second {
			t.Fatalf("took %s", d)
		}
		if up.count("/db") != before {
			t.Fatal("the upstream received a request without a credential")
		}
		if code, _ := s2.admin(t, "/readyz"); code == 200 {
			t.Fatal("/readyz is ready without a Vault token")
		}
		mustNotContain(t, "logs", s2.logs.String(), secretID)
		mustNotContain(t, "logs", s.logs.String(), secretID)
		mustNotContain(t, "logs", s.logs.String(), apiKey)
	})
}

// A reload rebuilds vault credentials on the running connections; adding a
// vault needs a restart (the reload is refused, the old config serves on).
func TestVaultConfigReload(t *testing.T) {
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { calls.Add(1) }))
	defer srv.Close()
	dir := t.TempDir()
	head := minimalHead + fmt.Sprintf(`vaults:
  a: {address: %q, auth: {method: token_file, token_file: token}}
`, srv.URL)
	path := writeFile(t, dir, "keygate.yaml", head+`credentials:
  kv: {source: vault_kv, vault: a, path: secret/data/x, field: token, cache: 5m}
`, 0o644)
	c, err := LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	rt, err := build(t, c, BuildOptions{Logger: zap.NewNop()})
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	defer rt.closeListeners()
	writeFile(t, dir, "keygate.yaml", head+`credentials:
  kv: {source: vault_kv, vault: a, path: secret/data/x, field: token, cache: 5m}
  db: {source: vault_dynamic, vault: a, path: database/creds/ro}
`, 0o644)
	if err := rt.Reload(); err != nil {
		t.Fatalf("Reload adding a vault credential: %v", err)
	}
	if n := len(rt.reload.closers); n != 2 {
		t.Fatalf("%d closable sources after reload, want 2", n)
	}
	writeFile(t, dir, "keygate.yaml", head+fmt.Sprintf(`  b: {address: %q, auth: {method: token_file, token_file: token}}
credentials:
  kv: {source: vault_kv, vault: b, path: secret/data/x, field: token}
`, srv.URL), 0o644)
	err = rt.Reload()
	if err == nil || !strings.Contains(err.Error(), `vault "b" is not running`) {
		t.Fatalf("Reload adding a vault: %v", err)
	}
	if n := calls.Load(); n != 0 {
		t.Fatalf("%d Vault requests", n)
	}
}
