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

// PostgreSQL helpers shared by the end-to-end tests and the L-11 load
// test (which has the load build tag; these have none).

// pgSetup runs each statement on pg as its superuser, directly (roles,
// databases: what the test arranges before the broker starts).
func pgSetup(t *testing.T, pg *testservers.Postgres, statements ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, pg.DSN(pg.User, pg.Password, "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(context.Background())
	for _, sql := range statements {
		if _, err := admin.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
}

// ordersDBConfig: a PostgreSQL listener (port "db") in front of the real
// server at 127.0.0.1:@PGPORT@, verify-full against @PGCA@, with the static
// credential in KG_PG_USER / KG_PG_PASSWORD; the rule lets
// process-attested workloads reach database orders only.
const ordersDBConfig = `
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
    upstream: "127.0.0.1:@PGPORT@"
    credential: orders-db
    tls: verify-full
    ca_bundle: "@PGCA@"
rules:
  - name: orders-local
    hosts: [127.0.0.1]
    when: 'request.protocol == "postgres" && request.database == "orders" && workload.method == "process"'
`

// ordersDB creates role, whose password is the harness canary, owning
// database orders on pg, and returns ordersDBConfig for pg. The broker
// gets the role through KG_PG_USER / KG_PG_PASSWORD.
func ordersDB(t *testing.T, h *harness, pg *testservers.Postgres, role string) string {
	t.Helper()
	pgSetup(t, pg,
		fmt.Sprintf(`CREATE ROLE %s LOGIN PASSWORD '%s'`, role, h.canary),
		fmt.Sprintf(`CREATE DATABASE orders OWNER %s`, role))
	return strings.NewReplacer("@PGPORT@", strconv.Itoa(pg.Port), "@PGCA@", pg.CAFile).Replace(ordersDBConfig)
}

// pgConnString is a libpq connection string to the broker's PostgreSQL
// listener on 127.0.0.1:port, verifying the broker's leaf for localhost
// against rootCert (the broker CA). It holds no password.
func pgConnString(port int, user, db, rootCert string) string {
	return fmt.Sprintf("host=localhost hostaddr=127.0.0.1 port=%d user=%s dbname=%s sslmode=verify-full sslrootcert=%s",
		port, user, db, rootCert)
}

// pgbenchFailedRE finds pgbench's count of failed transactions.
var pgbenchFailedRE = regexp.MustCompile(`number of failed transactions: (\d+)`)

// backendCounts are the most server backends seen at once on database
// orders: as the broker's role, and as any other.
type backendCounts struct{ jit, other int }

// watchBackends polls pg_stat_activity (as the superuser, directly) every
// interval until stop is called; stop returns the peaks. A monitor that
// cannot connect reports zeros, which fails any test wanting backends.
func watchBackends(pg *testservers.Postgres, role string, every time.Duration) (stop func() backendCounts) {
	ctx := context.Background()
	watch := make(chan backendCounts, 1)
	done := make(chan struct{})
	go func() {
		var s backendCounts
		defer func() { watch <- s }()
		mon, err := pgx.Connect(ctx, pg.DSN(pg.User, pg.Password, "postgres"))
		if err != nil {
			return
		}
		defer mon.Close(ctx)
		for {
			select {
			case <-done:
				return
			case <-time.After(every):
			}
			var j, o int
			if mon.QueryRow(ctx, `SELECT count(*) FILTER (WHERE usename = $1), count(*) FILTER (WHERE usename <> $1)
				FROM pg_stat_activity WHERE datname = 'orders'`, role).Scan(&j, &o) == nil {
				s.jit, s.other = max(s.jit, j), max(s.other, o)
			}
		}
	}()
	return func() backendCounts {
		close(done)
		return <-watch
	}
}
