package config

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

const reloadTemplate = `listen: {proxy: 127.0.0.1:0}
ca: {ephemeral: true, cert_out: ca.pem}
attestors:
  - type: cidr
    identities: [{id: local, cidrs: [127.0.0.0/8]}]
egress: {allow_cidrs: [127.0.0.1/32], ca_bundle: upstream.pem}
credentials:
  tok: {source: static, value: "file:token"}
rules:
  - name: %s
    hosts: ["127.0.0.1"]
    ports: [%s]
    when: 'request.path == "/%s"'
    inject: {credential: tok, as: bearer}
`

func TestReload(t *testing.T) {
	// The upstream records what it received: an echo in the response would
	// be scrubbed by the broker (T-B3) before the client saw it.
	var seenMu sync.Mutex
	var seen string
	up := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seenMu.Lock()
		seen = r.Header.Get("Authorization")
		seenMu.Unlock()
		_, _ = io.WriteString(w, "ok")
	}))
	defer up.Close()
	dir := t.TempDir()
	writeCertPEM(t, dir, "upstream.pem", up.Certificate())
	writeFile(t, dir, "token", "first-token\n", 0o600)
	port := portOf(t, up.URL)
	cfgPath := filepath.Join(dir, "c.yaml")
	write := func(content string) {
		// Replace the file the way editors and ConfigMaps do: write aside, rename.
		tmp := cfgPath + ".tmp"
		if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, cfgPath); err != nil {
			t.Fatal(err)
		}
	}
	write(fmt.Sprintf(reloadTemplate, "a", port, "a"))
	s := start(t, cfgPath)
	client := s.client(t)
	get := func(path string) (int, string) {
		resp, err := client.Get(up.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		_, _ = io.ReadAll(resp.Body)
		seenMu.Lock()
		defer seenMu.Unlock()
		auth := seen
		seen = ""
		return resp.StatusCode, auth
	}
	counter := func(result string) float64 {
		return testutil.ToFloat64(s.rt.reload.counter.WithLabelValues(result))
	}
	if code, body := get("/a"); code != 200 || body != "Bearer first-token" {
		t.Fatalf("before reload: %d %q", code, body)
	}

	// A good change, picked up by the watcher; the secret file is re-read.
	writeFile(t, dir, "token", "second-token\n", 0o600)
	write(fmt.Sprintf(reloadTemplate, "b", port, "b"))
	deadline := time.Now().Add(5 * time.Second)
	for counter("success") < 1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if counter("success") != 1 {
		t.Fatal("the watcher did not reload the changed file")
	}
	if code, _ := get("/a"); code != http.StatusForbidden {
		t.Fatalf("the old rule still decides after reload: %d", code)
	}
	if code, body := get("/b"); code != 200 || body != "Bearer second-token" {
		t.Fatalf("after reload: %d %q", code, body)
	}

	// Broken files are refused; the last good config keeps serving.
	broken := map[string]string{
		"syntax error": "listen: {proxy: [",
		"unknown key":  strings.Replace(fmt.Sprintf(reloadTemplate, "c", port, "c"), "rules:", "rulez:", 1),
		"bad CEL":      strings.Replace(fmt.Sprintf(reloadTemplate, "c", port, "c"), `request.path == "/c"`, `request.path ==`, 1),
		"type error":   strings.Replace(fmt.Sprintf(reloadTemplate, "c", port, "c"), "ports: ["+port+"]", "ports: [x]", 1),
		"empty":        "",
		"truncated":    fmt.Sprintf(reloadTemplate, "c", port, "c")[:200],
	}
	failures := counter("failure")
	for name, content := range broken {
		t.Run(name, func(t *testing.T) {
			s.rt.reload.mu.Lock() // hold off the watcher while the file is swapped
			write(content)
			s.rt.reload.mu.Unlock()
			if err := s.rt.Reload(); err == nil {
				t.Fatal("a broken config was accepted")
			}
			if code, body := get("/b"); code != 200 || body != "Bearer second-token" {
				t.Fatalf("the last good config stopped serving: %d %q", code, body)
			}
		})
	}
	if counter("failure") < failures+float64(len(broken)) {
		t.Fatalf("failures counted %v, want at least %v", counter("failure"), failures+float64(len(broken)))
	}
	if !strings.Contains(s.logs.String(), "c.yaml:") {
		t.Fatal("reload problems are not logged as file:line")
	}
	mustNotContain(t, "logs", s.logs.String(), "second-token")

	// A restart-only change is reported and not applied.
	write(strings.Replace(fmt.Sprintf(reloadTemplate, "b", port, "b"), "127.0.0.1:0", "127.0.0.1:1", 1))
	if err := s.rt.Reload(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(s.logs.String(), "needs a restart") {
		t.Fatal("a listener change was not reported as needing a restart")
	}
}
