package broker

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net/http"
	"time"
)

// Error codes the workload sees in X-Keygate-Error and the JSON body.
const (
	CodeUnauthenticated       = "unauthenticated"
	CodeAttestUnavailable     = "attestation_unavailable"
	CodeDenied                = "denied"
	CodeRuleError             = "rule_error" // a rule's `when` failed at run time: fail closed
	CodeEgressDenied          = "egress_denied"
	CodePortDenied            = "port_denied"
	CodePlaintextDenied       = "plaintext_denied"
	CodeMisdirected           = "misdirected_request"
	CodeBadRequest            = "bad_request"
	CodeHeaderTooLarge        = "header_too_large"
	CodePayloadTooLarge       = "payload_too_large"
	CodeMethodNotAllowed      = "method_not_allowed"
	CodeCredentialUnavailable = "credential_unavailable"
	CodeCredentialMalformed   = "credential_malformed"
	CodeUpstreamUnreachable   = "upstream_unreachable"
	CodeDNSFailure            = "dns_failure"
	CodeUpstreamTLS           = "upstream_tls"
	CodeUpstreamTimeout       = "upstream_timeout"
	CodeLoopDetected          = "loop_detected"
	CodeTunnelLimit           = "tunnel_limit" // limits.max_tunnels reached
	CodeRateLimited           = "rate_limited" // e.g. limits.leaf_mints_per_second
	CodeInternal              = "internal"
)

var codeStatus = map[string]int{
	CodeUnauthenticated:       http.StatusProxyAuthRequired,
	CodeAttestUnavailable:     http.StatusServiceUnavailable,
	CodeDenied:                http.StatusForbidden,
	CodeRuleError:             http.StatusForbidden,
	CodeEgressDenied:          http.StatusForbidden,
	CodePortDenied:            http.StatusForbidden,
	CodePlaintextDenied:       http.StatusForbidden,
	CodeMisdirected:           http.StatusMisdirectedRequest,
	CodeBadRequest:            http.StatusBadRequest,
	CodeHeaderTooLarge:        http.StatusRequestHeaderFieldsTooLarge,
	CodePayloadTooLarge:       http.StatusRequestEntityTooLarge,
	CodeMethodNotAllowed:      http.StatusMethodNotAllowed,
	CodeCredentialUnavailable: http.StatusServiceUnavailable,
	CodeCredentialMalformed:   http.StatusBadGateway,
	CodeUpstreamUnreachable:   http.StatusBadGateway,
	CodeDNSFailure:            http.StatusBadGateway,
	CodeUpstreamTLS:           http.StatusBadGateway,
	CodeUpstreamTimeout:       http.StatusGatewayTimeout,
	CodeLoopDetected:          http.StatusLoopDetected,
	CodeTunnelLimit:           http.StatusServiceUnavailable,
	CodeRateLimited:           http.StatusServiceUnavailable,
	CodeInternal:              http.StatusInternalServerError,
}

// Error is a failure the workload is told about. Message is safe to show the
// workload; Err is the internal cause, for the log only. Neither ever holds
// a credential value.
type Error struct {
	Code       string
	Message    string
	Rule       string
	RetryAfter time.Duration
	Err        error
}

// Errorf builds an *Error; cause may be nil.
func NewError(code, message string, cause error) *Error {
	return &Error{Code: code, Message: message, Err: cause}
}

func (e *Error) Error() string {
	if e.Err != nil {
		return "broker: " + e.Code + ": " + e.Message + ": " + e.Err.Error()
	}
	return "broker: " + e.Code + ": " + e.Message
}

func (e *Error) Unwrap() error { return e.Err }

// Status is the HTTP status for the code; unknown codes are 500.
func (e *Error) Status() int {
	if s, ok := codeStatus[e.Code]; ok {
		return s
	}
	return http.StatusInternalServerError
}

// AsError turns any error into an *Error, treating unknown errors as
// internal failures.
func AsError(err error) *Error {
	var be *Error
	if errors.As(err, &be) {
		return be
	}
	return &Error{Code: CodeInternal, Message: "internal error", Err: err}
}

// IsCertificateError reports whether err is a failed check of a peer's
// certificate (untrusted, misnamed, expired or otherwise invalid): a
// failure no retry can cure, and never the peer being merely unreachable.
func IsCertificateError(err error) bool {
	var verify *tls.CertificateVerificationError
	var unknown x509.UnknownAuthorityError
	var host x509.HostnameError
	var invalid x509.CertificateInvalidError
	return errors.As(err, &verify) || errors.As(err, &unknown) || errors.As(err, &host) || errors.As(err, &invalid)
}
