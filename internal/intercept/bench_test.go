package intercept

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/elazarl/goproxy"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/keygate/broker/internal/attest"
	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/inject"
	"github.com/keygate/broker/internal/intercept/ca"
	"github.com/keygate/broker/internal/intercept/egress"
	"github.com/keygate/broker/internal/rules"
)

// The throughput benchmark (docs/performance.md): keep-alive HTTPS GETs
// through keygate's interception with bearer injection, through a bare
// goproxy MITM that sets one header, and straight to the upstream. Same
// client settings, same upstream, same process, one run. The target is
// keygate >= 90 % of bare goproxy's req/s.

const (
	// benchParallelism multiplies GOMAXPROCS into the number of client
	// goroutines, each with its own keep-alive connection.
	benchParallelism = 4
	benchBodySize    = 1 << 10
	benchToken       = "kg-bench-static-token-6f1d2c9e8a7b"
	benchProbePath   = "/probe"
)

var benchBody = make([]byte, benchBodySize)

// benchUpstream is the one upstream every mode talks to. It records the
// Authorization header of /probe requests only, so the timed requests do
// no extra work.
type benchUpstream struct {
	srv  *httptest.Server
	ca   *x509.Certificate
	port int

	mu        sync.Mutex
	probes    int
	probeAuth []string
}

func (u *benchUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == benchProbePath {
		u.mu.Lock()
		u.probes++
		u.probeAuth = slices.Clone(r.Header.Values("Authorization"))
		u.mu.Unlock()
	}
	h := w.Header()
	h["Content-Type"] = []string{"application/octet-stream"}
	h["Content-Length"] = []string{strconv.Itoa(benchBodySize)}
	_, _ = w.Write(benchBody)
}

// takeProbe returns what the last /probe carried and how many arrived
// since the previous call.
func (u *benchUpstream) takeProbe() (int, []string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	n, a := u.probes, u.probeAuth
	u.probes, u.probeAuth = 0, nil
	return n, a
}

// benchCA is an in-test ECDSA P-256 CA.
type benchCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func benchNewCA(b *testing.B, cn string) *benchCA {
	b.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		b.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		b.Fatal(err)
	}
	return &benchCA{cert: cert, key: key}
}

// tlsCert is the CA as a tls.Certificate, the form goproxy signs with.
func (c *benchCA) tlsCert() tls.Certificate {
	return tls.Certificate{Certificate: [][]byte{c.cert.Raw}, PrivateKey: c.key, Leaf: c.cert}
}

// leaf issues a server certificate for 127.0.0.1, ::1 and localhost.
func (c *benchCA) leaf(b *testing.B) tls.Certificate {
	b.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		b.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der, c.cert.Raw}, PrivateKey: key}
}

func benchNewUpstream(b *testing.B) *benchUpstream {
	b.Helper()
	authority := benchNewCA(b, "keygate bench upstream CA")
	u := &benchUpstream{ca: authority.cert}
	u.srv = httptest.NewUnstartedServer(u)
	u.srv.TLS = &tls.Config{Certificates: []tls.Certificate{authority.leaf(b)}, MinVersion: tls.VersionTLS12}
	u.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	u.srv.StartTLS() // HTTP/1.1 only (EnableHTTP2 is false)
	b.Cleanup(u.srv.Close)
	pu, err := url.Parse(u.srv.URL)
	if err != nil {
		b.Fatal(err)
	}
	if u.port, err = strconv.Atoi(pu.Port()); err != nil {
		b.Fatal(err)
	}
	return u
}

// benchConns is the number of client goroutines, and so of keep-alive
// connections, in every mode.
func benchConns() int { return runtime.GOMAXPROCS(0) * benchParallelism }

// benchClient is the one client configuration for every mode: HTTP/1.1,
// keep-alive, one idle connection per client goroutine, no compression,
// trusting the upstream CA and (through a proxy) the MITM CA.
func benchClient(proxy *url.URL, roots ...*x509.Certificate) *http.Client {
	pool := x509.NewCertPool()
	for _, c := range roots {
		pool.AddCert(c)
	}
	tr := &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool, NextProtos: []string{"http/1.1"}},
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{}, // no HTTP/2
		ForceAttemptHTTP2:   false,
		MaxIdleConns:        benchConns(),
		MaxIdleConnsPerHost: benchConns(),
		MaxConnsPerHost:     benchConns(),
		IdleConnTimeout:     time.Minute,
		DisableCompression:  true,
	}
	if proxy != nil {
		tr.Proxy = http.ProxyURL(proxy)
	} // nil Proxy: the environment's proxy settings are never read
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// benchServe serves h on a fresh loopback listener until the benchmark ends.
func benchServe(b *testing.B, h http.Handler) *url.URL {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: h, ErrorLog: log.New(io.Discard, "", 0)}
	go func() { _ = srv.Serve(ln) }()
	b.Cleanup(func() { _ = srv.Close() })
	return &url.URL{Scheme: "http", Host: ln.Addr().String()}
}

// benchCertStore is the CertStore goproxy caches its leaves in, so leaf
// minting is not what the goproxy mode measures.
type benchCertStore struct {
	mu    sync.Mutex
	certs map[string]*tls.Certificate
}

func (s *benchCertStore) Fetch(host string, gen func() (*tls.Certificate, error)) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c, ok := s.certs[host]; ok {
		return c, nil
	}
	c, err := gen()
	if err != nil {
		return nil, err
	}
	s.certs[host] = c
	return c, nil
}

// benchPlainDialer lets goproxy use keygate's own upstream transport
// settings (newTransport) with an unguarded dialer.
type benchPlainDialer struct{ net.Dialer }

func (benchPlainDialer) Check(netip.AddrPort) error { return nil }

// benchGoproxy is a bare goproxy MITM under its own ECDSA CA: every CONNECT
// is intercepted, one header is set on every request (the same work as
// keygate's injection), and the upstream transport has keygate's settings.
func benchGoproxy(b *testing.B, up *benchUpstream) (*url.URL, *x509.Certificate) {
	b.Helper()
	mitm := benchNewCA(b, "bench goproxy MITM CA")
	roots := x509.NewCertPool()
	roots.AddCert(up.ca)
	tr := newTransport(&benchPlainDialer{}, roots, Limits{}.withDefaults())
	b.Cleanup(tr.CloseIdleConnections)

	gp := goproxy.NewProxyHttpServer()
	gp.Tr = tr
	gp.Logger = log.New(io.Discard, "", 0)
	gp.CertStore = &benchCertStore{certs: map[string]*tls.Certificate{}}
	caCert := mitm.tlsCert()
	action := &goproxy.ConnectAction{Action: goproxy.ConnectMitm, TLSConfig: goproxy.TLSConfigFromCA(&caCert)}
	gp.OnRequest().HandleConnectFunc(func(host string, _ *goproxy.ProxyCtx) (*goproxy.ConnectAction, string) {
		return action, host
	})
	auth := "Bearer " + benchToken
	gp.OnRequest().DoFunc(func(r *http.Request, _ *goproxy.ProxyCtx) (*http.Request, *http.Response) {
		r.Header.Set("Authorization", auth)
		return r, nil
	})
	return benchServe(b, gp), mitm.cert
}

// benchJSONLogger is the production logger of cmd/broker (JSON, RFC 3339
// nano timestamps, caller, no sampling) writing to io.Discard: encoding the
// audit line is part of the cost.
func benchJSONLogger() *zap.Logger {
	enc := zap.NewProductionEncoderConfig()
	enc.TimeKey = "ts"
	enc.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.AddSync(io.Discard), zapcore.InfoLevel)
	return zap.New(core, zap.AddCaller())
}

// benchNewKeygate is a real Proxy composed as internal/config.Build
// composes it: cidr attestor, one compiled CEL rule injecting a static
// bearer token, guarded egress dialer (refusing self, the listener at
// self), ephemeral CA with its leaf cache, metrics on a fresh registry.
// benchKGOpts varies benchNewKeygate: the rule's host, and transparent mode.
type benchKGOpts struct {
	host        string // default 127.0.0.1
	transparent bool
}

func benchNewKeygate(b *testing.B, up *benchUpstream, logger *zap.Logger, self netip.AddrPort, opts ...benchKGOpts) (*Proxy, *ca.CA) {
	b.Helper()
	o := benchKGOpts{host: "127.0.0.1"}
	if len(opts) > 0 {
		o = opts[0]
	}
	authority, err := ca.Ephemeral("", broker.SystemClock{})
	if err != nil {
		b.Fatal(err)
	}
	metrics := NewMetrics(prometheus.NewRegistry())
	leaves := authority.Leaves(ca.LeafOptions{
		OnMint: metrics.LeafCache.WithLabelValues("mint").Inc,
		OnHit:  metrics.LeafCache.WithLabelValues("hit").Inc,
	})
	cidr, err := attest.NewCIDR([]attest.CIDREntry{{ID: "bench", CIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}})
	if err != nil {
		b.Fatal(err)
	}
	chain := attest.NewChain(nil, attest.Named{Name: "cidr", Attestor: cidr})
	set, errs := rules.Compile([]rules.Spec{{
		Name:   "bench-upstream",
		Hosts:  []string{o.host},
		Ports:  []int{up.port},
		When:   `request.method == "GET"`,
		Inject: &broker.Injection{Credential: "bench-token", Injector: inject.Bearer()},
	}}, rules.Options{})
	if len(errs) > 0 {
		b.Fatalf("rules: %v", errs)
	}
	sources := map[string]broker.Source{
		"bench-token": inject.NewStatic("bench-token", map[string]broker.Secret{broker.FieldToken: broker.NewSecret(benchToken)}),
	}
	roots := x509.NewCertPool()
	if up.ca != nil {
		roots.AddCert(up.ca)
	}
	dialer := egress.New(egress.Options{
		DenyPrivate: true,
		AllowCIDRs:  []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")},
		SelfAddrs:   []netip.AddrPort{self},
	})
	p, err := New(Options{
		Listener:      "proxy",
		Pipeline:      &broker.Pipeline{Attestor: chain, Policy: set, Sources: sources},
		Dialer:        dialer,
		Leaves:        leaves,
		UpstreamRoots: roots,
		Fingerprints:  broker.NewFingerprinter(),
		Logger:        logger,
		Metrics:       metrics,
		Transparent:   o.transparent,
	})
	if err != nil {
		b.Fatal(err)
	}
	return p, authority
}

// benchKeygate serves a benchNewKeygate Proxy on a loopback listener.
func benchKeygate(b *testing.B, up *benchUpstream, logger *zap.Logger) (*url.URL, *x509.Certificate) {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	p, authority := benchNewKeygate(b, up, logger, netip.MustParseAddrPort(ln.Addr().String()))
	go func() { _ = p.Serve(ln) }()
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
	})
	return &url.URL{Scheme: "http", Host: ln.Addr().String()}, authority.Certificate()
}

// benchGet does one GET and drains the body. It returns the response with
// its body closed.
func benchGet(c *http.Client, target string) (*http.Response, int64, error) {
	resp, err := c.Get(target)
	if err != nil {
		return nil, 0, err
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil {
		return resp, n, err
	}
	if resp.StatusCode != http.StatusOK {
		return resp, n, errors.New(resp.Status)
	}
	return resp, n, nil
}

type benchMode struct {
	name   string
	client *http.Client
	// wantAuth is the Authorization the upstream must see ("" for none);
	// wantIssuer the CA that must have signed the certificate the client
	// saw; keygate is set when the response must carry a request id.
	wantAuth   string
	wantIssuer *x509.Certificate
	keygate    bool
}

// benchProbe checks one request through m before anything is timed: 200,
// the full body, the certificate from the expected CA (so the proxy really
// was in the path) and exactly the expected Authorization upstream.
func benchProbe(b *testing.B, up *benchUpstream, m benchMode, base string) {
	b.Helper()
	up.takeProbe()
	resp, n, err := benchGet(m.client, base+benchProbePath)
	if err != nil {
		b.Fatalf("%s: probe: %v", m.name, err)
	}
	if n != benchBodySize {
		b.Fatalf("%s: probe body is %d bytes, want %d", m.name, n, benchBodySize)
	}
	if resp.TLS == nil || len(resp.TLS.PeerCertificates) == 0 {
		b.Fatalf("%s: probe was not over TLS", m.name)
	}
	if err := resp.TLS.PeerCertificates[0].CheckSignatureFrom(m.wantIssuer); err != nil {
		b.Fatalf("%s: probe certificate not issued by %q: %v", m.name, m.wantIssuer.Subject.CommonName, err)
	}
	if m.keygate && resp.Header.Get(HeaderRequestID) == "" {
		b.Fatalf("%s: probe response has no %s", m.name, HeaderRequestID)
	}
	count, auth := up.takeProbe()
	if count != 1 {
		b.Fatalf("%s: upstream saw %d probe requests, want 1", m.name, count)
	}
	switch {
	case m.wantAuth == "" && len(auth) != 0:
		b.Fatalf("%s: upstream saw Authorization %d times, want none", m.name, len(auth))
	case m.wantAuth != "" && (len(auth) != 1 || auth[0] != m.wantAuth):
		// Never print the value: it is the credential.
		b.Fatalf("%s: upstream saw %d Authorization values, want exactly one equal to the static credential", m.name, len(auth))
	}
}

// benchWarm opens every keep-alive connection (and so every TLS handshake
// and MITM leaf lookup) before the timer starts.
func benchWarm(b *testing.B, c *http.Client, target string) {
	b.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, benchConns())
	for range benchConns() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, _, err := benchGet(c, target); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatalf("warm-up: %v", err)
	}
}

func benchRun(b *testing.B, c *http.Client, target string) {
	benchWarm(b, c, target)
	b.ReportAllocs()
	b.SetParallelism(benchParallelism)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			_, n, err := benchGet(c, target)
			if err == nil && n != benchBodySize {
				err = errors.New("short body: " + strconv.FormatInt(n, 10))
			}
			if err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.StopTimer()
	if s := b.Elapsed().Seconds(); s > 0 {
		b.ReportMetric(float64(b.N)/s, "req/s")
	}
}

// benchBurst sends n requests from benchConns() goroutines and waits for
// all of them.
func benchBurst(b *testing.B, c *http.Client, target string, n int) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for range benchConns() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(n) {
				if _, _, err := benchGet(c, target); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// benchInterleaved runs the modes in turns (each turn a burst of requests
// through one mode, about 1/8 of that mode's share of b.N, at most 1,000),
// so load from elsewhere on a shared machine lands on every mode alike. It
// reports each mode's req/s and the ratios the target is stated in; ns/op
// and allocs/op are averages over all modes and mean little here.
func benchInterleaved(b *testing.B, modes []benchMode, target string, ratios [][2]string) {
	for _, m := range modes {
		benchWarm(b, m.client, target)
	}
	turn := min(max(b.N/(len(modes)*8), 1), 1000)
	elapsed := make([]time.Duration, len(modes))
	done := make([]int, len(modes))
	b.ReportAllocs()
	b.ResetTimer()
	for left, t := b.N, 0; left > 0 && !b.Failed(); t++ {
		i, n := t%len(modes), min(left, turn)
		start := time.Now()
		benchBurst(b, modes[i].client, target, n)
		elapsed[i] += time.Since(start)
		done[i] += n
		left -= n
	}
	b.StopTimer()
	rate := map[string]float64{}
	for i, m := range modes {
		if elapsed[i] > 0 {
			rate[m.name] = float64(done[i]) / elapsed[i].Seconds()
			b.ReportMetric(rate[m.name], m.name+"-req/s")
		}
	}
	for _, r := range ratios {
		if rate[r[0]] > 0 && rate[r[1]] > 0 {
			b.ReportMetric(100*rate[r[0]]/rate[r[1]], r[0]+"/"+r[1]+"-%")
		}
	}
}

// BenchmarkThroughput compares keep-alive HTTPS GETs (1 KiB responses)
// straight to the upstream, through a bare goproxy MITM setting one header,
// and through keygate intercepting, deciding a CEL rule, injecting a static
// bearer token and writing the audit line (to a no-op logger, and as JSON
// to io.Discard). Client, upstream and proxy share the process and its
// CPUs: compare the modes of one run, not absolute numbers.
func BenchmarkThroughput(b *testing.B) {
	up := benchNewUpstream(b)
	base := "https://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(up.port))
	auth := "Bearer " + benchToken

	gpURL, gpCA := benchGoproxy(b, up)
	kgURL, kgCA := benchKeygate(b, up, zap.NewNop())
	kjURL, kjCA := benchKeygate(b, up, benchJSONLogger())

	modes := []benchMode{
		{name: "direct", client: benchClient(nil, up.ca), wantIssuer: up.ca},
		{name: "goproxy-mitm", client: benchClient(gpURL, gpCA, up.ca), wantAuth: auth, wantIssuer: gpCA},
		{name: "keygate", client: benchClient(kgURL, kgCA, up.ca), wantAuth: auth, wantIssuer: kgCA, keygate: true},
		{name: "keygate-jsonlog", client: benchClient(kjURL, kjCA, up.ca), wantAuth: auth, wantIssuer: kjCA, keygate: true},
	}
	for _, m := range modes {
		b.Cleanup(m.client.CloseIdleConnections)
		benchProbe(b, up, m, base)
	}
	for _, m := range modes {
		b.Run(m.name, func(b *testing.B) { benchRun(b, m.client, base+"/") })
	}
	// The same four modes taking turns: the ratios to read on a shared or
	// noisy machine.
	b.Run("interleaved", func(b *testing.B) {
		benchInterleaved(b, modes, base+"/", [][2]string{{"keygate", "goproxy-mitm"}, {"keygate-jsonlog", "goproxy-mitm"}, {"goproxy-mitm", "direct"}, {"keygate", "direct"}})
	})
}

// benchInnerRequest is an intercepted request as the tunnel's server hands
// it over, bound to its exchange.
func benchInnerRequest(b *testing.B, p *Proxy, port int) (*http.Request, broker.Identity) {
	b.Helper()
	id, err := p.opts.Pipeline.Attest(context.Background(), broker.Evidence{Listener: "proxy", Remote: netip.MustParseAddrPort("127.0.0.1:50000")})
	if err != nil {
		b.Fatal(err)
	}
	r := httptest.NewRequest(http.MethodGet, "https://127.0.0.1:"+strconv.Itoa(port)+"/v1/items?page=2", nil)
	r.Header.Set("Accept", "application/json")
	r.Header.Set("User-Agent", "keygate-bench/1")
	return r, id
}

// BenchmarkRequestHooks is the per-request work keygate adds inside an
// intercepted tunnel, without any I/O: "decide-inject" is onRequest (strip
// hop-by-hop headers, decide the CEL rule, fetch the static credential,
// inject the bearer header, fingerprint it) on a fresh exchange; "audit" is
// finish (the audit line and the metrics) with the JSON logger of
// BenchmarkThroughput/keygate-jsonlog.
func BenchmarkRequestHooks(b *testing.B) {
	up := &benchUpstream{port: 8443}
	self := netip.MustParseAddrPort("127.0.0.1:1")
	b.Run("decide-inject", func(b *testing.B) {
		p, _ := benchNewKeygate(b, up, zap.NewNop(), self)
		r, id := benchInnerRequest(b, p, up.port)
		want := "Bearer " + benchToken
		b.ReportAllocs()
		for b.Loop() {
			x := p.newExchange("proxy")
			x.setIdentity(id)
			x.rec.Protocol, x.rec.Host, x.rec.Port = broker.ProtocolHTTPS, "127.0.0.1", up.port
			rx := r.WithContext(withExchange(r.Context(), x))
			if _, resp := p.onRequest(rx, &goproxy.ProxyCtx{Req: rx}); resp != nil || x.err != nil {
				b.Fatalf("onRequest refused: %d", resp.StatusCode)
			}
			if got := rx.Header.Get("Authorization"); got != want {
				b.Fatal("credential not injected")
			}
		}
	})
	b.Run("audit", func(b *testing.B) {
		p, _ := benchNewKeygate(b, up, benchJSONLogger(), self)
		r, id := benchInnerRequest(b, p, up.port)
		x := p.newExchange("proxy")
		x.setIdentity(id)
		x.rec.Protocol, x.rec.Host, x.rec.Port = broker.ProtocolHTTPS, "127.0.0.1", up.port
		rx := r.WithContext(withExchange(r.Context(), x))
		if _, resp := p.onRequest(rx, &goproxy.ProxyCtx{Req: rx}); resp != nil {
			b.Fatalf("onRequest refused: %d", resp.StatusCode)
		}
		x.rec.Status, x.rec.BytesOut = http.StatusOK, benchBodySize
		b.ReportAllocs()
		for b.Loop() {
			p.finish(x)
		}
	})
}
