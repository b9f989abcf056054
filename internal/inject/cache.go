package inject

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/keygate/broker/internal/broker"
)

// Cache defaults.
const (
	DefaultMargin       = 30 * time.Second
	DefaultMaxEntries   = 10000
	DefaultFetchTimeout = 30 * time.Second
)

// ErrExpired is wrapped when a source hands out a credential that is
// already expired, or one expires while a caller waits for it.
var ErrExpired = errors.New("credential has expired")

// CacheOptions configure NewCache.
type CacheOptions struct {
	// TTL bounds how long a credential is reused. 0 (or negative) means
	// "cache: none": every call goes to the source.
	TTL time.Duration
	// Margin: an entry is dropped this long before Credential.Expires.
	// 0 means DefaultMargin (30s); a negative value means no margin.
	Margin time.Duration
	// Clock decides every expiry; nil means the wall clock. Expiry is
	// judged twice, on the Clock's wall time and on the time elapsed since
	// the credential was fetched (see Monotonic), and a credential is
	// expired as soon as either says so.
	Clock broker.Clock
	// Metrics may be nil.
	Metrics *Metrics
	// MaxEntries bounds the cache; the oldest entry is evicted first.
	// 0 or negative means DefaultMaxEntries.
	MaxEntries int
	// FetchTimeout bounds one shared source call (see NewCache).
	// 0 or negative means DefaultFetchTimeout (30s).
	FetchTimeout time.Duration
	// ShareLeases makes the cache store and share credentials that have a
	// Release (Vault leases) like any other credential. The cache then owns
	// the source's Release: every caller receives a Release that only ends
	// its own use, and the source's Release runs exactly once, when the
	// entry has left the cache (expiry, eviction, replacement, Close) and
	// the last caller holding it has called its Release. Without
	// ShareLeases such credentials are one-shot (see NewCache).
	ShareLeases bool
	// Renew, with ShareLeases, extends a stored lease in place and returns
	// its new expiry. A hit that finds a lease past half of its current
	// lifetime, and whose expiry (minus Margin) would end the entry before
	// its TTL does, starts one background Renew; the hit itself is served
	// at once. On success the entry lives until min(stored+TTL,
	// new expiry-Margin); after an error, or a renewal that does not extend
	// the lease (max TTL reached), the entry is not renewed again and ends
	// as it would have.
	Renew func(ctx context.Context, c broker.Credential) (time.Time, error)
	// Refresh, when positive, replaces a stored credential (one without a
	// Release) in the background once a hit finds it within Refresh of its
	// Expires; the old one keeps being served until its Margin, so a
	// backend outage during the refresh window costs nothing. A failed
	// refresh is retried by a hit at most every refreshRetry.
	Refresh time.Duration
}

// RefreshHinter is implemented by sources whose credentials need a larger
// margin or an early refresh than the cache's options give (aws_sts:
// STSMargin, STSRefresh). NewCache takes the larger of each.
type RefreshHinter interface {
	CacheHints() (margin, refresh time.Duration)
}

// refreshRetry spaces background refresh attempts after a failure.
const refreshRetry = 30 * time.Second

// Monotonic is implemented by a Clock that also has a monotonic reading:
// the time elapsed since a fixed, arbitrary origin, which follows real
// time and never moves when the wall clock is stepped. The cache measures
// how long it has held a credential with it, so a wall clock stepped back
// (F-17) cannot stretch a credential past its true lifetime. A Clock
// without it is read through the monotonic reading its Now carries
// (time.Now's does, so broker.SystemClock needs nothing); for a Clock whose
// times carry none the elapsed time is its wall clock's, as before.
type Monotonic interface {
	Monotonic() time.Duration
}

// monoOrigin anchors readings of clocks that are not Monotonic: it carries
// time.Now's monotonic reading, so t.Sub(monoOrigin) does too when t does.
var monoOrigin = time.Now()

// instant is one reading of the cache's clock, in both senses.
type instant struct {
	wall time.Time     // no monotonic reading: compared as wall time
	mono time.Duration // never steps (see Monotonic)
}

// deadline is a moment judged in both senses; it has passed as soon as
// either clock reaches it. The zero deadline never passes.
type deadline instant

// at returns the deadline for the wall time w, judged at i: w itself, and
// i.mono plus the lifetime w-i.wall that i's wall clock gives it.
func (i instant) at(w time.Time) deadline {
	return deadline{wall: w, mono: addSat(i.mono, w.Sub(i.wall))}
}

// after returns the deadline d from i.
func (i instant) after(d time.Duration) deadline {
	return deadline{wall: i.wall.Add(d), mono: addSat(i.mono, d)}
}

func (d deadline) passed(now instant) bool {
	return !d.wall.IsZero() && (!now.wall.Before(d.wall) || now.mono >= d.mono)
}

// earlier returns the earlier of d and o in each sense.
func (d deadline) earlier(o deadline) deadline {
	if o.wall.Before(d.wall) {
		d.wall = o.wall
	}
	d.mono = min(d.mono, o.mono)
	return d
}

// addSat adds without overflowing: a credential that expires in the year
// 9999 must not wrap around to "already expired".
func addSat(a, b time.Duration) time.Duration {
	switch {
	case b > 0 && a > math.MaxInt64-b:
		return math.MaxInt64
	case b < 0 && a < math.MinInt64-b:
		return math.MinInt64
	}
	return a + b
}

// read takes one reading of clock; mono is its Monotonic reading when it
// has one (nil: derive it from Now). A Monotonic clock is read first:
// time passing between the two reads then shortens the lifetimes judged
// at this instant, never lengthens them.
func read(clock broker.Clock, mono Monotonic) instant {
	if mono != nil {
		m := mono.Monotonic()
		return instant{wall: clock.Now().Round(0), mono: m}
	}
	t := clock.Now()
	return instant{wall: t.Round(0), mono: t.Sub(monoOrigin)}
}

// Closer is implemented by sources that hold something until they are
// closed: the cache (stored leases) and the Vault connection (its login).
type Closer interface {
	Close(ctx context.Context) error
}

// NewCache wraps src with a per-caller credential cache.
//
// Rules (also in doc.go):
//   - Key: the credential, the rule, every part of the identity and every
//     grant parameter, each length-prefixed so no two different callers or
//     grants share a key, plus broker.Grant.CacheKey. Two identities never
//     share an entry.
//   - An entry lives min(TTL, Expires-Margin). Every hit is checked against
//     the Clock, by its wall time and by the monotonic time since the fetch
//     (see Monotonic; either one ends the entry); an expired credential is
//     never served, and a credential the source returns already expired is
//     an error.
//   - Errors are never cached.
//   - Concurrent misses for one key make one source call (singleflight).
//     The source call runs under a context detached from the callers'
//     cancellation (it keeps the first caller's values) and bounded by
//     FetchTimeout, so one caller giving up does not fail the others; a
//     caller that gives up returns its own ctx error at once.
//   - A credential with Release set (a one-shot lease) is never cached nor
//     shared: the caller whose call reached the source gets it, and every
//     other waiter makes its own source call. If that caller gave up, the
//     lease is released at once.
//   - With ShareLeases, credentials with Release are cached and shared too,
//     and their Release runs once they have left the cache and are no
//     longer used (see CacheOptions.ShareLeases and Renew).
//   - Every caller gets its own copy of Fields and Meta.
//
// With TTL <= 0 the returned Source calls src every time and only adds
// metrics and the expiry check. The returned Source implements Closer:
// Close empties the cache, releases every stored lease (waiting until ctx
// ends for leases still in use, then releasing them anyway) and turns the
// cache into a pass-through.
func NewCache(name string, src broker.Source, o CacheOptions) broker.Source {
	if o.Clock == nil {
		o.Clock = broker.SystemClock{}
	}
	switch {
	case o.Margin == 0:
		o.Margin = DefaultMargin
	case o.Margin < 0:
		o.Margin = 0
	}
	if o.MaxEntries <= 0 {
		o.MaxEntries = DefaultMaxEntries
	}
	if o.FetchTimeout <= 0 {
		o.FetchTimeout = DefaultFetchTimeout
	}
	if h, ok := src.(RefreshHinter); ok {
		m, r := h.CacheHints()
		o.Margin, o.Refresh = max(o.Margin, m), max(o.Refresh, r)
	}
	o.Metrics.init(name)
	f := fetcher{name: name, src: src, clock: o.Clock, metrics: o.Metrics, timeout: o.FetchTimeout}
	f.mono, _ = o.Clock.(Monotonic)
	if o.TTL <= 0 {
		return &passthrough{f: f}
	}
	return &cache{
		f:        f,
		ttl:      o.TTL,
		margin:   o.Margin,
		max:      o.MaxEntries,
		share:    o.ShareLeases,
		renew:    o.Renew,
		refresh:  o.Refresh,
		entries:  make(map[string]*list.Element),
		order:    list.New(),
		draining: make(map[*entry]struct{}),
	}
}

// fetcher makes one source call with timing, panic containment and the
// expiry check.
type fetcher struct {
	name    string
	src     broker.Source
	clock   broker.Clock
	mono    Monotonic // o.Clock's, if it has one
	metrics *Metrics
	timeout time.Duration
}

// now reads the clock in both senses.
func (f *fetcher) now() instant { return read(f.clock, f.mono) }

func (f *fetcher) fetch(ctx context.Context, id broker.Identity, g broker.Grant) (c broker.Credential, err error) {
	start := time.Now()
	defer func() {
		f.metrics.observe(f.name, time.Since(start))
		if p := recover(); p != nil {
			// The panic value is not printed: it may hold anything.
			c, err = broker.Credential{}, fmt.Errorf("inject: credential %q: source panicked", f.name)
		}
	}()
	if f.src == nil {
		return broker.Credential{}, fmt.Errorf("inject: credential %q: no source", f.name)
	}
	c, err = f.src.Credential(ctx, id, g)
	if err != nil {
		return broker.Credential{}, fmt.Errorf("inject: credential %q: %w", f.name, err)
	}
	if c.Name == "" {
		c.Name = f.name
	}
	if c.Expired(f.clock.Now()) {
		f.release(c)
		return broker.Credential{}, fmt.Errorf("inject: credential %q: source returned an expired credential: %w", f.name, ErrExpired)
	}
	return c, nil
}

// release revokes a credential nobody will use.
func (f *fetcher) release(c broker.Credential) {
	if c.Release == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), f.timeout)
	defer cancel()
	c.Release(ctx)
}

// passthrough is "cache: none".
type passthrough struct{ f fetcher }

func (p *passthrough) Credential(ctx context.Context, id broker.Identity, g broker.Grant) (broker.Credential, error) {
	c, err := p.f.fetch(ctx, id, g)
	if err != nil {
		p.f.metrics.count(p.f.name, ResultError)
		return broker.Credential{}, err
	}
	p.f.metrics.count(p.f.name, ResultOK)
	return c, nil
}

// Close implements Closer; "cache: none" holds nothing.
func (p *passthrough) Close(context.Context) error { return nil }

type cache struct {
	f      fetcher
	ttl    time.Duration
	margin time.Duration
	max    int
	share  bool
	renew  func(ctx context.Context, c broker.Credential) (time.Time, error)
	// refresh: see CacheOptions.Refresh.
	refresh time.Duration
	sf      singleflight.Group

	mu       sync.Mutex
	entries  map[string]*list.Element // of *entry
	order    *list.List               // insertion order, oldest first
	closed   bool
	draining map[*entry]struct{} // leases out of the cache, still in use
	drained  chan struct{}       // closed when draining empties during Close
	bg       sync.WaitGroup      // releases and renewals running; Add under mu
}

type entry struct {
	key   string
	cred  broker.Credential // private copy; Release is always nil
	until deadline          // min(stored+TTL, Expires-Margin)
	exp   deadline          // Expires judged when stored or renewed; zero: none

	// Early refresh (CacheOptions.Refresh), entries without a lease only:
	// the caller and grant that made it, whether a refresh is running, and
	// when one may start again after a failure.
	id         broker.Identity
	grant      broker.Grant
	refreshing bool
	retryAt    deadline // zero: no backoff

	// Shared leases only (release != nil).
	release   func(context.Context) // the source's Release; run exactly once
	ttlEnd    deadline              // stored+TTL: renewals never extend past it
	renewedAt instant               // start of the lease's current lifetime
	refs      int                   // callers holding the credential
	evicted   bool                  // out of entries (maybe still in use)
	released  bool                  // release has been started
	renewing  bool
	noRenew   bool // a renewal failed or did not extend the lease
}

// flight is what one singleflight call shares with its waiters.
type flight struct {
	cred    broker.Credential
	exp     deadline // cred.Expires, judged when fetched
	ent     *entry   // a shared lease: each waiter takes its own hold
	hit     bool     // found in the cache by the re-check
	private bool     // has Release: handed to the caller whose call ran, in its handoff
}

// handoff carries a one-shot credential from the source call to the one
// caller allowed to use it, or releases it when that caller is gone.
type handoff struct {
	mu   sync.Mutex
	ran  bool // this caller's function made the flight
	gone bool
	cred *broker.Credential
}

func (c *cache) Credential(ctx context.Context, id broker.Identity, g broker.Grant) (broker.Credential, error) {
	key := cacheKey(id, g)
	if cred, _, _, ok := c.lookup(key, c.f.now(), true); ok {
		c.f.metrics.count(c.f.name, ResultCacheHit)
		return cred, nil
	}
	h := &handoff{}
	ch := c.sf.DoChan(key, func() (any, error) {
		h.mu.Lock()
		h.ran = true
		h.mu.Unlock()
		// A flight that ended between our lookup and DoChan may have filled
		// the entry already.
		if cred, e, exp, ok := c.lookup(key, c.f.now(), false); ok {
			return flight{cred: cred, exp: exp, ent: e, hit: true}, nil
		}
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.f.timeout)
		defer cancel()
		before := c.f.now()
		cred, err := c.f.fetch(fctx, id, g)
		if err != nil {
			return nil, err
		}
		now := c.f.now()
		exp := expiry(before, now, cred.Expires)
		if cred.Release != nil && c.share {
			if e := c.store(key, cred, before, now, id, g); e != nil {
				cred.Release = nil
				return flight{cred: cred, exp: exp, ent: e}, nil
			}
			// Not stored (inside its margin, or the cache is closed): one-shot.
		}
		if cred.Release != nil {
			h.mu.Lock()
			gone := h.gone
			if !gone {
				h.cred = &cred
			}
			h.mu.Unlock()
			if gone {
				c.f.release(cred)
			}
			return flight{private: true}, nil
		}
		c.store(key, cred, before, now, id, g)
		return flight{cred: cred, exp: exp}, nil
	})

	select {
	case <-ctx.Done():
		h.mu.Lock()
		h.gone = true
		orphan := h.cred
		h.cred = nil
		h.mu.Unlock()
		if orphan != nil {
			c.f.release(*orphan)
		}
		c.f.metrics.count(c.f.name, ResultError)
		return broker.Credential{}, fmt.Errorf("inject: credential %q: %w", c.f.name, ctx.Err())
	case res := <-ch:
		if res.Err != nil {
			c.f.metrics.count(c.f.name, ResultError)
			return broker.Credential{}, res.Err
		}
		fl := res.Val.(flight)
		h.mu.Lock()
		ran, mine := h.ran, h.cred
		h.cred = nil
		h.mu.Unlock()
		if fl.private {
			if mine != nil {
				c.f.metrics.count(c.f.name, ResultOK)
				return *mine, nil
			}
			// Someone else's one-shot lease: get our own.
			return c.own(ctx, id, g)
		}
		if fl.exp.passed(c.f.now()) {
			c.f.metrics.count(c.f.name, ResultError)
			return broker.Credential{}, fmt.Errorf("inject: credential %q: %w", c.f.name, ErrExpired)
		}
		out := cloneCred(fl.cred)
		if fl.ent != nil {
			rel, ok := c.acquire(fl.ent)
			if !ok {
				// The shared lease left the cache before we took it.
				return c.own(ctx, id, g)
			}
			out.Release = rel
		}
		if ran && !fl.hit {
			c.f.metrics.count(c.f.name, ResultOK)
		} else {
			c.f.metrics.count(c.f.name, ResultCacheHit)
		}
		return out, nil
	}
}

// own makes this caller's own source call; a lease it returns is one-shot.
func (c *cache) own(ctx context.Context, id broker.Identity, g broker.Grant) (broker.Credential, error) {
	cred, err := c.f.fetch(ctx, id, g)
	if err != nil {
		c.f.metrics.count(c.f.name, ResultError)
		return broker.Credential{}, err
	}
	c.f.metrics.count(c.f.name, ResultOK)
	return cred, nil
}

// lookup returns a copy of a live entry and its expiry, dropping it if it
// is stale. For a shared lease, hold takes a hold for the caller (the
// copy's Release ends it) and may start a renewal; without hold the entry
// is returned for acquire.
func (c *cache) lookup(key string, now instant, hold bool) (broker.Credential, *entry, deadline, bool) {
	c.mu.Lock()
	el, ok := c.entries[key]
	if !ok {
		c.mu.Unlock()
		return broker.Credential{}, nil, deadline{}, false
	}
	e := el.Value.(*entry)
	if e.until.passed(now) || e.exp.passed(now) {
		done := c.evictLocked(el)
		c.mu.Unlock()
		c.dispose(done)
		return broker.Credential{}, nil, deadline{}, false
	}
	cred, exp := cloneCred(e.cred), e.exp
	if e.release == nil {
		refresh := c.wantsRefreshLocked(e, now)
		if refresh {
			e.refreshing = true
			c.bg.Add(1)
		}
		c.mu.Unlock()
		if refresh {
			go c.refreshEntry(e)
		}
		return cred, nil, exp, true
	}
	if !hold {
		c.mu.Unlock()
		return cred, e, exp, true
	}
	cred.Release = c.holdLocked(e)
	renew := c.renew != nil && !e.renewing && !e.noRenew && c.wantsRenewal(e, now)
	if renew {
		e.renewing = true
		c.bg.Add(1)
	}
	c.mu.Unlock()
	if renew {
		go c.renewEntry(e, cloneCred(cred))
	}
	return cred, nil, exp, true
}

// wantsRefreshLocked: early refresh is on, the credential has an expiry
// and is inside the refresh window, and no refresh is running or backing
// off.
func (c *cache) wantsRefreshLocked(e *entry, now instant) bool {
	return c.refresh > 0 && !c.closed && !e.refreshing && !e.cred.Expires.IsZero() &&
		e.exp.before(c.refresh).passed(now) && (e.retryAt.wall.IsZero() || e.retryAt.passed(now))
}

// refreshEntry fetches a replacement for e in the background; on success
// the new credential replaces e, on failure e keeps serving until its
// margin and a later hit tries again after refreshRetry.
func (c *cache) refreshEntry(e *entry) {
	defer c.bg.Done()
	ctx, cancel := context.WithTimeout(context.Background(), c.f.timeout)
	before := c.f.now()
	cred, err := c.f.fetch(ctx, e.id, e.grant)
	cancel()
	if err == nil && cred.Release != nil {
		// A lease is never stored by a refresh (leases renew instead).
		c.f.release(cred)
		err = errors.New("refresh returned a lease")
	}
	now := c.f.now()
	if err == nil {
		c.mu.Lock()
		el, ok := c.entries[e.key]
		current := ok && el.Value.(*entry) == e
		c.mu.Unlock()
		if current && c.store(e.key, cred, before, now, e.id, e.grant) != nil {
			return
		}
	}
	c.mu.Lock()
	e.refreshing = false
	e.retryAt = now.after(refreshRetry)
	c.mu.Unlock()
}

// wantsRenewal: past half of the lease's current lifetime (by either
// clock), and the lease (not the TTL) is what would end the entry.
func (c *cache) wantsRenewal(e *entry, now instant) bool {
	if e.cred.Expires.IsZero() {
		return false
	}
	end := e.exp.before(c.margin)
	if !end.wall.Before(e.ttlEnd.wall) && end.mono >= e.ttlEnd.mono {
		return false
	}
	held := max(now.wall.Sub(e.renewedAt.wall), now.mono-e.renewedAt.mono)
	return held >= e.cred.Expires.Sub(e.renewedAt.wall)/2
}

func (c *cache) renewEntry(e *entry, cred broker.Credential) {
	defer c.bg.Done()
	cred.Release = nil
	ctx, cancel := context.WithTimeout(context.Background(), c.f.timeout)
	before := c.f.now()
	exp, err := c.renew(ctx, cred)
	cancel()
	now := c.f.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	e.renewing = false
	// Whether the lease got longer is judged on held time: after the wall
	// clock was stepped back, a real extension has an earlier wall expiry.
	next := expiry(before, now, exp)
	if err != nil || next.mono <= e.exp.mono {
		e.noRenew = true
		return
	}
	e.cred.Expires = exp
	e.renewedAt = now
	e.exp = next
	e.until = e.ttlEnd.earlier(e.exp.before(c.margin))
}

// acquire takes a hold on a shared lease unless it was already released.
func (c *cache) acquire(e *entry) (func(context.Context), bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e.released {
		return nil, false
	}
	return c.holdLocked(e), true
}

// holdLocked counts one more user of e and returns the Release that ends
// that use (idempotent).
func (c *cache) holdLocked(e *entry) func(context.Context) {
	e.refs++
	var once sync.Once
	return func(context.Context) { once.Do(func() { c.unhold(e) }) }
}

func (c *cache) unhold(e *entry) {
	c.mu.Lock()
	e.refs--
	var done *entry
	if e.evicted && e.refs == 0 && !e.released {
		done = c.releaseLocked(e)
	}
	c.mu.Unlock()
	c.dispose(done)
}

// evictLocked removes an entry from the cache; a lease nobody holds is
// returned for dispose.
func (c *cache) evictLocked(el *list.Element) *entry {
	e := el.Value.(*entry)
	c.order.Remove(el)
	delete(c.entries, e.key)
	return c.retireLocked(e)
}

// retireLocked marks an entry that left the cache (evicted or replaced).
func (c *cache) retireLocked(e *entry) *entry {
	if e.release == nil {
		return nil
	}
	e.evicted = true
	if e.refs > 0 {
		c.draining[e] = struct{}{}
		return nil
	}
	return c.releaseLocked(e)
}

func (c *cache) releaseLocked(e *entry) *entry {
	e.released = true
	// Add before Close can wake up and Wait.
	c.bg.Add(1)
	delete(c.draining, e)
	if c.drained != nil && len(c.draining) == 0 {
		close(c.drained)
		c.drained = nil
	}
	return e
}

// dispose runs a lease's Release in the background (no request waits for
// a revocation), bounded by FetchTimeout.
func (c *cache) dispose(e *entry) {
	if e == nil {
		return
	}
	go func() {
		defer c.bg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), c.f.timeout)
		defer cancel()
		e.release(ctx)
	}()
}

// expiry is the deadline of a credential expiring at the wall time exp
// (zero: never), received from a call made between before and now. Its
// monotonic part is the earlier of the lifetimes judged at either end:
// a wall step while the call ran must not lengthen it (a step back makes
// the lifetime judged at now too long, a step forward ahead of the
// issuer's clock the one judged at before).
func expiry(before, now instant, exp time.Time) deadline {
	if exp.IsZero() {
		return deadline{}
	}
	d := now.at(exp)
	d.mono = min(d.mono, before.at(exp).mono)
	return d
}

// before returns the deadline d earlier (d's zero stays zero).
func (d deadline) before(by time.Duration) deadline {
	if d.wall.IsZero() {
		return d
	}
	return deadline{wall: d.wall.Add(-by), mono: addSat(d.mono, -by)}
}

// store keeps a private copy of cred, fetched between before and now,
// until min(now+TTL, Expires-Margin) and returns its entry. Both ends are
// kept in both senses (deadline): the wall clock stepping back later
// cannot keep the entry past the lifetime it had when stored. A credential already inside its margin is not
// stored (but still used by the callers of this flight, since it has not
// expired), nor is anything once the cache is closed.
func (c *cache) store(key string, cred broker.Credential, before, now instant, id broker.Identity, g broker.Grant) *entry {
	ttlEnd := now.after(c.ttl)
	exp := expiry(before, now, cred.Expires)
	until := ttlEnd
	if !cred.Expires.IsZero() {
		until = until.earlier(exp.before(c.margin))
	}
	if until.passed(now) {
		return nil
	}
	// With early refresh, keep what a refresh needs, and no more: the
	// request's path, query and headers are not retained (sources read the
	// target outside the cache, through WithParams, whose results are in
	// Params).
	e := &entry{key: key, cred: cloneCred(cred), until: until, exp: exp}
	if c.refresh > 0 {
		g.Target = broker.Target{Phase: g.Target.Phase, Protocol: g.Target.Protocol, Host: g.Target.Host, Port: g.Target.Port}
		e.id, e.grant = id, g
	}
	if c.refresh > 0 && exp.before(c.refresh).passed(now) {
		// Born inside its refresh window (a short lifetime, or this clock
		// is ahead of the issuer's, F-17): refreshing at once would fetch
		// the same again, back to back; wait refreshRetry as after a failure.
		e.retryAt = now.after(refreshRetry)
	}
	if cred.Release != nil {
		e.release, e.ttlEnd, e.renewedAt = cred.Release, ttlEnd, now
		e.cred.Release = nil
	}
	var out []*entry
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	if el, ok := c.entries[key]; ok {
		out = append(out, c.retireLocked(el.Value.(*entry)))
		el.Value = e
		c.order.MoveToBack(el)
	} else {
		for c.order.Len() >= c.max {
			out = append(out, c.evictLocked(c.order.Front()))
		}
		c.entries[key] = c.order.PushBack(e)
	}
	c.mu.Unlock()
	for _, o := range out {
		c.dispose(o)
	}
	return e
}

// Close implements Closer: it empties the cache, releases every stored
// lease nobody holds, waits until ctx ends for the leases still in use and
// then releases those too, and waits for the releases it started. Later
// calls pass through to the source without storing anything.
func (c *cache) Close(ctx context.Context) error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	var out []*entry
	for c.order.Len() > 0 {
		out = append(out, c.evictLocked(c.order.Front()))
	}
	var wait chan struct{}
	if len(c.draining) > 0 {
		wait = make(chan struct{})
		c.drained = wait
	}
	c.mu.Unlock()
	for _, e := range out {
		c.dispose(e)
	}
	var err error
	if wait != nil {
		select {
		case <-wait:
		case <-ctx.Done():
			err = ctx.Err()
			c.mu.Lock()
			var forced []*entry
			for e := range c.draining {
				forced = append(forced, c.releaseLocked(e))
			}
			c.mu.Unlock()
			for _, e := range forced {
				c.dispose(e)
			}
		}
	}
	if werr := waitCtx(ctx, &c.bg); err == nil {
		err = werr
	}
	return err
}

// cloneCred copies the maps so no caller can change another's view.
func cloneCred(c broker.Credential) broker.Credential {
	c.Fields = maps.Clone(c.Fields)
	c.Meta = maps.Clone(c.Meta)
	return c
}

// cacheKey is an injective encoding of everything that selects a
// credential: each part is length-prefixed, so values containing the
// separators of broker.Grant.CacheKey (NUL, '=') cannot make two different
// callers or grants collide. broker.Grant.CacheKey is appended so the key
// is never coarser than the shared definition, whatever it grows to cover.
func cacheKey(id broker.Identity, g broker.Grant) string {
	var b strings.Builder
	put := func(s string) {
		b.WriteString(strconv.Itoa(len(s)))
		b.WriteByte(':')
		b.WriteString(s)
	}
	put(g.Credential)
	put(g.Rule)
	put(id.Method)
	put(id.TrustDomain)
	put(id.ID)
	put(id.Delegator.Sub)
	keys := slices.Sorted(maps.Keys(g.Params))
	put(strconv.Itoa(len(keys)))
	for _, k := range keys {
		put(k)
		put(g.Params[k])
	}
	put(g.CacheKey(id))
	return b.String()
}

// waitCtx waits for wg, or until ctx ends (then it returns ctx's error):
// background renewals and releases must not hold a shutdown forever.
func waitCtx(ctx context.Context, wg *sync.WaitGroup) error {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
