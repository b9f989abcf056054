package dbproxy

import (
	"context"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
)

// TestPGLeaseExpirySQLState (F-13, the wire-level half of
// TestPGSessionEndsAtLeaseExpiry, which checks psql's text): a pgx client
// running pg_sleep(60) on a 3 s lease gets the broker's FATAL with
// SQLSTATE 57P01 (admin_shutdown) within TTL + 2 s, the real server has no
// backend left for the JIT role, and the connection is closed.
func TestPGLeaseExpirySQLState(t *testing.T) {
	pg := sharedPG(t)
	jit, jitPW := createRole(t, pg, "jit_lease_code", false)
	const ttl = 3 * time.Second
	src := &recordingSource{src: staticDB("orders-db", jit, jitPW), expiresIn: ttl}
	b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: upstreamOf(pg), Credential: "orders-db", TLS: TLSDisable},
		sources: map[string]broker.Source{"orders-db": src}})
	start := time.Now()
	c, err := pgxConnect(t, b.dsn("app", "app"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = c.Exec(ctx, "SELECT pg_sleep(60)")
	elapsed := time.Since(start)
	pe := pgErr(t, err)
	if pe.Code != sqlAdminShutdown || pe.Severity != "FATAL" || pe.Message != msgLeaseExpired {
		t.Fatalf("got %s %s %q, want FATAL %s %q", pe.Severity, pe.Code, pe.Message, sqlAdminShutdown, msgLeaseExpired)
	}
	if elapsed < ttl || elapsed > ttl+2*time.Second {
		t.Fatalf("the session ended %v after connect; want within [%v, %v]", elapsed, ttl, ttl+2*time.Second)
	}
	assertNoBackend(t, pg, jit)
	if !c.IsClosed() {
		t.Fatal("the client connection is still open after the FATAL")
	}
	t.Logf("F-13: FATAL %s %v after connect (lease %v)", pe.Code, elapsed.Round(time.Millisecond), ttl)
}
