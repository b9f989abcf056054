package canarytest

import (
	"bytes"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
)

// ZapCore is a zap core (debug level) whose entries, message and every
// field encoded as JSON, are Observed under source. Tee it with a core the
// test asserts on: zapcore.NewTee(observerCore, canarytest.ZapCore(src)).
func ZapCore(source string) zapcore.Core {
	return zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()),
		zapcore.AddSync(observeWriter(source)), zapcore.DebugLevel)
}

type observeWriter string

// Write is called once per encoded entry: each entry is one document.
func (w observeWriter) Write(p []byte) (int, error) {
	Observe(string(w), p)
	return len(p), nil
}

// Logger is a logger for t whose entries go to t.Log and to the sweep.
func Logger(t testing.TB) *zap.Logger {
	return zap.New(zapcore.NewTee(zaptest.NewLogger(t).Core(), ZapCore("zap log ("+t.Name()+")")))
}

// ObserveGatherer Observes the text exposition of every metric in g (names,
// label values, help): a metric label must never carry a secret.
func ObserveGatherer(source string, g prometheus.Gatherer) error {
	mfs, err := g.Gather()
	var b bytes.Buffer
	enc := expfmt.NewEncoder(&b, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if e := enc.Encode(mf); e != nil && err == nil {
			err = e
		}
	}
	Observe(source, b.Bytes())
	return err
}
