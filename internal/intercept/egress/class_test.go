package egress

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

// TestClassifyAddr is modelled on smokescreen's TestClassifyAddr: one row per
// address class, every IPv4-embedding IPv6 form, the broker's own listeners
// and the AllowCIDRs exceptions. Each row checks both Classify (the pure
// class) and Dialer.Check (the verdict with exceptions and self addresses).
func TestClassifyAddr(t *testing.T) {
	// The broker listens on 127.0.0.9:15080 (proxy) and on every address,
	// port 15090 (admin). The host has one non-loopback address, 10.9.8.7.
	guarded := New(Options{
		DenyPrivate: true,
		AllowCIDRs: []netip.Prefix{
			netip.MustParsePrefix("10.1.2.0/24"),
			netip.MustParsePrefix("127.0.0.9/32"),            // does not override self
			netip.MustParsePrefix("::ffff:198.51.100.7/128"), // mapped form of an IPv4 exception
			netip.MustParsePrefix("64:ff9b::a00:5/128"),      // explicit NAT64 exception
		},
		SelfAddrs: []netip.AddrPort{
			netip.MustParseAddrPort("127.0.0.9:15080"),
			netip.MustParseAddrPort("0.0.0.0:15090"),
		},
	})
	guarded.localAddrs = func() ([]netip.Addr, error) {
		return []netip.Addr{netip.MustParseAddr("10.9.8.7"), netip.MustParseAddr("fe80::42")}, nil
	}
	open := New(Options{
		DenyPrivate: false,
		SelfAddrs:   []netip.AddrPort{netip.MustParseAddrPort("[::]:15090")},
	})
	open.localAddrs = guarded.localAddrs

	const allowed Class = "" // Check returns nil
	tests := []struct {
		name  string
		addr  string // ip:port
		class Class  // Classify(ip)
		deny  Class  // class of the *DeniedError from Check, or allowed
		d     *Dialer
	}{
		// public
		{"public v4", "8.8.8.8:443", ClassPublic, allowed, guarded},
		{"public v4 edge above 172.16/12", "172.32.0.1:443", ClassPublic, allowed, guarded},
		{"public v4 edge below cgnat", "100.63.255.255:443", ClassPublic, allowed, guarded},
		{"public v4 edge above cgnat", "100.128.0.0:443", ClassPublic, allowed, guarded},
		{"public v4 edge below link-local", "169.253.255.255:443", ClassPublic, allowed, guarded},
		{"public v6", "[2606:4700:4700::1111]:443", ClassPublic, allowed, guarded},
		{"public v6 other", "[2a00:1450:4001:80b::200e]:443", ClassPublic, allowed, guarded},
		// loopback
		{"loopback", "127.0.0.1:443", ClassLoopback, ClassLoopback, guarded},
		{"loopback top", "127.255.255.254:443", ClassLoopback, ClassLoopback, guarded},
		{"loopback v6", "[::1]:443", ClassLoopback, ClassLoopback, guarded},
		// RFC 1918
		{"private 10/8", "10.0.0.1:443", ClassPrivate, ClassPrivate, guarded},
		{"private 172.16/12", "172.16.0.1:443", ClassPrivate, ClassPrivate, guarded},
		{"private 172.16/12 top", "172.31.255.255:443", ClassPrivate, ClassPrivate, guarded},
		{"private 192.168/16", "192.168.1.1:443", ClassPrivate, ClassPrivate, guarded},
		// link-local and metadata
		{"metadata", "169.254.169.254:80", ClassLinkLocal, ClassLinkLocal, guarded},
		{"link-local v4", "169.254.0.1:443", ClassLinkLocal, ClassLinkLocal, guarded},
		{"link-local v6", "[fe80::1]:443", ClassLinkLocal, ClassLinkLocal, guarded},
		{"link-local v6 zone", "[fe80::1%eth0]:443", ClassLinkLocal, ClassLinkLocal, guarded},
		// CGNAT
		{"cgnat", "100.64.0.1:443", ClassCGNAT, ClassCGNAT, guarded},
		{"cgnat top", "100.127.255.255:443", ClassCGNAT, ClassCGNAT, guarded},
		// unspecified / this network
		{"unspecified v4", "0.0.0.0:443", ClassUnspecified, ClassUnspecified, guarded},
		{"this network 0/8", "0.1.2.3:443", ClassUnspecified, ClassUnspecified, guarded},
		{"unspecified v6", "[::]:443", ClassUnspecified, ClassUnspecified, guarded},
		// ULA, site-local
		{"ula", "[fc00::1]:443", ClassULA, ClassULA, guarded},
		{"ula aws imds v6", "[fd00:ec2::254]:80", ClassULA, ClassULA, guarded},
		{"site-local", "[fec0::1]:443", ClassSiteLocal, ClassSiteLocal, guarded},
		// multicast, broadcast
		{"multicast v4", "224.0.0.1:443", ClassMulticast, ClassMulticast, guarded},
		{"multicast ssdp", "239.255.255.250:1900", ClassMulticast, ClassMulticast, guarded},
		{"multicast v6", "[ff02::1]:443", ClassMulticast, ClassMulticast, guarded},
		{"broadcast", "255.255.255.255:443", ClassBroadcast, ClassBroadcast, guarded},
		// reserved
		{"reserved 240/4", "240.0.0.1:443", ClassReserved, ClassReserved, guarded},
		{"ietf 192.0.0/24", "192.0.0.1:443", ClassReserved, ClassReserved, guarded},
		{"ietf nat64 discovery", "192.0.0.170:443", ClassReserved, ClassReserved, guarded},
		{"6to4 relay anycast", "192.88.99.1:443", ClassReserved, ClassReserved, guarded},
		{"discard-only v6", "[100::1]:443", ClassReserved, ClassReserved, guarded},
		{"ipv4-compatible v6", "[::127.0.0.1]:443", ClassReserved, ClassReserved, guarded},
		{"srv6 sid", "[5f00::1]:443", ClassReserved, ClassReserved, guarded},
		{"orchid v2", "[2001:20::1]:443", ClassReserved, ClassReserved, guarded},
		// benchmarking, documentation
		{"benchmarking", "198.18.0.1:443", ClassBenchmarking, ClassBenchmarking, guarded},
		{"benchmarking top", "198.19.255.255:443", ClassBenchmarking, ClassBenchmarking, guarded},
		{"benchmarking v6", "[2001:2::1]:443", ClassBenchmarking, ClassBenchmarking, guarded},
		{"test-net-1", "192.0.2.1:443", ClassDocumentation, ClassDocumentation, guarded},
		{"test-net-2", "198.51.100.1:443", ClassDocumentation, ClassDocumentation, guarded},
		{"test-net-3", "203.0.113.1:443", ClassDocumentation, ClassDocumentation, guarded},
		{"documentation v6", "[2001:db8::1]:443", ClassDocumentation, ClassDocumentation, guarded},
		{"documentation v6 3fff", "[3fff::1]:443", ClassDocumentation, ClassDocumentation, guarded},
		// IPv4-mapped: classified by the embedded IPv4
		{"mapped loopback", "[::ffff:127.0.0.1]:443", ClassLoopback, ClassLoopback, guarded},
		{"mapped metadata", "[::ffff:169.254.169.254]:80", ClassLinkLocal, ClassLinkLocal, guarded},
		{"mapped private", "[::ffff:10.0.0.1]:443", ClassPrivate, ClassPrivate, guarded},
		{"mapped public", "[::ffff:8.8.8.8]:443", ClassPublic, allowed, guarded},
		// NAT64
		{"nat64 loopback", "[64:ff9b::7f00:1]:443", ClassNAT64, ClassNAT64, guarded},
		{"nat64 metadata", "[64:ff9b::a9fe:a9fe]:443", ClassNAT64, ClassNAT64, guarded},
		{"nat64 public", "[64:ff9b::808:808]:443", ClassPublic, allowed, guarded},
		{"nat64 local-use", "[64:ff9b:1::a00:1]:443", ClassNAT64, ClassNAT64, guarded},
		{"nat64 local-use public v4", "[64:ff9b:1::808:808]:443", ClassNAT64, ClassNAT64, guarded},
		// 6to4, Teredo
		{"6to4 loopback", "[2002:7f00:1::1]:443", Class6to4, Class6to4, guarded},
		{"6to4 metadata", "[2002:a9fe:a9fe::1]:443", Class6to4, Class6to4, guarded},
		{"6to4 public", "[2002:808:808::1]:443", ClassPublic, allowed, guarded},
		{"teredo", "[2001:0:4136:e378:8000:63bf:3fff:fdd2]:443", ClassTeredo, ClassTeredo, guarded},
		// AllowCIDRs exceptions
		{"allowed private", "10.1.2.3:443", ClassPrivate, allowed, guarded},
		{"private outside exception", "10.1.3.1:443", ClassPrivate, ClassPrivate, guarded},
		{"allowed loopback other port", "127.0.0.9:8443", ClassLoopback, allowed, guarded},
		{"mapped exception matches v4", "198.51.100.7:443", ClassDocumentation, allowed, guarded},
		{"mapped exception matches mapped", "[::ffff:198.51.100.7]:443", ClassDocumentation, allowed, guarded},
		{"nat64 exception", "[64:ff9b::a00:5]:443", ClassNAT64, allowed, guarded},
		{"nat64 not excepted via v4", "[64:ff9b::a01:203]:443", ClassNAT64, ClassNAT64, guarded},
		// the broker's own listeners
		{"self proxy listener despite allow", "127.0.0.9:15080", ClassLoopback, ClassSelf, guarded},
		{"self mapped", "[::ffff:127.0.0.9]:15080", ClassLoopback, ClassSelf, guarded},
		{"self wildcard loopback", "127.0.0.5:15090", ClassLoopback, ClassSelf, guarded},
		{"self wildcard unspecified", "0.0.0.0:15090", ClassUnspecified, ClassSelf, guarded},
		{"self wildcard v6 loopback", "[::1]:15090", ClassLoopback, ClassSelf, guarded},
		{"self wildcard interface address", "10.9.8.7:15090", ClassPrivate, ClassSelf, guarded},
		{"self wildcard interface v6 zone", "[fe80::42%eth0]:15090", ClassLinkLocal, ClassSelf, guarded},
		{"self port on remote public", "8.8.8.8:15090", ClassPublic, allowed, guarded},
		// DenyPrivate off: only self is refused
		{"open private", "10.0.0.1:443", ClassPrivate, allowed, open},
		{"open metadata", "169.254.169.254:80", ClassLinkLocal, allowed, open},
		{"open self v4 on v6 wildcard", "127.0.0.1:15090", ClassLoopback, ClassSelf, open},
		{"open self interface", "10.9.8.7:15090", ClassPrivate, ClassSelf, open},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ap := netip.MustParseAddrPort(tt.addr)
			if got := Classify(ap.Addr()); got != tt.class {
				t.Errorf("Classify(%s) = %q, want %q", ap.Addr(), got, tt.class)
			}
			err := tt.d.Check(ap)
			if tt.deny == allowed {
				if err != nil {
					t.Fatalf("Check(%s) = %v, want allowed", ap, err)
				}
				return
			}
			var de *DeniedError
			if !errors.As(err, &de) || !errors.Is(err, ErrDenied) {
				t.Fatalf("Check(%s) = %v, want a *DeniedError wrapping ErrDenied", ap, err)
			}
			if de.Class != tt.deny {
				t.Errorf("Check(%s) class = %q, want %q", ap, de.Class, tt.deny)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "egress: ") || !strings.Contains(msg, string(tt.deny)) || !strings.Contains(msg, ap.String()) {
				t.Errorf("message %q must start with \"egress: \" and name the class and %s", msg, ap)
			}
		})
	}
}

func TestClassifyInvalid(t *testing.T) {
	if got := Classify(netip.Addr{}); got != ClassInvalid {
		t.Fatalf("Classify(zero) = %q", got)
	}
	if err := New(Options{DenyPrivate: true}).Check(netip.AddrPort{}); !errors.Is(err, ErrDenied) {
		t.Fatalf("Check(zero) = %v, want denied", err)
	}
	if err := New(Options{}).Check(netip.AddrPort{}); !errors.Is(err, ErrDenied) {
		t.Fatalf("Check(zero) without DenyPrivate = %v, want denied", err)
	}
}

func TestSelfCheckFailsClosed(t *testing.T) {
	d := New(Options{DenyPrivate: false, SelfAddrs: []netip.AddrPort{netip.MustParseAddrPort("0.0.0.0:15080")}})
	d.localAddrs = func() ([]netip.Addr, error) { return nil, errors.New("netlink unavailable") }
	if err := d.Check(netip.MustParseAddrPort("8.8.8.8:15080")); !errors.Is(err, ErrDenied) {
		t.Fatalf("unknown local addresses must refuse the listen port, got %v", err)
	}
	if err := d.Check(netip.MustParseAddrPort("8.8.8.8:443")); err != nil {
		t.Fatalf("other ports are unaffected, got %v", err)
	}
}

func TestSelfPortZeroMatchesEveryPort(t *testing.T) {
	d := New(Options{SelfAddrs: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.9:0")}})
	for _, p := range []string{"192.0.2.9:1", "192.0.2.9:443", "[::ffff:192.0.2.9]:65535"} {
		if err := d.Check(netip.MustParseAddrPort(p)); !errors.Is(err, ErrDenied) {
			t.Errorf("Check(%s) = %v, want self denied", p, err)
		}
	}
}

// TestClassifyMatchesStdlib cross-checks the hand-written ranges against the
// predicates of net/netip on a sample of boundary addresses.
func TestClassifyMatchesStdlib(t *testing.T) {
	for _, s := range []string{
		"0.0.0.0", "9.255.255.255", "10.0.0.0", "10.255.255.255", "11.0.0.0", "126.255.255.255",
		"127.0.0.0", "128.0.0.0", "169.254.0.0", "169.254.255.255", "172.15.255.255", "172.16.0.0",
		"192.167.255.255", "192.168.0.0", "192.169.0.0", "223.255.255.255", "224.0.0.0", "239.255.255.255",
		"::", "::1", "::2", "fc00::", "fdff:ffff::", "fe00::", "fe80::", "febf::", "ff00::", "2000::", "3fff:ffff::",
	} {
		a := netip.MustParseAddr(s)
		c := Classify(a)
		check := func(pred bool, want Class) {
			t.Helper()
			if pred && c != want {
				t.Errorf("Classify(%s) = %q, netip says %q", a, c, want)
			}
		}
		check(a.IsLoopback(), ClassLoopback)
		check(a.IsUnspecified(), ClassUnspecified)
		check(a.IsLinkLocalUnicast(), ClassLinkLocal)
		check(a.IsMulticast(), ClassMulticast)
		check(a.Is4() && a.IsPrivate(), ClassPrivate)
		check(a.Is6() && a.IsPrivate(), ClassULA)
		if c == ClassPublic && !a.IsGlobalUnicast() {
			t.Errorf("Classify(%s) = public but netip says not global unicast", a)
		}
	}
}
