package integration

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/keygate/broker/internal/testservers"
)

// TestPostgresThroughBroker: the real broker binary in front of a real
// PostgreSQL 15 (TLS on, scram-sha-256), driven by the real psql and
// pgbench. The clients hold no password: psql names user postgres and
// still gets the role of the broker's credential, whose password is the
// harness canary (so every broker output and client transcript is swept
// for it at cleanup). pgbench initialises and runs a select-only load
// through the broker with no failed transaction, and every server backend
// it used runs as that role. A database the rule does not name is refused
// by the broker.
func TestPostgresThroughBroker(t *testing.T) {
	psqlBin := requireTool(t, "psql")
	pgbench := requireTool(t, "pgbench")
	h := newHarness(t)
	pg := testservers.StartPostgresWith(t, testservers.PostgresOptions{TLS: true})
	const role = "orders_jit"
	ctx := context.Background()
	admin, err := pgx.Connect(ctx, pg.DSN(pg.User, pg.Password, "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	for _, sql := range []string{
		fmt.Sprintf(`CREATE ROLE %s LOGIN PASSWORD '%s'`, role, h.canary),
		fmt.Sprintf(`CREATE DATABASE orders OWNER %s`, role),
	} {
		if _, err := admin.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}

	cfg := `
listen: {proxy: "{{.Proxy}}", admin: "{{.Admin}}"}
ca: {cert: "{{.CACert}}", key: "{{.CAKey}}"}
attestors:
  - {type: process}
egress: {allow_cidrs: [127.0.0.1/32]}
credentials:
  orders-db: {source: static, values: {username: env:KG_PG_USER, password: env:KG_PG_PASSWORD}, cache: 5m}
databases:
  - name: orders
    listen: "127.0.0.1:{{index .Ports "db"}}"
    upstream: "127.0.0.1:` + strconv.Itoa(pg.Port) + `"
    credential: orders-db
    tls: verify-full
    ca_bundle: "` + pg.CAFile + `"
rules:
  - name: orders-local
    hosts: [127.0.0.1]
    when: 'request.protocol == "postgres" && request.database == "orders" && workload.method == "process"'
`
	dbPort := portOf(freeAddr(t))
	b := h.start(brokerSpec{name: "postgres", config: cfg, env: []string{"KG_PG_USER=" + role, "KG_PG_PASSWORD=" + h.canary}},
		map[string]int{"db": mustAtoi(t, dbPort)})
	waitReadyz(t, b, testTimeout)
	conn := func(user, db string) string {
		return fmt.Sprintf("host=localhost hostaddr=127.0.0.1 port=%s user=%s dbname=%s sslmode=verify-full sslrootcert=%s",
			dbPort, user, db, h.caPEM())
	}
	// The workload's environment: no password anywhere.
	env := []string{"PGCONNECT_TIMEOUT=5", "PGAPPNAME=orders-e2e"}

	res := h.runTool(psqlBin, env, "", "-X", "-tA", "-d", conn("postgres", "orders"), "-c",
		"SELECT current_user || ' ' || current_database() || ' ' || (SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid())")
	if res.code != 0 || strings.TrimSpace(res.stdout) != role+" orders true" {
		t.Fatalf("psql: exit %d %q %s", res.code, res.stdout, redactCanary(res.stderr))
	}
	res = h.runTool(psqlBin, env, "", "-X", "-tA", "-d", conn("postgres", "postgres"), "-c", "SELECT 1")
	if res.code == 0 || !strings.Contains(res.stderr, `keygate: no rule allows user "postgres" on database "postgres"`) {
		t.Fatalf("another database: exit %d %q", res.code, res.stderr)
	}

	pgbenchEnv := append(env, "PGHOST=localhost", "PGHOSTADDR=127.0.0.1", "PGPORT="+dbPort, "PGUSER=app",
		"PGSSLMODE=verify-full", "PGSSLROOTCERT="+h.caPEM(), "PGDATABASE=orders")
	res = h.runTool(pgbench, pgbenchEnv, "", "-i", "-s", "1", "-q")
	if res.code != 0 {
		t.Fatalf("pgbench -i: exit %d %s", res.code, redactCanary(res.stderr))
	}
	// While the load runs, watch the server: every backend on orders must
	// run as the broker's role.
	type seen struct{ jit, other int }
	watch := make(chan seen, 1)
	stop := make(chan struct{})
	go func() {
		var s seen
		defer func() { watch <- s }()
		mon, err := pgx.Connect(ctx, pg.DSN(pg.User, pg.Password, "postgres"))
		if err != nil {
			return
		}
		defer mon.Close(ctx)
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			var j, o int
			if mon.QueryRow(ctx, `SELECT count(*) FILTER (WHERE usename = $1), count(*) FILTER (WHERE usename <> $1)
				FROM pg_stat_activity WHERE datname = 'orders'`, role).Scan(&j, &o) == nil {
				s.jit, s.other = max(s.jit, j), max(s.other, o)
			}
		}
	}()
	start := time.Now()
	res = h.runTool(pgbench, pgbenchEnv, "", "-S", "-n", "-c", "4", "-j", "2", "-T", "3")
	close(stop)
	w := <-watch
	if res.code != 0 {
		t.Fatalf("pgbench -S: exit %d %s", res.code, redactCanary(res.stderr))
	}
	m := regexp.MustCompile(`number of transactions actually processed: (\d+)`).FindStringSubmatch(res.stdout)
	failed := regexp.MustCompile(`number of failed transactions: (\d+)`).FindStringSubmatch(res.stdout)
	if m == nil || m[1] == "0" || (failed != nil && failed[1] != "0") {
		t.Fatalf("pgbench -S output:\n%s", res.stdout)
	}
	t.Logf("pgbench -S -c 4 -T 3 through the broker: %s transactions in %v", m[1], time.Since(start).Round(time.Millisecond))

	if w.jit < 4 || w.other != 0 {
		t.Fatalf("during the load: up to %d backends as the broker's role, %d as another; want 4 and 0", w.jit, w.other)
	}

	// One audit line per session, naming what the client asked for.
	out := string(b.output())
	if !strings.Contains(out, `"protocol":"postgres"`) || !strings.Contains(out, `"database":"orders","db_user":"postgres"`) ||
		!strings.Contains(out, `"listener":"db:orders"`) || !strings.Contains(out, `"workload.method":"process"`) {
		t.Fatalf("no postgres audit line in the broker output:\n%s", redactCanary(out))
	}
}

func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
