package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// reloadBase is the part of the reload test's config that never changes;
// the rules and credentials follow the marker line and are swapped by the
// test.
const reloadBase = baseConfig + `
# --- rules and credentials below are rewritten by the test ---
`

const reloadMarker = "# --- rules and credentials below are rewritten by the test ---\n"

// reloadRules renders config A or B's credentials and rules: rule v-X
// allows GET /x on the upstream and injects credential cred-X. Config A
// also allows GET /only-a (rule v-a-only, cred-a), which B denies; both
// deny every other path (/never).
func reloadRules(which string, port int) string {
	lower := strings.ToLower(which)
	onlyA := ""
	if which == "A" {
		onlyA = fmt.Sprintf(`  - name: v-a-only
    hosts: [localhost]
    ports: [%d]
    when: 'request.path == "/only-a"'
    inject: {credential: cred-a, as: bearer}
`, port)
	}
	return fmt.Sprintf(`credentials:
  cred-%[1]s: {source: static, value: env:KG_E2E_TOKEN_%[2]s}
rules:
  - name: v-%[1]s
    hosts: [localhost]
    ports: [%[3]d]
    when: 'request.path == "/x"'
    inject: {credential: cred-%[1]s, as: bearer}
%[4]s`, lower, which, port, onlyA)
}

// reloadBroken are the broken rule sections the test rotates through;
// "empty" (text "") stands for an empty file, not an empty rules section
// (a config without rules is valid: it denies everything).
func reloadBroken(port int) []struct{ what, text string } {
	return []struct{ what, text string }{
		{"yaml syntax error", "credentials:\n  cred-b: {source: static, value: env:KG_E2E_TOKEN_B\nrules: [\n  - name: v-b\n"},
		{"unknown key", strings.Replace(reloadRules("B", port), "    when:", "    colour: red\n    when:", 1)},
		{"bad CEL", strings.Replace(reloadRules("B", port), `'request.path == "/x"'`, `'request.path == '`, 1)},
		{"type error", strings.Replace(reloadRules("B", port), fmt.Sprintf("ports: [%d]", port), "ports: [not-a-port]", 1)},
		{"undefined credential", strings.Replace(reloadRules("B", port), "credential: cred-b,", "credential: cred-nope,", 1)},
		{"empty", ""},
	}
}

// writeAtomic replaces path with data the way editors and config
// management do: a temp file in the same directory, then rename.
func writeAtomic(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp, err := os.CreateTemp(filepath.Dir(path), ".reload-tmp-*")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		t.Fatal(err)
	}
	if err := tmp.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tmp.Name(), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		t.Fatal(err)
	}
}

// configPath is the --config argument the broker was started with.
func (b *brokerProc) configPath(t *testing.T) string {
	t.Helper()
	args := b.cmd.Args
	for i := range args {
		if args[i] == "--config" && i+1 < len(args) {
			return args[i+1]
		}
	}
	t.Fatalf("broker %s was not started with --config: %q", b.name, args)
	return ""
}

// metric returns the value of one sample line from the admin /metrics
// page (name with labels exactly as exposed), 0 when absent.
func (b *brokerProc) metric(t *testing.T, series string) float64 {
	t.Helper()
	client := &http.Client{Timeout: testTimeout, Transport: &http.Transport{Proxy: nil}}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://" + b.adminAddr + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			if err != nil {
				t.Fatalf("/metrics: %q: %v", line, err)
			}
			return v
		}
	}
	return 0
}

// auditLines returns every decision line of the broker's output by
// request id.
func (b *brokerProc) auditLines() map[string]map[string]any {
	out := map[string]map[string]any{}
	for _, line := range bytes.Split(b.output(), []byte("\n")) {
		if !bytes.Contains(line, []byte(`"decision"`)) {
			continue
		}
		var m map[string]any
		if json.Unmarshal(line, &m) == nil && m["msg"] == "decision" {
			if id, _ := m["request_id"].(string); id != "" {
				out[id] = m
			}
		}
	}
	return out
}

// loadResult is what one load-generator request saw.
type loadResult struct {
	status    int
	requestID string
	body      string
	err       error
	start     time.Time
	end       time.Time
}

// load is a load generator: 8 keep-alive Go clients through the broker,
// each sending GET target until stopped.
type load struct {
	stop func()
	mu   sync.Mutex
	done []loadResult
}

// startLoad starts the generator; the test's cleanup stops it. With
// keepBody the bodies go into the transcript the canary scan reads.
func (h *harness) startLoad(b *brokerProc, target, what string, keepBody bool) *load {
	return h.startLoadN(b, target, what, keepBody, 8)
}

// startLoadN is startLoad with n clients.
func (h *harness) startLoadN(b *brokerProc, target, what string, keepBody bool, n int) *load {
	l := &load{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := 0; g < n; g++ {
		client := h.goClient(b)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				r := loadResult{start: time.Now()}
				resp, err := client.Get(target)
				if err == nil {
					var body []byte
					body, err = io.ReadAll(resp.Body)
					resp.Body.Close()
					r.status, r.requestID, r.body = resp.StatusCode, resp.Header.Get("X-Keygate-Request-Id"), string(body)
					if !keepBody {
						body = nil
					}
					h.recordResponse(what, resp, body)
				}
				r.err, r.end = err, time.Now()
				l.mu.Lock()
				l.done = append(l.done, r)
				l.mu.Unlock()
				if err != nil {
					// A proxy that refuses connections (after SIGTERM) is
					// not hammered.
					time.Sleep(20 * time.Millisecond)
				}
			}
		}()
	}
	l.stop = sync.OnceFunc(func() { close(stop); wg.Wait() })
	h.t.Cleanup(l.stop)
	return l
}

// results copies what the clients saw so far.
func (l *load) results() []loadResult {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]loadResult(nil), l.done...)
}

// TestReloadUnderLoad (F-10): 50 alternating good/broken reloads (atomic
// file rewrites seen by the directory watch, and SIGHUP) while 8 keep-alive
// clients send GET /x through intercepted tunnels, and 2 more each send
// GET /only-a (A allows it, B denies it) and GET /never (both deny it).
// Every /x request succeeds, every upstream request carries exactly one
// credential of the old or the new config, every decision pairs the rule
// with its own credential (none from a half-applied rule set), every
// /only-a decision is A's (200, cred A) or B's (403), /never is always
// refused and never forwarded (0 allow-on-error), the reload counters move,
// and the final config decides the last requests.
func TestReloadUnderLoad(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	credA, credB := h.canary+"-A", h.canary+"-B"
	bearerA, bearerB := "Bearer "+credA, "Bearer "+credB
	up := newUpstream(t, "reload", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Tell the client which credential arrived, without echoing it.
		switch v := r.Header.Values("Authorization"); {
		case len(v) == 1 && v[0] == bearerA:
			io.WriteString(w, "cred A")
		case len(v) == 1 && v[0] == bearerB:
			io.WriteString(w, "cred B")
		default:
			io.WriteString(w, fmt.Sprintf("cred ? (%d values)", len(v)))
		}
	}))
	port := up.port()
	b := h.start(brokerSpec{
		name:   "reload",
		config: reloadBase + reloadRules("A", port),
		env:    []string{"KG_E2E_TOKEN_A=" + credA, "KG_E2E_TOKEN_B=" + credB},
	}, nil)
	cfgPath := b.configPath(t)
	cur, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	base, _, ok := strings.Cut(string(cur), reloadMarker)
	if !ok {
		t.Fatalf("rendered config lacks the marker line")
	}
	base += reloadMarker
	const (
		failSeries    = `keygate_config_reloads_total{result="failure"}`
		successSeries = `keygate_config_reloads_total{result="success"}`
	)
	fail0, succ0 := b.metric(t, failSeries), b.metric(t, successSeries)

	// The load generator: 8 keep-alive clients, until told to stop.
	target := fmt.Sprintf("https://localhost:%d/x", port)
	load := h.startLoad(b, target, "reload load GET /x", true)
	onlyATarget := fmt.Sprintf("https://localhost:%d/only-a", port)
	loadOnlyA := h.startLoadN(b, onlyATarget, "reload load GET /only-a", true, 2)
	loadNever := h.startLoadN(b, fmt.Sprintf("https://localhost:%d/never", port), "reload load GET /never", true, 2)
	loadStart := time.Now()
	stopLoad := func() { load.stop(); loadOnlyA.stop(); loadNever.stop() }

	// 50 reloads: B, broken, A, broken, ... Steps 1 and 2 of every four are
	// signalled with SIGHUP right after the write (a quick step); steps 0
	// and 3 rely on the directory watch alone and wait out its debounce.
	broken := reloadBroken(port)
	brokenWrites := 0
	time.Sleep(300 * time.Millisecond) // some traffic under A first
	for i := 0; i < 50; i++ {
		var text string
		switch i % 4 {
		case 0:
			text = reloadRules("B", port)
		case 2:
			text = reloadRules("A", port)
		default:
			text = broken[brokenWrites%len(broken)].text
			brokenWrites++
		}
		data := base + text
		if text == "" {
			data = "" // the empty file
		}
		writeAtomic(t, cfgPath, []byte(data))
		if m := i % 4; m == 1 || m == 2 {
			if err := b.cmd.Process.Signal(syscall.SIGHUP); err != nil {
				t.Fatalf("SIGHUP: %v", err)
			}
			time.Sleep(30 * time.Millisecond)
		} else {
			time.Sleep(260 * time.Millisecond)
		}
		if b.exited() {
			t.Fatalf("broker exited during reload %d:\n%s", i, redactCanary(string(b.output())))
		}
	}
	// The final config is B: write it once more, SIGHUP, and outlast the
	// watcher's debounce so no reload is still pending.
	writeAtomic(t, cfgPath, []byte(base+reloadRules("B", port)))
	if err := b.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatalf("SIGHUP: %v", err)
	}
	time.Sleep(600 * time.Millisecond)
	stopLoad()
	loadTime := time.Since(loadStart)

	// The last requests are decided by the final config.
	final := h.goClient(b)
	var finalIDs []string
	for i := 0; i < 5; i++ {
		resp, err := final.Get(target)
		if err != nil {
			t.Fatalf("final GET /x: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		h.recordResponse("reload final GET /x", resp, body)
		if resp.StatusCode != http.StatusOK || string(body) != "cred B" {
			t.Errorf("final GET /x: %s %q, want 200 \"cred B\" (the final config)", resp.Status, redactCanary(string(body)))
		}
		finalIDs = append(finalIDs, resp.Header.Get("X-Keygate-Request-Id"))
	}
	for _, id := range finalIDs {
		if line := b.auditLine(t, id); line["rule"] != "v-b" || line["credential.name"] != "cred-b" {
			t.Errorf("final request %s: audit rule %v credential %v, want v-b / cred-b", id, line["rule"], line["credential.name"])
		}
	}

	// Every load request: 200, the body names A or B, and its audit line
	// pairs the rule with the same credential.
	res := load.results()
	if len(res) < 50 {
		t.Errorf("the load generator completed only %d requests", len(res))
	}
	var audit map[string]map[string]any
	deadline := time.Now().Add(testTimeout)
	for {
		audit = b.auditLines()
		missing := 0
		for _, r := range res {
			if r.err == nil && audit[r.requestID] == nil {
				missing++
			}
		}
		if missing == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	failed, seenA, seenB := 0, 0, 0
	fingerprints := map[string]string{} // credential name -> fingerprint
	for i, r := range res {
		bad := func(format string, args ...any) {
			failed++
			if failed <= 10 {
				t.Errorf("load request %d (started %s, took %v): %s", i, r.start.Format("15:04:05.000"), r.end.Sub(r.start),
					redactCanary(fmt.Sprintf(format, args...)))
			}
		}
		if r.err != nil {
			bad("error: %v", r.err)
			continue
		}
		if r.status != http.StatusOK {
			bad("status %d, body %q", r.status, r.body)
			continue
		}
		var wantRule, wantCred string
		switch r.body {
		case "cred A":
			seenA++
			wantRule, wantCred = "v-a", "cred-a"
		case "cred B":
			seenB++
			wantRule, wantCred = "v-b", "cred-b"
		default:
			bad("upstream saw %s", r.body)
			continue
		}
		line := audit[r.requestID]
		if line == nil {
			bad("no audit line for request id %q", r.requestID)
			continue
		}
		if line["rule"] != wantRule || line["credential.name"] != wantCred || line["decision"] != "allow" {
			bad("upstream got %s but the audit line says rule %v credential %v decision %v (a mix of configs)",
				r.body, line["rule"], line["credential.name"], line["decision"])
		}
		fp, _ := line["credential.fingerprint"].(string)
		if prev, ok := fingerprints[wantCred]; ok && prev != fp {
			bad("credential %s has two fingerprints: %q and %q", wantCred, prev, fp)
		}
		fingerprints[wantCred] = fp
	}
	if failed > 10 {
		t.Errorf("... %d failed load requests in all (of %d)", failed, len(res))
	}
	if seenA == 0 || seenB == 0 {
		t.Errorf("load requests decided under A: %d, under B: %d; want both", seenA, seenB)
	}
	if fa, fb := fingerprints["cred-a"], fingerprints["cred-b"]; fa == "" || fb == "" || fa == fb {
		t.Errorf("credential fingerprints A %q, B %q: want two different non-empty values", fa, fb)
	}

	// /only-a: A's decision (200 with cred A under rule v-a-only) or B's
	// (403 denied, no rule); /never: always B's and A's 403.
	audit = b.auditLines()
	onlyAAllowed, onlyADenied, neverDenied := 0, 0, 0
	judge := func(path string, r loadResult, allowOK bool) {
		fail := func(format string, args ...any) {
			failed++
			if failed <= 20 {
				t.Errorf("load GET %s: %s", path, redactCanary(fmt.Sprintf(format, args...)))
			}
		}
		if r.err != nil {
			fail("error: %v", r.err)
			return
		}
		line := audit[r.requestID]
		if line == nil {
			fail("no audit line for request id %q", r.requestID)
			return
		}
		switch {
		case allowOK && r.status == http.StatusOK && r.body == "cred A" &&
			line["rule"] == "v-a-only" && line["credential.name"] == "cred-a" && line["decision"] == "allow":
			onlyAAllowed++
		case r.status == http.StatusForbidden && line["decision"] == "deny" && line["error"] != nil:
			var e keygateError
			if json.Unmarshal([]byte(r.body), &e) != nil || e.Error != "denied" || e.Rule != "" {
				fail("403 body %q, want the no-rule denial", r.body)
				return
			}
			if allowOK {
				onlyADenied++
			} else {
				neverDenied++
			}
		default:
			fail("status %d body %q, audit rule %v credential %v decision %v: neither A's nor B's decision",
				r.status, r.body, line["rule"], line["credential.name"], line["decision"])
		}
	}
	resOnlyA, resNever := loadOnlyA.results(), loadNever.results()
	for _, r := range resOnlyA {
		judge("/only-a", r, true)
	}
	for _, r := range resNever {
		judge("/never", r, false)
	}
	if onlyAAllowed == 0 || onlyADenied == 0 {
		t.Errorf("GET /only-a decided under A %d times, under B %d times; want both", onlyAAllowed, onlyADenied)
	}
	if neverDenied == 0 {
		t.Errorf("no GET /never was answered")
	}

	// Every upstream request: exactly one Authorization, A's or B's; /never
	// never arrives; /only-a only ever with A's credential.
	reqs := up.requests()
	if len(reqs) < seenA+seenB+onlyAAllowed {
		t.Errorf("upstream received %d requests, fewer than the %d answered", len(reqs), seenA+seenB+onlyAAllowed)
	}
	for i, r := range reqs {
		if len(r.Auth) != 1 || (r.Auth[0] != bearerA && r.Auth[0] != bearerB) {
			t.Errorf("upstream request %d: Authorization %s, want exactly one of A's or B's",
				i, describeAuth(r.Auth, bearerA))
		}
		switch {
		case r.Path == "/never":
			t.Errorf("upstream request %d: GET /never was forwarded (both configs deny it)", i)
		case r.Path == "/only-a" && (len(r.Auth) != 1 || r.Auth[0] != bearerA):
			t.Errorf("upstream request %d: GET /only-a forwarded without A's credential (only A allows it)", i)
		}
	}
	total := len(res) + len(resOnlyA) + len(resNever)
	t.Logf("F-10: %d requests in %v (%.0f/s): /x A %d B %d; /only-a allowed (A) %d denied (B) %d; /never denied %d; upstream %d requests, 0 without or with a foreign credential allowed",
		total, loadTime.Round(time.Millisecond), float64(total)/loadTime.Seconds(), seenA, seenB, onlyAAllowed, onlyADenied, neverDenied, len(reqs))

	// The counters moved both ways; the rejections were logged.
	fail, succ := b.metric(t, failSeries)-fail0, b.metric(t, successSeries)-succ0
	t.Logf("%d load requests (A %d, B %d); %d broken writes; reloads: %v success, %v failure", len(res), seenA, seenB, brokenWrites, succ, fail)
	if fail < 1 || succ < 1 {
		t.Errorf("keygate_config_reloads_total moved by success %v, failure %v; want both ≥ 1", succ, fail)
	}
	if !bytes.Contains(b.output(), []byte("config reload rejected")) {
		t.Errorf("no \"config reload rejected\" line in the broker log")
	}
}
