package intercept

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/broker/internal/broker"
)

// Limit defaults (docs/configuration.md, limits).
const (
	DefaultMaxTunnels         = 2048
	DefaultLeafMintsPerSecond = 50
	DefaultMaxHeaderCount     = 200
	// mintBuckets bounds the per-identity leaf-mint buckets kept at once.
	mintBuckets = 10000
	// mintSweepEvery is how often idle (full) buckets are dropped.
	mintSweepEvery = time.Minute
	// mintRecent is how long a name an identity was charged for is not
	// charged again: concurrent first CONNECTs to one name share a mint
	// (the leaf cache mints once), so they cost one token.
	mintRecent = 5 * time.Second
)

// TunnelCap bounds the tunnels open at once, of every kind: intercepted
// and opaque CONNECT tunnels and redirected (transparent) connections. Each
// holds a socket pair, goroutines and buffers for as long as the workload
// likes, so without a cap a workload can exhaust the broker's file
// descriptors (SECURITY-TESTS L-05, T-E3). One TunnelCap is shared by
// every listener of a broker. It is safe for concurrent use.
type TunnelCap struct {
	max   int64
	open  atomic.Int64
	gauge prometheus.Gauge // keygate_tunnels_open; may be nil
}

// NewTunnelCap returns a cap of max open tunnels (DefaultMaxTunnels when
// max <= 0) that reports the open count on gauge (may be nil).
func NewTunnelCap(max int, gauge prometheus.Gauge) *TunnelCap {
	if max <= 0 {
		max = DefaultMaxTunnels
	}
	return &TunnelCap{max: int64(max), gauge: gauge}
}

// acquire takes a slot. release gives it back; it is idempotent, so it can
// be deferred and also called early.
func (c *TunnelCap) acquire() (release func(), ok bool) {
	if c.open.Add(1) > c.max {
		c.open.Add(-1)
		return nil, false
	}
	if c.gauge != nil {
		c.gauge.Inc()
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			c.open.Add(-1)
			if c.gauge != nil {
				c.gauge.Dec()
			}
		})
	}, true
}

// Open is the number of tunnels open now.
func (c *TunnelCap) Open() int { return int(c.open.Load()) }

// Max is the cap.
func (c *TunnelCap) Max() int { return int(c.max) }

// Tunnels is the tunnel cap this proxy draws on (shared when Options.Tunnels
// was set).
func (p *Proxy) Tunnels() *TunnelCap { return p.tunnels }

// errTunnelLimit is what the workload sees past the cap: retry shortly.
func errTunnelLimit() *broker.Error {
	return &broker.Error{Code: broker.CodeTunnelLimit, Message: "the broker has too many open tunnels; retry later",
		RetryAfter: time.Second}
}

// MintLimiter limits, per caller identity, how fast MITM leaf certificates
// are minted: each mint is an ECDSA key generation and a signature, so a
// rule allowing a wildcard would otherwise let one workload spend the
// broker's CPU on random names (SECURITY-TESTS L-08). A token bucket per
// identity refills at perSecond up to burst. Leaves served from the cache
// cost nothing and are not counted, nor are repeated CONNECTs to a name
// charged within mintRecent (they share one mint; at most burst such names
// are remembered per identity). The number of buckets is bounded:
// full (idle) buckets are swept every minute and, past mintBuckets active
// identities, an arbitrary one is dropped (it restarts with a full
// bucket), so memory stays bounded whatever the number of identities.
// It is safe for concurrent use.
type MintLimiter struct {
	rate  float64 // tokens per second
	burst float64
	clock broker.Clock

	mu        sync.Mutex
	buckets   map[string]*mintBucket
	lastSweep time.Time
}

type mintBucket struct {
	tokens float64
	last   time.Time
	recent map[string]time.Time // names charged, when
}

// NewMintLimiter returns a limiter of perSecond mints per identity with a
// burst of burst (defaults: DefaultLeafMintsPerSecond, and burst =
// perSecond).
func NewMintLimiter(perSecond, burst int, clock broker.Clock) *MintLimiter {
	if perSecond <= 0 {
		perSecond = DefaultLeafMintsPerSecond
	}
	if burst <= 0 {
		burst = perSecond
	}
	if clock == nil {
		clock = broker.SystemClock{}
	}
	return &MintLimiter{rate: float64(perSecond), burst: float64(burst), clock: clock,
		buckets: map[string]*mintBucket{}, lastSweep: clock.Now()}
}

// Allow takes one mint token for the identity's new leaf for host,
// reporting false (take nothing) when its bucket is empty. A host charged
// within mintRecent is allowed free.
func (l *MintLimiter) Allow(id broker.Identity, host string) bool {
	key := id.Method + "\x00" + id.TrustDomain + "\x00" + id.ID
	now := l.clock.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.lastSweep) >= mintSweepEvery {
		l.sweep(now)
	}
	b, ok := l.buckets[key]
	if !ok {
		if len(l.buckets) >= mintBuckets {
			l.sweep(now)
			for k := range l.buckets {
				if len(l.buckets) < mintBuckets {
					break
				}
				delete(l.buckets, k)
			}
		}
		b = &mintBucket{tokens: l.burst, last: now}
		l.buckets[key] = b
	}
	l.refill(b, now)
	if t, ok := b.recent[host]; ok && now.Sub(t) < mintRecent {
		return true
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	l.remember(b, host, now)
	return true
}

// remember records host as charged, keeping at most burst names.
func (l *MintLimiter) remember(b *mintBucket, host string, now time.Time) {
	if b.recent == nil {
		b.recent = map[string]time.Time{}
	}
	if len(b.recent) >= int(l.burst) {
		for k, t := range b.recent {
			if now.Sub(t) >= mintRecent {
				delete(b.recent, k)
			}
		}
		if len(b.recent) >= int(l.burst) {
			return // all recent: this name is simply charged again next time
		}
	}
	b.recent[host] = now
}

func (l *MintLimiter) refill(b *mintBucket, now time.Time) {
	if el := now.Sub(b.last).Seconds(); el > 0 {
		b.tokens = min(l.burst, b.tokens+el*l.rate)
	}
	b.last = now
}

// sweep drops buckets that are full again: forgetting them changes nothing.
func (l *MintLimiter) sweep(now time.Time) {
	l.lastSweep = now
	for k, b := range l.buckets {
		l.refill(b, now)
		if b.tokens >= l.burst {
			delete(l.buckets, k)
		}
	}
}

// size is the number of buckets held (for tests).
func (l *MintLimiter) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.buckets)
}

// leafCacher is implemented by leaf sources that can tell whether a host's
// leaf is cached (ca.LeafCache): only a mint is rate limited.
type leafCacher interface{ Cached(host string) bool }

// admitMint refuses, before anything is minted, an interception whose leaf
// is not cached when the caller's mint budget is spent.
func (p *Proxy) admitMint(id broker.Identity, host string) error {
	if lc, ok := p.opts.Leaves.(leafCacher); ok && lc.Cached(host) {
		return nil
	}
	if p.mints.Allow(id, host) {
		return nil
	}
	return &broker.Error{Code: broker.CodeRateLimited, Message: "too many new TLS interception names for this caller; retry later",
		RetryAfter: time.Second}
}
