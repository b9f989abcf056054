package intercept

import (
	"bytes"
	"io"
	"net/http"
	"strings"

	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
)

// msgEchoScrubbed is logged, without the value, when an upstream response
// carried the credential injected into its request (SECURITY-TESTS T-B3).
const msgEchoScrubbed = "upstream echoed the injected credential; scrubbed"

// scrubBufSize is how much of a response body the scrubber reads at once,
// on top of the bytes it holds back between reads.
const scrubBufSize = 32 << 10

// credentialForms returns the byte strings that carry c on the wire
// (broker.Credential.EncodedForms): every value is masked, however short,
// because here the text is the workload's response, not a log line.
func credentialForms(c broker.Credential) [][]byte {
	forms := c.EncodedForms()
	out := make([][]byte, len(forms))
	for i, f := range forms {
		out[i] = []byte(f)
	}
	return out
}

// maskMatches overwrites with '*' every occurrence of a needle in b that
// starts before limit, clipped to b[:limit]. All occurrences are found on
// the unmasked bytes first, so overlapping needles are all caught. It
// returns how far past limit the furthest occurrence reaches (0 if none)
// and whether anything matched; spans is scratch space, returned for reuse.
func maskMatches(b []byte, needles [][]byte, limit int, spans [][2]int) (int, bool, [][2]int) {
	spans = spans[:0]
	for _, n := range needles {
		for i := 0; i < limit; {
			j := bytes.Index(b[i:], n)
			if j < 0 || i+j >= limit {
				break
			}
			spans = append(spans, [2]int{i + j, i + j + len(n)})
			i += j + 1
		}
	}
	over := 0
	for _, sp := range spans {
		mask(b[sp[0]:min(sp[1], limit)])
		over = max(over, sp[1]-limit)
	}
	return over, len(spans) > 0, spans
}

func mask(b []byte) {
	for i := range b {
		b[i] = '*'
	}
}

// scrubHeader masks needles in every value of h, in place, keeping each
// value's length. It reports whether anything was masked.
func scrubHeader(h http.Header, needles [][]byte) bool {
	hit := false
	for _, vs := range h {
		for i, v := range vs {
			if !containsAny(v, needles) {
				continue
			}
			b := []byte(v)
			maskMatches(b, needles, len(b), nil)
			vs[i] = string(b)
			hit = true
		}
	}
	return hit
}

// containsAny reports whether s holds any needle. It runs on every header
// value of every response that carried a credential, so it compares in
// place (a string(n) argument would allocate per call).
func containsAny(s string, needles [][]byte) bool {
	for _, n := range needles {
		if len(n) == 0 {
			continue
		}
		for i := 0; i+len(n) <= len(s); i++ {
			j := strings.IndexByte(s[i:], n[0])
			if j < 0 {
				break
			}
			i += j
			if i+len(n) <= len(s) && s[i:i+len(n)] == string(n) {
				return true
			}
		}
	}
	return false
}

// scrubReader masks needles in a stream without buffering it: each
// occurrence becomes a run of '*' of the same length, so Content-Length
// and framing stay valid. It holds back len(longest needle)-1 bytes between
// reads, so every start position is examined once with enough bytes after
// it to hold any needle (or at EOF); an occurrence split across upstream
// reads is caught.
type scrubReader struct {
	src     io.ReadCloser
	needles [][]byte
	keep    int
	buf     []byte
	off     int // buf[off:ready] is scrubbed and not yet returned
	ready   int
	end     int // buf[ready:end] is held back, unscrubbed
	carry   int // bytes from ready on inside an occurrence already found
	err     error
	size    int // read buffer size, besides the held-back bytes
	spans   [][2]int
	onHit   func() // called on each masked occurrence batch
	onEOF   func() // called once when src is exhausted (trailers)
}

func newScrubReader(src io.ReadCloser, needles [][]byte, onHit, onEOF func()) *scrubReader {
	longest := 0
	for _, n := range needles {
		longest = max(longest, len(n))
	}
	keep := max(longest-1, 0)
	return &scrubReader{src: src, needles: needles, keep: keep, size: scrubBufSize, onHit: onHit, onEOF: onEOF}
}

// sizeFor shrinks the buffer for a body of known, small length (most API
// responses), so scrubbing them does not allocate 32 KiB each. Call it
// before the first Read.
func (s *scrubReader) sizeFor(contentLength int64) *scrubReader {
	if contentLength >= 0 && contentLength < scrubBufSize {
		s.size = int(contentLength) + 1
	}
	return s
}

func (s *scrubReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for s.off == s.ready {
		if s.err != nil {
			return 0, s.err
		}
		s.fill()
	}
	n := copy(p, s.buf[s.off:s.ready])
	s.off += n
	return n, nil
}

// fill moves the held-back bytes to the front, reads more, and scrubs and
// releases everything but the last keep bytes (everything at EOF or on an
// error).
func (s *scrubReader) fill() {
	if s.buf == nil {
		s.buf = make([]byte, s.size+s.keep)
	}
	if s.off > 0 {
		s.end = copy(s.buf, s.buf[s.off:s.end])
		s.off, s.ready = 0, 0
	}
	n, err := s.src.Read(s.buf[s.end:])
	s.end += n
	limit := s.end - s.keep
	if err != nil {
		s.err = err
		limit = s.end
	}
	if limit > 0 {
		b := s.buf[:s.end]
		over, hit, spans := maskMatches(b, s.needles, limit, s.spans)
		s.spans = spans
		c := min(s.carry, limit)
		mask(b[:c])
		s.carry = max(s.carry-limit, over)
		s.ready = limit
		if hit && s.onHit != nil {
			s.onHit()
		}
	}
	if err != nil && s.onEOF != nil {
		s.onEOF()
		s.onEOF = nil
	}
}

func (s *scrubReader) Close() error { return s.src.Close() }

// scrubResponse removes the credential injected into x's request from the
// response headers (in place) and from an identity-encoded body (streamed).
// A compressed body is passed through untouched: its bytes are not the
// credential's bytes, and decompressing would change what the workload
// receives. A 101 body is the upgraded connection and is not wrapped.
func (p *Proxy) scrubResponse(resp *http.Response, x *exchange, w *statusWriter) {
	needles := credentialForms(x.cred)
	if len(needles) == 0 {
		return
	}
	warned := false
	warn := func() {
		if !warned {
			warned = true
			p.log.Warn(msgEchoScrubbed, zap.String("request_id", x.rec.RequestID))
		}
	}
	if scrubHeader(resp.Header, needles) {
		warn()
	}
	if resp.Body == nil || resp.Body == http.NoBody || resp.ContentLength == 0 ||
		resp.StatusCode == http.StatusSwitchingProtocols {
		return
	}
	if ce := resp.Header.Get("Content-Encoding"); ce != "" && !strings.EqualFold(ce, "identity") {
		return
	}
	trailer := resp.Trailer
	resp.Body = newScrubReader(resp.Body, needles, warn, func() {
		if scrubHeader(trailer, needles) {
			warn()
		}
	}).sizeFor(resp.ContentLength)
	// goproxy drops Content-Length when a handler replaces the body; the
	// scrubbed body has the same length, so the header is put back (not
	// with trailers, which need chunked framing).
	if cl := resp.Header.Get("Content-Length"); cl != "" && len(resp.Trailer) == 0 && w != nil {
		w.contentLength = cl
	}
}
