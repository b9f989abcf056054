package dbproxy

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
)

// session is one client connection, from accept to its audit line.
type session struct {
	srv   *Server
	raw   net.Conn // as accepted
	conn  net.Conn // raw, or the *tls.Conn over it
	start time.Time
	rec   broker.Record
	cred  broker.Credential
	token broker.Secret // the RDS IAM token, when the entry has rds_iam
	fail  *failure

	up      *upstream
	key     cancelKey // the client's BackendKeyData
	hasKey  bool
	stop    chan struct{} // closed by terminate
	stopMsg string
	once    sync.Once
	tracker *frameTracker
	endNote string // why the broker ended an allowed session, for the audit line
}

func (s *Server) handle(raw net.Conn) {
	pipe := s.pipe.Load()
	x := &session{
		srv:   s,
		raw:   raw,
		conn:  raw,
		start: s.opts.Clock.Now(),
		stop:  make(chan struct{}),
		rec: broker.Record{
			RequestID: broker.NewRequestID(),
			Listener:  s.name,
			Protocol:  broker.ProtocolPostgres,
			Host:      s.host,
			Port:      s.port,
		},
	}
	audited := true
	inSetup := false // the client has been sent nothing since its StartupMessage
	defer func() {
		if p := recover(); p != nil {
			// The panic value is never logged nor audited: it could hold
			// anything, a credential included. Its kind and the stack
			// (which prints argument words, not the strings they point
			// to) are enough to find the bug.
			s.log.Error("panic while handling a postgres session", zap.String("listener", s.name),
				zap.String("request_id", x.rec.RequestID), zap.String("panic_type", broker.PanicKind(p)), zap.Stack("stack"))
			x.setFail(newFailure(sqlConnectionFailure, broker.CodeInternal, "keygate: internal error", errPanic))
			if inSetup {
				x.sendError()
			}
		}
		x.conn.Close()
		if x.up != nil {
			x.up.conn.Close()
		}
		if x.hasKey {
			s.mu.Lock()
			delete(s.keys, x.key)
			s.mu.Unlock()
		}
		s.untrack(raw)
		if audited {
			x.finish()
		}
	}()
	_ = raw.SetDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	startup, cancel, err := x.readStartup()
	switch {
	case cancel != nil:
		audited = false // a cancel is not a session; forwardCancel logs it
		s.forwardCancel(cancel)
		return
	case err != nil:
		audited = false // nothing was asked for: no decision to record
		if errors.Is(err, errStrayBytes) {
			// CVE-2021-23214 class, or a client pipelining before it was
			// answered: worth an operator's attention.
			s.log.Warn("postgres connection closed: the client sent bytes before the broker answered", zap.String("listener", s.name),
				zap.String("request_id", x.rec.RequestID), zap.String("remote", fmt.Sprint(raw.RemoteAddr())))
		} else {
			// Probes and port scanners end here; not worth a warning.
			s.log.Debug("postgres startup refused", zap.String("listener", s.name), zap.String("request_id", x.rec.RequestID), zap.Error(err))
		}
		return
	}
	x.rec.DBUser = startup.Parameters[paramUser]
	x.rec.Database = startup.Parameters[paramDatabase]
	if x.rec.Database == "" {
		x.rec.Database = x.rec.DBUser
	}
	if x.rec.DBUser == "" {
		x.setFail(newFailure(sqlInvalidAuthorization, broker.CodeBadRequest, "no PostgreSQL user name specified in startup packet", nil))
		x.sendError()
		return
	}
	// Setting the session up waits for the credential source and the
	// server; the client waits as long.
	_ = raw.SetDeadline(time.Now().Add(s.opts.UpstreamTimeout + 5*time.Second))
	inSetup = true
	f := x.setup(pipe, startup)
	inSetup = false
	if f != nil {
		x.setFail(f)
		x.sendError()
		return
	}
	x.serve()
}

func (x *session) setFail(f *failure) {
	if x.fail == nil {
		x.fail = f
		if x.rec.Rule == "" {
			x.rec.Rule = f.be.Rule
		}
	}
}

// errPanic is the audited cause of a session ended by a panic; the panic
// value itself is never recorded.
var errPanic = errors.New("panic")

// release runs the credential's Release with the same containment as the
// session: finish runs after handle's recover, so a panic here would end
// the process and the runtime would print the panic value.
func (x *session) release() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	defer func() {
		if p := recover(); p != nil {
			x.srv.log.Error("panic while releasing a credential", zap.String("listener", x.srv.name),
				zap.String("request_id", x.rec.RequestID), zap.String("panic_type", broker.PanicKind(p)), zap.Stack("stack"))
		}
	}()
	x.cred.Release(ctx)
}

// readStartup runs the client's startup phase: GSSENCRequest (answered
// 'N'), SSLRequest (TLS or 'N'), then a StartupMessage or CancelRequest.
func (x *session) readStartup() (*pgproto3.StartupMessage, *pgproto3.CancelRequest, error) {
	s := x.srv
	sawSSL, sawGSS := false, false
	for {
		msg, err := readStartupPacket(x.conn)
		if err != nil {
			return nil, nil, err
		}
		switch m := msg.(type) {
		case *pgproto3.SSLRequest:
			if sawSSL {
				return nil, nil, errors.New("a second SSLRequest")
			}
			sawSSL = true
			if s.opts.ClientTLS == nil {
				if _, err := x.conn.Write([]byte{'N'}); err != nil {
					return nil, nil, err
				}
				continue
			}
			if _, err := x.conn.Write([]byte{'S'}); err != nil {
				return nil, nil, err
			}
			tc := tls.Server(x.conn, s.opts.ClientTLS)
			if err := tc.Handshake(); err != nil {
				return nil, nil, fmt.Errorf("client TLS handshake: %w", err)
			}
			x.conn = tc
		case *pgproto3.GSSEncRequest:
			if sawGSS || sawSSL {
				return nil, nil, errors.New("an unexpected GSSENCRequest")
			}
			sawGSS = true
			if _, err := x.conn.Write([]byte{'N'}); err != nil {
				return nil, nil, err
			}
		case *pgproto3.CancelRequest:
			return nil, m, nil
		case *pgproto3.StartupMessage:
			return m, nil, nil
		}
	}
}

// setup attests, decides, fetches the credential and authenticates
// upstream. Nothing is dialled before the decision allows the session.
func (x *session) setup(pipe *broker.Pipeline, client *pgproto3.StartupMessage) *failure {
	s := x.srv
	ev := broker.Evidence{Listener: s.name, Conn: x.conn, Remote: addrPort(x.raw.RemoteAddr()), Local: addrPort(x.raw.LocalAddr())}
	if tc, ok := x.conn.(*tls.Conn); ok {
		st := tc.ConnectionState()
		ev.TLS = &st
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.UpstreamTimeout)
	defer cancel()
	id, err := pipe.Attest(ctx, ev)
	if err != nil {
		return fromBrokerError(err, "")
	}
	x.rec.Workload, x.rec.Delegator = id, id.Delegator.Sub

	// The startup the upstream gets: built, not forwarded. The
	// credential's username is filled in below; the rule sees the
	// client's user and database.
	t := broker.Target{Phase: broker.PhaseRequest, Protocol: broker.ProtocolPostgres, Host: s.host, Port: s.port,
		Database: x.rec.Database, User: x.rec.DBUser}
	pol := startupPolicy{AllowOptions: s.db.AllowOptions, AllowReplication: s.db.AllowReplication}
	if _, _, err := rewriteStartup(client, "", pol); err != nil {
		se := err.(*startupError)
		return newFailure(se.Code, broker.CodeBadRequest, se.Message, nil)
	}
	what := fmt.Sprintf("user %q on database %q", t.User, t.Database)
	d, err := pipe.Decide(ctx, id, t)
	x.rec.Rule = d.Rule
	if err != nil {
		return fromBrokerError(err, what)
	}
	switch {
	case d.Action != broker.Allow:
		return fromBrokerError(&broker.Error{Code: broker.CodeDenied, Rule: d.Rule,
			Message: "rule " + d.Rule + " is a tunnel rule; database sessions need an allow rule"}, what)
	case d.Inject != nil && d.Inject.Credential != s.db.Credential:
		return fromBrokerError(&broker.Error{Code: broker.CodeDenied, Rule: d.Rule,
			Message: fmt.Sprintf("rule %s injects credential %q, but this database uses %q", d.Rule, d.Inject.Credential, s.db.Credential)}, what)
	}
	x.rec.Decision = broker.AuditAllow

	c, f := x.credential(ctx, pipe, id, t, d)
	if f != nil {
		return f
	}
	user, _ := c.Field(broker.FieldUsername)
	password, _ := c.Field(broker.FieldPassword)
	startup, req, err := rewriteStartup(client, user.Reveal(), pol)
	if err != nil {
		return newFailure(sqlProtocolViolation, broker.CodeBadRequest, err.Error(), nil)
	}

	conn, err := s.dialUpstream(ctx)
	if err != nil {
		return upstreamFailure(err)
	}
	up, err := authenticate(conn, startup, user, password, s.db.TLS, req.Database, s.db.RDSIAM != nil)
	if err != nil {
		conn.Close()
		return upstreamFailure(err)
	}
	_ = conn.SetDeadline(time.Time{})
	x.up = up
	s.log.Debug("postgres session authenticated upstream", zap.String("request_id", x.rec.RequestID),
		zap.String("listener", s.name), zap.String("auth", up.auth), zap.Bool("upstream_tls", s.db.TLS != TLSDisable))

	// What the client sees: AuthenticationOk, the server's parameters, a
	// notice for what was dropped, the broker's own key, ReadyForQuery.
	var out []byte
	if req.Minor > 0 || len(req.ProtocolOptions) > 0 {
		out = encodeBackend(out, &pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0, UnrecognizedOptions: req.ProtocolOptions})
	}
	out = encodeBackend(out, &pgproto3.AuthenticationOk{})
	out = append(out, up.params...)
	if len(req.Dropped) > 0 {
		out = encodeBackend(out, &pgproto3.NoticeResponse{Severity: "WARNING", SeverityUnlocalized: "WARNING", Code: "01000",
			Message: "keygate: startup parameters removed: " + strings.Join(req.Dropped, ", ")})
	}
	if up.hasKey {
		k, secret, err := s.register(x)
		if err != nil {
			return newFailure(sqlConnectionFailure, broker.CodeInternal, "keygate: internal error", err)
		}
		out = encodeBackend(out, &pgproto3.BackendKeyData{ProcessID: binary.BigEndian.Uint32(k[:4]), SecretKey: secret})
	}
	out = append(out, up.ready...)
	out = append(out, up.after...)
	if _, err := x.conn.Write(out); err != nil {
		return newFailure(sqlConnectionFailure, broker.CodeUpstreamUnreachable, "keygate: the client went away", err)
	}
	_ = x.raw.SetDeadline(time.Time{})
	return nil
}

// credential fetches the entry's credential for this caller under the
// deciding rule, the way the pipeline does for a request.
func (x *session) credential(ctx context.Context, pipe *broker.Pipeline, id broker.Identity, t broker.Target, d broker.Decision) (broker.Credential, *failure) {
	s := x.srv
	name := s.db.Credential
	src := pipe.Sources[name]
	if src == nil {
		return broker.Credential{}, newFailure(sqlConnectionFailure, broker.CodeCredentialUnavailable,
			fmt.Sprintf("keygate: credential %q is not configured", name), nil)
	}
	c, err := src.Credential(ctx, id, broker.Grant{Rule: d.Rule, Credential: name, Target: t})
	if err != nil {
		be := broker.AsError(err)
		if be.Code == broker.CodeInternal {
			be = &broker.Error{Code: broker.CodeCredentialUnavailable, Message: fmt.Sprintf("credential %q is unavailable", name), Err: err}
		}
		be.Rule = d.Rule
		return broker.Credential{}, &failure{be: be, sqlcode: sqlConnectionFailure, msg: "keygate: " + be.Message}
	}
	if c.Name == "" {
		c.Name = name
	}
	x.cred = c
	x.rec.CredName, x.rec.CredKind = c.Name, c.Kind
	x.rec.CredFP = s.opts.Fingerprints.Fingerprint(c)
	x.rec.CredExpires, x.rec.CredMeta = c.Expires, c.Meta
	if c.Expired(s.opts.Clock.Now()) {
		return broker.Credential{}, newFailure(sqlConnectionFailure, broker.CodeCredentialUnavailable,
			fmt.Sprintf("keygate: credential %q has expired", name), nil)
	}
	if r := s.db.RDSIAM; r != nil {
		return x.rdsLogin(ctx, c, r)
	}
	user, okU := c.Field(broker.FieldUsername)
	pw, okP := c.Field(broker.FieldPassword)
	if !okU || !okP || strings.IndexByte(user.Reveal(), 0) >= 0 || strings.IndexByte(pw.Reveal(), 0) >= 0 {
		return broker.Credential{}, newFailure(sqlConnectionFailure, broker.CodeCredentialMalformed,
			fmt.Sprintf("keygate: credential %q has no usable username and password", name), nil)
	}
	return c, nil
}

// rdsLogin is the login of an rds_iam entry: the user from the config and
// a fresh IAM token signed by c (an aws_sts credential, perhaps cached) as
// the password. x.cred stays c: its fingerprint and expiry are what the
// audit line reports, with meta rds_iam_user; the token is never logged.
func (x *session) rdsLogin(ctx context.Context, c broker.Credential, r *RDSIAM) (broker.Credential, *failure) {
	s := x.srv
	meta := make(map[string]string, len(c.Meta)+1)
	maps.Copy(meta, c.Meta) // c.Meta may be the cache's: not written
	meta["rds_iam_user"] = r.User
	x.rec.CredMeta = meta
	tok, err := rdsAuthToken(ctx, rdsTokenEndpoint(s.db), r.Region, r.User, c)
	if err != nil {
		return broker.Credential{}, newFailure(sqlConnectionFailure, broker.CodeCredentialMalformed,
			fmt.Sprintf("keygate: credential %q cannot sign an RDS IAM token", c.Name), err)
	}
	x.token = tok
	return broker.Credential{Name: c.Name, Kind: c.Kind, Expires: c.Expires, Meta: meta, Fields: map[string]broker.Secret{
		broker.FieldUsername: broker.NewSecret(r.User), broker.FieldPassword: tok,
	}}, nil
}

// sendError writes the failure as a FATAL ErrorResponse (best effort).
func (x *session) sendError() {
	if x.fail == nil {
		return
	}
	_ = x.conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_, _ = x.conn.Write(encodeBackend(nil, errorResponse(x.fail.sqlcode, x.fail.msg, x.rec.RequestID)))
}

// deadline is when the session must end: the credential's expiry or the
// caller's evidence's, whichever is first; zero for none.
//
// With rds_iam the credential's expiry does not count: neither the token
// (15 minutes) nor the aws_sts keys that signed it authenticate anything
// after the login (RDS checks the token only then), and their expiry
// revokes nothing, so the session lives as a password login would, until
// the caller's evidence expires or either side closes.
func (x *session) deadline() time.Time {
	var d time.Time
	credExpires := x.cred.Expires
	if x.srv.db.RDSIAM != nil {
		credExpires = time.Time{}
	}
	for _, t := range []time.Time{credExpires, x.rec.Workload.Expires, x.rec.Workload.Delegator.Expires} {
		if !t.IsZero() && (d.IsZero() || t.Before(d)) {
			d = t
		}
	}
	return d
}

// terminate asks the session to end (idempotent, never blocks).
func (x *session) terminate(msg string) {
	x.once.Do(func() {
		x.stopMsg = msg
		close(x.stop)
	})
}

// finish releases the credential and writes the audit line.
func (x *session) finish() {
	s := x.srv
	if x.cred.Release != nil {
		x.release()
	}
	x.rec.Duration = s.opts.Clock.Now().Sub(x.start)
	if x.fail != nil {
		be := x.fail.be
		x.rec.Status = be.Status()
		msg := be.Code + ": " + be.Message
		if be.Err != nil {
			msg += " (" + be.Err.Error() + ")"
		}
		x.rec.Error = x.cred.Redact(msg, x.token)
		if x.rec.Decision == "" || be.Code == broker.CodeDenied || be.Code == broker.CodeUnauthenticated {
			x.rec.Decision = broker.AuditDeny
		}
	} else {
		x.rec.Status = 200
		x.rec.Decision = broker.AuditAllow
		x.rec.Error = x.endNote
	}
	if x.rec.Decision == "" {
		x.rec.Decision = broker.AuditDeny
	}
	s.log.Info("decision", zap.Inline(&x.rec))
	if m := s.opts.Metrics; m != nil && m.Requests != nil {
		m.Requests.WithLabelValues(x.rec.Decision, x.rec.Rule).Inc()
	}
}

func addrPort(a net.Addr) netip.AddrPort {
	if a == nil {
		return netip.AddrPort{}
	}
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort()
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// register gives the session a fresh random key of the broker's own and
// maps it to the session (for CancelRequest).
func (s *Server) register(x *session) (cancelKey, []byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for range 8 {
		var k cancelKey
		if _, err := io.ReadFull(rand.Reader, k[:]); err != nil {
			return k, nil, err
		}
		if _, taken := s.keys[k]; taken {
			continue
		}
		s.keys[k] = x
		x.key, x.hasKey = k, true
		return k, k[4:], nil
	}
	return cancelKey{}, nil, errors.New("dbproxy: no free cancel key")
}
