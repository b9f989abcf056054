package integration

// Fault matrix F-09..F-14 of SECURITY-TESTS.md §5 against the real broker
// binary. The upstreams are the harness's recording TLS servers, or a raw
// TLS recorder where the test must see bytes that never became a complete
// HTTP request (F-14); no off-the-shelf server records a torn request.

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/template"
	"time"

	"github.com/keygate/broker/internal/testservers"
)

// startOwned starts `[prefix...] broker run --config path` on a config the
// test owns: place writes the rendered template at path (a file, or a
// symlink to one). Ports are chosen like h.start, with the same retry when
// a port was taken in between.
func (h *harness) startOwned(name, config string, ports map[string]int, env, prefix []string, path string,
	place func(path string, data []byte)) (*brokerProc, []byte) {
	t := h.t
	t.Helper()
	tmpl, err := template.New(name).Option("missingkey=error").Parse(config)
	if err != nil {
		t.Fatalf("config template: %v", err)
	}
	var last *brokerProc
	for attempt := 0; attempt < 3; attempt++ {
		data := configData{Proxy: freeAddr(t), Admin: freeAddr(t), CACert: h.caPEM(),
			CAKey: filepath.Join(h.caDir, "ca-key.pem"), Bundle: upstreamBundle, Ports: ports}
		data.ProxyPort, data.AdminPort = portOf(data.Proxy), portOf(data.Admin)
		var cfg bytes.Buffer
		if err := tmpl.Execute(&cfg, data); err != nil {
			t.Fatalf("config template: %v", err)
		}
		place(path, cfg.Bytes())
		cmd := append(append([]string(nil), prefix...), brokerBin, "run", "--config", path)
		b := h.launch(brokerSpec{name: name, env: env, command: cmd}, nil, data.Proxy, data.Admin, nil)
		if err := b.waitHealthy(testTimeout); err == nil {
			return b, cfg.Bytes()
		}
		last = b
		if !b.exited() || !bytes.Contains(b.output(), []byte("address already in use")) {
			break
		}
	}
	if !last.exited() {
		last.stop(t)
	}
	t.Fatalf("broker %s did not become healthy:\n%s", name, redactCanary(string(last.output())))
	return nil, nil
}

// symlinkSwap atomically points link at target (a new link renamed over
// the old one), as Kubernetes does with a ConfigMap's ..data link.
func symlinkSwap(t *testing.T, link, target string) {
	t.Helper()
	tmp := link + ".swap"
	_ = os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, link); err != nil {
		t.Fatal(err)
	}
}

// waitMetric polls a /metrics series until it reaches want or d passes,
// and returns the last value seen.
func (b *brokerProc) waitMetric(t *testing.T, series string, want float64, d time.Duration) float64 {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		v := b.metric(t, series)
		if v >= want || time.Now().After(deadline) {
			return v
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// logLinesSince decodes the broker's JSON log lines written after offset
// bytes of output whose message starts with msg.
func (b *brokerProc) logLinesSince(offset int, msg string) []map[string]any {
	out := b.output()
	if offset > len(out) {
		offset = len(out)
	}
	var lines []map[string]any
	for _, l := range bytes.Split(out[offset:], []byte("\n")) {
		var m map[string]any
		if json.Unmarshal(l, &m) != nil {
			continue
		}
		if s, _ := m["msg"].(string); strings.HasPrefix(s, msg) {
			lines = append(lines, m)
		}
	}
	return lines
}

// f09Config allows GET /allowed on the upstream with the canary bearer;
// anything else on it is denied (no rule matches).
const f09Config = baseConfig + `
credentials:
  good-token: {source: static, value: env:KG_E2E_TOKEN}
rules:
  - name: allowed
    hosts: [localhost]
    ports: [{{index .Ports "up"}}]
    when: 'request.path == "/allowed"'
    inject: {credential: good-token, as: bearer}
`

// TestBrokenReloadKeepsLastGood (F-09): the config file is broken in turn
// by a CEL syntax error, a CEL type error, an unknown YAML key, an unknown
// CEL variable, an empty file, a half-written file (written in place, not
// renamed), mode 000, and a symlink swapped to a broken and to a missing
// target. Each is picked up by the broker's own file watch and rejected:
// keygate_config_reloads_total{result="failure"} moves by exactly one,
// the log names the file (and the line, where the file has one) and the
// reason without the secret, the process stays up with /readyz 200, the
// allowed request still gets exactly the canary credential and the denied
// one is still denied with nothing forwarded. Restoring the good file is
// a successful reload every time.
//
// The broker runs as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH
// (setpriv), so that mode 000 really makes the file unreadable to it.
func TestBrokenReloadKeepsLastGood(t *testing.T) {
	t.Parallel()
	var prefix []string
	if os.Geteuid() == 0 {
		setpriv := requireTool(t, "setpriv")
		prefix = []string{setpriv, "--bounding-set=-dac_override,-dac_read_search",
			"--inh-caps=-dac_override,-dac_read_search", "--"}
	}
	h := newHarness(t)
	up := newUpstream(t, "f09", nil)
	dir := filepath.Join(h.dir, "cfg")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "current.yaml")
	goodTarget := filepath.Join(dir, "v1.yaml")
	// Started on a symlink, as a ConfigMap mount would be.
	b, good := h.startOwned("f09", f09Config, map[string]int{"up": up.port()}, []string{tokenEnv + "=" + h.canary},
		prefix, cfgPath, func(path string, data []byte) {
			if err := os.WriteFile(goodTarget, data, 0o600); err != nil {
				t.Fatal(err)
			}
			symlinkSwap(t, path, goodTarget)
		})
	waitReadyz(t, b, testTimeout)
	client := h.goClient(b)
	allowed := fmt.Sprintf("https://localhost:%d/allowed", up.port())
	denied := fmt.Sprintf("https://localhost:%d/denied", up.port())
	forwarded := 0

	// check: the last good config decides, the process is up and ready.
	check := func(when string) {
		t.Helper()
		if b.exited() {
			t.Fatalf("%s: the broker exited: %v", when, b.waitErr)
		}
		if code, _ := adminGet(t, b, "/readyz"); code != http.StatusOK {
			t.Errorf("%s: /readyz %d, want 200", when, code)
		}
		resp, err := client.Get(allowed)
		if err != nil {
			t.Fatalf("%s: GET /allowed: %v", when, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		h.recordResponse(when+" GET /allowed", resp, body)
		if resp.StatusCode != http.StatusOK {
			t.Errorf("%s: GET /allowed: %s, want 200 (the last good config)", when, resp.Status)
		} else {
			forwarded++
		}
		resp, err = client.Get(denied)
		if err != nil {
			t.Fatalf("%s: GET /denied: %v", when, err)
		}
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		h.recordResponse(when+" GET /denied", resp, body)
		expectRefusal(t, when+": GET /denied", resp, body, http.StatusForbidden, "denied")
		up.expectInjected(t, forwarded, h.bearer())
	}
	check("before any reload")

	const (
		failSeries = `keygate_config_reloads_total{result="failure"}`
		okSeries   = `keygate_config_reloads_total{result="success"}`
	)
	whenLine := bytes.Index(good, []byte("    when: '"))
	if whenLine < 0 {
		t.Fatal("the rendered config has no when line")
	}
	replace := func(old, new string) []byte {
		t.Helper()
		if !bytes.Contains(good, []byte(old)) {
			t.Fatalf("the good config lacks %q", old)
		}
		return bytes.Replace(good, []byte(old), []byte(new), 1)
	}
	restoreFile := func() { writeAtomic(t, cfgPath, good) }
	lineRE := regexp.MustCompile(regexp.QuoteMeta(cfgPath) + `:\d+: `)
	cases := []struct {
		name     string
		break_   func()
		restore  func()
		reason   string // in the logged problem
		withLine bool   // the problem names a line
	}{
		{"CEL syntax error", func() { writeAtomic(t, cfgPath, replace(`request.path == "/allowed"`, `request.path == `)) },
			restoreFile, "Syntax error", true},
		{"CEL type error", func() {
			writeAtomic(t, cfgPath, replace(`request.path == "/allowed"`, `request.path.size() == "/allowed"`))
		}, restoreFile, "no matching overload", true},
		{"unknown YAML key", func() { writeAtomic(t, cfgPath, replace("    when:", "    colour: red\n    when:")) },
			restoreFile, "field colour not found", true},
		{"unknown CEL variable", func() { writeAtomic(t, cfgPath, replace(`request.path ==`, `requst.path ==`)) },
			restoreFile, "undeclared reference to 'requst'", true},
		{"empty file", func() { writeAtomic(t, cfgPath, nil) }, restoreFile, "the config is empty", true},
		{"truncated half-write", func() {
			// Written in place, the way a crashed writer leaves it: the
			// file ends in the middle of the rule's when line.
			if err := os.WriteFile(cfgPath, good[:whenLine+20], 0o600); err != nil {
				t.Fatal(err)
			}
		}, restoreFile, "", true},
		{"mode 000", func() {
			if err := os.Chmod(cfgPath, 0); err != nil {
				t.Fatal(err)
			}
		}, func() {
			if err := os.Chmod(cfgPath, 0o600); err != nil {
				t.Fatal(err)
			}
		}, "cannot read: permission denied", false},
		{"symlink swapped to a broken target", func() {
			bad := filepath.Join(dir, "v2-broken.yaml")
			if err := os.WriteFile(bad, replace(`request.path == "/allowed"`, `request.path == `), 0o600); err != nil {
				t.Fatal(err)
			}
			symlinkSwap(t, cfgPath, bad)
		}, func() { symlinkSwap(t, cfgPath, goodTarget) }, "Syntax error", true},
		{"symlink swapped to a missing target", func() { symlinkSwap(t, cfgPath, filepath.Join(dir, "v3-missing.yaml")) },
			func() { symlinkSwap(t, cfgPath, goodTarget) }, "cannot read: no such file", false},
	}
	type figure struct {
		name             string
		detect, recovery time.Duration
	}
	var figures []figure
	for _, tc := range cases {
		fail0, ok0 := b.metric(t, failSeries), b.metric(t, okSeries)
		offset := len(b.output())
		start := time.Now()
		tc.break_()
		if got := b.waitMetric(t, failSeries, fail0+1, testTimeout); got < fail0+1 {
			t.Fatalf("%s: the broker did not reject the file within %v (failures %v → %v)\n%s",
				tc.name, testTimeout, fail0, got, redactCanary(string(b.output()[offset:])))
		}
		detect := time.Since(start)
		// Outlast the watcher's debounce: one broken write, one failure.
		time.Sleep(600 * time.Millisecond)
		if got := b.metric(t, failSeries); got != fail0+1 {
			t.Errorf("%s: failures moved by %v, want exactly 1", tc.name, got-fail0)
		}
		if got := b.metric(t, okSeries); got != ok0 {
			t.Errorf("%s: a broken file counted %v successful reloads", tc.name, got-ok0)
		}
		lines := b.logLinesSince(offset, "config reload rejected")
		if len(lines) == 0 {
			t.Errorf("%s: no \"config reload rejected\" log line", tc.name)
		}
		var problems []string
		for _, l := range lines {
			p, _ := l["problem"].(string)
			if p == "" {
				p, _ = l["error"].(string)
			}
			problems = append(problems, p)
		}
		all := strings.Join(problems, "\n")
		switch {
		case !strings.Contains(all, cfgPath):
			t.Errorf("%s: the rejection does not name the file: %q", tc.name, redactCanary(all))
		case tc.withLine && !lineRE.MatchString(all):
			t.Errorf("%s: the rejection names no line: %q", tc.name, redactCanary(all))
		case !strings.Contains(all, tc.reason):
			t.Errorf("%s: the rejection does not give the reason %q: %q", tc.name, tc.reason, redactCanary(all))
		}
		for _, n := range secretNeedles(h.canary) {
			if strings.Contains(all, n) {
				t.Errorf("%s: the rejection log line contains the secret", tc.name)
			}
		}
		check(tc.name)

		start = time.Now()
		tc.restore()
		if got := b.waitMetric(t, okSeries, ok0+1, testTimeout); got < ok0+1 {
			t.Fatalf("%s: restoring the good file was not reloaded within %v\n%s", tc.name, testTimeout,
				redactCanary(string(b.output()[offset:])))
		}
		figures = append(figures, figure{tc.name, detect, time.Since(start)})
		check(tc.name + ", restored")
	}
	for _, f := range figures {
		t.Logf("F-09 %-36s rejected after %v, good file reloaded after %v", f.name, f.detect.Round(time.Millisecond), f.recovery.Round(time.Millisecond))
	}
	t.Logf("F-09: %d broken files, %d allowed requests forwarded (all with exactly the canary credential), 0 denied forwarded",
		len(cases), forwarded)
}

// f11Config: two rules whose `when` fails at run time on this workload (a
// claim a cidr identity never has; a regex over every header that exceeds
// the cost limit on a request with many headers), followed by a catch-all
// that would allow anything: an evaluation error must deny, never fall
// through to it.
const f11Config = baseConfig + `
limits: {max_header_bytes: 4194304, max_header_count: 20000}
credentials:
  tok: {source: static, value: env:KG_E2E_TOKEN}
rules:
  - name: needs-claim
    hosts: [localhost]
    ports: [{{index .Ports "up"}}]
    when: 'request.path == "/claim" && workload.claims.sub == "build"'
    inject: {credential: tok, as: bearer}
  - name: regex-headers
    hosts: [localhost]
    ports: [{{index .Ports "up"}}]
    when: 'request.path == "/cost" && request.headers.exists(k, request.headers[k].matches("(a+)+b"))'
    inject: {credential: tok, as: bearer}
  - name: catch-all
    hosts: [localhost]
    ports: [{{index .Ports "up"}}]
    inject: {credential: tok, as: bearer}
`

// TestRuntimeRuleErrorFailsClosed (F-11): a `when` that fails at run time
// (missing claim; cost limit exceeded by 10,000 headers) is a 403 broker
// refusal with the erring rule named; the upstream receives nothing; the
// catch-all after it does not decide; the audit line records the error.
// Other paths keep working through the catch-all.
func TestRuntimeRuleErrorFailsClosed(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	up := newUpstream(t, "f11", nil)
	b := h.start(brokerSpec{name: "f11", config: f11Config, env: []string{tokenEnv + "=" + h.canary}},
		map[string]int{"up": up.port()})
	client := h.goClient(b)
	base := fmt.Sprintf("https://localhost:%d", up.port())

	many := http.Header{}
	for i := 0; i < 10000; i++ {
		many.Set(fmt.Sprintf("X-H-%d", i), strings.Repeat("a", 64))
	}
	for _, tc := range []struct {
		name, path, rule, why string
		header                http.Header
	}{
		{"missing claim", "/claim", "needs-claim", "no such key", nil},
		{"cost limit exceeded", "/cost", "regex-headers", "cost limit exceeded", many},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := http.NewRequest(http.MethodGet, base+tc.path, nil)
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range tc.header {
				req.Header[k] = v
			}
			start := time.Now()
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("GET %s: %v", tc.path, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			took := time.Since(start)
			h.recordResponse("f11 "+tc.name, resp, body)
			// A failed evaluation has its own code, so an operator can tell
			// a broken rule from an intended denial (F-11).
			expectRefusal(t, tc.name, resp, body, http.StatusForbidden, "rule_error")
			var e keygateError
			_ = json.Unmarshal(body, &e)
			if e.Rule != tc.rule {
				t.Errorf("refusal names rule %q, want %q (the erring rule, not the catch-all)", e.Rule, tc.rule)
			}
			line := b.auditLine(t, resp.Header.Get("X-Keygate-Request-Id"))
			errText, _ := line["error"].(string)
			if line["decision"] != "deny" || line["rule"] != tc.rule || !strings.Contains(errText, tc.why) {
				t.Errorf("audit line: decision %v rule %v error %q; want deny, %s, an error naming %q",
					line["decision"], line["rule"], errText, tc.rule, tc.why)
			}
			if line["credential.name"] != nil && line["credential.name"] != "" {
				t.Errorf("audit line names credential %v for a refused request", line["credential.name"])
			}
			t.Logf("F-11 %s: 403 after %v", tc.name, took.Round(time.Millisecond))
		})
	}
	up.expectNone(t, false)

	// The catch-all still serves other paths: the errors were per request.
	resp, err := client.Get(base + "/other")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	h.recordResponse("f11 /other", resp, body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /other: %s, want 200 from the catch-all", resp.Status)
	}
	up.expectInjected(t, 1, h.bearer())
}

// tornRecorder is a TLS upstream that never answers: it records every byte
// of each connection until the peer goes away, so the test can tell a
// complete request from one torn off mid-body.
type tornRecorder struct {
	ln       net.Listener
	bodySeen chan struct{} // closed once a request head and minBody body bytes arrived
	minBody  int
	once     sync.Once
	wg       sync.WaitGroup

	mu    sync.Mutex
	conns []*tornConn
}

type tornConn struct {
	data   []byte
	err    error // what ended the read: EOF, reset...
	closed time.Time
}

func newTornRecorder(t *testing.T, minBody int) *tornRecorder {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{upstreamLeaf}, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	r := &tornRecorder{ln: ln, bodySeen: make(chan struct{}), minBody: minBody}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			tc := &tornConn{}
			r.mu.Lock()
			r.conns = append(r.conns, tc)
			r.mu.Unlock()
			r.wg.Add(1)
			go r.serve(c, tc)
		}
	}()
	t.Cleanup(func() { _ = ln.Close() })
	return r
}

func (r *tornRecorder) serve(c net.Conn, tc *tornConn) {
	defer r.wg.Done()
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Read(buf)
		r.mu.Lock()
		tc.data = append(tc.data, buf[:n]...)
		if i := bytes.Index(tc.data, []byte("\r\n\r\n")); i >= 0 && len(tc.data)-i-4 >= r.minBody {
			r.once.Do(func() { close(r.bodySeen) })
		}
		if err != nil {
			tc.err, tc.closed = err, time.Now()
			r.mu.Unlock()
			return
		}
		r.mu.Unlock()
	}
}

func (r *tornRecorder) port() int { return r.ln.Addr().(*net.TCPAddr).Port }

// TestSIGKILLMidRequest (F-14): a POST whose body the client is still
// sending when the broker is killed with SIGKILL. The upstream (a raw TLS
// recorder) has by then received the request head and part of the body;
// it sees the connection end with the body incomplete, and never a
// complete request, nor one without exactly the injected credential. A
// fresh broker started on the same config serves within 3 s.
func TestSIGKILLMidRequest(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	const declared, sent = 1 << 20, 256 << 10
	rec := newTornRecorder(t, 16<<10)
	ports := map[string]int{"allowed": rec.port()}
	spec := brokerSpec{name: "f14", config: apiConfig, env: []string{tokenEnv + "=" + h.canary}}
	b := h.start(spec, ports)

	// The workload: 1 MiB declared, 256 KiB sent, then it stalls.
	pr, pw := io.Pipe()
	defer pw.Close()
	go func() {
		_, _ = pw.Write(bytes.Repeat([]byte("p"), sent))
	}()
	req, err := http.NewRequest(http.MethodPost, fmt.Sprintf("https://localhost:%d/upload", rec.port()), pr)
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = declared
	clientErr := make(chan error, 1)
	go func() {
		resp, err := h.goClient(b).Do(req)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			h.recordResponse("f14 POST", resp, body)
			err = fmt.Errorf("got a response: %s", resp.Status)
		}
		clientErr <- err
	}()
	select {
	case <-rec.bodySeen:
	case <-time.After(testTimeout):
		t.Fatalf("the upstream did not receive the request head and body bytes within %v (does the broker buffer bodies?)", testTimeout)
	}
	killAt := time.Now()
	if err := b.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("SIGKILL: %v", err)
	}
	<-b.done
	waited := make(chan struct{})
	go func() { rec.wg.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(testTimeout):
		t.Fatalf("the upstream connection stayed open %v after the broker was killed", testTimeout)
	}
	// The stalled body must end too: net/http waits for its body writer
	// before it reports the broken connection.
	_ = pw.CloseWithError(errors.New("test: workload gives up"))
	select {
	case err := <-clientErr:
		if err == nil || strings.Contains(err.Error(), "got a response") {
			t.Errorf("the workload's POST: %v, want a connection error", err)
		}
	case <-time.After(testTimeout + 2*time.Second):
		t.Errorf("the workload's POST did not end after the broker was killed")
	}

	rec.mu.Lock()
	conns := rec.conns
	rec.mu.Unlock()
	requests, complete, badCred := 0, 0, 0
	var lastClose time.Duration
	for i, c := range conns {
		if d := c.closed.Sub(killAt); d > lastClose {
			lastClose = d
		}
		if len(c.data) == 0 {
			continue
		}
		r, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(c.data)))
		if err != nil {
			t.Logf("upstream conn %d: %d bytes, no complete request head (%v)", i, len(c.data), err)
			continue
		}
		requests++
		if v := r.Header.Values("Authorization"); len(v) != 1 || v[0] != h.bearer() {
			badCred++
			t.Errorf("upstream conn %d: Authorization %s, want exactly the injected value", i, describeAuth(v, h.bearer()))
		}
		n, err := io.Copy(io.Discard, r.Body)
		if err == nil {
			complete++
			t.Errorf("upstream conn %d: a complete %d-byte request arrived although the broker died mid-body", i, n)
		} else if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("upstream conn %d: body read ended with %v, want an unexpected EOF", i, err)
		}
		t.Logf("upstream conn %d: %s %s, %d of %d body bytes, then %v", i, r.Method, r.URL.Path, n, r.ContentLength, c.err)
	}
	if requests != 1 {
		t.Errorf("the upstream saw %d request heads, want 1", requests)
	}

	// A fresh process on the same config serves at once.
	up := newUpstream(t, "f14-after", nil)
	serving := h.startServes(t, spec, map[string]int{"allowed": up.port()}, fmt.Sprintf("https://localhost:%d/after", up.port()), "restarted")
	up.expectInjected(t, 1, h.bearer())
	t.Logf("F-14: 1 request torn by SIGKILL after %d of %d body bytes; upstream saw %d head(s), %d complete, %d without/with a wrong credential; upstream conn closed %v after the kill; restart served after %v",
		sent, declared, requests, complete, badCred, lastClose.Round(time.Millisecond), serving.Round(time.Millisecond))
}

// TestSIGTERMRevokesAndRestarts (F-12, the parts TestSIGTERMUnderLoad
// does not cover): a broker whose credential comes from a real Vault
// (AppRole login, KV v2) is sent SIGTERM while 8 clients load it and 100
// idle MITM tunnels are open. The proxy listener closes at once; every
// tunnel is closed by the broker; it exits 0 within its 10 s exit timeout;
// every request the upstream received carried exactly the full credential;
// the broker's Vault login token (and so every lease under it) is revoked
// (its accessor no longer resolves); a new process on the same config
// serves within 3 s of launch.
func TestSIGTERMRevokesAndRestarts(t *testing.T) {
	t.Parallel()
	v := testservers.StartVault(t)
	h := newHarness(t)
	up := newUpstream(t, "f12", nil)
	role := newAppRole(t, v, t.TempDir(), kvReadPolicy, "10m")
	v.Must("POST", "secret/data/app/github", map[string]any{"data": map[string]any{"token": h.canary}})
	// Cached 5 min, so requests under load use the one login token.
	cfg := strings.NewReplacer("@VAULT@", v.Addr, "@ROLE@", role.roleFile, "@SECRET@", role.secretFile, "@CACHE@", "5m").Replace(vaultKVConfig)
	spec := brokerSpec{name: "f12", config: cfg}
	ports := map[string]int{"up": up.port()}
	b := h.start(spec, ports)
	waitReadyz(t, b, testTimeout)
	authority := fmt.Sprintf("localhost:%d", up.port())
	target := "https://" + authority + "/x"

	// Warm up: the login happens, the accessor exists.
	resp, err := h.goClient(b).Get(target)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	h.recordResponse("f12 warm-up", resp, body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("warm-up GET: %s\n%s", resp.Status, redactCanary(string(b.output())))
	}
	accessors := approleAccessors(t, v)
	if len(accessors) != 1 {
		t.Fatalf("%d AppRole login tokens before SIGTERM, want the broker's 1", len(accessors))
	}

	// 100 idle MITM tunnels, each having completed one request.
	const nTunnels = 100
	tunnels := make([]net.Conn, 0, nTunnels)
	for i := 0; i < nTunnels; i++ {
		cr := h.connect(b, authority)
		if cr.conn == nil {
			t.Fatalf("tunnel %d: CONNECT %d", i, cr.resp.StatusCode)
		}
		tc, err := h.tlsClient(cr.conn, "localhost")
		if err != nil {
			t.Fatalf("tunnel %d: TLS: %v", i, err)
		}
		resp, _ := h.rawExchange(tc, "f12 tunnel request", "GET /t HTTP/1.1\r\nHost: "+authority+"\r\n\r\n")
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("tunnel %d: %s", i, resp.Status)
		}
		_ = tc.SetDeadline(time.Time{})
		tunnels = append(tunnels, tc)
	}
	load := h.startLoad(b, target, "f12 load GET /x", false)
	time.Sleep(800 * time.Millisecond)

	sigAt := time.Now()
	if err := b.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	// The listener closes at once.
	listenerClosed, ok := time.Duration(0), false
	for time.Since(sigAt) < 2*time.Second {
		c, err := net.DialTimeout("tcp", b.proxyAddr, 200*time.Millisecond)
		if err != nil {
			listenerClosed, ok = time.Since(sigAt), true
			break
		}
		c.Close()
		time.Sleep(5 * time.Millisecond)
	}
	if !ok {
		t.Errorf("the proxy listener still accepted connections 2s after SIGTERM")
	}
	// Every idle tunnel is closed by the broker.
	var tunnelsClosed time.Duration
	var twg sync.WaitGroup
	var tmu sync.Mutex
	open := 0
	for _, tc := range tunnels {
		twg.Add(1)
		go func() {
			defer twg.Done()
			_ = tc.SetReadDeadline(time.Now().Add(testTimeout + 5*time.Second))
			_, err := tc.Read(make([]byte, 1))
			var ne net.Error
			tmu.Lock()
			defer tmu.Unlock()
			if errors.As(err, &ne) && ne.Timeout() {
				open++
				return
			}
			if d := time.Since(sigAt); d > tunnelsClosed {
				tunnelsClosed = d
			}
		}()
	}
	b.awaitExit(t, testTimeout+2*time.Second)
	exited := time.Since(sigAt)
	twg.Wait()
	load.stop()
	if open > 0 {
		t.Errorf("%d of %d idle tunnels were never closed by the broker", open, nTunnels)
	}

	// Every upstream request carried exactly the full credential.
	res := load.results()
	okCount := 0
	for _, r := range res {
		if r.err == nil && r.status == http.StatusOK {
			okCount++
		} else if r.err == nil {
			t.Errorf("load request: status %d (want 200 or a connection error)", r.status)
		}
	}
	reqs := up.requests()
	bad := 0
	for i, r := range reqs {
		if len(r.Auth) != 1 || r.Auth[0] != h.bearer() {
			bad++
			t.Errorf("upstream request %d: Authorization %s, want exactly the injected value", i, describeAuth(r.Auth, h.bearer()))
		}
	}

	// The old incarnation's login token is revoked.
	code, _, err := v.Do("POST", "auth/token/lookup-accessor", map[string]any{"accessor": accessors[0]})
	if err != nil {
		t.Fatal(err)
	}
	if code == http.StatusOK {
		t.Errorf("the broker's Vault login token is still valid after SIGTERM (lookup-accessor 200)")
	}

	// A new process on the same config (a new AppRole secret id, as a
	// secret-id with a use limit would need) serves within 3 s of launch.
	role.newSecretID(t)
	serving := h.startServes(t, spec, ports, target, "new")
	t.Logf("F-12: %d load requests (%d complete 200s), %d idle tunnels; listener closed %v, tunnels closed by %v, exit %v after SIGTERM; upstream %d requests, %d without/with a wrong credential; login token revoked: %v; new process served after %v",
		len(res), okCount, nTunnels, listenerClosed.Round(time.Millisecond), tunnelsClosed.Round(time.Millisecond),
		exited.Round(time.Millisecond), len(reqs), bad, code != http.StatusOK, serving.Round(time.Millisecond))
}

// brokerSVID returns the certificate the broker's proxy_tls listener
// presents, handshaking as the workload whose SVID is in dir.
func brokerSVID(t *testing.T, addr, dir string) (*x509.Certificate, error) {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "svid.0.pem"), filepath.Join(dir, "svid.0.key"))
	if err != nil {
		t.Fatal(err)
	}
	var got *x509.Certificate
	conf := &tls.Config{
		Certificates: []tls.Certificate{cert},
		// Only to read what the broker presents; trust is checked by the
		// workload client below, against the SPIFFE bundle.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			c, err := x509.ParseCertificate(raw[0])
			got = c
			return err
		},
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", addr, conf)
	if err != nil {
		return got, err
	}
	c.Close()
	return got, nil
}

// svidClient is a workload client that talks TLS (with its SVID) to the
// broker's proxy_tls listener and trusts the SPIFFE bundle for the proxy
// and the broker CA for the origin.
func (h *harness) svidClient(t *testing.T, proxyAddr, dir string) *http.Client {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "svid.0.pem"), filepath.Join(dir, "svid.0.key"))
	if err != nil {
		t.Fatal(err)
	}
	roots := h.caPool()
	bundle, err := os.ReadFile(filepath.Join(dir, "bundle.0.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if !roots.AppendCertsFromPEM(bundle) {
		t.Fatal("no certificate in the SPIFFE bundle")
	}
	pu := &url.URL{Scheme: "https", Host: proxyAddr}
	tr := &http.Transport{
		Proxy:               http.ProxyURL(pu),
		TLSClientConfig:     &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: roots, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout: 5 * time.Second,
		DisableKeepAlives:   true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: testTimeout}
}

// TestSVIDLossFailsClosed (F-15) with a real SPIRE server and agent: the
// broker's own SVID is made short-lived (20 s), then the agent is killed.
// The broker keeps serving attested workloads with its cached SVID and
// stays ready until the SVID's NotAfter; after it, /readyz is 503, the
// mTLS listener refuses handshakes and nothing more reaches the upstream.
func TestSVIDLossFailsClosed(t *testing.T) {
	t.Parallel()
	spiffeRequireRoot(t)
	setpriv := requireTool(t, "setpriv")
	sp := startSPIRE(t)

	// The broker's entry: 20 s SVIDs from now on.
	out := sp.run(t, sp.serverBin(), "entry", "show", "-socketPath", sp.serverSock, "-spiffeID", spiffeIDSelf)
	m := regexp.MustCompile(`Entry ID\s*:\s*(\S+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no entry id in spire-server entry show output:\n%s", out)
	}
	sp.run(t, sp.serverBin(), "entry", "update", "-socketPath", sp.serverSock, "-entryID", m[1],
		"-parentID", "spiffe://example.org/host", "-spiffeID", spiffeIDSelf, "-selector", "unix:uid:0",
		"-dns", "localhost", "-x509SVIDTTL", "20")
	dirOne := sp.fetchX509(t, setpriv, spiffeUIDOne)

	h := newHarness(t)
	up := newUpstream(t, "f15", nil)
	tlsPort, _ := strconv.Atoi(portOf(freeAddr(t)))
	cfg := strings.ReplaceAll(spiffeConfig, "@AGENT_SOCK@", sp.agentSock)
	b := h.start(brokerSpec{name: "f15", config: cfg, env: []string{
		"KG_E2E_SPIFFE_ONE=" + h.canary, "KG_E2E_SPIFFE_TWO=" + randomCred(t, "CRED-TWO-"), "KG_E2E_SPIFFE_JWT=" + randomCred(t, "CRED-JWT-"),
	}}, map[string]int{"upstream": up.port(), "tls": tlsPort})
	waitReadyz(t, b, 30*time.Second)
	tlsAddr := fmt.Sprintf("127.0.0.1:%d", tlsPort)

	// Wait until the broker serves a short-lived SVID.
	var svid *x509.Certificate
	sp.poll(t, "a 20 s broker SVID", func() bool {
		c, err := brokerSVID(t, tlsAddr, dirOne)
		if err != nil || c == nil {
			return false
		}
		svid = c
		return time.Until(c.NotAfter) <= 21*time.Second
	})
	if err := sp.agt.Process.Kill(); err != nil {
		t.Fatalf("kill spire-agent: %v", err)
	}
	killedAt := time.Now()
	// The agent may have rotated once more just before it died.
	if c, err := brokerSVID(t, tlsAddr, dirOne); err == nil && c != nil {
		svid = c
	}
	notAfter := svid.NotAfter
	if time.Until(notAfter) < 3*time.Second {
		t.Skip("machine too slow: the broker's SVID expires before the checks can run")
	}

	target := fmt.Sprintf("https://localhost:%d/f15", up.port())
	get := func(what string) (int, error) {
		resp, err := h.svidClient(t, "localhost:"+strconv.Itoa(tlsPort), dirOne).Get(target)
		if err != nil {
			return 0, err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		h.recordResponse("f15 "+what, resp, body)
		return resp.StatusCode, nil
	}
	// Agent gone, SVID valid: still serving and ready.
	served := 0
	for time.Until(notAfter) > 1500*time.Millisecond {
		code, err := get("before NotAfter")
		if err != nil || code != http.StatusOK {
			t.Fatalf("before NotAfter (%v left): %d %v, want 200", time.Until(notAfter), code, err)
		}
		served++
		if rc, _ := adminGet(t, b, "/readyz"); rc != http.StatusOK {
			t.Fatalf("/readyz %d with a valid cached SVID (%v left)", rc, time.Until(notAfter))
		}
		time.Sleep(time.Second)
	}
	up.expectInjected(t, served, h.bearer())

	// Past NotAfter (second precision in the certificate): fail closed.
	time.Sleep(time.Until(notAfter) + 1500*time.Millisecond)
	if rc, _ := adminGet(t, b, "/readyz"); rc == http.StatusOK {
		t.Errorf("/readyz 200 after the broker's SVID expired")
	}
	refused := 0
	for i := 0; i < 3; i++ {
		code, err := get("after NotAfter")
		if err == nil {
			t.Errorf("after NotAfter: the workload got HTTP %d through the broker, want a failed handshake", code)
			continue
		}
		refused++
	}
	up.expectInjected(t, served, h.bearer())
	if b.exited() {
		t.Errorf("the broker exited after its SVID expired: %v", b.waitErr)
	}
	t.Logf("F-15: agent killed with %v of SVID left; %d requests served from the cached SVID, %d refused after NotAfter; upstream %d requests (0 unattested)",
		notAfter.Sub(killedAt).Round(time.Millisecond), served, refused, up.count())
}
