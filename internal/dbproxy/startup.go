package dbproxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/jackc/pgx/v5/pgproto3"
)

// Startup parameters with a meaning of their own (PostgreSQL's
// ProcessStartupPacket compares them case-sensitively; everything else is
// a GUC).
const (
	paramUser        = "user"
	paramDatabase    = "database"
	paramOptions     = "options"
	paramReplication = "replication"
	paramPassword    = "password"
	protocolOptPfx   = "_pq_."
)

// startupPolicy is what a databases entry allows the client to choose.
type startupPolicy struct {
	AllowOptions     bool
	AllowReplication bool
}

// startupRequest is what the client asked for, as the rule sees it.
type startupRequest struct {
	User     string // the client's user (request.user); never sent upstream
	Database string // request.database: the client's, or its user name
	// Dropped names the parameters removed (for a notice to the client).
	Dropped []string
	// ProtocolOptions are the _pq_. options the client asked for; none is
	// supported, which a 3.2 client is told with NegotiateProtocolVersion.
	ProtocolOptions []string
	// Minor is the protocol minor version the client asked for.
	Minor uint32
}

// startupError is a refusal of the client's startup itself (SQLSTATE and
// a message safe to show).
type startupError struct {
	Code    string
	Message string
}

func (e *startupError) Error() string { return e.Message }

// rewriteStartup builds the startup the broker sends upstream from the
// client's: user is the credential's username, database is the client's
// (or, as PostgreSQL defaults it, the client's user name), and the rest
// is filtered by pol. It never copies user, password (any case), options
// (unless allowed), replication (unless allowed) or a _pq_. option.
func rewriteStartup(client *pgproto3.StartupMessage, username string, pol startupPolicy) (*pgproto3.StartupMessage, startupRequest, error) {
	req := startupRequest{Minor: client.ProtocolVersion & 0xffff}
	params := client.Parameters
	req.User = params[paramUser]
	if req.User == "" {
		return nil, req, &startupError{Code: sqlInvalidAuthorization, Message: "no PostgreSQL user name specified in startup packet"}
	}
	req.Database = params[paramDatabase]
	if req.Database == "" {
		req.Database = req.User
	}
	out := &pgproto3.StartupMessage{
		ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters:      make(map[string]string, len(params)),
	}
	for k, v := range params {
		switch {
		case k == "":
			// An empty name ends the list on the server: after ours, it
			// would cut off the user and database the broker appends.
			return nil, req, &startupError{Code: sqlProtocolViolation, Message: "invalid startup packet layout: empty parameter name"}
		case k == paramUser || k == paramDatabase:
			continue // set below
		case strings.EqualFold(k, paramPassword):
			req.Dropped = append(req.Dropped, paramPassword)
			continue
		case strings.HasPrefix(k, protocolOptPfx):
			req.ProtocolOptions = append(req.ProtocolOptions, k)
			continue
		case k == paramOptions:
			if !pol.AllowOptions {
				req.Dropped = append(req.Dropped, paramOptions)
				continue
			}
		case k == paramReplication:
			if isFalse(v) {
				continue // a normal connection, said explicitly
			}
			if !pol.AllowReplication {
				return nil, req, &startupError{Code: sqlInvalidAuthorization,
					Message: "keygate: replication connections are not allowed through this listener (allow_replication is off)"}
			}
		}
		out.Parameters[k] = v
	}
	out.Parameters[paramUser] = username
	out.Parameters[paramDatabase] = req.Database
	return out, req, nil
}

// isFalse is PostgreSQL's parse_bool for false (replication=false is an
// ordinary connection).
func isFalse(v string) bool {
	switch strings.ToLower(v) {
	case "false", "off", "no", "0", "f", "n":
		return true
	}
	return false
}

// startupWireLen is the length of the startup packet that decodes to m:
// what the client must have sent, byte for byte, if it sent nothing else
// and repeated no parameter.
func startupWireLen(m *pgproto3.StartupMessage) int {
	n := 4 + 4 + 1 // length, version, final NUL
	for k, v := range m.Parameters {
		n += len(k) + 1 + len(v) + 1
	}
	return n
}

// countingReader counts the bytes read from the client socket, so the
// broker knows exactly what pgproto3 has buffered beyond a message.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// errStrayBytes: the client sent more than the message before the broker
// answered (CVE-2021-23214: plaintext stuffed before a TLS handshake).
var errStrayBytes = errors.New("bytes after the startup message, before the broker answered")

// readStartupPacket reads one startup-phase packet (SSLRequest,
// GSSENCRequest, CancelRequest or StartupMessage) from r with pgproto3 and
// fails when r delivered any byte beyond it: the caller answers next, so
// nothing may have been sent yet.
func readStartupPacket(r io.Reader) (pgproto3.FrontendMessage, error) {
	cr := &countingReader{r: r}
	be := pgproto3.NewBackend(cr, io.Discard)
	msg, err := be.ReceiveStartupMessage()
	if err != nil {
		return nil, err
	}
	var want int
	switch m := msg.(type) {
	case *pgproto3.SSLRequest, *pgproto3.GSSEncRequest:
		want = 8
	case *pgproto3.CancelRequest:
		want = 12 + len(m.SecretKey)
	case *pgproto3.StartupMessage:
		want = startupWireLen(m)
	default:
		return nil, fmt.Errorf("unexpected startup message %T", msg)
	}
	if cr.n != want {
		// Either bytes beyond the packet (pipelined or stuffed), or a
		// startup that repeats a parameter (its map lost one): refuse both.
		return msg, errStrayBytes
	}
	return msg, nil
}

// encodeBackend appends the wire form of server messages.
func encodeBackend(buf []byte, msgs ...pgproto3.BackendMessage) []byte {
	for _, m := range msgs {
		var err error
		if buf, err = m.Encode(buf); err != nil {
			// Only an over-long message fails; the broker builds none.
			panic(fmt.Sprintf("dbproxy: encoding %T: %v", m, err))
		}
	}
	return buf
}

// cancelKey is a BackendKeyData as a map key: process id and 4-byte secret.
type cancelKey [8]byte

func makeCancelKey(pid uint32, secret []byte) (cancelKey, bool) {
	var k cancelKey
	if len(secret) != 4 {
		return k, false
	}
	binary.BigEndian.PutUint32(k[:4], pid)
	copy(k[4:], secret)
	return k, true
}
