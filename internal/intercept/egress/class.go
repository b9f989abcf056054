package egress

import "net/netip"

// Class is the category of an IP address. Only ClassPublic is dialled when
// DenyPrivate is set (unless an AllowCIDRs exception applies).
type Class string

// Address classes. The string values appear in error messages and may be
// used as metric or audit labels.
const (
	ClassPublic        Class = "public"
	ClassUnspecified   Class = "unspecified"   // 0.0.0.0/8 ("this network"), ::
	ClassLoopback      Class = "loopback"      // 127.0.0.0/8, ::1
	ClassPrivate       Class = "private"       // RFC 1918
	ClassLinkLocal     Class = "link_local"    // 169.254.0.0/16 (cloud metadata), fe80::/10
	ClassCGNAT         Class = "cgnat"         // 100.64.0.0/10 (RFC 6598)
	ClassULA           Class = "ula"           // fc00::/7
	ClassSiteLocal     Class = "site_local"    // fec0::/10 (deprecated, still routed internally)
	ClassMulticast     Class = "multicast"     // 224.0.0.0/4, ff00::/8
	ClassBroadcast     Class = "broadcast"     // 255.255.255.255
	ClassReserved      Class = "reserved"      // 240/4, 192.0.0.0/24, 192.88.99.0/24, 2001::/23, IPv6 outside 2000::/3
	ClassBenchmarking  Class = "benchmarking"  // 198.18.0.0/15, 2001:2::/48
	ClassDocumentation Class = "documentation" // TEST-NET-1/2/3, 2001:db8::/32, 3fff::/20
	ClassNAT64         Class = "nat64"         // 64:ff9b::/96 embedding a non-public IPv4, and all of 64:ff9b:1::/48
	Class6to4          Class = "6to4"          // 2002::/16 embedding a non-public IPv4
	ClassTeredo        Class = "teredo"        // 2001::/32
	ClassSelf          Class = "self"          // one of the broker's own listeners (Check only)
	ClassInvalid       Class = "invalid"       // the zero netip.Addr
)

// String returns the class name.
func (c Class) String() string { return string(c) }

type classRange struct {
	p netip.Prefix
	c Class
}

// v4Ranges is checked in order; the first match wins, so more specific
// prefixes come before the ranges that contain them.
var v4Ranges = []classRange{
	{netip.MustParsePrefix("0.0.0.0/8"), ClassUnspecified},
	{netip.MustParsePrefix("10.0.0.0/8"), ClassPrivate},
	{netip.MustParsePrefix("100.64.0.0/10"), ClassCGNAT},
	{netip.MustParsePrefix("127.0.0.0/8"), ClassLoopback},
	{netip.MustParsePrefix("169.254.0.0/16"), ClassLinkLocal},
	{netip.MustParsePrefix("172.16.0.0/12"), ClassPrivate},
	{netip.MustParsePrefix("192.0.0.0/24"), ClassReserved}, // IETF protocol assignments (RFC 6890)
	{netip.MustParsePrefix("192.0.2.0/24"), ClassDocumentation},
	{netip.MustParsePrefix("192.88.99.0/24"), ClassReserved}, // 6to4 relay anycast (RFC 7526)
	{netip.MustParsePrefix("192.168.0.0/16"), ClassPrivate},
	{netip.MustParsePrefix("198.18.0.0/15"), ClassBenchmarking},
	{netip.MustParsePrefix("198.51.100.0/24"), ClassDocumentation},
	{netip.MustParsePrefix("203.0.113.0/24"), ClassDocumentation},
	{netip.MustParsePrefix("224.0.0.0/4"), ClassMulticast},
	{netip.MustParsePrefix("255.255.255.255/32"), ClassBroadcast},
	{netip.MustParsePrefix("240.0.0.0/4"), ClassReserved},
}

var (
	nat64WellKnown = netip.MustParsePrefix("64:ff9b::/96")
	sixToFour      = netip.MustParsePrefix("2002::/16")
	globalUnicast6 = netip.MustParsePrefix("2000::/3")
)

// v6Ranges is checked in order after the special cases in classify6.
var v6Ranges = []classRange{
	{netip.MustParsePrefix("64:ff9b:1::/48"), ClassNAT64}, // local-use NAT64 (RFC 8215); embedding is site-defined
	{netip.MustParsePrefix("2001::/32"), ClassTeredo},
	{netip.MustParsePrefix("2001:2::/48"), ClassBenchmarking},
	{netip.MustParsePrefix("2001::/23"), ClassReserved}, // IETF protocol assignments (ORCHID, AMT, AS112, ...)
	{netip.MustParsePrefix("2001:db8::/32"), ClassDocumentation},
	{netip.MustParsePrefix("3fff::/20"), ClassDocumentation}, // RFC 9637
	{netip.MustParsePrefix("fc00::/7"), ClassULA},
	{netip.MustParsePrefix("fe80::/10"), ClassLinkLocal},
	{netip.MustParsePrefix("fec0::/10"), ClassSiteLocal},
	{netip.MustParsePrefix("ff00::/8"), ClassMulticast},
}

// Classify returns the class of a. A zone is ignored; an IPv4-mapped IPv6
// address classifies exactly as the IPv4 address it embeds. NAT64
// (64:ff9b::/96) and 6to4 (2002::/16) addresses are ClassPublic when the
// embedded IPv4 is public and ClassNAT64 / Class6to4 otherwise. Classify is
// pure: it does not know about AllowCIDRs or the broker's own listeners (see
// Dialer.Check).
func Classify(a netip.Addr) Class {
	if !a.IsValid() {
		return ClassInvalid
	}
	a = a.WithZone("")
	if a.Is4In6() {
		a = a.Unmap()
	}
	if a.Is4() {
		return classify4(a)
	}
	return classify6(a)
}

func classify4(a netip.Addr) Class {
	for _, r := range v4Ranges {
		if r.p.Contains(a) {
			return r.c
		}
	}
	return ClassPublic
}

func classify6(a netip.Addr) Class {
	switch {
	case a == netip.IPv6Unspecified():
		return ClassUnspecified
	case a == netip.IPv6Loopback():
		return ClassLoopback
	case nat64WellKnown.Contains(a):
		b := a.As16()
		if classify4(netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})) == ClassPublic {
			return ClassPublic
		}
		return ClassNAT64
	case sixToFour.Contains(a):
		b := a.As16()
		if classify4(netip.AddrFrom4([4]byte{b[2], b[3], b[4], b[5]})) == ClassPublic {
			return ClassPublic
		}
		return Class6to4
	}
	for _, r := range v6Ranges {
		if r.p.Contains(a) {
			return r.c
		}
	}
	if !globalUnicast6.Contains(a) {
		// IPv4-compatible ::a.b.c.d, discard-only 100::/64, SRv6 5f00::/16
		// and everything IANA has not allocated for global unicast.
		return ClassReserved
	}
	return ClassPublic
}
