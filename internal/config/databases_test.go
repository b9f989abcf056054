package config

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/keygate/broker/internal/testservers"
)

// TestRuntimeDatabase builds and runs a config with databases: entries
// against a real PostgreSQL (TLS on): the entry's listener serves, the
// process attestor identifies the caller on TCP and on the Unix socket,
// the rules decide, the upstream leg is verify-full against the entry's
// ca_bundle, the client leg offers TLS with the broker CA, a reload swaps
// the rules, and /readyz is unaffected.
func TestRuntimeDatabase(t *testing.T) {
	pg := testservers.StartPostgresWith(t, testservers.PostgresOptions{TLS: true})
	ctx := context.Background()
	admin, err := pgx.Connect(ctx, pg.DSN(pg.User, pg.Password, "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	const role, rolePW = "orders_app", "orders-app-pw-8812"
	for _, sql := range []string{`CREATE DATABASE orders`, fmt.Sprintf(`CREATE ROLE %s LOGIN PASSWORD '%s'`, role, rolePW)} {
		if _, err := admin.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	admin.Close(ctx)
	t.Setenv("KG_DB_USER", role)
	t.Setenv("KG_DB_PASSWORD", rolePW)

	dir := t.TempDir()
	sock := filepath.Join(dir, "sock")
	if err := os.Mkdir(sock, 0o755); err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(pg.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, "pg-ca.pem", string(caPEM), 0o644)
	head := fmt.Sprintf(`listen: {proxy: 127.0.0.1:0, admin: 127.0.0.1:0}
ca: {ephemeral: true, cert_out: ca.pem}
attestors:
  - {type: process}
egress: {allow_cidrs: [127.0.0.1/32]}
credentials:
  orders-db: {source: static, values: {username: env:KG_DB_USER, password: env:KG_DB_PASSWORD}, cache: 5m}
databases:
  - {name: orders, listen: 127.0.0.1:0, upstream: "127.0.0.1:%[1]d", credential: orders-db, ca_bundle: pg-ca.pem}
  - {name: orders-sock, listen: "unix:sock/.s.PGSQL.5432", upstream: "127.0.0.1:%[1]d", credential: orders-db, ca_bundle: pg-ca.pem, server_tls: false}
rules:
`, pg.Port)
	allow := `  - name: orders-app
    hosts: [127.0.0.1]
    when: 'request.protocol == "postgres" && request.database == "orders" && workload.method == "process"'
`
	path := writeFile(t, dir, "keygate.yaml", head+allow, 0o644)
	s := start(t, path)
	if len(s.rt.DatabaseAddrs) != 2 {
		t.Fatalf("database listeners: %v", s.rt.DatabaseAddrs)
	}
	tcp := s.rt.DatabaseAddrs[0].String()
	host, port, _ := strings.Cut(tcp, ":")
	connect := func(dsn string) (*pgx.Conn, error) {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		return pgx.Connect(cctx, dsn)
	}
	for _, tt := range []struct{ name, dsn string }{
		{"TCP, client TLS verified against the broker CA", fmt.Sprintf("host=%s port=%s user=anyone dbname=orders sslmode=verify-full sslrootcert=%s", host, port, s.rt.CACertPath)},
		{"Unix socket", fmt.Sprintf("host=%s port=5432 user=anyone dbname=orders", sock)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := connect(tt.dsn)
			if err != nil {
				t.Fatalf("connect: %v\n%s", err, s.logs.String())
			}
			defer c.Close(ctx)
			var user string
			var ssl bool
			if err := c.QueryRow(ctx, `SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()`).Scan(&user, &ssl); err != nil {
				t.Fatal(err)
			}
			if user != role || !ssl {
				t.Fatalf("current_user %q, upstream ssl %v; want %s over verify-full TLS", user, ssl, role)
			}
		})
	}
	if code, _ := s.admin(t, "/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz = %d", code)
	}
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(s.logs.String(), `"listener":"db:orders-sock","workload.id"`); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			break
		}
	}
	logs := s.logs.String()
	if !strings.Contains(logs, `"listener":"db:orders-sock"`) || !strings.Contains(logs, `"workload.method":"process"`) || !strings.Contains(logs, `"database":"orders"`) {
		t.Fatalf("no audit line for the Unix socket session:\n%s", logs)
	}
	mustNotContain(t, "the broker's log", logs, rolePW)

	// A reload swaps the rules under the running listeners.
	writeFile(t, dir, "keygate.yaml", head+`  - name: orders-closed
    hosts: [127.0.0.1]
    action: deny
    when: 'request.protocol == "postgres"'
`, 0o644)
	if err := s.rt.Reload(); err != nil {
		t.Fatal(err)
	}
	_, err = connect(fmt.Sprintf("host=%s port=%s user=anyone dbname=orders sslmode=disable", host, port))
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "28000" || !strings.Contains(pe.Message, `denied by rule "orders-closed"`) {
		t.Fatalf("after reload: %v", err)
	}
}

// TestRuntimeDatabaseEgressGuard: the upstream is dialled through the
// egress guard, so a database on a private address needs allow_cidrs
// (validate says so for an IP literal; a name is refused at connect).
func TestRuntimeDatabaseEgressGuard(t *testing.T) {
	t.Setenv("KG_DB_USER", "u")
	t.Setenv("KG_DB_PASSWORD", "p")
	dir := t.TempDir()
	path := writeFile(t, dir, "keygate.yaml", `listen: {proxy: 127.0.0.1:0}
ca: {ephemeral: true}
attestors:
  - type: cidr
    identities: [{id: local, cidrs: [127.0.0.0/8]}]
credentials:
  db: {source: static, values: {username: env:KG_DB_USER, password: env:KG_DB_PASSWORD}}
databases:
  - {name: orders, listen: 127.0.0.1:0, upstream: "localhost:1", credential: db, tls: disable}
rules:
  - {name: db, hosts: [localhost], when: 'request.protocol == "postgres"'}
`, 0o644)
	s := start(t, path)
	cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, port, _ := strings.Cut(s.rt.DatabaseAddrs[0].String(), ":")
	_, err := pgx.Connect(cctx, fmt.Sprintf("host=127.0.0.1 port=%s user=app dbname=app sslmode=disable", port))
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "08006" || pe.Message != "keygate: the database address is refused by the egress policy" {
		t.Fatalf("got %v, want 08006 naming the egress policy", err)
	}
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(s.logs.String(), `"error":"egress_denied:`); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("audit line does not say egress_denied:\n%s", s.logs.String())
		}
	}
}
