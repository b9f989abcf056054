package inject

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keygate/broker/internal/broker"
)

// fakeClock is a Monotonic clock: Advance is real time passing (wall and
// monotonic readings move together), Step is the wall clock being set
// (NTP, an operator, a VM restore: only the wall reading moves).
type fakeClock struct {
	mu   sync.Mutex
	t    time.Time
	mono time.Duration
}

func newFakeClock() *fakeClock {
	return &fakeClock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Monotonic() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mono
}

func (c *fakeClock) Advance(d time.Duration) {
	if d < 0 {
		panic("fakeClock: time does not pass backwards; Step sets the wall clock back")
	}
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mono += d
	c.mu.Unlock()
}

func (c *fakeClock) Step(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// srcFunc adapts a function to broker.Source and counts calls.
type srcFunc struct {
	calls atomic.Int64
	fn    func(ctx context.Context, id broker.Identity, g broker.Grant, n int64) (broker.Credential, error)
}

func (s *srcFunc) Credential(ctx context.Context, id broker.Identity, g broker.Grant) (broker.Credential, error) {
	n := s.calls.Add(1)
	return s.fn(ctx, id, g, n)
}

// minting returns a source that mints a new token per call, bound to the
// caller: "<identity id>#<call number>", expiring life after now (0: never).
func minting(clock broker.Clock, life time.Duration) *srcFunc {
	return &srcFunc{fn: func(_ context.Context, id broker.Identity, _ broker.Grant, n int64) (broker.Credential, error) {
		c := broker.Credential{Kind: "test", Fields: map[string]broker.Secret{
			"token": broker.NewSecret(fmt.Sprintf("%s#%d", id.ID, n)),
		}}
		if life > 0 {
			c.Expires = clock.Now().Add(life)
		}
		return c, nil
	}}
}

var (
	idA   = broker.Identity{ID: "spiffe://example.org/a", Method: broker.MethodSPIFFEX509, TrustDomain: "example.org"}
	idB   = broker.Identity{ID: "spiffe://example.org/b", Method: broker.MethodSPIFFEX509, TrustDomain: "example.org"}
	grant = broker.Grant{Rule: "r1", Credential: "c1"}
)

func token(t testing.TB, c broker.Credential) string {
	t.Helper()
	s, ok := c.Field("token")
	if !ok {
		t.Fatalf("credential has no token")
	}
	return s.Reveal()
}

func TestCacheLifetime(t *testing.T) {
	type step struct {
		advance   time.Duration // before the call
		wantCalls int64         // source calls after the call
	}
	tests := []struct {
		name   string
		ttl    time.Duration
		margin time.Duration
		life   time.Duration // credential lifetime; 0: no expiry
		steps  []step
	}{
		{"TTL only", 5 * time.Minute, 0, 0, []step{
			{0, 1}, {5*time.Minute - time.Nanosecond, 1}, {time.Nanosecond, 2}, {time.Minute, 2}}},
		{"expiry minus default margin beats TTL", 5 * time.Minute, 0, 100 * time.Second, []step{
			{0, 1}, {69 * time.Second, 1}, {time.Second, 2}, {69 * time.Second, 2}, {time.Second, 3}}},
		{"custom margin", 5 * time.Minute, 10 * time.Second, 100 * time.Second, []step{
			{0, 1}, {89 * time.Second, 1}, {time.Second, 2}}},
		{"TTL beats expiry", time.Minute, 0, 10 * time.Minute, []step{
			{0, 1}, {59 * time.Second, 1}, {time.Second, 2}}},
		{"negative margin: until expiry", 5 * time.Minute, -1, 100 * time.Second, []step{
			{0, 1}, {99 * time.Second, 1}, {time.Second, 2}}},
		{"lifetime inside margin: served, never stored", 5 * time.Minute, 0, 20 * time.Second, []step{
			{0, 1}, {0, 2}, {time.Second, 3}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clock := newFakeClock()
			src := minting(clock, tc.life)
			c := NewCache("c1", src, CacheOptions{TTL: tc.ttl, Margin: tc.margin, Clock: clock})
			for i, s := range tc.steps {
				clock.Advance(s.advance)
				cr, err := c.Credential(context.Background(), idA, grant)
				if err != nil {
					t.Fatalf("step %d: %v", i, err)
				}
				if cr.Expired(clock.Now()) {
					t.Fatalf("step %d: served an expired credential", i)
				}
				if got := src.calls.Load(); got != s.wantCalls {
					t.Fatalf("step %d: %d source calls, want %d", i, got, s.wantCalls)
				}
			}
		})
	}
}

// Property: whatever the clock does, a served credential is never expired.
func TestCacheNeverServesExpired(t *testing.T) {
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	clock := newFakeClock()
	src := &srcFunc{fn: func(_ context.Context, _ broker.Identity, _ broker.Grant, n int64) (broker.Credential, error) {
		life := time.Duration(rng.IntN(120)+1) * time.Second
		return broker.Credential{Fields: map[string]broker.Secret{"token": broker.NewSecret(fmt.Sprint(n))},
			Expires: clock.Now().Add(life)}, nil
	}}
	c := NewCache("c1", src, CacheOptions{TTL: time.Hour, Margin: -1, Clock: clock})
	for i := range 5000 {
		clock.Advance(time.Duration(rng.IntN(3000)) * time.Millisecond)
		cr, err := c.Credential(context.Background(), idA, grant)
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		if cr.Expired(clock.Now()) {
			t.Fatalf("call %d: served a credential that expired at %v (now %v)", i, cr.Expires, clock.Now())
		}
	}
	if src.calls.Load() < 2 || src.calls.Load() == 5000 {
		t.Fatalf("%d source calls: the property was not exercised", src.calls.Load())
	}
}

func TestCacheRejectsExpiredFromSource(t *testing.T) {
	clock := newFakeClock()
	var released atomic.Int64
	src := &srcFunc{fn: func(context.Context, broker.Identity, broker.Grant, int64) (broker.Credential, error) {
		return broker.Credential{Fields: map[string]broker.Secret{"token": broker.NewSecret("t")},
			Expires: clock.Now(), Release: func(context.Context) { released.Add(1) }}, nil
	}}
	for _, ttl := range []time.Duration{0, time.Minute} {
		t.Run(fmt.Sprint("ttl=", ttl), func(t *testing.T) {
			released.Store(0)
			c := NewCache("c1", src, CacheOptions{TTL: ttl, Clock: clock})
			_, err := c.Credential(context.Background(), idA, grant)
			if !errors.Is(err, ErrExpired) {
				t.Fatalf("error = %v, want ErrExpired", err)
			}
			if released.Load() != 1 {
				t.Fatalf("expired lease released %d times, want 1", released.Load())
			}
		})
	}
}

func TestCacheErrorsNotCached(t *testing.T) {
	clock := newFakeClock()
	boom := errors.New("backend down")
	src := &srcFunc{fn: func(_ context.Context, _ broker.Identity, _ broker.Grant, n int64) (broker.Credential, error) {
		if n <= 2 {
			return broker.Credential{}, boom
		}
		return broker.Credential{Fields: map[string]broker.Secret{"token": broker.NewSecret("ok")}}, nil
	}}
	c := NewCache("c1", src, CacheOptions{TTL: time.Hour, Clock: clock})
	for i, want := range []struct {
		err   bool
		calls int64
	}{{true, 1}, {true, 2}, {false, 3}, {false, 3}} {
		_, err := c.Credential(context.Background(), idA, grant)
		if (err != nil) != want.err {
			t.Fatalf("call %d: error = %v, want error %v", i, err, want.err)
		}
		if err != nil && (!errors.Is(err, boom) || !strings.HasPrefix(err.Error(), `inject: credential "c1": `)) {
			t.Fatalf("call %d: error %q does not wrap the source error", i, err)
		}
		if got := src.calls.Load(); got != want.calls {
			t.Fatalf("call %d: %d source calls, want %d", i, got, want.calls)
		}
	}
}

// T-B7: callers that differ in anything that selects a credential never
// share an entry, including values built to collide in a NUL-joined key.
func TestCacheKeySeparation(t *testing.T) {
	base := broker.Identity{ID: "a", Method: broker.MethodOIDC, TrustDomain: "https://issuer"}
	with := func(f func(*broker.Identity)) broker.Identity { i := base; f(&i); return i }
	tests := []struct {
		name   string
		id1    broker.Identity
		g1     broker.Grant
		id2    broker.Identity
		g2     broker.Grant
		shared bool
	}{
		{"same caller, same grant", base, grant, base, grant, true},
		{"params in another map order", base, broker.Grant{Rule: "r", Credential: "c", Params: map[string]string{"a": "1", "b": "2"}},
			base, broker.Grant{Rule: "r", Credential: "c", Params: map[string]string{"b": "2", "a": "1"}}, true},
		{"different ID", base, grant, with(func(i *broker.Identity) { i.ID = "b" }), grant, false},
		{"different method", base, grant, with(func(i *broker.Identity) { i.Method = broker.MethodCIDR }), grant, false},
		{"different trust domain", base, grant, with(func(i *broker.Identity) { i.TrustDomain = "https://other" }), grant, false},
		{"with and without delegator", base, grant, with(func(i *broker.Identity) { i.Delegator.Sub = "alice" }), grant, false},
		{"different delegator", with(func(i *broker.Identity) { i.Delegator.Sub = "bob" }), grant,
			with(func(i *broker.Identity) { i.Delegator.Sub = "alice" }), grant, false},
		{"NUL moves between ID and delegator",
			with(func(i *broker.Identity) { i.ID = "a\x00b" }), grant,
			with(func(i *broker.Identity) { i.ID = "a"; i.Delegator.Sub = "b\x00" }), grant, false},
		{"NUL moves between trust domain and ID",
			with(func(i *broker.Identity) { i.TrustDomain = "t\x00a"; i.ID = "x" }), grant,
			with(func(i *broker.Identity) { i.TrustDomain = "t"; i.ID = "a\x00x" }), grant, false},
		{"different rule", base, broker.Grant{Rule: "r1", Credential: "c"}, base, broker.Grant{Rule: "r2", Credential: "c"}, false},
		{"different credential", base, broker.Grant{Rule: "r", Credential: "c1"}, base, broker.Grant{Rule: "r", Credential: "c2"}, false},
		{"different param value", base, broker.Grant{Rule: "r", Credential: "c", Params: map[string]string{"role": "ro"}},
			base, broker.Grant{Rule: "r", Credential: "c", Params: map[string]string{"role": "rw"}}, false},
		{"param present vs absent", base, broker.Grant{Rule: "r", Credential: "c"},
			base, broker.Grant{Rule: "r", Credential: "c", Params: map[string]string{"role": ""}}, false},
		{"params built to collide", base, broker.Grant{Rule: "r", Credential: "c", Params: map[string]string{"a": "x\x00b=y"}},
			base, broker.Grant{Rule: "r", Credential: "c", Params: map[string]string{"a": "x", "b": "y"}}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if !tc.shared && tc.g1.CacheKey(tc.id1) == tc.g2.CacheKey(tc.id2) {
				t.Logf("note: broker.Grant.CacheKey collides here; the cache key must not")
			}
			clock := newFakeClock()
			src := minting(clock, 0)
			c := NewCache("c", src, CacheOptions{TTL: time.Hour, Clock: clock})
			c1, err := c.Credential(context.Background(), tc.id1, tc.g1)
			if err != nil {
				t.Fatal(err)
			}
			c2, err := c.Credential(context.Background(), tc.id2, tc.g2)
			if err != nil {
				t.Fatal(err)
			}
			gotShared := token(t, c1) == token(t, c2)
			if gotShared != tc.shared {
				t.Fatalf("second caller got %q after first got %q: shared=%v, want %v", token(t, c2), token(t, c1), gotShared, tc.shared)
			}
		})
	}
}

// T-B7 property: for random interleavings of callers (sequential with a
// random clock, then concurrent), every caller receives a credential minted
// for itself.
func TestCacheBoundToIdentity(t *testing.T) {
	ids := []broker.Identity{
		idA, idB,
		{ID: idA.ID, Method: broker.MethodSPIFFEJWT, TrustDomain: "example.org"},
		{ID: idA.ID, Method: broker.MethodSPIFFEX509, TrustDomain: "example.org", Delegator: broker.Delegator{Sub: "alice"}},
	}
	owner := func(id broker.Identity) string { return id.Key() }
	mint := func(clock broker.Clock) *srcFunc {
		return &srcFunc{fn: func(_ context.Context, id broker.Identity, _ broker.Grant, n int64) (broker.Credential, error) {
			return broker.Credential{Fields: map[string]broker.Secret{
				"token": broker.NewSecret(fmt.Sprintf("%q#%d", owner(id), n)),
			}, Expires: clock.Now().Add(90 * time.Second)}, nil
		}}
	}
	check := func(t *testing.T, id broker.Identity, c broker.Credential) {
		if tok := token(t, c); !strings.HasPrefix(tok, fmt.Sprintf("%q#", owner(id))) {
			t.Errorf("caller %q received %q", owner(id), tok)
		}
	}

	t.Run("sequential random interleavings", func(t *testing.T) {
		for seed := range uint64(200) {
			rng := rand.New(rand.NewPCG(seed, 1))
			clock := newFakeClock()
			c := NewCache("c1", mint(clock), CacheOptions{TTL: time.Minute, Clock: clock, MaxEntries: 1 + rng.IntN(4)})
			for range 200 {
				if rng.IntN(4) == 0 {
					clock.Advance(time.Duration(rng.IntN(40)) * time.Second)
				}
				id := ids[rng.IntN(len(ids))]
				cr, err := c.Credential(context.Background(), id, grant)
				if err != nil {
					t.Fatalf("seed %d: %v", seed, err)
				}
				check(t, id, cr)
			}
			if t.Failed() {
				t.Fatalf("seed %d", seed)
			}
		}
	})

	t.Run("concurrent", func(t *testing.T) {
		clock := newFakeClock()
		src := mint(clock)
		c := NewCache("c1", src, CacheOptions{TTL: time.Minute, Clock: clock})
		var wg sync.WaitGroup
		var expired atomic.Int64
		for g := range 32 {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(g), 2))
				for range 300 {
					if rng.IntN(50) == 0 {
						clock.Advance(time.Duration(rng.IntN(30)) * time.Second)
					}
					id := ids[rng.IntN(len(ids))]
					cr, err := c.Credential(context.Background(), id, grant)
					if errors.Is(err, ErrExpired) {
						// Other goroutines moved the shared clock past the
						// credential's life between fetch and delivery:
						// refusing it is the correct outcome.
						expired.Add(1)
						continue
					}
					if err != nil {
						t.Error(err)
						return
					}
					check(t, id, cr)
				}
			})
		}
		wg.Wait()
		t.Logf("%d deliveries refused as expired", expired.Load())
		if n := src.calls.Load(); n < int64(len(ids)) || n >= 32*300 {
			t.Fatalf("%d source calls: cache not exercised", n)
		}
	})
}

// blockingSource blocks every call until release is closed (or its
// context ends), then mints a credential.
type blockingSource struct {
	srcFunc
	entered chan struct{} // one send per call
	release chan struct{}
	err     error
	lease   func(context.Context) // set as Release when non-nil
	ctxErr  atomic.Value          // ctx.Err() seen by the last call on return
	hadDL   atomic.Bool
}

func newBlockingSource() *blockingSource {
	b := &blockingSource{entered: make(chan struct{}, 1024), release: make(chan struct{})}
	b.fn = func(ctx context.Context, id broker.Identity, _ broker.Grant, n int64) (broker.Credential, error) {
		b.entered <- struct{}{}
		_, dl := ctx.Deadline()
		b.hadDL.Store(dl)
		select {
		case <-b.release:
		case <-ctx.Done():
		}
		b.ctxErr.Store(fmt.Sprint(ctx.Err()))
		if err := ctx.Err(); err != nil {
			return broker.Credential{}, err
		}
		if b.err != nil {
			return broker.Credential{}, b.err
		}
		return broker.Credential{Fields: map[string]broker.Secret{
			"token": broker.NewSecret(fmt.Sprintf("%s#%d", id.ID, n)),
		}, Release: b.lease}, nil
	}
	return b
}

func TestCacheSingleflight(t *testing.T) {
	const callers = 500
	for _, tc := range []struct {
		name    string
		err     error
		results map[string]float64
	}{
		{"success", nil, map[string]float64{ResultOK: 1, ResultCacheHit: callers - 1, ResultError: 0}},
		{"error", errors.New("backend down"), map[string]float64{ResultOK: 0, ResultCacheHit: 0, ResultError: callers}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// synctest.Wait returns only when every caller is durably
			// blocked: the first inside the source, the other 499 waiting
			// on its flight. Only then is the source released.
			synctest.Test(t, func(t *testing.T) {
				reg := prometheus.NewPedanticRegistry()
				m := NewMetrics(reg)
				src := newBlockingSource()
				src.err = tc.err
				c := NewCache("c1", src, CacheOptions{TTL: time.Minute, Clock: newFakeClock(), Metrics: m})

				var wg sync.WaitGroup
				errs := make(chan error, callers)
				toks := make(chan string, callers)
				for range callers {
					wg.Go(func() {
						cr, err := c.Credential(context.Background(), idA, grant)
						if err != nil {
							errs <- err
							return
						}
						toks <- token(t, cr)
					})
				}
				synctest.Wait()
				waiting := src.calls.Load()
				close(src.release) // before any Fatal, so no caller stays blocked
				wg.Wait()
				close(errs)
				close(toks)
				if waiting != 1 {
					t.Fatalf("%d source calls with %d callers waiting, want 1", waiting, callers)
				}
				if n := src.calls.Load(); n != 1 {
					t.Fatalf("%d source calls for %d concurrent first requests, want 1", n, callers)
				}
				if tc.err != nil {
					n := 0
					for err := range errs {
						n++
						if !errors.Is(err, tc.err) {
							t.Fatalf("error %v does not wrap the source error", err)
						}
					}
					if n != callers {
						t.Fatalf("%d errors, want %d", n, callers)
					}
				} else {
					for tok := range toks {
						if tok != idA.ID+"#1" {
							t.Fatalf("token %q, want %q", tok, idA.ID+"#1")
						}
					}
					if err, ok := <-errs; ok {
						t.Fatal(err)
					}
				}
				for result, want := range tc.results {
					if got := testutil.ToFloat64(m.fetches.WithLabelValues("c1", result)); got != want {
						t.Errorf("fetches{result=%q} = %v, want %v", result, got, want)
					}
				}
				if got := testutil.CollectAndCount(m.duration, "keygate_credential_fetch_duration_seconds"); got != 1 {
					t.Errorf("%d duration series, want 1", got)
				}
				if got := histogramCount(t, reg); got != 1 {
					t.Errorf("duration histogram count = %d, want 1 (source calls only)", got)
				}
				if tc.err != nil {
					// Errors are not cached: the next caller goes to the source.
					src.err = nil
					if _, err := c.Credential(context.Background(), idA, grant); err != nil {
						t.Fatal(err)
					}
					if n := src.calls.Load(); n != 2 {
						t.Fatalf("%d source calls after a failed flight, want 2", n)
					}
				}
			})
		})
	}
}

func histogramCount(t *testing.T, reg *prometheus.Registry) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "keygate_credential_fetch_duration_seconds" {
			var n uint64
			for _, m := range mf.GetMetric() {
				n += m.GetHistogram().GetSampleCount()
			}
			return n
		}
	}
	t.Fatal("histogram not registered")
	return 0
}

func TestCacheCallerCancelDoesNotCancelFetch(t *testing.T) {
	src := newBlockingSource()
	c := NewCache("c1", src, CacheOptions{TTL: time.Minute, Clock: newFakeClock(), FetchTimeout: time.Minute})

	ctx1, cancel1 := context.WithCancel(context.Background())
	err1 := make(chan error, 1)
	go func() {
		_, err := c.Credential(ctx1, idA, grant)
		err1 <- err
	}()
	<-src.entered // the shared fetch is running on behalf of caller 1

	res2 := make(chan broker.Credential, 1)
	go func() {
		cr, err := c.Credential(context.Background(), idA, grant)
		if err != nil {
			t.Error(err)
		}
		res2 <- cr
	}()

	cancel1()
	select {
	case err := <-err1:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled caller got %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("cancelled caller did not return while the fetch was running")
	}

	close(src.release)
	cr := <-res2
	if token(t, cr) != idA.ID+"#1" {
		t.Fatalf("second caller token %q", token(t, cr))
	}
	if got := src.ctxErr.Load(); got != "<nil>" {
		t.Fatalf("the shared fetch saw ctx error %v after caller 1 cancelled", got)
	}
	if !src.hadDL.Load() {
		t.Fatal("the shared fetch had no deadline (FetchTimeout)")
	}
	if n := src.calls.Load(); n != 1 {
		t.Fatalf("%d source calls, want 1", n)
	}
	// And the result was cached for later callers.
	if _, err := c.Credential(context.Background(), idA, grant); err != nil || src.calls.Load() != 1 {
		t.Fatalf("not cached: err=%v calls=%d", err, src.calls.Load())
	}
}

func TestCacheFetchTimeout(t *testing.T) {
	src := newBlockingSource() // never released
	c := NewCache("c1", src, CacheOptions{TTL: time.Minute, Clock: newFakeClock(), FetchTimeout: 20 * time.Millisecond})
	_, err := c.Credential(context.Background(), idA, grant)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error = %v, want DeadlineExceeded", err)
	}
}

// Credentials with Release (one-shot leases) are never cached or shared.
func TestCacheReleaseCredentials(t *testing.T) {
	t.Run("sequential: each call gets its own", func(t *testing.T) {
		var released atomic.Int64
		clock := newFakeClock()
		src := minting(clock, 0)
		inner := src.fn
		src.fn = func(ctx context.Context, id broker.Identity, g broker.Grant, n int64) (broker.Credential, error) {
			c, err := inner(ctx, id, g, n)
			c.Release = func(context.Context) { released.Add(1) }
			return c, err
		}
		c := NewCache("c1", src, CacheOptions{TTL: time.Hour, Clock: clock})
		seen := map[string]bool{}
		for range 3 {
			cr, err := c.Credential(context.Background(), idA, grant)
			if err != nil {
				t.Fatal(err)
			}
			if cr.Release == nil {
				t.Fatal("Release was dropped")
			}
			seen[token(t, cr)] = true
		}
		if len(seen) != 3 || src.calls.Load() != 3 {
			t.Fatalf("%d distinct credentials from %d source calls, want 3 and 3", len(seen), src.calls.Load())
		}
		if released.Load() != 0 {
			t.Fatalf("the cache released %d credentials in use", released.Load())
		}
	})

	t.Run("concurrent: never shared", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			const callers = 50
			src := newBlockingSource()
			src.lease = func(context.Context) {}
			c := NewCache("c1", src, CacheOptions{TTL: time.Hour, Clock: newFakeClock()})
			toks := make(chan string, callers)
			var wg sync.WaitGroup
			for range callers {
				wg.Go(func() {
					cr, err := c.Credential(context.Background(), idA, grant)
					if err != nil {
						t.Error(err)
						return
					}
					toks <- token(t, cr)
				})
			}
			// All callers now wait on one flight, whose one-shot lease
			// only its own caller may take.
			synctest.Wait()
			waiting := src.calls.Load()
			close(src.release) // before any Fatal, so no caller stays blocked
			wg.Wait()
			close(toks)
			if waiting != 1 {
				t.Fatalf("%d source calls before release, want 1", waiting)
			}
			checkDistinct(t, toks, callers)
		})
	})

	t.Run("caller gone: lease released", func(t *testing.T) {
		src := newBlockingSource()
		released := make(chan struct{}, 1)
		src.lease = func(context.Context) { released <- struct{}{} }
		c := NewCache("c1", src, CacheOptions{TTL: time.Hour, Clock: newFakeClock()})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { _, err := c.Credential(ctx, idA, grant); done <- err }()
		<-src.entered
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("error = %v", err)
		}
		close(src.release)
		select {
		case <-released:
		case <-time.After(5 * time.Second):
			t.Fatal("the orphaned lease was not released")
		}
	})
}

// checkDistinct drains toks and fails unless it holds n distinct tokens.
func checkDistinct(t *testing.T, toks <-chan string, n int) {
	t.Helper()
	seen := map[string]bool{}
	for tok := range toks {
		if seen[tok] {
			t.Fatalf("one-shot credential %q handed to two callers", tok)
		}
		seen[tok] = true
	}
	if len(seen) != n {
		t.Fatalf("%d credentials for %d callers", len(seen), n)
	}
}

func TestCacheCopiesFields(t *testing.T) {
	clock := newFakeClock()
	src := minting(clock, 0)
	c := NewCache("c1", src, CacheOptions{TTL: time.Hour, Clock: clock})
	c1, err := c.Credential(context.Background(), idA, grant)
	if err != nil {
		t.Fatal(err)
	}
	want := token(t, c1)
	c1.Fields["token"] = broker.NewSecret("tampered")
	c1.Fields["extra"] = broker.NewSecret("x")
	c2, err := c.Credential(context.Background(), idA, grant)
	if err != nil {
		t.Fatal(err)
	}
	if token(t, c2) != want || len(c2.Fields) != 1 {
		t.Fatalf("cached credential changed through a caller's copy: %q, %d fields", token(t, c2), len(c2.Fields))
	}
	if src.calls.Load() != 1 {
		t.Fatal("second call was not a cache hit")
	}
}

func TestCacheMaxEntries(t *testing.T) {
	clock := newFakeClock()
	src := minting(clock, 0)
	c := NewCache("c1", src, CacheOptions{TTL: time.Hour, Clock: clock, MaxEntries: 2})
	idC := broker.Identity{ID: "c", Method: broker.MethodCIDR}
	for i, step := range []struct {
		id    broker.Identity
		calls int64
	}{
		{idA, 1}, {idB, 2}, {idA, 2}, // both cached
		{idC, 3},           // evicts A, the oldest
		{idB, 3}, {idC, 3}, // still cached
		{idA, 4}, // refetched, evicts B
		{idB, 5},
	} {
		if _, err := c.Credential(context.Background(), step.id, grant); err != nil {
			t.Fatal(err)
		}
		if got := src.calls.Load(); got != step.calls {
			t.Fatalf("step %d (%s): %d source calls, want %d", i, step.id.ID, got, step.calls)
		}
	}
}

func TestCacheNone(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	m := NewMetrics(reg)
	clock := newFakeClock()
	src := minting(clock, 0)
	c := NewCache("c1", src, CacheOptions{TTL: 0, Clock: clock, Metrics: m})
	for i := range 3 {
		cr, err := c.Credential(context.Background(), idA, grant)
		if err != nil {
			t.Fatal(err)
		}
		if cr.Name != "c1" {
			t.Fatalf("Name = %q, want the cache name", cr.Name)
		}
		if want := fmt.Sprintf("%s#%d", idA.ID, i+1); token(t, cr) != want {
			t.Fatalf("token %q, want %q", token(t, cr), want)
		}
	}
	if got := testutil.ToFloat64(m.fetches.WithLabelValues("c1", ResultOK)); got != 3 {
		t.Fatalf("ok = %v, want 3", got)
	}
	if got := testutil.ToFloat64(m.fetches.WithLabelValues("c1", ResultCacheHit)); got != 0 {
		t.Fatalf("cache_hit = %v, want 0", got)
	}
}

func TestCacheSourcePanic(t *testing.T) {
	cn := canary(t)
	src := &srcFunc{fn: func(context.Context, broker.Identity, broker.Grant, int64) (broker.Credential, error) {
		panic("token is " + cn)
	}}
	for _, ttl := range []time.Duration{0, time.Minute} {
		t.Run(fmt.Sprint("ttl=", ttl), func(t *testing.T) {
			c := NewCache("c1", src, CacheOptions{TTL: ttl, Clock: newFakeClock()})
			_, err := c.Credential(context.Background(), idA, grant)
			if err == nil || !strings.Contains(err.Error(), "source panicked") {
				t.Fatalf("error = %v", err)
			}
			assertNoCanary(t, cn, err)
		})
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	m := NewMetrics(reg)
	clock := newFakeClock()
	boom := errors.New("down")
	fail := false
	src := &srcFunc{fn: func(context.Context, broker.Identity, broker.Grant, int64) (broker.Credential, error) {
		if fail {
			return broker.Credential{}, boom
		}
		return broker.Credential{Fields: map[string]broker.Secret{"token": broker.NewSecret("v")}}, nil
	}}
	c := NewCache("github-ci", src, CacheOptions{TTL: time.Minute, Clock: clock, Metrics: m})

	// Series exist at zero before any request.
	if got := testutil.CollectAndCount(m.fetches); got != 3 {
		t.Fatalf("%d fetch series before any request, want 3", got)
	}
	for range 3 {
		if _, err := c.Credential(context.Background(), idA, grant); err != nil {
			t.Fatal(err)
		}
	}
	clock.Advance(time.Minute)
	fail = true
	if _, err := c.Credential(context.Background(), idA, grant); err == nil {
		t.Fatal("want an error")
	}
	for result, want := range map[string]float64{ResultOK: 1, ResultCacheHit: 2, ResultError: 1} {
		if got := testutil.ToFloat64(m.fetches.WithLabelValues("github-ci", result)); got != want {
			t.Errorf("fetches{result=%q} = %v, want %v", result, got, want)
		}
	}
	if got := histogramCount(t, reg); got != 2 {
		t.Errorf("duration count = %d, want 2 (two source calls)", got)
	}
	if n, err := testutil.GatherAndCount(reg, "keygate_credential_fetches_total", "keygate_credential_fetch_duration_seconds"); err != nil || n != 4 {
		t.Errorf("GatherAndCount = %d, %v; want 4 series", n, err)
	}
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) != 0 {
		t.Errorf("lint: %v %v", problems, err)
	}

	// A second NewMetrics on the same registry (config reload) reuses the
	// registered collectors instead of panicking.
	m2 := NewMetrics(reg)
	m2.count("github-ci", ResultOK)
	if got := testutil.ToFloat64(m.fetches.WithLabelValues("github-ci", ResultOK)); got != 2 {
		t.Errorf("after reuse ok = %v, want 2", got)
	}

	// nil Metrics and nil registry are safe.
	var nilM *Metrics
	nilM.count("x", ResultOK)
	nilM.observe("x", time.Second)
	nilM.init("x")
	_ = NewMetrics(nil)
}

func BenchmarkCacheHit(b *testing.B) {
	src := NewStatic("c1", map[string]broker.Secret{"token": broker.NewSecret("t")})
	c := NewCache("c1", src, CacheOptions{TTL: time.Hour})
	ctx := context.Background()
	g := broker.Grant{Rule: "r1", Credential: "c1", Params: map[string]string{"role": "ro"}}
	if _, err := c.Credential(ctx, idA, g); err != nil {
		b.Fatal(err)
	}
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := c.Credential(ctx, idA, g); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := c.Credential(ctx, idA, g); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
}

// leasing mints a leased token per call ("<id>#<n>", expiring life after
// now) whose Release counts revocations per token.
type leasing struct {
	*srcFunc
	mu       sync.Mutex
	released map[string]int
}

func newLeasing(clock broker.Clock, life time.Duration) *leasing {
	l := &leasing{released: map[string]int{}}
	l.srcFunc = &srcFunc{fn: func(_ context.Context, id broker.Identity, _ broker.Grant, n int64) (broker.Credential, error) {
		tok := fmt.Sprintf("%s#%d", id.ID, n)
		return broker.Credential{Kind: "lease", Fields: map[string]broker.Secret{"token": broker.NewSecret(tok)},
			Expires: clock.Now().Add(life), Meta: map[string]string{"lease": tok},
			Release: func(context.Context) {
				l.mu.Lock()
				l.released[tok]++
				l.mu.Unlock()
			}}, nil
	}}
	return l
}

func (l *leasing) count(tok string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.released[tok]
}

func (l *leasing) total() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, v := range l.released {
		n += v
	}
	return n
}

// leaseEventually polls cond for up to 2s (releases run in the background).
func leaseEventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// leaseSettles checks that cond stays true for a moment (nothing more is
// released).
func leaseSettles(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; i < 50; i++ {
		if !cond() {
			t.Fatalf("%s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// ShareLeases: a leased credential is cached and shared; its Release runs
// exactly once, when it has left the cache and its last user is done.
func TestCacheSharedLeases(t *testing.T) {
	const life = 10 * time.Second
	opts := func(clock broker.Clock) CacheOptions {
		return CacheOptions{TTL: time.Hour, Margin: time.Second, Clock: clock, ShareLeases: true}
	}

	t.Run("shared, released once after expiry", func(t *testing.T) {
		clock := newFakeClock()
		src := newLeasing(clock, life)
		c := NewCache("c1", src, opts(clock))
		var wg sync.WaitGroup
		creds := make(chan broker.Credential, 20)
		for i := 0; i < 20; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cr, err := c.Credential(context.Background(), idA, grant)
				if err != nil {
					t.Error(err)
					return
				}
				creds <- cr
			}()
		}
		wg.Wait()
		close(creds)
		for cr := range creds {
			if token(t, cr) != idA.ID+"#1" || cr.Release == nil {
				t.Fatalf("got %s, release %v", token(t, cr), cr.Release != nil)
			}
			cr.Release(context.Background())
			cr.Release(context.Background())
		}
		if n := src.calls.Load(); n != 1 {
			t.Fatalf("%d source calls", n)
		}
		leaseSettles(t, "released while cached", func() bool { return src.total() == 0 })
		clock.Advance(life - time.Second) // the margin
		cr, err := c.Credential(context.Background(), idA, grant)
		if err != nil || token(t, cr) != idA.ID+"#2" {
			t.Fatalf("after expiry: %v", err)
		}
		leaseEventually(t, "the expired lease's release", func() bool { return src.count(idA.ID+"#1") == 1 })
		leaseSettles(t, "released twice", func() bool { return src.total() == 1 })
	})

	t.Run("evicted while in use: released after the last user", func(t *testing.T) {
		clock := newFakeClock()
		src := newLeasing(clock, life)
		c := NewCache("c1", src, opts(clock))
		held, _ := c.Credential(context.Background(), idA, grant)
		clock.Advance(life)
		if cr, _ := c.Credential(context.Background(), idA, grant); token(t, cr) != idA.ID+"#2" {
			t.Fatal("not replaced")
		}
		leaseSettles(t, "released while still in use", func() bool { return src.count(idA.ID+"#1") == 0 })
		held.Release(context.Background())
		leaseEventually(t, "release after the last user", func() bool { return src.count(idA.ID+"#1") == 1 })
		held.Release(context.Background())
		leaseSettles(t, "released twice", func() bool { return src.count(idA.ID+"#1") == 1 })
	})

	t.Run("per identity (T-B7) and LRU eviction", func(t *testing.T) {
		clock := newFakeClock()
		src := newLeasing(clock, life)
		o := opts(clock)
		o.MaxEntries = 1
		c := NewCache("c1", src, o)
		a, _ := c.Credential(context.Background(), idA, grant)
		a.Release(context.Background())
		b, _ := c.Credential(context.Background(), idB, grant)
		if token(t, a) == token(t, b) || !strings.HasPrefix(token(t, b), idB.ID) {
			t.Fatalf("A got %s, B got %s", token(t, a), token(t, b))
		}
		leaseEventually(t, "the evicted lease's release", func() bool { return src.count(token(t, a)) == 1 })
		b.Release(context.Background())
		leaseSettles(t, "B released while cached", func() bool { return src.count(token(t, b)) == 0 })
	})

	t.Run("Close releases idle leases and waits for busy ones", func(t *testing.T) {
		clock := newFakeClock()
		src := newLeasing(clock, life)
		c := NewCache("c1", src, opts(clock))
		idle, _ := c.Credential(context.Background(), idA, grant)
		idle.Release(context.Background())
		busy, _ := c.Credential(context.Background(), idB, grant)
		done := make(chan error, 1)
		go func() { done <- c.(Closer).Close(context.Background()) }()
		leaseEventually(t, "the idle lease's release", func() bool { return src.count(token(t, idle)) == 1 })
		select {
		case err := <-done:
			t.Fatalf("Close returned (%v) while a lease is in use", err)
		case <-time.After(20 * time.Millisecond):
		}
		busy.Release(context.Background())
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if src.count(token(t, busy)) != 1 || src.total() != 2 {
			t.Fatalf("released %v", src.released)
		}
		// Closed: calls pass through, and a lease is one-shot again.
		cr, err := c.Credential(context.Background(), idA, grant)
		if err != nil {
			t.Fatal(err)
		}
		cr.Release(context.Background())
		if src.count(token(t, cr)) != 1 {
			t.Fatal("a lease fetched after Close was not handed over one-shot")
		}
		if err := c.(Closer).Close(context.Background()); err != nil {
			t.Fatalf("second Close: %v", err)
		}
	})

	t.Run("Close deadline releases busy leases anyway", func(t *testing.T) {
		clock := newFakeClock()
		src := newLeasing(clock, life)
		c := NewCache("c1", src, opts(clock))
		busy, _ := c.Credential(context.Background(), idA, grant)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		defer cancel()
		if err := c.(Closer).Close(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Close: %v", err)
		}
		leaseEventually(t, "the forced release", func() bool { return src.count(token(t, busy)) == 1 })
		busy.Release(context.Background())
		leaseSettles(t, "released twice", func() bool { return src.count(token(t, busy)) == 1 })
	})

	t.Run("renewed on a hit past half its life", func(t *testing.T) {
		clock := newFakeClock()
		src := newLeasing(clock, life)
		var renews atomic.Int64
		o := opts(clock)
		o.Renew = func(_ context.Context, cr broker.Credential) (time.Time, error) {
			renews.Add(1)
			if cr.Meta["lease"] == "" || cr.Release != nil {
				return time.Time{}, errors.New("renew got a bad credential")
			}
			return clock.Now().Add(life), nil
		}
		c := NewCache("c1", src, o)
		get := func() broker.Credential {
			cr, err := c.Credential(context.Background(), idA, grant)
			if err != nil {
				t.Fatal(err)
			}
			cr.Release(context.Background())
			return cr
		}
		get()
		clock.Advance(4 * time.Second)
		get()
		if renews.Load() != 0 {
			t.Fatal("renewed before half its life")
		}
		clock.Advance(2 * time.Second) // 6s of 10s
		get()
		leaseEventually(t, "a renewal", func() bool { return renews.Load() == 1 })
		clock.Advance(6 * time.Second) // 12s: past the first expiry
		cr := get()
		if token(t, cr) != idA.ID+"#1" || src.calls.Load() != 1 {
			t.Fatalf("got %s after renewal (source calls %d)", token(t, cr), src.calls.Load())
		}
		if want := newFakeClock().Now().Add(16 * time.Second); !cr.Expires.Equal(want) {
			t.Fatalf("expires %s, want %s", cr.Expires, want)
		}
		leaseEventually(t, "the second renewal", func() bool { return renews.Load() == 2 })
		if src.total() != 0 {
			t.Fatal("a renewed lease was released")
		}
	})

	t.Run("a failed renewal is not retried; the lease ends as before", func(t *testing.T) {
		clock := newFakeClock()
		src := newLeasing(clock, life)
		var renews atomic.Int64
		o := opts(clock)
		o.Renew = func(context.Context, broker.Credential) (time.Time, error) {
			renews.Add(1)
			return time.Time{}, errors.New("vault down")
		}
		c := NewCache("c1", src, o)
		first, _ := c.Credential(context.Background(), idA, grant)
		first.Release(context.Background())
		clock.Advance(6 * time.Second)
		for i := 0; i < 5; i++ {
			cr, _ := c.Credential(context.Background(), idA, grant)
			cr.Release(context.Background())
			leaseEventually(t, "the renewal attempt", func() bool { return renews.Load() == 1 })
		}
		clock.Advance(3 * time.Second) // 9s: inside the margin
		cr, _ := c.Credential(context.Background(), idA, grant)
		if token(t, cr) != idA.ID+"#2" {
			t.Fatal("the unrenewed lease was served past its margin")
		}
		leaseEventually(t, "the old lease's release", func() bool { return src.count(idA.ID+"#1") == 1 })
	})

	t.Run("no renewal when the TTL ends first", func(t *testing.T) {
		clock := newFakeClock()
		src := newLeasing(clock, life)
		o := opts(clock)
		o.TTL = 5 * time.Second
		o.Renew = func(context.Context, broker.Credential) (time.Time, error) {
			t.Error("renewed a lease the TTL ends first")
			return time.Time{}, nil
		}
		c := NewCache("c1", src, o)
		for i := 0; i < 4; i++ {
			cr, _ := c.Credential(context.Background(), idA, grant)
			cr.Release(context.Background())
			clock.Advance(time.Second + 500*time.Millisecond)
		}
		leaseSettles(t, "", func() bool { return true })
	})
}
