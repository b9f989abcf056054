package intercept

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/elazarl/goproxy"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/origdst"
)

// EgressDialer is the one egress path (package egress implements it). Check
// classifies an address without dialling, for IP-literal targets.
type EgressDialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
	Check(addr netip.AddrPort) error
}

// LeafSource returns a certificate for a normalised host; package ca's
// LeafCache implements it.
type LeafSource interface {
	Get(host string) (*tls.Certificate, error)
}

// Limits bound what one workload connection can cost.
type Limits struct {
	ReadHeaderTimeout time.Duration // front door and inside tunnels; default 10s
	IdleTimeout       time.Duration // keep-alive idle; default 120s
	MaxHeaderBytes    int           // request line + headers, exactly; default 64 KiB
	MaxHeaderCount    int           // header fields per request, Host included; default 200
	HandshakeTimeout  time.Duration // workload TLS handshake in a tunnel; default 10s
	UpstreamTimeout   time.Duration // wait for upstream response headers; default 60s
}

func (l Limits) withDefaults() Limits {
	if l.ReadHeaderTimeout <= 0 {
		l.ReadHeaderTimeout = 10 * time.Second
	}
	if l.IdleTimeout <= 0 {
		l.IdleTimeout = 120 * time.Second
	}
	if l.MaxHeaderBytes <= 0 {
		l.MaxHeaderBytes = 64 << 10
	}
	if l.MaxHeaderCount <= 0 {
		l.MaxHeaderCount = DefaultMaxHeaderCount
	}
	if l.HandshakeTimeout <= 0 {
		l.HandshakeTimeout = 10 * time.Second
	}
	if l.UpstreamTimeout <= 0 {
		l.UpstreamTimeout = 60 * time.Second
	}
	return l
}

// httpMaxHeaderBytes is the http.Server setting that makes limit the real
// limit: net/http reads up to MaxHeaderBytes plus 4096 bytes of slack
// before answering 431. Below that slack the framing guard still refuses a
// longer head exactly (then with 400).
func httpMaxHeaderBytes(limit int) int {
	return max(limit-4096, 1)
}

// Options configure a Proxy. Pipeline, Dialer, Leaves and Logger are
// required.
type Options struct {
	Listener      string // name in the audit line, e.g. "proxy"
	Pipeline      *broker.Pipeline
	Dialer        EgressDialer
	Leaves        LeafSource
	UpstreamRoots *x509.CertPool // nil: system roots
	Fingerprints  *broker.Fingerprinter
	Logger        *zap.Logger
	Metrics       *Metrics // may be nil
	Limits        Limits
	Clock         broker.Clock
	Delegation    Delegator // nil: on-behalf-of tokens are not accepted
	// Transparent prepares ServeTransparent: the broker's own upstream
	// connections are remembered so a redirect loop is detected.
	Transparent bool
	// Tunnels and Mints are shared by every listener of one broker, so the
	// caps hold for the broker as a whole; nil builds one with the defaults
	// (DefaultMaxTunnels, DefaultLeafMintsPerSecond).
	Tunnels *TunnelCap
	Mints   *MintLimiter
}

// Delegator verifies the on-behalf-of user token carried in Header();
// package attest's Delegation implements it.
type Delegator interface {
	Header() string
	Delegate(ctx context.Context, raw broker.Secret) (broker.Delegator, error)
}

// Proxy is the explicit-proxy listener: absolute-form http:// requests and
// CONNECT, with interception under the broker CA.
type Proxy struct {
	opts   Options
	limits Limits
	log    *zap.Logger
	gp     *goproxy.ProxyHttpServer
	tr     *http.Transport
	srv    *http.Server

	tunnels *TunnelCap
	mints   *MintLimiter

	// pipe is swapped whole on reload; every exchange loads it once, so a
	// decision in flight completes under the snapshot it started with.
	pipe atomic.Pointer[broker.Pipeline]

	mu       sync.Mutex
	hijacked map[net.Conn]struct{}
	inner    map[*http.Server]*oneConnListener // per-tunnel servers, for graceful shutdown
	closed   bool
	loops    *loopGuard // nil unless Options.Transparent
	// origDst recovers a redirected connection's destination; tests
	// replace it because SO_ORIGINAL_DST needs a real NAT redirect.
	origDst func(net.Conn) (netip.AddrPort, bool)
}

// SetPipeline swaps in a new pipeline (a reloaded config). Requests already
// being decided keep the one they started with.
func (p *Proxy) SetPipeline(pipe *broker.Pipeline) {
	if pipe != nil {
		p.pipe.Store(pipe)
	}
}

// New builds a Proxy. It refuses options that would fail open.
func New(o Options) (*Proxy, error) {
	switch {
	case o.Pipeline == nil:
		return nil, errors.New("intercept: no pipeline")
	case o.Dialer == nil:
		return nil, errors.New("intercept: no egress dialer")
	case o.Leaves == nil:
		return nil, errors.New("intercept: no leaf certificate source")
	case o.Logger == nil:
		return nil, errors.New("intercept: no logger")
	}
	if o.Listener == "" {
		o.Listener = "proxy"
	}
	if o.Clock == nil {
		o.Clock = broker.SystemClock{}
	}
	p := &Proxy{opts: o, limits: o.Limits.withDefaults(), log: o.Logger, hijacked: map[net.Conn]struct{}{}, inner: map[*http.Server]*oneConnListener{}}
	p.pipe.Store(o.Pipeline)
	p.tunnels, p.mints = o.Tunnels, o.Mints
	if p.tunnels == nil {
		var g prometheus.Gauge
		if o.Metrics != nil {
			g = o.Metrics.TunnelsOpen
		}
		p.tunnels = NewTunnelCap(0, g)
	}
	if p.mints == nil {
		p.mints = NewMintLimiter(0, 0, o.Clock)
	}
	if o.Transparent {
		p.loops = &loopGuard{}
		p.opts.Dialer = p.loops.dialer(o.Dialer)
		p.origDst = origdst.Get
	}
	p.tr = newTransport(p.opts.Dialer, o.UpstreamRoots, p.limits)
	p.gp = p.newGoproxy()
	p.srv = &http.Server{
		Handler:           http.HandlerFunc(p.serveFront),
		ReadHeaderTimeout: p.limits.ReadHeaderTimeout,
		IdleTimeout:       p.limits.IdleTimeout,
		MaxHeaderBytes:    httpMaxHeaderBytes(p.limits.MaxHeaderBytes),
		ErrorLog:          httpErrorLog(p.log),
		ConnState:         p.trackConnState,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, c)
		},
	}
	return p, nil
}

// newTransport is the upstream client: the egress dialer, verified TLS, no
// environment proxy, no redirects (a Transport never follows them), no
// transparent decompression (the workload's Accept-Encoding passes through).
func newTransport(d EgressDialer, roots *x509.CertPool, l Limits) *http.Transport {
	return &http.Transport{
		Proxy:                  nil,
		DialContext:            d.DialContext,
		TLSClientConfig:        &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout:    10 * time.Second,
		ResponseHeaderTimeout:  l.UpstreamTimeout,
		ExpectContinueTimeout:  time.Second,
		MaxIdleConns:           256,
		MaxIdleConnsPerHost:    64,
		IdleConnTimeout:        90 * time.Second,
		MaxResponseHeaderBytes: 1 << 20,
		DisableCompression:     true,
		ForceAttemptHTTP2:      true,
	}
}

// newGoproxy configures goproxy so none of its unsafe defaults survive: no
// environment proxy for CONNECT or requests, our verified transport, no
// built-in CA (every CONNECT is hijacked by our own handler), and a logger
// that never prints goproxy's arguments (they can hold URLs with queries).
func (p *Proxy) newGoproxy() *goproxy.ProxyHttpServer {
	gp := goproxy.NewProxyHttpServer()
	gp.Tr = p.tr
	gp.ConnectDial = nil
	gp.ConnectDialWithReq = func(req *http.Request, network, addr string) (net.Conn, error) {
		return nil, errors.New("intercept: goproxy must not dial CONNECT targets itself")
	}
	gp.Logger = goproxyLogger{log: p.log.Named("goproxy")}
	gp.Verbose = false
	gp.KeepAcceptEncoding = true
	gp.KeepDestinationHeaders = false
	gp.PreventCanonicalization = false
	gp.AllowHTTP2 = false
	gp.NonproxyHandler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, broker.NewError(broker.CodeBadRequest, "not a proxy request", nil), "")
	})
	gp.OnRequest().HandleConnectFunc(p.onConnect)
	gp.OnRequest().DoFunc(p.onRequest)
	gp.OnResponse().DoFunc(p.onResponse)
	return gp
}

// connKey carries the accepted connection to attestors that need it (peer
// credentials of the process behind a local socket).
type connKey struct{}

type goproxyLogger struct{ log *zap.Logger }

func (l goproxyLogger) Printf(format string, _ ...any) {
	l.log.Debug("goproxy", zap.String("format", format))
}

// Serve accepts workload connections on ln until Shutdown.
func (p *Proxy) Serve(ln net.Listener) error {
	err := p.srv.Serve(framingListener{Listener: ln, p: p})
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("intercept: serve %s: %w", p.opts.Listener, err)
}

// Shutdown stops accepting and lets requests in flight finish until ctx
// ends: plain requests, and the request in progress inside each intercepted
// tunnel (idle tunnels close at once). Opaque tunnels, and whatever is still
// open when ctx ends, are closed. A request is either completed with its
// credential or cut before it reaches the upstream: injection happens only
// as a request is forwarded, never on a connection being drained.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.closed = true
	inner := make([]*http.Server, 0, len(p.inner))
	for s, ln := range p.inner {
		inner = append(inner, s)
		ln.closeIfIdle()
	}
	p.mu.Unlock()

	var wg sync.WaitGroup
	var err error
	wg.Add(1)
	go func() {
		defer wg.Done()
		err = p.srv.Shutdown(ctx)
	}()
	for _, s := range inner {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = s.Shutdown(ctx)
		}()
	}
	wg.Wait()

	p.mu.Lock()
	for c := range p.hijacked {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.tr.CloseIdleConnections()
	return err
}

// trackInner registers a tunnel's server for graceful shutdown; false means
// the proxy is shutting down and the tunnel must not start serving.
func (p *Proxy) trackInner(s *http.Server, ln *oneConnListener) (untrack func(), ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, false
	}
	p.inner[s] = ln
	return func() {
		p.mu.Lock()
		delete(p.inner, s)
		p.mu.Unlock()
	}, true
}

// Transport exposes the upstream transport for tests that assert it never
// reads the environment.
func (p *Proxy) Transport() *http.Transport { return p.tr }

func (p *Proxy) trackConnState(_ net.Conn, s http.ConnState) {
	if p.opts.Metrics == nil {
		return
	}
	g := p.opts.Metrics.Active.WithLabelValues(p.opts.Listener)
	switch s {
	case http.StateNew:
		g.Inc()
	case http.StateClosed:
		g.Dec()
	}
	// A hijacked connection stays counted until its tunnel ends (see hijack).
}

// hijack registers a tunnel connection so Shutdown can close it; the
// returned func unregisters it.
func (p *Proxy) hijack(c net.Conn) (done func(), ok bool) { return p.track(c, p.opts.Listener) }

// track is hijack for a connection counted under listener.
func (p *Proxy) track(c net.Conn, listener string) (done func(), ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, false
	}
	p.hijacked[c] = struct{}{}
	return func() {
		p.mu.Lock()
		delete(p.hijacked, c)
		p.mu.Unlock()
		if p.opts.Metrics != nil {
			p.opts.Metrics.Active.WithLabelValues(listener).Dec()
		}
	}, true
}

// httpErrorLog sends net/http's own messages (TLS handshake errors, bad
// requests) to the debug level: they are noise at scale and the audit line
// already records each outcome.
func httpErrorLog(l *zap.Logger) *log.Logger {
	std, err := zap.NewStdLogAt(l.Named("http"), zap.DebugLevel)
	if err != nil {
		return log.New(io.Discard, "", 0)
	}
	return std
}
