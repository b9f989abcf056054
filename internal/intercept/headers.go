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
// Proxy-Authorization and internal headers, in every case variant. It runs
// before injection so a workload cannot use Connection to drop the injected
// credential, and cannot smuggle its own.
func stripHopByHop(h http.Header) {
	var named map[string]bool // tokens listed in Connection, lower-case
	for k, vs := range h {
		if !strings.EqualFold(k, "Connection") {
			continue
		}
		for _, v := range vs {
			for _, tok := range strings.Split(v, ",") {
				if tok = strings.TrimSpace(tok); tok != "" {
					if named == nil {
						named = map[string]bool{}
					}
					named[strings.ToLower(tok)] = true
				}
			}
		}
	}
	for k := range h {
		lk := strings.ToLower(k)
		if hopByHop[lk] || named[lk] || hasInternalPrefix(lk) {
			delete(h, k)
		}
	}
}

func hasInternalPrefix(lk string) bool {
	for _, p := range internalPrefixes {
		if strings.HasPrefix(lk, p) {
			return true
		}
	}
	return false
}

// checkInbound rejects request shapes that a later hop could read
// differently (SECURITY-TESTS.md §3): header names with whitespace or other
// non-token bytes, and Transfer-Encoding on HTTP/1.0.
func checkInbound(r *http.Request) error {
	for k := range r.Header {
		if !httpguts.ValidHeaderFieldName(k) {
			return broker.NewError(broker.CodeBadRequest, "invalid header field name", nil)
		}
	}
	if r.ProtoMajor == 1 && r.ProtoMinor == 0 && len(r.TransferEncoding) > 0 {
		return broker.NewError(broker.CodeBadRequest, "Transfer-Encoding is not allowed on HTTP/1.0", nil)
	}
	if r.Method == http.MethodTrace || r.Method == "TRACK" {
		return broker.NewError(broker.CodeMethodNotAllowed, "TRACE is not forwarded", nil)
	}
	return nil
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
