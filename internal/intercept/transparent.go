package intercept

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
)

// Transparent mode (listen.transparent): connections an iptables/nft
// REDIRECT sent to the broker. Nothing tells the broker where they were
// going except the kernel (SO_ORIGINAL_DST) and the first bytes:
//
//   - a TLS ClientHello with SNI: the name and the original port are decided
//     like a CONNECT (deny, tunnel, intercept); the upstream is dialled by
//     that name through the egress dialer, so the bytes (and any credential)
//     go to an address the name resolves to and the guard allows, never to
//     the original address when the name does not resolve to it;
//   - TLS without SNI, or a protocol the broker does not speak: only a rule
//     for the original address and port may tunnel it; nothing is
//     intercepted without a name;
//   - plain HTTP: each request is decided by its Host header and the
//     original port, like an absolute-form request to the explicit proxy.
//
// The first bytes are peeked, never consumed: the TLS handshake or the HTTP
// request is then served from the same buffer.

// ProtocolTCP is the Target protocol of an opaque transparent connection.
const ProtocolTCP = "tcp"

// ListenerTransparent names the transparent listener in the audit line.
const ListenerTransparent = "transparent"

// peekWait bounds the wait for the first byte. Protocols where the server
// speaks first (SMTP, MySQL) send nothing; after peekWait such a
// connection is decided on its original address and port alone.
const peekWait = time.Second

// maxPeek bounds the ClientHello read to find the SNI (a handshake message
// is at most 16 MiB in theory; real ClientHellos, even with post-quantum key
// shares, fit in a few KiB).
const maxPeek = 64 << 10

// ErrLoop is returned by the broker's own upstream connections that an
// iptables rule without the broker's exemption sent back to the broker.
var ErrLoop = errors.New("intercept: the broker's own connection was redirected back to itself (is the broker's uid exempt from the redirect?)")

// ServeTransparent accepts redirected connections on ln until Shutdown.
func (p *Proxy) ServeTransparent(ln net.Listener) error {
	if p.loops == nil {
		return errors.New("intercept: transparent mode needs Options.Transparent")
	}
	var tempDelay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if p.isClosed() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				tempDelay = min(max(2*tempDelay, 5*time.Millisecond), time.Second)
				time.Sleep(tempDelay)
				continue
			}
			return fmt.Errorf("intercept: serve %s: %w", ListenerTransparent, err)
		}
		tempDelay = 0
		go p.serveTransparent(c)
	}
}

func (p *Proxy) isClosed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

func (p *Proxy) serveTransparent(c net.Conn) {
	done, ok := p.track(c, ListenerTransparent)
	if !ok {
		_ = c.Close()
		return
	}
	if p.opts.Metrics != nil {
		p.opts.Metrics.Active.WithLabelValues(ListenerTransparent).Inc()
	}
	defer done()
	defer c.Close()

	x := p.newExchange(ListenerTransparent)
	defer p.finish(x)
	defer func() {
		if v := recover(); v != nil {
			p.log.Error("panic serving a transparent connection", zap.String("request_id", x.rec.RequestID), zap.String("panic_type", broker.PanicKind(v)), zap.Stack("stack"))
			x.fail(broker.NewError(broker.CodeInternal, "internal error", nil))
		}
	}()

	orig, ok := p.origDst(c)
	local := tcpAddrPortOf(c.LocalAddr())
	remote := tcpAddrPortOf(c.RemoteAddr())
	if !ok || orig == local {
		// Not redirected: someone dialled the transparent port directly.
		x.fail(broker.NewError(broker.CodeBadRequest, "not a redirected connection (no original destination)", nil))
		return
	}
	if p.loops.seen(remote) {
		x.fail(broker.NewError(broker.CodeLoopDetected, "the broker's own connection was redirected back to it", ErrLoop))
		return
	}
	x.rec.Host, x.rec.Port = orig.Addr().String(), int(orig.Port())
	// Every redirected connection holds a tunnel slot, whatever it turns
	// out to carry; past the cap it is closed before a byte is read.
	release, ok := p.tunnels.acquire()
	if !ok {
		x.fail(errTunnelLimit())
		return
	}
	defer release()

	br := bufio.NewReaderSize(c, 4096)
	_ = c.SetReadDeadline(p.opts.Clock.Now().Add(peekWait))
	first, _ := br.Peek(1)
	_ = c.SetReadDeadline(time.Time{})
	// The broker's own dial registers its local address when connect()
	// returns, which may be just after this accept; by the time it has
	// written its first byte it is registered.
	if p.loops.seen(remote) {
		x.fail(broker.NewError(broker.CodeLoopDetected, "the broker's own connection was redirected back to it", ErrLoop))
		return
	}

	ev := broker.Evidence{Listener: ListenerTransparent, Remote: remote, Local: orig, Conn: c}
	id, err := x.pipe.Attest(context.Background(), ev)
	if err != nil {
		x.fail(err)
		return
	}
	x.setIdentity(id)
	pc := &peekedConn{Conn: c, r: br}

	switch {
	case len(first) == 1 && first[0] == tlsRecordHandshake:
		x.rec.Protocol = broker.ProtocolHTTPS
		sni, err := peekSNI(c, br, p.opts.Clock.Now().Add(p.limits.HandshakeTimeout))
		if err != nil {
			x.fail(broker.NewError(broker.CodeBadRequest, "could not read the TLS ClientHello", err))
			return
		}
		if sni == "" {
			p.transparentOpaque(pc, x, orig)
			return
		}
		host, err := NormalizeHost(sni)
		if err != nil {
			x.fail(broker.NewError(broker.CodeBadRequest, "invalid TLS server name", err))
			return
		}
		p.transparentTLS(pc, br, x, host, int(orig.Port()))
	case len(first) == 1 && looksLikeHTTP(br):
		x.rec.Protocol = broker.ProtocolHTTP
		p.transparentHTTP(pc, x, orig)
	default:
		x.rec.Protocol = ProtocolTCP
		p.transparentOpaque(pc, x, orig)
	}
}

// transparentTLS decides a named TLS connection like a CONNECT.
func (p *Proxy) transparentTLS(c *peekedConn, br *bufio.Reader, x *exchange, host string, port int) {
	switch p.decideConnect(x, broker.ProtocolHTTPS, host, port, true) {
	case broker.Tunnel:
		p.spliceTo(context.Background(), c, x, host, port)
	case broker.Allow:
		if err := p.admitMint(x.identity, host); err != nil {
			x.rec.Decision = broker.AuditDeny
			x.fail(err)
			return
		}
		x.rec.Status = http.StatusOK
		p.serveTLS(c.Conn, br, x, host, port)
	}
}

// transparentOpaque handles what has no name: TLS without SNI and other
// TCP. Only a tunnel rule for the original address and port lets it pass.
func (p *Proxy) transparentOpaque(c *peekedConn, x *exchange, orig netip.AddrPort) {
	host, port := orig.Addr().Unmap().String(), int(orig.Port())
	if p.decideConnect(x, x.rec.Protocol, host, port, false) == broker.Tunnel {
		p.spliceTo(context.Background(), c, x, host, port)
	}
}

// decideConnect makes the connect-phase decision for a redirected
// connection and records it; a denial (returned as broker.Deny) is already
// recorded as the exchange's error. Without a name (canIntercept false) an
// allow that would intercept is a denial: only tunnels pass.
func (p *Proxy) decideConnect(x *exchange, protocol, host string, port int, canIntercept bool) broker.Action {
	x.rec.Host, x.rec.Port = host, port
	if err := p.checkLiteral(host, port); err != nil {
		x.fail(err)
		return broker.Deny
	}
	t := broker.Target{Phase: broker.PhaseConnect, Protocol: protocol, Host: host, Port: port}
	d, err := x.pipe.Decide(context.Background(), x.identity, t)
	x.rec.Rule = d.Rule
	if err != nil {
		x.fail(err)
		return broker.Deny
	}
	switch {
	case d.Action == broker.Tunnel:
		x.rec.Decision = broker.AuditTunnel
	case d.Action == broker.Allow && canIntercept:
		x.rec.Decision = broker.AuditAllow
	case d.Action == broker.Allow:
		x.fail(broker.NewError(broker.CodeDenied, "a connection without a TLS server name can only be tunnelled, never intercepted", nil))
		return broker.Deny
	default:
		x.fail(broker.NewError(broker.CodeDenied, "no rule allows this connection", nil))
	}
	return d.Action
}

// transparentHTTP serves plain HTTP requests, each decided on its Host and
// the original port.
func (p *Proxy) transparentHTTP(c *peekedConn, conn *exchange, orig netip.AddrPort) {
	conn.rec.Decision = broker.AuditAllow
	conn.rec.Status = http.StatusOK
	port := int(orig.Port())
	p.serveConn(c, http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		w := &statusWriter{ResponseWriter: rw}
		x := p.newExchange(ListenerTransparent)
		x.setIdentity(conn.identity)
		x.rec.Protocol, x.rec.Method, x.rec.Path = broker.ProtocolHTTP, r.Method, r.URL.Path
		defer p.finish(x)
		defer p.recoverPanic(w, x)
		if err := p.checkRequest(r); err != nil {
			refuseAndClose(w, x.fail(err), x.rec.RequestID)
			return
		}
		if r.Method == http.MethodConnect || r.URL.IsAbs() {
			refuseAndClose(w, x.fail(broker.NewError(broker.CodeBadRequest, "a redirected connection carries origin-form requests only", nil)), x.rec.RequestID)
			return
		}
		host, hp, err := SplitHostPort(r.Host, port)
		if err != nil || r.Host == "" {
			writeError(w, x.fail(broker.NewError(broker.CodeBadRequest, "missing or invalid Host header", err)), x.rec.RequestID)
			return
		}
		if hp != port {
			writeError(w, x.fail(broker.NewError(broker.CodeMisdirected, "the Host port differs from the original destination port", nil)), x.rec.RequestID)
			return
		}
		id, err := p.delegate(r, conn.identity)
		if err != nil {
			writeError(w, x.fail(err), x.rec.RequestID)
			return
		}
		x.setIdentity(id)
		r = r.WithContext(withExchange(r.Context(), x))
		p.forward(w, r, x, host, port, "http")
	}))
}

// looksLikeHTTP reports whether the buffered bytes start an HTTP/1 request
// line: a method token of upper-case letters and a space.
func looksLikeHTTP(br *bufio.Reader) bool {
	b, _ := br.Peek(8)
	for i, ch := range b {
		switch {
		case ch == ' ':
			return i >= 3
		case ch < 'A' || ch > 'Z':
			return false
		}
	}
	return false
}

// peekSNI reads (without consuming) as much of the buffered connection as
// the ClientHello needs and returns its server name ("" when absent).
// crypto/tls parses the hello; the handshake is abandoned right after.
func peekSNI(c net.Conn, br *bufio.Reader, deadline time.Time) (string, error) {
	_ = c.SetReadDeadline(deadline)
	defer c.SetReadDeadline(time.Time{})
	var sni string
	var got bool
	stop := errors.New("hello read")
	tc := tls.Server(&helloConn{br: br}, &tls.Config{
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			sni, got = h.ServerName, true
			return nil, stop
		},
	})
	err := tc.Handshake()
	if got {
		return sni, nil
	}
	if err == nil {
		err = errors.New("no ClientHello")
	}
	return "", err
}

// helloConn feeds crypto/tls the buffered bytes through Peek, so nothing is
// consumed; writes (alerts) are discarded.
type helloConn struct {
	br  *bufio.Reader
	off int
}

func (h *helloConn) Read(b []byte) (int, error) {
	if h.off >= maxPeek || h.off >= h.br.Size() {
		return 0, errors.New("intercept: ClientHello larger than the peek limit")
	}
	// Block for one more byte than already returned, then hand over all
	// that is buffered: asking Peek for len(b) would wait for bytes the
	// client only sends after our (never sent) ServerHello.
	if _, err := h.br.Peek(h.off + 1); err != nil {
		return 0, err
	}
	buf, _ := h.br.Peek(h.br.Buffered())
	n := copy(b, buf[h.off:])
	h.off += n
	return n, nil
}

func (h *helloConn) Write(b []byte) (int, error)        { return len(b), nil }
func (h *helloConn) Close() error                       { return nil }
func (h *helloConn) LocalAddr() net.Addr                { return &net.TCPAddr{} }
func (h *helloConn) RemoteAddr() net.Addr               { return &net.TCPAddr{} }
func (h *helloConn) SetDeadline(t time.Time) error      { return nil }
func (h *helloConn) SetReadDeadline(t time.Time) error  { return nil }
func (h *helloConn) SetWriteDeadline(t time.Time) error { return nil }

func tcpAddrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// loopGuard remembers the local addresses of the broker's own upstream
// connections while they are open. A transparent connection arriving from
// one of them is the broker talking to itself: a redirect rule without the
// broker's exemption. Both ends are failed at once instead of recursing
// until file descriptors run out.
type loopGuard struct {
	conns sync.Map // netip.AddrPort -> *guardedConn
}

func (g *loopGuard) seen(remote netip.AddrPort) bool {
	v, ok := g.conns.Load(remote)
	if !ok {
		return false
	}
	v.(*guardedConn).looped.Store(true)
	_ = v.(*guardedConn).Conn.Close()
	return true
}

// dialer wraps the egress dialer so every upstream connection is known.
func (g *loopGuard) dialer(d EgressDialer) EgressDialer { return &guardedDialer{EgressDialer: d, g: g} }

type guardedDialer struct {
	EgressDialer
	g *loopGuard
}

func (d *guardedDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	c, err := d.EgressDialer.DialContext(ctx, network, address)
	if err != nil {
		return nil, err
	}
	la := tcpAddrPortOf(c.LocalAddr())
	if !la.IsValid() {
		return c, nil
	}
	gc := &guardedConn{Conn: c, g: d.g, local: la}
	d.g.conns.Store(la, gc)
	return gc, nil
}

type guardedConn struct {
	net.Conn
	g      *loopGuard
	local  netip.AddrPort
	looped atomic.Bool
	once   sync.Once
}

func (c *guardedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err != nil && c.looped.Load() {
		return n, ErrLoop
	}
	return n, err
}

func (c *guardedConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if err != nil && c.looped.Load() {
		return n, ErrLoop
	}
	return n, err
}

func (c *guardedConn) Close() error {
	c.once.Do(func() { c.g.conns.CompareAndDelete(c.local, c) })
	return c.Conn.Close()
}
