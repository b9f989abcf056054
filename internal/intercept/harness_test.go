package intercept

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/keygate/broker/internal/attest"
	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
	"github.com/keygate/broker/internal/inject"
	"github.com/keygate/broker/internal/intercept/ca"
	"github.com/keygate/broker/internal/intercept/egress"
	"github.com/keygate/broker/internal/rules"
)

// recorder is an upstream that records what reached it. The upstreams here
// are httptest servers: they stand in for public APIs, which cannot run on
// this machine; the real-binary tests in integration/ use curl and git.
type recorder struct {
	mu    sync.Mutex
	reqs  []*http.Request
	auths [][]string
	srv   *httptest.Server
}

func (r *recorder) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	r.reqs = append(r.reqs, req)
	r.auths = append(r.auths, req.Header.Values("Authorization"))
	r.mu.Unlock()
	w.Header().Set("Content-Type", "text/plain")
	_, _ = io.WriteString(w, "upstream ok "+req.URL.Path)
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.reqs)
}

func (r *recorder) last() *http.Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.reqs) == 0 {
		return nil
	}
	return r.reqs[len(r.reqs)-1]
}

func newTLSRecorder(t *testing.T) *recorder {
	t.Helper()
	r := &recorder{}
	r.srv = httptest.NewTLSServer(r)
	t.Cleanup(r.srv.Close)
	return r
}

func newPlainRecorder(t *testing.T) *recorder {
	t.Helper()
	r := &recorder{}
	r.srv = httptest.NewServer(r)
	t.Cleanup(r.srv.Close)
	return r
}

func (r *recorder) port(t *testing.T) int {
	u, err := url.Parse(r.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	p, _ := strconv.Atoi(u.Port())
	return p
}

// harness is a Proxy built from the real parts (cidr attestor, compiled
// CEL rules, static source, injectors, egress dialer, ephemeral CA) with its
// logs captured for the canary sweep.
type harness struct {
	t        *testing.T
	proxy    *Proxy
	addr     string
	ca       *ca.CA
	logs     *observer.ObservedLogs
	reg      *prometheus.Registry
	metrics  *Metrics
	canary   string
	seen     []string // every response head and body a client got
	seenMu   sync.Mutex
	upRoots  *x509.CertPool
	mints    *int
	sources  map[string]broker.Source
	attestor broker.Attestor

	clientOnce sync.Once
	cl         *http.Client

	taddr     string   // transparent listener, when harnessOpts.transparent
	redirects sync.Map // client local addr -> original destination
}

type harnessOpts struct {
	rules   []rules.Spec
	sources map[string]broker.Source // extra or replacement sources
	limits  Limits
	// maxTunnels and mintsPerSecond, when set, replace the defaults of
	// the broker-wide caps (Options.Tunnels, Options.Mints).
	maxTunnels, mintsPerSecond int
	roots                      []*httptest.Server // upstream TLS servers to trust
	allow                      []string           // egress allow-list; default 127.0.0.1/32
	attest                     broker.Attestor    // default: cidr 127.0.0.0/8 -> "local-test"
	deleg                      Delegator
	clock                      broker.Clock // default the wall clock
	// transparent also serves a transparent listener (h.taddr) whose
	// original destinations come from h.redirect, not from a NAT table.
	transparent bool
	resolver    egress.Resolver // default net.DefaultResolver
	// wrapLeaves, when set, wraps the leaf source (to make it fail).
	wrapLeaves func(LeafSource) LeafSource
}

// newCanary is a credential value registered for the suite-wide sweep.
func newCanary(label string) string { return canarytest.New(label) }

func newHarness(t *testing.T, o harnessOpts) *harness {
	t.Helper()
	h := &harness{t: t, canary: newCanary("intercept token (" + t.Name() + ")"), reg: prometheus.NewRegistry()}
	obsCore, logs := observer.New(zap.DebugLevel)
	h.logs = logs
	// Every log and audit entry is also swept for every registered canary.
	core := zapcore.NewTee(obsCore, canarytest.ZapCore("intercept log ("+t.Name()+")"))
	h.metrics = NewMetrics(h.reg)
	authority, err := ca.Ephemeral("", broker.SystemClock{})
	if err != nil {
		t.Fatal(err)
	}
	h.ca = authority
	mints := 0
	h.mints = &mints
	var mintMu sync.Mutex
	leaves := authority.Leaves(ca.LeafOptions{OnMint: func() {
		mintMu.Lock()
		mints++
		mintMu.Unlock()
		h.metrics.LeafCache.WithLabelValues("mint").Inc()
	}})
	var leafSrc LeafSource = leaves
	if o.wrapLeaves != nil {
		leafSrc = o.wrapLeaves(leaves)
	}
	h.upRoots = x509.NewCertPool()
	for _, s := range o.roots {
		h.upRoots.AddCert(s.Certificate())
	}
	cidr, err := attest.NewCIDR([]attest.CIDREntry{{ID: "local-test", CIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}})
	if err != nil {
		t.Fatal(err)
	}
	h.attestor = attest.NewChain(nil, attest.Named{Name: "cidr", Attestor: cidr})
	if o.attest != nil {
		h.attestor = o.attest
	}
	h.sources = map[string]broker.Source{
		"token": inject.NewStatic("token", map[string]broker.Secret{broker.FieldToken: broker.NewSecret(h.canary)}),
	}
	for k, v := range o.sources {
		h.sources[k] = v
	}
	set, errs := rules.Compile(o.rules, rules.Options{ConnectPorts: ports(o.roots, t)})
	if len(errs) > 0 {
		t.Fatalf("rules: %v", errs)
	}
	allow := o.allow
	if allow == nil {
		allow = []string{"127.0.0.1/32"}
	}
	var prefixes []netip.Prefix
	for _, a := range allow {
		prefixes = append(prefixes, netip.MustParsePrefix(a))
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.addr = ln.Addr().String()
	dialer := egress.New(egress.Options{DenyPrivate: true, AllowCIDRs: prefixes, Resolver: o.resolver,
		SelfAddrs: []netip.AddrPort{netip.MustParseAddrPort(h.addr)}})
	p, err := New(Options{
		Pipeline:      &broker.Pipeline{Attestor: h.attestor, Policy: set, Sources: h.sources},
		Dialer:        dialer,
		Leaves:        leafSrc,
		UpstreamRoots: h.upRoots,
		Fingerprints:  broker.NewFingerprinter(),
		Logger:        zap.New(core),
		Metrics:       h.metrics,
		Limits:        o.limits,
		Tunnels:       NewTunnelCap(o.maxTunnels, h.metrics.TunnelsOpen),
		Mints:         NewMintLimiter(o.mintsPerSecond, 0, o.clock),
		Delegation:    o.deleg,
		Clock:         o.clock,
		Transparent:   o.transparent,
	})
	if err != nil {
		t.Fatal(err)
	}
	h.proxy = p
	go func() { _ = p.Serve(ln) }()
	if o.transparent {
		tln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		h.taddr = tln.Addr().String()
		p.origDst = h.lookupRedirect
		go func() { _ = p.ServeTransparent(tln) }()
		t.Cleanup(func() { _ = tln.Close() })
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if h.cl != nil {
			h.cl.CloseIdleConnections()
		}
		_ = p.Shutdown(ctx)
		h.assertNoCanary()
	})
	return h
}

// ports lists the upstream ports so rules without `ports` match them.
func ports(srvs []*httptest.Server, t *testing.T) []int {
	out := []int{443}
	for _, s := range srvs {
		u, _ := url.Parse(s.URL)
		p, _ := strconv.Atoi(u.Port())
		out = append(out, p)
	}
	return out
}

// assertNoCanary is the secret sweep: the credential value, and its
// base64 and URL-encoded forms, must appear in no log line and no response
// a workload received.
func (h *harness) assertNoCanary() {
	forms := []string{h.canary, base64.StdEncoding.EncodeToString([]byte(h.canary)), url.QueryEscape(h.canary)}
	var texts []string
	for _, e := range h.logs.All() {
		texts = append(texts, e.Message)
		for k, v := range e.ContextMap() {
			texts = append(texts, k+"="+fmt.Sprint(v))
		}
	}
	h.seenMu.Lock()
	texts = append(texts, h.seen...)
	h.seenMu.Unlock()
	metricsText, _ := testutil.CollectAndFormat(h.reg, expfmt.TypeTextPlain)
	texts = append(texts, string(metricsText))
	canarytest.Observe("intercept metrics ("+h.t.Name()+")", metricsText)
	for i, s := range texts {
		for _, f := range forms {
			if strings.Contains(s, f) {
				// The text is not printed: it holds the secret.
				h.t.Errorf("canary leaked in captured text #%d of %d (logs, responses, metrics)", i, len(texts))
			}
		}
	}
}

func (h *harness) record(s string) {
	canarytest.ObserveString("intercept response ("+h.t.Name()+")", s)
	h.seenMu.Lock()
	h.seen = append(h.seen, s)
	h.seenMu.Unlock()
}

// client is a Go client configured like a workload: the broker as proxy and
// the broker CA as its only root.
func (h *harness) client() *http.Client {
	h.clientOnce.Do(func() { h.cl = h.newClient() })
	return h.cl
}

func (h *harness) newClient() *http.Client {
	pool := x509.NewCertPool()
	pool.AddCert(h.ca.Certificate())
	pu, _ := url.Parse("http://" + h.addr)
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			Proxy:           http.ProxyURL(pu),
			TLSClientConfig: &tls.Config{RootCAs: pool},
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

func (h *harness) do(req *http.Request) (*http.Response, string) {
	h.t.Helper()
	resp, err := h.client().Do(req)
	if err != nil {
		h.t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	h.record(fmt.Sprint(resp.Header) + string(b))
	return resp, string(b)
}

// tunnelConn opens CONNECT authority and, when serverName is not "-",
// completes TLS with that SNI (trusting the broker CA).
func (h *harness) connect(authority string) (net.Conn, *bufio.Reader, *http.Response) {
	h.t.Helper()
	c, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", authority, authority)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		h.t.Fatalf("CONNECT %s: %v", authority, err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		h.record(fmt.Sprint(resp.Header) + string(b))
		resp.Body = io.NopCloser(strings.NewReader(string(b)))
	}
	return c, br, resp
}

// tunnel opens an intercepted tunnel to authority (an IP literal) and
// completes TLS inside it.
func (h *harness) tunnel(authority string) *tls.Conn {
	h.t.Helper()
	c, _, resp := h.connect(authority)
	if resp.StatusCode != http.StatusOK {
		h.t.Fatalf("CONNECT %s: %d", authority, resp.StatusCode)
	}
	tc, err := h.tlsOver(c, "127.0.0.1")
	if err != nil {
		h.t.Fatal(err)
	}
	return tc
}

func (h *harness) tlsOver(c net.Conn, sni string) (*tls.Conn, error) {
	pool := x509.NewCertPool()
	pool.AddCert(h.ca.Certificate())
	tc := tls.Client(c, &tls.Config{RootCAs: pool, ServerName: sni, NextProtos: []string{"http/1.1"}})
	return tc, tc.Handshake()
}

// rawRequest writes raw bytes on a conn and reads one response.
func (h *harness) rawRequest(c net.Conn, raw string) *http.Response {
	h.t.Helper()
	if _, err := io.WriteString(c, raw); err != nil {
		h.t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		h.t.Fatalf("reading response to %q: %v", raw, err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	h.record(fmt.Sprint(resp.Header) + string(b))
	resp.Body = io.NopCloser(strings.NewReader(string(b)))
	return resp
}

func (h *harness) auditLines() []map[string]any {
	var out []map[string]any
	for _, e := range h.logs.FilterMessage("decision").All() {
		out = append(out, e.ContextMap())
	}
	return out
}

func bearerRule(name, host string) rules.Spec {
	return rules.Spec{Name: name, Hosts: []string{host}, Inject: &broker.Injection{Credential: "token", Injector: inject.Bearer()}}
}

// lookupRedirect plays the kernel's SO_ORIGINAL_DST for connections made
// with redirectDial (the client registers right after connect returns, so
// the server side may have to wait a moment).
func (h *harness) lookupRedirect(c net.Conn) (netip.AddrPort, bool) {
	key := c.RemoteAddr().String()
	for i := 0; i < 200; i++ {
		if v, ok := h.redirects.Load(key); ok {
			return v.(netip.AddrPort), true
		}
		time.Sleep(5 * time.Millisecond)
	}
	return netip.AddrPort{}, false
}

// redirectDial connects to the transparent listener as if an iptables
// REDIRECT had sent a connection for orig there.
func (h *harness) redirectDial(orig string) net.Conn {
	h.t.Helper()
	c, err := net.Dial("tcp", h.taddr)
	if err != nil {
		h.t.Fatal(err)
	}
	h.redirects.Store(c.LocalAddr().String(), netip.MustParseAddrPort(orig))
	h.t.Cleanup(func() { _ = c.Close() })
	return c
}
