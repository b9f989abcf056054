package dbproxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
)

// panicSource panics with v on every call: a bug in a source. It is not
// wrapped in inject.NewCache, whose fetcher contains source panics on its
// own: here the panic must reach the session's recover.
type panicSource struct {
	v     any
	calls atomic.Int64
}

func (p *panicSource) Credential(context.Context, broker.Identity, broker.Grant) (broker.Credential, error) {
	p.calls.Add(1)
	panic(p.v)
}

// releasePanics hands out a database credential whose Release panics
// with v (a lease revocation with a bug).
type releasePanics struct {
	v        any
	password string
	released atomic.Int64
}

func (r *releasePanics) Credential(context.Context, broker.Identity, broker.Grant) (broker.Credential, error) {
	return broker.Credential{Kind: "test", Fields: map[string]broker.Secret{
		broker.FieldUsername: broker.NewSecret("jit_user"), broker.FieldPassword: broker.NewSecret(r.password),
	}, Release: func(context.Context) {
		r.released.Add(1)
		panic(r.v)
	}}, nil
}

// sourceFunc adapts a function to broker.Source.
type sourceFunc func(ctx context.Context, id broker.Identity, g broker.Grant) (broker.Credential, error)

func (f sourceFunc) Credential(ctx context.Context, id broker.Identity, g broker.Grant) (broker.Credential, error) {
	return f(ctx, id, g)
}

// refusedAddr is a loopback address nothing listens on.
func refusedAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// logEntries returns the broker's log entries with message msg.
func (b *testBroker) logEntries(msg string) []map[string]any {
	var out []map[string]any
	for _, l := range strings.Split(b.logs.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// TestPGPanicValueNeverLogged (SECURITY-TESTS T-E5): a panic while a
// session is set up, or while its credential is released, is contained to
// that session; the log gets the panic's kind and a stack, the audit line
// a fixed cause, and neither ever gets the panic value, whatever its type
// (here it holds a canary, as a source's state could hold a secret that is
// not the session's credential and so escapes the credential redaction).
// The listener keeps serving.
func TestPGPanicValueNeverLogged(t *testing.T) {
	canary := canarytest.New("dbproxy panic value")
	values := []struct {
		name string
		v    any
		kind string
	}{
		{"error", fmt.Errorf("source state: token=%s", canary), "error"},
		{"string", "token=" + canary, "string"},
		{"struct", struct{ Token string }{canary}, "other"},
		{"wrapped error", fmt.Errorf("outer: %w", errors.New(canary)), "error"},
	}
	for _, tc := range values {
		t.Run("source panics with "+tc.name, func(t *testing.T) {
			src := &panicSource{v: tc.v}
			b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: refusedAddr(t), Credential: "orders-db", TLS: TLSDisable},
				sources: map[string]broker.Source{"orders-db": src}})
			for i := 1; i <= 2; i++ {
				_, err := pgxConnect(t, b.dsn("postgres", "app"))
				if err == nil {
					t.Fatalf("connection %d: a session whose credential source panicked was established", i)
				}
				if strings.Contains(err.Error(), canary) {
					t.Fatalf("connection %d: the client's error carries the panic value", i)
				}
				// The client is told, with a FATAL, not a dropped connection.
				var pgErr *pgconn.PgError
				if !errors.As(err, &pgErr) || pgErr.Code != sqlConnectionFailure || pgErr.Message != "keygate: internal error" {
					t.Fatalf("connection %d: client error %v, want FATAL %s keygate: internal error", i, err, sqlConnectionFailure)
				}
				a := b.waitAudit(t, i)[i-1]
				if want := broker.CodeInternal + ": keygate: internal error (panic)"; a["error"] != want || a["status"] != float64(500) {
					// The audit error is not printed: it may hold the canary.
					t.Fatalf("connection %d: audit error is not %q (status %v, carries the panic value: %v)",
						i, want, a["status"], strings.Contains(fmt.Sprint(a["error"]), canary))
				}
				p := b.logEntries("panic while handling a postgres session")
				if len(p) != i {
					t.Fatalf("connection %d: %d panic log entries, want %d", i, len(p), i)
				}
				if p[i-1]["panic_type"] != tc.kind || p[i-1]["request_id"] != a["request_id"] || p[i-1]["stack"] == "" || p[i-1]["stack"] == nil {
					t.Fatalf("connection %d: panic entry has panic_type %v request_id %v (audit %v), stack present %v",
						i, p[i-1]["panic_type"], p[i-1]["request_id"], a["request_id"], p[i-1]["stack"] != nil)
				}
			}
			if n := src.calls.Load(); n != 2 {
				t.Fatalf("%d source calls, want 2 (the listener must survive the first panic)", n)
			}
			if n := b.dialer.dials.Load(); n != 0 {
				t.Fatalf("%d upstream dials after a panic before the credential", n)
			}
			if strings.Contains(b.logs.String(), canary) {
				t.Fatal("the broker's log carries the panic value (label: dbproxy panic value)")
			}
		})
	}

	// A session already spliced to a real PostgreSQL keeps working while
	// another session on the same listener panics.
	t.Run("other sessions survive", func(t *testing.T) {
		pg := sharedPG(t)
		user, password := createRole(t, pg, "panic_ok", false)
		ok := staticDB("orders-db", user, password)
		var calls atomic.Int64
		src := sourceFunc(func(ctx context.Context, id broker.Identity, g broker.Grant) (broker.Credential, error) {
			if calls.Add(1) > 1 {
				panic(fmt.Errorf("second session: %s", canary))
			}
			return ok.Credential(ctx, id, g)
		})
		b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: upstreamOf(pg), Credential: "orders-db", TLS: TLSDisable},
			sources: map[string]broker.Source{"orders-db": src}})
		c, err := pgxConnect(t, b.dsn(user, "app"))
		if err != nil {
			t.Fatalf("first session: %v", err)
		}
		if got := queryString(t, c, "SELECT current_user::text"); got != user {
			t.Fatalf("first session runs as %q, want the credential's role", got)
		}
		if _, err := pgxConnect(t, b.dsn(user, "app")); err == nil {
			t.Fatal("the panicking session was established")
		}
		if got := queryString(t, c, "SELECT 'still here'"); got != "still here" {
			t.Fatalf("the first session after the panic: %q", got)
		}
		if n := len(b.logEntries("panic while handling a postgres session")); n != 1 {
			t.Fatalf("%d panic log entries, want 1", n)
		}
		if strings.Contains(b.logs.String(), canary) {
			t.Fatal("the broker's log carries the panic value (label: dbproxy panic value)")
		}
	})

	t.Run("Release panics", func(t *testing.T) {
		src := &releasePanics{v: fmt.Errorf("revoke failed: %s", canary), password: canarytest.New("dbproxy released password")}
		b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: refusedAddr(t), Credential: "orders-db", TLS: TLSDisable},
			sources: map[string]broker.Source{"orders-db": src}})
		if _, err := pgxConnect(t, b.dsn("postgres", "app")); err == nil {
			t.Fatal("a session to a refused upstream was established")
		}
		// The audit line comes after the Release: the panic did not stop it.
		a := b.waitAudit(t, 1)[0]
		if a["status"] == float64(200) || a["status"] == nil {
			t.Fatalf("audit status %v, want the upstream failure", a["status"])
		}
		if n := src.released.Load(); n != 1 {
			t.Fatalf("Release ran %d times, want 1", n)
		}
		p := b.logEntries("panic while releasing a credential")
		if len(p) != 1 || p[0]["panic_type"] != "error" || p[0]["request_id"] != a["request_id"] {
			t.Fatalf("%d release panic entries (want 1 with panic_type error and the audit's request_id)", len(p))
		}
		if strings.Contains(b.logs.String(), canary) {
			t.Fatal("the broker's log carries the panic value (label: dbproxy panic value)")
		}
		if n := b.dialer.dials.Load(); n != 1 {
			t.Fatalf("%d upstream dials, want 1", n)
		}
	})
}

// panicListener hands out connections whose Write panics with v once armed:
// a bug in the relay's server-to-client direction (the frame tracker writes
// there).
type panicListener struct {
	net.Listener
	armed atomic.Bool
	v     any
}

func (l *panicListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &panicConn{Conn: c, l: l}, nil
}

type panicConn struct {
	net.Conn
	l *panicListener
}

func (c *panicConn) Write(p []byte) (int, error) {
	if c.l.armed.Load() {
		panic(c.l.v)
	}
	return c.Conn.Write(p)
}

// TestPGRelayPanicContained: a panic in the running relay (after the
// session is established, inside the copy goroutines) ends only that
// session; the process survives, the panic's value is never logged, and the
// next session works.
func TestPGRelayPanicContained(t *testing.T) {
	canary := canarytest.New("dbproxy relay panic value")
	pg := sharedPG(t)
	jit, jitPW := createRole(t, pg, "jit_relay", false)
	pl := &panicListener{v: fmt.Errorf("relay state: %s", canary)}
	b := startBroker(t, brokerSpec{
		db:      Database{Name: "orders", Upstream: upstreamOf(pg), Credential: "orders-db", TLS: TLSDisable},
		sources: map[string]broker.Source{"orders-db": staticDB("orders-db", jit, jitPW)},
		wrap:    func(ln net.Listener) net.Listener { pl.Listener = ln; return pl },
	})
	c, err := pgxConnect(t, b.dsn("postgres", "app"))
	if err != nil {
		t.Fatal(err)
	}
	if got := queryString(t, c, "SELECT current_user"); got != jit {
		t.Fatalf("current_user = %q before the fault", got)
	}
	pl.armed.Store(true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var s string
	if err := c.QueryRow(ctx, "SELECT 'after'").Scan(&s); err == nil {
		t.Fatal("the query succeeded although the relay panicked")
	}
	pl.armed.Store(false)
	if p := b.logEntries("panic while relaying a postgres session"); len(p) != 1 || p[0]["panic_type"] != "error" || p[0]["stack"] == nil {
		t.Fatalf("%d relay panic log entries (want 1 with panic_type error and a stack)", len(p))
	}
	if strings.Contains(b.logs.String(), canary) {
		t.Fatal("the broker's log carries the panic value")
	}
	c2, err := pgxConnect(t, b.dsn("postgres", "app"))
	if err != nil {
		t.Fatalf("a new session after the relay panic: %v", err)
	}
	defer c2.Close(context.Background())
	if got := queryString(t, c2, "SELECT current_user"); got != jit {
		t.Fatalf("current_user = %q after the fault", got)
	}
}
