package integration

import (
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
)

// ssrfDenyConfig has NO egress exception: deny_private is on (the
// default) and allow_cidrs is empty. The one rule allows every host on the
// canary port (and 80/443), so whatever refuses is the egress guard, not
// the rules.
const ssrfDenyConfig = `
listen:
  proxy: {{.Proxy}}
  admin: {{.Admin}}
ca:
  cert: {{.CACert}}
  key: {{.CAKey}}
attestors:
  - type: cidr
    identities: [{id: e2e-workload, cidrs: [127.0.0.0/8]}]
egress:
  ca_bundle: {{.Bundle}}
rules:
  - name: catch-all
    hosts: ["*"]
    ports: [{{index .Ports "canary"}}, 80, 443]
`

// ssrfSelfConfig allows exactly 127.0.0.1/32 and has a catch-all rule for
// the broker's own ports and a canary on 127.0.0.2.
const ssrfSelfConfig = baseConfig + `
rules:
  - name: catch-all
    hosts: ["*"]
    ports: [{{.ProxyPort}}, {{.AdminPort}}, {{index .Ports "canary"}}]
`

// TestSSRF_EndToEnd (SECURITY-TESTS T-A1, T-A3): every spelling of a
// loopback, metadata or private destination is refused with 403
// egress_denied, as an absolute-form request and as a CONNECT, and the
// canary listener never sees a connection.
func TestSSRF_EndToEnd(t *testing.T) {
	t.Parallel()
	h := newHarness(t)

	t.Run("deny_private", func(t *testing.T) {
		canary := newCanaryListener(t, "127.0.0.1")
		b := h.start(brokerSpec{name: "ssrf", config: ssrfDenyConfig}, map[string]int{"canary": canary.port()})
		p := canary.port()
		hosts := []string{
			// SECURITY-TESTS T-A1
			"127.1", "2130706433", "0x7f.1", "0177.0.0.1", "[::ffff:127.0.0.1]", "[64:ff9b::a9fe:a9fe]",
			"localhost.", "LOCALHOST",
			// more spellings of the same places
			"127.0.0.1", "localhost", "0x7f000001", "017700000001", "127.0.1", "[::ffff:7f00:1]",
			"[64:ff9b::7f00:1]", "[::1]", "0.0.0.0", "0", "[::]", "[0:0:0:0:0:ffff:127.0.0.1]",
		}
		for _, host := range hosts {
			t.Run(host, func(t *testing.T) {
				h.expectEgressDenied(t, b, fmt.Sprintf("%s:%d", host, p))
			})
		}
		// Private and metadata ranges on the default ports.
		for _, hp := range []string{
			"169.254.169.254:80", "[fd00:ec2::254]:80", "10.0.0.1:443", "192.168.1.1:80",
			"172.16.0.1:443", "100.64.0.1:80", "[fe80::1]:443", "[fc00::1]:443", "224.0.0.1:80",
		} {
			t.Run(hp, func(t *testing.T) { h.expectEgressDenied(t, b, hp) })
		}
		if n := canary.conns.Load(); n != 0 {
			t.Errorf("the loopback canary accepted %d connections, want 0", n)
		}
	})

	t.Run("self and allow_cidrs boundary", func(t *testing.T) {
		canary := newCanaryListener(t, "127.0.0.2")
		b := h.start(brokerSpec{name: "ssrf-self", config: ssrfSelfConfig}, map[string]int{"canary": canary.port()})
		admin, proxy := portOf(b.adminAddr), portOf(b.proxyAddr)
		targets := []string{
			// The broker's own listeners, although 127.0.0.1/32 is allowed.
			"127.0.0.1:" + admin, "localhost:" + admin, "127.1:" + admin, "[::ffff:127.0.0.1]:" + admin,
			"127.0.0.1:" + proxy, "localhost.:" + proxy,
			// allow_cidrs 127.0.0.1/32 does not open the rest of 127/8.
			fmt.Sprintf("127.0.0.2:%d", canary.port()),
			fmt.Sprintf("0x7f.0.0.2:%d", canary.port()),
			fmt.Sprintf("2130706434:%d", canary.port()),
			fmt.Sprintf("[::ffff:127.0.0.2]:%d", canary.port()),
		}
		for _, hp := range targets {
			t.Run(hp, func(t *testing.T) { h.expectEgressDenied(t, b, hp) })
		}
		if n := canary.conns.Load(); n != 0 {
			t.Errorf("the 127.0.0.2 canary accepted %d connections, want 0", n)
		}
	})
}

// expectEgressDenied sends an absolute-form GET and a CONNECT for
// hostport and expects 403 egress_denied from both. A CONNECT to a name is
// decided by the rules before resolution and may be established; then the
// request inside the tunnel must be refused instead.
func (h *harness) expectEgressDenied(t *testing.T, b *brokerProc, hostport string) {
	t.Helper()
	raw := fmt.Sprintf("GET http://%s/ HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", hostport, hostport)
	resp, body := h.frontExchange(b, "absolute-form "+hostport, raw)
	expectRefusal(t, "GET http://"+hostport+"/", resp, body, http.StatusForbidden, "egress_denied")

	cr := h.connect(b, hostport)
	if cr.conn == nil {
		expectRefusal(t, "CONNECT "+hostport, cr.resp, cr.body, http.StatusForbidden, "egress_denied")
		return
	}
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		t.Fatal(err)
	}
	if net.ParseIP(strings.Trim(host, "[]")) != nil {
		t.Errorf("CONNECT %s to an IP literal the guard refuses was established (want 403 before any tunnel)", hostport)
	}
	sni := strings.ToLower(strings.TrimSuffix(host, "."))
	tc, err := h.tlsClient(cr.conn, sni)
	if err != nil {
		t.Fatalf("CONNECT %s: TLS in the tunnel: %v", hostport, err)
	}
	resp, body = h.rawExchange(tc, "in tunnel "+hostport, fmt.Sprintf("GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", hostport))
	expectRefusal(t, "CONNECT "+hostport+" then GET", resp, body, http.StatusForbidden, "egress_denied")
}
