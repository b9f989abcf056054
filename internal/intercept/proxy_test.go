package intercept

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keygate/broker/internal/attest"
	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/inject"
	"github.com/keygate/broker/internal/rules"
)

func wantStatus(t *testing.T, resp *http.Response, status int, code string) {
	t.Helper()
	if resp.StatusCode != status {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("status = %d, want %d; body %s", resp.StatusCode, status, b)
	}
	if code != "" && resp.Header.Get(HeaderError) != code {
		t.Fatalf("%s = %q, want %q", HeaderError, resp.Header.Get(HeaderError), code)
	}
	if resp.Header.Get(HeaderRequestID) == "" {
		t.Fatalf("response has no %s", HeaderRequestID)
	}
}

func TestInjectionReplacesAllVariants(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{rules: []rules.Spec{bearerRule("inject", "127.0.0.1")}, roots: []*httptest.Server{up.srv}})
	authority := fmt.Sprintf("127.0.0.1:%d", up.port(t))

	tc := h.tunnel(authority)
	got := h.rawRequest(tc, "GET /repos HTTP/1.1\r\nHost: "+authority+"\r\n"+
		"authorization: Bearer WORKLOAD\r\nAUTHORIZATION: Bearer SHOUT\r\nAuthorization: one\r\nAuthorization: two\r\n"+
		"Proxy-Authorization: Basic d29ya2xvYWQ=\r\n\r\n")
	wantStatus(t, got, http.StatusOK, "")
	if up.count() != 1 {
		t.Fatalf("upstream got %d requests, want 1", up.count())
	}
	if auths := up.auths[0]; len(auths) != 1 || auths[0] != "Bearer "+h.canary {
		t.Fatalf("upstream Authorization = %d values, want exactly the injected one", len(auths))
	}
	if v := up.last().Header.Values("Proxy-Authorization"); len(v) != 0 {
		t.Fatalf("Proxy-Authorization reached the upstream")
	}

	// The same through Go's client (HTTPS_PROXY style), keep-alive reused.
	for i := 0; i < 3; i++ {
		req, _ := http.NewRequest(http.MethodGet, "https://"+authority+"/again", nil)
		req.Header.Set("Authorization", "Bearer WORKLOAD")
		resp, _ := h.do(req)
		wantStatus(t, resp, http.StatusOK, "")
	}
	for i, a := range up.auths {
		if len(a) != 1 || a[0] != "Bearer "+h.canary {
			t.Fatalf("request %d: upstream saw %d Authorization values or a wrong one", i, len(a))
		}
	}
}

func TestAuditLine(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{rules: []rules.Spec{bearerRule("inject", "127.0.0.1")}, roots: []*httptest.Server{up.srv}})
	req, _ := http.NewRequest(http.MethodGet, up.srv.URL+"/path?q=1", nil)
	resp, _ := h.do(req)
	wantStatus(t, resp, http.StatusOK, "")

	var line map[string]any
	for _, l := range h.auditLines() {
		if l["method"] == "GET" {
			line = l
		}
	}
	if line == nil {
		t.Fatal("no audit line for the request")
	}
	want := map[string]any{
		"request_id": resp.Header.Get(HeaderRequestID), "listener": "proxy", "workload.id": "local-test",
		"workload.method": "cidr", "protocol": "https", "host": "127.0.0.1", "path": "/path",
		"rule": "inject", "decision": "allow", "credential.name": "token", "credential.kind": "static",
		"status": "200", "error": "",
	}
	for k, v := range want {
		if fmt.Sprint(line[k]) != fmt.Sprint(v) {
			t.Errorf("audit %s = %#v, want %#v", k, line[k], v)
		}
	}
	if fp, _ := line["credential.fingerprint"].(string); len(fp) != 16 {
		t.Errorf("credential.fingerprint = %q, want 16 hex characters", fp)
	}
	for _, k := range []string{"port", "bytes_in", "bytes_out", "duration_ms", "delegator.sub", "credential.expires"} {
		if _, ok := line[k]; !ok {
			t.Errorf("audit line lacks %s", k)
		}
	}
	// The CONNECT's own line is written when its tunnel closes.
	h.client().CloseIdleConnections()
	deadline := time.Now().Add(5 * time.Second)
	for len(h.auditLines()) != 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := len(h.auditLines()); n != 2 {
		t.Errorf("audit lines = %d, want 2 (the request, then the CONNECT on close)", n)
	}
}

func TestDestinationBinding(t *testing.T) {
	allowed, evil := newTLSRecorder(t), newTLSRecorder(t)
	rule := bearerRule("allowed-only", "127.0.0.1")
	rule.Ports = []int{allowed.port(t)}
	h := newHarness(t, harnessOpts{rules: []rules.Spec{rule}, roots: []*httptest.Server{allowed.srv, evil.srv}})
	authority := fmt.Sprintf("127.0.0.1:%d", allowed.port(t))
	evilAuthority := fmt.Sprintf("127.0.0.1:%d", evil.port(t))

	tests := []struct {
		name string
		raw  string
		want int
	}{
		{"host header names evil", "GET / HTTP/1.1\r\nHost: " + evilAuthority + "\r\n\r\n", http.StatusMisdirectedRequest},
		{"absolute-form evil", "GET https://" + evilAuthority + "/ HTTP/1.1\r\nHost: " + authority + "\r\n\r\n", http.StatusMisdirectedRequest},
		{"absolute-form http scheme", "GET http://" + authority + "/ HTTP/1.1\r\nHost: " + authority + "\r\n\r\n", http.StatusMisdirectedRequest},
		{"host by another name", "GET / HTTP/1.1\r\nHost: localhost:" + fmt.Sprint(allowed.port(t)) + "\r\n\r\n", http.StatusMisdirectedRequest},
		{"host without port means 443", "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", http.StatusMisdirectedRequest},
		{"userinfo confusion", "GET / HTTP/1.1\r\nHost: " + authority + "@" + evilAuthority + "\r\n\r\n", http.StatusBadRequest},
		{"matching host", "GET / HTTP/1.1\r\nHost: " + authority + "\r\n\r\n", http.StatusOK},
		{"matching absolute-form", "GET https://" + authority + "/ HTTP/1.1\r\nHost: " + authority + "\r\n\r\n", http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := allowed.count()
			c, _, resp := h.connect(authority)
			wantStatus(t, resp, http.StatusOK, "")
			tc, err := h.tlsOver(c, "127.0.0.1")
			if err != nil {
				t.Fatal(err)
			}
			got := h.rawRequest(tc, tt.raw)
			if got.StatusCode != tt.want {
				t.Fatalf("status = %d, want %d", got.StatusCode, tt.want)
			}
			forwarded := allowed.count() - before
			if (tt.want == http.StatusOK) != (forwarded == 1) {
				t.Fatalf("allowed upstream got %d requests", forwarded)
			}
		})
	}

	t.Run("sni names evil", func(t *testing.T) {
		c, _, resp := h.connect(authority)
		wantStatus(t, resp, http.StatusOK, "")
		if _, err := h.tlsOver(c, "evil.test"); err == nil {
			t.Fatal("handshake with a foreign SNI succeeded")
		}
	})
	if evil.count() != 0 {
		t.Fatalf("evil upstream received %d requests", evil.count())
	}
}

func TestBindDestination(t *testing.T) {
	tests := []struct {
		host, url string
		ok        bool
	}{
		{"allowed.test", "", true},
		{"ALLOWED.TEST", "", true},
		{"allowed.test.", "", true},
		{"allowed.test:443", "", true},
		{"allowed.test:8443", "", false},
		{"evil.test", "", false},
		{"allowed.test ", "", false},
		{"allowed.test", "https://allowed.test/x", true},
		{"allowed.test", "https://ALLOWED.test:443/x", true},
		{"allowed.test", "https://evil.test/x", false},
		{"allowed.test", "http://allowed.test/x", false},
		{"", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.host+"|"+tt.url, func(t *testing.T) {
			target := "/x"
			if tt.url != "" {
				target = tt.url
			}
			r := httptest.NewRequest(http.MethodGet, target, nil)
			r.Host = tt.host
			if err := bindDestination(r, "allowed.test", 443); (err == nil) != tt.ok {
				t.Fatalf("bindDestination = %v, want ok=%v", err, tt.ok)
			}
		})
	}
}

func TestNoInjectionOverPlaintextTunnel(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{rules: []rules.Spec{bearerRule("inject", "127.0.0.1")}, roots: []*httptest.Server{up.srv}})
	authority := fmt.Sprintf("127.0.0.1:%d", up.port(t))
	c, _, resp := h.connect(authority)
	wantStatus(t, resp, http.StatusOK, "")
	got := h.rawRequest(c, "GET / HTTP/1.1\r\nHost: "+authority+"\r\n\r\n")
	wantStatus(t, got, http.StatusForbidden, broker.CodePlaintextDenied)
	if up.count() != 0 {
		t.Fatalf("upstream got %d requests", up.count())
	}
}

func TestPlainHTTP(t *testing.T) {
	for _, allowPlaintext := range []bool{false, true} {
		t.Run(fmt.Sprint("allow_plaintext=", allowPlaintext), func(t *testing.T) {
			up := newPlainRecorder(t)
			rule := bearerRule("plain", "127.0.0.1")
			rule.Ports = []int{up.port(t)}
			rule.AllowPlaintext = allowPlaintext
			h := newHarness(t, harnessOpts{rules: []rules.Spec{rule}})
			req, _ := http.NewRequest(http.MethodGet, up.srv.URL+"/x", nil)
			resp, _ := h.do(req)
			if !allowPlaintext {
				wantStatus(t, resp, http.StatusForbidden, broker.CodePlaintextDenied)
				if up.count() != 0 {
					t.Fatalf("upstream got %d requests", up.count())
				}
				return
			}
			wantStatus(t, resp, http.StatusOK, "")
			if a := up.auths[0]; len(a) != 1 || a[0] != "Bearer "+h.canary {
				t.Fatal("plaintext upstream did not get exactly the injected credential")
			}
		})
	}
}

func TestConnectPolicy(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{rules: []rules.Spec{
		bearerRule("inject", "127.0.0.1"),
		{Name: "metadata", Hosts: []string{"169.254.169.254"}, Action: "deny"},
	}, roots: []*httptest.Server{up.srv}})
	tests := []struct {
		authority string
		status    int
		code      string
	}{
		{"denied.example:443", http.StatusForbidden, broker.CodeDenied},
		{"127.0.0.1:22", http.StatusForbidden, broker.CodeDenied},
		{"127.0.0.1:6379", http.StatusForbidden, broker.CodeDenied},
		{"169.254.169.254:443", http.StatusForbidden, broker.CodeEgressDenied},
		{"127.0.0.1:0", http.StatusForbidden, broker.CodePortDenied},
		{"[fe80::1%25eth0]:443", http.StatusBadRequest, broker.CodeBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.authority, func(t *testing.T) {
			_, _, resp := h.connect(tt.authority)
			wantStatus(t, resp, tt.status, tt.code)
		})
	}
	// T-C3: a storm of CONNECTs to denied names mints nothing.
	for i := 0; i < 200; i++ {
		_, _, resp := h.connect(fmt.Sprintf("n%d.denied.example:443", i))
		if resp.StatusCode != http.StatusForbidden {
			t.Fatalf("CONNECT to a denied name: %d", resp.StatusCode)
		}
	}
	if *h.mints != 0 {
		t.Fatalf("%d leaves minted for denied hosts", *h.mints)
	}
	if up.count() != 0 {
		t.Fatalf("upstream got %d requests", up.count())
	}
}

func TestSSRFLiterals(t *testing.T) {
	var canaryConns atomic.Int64
	canary, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer canary.Close()
	go func() {
		for {
			c, err := canary.Accept()
			if err != nil {
				return
			}
			canaryConns.Add(1)
			c.Close()
		}
	}()
	_, port, _ := net.SplitHostPort(canary.Addr().String())
	catchAll := rules.Spec{Name: "anything", Hosts: []string{"*"}, Ports: []int{80, 443, atoi(port)}}
	h := newHarness(t, harnessOpts{rules: []rules.Spec{catchAll}})
	_, selfPort, _ := net.SplitHostPort(h.addr)
	catchAll.Ports = append(catchAll.Ports, atoi(selfPort))

	hosts := []string{"127.0.0.2", "127.2", "2130706434", "0x7f.0.0.2", "0177.0.0.2", "[::ffff:127.0.0.2]", "169.254.169.254", "[64:ff9b::a9fe:a9fe]", "10.0.0.1", "[::1]"}
	for _, host := range hosts {
		t.Run("connect "+host, func(t *testing.T) {
			_, _, resp := h.connect(host + ":" + port)
			wantStatus(t, resp, http.StatusForbidden, broker.CodeEgressDenied)
		})
		t.Run("get "+host, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodGet, "http://"+host+":"+port+"/", nil)
			resp, _ := h.do(req)
			wantStatus(t, resp, http.StatusForbidden, broker.CodeEgressDenied)
		})
	}
	if n := canaryConns.Load(); n != 0 {
		t.Fatalf("canary listener got %d connections", n)
	}
}

func atoi(s string) int {
	n := 0
	fmt.Sscan(s, &n)
	return n
}

func TestHopByHop(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{rules: []rules.Spec{bearerRule("inject", "127.0.0.1")}, roots: []*httptest.Server{up.srv}})
	req, _ := http.NewRequest(http.MethodGet, up.srv.URL+"/", nil)
	req.Header.Set("Connection", "X-Foo, Authorization")
	req.Header.Set("X-Foo", "bar")
	req.Header.Set("Keep-Alive", "timeout=5")
	req.Header.Set("Te", "trailers")
	req.Header.Set("X-Broker-Identity", "forged")
	req.Header.Set("X-Keygate-Identity", "forged")
	req.Header.Set("X-Forwarded-Client-Cert", "forged")
	req.Header.Set("X-Kept", "yes")
	resp, _ := h.do(req)
	wantStatus(t, resp, http.StatusOK, "")
	got := up.last().Header
	for _, k := range []string{"X-Foo", "Keep-Alive", "Te", "X-Broker-Identity", "X-Keygate-Identity", "X-Forwarded-Client-Cert", "Proxy-Authorization"} {
		if v := got.Values(k); len(v) != 0 {
			t.Errorf("%s reached the upstream", k)
		}
	}
	if got.Get("X-Kept") != "yes" {
		t.Error("an end-to-end header was dropped")
	}
	if a := got.Values("Authorization"); len(a) != 1 || a[0] != "Bearer "+h.canary {
		t.Error("the injected Authorization did not survive Connection: Authorization")
	}
}

func TestUpstreamVerify(t *testing.T) {
	up := newTLSRecorder(t) // its self-signed certificate is not trusted
	rule := bearerRule("inject", "127.0.0.1")
	rule.Ports = []int{up.port(t)}
	h := newHarness(t, harnessOpts{rules: []rules.Spec{rule}})
	req, _ := http.NewRequest(http.MethodGet, up.srv.URL+"/", nil)
	resp, _ := h.do(req)
	wantStatus(t, resp, http.StatusBadGateway, broker.CodeUpstreamTLS)
	if up.count() != 0 {
		t.Fatalf("an unverified upstream received %d requests", up.count())
	}
}

func TestNoEnvProxy(t *testing.T) {
	t.Setenv("HTTPS_PROXY", "http://127.0.0.1:1")
	t.Setenv("HTTP_PROXY", "http://127.0.0.1:1")
	t.Setenv("https_proxy", "http://127.0.0.1:1")
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{rules: []rules.Spec{bearerRule("inject", "127.0.0.1")}, roots: []*httptest.Server{up.srv}})
	if h.proxy.Transport().Proxy != nil {
		t.Fatal("transport reads a proxy from the environment")
	}
	if h.proxy.gp.ConnectDial != nil {
		t.Fatal("goproxy dials CONNECT through an environment proxy")
	}
	if h.proxy.Transport().TLSClientConfig.InsecureSkipVerify {
		t.Fatal("upstream TLS verification is off")
	}
	req, _ := http.NewRequest(http.MethodGet, up.srv.URL+"/", nil)
	resp, _ := h.do(req)
	wantStatus(t, resp, http.StatusOK, "")
}

type panicSource struct{ canary string }

func (p panicSource) Credential(context.Context, broker.Identity, broker.Grant) (broker.Credential, error) {
	panic("source exploded holding " + p.canary)
}

// TestHandlerPanicIsContained (T-E5): a panic in attestation, the policy,
// the credential fetch, the injection or the credential release, on the
// plain-HTTP path and inside an intercepted tunnel, costs the one request
// (a 500, or nothing once the answer was sent): a tunnel opened before it
// keeps working, the process survives, the panic is logged, and the panic
// value (which holds the credential here) reaches no log line or response
// (the harness's canary sweep). There is no h2 path (TestH2PerStreamPolicy);
// the PostgreSQL path is dbproxy's.
func TestHandlerPanicIsContained(t *testing.T) {
	stages := []struct {
		name   string
		status int // what the panicking request gets
		msg    string
	}{
		{"attestation", http.StatusInternalServerError, "panic while handling a request"},
		{"policy", http.StatusInternalServerError, "panic while handling a request"},
		{"credential fetch", http.StatusInternalServerError, "panic while handling a request"},
		{"injection", http.StatusInternalServerError, "panic while handling a request"},
		{"credential release", http.StatusOK, "panic while releasing a credential"},
	}
	for _, st := range stages {
		for _, path := range []string{"plain", "mitm"} {
			t.Run(st.name+"/"+path, func(t *testing.T) {
				secure, plain := newTLSRecorder(t), newPlainRecorder(t)
				canary := new(string)
				armed := new(atomic.Bool)
				boom := bearerRule("boom", "127.0.0.1")
				boom.Ports = []int{secure.port(t), plain.port(t)}
				boom.AllowPlaintext = true
				boom.When = `request.path == "/boom"`
				boom.Inject = &broker.Injection{Credential: "boom", Injector: inject.Bearer()}
				healthy := bearerRule("inject", "127.0.0.1")
				healthy.Ports = boom.Ports
				healthy.AllowPlaintext = true
				o := harnessOpts{rules: []rules.Spec{boom, healthy}, roots: []*httptest.Server{secure.srv},
					sources: map[string]broker.Source{"boom": nil}}
				cidr, err := attest.NewCIDR([]attest.CIDREntry{{ID: "local-test", CIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}})
				if err != nil {
					t.Fatal(err)
				}
				o.attest = panicAttestor{inner: cidr, armed: armed, canary: canary, on: st.name == "attestation"}
				h := newHarness(t, o)
				*canary = h.canary
				// Set before any request; the pipeline reads these maps and values.
				h.sources["boom"] = inject.NewStatic("boom", map[string]broker.Secret{broker.FieldToken: broker.NewSecret(h.canary)})
				switch st.name {
				case "policy":
					pipe := *h.proxy.pipe.Load()
					pipe.Policy = panicPolicy{inner: pipe.Policy, canary: canary}
					h.proxy.SetPipeline(&pipe)
				case "credential fetch":
					h.sources["boom"] = panicSource{canary: h.canary}
				case "injection":
					boomInjector.canary = canary
				case "credential release":
					h.sources["boom"] = releasePanicSource{canary: canary}
				}
				if st.name == "injection" {
					pipe := *h.proxy.pipe.Load()
					set, errs := rules.Compile([]rules.Spec{withInjector(boom, boomInjector), healthy}, rules.Options{ConnectPorts: ports(o.roots, t)})
					if len(errs) > 0 {
						t.Fatal(errs)
					}
					pipe.Policy = set
					h.proxy.SetPipeline(&pipe)
				}

				// A long-lived tunnel opened before the panic must survive it.
				authority := fmt.Sprintf("127.0.0.1:%d", secure.port(t))
				other := h.tunnel(authority)
				armed.Store(true)

				base := plain.srv.URL
				if path == "mitm" {
					base = secure.srv.URL
				}
				for range 2 {
					var resp *http.Response
					if st.name == "attestation" && path == "mitm" {
						_, _, resp = h.connect(authority)
					} else {
						req, _ := http.NewRequest(http.MethodGet, base+"/boom", nil)
						resp, _ = h.do(req)
					}
					if st.status == http.StatusOK {
						wantStatus(t, resp, http.StatusOK, "")
					} else {
						wantStatus(t, resp, st.status, broker.CodeInternal)
					}
				}
				got := h.rawRequest(other, "GET /fine HTTP/1.1\r\nHost: "+authority+"\r\n\r\n")
				wantStatus(t, got, http.StatusOK, "")
				forwarded := 0
				if st.status == http.StatusOK {
					forwarded = 2 // released after a complete answer
				}
				if n := secure.count() + plain.count(); n != 1+forwarded {
					t.Fatalf("upstreams got %d requests, want %d", n, 1+forwarded)
				}
				if !eventually(2*time.Second, func() bool { return len(h.logs.FilterMessage(st.msg).All()) == 2 }) {
					t.Fatalf("%d panics logged, want 2", len(h.logs.FilterMessage(st.msg).All()))
				}
			})
		}
	}
}

type panicAttestor struct {
	inner  broker.Attestor
	armed  *atomic.Bool
	canary *string
	on     bool
}

func (a panicAttestor) Attest(ctx context.Context, ev broker.Evidence) (broker.Identity, error) {
	if a.on && a.armed.Load() {
		panic("attestor exploded holding " + *a.canary)
	}
	return a.inner.Attest(ctx, ev)
}

type panicPolicy struct {
	inner  broker.Policy
	canary *string
}

func (p panicPolicy) Decide(ctx context.Context, id broker.Identity, t broker.Target) (broker.Decision, error) {
	if t.Path == "/boom" {
		panic(fmt.Errorf("policy exploded holding %s", *p.canary))
	}
	return p.inner.Decide(ctx, id, t)
}

type panicInjector struct{ canary *string }

func (panicInjector) Kind() string { return "panic" }

func (i *panicInjector) Inject(*http.Request, broker.Credential) error {
	panic("injector exploded holding " + *i.canary)
}

var boomInjector = &panicInjector{}

func withInjector(s rules.Spec, inj broker.Injector) rules.Spec {
	s.Inject = &broker.Injection{Credential: s.Inject.Credential, Injector: inj}
	return s
}

type releasePanicSource struct{ canary *string }

func (s releasePanicSource) Credential(context.Context, broker.Identity, broker.Grant) (broker.Credential, error) {
	c := *s.canary
	return broker.Credential{Name: "boom", Kind: "static", Fields: map[string]broker.Secret{broker.FieldToken: broker.NewSecret(c)},
		Release: func(context.Context) { panic("release exploded holding " + c) }}, nil
}

func TestHeaderLimits(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{
		rules:  []rules.Spec{bearerRule("inject", "127.0.0.1")},
		roots:  []*httptest.Server{up.srv},
		limits: Limits{MaxHeaderBytes: 16 << 10, ReadHeaderTimeout: 300 * time.Millisecond},
	})
	authority := fmt.Sprintf("127.0.0.1:%d", up.port(t))
	big := "X-Big: " + strings.Repeat("a", 200<<10) + "\r\n"

	t.Run("inside a tunnel", func(t *testing.T) {
		tc := h.tunnel(authority)
		got := h.rawRequest(tc, "GET / HTTP/1.1\r\nHost: "+authority+"\r\n"+big+"\r\n")
		if got.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Fatalf("status = %d, want 431", got.StatusCode)
		}
	})
	t.Run("at the front door", func(t *testing.T) {
		c, err := net.Dial("tcp", h.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		got := h.rawRequest(c, "GET "+up.srv.URL+"/ HTTP/1.1\r\nHost: x\r\n"+big+"\r\n")
		if got.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Fatalf("status = %d, want 431", got.StatusCode)
		}
	})
	t.Run("slow headers inside a tunnel are cut off", func(t *testing.T) {
		tc := h.tunnel(authority)
		_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(tc, "GET / HTTP/1.1\r\nHost: "+authority+"\r\nX-Slow: a"); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		_, err := io.ReadAll(tc)
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatalf("the broker kept a slow request open past its read-header timeout (%v)", time.Since(start))
		}
	})
	if up.count() != 0 {
		t.Fatalf("upstream got %d requests", up.count())
	}
}

func TestTunnelAction(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{rules: []rules.Spec{{Name: "opaque", Hosts: []string{"127.0.0.1"}, Action: "tunnel"}}, roots: []*httptest.Server{up.srv}})
	authority := fmt.Sprintf("127.0.0.1:%d", up.port(t))
	// The tunnelled client talks TLS to the upstream itself, trusting the
	// upstream's certificate, not the broker CA: nothing is intercepted.
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		Proxy:           http.ProxyURL(&url.URL{Scheme: "http", Host: h.addr}),
		TLSClientConfig: up.srv.Client().Transport.(*http.Transport).TLSClientConfig.Clone(),
	}}
	resp, err := client.Get("https://" + authority + "/t")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || up.count() != 1 || len(up.auths[0]) != 0 {
		t.Fatalf("tunnel: status %d, %d requests, %d Authorization values", resp.StatusCode, up.count(), len(up.auths[0]))
	}
	client.CloseIdleConnections()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		for _, l := range h.auditLines() {
			if l["decision"] == "tunnel" && l["bytes_out"].(int64) > 0 {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("no audit line with decision tunnel and bytes after the tunnel closed")
}

func TestUpstream3xxPassedThrough(t *testing.T) {
	evil := newTLSRecorder(t)
	up := &recorder{}
	up.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		up.ServeHTTP(httptest.NewRecorder(), r)
		http.Redirect(w, r, evil.srv.URL+"/stolen", http.StatusFound)
	}))
	t.Cleanup(up.srv.Close)
	rule := bearerRule("inject", "127.0.0.1")
	rule.Ports = []int{up.port(t)}
	h := newHarness(t, harnessOpts{rules: []rules.Spec{rule}, roots: []*httptest.Server{up.srv, evil.srv}})
	req, _ := http.NewRequest(http.MethodGet, up.srv.URL+"/", nil)
	resp, _ := h.do(req)
	if resp.StatusCode != http.StatusFound || resp.Header.Get("Location") != evil.srv.URL+"/stolen" {
		t.Fatalf("status %d Location %q: the 3xx was not passed through verbatim", resp.StatusCode, resp.Header.Get("Location"))
	}
	if evil.count() != 0 {
		t.Fatal("the broker followed a redirect")
	}
}

func TestAttestationRequired(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{rules: []rules.Spec{bearerRule("inject", "127.0.0.1")}, roots: []*httptest.Server{up.srv}, attest: attest.NewChain(nil)})
	_, _, resp := h.connect(fmt.Sprintf("127.0.0.1:%d", up.port(t)))
	wantStatus(t, resp, http.StatusProxyAuthRequired, broker.CodeUnauthenticated)
	if resp.Header.Get("Proxy-Authenticate") == "" {
		t.Fatal("407 without Proxy-Authenticate")
	}
	req, _ := http.NewRequest(http.MethodGet, "http://example.test/", nil)
	resp2, _ := h.do(req)
	wantStatus(t, resp2, http.StatusProxyAuthRequired, broker.CodeUnauthenticated)
	if up.count() != 0 {
		t.Fatal("an unattested caller reached the upstream")
	}
}

func TestMethodsRefused(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{rules: []rules.Spec{bearerRule("inject", "127.0.0.1")}, roots: []*httptest.Server{up.srv}})
	authority := fmt.Sprintf("127.0.0.1:%d", up.port(t))
	for _, raw := range []string{
		"TRACE / HTTP/1.1\r\nHost: " + authority + "\r\n\r\n",
		"CONNECT " + authority + " HTTP/1.1\r\nHost: " + authority + "\r\n\r\n",
	} {
		tc := h.tunnel(authority)
		got := h.rawRequest(tc, raw)
		wantStatus(t, got, http.StatusMethodNotAllowed, broker.CodeMethodNotAllowed)
	}
	if up.count() != 0 {
		t.Fatal("a refused method reached the upstream")
	}
}

func TestTrailersNotForwarded(t *testing.T) {
	var trailerAuth atomic.Value
	trailerAuth.Store("")
	up := &recorder{}
	up.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		trailerAuth.Store(r.Trailer.Get("Authorization"))
		up.ServeHTTP(w, r)
	}))
	t.Cleanup(up.srv.Close)
	h := newHarness(t, harnessOpts{rules: []rules.Spec{bearerRule("inject", "127.0.0.1")}, roots: []*httptest.Server{up.srv}})
	authority := fmt.Sprintf("127.0.0.1:%d", up.port(t))
	tc := h.tunnel(authority)
	got := h.rawRequest(tc, "POST / HTTP/1.1\r\nHost: "+authority+"\r\nTransfer-Encoding: chunked\r\nTrailer: Authorization\r\n\r\n"+
		"3\r\nabc\r\n0\r\nAuthorization: Bearer SMUGGLED\r\n\r\n")
	wantStatus(t, got, http.StatusOK, "")
	if v := trailerAuth.Load().(string); v != "" {
		t.Fatalf("a workload trailer reached the upstream: %q", v)
	}
	if a := up.auths[0]; len(a) != 1 || a[0] != "Bearer "+h.canary {
		t.Fatal("upstream did not get exactly the injected Authorization")
	}
}

// fakeDelegation accepts "user:<name>" tokens. It stands in for
// attest.Delegation, whose OIDC verification is tested in package attest.
type fakeDelegation struct{}

func (fakeDelegation) Header() string { return "X-On-Behalf-Of" }

func (fakeDelegation) Delegate(_ context.Context, raw broker.Secret) (broker.Delegator, error) {
	if name, ok := strings.CutPrefix(raw.Reveal(), "user:"); ok && name != "" {
		return broker.Delegator{Sub: name}, nil
	}
	return broker.Delegator{}, fmt.Errorf("fake: %w", broker.ErrInvalidEvidence)
}

func TestDelegation(t *testing.T) {
	up := newTLSRecorder(t)
	rule := bearerRule("for-alice", "127.0.0.1")
	rule.When = `delegator.sub == "alice"`
	h := newHarness(t, harnessOpts{rules: []rules.Spec{rule}, roots: []*httptest.Server{up.srv}, deleg: fakeDelegation{}})
	authority := fmt.Sprintf("127.0.0.1:%d", up.port(t))
	tc := h.tunnel(authority)
	tests := []struct {
		name   string
		header string
		status int
	}{
		{"no delegator", "", http.StatusForbidden},
		{"alice", "X-On-Behalf-Of: user:alice\r\n", http.StatusOK},
		{"bob", "x-on-behalf-of: user:bob\r\n", http.StatusForbidden},
		{"forged", "X-On-Behalf-Of: alice\r\n", http.StatusProxyAuthRequired},
		{"two tokens", "X-On-Behalf-Of: user:alice\r\nX-On-Behalf-Of: user:bob\r\n", http.StatusProxyAuthRequired},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := h.rawRequest(tc, "GET / HTTP/1.1\r\nHost: "+authority+"\r\n"+tt.header+"\r\n")
			if got.StatusCode != tt.status {
				for _, l := range h.auditLines() {
					t.Log(l["error"])
				}
				t.Fatalf("status = %d, want %d", got.StatusCode, tt.status)
			}
		})
	}
	if up.count() != 1 {
		t.Fatalf("upstream got %d requests, want only alice's", up.count())
	}
	if v := up.last().Header.Values("X-On-Behalf-Of"); len(v) != 0 {
		t.Fatal("the user's token reached the upstream")
	}
	found := false
	for _, l := range h.auditLines() {
		found = found || l["delegator.sub"] == "alice"
	}
	if !found {
		t.Fatal("no audit line names the delegator")
	}
}

type stepClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *stepClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *stepClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

type expiringAttestor struct{ expires time.Time }

func (a expiringAttestor) Attest(context.Context, broker.Evidence) (broker.Identity, error) {
	return broker.Identity{ID: "token-holder", Method: broker.MethodOIDC, Expires: a.expires}, nil
}

// T-F1: evidence is checked at CONNECT, so a tunnel must stop serving once
// the token it was opened with expires, not live on under steady traffic.
func TestTunnelEndsWhenIdentityExpires(t *testing.T) {
	up := newTLSRecorder(t)
	clock := &stepClock{t: time.Now()}
	h := newHarness(t, harnessOpts{
		rules:  []rules.Spec{bearerRule("inject", "127.0.0.1")},
		roots:  []*httptest.Server{up.srv},
		attest: expiringAttestor{expires: clock.Now().Add(time.Minute)},
		clock:  clock,
	})
	authority := fmt.Sprintf("127.0.0.1:%d", up.port(t))
	tc := h.tunnel(authority)
	req := "GET / HTTP/1.1\r\nHost: " + authority + "\r\n\r\n"
	wantStatus(t, h.rawRequest(tc, req), http.StatusOK, "")
	clock.advance(time.Minute)
	got := h.rawRequest(tc, req)
	wantStatus(t, got, http.StatusProxyAuthRequired, broker.CodeUnauthenticated)
	if !got.Close {
		t.Fatal("the tunnel stays open after its identity expired")
	}
	if up.count() != 1 {
		t.Fatalf("upstream got %d requests, want only the one before expiry", up.count())
	}
}

// Graceful shutdown: the request in flight inside a tunnel completes with
// its credential; an idle tunnel is closed; nothing new is accepted.
func TestGracefulShutdown(t *testing.T) {
	release := make(chan struct{})
	entered := make(chan struct{}, 1)
	up := &recorder{}
	up.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		<-release
		up.ServeHTTP(w, r)
	}))
	t.Cleanup(up.srv.Close)
	h := newHarness(t, harnessOpts{rules: []rules.Spec{bearerRule("inject", "127.0.0.1")}, roots: []*httptest.Server{up.srv}})
	authority := fmt.Sprintf("127.0.0.1:%d", up.port(t))

	idleTLS := h.tunnel(authority)
	busyTLS := h.tunnel(authority)
	type result struct {
		resp *http.Response
		err  error
	}
	got := make(chan result, 1)
	go func() {
		if _, err := io.WriteString(busyTLS, "GET /slow HTTP/1.1\r\nHost: "+authority+"\r\n\r\n"); err != nil {
			got <- result{err: err}
			return
		}
		resp, err := http.ReadResponse(bufio.NewReader(busyTLS), nil)
		got <- result{resp, err}
	}()
	<-entered

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done <- h.proxy.Shutdown(ctx)
	}()
	// The idle tunnel is closed promptly, while the busy one waits.
	_ = idleTLS.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := idleTLS.Read(make([]byte, 1)); err == nil {
		t.Fatal("an idle tunnel stayed open during shutdown")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("an idle tunnel was not closed during shutdown")
	}
	close(release)
	r := <-got
	if r.err != nil {
		t.Fatalf("the request in flight was cut: %v", r.err)
	}
	wantStatus(t, r.resp, http.StatusOK, "")
	if a := up.auths[0]; len(a) != 1 || a[0] != "Bearer "+h.canary {
		t.Fatal("the drained request lost its credential")
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if c, err := net.DialTimeout("tcp", h.addr, time.Second); err == nil {
		c.Close()
		t.Fatal("the proxy still accepts connections after shutdown")
	}
}
