package intercept

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
)

// exchange is one audited unit: a request, a CONNECT, or a tunnel. It is
// owned by one goroutine at a time (the handler, then goproxy's callbacks
// on the same goroutine), so it needs no lock.
type exchange struct {
	pipe     *broker.Pipeline // the snapshot this exchange is decided under
	rec      broker.Record
	start    time.Time
	identity broker.Identity
	cred     broker.Credential
	err      *broker.Error
	out      *statusWriter // the workload's response writer, set by forward
}

type exchangeKey struct{}

func withExchange(ctx context.Context, x *exchange) context.Context {
	return context.WithValue(ctx, exchangeKey{}, x)
}

func exchangeFrom(ctx context.Context) *exchange {
	x, _ := ctx.Value(exchangeKey{}).(*exchange)
	return x
}

func (p *Proxy) newExchange(listener string) *exchange {
	return &exchange{pipe: p.pipe.Load(), start: p.opts.Clock.Now(), rec: broker.Record{RequestID: broker.NewRequestID(), Listener: listener}}
}

func (x *exchange) setIdentity(id broker.Identity) {
	x.identity = id
	x.rec.Workload = id
	x.rec.Delegator = id.Delegator.Sub
}

// fail records err as the outcome. The first error wins: later ones are
// consequences.
func (x *exchange) fail(err error) *broker.Error {
	be := broker.AsError(err)
	if x.err == nil {
		x.err = be
		x.rec.Status = be.Status()
		if x.rec.Rule == "" {
			x.rec.Rule = be.Rule
		}
	}
	return be
}

func (p *Proxy) setCredential(x *exchange, c broker.Credential) {
	x.cred = c
	x.rec.CredName = c.Name
	x.rec.CredKind = c.Kind
	x.rec.CredFP = p.opts.Fingerprints.Fingerprint(c)
	x.rec.CredExpires = c.Expires
	x.rec.CredMeta = c.Meta
}

// finish releases the credential and writes the one audit line.
func (p *Proxy) finish(x *exchange) {
	if x.cred.Release != nil {
		p.release(x)
	}
	x.rec.Duration = p.opts.Clock.Now().Sub(x.start)
	if x.err != nil {
		x.rec.Error = x.cred.Redact(x.err.Code + ": " + x.err.Message + causeSuffix(x.err))
		if x.rec.Decision == "" {
			x.rec.Decision = broker.AuditDeny
		}
	}
	if x.rec.Decision == "" {
		x.rec.Decision = broker.AuditDeny
	}
	p.log.Info("decision", zap.Inline(&x.rec))
	if m := p.opts.Metrics; m != nil {
		m.Requests.WithLabelValues(x.rec.Decision, x.rec.Rule).Inc()
		m.Duration.Observe(x.rec.Duration.Seconds())
	}
}

// release runs the credential's Release with the same containment as a
// handler: finish runs after recoverPanic, so a panic here would reach
// net/http, which logs the panic value (it could hold the credential).
func (p *Proxy) release(x *exchange) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	defer func() {
		if v := recover(); v != nil {
			p.log.Error("panic while releasing a credential",
				zap.String("request_id", x.rec.RequestID),
				zap.String("panic_type", broker.PanicKind(v)),
				zap.Stack("stack"))
		}
	}()
	x.cred.Release(ctx)
}

func causeSuffix(e *broker.Error) string {
	if e.Err == nil {
		return ""
	}
	return " (" + e.Err.Error() + ")"
}

// recoverPanic contains a panic to the one exchange: the workload gets a 500
// if nothing was written yet, the log gets the stack but never the panic
// value (it could be anything, including a credential).
func (p *Proxy) recoverPanic(w *statusWriter, x *exchange) {
	v := recover()
	if v == nil {
		return
	}
	if v == http.ErrAbortHandler {
		panic(v)
	}
	p.log.Error("panic while handling a request",
		zap.String("request_id", x.rec.RequestID),
		zap.String("panic_type", broker.PanicKind(v)),
		zap.Stack("stack"))
	e := x.fail(broker.NewError(broker.CodeInternal, "internal error", nil))
	if w != nil && !w.wrote {
		writeError(w, e, x.rec.RequestID)
	}
}

// statusWriter records the status and the bytes sent to the workload.
type statusWriter struct {
	http.ResponseWriter
	status int
	n      int64
	wrote  bool
	// contentLength, when set, is restored on a response whose body the
	// scrubber wrapped (same length; goproxy drops the header).
	contentLength string
}

func (w *statusWriter) WriteHeader(code int) {
	if !w.wrote {
		w.status, w.wrote = code, true
		if w.contentLength != "" && code >= 200 && code != http.StatusNoContent && code != http.StatusNotModified &&
			w.Header().Get("Content-Length") == "" {
			w.Header().Set("Content-Length", w.contentLength)
		}
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if !w.wrote {
		w.status, w.wrote = http.StatusOK, true
	}
	n, err := w.ResponseWriter.Write(b)
	w.n += int64(n)
	return n, err
}

// ReadFrom keeps net/http's pooled copy path (io.Copy would otherwise
// allocate a 32 KiB buffer per response through this wrapper).
func (w *statusWriter) ReadFrom(r io.Reader) (int64, error) {
	if !w.wrote {
		w.status, w.wrote = http.StatusOK, true
	}
	var n int64
	var err error
	if rf, ok := w.ResponseWriter.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(r)
	} else {
		n, err = io.Copy(w.ResponseWriter, r)
	}
	w.n += n
	return n, err
}

// Unwrap lets http.ResponseController and goproxy reach Hijack and Flush.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *statusWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	h, ok := w.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, http.ErrNotSupported
	}
	w.wrote = true
	return h.Hijack()
}

// countingBody counts request body bytes sent upstream.
type countingBody struct {
	rc interface {
		Read([]byte) (int, error)
		Close() error
	}
	n *int64
}

func (b countingBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	*b.n += int64(n)
	return n, err
}

func (b countingBody) Close() error { return b.rc.Close() }
