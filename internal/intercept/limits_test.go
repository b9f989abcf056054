package intercept

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keygate/broker/internal/attest"
	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/rules"
)

// countingTLSUpstream is a TLS upstream that counts the connections it
// accepts, so a test can assert that nothing was dialled.
func countingTLSUpstream(t *testing.T) (*recorder, *atomic.Int64) {
	t.Helper()
	var conns atomic.Int64
	r := &recorder{}
	r.srv = httptest.NewUnstartedServer(r)
	r.srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	r.srv.StartTLS()
	t.Cleanup(r.srv.Close)
	return r, &conns
}

// waitFor polls cond for up to 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// closedByBroker reports whether the broker closed c (EOF or reset) within
// 5 s, draining whatever it still sends.
func closedByBroker(c net.Conn) bool {
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, c)
	ne, ok := err.(net.Error)
	return !(ok && ne.Timeout())
}

// TestTunnelCap (SECURITY-TESTS L-05, T-E3): with limits.max_tunnels = 2,
// an opaque tunnel and an intercepted tunnel fill the cap; the next
// CONNECT of either kind gets 503 tunnel_limit with Retry-After: 1, its
// connection is closed, nothing is dialled, and the refusal is audited.
// Closing a tunnel frees its slot; keygate_tunnels_open follows.
func TestTunnelCap(t *testing.T) {
	opaqueUp, opaqueDials := countingTLSUpstream(t)
	mitmUp, mitmDials := countingTLSUpstream(t)
	inject := bearerRule("inject", "127.0.0.1")
	inject.Ports = []int{mitmUp.port(t)}
	h := newHarness(t, harnessOpts{
		rules: []rules.Spec{
			{Name: "opaque", Hosts: []string{"127.0.0.1"}, Ports: []int{opaqueUp.port(t)}, Action: "tunnel"},
			inject,
		},
		roots:      []*httptest.Server{opaqueUp.srv, mitmUp.srv},
		maxTunnels: 2,
	})
	opaque := fmt.Sprintf("127.0.0.1:%d", opaqueUp.port(t))
	intercepted := fmt.Sprintf("127.0.0.1:%d", mitmUp.port(t))
	gauge := func() float64 { return testutil.ToFloat64(h.metrics.TunnelsOpen) }
	dials := func() int64 { return opaqueDials.Load() + mitmDials.Load() }

	a, _, resp := h.connect(opaque)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("opaque tunnel: %d", resp.StatusCode)
	}
	b := h.tunnel(intercepted)
	if got := h.proxy.tunnels.Open(); got != 2 || gauge() != 2 {
		t.Fatalf("open tunnels %d, gauge %v; want 2", got, gauge())
	}
	dialed := dials()

	for _, authority := range []string{intercepted, opaque} {
		c, _, resp := h.connect(authority)
		if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get(HeaderError) != broker.CodeTunnelLimit ||
			resp.Header.Get("Retry-After") != "1" || resp.Header.Get(HeaderRequestID) == "" {
			t.Fatalf("CONNECT %s past the cap: %d %q Retry-After %q, want 503 tunnel_limit, Retry-After 1 and a request id",
				authority, resp.StatusCode, resp.Header.Get(HeaderError), resp.Header.Get("Retry-After"))
		}
		if !closedByBroker(c) {
			t.Errorf("CONNECT %s past the cap: the connection stayed open", authority)
		}
	}
	if n := dials() - dialed; n != 0 {
		t.Fatalf("%d upstream connections for refused tunnels, want 0", n)
	}
	// The audit line is written once the refused exchange has finished.
	limitLines := func() []map[string]any {
		var out []map[string]any
		for _, l := range h.auditLines() {
			if e, _ := l["error"].(string); strings.HasPrefix(e, broker.CodeTunnelLimit+":") {
				out = append(out, l)
			}
		}
		return out
	}
	waitFor(t, "two tunnel_limit audit lines", func() bool { return len(limitLines()) == 2 })
	for _, l := range limitLines() {
		if l["decision"] != broker.AuditDeny || fmt.Sprint(l["status"]) != "503" {
			t.Errorf("audit line for a refused tunnel: decision %v status %v, want deny 503", l["decision"], l["status"])
		}
	}

	// A slot comes back when its tunnel ends.
	a.Close()
	waitFor(t, "the opaque tunnel's slot", func() bool { return h.proxy.tunnels.Open() == 1 })
	if g := gauge(); g != 1 {
		t.Errorf("keygate_tunnels_open %v, want 1", g)
	}
	c, _, resp := h.connect(opaque)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT after a slot was freed: %d, want 200", resp.StatusCode)
	}
	c.Close()
	b.Close()
	waitFor(t, "every slot", func() bool { return h.proxy.tunnels.Open() == 0 })
	if g := gauge(); g != 0 {
		t.Errorf("keygate_tunnels_open %v after every tunnel closed, want 0", g)
	}
}

// panickyLeaves panics while the workload's TLS handshake asks for a leaf.
type panickyLeaves struct{}

func (panickyLeaves) Get(string) (*tls.Certificate, error) { panic("leaf source exploded") }

// TestTunnelCapReleasedOnPanic: a tunnel whose handling panics gives its
// slot back (the cap is 1, and three such tunnels in a row are each let in,
// not refused with tunnel_limit).
func TestTunnelCapReleasedOnPanic(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{
		rules:      []rules.Spec{bearerRule("inject", "127.0.0.1")},
		roots:      []*httptest.Server{up.srv},
		maxTunnels: 1,
		wrapLeaves: func(LeafSource) LeafSource { return panickyLeaves{} },
	})
	authority := fmt.Sprintf("127.0.0.1:%d", up.port(t))
	for i := 0; i < 3; i++ {
		c, _, resp := h.connect(authority)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("tunnel %d: %d %q, want 200 (a panicked tunnel kept its slot?)", i, resp.StatusCode, resp.Header.Get(HeaderError))
		}
		if _, err := h.tlsOver(c, "127.0.0.1"); err == nil {
			t.Fatalf("tunnel %d: TLS succeeded with a panicking leaf source", i)
		}
		waitFor(t, "the panicked tunnel's slot", func() bool { return h.proxy.tunnels.Open() == 0 })
	}
	if len(h.logs.FilterMessage("panic while handling a request").All()) == 0 {
		t.Errorf("no panic was logged: the test did not exercise the panic path")
	}
}

// TestTunnelCapTransparent: redirected connections count against the same
// cap; past it a redirected connection is closed unread and audited.
func TestTunnelCapTransparent(t *testing.T) {
	up, dials := countingTLSUpstream(t)
	orig := fmt.Sprintf("127.0.0.1:%d", up.port(t))
	h := newHarness(t, harnessOpts{
		rules:       []rules.Spec{{Name: "opaque", Hosts: []string{"127.0.0.1"}, Action: "tunnel"}},
		roots:       []*httptest.Server{up.srv},
		maxTunnels:  1,
		transparent: true,
	})
	first := h.redirectDial(orig)
	waitFor(t, "the first redirected connection's slot", func() bool { return h.proxy.tunnels.Open() == 1 })
	second := h.redirectDial(orig)
	if !closedByBroker(second) {
		t.Fatal("a redirected connection past the cap stayed open")
	}
	waitFor(t, "a transparent audit line with tunnel_limit", func() bool {
		for _, l := range h.auditLines() {
			if e, _ := l["error"].(string); strings.HasPrefix(e, broker.CodeTunnelLimit+":") && l["listener"] == ListenerTransparent {
				return true
			}
		}
		return false
	})
	// The first one still works: it is an opaque tunnel to the upstream.
	tc := tls.Client(first, &tls.Config{RootCAs: h.upRoots, ServerName: "127.0.0.1"})
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("the redirected connection within the cap: %v", err)
	}
	if dials.Load() != 1 {
		t.Errorf("%d upstream connections, want 1 (the one within the cap)", dials.Load())
	}
	tc.Close()
	waitFor(t, "the transparent slot", func() bool { return h.proxy.tunnels.Open() == 0 })
}

// TestLeafMintRateLimit (SECURITY-TESTS L-08): interceptions under an
// allowed wildcard mint at most limits.leaf_mints_per_second leaves per
// caller identity (burst the same). Over the budget a CONNECT gets 503
// rate_limited with Retry-After: 1 before anything is minted; a cached
// leaf, or a repeated CONNECT to a name just charged, costs nothing; a
// denied name is not counted; another identity has its own budget; the
// budget refills with time.
func TestLeafMintRateLimit(t *testing.T) {
	clock := &stepClock{t: time.Now()}
	cidr, err := attest.NewCIDR([]attest.CIDREntry{
		{ID: "caller-a", CIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}},
		{ID: "caller-b", CIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, harnessOpts{
		rules:          []rules.Spec{bearerRule("wild", "*.wild.test")},
		mintsPerSecond: 2,
		clock:          clock,
		attest:         attest.NewChain(nil, attest.Named{Name: "cidr", Attestor: cidr}),
	})
	connectFrom := func(src, name string) (net.Conn, *http.Response) {
		t.Helper()
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		c, err := d.Dial("tcp", h.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "CONNECT %s:443 HTTP/1.1\r\nHost: %s:443\r\n\r\n", name, name)
		resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodConnect})
		if err != nil {
			t.Fatalf("CONNECT %s: %v", name, err)
		}
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(resp.Body)
			h.record(fmt.Sprint(resp.Header) + string(b))
		}
		return c, resp
	}
	// intercept opens a tunnel from src and completes TLS (minting unless
	// the leaf is cached).
	intercept := func(src, name string) {
		t.Helper()
		c, resp := connectFrom(src, name)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("CONNECT %s from %s: %d %q, want 200", name, src, resp.StatusCode, resp.Header.Get(HeaderError))
		}
		tc, err := h.tlsOver(c, name)
		if err != nil {
			t.Fatalf("TLS to %s: %v", name, err)
		}
		tc.Close()
	}
	refused := func(src, name string) {
		t.Helper()
		_, resp := connectFrom(src, name)
		if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get(HeaderError) != broker.CodeRateLimited ||
			resp.Header.Get("Retry-After") != "1" {
			t.Fatalf("CONNECT %s from %s over the mint budget: %d %q Retry-After %q, want 503 rate_limited, Retry-After 1",
				name, src, resp.StatusCode, resp.Header.Get(HeaderError), resp.Header.Get("Retry-After"))
		}
	}
	mints := func() int { return *h.mints }

	intercept("127.0.0.1", "a1.wild.test")
	// CONNECTs to a name not minted yet (concurrent first visits) share
	// its one token: the leaf cache mints it once.
	for i := 0; i < 3; i++ {
		c, resp := connectFrom("127.0.0.1", "a2.wild.test")
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("repeated CONNECT %d to a2.wild.test: %d %q, want 200", i, resp.StatusCode, resp.Header.Get(HeaderError))
		}
		c.Close()
	}
	intercept("127.0.0.1", "a2.wild.test")
	if mints() != 2 {
		t.Fatalf("%d mints, want 2", mints())
	}
	refused("127.0.0.1", "a3.wild.test")
	if mints() != 2 {
		t.Fatalf("a refused CONNECT minted: %d mints, want 2", mints())
	}
	// A cached leaf is served without spending budget.
	intercept("127.0.0.1", "a1.wild.test")
	// A denied name is refused by policy (403), not by the limiter.
	if _, resp := connectFrom("127.0.0.1", "x.deny.test"); resp.StatusCode != http.StatusForbidden {
		t.Fatalf("CONNECT to a denied name: %d, want 403", resp.StatusCode)
	}
	// Another identity has its own budget.
	intercept("127.0.0.2", "b1.wild.test")
	if mints() != 3 {
		t.Fatalf("%d mints, want 3", mints())
	}
	// The budget refills: 2 per second.
	clock.advance(time.Second)
	intercept("127.0.0.1", "a3.wild.test")
	intercept("127.0.0.1", "a4.wild.test")
	refused("127.0.0.1", "a5.wild.test")
	if mints() != 5 {
		t.Fatalf("%d mints, want 5", mints())
	}
	limitedLines := func() []map[string]any {
		var out []map[string]any
		for _, l := range h.auditLines() {
			if e, _ := l["error"].(string); strings.HasPrefix(e, broker.CodeRateLimited+":") {
				out = append(out, l)
			}
		}
		return out
	}
	waitFor(t, "two rate_limited audit lines", func() bool { return len(limitedLines()) == 2 })
	for _, l := range limitedLines() {
		if l["decision"] != broker.AuditDeny || l["workload.id"] != "caller-a" {
			t.Errorf("audit line for a rate-limited CONNECT: decision %v workload %v, want deny caller-a", l["decision"], l["workload.id"])
		}
	}
}

// TestMintLimiterBounded: the per-identity buckets are bounded, and idle
// (full) ones are swept.
func TestMintLimiterBounded(t *testing.T) {
	clock := &stepClock{t: time.Now()}
	l := NewMintLimiter(1, 1, clock)
	for i := 0; i < mintBuckets+50; i++ {
		if !l.Allow(broker.Identity{ID: "id-" + strconv.Itoa(i), Method: broker.MethodCIDR}, "h.test") {
			t.Fatalf("identity %d refused its first mint", i)
		}
	}
	if n := l.size(); n > mintBuckets {
		t.Fatalf("%d buckets held, want at most %d", n, mintBuckets)
	}
	id := broker.Identity{ID: "id-1", Method: broker.MethodCIDR}
	clock.advance(2 * mintSweepEvery)
	if !l.Allow(id, "a.test") {
		t.Fatal("a refilled identity was refused")
	}
	if n := l.size(); n != 1 {
		t.Fatalf("%d buckets after the idle ones were swept, want 1", n)
	}
	if !l.Allow(id, "a.test") {
		t.Fatal("a second CONNECT to a name just charged was charged again")
	}
	if l.Allow(id, "b.test") {
		t.Fatal("a second mint within the second was allowed with rate 1, burst 1")
	}
}

// TestHeaderLimitsExact (SECURITY-TESTS L-04, T-E2): limits.max_header_bytes
// is the real limit, not net/http's limit plus 4 KiB of slack: a head of
// exactly the limit is forwarded, one byte more is 431 and a close, at the
// front door and inside a tunnel. limits.max_header_count refuses one
// field more than the limit with 431 header_too_large and a close.
func TestHeaderLimitsExact(t *testing.T) {
	const limit, count = 8192, 20
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{
		rules:  []rules.Spec{bearerRule("inject", "127.0.0.1")},
		roots:  []*httptest.Server{up.srv},
		limits: Limits{MaxHeaderBytes: limit, MaxHeaderCount: count},
	})
	authority := fmt.Sprintf("127.0.0.1:%d", up.port(t))

	// head builds a request head of exactly size bytes (request line
	// through the blank line), padded in one X-Pad field.
	head := func(line string, size int) string {
		base := line + "Host: " + authority + "\r\nX-Pad: \r\n\r\n"
		if size < len(base) {
			t.Fatalf("head of %d bytes cannot hold %d", size, len(base))
		}
		return line + "Host: " + authority + "\r\nX-Pad: " + strings.Repeat("p", size-len(base)) + "\r\n\r\n"
	}
	fields := func(line string, n int) string {
		var b strings.Builder
		b.WriteString(line + "Host: " + authority + "\r\n")
		for i := 1; i < n; i++ {
			fmt.Fprintf(&b, "X-F%d: v\r\n", i)
		}
		return b.String() + "\r\n"
	}
	paths := []struct {
		name string
		line string
		conn func() net.Conn
	}{
		{"front door", "GET " + up.srv.URL + "/x HTTP/1.1\r\n", func() net.Conn {
			c, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			return c
		}},
		{"tunnel", "GET /x HTTP/1.1\r\n", func() net.Conn { return h.tunnel(authority) }},
	}
	// At the front door an absolute-form https:// URL is refused (400),
	// but only after the head was read and checked: what matters here is
	// whether it is a 431. Inside the tunnel the request is forwarded.
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			for _, tc := range []struct {
				name   string
				raw    string
				refuse bool
				code   string // X-Keygate-Error of a refusal, "" for net/http's own 431
			}{
				{"head of exactly the limit", head(p.line, limit), false, ""},
				{"head one byte over", head(p.line, limit+1), true, ""},
				{"request line over the limit", strings.Replace(p.line, "/x", "/"+strings.Repeat("a", limit), 1) + "Host: " + authority + "\r\n\r\n", true, ""},
				{"exactly max_header_count fields", fields(p.line, count), false, ""},
				{"one field over max_header_count", fields(p.line, count+1), true, broker.CodeHeaderTooLarge},
			} {
				t.Run(tc.name, func(t *testing.T) {
					before := up.count()
					c := p.conn()
					_ = c.SetDeadline(time.Now().Add(10 * time.Second))
					resp := h.rawRequest(c, tc.raw)
					if !tc.refuse {
						if resp.StatusCode == http.StatusRequestHeaderFieldsTooLarge {
							t.Fatalf("a request within the limits got 431")
						}
						return
					}
					if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
						t.Fatalf("status %d, want 431", resp.StatusCode)
					}
					if tc.code != "" && resp.Header.Get(HeaderError) != tc.code {
						t.Errorf("X-Keygate-Error %q, want %q", resp.Header.Get(HeaderError), tc.code)
					}
					if !closedByBroker(c) {
						t.Errorf("the connection stayed open after 431")
					}
					if n := up.count() - before; n != 0 {
						t.Errorf("the upstream got %d requests for a refused one", n)
					}
				})
			}
		})
	}
	if p := h.proxy.srv.MaxHeaderBytes; p+4096 != limit {
		t.Errorf("http.Server.MaxHeaderBytes %d: net/http's real limit %d, want %d", p, p+4096, limit)
	}
}

// TestFramerHeadLimit: the framing guard enforces max_header_bytes exactly
// even where net/http cannot see it, e.g. a head that arrives behind a
// pipelined request (net/http counts only the bytes it reads anew).
func TestFramerHeadLimit(t *testing.T) {
	const limit = 64
	mk := func(n int) string {
		base := "GET / HTTP/1.1\r\nX: \r\n\r\n"
		return "GET / HTTP/1.1\r\nX: " + strings.Repeat("a", n-len(base)) + "\r\n\r\n"
	}
	first := mk(40)
	tests := []struct {
		name   string
		reads  []string
		refuse bool
		keep   int // bytes of the refused read still delivered
	}{
		{"exactly the limit in one read", []string{mk(limit)}, false, 0},
		{"exactly the limit split", []string{mk(limit)[:30], mk(limit)[30:]}, false, 0},
		{"one over in one read", []string{mk(limit + 1)}, true, 0},
		{"one over, split", []string{mk(limit + 1)[:50], mk(limit + 1)[50:]}, true, 0},
		{"unfinished and over", []string{mk(limit + 10)[:limit+1]}, true, 0},
		{"pipelined: the first is delivered", []string{first + mk(limit+1)}, true, len(first)},
		{"pipelined within the limit", []string{first + mk(limit)}, false, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := framer{maxHead: limit}
			var err error
			var keep int
			for _, r := range tt.reads {
				if keep, err = f.feed([]byte(r)); err != nil {
					break
				}
			}
			if !tt.refuse {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			fe, ok := err.(*errFraming)
			if !ok || fe.reason != reasonHeadTooLarge {
				t.Fatalf("error %v, want the head-size refusal", err)
			}
			if keep != tt.keep {
				t.Fatalf("kept %d bytes, want %d", keep, tt.keep)
			}
		})
	}
}

// TestUpstreamErrorCodes: the dial and transport failures a workload can
// be told apart.
func TestUpstreamErrorCodes(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		code string
	}{
		{"NXDOMAIN", &net.DNSError{Err: "no such host", Name: "x.test", IsNotFound: true}, broker.CodeDNSFailure},
		{"resolver timeout", fmt.Errorf("egress: resolve: %w", &net.DNSError{Err: "i/o timeout", Name: "x.test", IsTimeout: true}), broker.CodeDNSFailure},
		{"deadline", context.DeadlineExceeded, broker.CodeUpstreamTimeout},
		{"refused", &net.OpError{Op: "dial", Net: "tcp", Err: fmt.Errorf("connection refused")}, broker.CodeUpstreamUnreachable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			be := upstreamError(tc.err)
			if be.Code != tc.code {
				t.Fatalf("code %q, want %q", be.Code, tc.code)
			}
			if tc.code == broker.CodeDNSFailure && be.Status() != http.StatusBadGateway {
				t.Fatalf("status %d, want 502", be.Status())
			}
		})
	}
}
