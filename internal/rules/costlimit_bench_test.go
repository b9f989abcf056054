package rules

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

// worstCase is one hostile request shape against one rule: the `when` and
// the request data an attacker controls.
type worstCase struct {
	name    string
	when    string
	headers map[string]string
	path    string
}

func manyHeaders(n, valueLen int, fill string) map[string]string {
	h := make(map[string]string, n)
	for i := 0; i < n; i++ {
		h[fmt.Sprintf("x-h%05d", i)] = strings.Repeat(fill, valueLen)
	}
	return h
}

// worstCases are the shapes that took the most CPU per evaluation when
// DefaultCostLimit was calibrated (SECURITY-TESTS L-09, T-E6). Each either
// stops at the cost limit (or one of the loop bounds, which report as the
// cost limit) or finishes under it; what matters is the time either way.
func worstCases() []worstCase {
	l09 := `!request.headers.exists(k, request.headers[k].matches("^(x+x+)+y$") || k.matches("^x-(a|b|c)+[0-9]*z$"))`
	var wide []string
	for _, c := range "abcdefghijklmnopqrst" {
		wide = append(wide, fmt.Sprintf("k != %q", string(c)))
	}
	return []worstCase{
		// The L-09 rule: 10k headers (refused before the loop), the
		// front door's 200, and 999 (the most a loop accepts) of 600
		// bytes, which reach the limit.
		{"l09/10k-headers", l09, manyHeaders(10000, 1, "x"), "/"},
		{"l09/200-headers", l09, manyHeaders(200, 1, "x"), "/"},
		{"l09/999x600B", l09, manyHeaders(999, 600, "x"), "/"},
		// Regular expressions over long values: most CPU per cost unit.
		{"regex/200x8KiB", `request.headers.exists(k, request.headers[k].matches("(a+)+b"))`, manyHeaders(200, 8192, "a"), "/"},
		{"regex-alt/200x8KiB", `request.headers.exists(k, request.headers[k].matches("(a|aa|aaa|b)*c"))`, manyHeaders(200, 8192, "a"), "/"},
		// Loops whose bodies are free in CEL's cost model, over a list
		// the attacker sizes (a path of slashes).
		{"free-loop/64KiB-path", `request.path.split("/").filter(x, false).size() == 0`, nil, strings.Repeat("/", 64<<10)},
		{"free-loop/999-elements", `request.path.split("/").filter(x, false).size() == 0`, nil, strings.Repeat("/", 998)},
		{"free-nested/999x5", `request.path.split("/").filter(x, ["a","b","c","d","e"].filter(y, false).size() == 0).size() == 0`, nil, strings.Repeat("/", 998)},
		// Cheap loop bodies: the longest loops per cost unit.
		{"cheap-loop/10k-headers", `request.headers.all(k, true)`, manyHeaders(10000, 1, "x"), "/"},
		{"cheap-loop/999-headers", `request.headers.all(k, true)`, manyHeaders(999, 1, "x"), "/"},
		{"wide-body/999-headers", `request.headers.all(k, ` + strings.Join(wide, " && ") + `)`, manyHeaders(999, 1, "x"), "/"},
		{"nested/999x5-headers", `request.headers.all(k, ["a","b","c","d","e"].all(p, !k.startsWith(p)))`, manyHeaders(999, 1, "x"), "/"},
	}
}

// BenchmarkCostLimitWorstCase measures, with the default budget, the CPU one
// hostile evaluation takes before it is denied at the cost limit (or
// finishes under it). DefaultCostLimit is chosen so the slowest case stays
// at or under ~20 ms per evaluation on the 2-core CI machine.
//
//	go test -run '^$' -bench CostLimitWorstCase -benchtime 10x ./internal/rules/
func BenchmarkCostLimitWorstCase(b *testing.B) {
	for _, wc := range worstCases() {
		s, errs := Compile([]Spec{{Name: "hostile", Hosts: []string{"api.example.com"}, When: wc.when}}, Options{})
		if len(errs) > 0 {
			b.Fatalf("%s: %v", wc.name, errs)
		}
		tg := req("api.example.com", "GET")
		tg.Headers, tg.Path = wc.headers, wc.path
		b.Run(wc.name, func(b *testing.B) {
			denied := 0
			for b.Loop() {
				if _, err := s.Decide(context.Background(), testID, tg); err != nil && strings.Contains(err.Error(), "cost limit exceeded") {
					denied++
				}
			}
			b.ReportMetric(float64(denied)/float64(b.N), "denied/op")
		})
	}
}

// TestCostLimitWorstCaseBounded runs every worst case once and checks each
// is denied at the cost limit or decided without error; the time is logged
// (a wall-clock assertion would flake on a loaded machine) except for a
// generous ceiling that only a regression to unbounded loops would cross.
func TestCostLimitWorstCaseBounded(t *testing.T) {
	for _, wc := range worstCases() {
		t.Run(wc.name, func(t *testing.T) {
			s := mustCompile(t, []Spec{{Name: "hostile", Hosts: []string{"api.example.com"}, When: wc.when}}, Options{})
			tg := req("api.example.com", "GET")
			tg.Headers, tg.Path = wc.headers, wc.path
			start := time.Now()
			d, err := s.Decide(context.Background(), testID, tg)
			took := time.Since(start)
			if err != nil && !strings.Contains(err.Error(), "cost limit exceeded") {
				t.Fatalf("error %v, want none or the cost limit", err)
			}
			if err != nil && (d.Allowed() || d.Rule != "hostile") {
				t.Fatalf("decision %+v with a cost-limit error, want a deny by the rule", d)
			}
			t.Logf("%v (denied at the limit: %v)", took, err != nil)
			// Before the loop bounds, cheap-loop/10k-headers took ~1 s
			// under -race-free builds and free loops were never stopped.
			if took > time.Second {
				t.Errorf("one evaluation took %v", took)
			}
		})
	}
}
