package inject

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"maps"
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
	// Clock decides every expiry; nil means the wall clock.
	Clock broker.Clock
	// Metrics may be nil.
	Metrics *Metrics
	// MaxEntries bounds the cache; the oldest entry is evicted first.
	// 0 or negative means DefaultMaxEntries.
	MaxEntries int
	// FetchTimeout bounds one shared source call (see NewCache).
	// 0 or negative means DefaultFetchTimeout (30s).
	FetchTimeout time.Duration
}

// NewCache wraps src with a per-caller credential cache.
//
// Rules (also in doc.go):
//   - Key: the credential, the rule, every part of the identity and every
//     grant parameter, each length-prefixed so no two different callers or
//     grants share a key, plus broker.Grant.CacheKey. Two identities never
//     share an entry.
//   - An entry lives min(TTL, Expires-Margin). Every hit is checked against
//     the Clock; an expired credential is never served, and a credential the
//     source returns already expired is an error.
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
//   - Every caller gets its own copy of Fields and Meta.
//
// With TTL <= 0 the returned Source calls src every time and only adds
// metrics and the expiry check.
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
	o.Metrics.init(name)
	f := fetcher{name: name, src: src, clock: o.Clock, metrics: o.Metrics, timeout: o.FetchTimeout}
	if o.TTL <= 0 {
		return &passthrough{f: f}
	}
	return &cache{
		f:       f,
		ttl:     o.TTL,
		margin:  o.Margin,
		max:     o.MaxEntries,
		entries: make(map[string]*list.Element),
		order:   list.New(),
	}
}

// fetcher makes one source call with timing, panic containment and the
// expiry check.
type fetcher struct {
	name    string
	src     broker.Source
	clock   broker.Clock
	metrics *Metrics
	timeout time.Duration
}

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

type cache struct {
	f      fetcher
	ttl    time.Duration
	margin time.Duration
	max    int
	sf     singleflight.Group

	mu      sync.Mutex
	entries map[string]*list.Element // of *entry
	order   *list.List               // insertion order, oldest first
}

type entry struct {
	key   string
	cred  broker.Credential // private copy; Release is always nil
	until time.Time
}

// flight is what one singleflight call shares with its waiters.
type flight struct {
	cred    broker.Credential
	hit     bool // found in the cache by the re-check
	private bool // has Release: handed to the caller whose call ran, in its handoff
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
	if cred, ok := c.lookup(key, c.f.clock.Now()); ok {
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
		if cred, ok := c.lookup(key, c.f.clock.Now()); ok {
			return flight{cred: cred, hit: true}, nil
		}
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.f.timeout)
		defer cancel()
		cred, err := c.f.fetch(fctx, id, g)
		if err != nil {
			return nil, err
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
		c.store(key, cred, c.f.clock.Now())
		return flight{cred: cred}, nil
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
			cred, err := c.f.fetch(ctx, id, g)
			if err != nil {
				c.f.metrics.count(c.f.name, ResultError)
				return broker.Credential{}, err
			}
			c.f.metrics.count(c.f.name, ResultOK)
			return cred, nil
		}
		if fl.cred.Expired(c.f.clock.Now()) {
			c.f.metrics.count(c.f.name, ResultError)
			return broker.Credential{}, fmt.Errorf("inject: credential %q: %w", c.f.name, ErrExpired)
		}
		if ran && !fl.hit {
			c.f.metrics.count(c.f.name, ResultOK)
		} else {
			c.f.metrics.count(c.f.name, ResultCacheHit)
		}
		return cloneCred(fl.cred), nil
	}
}

// lookup returns a copy of a live entry, dropping it if it is stale.
func (c *cache) lookup(key string, now time.Time) (broker.Credential, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.entries[key]
	if !ok {
		return broker.Credential{}, false
	}
	e := el.Value.(*entry)
	if !now.Before(e.until) || e.cred.Expired(now) {
		c.order.Remove(el)
		delete(c.entries, key)
		return broker.Credential{}, false
	}
	return cloneCred(e.cred), true
}

// store keeps a private copy of cred until min(now+TTL, Expires-Margin).
// A credential already inside its margin is not stored (but still used by
// the callers of this flight, since it has not expired).
func (c *cache) store(key string, cred broker.Credential, now time.Time) {
	until := now.Add(c.ttl)
	if !cred.Expires.IsZero() {
		if x := cred.Expires.Add(-c.margin); x.Before(until) {
			until = x
		}
	}
	if !now.Before(until) {
		return
	}
	e := &entry{key: key, cred: cloneCred(cred), until: until}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[key]; ok {
		el.Value = e
		c.order.MoveToBack(el)
		return
	}
	for c.order.Len() >= c.max {
		oldest := c.order.Front()
		c.order.Remove(oldest)
		delete(c.entries, oldest.Value.(*entry).key)
	}
	c.entries[key] = c.order.PushBack(e)
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
