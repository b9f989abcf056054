package testservers

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keygate/broker/internal/canarytest"
)

// Postgres is a throwaway PostgreSQL cluster (initdb into a temp dir) on
// 127.0.0.1 with scram-sha-256 everywhere and a superuser "postgres" whose
// password the test knows.
//
// initdb and postgres refuse to run as root; when the test runs as root the
// server runs as the "postgres" user (or "nobody" when there is none) with
// a data directory owned by it, started with a direct setuid from Go (no
// runuser/setpriv needed).
type Postgres struct {
	Host     string // 127.0.0.1
	Port     int
	User     string // the superuser, "postgres"
	Password string
	Dir      string
	// CAFile is the PEM of the test CA that signed the server certificate
	// (TLS clusters only; see PostgresOptions.TLS).
	CAFile string
	// LogFile is the server log (log_connections is on).
	LogFile string

	opts PostgresOptions

	t    testing.TB
	bin  string // the server's bin directory (initdb, pg_ctl)
	psql string
	cred *syscall.Credential // nil: run as ourselves
	mu   sync.Mutex
	up   bool
}

// pgBinDir finds initdb: the newest /usr/lib/postgresql/*/bin, else PATH.
func pgBinDir() string {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return pgMajor(dirs[i]) < pgMajor(dirs[j]) })
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(filepath.Join(dirs[i], "initdb")); err == nil {
			return dirs[i]
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			p = r
		}
		return filepath.Dir(p)
	}
	return ""
}

func pgMajor(dir string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(dir)))
	return n
}

// PostgresOptions tune StartPostgresWith.
type PostgresOptions struct {
	// TLS turns ssl on with a server certificate signed by a fresh test CA
	// (Postgres.CAFile). Clients may still connect without TLS unless HBA
	// says otherwise.
	TLS bool
	// CertHosts are the server certificate's names (DNS names or IP
	// addresses); default 127.0.0.1 and localhost. A name the clients do not
	// use makes a certificate that verify-full must refuse.
	CertHosts []string
	// HBA lines are placed before initdb's own (first match wins), e.g.
	// "host all md5user 127.0.0.1/32 md5".
	HBA []string
}

// StartPostgres creates and starts a cluster; it is stopped and deleted
// when the test ends. ~1.5 s.
func StartPostgres(t testing.TB) *Postgres {
	t.Helper()
	return StartPostgresWith(t, PostgresOptions{})
}

// StartPostgresWith is StartPostgres with TLS and extra pg_hba.conf lines.
func StartPostgresWith(t testing.TB, o PostgresOptions) *Postgres {
	t.Helper()
	bin := pgBinDir()
	if bin == "" {
		Missing(t, "PostgreSQL server binaries (initdb) not found; apt-get install -y postgresql")
	}
	psql := filepath.Join(bin, "psql")
	if _, err := os.Stat(psql); err != nil {
		if psql, err = exec.LookPath("psql"); err != nil {
			Missing(t, "psql not found; apt-get install -y postgresql-client")
		}
	}
	p := &Postgres{Host: "127.0.0.1", User: "postgres", Password: canarytest.New("postgres-superuser"), t: t, bin: bin, psql: psql, opts: o}
	dir, err := os.MkdirTemp("", "keygate-pg-")
	if err != nil {
		t.Fatal(err)
	}
	p.Dir = dir
	t.Cleanup(func() {
		p.Stop()
		_ = os.RemoveAll(dir)
	})
	uid, gid := -1, -1
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			u, err = user.Lookup("nobody")
		}
		if err != nil {
			t.Fatalf("running as root and no postgres or nobody user to run PostgreSQL as: %v", err)
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
		p.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), NoSetGroups: true}
	}
	pwfile := filepath.Join(dir, "pwfile")
	if err := os.WriteFile(pwfile, []byte(p.Password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if p.cred != nil {
		for _, f := range []string{dir, pwfile} {
			if err := os.Chown(f, uid, gid); err != nil {
				t.Fatal(err)
			}
		}
	}
	out, err := p.run(filepath.Join(bin, "initdb"), "-D", filepath.Join(dir, "data"), "-U", p.User,
		"--pwfile="+pwfile, "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync")
	if err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	p.LogFile = filepath.Join(dir, "pg.log")
	if len(o.HBA) > 0 {
		hba := filepath.Join(dir, "data", "pg_hba.conf")
		old, err := os.ReadFile(hba)
		if err != nil {
			t.Fatal(err)
		}
		// Rewritten in place: the file keeps its owner and mode.
		if err := os.WriteFile(hba, []byte(strings.Join(o.HBA, "\n")+"\n"+string(old)), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if o.TLS {
		if err := p.writeTLS(uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	_, port, _ := strings.Cut(freeAddr(t), ":")
	p.Port, _ = strconv.Atoi(port)
	p.Start()
	return p
}

// run executes a server tool as the cluster's owner.
func (p *Postgres) run(name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = p.Dir
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "LC_ALL=C", "HOME=" + p.Dir}
	if p.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.cred}
	}
	return cmd.CombinedOutput()
}

// Start starts the server (again) and waits until it accepts connections.
func (p *Postgres) Start() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.up {
		return
	}
	opts := fmt.Sprintf("-c listen_addresses=127.0.0.1 -p %d -k %s -c fsync=off -c full_page_writes=off -c synchronous_commit=off -c log_connections=on",
		p.Port, p.Dir)
	if p.opts.TLS {
		opts += fmt.Sprintf(" -c ssl=on -c ssl_cert_file=%s -c ssl_key_file=%s",
			filepath.Join(p.Dir, "server.crt"), filepath.Join(p.Dir, "server.key"))
	}
	out, err := p.run(filepath.Join(p.bin, "pg_ctl"), "-D", filepath.Join(p.Dir, "data"),
		"-l", filepath.Join(p.Dir, "pg.log"), "-w", "-t", "30", "start", "-o", opts)
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(p.Dir, "pg.log"))
		p.t.Fatalf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
	p.up = true
}

// Stop stops the server (fast shutdown); the data is kept for Start.
func (p *Postgres) Stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.up {
		return
	}
	_, _ = p.run(filepath.Join(p.bin, "pg_ctl"), "-D", filepath.Join(p.Dir, "data"), "-w", "-t", "30", "stop", "-m", "fast")
	p.up = false
}

// PSQL runs one SQL command with the real psql client as user/password and
// returns its trimmed output (tuples only, unaligned); the error holds
// psql's stderr, e.g. "password authentication failed".
func (p *Postgres) PSQL(user, password, sql string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, p.psql, "-X", "-v", "ON_ERROR_STOP=1", "-tA",
		"-h", p.Host, "-p", strconv.Itoa(p.Port), "-U", user, "-d", "postgres", "-c", sql)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "PGPASSWORD=" + password, "PGCONNECT_TIMEOUT=5",
		"PGSSLMODE=disable", "LC_ALL=C"}
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return strings.TrimSpace(stdout.String()), fmt.Errorf("psql as %s: %v: %s", user, err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(stdout.String()), nil
}

// writeTLS creates a test CA (CAFile) and a server certificate and key it
// signed, owned by the server's user (PostgreSQL refuses a key readable by
// others).
func (p *Postgres) writeTLS(uid, gid int) error {
	hosts := p.opts.CertHosts
	if len(hosts) == 0 {
		hosts = []string{"127.0.0.1", "localhost"}
	}
	pki, err := newTestPKI("keygate test PostgreSQL CA "+randHex(4), hosts)
	if err != nil {
		return err
	}
	p.CAFile = filepath.Join(p.Dir, "ca.crt")
	files := []struct {
		path string
		data []byte
	}{
		{p.CAFile, pki.CAPEM},
		{filepath.Join(p.Dir, "server.crt"), pki.CertPEM},
		{filepath.Join(p.Dir, "server.key"), pki.KeyPEM},
	}
	for _, f := range files {
		if err := os.WriteFile(f.path, f.data, 0o600); err != nil {
			return err
		}
		if p.cred != nil {
			if err := os.Chown(f.path, uid, gid); err != nil {
				return err
			}
		}
	}
	return os.Chmod(p.CAFile, 0o644)
}

// Log returns the server log so far.
func (p *Postgres) Log() string {
	b, _ := os.ReadFile(p.LogFile)
	return string(b)
}

// DSN is a key=value connection string for user/password on this cluster
// (no TLS), for pgx and psql.
func (p *Postgres) DSN(user, password, database string) string {
	return fmt.Sprintf("host=%s port=%d user=%s password=%s dbname=%s sslmode=disable", p.Host, p.Port, user, password, database)
}

// PSQLBin is the psql client that goes with the server.
func (p *Postgres) PSQLBin() string { return p.psql }

// BinDir is the server's bin directory (pgbench, pg_ctl, ...).
func (p *Postgres) BinDir() string { return p.bin }
