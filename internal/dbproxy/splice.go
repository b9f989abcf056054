package dbproxy

import (
	"encoding/binary"
	"errors"
	"io"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
)

// Messages the broker writes when it ends a session.
const (
	msgLeaseExpired = "terminating connection: credential lease expired"
	msgShutdown     = "terminating connection: the broker is shutting down"
)

type copyResult struct {
	in  bool // client -> server
	n   int64
	err error
}

// serve splices the ready session both ways until either side ends, the
// session's deadline passes, or the broker shuts down.
//
// Client to server is a plain io.Copy of the sockets (splice(2) when both
// are TCP). Server to client is an io.Copy through a frameTracker, which
// reads only the 5-byte message headers to know where messages end: that
// is what lets the broker end a session with a clean FATAL between two
// server messages instead of cutting one in half.
func (x *session) serve() {
	s := x.srv
	s.mu.Lock()
	delete(s.conns, x.raw)
	s.sessions[x] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.sessions, x)
		s.checkIdleLocked()
		s.mu.Unlock()
	}()

	x.tracker = &frameTracker{w: x.conn}
	done := make(chan copyResult, 2)
	go func() {
		defer x.recoverCopy(done, true)
		n, err := io.Copy(x.up.conn, x.conn)
		done <- copyResult{in: true, n: n, err: err}
	}()
	go func() {
		defer x.recoverCopy(done, false)
		_, err := io.Copy(x.tracker, x.up.conn)
		done <- copyResult{n: x.tracker.count(), err: err}
	}()
	var expiry <-chan time.Time
	if dl := x.deadline(); !dl.IsZero() {
		t := time.NewTimer(dl.Sub(s.opts.Clock.Now()))
		defer t.Stop()
		expiry = t.C
	}
	pending := 2
	select {
	case r := <-done:
		pending--
		x.account(r)
		// One side ended: PostgreSQL has nothing to say after that.
		x.conn.Close()
		x.up.conn.Close()
	case <-expiry:
		x.terminate(msgLeaseExpired)
		x.endSession(done, &pending)
	case <-x.stop:
		x.endSession(done, &pending)
	}
	for ; pending > 0; pending-- {
		x.account(<-done)
	}
}

func (x *session) account(r copyResult) {
	if r.in {
		x.rec.BytesIn = r.n
	} else {
		x.rec.BytesOut = r.n
	}
}

// endSession ends a running session on the broker's initiative: stop
// reading the client, let the server message in flight reach the client
// (at most TerminateGrace), tell the client why (FATAL 57P01), cancel
// whatever the server is running and close both sides.
func (x *session) endSession(done chan copyResult, pending *int) {
	s := x.srv
	past := time.Unix(1, 0)
	_ = x.conn.SetReadDeadline(past)
	_ = x.up.conn.SetWriteDeadline(past)
	if x.tracker.requestStop() {
		_ = x.up.conn.SetReadDeadline(past)
	} else {
		_ = x.up.conn.SetReadDeadline(time.Now().Add(s.opts.TerminateGrace))
	}
	for ; *pending > 0; *pending-- {
		x.account(<-done)
	}
	clean := x.tracker.atBoundary()
	if clean {
		_ = x.conn.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = x.conn.Write(encodeBackend(nil, &pgproto3.ErrorResponse{
			Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: sqlAdminShutdown,
			Message: x.stopMsg, Detail: "keygate request_id " + x.rec.RequestID,
		}))
	}
	x.conn.Close()
	// The server may be running a statement (pg_sleep) and would not see
	// the closed socket until it writes: cancel it, then close.
	if err := s.cancelUpstream(x.up); err != nil {
		s.log.Warn("cancelling the server's statement at session end failed; it ends when the statement does",
			zap.String("listener", s.name), zap.String("request_id", x.rec.RequestID), zap.Error(err))
	}
	x.up.conn.Close()
	x.endNote = "session ended by the broker: " + x.stopMsg
	if !clean {
		x.endNote += " (cut mid-message: the server's message did not finish in time)"
	}
}

// errStopped ends the server-to-client copy at a message boundary.
var errStopped = errors.New("dbproxy: session ending")

// frameTracker is the server-to-client writer. It forwards every byte
// as it comes and follows the message framing (type byte, 4-byte length)
// without decoding anything, so that, once asked to stop, it stops exactly
// at the next message boundary.
type frameTracker struct {
	w io.Writer

	mu      sync.Mutex
	stop    bool
	hdr     int // header bytes of the next message seen so far (0-4)
	lenBuf  [4]byte
	need    int   // body bytes of the current message still to come
	broken  bool  // not PostgreSQL framing: there is no boundary to stop at
	written int64 // bytes forwarded
}

func (t *frameTracker) atBoundaryLocked() bool { return !t.broken && t.need == 0 && t.hdr == 0 }

func (t *frameTracker) atBoundary() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.atBoundaryLocked()
}

func (t *frameTracker) count() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.written
}

// requestStop makes the next Write stop at a boundary and reports whether
// the stream is at one now (nothing more need be read).
func (t *frameTracker) requestStop() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.stop = true
	return t.atBoundaryLocked()
}

func (t *frameTracker) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	i := 0
	for i < len(p) && !t.broken {
		if t.stop && t.atBoundaryLocked() {
			break
		}
		switch {
		case t.need > 0:
			k := min(t.need, len(p)-i)
			i += k
			t.need -= k
		case t.hdr == 0: // the type byte
			t.hdr = 1
			i++
		default:
			t.lenBuf[t.hdr-1] = p[i]
			t.hdr++
			i++
			if t.hdr == 5 {
				t.hdr = 0
				l := int32(binary.BigEndian.Uint32(t.lenBuf[:]))
				if l < 4 {
					t.broken = true
				} else {
					t.need = int(l) - 4
				}
			}
		}
	}
	if t.broken {
		i = len(p)
	}
	n, err := t.w.Write(p[:i])
	t.written += int64(n)
	if err != nil {
		return n, err
	}
	if i < len(p) {
		return i, errStopped
	}
	return len(p), nil
}

// recoverCopy contains a panic in one copy direction (the frame tracker is
// the broker's own code on live bytes): it ends that direction as an error,
// so the session closes, and logs the panic's kind and stack, never its
// value, as the session's own recover does.
func (x *session) recoverCopy(done chan<- copyResult, in bool) {
	if p := recover(); p != nil {
		x.srv.log.Error("panic while relaying a postgres session", zap.String("listener", x.srv.name),
			zap.String("request_id", x.rec.RequestID), zap.String("panic_type", broker.PanicKind(p)), zap.Stack("stack"))
		done <- copyResult{in: in, err: errPanic}
	}
}
