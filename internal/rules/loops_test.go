package rules

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/keygate/broker/internal/broker"
)

// TestLoopBounds (SECURITY-TESTS T-E6, L-09): loops the CEL cost model does
// not charge, or charges too little for the CPU they take, are stopped by
// the loop bounds and deny like the cost limit; ordinary loops are not.
func TestLoopBounds(t *testing.T) {
	slashes := func(n int) string { return strings.Repeat("/", n-1) } // n empty segments
	prefixes := make([]string, 10)
	for i := range prefixes {
		prefixes[i] = fmt.Sprintf("%q", fmt.Sprintf("x-p%02d-", i))
	}
	tests := []struct {
		name    string
		when    string
		headers map[string]string
		path    string
		wantErr string // "" means no error
		want    broker.Action
	}{
		// filter(x, false) costs nothing per iteration in CEL's model:
		// before the bounds, 40k iterations took ~1 s and never hit the
		// cost limit.
		{"free loop over more than maxLoopRange elements", `request.path.split("/").filter(x, false).size() == 0`,
			nil, slashes(maxLoopRange + 1), "a loop over more than 1000 elements", broker.Deny},
		{"free loop at maxLoopRange elements", `request.path.split("/").filter(x, false).size() == 0`,
			nil, slashes(maxLoopRange), "", broker.Allow},
		{"exists_one over more than maxLoopRange headers", `request.headers.exists_one(k, false)`,
			manyHeaders(maxLoopRange+1, 1, "x"), "/", "a loop over more than 1000 elements", broker.Deny},
		{"nested free loops over maxLoopIterations", `request.path.split("/").filter(x, ["a","b","c","d","e","f"].filter(y, false).size() == 0).size() == 0`,
			nil, slashes(maxLoopIterations/7 + 1), "more than 5000 loop iterations", broker.Deny},
		// An ordinary nested loop: 200 headers (the front door's default
		// cap) against 10 prefixes is 2,200 iterations.
		{"200 headers against 10 prefixes", `request.headers.all(k, [` + strings.Join(prefixes, ",") + `].all(p, !k.startsWith(p)))`,
			manyHeaders(200, 16, "v"), "/", "", broker.Allow},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := mustCompile(t, []Spec{{Name: "loop", Hosts: []string{"api.example.com"}, When: tt.when}}, Options{})
			tg := req("api.example.com", "GET")
			tg.Headers, tg.Path = tt.headers, tt.path
			d, err := s.Decide(context.Background(), testID, tg)
			if d.Action != tt.want {
				t.Errorf("decision %+v, want %v (err %v)", d, tt.want, err)
			}
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), "cost limit exceeded") || !strings.Contains(err.Error(), tt.wantErr) ||
				!strings.HasPrefix(err.Error(), `rules: rule "loop": when: `) {
				t.Fatalf("error %v, want the cost limit (%s) naming the rule", err, tt.wantErr)
			}
			if d.Rule != "loop" || d.Reason != reasonWhenError {
				t.Errorf("decision %+v, want a when-error deny by rule loop", d)
			}
		})
	}
}

// TestLoopBoundsPerEvaluation: the iteration count starts again for each
// rule's `when` (and each Value), so several ordinary rules for one host
// do not add up to the bound.
func TestLoopBoundsPerEvaluation(t *testing.T) {
	h := manyHeaders(400, 1, "x")
	// Each rule runs 400 + 400*8 = 3,600 iterations; two of them would
	// cross maxLoopIterations if the count were shared.
	loop := `request.headers.all(k, ["a","b","c","d","e","f","g","h"].all(p, !k.startsWith(p)))`
	s := mustCompile(t, []Spec{
		{Name: "first", Hosts: []string{"api.example.com"}, When: loop + ` && request.method == "POST"`, Action: ActionDeny},
		{Name: "second", Hosts: []string{"api.example.com"}, When: loop},
	}, Options{})
	tg := req("api.example.com", "GET")
	tg.Headers = h
	d, err := s.Decide(context.Background(), testID, tg)
	if err != nil || !d.Allowed() || d.Rule != "second" {
		t.Fatalf("decision %+v err %v, want allow by second", d, err)
	}
	ex := s.Explain(testID, tg)
	if ex.Err != nil || ex.Decision.Rule != "second" {
		t.Fatalf("explain %+v err %v, want the same decision", ex.Decision, ex.Err)
	}

	v, err := CompileValue(`request.headers.filter(k, k.startsWith("x-")).size() > 0 ? "many" : "none"`, ValueString, Options{})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ { // a shared counter would fail the second time
		if out, err := v.Eval(context.Background(), testID, tg); err != nil || out != "many" {
			t.Fatalf("value eval %d: %q %v", i, out, err)
		}
	}
	tg.Headers = manyHeaders(maxLoopRange+1, 1, "x")
	if _, err := v.Eval(context.Background(), testID, tg); err == nil || !strings.Contains(err.Error(), "cost limit exceeded") {
		t.Fatalf("value over a too-large loop: %v, want the cost limit", err)
	}
}

// TestLoopBoundsAtConnect: at CONNECT (partial evaluation) a loop over
// known data is bounded too, and a loop over request data stays unknown.
func TestLoopBoundsAtConnect(t *testing.T) {
	groups := make([]any, maxLoopRange+1)
	for i := range groups {
		groups[i] = fmt.Sprint("g", i)
	}
	id := broker.Identity{ID: "spiffe://example.org/app", Method: broker.MethodSPIFFEX509, Claims: map[string]any{"groups": groups[:10]}}
	s := mustCompile(t, []Spec{
		{Name: "groups", Hosts: []string{"api.example.com"}, When: `workload.claims.groups.exists_one(g, g == "g3")`},
		{Name: "headers", Hosts: []string{"other.example.com"}, When: `request.headers.exists_one(k, k == "x")`},
	}, Options{})
	conn := broker.Target{Phase: broker.PhaseConnect, Protocol: broker.ProtocolHTTPS, Host: "api.example.com", Port: 443}
	if d, err := s.Decide(context.Background(), id, conn); err != nil || !d.Allowed() || d.Rule != "groups" {
		t.Fatalf("10 groups: %+v %v, want allow by groups", d, err)
	}
	id.Claims = map[string]any{"groups": groups}
	if d, err := s.Decide(context.Background(), id, conn); err == nil || d.Allowed() || !strings.Contains(err.Error(), "cost limit exceeded") {
		t.Fatalf("%d groups: %+v %v, want a cost-limit deny", len(groups), d, err)
	}
	conn.Host = "other.example.com"
	if d, err := s.Decide(context.Background(), id, conn); err != nil || d.Reason != reasonIntercept {
		t.Fatalf("loop over headers at CONNECT: %+v %v, want intercept", d, err)
	}
}
