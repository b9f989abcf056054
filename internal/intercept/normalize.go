package intercept

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"golang.org/x/net/idna"
)

// errBadHost is wrapped by every host normalisation failure.
var errBadHost = errors.New("intercept: bad host")

// idnaProfile converts names to the ASCII form a resolver and a rule see.
// Lookup applies the mapping browsers use, so a homograph ends up as its
// punycode, never as the Latin name it imitates.
var idnaProfile = idna.Lookup

// NormalizeHost returns the one spelling of a host that rules match and the
// dialer dials: lower case, no trailing dot, IDN as punycode, IPv6 without
// brackets or zone, IPv4-mapped IPv6 as IPv4, and every legacy IPv4 spelling
// (127.1, 2130706433, 0x7f.1, 0177.0.0.1) as a dotted quad. Anything else
// that is not a plain DNS name is an error.
func NormalizeHost(h string) (string, error) {
	if h == "" {
		return "", fmt.Errorf("%w: empty", errBadHost)
	}
	if len(h) > 255 {
		return "", fmt.Errorf("%w: too long", errBadHost)
	}
	if strings.HasPrefix(h, "[") {
		if !strings.HasSuffix(h, "]") {
			return "", fmt.Errorf("%w: unbalanced bracket", errBadHost)
		}
		return normalizeIPv6(h[1 : len(h)-1])
	}
	if strings.Contains(h, ":") {
		return normalizeIPv6(h)
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		if c <= ' ' || c == 0x7f || strings.IndexByte(`%@/\?#[]<>"'{}|^`+"`", c) >= 0 {
			return "", fmt.Errorf("%w: invalid character %q", errBadHost, c)
		}
	}
	h = strings.TrimSuffix(h, ".")
	if h == "" || strings.HasSuffix(h, ".") {
		return "", fmt.Errorf("%w: empty label", errBadHost)
	}
	ascii := strings.ToLower(h)
	if !isASCII(h) {
		a, err := idnaProfile.ToASCII(h)
		if err != nil {
			return "", fmt.Errorf("%w: not a valid name", errBadHost)
		}
		ascii = a
	}
	if ip, ok, err := parseLegacyIPv4(ascii); ok || err != nil {
		if err != nil {
			return "", err
		}
		return ip.String(), nil
	}
	if len(ascii) > 253 {
		return "", fmt.Errorf("%w: too long", errBadHost)
	}
	for _, label := range strings.Split(ascii, ".") {
		if label == "" || len(label) > 63 {
			return "", fmt.Errorf("%w: bad label length", errBadHost)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return "", fmt.Errorf("%w: invalid character %q", errBadHost, c)
			}
		}
	}
	return ascii, nil
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

func normalizeIPv6(s string) (string, error) {
	if strings.Contains(s, "%") {
		return "", fmt.Errorf("%w: IPv6 zones are not allowed", errBadHost)
	}
	a, err := netip.ParseAddr(s)
	if err != nil || !a.Is6() {
		return "", fmt.Errorf("%w: not an IPv6 address", errBadHost)
	}
	return a.Unmap().String(), nil
}

// parseLegacyIPv4 follows the WHATWG URL host parser: when the last label is
// numeric the whole name must be an inet_aton-style IPv4 address (1 to 4
// parts, each decimal, 0x-hex or 0-octal) or it is rejected. This is what a
// C resolver would dial, so rules and the SSRF guard must see it too.
func parseLegacyIPv4(h string) (netip.Addr, bool, error) {
	parts := strings.Split(h, ".")
	if !isNumericPart(parts[len(parts)-1]) {
		return netip.Addr{}, false, nil
	}
	if len(parts) > 4 {
		return netip.Addr{}, false, fmt.Errorf("%w: malformed IPv4 address", errBadHost)
	}
	nums := make([]uint64, len(parts))
	for i, p := range parts {
		n, err := parseIPv4Part(p)
		if err != nil {
			return netip.Addr{}, false, fmt.Errorf("%w: malformed IPv4 address", errBadHost)
		}
		nums[i] = n
	}
	var v uint64
	for i, n := range nums[:len(nums)-1] {
		if n > 255 {
			return netip.Addr{}, false, fmt.Errorf("%w: malformed IPv4 address", errBadHost)
		}
		v |= n << (8 * uint(3-i))
	}
	last := nums[len(nums)-1]
	if last >= 1<<(8*uint(5-len(nums))) {
		return netip.Addr{}, false, fmt.Errorf("%w: malformed IPv4 address", errBadHost)
	}
	v |= last
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), true, nil
}

func isNumericPart(p string) bool {
	if p == "" {
		return false
	}
	if strings.HasPrefix(p, "0x") {
		for _, c := range p[2:] {
			if !strings.ContainsRune("0123456789abcdef", c) {
				return false
			}
		}
		return true
	}
	for _, c := range p {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

func parseIPv4Part(p string) (uint64, error) {
	switch {
	case p == "":
		return 0, errBadHost
	case strings.HasPrefix(p, "0x"):
		if len(p) == 2 {
			return 0, nil
		}
		return strconv.ParseUint(p[2:], 16, 32)
	case len(p) > 1 && p[0] == '0':
		return strconv.ParseUint(p[1:], 8, 32)
	default:
		return strconv.ParseUint(p, 10, 32)
	}
}

// SplitHostPort normalises an authority ("host", "host:port", "[v6]:port").
// A missing port takes defaultPort; a port must be 1..65535.
func SplitHostPort(authority string, defaultPort int) (string, int, error) {
	host, portStr := authority, ""
	if strings.HasPrefix(authority, "[") {
		end := strings.IndexByte(authority, ']')
		if end < 0 {
			return "", 0, fmt.Errorf("%w: unbalanced bracket", errBadHost)
		}
		host, portStr = authority[:end+1], authority[end+1:]
		if portStr != "" {
			if portStr[0] != ':' {
				return "", 0, fmt.Errorf("%w: junk after address", errBadHost)
			}
			portStr = portStr[1:]
			if portStr == "" {
				return "", 0, fmt.Errorf("%w: empty port", errBadHost)
			}
		}
	} else if i := strings.LastIndexByte(authority, ':'); i >= 0 {
		if strings.Count(authority, ":") > 1 {
			return "", 0, fmt.Errorf("%w: IPv6 address must be in brackets", errBadHost)
		}
		host, portStr = authority[:i], authority[i+1:]
		if portStr == "" {
			return "", 0, fmt.Errorf("%w: empty port", errBadHost)
		}
	}
	port := defaultPort
	if portStr != "" {
		p, err := strconv.Atoi(portStr)
		if err != nil || p < 1 || p > 65535 || portStr[0] == '+' || portStr[0] == '0' {
			return "", 0, fmt.Errorf("%w: bad port", errBadHost)
		}
		port = p
	}
	h, err := NormalizeHost(host)
	if err != nil {
		return "", 0, err
	}
	return h, port, nil
}

// joinHostPort is net.JoinHostPort for a normalised host.
func joinHostPort(host string, port int) string { return net.JoinHostPort(host, strconv.Itoa(port)) }

// hostHeader is the Host header for a normalised host: the port is omitted
// when it is the scheme's default.
func hostHeader(host string, port int, scheme string) string {
	if (scheme == "https" && port == 443) || (scheme == "http" && port == 80) {
		if strings.Contains(host, ":") {
			return "[" + host + "]"
		}
		return host
	}
	return joinHostPort(host, port)
}
