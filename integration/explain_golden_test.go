package integration

import (
	"flag"
	"os"
	"path/filepath"
	"testing"
)

// update rewrites the golden files: go test ./integration -run TestExplainGolden -update
var update = flag.Bool("update", false, "rewrite the golden files under testdata/ instead of comparing")

// explainCase is one `broker explain` dry run, compared as text and as
// JSON against testdata/explain/<name>.txt and <name>.json.
type explainCase struct {
	name     string
	identity string
	method   string
	url      string
}

var explainCases = []explainCase{
	// allow with a credential; a deny rule's when is false, a port mismatch
	{"allow-reads", `{"id":"build-farm","method":"cidr"}`, "GET", "https://api.example.com/v1/repos"},
	// a when on claims is true on the rule's port
	{"claims-prod-deploy", `{"id":"spiffe://example.org/ci","method":"spiffe-x509","trust_domain":"example.org","claims":{"env":"prod"}}`,
		"POST", "https://api.example.com:8443/deploy"},
	// the same when on claims is false: default deny
	{"claims-dev-denied", `{"id":"ci","method":"oidc","claims":{"env":"dev"}}`, "POST", "https://api.example.com:8443/deploy"},
	// a deny rule on the path decides before the allow rules
	{"deny-admin", `{"id":"build-farm","method":"cidr"}`, "GET", "https://api.example.com/admin/users"},
	// a deny rule on an IP host
	{"deny-metadata", `{"id":"build-farm","method":"cidr"}`, "GET", "https://169.254.169.254/latest/meta-data"},
	// a tunnel rule
	{"tunnel-db", `{"id":"build-farm","method":"cidr"}`, "GET", "https://db.example.com/"},
	// allow_anonymous admits an anonymous caller...
	{"anonymous-status", `{"id":"anon","method":"anonymous"}`, "GET", "https://status.example.com/"},
	// ...and every other rule skips it
	{"anonymous-denied", `{"id":"anon","method":"anonymous"}`, "GET", "https://api.example.com/v1/repos"},
	// a wildcard host and a second port; plain http gets the refusal note
	{"wildcard-plaintext", `{"id":"build-farm","method":"cidr"}`, "GET", "http://svc.internal.example.net:8080/x"},
	// a wildcard host on a port the rule does not list
	{"wildcard-wrong-port", `{"id":"build-farm","method":"cidr"}`, "GET", "https://svc.internal.example.net:9000/x"},
}

// TestExplainGolden: `broker explain` output (text and --json) for a
// config with host patterns, ports, a when on claims, deny rules, a tunnel
// and allow_anonymous matches the golden files byte for byte.
func TestExplainGolden(t *testing.T) {
	t.Parallel()
	dir := filepath.Join("testdata", "explain")
	cfg := filepath.Join(dir, "config.yaml")
	for _, tc := range explainCases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			for _, form := range []struct {
				ext  string
				args []string
			}{{".txt", nil}, {".json", []string{"--json"}}} {
				args := append([]string{"explain"}, form.args...)
				args = append(args, "--config", cfg, "--identity", tc.identity, "--method", tc.method, "--url", tc.url)
				res := runBroker(t, nil, args...)
				if res.code != 0 {
					t.Fatalf("broker %v: exit %d\nstdout: %s\nstderr: %s", args, res.code, res.stdout, res.stderr)
				}
				golden := filepath.Join(dir, tc.name+form.ext)
				if *update {
					if err := os.WriteFile(golden, []byte(res.stdout), 0o644); err != nil {
						t.Fatal(err)
					}
					continue
				}
				want, err := os.ReadFile(golden)
				if err != nil {
					t.Fatalf("%v (run with -update to create it)", err)
				}
				if res.stdout != string(want) {
					t.Errorf("broker %v: stdout differs from %s (run with -update to accept)\n--- got\n%s--- want\n%s",
						args, golden, res.stdout, want)
				}
			}
		})
	}
}
