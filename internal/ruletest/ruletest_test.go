package ruletest

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/config"
)

func run(t *testing.T, o Options, files ...string) (Summary, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	for i, f := range files {
		files[i] = filepath.Join("testdata", f)
	}
	sum := RunFiles(files, o, &out, &errb)
	return sum, out.String(), errb.String()
}

func TestRuleTestPassingFile(t *testing.T) {
	sum, out, errs := run(t, Options{}, "pass.yaml")
	if !sum.OK() || sum.Passed != 3 || errs != "" {
		t.Fatalf("summary %+v\nstdout:\n%s\nstderr:\n%s", sum, out, errs)
	}
	for _, want := range []string{"PASS ci job reads the repo\n", "PASS ci job cannot write\n", "PASS unknown host is default deny\n", "3 passed, 0 failed\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("stdout lacks %q:\n%s", want, out)
		}
	}
}

func TestRuleTestFailingFile(t *testing.T) {
	sum, out, _ := run(t, Options{}, "fail.yaml")
	if sum.OK() || sum.Passed != 1 || sum.Failed != 1 {
		t.Fatalf("summary %+v\n%s", sum, out)
	}
	for _, want := range []string{
		"PASS ci job reads the repo\n",
		"FAIL expects allow on an unknown host\n",
		filepath.Join("testdata", "fail.yaml") + ":7\n",
		`decision: want allow, got deny (rule "", reason "no rule matched")`,
		`rule: want "github-read", got "" (default deny)`,
		`credential: want "github-token", got "" (none)`,
		`rule "github-read"            host does not match`,
		"1 passed, 1 failed\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("stdout lacks %q:\n%s", want, out)
		}
	}
}

func TestRuleTestInvalidFile(t *testing.T) {
	sum, out, errs := run(t, Options{}, "invalid.yaml")
	if sum.OK() || sum.Invalid != 1 || sum.Passed+sum.Failed != 0 {
		t.Fatalf("summary %+v\n%s\n%s", sum, out, errs)
	}
	name := filepath.Join("testdata", "invalid.yaml")
	for _, want := range []string{
		name + ":4: field colour not found in identity",
		name + `:10: expect.decision "permit" is not allow, deny or tunnel`,
		name + `:12: identity.method "kerberos" is not one of`,
		name + `:13: request.url "ftp://api.github.com/" must be an absolute`,
	} {
		if !strings.Contains(errs, want) {
			t.Errorf("stderr lacks %q:\n%s", want, errs)
		}
	}
}

func TestRuleTestParseProblems(t *testing.T) {
	cases := []struct {
		name, src, want string
	}{
		{"empty", "  \n", "t.yaml:1: the test file is empty"},
		{"syntax", "tests: [\n", "t.yaml:1: did not find expected node content"},
		{"no tests", "config: x.yaml\n", "t.yaml:1: no tests"},
		{"unknown top key", "config: x.yaml\nconfg: y\ntests: []\n", "t.yaml:2: field confg not found in the test file"},
		{"no identity", "tests:\n  - name: a\n    request: {url: 'https://a.example/'}\n    expect: {decision: deny}\n", "t.yaml:2: test has no identity"},
		{"no request", "tests:\n  - name: a\n    identity: {id: x, method: cidr}\n    expect: {decision: deny}\n", "t.yaml:2: test has no request"},
		{"no expect", "tests:\n  - name: a\n    identity: {id: x, method: cidr}\n    request: {url: 'https://a.example/'}\n", "t.yaml:2: test has no expect"},
		{"no name", "tests:\n  - identity: {id: x, method: cidr}\n    request: {url: 'https://a.example/'}\n    expect: {decision: deny}\n", "t.yaml:2: test has no name"},
		{"connect with url", "tests:\n  - name: a\n    identity: {id: x, method: cidr}\n    request: {connect: 'a.example:443', url: 'https://a.example/'}\n    expect: {decision: deny}\n", "t.yaml:4: request.connect stands alone"},
		{"bad connect", "tests:\n  - name: a\n    identity: {id: x, method: cidr}\n    request: {connect: 'a.example:0'}\n    expect: {decision: deny}\n", `t.yaml:4: request.connect "a.example:0"`},
		{"tunnel at request", "tests:\n  - name: a\n    identity: {id: x, method: cidr}\n    request: {url: 'https://a.example/'}\n    expect: {decision: tunnel}\n", "t.yaml:5: a tunnel is decided at CONNECT"},
		{"credential on deny", "tests:\n  - name: a\n    identity: {id: x, method: cidr}\n    request: {url: 'https://a.example/'}\n    expect: {decision: deny, credential: c}\n", "t.yaml:5: expect.credential is set"},
		{"duplicate name", "tests:\n  - name: a\n    identity: {id: x, method: cidr}\n    request: {url: 'https://a.example/'}\n    expect: {decision: deny}\n  - name: a\n    identity: {id: x, method: cidr}\n    request: {url: 'https://a.example/'}\n    expect: {decision: deny}\n", `t.yaml:6: test name "a" is already used at line 2`},
		{"type error", "tests:\n  - name: a\n    identity: {id: x, method: cidr, process: {pid: lots}}\n    request: {url: 'https://a.example/'}\n    expect: {decision: deny}\n", "t.yaml:3: cannot unmarshal !!str value into int"},
		{"two documents", "tests: []\n---\ntests: []\n", "t.yaml:2: more than one YAML document"},
		{"postgres with url", "tests:\n  - name: a\n    identity: {id: x, method: cidr}\n    request: {postgres: {upstream: 'db:5432', database: d, user: u}, url: 'https://a.example/'}\n    expect: {decision: deny}\n", "t.yaml:4: request.postgres stands alone"},
		{"postgres without upstream", "tests:\n  - name: a\n    identity: {id: x, method: cidr}\n    request: {postgres: {database: d, user: u}}\n    expect: {decision: deny}\n", "request.postgres.upstream \"\" must be"},
		{"postgres without user", "tests:\n  - name: a\n    identity: {id: x, method: cidr}\n    request: {postgres: {upstream: 'db:5432', database: d}}\n    expect: {decision: deny}\n", "request.postgres needs database and user"},
		{"postgres unknown key", "tests:\n  - name: a\n    identity: {id: x, method: cidr}\n    request: {postgres: {upstream: 'db:5432', database: d, user: u, password: p}}\n    expect: {decision: deny}\n", "field password not found in request.postgres"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse("t.yaml", ".", []byte(c.src))
			if err == nil {
				t.Fatal("no error")
			}
			if _, ok := err.(config.Problems); !ok {
				t.Errorf("error is %T, want config.Problems", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error:\n%v\nwant %q", err, c.want)
			}
		})
	}
}

// The identity shapes every attestor produces, and the CONNECT phase.
func TestRuleTestIdentityShapesAndConnect(t *testing.T) {
	sum, out, errs := run(t, Options{}, "shapes.yaml")
	if !sum.OK() || sum.Passed != 9 {
		t.Fatalf("summary %+v\nstdout:\n%s\nstderr:\n%s", sum, out, errs)
	}
	f, err := Load(filepath.Join("testdata", "shapes.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]Case{}
	for _, c := range f.Cases {
		byName[c.Name] = c
	}
	oidc := byName["oidc claims decide"].Identity
	if _, ok := oidc.Claims["run_attempt"].(float64); !ok {
		t.Errorf("claims numbers must be float64 as in a verified token, got %T", oidc.Claims["run_attempt"])
	}
	proc := byName["process identity"]
	if p := proc.Identity.Process; p == nil || p.PID != 42 || p.UID != 1000 || p.GID != 1000 || p.Exe != "/usr/bin/git" || p.SHA256 != "abc" || p.ContainerID != "c1" {
		t.Errorf("process: %+v", proc.Identity.Process)
	}
	if tg := proc.Target; tg.Host != "api.github.com" || tg.Port != 443 || tg.Method != "PUT" || tg.Path != "/x" || tg.Phase != broker.PhaseRequest {
		t.Errorf("target not normalised: %+v", tg)
	}
	if d := byName["spiffe with a delegator"].Identity.Delegator; d.Sub != "alice" || d.Claims["groups"] == nil {
		t.Errorf("delegator: %+v", d)
	}
	if h := byName["headers are matched in lower case"].Target.Headers; h["accept"] != "application/json" {
		t.Errorf("headers: %v", h)
	}
	if tg := byName["connect tunnel"].Target; tg.Phase != broker.PhaseConnect || tg.Port != 443 || tg.Protocol != broker.ProtocolHTTPS || tg.Method != "" {
		t.Errorf("connect target: %+v", tg)
	}
}

func TestRuleTestConfigOverrideAndBadConfig(t *testing.T) {
	// --config replaces the file's config: the same cases pass.
	sum, out, errs := run(t, Options{Config: filepath.Join("testdata", "rules.yaml")}, "pass.yaml")
	if !sum.OK() {
		t.Fatalf("override: %+v\n%s%s", sum, out, errs)
	}
	// A broken config is reported as file:line and nothing runs.
	sum, out, errs = run(t, Options{Config: filepath.Join("testdata", "badconfig.yaml")}, "pass.yaml")
	if sum.OK() || sum.Invalid != 1 || sum.Passed != 0 {
		t.Fatalf("bad config: %+v\n%s%s", sum, out, errs)
	}
	if !strings.Contains(errs, filepath.Join("testdata", "badconfig.yaml")+":") || !strings.Contains(errs, "not run") {
		t.Errorf("stderr:\n%s", errs)
	}
	// A missing test file is a problem, not a crash.
	sum, _, errs = run(t, Options{}, "nope.yaml")
	if sum.Invalid != 1 || !strings.Contains(errs, "cannot read") {
		t.Errorf("missing file: %+v %s", sum, errs)
	}
}
