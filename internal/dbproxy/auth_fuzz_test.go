package dbproxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
)

// fuzzModes are the upstream legs FuzzAuthMessages drives, chosen by the
// low bits of its flags argument.
var fuzzModes = [4]struct {
	tls           TLSMode
	cleartextOnly bool // an RDS IAM token as the password
}{{TLSDisable, false}, {TLSRequire, false}, {TLSVerifyFull, false}, {TLSVerifyFull, true}}

// FuzzAuthMessages plays an arbitrary PostgreSQL server against the
// broker's upstream leg: answer is the server's reply to SSLRequest (TLS
// modes only; exactly "S" starts a real TLS handshake, anything else is
// written raw, as a man in the middle stuffing bytes would) and stream is
// everything the server sends after it (authentication requests, SASL
// server-first and server-final messages, errors, parameters). The server
// is a loopback socket, not a fake of the code under test: dialUpstream and
// authenticate run unchanged. Invariants:
//   - no panic, no hang (every run ends well before its deadline), bounded
//     memory whatever lengths the messages declare;
//   - a connection is used only after a TLS handshake in the TLS modes;
//   - the password leaves the broker in clear only over verify-full TLS;
//     an RDS IAM token is never hashed into MD5 or SCRAM;
//   - a SCRAM exchange never succeeds (the server cannot prove knowledge of
//     the verifier for a random client nonce), so an AuthenticationOk is
//     never believed before the server's signature verified;
//   - what the broker sends is well-formed frontend messages: the startup,
//     then only password-type messages, the user name only in the startup;
//   - errors and the client-visible failure never hold the password or the
//     user name.
func FuzzAuthMessages(f *testing.F) {
	srvTLS, pool := leafFor(f, "db.test")
	// Registered canaries: the suite-wide sweep fails the package if either
	// shows up in its output.
	user, password := canarytest.New("pg-fuzz-user"), canarytest.New("pg-fuzz-password")
	startup := &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{"user": user, "database": "app"}}
	enc := func(msgs ...pgproto3.BackendMessage) []byte {
		var b []byte
		for _, m := range msgs {
			b = encodeBackend(b, m)
		}
		return b
	}
	ready := []pgproto3.BackendMessage{&pgproto3.ParameterStatus{Name: "server_version", Value: "15"},
		&pgproto3.BackendKeyData{ProcessID: 7, SecretKey: []byte{1, 2, 3, 4}}, &pgproto3.ReadyForQuery{TxStatus: 'I'}}
	for mode := range uint8(4) {
		f.Add([]byte("S"), enc(append([]pgproto3.BackendMessage{&pgproto3.AuthenticationOk{}}, ready...)...), mode)
		f.Add([]byte("S"), enc(&pgproto3.AuthenticationCleartextPassword{}), mode)
		f.Add([]byte("S"), enc(&pgproto3.AuthenticationMD5Password{Salt: [4]byte{1, 2, 3, 4}}), mode)
		f.Add([]byte("S"), enc(&pgproto3.AuthenticationSASL{AuthMechanisms: []string{mechSCRAMPlus, mechSCRAM}},
			&pgproto3.AuthenticationSASLContinue{Data: []byte("r=x,s=c2FsdA==,i=4096")}), mode)
		f.Add([]byte("S"), enc(&pgproto3.AuthenticationSASL{AuthMechanisms: []string{mechSCRAM}},
			&pgproto3.AuthenticationOk{}), mode)
	}
	f.Add([]byte("S\x00\x00\x00\x08\x00\x00\x00\x00"), enc(&pgproto3.AuthenticationOk{}), uint8(2))
	f.Add([]byte("N"), []byte(nil), uint8(1))

	f.Fuzz(func(t *testing.T, answer, stream []byte, flags uint8) {
		m := fuzzModes[flags%4]
		db := Database{Name: "fuzz", TLS: m.tls, ServerName: "db.test", RootCAs: pool}

		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		db.Upstream = ln.Addr().String()
		peer := &pgPeer{tlsConf: srvTLS, tlsMode: m.tls != TLSDisable, answer: answer, stream: stream}
		done := make(chan struct{})

		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		go func() { defer close(done); peer.serve(ln) }()

		s := &Server{opts: Options{Dialer: &net.Dialer{}}, db: db, upstreamTLS: upstreamTLSConfig(db)}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		var up *upstream
		conn, err := s.dialUpstream(ctx)
		if err == nil {
			if tc, ok := conn.(*tls.Conn); m.tls != TLSDisable && (!ok || !tc.ConnectionState().HandshakeComplete || string(answer) != "S") {
				t.Fatalf("a TLS-mode connection was used without a handshake (answer %q)", answer)
			}
			up, err = authenticate(conn, startup, broker.NewSecret(user), broker.NewSecret(password), m.tls, "app", m.cleartextOnly)
			conn.Close()
		}
		ln.Close() // ends an Accept still waiting, should the dial have failed
		<-done
		runtime.ReadMemStats(&after)

		var fl *failure
		if err != nil {
			fl = upstreamFailure(err)
			for _, s := range []string{err.Error(), fl.msg, fl.Error()} {
				if strings.Contains(s, password) || strings.Contains(s, user) {
					t.Fatalf("an error holds the password or the user name")
				}
			}
			if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
				t.Fatalf("the handshake ran into its deadline: %v", err)
			}
		}
		if grew := after.TotalAlloc - before.TotalAlloc; grew > 16<<20+64*uint64(len(stream)+len(answer)) {
			t.Fatalf("allocated %d bytes for %d bytes of input", grew, len(stream)+len(answer))
		}
		got := peer.got.Bytes()
		if bytes.Contains(got, []byte(password)) && (m.tls != TLSVerifyFull || !peer.tlsUp.Load()) {
			t.Fatalf("the password was sent in clear over a %s leg (tls up %v)", m.tls, peer.tlsUp.Load())
		}
		if m.tls == TLSDisable || peer.tlsUp.Load() {
			checkFrontendStream(t, got, user, password, m.cleartextOnly)
		} else if bytes.Contains(got, []byte(user)) {
			t.Fatalf("the startup was sent before TLS")
		}

		if err == nil {
			if strings.HasPrefix(up.auth, "scram") {
				t.Fatalf("a %s exchange succeeded against a server that cannot know the verifier", up.auth)
			}
			if up.ready == nil {
				t.Fatalf("authenticated without ReadyForQuery")
			}
			return
		}
		if fl.sqlcode == "" || fl.msg == "" {
			t.Fatalf("a failure without SQLSTATE or message: %v", err)
		}
	})
}

// pgPeer is the fuzzed server: it answers SSLRequest with answer, runs a
// real TLS handshake when the answer is exactly "S", writes stream, then
// half-closes and records everything the broker sends until it closes.
type pgPeer struct {
	tlsConf *tls.Config
	tlsMode bool
	answer  []byte
	stream  []byte
	tlsUp   atomic.Bool
	got     bytes.Buffer // read only after serve returned
}

func (p *pgPeer) serve(ln net.Listener) {
	c, err := ln.Accept()
	if err != nil {
		return
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	var rw net.Conn = c
	closeWrite := func() { _ = c.(*net.TCPConn).CloseWrite() }
	if p.tlsMode {
		var req [8]byte
		if _, err := io.ReadFull(c, req[:]); err != nil {
			return
		}
		if _, err := c.Write(p.answer); err != nil {
			return
		}
		if string(p.answer) == "S" {
			tc := tls.Server(c, p.tlsConf)
			if err := tc.Handshake(); err != nil {
				return
			}
			p.tlsUp.Store(true)
			rw = tc
			closeWrite = func() { _ = tc.CloseWrite() }
		}
	}
	read := make(chan struct{})
	go func() {
		defer close(read)
		// Bounded: the broker sends a startup and a few short answers.
		_, _ = io.Copy(&p.got, io.LimitReader(rw, 1<<20))
	}()
	_, _ = rw.Write(p.stream)
	closeWrite()
	<-read
}

// checkFrontendStream parses what the broker sent in clear or inside TLS:
// the startup (the only place the user name appears), then only
// password-type messages ('p': password, MD5, SASL initial and response).
func checkFrontendStream(t *testing.T, got []byte, user, password string, cleartextOnly bool) {
	t.Helper()
	if len(got) == 0 {
		return // the server's stream ended the leg before the startup
	}
	if len(got) < 8 {
		t.Fatalf("a truncated startup (%d bytes)", len(got))
	}
	n := int(binary.BigEndian.Uint32(got))
	if n < 8 || n > len(got) || binary.BigEndian.Uint32(got[4:]) != pgproto3.ProtocolVersion30 {
		t.Fatalf("the first message is not a startup")
	}
	if !bytes.Contains(got[:n], []byte(user)) {
		t.Fatalf("the startup does not carry the credential's user")
	}
	rest := got[n:]
	for len(rest) > 0 {
		if len(rest) < 5 {
			t.Fatalf("a truncated message after the startup")
		}
		typ, l := rest[0], int(binary.BigEndian.Uint32(rest[1:]))
		if l < 4 || 1+l > len(rest) {
			t.Fatalf("message %q has a bad length", typ)
		}
		body := rest[5 : 1+l]
		if typ != 'p' {
			t.Fatalf("the broker sent message %q during authentication", typ)
		}
		if bytes.Contains(body, []byte(user)) {
			t.Fatalf("the user name was sent outside the startup")
		}
		if cleartextOnly && string(body) != password+"\x00" {
			t.Fatalf("an RDS IAM token was answered with something other than a cleartext password")
		}
		rest = rest[1+l:]
	}
}
