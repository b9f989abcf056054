package integration

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
)

// bindingConfig allows and injects for localhost:allowed, and also allows
// (without a credential) the evil upstream at 127.0.0.1:evil: the evil
// server is reachable through the broker, so only destination binding
// stands between a misdirected request and it.
const bindingConfig = baseConfig + `
credentials:
  api-token: {source: static, value: env:KG_E2E_TOKEN}
rules:
  - name: api
    hosts: [localhost]
    ports: [{{index .Ports "allowed"}}]
    inject: {credential: api-token, as: bearer}
  - name: evil-reachable
    hosts: ["127.0.0.1"]
    ports: [{{index .Ports "evil"}}]
`

// TestDestinationBinding (SECURITY-TESTS T-A4): inside a tunnel to the
// allowed host, the Host header, an absolute-form URL and the SNI must all
// name the CONNECT target; otherwise 421 (or a failed handshake) and the
// evil server gets nothing. Case and trailing-dot spellings of the allowed
// host are the same host and succeed.
func TestDestinationBinding(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	allowed := newUpstream(t, "allowed", nil)
	evil := newUpstream(t, "evil", nil)
	b := h.start(brokerSpec{name: "binding", config: bindingConfig, env: []string{tokenEnv + "=" + h.canary}},
		map[string]int{"allowed": allowed.port(), "evil": evil.port()})
	ap, ep := allowed.port(), evil.port()
	connectTo := fmt.Sprintf("localhost:%d", ap)

	// inTunnel opens CONNECT localhost:allowed, TLS with sni, and sends raw.
	inTunnel := func(t *testing.T, sni, raw string) (*http.Response, []byte) {
		t.Helper()
		cr := h.connect(b, connectTo)
		if cr.conn == nil {
			t.Fatalf("CONNECT %s: %s", connectTo, cr.resp.Status)
		}
		tc, err := h.tlsClient(cr.conn, sni)
		if err != nil {
			t.Fatalf("TLS with SNI %q: %v", sni, err)
		}
		return h.rawExchange(tc, t.Name(), raw)
	}

	misdirected := []struct {
		name, raw string
	}{
		{"Host evil IP", fmt.Sprintf("GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n", ep)},
		{"Host evil name", fmt.Sprintf("GET / HTTP/1.1\r\nHost: evil.test:%d\r\nConnection: close\r\n\r\n", ap)},
		{"Host allowed other port", fmt.Sprintf("GET / HTTP/1.1\r\nHost: localhost:%d\r\nConnection: close\r\n\r\n", ep)},
		{"Host allowed default port", "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"},
		{"absolute-form evil", fmt.Sprintf("GET https://127.0.0.1:%d/ HTTP/1.1\r\nHost: localhost:%d\r\nConnection: close\r\n\r\n", ep, ap)},
		{"absolute-form evil Host evil", fmt.Sprintf("GET https://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n", ep, ep)},
		{"absolute-form http scheme", fmt.Sprintf("GET http://localhost:%d/ HTTP/1.1\r\nHost: localhost:%d\r\nConnection: close\r\n\r\n", ap, ap)},
	}
	for _, tc := range misdirected {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := inTunnel(t, "localhost", tc.raw)
			expectRefusal(t, tc.name, resp, body, http.StatusMisdirectedRequest, "misdirected_request")
		})
	}
	evil.expectNone(t, true)
	allowed.expectNone(t, false)

	t.Run("SNI evil", func(t *testing.T) {
		for _, sni := range []string{"evil.test", "allowed.test"} {
			cr := h.connect(b, connectTo)
			if cr.conn == nil {
				t.Fatalf("CONNECT: %s", cr.resp.Status)
			}
			if tc, err := h.tlsClient(cr.conn, sni); err == nil {
				tc.Close()
				t.Errorf("TLS handshake with SNI %q inside a tunnel to %s succeeded", sni, connectTo)
			}
		}
		evil.expectNone(t, true)
		allowed.expectNone(t, false)
	})

	t.Run("allowed spellings", func(t *testing.T) {
		spellings := []struct{ sni, host string }{
			{"localhost", fmt.Sprintf("LOCALHOST:%d", ap)},
			{"localhost", fmt.Sprintf("localhost.:%d", ap)},
			{"LocalHost", fmt.Sprintf("LocalHost.:%d", ap)},
			{"localhost.", fmt.Sprintf("localhost:%d", ap)},
		}
		for _, s := range spellings {
			raw := fmt.Sprintf("GET https://%s/ok HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", strings.ToUpper(s.host), s.host)
			resp, body := inTunnel(t, s.sni, raw)
			if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "hello from allowed") {
				t.Errorf("SNI %q Host %q: %s %q, want 200 from the allowed upstream", s.sni, s.host, resp.Status, body)
			}
		}
		allowed.expectInjected(t, len(spellings), h.bearer())
	})

	// The control: evil really is reachable through this broker when it
	// is the CONNECT target, so the zero counts above mean something. It
	// gets no credential: its rule injects none.
	t.Run("control evil reachable directly", func(t *testing.T) {
		cr := h.connect(b, fmt.Sprintf("127.0.0.1:%d", ep))
		if cr.conn == nil {
			t.Fatalf("CONNECT evil: %s", cr.resp.Status)
		}
		if _, err := h.tlsClient(cr.conn, "evil.test"); err == nil {
			t.Fatalf("TLS with SNI evil.test inside a tunnel to 127.0.0.1 succeeded")
		}
		cr = h.connect(b, fmt.Sprintf("127.0.0.1:%d", ep))
		if cr.conn == nil {
			t.Fatalf("CONNECT evil: %s", cr.resp.Status)
		}
		// Go sends no SNI for an IP literal; the broker binds to the
		// CONNECT authority.
		tc, err := h.tlsClient(cr.conn, "127.0.0.1")
		if err != nil {
			t.Fatalf("TLS to 127.0.0.1: %v", err)
		}
		resp, _ := h.rawExchange(tc, "evil direct", fmt.Sprintf("GET /direct HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n", ep))
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("evil direct: %s, want 200", resp.Status)
		}
		reqs := evil.requests()
		if len(reqs) != 1 || reqs[0].Path != "/direct" || len(reqs[0].Auth) != 0 {
			t.Errorf("evil upstream requests = %d (want exactly the control request, without Authorization)", len(reqs))
		}
	})
}

// TestNoInjectionOverPlaintextTunnel (SECURITY-TESTS T-A5): plain HTTP
// inside a CONNECT to an injecting rule is refused; nothing is forwarded.
func TestNoInjectionOverPlaintextTunnel(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	up := newUpstream(t, "allowed", nil)
	b := h.startAPI(up)
	cr := h.connect(b, fmt.Sprintf("localhost:%d", up.port()))
	if cr.conn == nil {
		t.Fatalf("CONNECT: %s", cr.resp.Status)
	}
	resp, body := h.rawExchange(cr.conn, "plaintext in tunnel",
		fmt.Sprintf("GET / HTTP/1.1\r\nHost: localhost:%d\r\n\r\n", up.port()))
	expectRefusal(t, "plaintext in tunnel", resp, body, http.StatusForbidden, "plaintext_denied")
	up.expectNone(t, true)
}
