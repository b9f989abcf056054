package integration

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
)

// curlArgs are the flags every curl run gets: no ~/.curlrc (-q must come
// first), bounded time, no retries, silent but showing errors.
func curlArgs(extra ...string) []string {
	return append([]string{"-q", "-sS", "--max-time", "8", "--connect-timeout", "5"}, extra...)
}

// httpStatus extracts the final status code curl printed with -w.
func parseCurlStatus(t *testing.T, stdout string) int {
	t.Helper()
	i := strings.LastIndex(stdout, "\nstatus=")
	if i < 0 {
		t.Fatalf("no status marker in curl output %q", redactCanary(stdout))
	}
	var code int
	if _, err := fmt.Sscanf(stdout[i:], "\nstatus=%d", &code); err != nil {
		t.Fatalf("parse curl status: %v", err)
	}
	return code
}

// TestCurlThroughProxy: curl with --proxy and with HTTPS_PROXY reaches the
// upstream, which sees exactly the injected Authorization; curl itself
// (-v shows every request header it sent) never sees the credential.
func TestCurlThroughProxy(t *testing.T) {
	t.Parallel()
	curl := requireTool(t, "curl")
	h := newHarness(t)
	up := newUpstream(t, "allowed", nil)
	b := h.startAPI(up)
	target := fmt.Sprintf("https://localhost:%d/hello", up.port())

	cases := []struct {
		name string
		env  []string
		args []string
	}{
		{name: "flag", args: []string{"--proxy", b.proxyURL()}},
		{name: "HTTPS_PROXY", env: []string{"HTTPS_PROXY=" + b.proxyURL()}},
		{name: "https_proxy", env: []string{"https_proxy=" + b.proxyURL()}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := curlArgs(append(tc.args, "-v", "--cacert", h.caPEM(), "-w", "\nstatus=%{http_code}", target)...)
			res := h.runTool(curl, tc.env, "", args...)
			if res.code != 0 {
				t.Fatalf("curl exit %d\n%s", res.code, redactCanary(res.stderr))
			}
			if code := parseCurlStatus(t, res.stdout); code != http.StatusOK {
				t.Errorf("status %d, want 200", code)
			}
			if !strings.Contains(res.stdout, "hello from allowed") {
				t.Errorf("body %q, want the upstream's answer", res.stdout)
			}
			if !strings.Contains(res.stderr, "CONNECT localhost:") {
				t.Errorf("curl -v shows no CONNECT: the request did not go through the proxy\n%s", res.stderr)
			}
			if strings.Contains(strings.ToLower(res.stderr), "> authorization:") {
				t.Errorf("curl sent an Authorization header itself; the test must start without one")
			}
			up.expectInjected(t, i+1, h.bearer())
		})
	}
}

// TestCurlWorkloadAuthorizationReplaced: whatever Authorization the
// workload sends (any case, several lines), the upstream sees exactly one,
// the broker's.
func TestCurlWorkloadAuthorizationReplaced(t *testing.T) {
	t.Parallel()
	curl := requireTool(t, "curl")
	h := newHarness(t)
	up := newUpstream(t, "allowed", nil)
	b := h.startAPI(up)
	target := fmt.Sprintf("https://localhost:%d/preset", up.port())

	res := h.runTool(curl, nil, "", curlArgs("-v", "--proxy", b.proxyURL(), "--cacert", h.caPEM(),
		"-H", "Authorization: Bearer WORKLOAD", "-H", "authorization: x",
		"-w", "\nstatus=%{http_code}", target)...)
	if res.code != 0 {
		t.Fatalf("curl exit %d\n%s", res.code, redactCanary(res.stderr))
	}
	if code := parseCurlStatus(t, res.stdout); code != http.StatusOK {
		t.Errorf("status %d, want 200", code)
	}
	if !strings.Contains(res.stderr, "> Authorization: Bearer WORKLOAD") {
		t.Errorf("curl did not send the workload's header; the test proves nothing\n%s", res.stderr)
	}
	up.expectInjected(t, 1, h.bearer())

	// The same on the wire, with the variants curl cannot produce: two
	// identical names, upper case, and a Proxy-Authorization.
	cr := h.connect(b, fmt.Sprintf("localhost:%d", up.port()))
	if cr.conn == nil {
		t.Fatalf("CONNECT: %s", cr.resp.Status)
	}
	tc, err := h.tlsClient(cr.conn, "localhost")
	if err != nil {
		t.Fatalf("TLS in the tunnel: %v", err)
	}
	raw := fmt.Sprintf("GET /raw HTTP/1.1\r\nHost: localhost:%d\r\nAuthorization: Bearer ONE\r\n"+
		"Authorization: Bearer TWO\r\nAUTHORIZATION: Basic eDp5\r\nProxy-Authorization: Basic eDp5\r\n"+
		"Connection: close\r\n\r\n", up.port())
	resp, _ := h.rawExchange(tc, "raw preset Authorization", raw)
	if resp.StatusCode != http.StatusOK {
		t.Errorf("raw: status %d, want 200", resp.StatusCode)
	}
	up.expectInjected(t, 2, h.bearer())
	for _, r := range up.requests() {
		if v := r.Header.Values("Proxy-Authorization"); len(v) > 0 {
			t.Errorf("upstream received Proxy-Authorization %q", v)
		}
	}
}

// TestDeniedPathAndHost: a path the rule refuses and a host no rule names
// are answered by the broker with 403 + JSON, and nothing is forwarded.
func TestDeniedPathAndHost(t *testing.T) {
	t.Parallel()
	curl := requireTool(t, "curl")
	h := newHarness(t)
	up := newUpstream(t, "allowed", nil)
	other := newUpstream(t, "unlisted", nil)
	b := h.startAPI(up)

	t.Run("path", func(t *testing.T) {
		res := h.runTool(curl, nil, "", curlArgs("-i", "--proxy", b.proxyURL(), "--cacert", h.caPEM(),
			fmt.Sprintf("https://localhost:%d/admin/users", up.port()))...)
		if res.code != 0 {
			t.Fatalf("curl exit %d\n%s", res.code, res.stderr)
		}
		// -i prints the CONNECT answer first, then the inner response.
		inner := res.stdout[strings.LastIndex(res.stdout, "HTTP/1.1 "):]
		head, body, _ := strings.Cut(inner, "\r\n\r\n")
		if !strings.HasPrefix(head, "HTTP/1.1 403") {
			t.Fatalf("status line %q, want 403", strings.SplitN(head, "\r\n", 2)[0])
		}
		lower := strings.ToLower(head)
		if !strings.Contains(lower, "\r\nx-keygate-error: denied") || !strings.Contains(lower, "\r\nx-keygate-request-id: ") {
			t.Errorf("403 without X-Keygate-Error: denied / X-Keygate-Request-Id:\n%s", head)
		}
		var e keygateError
		if err := json.Unmarshal([]byte(body), &e); err != nil || e.Error != "denied" || e.RequestID == "" {
			t.Errorf("body %q: want JSON {error: denied, request_id}", body)
		}
		up.expectNone(t, false)
	})

	t.Run("host", func(t *testing.T) {
		// 127.0.0.1 is reachable (allow_cidrs) but no rule names it.
		res := h.runTool(curl, nil, "", curlArgs("-v", "--proxy", b.proxyURL(), "--cacert", h.caPEM(),
			fmt.Sprintf("https://127.0.0.1:%d/", other.port()))...)
		if res.code == 0 {
			t.Fatalf("curl succeeded through a CONNECT no rule allows")
		}
		if !strings.Contains(res.stderr, "< HTTP/1.1 403") || !strings.Contains(strings.ToLower(res.stderr), "< x-keygate-error: denied") {
			t.Errorf("curl -v does not show a 403 with X-Keygate-Error: denied\n%s", res.stderr)
		}
		cr := h.connect(b, fmt.Sprintf("127.0.0.1:%d", other.port()))
		if cr.conn != nil {
			t.Fatalf("CONNECT to an unlisted host was established")
		}
		expectRefusal(t, "CONNECT unlisted", cr.resp, cr.body, http.StatusForbidden, "denied")
		other.expectNone(t, true)
	})
}
