package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/keygate/broker/internal/intercept/ca"
)

// TestBuildProblems covers what only Build can find, because it reads files
// and the environment: the file passes validation, then a dry-run Build
// (what `broker validate` runs) reports every problem with its line.
func TestBuildProblems(t *testing.T) {
	type want struct {
		line   int
		substr string // may contain DIR, replaced by the config's directory
	}
	tests := []struct {
		name  string
		yaml  string // after minimalHead unless it starts with "listen:"
		setup func(t *testing.T, dir string)
		want  []want
	}{
		{
			name: "env variable not set",
			yaml: "credentials:\n  tok: {source: static, value: env:KG_TEST_SURELY_UNSET}\n",
			want: []want{{8, `credential "tok": inject: env:KG_TEST_SURELY_UNSET: environment variable is not set`}},
		},
		{
			name:  "env variable empty",
			yaml:  "credentials:\n  tok: {source: static, value: env:KG_TEST_EMPTY}\n",
			setup: func(t *testing.T, _ string) { t.Setenv("KG_TEST_EMPTY", "") },
			want:  []want{{8, "env:KG_TEST_EMPTY: environment variable is empty"}},
		},
		{
			name: "file missing, named by its resolved path",
			yaml: "credentials:\n  tok: {source: static, value: file:secrets/missing}\n",
			want: []want{{8, "file:DIR/secrets/missing: no such file or directory"}},
		},
		{
			name:  "file empty after its newline",
			yaml:  "credentials:\n  tok: {source: static, value: file:empty}\n",
			setup: func(t *testing.T, dir string) { writeFile(t, dir, "empty", "\n", 0o600) },
			want:  []want{{8, "file:DIR/empty: file is empty"}},
		},
		{
			name: "values: every field resolved",
			yaml: "credentials:\n  pair:\n    source: static\n    values:\n      username: env:KG_TEST_SURELY_UNSET\n      password: file:nope\n",
			want: []want{
				{11, "env:KG_TEST_SURELY_UNSET: environment variable is not set"},
				{12, "file:DIR/nope: no such file"},
			},
		},
		{
			name: "CA files missing",
			yaml: "listen: {proxy: 127.0.0.1:15080}\nca: {cert: ca/ca.pem, key: ca/ca-key.pem}\n" +
				"attestors: [{type: cidr, identities: [{id: x, cidrs: [127.0.0.0/8]}]}]\n",
			want: []want{{2, "ca: read certificate"}},
		},
		{
			name: "CA key readable by others",
			yaml: "listen: {proxy: 127.0.0.1:15080}\nca: {cert: ca/ca.pem, key: ca/ca-key.pem}\n" +
				"attestors: [{type: cidr, identities: [{id: x, cidrs: [127.0.0.0/8]}]}]\n",
			setup: func(t *testing.T, dir string) {
				if err := ca.Init(filepath.Join(dir, "ca"), nil, nil); err != nil {
					t.Fatal(err)
				}
				if err := os.Chmod(filepath.Join(dir, "ca", "ca-key.pem"), 0o640); err != nil {
					t.Fatal(err)
				}
			},
			want: []want{{2, "ca: key file DIR/ca/ca-key.pem has mode 0640"}},
		},
		{
			name: "ca_bundle missing",
			yaml: "egress: {ca_bundle: roots.pem}\n",
			want: []want{{7, "egress.ca_bundle: open DIR/roots.pem"}},
		},
		{
			name:  "ca_bundle without a certificate",
			yaml:  "egress: {ca_bundle: roots.pem}\n",
			setup: func(t *testing.T, dir string) { writeFile(t, dir, "roots.pem", "not pem\n", 0o644) },
			want:  []want{{7, "egress.ca_bundle: roots.pem holds no PEM certificate"}},
		},
		{
			name: "cidr identity without ranges",
			yaml: "listen: {proxy: 127.0.0.1:15080}\nca: {ephemeral: true}\nattestors:\n  - type: cidr\n    identities: [{id: a, cidrs: [10.0.0.0/8]}, {id: b}]\n",
			want: []want{{4, `cidr identity "b": no cidrs`}},
		},
		{
			name: "one range, two identities",
			yaml: "listen: {proxy: 127.0.0.1:15080}\nca: {ephemeral: true}\nattestors:\n  - type: cidr\n    identities: [{id: a, cidrs: [10.0.0.0/8]}, {id: b, cidrs: [10.1.2.3/8]}]\n",
			want: []want{{4, `cidr 10.0.0.0/8 is claimed by both "a" and "b"`}},
		},
		{
			name: "several at once, sorted",
			yaml: "egress: {ca_bundle: roots.pem}\ncredentials:\n  b: {source: static, value: file:nope}\n  a: {source: static, value: env:KG_TEST_SURELY_UNSET}\n",
			want: []want{
				{7, "egress.ca_bundle"},
				{9, "file:DIR/nope"},
				{10, "env:KG_TEST_SURELY_UNSET"},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			src := tc.yaml
			if !strings.HasPrefix(src, "listen:") {
				src = minimalHead + src
			}
			path := writeFile(t, dir, "c.yaml", src, 0o644)
			if tc.setup != nil {
				tc.setup(t, dir)
			}
			c, err := LoadFile(path)
			if err != nil {
				t.Fatalf("LoadFile: %v", err)
			}
			if ps := c.validate(); len(ps) > 0 {
				t.Fatalf("the fixture should pass validate: %v", ps)
			}
			ps := loadAndBuild(t, path)
			checkSorted(t, ps)
			if len(ps) != len(tc.want) {
				t.Fatalf("got %d problems, want %d:\n%v", len(ps), len(tc.want), ps)
			}
			for i, w := range tc.want {
				sub := strings.ReplaceAll(w.substr, "DIR", dir)
				if ps[i].Line != w.line || !strings.Contains(ps[i].Msg, sub) || ps[i].File != path {
					t.Errorf("problem %d = %s\nwant %s:%d: ...%s...", i, ps[i].Error(), path, w.line, sub)
				}
			}
		})
	}
}

// TestRelativePaths: file: references, ca.cert, ca.key, ca.cert_out and
// egress.ca_bundle resolve against the config file's directory, never the
// working directory; absolute paths are used as they are.
func TestRelativePaths(t *testing.T) {
	const src = `listen: {proxy: 127.0.0.1:15080}
ca: {cert: pki/ca.pem, key: pki/ca-key.pem}
attestors: [{type: cidr, identities: [{id: x, cidrs: [127.0.0.0/8]}]}]
egress: {ca_bundle: pki/roots.pem}
credentials:
  rel: {source: static, value: file:secrets/token}
  dotdot: {source: static, value: file:../outside/token}
  abs: {source: static, value: file:ABS}
`
	root := t.TempDir()
	dir := filepath.Join(root, "conf")
	if err := ca.Init(filepath.Join(dir, "pki"), nil, nil); err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, "pki/roots.pem", string(testRootPEM(t)), 0o644)
	writeFile(t, dir, "secrets/token", "t1\n", 0o600)
	writeFile(t, root, "outside/token", "t2\n", 0o600)
	abs := writeFile(t, t.TempDir(), "abs-token", "t3\n", 0o600)
	body := strings.Replace(src, "ABS", abs, 1)

	t.Run("against the config directory", func(t *testing.T) {
		// The test's working directory is the package directory, which has
		// none of these files.
		path := writeFile(t, dir, "keygate.yaml", body, 0o644)
		if ps := loadAndBuild(t, path); ps != nil {
			t.Fatalf("problems: %v", ps)
		}
	})
	t.Run("Parse uses the dir it is given", func(t *testing.T) {
		other := t.TempDir()
		c, err := Parse("inline.yaml", other, []byte(body))
		if err != nil {
			t.Fatal(err)
		}
		_, err = build(t, c, BuildOptions{Logger: zap.NewNop(), DryRun: true})
		ps := asProblems(t, err)
		text := ps.Error()
		for _, want := range []string{
			filepath.Join(other, "pki/ca.pem"),
			filepath.Join(other, "pki/roots.pem"),
			filepath.Join(other, "secrets/token"),
			filepath.Join(filepath.Dir(other), "outside/token"),
		} {
			if !strings.Contains(text, want) {
				t.Errorf("problems do not name %s:\n%s", want, text)
			}
		}
		if strings.Contains(text, abs) {
			t.Errorf("the absolute reference was not found:\n%s", text)
		}
	})
	t.Run("ephemeral cert_out", func(t *testing.T) {
		d := t.TempDir()
		path := writeFile(t, d, "c.yaml", "listen: {proxy: 127.0.0.1:0}\nca: {ephemeral: true, cert_out: out/ca.pem}\n"+
			"attestors: [{type: cidr, identities: [{id: x, cidrs: [127.0.0.0/8]}]}]\n", 0o644)
		if err := os.Mkdir(filepath.Join(d, "out"), 0o700); err != nil {
			t.Fatal(err)
		}
		c, err := LoadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		rt, err := build(t, c, BuildOptions{Logger: zap.NewNop()})
		if err != nil {
			t.Fatal(err)
		}
		rt.closeListeners()
		want := filepath.Join(d, "out", "ca.pem")
		if rt.CACertPath != want {
			t.Errorf("CACertPath = %q, want %q", rt.CACertPath, want)
		}
		if fi, err := os.Stat(want); err != nil || fi.Mode().Perm() != 0o644 {
			t.Errorf("cert_out not written 0644: %v %v", fi, err)
		}
	})
}

// TestBuildClosesListenersOnError: when the admin address is taken, Build
// fails with a located problem and leaves the proxy port free again.
func TestBuildClosesListenersOnError(t *testing.T) {
	busy := listenTCP(t)
	free := freePort(t)
	path := writeFile(t, t.TempDir(), "c.yaml", "listen:\n  proxy: "+free+"\n  admin: "+busy.Addr().String()+
		"\nca: {ephemeral: true}\nattestors: [{type: cidr, identities: [{id: x, cidrs: [127.0.0.0/8]}]}]\n", 0o644)
	c, err := LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	_, err = build(t, c, BuildOptions{Logger: zap.NewNop()})
	ps := asProblems(t, err)
	if len(ps) != 1 || ps[0].Line != 3 || !strings.HasPrefix(ps[0].Msg, "listen.admin:") {
		t.Fatalf("problems = %v", ps)
	}
	ln, err := netListen(free)
	if err != nil {
		t.Fatalf("the proxy listener was left open: %v", err)
	}
	ln.Close()
}

func TestBuildNeedsLogger(t *testing.T) {
	c, err := Parse("c.yaml", t.TempDir(), []byte(minimalHead))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := build(t, c, BuildOptions{DryRun: true}); err == nil {
		t.Fatal("Build without a logger succeeded")
	}
}

func TestLoadFileMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nope.yaml")
	_, err := LoadFile(path)
	ps := asProblems(t, err)
	if len(ps) != 1 || ps[0].File != path || !strings.Contains(ps[0].Msg, "cannot read: no such file or directory") {
		t.Fatalf("problems = %v", ps)
	}
	if got := ps[0].Error(); got != path+": cannot read: no such file or directory" {
		t.Errorf("Error() = %q", got)
	}
}
