package intercept

import (
	"bytes"
	"errors"
	"net"
	"strconv"

	"go.uber.org/zap"
)

// The framing guard (SECURITY-TESTS.md §3 rows 1, 7, 8, 11, 17, 18) reads
// the raw bytes of every workload HTTP/1 connection, at the front door and
// inside intercepted tunnels, alongside net/http's own parser. Go's parser
// hides some ambiguous framings from handlers: it unfolds an obs-folded
// Transfer-Encoding, silently drops Transfer-Encoding on HTTP/1.0 (the body
// would become the next request), and lets Content-Length sit beside
// chunked. A handler cannot tell, so the guard refuses them on the wire:
// the request's head is withheld from net/http and the read fails, which
// net/http answers with 400 and a close. Nothing is decided, minted or
// forwarded for a refused request.
//
// The guard follows the same message framing as net/http (RFC 9112 §6),
// so it stays in step across keep-alive requests. Where net/http itself
// refuses a head (bad version, unknown coding, bad Content-Length) the
// guard lets net/http answer, then refuses any byte that follows on that
// connection: it never guesses a framing. After a CONNECT head the stream
// is a tunnel and the guard stops looking; every non-hijacking answer to a
// CONNECT therefore closes the connection (see closeAfterConnect).

// errFraming is what net/http's reader gets for a refused request. It is
// deliberately not a net.Error, so net/http answers 400 rather than
// closing silently.
type errFraming struct{ reason string }

func (e *errFraming) Error() string { return "intercept: ambiguous request framing: " + e.reason }

// Reasons, also the audit/log vocabulary (fixed strings: nothing the
// workload sent is quoted).
const (
	reasonObsFold        = "obs-fold line"
	reasonTEOnHTTP10     = "Transfer-Encoding on HTTP/1.0"
	reasonTEAndCL        = "Transfer-Encoding with Content-Length"
	reasonChunkBareLF    = "chunk line ends in a bare LF"
	reasonChunkLine      = "malformed chunk line"
	reasonChunkData      = "chunk data not followed by CRLF"
	reasonTrailer        = "malformed trailer section"
	reasonBareCR         = "bare CR in the request head"
	reasonAfterUnframed  = "bytes after a request whose framing was refused"
	reasonHeadTooLarge   = "request line and headers over limits.max_header_bytes"
	maxChunkLine         = 4096 // net/http's bufio size bounds a chunk line the same way
	maxFieldValue        = 64   // enough for any valid Transfer-Encoding or Content-Length
	maxVersionBytes      = 16
	transferEncodingName = "transfer-encoding"
	contentLengthName    = "content-length"
)

// framer states.
const (
	fsRequestStart = iota // before a request line (leading CR/LF skipped)
	fsRequestLine
	fsLineStart // at the start of a header line
	fsHeadCR    // a CR at the start of a line: the head ends at the LF
	fsFieldName
	fsFieldValue
	fsBody      // Content-Length body: remain bytes
	fsChunkLine // a chunk-size line
	fsChunkData // remain bytes of chunk data
	fsChunkCR   // the CR after chunk data
	fsChunkLF   // the LF after chunk data
	fsTrailerStart
	fsTrailerLine
	fsTrailerCR
	fsTrailerEndLF
	fsTunnel // after a CONNECT head: not HTTP any more
	fsDead   // after a head net/http refuses: nothing more is accepted
)

// field kinds.
const (
	fieldOther = iota
	fieldTE
	fieldCL
)

// framer is the incremental checker. The zero value expects a request.
type framer struct {
	st uint8

	// maxHead, when > 0, is the most bytes a request head (request line
	// through the blank line) may have; headN counts the current head's
	// bytes in earlier reads, headFrom is where it starts in this one.
	maxHead  int
	headN    int
	headFrom int

	// request line
	spaces    int // spaces seen in the request line
	method    int // bytes of "CONNECT" matched so far; -1 once it differs
	version   [maxVersionBytes]byte
	versionN  int  // bytes in version; > maxVersionBytes means too long
	pendingCR bool // a CR seen just before, not yet known to end the line

	// header field being read
	name     [len(transferEncodingName)]byte
	nameN    int // > len(name) means longer than any name we look for
	kind     int
	value    [maxFieldValue]byte
	valueN   int
	valueBig bool

	// the head so far
	teCount int
	teBad   bool // a Transfer-Encoding other than one "chunked"
	cl      []byte
	clSeen  bool
	clBad   bool
	headBad bool // net/http will refuse this head

	// body
	remain     uint64
	chunkPhase uint8 // 0 digits, 1 after-digits whitespace, 2 extension
	chunkDigs  int
	chunkLen   int
}

// feed checks p, the next bytes of the stream. On a refusal it returns
// the number of leading bytes of p that may still be delivered (those
// before the refused request's head, when that head starts in p) and the
// error.
func (f *framer) feed(p []byte) (int, error) {
	f.headFrom = 0
	n, err := f.scan(p)
	if err == nil && f.maxHead > 0 && f.inHead() {
		// The head goes on past this read: count what it has so far.
		f.headN += len(p) - f.headFrom
		if f.headN > f.maxHead {
			f.st = fsDead
			return f.headFrom, &errFraming{reason: reasonHeadTooLarge}
		}
	}
	return n, err
}

// inHead reports whether the framer is inside a request head.
func (f *framer) inHead() bool {
	switch f.st {
	case fsRequestLine, fsLineStart, fsHeadCR, fsFieldName, fsFieldValue:
		return true
	}
	return false
}

// headOver reports whether the head ending at p[i] is over maxHead.
func (f *framer) headOver(i int) bool {
	return f.maxHead > 0 && f.headN+i+1-f.headFrom > f.maxHead
}

// scan is feed without the head-size count of a head left unfinished.
func (f *framer) scan(p []byte) (int, error) {
	// headStart is where the current request began in p; 0 when it began
	// in an earlier read (then nothing of p is delivered on a refusal).
	headStart := 0
	refuse := func(reason string) (int, error) {
		f.st = fsDead
		return headStart, &errFraming{reason: reason}
	}
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch f.st {
		case fsTunnel:
			return len(p), nil
		case fsDead:
			return refuse(reasonAfterUnframed)

		case fsRequestStart:
			if c == '\r' || c == '\n' {
				continue // net/http tolerates blank lines after a POST; a stray one elsewhere it refuses
			}
			f.startHead()
			headStart, f.headFrom = i, i
			f.st = fsRequestLine
			i-- // re-read c as the first byte of the request line

		case fsRequestLine:
			switch {
			case c == '\n':
				f.pendingCR = false
				f.st = fsLineStart
			case f.pendingCR:
				return refuse(reasonBareCR)
			case c == '\r':
				f.pendingCR = true
			case c == ' ':
				f.spaces++
				if f.spaces == 1 && f.method != len("CONNECT") {
					f.method = -1
				}
				if f.spaces > 2 {
					f.versionN = maxVersionBytes + 1 // a space inside the version
				}
			case f.spaces == 0:
				if f.method >= 0 && f.method < len("CONNECT") && c == "CONNECT"[f.method] {
					f.method++
				} else {
					f.method = -1
				}
			case f.spaces == 2:
				if f.versionN < maxVersionBytes {
					f.version[f.versionN] = c
				}
				f.versionN++
			}

		case fsLineStart:
			switch c {
			case '\r':
				f.st = fsHeadCR
			case '\n':
				if f.headOver(i) {
					return refuse(reasonHeadTooLarge)
				}
				if n, err := f.endHead(); err != nil {
					return refuse(err.Error())
				} else if n == fsTunnel {
					return len(p), nil
				} else if n == fsDead {
					headStart = i + 1 // deliver the head: net/http answers it
				}
			case ' ', '\t':
				return refuse(reasonObsFold)
			default:
				f.nameN, f.kind, f.valueN, f.valueBig, f.pendingCR = 0, fieldOther, 0, false, false
				if j := bytes.IndexByte(p[i:], '\n'); j >= 0 {
					// The whole line is here (the usual case): judge it at once.
					f.fieldLine(p[i : i+j])
					i += j
					continue
				}
				f.st = fsFieldName
				i--
			}

		case fsHeadCR:
			if c != '\n' {
				return refuse(reasonBareCR)
			}
			if f.headOver(i) {
				return refuse(reasonHeadTooLarge)
			}
			if n, err := f.endHead(); err != nil {
				return refuse(err.Error())
			} else if n == fsTunnel {
				return len(p), nil
			} else if n == fsDead {
				headStart = i + 1
			}

		case fsFieldName:
			switch c {
			case ':':
				f.kind = fieldOther
				if f.nameN == len(transferEncodingName) && asciiEqualFold(f.name[:f.nameN], transferEncodingName) {
					f.kind = fieldTE
				} else if f.nameN == len(contentLengthName) && asciiEqualFold(f.name[:f.nameN], contentLengthName) {
					f.kind = fieldCL
				}
				f.st = fsFieldValue
			case '\n':
				f.headBad = true // a line without a colon: net/http refuses the head
				f.st = fsLineStart
			default:
				if f.nameN < len(f.name) {
					f.name[f.nameN] = c
				}
				f.nameN++
			}

		case fsFieldValue:
			if f.kind == fieldOther {
				// Skip to the end of the line in one step.
				j := bytes.IndexByte(p[i:], '\n')
				if j < 0 {
					return len(p), nil
				}
				i += j
				f.st = fsLineStart
				continue
			}
			switch c {
			case '\n':
				f.endField()
				f.st = fsLineStart
			case '\r':
				if f.pendingCR {
					f.addValue('\r')
				}
				f.pendingCR = true
			default:
				if f.pendingCR {
					f.addValue('\r')
					f.pendingCR = false
				}
				f.addValue(c)
			}

		case fsBody:
			i += f.consume(len(p)-i) - 1
			if f.remain == 0 {
				f.st = fsRequestStart
			}

		case fsChunkLine:
			f.chunkLen++
			if f.chunkLen > maxChunkLine {
				return refuse(reasonChunkLine)
			}
			if f.pendingCR {
				if c != '\n' {
					return refuse(reasonChunkLine) // a CR inside the line
				}
				f.pendingCR = false
				if f.chunkDigs == 0 {
					return refuse(reasonChunkLine)
				}
				if f.remain == 0 {
					f.st = fsTrailerStart
				} else {
					f.st = fsChunkData
				}
				continue
			}
			switch {
			case c == '\n':
				return refuse(reasonChunkBareLF)
			case c == '\r':
				f.pendingCR = true
			case f.chunkPhase == 0 && isHex(c):
				if f.chunkDigs == 16 {
					return refuse(reasonChunkLine)
				}
				f.chunkDigs++
				f.remain = f.remain<<4 | uint64(unhex(c))
			case f.chunkPhase == 0 && (c == ' ' || c == '\t') && f.chunkDigs > 0:
				f.chunkPhase = 1
			case f.chunkPhase <= 0 && c == ';' && f.chunkDigs > 0:
				f.chunkPhase = 2
			case f.chunkPhase == 1 && (c == ' ' || c == '\t'):
			case f.chunkPhase == 2:
				// An extension: ignored, as net/http does.
			default:
				return refuse(reasonChunkLine)
			}

		case fsChunkData:
			i += f.consume(len(p)-i) - 1
			if f.remain == 0 {
				f.st = fsChunkCR
			}
		case fsChunkCR:
			if c != '\r' {
				return refuse(reasonChunkData)
			}
			f.st = fsChunkLF
		case fsChunkLF:
			if c != '\n' {
				return refuse(reasonChunkData)
			}
			f.startChunk()

		case fsTrailerStart:
			switch c {
			case '\r':
				f.st = fsTrailerEndLF
			case '\n', ' ', '\t':
				return refuse(reasonTrailer)
			default:
				f.st = fsTrailerLine
			}
		case fsTrailerLine:
			switch c {
			case '\r':
				f.st = fsTrailerCR
			case '\n':
				return refuse(reasonTrailer)
			}
		case fsTrailerCR:
			if c != '\n' {
				return refuse(reasonTrailer)
			}
			f.st = fsTrailerStart
		case fsTrailerEndLF:
			if c != '\n' {
				return refuse(reasonTrailer)
			}
			f.st = fsRequestStart
		}
	}
	return len(p), nil
}

func (f *framer) startHead() {
	*f = framer{cl: f.cl[:0], method: 0, maxHead: f.maxHead}
}

func (f *framer) startChunk() {
	f.st, f.remain, f.chunkPhase, f.chunkDigs, f.chunkLen, f.pendingCR = fsChunkLine, 0, 0, 0, 0, false
}

// fieldLine is fsFieldName and fsFieldValue for a header line that is
// wholly in one read (line excludes its LF).
func (f *framer) fieldLine(line []byte) {
	colon := bytes.IndexByte(line, ':')
	if colon < 0 {
		f.headBad = true
		return
	}
	name := line[:colon]
	switch {
	case len(name) == len(transferEncodingName) && asciiEqualFold(name, transferEncodingName):
		f.kind = fieldTE
	case len(name) == len(contentLengthName) && asciiEqualFold(name, contentLengthName):
		f.kind = fieldCL
	default:
		return
	}
	v := line[colon+1:]
	if len(v) > 0 && v[len(v)-1] == '\r' {
		v = v[:len(v)-1] // the CR of CRLF
	}
	for _, c := range v {
		f.addValue(c)
	}
	f.endField()
}

func (f *framer) addValue(c byte) {
	if f.valueN == 0 && (c == ' ' || c == '\t') {
		return // leading whitespace
	}
	if f.valueN < len(f.value) {
		f.value[f.valueN] = c
		f.valueN++
		return
	}
	if c != ' ' && c != '\t' {
		f.valueBig = true
	}
}

// endField records a Transfer-Encoding or Content-Length field the way
// net/http reads it (value trimmed of spaces and tabs).
func (f *framer) endField() {
	v := bytes.TrimRight(f.value[:f.valueN], " \t")
	switch f.kind {
	case fieldTE:
		f.teCount++
		if f.teCount > 1 || f.valueBig || !asciiEqualFold(v, "chunked") {
			f.teBad = true
		}
	case fieldCL:
		switch {
		case f.valueBig:
			f.clBad = true
		case !f.clSeen:
			f.cl = append(f.cl[:0], v...)
		case !bytes.Equal(f.cl, v):
			f.clBad = true
		}
		f.clSeen = true
	}
}

// endHead decides the framing of the body that follows a complete head.
func (f *framer) endHead() (uint8, error) {
	v := f.version[:min(f.versionN, maxVersionBytes)]
	http10 := f.versionN == 8 && string(v) == "HTTP/1.0"
	http11 := f.versionN == 8 && string(v[:7]) == "HTTP/1." && v[7] >= '1' && v[7] <= '9'
	switch {
	case f.teCount > 0 && http10:
		return 0, errors.New(reasonTEOnHTTP10)
	case f.teCount > 0 && f.clSeen:
		return 0, errors.New(reasonTEAndCL)
	case f.headBad || !(http10 || http11) || f.spaces != 2 || f.teBad || f.clBad:
		f.st = fsDead // net/http answers this head itself; nothing may follow it
		return fsDead, nil
	case f.method == len("CONNECT"):
		f.st = fsTunnel
		return fsTunnel, nil
	case f.teCount > 0:
		f.startChunk()
		return fsChunkLine, nil
	case f.clSeen:
		n, err := strconv.ParseUint(string(f.cl), 10, 63)
		if err != nil {
			f.st = fsDead
			return fsDead, nil
		}
		if n > 0 {
			f.st, f.remain = fsBody, n
			return fsBody, nil
		}
	}
	f.st = fsRequestStart
	return fsRequestStart, nil
}

func asciiEqualFold(b []byte, lower string) bool {
	if len(b) != len(lower) {
		return false
	}
	for i := range b {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

// framingConn runs the framer over what the workload sends. It implements
// NetConn so attestors can still reach the accepted socket. It has one
// reader at a time: net/http serialises its own reads (its background read
// included), and a hijacked tunnel has one copying goroutine.
type framingConn struct {
	net.Conn
	f       framer
	err     error
	refused func(reason string)
}

func (c *framingConn) Read(b []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.Conn.Read(b)
	if n > 0 && c.f.st != fsTunnel {
		if keep, ferr := c.f.feed(b[:n]); ferr != nil {
			c.err = ferr
			if c.refused != nil {
				c.refused(ferr.(*errFraming).reason)
			}
			return keep, ferr
		}
	}
	return n, err
}

// NetConn returns the wrapped connection (attest looks through wrappers).
func (c *framingConn) NetConn() net.Conn { return c.Conn }

// CloseWrite lets net/http half-close after an error answer, as it does
// for a bare *net.TCPConn or *tls.Conn.
func (c *framingConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

func (p *Proxy) guardFraming(c net.Conn) net.Conn {
	return &framingConn{Conn: c, f: framer{maxHead: p.limits.MaxHeaderBytes}, refused: func(reason string) {
		p.log.Info("refused a request with ambiguous framing", zap.String("listener", p.opts.Listener),
			zap.String("reason", reason), zap.String("remote", c.RemoteAddr().String()))
		if p.opts.Metrics != nil {
			p.opts.Metrics.Requests.WithLabelValues("deny", "").Inc()
		}
	}}
}

// framingListener guards every accepted front-door connection.
type framingListener struct {
	net.Listener
	p *Proxy
}

func (l framingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return l.p.guardFraming(c), nil
}

// consume takes up to avail bytes of a body or chunk whose remaining length
// is f.remain, and returns how many it took.
func (f *framer) consume(avail int) int {
	n := uint64(avail)
	if n > f.remain {
		n = f.remain
	}
	f.remain -= n
	return int(n)
}
