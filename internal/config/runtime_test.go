package config

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/canarytest"
)

// These tests build a real broker from a config file (DryRun false): real
// listeners on loopback, the admin endpoints, and requests through the proxy
// with a real net/http client. The upstreams are httptest servers: they
// stand in for the real APIs a config would name (api.github.com and the
// like cannot be reached here), and what is under test is the config's
// wiring, not the upstream.

// upstreamLog records what an upstream received.
type upstreamLog struct {
	mu   sync.Mutex
	reqs []*http.Request
}

func (u *upstreamLog) handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.reqs = append(u.reqs, r.Clone(context.Background()))
		u.mu.Unlock()
		_, _ = io.WriteString(w, "upstream ok\n")
	})
}

func (u *upstreamLog) last(t *testing.T, path string) *http.Request {
	t.Helper()
	u.mu.Lock()
	defer u.mu.Unlock()
	for i := len(u.reqs) - 1; i >= 0; i-- {
		if u.reqs[i].URL.Path == path {
			return u.reqs[i]
		}
	}
	t.Fatalf("upstream never received %s", path)
	return nil
}

func (u *upstreamLog) count(path string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for _, r := range u.reqs {
		if r.URL.Path == path {
			n++
		}
	}
	return n
}

// started is a running Runtime.
type started struct {
	rt     *Runtime
	cancel context.CancelFunc
	done   chan error
	logs   *logBuffer
}

// start loads and builds path for real and runs it until the test ends (or
// stop is called).
func start(t testing.TB, path string) *started {
	t.Helper()
	return startWith(t, path, nil)
}

// stop cancels Run and waits for it to return.
func (s *started) stop(t testing.TB) {
	t.Helper()
	if s.cancel == nil {
		return
	}
	s.cancel()
	s.cancel = nil
	select {
	case err := <-s.done:
		if err != nil {
			t.Errorf("Run returned %v after cancel", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return after its context was cancelled")
	}
}

func (s *started) client(t testing.TB) *http.Client {
	t.Helper()
	pool := x509.NewCertPool()
	pemBytes, err := os.ReadFile(s.rt.CACertPath)
	if err != nil {
		t.Fatalf("reading the CA the broker wrote: %v", err)
	}
	if !pool.AppendCertsFromPEM(pemBytes) {
		t.Fatal("cert_out holds no certificate")
	}
	proxyURL := &url.URL{Scheme: "http", Host: s.rt.ProxyAddr.String()}
	return &http.Client{
		Transport: &http.Transport{
			Proxy:             http.ProxyURL(proxyURL),
			TLSClientConfig:   &tls.Config{RootCAs: pool},
			DisableKeepAlives: true,
		},
		Timeout: 15 * time.Second,
	}
}

func (s *started) admin(t *testing.T, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + s.rt.AdminAddr.String() + path)
	if err != nil {
		t.Fatalf("admin %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func writeCertPEM(t *testing.T, dir, rel string, cert *x509.Certificate) {
	t.Helper()
	writeFile(t, dir, rel, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})), 0o644)
}

func portOf(t *testing.T, rawURL string) string {
	t.Helper()
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	return u.Port()
}

func TestRuntimeServesConfig(t *testing.T) {
	var tlsUp, plainUp upstreamLog
	tlsSrv := httptest.NewTLSServer(tlsUp.handler())
	defer tlsSrv.Close()
	plainSrv := httptest.NewServer(plainUp.handler())
	defer plainSrv.Close()

	fileSecret := canarytest.New("config runtime file secret")
	envSecret := canarytest.New("config runtime env secret")
	dir := t.TempDir()
	writeCertPEM(t, dir, "trust/upstream.pem", tlsSrv.Certificate())
	writeFile(t, dir, "secrets/token", fileSecret+"\n", 0o600)
	t.Setenv("KG_RT_KEY", envSecret)

	tp, pp := portOf(t, tlsSrv.URL), portOf(t, plainSrv.URL)
	cfg := fmt.Sprintf(`listen:
  proxy: 127.0.0.1:0
  admin: 127.0.0.1:0
ca: {ephemeral: true, cert_out: ca.pem}
attestors:
  - type: cidr
    identities: [{id: local, cidrs: [127.0.0.0/8]}]
egress:
  allow_cidrs: [127.0.0.1/32]       # the test upstreams live on loopback
  ca_bundle: trust/upstream.pem
credentials:
  api-token: {source: static, value: file:secrets/token, cache: 1m}
  api-key: {source: static, value: env:KG_RT_KEY}
rules:
  - name: read-api
    hosts: [127.0.0.1]
    ports: [%[1]s]
    when: 'request.method == "GET" && request.path.startsWith("/v1/")'
    inject: {credential: api-token, as: bearer}
  - name: key-header
    hosts: [127.0.0.1]
    ports: [%[1]s]
    when: 'request.method == "GET" && request.path == "/keyed"'
    inject: {credential: api-key, as: {header: {name: X-Api-Key, format: "Key {{token}}"}}}
  - name: plain-without-flag
    hosts: [127.0.0.1]
    ports: [%[2]s]
    when: 'request.path == "/noflag"'
    inject: {credential: api-token, as: bearer}
  - name: legacy-plain
    hosts: [127.0.0.1]
    ports: [%[2]s]
    when: 'request.path == "/legacy"'
    inject: {credential: api-key, as: {header: {name: X-Api-Key}}}
    allow_plaintext: true
limits: {upstream_timeout: 10s, max_tunnels: 7}
`, tp, pp)
	path := writeFile(t, dir, "keygate.yaml", cfg, 0o644)
	s := start(t, path)

	if want := filepath.Join(dir, "ca.pem"); s.rt.CACertPath != want {
		t.Errorf("CACertPath = %q, want %q", s.rt.CACertPath, want)
	}
	if s.rt.ProxyAddr == nil || s.rt.AdminAddr == nil {
		t.Fatalf("listeners not reported: %v %v", s.rt.ProxyAddr, s.rt.AdminAddr)
	}
	if got := s.rt.Proxy.Tunnels().Max(); got != 7 {
		t.Errorf("tunnel cap %d, want limits.max_tunnels 7", got)
	}

	t.Run("admin before traffic", func(t *testing.T) {
		if code, body := s.admin(t, "/healthz"); code != 200 || body != "ok\n" {
			t.Errorf("/healthz = %d %q", code, body)
		}
		if code, body := s.admin(t, "/readyz"); code != 200 || body != "ready\n" {
			t.Errorf("/readyz = %d %q", code, body)
		}
		_, m := s.admin(t, "/metrics")
		// Series with labels appear once a label set exists; the
		// credential series are created per credential at Build.
		for _, want := range []string{
			"# HELP keygate_request_duration_seconds",
			"keygate_tunnels_open 0",
			"# HELP keygate_credential_fetches_total",
			`keygate_credential_fetches_total{credential="api-token",result="ok"} 0`,
			`keygate_credential_fetches_total{credential="api-key",result="cache_hit"} 0`,
			"# HELP keygate_credential_fetch_duration_seconds",
			"# HELP go_goroutines",
		} {
			if !strings.Contains(m, want) {
				t.Errorf("/metrics lacks %q", want)
			}
		}
	})

	c := s.client(t)
	do := func(t *testing.T, method, rawURL string, h http.Header) (*http.Response, string) {
		t.Helper()
		req, err := http.NewRequest(method, rawURL, nil)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range h {
			req.Header[k] = v
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, rawURL, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.Header.Get("X-Keygate-Request-Id") == "" {
			t.Errorf("%s %s: no X-Keygate-Request-Id", method, rawURL)
		}
		for _, secret := range []string{fileSecret, envSecret} {
			mustNotContain(t, "response body", string(b), secret)
		}
		return resp, string(b)
	}
	denied := func(t *testing.T, resp *http.Response, body, code, rule string) {
		t.Helper()
		if resp.StatusCode != 403 || resp.Header.Get("X-Keygate-Error") != code {
			t.Fatalf("status %d, X-Keygate-Error %q, want 403 %s; body %s", resp.StatusCode, resp.Header.Get("X-Keygate-Error"), code, body)
		}
		var e struct {
			Error     string `json:"error"`
			Message   string `json:"message"`
			Rule      string `json:"rule"`
			RequestID string `json:"request_id"`
		}
		if err := json.Unmarshal([]byte(body), &e); err != nil {
			t.Fatalf("body is not JSON: %v: %s", err, body)
		}
		if e.Error != code || e.Rule != rule || e.RequestID != resp.Header.Get("X-Keygate-Request-Id") {
			t.Errorf("body = %+v, want error %q rule %q and the header's request id", e, code, rule)
		}
	}

	t.Run("bearer from a file, workload's own header replaced", func(t *testing.T) {
		resp, body := do(t, "GET", tlsSrv.URL+"/v1/items", http.Header{"Authorization": {"Bearer workload-made-this-up"}})
		if resp.StatusCode != 200 || body != "upstream ok\n" {
			t.Fatalf("status %d body %q", resp.StatusCode, body)
		}
		got := tlsUp.last(t, "/v1/items").Header.Values("Authorization")
		if len(got) != 1 || got[0] != "Bearer "+fileSecret {
			t.Errorf("upstream Authorization = %q (one trailing newline must be stripped from the file)", got)
		}
	})
	t.Run("header with format from env", func(t *testing.T) {
		resp, _ := do(t, "GET", tlsSrv.URL+"/keyed", nil)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		if got := tlsUp.last(t, "/keyed").Header.Values("X-Api-Key"); len(got) != 1 || got[0] != "Key "+envSecret {
			t.Errorf("upstream X-Api-Key = %q", got)
		}
	})
	t.Run("method the rule does not allow", func(t *testing.T) {
		resp, body := do(t, "POST", tlsSrv.URL+"/v1/items", nil)
		denied(t, resp, body, broker.CodeDenied, "")
		if n := tlsUp.count("/v1/items"); n != 1 {
			t.Errorf("upstream saw /v1/items %d times; the POST must not reach it", n)
		}
	})
	t.Run("path no rule covers", func(t *testing.T) {
		resp, body := do(t, "GET", tlsSrv.URL+"/admin", nil)
		denied(t, resp, body, broker.CodeDenied, "")
		if tlsUp.count("/admin") != 0 {
			t.Error("a denied request reached the upstream")
		}
	})
	t.Run("credential over plaintext without allow_plaintext", func(t *testing.T) {
		resp, body := do(t, "GET", plainSrv.URL+"/noflag", nil)
		denied(t, resp, body, broker.CodePlaintextDenied, "plain-without-flag")
		if plainUp.count("/noflag") != 0 {
			t.Error("the plaintext request was forwarded")
		}
	})
	t.Run("credential over plaintext with allow_plaintext", func(t *testing.T) {
		resp, _ := do(t, "GET", plainSrv.URL+"/legacy", nil)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		if got := plainUp.last(t, "/legacy").Header.Get("X-Api-Key"); got != envSecret {
			t.Errorf("upstream X-Api-Key = %q (default format is {{token}})", got)
		}
	})

	t.Run("metrics after traffic", func(t *testing.T) {
		_, m := s.admin(t, "/metrics")
		for _, want := range []string{
			`keygate_requests_total{decision="allow",rule="read-api"}`,
			`keygate_requests_total{decision="deny",rule=""}`,
			`keygate_request_duration_seconds_count`,
			`keygate_credential_fetches_total{credential="api-token",result="ok"} 1`,
			`keygate_credential_fetch_duration_seconds_count{credential="api-token"} 1`,
			`keygate_mitm_leaf_cache_total{result="mint"}`,
			`keygate_active_connections{listener="proxy"}`,
		} {
			if !strings.Contains(m, want) {
				t.Errorf("/metrics lacks %q", want)
			}
		}
		for _, secret := range []string{fileSecret, envSecret} {
			mustNotContain(t, "/metrics", m, secret)
		}
	})

	s.stop(t)
	for _, secret := range []string{fileSecret, envSecret} {
		mustNotContain(t, "logs", s.logs.String(), secret)
	}
	if !strings.Contains(s.logs.String(), `"msg":"decision"`) {
		t.Errorf("no audit line was logged")
	}
	if conn, err := net.DialTimeout("tcp", s.rt.ProxyAddr.String(), time.Second); err == nil {
		conn.Close()
		t.Error("the proxy still accepts connections after Run returned")
	}
}

// TestRuntimeUnattestedCaller: a caller no attestor vouches for is answered
// 407 with Proxy-Authenticate, before any rule runs.
func TestRuntimeUnattestedCaller(t *testing.T) {
	dir := t.TempDir()
	path := writeFile(t, dir, "c.yaml", `listen: {proxy: 127.0.0.1:0}
ca: {ephemeral: true, cert_out: ca.pem}
attestors:
  - type: cidr
    identities: [{id: elsewhere, cidrs: [10.0.0.0/8]}]
rules:
  - {name: all, hosts: ["*"]}
`, 0o644)
	s := start(t, path)
	if s.rt.AdminAddr != nil {
		t.Errorf("AdminAddr = %v without listen.admin", s.rt.AdminAddr)
	}
	resp, err := s.client(t).Get("http://example.com/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusProxyAuthRequired || resp.Header.Get("Proxy-Authenticate") == "" ||
		resp.Header.Get("X-Keygate-Error") != broker.CodeUnauthenticated {
		t.Errorf("status %d, Proxy-Authenticate %q, X-Keygate-Error %q", resp.StatusCode,
			resp.Header.Get("Proxy-Authenticate"), resp.Header.Get("X-Keygate-Error"))
	}
}
