package dbproxy

import (
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/keygate/broker/internal/broker"
)

// SQLSTATEs the broker sends (docs/postgres.md, "What the client sees").
const (
	// 28000: the caller may not have this session (no attestation, no rule,
	// a deny rule, a refused startup parameter).
	sqlInvalidAuthorization = "28000"
	// 08006: the broker could not set the session up (credential source
	// down or malformed, upstream unreachable, upstream TLS or
	// authentication failed). Connection-exception class: a pool retries.
	sqlConnectionFailure = "08006"
	// 08P01: the client broke the protocol.
	sqlProtocolViolation = "08P01"
	// 57P01: the broker ended a running session (credential expired,
	// shutdown), as PostgreSQL's "terminating connection due to
	// administrator command".
	sqlAdminShutdown = "57P01"
)

// failure is why a session was refused or ended: the *broker.Error for the
// audit line and the ErrorResponse the client sees.
type failure struct {
	be      *broker.Error
	sqlcode string
	msg     string // safe to show: no credential value or username
}

func (f *failure) Error() string { return f.be.Error() }

func newFailure(sqlcode, code, msg string, cause error) *failure {
	return &failure{be: &broker.Error{Code: code, Message: msg, Err: cause}, sqlcode: sqlcode, msg: msg}
}

// fromBrokerError maps a pipeline error to what the client sees.
func fromBrokerError(err error, what string) *failure {
	be := broker.AsError(err)
	f := &failure{be: be, msg: "keygate: " + be.Message}
	switch be.Code {
	case broker.CodeRuleError:
		// A rule that failed to evaluate refuses, like a deny, but says so:
		// the operator must tell a broken rule from an intended denial.
		f.sqlcode = sqlInvalidAuthorization
		f.msg = fmt.Sprintf("keygate: rule_error: rule %q could not be evaluated for %s", be.Rule, what)
	case broker.CodeUnauthenticated, broker.CodeDenied:
		f.sqlcode = sqlInvalidAuthorization
		if be.Code == broker.CodeDenied {
			if be.Rule != "" {
				f.msg = fmt.Sprintf("keygate: %s denied by rule %q", what, be.Rule)
			} else {
				f.msg = "keygate: no rule allows " + what
			}
		}
	default:
		f.sqlcode = sqlConnectionFailure
	}
	return f
}

// errorResponse is the client's FATAL for f; the request id goes in
// Detail so the audit line can be found.
func errorResponse(sqlcode, msg, requestID string) *pgproto3.ErrorResponse {
	return &pgproto3.ErrorResponse{
		Severity:            "FATAL",
		SeverityUnlocalized: "FATAL",
		Code:                sqlcode,
		Message:             msg,
		Detail:              "keygate request_id " + requestID,
	}
}

// upstreamRefusal turns a server ErrorResponse received before the session
// was ready into what the client sees: the server's SQLSTATE (an
// authentication failure becomes 08006, since the client did nothing
// wrong) and a message written by the broker. The server's own text can
// name the credential's role, so it is never relayed.
func upstreamRefusal(e *pgproto3.ErrorResponse, database string) *failure {
	code := e.Code
	var msg string
	switch {
	case strings.HasPrefix(code, "28"):
		code = sqlConnectionFailure
		msg = "keygate: the database refused the broker's credential"
	case code == "3D000":
		msg = fmt.Sprintf("database %q does not exist", database)
	case code == "53300":
		msg = "keygate: the database has too many connections"
	case strings.HasPrefix(code, "57P"):
		msg = "keygate: the database is not accepting connections (SQLSTATE " + code + ")"
	case code == "":
		code = sqlConnectionFailure
		msg = "keygate: the database refused the session"
	default:
		msg = "keygate: the database refused the session (SQLSTATE " + code + ")"
	}
	return &failure{
		// The server's text is kept for the audit line only, where the
		// session's credential values (the role name among them) are
		// scrubbed before it is written.
		be: &broker.Error{Code: broker.CodeUpstreamUnreachable, Message: "upstream refused the session (SQLSTATE " + e.Code + ")",
			Err: errors.New(e.Message)},
		sqlcode: code,
		msg:     msg,
	}
}

var errUpstreamProtocol = errors.New("upstream broke the protocol")
