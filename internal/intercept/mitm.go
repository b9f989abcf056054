package intercept

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keygate/broker/internal/broker"
)

const tlsRecordHandshake = 0x16

var errSNIMismatch = errors.New("intercept: TLS server name differs from the CONNECT authority")

func connectEstablished(requestID string) []byte {
	return []byte("HTTP/1.1 200 Connection established\r\n" + HeaderRequestID + ": " + requestID + "\r\n\r\n")
}

// tunnel splices bytes to the destination without looking inside. No
// credential ever travels through a tunnel.
func (p *Proxy) tunnel(ctx context.Context, client net.Conn, x *exchange, host string, port int) {
	defer client.Close()
	done, ok := p.hijack(client)
	if !ok {
		return
	}
	defer done()
	release, ok := p.acquireTunnel(client, x)
	if !ok {
		return
	}
	defer release()
	p.dialAndSplice(ctx, client, x, host, port, connectEstablished(x.rec.RequestID))
}

// acquireTunnel takes a tunnel slot for a hijacked CONNECT before anything
// is dialled or answered; past the cap the workload gets 503 tunnel_limit
// (Retry-After) on the raw connection. The caller defers release, so the
// slot comes back however the tunnel ends, a panic included.
func (p *Proxy) acquireTunnel(client net.Conn, x *exchange) (release func(), ok bool) {
	release, ok = p.tunnels.acquire()
	if !ok {
		x.rec.Decision = broker.AuditDeny
		writeRawError(client, x.fail(errTunnelLimit()), x.rec.RequestID)
	}
	return release, ok
}

// spliceTo is a tunnel for a transparent connection: no CONNECT to answer.
func (p *Proxy) spliceTo(ctx context.Context, client net.Conn, x *exchange, host string, port int) {
	p.dialAndSplice(ctx, client, x, host, port, nil)
}

// dialAndSplice dials host:port through the egress dialer, sends reply (if
// any) once the upstream is connected, and splices until either side ends.
func (p *Proxy) dialAndSplice(ctx context.Context, client net.Conn, x *exchange, host string, port int, reply []byte) {
	up, err := p.opts.Dialer.DialContext(ctx, "tcp", joinHostPort(host, port))
	if err != nil {
		be := x.fail(upstreamError(err))
		if reply != nil {
			writeRawError(client, be, x.rec.RequestID)
		}
		return
	}
	defer up.Close()
	if reply != nil {
		if _, err := client.Write(reply); err != nil {
			return
		}
	}
	x.rec.Status = http.StatusOK
	var in, out atomic.Int64
	splice(client, up, &in, &out)
	x.rec.BytesIn, x.rec.BytesOut = in.Load(), out.Load()
}

// splice copies both ways until either side is done, then closes both.
func splice(client, up net.Conn, in, out *atomic.Int64) {
	var wg sync.WaitGroup
	wg.Add(2)
	cp := func(dst, src net.Conn, n *atomic.Int64) {
		defer wg.Done()
		c, _ := io.Copy(dst, src)
		n.Add(c)
		// Closing both unblocks the other direction; half-close semantics
		// are not worth a goroutine pinned on a silent peer.
		_ = dst.Close()
		_ = src.Close()
	}
	go cp(up, client, in)
	go cp(client, up, out)
	wg.Wait()
}

// intercept terminates the workload's TLS with a leaf for the CONNECT host
// (minted only now, after the rule allowed the host) and serves the inner
// requests with a dedicated net/http server, so header limits, read-header
// timeouts, keep-alive and panic containment apply inside the tunnel just as
// at the front door.
func (p *Proxy) intercept(client net.Conn, x *exchange, host string, port int) {
	defer client.Close()
	done, ok := p.hijack(client)
	if !ok {
		return
	}
	defer done()
	release, ok := p.acquireTunnel(client, x)
	if !ok {
		return
	}
	defer release()
	if _, err := client.Write(connectEstablished(x.rec.RequestID)); err != nil {
		return
	}
	x.rec.Status = http.StatusOK

	_ = client.SetReadDeadline(p.opts.Clock.Now().Add(p.limits.HandshakeTimeout))
	br := bufio.NewReader(client)
	first, err := br.Peek(1)
	if err != nil {
		x.fail(broker.NewError(broker.CodeBadRequest, "tunnel closed before a TLS handshake", err))
		return
	}
	if first[0] != tlsRecordHandshake {
		// Plaintext inside CONNECT would be read as http:// (SECURITY-TESTS §1.2).
		writeRawError(client, x.fail(broker.NewError(broker.CodePlaintextDenied,
			"a CONNECT tunnel must carry TLS", nil)), x.rec.RequestID)
		return
	}
	p.serveTLS(client, br, x, host, port)
}

// serveTLS terminates the workload's TLS (its first bytes may already sit
// in br) with a leaf for host and serves the inner requests, each bound to
// host:port.
func (p *Proxy) serveTLS(client net.Conn, br *bufio.Reader, x *exchange, host string, port int) {
	tc := tls.Server(&peekedConn{Conn: client, r: br}, p.tlsConfig(host))
	hctx, cancel := context.WithTimeout(context.Background(), p.limits.HandshakeTimeout)
	err := tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		if errors.Is(err, errSNIMismatch) {
			x.fail(broker.NewError(broker.CodeMisdirected, "TLS server name differs from the CONNECT authority", nil))
		} else {
			x.fail(broker.NewError(broker.CodeBadRequest, "workload TLS handshake failed", err))
		}
		return
	}
	_ = client.SetReadDeadline(time.Time{})

	p.serveConn(tc, p.innerHandler(x, host, port))
}

// serveConn serves the requests of one workload connection (inside a
// tunnel, or a redirected one) with its own net/http server, so header
// limits, timeouts, keep-alive and panic containment apply as at the front
// door, and Shutdown can drain it. It returns when the connection ends.
func (p *Proxy) serveConn(c net.Conn, h http.Handler) {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: p.limits.ReadHeaderTimeout,
		IdleTimeout:       p.limits.IdleTimeout,
		MaxHeaderBytes:    httpMaxHeaderBytes(p.limits.MaxHeaderBytes),
		ErrorLog:          httpErrorLog(p.log),
	}
	ln := newOneConnListener(p.guardFraming(c))
	srv.ConnState = ln.connState
	untrack, ok := p.trackInner(srv, ln)
	if !ok {
		return
	}
	defer untrack()
	_ = srv.Serve(ln)
	ln.wait()
}

func (p *Proxy) tlsConfig(host string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"http/1.1"},
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			if hello.ServerName != "" {
				sni, err := NormalizeHost(hello.ServerName)
				if err != nil || sni != host {
					return nil, errSNIMismatch
				}
			}
			return p.opts.Leaves.Get(host)
		},
	}
}

// innerHandler serves one request inside an intercepted tunnel, bound to
// the CONNECT authority.
func (p *Proxy) innerHandler(tun *exchange, host string, port int) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		w := &statusWriter{ResponseWriter: rw}
		x := p.newExchange(tun.rec.Listener)
		x.setIdentity(tun.identity)
		x.rec.Protocol, x.rec.Method, x.rec.Host, x.rec.Port, x.rec.Path = broker.ProtocolHTTPS, r.Method, host, port, r.URL.Path
		defer p.finish(x)
		defer p.recoverPanic(w, x)

		if err := p.checkRequest(r); err != nil {
			refuseAndClose(w, x.fail(err), x.rec.RequestID)
			return
		}
		if r.Method == http.MethodConnect {
			refuseAndClose(w, x.fail(broker.NewError(broker.CodeMethodNotAllowed, "CONNECT inside a tunnel is not allowed", nil)), x.rec.RequestID)
			return
		}
		if err := bindDestination(r, host, port); err != nil {
			writeError(w, x.fail(err), x.rec.RequestID)
			return
		}
		id, err := p.delegate(r, tun.identity)
		if err != nil {
			writeError(w, x.fail(err), x.rec.RequestID)
			return
		}
		x.setIdentity(id)
		if id.ExpiredAt(p.opts.Clock.Now()) {
			// The token or SVID the tunnel was opened with has expired: a new
			// CONNECT would be refused, so this tunnel serves no more.
			w.Header().Set("Connection", "close")
			writeError(w, x.fail(broker.NewError(broker.CodeUnauthenticated,
				"the caller's credential has expired; reconnect with a fresh one", nil)), x.rec.RequestID)
			return
		}
		r = r.WithContext(withExchange(r.Context(), x))
		p.forward(w, r, x, host, port, "https")
	})
}

// bindDestination enforces CONNECT authority == Host == absolute URL host
// (SNI was checked at the handshake). goproxy would otherwise send the
// request wherever Host or the URL points (SECURITY-TESTS §1.1).
func bindDestination(r *http.Request, host string, port int) error {
	misdirected := broker.NewError(broker.CodeMisdirected, "request host differs from the CONNECT authority", nil)
	if r.URL.IsAbs() || r.URL.Host != "" {
		if r.URL.Scheme != "https" {
			return misdirected
		}
		h, pt, err := SplitHostPort(r.URL.Host, 443)
		if err != nil || h != host || pt != port {
			return misdirected
		}
	}
	if r.Host == "" {
		return broker.NewError(broker.CodeBadRequest, "missing Host header", nil)
	}
	h, pt, err := SplitHostPort(r.Host, 443)
	if err != nil || h != host || pt != port {
		return misdirected
	}
	return nil
}

// peekedConn replays bytes read while sniffing for a TLS handshake.
type peekedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *peekedConn) Read(b []byte) (int, error) { return c.r.Read(b) }

// oneConnListener hands one connection to an http.Server and then blocks
// until that connection is closed (or the listener is, on shutdown), so
// Serve returns when the tunnel ends. The connection it hands over is
// wrapped by the framing guard, so requests inside a tunnel have no r.TLS
// (nothing there reads it: the tunnel was attested at CONNECT).
type oneConnListener struct {
	conn     net.Conn
	state    atomic.Int32 // http.ConnState of the connection
	accepted atomic.Bool
	once     sync.Once
	closed   chan struct{} // the listener: closed by Shutdown
	connDone chan struct{} // the connection: closed by the server
	close    sync.Once
	done     sync.Once
}

func newOneConnListener(c net.Conn) *oneConnListener {
	return &oneConnListener{conn: c, closed: make(chan struct{}), connDone: make(chan struct{})}
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	var c net.Conn
	l.once.Do(func() { c = l.conn })
	if c != nil {
		l.accepted.Store(true)
		return c, nil
	}
	select {
	case <-l.closed:
	case <-l.connDone:
	}
	return nil, net.ErrClosed
}

func (l *oneConnListener) connState(_ net.Conn, s http.ConnState) {
	l.state.Store(int32(s))
	if s == http.StateClosed || s == http.StateHijacked {
		l.done.Do(func() { close(l.connDone) })
	}
}

// closeIfIdle closes a tunnel with no request in progress (a fresh one
// counts: net/http leaves new connections to a five-second grace period).
func (l *oneConnListener) closeIfIdle() {
	if s := http.ConnState(l.state.Load()); s == http.StateNew || s == http.StateIdle {
		_ = l.conn.Close()
	}
}

// wait blocks until the server has closed the connection: after a
// graceful Shutdown, Serve returns at once while the request in flight
// is still being answered.
func (l *oneConnListener) wait() {
	if l.accepted.Load() {
		<-l.connDone
	}
}

func (l *oneConnListener) Close() error {
	l.close.Do(func() { close(l.closed) })
	return nil
}

func (l *oneConnListener) Addr() net.Addr { return l.conn.LocalAddr() }
