package inject

import (
	"context"
	"errors"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/keygate/broker/internal/broker"
)

// TestClockJumpSTS (F-17) against a real MinIO STS: the broker's clock (a
// fake, started at the real time) jumps ±10 minutes while MinIO keeps real
// time. Every decision is made against the jumped clock: a jump back keeps
// the cached session; a jump forward into the refresh window gets a new
// session from STS in the background; a jump forward past every session's
// Expiration is an ErrExpired refusal, never a stale session. Every
// session the cache hands out is checked against the jumped clock and
// then used for a real S3 call, which MinIO verifies against real time:
// nothing served is expired in either sense.
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

	clock.Advance(-10 * time.Minute)
	if got := get("clock -10m"); ak(got) != ak(first) {
		t.Fatal("clock -10m: the cached session was replaced, want it kept (still valid against the jumped clock)")
	}
	waitCalls("clock -10m", 1)

	// +20m from there: 10 minutes after the fetch, inside the STS refresh
	// window (5 minutes before Expiration), outside the 60 s margin.
	clock.Advance(20*time.Minute + time.Second)
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
	clock.Advance(10 * time.Minute)
	_, err := c.Credential(context.Background(), ciIdentity, g)
	if !errors.Is(err, ErrExpired) {
		t.Fatalf("clock +20m: %v, want ErrExpired (the broker's clock is past every session's Expiration)", err)
	}
	calls := w.rt.calls.Load()

	// Back to the real time: a fresh session, cached again.
	clock.Advance(-20*time.Minute - time.Second)
	back := get("clock back to real time")
	if ak(back) == ak(refreshed) || ak(back) == ak(first) {
		t.Fatal("back to real time: an old session was served")
	}
	if got := get("again"); ak(got) != ak(back) {
		t.Fatal("back to real time: the fresh session was not cached")
	}
	waitCalls("back to real time", calls+1)
	t.Logf("F-17: %d STS calls; -10m kept the session, +10m refreshed it in the background, +20m refused (ErrExpired), back to real time fetched and cached a new one", w.rt.calls.Load())
}

// TestCacheClockJumpsNeverServeExpired (F-17, property): whatever mix of
// ordinary steps and ±10 minute jumps the clock makes, with early refresh
// on, a served credential is never expired against the clock at that
// moment, and a jump forward past a credential's expiry makes the source
// mint again.
func TestCacheClockJumpsNeverServeExpired(t *testing.T) {
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	clock := newFakeClock()
	// Like a Vault lease: the expiry is computed on the broker's clock.
	src := minting(clock, 15*time.Minute)
	c := NewCache("c1", src, CacheOptions{TTL: time.Hour, Margin: time.Minute, Refresh: 5 * time.Minute, Clock: clock})
	defer func() { _ = c.(Closer).Close(context.Background()) }()
	jumps := 0
	for i := range 3000 {
		switch r := rng.IntN(20); {
		case r == 0:
			clock.Advance(10 * time.Minute)
			jumps++
		case r == 1:
			clock.Advance(-10 * time.Minute)
			jumps++
		default:
			clock.Advance(time.Duration(rng.IntN(30000)) * time.Millisecond)
		}
		before := src.calls.Load()
		cr, err := c.Credential(context.Background(), idA, grant)
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		now := clock.Now()
		if cr.Expired(now) {
			t.Fatalf("call %d: served a credential that expired at %v (clock %v)", i, cr.Expires, now)
		}
		if cr.Expires.Sub(now) < time.Minute && src.calls.Load() == before {
			t.Fatalf("call %d: served a cached credential inside its margin (%v left)", i, cr.Expires.Sub(now))
		}
	}
	if jumps == 0 || src.calls.Load() < 10 {
		t.Fatalf("%d jumps, %d source calls: the property was not exercised", jumps, src.calls.Load())
	}
	t.Logf("3000 calls, %d jumps of ±10m, %d source calls", jumps, src.calls.Load())
}
