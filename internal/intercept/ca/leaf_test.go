package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func mustSerial(t testing.TB) *big.Int {
	s, err := randomSerial()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func caSubject(cn string) pkix.Name { return pkix.Name{CommonName: cn} }

func verifyLeaf(t *testing.T, c *CA, leaf *x509.Certificate, host string, now time.Time) {
	t.Helper()
	if err := verifyErr(c, leaf, host, now); err != nil {
		t.Fatalf("leaf for %q does not verify against the CA: %v", host, err)
	}
}

func verifyErr(c *CA, leaf *x509.Certificate, host string, now time.Time) error {
	roots := x509.NewCertPool()
	roots.AddCert(c.Certificate())
	_, err := leaf.Verify(x509.VerifyOptions{
		DNSName:     host,
		Roots:       roots,
		CurrentTime: now,
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	return err
}

func testCA(t testing.TB, permit []string, clock *fakeClock) *CA {
	t.Helper()
	var c *CA
	var err error
	if permit == nil {
		c, err = Ephemeral("", clock)
	} else {
		domains, perr := normalizePermit(permit)
		if perr != nil {
			t.Fatal(perr)
		}
		c, err = newCA(clock.Now(), initValidity, domains)
	}
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// T-C3: leaf lifetime, key type, SAN and verification.
func TestLeafProperties(t *testing.T) {
	clock := newFakeClock()
	c := testCA(t, nil, clock)
	now := clock.Now()
	for _, tc := range []struct {
		name     string
		lifetime time.Duration
		host     string
		wantLife time.Duration
	}{
		{"default lifetime", 0, "api.example.com", 24 * time.Hour},
		{"over max clamped", 72 * time.Hour, "api.example.com", 24 * time.Hour},
		{"short", time.Hour, "api.example.com", time.Hour},
		{"ipv4", 0, "192.0.2.10", 24 * time.Hour},
		{"ipv6", 0, "2001:db8::1", 24 * time.Hour},
		{"underscore", 0, "svc_a.internal.example", 24 * time.Hour},
		{"long name", 0, strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + ".example", 24 * time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := c.Leaves(LeafOptions{Lifetime: tc.lifetime, Clock: clock}).Get(tc.host)
			if err != nil {
				t.Fatal(err)
			}
			leaf := got.Leaf
			if leaf == nil {
				t.Fatal("Leaf field not populated")
			}
			if len(got.Certificate) != 1 {
				t.Errorf("chain has %d certificates, want 1 (root CA not sent)", len(got.Certificate))
			}
			if leaf.NotAfter.Sub(now) != tc.wantLife || leaf.NotAfter.Sub(now) > MaxLeafLifetime {
				t.Errorf("NotAfter = now+%v, want now+%v", leaf.NotAfter.Sub(now), tc.wantLife)
			}
			if now.Sub(leaf.NotBefore) != 5*time.Minute {
				t.Errorf("NotBefore = now-%v, want now-5m", now.Sub(leaf.NotBefore))
			}
			pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
			if !ok || pub.Curve != elliptic.P256() {
				t.Errorf("leaf key %T, want ECDSA P-256", leaf.PublicKey)
			}
			priv, ok := got.PrivateKey.(*ecdsa.PrivateKey)
			if !ok || !priv.PublicKey.Equal(leaf.PublicKey) {
				t.Error("PrivateKey does not match the leaf")
			}
			if ip, err := netip.ParseAddr(tc.host); err == nil {
				if len(leaf.DNSNames) != 0 || len(leaf.IPAddresses) != 1 || !leaf.IPAddresses[0].Equal(ip.AsSlice()) {
					t.Errorf("SANs DNS=%v IP=%v, want only IP %s", leaf.DNSNames, leaf.IPAddresses, ip)
				}
			} else if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != tc.host || len(leaf.IPAddresses) != 0 {
				t.Errorf("SANs DNS=%v IP=%v, want only %q", leaf.DNSNames, leaf.IPAddresses, tc.host)
			}
			if len(leaf.EmailAddresses)+len(leaf.URIs) != 0 {
				t.Error("unexpected email/URI SANs")
			}
			if len(leaf.ExtKeyUsage) != 1 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || leaf.IsCA {
				t.Errorf("ExtKeyUsage=%v IsCA=%v", leaf.ExtKeyUsage, leaf.IsCA)
			}
			if leaf.SerialNumber.Sign() <= 0 || leaf.SerialNumber.BitLen() > 128 {
				t.Errorf("serial %v is not a positive 128-bit number", leaf.SerialNumber)
			}
			verifyLeaf(t, c, leaf, tc.host, now)
			if err := verifyErr(c, leaf, "other.example.com", now); err == nil {
				t.Error("leaf verifies for another name")
			}
			if err := verifyErr(c, leaf, tc.host, now.Add(tc.wantLife+time.Second)); err == nil {
				t.Error("leaf verifies after its lifetime")
			}
		})
	}

	t.Run("fresh key and serial per leaf", func(t *testing.T) {
		l := c.Leaves(LeafOptions{Clock: clock})
		a, _ := l.Get("a.example")
		b, _ := l.Get("b.example")
		if a.Leaf.SerialNumber.Cmp(b.Leaf.SerialNumber) == 0 {
			t.Error("serials repeat")
		}
		if a.PrivateKey.(*ecdsa.PrivateKey).Equal(b.PrivateKey) {
			t.Error("leaf keys are shared")
		}
	})

	t.Run("tls handshake", func(t *testing.T) {
		cert, err := c.Leaves(LeafOptions{}).Get("handshake.example")
		if err != nil {
			t.Fatal(err)
		}
		roots := x509.NewCertPool()
		roots.AddCert(c.Certificate())
		cc, sc := net.Pipe()
		defer cc.Close()
		defer sc.Close()
		srv := tls.Server(sc, &tls.Config{Certificates: []tls.Certificate{*cert}})
		done := make(chan error, 1)
		go func() { done <- srv.Handshake() }()
		cli := tls.Client(cc, &tls.Config{RootCAs: roots, ServerName: "handshake.example"})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := cli.HandshakeContext(ctx); err != nil {
			t.Fatalf("client handshake: %v", err)
		}
		if err := <-done; err != nil {
			t.Fatalf("server handshake: %v", err)
		}
	})
}

// T-C3: with --permit, the CA refuses to mint outside the permitted
// domains, and a leaf forged for such a name anyway fails x509 verification
// because the CA's name constraints are critical.
func TestCANameConstraints(t *testing.T) {
	clock := newFakeClock()
	dir := t.TempDir()
	if err := Init(dir, []string{"Example.COM.", ".internal.example.org"}, clock); err != nil {
		t.Fatal(err)
	}
	c := mustLoad(t, dir+"/"+CertFile, dir+"/"+KeyFile)
	cert := c.Certificate()
	if got := strings.Join(cert.PermittedDNSDomains, ","); got != "example.com,.internal.example.org" {
		t.Fatalf("PermittedDNSDomains = %q", got)
	}
	if !cert.PermittedDNSDomainsCritical {
		t.Fatal("name constraints not critical")
	}
	for _, e := range cert.Extensions {
		if e.Id.String() == "2.5.29.30" && !e.Critical {
			t.Fatal("nameConstraints extension not marked critical")
		}
	}
	if len(cert.ExcludedIPRanges) != 2 {
		t.Fatalf("ExcludedIPRanges = %v, want all of IPv4 and IPv6", cert.ExcludedIPRanges)
	}

	var mints atomic.Int64
	l := c.Leaves(LeafOptions{Clock: clock, OnMint: func() { mints.Add(1) }})
	for _, tc := range []struct {
		host string
		ok   bool
	}{
		{"example.com", true},
		{"api.example.com", true},
		{"a.b.example.com", true},
		{"db.internal.example.org", true},
		{"internal.example.org", false}, // leading dot: subdomains only
		{"evil.org", false},
		{"notexample.com", false},
		{"example.com.evil.org", false},
		{"example.org", false},
		{"10.0.0.1", false},
		{"93.184.216.34", false},
		{"2606:4700::1", false},
	} {
		t.Run(tc.host, func(t *testing.T) {
			before := mints.Load()
			got, err := l.Get(tc.host)
			if tc.ok {
				if err != nil {
					t.Fatalf("Get: %v", err)
				}
				verifyLeaf(t, c, got.Leaf, tc.host, clock.Now())
				return
			}
			if !errors.Is(err, ErrNotPermitted) || !strings.Contains(err.Error(), tc.host) {
				t.Fatalf("Get = %v, want ErrNotPermitted naming the host", err)
			}
			if mints.Load() != before {
				t.Fatal("a refused host was minted")
			}
			// Bypass the refusal: clients reject the forged leaf.
			key, ip, err := normalizeHost(tc.host)
			if err != nil {
				t.Fatal(err)
			}
			forged, _, err := l.mint(key, ip)
			if err != nil {
				t.Fatal(err)
			}
			verr := verifyErr(c, forged.Leaf, tc.host, clock.Now())
			var inv x509.CertificateInvalidError
			if !errors.As(verr, &inv) || inv.Reason != x509.CANotAuthorizedForThisName {
				t.Fatalf("forged leaf: Verify = %v, want CANotAuthorizedForThisName", verr)
			}
		})
	}
}

// T-C3: bounded LRU, cache TTL shorter than the leaf lifetime, key = the
// normalised host.
func TestLeafCacheBounded(t *testing.T) {
	clock := newFakeClock()
	c := testCA(t, nil, clock)
	var mints, hits atomic.Int64
	l := c.Leaves(LeafOptions{
		MaxEntries: 3,
		Clock:      clock,
		OnMint:     func() { mints.Add(1) },
		OnHit:      func() { hits.Add(1) },
	})
	get := func(h string) *tls.Certificate {
		t.Helper()
		cert, err := l.Get(h)
		if err != nil {
			t.Fatalf("Get(%q): %v", h, err)
		}
		return cert
	}
	expect := func(step string, wantMints, wantHits int64) {
		t.Helper()
		if mints.Load() != wantMints || hits.Load() != wantHits {
			t.Fatalf("%s: mints=%d hits=%d, want %d and %d", step, mints.Load(), hits.Load(), wantMints, wantHits)
		}
	}

	t.Run("lru cap", func(t *testing.T) {
		a := get("a.example")
		get("b.example")
		get("c.example")
		expect("three hosts", 3, 0)
		if get("a.example") != a {
			t.Fatal("cached leaf not reused")
		}
		expect("hit a", 3, 1)
		get("d.example") // evicts b, the least recently used
		if l.Len() != 3 {
			t.Fatalf("Len = %d, want 3", l.Len())
		}
		expect("d evicts b", 4, 1)
		get("a.example")
		get("c.example")
		expect("a and c still cached", 4, 3)
		get("b.example")
		expect("b re-minted", 5, 3)
	})

	t.Run("key normalised", func(t *testing.T) {
		m, h := mints.Load(), hits.Load()
		x := get("Norm.Example.")
		for _, spelling := range []string{"norm.example", "NORM.EXAMPLE", "norm.example."} {
			if get(spelling) != x {
				t.Fatalf("%q did not share the cache entry", spelling)
			}
		}
		expect("spellings", m+1, h+3)
		if x.Leaf.DNSNames[0] != "norm.example" {
			t.Fatalf("SAN %q not normalised", x.Leaf.DNSNames[0])
		}
		v4 := get("192.0.2.7")
		if get("::ffff:192.0.2.7") != v4 || get("[::ffff:192.0.2.7]") != v4 {
			t.Fatal("IPv4-mapped spelling did not share the IPv4 entry")
		}
		v6 := get("[2001:DB8::0:1]")
		if get("2001:db8::1") != v6 {
			t.Fatal("IPv6 spellings did not share an entry")
		}
	})

	t.Run("ttl shorter than leaf life", func(t *testing.T) {
		first := get("ttl.example")
		life := first.Leaf.NotAfter.Sub(clock.Now())
		if life != MaxLeafLifetime {
			t.Fatalf("life %v", life)
		}
		m := mints.Load()
		clock.Advance(18*time.Hour - time.Second) // still before NotAfter - 6h
		if get("ttl.example") != first {
			t.Fatal("leaf with more than a quarter of its life left was not reused")
		}
		clock.Advance(time.Second) // now == NotAfter - Lifetime/4
		second := get("ttl.example")
		if second == first || mints.Load() != m+1 {
			t.Fatal("leaf reused past NotAfter - Lifetime/4")
		}
		if left := second.Leaf.NotAfter.Sub(clock.Now()); left != MaxLeafLifetime {
			t.Fatalf("re-minted leaf has %v left", left)
		}
		// Every leaf served has at least Lifetime/4 left and verifies now.
		verifyLeaf(t, c, second.Leaf, "ttl.example", clock.Now())
	})
}

// Concurrent Gets for one host mint exactly once.
func TestLeafConcurrentSingleMint(t *testing.T) {
	clock := newFakeClock()
	c := testCA(t, nil, clock)
	var mints, hits atomic.Int64
	l := c.Leaves(LeafOptions{Clock: clock, OnMint: func() { mints.Add(1) }, OnHit: func() { hits.Add(1) }})
	const n = 64
	var wg sync.WaitGroup
	start := make(chan struct{})
	certs := make([]*tls.Certificate, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			host := "same.example"
			if i%2 == 1 {
				host = "SAME.example." // another spelling of the same key
			}
			certs[i], errs[i] = l.Get(host)
		}()
	}
	close(start)
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if certs[i] != certs[0] {
			t.Fatal("callers received different leaves")
		}
	}
	if mints.Load() != 1 || hits.Load() != n-1 {
		t.Fatalf("mints=%d hits=%d, want 1 and %d", mints.Load(), hits.Load(), n-1)
	}

	// Distinct hosts concurrently: one mint each.
	mints.Store(0)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := l.Get(fmt.Sprintf("h%d.example", i%8)); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if mints.Load() != 8 {
		t.Fatalf("mints = %d for 8 hosts", mints.Load())
	}
}

func TestLeafRefusesBadHosts(t *testing.T) {
	clock := newFakeClock()
	var mints atomic.Int64
	l := testCA(t, nil, clock).Leaves(LeafOptions{Clock: clock, OnMint: func() { mints.Add(1) }})
	for _, h := range []string{
		"", ".", "*", "*.example.com", "a..b", "exa mple.com", "example.com:443", "[::1]:443",
		"fe80::1%eth0", "127.1", "1.2.3.256", "host/path", "ünïcode.example", strings.Repeat("a", 64) + ".example",
		strings.Repeat("abcdefghi.", 26) + "com", "-\x00.example", "[example.com]", "[192.0.2.1]",
	} {
		t.Run(h, func(t *testing.T) {
			_, err := l.Get(h)
			if !errors.Is(err, ErrInvalidHost) || !strings.HasPrefix(err.Error(), "ca: ") {
				t.Fatalf("Get(%q) = %v, want ErrInvalidHost", h, err)
			}
		})
	}
	if mints.Load() != 0 {
		t.Fatalf("%d leaves minted for invalid hosts", mints.Load())
	}
}

// A leaf never outlives its CA; an expired CA mints nothing.
func TestLeafClampedToCA(t *testing.T) {
	clock := newFakeClock()
	c := testCA(t, nil, clock)
	l := c.Leaves(LeafOptions{Clock: clock})
	caEnd := c.Certificate().NotAfter
	clock.Advance(caEnd.Sub(clock.Now()) - time.Hour)
	got, err := l.Get("late.example")
	if err != nil {
		t.Fatal(err)
	}
	if !got.Leaf.NotAfter.Equal(caEnd) {
		t.Fatalf("leaf NotAfter %v, CA NotAfter %v", got.Leaf.NotAfter, caEnd)
	}
	clock.Advance(2 * time.Hour)
	if _, err := l.Get("later.example"); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired CA minted: %v", err)
	}
}

// Names that are fine for permits() agree with crypto/x509's verdict.
func TestPermitsMatchesX509(t *testing.T) {
	clock := newFakeClock()
	c := testCA(t, []string{"example.com", ".corp.example.net", "a_b.example.org"}, clock)
	l := c.Leaves(LeafOptions{Clock: clock})
	for _, h := range []string{
		"example.com", "x.example.com", "xexample.com", "corp.example.net", "a.corp.example.net",
		"a_b.example.org", "c.a_b.example.org", "b.example.org", "com", "example.com0",
	} {
		key, ip, err := normalizeHost(h)
		if err != nil {
			t.Fatal(err)
		}
		leaf, _, err := l.mint(key, ip)
		if err != nil {
			t.Fatal(err)
		}
		x509OK := verifyErr(c, leaf.Leaf, h, clock.Now()) == nil
		if got := c.permits(key, ip); got != x509OK {
			t.Errorf("%s: permits=%v, x509 verify ok=%v", h, got, x509OK)
		}
	}
}

func BenchmarkLeafMint(b *testing.B) {
	clock := newFakeClock()
	c := testCA(b, nil, clock)
	l := c.Leaves(LeafOptions{MaxEntries: 1, Clock: clock})
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, err := l.Get(fmt.Sprintf("h%d.example.com", i)); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkLeafHit(b *testing.B) {
	clock := newFakeClock()
	c := testCA(b, nil, clock)
	l := c.Leaves(LeafOptions{Clock: clock})
	if _, err := l.Get("hit.example.com"); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := l.Get("hit.example.com"); err != nil {
			b.Fatal(err)
		}
	}
}
