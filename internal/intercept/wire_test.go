package intercept

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Helpers for tests that look at the wire: a raw upstream that records the
// exact bytes that reach it, and a raw workload connection.

// wireRequest is one request head a rawUpstream parsed, and whether its
// body arrived whole.
type wireRequest struct {
	method, path string
	header       http.Header
	te           []string
	cl           int64
	body         []byte
	complete     bool
}

// rawUpstream is an upstream built on net.Listener and http.ReadRequest,
// not on http.Server: the question these tests ask is what bytes reach an
// upstream (a second request, an ambiguous frame, a head whose body never
// completes), which a higher-level server would hide.
type rawUpstream struct {
	t       *testing.T
	ln      net.Listener
	port    int
	srv     *httptest.Server // owner of the test certificate, for harnessOpts.roots
	respond func(r *http.Request) string

	mu   sync.Mutex
	reqs []*wireRequest
	raw  bytes.Buffer
}

const wireOK = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"

// newRawUpstream listens on 127.0.0.1; with TLS it presents httptest's
// certificate and offers http/1.1 only, so the broker's transport speaks
// HTTP/1.1 to it.
func newRawUpstream(t *testing.T, useTLS bool) *rawUpstream {
	t.Helper()
	u := &rawUpstream{t: t, respond: func(*http.Request) string { return wireOK }}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if useTLS {
		u.srv = httptest.NewUnstartedServer(http.NotFoundHandler())
		u.srv.StartTLS()
		t.Cleanup(u.srv.Close)
		cfg := u.srv.TLS.Clone()
		cfg.NextProtos = []string{"http/1.1"}
		ln = tls.NewListener(ln, cfg)
	}
	u.ln = ln
	u.port = ln.Addr().(*net.TCPAddr).Port
	t.Cleanup(func() { _ = ln.Close() })
	go u.serve()
	return u
}

func (u *rawUpstream) serve() {
	for {
		c, err := u.ln.Accept()
		if err != nil {
			return
		}
		go u.handle(c)
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (u *rawUpstream) handle(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(io.TeeReader(c, lockedWriter{&u.mu, &u.raw}))
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		wr := &wireRequest{method: req.Method, path: req.URL.Path, header: req.Header.Clone(), te: req.TransferEncoding, cl: req.ContentLength}
		u.mu.Lock()
		u.reqs = append(u.reqs, wr)
		u.mu.Unlock()
		body, err := io.ReadAll(req.Body)
		u.mu.Lock()
		wr.body, wr.complete = body, err == nil
		u.mu.Unlock()
		if err != nil {
			return
		}
		if _, err := io.WriteString(c, u.respond(req)); err != nil {
			return
		}
	}
}

func (u *rawUpstream) count() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.reqs)
}

func (u *rawUpstream) since(n int) []wireRequest {
	u.mu.Lock()
	defer u.mu.Unlock()
	var out []wireRequest
	for _, r := range u.reqs[n:] {
		out = append(out, *r)
	}
	return out
}

func (u *rawUpstream) rawBytes() []byte {
	u.mu.Lock()
	defer u.mu.Unlock()
	return bytes.Clone(u.raw.Bytes())
}

func (u *rawUpstream) authority() string { return "127.0.0.1:" + strconv.Itoa(u.port) }

// checkUnambiguous fails unless r is framed one way only: Content-Length
// or chunked, never both.
func checkUnambiguous(t *testing.T, r wireRequest) {
	t.Helper()
	if len(r.te) > 0 && r.header.Get("Content-Length") != "" {
		t.Errorf("upstream request %s has both Transfer-Encoding and Content-Length", r.path)
	}
	if len(r.te) > 1 || len(r.te) == 1 && r.te[0] != "chunked" {
		t.Errorf("upstream request %s has Transfer-Encoding %q", r.path, r.te)
	}
	if len(r.header.Values("Content-Length")) > 1 {
		t.Errorf("upstream request %s has %d Content-Length fields", r.path, len(r.header.Values("Content-Length")))
	}
}

// checkCleanWire fails if the bytes an upstream received contain a bare LF
// or an obs-fold in any request head: the broker re-serialises, it never
// relays what the workload wrote.
func checkCleanWire(t *testing.T, raw []byte) {
	t.Helper()
	for i := 0; i < len(raw); i++ {
		if raw[i] == '\n' && (i == 0 || raw[i-1] != '\r') {
			// A bare LF could sit in a body; only heads are checked.
			if inHead(raw, i) {
				t.Errorf("bare LF in an upstream request head at byte %d", i)
				return
			}
		}
	}
	if bytes.Contains(raw, []byte("\r\n ")) || bytes.Contains(raw, []byte("\r\n\t")) {
		t.Error("obs-fold in the upstream bytes")
	}
}

// inHead reports whether offset i is inside a request head: no blank line
// between the last request line ("... HTTP/1.1\r\n") and i.
func inHead(raw []byte, i int) bool {
	start := bytes.LastIndex(raw[:i], []byte(" HTTP/1.1\r\n"))
	if start < 0 {
		return false
	}
	return !bytes.Contains(raw[start:i], []byte("\r\n\r\n"))
}

// wireResult is what a workload saw after sending raw bytes.
type wireResult struct {
	resp   *http.Response // nil: the connection closed without an answer
	body   string
	c      net.Conn
	br     *bufio.Reader
	record func(string) // into the canary sweep
}

// closed reports whether the broker closed the connection after its
// answer (waiting up to 3s for it to do so).
func (r wireResult) closed() bool {
	if r.resp == nil {
		return true
	}
	// Further answers (net/http's own 400 for refused bytes) may come
	// first; what matters is that the stream then ends.
	_ = r.c.SetReadDeadline(time.Now().Add(3 * time.Second))
	rest, err := io.ReadAll(r.br)
	r.record(string(rest))
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

// sendWire writes raw on c (in the background: a broker that refuses early
// stops reading) and reads one response.
func (h *harness) sendWire(c net.Conn, raw string) wireResult {
	h.t.Helper()
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	go func() { _, _ = io.WriteString(c, raw) }()
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return wireResult{c: c, br: br, record: h.record}
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	h.record(fmt.Sprint(resp.Header) + string(b))
	return wireResult{resp: resp, body: string(b), c: c, br: br, record: h.record}
}

// readResponses reads up to n responses from br, stopping at the first
// error (a closed connection).
func (h *harness) readResponses(c net.Conn, br *bufio.Reader, n int) []*http.Response {
	h.t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(15 * time.Second))
	var out []*http.Response
	for len(out) < n {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			break
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		h.record(fmt.Sprint(resp.Header) + string(b))
		resp.Body = io.NopCloser(strings.NewReader(string(b)))
		out = append(out, resp)
	}
	return out
}

// dialFront opens a raw connection to the proxy listener.
func (h *harness) dialFront() net.Conn {
	h.t.Helper()
	c, err := net.DialTimeout("tcp", h.addr, 5*time.Second)
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { _ = c.Close() })
	return c
}

// tunnelTo opens an intercepted tunnel to a rawUpstream's authority.
func (h *harness) tunnelTo(authority string) net.Conn {
	h.t.Helper()
	tc := h.tunnel(authority)
	h.t.Cleanup(func() { _ = tc.Close() })
	return tc
}

// eventually polls cond for up to d.
func eventually(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return cond()
}
