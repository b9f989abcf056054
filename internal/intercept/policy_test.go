package intercept

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/inject"
	"github.com/keygate/broker/internal/rules"
)

// TestConnectPortPolicy (T-A6): CONNECT is allowed only to the ports a
// rule names (default 443 and the test upstreams); 22, 6379 and 0 are
// refused with 403. An opaque tunnel to another port exists only when a
// tunnel rule names it, carries the workload's bytes unchanged, and no
// rule can combine a tunnel with injection.
func TestConnectPortPolicy(t *testing.T) {
	up := newTLSRecorder(t)
	// A line-based TCP service standing in for ssh or redis: it records
	// what arrives and echoes it.
	svc, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	var mu sync.Mutex
	var got []byte
	go func() {
		for {
			c, err := svc.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					mu.Lock()
					got = append(got, buf[:n]...)
					mu.Unlock()
					if n > 0 {
						_, _ = c.Write(buf[:n])
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	svcPort := svc.Addr().(*net.TCPAddr).Port
	h := newHarness(t, harnessOpts{rules: []rules.Spec{
		bearerRule("inject", "127.0.0.1"),
		{Name: "opaque-service", Hosts: []string{"127.0.0.1"}, Ports: []int{svcPort}, Action: rules.ActionTunnel},
	}, roots: []*httptest.Server{up.srv}})

	for _, tt := range []struct {
		authority string
		code      string
	}{
		{"127.0.0.1:22", broker.CodeDenied},
		{"127.0.0.1:6379", broker.CodeDenied},
		{"127.0.0.1:0", broker.CodePortDenied},
		{"127.0.0.1:00", broker.CodePortDenied},
		{"[::1]:0", broker.CodePortDenied},
		{"localhost:25", broker.CodeDenied},
	} {
		t.Run(tt.authority, func(t *testing.T) {
			_, _, resp := h.connect(tt.authority)
			wantStatus(t, resp, http.StatusForbidden, tt.code)
		})
	}

	t.Run("opaque tunnel only by a tunnel rule, bytes unchanged", func(t *testing.T) {
		c, br, resp := h.connect(fmt.Sprintf("127.0.0.1:%d", svcPort))
		wantStatus(t, resp, http.StatusOK, "")
		// Plain text, even HTTP-shaped: a tunnel is not intercepted, so it
		// is neither refused as plaintext nor given a credential.
		const msg = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
		if _, err := io.WriteString(c, msg); err != nil {
			t.Fatal(err)
		}
		echo := make([]byte, len(msg))
		if _, err := io.ReadFull(br, echo); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		defer mu.Unlock()
		if string(got) != msg {
			t.Fatalf("the service got %d bytes, want exactly the %d the workload sent", len(got), len(msg))
		}
	})

	t.Run("a tunnel rule cannot inject", func(t *testing.T) {
		_, errs := rules.Compile([]rules.Spec{{Name: "bad", Hosts: []string{"a.example"}, Action: rules.ActionTunnel,
			Inject: &broker.Injection{Credential: "token", Injector: inject.Bearer()}}}, rules.Options{})
		if len(errs) == 0 {
			t.Fatal("a tunnel rule with an injection compiled")
		}
	})
	if up.count() != 0 {
		t.Fatalf("upstream got %d requests", up.count())
	}
}

// TestTraceNeverInjected (T-B3): TRACE, TRACK, Max-Forwards and CONNECT
// inside a tunnel are answered 405 by the broker, at the front door and
// inside a tunnel; nothing reaches an upstream, so nothing is injected or
// echoed back.
func TestTraceNeverInjected(t *testing.T) {
	secure, plain := newTLSRecorder(t), newPlainRecorder(t)
	rule := bearerRule("inject", "127.0.0.1")
	rule.Ports = []int{secure.port(t), plain.port(t)}
	rule.AllowPlaintext = true
	h := newHarness(t, harnessOpts{rules: []rules.Spec{rule}, roots: []*httptest.Server{secure.srv}})
	sa := fmt.Sprintf("127.0.0.1:%d", secure.port(t))
	pa := fmt.Sprintf("127.0.0.1:%d", plain.port(t))

	heads := []struct{ name, method, extra string }{
		{"TRACE", "TRACE", ""},
		{"TRACK", "TRACK", ""},
		{"TRACE with Max-Forwards", "TRACE", "Max-Forwards: 0\r\n"},
		{"OPTIONS with Max-Forwards", "OPTIONS", "Max-Forwards: 0\r\n"},
		{"GET with Max-Forwards", "GET", "max-forwards: 5\r\n"},
	}
	for _, hd := range heads {
		t.Run("front "+hd.name, func(t *testing.T) {
			got := h.rawRequest(h.dialFront(), hd.method+" http://"+pa+"/echo HTTP/1.1\r\nHost: "+pa+"\r\n"+hd.extra+"\r\n")
			wantStatus(t, got, http.StatusMethodNotAllowed, broker.CodeMethodNotAllowed)
		})
		t.Run("tunnel "+hd.name, func(t *testing.T) {
			got := h.rawRequest(h.tunnelTo(sa), hd.method+" /echo HTTP/1.1\r\nHost: "+sa+"\r\n"+hd.extra+"\r\n")
			wantStatus(t, got, http.StatusMethodNotAllowed, broker.CodeMethodNotAllowed)
		})
	}
	t.Run("CONNECT inside a tunnel", func(t *testing.T) {
		res := h.sendWire(h.tunnelTo(sa), "CONNECT "+sa+" HTTP/1.1\r\nHost: "+sa+"\r\n\r\n")
		if res.resp == nil {
			t.Fatal("no answer")
		}
		wantStatus(t, res.resp, http.StatusMethodNotAllowed, broker.CodeMethodNotAllowed)
		if !res.closed() {
			t.Fatal("the tunnel stays open after a CONNECT inside it")
		}
	})
	if secure.count()+plain.count() != 0 {
		t.Fatalf("upstreams got %d requests", secure.count()+plain.count())
	}
}

// TestRuleSeesWhatIsForwarded (T-B9): the rule is evaluated on the request
// as it will be serialised (after hop-by-hop stripping, with every value
// of a repeated field), and singleton fields with two values, or a path
// the upstream would resolve to another one, are refused rather than left
// for the rule and the upstream to read differently.
// HTTP/1.1 only: the broker offers no h2 (TestH2PerStreamPolicy).
func TestRuleSeesWhatIsForwarded(t *testing.T) {
	up := newRawUpstream(t, true)
	read := bearerRule("read-only", "127.0.0.1")
	read.Ports = []int{up.port}
	read.When = `"x-mode" in request.headers && request.headers["x-mode"] == "read"`
	passthrough := rules.Spec{Name: "no-credential", Hosts: []string{"127.0.0.1"}, Ports: []int{up.port}, When: `request.path == "/own"`}
	h := newHarness(t, harnessOpts{rules: []rules.Spec{passthrough, read}, roots: []*httptest.Server{up.srv}})
	auth := up.authority()

	tests := []struct {
		name, path, head string
		status           int
		check            func(t *testing.T, r wireRequest)
	}{
		{"the rule's field is forwarded as judged", "/", "X-Mode: read\r\n", 200, func(t *testing.T, r wireRequest) {
			if v := r.header.Values("X-Mode"); len(v) != 1 || v[0] != "read" {
				t.Errorf("upstream X-Mode = %q", v)
			}
			if a := r.header.Values("Authorization"); len(a) != 1 || a[0] != "Bearer "+h.canary {
				t.Error("not exactly the injected credential")
			}
		}},
		{"case variant", "/", "x-mode: read\r\n", 200, nil},
		{"a field named by Connection is not forwarded, so not judged", "/", "Connection: X-Mode\r\nX-Mode: read\r\n", http.StatusForbidden, nil},
		{"two values are judged together", "/", "X-Mode: read\r\nX-Mode: write\r\n", http.StatusForbidden, nil},
		{"two values, case variants", "/", "X-Mode: read\r\nx-mode: write\r\n", http.StatusForbidden, nil},
		{"two Content-Type", "/", "X-Mode: read\r\nContent-Type: text/plain\r\ncontent-type: application/json\r\n", http.StatusBadRequest, nil},
		{"two Host", "/", "X-Mode: read\r\nHost: evil.example\r\n", http.StatusBadRequest, nil},
		{"two Content-Length", "/", "X-Mode: read\r\nContent-Length: 0\r\nContent-Length: 1\r\n", http.StatusBadRequest, nil},
		{"two Transfer-Encoding", "/", "X-Mode: read\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", http.StatusNotImplemented, nil},
		{"two Authorization, replaced by the injection", "/", "X-Mode: read\r\nAuthorization: a\r\nauthorization: b\r\n", 200, func(t *testing.T, r wireRequest) {
			if a := r.header.Values("Authorization"); len(a) != 1 || a[0] != "Bearer "+h.canary {
				t.Error("not exactly the injected credential")
			}
		}},
		{"two Authorization, nothing injected", "/own", "Authorization: a\r\nAuthorization: b\r\n", http.StatusBadRequest, nil},
		{"dot-segment", "/own/../admin", "X-Mode: read\r\n", http.StatusBadRequest, nil},
		{"encoded dot-segment", "/own/%2e%2E/admin", "X-Mode: read\r\n", http.StatusBadRequest, nil},
		{"single dot", "/./own", "", http.StatusBadRequest, nil},
		{"dots inside a name are fine", "/own..x/.y", "X-Mode: read\r\n", 200, nil},
		{"one Authorization, nothing injected", "/own", "Authorization: mine\r\n", 200, func(t *testing.T, r wireRequest) {
			if a := r.header.Values("Authorization"); len(a) != 1 || a[0] != "mine" {
				t.Errorf("upstream Authorization = %q, want the workload's own", a)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := up.count()
			res := h.sendWire(h.tunnelTo(auth), "GET "+tt.path+" HTTP/1.1\r\nHost: "+auth+"\r\n"+tt.head+"\r\n")
			if res.resp == nil || res.resp.StatusCode != tt.status {
				t.Fatalf("status %v, want %d", statusOf(res.resp), tt.status)
			}
			got := up.since(before)
			if tt.status != 200 {
				if len(got) != 0 {
					t.Fatalf("refused, yet the upstream got %d requests", len(got))
				}
				return
			}
			if len(got) != 1 {
				t.Fatalf("upstream got %d requests", len(got))
			}
			if tt.check != nil {
				tt.check(t, got[0])
			}
		})
	}
}

func statusOf(r *http.Response) any {
	if r == nil {
		return "no response"
	}
	return r.StatusCode
}

// TestNoMintForDeniedHost (T-C3): 2000 CONNECTs to random denied names,
// and handshakes whose SNI differs from an allowed CONNECT, mint no leaf;
// the one allowed tunnel afterwards mints exactly one (the counter works).
func TestNoMintForDeniedHost(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{rules: []rules.Spec{bearerRule("inject", "127.0.0.1")}, roots: []*httptest.Server{up.srv}})
	mints := func() float64 { return testutil.ToFloat64(h.metrics.LeafCache.WithLabelValues("mint")) }

	const total, workers = 2000, 4
	var wg sync.WaitGroup
	errs := make(chan string, total)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < total; i += workers {
				name := fmt.Sprintf("r%x-%d.denied.example:443", rand.Uint64(), i)
				c, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
				if err != nil {
					errs <- err.Error()
					return
				}
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", name, name)
				resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodConnect})
				c.Close()
				if err != nil {
					errs <- err.Error()
					return
				}
				if resp.StatusCode != http.StatusForbidden {
					errs <- fmt.Sprintf("CONNECT %d: status %d", i, resp.StatusCode)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
	authority := fmt.Sprintf("127.0.0.1:%d", up.port(t))
	for i := 0; i < 20; i++ {
		c, _, resp := h.connect(authority)
		wantStatus(t, resp, http.StatusOK, "")
		if _, err := h.tlsOver(c, fmt.Sprintf("evil%d.example", i)); err == nil {
			t.Fatal("a handshake for another name succeeded")
		}
	}
	if n := mints(); n != 0 {
		t.Fatalf("%v leaves minted for denied hosts", n)
	}
	h.tunnel(authority)
	if n := mints(); n != 1 {
		t.Fatalf("mint counter = %v after one allowed tunnel, want 1", n)
	}
	if up.count() != 0 {
		t.Fatalf("upstream got %d requests", up.count())
	}
}

// The broker does not offer HTTP/2 inside interception (doc.go: ALPN
// http/1.1 only), so T-C4's per-stream policy has no streams to police:
// these two tests prove that h2 cannot be spoken at all, by ALPN, by prior
// knowledge or by h2c upgrade, and that no attempt reaches an upstream.
// h2spec is not run: it tests an h2 server, and there is none here.

// TestH2PerStreamPolicy (T-C4).
func TestH2PerStreamPolicy(t *testing.T) {
	allowed, evil := h2Recorder(t), h2Recorder(t)
	rule := bearerRule("allowed-only", "127.0.0.1")
	rule.Ports = []int{allowed.port(t)}
	h := newHarness(t, harnessOpts{rules: []rules.Spec{rule}, roots: []*httptest.Server{allowed.srv, evil.srv}})
	authority := fmt.Sprintf("127.0.0.1:%d", allowed.port(t))
	pool := x509.NewCertPool()
	pool.AddCert(h.ca.Certificate())

	t.Run("ALPN offers http/1.1 only", func(t *testing.T) {
		c, _, resp := h.connect(authority)
		wantStatus(t, resp, http.StatusOK, "")
		tc := tls.Client(c, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", NextProtos: []string{"h2", "http/1.1"}})
		if err := tc.Handshake(); err != nil {
			t.Fatal(err)
		}
		if p := tc.ConnectionState().NegotiatedProtocol; p != "http/1.1" {
			t.Fatalf("negotiated %q, want http/1.1", p)
		}
	})
	t.Run("a client that insists on h2 gets no h2", func(t *testing.T) {
		c, _, resp := h.connect(authority)
		wantStatus(t, resp, http.StatusOK, "")
		tc := tls.Client(c, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", NextProtos: []string{"h2"}})
		if err := tc.Handshake(); err == nil && tc.ConnectionState().NegotiatedProtocol == "h2" {
			t.Fatal("h2 negotiated")
		}
	})
	t.Run("h2 by prior knowledge: streams to the allowed and the evil authority", func(t *testing.T) {
		tc := h.tunnel(authority)
		_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
		var frames bytes.Buffer
		frames.WriteString(http2.ClientPreface)
		fr := http2.NewFramer(&frames, nil)
		_ = fr.WriteSettings()
		for i, target := range []string{authority, fmt.Sprintf("127.0.0.1:%d", evil.port(t))} {
			var block bytes.Buffer
			enc := hpack.NewEncoder(&block)
			for _, f := range [][2]string{{":method", "GET"}, {":scheme", "https"}, {":authority", target}, {":path", "/stream"}} {
				_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
			}
			_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(2*i + 1), BlockFragment: block.Bytes(), EndStream: true, EndHeaders: true})
		}
		res := h.sendWire(tc, frames.String())
		if res.resp != nil && res.resp.StatusCode < 400 {
			t.Fatalf("h2 frames were answered %d", res.resp.StatusCode)
		}
		if !res.closed() {
			t.Fatal("the tunnel stays open after h2 frames")
		}
	})
	if allowed.count()+evil.count() != 0 {
		t.Fatalf("upstreams got %d requests over h2 attempts", allowed.count()+evil.count())
	}
}

// TestNoH2CInConnect (T-C4): neither the h2 preface nor an h2c upgrade
// turns an intercepted tunnel into HTTP/2.
func TestNoH2CInConnect(t *testing.T) {
	up := newRawUpstream(t, true)
	rule := bearerRule("inject", "127.0.0.1")
	rule.Ports = []int{up.port}
	h := newHarness(t, harnessOpts{rules: []rules.Spec{rule}, roots: []*httptest.Server{up.srv}})
	auth := up.authority()

	t.Run("prior-knowledge preface", func(t *testing.T) {
		settings := "\x00\x00\x00\x04\x00\x00\x00\x00\x00" // an empty SETTINGS frame
		res := h.sendWire(h.tunnelTo(auth), http2.ClientPreface+settings)
		if res.resp != nil && res.resp.StatusCode < 400 {
			t.Fatalf("the preface was answered %d", res.resp.StatusCode)
		}
		if !res.closed() {
			t.Fatal("the tunnel stays open after an h2 preface")
		}
	})
	if up.count() != 0 {
		t.Fatalf("upstream got %d requests", up.count())
	}
	t.Run("h2c upgrade", func(t *testing.T) {
		res := h.sendWire(h.tunnelTo(auth), "GET /h2c HTTP/1.1\r\nHost: "+auth+"\r\nConnection: Upgrade, HTTP2-Settings\r\n"+
			"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
		if res.resp == nil || res.resp.StatusCode != http.StatusOK || res.resp.ProtoMajor != 1 {
			t.Fatalf("answer %v, want an HTTP/1.1 200 (the upgrade ignored)", statusOf(res.resp))
		}
		got := up.since(0)
		if len(got) != 1 {
			t.Fatalf("upstream got %d requests", len(got))
		}
		for _, k := range []string{"Upgrade", "Http2-Settings", "Connection"} {
			if v := got[0].header.Values(k); len(v) != 0 {
				t.Errorf("%s reached the upstream", k)
			}
		}
	})
}

// h2Recorder is a recorder that would speak h2 if asked, so a broker that
// relayed h2 would be caught.
func h2Recorder(t *testing.T) *recorder {
	t.Helper()
	r := &recorder{}
	r.srv = httptest.NewUnstartedServer(r)
	r.srv.EnableHTTP2 = true
	r.srv.StartTLS()
	t.Cleanup(r.srv.Close)
	return r
}

const wsHandshake = "GET /ws HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" +
	"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"

// TestUpgradeRequires101 (T-C5): an upstream that answers 200 with Upgrade
// headers does not switch the tunnel to raw bytes (the next request is
// judged and injected on its own), and an unasked 101 is refused.
func TestUpgradeRequires101(t *testing.T) {
	up := newRawUpstream(t, true)
	up.respond = func(r *http.Request) string {
		switch r.URL.Path {
		case "/ws":
			return "HTTP/1.1 200 OK\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nok"
		case "/ws101":
			return "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
		}
		return wireOK
	}
	rule := bearerRule("inject", "127.0.0.1")
	rule.Ports = []int{up.port}
	h := newHarness(t, harnessOpts{rules: []rules.Spec{rule}, roots: []*httptest.Server{up.srv}})
	auth := up.authority()

	t.Run("200 with Upgrade headers", func(t *testing.T) {
		c := h.tunnelTo(auth)
		br := bufio.NewReader(c)
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, wsHandshake, auth)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("Upgrade") != "" || strings.Contains(strings.ToLower(resp.Header.Get("Connection")), "upgrade") {
			t.Fatalf("workload got %d with Upgrade %q Connection %q", resp.StatusCode, resp.Header.Get("Upgrade"), resp.Header.Get("Connection"))
		}
		before := up.count()
		fmt.Fprintf(c, "GET /next HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer WORKLOAD\r\n\r\n", auth)
		next, err := http.ReadResponse(br, nil)
		if err != nil || next.StatusCode != 200 {
			t.Fatalf("the next request on the tunnel: %v %v", statusOf(next), err)
		}
		got := up.since(before)
		if len(got) != 1 || got[0].path != "/next" {
			t.Fatalf("the next request did not reach the upstream as a request of its own")
		}
		if a := got[0].header.Values("Authorization"); len(a) != 1 || a[0] != "Bearer "+h.canary {
			t.Fatal("the next request was not injected on its own")
		}
	})

	t.Run("an unasked 101", func(t *testing.T) {
		c := h.tunnelTo(auth)
		before := up.count()
		res := h.sendWire(c, fmt.Sprintf(strings.Replace(wsHandshake, "/ws ", "/ws101 ", 1), auth))
		if res.resp == nil || res.resp.StatusCode != http.StatusBadGateway {
			t.Fatalf("workload got %v, want 502", statusOf(res.resp))
		}
		// Whatever the workload sends now is never relayed raw.
		_, _ = io.WriteString(c, "\x81\x05RAWWS")
		time.Sleep(200 * time.Millisecond)
		if n := len(up.since(before)); n != 1 {
			t.Fatalf("upstream got %d requests", n)
		}
		if strings.Contains(string(up.rawBytes()), "RAWWS") {
			t.Fatal("bytes after the refused 101 reached the upstream")
		}
	})
}

// TestWebSocketDisabledUnlessRuleAllows (T-C5): no rule field enables
// upgrades, so every Upgrade is stripped before the upstream: a WebSocket
// upstream never sees a handshake, the workload never gets a 101, and the
// credential goes out on that one request only.
func TestWebSocketDisabledUnlessRuleAllows(t *testing.T) {
	secure, plain := newRawUpstream(t, true), newRawUpstream(t, false)
	ws := func(r *http.Request) string {
		if strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
			return "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
		}
		return "HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n"
	}
	secure.respond, plain.respond = ws, ws
	rule := bearerRule("inject", "127.0.0.1")
	rule.Ports = []int{secure.port, plain.port}
	rule.AllowPlaintext = true
	h := newHarness(t, harnessOpts{rules: []rules.Spec{rule}, roots: []*httptest.Server{secure.srv}})

	for _, where := range []string{"front", "tunnel"} {
		t.Run(where, func(t *testing.T) {
			up, c := plain, h.dialFront()
			raw := fmt.Sprintf(strings.Replace(wsHandshake, "GET /ws", "GET http://"+plain.authority()+"/ws", 1), plain.authority())
			if where == "tunnel" {
				up, c = secure, h.tunnelTo(secure.authority())
				raw = fmt.Sprintf(wsHandshake, secure.authority())
			}
			before := up.count()
			res := h.sendWire(c, raw)
			if res.resp == nil || res.resp.StatusCode != http.StatusUpgradeRequired {
				t.Fatalf("workload got %v, want the upstream's 426", statusOf(res.resp))
			}
			got := up.since(before)
			if len(got) != 1 {
				t.Fatalf("upstream got %d requests", len(got))
			}
			if got[0].header.Get("Upgrade") != "" || got[0].header.Get("Connection") != "" {
				t.Fatal("the upgrade request reached the upstream")
			}
			if a := got[0].header.Values("Authorization"); len(a) != 1 || a[0] != "Bearer "+h.canary {
				t.Fatal("the handshake request did not carry exactly the injected credential")
			}
		})
	}
}
