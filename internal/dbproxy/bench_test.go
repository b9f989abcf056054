package dbproxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/inject"
	"github.com/keygate/broker/internal/testservers"
)

// cachedDB is the static credential behind a 5-minute cache, as a
// databases: entry with cache: 5m runs it.
func cachedDB(name, user, password string) broker.Source {
	return inject.NewCache(name, inject.NewStatic(name, map[string]broker.Secret{
		broker.FieldUsername: broker.NewSecret(user), broker.FieldPassword: broker.NewSecret(password),
	}), inject.CacheOptions{TTL: 5 * time.Minute})
}

// benchDB prepares database app for pgbench (scale 1) and a role that may
// read it; it returns the role.
func benchDB(b *testing.B, pg *testservers.Postgres) (string, string) {
	b.Helper()
	user, pw := createRole(b, pg, "jit_bench", false)
	pgbench := filepath.Join(pg.BinDir(), "pgbench")
	cmd := exec.Command(pgbench, "-i", "-s", "1", "-q", "-h", pg.Host, "-p", strconv.Itoa(pg.Port), "-U", pg.User, "app")
	cmd.Env = append(os.Environ(), "PGPASSWORD="+pg.Password, "PGSSLMODE=disable")
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("pgbench -i: %v\n%s", err, out)
	}
	a := adminConn(b, pg)
	defer a.Close(context.Background())
	mustExec(b, a, fmt.Sprintf("GRANT pg_read_all_data TO %s", user))
	return user, pw
}

var tpsLine = regexp.MustCompile(`tps = ([0-9.]+) \(without initial connection time\)`)

// runPGBench runs `pgbench -S -n -c 8 -j 2 -T secs` with conninfo
// (PGPASSWORD in env, if any) and returns its TPS.
func runPGBench(b *testing.B, pg *testservers.Postgres, secs int, env []string, conn ...string) float64 {
	b.Helper()
	args := append([]string{"-S", "-n", "-c", "8", "-j", "2", "-T", strconv.Itoa(secs)}, conn...)
	cmd := exec.Command(filepath.Join(pg.BinDir(), "pgbench"), args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "LC_ALL=C", "HOME=" + b.TempDir(), "PGSSLMODE=disable"}, env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		b.Fatalf("pgbench: %v\n%s", err, out)
	}
	m := tpsLine.FindSubmatch(out)
	if m == nil {
		b.Fatalf("no tps in pgbench output:\n%s", out)
	}
	tps, _ := strconv.ParseFloat(string(m[1]), 64)
	return tps
}

// BenchmarkPGBenchSelectOnly: `pgbench -S -c 8 -j 2 -T $KEYGATE_PGBENCH_T`
// (default 10 s) straight to PostgreSQL, through the broker (upstream tls:
// disable, as the direct run; a cached static credential) and, for
// calibration, through a bare TCP forwarder (two io.Copy goroutines per
// connection, nothing else), in one run. Reported: tps-direct, tps-broker,
// ratio (broker/direct), tps-forwarder and ratio-forwarder: what any
// user-space proxy costs on this machine, which the broker cannot beat.
func BenchmarkPGBenchSelectOnly(b *testing.B) {
	pg := sharedPG(b)
	user, pw := benchDB(b, pg)
	secs := 10
	if s, err := strconv.Atoi(os.Getenv("KEYGATE_PGBENCH_T")); err == nil && s > 0 {
		secs = s
	}
	br := startBroker(b, brokerSpec{db: Database{Name: "bench", Upstream: upstreamOf(pg), Credential: "bench-db", TLS: TLSDisable},
		sources: map[string]broker.Source{"bench-db": cachedDB("bench-db", user, pw)}})
	fwd := bareForwarder(b, upstreamOf(pg))
	var direct, through, forwarded float64
	b.ResetTimer()
	for range b.N {
		direct += runPGBench(b, pg, secs, []string{"PGPASSWORD=" + pw},
			"-h", pg.Host, "-p", strconv.Itoa(pg.Port), "-U", user, "app")
		through += runPGBench(b, pg, secs, nil,
			"-h", br.host, "-p", strconv.Itoa(br.port), "-U", "app", "app")
		forwarded += runPGBench(b, pg, secs, []string{"PGPASSWORD=" + pw},
			"-h", "127.0.0.1", "-p", strconv.Itoa(portOf(fwd)), "-U", user, "app")
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(direct/n, "tps-direct")
	b.ReportMetric(through/n, "tps-broker")
	b.ReportMetric(through/direct, "ratio")
	b.ReportMetric(forwarded/n, "tps-forwarder")
	b.ReportMetric(forwarded/direct, "ratio-forwarder")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkPGConnect: one pgx connect + close, straight to PostgreSQL
// (SCRAM-SHA-256 computed by pgx) and through the broker with a cached
// credential (the broker attests, decides, authenticates upstream).
func BenchmarkPGConnect(b *testing.B) {
	pg := sharedPG(b)
	user, pw := createRole(b, pg, "jit_connect", false)
	roots := poolFromFile(b, pg.CAFile)
	src := map[string]broker.Source{"bench-db": cachedDB("bench-db", user, pw)}
	plain := startBroker(b, brokerSpec{db: Database{Name: "bench", Upstream: upstreamOf(pg), Credential: "bench-db", TLS: TLSDisable}, sources: src})
	verified := startBroker(b, brokerSpec{db: Database{Name: "bench-tls", Upstream: upstreamOf(pg), Credential: "bench-db", TLS: TLSVerifyFull, RootCAs: roots}, sources: src})
	for _, tt := range []struct{ name, dsn string }{
		{"direct", pg.DSN(user, pw, "app")},
		{"broker", plain.dsn("app", "app")},
		{"direct-verify-full", fmt.Sprintf("host=127.0.0.1 port=%d user=%s password=%s dbname=app sslmode=verify-full sslrootcert=%s", pg.Port, user, pw, pg.CAFile)},
		{"broker-upstream-verify-full", verified.dsn("app", "app")},
	} {
		b.Run(tt.name, func(b *testing.B) {
			cfg, err := pgx.ParseConfig(tt.dsn)
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			for range b.N {
				c, err := pgx.ConnectConfig(ctx, cfg)
				if err != nil {
					b.Fatal(err)
				}
				if err := c.Close(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// bareForwarder is the least a TCP proxy can do: accept, dial, copy both
// ways. It calibrates the pgbench numbers.
func bareForwarder(b *testing.B, upstream string) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("tcp", upstream)
				if err != nil {
					return
				}
				defer u.Close()
				go func() { _, _ = io.Copy(u, c); u.Close() }()
				_, _ = io.Copy(c, u)
			}()
		}
	}()
	return ln.Addr().String()
}
