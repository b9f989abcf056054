package intercept

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/rules"
	"github.com/keygate/broker/internal/testservers"
)

// These tests drive the transparent listener in-process. The kernel's
// SO_ORIGINAL_DST needs a real NAT redirect, which integration/ sets up in
// network namespaces with the project's own script; here the harness plays
// that part (harness.redirectDial), so every decision path can be checked
// with real TLS and HTTP clients and upstreams.

// hostsResolver resolves a fixed set of names, like an /etc/hosts override.
type hostsResolver map[string][]netip.Addr

func (r hostsResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	if a, ok := r[host]; ok {
		return a, nil
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
}

var loopback = hostsResolver{"example.com": {netip.MustParseAddr("127.0.0.1")}}

// transparentGET sends one HTTPS GET over a redirected connection with
// the given SNI and returns the response (nil when the broker closed the
// connection instead).
func (h *harness) transparentGET(orig, sni, path string) (*http.Response, string) {
	h.t.Helper()
	c := h.redirectDial(orig)
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	tc, err := h.tlsOver(c, sni)
	if err != nil {
		return nil, ""
	}
	_, port, _ := net.SplitHostPort(orig)
	fmt.Fprintf(tc, "GET %s HTTP/1.1\r\nHost: %s:%s\r\nAuthorization: Bearer workload-own\r\nConnection: close\r\n\r\n", path, sni, port)
	resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
	if err != nil {
		return nil, ""
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	h.record(fmt.Sprint(resp.Header) + string(b))
	return resp, string(b)
}

func TestTransparentTLSIntercepted(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{transparent: true, resolver: loopback, roots: []*httptest.Server{up.srv},
		rules: []rules.Spec{bearerRule("example", "example.com")}})
	orig := fmt.Sprintf("127.0.0.1:%d", up.port(t))

	resp, body := h.transparentGET(orig, "example.com", "/v1/x")
	if resp == nil || resp.StatusCode != http.StatusOK || !strings.Contains(body, "upstream ok /v1/x") {
		t.Fatalf("response %v %q", resp, body)
	}
	if up.count() != 1 {
		t.Fatalf("upstream got %d requests, want 1", up.count())
	}
	if got := up.auths[0]; len(got) != 1 || got[0] != "Bearer "+h.canary {
		t.Fatalf("upstream Authorization = %d values, want exactly the injected one", len(got))
	}
	var line map[string]any
	for _, l := range h.auditLines() {
		if l["path"] == "/v1/x" {
			line = l
		}
	}
	if line == nil || line["listener"] != ListenerTransparent || line["rule"] != "example" || line["credential.name"] != "token" {
		t.Fatalf("audit line = %v", line)
	}
}

// SNI names an allowed host while the workload aimed at another address:
// the broker dials the name, so the other address receives nothing.
func TestTransparentSNIAimedElsewhere(t *testing.T) {
	up := newTLSRecorder(t)
	var evilConns atomic.Int64
	evil, err := net.Listen("tcp", fmt.Sprintf("127.0.0.2:%d", up.port(t)))
	if err != nil {
		testservers.Missing(t, "cannot bind 127.0.0.2: %v", err)
	}
	defer evil.Close()
	go func() {
		for {
			c, err := evil.Accept()
			if err != nil {
				return
			}
			evilConns.Add(1)
			c.Close()
		}
	}()
	h := newHarness(t, harnessOpts{transparent: true, resolver: loopback, roots: []*httptest.Server{up.srv},
		allow: []string{"127.0.0.0/8"}, rules: []rules.Spec{bearerRule("example", "example.com")}})
	resp, _ := h.transparentGET(fmt.Sprintf("127.0.0.2:%d", up.port(t)), "example.com", "/y")
	if resp == nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("response %v", resp)
	}
	if n := evilConns.Load(); n != 0 {
		t.Fatalf("the original (other) address received %d connections", n)
	}
	if up.count() != 1 || up.auths[0][0] != "Bearer "+h.canary {
		t.Fatal("the named upstream did not get the one injected request")
	}
}

func TestTransparentDenied(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{transparent: true, resolver: hostsResolver{"example.com": {netip.MustParseAddr("127.0.0.1")},
		"evil.test": {netip.MustParseAddr("127.0.0.1")}}, roots: []*httptest.Server{up.srv},
		rules: []rules.Spec{bearerRule("example", "example.com")}})
	orig := fmt.Sprintf("127.0.0.1:%d", up.port(t))
	tests := []struct {
		name, sni string
	}{
		{"no rule for the name", "evil.test"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if resp, _ := h.transparentGET(orig, tc.sni, "/z"); resp != nil {
				t.Fatalf("got a response %d; want the connection closed", resp.StatusCode)
			}
		})
	}
	t.Run("TLS without SNI is never intercepted", func(t *testing.T) {
		c := h.redirectDial(orig)
		tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true}) // no ServerName: no SNI
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if err := tc.Handshake(); err == nil {
			t.Fatal("handshake succeeded without SNI and without a tunnel rule")
		}
	})
	t.Run("not redirected", func(t *testing.T) {
		c := h.redirectDial(h.taddr) // original destination == the listener itself
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if n, _ := c.Read(make([]byte, 1)); n != 0 {
			t.Fatal("a direct connection to the transparent port was served")
		}
	})
	if up.count() != 0 {
		t.Fatalf("upstream got %d requests", up.count())
	}
	codes := map[string]bool{}
	for _, l := range h.auditLines() {
		if e, _ := l["error"].(string); e != "" {
			codes[strings.SplitN(e, ":", 2)[0]] = true
		}
	}
	if !codes[broker.CodeDenied] || !codes[broker.CodeBadRequest] {
		t.Fatalf("audit error codes %v, want denied and bad_request", codes)
	}
}

// Without SNI, only a tunnel rule for the original address passes, and
// then the bytes go to that address untouched.
func TestTransparentOpaqueTunnel(t *testing.T) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	port := echo.Addr().(*net.TCPAddr).Port
	h := newHarness(t, harnessOpts{transparent: true,
		rules: []rules.Spec{{Name: "raw", Hosts: []string{"127.0.0.1"}, Ports: []int{port}, Action: "tunnel"}}})
	c := h.redirectDial(fmt.Sprintf("127.0.0.1:%d", port))
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := "\x00\x01binary protocol"
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
		t.Fatalf("echo through the tunnel = %q, %v", got, err)
	}
	// A server-first protocol sends nothing: decided on the address after
	// the peek wait, then spliced.
	c2 := h.redirectDial(fmt.Sprintf("127.0.0.1:%d", port))
	_ = c2.SetDeadline(time.Now().Add(5 * time.Second))
	time.Sleep(peekWait + 200*time.Millisecond)
	if _, err := io.WriteString(c2, "late"); err != nil {
		t.Fatal(err)
	}
	got = make([]byte, 4)
	if _, err := io.ReadFull(c2, got); err != nil || string(got) != "late" {
		t.Fatalf("server-first echo = %q, %v", got, err)
	}
	// Another port has no rule: closed.
	other := newPlainRecorder(t)
	c3 := h.redirectDial(fmt.Sprintf("127.0.0.1:%d", other.port(t)))
	_ = c3.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.WriteString(c3, "\x00x")
	if n, _ := c3.Read(make([]byte, 1)); n != 0 {
		t.Fatal("an opaque connection without a rule was served")
	}
	if other.count() != 0 {
		t.Fatal("the unruled destination was reached")
	}
}

func TestTransparentPlainHTTP(t *testing.T) {
	up := newPlainRecorder(t)
	port := up.port(t)
	rule := bearerRule("plain", "example.com")
	rule.AllowPlaintext = true
	rule.Ports = []int{port}
	h := newHarness(t, harnessOpts{transparent: true, resolver: loopback, rules: []rules.Spec{rule}})
	orig := fmt.Sprintf("127.0.0.1:%d", port)

	c := h.redirectDial(orig)
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	resp := h.rawRequest(c, fmt.Sprintf("GET /p HTTP/1.1\r\nHost: example.com:%d\r\nAuthorization: Basic d29ya2xvYWQ=\r\n\r\n", port))
	if resp.StatusCode != http.StatusOK || up.count() != 1 || len(up.auths[0]) != 1 || up.auths[0][0] != "Bearer "+h.canary {
		t.Fatalf("status %d, upstream %d requests", resp.StatusCode, up.count())
	}
	c2 := h.redirectDial(orig)
	_ = c2.SetDeadline(time.Now().Add(5 * time.Second))
	resp = h.rawRequest(c2, "GET /p HTTP/1.1\r\nHost: example.com:1\r\n\r\n")
	if resp.StatusCode != http.StatusMisdirectedRequest {
		t.Fatalf("Host port differing from the original port: %d, want 421", resp.StatusCode)
	}
	c3 := h.redirectDial(orig)
	_ = c3.SetDeadline(time.Now().Add(5 * time.Second))
	resp = h.rawRequest(c3, fmt.Sprintf("GET http://example.com:%d/p HTTP/1.1\r\nHost: example.com:%d\r\n\r\n", port, port))
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("absolute-form on a redirected connection: %d, want 400", resp.StatusCode)
	}
	if up.count() != 1 {
		t.Fatalf("upstream got %d requests, want 1", up.count())
	}
}

// The broker's own upstream connection redirected back to it (no uid
// exemption) is caught at once: both ends fail with loop_detected, and no
// second connection is dialled.
func TestTransparentLoopDetected(t *testing.T) {
	up := newTLSRecorder(t)
	h := newHarness(t, harnessOpts{transparent: true, resolver: loopback, roots: []*httptest.Server{up.srv},
		rules: []rules.Spec{bearerRule("example", "example.com")}})
	// The broker's own dialer connects to the transparent port, as a
	// redirect without exemption would make it do.
	own, err := h.proxy.opts.Dialer.DialContext(context.Background(), "tcp", h.taddr)
	if err != nil {
		t.Fatal(err)
	}
	defer own.Close()
	h.redirects.Store(own.LocalAddr().String(), netip.MustParseAddrPort(fmt.Sprintf("127.0.0.1:%d", up.port(t))))
	_ = own.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = own.Write([]byte{0x16, 0x03, 0x01})
	_, err = own.Read(make([]byte, 1))
	if err != ErrLoop {
		t.Fatalf("the broker's own connection read %v, want ErrLoop", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		found := false
		for _, l := range h.auditLines() {
			if e, _ := l["error"].(string); strings.HasPrefix(e, broker.CodeLoopDetected) {
				found = true
			}
		}
		if found {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no loop_detected audit line: %v", h.auditLines())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if up.count() != 0 {
		t.Fatal("the upstream was reached")
	}
}

func TestLooksLikeHTTP(t *testing.T) {
	for in, want := range map[string]bool{
		"GET / HTTP/1.1": true, "POST /x": true, "OPTIONS *": true, "PRI * HTTP/2.0": true,
		"\x16\x03\x01": false, "get /": false, "GE": false, "SSH-2.0-": false, "\x00\x00\x00\x08": false,
	} {
		br := bufio.NewReader(strings.NewReader(in))
		if got := looksLikeHTTP(br); got != want {
			t.Errorf("looksLikeHTTP(%q) = %v, want %v", in, got, want)
		}
	}
}
