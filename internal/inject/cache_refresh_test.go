package inject

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
)

// hintedSource is a minting source that asks the cache for a margin and an
// early refresh, like aws_sts, and can be made to fail.
type hintedSource struct {
	*srcFunc
	fail atomic.Bool
}

func (h *hintedSource) CacheHints() (margin, refresh time.Duration) {
	return time.Minute, 5 * time.Minute
}

func (h *hintedSource) Credential(ctx context.Context, id broker.Identity, g broker.Grant) (broker.Credential, error) {
	if h.fail.Load() {
		h.calls.Add(1)
		return broker.Credential{}, errors.New("backend down (test)")
	}
	return h.srcFunc.Credential(ctx, id, g)
}

// TestCacheEarlyRefresh (SECURITY-TESTS §4, F-06): with a refresh window a
// hit inside it is served at once and replaced in the background; a failed
// refresh keeps the old credential until its margin, retries at most every
// refreshRetry, and nothing is served within the margin. A source's hints
// raise the options, never lower them.
func TestCacheEarlyRefresh(t *testing.T) {
	clock := newFakeClock()
	src := &hintedSource{srcFunc: minting(clock, 15*time.Minute)}
	c := NewCache("sts", src, CacheOptions{TTL: time.Hour, Clock: clock})
	get := func() (string, error) {
		cr, err := c.Credential(context.Background(), idA, grant)
		if err != nil {
			return "", err
		}
		return token(t, cr), nil
	}
	first, err := get()
	if err != nil {
		t.Fatal(err)
	}
	start := clock.Now()
	exp := start.Add(15 * time.Minute)
	set := func(before time.Duration) {
		clock.mu.Lock()
		clock.t = exp.Add(-before)
		clock.mu.Unlock()
	}

	set(6 * time.Minute)
	if tok, _ := get(); tok != first || src.calls.Load() != 1 {
		t.Fatalf("outside the window: %d calls", src.calls.Load())
	}
	set(4 * time.Minute)
	if tok, _ := get(); tok != first {
		t.Fatal("the hit that starts a refresh was not served the cached credential")
	}
	waitFor(t, func() bool { return src.calls.Load() == 2 })
	var second string
	waitFor(t, func() bool { second, _ = get(); return second != first })

	// The second credential expires 15m after it was minted (at exp-4m).
	exp = exp.Add(-4 * time.Minute).Add(15 * time.Minute)
	src.fail.Store(true)
	set(4 * time.Minute)
	if tok, err := get(); err != nil || tok != second {
		t.Fatalf("with the backend down, inside the window: %v", err)
	}
	waitFor(t, func() bool { return src.calls.Load() == 3 })
	time.Sleep(50 * time.Millisecond) // let the failed refresh record its backoff
	if tok, err := get(); err != nil || tok != second {
		t.Fatalf("after a failed refresh: %v", err)
	}
	time.Sleep(50 * time.Millisecond)
	if n := src.calls.Load(); n != 3 {
		t.Fatalf("%d calls: a failed refresh was retried before refreshRetry", n)
	}
	set(4*time.Minute - refreshRetry - time.Second)
	waitFor(t, func() bool {
		// A hit after the retry delay starts the next attempt (polled: the
		// failed attempt may still be finishing on a loaded machine).
		if tok, err := get(); err != nil || tok != second {
			t.Fatalf("after the retry delay: %v", err)
		}
		return src.calls.Load() >= 4
	})

	// Within the hinted 60s margin: never served; the foreground fetch fails.
	set(59 * time.Second)
	if _, err := get(); err == nil {
		t.Fatal("a credential within its margin was served")
	}
	src.fail.Store(false)
	if tok, err := get(); err != nil || tok == second {
		t.Fatalf("after recovery: %v", err)
	}

	t.Run("hints only raise options", func(t *testing.T) {
		cc := NewCache("x", &hintedSource{srcFunc: minting(clock, time.Hour)}, CacheOptions{TTL: time.Hour, Margin: 2 * time.Minute, Refresh: 10 * time.Minute}).(*cache)
		if cc.margin != 2*time.Minute || cc.refresh != 10*time.Minute {
			t.Fatalf("margin %s refresh %s", cc.margin, cc.refresh)
		}
		cc = NewCache("y", &hintedSource{srcFunc: minting(clock, time.Hour)}, CacheOptions{TTL: time.Hour}).(*cache)
		if cc.margin != time.Minute || cc.refresh != 5*time.Minute {
			t.Fatalf("margin %s refresh %s", cc.margin, cc.refresh)
		}
		if nc := NewCache("z", minting(clock, time.Hour), CacheOptions{TTL: time.Hour}).(*cache); nc.refresh != 0 || nc.margin != DefaultMargin {
			t.Fatalf("without hints: margin %s refresh %s", nc.margin, nc.refresh)
		}
	})
}
