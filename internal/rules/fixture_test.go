package rules

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/keygate/broker/internal/broker"
)

// The fixtures in testdata/ use the rule syntax of DESIGN.md §5. This is a
// small loader for them (package config owns the real one, which this
// package cannot import): it keeps file:line positions so compile errors can
// be checked as `broker validate` prints them.

type fixtureFile struct {
	Options struct {
		ConnectPorts []int  `yaml:"connect_ports"`
		HTTPPorts    []int  `yaml:"http_ports"`
		CostLimit    uint64 `yaml:"cost_limit"`
	} `yaml:"options"`
	Now      string          `yaml:"now"`
	Identity fixtureIdentity `yaml:"identity"` // default for cases
	Rules    []yaml.Node     `yaml:"rules"`
	Cases    []fixtureCase   `yaml:"cases"`
	Errors   []fixtureError  `yaml:"errors"`
}

type fixtureRule struct {
	Name   string   `yaml:"name"`
	Hosts  []string `yaml:"hosts"`
	Ports  []int    `yaml:"ports"`
	When   string   `yaml:"when"`
	Action string   `yaml:"action"`
	Inject *struct {
		Credential string            `yaml:"credential"`
		Params     map[string]string `yaml:"params"`
	} `yaml:"inject"`
	AllowPlaintext bool `yaml:"allow_plaintext"`
}

type fixtureIdentity struct {
	ID          string         `yaml:"id"`
	Method      string         `yaml:"method"`
	TrustDomain string         `yaml:"trust_domain"`
	Claims      map[string]any `yaml:"claims"`
	Process     *struct {
		PID         int    `yaml:"pid"`
		UID         int    `yaml:"uid"`
		GID         int    `yaml:"gid"`
		Exe         string `yaml:"exe"`
		SHA256      string `yaml:"sha256"`
		ContainerID string `yaml:"container_id"`
	} `yaml:"process"`
	Delegator *struct {
		Sub    string         `yaml:"sub"`
		Claims map[string]any `yaml:"claims"`
	} `yaml:"delegator"`
}

type fixtureCase struct {
	Name     string           `yaml:"name"`
	Identity *fixtureIdentity `yaml:"identity"`
	Target   struct {
		Phase    string            `yaml:"phase"`
		Protocol string            `yaml:"protocol"`
		Host     string            `yaml:"host"`
		Port     int               `yaml:"port"`
		Method   string            `yaml:"method"`
		Path     string            `yaml:"path"`
		Query    string            `yaml:"query"`
		Headers  map[string]string `yaml:"headers"`
		Database string            `yaml:"database"`
		User     string            `yaml:"user"`
	} `yaml:"target"`
	Want struct {
		Action     string `yaml:"action"`
		Rule       string `yaml:"rule"`
		Credential string `yaml:"credential"`
		Plaintext  bool   `yaml:"allow_plaintext"`
		Reason     string `yaml:"reason"`
		Error      string `yaml:"error"` // substring; empty means no error
	} `yaml:"want"`
}

type fixtureError struct {
	Line     int    `yaml:"line"`
	Rule     string `yaml:"rule"`
	Contains string `yaml:"contains"`
}

type fakeClock struct{ t time.Time }

func (c fakeClock) Now() time.Time { return c.t }

func loadFixture(t *testing.T, path string) (fixtureFile, []Spec, Options) {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var f fixtureFile
	dec := yaml.NewDecoder(strings.NewReader(string(raw)))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	specs := make([]Spec, 0, len(f.Rules))
	for _, n := range f.Rules {
		var fr fixtureRule
		if err := n.Decode(&fr); err != nil {
			t.Fatalf("%s:%d: %v", path, n.Line, err)
		}
		sp := Spec{
			Name: fr.Name, Hosts: fr.Hosts, Ports: fr.Ports, When: fr.When,
			Action: fr.Action, AllowPlaintext: fr.AllowPlaintext,
			Pos: Pos{File: path, Line: n.Line},
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == "when" {
				sp.WhenPos = Pos{File: path, Line: n.Content[i+1].Line}
			}
		}
		if fr.Inject != nil {
			sp.Inject = &broker.Injection{Credential: fr.Inject.Credential, Params: fr.Inject.Params}
		}
		specs = append(specs, sp)
	}
	opts := Options{
		ConnectPorts: f.Options.ConnectPorts,
		HTTPPorts:    f.Options.HTTPPorts,
		CostLimit:    f.Options.CostLimit,
	}
	if f.Now != "" {
		now, err := time.Parse(time.RFC3339, f.Now)
		if err != nil {
			t.Fatalf("%s: now: %v", path, err)
		}
		opts.Clock = fakeClock{now}
	}
	return f, specs, opts
}

func (fi fixtureIdentity) identity() broker.Identity {
	id := broker.Identity{ID: fi.ID, Method: fi.Method, TrustDomain: fi.TrustDomain, Claims: fi.Claims}
	if p := fi.Process; p != nil {
		id.Process = &broker.ProcessInfo{PID: p.PID, UID: p.UID, GID: p.GID, Exe: p.Exe, SHA256: p.SHA256, ContainerID: p.ContainerID}
	}
	if d := fi.Delegator; d != nil {
		id.Delegator = broker.Delegator{Sub: d.Sub, Claims: d.Claims}
	}
	return id
}

func parsePhase(t *testing.T, s string) broker.Phase {
	switch s {
	case "connect":
		return broker.PhaseConnect
	case "request":
		return broker.PhaseRequest
	}
	t.Fatalf("fixture: unknown phase %q", s)
	return 0
}

func globFixtures(t *testing.T, pattern string) []string {
	t.Helper()
	files, err := filepath.Glob(pattern)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatalf("no fixtures match %s", pattern)
	}
	return files
}

// TestDecideFixtures runs every testdata/decide/*.yaml: a rule set, then
// targets and the decisions they must get.
func TestDecideFixtures(t *testing.T) {
	for _, path := range globFixtures(t, filepath.Join("testdata", "decide", "*.yaml")) {
		t.Run(filepath.Base(path), func(t *testing.T) {
			f, specs, opts := loadFixture(t, path)
			set, errs := Compile(specs, opts)
			if len(errs) > 0 {
				t.Fatalf("compile: %v", errs)
			}
			if len(f.Cases) == 0 {
				t.Fatal("fixture has no cases")
			}
			for _, c := range f.Cases {
				t.Run(c.Name, func(t *testing.T) {
					fi := f.Identity
					if c.Identity != nil {
						fi = *c.Identity
					}
					tg := broker.Target{
						Phase: parsePhase(t, c.Target.Phase), Protocol: c.Target.Protocol,
						Host: c.Target.Host, Port: c.Target.Port, Method: c.Target.Method,
						Path: c.Target.Path, Query: c.Target.Query, Headers: c.Target.Headers,
						Database: c.Target.Database, User: c.Target.User,
					}
					d, err := set.Decide(context.Background(), fi.identity(), tg)
					checkDecision(t, d, err, c)

					// Explain must reach the same decision.
					ex := set.Explain(fi.identity(), tg)
					if ex.Decision.Action != d.Action || ex.Decision.Rule != d.Rule || (ex.Err == nil) != (err == nil) {
						t.Errorf("Explain decided %v/%q (err %v), Decide %v/%q (err %v)", ex.Decision.Action, ex.Decision.Rule, ex.Err, d.Action, d.Rule, err)
					}
				})
			}
		})
	}
}

func checkDecision(t *testing.T, d broker.Decision, err error, c fixtureCase) {
	t.Helper()
	w := c.Want
	if w.Action == "" {
		t.Fatal("fixture case has no want.action")
	}
	if got := d.Action.String(); got != w.Action {
		t.Errorf("action = %s, want %s (decision %+v, err %v)", got, w.Action, d, err)
	}
	if d.Rule != w.Rule {
		t.Errorf("rule = %q, want %q (reason %q, err %v)", d.Rule, w.Rule, d.Reason, err)
	}
	gotCred := ""
	if d.Inject != nil {
		gotCred = d.Inject.Credential
	}
	if gotCred != w.Credential {
		t.Errorf("credential = %q, want %q", gotCred, w.Credential)
	}
	if d.AllowPlaintext != w.Plaintext {
		t.Errorf("allow_plaintext = %v, want %v", d.AllowPlaintext, w.Plaintext)
	}
	if w.Reason != "" && d.Reason != w.Reason {
		t.Errorf("reason = %q, want %q", d.Reason, w.Reason)
	}
	switch {
	case w.Error == "" && err != nil:
		t.Errorf("unexpected error: %v", err)
	case w.Error != "" && err == nil:
		t.Errorf("no error, want one containing %q", w.Error)
	case w.Error != "" && !strings.Contains(err.Error(), w.Error):
		t.Errorf("error %q does not contain %q", err, w.Error)
	}
	if err != nil {
		if !strings.HasPrefix(err.Error(), "rules: ") {
			t.Errorf("error %q lacks the rules: prefix", err)
		}
		if d.Allowed() {
			t.Errorf("an error must deny, got %v", d.Action)
		}
	}
	for _, v := range c.Target.Headers {
		if v != "" && strings.Contains(d.Reason, v) {
			t.Errorf("reason %q contains a header value", d.Reason)
		}
	}
}

// TestCompileErrorFixtures runs every testdata/compile/*.yaml: a rule set
// that must not compile, with every expected problem at its file:line.
func TestCompileErrorFixtures(t *testing.T) {
	for _, path := range globFixtures(t, filepath.Join("testdata", "compile", "*.yaml")) {
		t.Run(filepath.Base(path), func(t *testing.T) {
			f, specs, opts := loadFixture(t, path)
			if len(f.Errors) == 0 {
				t.Fatal("fixture lists no expected errors")
			}
			set, errs := Compile(specs, opts)
			if set != nil {
				t.Error("Compile returned a Set alongside errors")
			}
			if testing.Verbose() {
				t.Log("\n" + joinErrs(errs))
			}
			if len(errs) != len(f.Errors) {
				t.Errorf("got %d errors, want %d:\n%s", len(errs), len(f.Errors), joinErrs(errs))
			}
			for _, want := range f.Errors {
				prefix := fmt.Sprintf("%s:%d: rule %q: ", path, want.Line, want.Rule)
				found := false
				for _, e := range errs {
					if strings.HasPrefix(e.Error(), prefix) && strings.Contains(e.Error(), want.Contains) {
						found = true
						break
					}
				}
				if !found {
					t.Errorf("no error %q...%q among:\n%s", prefix, want.Contains, joinErrs(errs))
				}
			}
		})
	}
}

func joinErrs(errs []error) string {
	var b strings.Builder
	for _, e := range errs {
		b.WriteString("  ")
		b.WriteString(e.Error())
		b.WriteByte('\n')
	}
	return b.String()
}
