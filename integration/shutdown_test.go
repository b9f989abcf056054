package integration

import (
	"bytes"
	"fmt"
	"net/http"
	"syscall"
	"testing"
	"time"
)

// TestSIGTERMUnderLoad: SIGTERM while 8 keep-alive clients send GET /x
// through intercepted tunnels to a slow upstream that streams its body in
// two halves 200 ms apart. The broker exits 0 within the shutdown
// deadline; every request the upstream received carried exactly one full
// credential; every client saw a complete 200 or a connection error, never
// a 200 with a truncated body; requests in flight at SIGTERM finished.
func TestSIGTERMUnderLoad(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	const half = 32 << 10
	first, second := bytes.Repeat([]byte("a"), half), bytes.Repeat([]byte("b"), half)
	want := string(first) + string(second)
	up := newUpstream(t, "slow", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(2*half))
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write(first)
		w.(http.Flusher).Flush()
		time.Sleep(200 * time.Millisecond)
		_, _ = w.Write(second)
	}))
	b := h.startAPI(up)
	target := fmt.Sprintf("https://localhost:%d/x", up.port())

	load := h.startLoad(b, target, "sigterm load GET /x", false)
	stopLoad := load.stop

	time.Sleep(1200 * time.Millisecond) // several rounds of requests, then SIGTERM mid-response
	sigAt := time.Now()
	if err := b.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	// Run's shutdown deadline is 10 s; allow a little for process exit.
	b.awaitExit(t, testTimeout+2*time.Second)
	exitAfter := time.Since(sigAt)
	time.Sleep(300 * time.Millisecond) // let clients observe the closed connections
	stopLoad()

	res := load.results()
	ok, errs, inflightDone, bad := 0, 0, 0, 0
	for i, r := range res {
		switch {
		case r.err != nil:
			errs++
		case r.status == http.StatusOK && r.body == want:
			ok++
			if r.start.Before(sigAt) && r.end.After(sigAt) {
				inflightDone++
			}
		default:
			bad++
			if bad <= 10 {
				t.Errorf("request %d (started %v before SIGTERM, took %v): status %d with a %d-byte body (want a complete 200 of %d bytes or a connection error)",
					i, sigAt.Sub(r.start), r.end.Sub(r.start), r.status, len(r.body), len(want))
			}
		}
	}
	t.Logf("broker exited %v after SIGTERM; %d complete 200s (%d in flight at SIGTERM), %d connection errors, %d bad",
		exitAfter, ok, inflightDone, errs, bad)
	if ok == 0 {
		t.Errorf("no request completed")
	}
	if inflightDone == 0 {
		t.Errorf("no request in flight at SIGTERM completed: shutdown is not graceful")
	}

	// Every request the upstream received carried the full credential.
	reqs := up.requests()
	if len(reqs) < ok {
		t.Errorf("upstream received %d requests, fewer than the %d answered", len(reqs), ok)
	}
	for i, r := range reqs {
		if len(r.Auth) != 1 || r.Auth[0] != h.bearer() {
			t.Errorf("upstream request %d: Authorization %s, want exactly one equal to the injected value",
				i, describeAuth(r.Auth, h.bearer()))
		}
	}
}
