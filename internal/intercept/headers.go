package intercept

import (
	"net/http"
	"strings"

	"golang.org/x/net/http/httpguts"

	"github.com/keygate/broker/internal/broker"
)

// hopByHop are never forwarded (RFC 9110 §7.6.1), plus proxy credentials;
// lower-case for a single-pass, case-insensitive strip.
var hopByHop = map[string]bool{
	"connection": true, "proxy-connection": true, "keep-alive": true, "proxy-authenticate": true,
	"proxy-authorization": true, "te": true, "trailer": true, "transfer-encoding": true, "upgrade": true,
	"x-forwarded-client-cert": true,
}

// internalPrefixes name headers only keygate (or another trusted hop) may
// set; a workload sending them is trying to forge something.
var internalPrefixes = []string{"x-keygate-", "x-broker-"}

// stripHopByHop removes hop-by-hop headers, the headers Connection names,
// Proxy-Authorization and internal headers, in every case variant. On a
// request it runs before injection, so a workload cannot use Connection to
// drop the injected credential, and cannot smuggle its own; on a response
// it keeps the upstream's hop-by-hop fields (an Upgrade would make goproxy
// hijack the workload's connection) and any X-Keygate-* it forged from the
// workload. It does not allocate for net/http's canonical names.
func stripHopByHop(h http.Header) {
	var named []string // tokens listed in Connection
	for k, vs := range h {
		if !strings.EqualFold(k, "Connection") {
			continue
		}
		for _, v := range vs {
			for _, tok := range strings.Split(v, ",") {
				if tok = strings.TrimSpace(tok); tok != "" {
					named = append(named, tok)
				}
			}
		}
	}
	for k := range h {
		if hopByHopCanonical[http.CanonicalHeaderKey(k)] || hasInternalPrefix(k) || foldIn(k, named) {
			delete(h, k)
		}
	}
}

// hopByHopCanonical is hopByHop in net/http's canonical spelling.
var hopByHopCanonical = func() map[string]bool {
	m := make(map[string]bool, len(hopByHop))
	for k := range hopByHop {
		m[http.CanonicalHeaderKey(k)] = true
	}
	return m
}()

func foldIn(k string, names []string) bool {
	for _, n := range names {
		if strings.EqualFold(k, n) {
			return true
		}
	}
	return false
}

// hasInternalPrefix reports whether k starts with an internal prefix, in
// any case.
func hasInternalPrefix(k string) bool {
	for _, p := range internalPrefixes {
		if len(k) >= len(p) && strings.EqualFold(k[:len(p)], p) {
			return true
		}
	}
	return false
}

// checkRequest rejects, before any rule or credential work, request shapes
// that a later hop could read differently (SECURITY-TESTS.md §3) and heads
// with more fields than limits.max_header_count (net/http bounds a head's
// bytes, not its fields, and every field costs a map entry here and a look
// in every rule that reads headers). Shapes net/http normalises away before
// a handler runs (Transfer-Encoding on HTTP/1.0, an obs-folded
// Transfer-Encoding) are refused on the wire by the framing guard.
func (p *Proxy) checkRequest(r *http.Request) error {
	n := 1 // Host, which net/http moves out of r.Header
	for k, vs := range r.Header {
		if !httpguts.ValidHeaderFieldName(k) {
			return broker.NewError(broker.CodeBadRequest, "invalid header field name", nil)
		}
		n += len(vs)
	}
	// Valid names are in net/http's canonical spelling from here on.
	switch {
	case n > p.limits.MaxHeaderCount:
		return broker.NewError(broker.CodeHeaderTooLarge, "too many header fields", nil)
	case r.Method == http.MethodTrace || r.Method == "TRACK":
		return broker.NewError(broker.CodeMethodNotAllowed, "TRACE is not forwarded", nil)
	case r.Header["Max-Forwards"] != nil:
		// Max-Forwards asks a hop to answer TRACE or OPTIONS itself (RFC
		// 9110 §7.6.2); keygate answers neither, and forwarding it would
		// let a workload probe the path behind the broker (T-B3).
		return broker.NewError(broker.CodeMethodNotAllowed, "Max-Forwards is not supported", nil)
	case hasDotSegment(r.URL.Path):
		// A rule judges the path as sent; an upstream that resolves "." and
		// ".." would serve another one ("/public/../admin").
		return broker.NewError(broker.CodeBadRequest, "dot-segments in the request path", nil)
	case len(r.Header["Content-Type"]) > 1:
		// A singleton field a rule may read: with two values the rule and
		// the upstream could each pick a different one (T-B9). Host,
		// Content-Length and Transfer-Encoding duplicates net/http refuses.
		return broker.NewError(broker.CodeBadRequest, "more than one Content-Type", nil)
	}
	return nil
}

// hasDotSegment reports whether a "/"-separated path has a "." or ".."
// segment.
func hasDotSegment(p string) bool {
	for len(p) > 0 {
		i := strings.IndexByte(p, '/')
		seg := p
		if i >= 0 {
			seg, p = p[:i], p[i+1:]
		} else {
			p = ""
		}
		if seg == "." || seg == ".." {
			return true
		}
	}
	return false
}

// refuseAndClose answers a request whose shape was refused and ends the
// connection: what follows it on the wire may have been framed for another
// reader (T-D3), so no further request is read from it.
func refuseAndClose(w http.ResponseWriter, e *broker.Error, requestID string) {
	w.Header().Set("Connection", "close")
	writeError(w, e, requestID)
}

// ruleHeaders is the request.headers map rules see: lower-case names,
// repeated values joined.
func ruleHeaders(h http.Header) map[string]string {
	m := make(map[string]string, len(h))
	for k, vs := range h {
		lk := strings.ToLower(k)
		v := strings.Join(vs, ", ")
		if prev, ok := m[lk]; ok {
			v = prev + ", " + v
		}
		m[lk] = v
	}
	return m
}
