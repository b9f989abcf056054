package rules

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
)

// TestCELErrorDenies (SECURITY-TESTS T-B8, F-11): a `when` that fails at
// run time — a missing key, a type error, the cost limit — denies with the
// failing rule named, even when a later rule would allow; through the
// pipeline that is a 403 with code rule_error (so a broken rule is told
// apart from an intended denial), with no credential fetched.
func TestCELErrorDenies(t *testing.T) {
	huge := make(map[string]string, 10000)
	for i := range 10000 {
		huge[fmt.Sprintf("x-h-%d", i)] = strings.Repeat("a", 64)
	}
	oidc := broker.Identity{ID: "repo:acme/app", Method: broker.MethodOIDC,
		Claims: map[string]any{"run_attempt": "two", "repository": "acme/app"}}
	tests := []struct {
		name    string
		when    string
		id      broker.Identity
		headers map[string]string
		wantErr string
	}{
		{"no such key: claim", `workload.claims.environment == "prod"`, oidc, nil, "no such key"},
		{"no such key: header", `request.headers["x-team"] == "a"`, oidc, map[string]string{"accept": "*/*"}, "no such key"},
		{"type error at run time", `workload.claims.run_attempt > 1`, oidc, nil, "no such overload"},
		{"cost limit", `request.headers.exists(k, request.headers[k].matches("(a+)+b"))`, oidc, huge, "cost limit exceeded"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fetched := 0
			src := sourceFunc(func() { fetched++ })
			inj := &broker.Injection{Credential: "cred", Injector: bearerFake{}}
			s := mustCompile(t, []Spec{
				{Name: "failing", Hosts: []string{"api.example.com"}, When: tt.when, Inject: inj},
				// A later, permissive rule: an error must not fall through to it.
				{Name: "catch-all", Hosts: []string{"*"}, Inject: inj},
			}, Options{})
			tg := req("api.example.com", "GET")
			tg.Headers = tt.headers

			d, err := s.Decide(context.Background(), tt.id, tg)
			if d.Allowed() || d.Rule != "failing" || d.Inject != nil {
				t.Fatalf("decision %+v, want a deny by rule failing", d)
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.HasPrefix(err.Error(), `rules: rule "failing": when: `) {
				t.Fatalf("error %v, want one naming the rule and containing %q", err, tt.wantErr)
			}

			p := &broker.Pipeline{Policy: s, Sources: map[string]broker.Source{"cred": src}}
			r, _ := http.NewRequest(http.MethodGet, "https://api.example.com/", nil)
			_, c, err := p.Authorize(context.Background(), tt.id, tg, r)
			var be *broker.Error
			if !errors.As(err, &be) {
				t.Fatalf("Authorize error %v, want *broker.Error", err)
			}
			if be.Status() != http.StatusForbidden || be.Code != broker.CodeRuleError || be.Rule != "failing" ||
				be.Message != "rule evaluation failed" {
				t.Fatalf("error %d %s rule %q %q, want 403 rule_error by failing, rule evaluation failed", be.Status(), be.Code, be.Rule, be.Message)
			}
			if fetched != 0 || len(c.Fields) != 0 || r.Header.Get("Authorization") != "" {
				t.Fatalf("a failing rule fetched %d credentials or injected one", fetched)
			}
		})
	}
}

// TestCELCostLimit (SECURITY-TESTS T-E6, L-09): with the broker's default
// budget, the loader refuses expressions whose static cost estimate is over
// it, and a rule that passes the estimate but meets a hostile request (10k
// headers, a backtracking regex per header) stops at the runtime limit and
// denies. The time it takes is logged, not asserted: the bound is the cost
// limit, and a wall-clock assertion would flake on a loaded machine.
func TestCELCostLimit(t *testing.T) {
	t.Run("loader rejects over-budget estimates", func(t *testing.T) {
		for _, when := range []string{
			`request.headers.all(a, request.headers.all(b, request.headers[a].matches(request.headers[b])))`,
			`workload.claims.all(k, request.headers.exists(h, h.matches(k)))`,
			`request.headers.exists(a, request.headers.exists(b, request.headers.exists(c, a + b + c == "x")))`,
		} {
			_, errs := Compile([]Spec{{Name: "heavy", Hosts: []string{"a.example.com"}, When: when}}, Options{})
			if len(errs) != 1 || !strings.Contains(errs[0].Error(), fmt.Sprintf("exceeds the limit %d", DefaultCostLimit)) {
				t.Errorf("%s: errors %v, want one over-budget rejection", when, errs)
			}
		}
		// The same check guards the other CEL values the config compiles
		// (session policies, scopes).
		if _, err := CompileValue(`request.headers.all(a, request.headers.all(b, a < b)) ? "x" : "y"`, ValueString, Options{}); err == nil ||
			!strings.Contains(err.Error(), "exceeds the limit") {
			t.Errorf("CompileValue: %v, want an over-budget rejection", err)
		}
	})

	s := mustCompile(t, []Spec{{Name: "regex", Hosts: []string{"api.example.com"},
		When: `request.headers.exists(k, request.headers[k].matches("(a+)+b"))`}}, Options{})
	for _, tc := range []struct {
		name        string
		n, valueLen int
	}{
		// Over maxLoopRange headers: refused before the loop starts.
		{"runtime limit denies 10k headers", 10000, 64},
		// The most the front door lets in by default (200 headers), long
		// enough that CEL's own cost tracker stops the loop.
		{"runtime limit denies 200 long headers", 200, 1024},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tg := req("api.example.com", "GET")
			tg.Headers = manyHeaders(tc.n, tc.valueLen, "a")
			start := time.Now()
			d, err := s.Decide(context.Background(), testID, tg)
			took := time.Since(start)
			if d.Allowed() || d.Rule != "regex" || err == nil || !strings.Contains(err.Error(), "cost limit exceeded") {
				t.Fatalf("decision %+v err %v, want a cost-limit deny", d, err)
			}
			t.Logf("%d-header request denied at the cost limit in %s (catalogue target: 50ms unloaded)", tc.n, took)
		})
	}
}

// sourceFunc is a broker.Source that records calls and returns a token.
type sourceFunc func()

func (f sourceFunc) Credential(context.Context, broker.Identity, broker.Grant) (broker.Credential, error) {
	f()
	return broker.Credential{Fields: map[string]broker.Secret{broker.FieldToken: broker.NewSecret("t")}}, nil
}

type bearerFake struct{}

func (bearerFake) Inject(r *http.Request, c broker.Credential) error {
	tok, _ := c.Field(broker.FieldToken)
	r.Header.Set("Authorization", "Bearer "+tok.Reveal())
	return nil
}
func (bearerFake) Kind() string { return "bearer" }
