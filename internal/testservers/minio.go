// Package testservers starts the real servers keygate's tests talk to
// (MinIO; more as issues land), each built by the project's own pinned
// script into a cache outside the repository. It is imported only by tests.
//
// A missing server binary skips the test locally (with the command that
// builds it) and fails it in CI (CI=true): CI must never pass by skipping.
package testservers

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/sts"

	"github.com/keygate/broker/internal/canarytest"
)

// MinIOVersion must match scripts/minio.sh.
const MinIOVersion = "v0.0.0-20260212201848-7aac2a2c5b7c"

func cacheDir() string {
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" {
		return filepath.Join(d, "keygate", "bin")
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "keygate", "bin")
}

// binary finds a cached server binary or skips/fails the test.
func binary(t testing.TB, path, script string) string {
	t.Helper()
	if fi, err := os.Stat(path); err == nil && fi.Mode()&0o111 != 0 {
		return path
	}
	Missing(t, "%s not found; build it with scripts/%s (make deps)", path, script)
	return ""
}

// MinIO is a running MinIO server on 127.0.0.1 over TLS, with a root user
// (the broker's "base credentials" for STS AssumeRole).
type MinIO struct {
	Endpoint     string // https://127.0.0.1:PORT
	Addr         string // 127.0.0.1:PORT
	RootUser     string
	RootPassword string
	CAFile       string // PEM of the CA that signed MinIO's certificate
	CAPool       *x509.CertPool
	LogFile      string

	t       testing.TB
	bin     string
	dataDir string
	certDir string
	env     []string
	mu      sync.Mutex
	cmd     *exec.Cmd
	done    <-chan struct{}
}

// MinIOOptions tune StartMinIO.
type MinIOOptions struct {
	// Env adds environment variables (for example MINIO_IDENTITY_OPENID_*).
	Env []string
}

// StartMinIO starts MinIO with a fresh data directory and a test CA, and
// stops it when the test ends.
func StartMinIO(t testing.TB, o MinIOOptions) *MinIO {
	t.Helper()
	bin := binary(t, filepath.Join(cacheDir(), "minio-"+MinIOVersion, "minio"), "minio.sh")
	dir := t.TempDir()
	m := &MinIO{
		RootUser: "keygate-root",
		// MinIO caps the secret key at 40 bytes, shorter than a canary:
		// a random value, registered for the sweep.
		RootPassword: registered("minio-root-password", "root-"+randHex(12)),
		t:            t,
		bin:          bin,
		dataDir:      filepath.Join(dir, "data"),
		certDir:      filepath.Join(dir, "certs"),
		LogFile:      filepath.Join(dir, "minio.log"),
	}
	if err := os.MkdirAll(m.certDir, 0o700); err != nil {
		t.Fatal(err)
	}
	m.CAFile, m.CAPool = writeTLS(t, m.certDir)
	m.env = append(os.Environ(),
		"MINIO_ROOT_USER="+m.RootUser,
		"MINIO_ROOT_PASSWORD="+m.RootPassword,
		"MINIO_BROWSER=off",
		"MINIO_UPDATE=off",
		"MINIO_CALLHOME_ENABLE=off",
	)
	m.env = append(m.env, o.Env...)
	m.Addr = freeAddr(t)
	m.Endpoint = "https://" + m.Addr
	m.Start()
	t.Cleanup(m.Stop)
	return m
}

// Start (re)starts the server on the same address and data and waits until
// it is ready.
func (m *MinIO) Start() {
	m.t.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd != nil {
		return
	}
	_, port, _ := net.SplitHostPort(m.Addr)
	console := freeAddr(m.t)
	cmd := exec.Command(m.bin, "server", "--quiet", "--address", m.Addr, "--console-address", console,
		"--certs-dir", m.certDir, m.dataDir)
	cmd.Env = m.env
	done := startLogged(m.t, "minio", cmd, m.LogFile)
	m.cmd, m.done = cmd, done
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{Proxy: nil,
		TLSClientConfig: &tls.Config{RootCAs: m.CAPool}}}
	waitHTTP(m.t, "minio", client, "https://127.0.0.1:"+port+"/minio/health/ready", done, m.LogFile)
	m.waitIAM(client)
}

// waitIAM waits until STS answers: /minio/health/ready can report ready
// while the IAM subsystem is still loading ("Server not initialized").
func (m *MinIO) waitIAM(client *http.Client) {
	m.t.Helper()
	api := sts.New(sts.Options{Region: "us-east-1", BaseEndpoint: aws.String(m.Endpoint), HTTPClient: client,
		Credentials: credentials.NewStaticCredentialsProvider(m.RootUser, m.RootPassword, "")})
	var err error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err = api.AssumeRole(ctx, &sts.AssumeRoleInput{RoleArn: aws.String("arn:aws:iam::000000000000:role/ready"),
			RoleSessionName: aws.String("keygate-ready"), DurationSeconds: aws.Int32(900)})
		cancel()
		if err == nil {
			return
		}
	}
	log, _ := os.ReadFile(m.LogFile)
	m.t.Fatalf("minio STS not ready within 30s: %v; log:\n%s", err, log)
}

// Stop kills the server (data is kept for Start).
func (m *MinIO) Stop() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil {
		return
	}
	kill(m.cmd, m.done, m.Addr)
	m.cmd = nil
}

// writeTLS makes a CA and a leaf for 127.0.0.1 and localhost, in the layout
// MinIO's --certs-dir expects (public.crt, private.key), and returns the CA
// file and pool.
func writeTLS(t testing.TB, dir string) (string, *x509.CertPool) {
	t.Helper()
	pki, err := newTestPKI("keygate test servers CA", []string{"localhost", "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	write := func(path string, data []byte, mode os.FileMode) {
		if err := os.WriteFile(path, data, mode); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(dir, "public.crt"), pki.CertPEM, 0o600)
	write(filepath.Join(dir, "private.key"), pki.KeyPEM, 0o600)
	caFile := filepath.Join(filepath.Dir(dir), "test-ca.pem")
	write(caFile, pki.CAPEM, 0o644)
	return caFile, pki.Pool
}

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// registered returns a secret a test server is given after registering it
// for the suite-wide sweep (canarytest).
func registered(label, v string) string {
	canarytest.Register(label, v)
	return v
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return strings.ToLower(fmt.Sprintf("%x", b))
}
