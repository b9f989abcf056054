package rules

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// maxHostLen is the longest DNS name (RFC 1035 §2.3.4, without the root dot).
const maxHostLen = 253

type hostKind uint8

const (
	hostExact    hostKind = iota // a DNS name or a canonical IP literal
	hostWildcard                 // "*.suffix": one or more labels before suffix
	hostAny                      // "*"
)

// hostPattern is a validated, normalised host pattern.
type hostPattern struct {
	kind  hostKind
	value string // exact: the host; wildcard: the suffix without "*."; any: ""
}

func (p hostPattern) String() string {
	switch p.kind {
	case hostAny:
		return "*"
	case hostWildcard:
		return "*." + p.value
	}
	return p.value
}

// matches reports whether the pattern matches host, which must already be
// in the form lookupHost returns.
func (p hostPattern) matches(host string) bool {
	switch p.kind {
	case hostAny:
		return host != ""
	case hostWildcard:
		// At least one non-empty label before the suffix, and never an IP.
		return len(host) > len(p.value)+1 &&
			strings.HasSuffix(host, p.value) &&
			host[len(host)-len(p.value)-1] == '.' &&
			!isIPHost(host)
	}
	return host == p.value
}

// ValidateHostPattern reports whether p is an acceptable rule host pattern:
// an exact DNS name ("api.github.com"), a wildcard whose '*' is the whole
// first label ("*.example.com", which never matches the apex), an IPv4 or
// IPv6 literal (IPv6 without brackets), or "*" for any host. Patterns are
// case-insensitive; ports, schemes, paths and a trailing dot are rejected.
func ValidateHostPattern(p string) error {
	_, err := parseHostPattern(p)
	return err
}

func parseHostPattern(raw string) (hostPattern, error) {
	if raw == "" {
		return hostPattern{}, errors.New("empty host pattern")
	}
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		if c >= 0x80 {
			return hostPattern{}, fmt.Errorf("host pattern %q is not ASCII (write internationalised names in their xn-- form)", raw)
		}
		if c <= ' ' || c == 0x7f {
			return hostPattern{}, fmt.Errorf("host pattern %q contains whitespace or a control character", raw)
		}
	}
	p := strings.ToLower(raw)
	switch {
	case p == "*":
		return hostPattern{kind: hostAny}, nil
	case strings.Contains(p, "://"):
		return hostPattern{}, fmt.Errorf("host pattern %q must not contain a scheme", raw)
	case strings.ContainsAny(p, "/?#"):
		return hostPattern{}, fmt.Errorf("host pattern %q must not contain a path", raw)
	case strings.Contains(p, "@"):
		return hostPattern{}, fmt.Errorf("host pattern %q must not contain user information", raw)
	case strings.HasPrefix(p, "["):
		return hostPattern{}, fmt.Errorf("host pattern %q: write IPv6 literals without brackets and without a port", raw)
	case strings.Contains(p, ":"):
		return parseIPv6Pattern(raw, p)
	case strings.HasSuffix(p, "."):
		return hostPattern{}, fmt.Errorf("host pattern %q must not end with a dot", raw)
	case strings.HasPrefix(p, "*."):
		suffix := p[2:]
		if strings.Contains(suffix, "*") {
			return hostPattern{}, fmt.Errorf("host pattern %q: '*' is allowed only as the whole pattern or as the whole first label (\"*.example.com\")", raw)
		}
		if allNumericDots(suffix) {
			return hostPattern{}, fmt.Errorf("host pattern %q: a wildcard cannot cover IP addresses", raw)
		}
		if err := validateDNSName(suffix); err != nil {
			return hostPattern{}, fmt.Errorf("host pattern %q: %w", raw, err)
		}
		return hostPattern{kind: hostWildcard, value: suffix}, nil
	case strings.Contains(p, "*"):
		return hostPattern{}, fmt.Errorf("host pattern %q: '*' is allowed only as the whole pattern or as the whole first label (\"*.example.com\")", raw)
	case allNumericDots(p):
		a, err := netip.ParseAddr(p)
		if err != nil || !a.Is4() {
			return hostPattern{}, fmt.Errorf("host pattern %q is not a valid IPv4 address", raw)
		}
		return hostPattern{kind: hostExact, value: a.String()}, nil
	}
	if err := validateDNSName(p); err != nil {
		return hostPattern{}, fmt.Errorf("host pattern %q: %w", raw, err)
	}
	return hostPattern{kind: hostExact, value: p}, nil
}

func parseIPv6Pattern(raw, p string) (hostPattern, error) {
	a, err := netip.ParseAddr(p)
	if err != nil {
		// "name:443" or "1.2.3.4:443" is the common mistake; say so.
		if i := strings.LastIndexByte(p, ':'); strings.Count(p, ":") == 1 && i < len(p)-1 && allDigits(p[i+1:]) {
			return hostPattern{}, fmt.Errorf("host pattern %q must not contain a port (use ports:)", raw)
		}
		return hostPattern{}, fmt.Errorf("host pattern %q is not a valid IPv6 address", raw)
	}
	if a.Zone() != "" {
		return hostPattern{}, fmt.Errorf("host pattern %q must not carry an IPv6 zone", raw)
	}
	// Unmap so "::ffff:10.0.0.1" and "10.0.0.1" are one host for rules.
	return hostPattern{kind: hostExact, value: a.Unmap().String()}, nil
}

// validateDNSName checks a lower-case name: labels of 1–63 letters, digits,
// '-' or '_' (the latter appears in real service names), no label starting
// or ending with '-', and a last label that is not all digits (that would be
// a mistyped IP address, not a name).
func validateDNSName(name string) error {
	if len(name) > maxHostLen {
		return fmt.Errorf("name is longer than %d characters", maxHostLen)
	}
	labels := strings.Split(name, ".")
	for _, l := range labels {
		if l == "" {
			return errors.New("empty label")
		}
		if len(l) > 63 {
			return fmt.Errorf("label %q is longer than 63 characters", l)
		}
		if l[0] == '-' || l[len(l)-1] == '-' {
			return fmt.Errorf("label %q starts or ends with '-'", l)
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("label %q contains %q", l, c)
			}
		}
	}
	if allDigits(labels[len(labels)-1]) {
		return errors.New("the last label is numeric; write IP addresses in full")
	}
	return nil
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

func allNumericDots(s string) bool {
	for i := 0; i < len(s); i++ {
		if (s[i] < '0' || s[i] > '9') && s[i] != '.' {
			return false
		}
	}
	return s != ""
}

// isIPHost reports whether a target host could be an IP literal. Only
// such hosts pay for a parse.
func isIPHost(h string) bool {
	if h == "" {
		return false
	}
	if strings.IndexByte(h, ':') >= 0 {
		return true
	}
	c := h[len(h)-1]
	return c >= '0' && c <= '9' && allNumericDots(h)
}

// lookupHost brings a target host (already lower case, no trailing dot,
// per broker.Target) to the spelling patterns use: IP literals in canonical,
// unmapped form.
func lookupHost(h string) string {
	if !isIPHost(h) {
		return h
	}
	a, err := netip.ParseAddr(h)
	if err != nil {
		return h
	}
	return a.Unmap().WithZone("").String()
}

// index finds the rules that can apply to a host without looking at rules
// for other hosts: exact hosts by map, wildcards by each label suffix of the
// target, "*" rules from a list. Each list holds rule indices ascending.
type index struct {
	exact map[string][]int
	wild  map[string][]int
	any   []int
}

func newIndex() *index {
	return &index{exact: map[string][]int{}, wild: map[string][]int{}}
}

func appendOnce(l []int, i int) []int {
	if n := len(l); n > 0 && l[n-1] == i {
		return l
	}
	return append(l, i)
}

// add registers rule i, which must be added in ascending order.
func (ix *index) add(i int, p hostPattern) {
	switch p.kind {
	case hostAny:
		ix.any = appendOnce(ix.any, i)
	case hostWildcard:
		ix.wild[p.value] = appendOnce(ix.wild[p.value], i)
	default:
		ix.exact[p.value] = appendOnce(ix.exact[p.value], i)
	}
}

// candidates merges the index lists for one host in rule order. It lives on
// the caller's stack; the fixed array avoids allocating for ordinary names.
type candidates struct {
	lists [][]int
	arr   [8][]int
}

// lookup fills c with the lists for host (as returned by lookupHost).
func (ix *index) lookup(host string, c *candidates) {
	c.lists = c.arr[:0]
	if host == "" {
		return
	}
	if l := ix.exact[host]; len(l) > 0 {
		c.lists = append(c.lists, l)
	}
	if len(ix.wild) > 0 && !isIPHost(host) {
		// "a.b.example.com" → "b.example.com", "example.com", "com".
		// From 1: a wildcard needs a non-empty label before the suffix.
		for i := 1; i < len(host); i++ {
			if host[i] == '.' {
				if l := ix.wild[host[i+1:]]; len(l) > 0 {
					c.lists = append(c.lists, l)
				}
			}
		}
	}
	if len(ix.any) > 0 {
		c.lists = append(c.lists, ix.any)
	}
}

// next returns the lowest rule index left, once even if several patterns
// of one rule matched.
func (c *candidates) next() (int, bool) {
	best := -1
	for _, l := range c.lists {
		if len(l) > 0 && (best < 0 || l[0] < best) {
			best = l[0]
		}
	}
	if best < 0 {
		return 0, false
	}
	for i, l := range c.lists {
		if len(l) > 0 && l[0] == best {
			c.lists[i] = l[1:]
		}
	}
	return best, true
}
