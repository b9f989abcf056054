package testservers

import (
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"syscall"
	"testing"
	"time"
)

// The fault proxy itself, in front of a real HTTP server: every mode does
// what it says, switching is immediate and the connection count is exact.
func TestFaultProxyModes(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "0123456789abcdefghij")
	}))
	defer srv.Close()
	p := StartFaultProxy(t, srv.Listener.Addr().String())
	get := func(timeout time.Duration) (string, time.Duration, error) {
		// A new connection per call: the count is per connection.
		c := &http.Client{Timeout: timeout, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
		start := time.Now()
		resp, err := c.Get("http://" + p.Addr + "/")
		if err != nil {
			return "", time.Since(start), err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), time.Since(start), err
	}

	t.Run("pass", func(t *testing.T) {
		p.ResetCounts()
		for i := 0; i < 3; i++ {
			if body, _, err := get(5 * time.Second); err != nil || body != "0123456789abcdefghij" {
				t.Fatalf("GET through the proxy: %q, %v", body, err)
			}
		}
		if n := p.Accepted(); n != 3 {
			t.Fatalf("accepted %d connections, want 3", n)
		}
	})
	t.Run("down refuses", func(t *testing.T) {
		p.Down()
		_, err := net.DialTimeout("tcp", p.Addr, time.Second)
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("dial while down: %v, want connection refused", err)
		}
	})
	t.Run("latency", func(t *testing.T) {
		p.Latency(300 * time.Millisecond)
		body, d, err := get(5 * time.Second)
		if err != nil || body == "" || d < 300*time.Millisecond {
			t.Fatalf("GET with 300ms latency: %q in %v, %v", body, d, err)
		}
	})
	t.Run("hang", func(t *testing.T) {
		p.Hang()
		p.ResetCounts()
		_, d, err := get(500 * time.Millisecond)
		if err == nil || d < 500*time.Millisecond {
			t.Fatalf("GET while hanging: %v after %v, want a client timeout", err, d)
		}
		if n := p.Accepted(); n != 1 {
			t.Fatalf("accepted %d connections, want 1 (hang accepts, then says nothing)", n)
		}
	})
	t.Run("reset", func(t *testing.T) {
		p.Reset(0)
		_, _, err := get(5 * time.Second)
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("GET with reset: %v, want connection reset by peer", err)
		}
	})
	t.Run("limit", func(t *testing.T) {
		p.Limit(10)
		body, _, err := get(5 * time.Second)
		if err == nil && body == "0123456789abcdefghij" {
			t.Fatalf("GET with a 10-byte limit returned the whole answer")
		}
	})
	t.Run("server behind stopped: accepted, then closed and counted", func(t *testing.T) {
		p.Pass()
		srv.Close()
		p.ResetCounts()
		if _, _, err := get(5 * time.Second); err == nil {
			t.Fatal("GET succeeded with the server stopped")
		}
		if a, f := p.Accepted(), p.UpstreamFailed(); a != 1 || f != 1 {
			t.Fatalf("accepted %d, upstream failed %d; want 1 and 1", a, f)
		}
	})
}
