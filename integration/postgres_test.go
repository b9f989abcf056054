package integration

import (
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

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
	cfg := ordersDB(t, h, pg, role)
	dbPort := atoiPort(t, freeAddr(t))
	b := h.start(brokerSpec{name: "postgres", config: cfg, env: []string{"KG_PG_USER=" + role, "KG_PG_PASSWORD=" + h.canary}},
		map[string]int{"db": dbPort})
	waitReadyz(t, b, testTimeout)
	conn := func(user, db string) string { return pgConnString(dbPort, user, db, h.caPEM()) }
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

	pgbenchEnv := append(env, "PGHOST=localhost", "PGHOSTADDR=127.0.0.1", "PGPORT="+strconv.Itoa(dbPort), "PGUSER=app",
		"PGSSLMODE=verify-full", "PGSSLROOTCERT="+h.caPEM(), "PGDATABASE=orders")
	res = h.runTool(pgbench, pgbenchEnv, "", "-i", "-s", "1", "-q")
	if res.code != 0 {
		t.Fatalf("pgbench -i: exit %d %s", res.code, redactCanary(res.stderr))
	}
	// While the load runs, watch the server: every backend on orders must
	// run as the broker's role.
	stopWatch := watchBackends(pg, role, 100*time.Millisecond)
	start := time.Now()
	res = h.runTool(pgbench, pgbenchEnv, "", "-S", "-n", "-c", "4", "-j", "2", "-T", "3")
	w := stopWatch()
	if res.code != 0 {
		t.Fatalf("pgbench -S: exit %d %s", res.code, redactCanary(res.stderr))
	}
	m := regexp.MustCompile(`number of transactions actually processed: (\d+)`).FindStringSubmatch(res.stdout)
	failed := pgbenchFailedRE.FindStringSubmatch(res.stdout)
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
