package egress

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keygate/broker/internal/testservers"
)

// listener accepts on ip:port and counts the connections it received.
type listener struct {
	net.Listener
	accepted atomic.Int64
	done     chan struct{}
}

func (l *listener) port() uint16 {
	return netip.MustParseAddrPort(l.Addr().String()).Port()
}

// listen opens a counting listener on ip:port (port 0: any). It skips the
// test if the address cannot be bound (e.g. 127.0.0.x missing on lo).
func listen(t *testing.T, ip string, port uint16) *listener {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(int(port))))
	if err != nil {
		testservers.Missing(t, "cannot listen on %s:%d: %v", ip, port, err)
	}
	l := &listener{Listener: ln, done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			l.accepted.Add(1)
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-l.done })
	return l
}

// connections reports how many connections reached l, after giving any
// connection the kernel already completed time to be accepted.
func (l *listener) connections() int64 {
	time.Sleep(20 * time.Millisecond)
	return l.accepted.Load()
}

// fakeResolver answers successive queries from answers (the last one
// repeats) and counts them.
type fakeResolver struct {
	mu      sync.Mutex
	answers [][]string
	queries int
}

func (r *fakeResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	i := min(r.queries, len(r.answers)-1)
	r.queries++
	var out []netip.Addr
	for _, s := range r.answers[i] {
		out = append(out, netip.MustParseAddr(s))
	}
	return out, nil
}

func (r *fakeResolver) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.queries
}

type failResolver struct{ t *testing.T }

func (r failResolver) LookupNetIP(context.Context, string, string) ([]netip.Addr, error) {
	r.t.Error("resolver called for an IP literal")
	return nil, errors.New("unexpected lookup")
}

func wantDenied(t *testing.T, err error, class Class) {
	t.Helper()
	var de *DeniedError
	if !errors.Is(err, ErrDenied) || !errors.As(err, &de) {
		t.Fatalf("err = %v, want a *DeniedError wrapping ErrDenied", err)
	}
	if de.Class != class {
		t.Fatalf("denied class = %q (%v), want %q", de.Class, err, class)
	}
}

// allow127 makes specific loopback addresses stand in for "public" servers.
func allow127(ips ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, ip := range ips {
		out = append(out, netip.PrefixFrom(netip.MustParseAddr(ip), 32))
	}
	return out
}

// T-A2: the resolver answers a permitted address first and the canary's
// address on the second query. The dialer resolves once per dial and dials
// what it checked, so the first dial reaches the permitted server, the
// second is refused, and the canary sees nothing.
func TestRebindingSecondQuery(t *testing.T) {
	canary := listen(t, "127.0.0.1", 0)
	good := listen(t, "127.0.0.3", canary.port())
	res := &fakeResolver{answers: [][]string{{"127.0.0.3"}, {"127.0.0.1"}}}
	d := New(Options{DenyPrivate: true, AllowCIDRs: allow127("127.0.0.3"), Resolver: res})
	addr := net.JoinHostPort("rebind.example", strconv.Itoa(int(canary.port())))

	c, err := d.DialContext(context.Background(), "tcp", addr)
	if err != nil {
		t.Fatalf("first dial: %v", err)
	}
	if got := c.RemoteAddr().String(); got != net.JoinHostPort("127.0.0.3", strconv.Itoa(int(canary.port()))) {
		t.Fatalf("first dial reached %s", got)
	}
	c.Close()
	if res.count() != 1 {
		t.Fatalf("one dial made %d DNS queries, want 1", res.count())
	}

	_, err = d.DialContext(context.Background(), "tcp", addr)
	wantDenied(t, err, ClassLoopback)
	if !strings.Contains(err.Error(), `"rebind.example" resolves to loopback address 127.0.0.1:`) {
		t.Errorf("message %q should name the host, class and address", err)
	}
	if n := canary.connections(); n != 0 {
		t.Fatalf("canary received %d connections, want 0", n)
	}
	if n := good.connections(); n != 1 {
		t.Fatalf("permitted server received %d connections, want 1", n)
	}
}

// T-A2, same scenario through net/http: a Transport whose only dialer is
// ours cannot be rebound onto the canary between two requests.
func TestRebindingThroughHTTPTransport(t *testing.T) {
	canary := listen(t, "127.0.0.1", 0)
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.3", strconv.Itoa(int(canary.port()))))
	if err != nil {
		testservers.Missing(t, "cannot listen on 127.0.0.3: %v", err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}))
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	defer srv.Close()

	res := &fakeResolver{answers: [][]string{{"127.0.0.3"}, {"127.0.0.1"}}}
	d := New(Options{DenyPrivate: true, AllowCIDRs: allow127("127.0.0.3"), Resolver: res})
	client := &http.Client{Transport: &http.Transport{DialContext: d.DialContext, DisableKeepAlives: true}}
	url := fmt.Sprintf("http://rebind.example:%d/", canary.port())

	resp, err := client.Get(url)
	if err != nil {
		t.Fatalf("first request: %v", err)
	}
	resp.Body.Close()
	_, err = client.Get(url)
	if !errors.Is(err, ErrDenied) {
		t.Fatalf("second request: %v, want ErrDenied", err)
	}
	if n := canary.connections(); n != 0 {
		t.Fatalf("canary received %d connections, want 0", n)
	}
}

// T-A2: a name answering [permitted-but-closed, canary] is refused as a
// whole, before any connection attempt, so Go-style fallback to the second
// record can never reach the canary.
func TestMixedAnswersRefuseWholeName(t *testing.T) {
	canary := listen(t, "127.0.0.1", 0)
	for _, answers := range [][]string{
		{"203.0.113.1", "127.0.0.1"},
		{"127.0.0.2", "127.0.0.1"},
		{"127.0.0.1", "127.0.0.2"},
		{"::ffff:127.0.0.1", "127.0.0.2"},
	} {
		t.Run(strings.Join(answers, ","), func(t *testing.T) {
			res := &fakeResolver{answers: [][]string{answers}}
			d := New(Options{
				DenyPrivate: true,
				AllowCIDRs:  append(allow127("127.0.0.2"), netip.MustParsePrefix("203.0.113.1/32")),
				Resolver:    res,
			})
			_, err := d.DialContext(context.Background(), "tcp", net.JoinHostPort("mixed.example", strconv.Itoa(int(canary.port()))))
			wantDenied(t, err, ClassLoopback)
			var de *DeniedError
			errors.As(err, &de)
			if de.Addr.Addr() != netip.MustParseAddr("127.0.0.1") || de.Host != "mixed.example" {
				t.Fatalf("denied %+v, want host mixed.example and address 127.0.0.1", de)
			}
		})
	}
	if n := canary.connections(); n != 0 {
		t.Fatalf("canary received %d connections, want 0", n)
	}
}

// When every answer is permitted, a failed connection falls back to the next
// checked address (and only to checked addresses).
func TestFallbackToNextCheckedAddress(t *testing.T) {
	canary := listen(t, "127.0.0.1", 0)
	port := canary.port()
	good := listen(t, "127.0.0.3", port)
	// Nothing listens on 127.0.0.2:port: connection refused.
	res := &fakeResolver{answers: [][]string{{"127.0.0.2", "127.0.0.3"}}}
	d := New(Options{DenyPrivate: true, AllowCIDRs: allow127("127.0.0.2", "127.0.0.3"), Resolver: res, Timeout: 5 * time.Second})
	c, err := d.DialContext(context.Background(), "tcp", net.JoinHostPort("two.example", strconv.Itoa(int(port))))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	c.Close()
	if !strings.HasPrefix(c.RemoteAddr().String(), "127.0.0.3:") {
		t.Fatalf("connected to %s, want 127.0.0.3", c.RemoteAddr())
	}
	if good.connections() != 1 || canary.connections() != 0 {
		t.Fatalf("good=%d canary=%d, want 1 and 0", good.connections(), canary.connections())
	}

	// All checked addresses failing gives a plain dial error, not a denial.
	res2 := &fakeResolver{answers: [][]string{{"127.0.0.2"}}}
	d2 := New(Options{DenyPrivate: true, AllowCIDRs: allow127("127.0.0.2"), Resolver: res2})
	_, err = d2.DialContext(context.Background(), "tcp", net.JoinHostPort("closed.example", strconv.Itoa(int(port))))
	if err == nil || errors.Is(err, ErrDenied) || !strings.HasPrefix(err.Error(), "egress: dial ") {
		t.Fatalf("err = %v, want an egress dial error", err)
	}
}

// T-A2: the Control hook sees the real ip:port at connect time. An address
// that skipped the resolution-time check (here handed straight to the
// internal dial step, or dialled by another net.Dialer that installs
// Control) is still refused: 127.0.0.3 is allowed, 127.0.0.1 is not.
func TestControlBlocksUncheckedAddress(t *testing.T) {
	canary := listen(t, "127.0.0.1", 0)
	good := listen(t, "127.0.0.3", canary.port())
	d := New(Options{DenyPrivate: true, AllowCIDRs: allow127("127.0.0.3")})

	_, err := d.dialChecked(context.Background(), "bypass.example", []netip.AddrPort{netip.MustParseAddrPort(canary.Addr().String())})
	wantDenied(t, err, ClassLoopback)

	nd := &net.Dialer{Control: d.Control}
	_, err = nd.Dial("tcp", canary.Addr().String())
	wantDenied(t, err, ClassLoopback)
	_, err = nd.Dial("tcp", net.JoinHostPort("::ffff:127.0.0.1", strconv.Itoa(int(canary.port()))))
	wantDenied(t, err, ClassLoopback)

	c, err := nd.Dial("tcp", good.Addr().String())
	if err != nil {
		t.Fatalf("allowed address refused by Control: %v", err)
	}
	c.Close()
	if n := canary.connections(); n != 0 {
		t.Fatalf("canary received %d connections, want 0", n)
	}
	if err := d.Control("tcp4", "not-an-address", nil); !errors.Is(err, ErrDenied) {
		t.Fatalf("Control(garbage) = %v, want denied", err)
	}
}

// T-A3: the broker never connects to its own listeners, whatever the
// exceptions say, including through an unspecified listen address.
func TestSelfConnectDenied(t *testing.T) {
	self := listen(t, "127.0.0.1", 0)
	for _, tc := range []struct {
		name string
		self string
		dial string
	}{
		{"exact", "127.0.0.1", "127.0.0.1"},
		{"wildcard v4", "0.0.0.0", "127.0.0.1"},
		{"wildcard v6", "::", "127.0.0.1"},
		{"wildcard via 0.0.0.0", "0.0.0.0", "0.0.0.0"},
		{"mapped", "127.0.0.1", "::ffff:127.0.0.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := New(Options{
				DenyPrivate: true,
				AllowCIDRs:  []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")},
				SelfAddrs:   []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr(tc.self), self.port())},
				Resolver:    failResolver{t},
			})
			_, err := d.DialContext(context.Background(), "tcp", net.JoinHostPort(tc.dial, strconv.Itoa(int(self.port()))))
			wantDenied(t, err, ClassSelf)
		})
	}
	if n := self.connections(); n != 0 {
		t.Fatalf("the broker's own listener received %d connections, want 0", n)
	}
}

// T-A3: the dialer ignores proxy environment variables.
func TestNoEnvProxy(t *testing.T) {
	canary := listen(t, "127.0.0.1", 0)
	target := listen(t, "127.0.0.3", canary.port())
	for _, k := range []string{"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"} {
		t.Setenv(k, "http://"+canary.Addr().String())
	}
	t.Setenv("NO_PROXY", "")
	d := New(Options{DenyPrivate: true, AllowCIDRs: allow127("127.0.0.3")})
	c, err := d.DialContext(context.Background(), "tcp", target.Addr().String())
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	c.Close()
	if target.connections() != 1 || canary.connections() != 0 {
		t.Fatalf("target=%d proxy canary=%d, want 1 and 0", target.connections(), canary.connections())
	}
}

// IP literals (any spelling net/netip accepts, zones included) are checked
// without DNS.
func TestIPLiteralSkipsDNS(t *testing.T) {
	d := New(Options{DenyPrivate: true, Resolver: failResolver{t}})
	for _, tc := range []struct {
		addr  string
		class Class
	}{
		{"127.0.0.1:443", ClassLoopback},
		{"[::ffff:127.0.0.1]:443", ClassLoopback},
		{"[::ffff:7f00:1]:443", ClassLoopback},
		{"[64:ff9b::a9fe:a9fe]:80", ClassNAT64},
		{"169.254.169.254:80", ClassLinkLocal},
		{"[fe80::1%lo]:443", ClassLinkLocal},
		{"[::]:443", ClassUnspecified},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			_, err := d.DialContext(context.Background(), "tcp", tc.addr)
			wantDenied(t, err, tc.class)
		})
	}
}

func TestDialRejectsBadInput(t *testing.T) {
	d := New(Options{DenyPrivate: true, Resolver: failResolver{t}})
	for _, tc := range []struct {
		network, addr, want string
	}{
		{"udp", "8.8.8.8:53", `egress: unsupported network "udp"`},
		{"unix", "/run/x.sock", `egress: unsupported network "unix"`},
		{"tcp", "8.8.8.8", "egress: bad address"},
		{"tcp", "8.8.8.8:0", "egress: bad port"},
		{"tcp", "8.8.8.8:https", "egress: bad port"},
		{"tcp", "8.8.8.8:65536", "egress: bad port"},
		{"tcp", ":443", ErrDenied.Error()},
		{"tcp4", "[2606:4700::1]:443", "egress: no ip4 address"},
		{"tcp6", "8.8.8.8:443", "egress: no ip6 address"},
	} {
		t.Run(tc.network+" "+tc.addr, func(t *testing.T) {
			_, err := d.DialContext(context.Background(), tc.network, tc.addr)
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Fatalf("err = %v, want prefix %q", err, tc.want)
			}
		})
	}
}

func TestResolverErrorAndFamilyFilter(t *testing.T) {
	d := New(Options{DenyPrivate: true, Resolver: &fakeResolver{answers: [][]string{{"2606:4700::1"}}}})
	_, err := d.DialContext(context.Background(), "tcp4", "v6only.example:443")
	if err == nil || !strings.Contains(err.Error(), `no ip4 address for "v6only.example"`) {
		t.Fatalf("err = %v", err)
	}
	d = New(Options{DenyPrivate: true, Resolver: &fakeResolver{answers: [][]string{{}}}})
	if _, err = d.DialContext(context.Background(), "tcp", "empty.example:443"); err == nil {
		t.Fatal("empty answer must fail")
	}
	// A real lookup of a name that cannot exist fails with a wrapped error.
	d = New(Options{DenyPrivate: true, Timeout: 2 * time.Second})
	_, err = d.DialContext(context.Background(), "tcp", "no-such-host.invalid:443")
	if err == nil || !strings.HasPrefix(err.Error(), `egress: resolve "no-such-host.invalid"`) {
		t.Fatalf("err = %v", err)
	}
}

type blockingResolver struct{}

func (blockingResolver) LookupNetIP(ctx context.Context, _, _ string) ([]netip.Addr, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func TestTimeoutCoversResolution(t *testing.T) {
	d := New(Options{DenyPrivate: true, Resolver: blockingResolver{}, Timeout: 100 * time.Millisecond})
	start := time.Now()
	_, err := d.DialContext(context.Background(), "tcp", "slow.example:443")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Fatalf("timeout not applied: %v", time.Since(start))
	}
}

func TestDeniedErrorMessage(t *testing.T) {
	d := New(Options{DenyPrivate: true, Resolver: &fakeResolver{answers: [][]string{{"169.254.169.254"}}}})
	for _, tc := range []struct{ addr, want string }{
		{"127.0.0.1:443", "egress: destination denied: loopback address 127.0.0.1:443"},
		{"[::ffff:10.0.0.1]:443", "egress: destination denied: private address 10.0.0.1:443"},
		{"metadata.example:80", `egress: destination denied: "metadata.example" resolves to link_local address 169.254.169.254:80`},
		{":80", "egress: destination denied: unspecified address"},
	} {
		_, err := d.DialContext(context.Background(), "tcp", tc.addr)
		if err == nil || err.Error() != tc.want {
			t.Errorf("DialContext(%s) = %v, want %q", tc.addr, err, tc.want)
		}
	}
}

// TestResolveTimeout (F-16): a resolver that never answers is a DNS failure
// at ResolveTimeout, well inside the dial budget, and nothing is dialled.
func TestResolveTimeout(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    Options
		want time.Duration
	}{
		{"configured", Options{ResolveTimeout: 150 * time.Millisecond}, 150 * time.Millisecond},
		{"default", Options{}, DefaultResolveTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.o.DenyPrivate, tc.o.Resolver, tc.o.Timeout = true, blockingResolver{}, 30*time.Second
			d := New(tc.o)
			start := time.Now()
			_, err := d.DialContext(context.Background(), "tcp", "hung.example:443")
			took := time.Since(start)
			var dnsErr *net.DNSError
			if !errors.As(err, &dnsErr) || !dnsErr.IsTimeout {
				t.Fatalf("err = %v, want a DNS timeout", err)
			}
			if took < tc.want || took > tc.want+2*time.Second {
				t.Fatalf("failed after %v, want about %v", took, tc.want)
			}
		})
	}
}
