package rules

import (
	"context"
	"strings"
	"testing"

	"github.com/keygate/broker/internal/broker"
)

// FuzzHostPattern: validating and matching never panic; a valid exact
// pattern matches its own (normalised) spelling; a valid wildcard matches a
// subdomain of its suffix and never the apex; Decide agrees with matches.
func FuzzHostPattern(f *testing.F) {
	for _, s := range []struct{ pattern, host string }{
		{"api.github.com", "api.github.com"},
		{"*.example.com", "a.example.com"},
		{"*.example.com", "example.com"},
		{"*", "anything"},
		{"169.254.169.254", "::ffff:169.254.169.254"},
		{"2001:db8::1", "2001:db8:0::1"},
		{"[::1]:443", "::1"},
		{"API.Example.COM", "api.example.com"},
		{"*.*.com", "a.b.com"},
		{"a..b", ""},
		{"fe80::1%eth0", "fe80::1"},
	} {
		f.Add(s.pattern, s.host)
	}
	f.Fuzz(func(t *testing.T, pattern, host string) {
		p, err := parseHostPattern(pattern)
		if (err == nil) != (ValidateHostPattern(pattern) == nil) {
			t.Fatal("parseHostPattern and ValidateHostPattern disagree")
		}
		if err != nil {
			if _, errs := Compile([]Spec{{Name: "r", Hosts: []string{pattern}}}, Options{}); len(errs) == 0 {
				t.Fatalf("Compile accepted invalid pattern %q", pattern)
			}
			return
		}
		s, errs := Compile([]Spec{{Name: "r", Hosts: []string{pattern}, Ports: []int{443}}}, Options{})
		if len(errs) > 0 {
			t.Fatalf("Compile rejected valid pattern %q: %v", pattern, errs)
		}
		decide := func(h string) bool {
			d, err := s.Decide(context.Background(), testID, broker.Target{Phase: broker.PhaseConnect, Protocol: "https", Host: h, Port: 443})
			if err != nil {
				t.Fatalf("Decide(%q): %v", h, err)
			}
			return d.Action == broker.Allow
		}
		// Decide (the index) and the pattern agree for an arbitrary host.
		h := lookupHost(host)
		if got, want := decide(host), p.matches(h); got != want {
			t.Fatalf("pattern %q host %q: Decide %v, matches %v", pattern, host, got, want)
		}
		switch p.kind {
		case hostExact:
			if !decide(p.value) {
				t.Fatalf("exact pattern %q does not match itself (%q)", pattern, p.value)
			}
			if !decide(strings.ToLower(pattern)) {
				t.Fatalf("exact pattern %q does not match its lower-case spelling", pattern)
			}
		case hostWildcard:
			if !decide("x." + p.value) {
				t.Fatalf("wildcard %q does not match x.%s", pattern, p.value)
			}
			if decide(p.value) {
				t.Fatalf("wildcard %q matches its apex", pattern)
			}
		case hostAny:
			if !decide("x.example") {
				t.Fatal("* does not match a host")
			}
		}
	})
}

// FuzzCompactJSON: the session-policy normaliser never panics, and what it
// accepts it returns as valid, idempotent JSON (equal policies, equal bytes:
// they are cache keys).
func FuzzCompactJSON(f *testing.F) {
	for _, s := range []string{`{"a":1}`, `[1, "x&y", {"b": null}]`, `{"Version":"2012-10-17","Statement":[]}`, `"x"`, `{} {}`, `{"a":1e400}`, "\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		out, err := compactJSON(s)
		if err != nil {
			return
		}
		again, err := compactJSON(out)
		if err != nil || again != out {
			t.Fatalf("not idempotent: %q -> %q -> %q (%v)", s, out, again, err)
		}
	})
}

// FuzzWhen: any `when` that compiles, evaluated against any header data,
// decides without an internal error (the loop bounds never break the
// interpreter), and an evaluation error always denies, naming the rule.
func FuzzWhen(f *testing.F) {
	for _, s := range []struct {
		when, value string
		n           uint16
	}{
		{`request.headers.exists(k, request.headers[k].matches("(a+)+b"))`, "aaaa", 10},
		{`request.headers.all(k, ["a","b"].all(p, !k.startsWith(p)))`, "v", 1001},
		{`request.path.split("/").filter(x, false).size() == 0`, "", 0},
		{`request.headers.exists_one(k, request.headers[k] == "x")`, "x", 3},
		{`request.headers.map(k, k + request.headers[k]).exists(v, v.contains("x-h1"))`, "y", 50},
		{`[1, 2, 3].all(i, [4, 5].exists(j, i < j))`, "", 0},
		{`workload.claims.all(k, k != "")`, "", 0},
	} {
		f.Add(s.when, s.value, s.n)
	}
	f.Fuzz(func(t *testing.T, when, value string, n uint16) {
		s, errs := Compile([]Spec{{Name: "fuzz", Hosts: []string{"api.example.com"}, When: when}}, Options{})
		if len(errs) > 0 {
			return
		}
		tg := req("api.example.com", "GET")
		tg.Path = "/" + strings.Repeat(value+"/", int(n%2048))
		tg.Headers = manyHeaders(int(n%2048), len(value)%64, "a")
		for _, phase := range []broker.Phase{broker.PhaseRequest, broker.PhaseConnect} {
			tg.Phase = phase
			d, err := s.Decide(context.Background(), testID, tg)
			if d.Reason == reasonInternal || (err != nil && strings.Contains(err.Error(), "internal error")) {
				t.Fatalf("internal error deciding %q: %v", when, err)
			}
			if err != nil && (d.Allowed() || d.Rule != "fuzz") {
				t.Fatalf("error %v with decision %+v, want a deny by the rule", err, d)
			}
		}
	})
}
