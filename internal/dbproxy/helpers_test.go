package dbproxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/keygate/broker/internal/attest"
	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/inject"
	"github.com/keygate/broker/internal/intercept/ca"
	"github.com/keygate/broker/internal/intercept/egress"
	"github.com/keygate/broker/internal/rules"
	"github.com/keygate/broker/internal/testservers"
)

// Real parts: PostgreSQL 15 clusters started by internal/testservers
// (initdb + pg_ctl, scram-sha-256, TLS on with a test CA), the real psql
// and pgbench, pgx as a Go client, Vault's database secrets engine. The
// one fake is fakePG below; each test that uses it says why.

// ---- one shared cluster for the package

// pkgTB lets TestMain own a cluster: testservers wants a testing.TB, and
// the cluster must outlive any single test. Fatal and Skip panic with the
// message; sharedPG turns that into the calling test's failure or skip.
type pkgTB struct {
	testing.TB
	mu       sync.Mutex
	cleanups []func()
}

type tbAbort struct {
	skip bool
	msg  string
}

func (p *pkgTB) Helper()                   {}
func (p *pkgTB) Fatal(args ...any)         { panic(tbAbort{msg: fmt.Sprint(args...)}) }
func (p *pkgTB) Fatalf(f string, a ...any) { panic(tbAbort{msg: fmt.Sprintf(f, a...)}) }
func (p *pkgTB) Skip(args ...any)          { panic(tbAbort{skip: true, msg: fmt.Sprint(args...)}) }
func (p *pkgTB) Logf(f string, a ...any)   {}
func (p *pkgTB) Name() string              { return "dbproxy-shared" }
func (p *pkgTB) TempDir() string {
	d, err := os.MkdirTemp("", "keygate-dbproxy-")
	if err != nil {
		panic(tbAbort{msg: err.Error()})
	}
	p.Cleanup(func() { os.RemoveAll(d) })
	return d
}
func (p *pkgTB) Cleanup(f func()) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cleanups = append(p.cleanups, f)
}

func (p *pkgTB) runCleanups() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := len(p.cleanups) - 1; i >= 0; i-- {
		p.cleanups[i]()
	}
	p.cleanups = nil
}

var shared struct {
	tb    pkgTB
	once  sync.Once
	pg    *testservers.Postgres
	abort *tbAbort
	// Passwords of md5user (stored as md5) and pwuser (cleartext auth).
	md5PW, pwPW string
}

// TestMain runs the package under the suite-wide secret sweep
// (canarytest); the shared cluster is stopped before the sweep so its
// shutdown output is included.
func TestMain(m *testing.M) {
	os.Exit(canarytest.Run(func() int {
		code := m.Run()
		shared.tb.runCleanups()
		return code
	}))
}

// The shared cluster's extra users: md5user authenticates with md5,
// pwuser with a cleartext password; everyone else with scram-sha-256.
var sharedHBA = []string{
	"host all md5user 127.0.0.1/32 md5",
	"host all pwuser 127.0.0.1/32 password",
}

// sharedPG is the package's TLS-enabled cluster (started on first use).
func sharedPG(t testing.TB) *testservers.Postgres {
	t.Helper()
	shared.once.Do(func() {
		defer func() {
			if r := recover(); r != nil {
				a, ok := r.(tbAbort)
				if !ok {
					panic(r)
				}
				shared.abort = &a
			}
		}()
		shared.pg = testservers.StartPostgresWith(&shared.tb, testservers.PostgresOptions{TLS: true, HBA: sharedHBA})
		admin := adminConn(t, shared.pg)
		defer admin.Close(context.Background())
		mustExec(t, admin, `CREATE DATABASE app`)
		shared.md5PW, shared.pwPW = canarytest.New("dbproxy md5user password"), canarytest.New("dbproxy pwuser password")
		mustExec(t, admin, `SET password_encryption = 'md5'`)
		mustExec(t, admin, fmt.Sprintf(`CREATE ROLE md5user LOGIN PASSWORD '%s'`, shared.md5PW))
		mustExec(t, admin, `RESET password_encryption`)
		mustExec(t, admin, fmt.Sprintf(`CREATE ROLE pwuser LOGIN PASSWORD '%s'`, shared.pwPW))
	})
	if a := shared.abort; a != nil {
		if a.skip {
			t.Skip(a.msg)
		}
		t.Fatal(a.msg)
	}
	return shared.pg
}

func adminConn(t testing.TB, pg *testservers.Postgres) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, pg.DSN(pg.User, pg.Password, "postgres"))
	if err != nil {
		t.Fatalf("superuser connection: %v", err)
	}
	return c
}

func mustExec(t testing.TB, c *pgx.Conn, sql string, args ...any) {
	t.Helper()
	if _, err := c.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

var roleSeq atomic.Int64

// createRole makes a login role (md5-hashed when asked; PUBLIC may connect
// to app) and drops it at cleanup. The password is random.
func createRole(t testing.TB, pg *testservers.Postgres, prefix string, md5 bool) (user, password string) {
	t.Helper()
	user = fmt.Sprintf("%s_%d_%d", prefix, os.Getpid()%10000, roleSeq.Add(1))
	password = canarytest.New("dbproxy role password (" + prefix + ")")
	admin := adminConn(t, pg)
	defer admin.Close(context.Background())
	if md5 {
		mustExec(t, admin, `SET password_encryption = 'md5'`)
	}
	mustExec(t, admin, fmt.Sprintf(`CREATE ROLE %s LOGIN PASSWORD '%s'`, user, password))
	t.Cleanup(func() {
		a := adminConn(t, pg)
		defer a.Close(context.Background())
		_, _ = a.Exec(context.Background(), `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1`, user)
		_, _ = a.Exec(context.Background(), fmt.Sprintf(`DROP ROLE IF EXISTS %s`, user))
	})
	return user, password
}

func randomHex(t testing.TB, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", b)
}

// ---- sources

// staticDB is a credential source for a database role (cache: none).
func staticDB(name, user, password string) broker.Source {
	return inject.NewCache(name, inject.NewStatic(name, map[string]broker.Secret{
		broker.FieldUsername: broker.NewSecret(user), broker.FieldPassword: broker.NewSecret(password),
	}), inject.CacheOptions{})
}

// recordingSource wraps a source and keeps every credential it handed out
// (the test needs the JIT username to look for it in pg_stat_activity).
type recordingSource struct {
	src broker.Source
	mu  sync.Mutex
	got []broker.Credential
	// expiresIn, when set, gives each credential an expiry this far ahead
	// (a lease as short as a test can wait for).
	expiresIn time.Duration
	release   atomic.Int64
}

func (r *recordingSource) Credential(ctx context.Context, id broker.Identity, g broker.Grant) (broker.Credential, error) {
	c, err := r.src.Credential(ctx, id, g)
	if err != nil {
		return c, err
	}
	if r.expiresIn > 0 {
		c.Expires = time.Now().Add(r.expiresIn)
	}
	inner := c.Release
	c.Release = func(ctx context.Context) {
		r.release.Add(1)
		if inner != nil {
			inner(ctx)
		}
	}
	r.mu.Lock()
	r.got = append(r.got, c)
	r.mu.Unlock()
	return c, nil
}

func (r *recordingSource) last(t testing.TB) (user, password string) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.got) == 0 {
		t.Fatal("the source handed out no credential")
	}
	c := r.got[len(r.got)-1]
	u, _ := c.Field(broker.FieldUsername)
	p, _ := c.Field(broker.FieldPassword)
	return u.Reveal(), p.Reveal()
}

// ---- the egress dialer, counted

// countingDialer is the real egress dialer (private addresses allowed:
// the test servers are on loopback) that counts the connections asked
// for, so a test can prove nothing was dialled.
type countingDialer struct {
	d     *egress.Dialer
	dials atomic.Int64
}

func newCountingDialer() *countingDialer {
	return &countingDialer{d: egress.New(egress.Options{DenyPrivate: false})}
}

func (c *countingDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	c.dials.Add(1)
	return c.d.DialContext(ctx, network, addr)
}

// ---- a broker on a free port

type brokerSpec struct {
	db        Database
	rules     []rules.Spec // default: allowApp
	sources   map[string]broker.Source
	clientTLS bool
	attestor  broker.Attestor // default: cidr 127.0.0.0/8 -> "local-app"
	grace     time.Duration
	// wrap, when set, wraps the broker's listener (fault injection on the
	// workload's connections).
	wrap func(net.Listener) net.Listener
}

// allowApp lets local-app use database app on the upstream as any user.
func allowApp(host string) []rules.Spec {
	return []rules.Spec{{
		Name:  "app-db",
		Hosts: []string{host},
		When:  `request.protocol == "postgres" && request.database == "app" && workload.id == "local-app"`,
	}}
}

type testBroker struct {
	srv    *Server
	addr   string
	host   string
	port   int
	dialer *countingDialer
	logs   *syncBuffer
	caFile string // the broker CA, for clients that verify the listener
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) Sync() error { return nil }
func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startBroker(t testing.TB, spec brokerSpec) *testBroker {
	t.Helper()
	host, _, _ := net.SplitHostPort(spec.db.Upstream)
	if spec.rules == nil {
		spec.rules = allowApp(host)
	}
	set, errs := rules.Compile(spec.rules, rules.Options{})
	if len(errs) > 0 {
		t.Fatalf("rules: %v", errs)
	}
	if spec.attestor == nil {
		cidr, err := attest.NewCIDR([]attest.CIDREntry{{ID: "local-app", CIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}})
		if err != nil {
			t.Fatal(err)
		}
		spec.attestor = attest.NewChain(nil, attest.Named{Name: "cidr", Attestor: cidr})
	}
	logs := &syncBuffer{}
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	// The broker's log is also swept for every registered canary.
	log := zap.New(zapcore.NewTee(zapcore.NewCore(enc, logs, zapcore.DebugLevel), canarytest.ZapCore("dbproxy log ("+t.Name()+")")))
	tb := &testBroker{dialer: newCountingDialer(), logs: logs}
	o := Options{
		Database:       spec.db,
		Pipeline:       &broker.Pipeline{Attestor: spec.attestor, Policy: set, Sources: spec.sources},
		Dialer:         tb.dialer,
		Logger:         log,
		TerminateGrace: spec.grace,
	}
	if spec.clientTLS {
		authority, err := ca.Ephemeral(filepath.Join(t.TempDir(), "broker-ca.pem"), nil)
		if err != nil {
			t.Fatal(err)
		}
		tb.caFile = filepath.Join(t.TempDir(), "ca.pem")
		if err := os.WriteFile(tb.caFile, authority.CertPEM(), 0o644); err != nil {
			t.Fatal(err)
		}
		o.ClientTLS = ClientTLSConfig(authority.Leaves(ca.LeafOptions{}).Get)
	}
	srv, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if spec.wrap != nil {
		ln = spec.wrap(ln)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-served
	})
	tb.srv, tb.addr = srv, ln.Addr().String()
	tb.host = "127.0.0.1"
	tb.port = ln.Addr().(*net.TCPAddr).Port
	return tb
}

// dsn is a key=value connection string to the broker (no password).
func (b *testBroker) dsn(user, database string, extra ...string) string {
	s := fmt.Sprintf("host=%s port=%d user=%s dbname=%s", b.host, b.port, user, database)
	for _, e := range extra {
		s += " " + e
	}
	if !strings.Contains(s, "sslmode=") {
		s += " sslmode=disable"
	}
	return s
}

// audit returns the decoded audit lines ("decision") written so far.
func (b *testBroker) audit(t testing.TB) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(b.logs.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == "decision" {
			out = append(out, m)
		}
	}
	return out
}

// waitAudit waits for n audit lines.
func (b *testBroker) waitAudit(t testing.TB, n int) []map[string]any {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if a := b.audit(t); len(a) >= n {
			return a
		}
		if time.Now().After(deadline) {
			t.Fatalf("want %d audit lines; log:\n%s", n, b.logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func pgxConnect(t testing.TB, dsn string) (*pgx.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, dsn)
	if err == nil {
		t.Cleanup(func() { c.Close(context.Background()) })
	}
	return c, err
}

func queryString(t testing.TB, c *pgx.Conn, sql string) string {
	t.Helper()
	var s string
	if err := c.QueryRow(context.Background(), sql).Scan(&s); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return s
}

// psql runs the real psql with a connection string and returns stdout,
// stderr and the error.
func psql(t testing.TB, pg *testservers.Postgres, conninfo string, env []string, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, pg.PSQLBin(), append([]string{"-X", "-v", "ON_ERROR_STOP=1", "-tA", "-d", conninfo}, args...)...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "LC_ALL=C", "HOME=" + t.TempDir(), "PGCONNECT_TIMEOUT=10"}, env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return strings.TrimSpace(stdout.String()), strings.TrimSpace(stderr.String()), err
}

// ---- raw protocol clients

// rawStartup dials the broker and returns the conn.
func rawDial(t testing.TB, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	return c
}

func encodeFrontend(t testing.TB, msgs ...pgproto3.FrontendMessage) []byte {
	t.Helper()
	var buf []byte
	for _, m := range msgs {
		var err error
		if buf, err = m.Encode(buf); err != nil {
			t.Fatal(err)
		}
	}
	return buf
}

// ---- fakePG: a recording PostgreSQL server

// fakePG is a minimal PostgreSQL server speaking pgproto3 that records
// every byte and every startup it receives. It stands in for a real
// server only where a test must see exactly what the broker sends (the
// startup it built, that no password byte follows a failed TLS check) or
// needs a server to misbehave in ways a real one will not (answer 'N' to
// SSLRequest while TLS is required, stuff bytes after 'S').
type fakePG struct {
	t     testing.TB
	ln    net.Listener
	tls   *tls.Config // nil: answer 'N'
	stuff []byte      // sent right after 'S', before the handshake
	// authFn, when set, runs the authentication exchange after the
	// startup; false ends the connection.
	authFn func(be *pgproto3.Backend) bool
	mu     sync.Mutex
	raw    bytes.Buffer // every application byte received (decrypted after TLS)
	starts []map[string]string
	conns  int
}

func startFakePG(t testing.TB, tlsCfg *tls.Config) *fakePG {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakePG{t: t, ln: ln, tls: tlsCfg}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go f.serve(c)
		}
	}()
	return f
}

func (f *fakePG) addr() string { return f.ln.Addr().String() }

type recReader struct {
	f *fakePG
	r interface{ Read([]byte) (int, error) }
}

func (r recReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	r.f.mu.Lock()
	r.f.raw.Write(p[:n])
	r.f.mu.Unlock()
	return n, err
}

func (f *fakePG) serve(c net.Conn) {
	defer c.Close()
	f.mu.Lock()
	f.conns++
	f.mu.Unlock()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	var conn net.Conn = c
	be := pgproto3.NewBackend(recReader{f, conn}, conn)
	for {
		msg, err := be.ReceiveStartupMessage()
		if err != nil {
			return
		}
		switch m := msg.(type) {
		case *pgproto3.SSLRequest:
			if f.tls == nil {
				_, _ = conn.Write([]byte{'N'})
				continue
			}
			_, _ = conn.Write(append([]byte{'S'}, f.stuff...))
			tc := tls.Server(conn, f.tls)
			if err := tc.Handshake(); err != nil {
				return
			}
			conn = tc
			be = pgproto3.NewBackend(recReader{f, conn}, conn)
		case *pgproto3.CancelRequest:
			return
		case *pgproto3.StartupMessage:
			params := map[string]string{}
			for k, v := range m.Parameters {
				params[k] = v
			}
			f.mu.Lock()
			f.starts = append(f.starts, params)
			f.mu.Unlock()
			if f.authFn != nil && !f.authFn(be) {
				return
			}
			be.Send(&pgproto3.AuthenticationOk{})
			be.Send(&pgproto3.ParameterStatus{Name: "server_version", Value: "15.0 (fake)"})
			be.Send(&pgproto3.BackendKeyData{ProcessID: 4242, SecretKey: []byte{1, 2, 3, 4}})
			be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
			if be.Flush() != nil {
				return
			}
			for {
				msg, err := be.Receive()
				if err != nil {
					return
				}
				switch msg.(type) {
				case *pgproto3.Query:
					be.Send(&pgproto3.EmptyQueryResponse{})
					be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
					if be.Flush() != nil {
						return
					}
				case *pgproto3.Terminate:
					return
				}
			}
		}
	}
}

func (f *fakePG) received() []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return bytes.Clone(f.raw.Bytes())
}

func (f *fakePG) startups() []map[string]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]map[string]string(nil), f.starts...)
}

// leafFor is a certificate for names signed by a fresh CA, and that CA's
// pool.
func leafFor(t testing.TB, names ...string) (*tls.Config, *x509.CertPool) {
	t.Helper()
	authority, err := ca.Ephemeral("", nil)
	if err != nil {
		t.Fatal(err)
	}
	leaves := authority.Leaves(ca.LeafOptions{})
	cert, err := leaves.Get(names[0])
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(authority.Certificate())
	return &tls.Config{Certificates: []tls.Certificate{*cert}, MinVersion: tls.VersionTLS12}, pool
}

func poolFromFile(t testing.TB, path string) *x509.CertPool {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		t.Fatal("no certificate in " + path)
	}
	return p
}

func portOf(addr string) int {
	_, p, _ := net.SplitHostPort(addr)
	n, _ := strconv.Atoi(p)
	return n
}

// vaultDynamicSource is a vault_dynamic credential on a connection logged
// in with the root token, with cache: none (every session its own lease,
// revoked by Release).
func vaultDynamicSource(t testing.TB, v *testservers.Vault, name, path string) broker.Source {
	t.Helper()
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(v.RootToken), 0o600); err != nil {
		t.Fatal(err)
	}
	conn, err := inject.NewVault(inject.VaultOptions{Name: "legacy", Address: v.Addr,
		Auth: inject.VaultAuth{Method: inject.VaultAuthTokenFile, TokenFile: tokenFile}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = conn.Close(ctx)
	})
	d, err := inject.NewVaultDynamic(conn, name, inject.VaultDynamicOptions{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	return inject.NewCache(name, d, inject.CacheOptions{})
}
