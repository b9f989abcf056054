package integration

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/template"
	"time"

	"github.com/keygate/broker/internal/canarytest"
)

// testTimeout bounds every client call and every wait in one test.
const testTimeout = 10 * time.Second

// gitUser is the user name the git test injects with the canary password.
const gitUser = "x-access-token"

// harness is one test's world: a temp dir, a broker MITM CA made with
// `broker ca init`, a canary secret, and a transcript of every byte the
// clients were shown. At cleanup (after every broker has stopped) the
// broker's output and the transcript are scanned for the canary.
type harness struct {
	t      *testing.T
	dir    string
	caDir  string // ca.pem, ca-key.pem
	canary string // the secret value; never printed by the tests

	mu         sync.Mutex
	transcript []transcriptEntry
	brokers    []*brokerProc
}

type transcriptEntry struct {
	what string
	data []byte
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	h := &harness{t: t, dir: t.TempDir(), canary: canarytest.New("static credential (" + t.Name() + ")")}
	h.caDir = filepath.Join(h.dir, "broker-ca")
	res := runBroker(t, nil, "ca", "init", "--dir", h.caDir)
	if res.code != 0 {
		t.Fatalf("broker ca init: exit %d\n%s%s", res.code, res.stdout, res.stderr)
	}
	// Registered first, so it runs last: after every broker has stopped
	// and flushed its output.
	t.Cleanup(h.scanForCanary)
	return h
}

// caPEM is the broker CA clients trust.
func (h *harness) caPEM() string { return filepath.Join(h.caDir, "ca.pem") }

func (h *harness) caPool() *x509.CertPool {
	h.t.Helper()
	pem, err := os.ReadFile(h.caPEM())
	if err != nil {
		h.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		h.t.Fatal("broker CA: no certificate in ca.pem")
	}
	return pool
}

// bearer is the Authorization value the broker injects for a static token
// credential holding the canary.
func (h *harness) bearer() string { return "Bearer " + h.canary }

// basic is the Authorization value for the git credential.
func (h *harness) basic() string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(gitUser+":"+h.canary))
}

// record adds bytes a client was shown (response headers, bodies, client
// output) to the transcript that is scanned for the canary.
func (h *harness) record(what string, data []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.transcript = append(h.transcript, transcriptEntry{what, bytes.Clone(data)})
}

func (h *harness) recordResponse(what string, resp *http.Response, body []byte) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s\n", resp.Status)
	_ = resp.Header.Write(&b)
	b.Write(body)
	h.record(what, b.Bytes())
}

// secretNeedles are the spellings of the canary that must never appear:
// the raw value, its URL escaping, and base64 at every byte alignment (the
// stable middle part of base64(pad+canary) for pad of 0, 1 and 2 bytes,
// which finds the canary inside any longer base64 text, such as a Basic
// credential).
func secretNeedles(secret string) []string {
	needles := []string{secret, url.QueryEscape(secret)}
	for pad := 0; pad < 3; pad++ {
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding} {
			s := enc.EncodeToString(append(make([]byte, pad), secret...))
			start := 0
			if pad > 0 {
				start = 4 // the first quantum mixes in the padding bytes
			}
			end := len(s) - 4 // the last quantum may be partial
			if end-start >= 16 {
				needles = append(needles, s[start:end])
			}
		}
	}
	return needles
}

// scanForCanary fails the test when a transcript entry or a broker's
// output contains a spelling of the canary, and hands both to the
// suite-wide sweep (canarytest), which also looks for every other
// registered secret (backend-issued ones included) at the end of the run.
func (h *harness) scanForCanary() {
	t := h.t
	needles := secretNeedles(h.canary)
	check := func(what string, data []byte) {
		for _, n := range needles {
			if bytes.Contains(data, []byte(n)) {
				t.Errorf("SECRET LEAK: %s contains the canary credential (or an encoding of it)", what)
				return
			}
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, e := range h.transcript {
		check(e.what, e.data)
		canarytest.Observe("transcript ("+t.Name()+"): "+e.what, e.data)
	}
	for _, b := range h.brokers {
		check("broker output ("+b.name+")", b.output())
		canarytest.Observe("broker output ("+t.Name()+"/"+b.name+")", b.output())
	}
}

// redactCanary is for test failure messages only.
func redactCanary(s string) string {
	return canaryRE.ReplaceAllString(s, "CANARY-<redacted>")
}

var canaryRE = regexp.MustCompile(`CANARY-[A-Za-z0-9-]+`)

// ---- running the broker CLI

type cliResult struct {
	code           int
	stdout, stderr string
}

// runBroker runs one broker command to completion.
func runBroker(t *testing.T, env []string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, brokerBin, args...)
	cmd.Env = append(cleanEnv(t.TempDir()), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	res := cliResult{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		res.code = ee.ExitCode()
	default:
		t.Fatalf("broker %s: %v", strings.Join(args, " "), err)
	}
	if ctx.Err() != nil {
		t.Fatalf("broker %s: did not finish within %v", strings.Join(args, " "), testTimeout)
	}
	return res
}

// ---- a served broker

// syncBuffer is a bytes.Buffer safe for a subprocess writer and readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.b.Bytes())
}

// brokerProc is a running `broker run`.
type brokerProc struct {
	name      string
	test      string // the test that started it, for sweep sources
	cmd       *exec.Cmd
	combined  syncBuffer // stdout and stderr, interleaved
	stdout    syncBuffer
	proxyAddr string // 127.0.0.1:port
	adminAddr string
	done      chan struct{}
	waitErr   error
}

func (b *brokerProc) output() []byte { return b.combined.Bytes() }

func (b *brokerProc) exited() bool {
	select {
	case <-b.done:
		return true
	default:
		return false
	}
}

// proxyURL is the explicit-proxy URL clients are given.
func (b *brokerProc) proxyURL() string { return "http://" + b.proxyAddr }

// configData is what a config template sees. Proxy and Admin are filled
// in by start; Ports holds test-specific values.
type configData struct {
	Proxy, Admin         string
	ProxyPort, AdminPort string
	CACert               string
	CAKey                string
	Bundle               string // the upstream test CA
	Ports                map[string]int
}

// brokerSpec describes one broker to start.
type brokerSpec struct {
	name   string
	config string   // text/template over configData
	env    []string // extra environment (credential variables)
	args   []string // extra `broker run` arguments
	// command, when set, is run instead of the broker binary (a wrapper
	// such as `ip netns exec NS setpriv ... BROKER run ...`); args are
	// then ignored by launch.
	command []string
}

// start renders the config with fresh free ports, starts `broker run
// --config` and waits for /healthz. A port taken between choosing it and
// binding it is retried with new ports.
func (h *harness) start(spec brokerSpec, ports map[string]int) *brokerProc {
	t := h.t
	t.Helper()
	tmpl, err := template.New(spec.name).Option("missingkey=error").Parse(spec.config)
	if err != nil {
		t.Fatalf("config template: %v", err)
	}
	if spec.name == "" {
		spec.name = "broker"
	}
	var last *brokerProc
	for attempt := 0; attempt < 3; attempt++ {
		data := configData{
			Proxy:  freeAddr(t),
			Admin:  freeAddr(t),
			CACert: h.caPEM(),
			CAKey:  filepath.Join(h.caDir, "ca-key.pem"),
			Bundle: upstreamBundle,
			Ports:  ports,
		}
		data.ProxyPort, data.AdminPort = portOf(data.Proxy), portOf(data.Admin)
		var cfg bytes.Buffer
		if err := tmpl.Execute(&cfg, data); err != nil {
			t.Fatalf("config template: %v", err)
		}
		path := filepath.Join(h.dir, fmt.Sprintf("%s-%d.yaml", spec.name, attempt))
		if err := os.WriteFile(path, cfg.Bytes(), 0o600); err != nil {
			t.Fatal(err)
		}
		b := h.launch(spec, append([]string{"run", "--config", path}, spec.args...), data.Proxy, data.Admin, nil)
		if err := b.waitHealthy(testTimeout); err == nil {
			return b
		}
		last = b
		if !b.exited() || !bytes.Contains(b.output(), []byte("address already in use")) {
			break
		}
	}
	b := last
	if !b.exited() {
		b.stop(t)
	}
	t.Fatalf("broker %s did not become healthy:\n%s", spec.name, redactCanary(string(b.output())))
	return nil
}

// launch starts the broker binary; it is stopped with SIGTERM at cleanup.
func (h *harness) launch(spec brokerSpec, args []string, proxy, admin string, env []string) *brokerProc {
	t := h.t
	t.Helper()
	b := &brokerProc{name: spec.name, test: t.Name(), proxyAddr: proxy, adminAddr: admin, done: make(chan struct{})}
	if len(spec.command) > 0 {
		b.cmd = exec.Command(spec.command[0], spec.command[1:]...)
	} else {
		b.cmd = exec.Command(brokerBin, args...)
	}
	b.cmd.Env = append(append(cleanEnv(h.dir), spec.env...), env...)
	b.cmd.Stdout = multiWriter{&b.combined, &b.stdout}
	b.cmd.Stderr = &b.combined
	if err := b.cmd.Start(); err != nil {
		t.Fatalf("start broker: %v", err)
	}
	go func() {
		b.waitErr = b.cmd.Wait()
		close(b.done)
	}()
	h.mu.Lock()
	h.brokers = append(h.brokers, b)
	h.mu.Unlock()
	t.Cleanup(func() { b.stop(t) })
	return b
}

type multiWriter []interface{ Write([]byte) (int, error) }

func (m multiWriter) Write(p []byte) (int, error) {
	for _, w := range m {
		_, _ = w.Write(p)
	}
	return len(p), nil
}

// waitHealthy polls /healthz on the admin port until it answers 200, the
// process exits, or d passes.
func (b *brokerProc) waitHealthy(d time.Duration) error {
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{Proxy: nil}}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if b.exited() {
			return fmt.Errorf("broker exited: %v", b.waitErr)
		}
		resp, err := client.Get("http://" + b.adminAddr + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.New("timed out waiting for /healthz")
}

// stop sends SIGTERM and waits; a broker that does not exit in time is
// killed and the test fails. A clean shutdown exits 0.
func (b *brokerProc) stop(t *testing.T) {
	if b.exited() {
		return
	}
	b.scrapeMetrics()
	_ = b.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.done:
	case <-time.After(testTimeout):
		_ = b.cmd.Process.Kill()
		<-b.done
		t.Errorf("broker %s did not exit within %v of SIGTERM", b.name, testTimeout)
		return
	}
	if b.waitErr != nil {
		t.Errorf("broker %s: exit after SIGTERM: %v\n%s", b.name, b.waitErr, redactCanary(string(b.output())))
	}
	if out := b.output(); bytes.Contains(out, []byte("WARNING: DATA RACE")) {
		t.Errorf("broker %s (built with KEYGATE_E2E_RACE=1) reported a data race:\n%s", b.name, redactCanary(string(out)))
	}
}

// awaitExit waits up to limit for the broker to exit after a signal the
// test sent itself; one that does not is killed. Either that or an exit
// other than 0 fails the test.
func (b *brokerProc) awaitExit(t *testing.T, limit time.Duration) {
	t.Helper()
	select {
	case <-b.done:
	case <-time.After(limit):
		_ = b.cmd.Process.Kill()
		<-b.done
		t.Errorf("broker did not exit within %v of SIGTERM", limit)
	}
	if b.waitErr != nil {
		t.Errorf("broker exit after SIGTERM: %v (want 0)\n%s", b.waitErr, redactCanary(string(b.output())))
	}
}

// startServes starts spec again (a restart) and asserts that the new
// process answers GET target with 200 within 3 s of its launch; it
// returns that time.
func (h *harness) startServes(t *testing.T, spec brokerSpec, ports map[string]int, target, what string) time.Duration {
	t.Helper()
	launched := time.Now()
	b := h.start(spec, ports)
	resp, err := h.goClient(b).Get(target)
	if err != nil {
		t.Fatalf("GET through the %s broker: %v", what, err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	h.recordResponse(spec.name+" "+what+" broker", resp, body)
	serving := time.Since(launched)
	if resp.StatusCode != http.StatusOK {
		t.Errorf("%s broker: %s, want 200", what, resp.Status)
	}
	if serving > 3*time.Second {
		t.Errorf("the %s broker served its first request %v after launch, want ≤ 3s", what, serving)
	}
	return serving
}

// scrapeMetrics hands the broker's final /metrics to the secret sweep: a
// metric label must never carry a credential. A broker without an admin
// listener (or one that does not answer) has nothing to scrape.
func (b *brokerProc) scrapeMetrics() {
	if b.adminAddr == "" {
		return
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{Proxy: nil}}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://" + b.adminAddr + "/metrics")
	if err != nil {
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	canarytest.Observe("broker metrics ("+b.test+"/"+b.name+")", body)
}

// auditLine waits for the broker's audit line (message "decision") with
// the given request id and returns it decoded.
func (b *brokerProc) auditLine(t *testing.T, requestID string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for {
		for _, line := range bytes.Split(b.output(), []byte("\n")) {
			if !bytes.Contains(line, []byte(requestID)) {
				continue
			}
			var m map[string]any
			if json.Unmarshal(line, &m) == nil && m["msg"] == "decision" && m["request_id"] == requestID {
				return m
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no audit line with request_id %s in the broker output", requestID)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// auditDecisions returns the broker's audit lines (message "decision")
// written so far, decoded, in order.
func (b *brokerProc) auditDecisions() []map[string]any {
	var out []map[string]any
	for _, line := range bytes.Split(b.output(), []byte("\n")) {
		var m map[string]any
		if json.Unmarshal(line, &m) == nil && m["msg"] == "decision" {
			out = append(out, m)
		}
	}
	return out
}

// freeAddr returns 127.0.0.1:port for a port that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// portOf returns the port of a host:port.
func portOf(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}
