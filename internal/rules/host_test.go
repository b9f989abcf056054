package rules

import (
	"strings"
	"testing"
)

func TestParseHostPattern(t *testing.T) {
	tests := []struct {
		in      string
		want    string // normalised pattern; empty when an error is expected
		wantErr string
	}{
		{in: "api.github.com", want: "api.github.com"},
		{in: "API.GitHub.com", want: "api.github.com"},
		{in: "*.example.com", want: "*.example.com"},
		{in: "*.com", want: "*.com"},
		{in: "*", want: "*"},
		{in: "localhost", want: "localhost"},
		{in: "_service.example.com", want: "_service.example.com"},
		{in: "xn--bcher-kva.example", want: "xn--bcher-kva.example"},
		{in: "169.254.169.254", want: "169.254.169.254"},
		{in: "::1", want: "::1"},
		{in: "2001:DB8:0:0::1", want: "2001:db8::1"},
		{in: "::ffff:10.0.0.1", want: "10.0.0.1"},
		{in: "", wantErr: "empty host pattern"},
		{in: "api.github.com:443", wantErr: "must not contain a port"},
		{in: "10.0.0.1:443", wantErr: "must not contain a port"},
		{in: "https://api.github.com", wantErr: "must not contain a scheme"},
		{in: "api.github.com/", wantErr: "must not contain a path"},
		{in: "user@api.github.com", wantErr: "user information"},
		{in: "[::1]", wantErr: "without brackets"},
		{in: "[::1]:443", wantErr: "without brackets"},
		{in: "fe80::1%eth0", wantErr: "zone"},
		{in: "fe80::zz", wantErr: "not a valid IPv6 address"},
		{in: "api.github.com.", wantErr: "must not end with a dot"},
		{in: "*.", wantErr: "must not end with a dot"},
		{in: "**", wantErr: "'*' is allowed only"},
		{in: "*example.com", wantErr: "'*' is allowed only"},
		{in: "api.*.com", wantErr: "'*' is allowed only"},
		{in: "*.*.com", wantErr: "'*' is allowed only"},
		{in: "api.example.*", wantErr: "'*' is allowed only"},
		{in: "*.10.0.0", wantErr: "cannot cover IP addresses"},
		{in: "10.0.0", wantErr: "not a valid IPv4 address"},
		{in: "010.0.0.1", wantErr: "not a valid IPv4 address"},
		{in: "256.0.0.1", wantErr: "not a valid IPv4 address"},
		{in: "example.123", wantErr: "last label is numeric"},
		{in: "a..b", wantErr: "empty label"},
		{in: ".example.com", wantErr: "empty label"},
		{in: "-a.example.com", wantErr: "starts or ends with '-'"},
		{in: "a b.com", wantErr: "whitespace"},
		{in: "bücher.example", wantErr: "not ASCII"},
		{in: "a!.com", wantErr: "contains '!'"},
		{in: strings.Repeat("a", 64) + ".com", wantErr: "longer than 63"},
		{in: strings.Repeat("abcdefghi.", 26) + "com", wantErr: "longer than 253"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			p, err := parseHostPattern(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
				}
				if ValidateHostPattern(tt.in) == nil {
					t.Error("ValidateHostPattern accepted what parseHostPattern rejected")
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if p.String() != tt.want {
				t.Errorf("normalised = %q, want %q", p.String(), tt.want)
			}
		})
	}
}

func TestHostPatternMatches(t *testing.T) {
	tests := []struct {
		pattern, host string
		want          bool
	}{
		{"api.github.com", "api.github.com", true},
		{"api.github.com", "x.api.github.com", false},
		{"api.github.com", "github.com", false},
		{"*.example.com", "a.example.com", true},
		{"*.example.com", "a.b.example.com", true},
		{"*.example.com", "example.com", false},
		{"*.example.com", ".example.com", false},
		{"*.example.com", "aexample.com", false},
		{"*.example.com", "example.com.evil.net", false},
		{"*.com", "example.com", true},
		{"*", "anything.at.all", true},
		{"*", "10.0.0.1", true},
		{"*", "", false},
		{"10.0.0.1", "10.0.0.1", true},
		{"10.0.0.1", "::ffff:10.0.0.1", true},
		{"::1", "0:0:0:0:0:0:0:1", true},
		{"2001:db8::1", "2001:db8::2", false},
	}
	for _, tt := range tests {
		t.Run(tt.pattern+"/"+tt.host, func(t *testing.T) {
			p, err := parseHostPattern(tt.pattern)
			if err != nil {
				t.Fatal(err)
			}
			if got := p.matches(lookupHost(tt.host)); got != tt.want {
				t.Errorf("matches = %v, want %v", got, tt.want)
			}
			// The index must agree with the pattern.
			ix := newIndex()
			ix.add(0, p)
			var c candidates
			ix.lookup(lookupHost(tt.host), &c)
			_, got := c.next()
			if got != tt.want {
				t.Errorf("index lookup = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestCandidatesMergeInRuleOrder(t *testing.T) {
	ix := newIndex()
	add := func(i int, pats ...string) {
		for _, s := range pats {
			p, err := parseHostPattern(s)
			if err != nil {
				t.Fatal(err)
			}
			ix.add(i, p)
		}
	}
	add(0, "*")
	add(1, "other.example.net")
	add(2, "*.example.com", "a.b.example.com") // two patterns, one candidate
	add(3, "a.b.example.com")
	add(4, "*.b.example.com")
	add(5, "*.com")
	add(6, "*")
	add(7, "*.net")

	var c candidates
	ix.lookup("a.b.example.com", &c)
	var got []int
	for i, ok := c.next(); ok; i, ok = c.next() {
		got = append(got, i)
	}
	want := []int{0, 2, 3, 4, 5, 6}
	if len(got) != len(want) {
		t.Fatalf("candidates = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("candidates = %v, want %v", got, want)
		}
	}
}
