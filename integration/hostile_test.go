package integration

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestHostileInputSmoke: oversized headers get 431 and a header name with a
// space gets 400, at the front door and inside an intercepted tunnel;
// nothing reaches the upstream; the broker neither panics nor dies.
func TestHostileInputSmoke(t *testing.T) {
	t.Parallel()
	runHostile(t, []hostileVector{
		{name: "200KiB header", head: "X-Big: " + strings.Repeat("a", 200<<10) + "\r\n\r\n", status: http.StatusRequestHeaderFieldsTooLarge},
		{name: "20000 headers", head: strings.Repeat("X-Many: 1\r\n", 20000) + "\r\n", status: http.StatusRequestHeaderFieldsTooLarge},
		{name: "space before colon", head: "Transfer-Encoding : chunked\r\nContent-Length: 0\r\n\r\n5\r\nhello\r\n0\r\n\r\n", status: http.StatusBadRequest},
	})
}

// TestSmugglingVectors (SECURITY-TESTS T-D1/T-D2, §3 table): every vector
// with a required refusal is refused at the front door and inside a tunnel,
// and nothing reaches the upstream. Numbers are the §3 rows.
//
// Rows 1, 7, 8, 11, 17 and 18 are refused by the broker's framing guard,
// which reads the raw request bytes beside Go's parser (Go would otherwise
// unfold row 8, drop the Transfer-Encoding of row 11, and let the head of
// row 18 go upstream before its body failed). The full table, the
// regenerated smuggler mutations and a raw recording upstream are in
// internal/intercept's TestSmugglingVectors.
func TestSmugglingVectors(t *testing.T) {
	t.Parallel()
	runHostile(t, []hostileVector{
		{name: "1 Content-Length with chunked", head: "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nZ\r\n0\r\n\r\n", status: http.StatusBadRequest},
		{name: "3 two different Content-Length", head: "Content-Length: 1\r\nContent-Length: 2\r\n\r\nab", status: http.StatusBadRequest},
		{name: "4 Content-Length list", head: "Content-Length: 1, 1\r\n\r\na", status: http.StatusBadRequest},
		{name: "4 Content-Length plus sign", head: "Content-Length: +1\r\n\r\na", status: http.StatusBadRequest},
		{name: "5 unknown Transfer-Encoding", head: "Transfer-Encoding: xchunked\r\n\r\n", status: http.StatusNotImplemented},
		{name: "5 chunked, identity", head: "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", status: http.StatusNotImplemented},
		{name: "6 space before colon", head: "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", status: http.StatusBadRequest},
		{name: "7 obs-fold", head: "X-A: b\r\n c\r\n\r\n", status: http.StatusBadRequest},
		{name: "8 obs-folded Transfer-Encoding", head: "Transfer-Encoding:\r\n chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", status: http.StatusBadRequest},
		{name: "10 vertical tab in Transfer-Encoding", head: "Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n", status: http.StatusBadRequest},
		{name: "11 Transfer-Encoding on HTTP/1.0", proto: "HTTP/1.0", head: "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", status: http.StatusBadRequest},
		{name: "13 two Host", head: "Host: evil.test\r\n\r\n", status: http.StatusBadRequest},
		{name: "15 NUL in a value", head: "X-A: a\x00b\r\n\r\n", status: http.StatusBadRequest},
		{name: "17 bare CR in a chunk extension", head: "Transfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n", status: http.StatusBadRequest},
		{name: "18 bare LF after a chunk size", head: "Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", status: http.StatusBadRequest},
		{name: "tab in a name", head: "X\tA: b\r\n\r\n", status: http.StatusBadRequest},
	})
}

// hostileVector is a request head (and body) after the request line.
type hostileVector struct {
	name   string
	head   string // header lines, each ending in \r\n, a blank line, then the body
	status int
	proto  string // default HTTP/1.1
}

func (v hostileVector) protocol() string {
	if v.proto == "" {
		return "HTTP/1.1"
	}
	return v.proto
}

// runHostile sends every vector at the front door (absolute-form to an
// injecting rule's host) and inside an intercepted tunnel, then checks
// that the upstream got nothing and the broker still serves.
func runHostile(t *testing.T, vectors []hostileVector) {
	h := newHarness(t)
	up := newUpstream(t, "allowed", nil)
	b := h.startAPI(up)
	ap := up.port()

	front := func(t *testing.T, v hostileVector) *http.Response {
		c, err := net.DialTimeout("tcp", b.proxyAddr, testTimeout)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		host := fmt.Sprintf("localhost:%d", ap)
		raw := fmt.Sprintf("POST http://%s/ %s\r\nHost: %s\r\n%s", host, v.protocol(), host, v.head)
		return h.sendHostile(t, c, v.name, raw)
	}
	tunnel := func(t *testing.T, v hostileVector) *http.Response {
		cr := h.connect(b, fmt.Sprintf("localhost:%d", ap))
		if cr.conn == nil {
			t.Fatalf("CONNECT: %s", cr.resp.Status)
		}
		tc, err := h.tlsClient(cr.conn, "localhost")
		if err != nil {
			t.Fatal(err)
		}
		defer tc.Close()
		raw := fmt.Sprintf("POST / %s\r\nHost: localhost:%d\r\n%s", v.protocol(), ap, v.head)
		return h.sendHostile(t, tc, v.name, raw)
	}
	for _, where := range []struct {
		name string
		send func(*testing.T, hostileVector) *http.Response
	}{{"front", front}, {"tunnel", tunnel}} {
		t.Run(where.name, func(t *testing.T) {
			for _, v := range vectors {
				t.Run(v.name, func(t *testing.T) {
					before := up.count()
					resp := where.send(t, v)
					switch {
					case resp == nil:
						t.Errorf("connection closed without a response, want %d", v.status)
					case resp.StatusCode != v.status:
						t.Errorf("status %d, want %d", resp.StatusCode, v.status)
					}
					if n := up.count() - before; n != 0 {
						t.Errorf("the upstream received %d request(s) for this vector, want 0", n)
					}
				})
			}
		})
	}

	// Still alive and still serving.
	if b.exited() {
		t.Fatalf("the broker exited: %v\n%s", b.waitErr, redactCanary(string(b.output())))
	}
	if err := b.waitHealthy(testTimeout); err != nil {
		t.Fatalf("broker unhealthy after hostile input: %v", err)
	}
	before := up.count()
	resp, err := h.goClient(b).Get(fmt.Sprintf("https://localhost:%d/after", ap))
	if err != nil {
		t.Fatalf("normal request after hostile input: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	h.recordResponse("after", resp, body)
	if resp.StatusCode != http.StatusOK {
		t.Errorf("normal request after hostile input: %s", resp.Status)
	}
	if reqs := up.requests(); len(reqs) != before+1 || len(reqs[before].Auth) != 1 || reqs[before].Auth[0] != h.bearer() {
		t.Errorf("normal request after hostile input did not arrive with the injected credential")
	}
	if out := b.output(); bytes.Contains(out, []byte("panic")) {
		t.Errorf("broker output mentions a panic:\n%s", redactCanary(string(out)))
	}
}

// sendHostile writes raw while reading the answer: a server that refuses
// early stops reading, so the write may block or fail, and that is fine.
// It returns nil when the connection closed without any response.
func (h *harness) sendHostile(t *testing.T, c net.Conn, what, raw string) *http.Response {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(testTimeout))
	go func() { _, _ = io.WriteString(c, raw) }()
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return nil
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	h.recordResponse(what, resp, body)
	return resp
}
