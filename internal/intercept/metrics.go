package intercept

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the request-path series of DESIGN.md §8.
type Metrics struct {
	Requests       *prometheus.CounterVec
	Duration       prometheus.Histogram
	AttestFailures *prometheus.CounterVec
	LeafCache      *prometheus.CounterVec
	Active         *prometheus.GaugeVec
	TunnelsOpen    prometheus.Gauge
}

// NewMetrics registers the series on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keygate_requests_total",
			Help: "Requests, tunnels and CONNECTs decided, by decision and rule.",
		}, []string{"decision", "rule"}),
		Duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "keygate_request_duration_seconds",
			Help:    "Time from request arrival to the last response byte.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		AttestFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keygate_attestation_failures_total",
			Help: "Callers whose evidence was rejected, by attestation method.",
		}, []string{"method"}),
		LeafCache: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keygate_mitm_leaf_cache_total",
			Help: "MITM leaf certificate lookups, by result (hit or mint).",
		}, []string{"result"}),
		Active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keygate_active_connections",
			Help: "Open workload connections, by listener.",
		}, []string{"listener"}),
		TunnelsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "keygate_tunnels_open",
			Help: "Open tunnels of every kind (intercepted, opaque, redirected), counted against limits.max_tunnels.",
		}),
	}
	reg.MustRegister(m.Requests, m.Duration, m.AttestFailures, m.LeafCache, m.Active, m.TunnelsOpen)
	return m
}
