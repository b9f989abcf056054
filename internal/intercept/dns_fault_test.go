package intercept

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/rules"
)

// dnsFault is a resolver that fails every query the way a broken DNS
// server does, and counts the queries.
type dnsFault struct {
	calls atomic.Int64
	fail  func(ctx context.Context, host string) error
}

func (r *dnsFault) LookupNetIP(ctx context.Context, _, host string) ([]netip.Addr, error) {
	r.calls.Add(1)
	return nil, r.fail(ctx, host)
}

// TestDNSFailureFailsClosed (F-16): the broker's resolver answers SERVFAIL,
// NXDOMAIN or times out for the name of an allowed upstream. The upstream
// is "localhost" on 127.0.0.1 (inside the egress allow-list), so any
// fallback to the system resolver (which knows localhost) would reach it:
// it is the private-IP canary and must see 0 connections. The workload
// gets a broker refusal (502 dns_failure) within 2 s, the name is looked up once per
// request (no retry storm), and the audit line carries the error.
func TestDNSFailureFailsClosed(t *testing.T) {
	var conns atomic.Int64
	canary := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "reached")
	}))
	canary.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	canary.StartTLS()
	t.Cleanup(canary.Close)
	port := canary.Listener.Addr().(*net.TCPAddr).Port
	authority := net.JoinHostPort("localhost", strconv.Itoa(port))

	for _, tc := range []struct {
		name string
		fail func(ctx context.Context, host string) error
	}{
		{"SERVFAIL", func(_ context.Context, host string) error {
			return &net.DNSError{Err: "server misbehaving", Name: host, Server: "192.0.2.53:53", IsTemporary: true}
		}},
		{"NXDOMAIN", func(_ context.Context, host string) error {
			return &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
		}},
		{"resolver timeout", func(ctx context.Context, host string) error {
			// What Go's resolver returns when its server does not answer.
			select {
			case <-time.After(800 * time.Millisecond):
			case <-ctx.Done():
			}
			return &net.DNSError{Err: "i/o timeout", Name: host, Server: "192.0.2.53:53", IsTimeout: true, IsTemporary: true}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := &dnsFault{fail: tc.fail}
			h := newHarness(t, harnessOpts{resolver: res, roots: []*httptest.Server{canary},
				rules: []rules.Spec{bearerRule("api", "localhost")}})
			const n = 3
			for i := 0; i < n; i++ {
				start := time.Now()
				status, code, rid := h.dnsFaultRequest(authority)
				took := time.Since(start)
				if status != http.StatusBadGateway || code != broker.CodeDNSFailure {
					t.Errorf("request %d: %d %q, want 502 %q", i, status, code, broker.CodeDNSFailure)
				}
				if took > 2*time.Second {
					t.Errorf("request %d: refused after %v, want within 2s", i, took)
				}
				if rid == "" {
					t.Errorf("request %d: no X-Keygate-Request-Id", i)
				}
				t.Logf("F-16 %s: request %d refused %d %s after %v", tc.name, i, status, code, took.Round(time.Millisecond))
			}
			if got := res.calls.Load(); got != n {
				t.Errorf("%d resolver queries for %d requests, want one each (no retries)", got, n)
			}
			if c := conns.Load(); c != 0 {
				t.Fatalf("the private-IP canary behind the failing name got %d connections (fallback resolver?)", c)
			}
			var errored int
			for _, l := range h.auditLines() {
				if e, _ := l["error"].(string); l["host"] == "localhost" && e != "" {
					errored++
				}
			}
			if errored < n {
				t.Errorf("%d audit lines with an error for the failed requests, want %d", errored, n)
			}
		})
	}
}

// dnsFaultRequest sends GET /x to authority through an intercepted tunnel
// (or stops at a refused CONNECT) and returns the status, the broker's
// error code and the request id the workload saw.
func (h *harness) dnsFaultRequest(authority string) (int, string, string) {
	h.t.Helper()
	c, _, resp := h.connect(authority)
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, resp.Header.Get("X-Keygate-Error"), resp.Header.Get("X-Keygate-Request-Id")
	}
	host, _, _ := net.SplitHostPort(authority)
	tc, err := h.tlsOver(c, host)
	if err != nil {
		h.t.Fatalf("TLS to the broker: %v", err)
	}
	defer tc.Close()
	_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
	r := h.rawRequest(tc, fmt.Sprintf("GET /x HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", authority))
	return r.StatusCode, r.Header.Get("X-Keygate-Error"), r.Header.Get("X-Keygate-Request-Id")
}
