package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// baseConfig is the part of every served config that tests do not vary:
// listeners, the broker CA from `broker ca init`, a CIDR attestor for
// loopback callers, and egress that trusts the upstream test CA and allows
// 127.0.0.1 only (deny_private stays on for everything else).
const baseConfig = `
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
  allow_cidrs: [127.0.0.1/32]
  ca_bundle: {{.Bundle}}
`

// tokenEnv is the variable holding the canary for bearer credentials.
const tokenEnv = "KG_E2E_TOKEN"

// apiConfig allows GET/HEAD/POST to localhost:allowed except /admin/*, and
// injects the canary as a bearer token.
const apiConfig = baseConfig + `
credentials:
  api-token: {source: static, value: env:KG_E2E_TOKEN}
rules:
  - name: api
    hosts: [localhost]
    ports: [{{index .Ports "allowed"}}]
    when: 'request.method in ["GET", "HEAD", "POST"] && !request.path.startsWith("/admin")'
    inject: {credential: api-token, as: bearer}
`

// startAPI starts a broker with apiConfig in front of allowed.
func (h *harness) startAPI(allowed *upstream) *brokerProc {
	return h.start(brokerSpec{name: "api", config: apiConfig, env: []string{tokenEnv + "=" + h.canary}},
		map[string]int{"allowed": allowed.port()})
}

// ---- raw wire clients

// connectResult is the broker's answer to a CONNECT.
type connectResult struct {
	conn net.Conn // open, positioned after the response; nil unless 200
	resp *http.Response
	body []byte
}

// connect sends "CONNECT authority" to the proxy and reads the answer.
func (h *harness) connect(b *brokerProc, authority string) connectResult {
	t := h.t
	t.Helper()
	c, err := net.DialTimeout("tcp", b.proxyAddr, testTimeout)
	if err != nil {
		t.Fatalf("dial proxy: %v", err)
	}
	_ = c.SetDeadline(time.Now().Add(testTimeout))
	if _, err := io.WriteString(c, "CONNECT "+authority+" HTTP/1.1\r\nHost: "+authority+"\r\n\r\n"); err != nil {
		c.Close()
		t.Fatalf("write CONNECT: %v", err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		c.Close()
		t.Fatalf("CONNECT %s: reading the answer: %v", authority, err)
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		c.Close()
		h.recordResponse("CONNECT "+authority, resp, body)
		return connectResult{resp: resp, body: body}
	}
	h.recordResponse("CONNECT "+authority, resp, nil)
	if br.Buffered() > 0 {
		c.Close()
		t.Fatalf("CONNECT %s: %d unexpected bytes after 200", authority, br.Buffered())
	}
	t.Cleanup(func() { c.Close() })
	return connectResult{conn: c, resp: resp}
}

// tlsClient performs the workload's TLS handshake inside a tunnel, trusting
// only the broker CA.
func (h *harness) tlsClient(conn net.Conn, serverName string) (*tls.Conn, error) {
	tc := tls.Client(conn, &tls.Config{
		ServerName: serverName,
		RootCAs:    h.caPool(),
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"http/1.1"},
	})
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	return tc, nil
}

// rawExchange writes raw request bytes and reads one response.
func (h *harness) rawExchange(conn net.Conn, what, raw string) (*http.Response, []byte) {
	t := h.t
	t.Helper()
	_ = conn.SetDeadline(time.Now().Add(testTimeout))
	if _, err := io.WriteString(conn, raw); err != nil {
		t.Fatalf("%s: write: %v", what, err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("%s: read response: %v", what, err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s: read body: %v", what, err)
	}
	resp.Body.Close()
	h.recordResponse(what, resp, body)
	return resp, body
}

// frontExchange sends raw bytes to the proxy listener on a new connection.
func (h *harness) frontExchange(b *brokerProc, what, raw string) (*http.Response, []byte) {
	h.t.Helper()
	c, err := net.DialTimeout("tcp", b.proxyAddr, testTimeout)
	if err != nil {
		h.t.Fatalf("dial proxy: %v", err)
	}
	defer c.Close()
	return h.rawExchange(c, what, raw)
}

// keygateError is the JSON body of a broker refusal (DESIGN.md §7).
type keygateError struct {
	Error     string `json:"error"`
	Message   string `json:"message"`
	Rule      string `json:"rule"`
	RequestID string `json:"request_id"`
}

// expectRefusal asserts a broker refusal: the status, X-Keygate-Error equal
// to code (when code is not empty), X-Keygate-Request-Id, and a JSON body
// with the same code and request id.
func expectRefusal(t *testing.T, what string, resp *http.Response, body []byte, status int, code string) {
	t.Helper()
	if resp.StatusCode != status {
		t.Errorf("%s: status %d, want %d (body %q)", what, resp.StatusCode, status, redactCanary(string(body)))
		return
	}
	got := resp.Header.Get("X-Keygate-Error")
	if code != "" && got != code {
		t.Errorf("%s: X-Keygate-Error %q, want %q", what, got, code)
	}
	rid := resp.Header.Get("X-Keygate-Request-Id")
	if rid == "" {
		t.Errorf("%s: no X-Keygate-Request-Id", what)
	}
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		t.Errorf("%s: Content-Type %q, want JSON", what, resp.Header.Get("Content-Type"))
		return
	}
	var e keygateError
	if err := json.Unmarshal(body, &e); err != nil {
		t.Errorf("%s: body is not JSON: %v (%q)", what, err, body)
		return
	}
	if e.Error != got || e.RequestID != rid {
		t.Errorf("%s: JSON body {error %q, request_id %q} disagrees with headers {%q, %q}", what, e.Error, e.RequestID, got, rid)
	}
}

// goClient is a net/http client that uses the broker as its proxy and
// trusts only the broker CA.
func (h *harness) goClient(b *brokerProc) *http.Client {
	pu, err := url.Parse(b.proxyURL())
	if err != nil {
		h.t.Fatal(err)
	}
	tr := &http.Transport{
		Proxy:               http.ProxyURL(pu),
		TLSClientConfig:     &tls.Config{RootCAs: h.caPool(), MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout: testTimeout,
		ForceAttemptHTTP2:   false,
	}
	h.t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: testTimeout}
}

// ---- subprocess clients

type toolResult struct {
	code           int
	stdout, stderr string
}

// runTool runs a client program with a clean environment plus env, records
// its output in the transcript and returns it.
func (h *harness) runTool(name string, env []string, dir string, args ...string) toolResult {
	h.t.Helper()
	return h.runToolWithin(testTimeout, name, env, dir, args...)
}

// runToolWithin is runTool with a time limit other than testTimeout (a
// pgbench run).
func (h *harness) runToolWithin(timeout time.Duration, name string, env []string, dir string, args ...string) toolResult {
	t := h.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = cleanEnv(h.dir, env...)
	cmd.Dir = dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	res := toolResult{stdout: out.String(), stderr: errb.String()}
	h.record(name+" stdout", out.Bytes())
	h.record(name+" stderr", errb.Bytes())
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		t.Fatalf("%s did not finish within %v\nstderr: %s", name, timeout, redactCanary(res.stderr))
	case err == nil:
	case errors.As(err, &ee):
		res.code = ee.ExitCode()
	default:
		t.Fatalf("%s: %v", name, err)
	}
	return res
}
