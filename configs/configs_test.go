package configs

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/config"
	"github.com/keygate/broker/internal/intercept/ca"
)

// Every file in this directory is validated here, the way `broker validate`
// does it: each is copied into a temporary directory together with what it
// references (CA files from `broker ca init`, secret files, env variables,
// a CA bundle), then decoded, validated and built in dry-run mode. A new
// example needs no change to this test, as long as its file: references are
// relative to it.

func exampleFiles(t *testing.T) []string {
	t.Helper()
	var files []string
	for _, pat := range []string{"*.yaml", "*.yml"} {
		m, err := filepath.Glob(pat)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, m...)
	}
	if len(files) == 0 {
		t.Fatal("no example configs found")
	}
	return files
}

func writeFile(t *testing.T, path string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, mode); err != nil {
		t.Fatal(err)
	}
}

func resolve(dir, p string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(dir, p)
}

// stage copies the example into a fresh directory and creates everything it
// references. It returns the copied path.
func stage(t *testing.T, name string) string {
	t.Helper()
	src, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, name)
	writeFile(t, path, src, 0o644)
	c, err := config.LoadFile(path)
	if err != nil {
		t.Fatalf("%s does not decode and validate:\n%v", name, err)
	}

	pki := filepath.Join(t.TempDir(), "pki")
	if err := ca.Init(pki, nil, nil); err != nil {
		t.Fatal(err)
	}
	read := func(n string) []byte {
		b, err := os.ReadFile(filepath.Join(pki, n))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if !c.CA.Ephemeral {
		writeFile(t, resolve(dir, c.CA.Cert), read(ca.CertFile), 0o644)
		writeFile(t, resolve(dir, c.CA.Key), read(ca.KeyFile), 0o600)
	}
	if c.Egress.CABundle != "" {
		writeFile(t, resolve(dir, c.Egress.CABundle), read(ca.CertFile), 0o644)
	}
	for _, db := range c.Databases {
		if db.CABundle != "" {
			writeFile(t, resolve(dir, db.CABundle), read(ca.CertFile), 0o644)
		}
	}
	ref := func(r string) {
		switch {
		case strings.HasPrefix(r, "env:"):
			t.Setenv(strings.TrimPrefix(r, "env:"), "placeholder-secret")
		case strings.HasPrefix(r, "file:"):
			p := strings.TrimPrefix(r, "file:")
			if filepath.IsAbs(p) {
				t.Fatalf("%s: file:%s is absolute; examples use paths relative to themselves so this test can create them", name, p)
			}
			writeFile(t, resolve(dir, p), []byte("placeholder-secret\n"), 0o600)
		}
	}
	for _, cr := range c.Credentials {
		if cr.Value != "" {
			ref(cr.Value)
		}
		for _, v := range cr.Values {
			ref(v)
		}
	}
	return path
}

func TestEveryExampleValidates(t *testing.T) {
	for _, name := range exampleFiles(t) {
		t.Run(name, func(t *testing.T) {
			// In place: decoding, validation and rule compilation need
			// nothing from outside the file.
			c, err := config.LoadFile(name)
			if err != nil {
				t.Fatalf("LoadFile: %v", err)
			}
			if _, err := c.Policy(nil); err != nil {
				t.Fatalf("%v", err)
			}
			// With what it references: the full `broker validate`.
			path := stage(t, name)
			c, err = config.LoadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.Build(config.BuildOptions{Logger: zap.NewNop(), DryRun: true}); err != nil {
				t.Fatalf("broker validate would print:\n%v", err)
			}
		})
	}
}

func TestQuickstartIsEmbedded(t *testing.T) {
	b, err := os.ReadFile("quickstart.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, Quickstart) {
		t.Error("Quickstart differs from quickstart.yaml")
	}
}

// The examples' comments promise these decisions.
func TestExampleDecisions(t *testing.T) {
	id := func(name string) broker.Identity { return broker.Identity{ID: name, Method: broker.MethodCIDR} }
	req := func(proto, method, host string, port int, path string, headers map[string]string) broker.Target {
		if headers == nil {
			headers = map[string]string{}
		}
		return broker.Target{Phase: broker.PhaseRequest, Protocol: proto, Method: method, Host: host, Port: port, Path: path, Headers: headers}
	}
	pgSession := func(host, database, user string) broker.Target {
		return broker.Target{Phase: broker.PhaseRequest, Protocol: broker.ProtocolPostgres, Host: host, Port: 5432, Database: database, User: user}
	}
	uid := func(n int) broker.Identity {
		return broker.Identity{ID: fmt.Sprintf("unix:uid:%d", n), Method: broker.MethodProcess}
	}
	connect := func(host string, port int) broker.Target {
		return broker.Target{Phase: broker.PhaseConnect, Protocol: broker.ProtocolHTTPS, Host: host, Port: port}
	}
	type tc struct {
		name   string
		id     broker.Identity
		target broker.Target
		action broker.Action
		rule   string
		inject string // injector kind, "" for none
	}
	files := map[string][]tc{
		"github-api.yaml": {
			{"runner GET is injected", id("ci-runner"), req("https", "GET", "api.github.com", 443, "/repos/acme/app", nil), broker.Allow, "github-read", "bearer"},
			{"runner POST is refused", id("ci-runner"), req("https", "POST", "api.github.com", 443, "/repos/acme/app/issues", nil), broker.Deny, "github-writes-refused", ""},
			{"other caller is refused", id("laptop"), req("https", "GET", "api.github.com", 443, "/", nil), broker.Deny, "github-writes-refused", ""},
			{"CONNECT is intercepted", id("ci-runner"), connect("api.github.com", 443), broker.Allow, "github-read", ""},
			{"other hosts: no rule", id("ci-runner"), connect("github.com", 443), broker.Deny, "", ""},
		},
		"internal-api-header.yaml": {
			{"web reads", id("web"), req("https", "GET", "inventory.internal.example.com", 8443, "/v2/items/7", nil), broker.Allow, "inventory-read", "header"},
			{"web cannot write", id("web"), req("https", "POST", "inventory.internal.example.com", 8443, "/v2/items", map[string]string{"content-type": "application/json"}), broker.Deny, "", ""},
			{"batch writes JSON", id("batch"), req("https", "POST", "inventory.internal.example.com", 8443, "/v2/items", map[string]string{"content-type": "application/json; charset=utf-8"}), broker.Allow, "inventory-write", "header"},
			{"batch write without content-type", id("batch"), req("https", "PUT", "inventory.internal.example.com", 8443, "/v2/items/7", nil), broker.Deny, "", ""},
			{"wrong port", id("web"), req("https", "GET", "inventory.internal.example.com", 443, "/v2/items", nil), broker.Deny, "", ""},
			{"partner is tunnelled", id("web"), connect("api.partner.example.net", 443), broker.Tunnel, "partner-pinned", ""},
		},
		"legacy-plaintext.yaml": {
			{"billing over http", id("billing"), req("http", "GET", "reports.legacy.internal", 8080, "/daily.csv", nil), broker.Allow, "reports-legacy-http", "basic"},
			{"http on port 80 is not covered", id("billing"), req("http", "GET", "reports.legacy.internal", 80, "/", nil), broker.Deny, "", ""},
			{"https on 443", id("billing"), req("https", "GET", "reports.legacy.internal", 443, "/", nil), broker.Allow, "reports-https", "basic"},
			{"no writes", id("billing"), req("http", "POST", "reports.legacy.internal", 8080, "/", nil), broker.Deny, "", ""},
		},
		"postgres.yaml": {
			{"orders-service on orders", uid(1001), pgSession("orders-db.internal.example", "orders", "orders"), broker.Allow, "orders-service", ""},
			{"orders-service as postgres still decided on the database", uid(1001), pgSession("orders-db.internal.example", "orders", "postgres"), broker.Allow, "orders-service", ""},
			{"orders-service on another database", uid(1001), pgSession("orders-db.internal.example", "postgres", "orders"), broker.Deny, "", ""},
			{"another uid on orders", uid(1002), pgSession("orders-db.internal.example", "orders", "orders"), broker.Deny, "", ""},
			{"reporting job on reports", uid(1002), pgSession("reports-db.internal.example", "reports", "report"), broker.Allow, "reporting-job", ""},
			{"reporting job on orders", uid(1002), pgSession("orders-db.internal.example", "orders", "report"), broker.Deny, "", ""},
		},
		"quickstart.yaml": {
			{"demo GET", id("local-workload"), req("https", "GET", "localhost", 15443, "/headers", nil), broker.Allow, "demo-echo-read", "bearer"},
			{"demo /admin", id("local-workload"), req("https", "GET", "localhost", 15443, "/admin", nil), broker.Deny, "", ""},
			{"demo POST", id("local-workload"), req("https", "POST", "localhost", 15443, "/headers", nil), broker.Deny, "", ""},
		},
	}
	for _, name := range exampleFiles(t) {
		cases, ok := files[name]
		if !ok {
			continue // validated by TestEveryExampleValidates
		}
		t.Run(name, func(t *testing.T) {
			c, err := config.LoadFile(name)
			if err != nil {
				t.Fatal(err)
			}
			p, err := c.Policy(nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, k := range cases {
				t.Run(k.name, func(t *testing.T) {
					d, err := p.Rules.Decide(context.Background(), k.id, k.target)
					if err != nil {
						t.Fatalf("Decide: %v", err)
					}
					if d.Action != k.action || d.Rule != k.rule {
						t.Fatalf("got %v by %q (%s), want %v by %q", d.Action, d.Rule, d.Reason, k.action, k.rule)
					}
					got := ""
					if d.Inject != nil && d.Inject.Injector != nil {
						got = d.Inject.Injector.Kind()
					}
					if got != k.inject {
						t.Errorf("injector %q, want %q", got, k.inject)
					}
				})
			}
		})
	}
}

// TestQuickstartRuns serves the quick start for real, as `broker run` does
// with no config, on free ports, and makes the two requests it prints.
func TestQuickstartRuns(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	_, demoPort, _ := net.SplitHostPort(ln.Addr().String())
	ln.Close()
	src := string(Quickstart)
	for old, repl := range map[string]string{
		"127.0.0.1:15080": "127.0.0.1:0",
		"127.0.0.1:15090": "127.0.0.1:0",
		"15443":           demoPort,
	} {
		if !strings.Contains(src, old) {
			t.Fatalf("quickstart.yaml no longer contains %q; update this test", old)
		}
		src = strings.ReplaceAll(src, old, repl)
	}
	dir := t.TempDir()
	c, err := config.Parse("quickstart.yaml (test)", dir, []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	rt, err := c.Build(config.BuildOptions{Logger: zap.NewNop()})
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- rt.Run(ctx) }()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("Run did not return")
		}
	}()

	if fi, err := os.Stat(filepath.Join(dir, config.DemoTokenFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("demo token file: %v %v", fi, err)
	}
	pem, err := os.ReadFile(rt.CACertPath)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	client := &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{
		Proxy:           http.ProxyURL(&url.URL{Scheme: "http", Host: rt.ProxyAddr.String()}),
		TLSClientConfig: &tls.Config{RootCAs: pool},
	}}
	get := func(path string) (*http.Response, []byte) {
		resp, err := client.Get(rt.DemoURL + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}
	resp, body := get("/headers")
	var echo struct {
		Authorized bool `json:"authorized"`
	}
	if resp.StatusCode != 200 || json.Unmarshal(body, &echo) != nil || !echo.Authorized {
		t.Errorf("/headers: %d %s", resp.StatusCode, body)
	}
	if resp, body := get("/admin"); resp.StatusCode != 403 || resp.Header.Get("X-Keygate-Error") != broker.CodeDenied {
		t.Errorf("/admin: %d %s", resp.StatusCode, body)
	}
}
