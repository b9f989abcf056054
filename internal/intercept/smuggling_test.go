package intercept

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keygate/broker/internal/rules"
)

// framingCases are raw request streams and what the framing guard says
// about them ("" = accepted). Rows are SECURITY-TESTS.md §3.
var framingCases = []struct {
	name, raw, reason string
}{
	{"plain GET", "GET / HTTP/1.1\r\nHost: a\r\n\r\n", ""},
	{"pipelined with bodies", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloPOST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.0\r\n\r\n", ""},
	{"row 1 CL with TE", "POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", reasonTEAndCL},
	{"row 7 obs-fold", "GET / HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n", reasonObsFold},
	{"row 8 obs-fold TE", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", reasonObsFold},
	{"row 8 tab fold", "POST / HTTP/1.1\r\nTransfer-Encoding:\r\n\tchunked\r\n\r\n", reasonObsFold},
	{"row 9 tab before chunked", "POST / HTTP/1.1\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n", ""},
	{"row 11 TE on HTTP/1.0", "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", reasonTEOnHTTP10},
	{"row 12 bare LF head", "POST / HTTP/1.1\nHost: a\nContent-Length: 2\n\nokGET / HTTP/1.1\n\n", ""},
	{"row 17 bare CR in extension", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n", reasonChunkLine},
	{"row 18 bare LF chunk size", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", reasonChunkBareLF},
	{"row 18 bare LF last chunk", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\n\r\n", reasonChunkBareLF},
	{"chunk data overrun", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n0\r\n\r\n", reasonChunkData},
	{"chunk size space before extension", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1 ;x\r\na\r\n0\r\n\r\n", reasonChunkLine},
	{"chunk size 17 digits", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000001\r\na\r\n0\r\n\r\n", reasonChunkLine},
	{"trailer bare LF", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\n\r\n", reasonTrailer},
	{"trailer fold", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\r\n z\r\n\r\n", reasonTrailer},
	{"bare CR ends a head line", "GET / HTTP/1.1\r\n\rX: y\r\n\r\n", reasonBareCR},
	{"unknown coding then bytes", "POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", reasonAfterUnframed},
	{"HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", reasonAfterUnframed},
	{"CONNECT then TLS bytes", "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\x16\x03\x01\x00\x05\n \r\x00", ""},
}

// TestFramingGuard checks the framer on its own, fed whole and one byte at
// a time (the outcome must not depend on how reads split the stream).
func TestFramingGuard(t *testing.T) {
	for _, tc := range framingCases {
		t.Run(tc.name, func(t *testing.T) {
			for _, step := range []int{len(tc.raw), 1, 3} {
				var f framer
				reason := ""
				delivered := 0
				for i := 0; i < len(tc.raw); i += step {
					chunk := []byte(tc.raw[i:min(i+step, len(tc.raw))])
					n, err := f.feed(chunk)
					delivered += n
					if err != nil {
						reason = err.(*errFraming).reason
						break
					}
				}
				if reason != tc.reason {
					t.Fatalf("step %d: reason %q, want %q", step, reason, tc.reason)
				}
				if reason == "" && delivered != len(tc.raw) {
					t.Fatalf("step %d: delivered %d of %d bytes", step, delivered, len(tc.raw))
				}
			}
		})
	}
	// A refused request's head is withheld when it starts in the same read;
	// the complete request before it is delivered.
	first := "GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
	var f framer
	n, err := f.feed([]byte(first + "POST /b HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"))
	if err == nil || n != len(first) {
		t.Fatalf("delivered %d bytes (err %v), want exactly the first request (%d)", n, err, len(first))
	}
	if n, err := f.feed([]byte("GET / HTTP/1.1\r\n\r\n")); err == nil || n != 0 {
		t.Fatal("the guard accepted bytes after a refusal")
	}
}

// smuggleVector is one row: the head after the request line and Host, a
// blank line, then the body.
type smuggleVector struct {
	name   string
	head   string
	proto  string // default HTTP/1.1
	host   string // replaces the Host line
	line   string // replaces the request line (tunnel only)
	lf     bool   // send every line ending as a bare LF
	status int    // 0: any outcome that is a refusal or one clean forward
	body   string // for a forwarded vector: the body the upstream must get
	only   string // "tunnel" or "front"
}

func (v smuggleVector) build(front bool, authority string) string {
	proto := v.proto
	if proto == "" {
		proto = "HTTP/1.1"
	}
	line := "POST / " + proto
	if front {
		line = "POST http://" + authority + "/ " + proto
	}
	if v.line != "" {
		line = v.line
	}
	host := "Host: " + authority + "\r\n"
	if v.host != "" {
		host = v.host
	}
	raw := line + "\r\n" + host + v.head
	if v.lf {
		raw = strings.ReplaceAll(raw, "\r\n", "\n")
	}
	return raw
}

const smuggledPath = "/smuggled"

// smugglerMutations regenerates the classes of defparam/smuggler's default
// mutations (not its file): 13 bytes at 10 positions around
// Transfer-Encoding, plus 4 named forms, each framed CL.TE (a
// Content-Length that covers a hidden request) and TE-only.
func smugglerMutations() []smuggleVector {
	bytesSet := []byte{0x01, 0x04, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x1f, 0x20, 0x7f, 0xa0, 0xff}
	positions := []func(b string) string{
		func(b string) string { return b + "Transfer-Encoding: chunked" },
		func(b string) string { return "Transfer-Encoding" + b + ": chunked" },
		func(b string) string { return "Transfer-Encoding:" + b + "chunked" },
		func(b string) string { return "Transfer-Encoding: " + b + "chunked" },
		func(b string) string { return "Transfer-Encoding: chunked" + b },
		func(b string) string { return "Transfer-Encoding: chun" + b + "ked" },
		func(b string) string { return "Transfer" + b + "Encoding: chunked" },
		func(b string) string { return "X-Pad: x" + b + "Transfer-Encoding: chunked" },
		func(b string) string { return "X-Pad: x\r\n" + b + "Transfer-Encoding: chunked" },
		func(b string) string { return "Transfer-Encoding: chunked\r\n" + b + "X-Pad: x" },
	}
	var lines []struct{ name, line string }
	for pi, pos := range positions {
		for _, b := range bytesSet {
			lines = append(lines, struct{ name, line string }{fmt.Sprintf("pos%d byte %#02x", pi, b), pos(string([]byte{b}))})
		}
	}
	for i, named := range []string{
		"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
		"Transfer-Encoding: chunked, identity",
		`Transfer-Encoding: "chunked"`,
		"Transfer-Encoding: cHuNkEd",
	} {
		lines = append(lines, struct{ name, line string }{fmt.Sprintf("named%d", i), named})
	}
	hidden := "0\r\n\r\nGET " + smuggledPath + " HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
	var out []smuggleVector
	for _, l := range lines {
		out = append(out,
			smuggleVector{name: "CL.TE " + l.name, head: l.line + "\r\nContent-Length: " + strconv.Itoa(len(hidden)) + "\r\n\r\n" + hidden},
			smuggleVector{name: "TE " + l.name, head: l.line + "\r\n\r\n5\r\nhello\r\n0\r\n\r\n"})
	}
	return out
}

// TestSmugglingVectors (T-D1/T-D2): SECURITY-TESTS.md §3 and the
// regenerated smuggler mutations, as raw bytes at the front door and
// inside an intercepted tunnel. A raw upstream records what reaches it:
// for every vector either nothing (the broker refused, and closed the
// connection) or exactly one complete request framed one way only, with
// CRLF-only, unfolded bytes; never the hidden request.
func TestSmugglingVectors(t *testing.T) {
	plain, secure := newRawUpstream(t, false), newRawUpstream(t, true)
	rule := bearerRule("inject", "127.0.0.1")
	rule.Ports = []int{plain.port, secure.port}
	rule.AllowPlaintext = true // the front-door rows go to a plain upstream
	h := newHarness(t, harnessOpts{rules: []rules.Spec{rule}, roots: []*httptest.Server{secure.srv}})

	rows := []smuggleVector{
		{name: "1 Content-Length with chunked", head: "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nZ\r\n0\r\n\r\n", status: 400},
		{name: "2 duplicate Content-Length, same value", head: "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", status: 200, body: "hello"},
		{name: "3 duplicate Content-Length, different", head: "Content-Length: 1\r\nContent-Length: 2\r\n\r\nab", status: 400},
		{name: "4 Content-Length list", head: "Content-Length: 1, 1\r\n\r\na", status: 400},
		{name: "4 Content-Length plus sign", head: "Content-Length: +1\r\n\r\na", status: 400},
		{name: "5 xchunked", head: "Transfer-Encoding: xchunked\r\n\r\n", status: 501},
		{name: "5 chunked, identity", head: "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", status: 501},
		{name: "5 identity", head: "Transfer-Encoding: identity\r\n\r\n", status: 501},
		{name: "5 Transfer-Encoding twice", head: "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", status: 501},
		{name: "6 space before colon", head: "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", status: 400},
		{name: "7 obs-fold", head: "X-A: b\r\n c\r\n\r\n", status: 400},
		{name: "8 obs-fold Transfer-Encoding", head: "Transfer-Encoding:\r\n chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", status: 400},
		{name: "9 tab before chunked", head: "Transfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", status: 200, body: "hello"},
		{name: "10 vertical tab before chunked", head: "Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n", status: 400},
		{name: "11 Transfer-Encoding on HTTP/1.0", proto: "HTTP/1.0", head: "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", status: 400},
		{name: "12 bare LF lines", head: "Content-Length: 5\r\nX-A: b\r\n\r\nhello", lf: true, status: 200, body: "hello"},
		{name: "13 two Host", head: "Host: evil.test\r\n\r\n", status: 400},
		{name: "15 NUL in a value", head: "X-A: a\x00b\r\n\r\n", status: 400},
		{name: "16 absolute-form elsewhere", line: "GET https://evil.example/ HTTP/1.1", head: "\r\n", status: 421, only: "tunnel"},
		{name: "17 bare CR in a chunk extension", head: "Transfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n", status: 400},
		{name: "18 bare LF after a chunk size", head: "Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", status: 400},
		{name: "18 bare LF after the last chunk", head: "Transfer-Encoding: chunked\r\n\r\n0\n\r\n", status: 400},
		{name: "chunk data longer than its size", head: "Transfer-Encoding: chunked\r\n\r\n1\r\nab\r\n0\r\n\r\n", status: 400},
		{name: "trailer ending in a bare LF", head: "Transfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\n\r\n", status: 400},
		{name: "19 200 KiB header", head: "X-Big: " + strings.Repeat("a", 200<<10) + "\r\n\r\n", status: 431},
	}
	// Row 14 (Host with a trailing space) is accepted and bound after
	// trimming; its Host line is built per listener below.
	rows = append(rows, smuggleVector{name: "14 Host with a trailing space", head: "\r\n", status: 200, body: ""})
	all := append(rows, smugglerMutations()...)

	for _, where := range []string{"front", "tunnel"} {
		t.Run(where, func(t *testing.T) {
			up := plain
			if where == "tunnel" {
				up = secure
			}
			authority := up.authority()
			for _, v := range all {
				if v.only != "" && v.only != where {
					continue
				}
				if strings.HasPrefix(v.name, "14 ") {
					v.host = "Host: " + authority + " \r\n"
				}
				t.Run(v.name, func(t *testing.T) {
					var c net.Conn
					if where == "front" {
						c = h.dialFront()
					} else {
						c = h.tunnelTo(authority)
					}
					before := up.count()
					res := h.sendWire(c, v.build(where == "front", authority))
					got := up.since(before)
					for _, r := range got {
						if r.path == smuggledPath {
							t.Fatal("the hidden request reached the upstream")
						}
					}
					if res.resp == nil {
						t.Fatalf("no response (upstream got %d requests)", len(got))
					}
					status := res.resp.StatusCode
					if v.status != 0 && status != v.status {
						t.Fatalf("status %d, want %d (%s)", status, v.status, res.resp.Header.Get(HeaderError))
					}
					switch {
					case status == http.StatusOK:
						if len(got) != 1 || !got[0].complete {
							t.Fatalf("forwarded: upstream got %d requests (complete: %v), want exactly one", len(got), len(got) == 1 && got[0].complete)
						}
						checkUnambiguous(t, got[0])
						if v.status == http.StatusOK && string(got[0].body) != v.body {
							t.Errorf("upstream body %q, want %q", got[0].body, v.body)
						}
						if a := got[0].header.Values("Authorization"); len(a) != 1 || a[0] != "Bearer "+h.canary {
							t.Error("the forwarded request does not carry exactly the injected credential")
						}
					case status == http.StatusBadRequest, status == http.StatusNotImplemented, status == http.StatusRequestHeaderFieldsTooLarge:
						if len(got) != 0 {
							t.Fatalf("refused with %d, yet the upstream got %d requests", status, len(got))
						}
						if !res.closed() {
							t.Errorf("refused with %d but the connection stays open", status)
						}
					case status == http.StatusMisdirectedRequest && v.status == status:
						if len(got) != 0 {
							t.Fatalf("misdirected, yet the upstream got %d requests", len(got))
						}
					case status == http.StatusBadGateway && v.status == 0:
						// A bare LF that ends the head early leaves a valid
						// request followed by bytes the guard refuses in the
						// same read: the connection is ended, and the request
						// in flight on it is aborted with it.
						if len(got) > 1 {
							t.Fatalf("upstream got %d requests", len(got))
						}
						for _, r := range got {
							checkUnambiguous(t, r)
						}
						if !res.closed() {
							t.Error("the connection stays open after refused bytes")
						}
					default:
						t.Fatalf("unexpected status %d (%s)", status, res.resp.Header.Get(HeaderError))
					}
				})
			}
			checkCleanWire(t, up.rawBytes())
		})
	}

	// Row 18 when the bad chunk line arrives after the head was read: the
	// head may already be on its way upstream, but no request completes
	// there, the workload gets an error, and the connection ends.
	t.Run("18 bare LF in a later read", func(t *testing.T) {
		for _, where := range []string{"front", "tunnel"} {
			up := plain
			if where == "tunnel" {
				up = secure
			}
			var c net.Conn
			if where == "front" {
				c = h.dialFront()
			} else {
				c = h.tunnelTo(up.authority())
			}
			before := up.count()
			v := smuggleVector{head: "Transfer-Encoding: chunked\r\n\r\n"}
			if _, err := io.WriteString(c, v.build(where == "front", up.authority())); err != nil {
				t.Fatal(err)
			}
			eventually(2*time.Second, func() bool { return up.count() > before })
			res := h.sendWire(c, "5\nhello\r\n0\r\n\r\n")
			if res.resp != nil && res.resp.StatusCode < 400 {
				t.Errorf("%s: status %d after a bare-LF chunk line", where, res.resp.StatusCode)
			}
			if !res.closed() {
				t.Errorf("%s: the connection stays open after a framing error", where)
			}
			time.Sleep(200 * time.Millisecond)
			for _, r := range up.since(before) {
				if r.complete {
					t.Errorf("%s: a request with a refused body completed at the upstream", where)
				}
			}
		}
	})

	// Still serving, and still injecting, after all of it.
	req, _ := http.NewRequest(http.MethodGet, "https://"+secure.authority()+"/after", nil)
	resp, _ := h.do(req)
	wantStatus(t, resp, http.StatusOK, "")
	if n := len(h.logs.FilterMessage("panic while handling a request").All()); n != 0 {
		t.Fatalf("%d panics", n)
	}
}

// TestTunnelDesync (T-D3): requests pipelined inside one tunnel are each
// framed, judged and injected on their own; a request hidden in a body
// stays body; after a framing error the tunnel takes no further request.
func TestTunnelDesync(t *testing.T) {
	up := newRawUpstream(t, true)
	rule := bearerRule("inject", "127.0.0.1")
	rule.Ports = []int{up.port}
	rule.When = `!request.path.startsWith("/secret")`
	h := newHarness(t, harnessOpts{rules: []rules.Spec{rule}, roots: []*httptest.Server{up.srv}})
	auth := up.authority()
	host := "Host: " + auth + "\r\n"
	injectedOnce := func(t *testing.T, r wireRequest) {
		t.Helper()
		if a := r.header.Values("Authorization"); len(a) != 1 || a[0] != "Bearer "+h.canary {
			t.Errorf("%s: upstream saw %d Authorization values or a wrong one", r.path, len(a))
		}
	}
	paths := func(rs []wireRequest) []string {
		var out []string
		for _, r := range rs {
			out = append(out, r.path)
		}
		return out
	}

	t.Run("pipelined requests are judged one by one", func(t *testing.T) {
		c := h.tunnelTo(auth)
		before := up.count()
		raw := "POST /one HTTP/1.1\r\n" + host + "Content-Length: 5\r\n\r\nhello" +
			"GET /secret/two HTTP/1.1\r\n" + host + "Authorization: Bearer WORKLOAD\r\n\r\n" +
			"GET /three HTTP/1.1\r\n" + host + "\r\n"
		if _, err := io.WriteString(c, raw); err != nil {
			t.Fatal(err)
		}
		resps := h.readResponses(c, bufio.NewReader(c), 3)
		if len(resps) != 3 {
			t.Fatalf("%d responses, want 3", len(resps))
		}
		for i, want := range []int{200, 403, 200} {
			if resps[i].StatusCode != want {
				t.Errorf("response %d: %d, want %d", i, resps[i].StatusCode, want)
			}
		}
		got := up.since(before)
		if p := paths(got); len(p) != 2 || p[0] != "/one" || p[1] != "/three" {
			t.Fatalf("upstream got %v, want [/one /three]", p)
		}
		for _, r := range got {
			injectedOnce(t, r)
		}
	})

	t.Run("Content-Length shorter than the body", func(t *testing.T) {
		// The bytes after the declared length are the next request, and
		// that request is decided itself: /secret is denied.
		c := h.tunnelTo(auth)
		before := up.count()
		raw := "POST /short HTTP/1.1\r\n" + host + "Content-Length: 5\r\n\r\nhello" +
			"GET /secret/hidden HTTP/1.1\r\n" + host + "\r\n"
		if _, err := io.WriteString(c, raw); err != nil {
			t.Fatal(err)
		}
		resps := h.readResponses(c, bufio.NewReader(c), 2)
		if len(resps) != 2 || resps[0].StatusCode != 200 || resps[1].StatusCode != http.StatusForbidden {
			t.Fatalf("responses %v, want 200 then 403", statuses(resps))
		}
		got := up.since(before)
		if p := paths(got); len(p) != 1 || p[0] != "/short" || string(got[0].body) != "hello" {
			t.Fatalf("upstream got %v, want only /short with its 5 bytes", p)
		}
		injectedOnce(t, got[0])
	})

	t.Run("Content-Length longer than the first part", func(t *testing.T) {
		// A request line inside the declared length is body, never a request.
		c := h.tunnelTo(auth)
		before := up.count()
		hidden := "GET /secret/inside HTTP/1.1\r\n" + host + "\r\n"
		body := "short" + hidden
		raw := "POST /long HTTP/1.1\r\n" + host + "Content-Length: " + strconv.Itoa(len(body)) + "\r\n\r\nshort"
		if _, err := io.WriteString(c, raw); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
		if _, err := io.WriteString(c, hidden); err != nil {
			t.Fatal(err)
		}
		resps := h.readResponses(c, bufio.NewReader(c), 1)
		if len(resps) != 1 || resps[0].StatusCode != 200 {
			t.Fatalf("responses %v, want one 200", statuses(resps))
		}
		got := up.since(before)
		if p := paths(got); len(p) != 1 || p[0] != "/long" || string(got[0].body) != body {
			t.Fatalf("upstream got %v, want only /long carrying the inner request as body", p)
		}
	})

	t.Run("a request after a 4xx decision", func(t *testing.T) {
		// A denied request's unread body is skipped, not parsed; the next
		// request is judged and injected on its own.
		c := h.tunnelTo(auth)
		before := up.count()
		raw := "POST /secret/x HTTP/1.1\r\n" + host + "Content-Length: 30\r\n\r\nGET /secret/y HTTP/1.1\r\n\r\n...." +
			"GET /after HTTP/1.1\r\n" + host + "\r\n"
		if _, err := io.WriteString(c, raw); err != nil {
			t.Fatal(err)
		}
		resps := h.readResponses(c, bufio.NewReader(c), 2)
		if len(resps) != 2 || resps[0].StatusCode != http.StatusForbidden || resps[1].StatusCode != 200 {
			t.Fatalf("responses %v, want 403 then 200", statuses(resps))
		}
		got := up.since(before)
		if p := paths(got); len(p) != 1 || p[0] != "/after" {
			t.Fatalf("upstream got %v, want only /after", p)
		}
		injectedOnce(t, got[0])
	})

	for _, bad := range []struct{ name, raw string }{
		{"invalid field name", "GET /a HTTP/1.1\r\n" + host + "X A: b\r\n\r\n"},
		{"obs-fold", "GET /a HTTP/1.1\r\n" + host + "X-A: b\r\n c\r\n\r\n"},
		{"Transfer-Encoding on HTTP/1.0", "POST /a HTTP/1.0\r\n" + host + "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
		{"bad chunk", "POST /a HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\n1\r\nab\r\n0\r\n\r\n"},
		{"CONNECT inside the tunnel", "CONNECT " + auth + " HTTP/1.1\r\n" + host + "\r\n"},
	} {
		t.Run("framing error closes the tunnel: "+bad.name, func(t *testing.T) {
			c := h.tunnelTo(auth)
			before := up.count()
			if _, err := io.WriteString(c, bad.raw+"GET /next HTTP/1.1\r\n"+host+"\r\n"); err != nil {
				t.Fatal(err)
			}
			resps := h.readResponses(c, bufio.NewReader(c), 2)
			if len(resps) != 1 || resps[0].StatusCode < 400 {
				t.Fatalf("responses %v, want exactly one refusal and then the end of the tunnel", statuses(resps))
			}
			if n := len(up.since(before)); n != 0 {
				t.Fatalf("upstream got %d requests", n)
			}
		})
	}
}

func statuses(rs []*http.Response) []int {
	var out []int
	for _, r := range rs {
		out = append(out, r.StatusCode)
	}
	return out
}

// deliberateReasons are the shapes the guard refuses although net/http
// accepts them; any other refusal of a stream net/http parses is a framer
// bug (it would desynchronise from net/http).
var deliberateReasons = map[string]bool{
	reasonObsFold: true, reasonTEOnHTTP10: true, reasonTEAndCL: true, reasonTrailer: true, reasonBareCR: true,
}

// FuzzRequestHead checks the framing guard against net/http's own parser:
// fed in any split, it reaches the same verdict; on a stream net/http
// parses request by request, it stays exactly in step (at a request
// boundary after the last request net/http read whole) unless it refused
// one of the deliberate shapes.
func FuzzRequestHead(f *testing.F) {
	for _, tc := range framingCases {
		f.Add([]byte(tc.raw), uint8(3))
	}
	for _, v := range smugglerMutations()[:40] {
		f.Add([]byte(v.build(false, "a:443")), uint8(7))
	}
	f.Add([]byte("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0005\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n"), uint8(1))
	f.Add([]byte("POST / HTTP/1.1\r\ncontent-length:  3 \r\nCONTENT-LENGTH: 3\r\n\r\nabc"), uint8(2))
	f.Add([]byte("GET / HTTP/1.5\r\nTransfer-Encoding: CHUNKED \r\n\r\nA\r\n0123456789\r\n0\r\n\r\n"), uint8(4))
	f.Fuzz(func(t *testing.T, data []byte, split uint8) {
		var whole framer
		n, err := whole.feed(bytes.Clone(data))
		if n < 0 || n > len(data) {
			t.Fatalf("delivered %d of %d bytes", n, len(data))
		}
		if err == nil && n != len(data) {
			t.Fatalf("accepted but delivered %d of %d bytes", n, len(data))
		}
		var parts framer
		step := int(split%32) + 1
		var perr error
		for i := 0; i < len(data) && perr == nil; i += step {
			_, perr = parts.feed(bytes.Clone(data[i:min(i+step, len(data))]))
		}
		if (err == nil) != (perr == nil) || err != nil && err.Error() != perr.Error() {
			t.Fatalf("verdict depends on read size: %v vs %v", err, perr)
		}

		// With a head-size limit the verdict (refused or not) does not
		// depend on the read size either; the reason may (a head both
		// too large and malformed is refused for whichever is seen first).
		small, smallParts := framer{maxHead: 64}, framer{maxHead: 64}
		_, serr := small.feed(bytes.Clone(data))
		var sperr error
		for i := 0; i < len(data) && sperr == nil; i += step {
			_, sperr = smallParts.feed(bytes.Clone(data[i:min(i+step, len(data))]))
		}
		if (serr == nil) != (sperr == nil) {
			t.Fatalf("head-limit verdict depends on read size: %v vs %v", serr, sperr)
		}

		consumed, stop := goConsumed(data)
		var g framer
		_, gerr := g.feed(bytes.Clone(data[:consumed]))
		switch {
		case gerr != nil:
			var fe *errFraming
			if !errors.As(gerr, &fe) || !deliberateReasons[fe.reason] {
				t.Fatalf("refused %q (%v) although net/http reads it", data[:consumed], gerr)
			}
		case stop == "connect":
			if g.st != fsTunnel {
				t.Fatalf("after a CONNECT the framer is in state %d", g.st)
			}
		case g.st != fsRequestStart:
			t.Fatalf("out of step with net/http after %q: state %d", data[:consumed], g.st)
		}
	})
}

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// goConsumed reads data with http.ReadRequest, request by request, bodies
// included, and returns how many bytes the requests it read whole span.
// It stops at the first error, at a CONNECT (then a tunnel follows) and at
// a version the server would not serve as HTTP/1.
func goConsumed(data []byte) (int, string) {
	cr := &countingReader{r: bytes.NewReader(data)}
	br := bufio.NewReader(cr)
	consumed := 0
	for {
		req, err := http.ReadRequest(br)
		if err != nil || req.ProtoMajor != 1 {
			return consumed, "error"
		}
		if req.Method == http.MethodConnect {
			return cr.n - br.Buffered(), "connect"
		}
		if _, err := io.Copy(io.Discard, req.Body); err != nil {
			return consumed, "error"
		}
		consumed = cr.n - br.Buffered()
	}
}

// TestRefusedFramingIsLogged: a refusal leaves a log line (a fixed reason,
// nothing the workload sent) and never a decision for the request.
func TestRefusedFramingIsLogged(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	c := h.dialFront()
	res := h.sendWire(c, "POST http://127.0.0.1:1/ HTTP/1.0\r\nHost: 127.0.0.1:1\r\nX-Probe: "+h.canary+"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
	if res.resp == nil || res.resp.StatusCode != http.StatusBadRequest || !res.closed() {
		t.Fatal("the front door did not refuse and close")
	}
	logged := h.logs.FilterMessage("refused a request with ambiguous framing").All()
	if len(logged) != 1 || logged[0].ContextMap()["reason"] != reasonTEOnHTTP10 {
		t.Fatalf("refusal log lines: %d", len(logged))
	}
	if n := len(h.auditLines()); n != 0 {
		t.Fatalf("%d decisions for a request that was never read", n)
	}
}

// BenchmarkFramingGuard is the guard's cost per request: a typical
// intercepted GET head, and a POST with a 1 KiB chunked body.
func BenchmarkFramingGuard(b *testing.B) {
	get := []byte("GET /v1/items?page=2 HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: keygate-bench/1\r\n" +
		"Accept: application/json\r\nAccept-Encoding: gzip\r\nAuthorization: Bearer workload\r\n\r\n")
	post := []byte("POST /v1/items HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n400\r\n" +
		strings.Repeat("x", 1024) + "\r\n0\r\n\r\n")
	for _, bc := range []struct {
		name string
		raw  []byte
	}{{"get", get}, {"chunked-post", post}} {
		b.Run(bc.name, func(b *testing.B) {
			var f framer
			b.SetBytes(int64(len(bc.raw)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := f.feed(bc.raw); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
