package rules

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keygate/broker/internal/broker"
)

var testID = broker.Identity{ID: "spiffe://example.org/app", Method: broker.MethodSPIFFEX509, TrustDomain: "example.org"}

func mustCompile(t testing.TB, specs []Spec, opts Options) *Set {
	t.Helper()
	s, errs := Compile(specs, opts)
	if len(errs) > 0 {
		t.Fatalf("compile: %v", errs)
	}
	return s
}

func req(host string, method string) broker.Target {
	return broker.Target{Phase: broker.PhaseRequest, Protocol: broker.ProtocolHTTPS, Host: host, Port: 443, Method: method, Path: "/"}
}

// TestCostLimit: a `when` that looks cheap on an ordinary request passes the
// static estimate, and the runtime limit stops it on a hostile one.
func TestCostLimit(t *testing.T) {
	s := mustCompile(t, []Spec{{
		Name:  "regex-headers",
		Hosts: []string{"api.example.com"},
		When:  `request.headers.exists(k, request.headers[k].matches("(a+)+b"))`,
	}}, Options{})

	huge := make(map[string]string, 10000)
	for i := 0; i < 10000; i++ {
		huge[fmt.Sprintf("x-h-%d", i)] = strings.Repeat("a", 64)
	}
	tests := []struct {
		name      string
		headers   map[string]string
		want      broker.Action
		wantRule  string
		wantError string
	}{
		{name: "ordinary request, no match", headers: map[string]string{"accept": "aaaa", "user-agent": "curl"}, want: broker.Deny},
		{name: "ordinary request, match", headers: map[string]string{"accept": "aaab"}, want: broker.Allow, wantRule: "regex-headers"},
		{name: "10k headers hit the limit", headers: huge, want: broker.Deny, wantRule: "regex-headers", wantError: "cost limit exceeded"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tg := req("api.example.com", "GET")
			tg.Headers = tt.headers
			d, err := s.Decide(context.Background(), testID, tg)
			if d.Action != tt.want || d.Rule != tt.wantRule {
				t.Errorf("decision = %v/%q, want %v/%q (err %v)", d.Action, d.Rule, tt.want, tt.wantRule, err)
			}
			if tt.wantError == "" {
				if err != nil {
					t.Errorf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantError) || !strings.HasPrefix(err.Error(), `rules: rule "regex-headers": when: `) {
				t.Errorf("error = %v, want one containing %q", err, tt.wantError)
			}
			if strings.Contains(d.Reason, "aaaa") {
				t.Errorf("reason %q leaks a header value", d.Reason)
			}
		})
	}
}

func TestCostLimitOption(t *testing.T) {
	spec := Spec{Name: "loop", Hosts: []string{"a.example.com"}, When: `request.headers.all(k, k.startsWith("x-"))`}
	t.Run("static estimate over a small limit", func(t *testing.T) {
		_, errs := Compile([]Spec{spec}, Options{CostLimit: 50})
		if len(errs) != 1 || !strings.Contains(errs[0].Error(), "exceeds the limit 50") {
			t.Fatalf("errors = %v", errs)
		}
	})
	t.Run("runtime limit follows the option", func(t *testing.T) {
		s := mustCompile(t, []Spec{spec}, Options{CostLimit: 2000})
		h := map[string]string{}
		for i := 0; i < 1000; i++ {
			h[fmt.Sprintf("x-%d", i)] = "v"
		}
		tg := req("a.example.com", "GET")
		tg.Headers = h
		d, err := s.Decide(context.Background(), testID, tg)
		if err == nil || d.Allowed() {
			t.Fatalf("decision %+v, err %v: want a cost-limit deny", d, err)
		}
	})
}

func TestContextCancelledDenies(t *testing.T) {
	s := mustCompile(t, []Spec{{Name: "loop", Hosts: []string{"a.example.com"}, When: `request.headers.all(k, k != "")`}}, Options{})
	h := map[string]string{}
	for i := 0; i < 1000; i++ {
		h[fmt.Sprintf("x-%d", i)] = "v"
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	tg := req("a.example.com", "GET")
	tg.Headers = h
	d, err := s.Decide(ctx, testID, tg)
	if d.Allowed() || d.Rule != "loop" {
		t.Errorf("decision = %+v, want a deny by rule loop", d)
	}
	if !errors.Is(err, context.Canceled) {
		t.Errorf("error = %v, want one wrapping context.Canceled", err)
	}
}

// TestJSONClaims uses claims as an OIDC verifier hands them over: decoded
// JSON, so numbers are float64.
func TestJSONClaims(t *testing.T) {
	var claims map[string]any
	if err := json.Unmarshal([]byte(`{"repository":"acme/app","run_attempt":2,"aud":["keygate","other"],"exp":1900000000}`), &claims); err != nil {
		t.Fatal(err)
	}
	id := broker.Identity{ID: "repo:acme/app", Method: broker.MethodOIDC, Claims: claims}
	tests := []struct {
		when string
		want broker.Action
	}{
		{`workload.claims.repository == "acme/app"`, broker.Allow},
		{`workload.claims.run_attempt > 1`, broker.Allow},
		{`workload.claims.run_attempt == 2`, broker.Allow},
		{`"keygate" in workload.claims.aud`, broker.Allow},
		{`timestamp(int(workload.claims.exp)) > now`, broker.Allow},
		{`workload.claims.repository == "acme/other"`, broker.Deny},
	}
	clock := fakeClock{time.Date(2025, 6, 1, 0, 0, 0, 0, time.UTC)}
	for _, tt := range tests {
		t.Run(tt.when, func(t *testing.T) {
			s := mustCompile(t, []Spec{{Name: "r", Hosts: []string{"*"}, When: tt.when}}, Options{Clock: clock})
			d, err := s.Decide(context.Background(), id, req("api.github.com", "GET"))
			if err != nil {
				t.Fatal(err)
			}
			if d.Action != tt.want {
				t.Errorf("action = %v, want %v", d.Action, tt.want)
			}
		})
	}
}

func TestDecideInjectionCopied(t *testing.T) {
	inj := &broker.Injection{Credential: "github-ci", Params: map[string]string{"scope": "repo"}}
	s := mustCompile(t, []Spec{{Name: "gh", Hosts: []string{"api.github.com"}, Inject: inj, AllowPlaintext: true}}, Options{})
	d, err := s.Decide(context.Background(), testID, req("api.github.com", "GET"))
	if err != nil {
		t.Fatal(err)
	}
	want := broker.Decision{Action: broker.Allow, Rule: "gh", Inject: inj, AllowPlaintext: true, Reason: "rule matched"}
	if d != want {
		t.Errorf("decision = %+v, want %+v", d, want)
	}
}

func TestDecideRejectsBadInput(t *testing.T) {
	s := mustCompile(t, []Spec{{Name: "all", Hosts: []string{"*"}, Ports: []int{443}}}, Options{})
	tests := []struct {
		name    string
		set     *Set
		target  broker.Target
		wantErr string
		reason  string
	}{
		{name: "phase not set", set: s, target: broker.Target{Protocol: "https", Host: "a.example.com", Port: 443},
			wantErr: "rules: target phase unknown is neither connect nor request", reason: "invalid target phase"},
		{name: "nil set", set: nil, target: req("a.example.com", "GET"), wantErr: "rules: no rule set loaded", reason: "no rule set loaded"},
		{name: "zero set recovers from its own bug", set: &Set{}, target: req("a.example.com", "GET"),
			wantErr: "rules: internal error while deciding", reason: "internal error"},
		{name: "empty host matches nothing, not even *", set: s, target: broker.Target{Phase: broker.PhaseRequest, Protocol: "https", Port: 443},
			reason: "no rule matched"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := tt.set.Decide(context.Background(), testID, tt.target)
			if d.Allowed() {
				t.Errorf("allowed: %+v", d)
			}
			if d.Reason != tt.reason {
				t.Errorf("reason = %q, want %q", d.Reason, tt.reason)
			}
			if tt.wantErr == "" && err != nil {
				t.Errorf("unexpected error %v", err)
			}
			if tt.wantErr != "" && (err == nil || !strings.HasPrefix(err.Error(), tt.wantErr)) {
				t.Errorf("error = %v, want prefix %q", err, tt.wantErr)
			}
		})
	}
}

func TestEmptyRuleSetDenies(t *testing.T) {
	s := mustCompile(t, nil, Options{})
	d, err := s.Decide(context.Background(), testID, req("api.github.com", "GET"))
	if err != nil || d != (broker.Decision{Reason: "no rule matched"}) {
		t.Fatalf("decision = %+v, err %v", d, err)
	}
}

func TestCompileErrorText(t *testing.T) {
	tests := []struct {
		name string
		spec Spec
		want string
	}{
		{name: "no file", spec: Spec{Name: "x", Hosts: []string{"a.com:80"}},
			want: `rule "x": host pattern "a.com:80" must not contain a port (use ports:)`},
		{name: "file and line", spec: Spec{Name: "x", Hosts: []string{"a.com"}, Action: "nope", Pos: Pos{File: "broker.yaml", Line: 12}},
			want: `broker.yaml:12: rule "x": unknown action "nope" (want allow, deny or tunnel)`},
		{name: "when uses its own position", spec: Spec{Name: "x", Hosts: []string{"a.com"}, When: "nope", Pos: Pos{File: "b.yaml", Line: 3}, WhenPos: Pos{File: "b.yaml", Line: 7}},
			want: `b.yaml:7: rule "x": when: undeclared reference to 'nope' (column 1)`},
		{name: "multi-line when names the expression line", spec: Spec{Name: "x", Hosts: []string{"a.com"}, When: "request.method == \"GET\" &&\n  nope", WhenPos: Pos{File: "b.yaml", Line: 7}},
			want: `b.yaml:7: rule "x": when: undeclared reference to 'nope' (expression line 2, column 3)`},
		{name: "unnamed rule", spec: Spec{Hosts: []string{"a.com"}, Pos: Pos{File: "b.yaml", Line: 2}},
			want: `b.yaml:2: rule #1: name is required`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, errs := Compile([]Spec{tt.spec}, Options{})
			if len(errs) != 1 {
				t.Fatalf("errors = %v, want exactly one", errs)
			}
			if errs[0].Error() != tt.want {
				t.Errorf("error = %q\n want %q", errs[0], tt.want)
			}
			var ce *CompileError
			if !errors.As(errs[0], &ce) {
				t.Errorf("error is %T, want *CompileError", errs[0])
			}
		})
	}
}

func TestCompileReportsEveryProblem(t *testing.T) {
	_, errs := Compile([]Spec{
		{Name: "a", Hosts: []string{"a.com:1"}, When: "1"},
		{Name: "b", Hosts: []string{"b.com"}, Action: "tunnel", Inject: &broker.Injection{Credential: "c"}},
		{Name: "a", Hosts: []string{"c.com"}},
	}, Options{ConnectPorts: []int{0}})
	if len(errs) != 5 {
		t.Fatalf("got %d errors, want 5:\n%s", len(errs), joinErrs(errs))
	}
	if !strings.HasPrefix(errs[0].Error(), "rules: default port 0") {
		t.Errorf("first error = %v, want the default port problem", errs[0])
	}
}

func TestExplain(t *testing.T) {
	s := mustCompile(t, []Spec{
		{Name: "other-host", Hosts: []string{"other.example.com"}},
		{Name: "ssh-only", Hosts: []string{"api.example.com"}, Ports: []int{22}},
		{Name: "posts", Hosts: []string{"*.example.com"}, When: `request.method == "POST"`},
		{Name: "claims", Hosts: []string{"api.example.com"}, When: `workload.claims.team == "a"`},
		{Name: "reads", Hosts: []string{"api.example.com"}, When: `request.method == "GET"`},
		{Name: "everything", Hosts: []string{"*"}},
		{Name: "block", Hosts: []string{"api.example.com"}, Action: "deny"},
	}, Options{})
	id := testID
	id.Claims = map[string]any{"team": "b"}

	type cand struct {
		matched bool
		reason  string
	}
	tests := []struct {
		name   string
		target broker.Target
		id     broker.Identity
		rule   string
		action broker.Action
		want   []cand
	}{
		{
			name: "request", target: req("api.example.com", "GET"), id: id, rule: "reads", action: broker.Allow,
			want: []cand{
				{false, "host does not match"},
				{false, "port 443 not in [22]"},
				{false, "when is false"},
				{false, "when is false"},
				{true, "decides"},
				{false, "not reached: earlier rule decided"},
				{false, "not reached: earlier rule decided"},
			},
		},
		{
			name: "connect", target: broker.Target{Phase: broker.PhaseConnect, Protocol: "https", Host: "api.example.com", Port: 443}, id: id,
			rule: "posts", action: broker.Allow,
			want: []cand{
				{false, "host does not match"},
				{false, "port 443 not in [22]"},
				{true, "decides: when depends on request fields, so the connection is intercepted and each request decided"},
				{false, "when is false"},
				{false, "when depends on request fields"},
				{true, `matches, but earlier rule "posts" depends on request fields`},
				{false, "not reached: earlier rule decided"},
			},
		},
		{
			name: "error", target: req("api.example.com", "PUT"), id: testID, rule: "claims", action: broker.Deny,
			want: []cand{
				{false, "host does not match"},
				{false, "port 443 not in [22]"},
				{false, "when is false"},
				{true, "when error: no such key: team"},
				{false, "not reached: earlier rule decided"},
				{false, "not reached: earlier rule decided"},
				{false, "not reached: earlier rule decided"},
			},
		},
		{
			name: "no host matches", target: req("elsewhere.net", "GET"), id: id, rule: "everything", action: broker.Allow,
			want: []cand{
				{false, "host does not match"},
				{false, "host does not match"},
				{false, "host does not match"},
				{false, "host does not match"},
				{false, "host does not match"},
				{true, "decides"},
				{false, "host does not match"},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ex := s.Explain(tt.id, tt.target)
			if ex.Decision.Rule != tt.rule || ex.Decision.Action != tt.action {
				t.Errorf("decision = %v/%q, want %v/%q", ex.Decision.Action, ex.Decision.Rule, tt.action, tt.rule)
			}
			d, err := s.Decide(context.Background(), tt.id, tt.target)
			if d != ex.Decision || (err == nil) != (ex.Err == nil) {
				t.Errorf("Decide = %+v (%v), Explain = %+v (%v)", d, err, ex.Decision, ex.Err)
			}
			if len(ex.Candidates) != len(tt.want) {
				t.Fatalf("%d candidates, want %d", len(ex.Candidates), len(tt.want))
			}
			for i, w := range tt.want {
				c := ex.Candidates[i]
				if c.Matched != w.matched || c.Reason != w.reason {
					t.Errorf("candidate %d (%s) = %v %q, want %v %q", i, c.Rule, c.Matched, c.Reason, w.matched, w.reason)
				}
			}
		})
	}
}

// TestDecideConcurrent shares one Set between goroutines; run with -race.
func TestDecideConcurrent(t *testing.T) {
	s := mustCompile(t, []Spec{
		{Name: "gets", Hosts: []string{"*.example.com"}, When: `request.method == "GET" && workload.id.startsWith("spiffe://example.org/")`},
		{Name: "rest", Hosts: []string{"*"}, Action: "deny"},
	}, Options{})
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				method := "GET"
				want := broker.Allow
				if (g+i)%2 == 1 {
					method, want = "POST", broker.Deny
				}
				d, err := s.Decide(context.Background(), testID, req("api.example.com", method))
				if err != nil || d.Action != want {
					t.Errorf("goroutine %d: %+v %v", g, d, err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
}
