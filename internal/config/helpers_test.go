package config

import (
	"bytes"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// A config head every fixture written by a test shares: one loopback proxy,
// an ephemeral CA (nothing to create on disk) and one cidr attestor.
const minimalHead = `listen:
  proxy: 127.0.0.1:15080
ca: {ephemeral: true}
attestors:
  - type: cidr
    identities: [{id: local, cidrs: [127.0.0.0/8]}]
`

// writeFile writes content to dir/rel (creating parent directories) and
// returns the full path.
func writeFile(t *testing.T, dir, rel, content string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(dir, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	return p
}

// loadAndBuild is `broker validate`: LoadFile, then a dry-run Build. It
// returns the problems (nil when the file is fine).
func loadAndBuild(t *testing.T, path string) Problems {
	t.Helper()
	c, err := LoadFile(path)
	if err == nil {
		_, err = build(t, c, BuildOptions{Logger: zap.NewNop(), DryRun: true})
	}
	return asProblems(t, err)
}

// build calls c.Build and turns a panic into a test failure, so one crash
// does not take every other test in the package down with it. (Build once
// panicked on every problem found after validation: its deferred cleanup
// closed a nil *Runtime. TestBuildProblems and
// TestBuildClosesListenersOnError guard against that.)
func build(t testing.TB, c *Config, o BuildOptions) (rt *Runtime, err error) {
	t.Helper()
	defer func() {
		if p := recover(); p != nil {
			t.Fatalf("BUG: Config.Build panicked instead of returning Problems: %v", p)
		}
	}()
	return c.Build(o)
}

// asProblems insists that err is nil or a Problems, the only error type
// LoadFile, Parse and Build return for a bad file.
func asProblems(t *testing.T, err error) Problems {
	t.Helper()
	if err == nil {
		return nil
	}
	var ps Problems
	if !errors.As(err, &ps) {
		t.Fatalf("error is %T, not config.Problems: %v", err, err)
	}
	if len(ps) == 0 {
		t.Fatalf("empty Problems returned as an error")
	}
	return ps
}

// checkSorted asserts Problems are ordered by line, as validate promises.
func checkSorted(t *testing.T, ps Problems) {
	t.Helper()
	for i := 1; i < len(ps); i++ {
		if ps[i].Line < ps[i-1].Line {
			t.Errorf("problems not sorted by line: %d (%s) after %d (%s)", ps[i].Line, ps[i].Msg, ps[i-1].Line, ps[i-1].Msg)
		}
	}
}

// logBuffer collects JSON log output, as a deployment would write it, so a
// test can search it for secrets. zap encodes fields (Secret's marshallers
// included) exactly as it would for a file.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) Sync() error { return nil }

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func newBufferLogger() (*zap.Logger, *logBuffer) {
	lb := &logBuffer{}
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	return zap.New(zapcore.NewCore(enc, lb, zap.DebugLevel)), lb
}

// mustNotContain fails if any of the texts contains secret.
func mustNotContain(t *testing.T, what, text, secret string) {
	t.Helper()
	if strings.Contains(text, secret) {
		t.Errorf("%s contains the secret %q:\n%s", what, secret, text)
	}
}

// listenTCP holds a loopback port for the test's lifetime.
func listenTCP(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// freePort returns a loopback address that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func netListen(addr string) (net.Listener, error) { return net.Listen("tcp", addr) }
