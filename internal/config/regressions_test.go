package config

import (
	"strings"
	"testing"
)

// Regressions for problems found while writing the config tests: each
// states the behaviour that must hold.

func parseProblems(t *testing.T, src string) Problems {
	t.Helper()
	c, err := Parse("k.yaml", t.TempDir(), []byte(src))
	if err != nil {
		return asProblems(t, err)
	}
	_, perr := c.Policy(nil)
	return asProblems(t, perr)
}

// A literal secret pasted in the wrong shape reaches yaml.v3's type error,
// which quotes up to 7 characters of it: `cannot unmarshal !!str
// `ghp_SEC...` into map[string]string`. ValidateRef takes care never to
// echo a malformed reference; the decoder should not either.
func TestRegressionPastedSecretWrongShapeEchoed(t *testing.T) {
	for _, creds := range []string{
		"  k: {source: static, values: ghp_SECRETSECRETSECRET}\n",
		"  k: ghp_SECRETSECRETSECRET\n",
	} {
		ps := parseProblems(t, minimalHead+"credentials:\n"+creds)
		mustNotContain(t, "problems", ps.Error(), "ghp_SEC")
	}
}

// After inject.as fails to decode, the rule is also told "inject.as is
// required" (or, for a header with an unknown key, `header "": invalid
// header name`): a second, misleading problem for one mistake.
func TestRegressionInjectAsCascade(t *testing.T) {
	for _, as := range []string{
		`{cookie: {name: session}}`,
		`{header: {name: X-Api-Key, prefix: "Key "}}`,
		`{header: {name: X-A}, query: {name: q}}`,
		`[bearer]`,
	} {
		ps := parseProblems(t, minimalHead+"credentials:\n  k: {source: static, value: env:K}\nrules:\n"+
			"  - {name: r, hosts: [a.example.com], inject: {credential: k, as: "+as+"}}\n")
		if len(ps) != 1 {
			t.Errorf("as: %s: want 1 problem, got %d:\n%s", as, len(ps), ps.Error())
		}
	}
}

// egress.connect_ports [0] is reported by validate at its line AND by
// rules.Compile as "rules: default port 0 is out of range 1-65535" with no
// line at all (printed as "k.yaml: rules: ...").
func TestRegressionConnectPortReportedTwice(t *testing.T) {
	ps := parseProblems(t, minimalHead+"egress: {connect_ports: [0]}\n")
	for _, p := range ps {
		if p.Line == 0 {
			t.Errorf("problem without a line: %s", p.Error())
		}
	}
	if len(ps) != 1 {
		t.Errorf("want 1 problem, got:\n%s", ps.Error())
	}
}

// An allow rule with `inject: {credential: ""}` is reported twice: by
// validate at the inject line ("inject.credential is required") and by
// rules.Compile at the rule line ("inject names no credential").
func TestRegressionEmptyCredentialReportedTwice(t *testing.T) {
	ps := parseProblems(t, minimalHead+"credentials:\n  k: {source: static, value: env:K}\nrules:\n"+
		"  - name: r\n    hosts: [a.example.com]\n    inject: {credential: \"\", as: bearer}\n")
	if len(ps) != 1 {
		t.Errorf("want 1 problem, got:\n%s", ps.Error())
	}
}

// A file holding only comments is not "empty": it yields three problems
// at line 0 (printed without a line) instead of "the config is empty".
func TestRegressionCommentOnlyFile(t *testing.T) {
	ps := parseProblems(t, "# keygate config\n# (nothing here yet)\n")
	if len(ps) != 1 || !strings.Contains(ps[0].Msg, "empty") || ps[0].Line == 0 {
		t.Errorf("want one located \"the config is empty\", got:\n%s", ps.Error())
	}
}
