package dbproxy

import (
	"context"
	"crypto/md5"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/xdg-go/scram"

	"github.com/keygate/broker/internal/broker"
)

// TLSMode is the upstream leg's TLS, with libpq's sslmode names.
type TLSMode string

const (
	// TLSDisable: plaintext. SCRAM and MD5 only; a cleartext password is
	// never sent.
	TLSDisable TLSMode = "disable"
	// TLSRequire: TLS, certificate not verified (libpq's sslmode=require).
	// SCRAM-SHA-256-PLUS still binds the authentication to the server's
	// certificate; a cleartext password is never sent.
	TLSRequire TLSMode = "require"
	// TLSVerifyFull: TLS, chain and name verified. The default.
	TLSVerifyFull TLSMode = "verify-full"
)

// SCRAM mechanism names (RFC 7677, RFC 5802 channel binding).
const (
	mechSCRAM     = "SCRAM-SHA-256"
	mechSCRAMPlus = "SCRAM-SHA-256-PLUS"
)

// maxHandshakeBody bounds one server message during the handshake.
const maxHandshakeBody = 1 << 20

// upstream is an authenticated server connection, ready for queries.
type upstream struct {
	conn   net.Conn // *tls.Conn when the leg is TLS
	fe     *pgproto3.Frontend
	pid    uint32 // the server's BackendKeyData, for cancel
	secret []byte
	hasKey bool
	// toClient is what the client receives after AuthenticationOk:
	// ParameterStatus messages, then ReadyForQuery (the broker inserts its
	// own BackendKeyData), then anything the server sent after it.
	params []byte
	ready  []byte
	after  []byte
	auth   string // the method used, for the debug log: scram-sha-256-plus, md5, ...
}

// dialUpstream connects through the egress dialer and, unless the mode is
// disable, negotiates TLS. Nothing but an SSLRequest is sent in clear.
func (s *Server) dialUpstream(ctx context.Context) (net.Conn, error) {
	db := &s.db
	raw, err := s.opts.Dialer.DialContext(ctx, "tcp", db.Upstream)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = raw.SetDeadline(dl)
	}
	if db.TLS == TLSDisable {
		return raw, nil
	}
	req, _ := (&pgproto3.SSLRequest{}).Encode(nil)
	if _, err := raw.Write(req); err != nil {
		raw.Close()
		return nil, fmt.Errorf("sending SSLRequest: %w", err)
	}
	// Exactly one byte, unbuffered: anything after it belongs to the TLS
	// handshake, so bytes stuffed behind the 'S' fail it (CVE-2021-23222).
	var b [1]byte
	if _, err := io.ReadFull(raw, b[:]); err != nil {
		raw.Close()
		return nil, fmt.Errorf("reading the answer to SSLRequest: %w", err)
	}
	if b[0] != 'S' {
		raw.Close()
		return nil, &tlsRefused{answer: b[0]}
	}
	tc := tls.Client(raw, s.upstreamTLS)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, &tlsFailed{err: err}
	}
	return tc, nil
}

type tlsRefused struct{ answer byte }

func (e *tlsRefused) Error() string {
	if e.answer == 'N' {
		return "the server does not offer TLS (answered N to SSLRequest)"
	}
	return fmt.Sprintf("the server answered %q to SSLRequest", e.answer)
}

type tlsFailed struct{ err error }

func (e *tlsFailed) Error() string { return "TLS handshake: " + e.err.Error() }
func (e *tlsFailed) Unwrap() error { return e.err }

// upstreamTLSConfig is the client TLS configuration of the upstream leg.
func upstreamTLSConfig(db Database) *tls.Config {
	host, _, _ := net.SplitHostPort(db.Upstream)
	name := db.ServerName
	if name == "" {
		name = host
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: name, RootCAs: db.RootCAs}
	if db.TLS == TLSRequire {
		// sslmode=require, chosen explicitly in the config: encrypted, not
		// authenticated. A password never crosses it in clear, and
		// SCRAM-PLUS binds to whatever certificate the server shows.
		// ServerName stays: it is still sent as SNI, as libpq does.
		c.InsecureSkipVerify = true // lint:insecure-ok: tls: require, chosen in the config
	}
	return c
}

// authenticate sends the startup and answers the server's authentication
// request with the credential, then collects what the server sends up to
// ReadyForQuery. database is the client's (for a 3D000 message).
// cleartextOnly (an RDS IAM token as the password) answers only a
// cleartext password request: a server asking for anything else is not
// checking IAM tokens (the role lacks rds_iam), and gets no hash of one.
func authenticate(conn net.Conn, startup *pgproto3.StartupMessage, user, password broker.Secret, mode TLSMode, database string, cleartextOnly bool) (*upstream, error) {
	fe := pgproto3.NewFrontend(conn, conn)
	fe.SetMaxBodyLen(maxHandshakeBody)
	u := &upstream{conn: conn, fe: fe, auth: "trust"}
	fe.Send(startup)
	if err := fe.Flush(); err != nil {
		return nil, fmt.Errorf("sending the startup: %w", err)
	}
	tc, _ := conn.(*tls.Conn)
	var conv *scram.ClientConversation
	authDone := false
	for {
		msg, err := fe.Receive()
		if err != nil {
			return nil, fmt.Errorf("reading from the server: %w", err)
		}
		switch m := msg.(type) {
		case *pgproto3.AuthenticationCleartextPassword:
			if authDone {
				return nil, errUpstreamProtocol
			}
			if tc == nil || mode != TLSVerifyFull {
				return nil, errors.New("the server asked for a cleartext password, which is sent only over verify-full TLS")
			}
			u.auth = "password"
			fe.Send(&pgproto3.PasswordMessage{Password: password.Reveal()})
		case *pgproto3.AuthenticationMD5Password:
			if authDone {
				return nil, errUpstreamProtocol
			}
			if cleartextOnly {
				return nil, errNotIAM
			}
			u.auth = "md5"
			fe.Send(&pgproto3.PasswordMessage{Password: md5Response(user.Reveal(), password.Reveal(), m.Salt)})
		case *pgproto3.AuthenticationSASL:
			if authDone || conv != nil {
				return nil, errUpstreamProtocol
			}
			if cleartextOnly {
				return nil, errNotIAM
			}
			var first string
			conv, first, err = startSCRAM(m.AuthMechanisms, password, tc)
			if err != nil {
				return nil, err
			}
			u.auth = strings.ToLower(mechSCRAM)
			mech := mechSCRAM
			if strings.HasPrefix(first, "p=") {
				u.auth, mech = strings.ToLower(mechSCRAMPlus), mechSCRAMPlus
			}
			fe.Send(&pgproto3.SASLInitialResponse{AuthMechanism: mech, Data: []byte(first)})
		case *pgproto3.AuthenticationSASLContinue:
			if conv == nil || conv.Done() {
				return nil, errUpstreamProtocol
			}
			resp, err := conv.Step(string(m.Data))
			if err != nil {
				return nil, fmt.Errorf("SCRAM: %w", err)
			}
			fe.Send(&pgproto3.SASLResponse{Data: []byte(resp)})
		case *pgproto3.AuthenticationSASLFinal:
			if conv == nil || conv.Done() {
				return nil, errUpstreamProtocol
			}
			if _, err := conv.Step(string(m.Data)); err != nil || !conv.Valid() {
				return nil, errors.New("SCRAM: the server's signature did not verify")
			}
			continue
		case *pgproto3.AuthenticationOk:
			// A SCRAM exchange counts only once the server proved it
			// knows the verifier.
			if authDone || (conv != nil && !conv.Valid()) {
				return nil, errUpstreamProtocol
			}
			authDone = true
			continue
		case *pgproto3.ErrorResponse:
			return nil, upstreamRefusal(m, database)
		case *pgproto3.ParameterStatus:
			if !authDone {
				return nil, errUpstreamProtocol
			}
			u.params = encodeBackend(u.params, m)
			continue
		case *pgproto3.BackendKeyData:
			if !authDone {
				return nil, errUpstreamProtocol
			}
			u.pid, u.secret, u.hasKey = m.ProcessID, slices.Clone(m.SecretKey), true
			continue
		case *pgproto3.NoticeResponse:
			continue // may name the role; the client is not told
		case *pgproto3.ReadyForQuery:
			if !authDone {
				return nil, errUpstreamProtocol
			}
			u.ready = encodeBackend(nil, m)
			// Whatever the server sent after it (a notice, a
			// notification) is already in pgproto3's buffer: take it out,
			// whole messages only, so the raw splice starts at a message
			// boundary with nothing left behind.
			for fe.ReadBufferLen() > 0 {
				more, err := fe.Receive()
				if err != nil {
					return nil, fmt.Errorf("reading from the server: %w", err)
				}
				u.after = encodeBackend(u.after, more)
			}
			return u, nil
		default:
			return nil, fmt.Errorf("unsupported server message %T during authentication (the broker speaks SCRAM-SHA-256, MD5 and, over verify-full TLS, password)", msg)
		}
		if err := fe.Flush(); err != nil {
			return nil, fmt.Errorf("writing to the server: %w", err)
		}
	}
}

var errNotIAM = errors.New("the server asked for a SCRAM or MD5 password, not a cleartext one: it does not check RDS IAM tokens for this user (GRANT rds_iam TO the user)")

// startSCRAM picks the mechanism and starts the conversation: PLUS with
// tls-server-end-point when the leg is TLS and the server offers it; plain
// SCRAM with the "y" flag over TLS otherwise (a server that did offer PLUS
// then refuses: the offer was stripped), "n" without TLS. The username in
// the SCRAM message is empty, as libpq sends it: PostgreSQL uses the
// startup's user.
func startSCRAM(mechs []string, password broker.Secret, tc *tls.Conn) (*scram.ClientConversation, string, error) {
	plus, plain := slices.Contains(mechs, mechSCRAMPlus), slices.Contains(mechs, mechSCRAM)
	if !plus && !plain {
		return nil, "", fmt.Errorf("the server offers SASL mechanisms %v; the broker speaks %s", mechs, mechSCRAM)
	}
	client, err := scram.SHA256.NewClient("", password.Reveal(), "")
	if err != nil {
		// SASLprep refused the password; PostgreSQL would use it raw.
		client, err = scram.SHA256.NewClientUnprepped("", password.Reveal(), "")
		if err != nil {
			return nil, "", errors.New("SCRAM: the credential's password cannot be used")
		}
	}
	var conv *scram.ClientConversation
	switch {
	case tc != nil && plus:
		cs := tc.ConnectionState()
		cb, err := scram.NewTLSServerEndpointBinding(&cs)
		if err != nil {
			return nil, "", fmt.Errorf("SCRAM channel binding: %w", err)
		}
		conv = client.NewConversationWithChannelBinding(cb)
	case tc != nil:
		conv = client.NewConversationAdvertisingChannelBinding()
	default:
		conv = client.NewConversation()
	}
	first, err := conv.Step("")
	if err != nil {
		return nil, "", fmt.Errorf("SCRAM: %w", err)
	}
	return conv, first, nil
}

// md5Response is PostgreSQL's md5 password message:
// "md5" + md5hex(md5hex(password + user) + salt). No library offers it
// (pgconn's is internal); it is two MD5 sums.
func md5Response(user, password string, salt [4]byte) string {
	inner := md5.Sum([]byte(password + user))
	h := md5.New()
	h.Write([]byte(hex.EncodeToString(inner[:])))
	h.Write(salt[:])
	return "md5" + hex.EncodeToString(h.Sum(nil))
}

// upstreamFailure maps a connect or authentication error to what the
// client sees (08006 with a generic message) and the audit code.
func upstreamFailure(err error) *failure {
	var f *failure
	if errors.As(err, &f) {
		return f
	}
	var be *broker.Error
	if errors.As(err, &be) {
		// The egress guard refused the address.
		return &failure{be: be, sqlcode: sqlConnectionFailure, msg: "keygate: the database address is refused by the egress policy"}
	}
	var tr *tlsRefused
	var tf *tlsFailed
	var dnsErr *net.DNSError
	switch {
	case errors.As(err, &tr):
		return newFailure(sqlConnectionFailure, broker.CodeUpstreamTLS, "keygate: the database does not offer TLS, which this listener requires", err)
	case broker.IsCertificateError(err):
		return newFailure(sqlConnectionFailure, broker.CodeUpstreamTLS, "keygate: the database's TLS certificate did not verify", err)
	case errors.As(err, &tf):
		return newFailure(sqlConnectionFailure, broker.CodeUpstreamTLS, "keygate: TLS with the database failed", err)
	case errors.As(err, &dnsErr):
		// Before the timeout case: a resolver timeout is a DNS failure.
		return newFailure(sqlConnectionFailure, broker.CodeDNSFailure, "keygate: the database's name could not be resolved", err)
	case errors.Is(err, context.DeadlineExceeded), isTimeout(err):
		return newFailure(sqlConnectionFailure, broker.CodeUpstreamTimeout, "keygate: the database did not answer in time", err)
	}
	return newFailure(sqlConnectionFailure, broker.CodeUpstreamUnreachable, "keygate: could not set up the database session", err)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
