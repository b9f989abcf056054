package dbproxy

import (
	"context"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/zap"
)

// cancelTimeout bounds one forwarded cancel (connect, TLS, send, wait for
// the server to close).
const cancelTimeout = 10 * time.Second

// forwardCancel handles a CancelRequest that arrived on the listener: when
// its key is one the broker gave a live session, the session's server
// process is sent its own cancel; any other key is dropped without an
// upstream connection. PostgreSQL answers a cancel with nothing, and so
// does the broker.
func (s *Server) forwardCancel(m *pgproto3.CancelRequest) {
	k, ok := makeCancelKey(m.ProcessID, m.SecretKey)
	var x *session
	if ok {
		s.mu.Lock()
		x = s.keys[k]
		s.mu.Unlock()
	}
	if x == nil {
		s.log.Info("postgres cancel request ignored: no live session has this key", zap.String("listener", s.name))
		return
	}
	err := s.cancelUpstream(x.up)
	if err != nil {
		s.log.Warn("postgres cancel request could not be forwarded", zap.String("listener", s.name),
			zap.String("request_id", x.rec.RequestID), zap.Error(err))
		return
	}
	s.log.Info("postgres cancel request forwarded", zap.String("listener", s.name), zap.String("request_id", x.rec.RequestID))
}

// cancelUpstream sends the server a CancelRequest for up's process, over a
// new connection through the egress dialer with the session's TLS mode,
// and waits (briefly) for the server to close it, as libpq does.
func (s *Server) cancelUpstream(up *upstream) error {
	if up == nil || !up.hasKey {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), cancelTimeout)
	defer cancel()
	conn, err := s.dialUpstream(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	msg, err := (&pgproto3.CancelRequest{ProcessID: up.pid, SecretKey: up.secret}).Encode(nil)
	if err != nil {
		return err
	}
	if _, err := conn.Write(msg); err != nil {
		return err
	}
	_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, _ = io.Copy(io.Discard, conn)
	return nil
}
