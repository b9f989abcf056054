package config

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/intercept/ca"
)

// fixtureSetup is what a valid fixture in testdata/valid needs beside it.
type fixtureSetup struct {
	env    map[string]string // set with t.Setenv
	files  map[string]string // relative to the config's directory
	initCA bool              // ca.Init into the config's directory (ca.pem, ca-key.pem)
	bundle string            // write a PEM root here (relative), for egress.ca_bundle
}

// stageFixture copies testdata/valid/NAME.yaml into a fresh directory with
// everything it references, and returns the copied path.
func stageFixture(t *testing.T, name string, s fixtureSetup) string {
	t.Helper()
	src, err := os.ReadFile(filepath.Join("testdata", "valid", name+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	path := writeFile(t, dir, name+".yaml", string(src), 0o644)
	for k, v := range s.env {
		t.Setenv(k, v)
	}
	for rel, content := range s.files {
		writeFile(t, dir, rel, content, 0o600)
	}
	if s.initCA {
		if err := ca.Init(dir, nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	if s.bundle != "" {
		writeFile(t, dir, s.bundle, string(testRootPEM(t)), 0o644)
	}
	return path
}

// testRootPEM is a CA certificate to serve as an egress.ca_bundle.
func testRootPEM(t *testing.T) []byte {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "root")
	if err := ca.Init(dir, nil, nil); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, ca.CertFile))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var fullSetup = fixtureSetup{
	env: map[string]string{"KG_FULL_TOKEN": "full-token-value", "KG_FULL_USER": "svc"},
	files: map[string]string{
		"secrets/token":    "file-token-value\n",
		"secrets/password": "pw-value\r\n",
	},
	initCA: true,
	bundle: "certs/internal-roots.pem",
}

func TestValidConfigs(t *testing.T) {
	tests := []struct {
		name   string
		setup  fixtureSetup
		rules  int
		creds  int
		verify func(t *testing.T, c *Config, rt *Runtime)
	}{
		{name: "minimal", rules: 0, creds: 0, verify: func(t *testing.T, c *Config, rt *Runtime) {
			if c.Egress.DenyPrivate != nil {
				t.Errorf("deny_private decoded as set; the default must come from Build")
			}
			if rt.CACertPath != "" {
				t.Errorf("ephemeral CA without cert_out: CACertPath = %q, want empty", rt.CACertPath)
			}
		}},
		{name: "full", setup: fullSetup, rules: 10, creds: 3, verify: func(t *testing.T, c *Config, rt *Runtime) {
			if got := time.Duration(c.CA.LeafLifetime); got != 12*time.Hour {
				t.Errorf("leaf_lifetime = %v", got)
			}
			if c.CA.LeafCacheSize != 256 {
				t.Errorf("leaf_cache_size = %d", c.CA.LeafCacheSize)
			}
			l := c.Limits
			for _, d := range []struct {
				name      string
				got, want time.Duration
			}{
				{"read_header_timeout", time.Duration(l.ReadHeaderTimeout), 5 * time.Second},
				{"idle_timeout", time.Duration(l.IdleTimeout), 2 * time.Minute},
				{"handshake_timeout", time.Duration(l.HandshakeTimeout), 7 * time.Second},
				{"upstream_timeout", time.Duration(l.UpstreamTimeout), 45 * time.Second},
			} {
				if d.got != d.want {
					t.Errorf("%s = %v, want %v", d.name, d.got, d.want)
				}
			}
			if l.MaxHeaderBytes != 32768 {
				t.Errorf("max_header_bytes = %d", l.MaxHeaderBytes)
			}
			for _, n := range []struct {
				name string
				got  *int
				want int
			}{
				{"max_header_count", l.MaxHeaderCount, 100}, {"max_tunnels", l.MaxTunnels, 512},
				{"leaf_mints_per_second", l.LeafMintsPerSecond, 20},
			} {
				if n.got == nil || *n.got != n.want {
					t.Errorf("%s = %v, want %d", n.name, n.got, n.want)
				}
			}
			if c.Egress.DenyPrivate == nil || !*c.Egress.DenyPrivate {
				t.Errorf("deny_private not decoded as true")
			}
			// The alias decodes to the anchored list.
			for _, r := range c.Rules {
				if r.Name == "github-writes-denied" {
					if len(r.Hosts) != 2 || r.Hosts[0] != "api.github.com" || r.Hosts[1] != "uploads.github.com" {
						t.Errorf("aliased hosts = %v", r.Hosts)
					}
				}
			}
			if want := filepath.Join(c.Dir, "ca.pem"); rt.CACertPath != want {
				t.Errorf("CACertPath = %q, want %q", rt.CACertPath, want)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := stageFixture(t, tc.name, tc.setup)
			c, err := LoadFile(path)
			if err != nil {
				t.Fatalf("LoadFile: %v", err)
			}
			if c.Path != path || c.Dir != filepath.Dir(path) {
				t.Errorf("Path, Dir = %q, %q", c.Path, c.Dir)
			}
			if len(c.Rules) != tc.rules || len(c.Credentials) != tc.creds {
				t.Errorf("decoded %d rules, %d credentials; want %d, %d", len(c.Rules), len(c.Credentials), tc.rules, tc.creds)
			}
			if _, err := c.Policy(nil); err != nil {
				t.Fatalf("Policy: %v", err)
			}
			rt, err := build(t, c, BuildOptions{Logger: zap.NewNop(), DryRun: true})
			if err != nil {
				t.Fatalf("Build(DryRun): %v", err)
			}
			if rt.ProxyAddr != nil || rt.AdminAddr != nil || rt.Proxy != nil || rt.DemoURL != "" {
				t.Errorf("a dry run opened or started something: proxy %v admin %v demo %q", rt.ProxyAddr, rt.AdminAddr, rt.DemoURL)
			}
			tc.verify(t, c, rt)
		})
	}
}

// TestDryRunWritesNothing: `broker validate` on an ephemeral CA with
// cert_out must not write the certificate, and must not create the demo
// token (the demo is not started).
func TestDryRunWritesNothing(t *testing.T) {
	dir := t.TempDir()
	path := writeFile(t, dir, "c.yaml", `listen: {proxy: 127.0.0.1:15080}
ca: {ephemeral: true, cert_out: out/ca.pem}
attestors: [{type: cidr, identities: [{id: local, cidrs: [127.0.0.0/8]}]}]
demo: {echo: 127.0.0.1:15443}
`, 0o644)
	if ps := loadAndBuild(t, path); ps != nil {
		t.Fatalf("problems: %v", ps)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() != "c.yaml" {
			t.Errorf("dry run wrote %s", e.Name())
		}
	}
}

// TestStaticSecretResolution checks what Build reads for env: and file:
// references, through the built source: one trailing newline (LF or CRLF)
// is stripped from a file and nothing else.
func TestStaticSecretResolution(t *testing.T) {
	tests := []struct {
		name, file, env, ref string
		want                 string
	}{
		{name: "env", env: "value from env", ref: "env:KG_RES", want: "value from env"},
		{name: "env keeps newline", env: "v\n", ref: "env:KG_RES", want: "v\n"},
		{name: "file plain", file: "abc", ref: "file:secret", want: "abc"},
		{name: "file LF stripped", file: "abc\n", ref: "file:secret", want: "abc"},
		{name: "file CRLF stripped", file: "abc\r\n", ref: "file:secret", want: "abc"},
		{name: "file only one newline stripped", file: "abc\n\n", ref: "file:secret", want: "abc\n"},
		{name: "file leading space kept", file: " abc \n", ref: "file:secret", want: " abc "},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.file != "" {
				writeFile(t, dir, "secret", tc.file, 0o600)
			}
			if tc.env != "" {
				t.Setenv("KG_RES", tc.env)
			}
			c, err := Parse("c.yaml", dir, []byte(minimalHead+"credentials:\n  cred: {source: static, value: \""+tc.ref+"\"}\n"))
			if err != nil {
				t.Fatal(err)
			}
			sources, ps := c.buildSources(sourceEnv{ctx: context.Background(), clock: broker.SystemClock{}}, nil)
			if len(ps) > 0 {
				t.Fatalf("problems: %v", ps)
			}
			cred, err := sources["cred"].Credential(context.Background(),
				broker.Identity{ID: "local", Method: broker.MethodCIDR}, broker.Grant{Rule: "r", Credential: "cred"})
			if err != nil {
				t.Fatal(err)
			}
			if got := cred.Fields[broker.FieldToken].Reveal(); got != tc.want {
				t.Errorf("token = %q, want %q", got, tc.want)
			}
		})
	}
}
