package intercept

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/intercept/egress"
)

// Headers keygate adds to responses.
const (
	HeaderRequestID = "X-Keygate-Request-Id"
	HeaderError     = "X-Keygate-Error"
)

type errorBody struct {
	Error     string `json:"error"`
	Message   string `json:"message"`
	Rule      string `json:"rule,omitempty"`
	RequestID string `json:"request_id"`
}

// errorPayload renders the status, headers and JSON body the workload sees
// for e. Only e.Code, e.Message and e.Rule are shown; the cause never is.
func errorPayload(e *broker.Error, requestID string) (int, http.Header, []byte) {
	body, _ := json.Marshal(errorBody{Error: e.Code, Message: e.Message, Rule: e.Rule, RequestID: requestID})
	body = append(body, '\n')
	h := http.Header{}
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("Cache-Control", "no-store")
	h.Set(HeaderRequestID, requestID)
	h.Set(HeaderError, e.Code)
	if e.Code == broker.CodeUnauthenticated {
		h.Set("Proxy-Authenticate", `Bearer realm="keygate"`)
	}
	if e.RetryAfter > 0 {
		secs := int(e.RetryAfter.Seconds())
		if secs < 1 {
			secs = 1
		}
		h.Set("Retry-After", strconv.Itoa(secs))
	}
	return e.Status(), h, body
}

func writeError(w http.ResponseWriter, e *broker.Error, requestID string) {
	status, h, body := errorPayload(e, requestID)
	for k, v := range h {
		w.Header()[k] = v
	}
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func errorResponse(req *http.Request, e *broker.Error, requestID string) *http.Response {
	status, h, body := errorPayload(e, requestID)
	return &http.Response{
		StatusCode:    status,
		Status:        strconv.Itoa(status) + " " + http.StatusText(status),
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        h,
		Body:          io.NopCloser(bytes.NewReader(body)),
		ContentLength: int64(len(body)),
		Request:       req,
		Close:         true,
	}
}

// writeRawError answers on a hijacked connection.
func writeRawError(w io.Writer, e *broker.Error, requestID string) {
	resp := errorResponse(nil, e, requestID)
	_ = resp.Write(w)
}

// upstreamError maps a transport or dial failure to what the workload sees.
// The cause stays in Err for the (scrubbed) audit line only: transport
// errors can quote addresses and URLs.
func upstreamError(err error) *broker.Error {
	var be *broker.Error
	var ne net.Error
	var dnsErr *net.DNSError
	var recordErr tls.RecordHeaderError
	var alert tls.AlertError
	switch {
	case errors.As(err, &be):
		return be
	case errors.Is(err, ErrLoop):
		return broker.NewError(broker.CodeLoopDetected, "the broker's own connection was redirected back to it; exempt the broker from the redirect", err)
	case errors.Is(err, egress.ErrDenied):
		return broker.NewError(broker.CodeEgressDenied, "the destination address is not allowed", err)
	case broker.IsCertificateError(err), errors.As(err, &recordErr), errors.As(err, &alert):
		return broker.NewError(broker.CodeUpstreamTLS, "the upstream TLS certificate could not be verified", err)
	case errors.As(err, &dnsErr):
		// SERVFAIL, NXDOMAIN or a resolver timeout: the upstream was never
		// contacted, so it is a 502 (not a slow upstream's 504), under its
		// own code so a resolver outage is told apart from a down upstream.
		return broker.NewError(broker.CodeDNSFailure, "the upstream's name could not be resolved", err)
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return broker.NewError(broker.CodeUpstreamTimeout, "the upstream did not answer in time", err)
	default:
		return broker.NewError(broker.CodeUpstreamUnreachable, "the upstream could not be reached", err)
	}
}
