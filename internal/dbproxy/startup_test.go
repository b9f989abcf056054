package dbproxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

// FuzzStartupMessage: whatever the client sends in its startup phase, the
// parsing never panics and the startup built for the server carries the
// credential's user, the database the rule saw, and never the client's
// user, a password, options or replication unless the entry allows them.
func FuzzStartupMessage(f *testing.F) {
	enc := func(params map[string]string) []byte {
		b, err := (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: params}).Encode(nil)
		if err != nil {
			f.Fatal(err)
		}
		return b
	}
	f.Add(enc(map[string]string{"user": "postgres", "database": "app"}), uint8(0))
	f.Add(enc(map[string]string{"user": "postgres", "password": "x", "options": "-c role=postgres", "replication": "database"}), uint8(3))
	f.Add(enc(map[string]string{"user": "a", "replication": "off", "_pq_.x": "1", "Password": "p", "application_name": "x"}), uint8(1))
	f.Add([]byte("\x00\x00\x00\x2d\x00\x03\x00\x00user\x00app\x00user\x00postgres\x00database\x00app\x00\x00"), uint8(0))
	f.Add([]byte("\x00\x00\x00\x08\x04\xd2\x16\x2f"), uint8(0)) // SSLRequest
	f.Add([]byte("\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x01\x00\x00\x00\x02"), uint8(0))
	f.Fuzz(func(t *testing.T, data []byte, flags uint8) {
		const jit = "v-jit-user"
		pol := startupPolicy{AllowOptions: flags&1 != 0, AllowReplication: flags&2 != 0}
		msg, err := readStartupPacket(bytes.NewReader(data))
		if err != nil {
			if msg != nil && !errors.Is(err, errStrayBytes) {
				t.Fatalf("a message with an error that is not errStrayBytes: %v", err)
			}
			return
		}
		sm, ok := msg.(*pgproto3.StartupMessage)
		if !ok {
			return
		}
		out, req, err := rewriteStartup(sm, jit, pol)
		if err != nil {
			var se *startupError
			if !errors.As(err, &se) || se.Code == "" {
				t.Fatalf("refusal without a SQLSTATE: %v", err)
			}
			return
		}
		p := out.Parameters
		if p["user"] != jit {
			t.Fatalf("user %q, want the credential's", p["user"])
		}
		if p["database"] != req.Database || req.Database == "" {
			t.Fatalf("database %q, rule saw %q", p["database"], req.Database)
		}
		if want := sm.Parameters["database"]; want != "" && req.Database != want {
			t.Fatalf("the rule saw database %q, the client asked for %q", req.Database, want)
		}
		if req.User != sm.Parameters["user"] {
			t.Fatalf("the rule saw user %q, the client sent %q", req.User, sm.Parameters["user"])
		}
		for k, v := range p {
			switch {
			case k == "":
				t.Fatal("an empty parameter name")
			case strings.EqualFold(k, "password"):
				t.Fatal("a password parameter is forwarded")
			case strings.HasPrefix(k, "_pq_."):
				t.Fatal("a protocol option is forwarded")
			case k == "options" && !pol.AllowOptions:
				t.Fatal("options forwarded without allow_options")
			case k == "replication" && !pol.AllowReplication:
				t.Fatal("replication forwarded without allow_replication")
			case k != "user" && k != "database" && sm.Parameters[k] != v:
				t.Fatalf("parameter %q changed", k)
			}
		}
		if out.ProtocolVersion != pgproto3.ProtocolVersion30 {
			t.Fatal("the upstream startup is not protocol 3.0")
		}
		// What is sent decodes to exactly what was built: no parameter can
		// smuggle another past the broker.
		wire, err := out.Encode(nil)
		if err != nil {
			t.Fatalf("encoding the upstream startup: %v", err)
		}
		back, err := readStartupPacket(bytes.NewReader(wire))
		if err != nil {
			t.Fatalf("the upstream startup does not decode: %v", err)
		}
		got := back.(*pgproto3.StartupMessage).Parameters
		if len(got) != len(p) {
			t.Fatalf("round trip: %d parameters, built %d", len(got), len(p))
		}
		for k, v := range p {
			if got[k] != v {
				t.Fatalf("round trip changed %q", k)
			}
		}
	})
}

// TestFrameTracker: asked to stop, the server-to-client copy ends exactly
// at the first message boundary after what it already forwarded, however
// the stream is cut into reads.
func TestFrameTracker(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for iter := range 500 {
		var stream []byte
		var bounds []int // offsets where a message ends
		for range 1 + rng.IntN(20) {
			body := make([]byte, rng.IntN(70))
			stream = append(stream, 'D')
			stream = binary.BigEndian.AppendUint32(stream, uint32(4+len(body)))
			stream = append(stream, body...)
			bounds = append(bounds, len(stream))
		}
		var out bytes.Buffer
		tr := &frameTracker{w: &out}
		stopAt := rng.IntN(len(stream) + 1) // bytes written before the stop request
		pos := 0
		stopped := false
		var atBoundary bool
		for pos < len(stream) {
			if !stopped && pos >= stopAt {
				atBoundary = tr.requestStop()
				stopped = true
			}
			n := 1 + rng.IntN(40)
			if !stopped && pos+n > stopAt && stopAt > pos {
				n = stopAt - pos
			}
			end := min(pos+n, len(stream))
			w, err := tr.Write(stream[pos:end])
			pos += w
			if err != nil {
				if !errors.Is(err, errStopped) {
					t.Fatal(err)
				}
				break
			}
		}
		want := len(stream)
		if stopped {
			want = 0
			for _, b := range append([]int{0}, bounds...) {
				if b >= stopAt {
					want = b
					break
				}
			}
			if atBoundary != (want == stopAt) {
				t.Fatalf("iteration %d: requestStop said boundary=%v at %d", iter, atBoundary, stopAt)
			}
		}
		if out.Len() != want || !bytes.Equal(out.Bytes(), stream[:want]) || int(tr.count()) != want {
			t.Fatalf("iteration %d: forwarded %d bytes, want %d (stop requested at %d, boundaries %v)", iter, out.Len(), want, stopAt, bounds)
		}
		if !tr.atBoundary() {
			t.Fatalf("iteration %d: not at a boundary after stopping", iter)
		}
	}
	// Not PostgreSQL framing (a length below 4): forwarded, never "at a
	// boundary", so the session is cut rather than a FATAL spliced in.
	var out bytes.Buffer
	tr := &frameTracker{w: &out}
	if _, err := tr.Write([]byte("X\x00\x00\x00\x01garbage")); err != nil || out.Len() != 12 || tr.requestStop() {
		t.Fatalf("broken framing: %v, %d bytes, boundary=%v", err, out.Len(), tr.atBoundary())
	}
}

func TestRewriteStartupRefusals(t *testing.T) {
	tests := []struct {
		name   string
		params map[string]string
		pol    startupPolicy
		code   string // "" = accepted
	}{
		{"no user", map[string]string{"database": "app"}, startupPolicy{}, sqlInvalidAuthorization},
		{"replication", map[string]string{"user": "a", "replication": "database"}, startupPolicy{}, sqlInvalidAuthorization},
		{"replication allowed", map[string]string{"user": "a", "replication": "true"}, startupPolicy{AllowReplication: true}, ""},
		{"replication=off is an ordinary session", map[string]string{"user": "a", "replication": "off"}, startupPolicy{}, ""},
		{"empty parameter name", map[string]string{"user": "a", "": "x"}, startupPolicy{}, sqlProtocolViolation},
		{"database defaults to the user", map[string]string{"user": "a"}, startupPolicy{}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, req, err := rewriteStartup(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: tt.params}, "jit", tt.pol)
			var se *startupError
			switch {
			case tt.code == "" && err != nil:
				t.Fatal(err)
			case tt.code != "" && (!errors.As(err, &se) || se.Code != tt.code):
				t.Fatalf("err %v, want SQLSTATE %s", err, tt.code)
			case tt.code == "" && out.Parameters["database"] != req.Database:
				t.Fatalf("database %q vs %q", out.Parameters["database"], req.Database)
			}
			if tt.name == "database defaults to the user" && req.Database != "a" {
				t.Fatalf("database %q, want the client's user name (as PostgreSQL)", req.Database)
			}
		})
	}
}

func TestReadStartupPacket(t *testing.T) {
	enc := func(m pgproto3.FrontendMessage) []byte {
		b, err := m.Encode(nil)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	startup := enc(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: map[string]string{"user": "a", "database": "b"}})
	tests := []struct {
		name  string
		in    []byte
		stray bool
	}{
		{"SSLRequest", enc(&pgproto3.SSLRequest{}), false},
		{"SSLRequest and one more byte", append(enc(&pgproto3.SSLRequest{}), 'x'), true},
		{"GSSENCRequest and a startup", append(enc(&pgproto3.GSSEncRequest{}), startup...), true},
		{"CancelRequest", enc(&pgproto3.CancelRequest{ProcessID: 1, SecretKey: []byte{1, 2, 3, 4}}), false},
		{"StartupMessage", startup, false},
		{"StartupMessage and a query", append(startup, 'Q', 0, 0, 0, 5, 0), true},
		{"a repeated parameter", []byte("\x00\x00\x00\x2d\x00\x03\x00\x00user\x00app\x00user\x00postgres\x00database\x00app\x00\x00"), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			msg, err := readStartupPacket(bytes.NewReader(tt.in))
			if msg == nil {
				t.Fatalf("not decoded: %v", err)
			}
			if got := errors.Is(err, errStrayBytes); got != tt.stray {
				t.Fatalf("err = %v, want stray=%v", err, tt.stray)
			}
		})
	}
}
