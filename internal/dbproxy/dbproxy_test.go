package dbproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/keygate/broker/internal/attest"
	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/rules"
	"github.com/keygate/broker/internal/testservers"
)

var clientCanary = canarytest.New("dbproxy client password")

func upstreamOf(pg *testservers.Postgres) string { return fmt.Sprintf("127.0.0.1:%d", pg.Port) }

func pgErr(t testing.TB, err error) *pgconn.PgError {
	t.Helper()
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		t.Fatalf("want a PostgreSQL error from the broker, got %v", err)
	}
	return pe
}

// TestPGStartupRewritten (T-F3): the client's startup picks nothing that
// matters. Whatever user it names, and whatever password, options or
// replication it sends, the real server sees the rule's credential; the
// database is the one the rule allowed.
func TestPGStartupRewritten(t *testing.T) {
	pg := sharedPG(t)
	jit, jitPW := createRole(t, pg, "jit_app", false)
	src := &recordingSource{src: staticDB("orders-db", jit, jitPW)}
	sources := map[string]broker.Source{"orders-db": src}
	b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: upstreamOf(pg), Credential: "orders-db", TLS: TLSDisable}, sources: sources})

	t.Run("pgx as postgres with a password and options", func(t *testing.T) {
		cfg, err := pgx.ParseConfig(b.dsn("postgres", "app", "password="+clientCanary, "application_name=billing",
			`options='-c search_path=evil'`))
		if err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		var notices []string
		cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
			mu.Lock()
			notices = append(notices, n.Message)
			mu.Unlock()
		}
		c, err := pgx.ConnectConfig(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close(context.Background())
		for sql, want := range map[string]string{
			"SELECT current_user":                        jit,
			"SELECT session_user":                        jit,
			"SELECT current_database()":                  "app",
			"SELECT current_setting('application_name')": "billing",
			"SHOW search_path":                           `"$user", public`,
		} {
			if got := queryString(t, c, sql); got != want {
				t.Errorf("%s = %q, want %q", sql, got, want)
			}
		}
		mu.Lock()
		defer mu.Unlock()
		if len(notices) != 1 || !strings.Contains(notices[0], "options") {
			t.Errorf("notices %q, want one naming the removed options", notices)
		}
	})

	t.Run("psql as postgres with PGPASSWORD", func(t *testing.T) {
		out, stderr, err := psql(t, pg, b.dsn("postgres", "app"), []string{"PGPASSWORD=" + clientCanary}, "-c", "SELECT current_user")
		if err != nil || out != jit {
			t.Fatalf("psql: %q, %v: %s", out, err, stderr)
		}
	})

	t.Run("replication is refused", func(t *testing.T) {
		_, err := pgxConnect(t, b.dsn("postgres", "app", "replication=database"))
		if pe := pgErr(t, err); pe.Code != "28000" || !strings.Contains(pe.Message, "replication") {
			t.Fatalf("got %s %q, want 28000 naming replication", pe.Code, pe.Message)
		}
	})

	t.Run("allow_options forwards options", func(t *testing.T) {
		b2 := startBroker(t, brokerSpec{db: Database{Name: "orders-opts", Upstream: upstreamOf(pg), Credential: "orders-db",
			TLS: TLSDisable, AllowOptions: true}, sources: sources})
		c, err := pgxConnect(t, b2.dsn("postgres", "app", `options='-c search_path=evil'`))
		if err != nil {
			t.Fatal(err)
		}
		if got := queryString(t, c, "SHOW search_path"); got != "evil" {
			t.Fatalf("search_path = %q, want the client's evil", got)
		}
	})

	// The audit line of the first session: who, what they asked, which
	// credential, never a value.
	lines := b.waitAudit(t, 3)
	a := lines[0]
	for k, want := range map[string]any{
		"protocol": "postgres", "listener": "db:orders", "database": "app", "db_user": "postgres",
		"rule": "app-db", "decision": "allow", "credential.name": "orders-db", "credential.kind": "static",
		"workload.id": "local-app", "host": "127.0.0.1", "port": float64(pg.Port), "status": float64(200),
	} {
		if a[k] != want {
			t.Errorf("audit %s = %v, want %v", k, a[k], want)
		}
	}
	if fp, _ := a["credential.fingerprint"].(string); len(fp) != 16 {
		t.Errorf("audit fingerprint %q", fp)
	}
	if in, _ := a["bytes_in"].(float64); in == 0 {
		t.Errorf("audit bytes_in = 0: the queries were not counted")
	}
	if out, _ := a["bytes_out"].(float64); out == 0 {
		t.Errorf("audit bytes_out = 0")
	}
	if l := b.logs.String(); strings.Contains(l, jitPW) || strings.Contains(l, clientCanary) {
		t.Fatal("a password is in the broker's log")
	}
}

// TestPGRefusedBeforeUpstream: a session the rules do not allow is refused
// with 28000 before any upstream connection or credential fetch.
func TestPGRefusedBeforeUpstream(t *testing.T) {
	pg := sharedPG(t)
	src := &recordingSource{src: staticDB("orders-db", "never", "never")}
	host := "127.0.0.1"
	rs := append([]rules.Spec{{Name: "no-admin", Hosts: []string{host}, Action: rules.ActionDeny,
		When: `request.database == "admin"`},
		// A CIDR caller has no claims: evaluating this rule fails (F-11).
		{Name: "broken", Hosts: []string{host}, Action: rules.ActionDeny,
			When: `request.database == "broken" && workload.claims.team == "x"`}}, allowApp(host)...)
	db := Database{Name: "orders", Upstream: upstreamOf(pg), Credential: "orders-db", TLS: TLSDisable}
	b := startBroker(t, brokerSpec{db: db, rules: rs, sources: map[string]broker.Source{"orders-db": src}})
	strangers, err := attest.NewCIDR([]attest.CIDREntry{{ID: "elsewhere", CIDRs: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}}})
	if err != nil {
		t.Fatal(err)
	}
	anon := startBroker(t, brokerSpec{db: db, rules: rs, sources: map[string]broker.Source{"orders-db": src},
		attestor: attest.NewChain(nil, attest.Named{Name: "cidr", Attestor: strangers})})

	tests := []struct {
		name     string
		b        *testBroker
		database string
		want     string
	}{
		{"wrong database", b, "postgres", `keygate: no rule allows user "app" on database "postgres"`},
		{"deny rule", b, "admin", `keygate: user "app" on database "admin" denied by rule "no-admin"`},
		{"rule error", b, "broken", `keygate: rule_error: rule "broken" could not be evaluated for user "app" on database "broken"`},
		{"unattested caller", anon, "app", "keygate: caller could not be attested"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := pgxConnect(t, tt.b.dsn("app", tt.database))
			pe := pgErr(t, err)
			if pe.Code != "28000" || pe.Message != tt.want || pe.Severity != "FATAL" {
				t.Fatalf("got %s %s %q, want FATAL 28000 %q", pe.Severity, pe.Code, pe.Message, tt.want)
			}
			if !strings.HasPrefix(pe.Detail, "keygate request_id ") {
				t.Errorf("detail %q carries no request id", pe.Detail)
			}
			if n := tt.b.dialer.dials.Load(); n != 0 {
				t.Fatalf("%d upstream connections for a refused session", n)
			}
		})
	}
	if len(src.got) != 0 {
		t.Fatal("a credential was fetched for a refused session")
	}
	a := b.waitAudit(t, 2)
	if a[0]["decision"] != "deny" || a[1]["rule"] != "no-admin" || a[1]["status"] != float64(403) {
		t.Fatalf("audit lines %v", a)
	}
}

// TestPGClientPasswordNeverForwarded: the startup the server receives is
// built by the broker. fakePG is used because the point is the exact
// bytes the server is sent, which a real server does not show.
func TestPGClientPasswordNeverForwarded(t *testing.T) {
	f := startFakePG(t, nil)
	src := staticDB("orders-db", "jit_user", "jit-password-1")
	b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: f.addr(), Credential: "orders-db", TLS: TLSDisable},
		sources: map[string]broker.Source{"orders-db": src}})

	c := rawDial(t, b.addr)
	start := &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: map[string]string{
		"user": "postgres", "database": "app", "password": clientCanary, "PassWord": clientCanary,
		"options": "-c role=postgres", "replication": "off", "application_name": "app1", "_pq_.compression": "on",
	}}
	if _, err := c.Write(encodeFrontend(t, start)); err != nil {
		t.Fatal(err)
	}
	fe := pgproto3.NewFrontend(c, c)
	var got []string
	var key *pgproto3.BackendKeyData
	for {
		msg, err := fe.Receive()
		if err != nil {
			t.Fatalf("after %v: %v", got, err)
		}
		got = append(got, fmt.Sprintf("%T", msg))
		if k, ok := msg.(*pgproto3.BackendKeyData); ok {
			key = &pgproto3.BackendKeyData{ProcessID: k.ProcessID, SecretKey: bytes.Clone(k.SecretKey)}
		}
		if n, ok := msg.(*pgproto3.NoticeResponse); ok && (!strings.Contains(n.Message, "password") || !strings.Contains(n.Message, "options")) {
			t.Errorf("notice %q does not name what was removed", n.Message)
		}
		if _, ok := msg.(*pgproto3.ReadyForQuery); ok {
			break
		}
	}
	want := []string{"*pgproto3.NegotiateProtocolVersion", "*pgproto3.AuthenticationOk", "*pgproto3.ParameterStatus",
		"*pgproto3.NoticeResponse", "*pgproto3.BackendKeyData", "*pgproto3.ReadyForQuery"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("client saw %v, want %v", got, want)
	}
	if key == nil || key.ProcessID == 4242 || bytes.Equal(key.SecretKey, []byte{1, 2, 3, 4}) {
		t.Fatalf("the client got the server's own cancel key %+v", key)
	}

	// psql too: it is never asked for its password, so never sends it.
	pg := sharedPG(t)
	if out, stderr, err := psql(t, pg, b.dsn("postgres", "app"), []string{"PGPASSWORD=" + clientCanary}, "-c", "SELECT 1"); err != nil {
		t.Fatalf("psql through the broker to the fake: %q %v %s", out, err, stderr)
	}

	starts := f.startups()
	if len(starts) != 2 {
		t.Fatalf("the server saw %d startups, want 2", len(starts))
	}
	for i, s := range starts {
		if s["user"] != "jit_user" || s["database"] != "app" {
			t.Errorf("startup %d: user %q database %q, want the credential's user on app", i, s["user"], s["database"])
		}
		for k := range s {
			switch strings.ToLower(k) {
			case "password", "options", "replication", "_pq_.compression":
				t.Errorf("startup %d carries %s", i, k)
			}
		}
	}
	if starts[0]["application_name"] != "app1" {
		t.Errorf("application_name = %q, want it passed through", starts[0]["application_name"])
	}
	if bytes.Contains(f.received(), []byte(clientCanary)) {
		t.Fatal("the client's password reached the server")
	}
}

// TestPGSSLRequest (T-F2): the client-side TLS negotiation.
func TestPGSSLRequest(t *testing.T) {
	pg := sharedPG(t)
	jit, jitPW := createRole(t, pg, "jit_ssl", false)
	sources := map[string]broker.Source{"orders-db": staticDB("orders-db", jit, jitPW)}
	db := Database{Name: "orders", Upstream: upstreamOf(pg), Credential: "orders-db", TLS: TLSDisable}
	plain := startBroker(t, brokerSpec{db: db, sources: sources})
	withTLS := startBroker(t, brokerSpec{db: db, sources: sources, clientTLS: true})

	startup := encodeFrontend(t, &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{"user": "app", "database": "app"}})
	ssl := encodeFrontend(t, &pgproto3.SSLRequest{})
	gss := encodeFrontend(t, &pgproto3.GSSEncRequest{})

	// Stuffed or pipelined bytes: the connection is closed without an
	// answer and nothing is dialled (CVE-2021-23214).
	for _, tt := range []struct {
		name  string
		b     *testBroker
		bytes []byte
	}{
		{"SSLRequest then a startup in one segment, TLS offered", withTLS, append(ssl, startup...)},
		{"SSLRequest then a startup in one segment, no TLS", plain, append(ssl, startup...)},
		{"GSSENCRequest then a startup in one segment", plain, append(gss, startup...)},
		{"startup then a query in one segment", plain, append(startup, encodeFrontend(t, &pgproto3.Query{String: "SELECT 1"})...)},
		{"startup repeating a parameter", plain, []byte("\x00\x00\x00\x2d\x00\x03\x00\x00user\x00app\x00user\x00postgres\x00database\x00app\x00\x00")},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before := tt.b.dialer.dials.Load()
			c := rawDial(t, tt.b.addr)
			if _, err := c.Write(tt.bytes); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(c)
			if err != nil || len(got) != 0 {
				t.Fatalf("broker answered %q (%v); want the connection closed without an answer", got, err)
			}
			if tt.b.dialer.dials.Load() != before {
				t.Fatal("the broker dialled upstream")
			}
		})
	}

	t.Run("GSSENCRequest is answered N, then the session works", func(t *testing.T) {
		c := rawDial(t, plain.addr)
		_, _ = c.Write(gss)
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'N' {
			t.Fatalf("answer %q, %v", b, err)
		}
		_, _ = c.Write(startup)
		fe := pgproto3.NewFrontend(c, c)
		for {
			msg, err := fe.Receive()
			if err != nil {
				t.Fatal(err)
			}
			if e, ok := msg.(*pgproto3.ErrorResponse); ok {
				t.Fatalf("error %s %s", e.Code, e.Message)
			}
			if _, ok := msg.(*pgproto3.ReadyForQuery); ok {
				break
			}
		}
	})

	tests := []struct {
		name    string
		b       *testBroker
		conn    string
		wantErr string // "" = SELECT current_user works
	}{
		{"sslmode=prefer, broker answers N", plain, plain.dsn("app", "app", "sslmode=prefer"), ""},
		{"sslmode=require, broker answers N", plain, plain.dsn("app", "app", "sslmode=require"), "server does not support SSL"},
		{"sslmode=prefer, broker offers TLS", withTLS, withTLS.dsn("app", "app", "sslmode=prefer"), ""},
		{"sslmode=verify-full against the broker CA", withTLS,
			fmt.Sprintf("host=localhost hostaddr=127.0.0.1 port=%d user=app dbname=app sslmode=verify-full sslrootcert=%s", withTLS.port, withTLS.caFile), ""},
		{"sslmode=verify-full without the broker CA", withTLS,
			fmt.Sprintf("host=localhost hostaddr=127.0.0.1 port=%d user=app dbname=app sslmode=verify-full sslrootcert=%s", withTLS.port, pg.CAFile), "certificate verify failed"},
	}
	for _, tt := range tests {
		t.Run("psql "+tt.name, func(t *testing.T) {
			out, stderr, err := psql(t, pg, tt.conn, nil, "-c", "SELECT current_user || ' ' || coalesce((SELECT 'ssl='||ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()), '')")
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(stderr, tt.wantErr) {
					t.Fatalf("psql: %q %v %s; want failure %q", out, err, stderr, tt.wantErr)
				}
				return
			}
			if err != nil || out != jit+" ssl=false" {
				t.Fatalf("psql: %q %v %s; want %q (upstream leg tls: disable)", out, err, stderr, jit+" ssl=false")
			}
		})
	}
}

// TestPGUpstreamVerifyFull (T-F2): verify-full refuses a server whose
// certificate does not name it, and then sends nothing after the
// SSLRequest: no startup, no password.
func TestPGUpstreamVerifyFull(t *testing.T) {
	// A real server whose certificate names another host.
	wrong := testservers.StartPostgresWith(t, testservers.PostgresOptions{TLS: true, CertHosts: []string{"wrong.example"}})
	jit, jitPW := createRoleOn(t, wrong, "jit_tls")
	sources := map[string]broker.Source{"orders-db": staticDB("orders-db", jit, jitPW)}
	roots := poolFromFile(t, wrong.CAFile)

	t.Run("real server, certificate for another name", func(t *testing.T) {
		b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: upstreamOf(wrong), Credential: "orders-db",
			TLS: TLSVerifyFull, RootCAs: roots}, sources: sources})
		_, err := pgxConnect(t, b.dsn("app", "app"))
		pe := pgErr(t, err)
		if pe.Code != "08006" || pe.Message != "keygate: the database's TLS certificate did not verify" {
			t.Fatalf("got %s %q", pe.Code, pe.Message)
		}
		time.Sleep(200 * time.Millisecond) // the server logs the aborted handshake
		log := wrong.Log()
		if strings.Contains(log, "user="+jit) {
			t.Fatalf("the server saw a startup for %s:\n%s", jit, log)
		}
		if !strings.Contains(log, "could not accept SSL connection") {
			t.Fatalf("the server log shows no aborted TLS handshake:\n%s", log)
		}
	})

	t.Run("real server, the certificate's name configured", func(t *testing.T) {
		b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: upstreamOf(wrong), Credential: "orders-db",
			TLS: TLSVerifyFull, RootCAs: roots, ServerName: "wrong.example"}, sources: sources})
		c, err := pgxConnect(t, b.dsn("app", "app"))
		if err != nil {
			t.Fatal(err)
		}
		if got := queryString(t, c, "SELECT current_user || ' ' || ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"); got != jit+" true" {
			t.Fatalf("got %q", got)
		}
	})

	// fakePG: it records every byte it is sent, which a real server cannot
	// show, and can answer 'N' or stuff bytes after 'S', which a real one
	// will not.
	goodCfg, goodRoots := leafFor(t, "127.0.0.1")
	badCfg, badRoots := leafFor(t, "wrong.example")
	sslRequest := encodeFrontend(t, &pgproto3.SSLRequest{})
	for _, tt := range []struct {
		name   string
		fake   *fakePG
		mode   TLSMode
		wantOK bool
		want   string
	}{
		{"certificate for another name", startFakePG(t, badCfg), TLSVerifyFull, false, "keygate: the database's TLS certificate did not verify"},
		{"server answers N", startFakePG(t, nil), TLSVerifyFull, false, "keygate: the database does not offer TLS, which this listener requires"},
		{"server answers N, tls: require", startFakePG(t, nil), TLSRequire, false, "keygate: the database does not offer TLS, which this listener requires"},
		{"bytes stuffed after S", func() *fakePG {
			f := startFakePG(t, goodCfg)
			f.stuff = []byte("\x00\x00\x00\x08R\x00\x00\x00\x00")
			return f
		}(), TLSVerifyFull, false, "keygate: TLS with the database failed"},
		{"control: a good certificate", startFakePG(t, goodCfg), TLSVerifyFull, true, ""},
	} {
		t.Run("fake server, "+tt.name, func(t *testing.T) {
			pool := goodRoots
			if tt.name == "certificate for another name" {
				pool = badRoots
			}
			b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: tt.fake.addr(), Credential: "orders-db",
				TLS: tt.mode, RootCAs: pool}, sources: sources})
			_, err := pgxConnect(t, b.dsn("app", "app"))
			if tt.wantOK {
				if err != nil {
					t.Fatal(err)
				}
				if len(tt.fake.startups()) != 1 {
					t.Fatal("the control server saw no startup: the recording does not work")
				}
				return
			}
			pe := pgErr(t, err)
			if pe.Code != "08006" || pe.Message != tt.want {
				t.Fatalf("got %s %q, want 08006 %q", pe.Code, pe.Message, tt.want)
			}
			if got := tt.fake.received(); !bytes.Equal(got, sslRequest) {
				t.Fatalf("the server received %q; want only the SSLRequest", got)
			}
		})
	}
}

// createRoleOn makes a scram login role on another cluster.
func createRoleOn(t testing.TB, pg *testservers.Postgres, prefix string) (string, string) {
	t.Helper()
	user, pw := prefix+"_"+randomHex(t, 4), canarytest.New("dbproxy role password ("+prefix+")")
	a := adminConn(t, pg)
	defer a.Close(context.Background())
	mustExec(t, a, `CREATE DATABASE app`)
	mustExec(t, a, fmt.Sprintf(`CREATE ROLE %s LOGIN PASSWORD '%s'`, user, pw))
	return user, pw
}

// TestPGAuthMethods: the broker authenticates upstream with SCRAM-SHA-256,
// SCRAM-SHA-256-PLUS (channel binding) whenever the leg is TLS, MD5, and a
// cleartext password only over verify-full TLS — against the real server,
// whose pg_hba.conf picks the method per user.
func TestPGAuthMethods(t *testing.T) {
	pg := sharedPG(t)
	scramUser, scramPW := createRole(t, pg, "jit_scram", false)
	roots := poolFromFile(t, pg.CAFile)
	tests := []struct {
		name     string
		user, pw string
		mode     TLSMode
		wantAuth string // "" = refused
	}{
		{"scram without TLS", scramUser, scramPW, TLSDisable, "scram-sha-256"},
		{"scram-plus over verify-full", scramUser, scramPW, TLSVerifyFull, "scram-sha-256-plus"},
		{"scram-plus over require", scramUser, scramPW, TLSRequire, "scram-sha-256-plus"},
		{"md5 without TLS", "md5user", "", TLSDisable, "md5"},
		{"md5 over verify-full", "md5user", "", TLSVerifyFull, "md5"},
		{"cleartext over verify-full", "pwuser", "", TLSVerifyFull, "password"},
		{"cleartext refused without TLS", "pwuser", "", TLSDisable, ""},
		{"cleartext refused over require", "pwuser", "", TLSRequire, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pw := tt.pw
			switch tt.user {
			case "md5user":
				pw = shared.md5PW
			case "pwuser":
				pw = shared.pwPW
			}
			b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: upstreamOf(pg), Credential: "orders-db",
				TLS: tt.mode, RootCAs: roots}, sources: map[string]broker.Source{"orders-db": staticDB("orders-db", tt.user, pw)}})
			authorized := strings.Count(pg.Log(), "connection authorized: user="+tt.user)
			c, err := pgxConnect(t, b.dsn("app", "app"))
			if tt.wantAuth == "" {
				pe := pgErr(t, err)
				if pe.Code != "08006" || strings.Contains(pe.Message, pw) {
					t.Fatalf("got %s %q", pe.Code, pe.Message)
				}
				if e, _ := b.waitAudit(t, 1)[0]["error"].(string); !strings.Contains(e, "sent only over verify-full TLS") {
					t.Fatalf("the audit line does not say why:\n%s", b.logs.String())
				}
				time.Sleep(100 * time.Millisecond)
				if n := strings.Count(pg.Log(), "connection authorized: user="+tt.user); n != authorized {
					t.Fatal("the server authorized a session: the password was sent")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			wantSSL := fmt.Sprint(tt.mode != TLSDisable)
			if got := queryString(t, c, "SELECT current_user || ' ' || ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"); got != tt.user+" "+wantSSL {
				t.Fatalf("got %q, want %q", got, tt.user+" "+wantSSL)
			}
			if !strings.Contains(b.logs.String(), `"auth":"`+tt.wantAuth+`"`) {
				t.Fatalf("upstream authentication was not %s:\n%s", tt.wantAuth, b.logs.String())
			}
		})
	}
}

// TestPGErrorSanitized (T-F4): the server's refusals reach the client as
// a SQLSTATE and a broker-written message; the credential's username and
// password are in neither, nor in the audit line.
func TestPGErrorSanitized(t *testing.T) {
	pg := sharedPG(t)
	jit, jitPW := createRole(t, pg, "jit_err", false)
	nologin, nologinPW := createRole(t, pg, "jit_nologin", false)
	a := adminConn(t, pg)
	mustExec(t, a, "ALTER ROLE "+nologin+" NOLOGIN")
	a.Close(context.Background())
	rs := []rules.Spec{{Name: "any-db", Hosts: []string{"127.0.0.1"}, When: `workload.id == "local-app"`}}
	tests := []struct {
		name      string
		user, pw  string
		database  string
		wantCode  string
		wantMsg   string
		auditCode string
	}{
		{"wrong password", jit, "not-" + jitPW, "app", "08006", "keygate: the database refused the broker's credential", "28P01"},
		{"role may not log in", nologin, nologinPW, "app", "08006", "keygate: the database refused the broker's credential", "28000"},
		{"no such database", jit, jitPW, "nosuchdb", "3D000", `database "nosuchdb" does not exist`, "3D000"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: upstreamOf(pg), Credential: "orders-db", TLS: TLSDisable},
				rules: rs, sources: map[string]broker.Source{"orders-db": staticDB("orders-db", tt.user, tt.pw)}})
			_, err := pgxConnect(t, b.dsn("app", tt.database))
			pe := pgErr(t, err)
			if pe.Code != tt.wantCode || pe.Message != tt.wantMsg {
				t.Fatalf("got %s %q, want %s %q", pe.Code, pe.Message, tt.wantCode, tt.wantMsg)
			}
			shown := fmt.Sprintf("%+v", *pe)
			if strings.Contains(shown, tt.user) || strings.Contains(shown, tt.pw) {
				t.Fatalf("the client was shown the credential: %s", shown)
			}
			line := b.waitAudit(t, 1)[0]
			if e, _ := line["error"].(string); !strings.Contains(e, "SQLSTATE "+tt.auditCode) {
				t.Errorf("audit error %q does not name SQLSTATE %s", e, tt.auditCode)
			}
			if l := b.logs.String(); strings.Contains(l, tt.user) || strings.Contains(l, tt.pw) {
				t.Fatalf("the broker's log holds the credential:\n%s", l)
			}
		})
	}
}

// TestPGCancelScoped (T-F4): a cancel reaches only the session whose key
// it carries; another session's key and a forged one have no effect.
func TestPGCancelScoped(t *testing.T) {
	pg := sharedPG(t)
	jit, jitPW := createRole(t, pg, "jit_cancel", false)
	b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: upstreamOf(pg), Credential: "orders-db", TLS: TLSVerifyFull,
		RootCAs: poolFromFile(t, pg.CAFile)}, sources: map[string]broker.Source{"orders-db": staticDB("orders-db", jit, jitPW)}})
	sessA, err := pgxConnect(t, b.dsn("app", "app"))
	if err != nil {
		t.Fatal(err)
	}
	sessB, err := pgxConnect(t, b.dsn("app", "app"))
	if err != nil {
		t.Fatal(err)
	}
	admin := adminConn(t, pg)
	defer admin.Close(context.Background())
	sleeping := func() int {
		var n int
		_ = admin.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'active' AND query LIKE 'SELECT pg_sleep%'`, jit).Scan(&n)
		return n
	}
	done := make(chan error, 1)
	go func() {
		_, err := sessA.Exec(context.Background(), "SELECT pg_sleep(30)")
		done <- err
	}()
	for deadline := time.Now().Add(10 * time.Second); sleeping() != 1; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("session A's pg_sleep never started")
		}
	}
	var upstreamPID uint32
	_ = admin.QueryRow(context.Background(), `SELECT pid FROM pg_stat_activity WHERE usename = $1 AND state = 'active'`, jit).Scan(&upstreamPID)

	cancelWith := func(pid uint32, secret []byte) {
		c := rawDial(t, b.addr)
		_, _ = c.Write(encodeFrontend(t, &pgproto3.CancelRequest{ProcessID: pid, SecretKey: secret}))
		_, _ = io.ReadAll(c) // the broker closes when done
	}
	if sessA.PgConn().PID() == upstreamPID {
		t.Fatal("the client was given the server's process id")
	}
	dials := b.dialer.dials.Load()
	for _, tt := range []struct {
		name   string
		pid    uint32
		secret []byte
		dials  int64 // upstream connections it may cause
	}{
		{"session B's own key", sessB.PgConn().PID(), sessB.PgConn().SecretKey(), 1},
		{"the server's process id with a guessed secret", upstreamPID, []byte{0, 0, 0, 1}, 0},
		{"A's process id with B's secret", sessA.PgConn().PID(), sessB.PgConn().SecretKey(), 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cancelWith(tt.pid, tt.secret)
			time.Sleep(time.Second)
			select {
			case err := <-done:
				t.Fatalf("session A's query ended: %v", err)
			default:
			}
			if sleeping() != 1 {
				t.Fatal("session A's pg_sleep is no longer running")
			}
			if got := b.dialer.dials.Load() - dials; got != tt.dials {
				t.Fatalf("%d upstream connections, want %d", got, tt.dials)
			}
			dials = b.dialer.dials.Load()
		})
	}
	t.Run("A's own cancel", func(t *testing.T) {
		start := time.Now()
		if err := sessA.PgConn().CancelRequest(context.Background()); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if pe := pgErr(t, err); pe.Code != "57014" {
				t.Fatalf("got %s %q, want 57014 (canceled)", pe.Code, pe.Message)
			}
			t.Logf("cancelled after %v", time.Since(start))
		case <-time.After(5 * time.Second):
			t.Fatal("A's own cancel did not cancel pg_sleep")
		}
		if got := queryString(t, sessA, "SELECT 'still usable'"); got != "still usable" {
			t.Fatal(got)
		}
	})
}

// TestPGSessionEndsAtLeaseExpiry (F-13, T-B10): a session ends when its
// credential expires, even in the middle of a statement; the client is
// told why, and the server keeps no backend for the role.
func TestPGSessionEndsAtLeaseExpiry(t *testing.T) {
	pg := sharedPG(t)
	jit, jitPW := createRole(t, pg, "jit_lease", false)
	const ttl = 3 * time.Second
	src := &recordingSource{src: staticDB("orders-db", jit, jitPW), expiresIn: ttl}
	b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: upstreamOf(pg), Credential: "orders-db", TLS: TLSDisable},
		sources: map[string]broker.Source{"orders-db": src}})
	start := time.Now()
	out, stderr, err := psql(t, pg, b.dsn("app", "app"), nil, "-c", "SELECT pg_sleep(60)")
	elapsed := time.Since(start)
	if err == nil {
		t.Fatalf("pg_sleep(60) finished: %q", out)
	}
	if !strings.Contains(stderr, "FATAL:  terminating connection: credential lease expired") {
		t.Fatalf("psql said %q; want the broker's FATAL", stderr)
	}
	if elapsed < ttl || elapsed > ttl+2*time.Second {
		t.Fatalf("the session ended after %v; want within [%v, %v]", elapsed, ttl, ttl+2*time.Second)
	}
	t.Logf("session ended %v after psql started (lease %v)", elapsed, ttl)
	assertNoBackend(t, pg, jit)
	line := b.waitAudit(t, 1)[0]
	if e, _ := line["error"].(string); !strings.Contains(e, "credential lease expired") || line["decision"] != "allow" || line["credential.expires"] == "" {
		t.Fatalf("audit line %v", line)
	}
	if src.release.Load() != 1 {
		t.Fatal("the credential was not released at session end")
	}
}

// assertNoBackend: the server has no session for user (polled briefly:
// a cancelled backend exits asynchronously).
func assertNoBackend(t *testing.T, pg *testservers.Postgres, user string) {
	t.Helper()
	admin := adminConn(t, pg)
	defer admin.Close(context.Background())
	start := time.Now()
	for {
		var n int
		if err := admin.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity WHERE usename = $1`, user).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			t.Logf("no backend for %s %v after the client ended", "the role", time.Since(start))
			return
		}
		if time.Since(start) > 2*time.Second {
			t.Fatalf("%d backends for the role remain in pg_stat_activity", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPGVaultDynamicLease (F-13, T-B10) with the real Vault database
// secrets engine: a 5 s lease ends a running pg_sleep within TTL + 2 s,
// and a one-shot lease (cache: none) is revoked when the client
// disconnects, after which its user can no longer log in.
func TestPGVaultDynamicLease(t *testing.T) {
	pg := sharedPG(t)
	v := testservers.StartVault(t)
	v.Must("POST", "sys/mounts/database", map[string]any{"type": "database"})
	v.Must("POST", "database/config/pg", map[string]any{
		"plugin_name":             "postgresql-database-plugin",
		"connection_url":          fmt.Sprintf("postgresql://{{username}}:{{password}}@127.0.0.1:%d/postgres?sslmode=disable", pg.Port),
		"username":                pg.User,
		"password":                pg.Password,
		"allowed_roles":           "app",
		"password_authentication": "scram-sha-256",
	})
	v.Must("POST", "database/roles/app", map[string]any{
		"db_name": "pg",
		// PUBLIC may connect to app; a database-level GRANT would make
		// Vault's revocation (DROP ROLE) fail.
		"creation_statements": []string{`CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';`},
		"default_ttl":         "5s",
		"max_ttl":             "5s",
	})
	src := &recordingSource{src: vaultDynamicSource(t, v, "orders-db", "database/creds/app")}
	b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: upstreamOf(pg), Credential: "orders-db", TLS: TLSVerifyFull,
		RootCAs: poolFromFile(t, pg.CAFile)}, sources: map[string]broker.Source{"orders-db": src}})
	leases := func() int {
		code, out, err := v.Do("LIST", "sys/leases/lookup/database/creds/app/", nil)
		if err != nil {
			t.Fatal(err)
		}
		if code == 404 {
			return 0
		}
		keys, _ := out["data"].(map[string]any)["keys"].([]any)
		return len(keys)
	}

	t.Run("one-shot lease revoked at disconnect", func(t *testing.T) {
		out, stderr, err := psql(t, pg, b.dsn("app", "app"), nil, "-c", "SELECT current_user")
		if err != nil || !strings.HasPrefix(out, "v-") {
			t.Fatalf("psql: %q %v %s; want a Vault-made user", out, err, stderr)
		}
		user, pw := src.last(t)
		if out != user {
			t.Fatalf("current_user %q is not the leased user", out)
		}
		b.waitAudit(t, 1) // written after the release
		if n := leases(); n != 0 {
			t.Fatalf("%d leases left after the session", n)
		}
		if _, err := pg.PSQL(user, pw, "SELECT 1"); err == nil {
			t.Fatal("the leased user can still log in after the session ended")
		}
	})

	t.Run("lease expiry ends pg_sleep", func(t *testing.T) {
		start := time.Now()
		out, stderr, err := psql(t, pg, b.dsn("app", "app"), nil, "-c", "SELECT pg_sleep(60)")
		elapsed := time.Since(start)
		if err == nil || !strings.Contains(stderr, "terminating connection: credential lease expired") {
			t.Fatalf("psql: %q %v %q", out, err, stderr)
		}
		if elapsed > 7*time.Second {
			t.Fatalf("ended after %v; want within the 5 s lease + 2 s", elapsed)
		}
		t.Logf("session ended %v after psql started (lease 5s)", elapsed)
		user, _ := src.last(t)
		assertNoBackend(t, pg, user)
		b.waitAudit(t, 2)
		if n := leases(); n != 0 {
			t.Fatalf("%d leases left after the session", n)
		}
	})
}

// TestPGShutdown: Shutdown stops accepting, lets a session run until its
// context ends, then ends it with FATAL 57P01.
func TestPGShutdown(t *testing.T) {
	pg := sharedPG(t)
	jit, jitPW := createRole(t, pg, "jit_shutdown", false)
	b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: upstreamOf(pg), Credential: "orders-db", TLS: TLSDisable},
		sources: map[string]broker.Source{"orders-db": staticDB("orders-db", jit, jitPW)}})
	c, err := pgxConnect(t, b.dsn("app", "app"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := b.srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want the deadline (a session was open)", err)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Fatalf("Shutdown returned after %v, before its deadline", d)
	}
	_, err = c.Exec(context.Background(), "SELECT 1")
	if err == nil || !strings.Contains(err.Error(), "the broker is shutting down") {
		t.Fatalf("after shutdown: %v", err)
	}
	if _, err := pgxConnect(t, b.dsn("app", "app")); err == nil {
		t.Fatal("a new session was accepted after Shutdown")
	}
	assertNoBackend(t, pg, jit)
}

// TestPGSCRAMServerMustProve: over SCRAM the server must prove it knows
// the password's verifier before its AuthenticationOk counts, so a server
// that is not the database (a man in the middle of tls: require) cannot
// take the session. fakePG plays that server: a real one always proves.
func TestPGSCRAMServerMustProve(t *testing.T) {
	sources := map[string]broker.Source{"orders-db": staticDB("orders-db", "jit_user", "jit-password-1")}
	for _, mode := range []string{"skips the server-final message", "sends a wrong signature"} {
		t.Run(mode, func(t *testing.T) {
			f := startFakePG(t, nil)
			f.authFn = func(be *pgproto3.Backend) bool {
				be.Send(&pgproto3.AuthenticationSASL{AuthMechanisms: []string{"SCRAM-SHA-256"}})
				if be.Flush() != nil {
					return false
				}
				_ = be.SetAuthType(pgproto3.AuthTypeSASL)
				msg, err := be.Receive()
				init, ok := msg.(*pgproto3.SASLInitialResponse)
				if err != nil || !ok {
					return false
				}
				_, nonce, _ := strings.Cut(string(init.Data), ",r=")
				be.Send(&pgproto3.AuthenticationSASLContinue{Data: []byte("r=" + nonce + "srv,s=c2FsdHNhbHQ=,i=4096")})
				if be.Flush() != nil {
					return false
				}
				_ = be.SetAuthType(pgproto3.AuthTypeSASLContinue)
				if _, err := be.Receive(); err != nil {
					return false
				}
				if mode == "sends a wrong signature" {
					be.Send(&pgproto3.AuthenticationSASLFinal{Data: []byte("v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")})
				}
				return true // the fake then sends AuthenticationOk
			}
			b := startBroker(t, brokerSpec{db: Database{Name: "orders", Upstream: f.addr(), Credential: "orders-db", TLS: TLSDisable},
				sources: sources})
			_, err := pgxConnect(t, b.dsn("app", "app"))
			if pe := pgErr(t, err); pe.Code != "08006" {
				t.Fatalf("got %s %q; the session must be refused", pe.Code, pe.Message)
			}
		})
	}
}
