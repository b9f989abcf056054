package inject

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"

	"github.com/keygate/broker/internal/broker"
)

// The tests in this file talk to the real MinIO STS (testservers), like
// sts_test.go; they record the STS calls the broker's client makes.

// stsRecorder records the form of every STS call and can fail them.
type stsRecorder struct {
	rt   http.RoundTripper
	mu   sync.Mutex
	form []url.Values
	down bool // answer every call with a connection error
}

func (s *stsRecorder) RoundTrip(r *http.Request) (*http.Response, error) {
	var body []byte
	if r.Body != nil {
		body, _ = io.ReadAll(r.Body)
		r.Body.Close()
		r.Body = io.NopCloser(bytes.NewReader(body))
	}
	f, _ := url.ParseQuery(string(body))
	s.mu.Lock()
	s.form = append(s.form, f)
	down := s.down
	s.mu.Unlock()
	if down {
		return nil, errors.New("sts unreachable (test)")
	}
	return s.rt.RoundTrip(r)
}

func (s *stsRecorder) calls() []url.Values {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]url.Values(nil), s.form...)
}

func (s *stsRecorder) setDown(d bool) {
	s.mu.Lock()
	s.down = d
	s.mu.Unlock()
}

func recordedSTS(t *testing.T) (*stsWorld, *stsRecorder) {
	t.Helper()
	w := newSTSWorld(t)
	rec := &stsRecorder{rt: w.rt}
	w.client = &http.Client{Transport: rec}
	return w, rec
}

func policyFor(bucket string) string {
	return `{"Statement":[{"Action":["s3:GetObject"],"Effect":"Allow","Resource":["arn:aws:s3:::` + bucket + `/*"]}],"Version":"2012-10-17"}`
}

// TestSTSSessionPolicyAlwaysSent (SECURITY-TESTS §4, T-B7): when a
// credential has a session policy, every STS call carries the policy
// derived for that caller and request — first mints, per-key mints, early
// refreshes and the web-identity call — and when the policy cannot be
// computed, or comes out empty, no session is minted at all.
func TestSTSSessionPolicyAlwaysSent(t *testing.T) {
	w, rec := recordedSTS(t)
	clock := &fakeClock{t: time.Now()}
	derive := func(_ context.Context, _ broker.Identity, tg broker.Target) (map[string]string, error) {
		bucket := strings.Split(strings.TrimPrefix(tg.Path, "/"), "/")[0]
		if bucket == "" {
			return nil, errors.New("no bucket in the path")
		}
		return map[string]string{ParamSessionPolicy: policyFor(bucket)}, nil
	}
	src := WithParams(NewCache("aws-ci", w.source(t, STSOptions{SourceIdentity: true}), CacheOptions{TTL: time.Hour, Clock: clock}), derive)
	other := broker.Identity{ID: "spiffe://example.org/other", Method: broker.MethodSPIFFEX509, TrustDomain: "example.org"}
	get := func(id broker.Identity, path string) (broker.Credential, error) {
		return src.Credential(context.Background(), id, broker.Grant{Credential: "aws-ci", Rule: "r", Target: broker.Target{Path: path}})
	}
	wantPolicies := []string{}
	for _, c := range []struct {
		id   broker.Identity
		path string
	}{{ciIdentity, "/bucket-a/x"}, {ciIdentity, "/bucket-b/x"}, {other, "/bucket-a/x"}, {ciIdentity, "/bucket-a/y"}} {
		if _, err := get(c.id, c.path); err != nil {
			t.Fatalf("Credential: %v", err)
		}
		wantPolicies = append(wantPolicies, policyFor(strings.Split(c.path, "/")[1]))
	}
	wantPolicies = wantPolicies[:3] // the fourth is a cache hit

	// An early refresh sends the same policy again.
	cr, err := get(ciIdentity, "/bucket-a/z")
	if err != nil {
		t.Fatal(err)
	}
	clock.Advance(cr.Expires.Sub(clock.Now()) - STSRefresh + time.Second)
	if _, err := get(ciIdentity, "/bucket-a/z"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return len(rec.calls()) == 4 })
	wantPolicies = append(wantPolicies, policyFor("bucket-a"))

	calls := rec.calls()
	if len(calls) != len(wantPolicies) {
		t.Fatalf("%d STS calls, want %d", len(calls), len(wantPolicies))
	}
	for i, f := range calls {
		if f.Get("Action") != "AssumeRole" || f.Get("Policy") != wantPolicies[i] {
			t.Errorf("call %d: action %q policy %q, want AssumeRole with %q", i, f.Get("Action"), f.Get("Policy"), wantPolicies[i])
		}
		if f.Get("RoleSessionName") == "" || f.Get("SourceIdentity") != f.Get("RoleSessionName") || f.Get("DurationSeconds") != "900" {
			t.Errorf("call %d: session %q source identity %q duration %q", i, f.Get("RoleSessionName"), f.Get("SourceIdentity"), f.Get("DurationSeconds"))
		}
	}

	t.Run("policy cannot be computed: no STS call", func(t *testing.T) {
		before := len(rec.calls())
		_, err := get(ciIdentity, "/")
		var be *broker.Error
		if !errors.As(err, &be) || be.Code != broker.CodeDenied {
			t.Fatalf("error %v, want 403 denied", err)
		}
		if n := len(rec.calls()) - before; n != 0 {
			t.Fatalf("%d STS calls without a policy", n)
		}
	})
	t.Run("empty policy: no STS call", func(t *testing.T) {
		before := len(rec.calls())
		raw := w.source(t, STSOptions{})
		for _, p := range []string{"", "  "} {
			if _, err := raw.Credential(context.Background(), ciIdentity, broker.Grant{Params: map[string]string{ParamSessionPolicy: p}}); err == nil {
				t.Fatalf("policy %q: a session was minted", p)
			}
		}
		if n := len(rec.calls()) - before; n != 0 {
			t.Fatalf("%d STS calls with an empty policy", n)
		}
	})
	t.Run("web identity carries the policy", func(t *testing.T) {
		before := len(rec.calls())
		// MinIO refuses this token (no issuer is configured); the call it
		// received is what matters.
		web := w.source(t, STSOptions{WebIdentity: StaticToken("not-a-jwt")})
		_, _ = web.Credential(context.Background(), ciIdentity, broker.Grant{Params: map[string]string{ParamSessionPolicy: policyFor("bucket-w")}})
		calls := rec.calls()[before:]
		if len(calls) == 0 {
			t.Fatal("no STS call")
		}
		for _, f := range calls {
			if f.Get("Action") != "AssumeRoleWithWebIdentity" || f.Get("Policy") != policyFor("bucket-w") {
				t.Fatalf("action %q policy %q", f.Get("Action"), f.Get("Policy"))
			}
		}
	})
}

// StaticToken is a TokenSource with a fixed value (tests).
type StaticToken string

func (s StaticToken) Token(context.Context) (broker.Secret, error) {
	return broker.NewSecret(string(s)), nil
}

// TestNeverInjectNearExpiry (SECURITY-TESTS §4, F-06, F-17; fake clock,
// real MinIO STS): a cached STS session is refreshed in the background
// from 5 minutes before its Expiration; while STS is down the old session
// is still served until 60 s before it ends, and never after; the sigv4
// injector refuses any credential within 60 s of its Expiration.
func TestNeverInjectNearExpiry(t *testing.T) {
	w, rec := recordedSTS(t)
	clock := &fakeClock{t: time.Now()}
	src := NewCache("aws-ci", w.source(t, STSOptions{}), CacheOptions{TTL: time.Hour, Clock: clock})
	signer := mustSigV4(t, SigV4Options{Clock: clock, Service: "s3", Region: "us-east-1"})
	g := broker.Grant{Credential: "aws-ci", Rule: "r"}
	akid := func(c broker.Credential) string { s, _ := c.Field(broker.FieldAccessKeyID); return s.Reveal() }
	fetchAndSign := func() (broker.Credential, error) {
		c, err := src.Credential(context.Background(), ciIdentity, g)
		if err != nil {
			return c, err
		}
		r, _ := http.NewRequest(http.MethodGet, w.m.Endpoint+"/bucket/key", nil)
		if err := signer.Inject(r, c); err != nil {
			return c, err
		}
		if !strings.Contains(r.Header.Get("Authorization"), akid(c)) {
			t.Fatal("signed with another key")
		}
		return c, nil
	}
	at := func(exp time.Time, before time.Duration) {
		clock.mu.Lock()
		clock.t = exp.Add(-before)
		clock.mu.Unlock()
	}

	first, err := fetchAndSign()
	if err != nil {
		t.Fatal(err)
	}
	if got := first.Expires.Sub(clock.Now()); got < 14*time.Minute || got > 16*time.Minute {
		t.Fatalf("session lasts %s, want about 15m", got)
	}

	// Outside the refresh window: a plain hit.
	at(first.Expires, STSRefresh+time.Minute)
	if c, err := fetchAndSign(); err != nil || akid(c) != akid(first) || len(rec.calls()) != 1 {
		t.Fatalf("hit before the refresh window: err %v, %d STS calls", err, len(rec.calls()))
	}
	// Inside it: the hit is served at once and a refresh runs behind it.
	at(first.Expires, STSRefresh-time.Second)
	if c, err := fetchAndSign(); err != nil || akid(c) != akid(first) {
		t.Fatalf("hit in the refresh window: %v", err)
	}
	waitFor(t, func() bool { return len(rec.calls()) == 2 })
	var second broker.Credential
	waitFor(t, func() bool {
		second, err = fetchAndSign()
		return err == nil && akid(second) != akid(first)
	})

	// STS goes down; the refresh of the second session fails, and the
	// second session is served while more than 60 s remain.
	rec.setDown(true)
	for _, left := range []time.Duration{STSRefresh - time.Second, 2 * time.Minute, MinSigV4Lifetime + time.Second} {
		at(second.Expires, left)
		c, err := fetchAndSign()
		if err != nil || akid(c) != akid(second) {
			t.Fatalf("%s before expiry with STS down: err %v (want the cached session)", left, err)
		}
	}
	// Within 60 s: refused, never injected.
	for _, left := range []time.Duration{MinSigV4Lifetime, 30 * time.Second, time.Second} {
		at(second.Expires, left)
		_, err := fetchAndSign()
		var be *broker.Error
		if !errors.As(err, &be) || be.Status() != http.StatusServiceUnavailable {
			t.Fatalf("%s before expiry: err %v, want 503", left, err)
		}
	}
	// STS is back: a fresh session. (MinIO dates it by the real clock, so
	// the fake clock returns to real time first.)
	rec.setDown(false)
	clock.mu.Lock()
	clock.t = time.Now()
	clock.mu.Unlock()
	third, err := fetchAndSign()
	if err != nil || akid(third) == akid(second) {
		t.Fatalf("after STS recovered: %v", err)
	}

	t.Run("injector refuses near expiry whatever the source", func(t *testing.T) {
		now := clock.Now()
		for _, tc := range []struct {
			left time.Duration
			ok   bool
		}{{-time.Minute, false}, {0, false}, {59 * time.Second, false}, {60 * time.Second, false}, {61 * time.Second, true}, {time.Hour, true}} {
			c := awsCred(testAKID, testSecret, "tok")
			c.Expires = now.Add(tc.left)
			r, _ := http.NewRequest(http.MethodGet, "https://bucket.s3.us-east-1.amazonaws.com/k", nil)
			r.Header.Set("Authorization", "workload")
			err := signer.Inject(r, c)
			if tc.ok != (err == nil) {
				t.Fatalf("%s left: err %v, want ok=%v", tc.left, err, tc.ok)
			}
			if !tc.ok && r.Header.Get("Authorization") != "workload" {
				t.Fatalf("%s left: the request was changed before the refusal", tc.left)
			}
		}
		// No expiry known (static keys): signed.
		r, _ := http.NewRequest(http.MethodGet, "https://bucket.s3.us-east-1.amazonaws.com/k", nil)
		if err := signer.Inject(r, awsCred(testAKID, testSecret, "")); err != nil {
			t.Fatal(err)
		}
	})
}

// TestSTSDurationValidated (SECURITY-TESTS §4): STS's DurationSeconds range
// is 900 s to 12 h; the source refuses anything outside it at build time
// (the config loader reports the same: internal/config TestBrokenConfigs,
// testdata/broken/aws-sts).
func TestSTSDurationValidated(t *testing.T) {
	for _, tc := range []struct {
		d  time.Duration
		ok bool
	}{
		{899 * time.Second, false}, {-time.Hour, false}, {900 * time.Second, true}, {time.Hour, true},
		{12 * time.Hour, true}, {12*time.Hour + time.Second, false}, {0, true}, // 0: the 15m default
	} {
		src, err := NewSTS(context.Background(), "x", STSOptions{RoleARN: testRole, Duration: tc.d, Credentials: aws.AnonymousCredentials{}})
		if tc.ok != (err == nil) {
			t.Errorf("duration %s: err %v, want ok=%v", tc.d, err, tc.ok)
		}
		if tc.ok && src == nil {
			t.Errorf("duration %s: no source", tc.d)
		}
	}
}

// waitFor polls cond for up to 10 s (background refreshes).
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
