package inject

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/keygate/broker/internal/broker"
)

// TestClockJumpSTS (F-17) against a real MinIO STS: the broker's wall
// clock (a fake, started at the real time) is stepped ±10 minutes while
// MinIO keeps real time. A step back keeps the cached session; a step
// forward into the refresh window gets a new session from STS in the
// background; a step forward past every session's Expiration is an
// ErrExpired refusal, never a stale session. After a step back, the time
// that really passes (the fake's monotonic reading: Advance) still ends
// the session: its refresh window and margin come when its true lifetime
// says, though the stepped-back wall clock says it has 10 more minutes.
// Every session the cache hands out is checked against the stepped clock
// and then used for a real S3 call, which MinIO verifies against real
// time: nothing served is expired in either sense.
func TestClockJumpSTS(t *testing.T) {
	w := newSTSWorld(t)
	clock := &fakeClock{t: time.Now()}
	start := clock.Now()
	c := NewCache("aws-ci", w.source(t, STSOptions{}), CacheOptions{TTL: time.Hour, Clock: clock})
	t.Cleanup(func() { _ = c.(Closer).Close(context.Background()) })
	g := broker.Grant{Credential: "aws-ci", Rule: "r"}
	ak := func(cr broker.Credential) string { s, _ := cr.Field(broker.FieldAccessKeyID); return s.Reveal() }
	// get serves one credential and proves it usable now, in both clocks.
	get := func(step string) broker.Credential {
		t.Helper()
		cr, err := c.Credential(context.Background(), ciIdentity, g)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		if cr.Expired(clock.Now()) || !cr.Expires.After(clock.Now()) {
			t.Fatalf("%s: served a session that expired at %v (clock %v)", step, cr.Expires, clock.Now())
		}
		if _, err := w.s3With(cr).ListBuckets(context.Background(), &s3.ListBucketsInput{}); err != nil {
			t.Fatalf("%s: MinIO refused the served session: %v", step, err)
		}
		return cr
	}
	waitCalls := func(step string, n int64) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for w.rt.calls.Load() < n && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if got := w.rt.calls.Load(); got != n {
			t.Fatalf("%s: %d STS calls, want %d", step, got, n)
		}
	}

	first := get("start")
	waitCalls("start", 1)
	if life := first.Expires.Sub(start); life < 14*time.Minute || life > 16*time.Minute {
		t.Fatalf("session lifetime %v, want about 15m", life)
	}

	clock.Step(-10 * time.Minute)
	if got := get("clock -10m"); ak(got) != ak(first) {
		t.Fatal("clock -10m: the cached session was replaced, want it kept (still valid against the jumped clock)")
	}
	waitCalls("clock -10m", 1)

	// +20m from there: 10 minutes after the fetch, inside the STS refresh
	// window (5 minutes before Expiration), outside the 60 s margin.
	clock.Step(20*time.Minute + time.Second)
	if got := get("clock +10m"); ak(got) != ak(first) {
		t.Fatal("clock +10m: the first hit in the refresh window must still serve the old session")
	}
	waitCalls("clock +10m (background refresh)", 2)
	// The refresh stores its session just after the STS call returns.
	var refreshed broker.Credential
	for deadline := time.Now().Add(10 * time.Second); ; {
		refreshed = get("clock +10m, after the refresh")
		if ak(refreshed) != ak(first) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("clock +10m: STS was called again but the cache still serves the old session")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The new session is itself inside its refresh window (this clock is
	// 10 minutes ahead of MinIO's): more hits must not refresh back to back.
	for i := 0; i < 20; i++ {
		get("clock +10m, hits on the refreshed session")
	}
	time.Sleep(200 * time.Millisecond)
	waitCalls("clock +10m, after the refresh", 2)

	// Another +10m: every session MinIO can issue now expires before the
	// broker's clock, so the cache refuses rather than serve one.
	clock.Step(10 * time.Minute)
	_, err := c.Credential(context.Background(), ciIdentity, g)
	if !errors.Is(err, ErrExpired) {
		t.Fatalf("clock +20m: %v, want ErrExpired (the broker's clock is past every session's Expiration)", err)
	}
	calls := w.rt.calls.Load()

	// Back to the real time: a fresh session, cached again.
	clock.Step(-20*time.Minute - time.Second)
	back := get("clock back to real time")
	if ak(back) == ak(refreshed) || ak(back) == ak(first) {
		t.Fatal("back to real time: an old session was served")
	}
	if got := get("again"); ak(got) != ak(back) {
		t.Fatal("back to real time: the fresh session was not cached")
	}
	waitCalls("back to real time", calls+1)

	// Step back 10 minutes again, then let 10m01s really pass: by the wall
	// clock the session is one second old, by the time it has been held it
	// is inside its refresh window. The hit serves it and STS is called in
	// the background (a wall-only cache would not refresh for 10 minutes).
	clock.Step(-10 * time.Minute)
	if got := get("step back again"); ak(got) != ak(back) {
		t.Fatal("step back again: the cached session was replaced, want it kept")
	}
	clock.Advance(10*time.Minute + time.Second)
	if got := get("10m01s held, wall says 1s"); ak(got) != ak(back) {
		t.Fatal("10m01s held: the first hit in the refresh window must still serve the cached session")
	}
	waitCalls("10m01s held (background refresh by elapsed time)", calls+2)
	var renewed broker.Credential
	for deadline := time.Now().Add(10 * time.Second); ; {
		renewed = get("10m01s held, after the refresh")
		if ak(renewed) != ak(back) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("10m01s held: STS was called again but the cache still serves the old session")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// 14m01s held: the old session is past its 60 s margin by elapsed time
	// (the wall says 4 minutes); the refreshed one is 4 minutes old.
	clock.Advance(4 * time.Minute)
	if got := get("14m01s held"); ak(got) == ak(back) {
		t.Fatal("14m01s held: the session was served past its true lifetime's margin")
	} else if ak(got) != ak(renewed) {
		t.Fatal("14m01s held: the refreshed session was not the one served")
	}
	waitCalls("14m01s held", calls+2)
	t.Logf("F-17: %d STS calls; -10m kept the session, +10m refreshed it in the background, +20m refused (ErrExpired), back to real time fetched and cached a new one; after -10m, 10m of held time refreshed it and 14m ended it", w.rt.calls.Load())
}

// TestCacheClockJumpsNeverServeExpired (F-17, property): whatever mix of
// ordinary steps (time passing) and ±10 minute steps of the wall clock
// the clock makes, with early refresh on, a served credential is never
// expired, nor inside its 1 minute margin, in either sense: against the
// wall clock at that moment, and against its true lifetime (the monotonic
// time since it was minted). A step forward past a credential's expiry
// makes the source mint again; so does its true lifetime running out
// after a step back.
func TestCacheClockJumpsNeverServeExpired(t *testing.T) {
	const life, margin = 15 * time.Minute, time.Minute
	seed := rand.Uint64()
	if s := os.Getenv("KEYGATE_TEST_SEED"); s != "" { // replay a failure
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("seed %d (KEYGATE_TEST_SEED replays it)", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	clock := newFakeClock()
	// Like a Vault lease: the expiry is computed on the broker's clock.
	// trueEnd records, per token, the monotonic reading at which it
	// really expires.
	var mu sync.Mutex
	trueEnd := map[string]time.Duration{}
	mint := minting(clock, life)
	src := &srcFunc{fn: func(ctx context.Context, id broker.Identity, g broker.Grant, n int64) (broker.Credential, error) {
		cr, err := mint.fn(ctx, id, g, n)
		mono := clock.Monotonic()
		if err == nil {
			mu.Lock()
			trueEnd[token(t, cr)] = mono + life
			mu.Unlock()
		}
		return cr, err
	}}
	c := NewCache("c1", src, CacheOptions{TTL: time.Hour, Margin: margin, Refresh: 5 * time.Minute, Clock: clock})
	defer func() { _ = c.(Closer).Close(context.Background()) }()
	steps, behind := 0, 0
	for i := range 3000 {
		switch r := rng.IntN(20); {
		case r == 0:
			clock.Step(10 * time.Minute)
			steps++
		case r == 1:
			clock.Step(-10 * time.Minute)
			steps++
		default:
			clock.Advance(time.Duration(rng.IntN(30000)) * time.Millisecond)
		}
		cr, err := c.Credential(context.Background(), idA, grant)
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		// Let a background refresh finish before the clock moves again: a
		// wall step while the source call runs is a step of the issuer's
		// clock too, which no reading can tell from a longer lifetime.
		// The cache bounds it with the readings on both sides of the call
		// (one step per call: TestCacheWallStepBack, "during the source
		// call"); this property is about steps between calls.
		c.(*cache).bg.Wait()
		now, mono := clock.Now(), clock.Monotonic()
		mu.Lock()
		end, ok := trueEnd[token(t, cr)]
		mu.Unlock()
		if !ok {
			t.Fatalf("call %d: served a token the source never minted", i)
		}
		if left := cr.Expires.Sub(now); left < margin {
			t.Fatalf("call %d: served a credential with %v left by the wall clock (margin %v)", i, left, margin)
		}
		if left := end - mono; left < margin {
			t.Fatalf("call %d: served a credential with %v of its true lifetime left (margin %v), the wall clock says %v", i, left, margin, cr.Expires.Sub(now))
		}
		// Served while the wall clock gives it more time than it has (the
		// clock was stepped back since it was minted): where a wall-only
		// cache goes wrong.
		if cr.Expires.Sub(now) > end-mono {
			behind++
		}
	}
	if steps == 0 || src.calls.Load() < 10 || behind == 0 {
		t.Fatalf("%d steps, %d source calls, %d served after a step back: the property was not exercised", steps, src.calls.Load(), behind)
	}
	t.Logf("3000 calls, %d steps of ±10m, %d source calls, %d served after a step back", steps, src.calls.Load(), behind)
}

// TestCacheWallStepBack (F-17): a wall clock stepped back never stretches
// a cached credential's TTL, margin, refresh window, refresh back-off or
// lease renewal; the time it has really been held decides as soon as it
// says so. A step alone (no time passing) changes nothing.
func TestCacheWallStepBack(t *testing.T) {
	const life = 15 * time.Minute
	tests := []struct {
		name    string
		ttl     time.Duration
		life    time.Duration // 0: no expiry
		refresh time.Duration
		step    time.Duration // wall only, right after the first fetch
		advance time.Duration // real time passing after the step
		want    string        // token served after advance
		calls   int64         // source calls, waited for (a refresh runs in the background)
	}{
		{"step back alone keeps the credential", time.Hour, life, 0, -10 * time.Minute, 0, "#1", 1},
		{"step back, held until just inside the margin", time.Hour, life, 0, -10 * time.Minute, life - time.Minute, "#2", 2},
		{"step back, held until just outside the margin", time.Hour, life, 0, -10 * time.Minute, life - time.Minute - time.Second, "#1", 1},
		{"step back, TTL held", 5 * time.Minute, 0, 0, -time.Hour, 5 * time.Minute, "#2", 2},
		{"step back, TTL not yet held", 5 * time.Minute, 0, 0, -time.Hour, 5*time.Minute - time.Second, "#1", 1},
		{"step back, in the refresh window by held time", time.Hour, life, 5 * time.Minute, -10 * time.Minute, 10*time.Minute + time.Second, "#1", 2},
		{"step back, before the refresh window", time.Hour, life, 5 * time.Minute, -10 * time.Minute, 10*time.Minute - time.Second, "#1", 1},
		{"step forward into the margin", time.Hour, life, 0, 14*time.Minute + time.Second, 0, "#2", 2},
		{"step forward past the TTL", 5 * time.Minute, 0, 0, 5 * time.Minute, 0, "#2", 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clock := newFakeClock()
			src := minting(clock, tc.life)
			c := NewCache("c1", src, CacheOptions{TTL: tc.ttl, Margin: time.Minute, Refresh: tc.refresh, Clock: clock})
			defer func() { _ = c.(Closer).Close(context.Background()) }()
			if _, err := c.Credential(context.Background(), idA, grant); err != nil {
				t.Fatal(err)
			}
			clock.Step(tc.step)
			clock.Advance(tc.advance)
			cr, err := c.Credential(context.Background(), idA, grant)
			if err != nil {
				t.Fatal(err)
			}
			if got := token(t, cr); got != idA.ID+tc.want {
				t.Fatalf("served %s, want %s%s", got, idA.ID, tc.want)
			}
			waitFor(t, func() bool { return src.calls.Load() == tc.calls })
			time.Sleep(20 * time.Millisecond)
			if n := src.calls.Load(); n != tc.calls {
				t.Fatalf("%d source calls, want %d", n, tc.calls)
			}
		})
	}

	// A step while the source call runs: the issuer's reading and the
	// cache's can fall on either side of it. The lifetime is judged at both
	// ends of the call and the shorter one kept.
	for _, step := range []time.Duration{-10 * time.Minute, 10 * time.Minute} {
		t.Run(fmt.Sprintf("step %v during the source call", step), func(t *testing.T) {
			clock := newFakeClock()
			mint := minting(clock, life)
			src := &srcFunc{fn: func(ctx context.Context, id broker.Identity, g broker.Grant, n int64) (broker.Credential, error) {
				if n == 1 && step > 0 {
					clock.Step(step) // before the issuer reads its clock
				}
				cr, err := mint.fn(ctx, id, g, n)
				if n == 1 && step < 0 {
					clock.Step(step) // after it did
				}
				return cr, err
			}}
			c := NewCache("c1", src, CacheOptions{TTL: time.Hour, Margin: time.Minute, Clock: clock})
			defer func() { _ = c.(Closer).Close(context.Background()) }()
			get := func() string {
				t.Helper()
				cr, err := c.Credential(context.Background(), idA, grant)
				if err != nil {
					t.Fatal(err)
				}
				return token(t, cr)
			}
			get()
			clock.Advance(life - time.Minute - time.Second)
			if tok := get(); tok != idA.ID+"#1" {
				t.Fatalf("served %s before the margin, want #1", tok)
			}
			clock.Advance(time.Second)
			if tok := get(); tok != idA.ID+"#2" {
				t.Fatalf("served %s with a minute of its true lifetime left, want #2", tok)
			}
		})
	}

	t.Run("refresh back-off follows held time", func(t *testing.T) {
		clock := newFakeClock()
		src := &hintedSource{srcFunc: minting(clock, life)} // margin 1m, refresh 5m
		c := NewCache("sts", src, CacheOptions{TTL: time.Hour, Clock: clock})
		defer func() { _ = c.(Closer).Close(context.Background()) }()
		get := func(what string) {
			t.Helper()
			cr, err := c.Credential(context.Background(), idA, grant)
			if err != nil || token(t, cr) != idA.ID+"#1" {
				t.Fatalf("%s: want the cached credential (err %v)", what, err)
			}
		}
		get("first")
		src.fail.Store(true)
		clock.Advance(10*time.Minute + time.Second)
		get("in the refresh window")
		waitFor(t, func() bool { return src.calls.Load() == 2 })
		time.Sleep(50 * time.Millisecond) // let the failed refresh record its back-off
		// A step back must not stretch the 30 s back-off to 10 minutes.
		clock.Step(-10 * time.Minute)
		clock.Advance(refreshRetry + time.Second)
		waitFor(t, func() bool {
			get("after the back-off")
			return src.calls.Load() >= 3
		})
	})

	t.Run("shared lease renewed and ended by held time", func(t *testing.T) {
		const life = 10 * time.Second
		clock := newFakeClock()
		src := newLeasing(clock, life)
		var renews atomic.Int64
		var fail atomic.Bool
		o := CacheOptions{TTL: time.Hour, Margin: time.Second, Clock: clock, ShareLeases: true,
			Renew: func(context.Context, broker.Credential) (time.Time, error) {
				renews.Add(1)
				if fail.Load() {
					return time.Time{}, errors.New("vault down (test)")
				}
				return clock.Now().Add(life), nil
			}}
		c := NewCache("c1", src, o)
		defer func() { _ = c.(Closer).Close(context.Background()) }()
		get := func() string {
			t.Helper()
			cr, err := c.Credential(context.Background(), idA, grant)
			if err != nil {
				t.Fatal(err)
			}
			cr.Release(context.Background())
			return token(t, cr)
		}
		get()
		clock.Step(-time.Hour)
		clock.Advance(6 * time.Second) // 6 s of 10 s held; the wall says -59m54s
		if tok := get(); tok != idA.ID+"#1" {
			t.Fatalf("served %s, want #1", tok)
		}
		waitFor(t, func() bool { return renews.Load() == 1 })
		// Renewed at held 6 s for 10 s more (on the stepped wall clock).
		// Step back again: 10 s of held time later the renewed lease is
		// inside its margin, and a failing renewal cannot save it.
		fail.Store(true)
		clock.Step(-time.Hour)
		clock.Advance(5 * time.Second)
		if tok := get(); tok != idA.ID+"#1" {
			t.Fatalf("served %s, want the renewed #1", tok)
		}
		waitFor(t, func() bool { return renews.Load() == 2 })
		time.Sleep(20 * time.Millisecond)
		clock.Advance(4 * time.Second) // 9 s since the renewal: inside the 1 s margin
		if tok := get(); tok != idA.ID+"#2" {
			t.Fatalf("served %s past its true lifetime's margin, want #2", tok)
		}
		waitFor(t, func() bool { return src.count(idA.ID+"#1") == 1 })
	})
}

// wallClock is a Clock that is not Monotonic and whose times carry no
// monotonic reading.
type wallClock struct{ t time.Time }

func (c *wallClock) Now() time.Time { return c.t }

// TestCacheClockReadings: how the cache reads clocks that are not
// Monotonic. broker.SystemClock's times carry time.Now's monotonic
// reading, which is used; a clock whose times carry none falls back to its
// wall clock (the documented limit: a step of it moves both readings). A
// credential expiring in the year 9999 does not overflow into "expired".
func TestCacheClockReadings(t *testing.T) {
	t.Run("system clock", func(t *testing.T) {
		a := read(broker.SystemClock{}, nil)
		time.Sleep(20 * time.Millisecond)
		b := read(broker.SystemClock{}, nil)
		if d := b.mono - a.mono; d < 20*time.Millisecond || d > time.Minute {
			t.Fatalf("monotonic readings %v apart, want about 20ms", d)
		}
		if a.wall != a.wall.Round(0) {
			t.Fatal("the wall reading keeps a monotonic reading: comparisons would not be wall-clock ones")
		}
	})
	t.Run("wall-only clock", func(t *testing.T) {
		clock := &wallClock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
		a := read(clock, nil)
		clock.t = clock.t.Add(-10 * time.Minute)
		if b := read(clock, nil); b.mono-a.mono != -10*time.Minute {
			t.Fatalf("readings %v apart, want the wall clock's -10m", b.mono-a.mono)
		}
	})
	t.Run("expiry in the year 9999", func(t *testing.T) {
		src := &srcFunc{fn: func(context.Context, broker.Identity, broker.Grant, int64) (broker.Credential, error) {
			return broker.Credential{Kind: "test", Fields: map[string]broker.Secret{"token": broker.NewSecret("t")},
				Expires: time.Date(9999, 12, 31, 0, 0, 0, 0, time.UTC)}, nil
		}}
		for _, clock := range []broker.Clock{broker.SystemClock{}, newFakeClock()} {
			c := NewCache("c1", src, CacheOptions{TTL: time.Hour, Refresh: time.Minute, Clock: clock})
			for range 3 {
				if _, err := c.Credential(context.Background(), idA, grant); err != nil {
					t.Fatal(err)
				}
			}
			_ = c.(Closer).Close(context.Background())
		}
		if n := src.calls.Load(); n != 2 {
			t.Fatalf("%d source calls, want 2 (one per cache): a far expiry was judged expired", n)
		}
	})
}
