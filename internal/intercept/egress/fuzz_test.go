package egress

import (
	"net/netip"
	"testing"
)

// FuzzClassify: Classify never panics, ignores zones, and an IPv4-mapped
// address classifies exactly as the IPv4 it embeds; Check agrees with
// Classify when no exception applies.
func FuzzClassify(f *testing.F) {
	for _, s := range []string{
		"127.0.0.1", "10.0.0.1", "169.254.169.254", "8.8.8.8", "::1", "::ffff:127.0.0.1",
		"64:ff9b::a9fe:a9fe", "2002:7f00:1::", "2001::1", "fe80::1", "255.255.255.255",
	} {
		a := netip.MustParseAddr(s)
		b := a.AsSlice()
		f.Add(b, uint16(443))
	}
	d := New(Options{DenyPrivate: true})
	f.Fuzz(func(t *testing.T, b []byte, port uint16) {
		a, ok := netip.AddrFromSlice(b)
		c := Classify(a)
		if !ok {
			if c != ClassInvalid {
				t.Fatalf("Classify(invalid) = %q", c)
			}
			return
		}
		if a.Is4() {
			mapped := netip.AddrFrom16(a.As16())
			if got := Classify(mapped); got != c {
				t.Fatalf("Classify(%s) = %q but Classify(%s) = %q", mapped, got, a, c)
			}
		}
		if a.Is4In6() {
			if got := Classify(a.Unmap()); got != c {
				t.Fatalf("Classify(%s) = %q but embedded %s = %q", a, c, a.Unmap(), got)
			}
		}
		if a.Is6() {
			if got := Classify(a.WithZone("eth0")); got != c {
				t.Fatalf("zone changed the class of %s: %q vs %q", a, got, c)
			}
		}
		err := d.Check(netip.AddrPortFrom(a, port))
		if (c == ClassPublic) != (err == nil) {
			t.Fatalf("Check(%s) = %v but Classify = %q", a, err, c)
		}
	})
}
