//go:build load

package integration

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// The load scenarios of SECURITY-TESTS.md §6 (L-01..L-11) run only with
// `-tags load` (`make load`): they take minutes and saturate the machine,
// so they are not part of `make test`. Everything is on loopback, every
// scenario is bounded by LOAD_DURATION (default 30s; the soak by
// LOAD_SOAK, default 20m) and by the go test -timeout. Each test logs one
// machine-readable line starting with "LOAD L-nn".

// loadDuration is the length of one measured load phase.
func loadDuration(t *testing.T) time.Duration { return envDuration(t, "LOAD_DURATION", 30*time.Second) }

// soakDuration is the length of L-10.
func soakDuration(t *testing.T) time.Duration { return envDuration(t, "LOAD_SOAK", 20*time.Minute) }

func envDuration(t *testing.T, name string, def time.Duration) time.Duration {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q: not a positive duration", name, v)
	}
	return d
}

// leakCheck verifies at the very end of the test (it must be called
// first, so its cleanup runs after every broker, server and client has
// been closed) that the test process leaked no goroutine.
func leakCheck(t *testing.T) {
	t.Helper()
	opts := []goleak.Option{goleak.IgnoreCurrent()}
	t.Cleanup(func() {
		if err := goleak.Find(opts...); err != nil {
			t.Errorf("goroutines leaked by the test process: %v", err)
		}
	})
}

// logResult writes the scenario's machine-readable line, and appends it to
// $LOAD_RESULTS when set.
func logResult(t *testing.T, id string, kv ...any) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "LOAD %s", id)
	for i := 0; i+1 < len(kv); i += 2 {
		fmt.Fprintf(&b, " %v=%v", kv[i], fmtValue(kv[i+1]))
	}
	line := b.String()
	t.Log(line)
	if p := os.Getenv("LOAD_RESULTS"); p != "" {
		f, err := os.OpenFile(p, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err == nil {
			fmt.Fprintln(f, line)
			f.Close()
		}
	}
}

func fmtValue(v any) string {
	switch x := v.(type) {
	case time.Duration:
		return x.Round(10 * time.Microsecond).String()
	case float64:
		return strconv.FormatFloat(x, 'f', 2, 64)
	default:
		return fmt.Sprint(v)
	}
}

// ---- broker process statistics

// procStats is one sample of the broker process: goroutines, heap and CPU
// from its own /metrics (Go and process collectors), fds and RSS from /proc.
type procStats struct {
	Goroutines int
	FDs        int
	RSSKiB     int64
	HWMKiB     int64 // peak RSS
	HeapBytes  float64
	CPUSeconds float64
}

func (s procStats) String() string {
	return fmt.Sprintf("goroutines=%d fds=%d rss=%dMiB heap=%.1fMiB", s.Goroutines, s.FDs, s.RSSKiB>>10, s.HeapBytes/(1<<20))
}

// stats samples the broker process.
func (b *brokerProc) stats(t *testing.T) procStats {
	t.Helper()
	pid := b.cmd.Process.Pid
	m := b.metrics(t, "go_goroutines", "go_memstats_heap_inuse_bytes", "process_cpu_seconds_total")
	if _, ok := m["go_goroutines"]; !ok {
		t.Fatalf("the broker's /metrics has no go_goroutines: the Go collector is not registered")
	}
	s := procStats{Goroutines: int(m["go_goroutines"]), HeapBytes: m["go_memstats_heap_inuse_bytes"], CPUSeconds: m["process_cpu_seconds_total"]}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatalf("broker fds: %v", err)
	}
	s.FDs = len(ents)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("broker status: %v", err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "VmRSS":
			s.RSSKiB = n
		case "VmHWM":
			s.HWMKiB = n
		}
	}
	return s
}

// metrics reads the named unlabelled series (or exact "name{labels}"
// series) from the broker's /metrics in one request.
func (b *brokerProc) metrics(t *testing.T, series ...string) map[string]float64 {
	t.Helper()
	client := &http.Client{Timeout: testTimeout, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	resp, err := client.Get("http://" + b.adminAddr + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if !ok || !slices.Contains(series, name) {
			continue
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
		if err != nil {
			t.Fatalf("/metrics %q: %v", sc.Text(), err)
		}
		out[name] = f
	}
	return out
}

// medianStats is the per-field median of samples.
func medianStats(samples []procStats) procStats {
	med := func(f func(procStats) float64) float64 {
		v := make([]float64, len(samples))
		for i, s := range samples {
			v[i] = f(s)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	return procStats{
		Goroutines: int(med(func(s procStats) float64 { return float64(s.Goroutines) })),
		FDs:        int(med(func(s procStats) float64 { return float64(s.FDs) })),
		RSSKiB:     int64(med(func(s procStats) float64 { return float64(s.RSSKiB) })),
		HWMKiB:     int64(med(func(s procStats) float64 { return float64(s.HWMKiB) })),
		HeapBytes:  med(func(s procStats) float64 { return s.HeapBytes }),
		CPUSeconds: med(func(s procStats) float64 { return s.CPUSeconds }),
	}
}

// settle waits up to within for the broker's goroutines and fds to come
// back to base ±tol and returns the last sample and whether they did.
func (b *brokerProc) settle(t *testing.T, base procStats, tol int, within time.Duration) (procStats, bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		s := b.stats(t)
		if abs(s.Goroutines-base.Goroutines) <= tol && abs(s.FDs-base.FDs) <= tol {
			return s, true
		}
		if time.Now().After(deadline) {
			return s, false
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func abs(n int) int {
	if n < 0 {
		return -n
	}
	return n
}

// ---- latency recording and the open-loop generator

// latRec records what a load phase saw.
type latRec struct {
	mu       sync.Mutex
	lats     []time.Duration
	errs     int
	codes    map[int]int
	firstErr string
}

func newLatRec() *latRec { return &latRec{codes: map[int]int{}} }

// add records one request; a non-2xx status counts as an error unless ok
// accepts it.
func (r *latRec) add(d time.Duration, code int, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lats = append(r.lats, d)
	r.codes[code]++
	if err != nil || code < 200 || code > 299 {
		r.errs++
		if r.firstErr == "" {
			if err != nil {
				r.firstErr = redactCanary(err.Error())
			} else {
				r.firstErr = "status " + strconv.Itoa(code)
			}
		}
	}
}

type latSummary struct {
	N, Errors          int
	P50, P99, Max      time.Duration
	FirstErr           string
	Codes              map[int]int
	Achieved, Duration float64 // requests/s, seconds
}

func (r *latRec) summary(d time.Duration) latSummary {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := latSummary{N: len(r.lats), Errors: r.errs, FirstErr: r.firstErr, Codes: map[int]int{}, Duration: d.Seconds()}
	for k, v := range r.codes {
		s.Codes[k] = v
	}
	if len(r.lats) == 0 {
		return s
	}
	l := slices.Clone(r.lats)
	slices.Sort(l)
	q := func(p float64) time.Duration { return l[min(len(l)-1, int(p*float64(len(l))))] }
	s.P50, s.P99, s.Max = q(0.50), q(0.99), l[len(l)-1]
	if d > 0 {
		s.Achieved = float64(s.N) / d.Seconds()
	}
	return s
}

// openLoop sends at rate requests/s for dur, each in its own goroutine,
// whatever the latency of the earlier ones (open loop: a slow broker
// cannot slow the arrivals down). Latency is measured from the scheduled
// send time, so queueing in the generator counts too (no coordinated
// omission). Beyond maxInFlight outstanding requests a send is recorded as
// an error instead of piling up goroutines.
func openLoop(ctx context.Context, rate float64, dur time.Duration, maxInFlight int, do func(ctx context.Context) (int, error)) latSummary {
	rec := newLatRec()
	start := time.Now()
	openLoopInto(ctx, rec, rate, dur, maxInFlight, do)
	return rec.summary(time.Since(start))
}

// openLoopInto is openLoop adding to rec.
func openLoopInto(ctx context.Context, rec *latRec, rate float64, dur time.Duration, maxInFlight int, do func(ctx context.Context) (int, error)) {
	interval := time.Duration(float64(time.Second) / rate)
	start := time.Now()
	var wg sync.WaitGroup
	var inFlight atomic.Int64
	for i := 0; ; i++ {
		at := start.Add(time.Duration(i) * interval)
		if at.Sub(start) >= dur || ctx.Err() != nil {
			break
		}
		if w := time.Until(at); w > 0 {
			time.Sleep(w)
		}
		if inFlight.Load() >= int64(maxInFlight) {
			rec.add(time.Since(at), 0, errors.New("generator: too many requests in flight"))
			continue
		}
		inFlight.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer inFlight.Add(-1)
			// Not ctx: cancelling the schedule stops new sends but lets
			// the requests already sent finish.
			rctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			defer cancel()
			code, err := do(rctx)
			rec.add(time.Since(at), code, err)
		}()
	}
	wg.Wait()
}

// getter returns a generator request function: GET target with client,
// body drained.
func getter(client *http.Client, target string) func(ctx context.Context) (int, error) {
	return func(ctx context.Context) (int, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
		if err != nil {
			return 0, err
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, nil
	}
}

// ---- clients

// proxyClient is a keep-alive client through the broker (plain http:// as
// absolute-form requests, https:// through intercepted CONNECT tunnels)
// that trusts only the broker CA. Its idle connections are closed at
// cleanup.
func (h *harness) proxyClient(b *brokerProc, conns int, keepAlive bool) *http.Client {
	pu, err := url.Parse(b.proxyURL())
	if err != nil {
		h.t.Fatal(err)
	}
	tr := &http.Transport{
		Proxy:               http.ProxyURL(pu),
		TLSClientConfig:     &tls.Config{RootCAs: h.caPool(), MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout: testTimeout,
		MaxIdleConnsPerHost: conns,
		MaxIdleConns:        conns,
		DisableKeepAlives:   !keepAlive,
		DisableCompression:  true,
	}
	h.t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: testTimeout}
}

// directClient is a keep-alive client straight to an upstream (the
// baseline), trusting roots.
func directClient(t *testing.T, roots *x509.CertPool, conns int) *http.Client {
	tr := &http.Transport{
		Proxy:               nil,
		TLSClientConfig:     &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
		MaxIdleConnsPerHost: conns,
		MaxIdleConns:        conns,
		DisableCompression:  true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: testTimeout}
}

// dialTunnel opens a CONNECT tunnel to authority; it returns the broker's
// status and, on 200, the open connection (deadline d from now).
func dialTunnel(ctx context.Context, proxyAddr, authority string, d time.Duration) (net.Conn, int, error) {
	var dl net.Dialer
	c, err := dl.DialContext(ctx, "tcp", proxyAddr)
	if err != nil {
		return nil, 0, err
	}
	_ = c.SetDeadline(time.Now().Add(d))
	if _, err := io.WriteString(c, "CONNECT "+authority+" HTTP/1.1\r\nHost: "+authority+"\r\n\r\n"); err != nil {
		c.Close()
		return nil, 0, err
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		c.Close()
		return nil, 0, err
	}
	if resp.StatusCode != http.StatusOK {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		c.Close()
		return nil, resp.StatusCode, nil
	}
	if br.Buffered() > 0 {
		c.Close()
		return nil, resp.StatusCode, errors.New("bytes after the CONNECT answer")
	}
	return c, resp.StatusCode, nil
}

// tunnelGet is one whole MITM exchange on a fresh connection: CONNECT,
// TLS (trusting only the broker CA), GET path with Connection: close.
func tunnelGet(ctx context.Context, proxyAddr, authority, serverName string, roots *x509.CertPool, path string) (int, error) {
	c, code, err := dialTunnel(ctx, proxyAddr, authority, testTimeout)
	if err != nil || c == nil {
		if err == nil {
			err = fmt.Errorf("CONNECT answered %d", code)
		}
		return code, err
	}
	defer c.Close()
	tc := tls.Client(c, &tls.Config{ServerName: serverName, RootCAs: roots, MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}})
	if err := tc.HandshakeContext(ctx); err != nil {
		return 0, fmt.Errorf("TLS in the tunnel: %w", err)
	}
	if _, err := fmt.Fprintf(tc, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", path, authority); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

// waitClosed reports how long until the peer closed c (a read returning
// an error other than a timeout), up to max.
func waitClosed(c net.Conn, max time.Duration) (time.Duration, bool) {
	start := time.Now()
	_ = c.SetReadDeadline(start.Add(max))
	buf := make([]byte, 4096)
	for {
		_, err := c.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return time.Since(start), false
			}
			return time.Since(start), true
		}
	}
}

// ---- upstreams

// loadPKI is an upstream CA (its PEM in bundle, for egress.ca_bundle) and
// one leaf for localhost and the given loopback addresses.
type loadPKI struct {
	bundle string
	pool   *x509.CertPool
	leaf   tls.Certificate
}

func newLoadPKI(t *testing.T, ips []string) loadPKI {
	t.Helper()
	ca := newGatePKI(t)
	var addrs []net.IP
	for _, ip := range ips {
		addrs = append(addrs, net.ParseIP(ip))
	}
	now := time.Now()
	p := loadPKI{bundle: ca.bundle, pool: x509.NewCertPool()}
	p.pool.AddCert(ca.cert)
	p.leaf = ca.leaf(t, []string{"localhost"}, addrs, now.Add(-time.Hour), now.Add(24*time.Hour), false)
	return p
}

// countingUpstream answers 200 "ok" and counts requests by whether they
// carried exactly one Authorization equal to one of the accepted values.
// It keeps counters only (not every request, as upstream does), so a
// long run costs no memory.
type countingUpstream struct {
	srv       *http.Server
	lns       []net.Listener
	port      int
	accept    atomic.Pointer[[]string]
	good, bad atomic.Int64
}

// newCountingUpstream listens on every ip at one common port (TLS with
// pki's leaf unless pki is nil) and accepts the Authorization values in
// accept.
func newCountingUpstream(t *testing.T, ips []string, pki *loadPKI, accept ...string) *countingUpstream {
	t.Helper()
	u := &countingUpstream{}
	u.setAccepted(accept)
	u.srv = &http.Server{
		Handler:           http.HandlerFunc(u.serve),
		ReadHeaderTimeout: 10 * time.Second,
		// TLS handshake timeouts under overload are expected and counted
		// by the scenarios themselves; net/http's log lines are noise.
		ErrorLog: log.New(io.Discard, "", 0),
	}
	if pki != nil {
		u.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{pki.leaf}, MinVersion: tls.VersionTLS12}
	}
	for attempt := 0; ; attempt++ {
		lns, port, err := listenAll(ips)
		if err == nil {
			u.lns, u.port = lns, port
			break
		}
		if attempt == 5 {
			t.Fatalf("upstream listeners: %v", err)
		}
	}
	u.start(pki != nil)
	t.Cleanup(func() { _ = u.srv.Close() })
	return u
}

func (u *countingUpstream) start(tlsOn bool) {
	for _, ln := range u.lns {
		go func() {
			if tlsOn {
				_ = u.srv.ServeTLS(ln, "", "")
			} else {
				_ = u.srv.Serve(ln)
			}
		}()
	}
}

// listenAll binds ips[0]:0 and then every other ip on the same port.
func listenAll(ips []string) ([]net.Listener, int, error) {
	first, err := net.Listen("tcp", net.JoinHostPort(ips[0], "0"))
	if err != nil {
		return nil, 0, err
	}
	port := first.Addr().(*net.TCPAddr).Port
	lns := []net.Listener{first}
	for _, ip := range ips[1:] {
		ln, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, 0, err
		}
		lns = append(lns, ln)
	}
	return lns, port, nil
}

func (u *countingUpstream) setAccepted(vals []string) { u.accept.Store(&vals) }

func (u *countingUpstream) serve(w http.ResponseWriter, r *http.Request) {
	auth := r.Header.Values("Authorization")
	idx := -1
	if len(auth) == 1 {
		idx = slices.Index(*u.accept.Load(), auth[0])
	}
	if idx < 0 {
		u.bad.Add(1)
	} else {
		u.good.Add(1)
	}
	_, _ = io.Copy(io.Discard, r.Body)
	// The answer never echoes the credential; "ok" or which value index.
	w.Header().Set("Content-Type", "text/plain")
	fmt.Fprintf(w, "ok %d\n", idx)
}

// loadLimits renders the broker limits section.
func loadLimits(readHeader, idle time.Duration, maxHeaderBytes int) string {
	s := "limits:\n"
	if readHeader > 0 {
		s += fmt.Sprintf("  read_header_timeout: %s\n", readHeader)
	}
	if idle > 0 {
		s += fmt.Sprintf("  idle_timeout: %s\n", idle)
	}
	if maxHeaderBytes > 0 {
		s += fmt.Sprintf("  max_header_bytes: %d\n", maxHeaderBytes)
	}
	return s
}

// loadBase is the listeners, the broker CA, a CIDR identity for loopback
// callers and egress to loopback trusting bundle; rules follow.
func loadBase(bundle string) string {
	return `
listen:
  proxy: {{.Proxy}}
  admin: {{.Admin}}
ca:
  cert: {{.CACert}}
  key: {{.CAKey}}
attestors:
  - type: cidr
    identities: [{id: load-workload, cidrs: [127.0.0.0/8]}]
egress:
  allow_cidrs: [127.0.0.0/8]
  ca_bundle: ` + bundle + `
`
}

// loopbackIPs are 127.0.0.1 .. 127.0.0.n.
func loopbackIPs(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("127.0.0.%d", i+1)
	}
	return out
}

// adminLatency is how long /healthz takes to answer 200.
func adminLatency(b *brokerProc) (time.Duration, error) {
	client := &http.Client{Timeout: testTimeout, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	start := time.Now()
	resp, err := client.Get("http://" + b.adminAddr + "/healthz")
	if err != nil {
		return time.Since(start), err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return time.Since(start), fmt.Errorf("healthz %d", resp.StatusCode)
	}
	return time.Since(start), nil
}
