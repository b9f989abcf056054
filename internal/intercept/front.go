package intercept

import (
	"crypto/tls"
	"net"
	"net/http"
	"net/netip"
	"strings"

	"github.com/elazarl/goproxy"

	"github.com/keygate/broker/internal/broker"
)

// serveFront handles one request on the proxy listener: attest, then either
// a CONNECT (decided in onConnect) or an absolute-form http:// request.
func (p *Proxy) serveFront(rw http.ResponseWriter, r *http.Request) {
	w := &statusWriter{ResponseWriter: rw}
	x := p.newExchange(p.opts.Listener)
	x.rec.Method = r.Method
	defer p.finish(x)
	defer p.recoverPanic(w, x)

	if r.Method == http.MethodConnect {
		// The framing guard stops reading a connection after a CONNECT
		// head; any answer that does not hijack it must end it.
		w.Header().Set("Connection", "close")
	}
	if err := p.checkRequest(r); err != nil {
		refuseAndClose(w, x.fail(err), x.rec.RequestID)
		return
	}
	id, err := x.pipe.Attest(r.Context(), evidence(p.opts.Listener, r))
	if err != nil {
		writeError(w, x.fail(err), x.rec.RequestID)
		return
	}
	if id, err = p.delegate(r, id); err != nil {
		writeError(w, x.fail(err), x.rec.RequestID)
		return
	}
	x.setIdentity(id)
	r = r.WithContext(withExchange(r.Context(), x))

	if r.Method == http.MethodConnect {
		x.rec.Protocol = broker.ProtocolHTTPS
		p.gp.ServeHTTP(w, r) // -> onConnect, then a hijack or a reject
		if x.err == nil && x.rec.Status == 0 {
			x.rec.Status = http.StatusOK
		}
		return
	}

	x.rec.Protocol = broker.ProtocolHTTP
	if !r.URL.IsAbs() || r.URL.Host == "" {
		writeError(w, x.fail(broker.NewError(broker.CodeBadRequest,
			"keygate is a proxy: send an absolute-form http:// request or CONNECT", nil)), x.rec.RequestID)
		return
	}
	if r.URL.Scheme != "http" {
		writeError(w, x.fail(broker.NewError(broker.CodeBadRequest,
			"only http:// requests are proxied in absolute form; use CONNECT for https", nil)), x.rec.RequestID)
		return
	}
	if r.URL.User != nil {
		writeError(w, x.fail(broker.NewError(broker.CodeBadRequest, "userinfo in the request URL is not allowed", nil)), x.rec.RequestID)
		return
	}
	host, port, err := SplitHostPort(r.URL.Host, 80)
	if err != nil {
		writeError(w, x.fail(broker.NewError(broker.CodeBadRequest, "invalid host in the request URL", err)), x.rec.RequestID)
		return
	}
	p.forward(w, r, x, host, port, "http")
}

// forward hands a bound, attested request to goproxy, which calls onRequest
// (decide and inject), the transport, and onResponse.
func (p *Proxy) forward(w *statusWriter, r *http.Request, x *exchange, host string, port int, scheme string) {
	x.rec.Host, x.rec.Port, x.rec.Path, x.rec.Method = host, port, r.URL.Path, r.Method
	if err := p.checkLiteral(host, port); err != nil {
		writeError(w, x.fail(err), x.rec.RequestID)
		return
	}
	authority := hostHeader(host, port, scheme)
	r.URL.Scheme, r.URL.Host, r.URL.User = scheme, authority, nil
	r.Host = authority
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = countingBody{rc: r.Body, n: &x.rec.BytesIn}
	}
	x.out = w
	p.gp.ServeHTTP(w, r)
	if x.err == nil {
		x.rec.Status = w.status
	}
	x.rec.BytesOut = w.n
}

// checkLiteral refuses an IP-literal destination the egress dialer would
// refuse anyway, before a rule or a leaf certificate is spent on it.
func (p *Proxy) checkLiteral(host string, port int) error {
	a, err := netip.ParseAddr(host)
	if err != nil {
		return nil // a name: the dialer checks every resolved address
	}
	if err := p.opts.Dialer.Check(netip.AddrPortFrom(a, uint16(port))); err != nil {
		return upstreamError(err)
	}
	return nil
}

func evidence(listener string, r *http.Request) broker.Evidence {
	ev := broker.Evidence{Listener: listener, TLS: r.TLS}
	if c, ok := r.Context().Value(connKey{}).(net.Conn); ok {
		ev.Conn = c
		// net/http sets r.TLS only for a bare *tls.Conn; the framing guard
		// wraps it, so the handshake state (an X509-SVID) is read here.
		if fc, ok := c.(*framingConn); ok && ev.TLS == nil {
			if tc, ok := fc.Conn.(*tls.Conn); ok {
				st := tc.ConnectionState()
				ev.TLS = &st
			}
		}
	}
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
		ev.Remote = ap
	}
	if la, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
		if ap, err := netip.ParseAddrPort(la.String()); err == nil {
			ev.Local = ap
		}
	}
	if v := r.Header.Values("Proxy-Authorization"); len(v) > 0 {
		ev.ProxyAuthorization = broker.NewSecret(strings.Join(v, ","))
	}
	return ev
}

// onConnect decides a CONNECT on host:port and identity only. Denials are
// answered without hijacking; tunnels and interceptions are hijacked by our
// own handlers, so goproxy never dials and never mints with its own CA.
func (p *Proxy) onConnect(authority string, ctx *goproxy.ProxyCtx) (*goproxy.ConnectAction, string) {
	x := exchangeFrom(ctx.Req.Context())
	reject := func(err error) (*goproxy.ConnectAction, string) {
		be := x.fail(err)
		ctx.Resp = errorResponse(ctx.Req, be, x.rec.RequestID)
		return &goproxy.ConnectAction{Action: goproxy.ConnectReject}, authority
	}
	if x == nil {
		return &goproxy.ConnectAction{Action: goproxy.ConnectReject}, authority
	}
	host, port, err := SplitHostPort(authority, 443)
	if err != nil {
		if portZero(authority) {
			// T-A6: a port no rule can name is a policy refusal, not a typo.
			return reject(broker.NewError(broker.CodePortDenied, "port 0 cannot be connected to", nil))
		}
		return reject(broker.NewError(broker.CodeBadRequest, "invalid CONNECT authority", err))
	}
	x.rec.Host, x.rec.Port = host, port
	if err := p.checkLiteral(host, port); err != nil {
		return reject(err)
	}
	t := broker.Target{Phase: broker.PhaseConnect, Protocol: broker.ProtocolHTTPS, Host: host, Port: port}
	d, err := x.pipe.Decide(ctx.Req.Context(), x.identity, t)
	x.rec.Rule = d.Rule
	if err != nil {
		return reject(err)
	}
	switch d.Action {
	case broker.Tunnel:
		x.rec.Decision = broker.AuditTunnel
		return &goproxy.ConnectAction{Action: goproxy.ConnectHijack, Hijack: func(_ *http.Request, c net.Conn, _ *goproxy.ProxyCtx) {
			p.tunnel(ctx.Req.Context(), c, x, host, port)
		}}, authority
	case broker.Allow:
		// Interception mints a leaf for host unless one is cached: the
		// caller's mint budget is checked now, while a refusal can still
		// be an HTTP answer.
		if err := p.admitMint(x.identity, host); err != nil {
			return reject(err)
		}
		x.rec.Decision = broker.AuditAllow
		return &goproxy.ConnectAction{Action: goproxy.ConnectHijack, Hijack: func(_ *http.Request, c net.Conn, _ *goproxy.ProxyCtx) {
			p.intercept(c, x, host, port)
		}}, authority
	}
	return reject(broker.NewError(broker.CodeDenied, "no rule allows this request", nil))
}

// onRequest runs for every forwarded request, plain or intercepted: strip
// what must not travel, then decide and inject. A non-nil response means
// nothing is forwarded.
func (p *Proxy) onRequest(r *http.Request, ctx *goproxy.ProxyCtx) (*http.Request, *http.Response) {
	x := exchangeFrom(r.Context())
	if x == nil {
		return r, errorResponse(r, broker.NewError(broker.CodeInternal, "internal error", nil), "")
	}
	stripHopByHop(r.Header)
	// Declared trailers would reach the upstream after injection, outside
	// the slot the injector owns; they are not forwarded.
	r.Trailer = nil
	path := r.URL.Path
	if path == "" {
		// "http://host" with no path is sent as "GET / HTTP/1.1": the rule
		// judges what the upstream will be asked for.
		path = "/"
	}
	t := broker.Target{
		Phase:    broker.PhaseRequest,
		Protocol: r.URL.Scheme,
		Host:     x.rec.Host,
		Port:     x.rec.Port,
		Method:   r.Method,
		Path:     path,
		Query:    r.URL.RawQuery,
	}
	if policyUsesHeaders(x.pipe) {
		t.Headers = ruleHeaders(r.Header)
	}
	d, cred, err := x.pipe.Authorize(r.Context(), x.identity, t, r)
	x.rec.Rule = d.Rule
	if err != nil {
		return r, errorResponse(r, x.fail(err), x.rec.RequestID)
	}
	if cred.Name != "" {
		p.setCredential(x, cred)
	} else if len(r.Header["Authorization"]) > 1 {
		// Not replaced by an injection, two values would reach an upstream
		// that may read either (T-B9).
		return r, errorResponse(r, x.fail(broker.NewError(broker.CodeBadRequest, "more than one Authorization", nil)), x.rec.RequestID)
	}
	x.rec.Decision = broker.AuditAllow
	if d.Action == broker.Tunnel {
		x.rec.Decision = broker.AuditTunnel
	}
	return r, nil
}

// onResponse stamps the request id, turns a transport failure into the
// status table of DESIGN.md §7, and, when a credential was injected,
// scrubs it from the response (T-B3: echo and debug endpoints, error pages
// that quote the request).
func (p *Proxy) onResponse(resp *http.Response, ctx *goproxy.ProxyCtx) *http.Response {
	x := exchangeFrom(ctx.Req.Context())
	if x == nil {
		return resp
	}
	if x.err != nil && resp != nil {
		// The broker's own refusal (errorResponse): nothing reached an
		// upstream, and its fields (Proxy-Authenticate on a 407) are meant
		// for this hop.
		return resp
	}
	if resp == nil {
		err := ctx.Error
		if err == nil {
			err = broker.NewError(broker.CodeUpstreamUnreachable, "no response from upstream", nil)
		}
		return errorResponse(ctx.Req, x.fail(upstreamError(err)), x.rec.RequestID)
	}
	if resp.StatusCode == http.StatusSwitchingProtocols {
		// Upgrade never reaches an upstream (stripHopByHop), so a 101 was
		// not asked for: switching to raw bytes here would carry the
		// workload's later bytes past every decision (T-C5).
		_ = resp.Body.Close()
		return errorResponse(ctx.Req, x.fail(broker.NewError(broker.CodeUpstreamUnreachable,
			"the upstream switched protocols unasked", nil)), x.rec.RequestID)
	}
	// Hop-by-hop fields are the upstream's, not the workload's; an Upgrade
	// left on a 200 would also make goproxy hijack the workload's
	// connection as if for a WebSocket.
	stripHopByHop(resp.Header)
	if len(x.cred.Fields) > 0 {
		p.scrubResponse(resp, x, x.out)
	}
	resp.Header.Set(HeaderRequestID, x.rec.RequestID)
	return resp
}

// headerReader is implemented by policies that can say whether any rule
// reads request headers; building the map is skipped when none does.
type headerReader interface{ UsesHeaders() bool }

func policyUsesHeaders(pipe *broker.Pipeline) bool {
	hr, ok := pipe.Policy.(headerReader)
	return !ok || hr.UsesHeaders()
}

// delegate verifies an on-behalf-of token on r, if any, sets it as the
// identity's delegator, and removes the header so the user's token never
// travels upstream. Without a token the identity is returned unchanged (a
// tunnel's CONNECT-time delegator carries over to its requests).
func (p *Proxy) delegate(r *http.Request, id broker.Identity) (broker.Identity, error) {
	d := p.opts.Delegation
	if d == nil {
		return id, nil
	}
	var vals []string
	for k, vs := range r.Header {
		if strings.EqualFold(k, d.Header()) {
			vals = append(vals, vs...)
			delete(r.Header, k)
		}
	}
	if len(vals) == 0 {
		return id, nil
	}
	if len(vals) > 1 {
		return id, broker.NewError(broker.CodeUnauthenticated, "more than one on-behalf-of token", nil)
	}
	del, err := d.Delegate(r.Context(), broker.NewSecret(vals[0]))
	if err != nil {
		return id, broker.NewError(broker.CodeUnauthenticated, "the on-behalf-of token was rejected", err)
	}
	id.Delegator = del
	return id, nil
}

// portZero reports whether authority ends in ":0" (any number of zeros).
func portZero(authority string) bool {
	i := strings.LastIndexByte(authority, ':')
	if i < 0 || i == len(authority)-1 || strings.HasSuffix(authority[:i], ":") {
		return false
	}
	return strings.Trim(authority[i+1:], "0") == ""
}
