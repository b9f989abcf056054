package integration

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
)

// TestGoClientThroughProxy: Go's net/http with a fixed proxy URL and the
// broker CA as its only root gets 200; the upstream sees the injected
// bearer token; a request body arrives intact.
func TestGoClientThroughProxy(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	up := newUpstream(t, "allowed", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%s %s %d bytes", r.Method, r.URL.Path, len(body))
	}))
	b := h.startAPI(up)
	client := h.goClient(b)
	base := fmt.Sprintf("https://localhost:%d", up.port())

	do := func(req *http.Request) (*http.Response, string) {
		t.Helper()
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", req.Method, req.URL, err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		h.recordResponse("go client "+req.URL.Path, resp, body)
		return resp, string(body)
	}

	req, _ := http.NewRequest(http.MethodGet, base+"/go", nil)
	resp, body := do(req)
	if resp.StatusCode != http.StatusOK || body != "GET /go 0 bytes" {
		t.Errorf("GET: %s %q", resp.Status, body)
	}
	checkAudit(t, b, resp, map[string]any{
		"listener": "proxy", "workload.id": "e2e-workload", "workload.method": "cidr",
		"protocol": "https", "method": "GET", "host": "localhost", "port": float64(up.port()), "path": "/go",
		"rule": "api", "decision": "allow", "credential.name": "api-token", "credential.kind": "static",
		"status": float64(200), "error": "",
	})

	payload := bytes.Repeat([]byte("k"), 100<<10)
	req, _ = http.NewRequest(http.MethodPost, base+"/upload", bytes.NewReader(payload))
	resp, body = do(req)
	if resp.StatusCode != http.StatusOK || body != fmt.Sprintf("POST /upload %d bytes", len(payload)) {
		t.Errorf("POST: %s %q", resp.Status, body)
	}

	// A method the rule does not allow is refused by the broker.
	req, _ = http.NewRequest(http.MethodDelete, base+"/go", nil)
	resp, body = do(req)
	expectRefusal(t, "DELETE", resp, []byte(body), http.StatusForbidden, "denied")
	line := checkAudit(t, b, resp, map[string]any{"method": "DELETE", "decision": "deny", "status": float64(403)})
	if line["credential.fingerprint"] != "" || line["credential.name"] != "" {
		t.Errorf("a denied request's audit line names a credential: %v", line)
	}

	up.expectInjected(t, 2, h.bearer())
}

// checkAudit finds the audit line for resp's X-Keygate-Request-Id and
// compares the given fields (DESIGN.md §8); every §8 field must exist.
func checkAudit(t *testing.T, b *brokerProc, resp *http.Response, want map[string]any) map[string]any {
	t.Helper()
	id := resp.Header.Get("X-Keygate-Request-Id")
	if id == "" {
		t.Errorf("response without X-Keygate-Request-Id")
		return nil
	}
	line := b.auditLine(t, id)
	for _, f := range []string{"request_id", "listener", "workload.id", "workload.method", "delegator.sub",
		"protocol", "method", "host", "port", "path", "rule", "decision", "credential.name", "credential.kind",
		"credential.fingerprint", "credential.expires", "status", "bytes_in", "bytes_out", "duration_ms", "error"} {
		if _, ok := line[f]; !ok {
			t.Errorf("audit line lacks field %q", f)
		}
	}
	for k, v := range want {
		if line[k] != v {
			t.Errorf("audit line %s = %#v, want %#v", k, line[k], v)
		}
	}
	if line["decision"] == "allow" && line["credential.name"] != "" {
		if fp, _ := line["credential.fingerprint"].(string); len(fp) < 8 {
			t.Errorf("audit line credential.fingerprint = %q, want a fingerprint", fp)
		}
	}
	return line
}

// TestSecretNeedles checks the canary scanner itself: it must find the
// secret raw and inside base64 text at any alignment (as in a Basic
// credential), and not flag unrelated text.
func TestSecretNeedles(t *testing.T) {
	secret := "CANARY-0123456789abcdef0123456789abcdef"
	needles := secretNeedles(secret)
	found := func(hay string) bool {
		for _, n := range needles {
			if strings.Contains(hay, n) {
				return true
			}
		}
		return false
	}
	for _, prefix := range []string{"", "u:", "x-access-token:", "ab"} {
		for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding, base64.RawStdEncoding} {
			hay := "Authorization: Basic " + enc.EncodeToString([]byte(prefix+secret+"tail"))
			if !found(hay) {
				t.Errorf("base64 of %q+secret not detected", prefix)
			}
		}
	}
	if !found("token=" + secret) {
		t.Error("raw secret not detected")
	}
	if found("Bearer CANARY-ffffffffffffffffffffffffffffffff " + base64.StdEncoding.EncodeToString([]byte("x-access-token:other"))) {
		t.Error("false positive")
	}
}
