package intercept

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/elazarl/goproxy"
	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/rules"
)

// filler is deterministic, printable, and never contains a canary.
func filler(n int) string {
	const alpha = "abcdefghijklmnopqrstuvwxyz0123456789 \n"
	b := make([]byte, n)
	for i := range b {
		b[i] = alpha[(i*7+i/13)%len(alpha)]
	}
	return string(b)
}

func gz(s string) []byte {
	var b bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&b, gzip.BestCompression)
	_, _ = io.WriteString(zw, s)
	_ = zw.Close()
	return b.Bytes()
}

// flushBytes writes s one byte at a time, flushing after each, so the
// broker's reads of the body end inside s.
func flushBytes(w http.ResponseWriter, s string) {
	f := w.(http.Flusher)
	for i := 0; i < len(s); i++ {
		_, _ = io.WriteString(w, s[i:i+1])
		f.Flush()
	}
}

// TestResponseScrub is SECURITY-TESTS T-B3: an upstream that echoes the
// injected Authorization back, in headers or body, must not hand the
// credential to the workload; lengths and framing are unchanged.
func TestResponseScrub(t *testing.T) {
	big := filler(100 << 10)
	type check struct {
		status  int
		bodyLen int // expected body length the workload reads
		cl      int64
		same    func(auth string) []byte // when set, the body must be these exact bytes
		echoes  bool                     // the warning must be logged once
	}
	cases := []struct {
		name    string
		method  string
		gzipReq bool
		handler func(w http.ResponseWriter, r *http.Request)
		want    func(auth string) check
	}{
		{
			name: "header echo",
			handler: func(w http.ResponseWriter, r *http.Request) {
				a := r.Header.Get("Authorization")
				tok := strings.TrimPrefix(a, "Bearer ")
				w.Header().Set("X-Echo-Authorization", a)
				w.Header().Set("Location", "https://example.com/cb?t="+url.QueryEscape(tok))
				w.Header().Add("Set-Cookie", "s="+base64.StdEncoding.EncodeToString([]byte(tok)))
				w.Header().Set("Content-Length", "2")
				_, _ = io.WriteString(w, "ok")
			},
			want: func(string) check { return check{status: 200, bodyLen: 2, cl: 2, echoes: true} },
		},
		{
			name: "small body with Content-Length",
			handler: func(w http.ResponseWriter, r *http.Request) {
				body := `{"headers":{"Authorization":"` + r.Header.Get("Authorization") + `"}}`
				w.Header().Set("Content-Length", strconv.Itoa(len(body)))
				_, _ = io.WriteString(w, body)
			},
			want: func(a string) check {
				n := len(`{"headers":{"Authorization":"` + a + `"}}`)
				return check{status: 200, bodyLen: n, cl: int64(n), echoes: true}
			},
		},
		{
			name: "error page quoting the base64 and escaped forms",
			handler: func(w http.ResponseWriter, r *http.Request) {
				tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
				body := "bad token " + base64.StdEncoding.EncodeToString([]byte(tok)) + " / " + url.QueryEscape(tok) + "\n"
				w.Header().Set("Content-Length", strconv.Itoa(len(body)))
				w.WriteHeader(http.StatusUnauthorized)
				_, _ = io.WriteString(w, body)
			},
			want: func(a string) check {
				tok := strings.TrimPrefix(a, "Bearer ")
				n := len("bad token " + base64.StdEncoding.EncodeToString([]byte(tok)) + " / " + url.QueryEscape(tok) + "\n")
				return check{status: 401, bodyLen: n, cl: int64(n), echoes: true}
			},
		},
		{
			name: "large chunked, secret split byte by byte",
			handler: func(w http.ResponseWriter, r *http.Request) {
				_, _ = io.WriteString(w, big)
				w.(http.Flusher).Flush()
				flushBytes(w, "<"+r.Header.Get("Authorization")+">")
				_, _ = io.WriteString(w, big)
			},
			want: func(a string) check {
				return check{status: 200, bodyLen: 2*len(big) + len(a) + 2, cl: -1, echoes: true}
			},
		},
		{
			name: "large Content-Length, secret split byte by byte",
			handler: func(w http.ResponseWriter, r *http.Request) {
				a := r.Header.Get("Authorization")
				w.Header().Set("Content-Length", strconv.Itoa(2*len(big)+2*len(a)))
				_, _ = io.WriteString(w, big)
				flushBytes(w, a)
				_, _ = io.WriteString(w, big)
				flushBytes(w, a) // at the very end of the body
			},
			want: func(a string) check {
				n := 2*len(big) + 2*len(a)
				return check{status: 200, bodyLen: n, cl: int64(n), echoes: true}
			},
		},
		{
			name:    "gzip passed through untouched",
			gzipReq: true,
			handler: func(w http.ResponseWriter, r *http.Request) {
				b := gz("echo " + r.Header.Get("Authorization"))
				w.Header().Set("Content-Encoding", "gzip")
				w.Header().Set("Content-Length", strconv.Itoa(len(b)))
				_, _ = w.Write(b)
			},
			want: func(a string) check {
				b := gz("echo " + a)
				return check{status: 200, bodyLen: len(b), cl: int64(len(b)), same: func(string) []byte { return b }}
			},
		},
		{
			name: "no echo is byte-identical",
			handler: func(w http.ResponseWriter, r *http.Request) {
				_, _ = io.WriteString(w, big)
			},
			want: func(string) check {
				return check{status: 200, bodyLen: len(big), cl: -1, same: func(string) []byte { return []byte(big) }}
			},
		},
		{
			name:   "HEAD keeps Content-Length, header scrubbed",
			method: http.MethodHead,
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("X-Echo", r.Header.Get("Authorization"))
				w.Header().Set("Content-Length", "1234")
			},
			want: func(string) check { return check{status: 200, bodyLen: 0, cl: 1234, echoes: true} },
		},
		{
			name: "204 with echo header",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("X-Echo", r.Header.Get("Authorization"))
				w.WriteHeader(http.StatusNoContent)
			},
			want: func(string) check { return check{status: 204, bodyLen: 0, cl: 0, echoes: true} },
		},
		{
			name: "304 with echo header",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Etag", `"`+strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")+`"`)
				w.WriteHeader(http.StatusNotModified)
			},
			want: func(string) check { return check{status: 304, bodyLen: 0, cl: 0, echoes: true} },
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			up := httptest.NewTLSServer(http.HandlerFunc(tc.handler))
			t.Cleanup(up.Close)
			h := newHarness(t, harnessOpts{rules: []rules.Spec{bearerRule("inject", "127.0.0.1")}, roots: []*httptest.Server{up}})
			auth := "Bearer " + h.canary
			want := tc.want(auth)
			method := tc.method
			if method == "" {
				method = http.MethodGet
			}
			req, _ := http.NewRequest(method, up.URL+"/headers", nil)
			if tc.gzipReq {
				req.Header.Set("Accept-Encoding", "gzip") // no transparent decompression
			}
			resp, body := h.do(req)
			if resp.StatusCode != want.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, want.status)
			}
			if len(body) != want.bodyLen {
				t.Fatalf("body length %d, want %d", len(body), want.bodyLen)
			}
			if resp.ContentLength != want.cl {
				t.Fatalf("Content-Length %d, want %d", resp.ContentLength, want.cl)
			}
			if want.same != nil && body != string(want.same(auth)) {
				t.Fatal("the body was modified")
			}
			if want.echoes && want.bodyLen > 2 && !strings.Contains(body, strings.Repeat("*", 16)) {
				t.Fatalf("the echoed Authorization was not masked in place: %.200q", body)
			}
			for k, vs := range resp.Header {
				for _, v := range vs {
					if strings.Contains(v, "CANARY") {
						t.Fatalf("header %s = %q", k, v)
					}
				}
			}
			n := len(h.logs.FilterMessage(msgEchoScrubbed).All())
			if want.echoes && n != 1 || !want.echoes && n != 0 {
				t.Fatalf("%d %q lines", n, msgEchoScrubbed)
			}
			// The header echo keeps its length and its non-secret part.
			if v := resp.Header.Get("X-Echo-Authorization"); v != "" && v != "Bearer "+strings.Repeat("*", len(h.canary)) {
				t.Fatalf("X-Echo-Authorization = %q", v)
			}
		})
	}
}

// TestScrubOnlyWhenInjected: without an injected credential the response
// body is not wrapped at all (the hot path pays nothing); with one it is.
func TestScrubOnlyWhenInjected(t *testing.T) {
	p := &Proxy{log: zap.NewNop()}
	for _, injected := range []bool{false, true} {
		x := &exchange{rec: broker.Record{RequestID: "r1"}, out: &statusWriter{}}
		if injected {
			x.cred = broker.Credential{Name: "t", Fields: map[string]broker.Secret{broker.FieldToken: broker.NewSecret("s3cr3t-value")}}
		}
		req, _ := http.NewRequest(http.MethodGet, "https://example.com/", nil)
		req = req.WithContext(withExchange(context.Background(), x))
		body := io.NopCloser(strings.NewReader("hello"))
		resp := &http.Response{StatusCode: 200, Header: http.Header{}, Body: body, ContentLength: 5, Request: req}
		resp = p.onResponse(resp, &goproxy.ProxyCtx{Req: req})
		_, wrapped := resp.Body.(*scrubReader)
		if wrapped != injected {
			t.Fatalf("injected=%v: body wrapped=%v", injected, wrapped)
		}
	}
}

// refMask is the reference: every byte inside any occurrence of any
// needle in in becomes '*'.
func refMask(in []byte, needles [][]byte) []byte {
	out := bytes.Clone(in)
	for _, n := range needles {
		for i := 0; i+len(n) <= len(in); i++ {
			if bytes.Equal(in[i:i+len(n)], n) {
				mask(out[i : i+len(n)])
			}
		}
	}
	return out
}

// chunkReader returns src in chunks whose sizes come from sizes.
type chunkReader struct {
	src   []byte
	sizes []byte
	i     int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.src) == 0 {
		return 0, io.EOF
	}
	n := 1
	if len(c.sizes) > 0 {
		n = int(c.sizes[c.i%len(c.sizes)])%97 + 1
		c.i++
	}
	n = min(n, len(p), len(c.src))
	copy(p, c.src[:n])
	c.src = c.src[n:]
	return n, nil
}

func FuzzScrubReader(f *testing.F) {
	f.Add([]byte("hello world, the token is here"), []byte("secret"), []byte("c2VjcmV0"), uint16(5), []byte{1, 2, 3})
	f.Add([]byte(""), []byte("aa"), []byte("aaa"), uint16(0), []byte{0})
	f.Add(bytes.Repeat([]byte("ab"), 5000), []byte("abab"), []byte("ba"), uint16(999), []byte{200, 1, 50})
	f.Add([]byte("xyz"), []byte("x"), []byte("yzq"), uint16(3), []byte{})
	f.Fuzz(func(t *testing.T, body, n1, n2 []byte, pos uint16, sizes []byte) {
		var needles [][]byte
		for _, n := range [][]byte{n1, n2} {
			if len(n) == 0 || len(n) > 256 || bytes.IndexByte(n, '*') >= 0 {
				continue
			}
			needles = append(needles, n)
		}
		if len(needles) == 0 {
			return
		}
		p := 0
		if len(body) > 0 {
			p = int(pos) % (len(body) + 1)
		}
		in := append(append(append(bytes.Clone(body[:p]), needles[0]...), body[p:]...), needles[len(needles)-1]...)
		var src io.Reader = &chunkReader{src: in, sizes: sizes}
		hits := 0
		s := newScrubReader(io.NopCloser(src), needles, func() { hits++ }, nil)
		if len(sizes) > 1 && sizes[1]&1 == 1 {
			// A small read buffer, as for a short Content-Length body.
			s.sizeFor(int64(sizes[1] % 8))
		}
		var r io.Reader = s
		if len(sizes) > 0 && sizes[0]&1 == 1 {
			r = iotest.OneByteReader(s)
		}
		out, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		if len(out) != len(in) {
			t.Fatalf("length %d, want %d", len(out), len(in))
		}
		for _, n := range needles {
			if bytes.Contains(out, n) {
				t.Fatalf("needle %q survived in %q", n, out)
			}
		}
		if want := refMask(in, needles); !bytes.Equal(out, want) {
			t.Fatalf("output %q, want %q", out, want)
		}
		if hits == 0 {
			t.Fatal("no hit reported")
		}
	})
}

func BenchmarkScrubReader(b *testing.B) {
	body := make([]byte, 1<<20)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range body {
		body[i] = byte(' ' + r.IntN(95))
	}
	needles := credentialForms(broker.Credential{Fields: map[string]broker.Secret{
		broker.FieldToken: broker.NewSecret("ghp_" + strings.Repeat("Z", 36)),
	}})
	for _, n := range needles {
		if bytes.Contains(body, n) {
			b.Fatal("the body matches")
		}
	}
	b.Run("scrub", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		for b.Loop() {
			s := newScrubReader(io.NopCloser(bytes.NewReader(body)), needles, nil, nil)
			if _, err := io.Copy(io.Discard, s); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("passthrough", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		for b.Loop() {
			if _, err := io.Copy(io.Discard, struct{ io.Reader }{bytes.NewReader(body)}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func TestContainsAny(t *testing.T) {
	needles := [][]byte{[]byte("secret"), []byte("c2VjcmV0")}
	for _, tc := range []struct {
		s    string
		want bool
	}{
		{"", false},
		{"secret", true},
		{"Bearer secret", true},
		{"secre", false},
		{"ssssecret!", true},
		{"sec ret", false},
		{"xc2VjcmV0", true},
		{"c2VjcmV", false},
		{"s", false},
	} {
		t.Run(tc.s, func(t *testing.T) {
			if got := containsAny(tc.s, needles); got != tc.want {
				t.Fatalf("containsAny(%q) = %v, want %v", tc.s, got, tc.want)
			}
			if got := containsAny(tc.s, needles); got != (strings.Contains(tc.s, "secret") || strings.Contains(tc.s, "c2VjcmV0")) {
				t.Fatalf("containsAny(%q) disagrees with strings.Contains", tc.s)
			}
		})
	}
	if n := testing.AllocsPerRun(100, func() { containsAny("Bearer abc, and more text", needles) }); n != 0 {
		t.Fatalf("containsAny allocates %v times per call", n)
	}
}
