package inject

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Values of the result label of keygate_credential_fetches_total.
const (
	ResultOK       = "ok"
	ResultError    = "error"
	ResultCacheHit = "cache_hit"
)

// Metrics holds the credential metrics of DESIGN.md §8. A nil *Metrics
// records nothing. Labels carry the credential's config name only, never a
// value or an identity.
type Metrics struct {
	fetches  *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

// NewMetrics creates and registers
//
//	keygate_credential_fetches_total{credential,result}   result: ok, error, cache_hit
//	keygate_credential_fetch_duration_seconds{credential}  time spent in the source
//
// A nil reg registers nothing. If reg already holds these collectors (a
// config reload building a second set), the registered ones are reused.
// Any other registration failure is a programming error and panics, like
// prometheus.MustRegister.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		fetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keygate_credential_fetches_total",
			Help: "Credential requests by credential name and result: ok (the source was called and succeeded), error (the request failed), cache_hit (served from the cache or a shared in-flight fetch).",
		}, []string{"credential", "result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "keygate_credential_fetch_duration_seconds",
			Help:    "Time spent in a credential source call (cache hits excluded).",
			Buckets: prometheus.DefBuckets,
		}, []string{"credential"}),
	}
	if reg != nil {
		m.fetches = register(reg, m.fetches)
		m.duration = register(reg, m.duration)
	}
	return m
}

func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
		panic("inject: registering credential metrics: " + err.Error())
	}
	return c
}

// init creates the series for one credential so dashboards see zeros
// before the first request.
func (m *Metrics) init(credential string) {
	if m == nil {
		return
	}
	for _, r := range []string{ResultOK, ResultError, ResultCacheHit} {
		m.fetches.WithLabelValues(credential, r)
	}
	m.duration.WithLabelValues(credential)
}

func (m *Metrics) count(credential, result string) {
	if m == nil {
		return
	}
	m.fetches.WithLabelValues(credential, result).Inc()
}

func (m *Metrics) observe(credential string, d time.Duration) {
	if m == nil {
		return
	}
	m.duration.WithLabelValues(credential).Observe(d.Seconds())
}
