package ca

import (
	"container/list"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/keygate/broker/internal/broker"
)

// Leaf defaults and limits.
const (
	MaxLeafLifetime   = 24 * time.Hour
	DefaultMaxEntries = 1024
	leafBackdate      = 5 * time.Minute
)

// ErrInvalidHost is wrapped when Get is given something that is not a
// normalised host name or IP address.
var ErrInvalidHost = errors.New("ca: invalid host")

// ErrNotPermitted is wrapped when the CA's name constraints do not cover the
// host, so a leaf would be rejected by every client.
var ErrNotPermitted = errors.New("ca: host not permitted by the CA's name constraints")

// LeafOptions configures a LeafCache.
type LeafOptions struct {
	Lifetime   time.Duration // leaf validity; default and maximum 24h
	MaxEntries int           // LRU bound; default 1024
	Clock      broker.Clock  // default the system clock
	OnMint     func()        // called after each leaf minted (for keygate_mitm_leaf_cache_total{result="mint"})
	OnHit      func()        // called for each leaf served without minting
}

// LeafCache mints and caches leaf certificates signed by a CA. It is safe
// for concurrent use.
type LeafCache struct {
	ca     *CA
	life   time.Duration
	max    int
	clock  broker.Clock
	onMint func()
	onHit  func()

	flights singleflight.Group

	mu     sync.Mutex
	lru    *list.List // of *leafEntry; front is most recently used
	byHost map[string]*list.Element
}

type leafEntry struct {
	host       string
	cert       *tls.Certificate
	reuseUntil time.Time // NotAfter - Lifetime/4
}

// Leaves returns a new leaf cache for c.
func (c *CA) Leaves(o LeafOptions) *LeafCache {
	l := &LeafCache{
		ca:     c,
		life:   o.Lifetime,
		max:    o.MaxEntries,
		clock:  o.Clock,
		onMint: o.OnMint,
		onHit:  o.OnHit,
		lru:    list.New(),
		byHost: make(map[string]*list.Element),
	}
	if l.life <= 0 || l.life > MaxLeafLifetime {
		l.life = MaxLeafLifetime
	}
	if l.max <= 0 {
		l.max = DefaultMaxEntries
	}
	if l.clock == nil {
		l.clock = broker.SystemClock{}
	}
	return l
}

// Len returns the number of cached leaves.
func (l *LeafCache) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lru.Len()
}

// Get returns a leaf for host: a DNS name or an IP literal, already
// normalised by the caller (Get still lower-cases, drops one trailing dot,
// strips IPv6 brackets and unmaps IPv4-mapped addresses, so equivalent
// spellings share one entry). It mints only when no fresh cached leaf
// exists, once per host however many callers ask concurrently.
func (l *LeafCache) Get(host string) (*tls.Certificate, error) {
	key, ip, err := normalizeHost(host)
	if err != nil {
		return nil, err
	}
	if !l.ca.permits(key, ip) {
		return nil, fmt.Errorf("%w: %q", ErrNotPermitted, key)
	}
	if cert := l.lookup(key); cert != nil {
		l.hit()
		return cert, nil
	}
	minted := false
	v, err, _ := l.flights.Do(key, func() (any, error) {
		// A flight for key may have finished between lookup and Do.
		if cert := l.lookup(key); cert != nil {
			return cert, nil
		}
		cert, reuseUntil, err := l.mint(key, ip)
		if err != nil {
			return nil, err
		}
		minted = true // only the goroutine running the flight sees this
		l.store(key, cert, reuseUntil)
		return cert, nil
	})
	if err != nil {
		return nil, err
	}
	if minted {
		if l.onMint != nil {
			l.onMint()
		}
	} else {
		l.hit()
	}
	return v.(*tls.Certificate), nil
}

// Cached reports whether Get(host) would be served without minting: a
// fresh leaf is cached. The broker rate-limits only mints.
func (l *LeafCache) Cached(host string) bool {
	key, _, err := normalizeHost(host)
	return err == nil && l.lookup(key) != nil
}

func (l *LeafCache) hit() {
	if l.onHit != nil {
		l.onHit()
	}
}

func (l *LeafCache) lookup(key string) *tls.Certificate {
	now := l.clock.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	el, ok := l.byHost[key]
	if !ok {
		return nil
	}
	e := el.Value.(*leafEntry)
	if !now.Before(e.reuseUntil) {
		l.lru.Remove(el)
		delete(l.byHost, key)
		return nil
	}
	l.lru.MoveToFront(el)
	return e.cert
}

func (l *LeafCache) store(key string, cert *tls.Certificate, reuseUntil time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if el, ok := l.byHost[key]; ok {
		el.Value = &leafEntry{host: key, cert: cert, reuseUntil: reuseUntil}
		l.lru.MoveToFront(el)
		return
	}
	l.byHost[key] = l.lru.PushFront(&leafEntry{host: key, cert: cert, reuseUntil: reuseUntil})
	for l.lru.Len() > l.max {
		oldest := l.lru.Back()
		l.lru.Remove(oldest)
		delete(l.byHost, oldest.Value.(*leafEntry).host)
	}
}

// mint signs a fresh leaf for host (ip is valid for an IP literal).
func (l *LeafCache) mint(host string, ip netip.Addr) (*tls.Certificate, time.Time, error) {
	now := l.clock.Now()
	caCert := l.ca.cert
	if !now.Before(caCert.NotAfter) {
		return nil, time.Time{}, fmt.Errorf("ca: CA certificate expired at %s", caCert.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(caCert.NotBefore) {
		return nil, time.Time{}, fmt.Errorf("ca: CA certificate not valid before %s", caCert.NotBefore.UTC().Format(time.RFC3339))
	}
	notAfter := now.Add(l.life)
	if notAfter.After(caCert.NotAfter) {
		notAfter = caCert.NotAfter
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("ca: generate leaf key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, time.Time{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"keygate MITM"}},
		NotBefore:             now.Add(-leafBackdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	if len(host) <= 64 { // ub-common-name; the SAN is what clients check
		tmpl.Subject.CommonName = host
	}
	if ip.IsValid() {
		tmpl.IPAddresses = []net.IP{ip.AsSlice()}
	} else {
		tmpl.DNSNames = []string{host}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, l.ca.key)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("ca: sign leaf for %q: %w", host, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("ca: parse leaf for %q: %w", host, err)
	}
	chain := make([][]byte, 0, 1+len(l.ca.chain))
	chain = append(chain, der)
	chain = append(chain, l.ca.chain...)
	return &tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf}, notAfter.Add(-l.life / 4), nil
}

// normalizeHost returns the cache key for host and, for an IP literal, the
// address.
func normalizeHost(host string) (string, netip.Addr, error) {
	h := host
	bracketed := strings.HasPrefix(h, "[") && strings.HasSuffix(h, "]")
	if bracketed {
		h = h[1 : len(h)-1]
	}
	// Only something with a colon or ending in a digit can be an IP literal
	// (a DNS name's last label is never numeric), so the common case skips
	// the parse and its error allocation.
	if maybeIP(h) {
		if ip, err := netip.ParseAddr(h); err == nil && (!bracketed || ip.Is6()) {
			if ip.Zone() != "" {
				return "", netip.Addr{}, fmt.Errorf("%w %q: IPv6 zone", ErrInvalidHost, host)
			}
			ip = ip.Unmap()
			return ip.String(), ip, nil
		}
	}
	if bracketed {
		return "", netip.Addr{}, fmt.Errorf("%w %q: brackets around a non-IPv6 host", ErrInvalidHost, host)
	}
	h = strings.ToLower(strings.TrimSuffix(h, "."))
	if err := validDNSName(h); err != nil {
		return "", netip.Addr{}, fmt.Errorf("%w %q: %v", ErrInvalidHost, host, err)
	}
	return h, netip.Addr{}, nil
}

func maybeIP(h string) bool {
	return h != "" && (strings.IndexByte(h, ':') >= 0 || h[len(h)-1] >= '0' && h[len(h)-1] <= '9')
}

// permits reports whether the CA's name constraints allow a leaf for host
// (RFC 5280 §4.2.1.10 as crypto/x509 applies it): DNS constraints apply to
// names, IP constraints to addresses.
func (c *CA) permits(host string, ip netip.Addr) bool {
	cert := c.cert
	if ip.IsValid() {
		in := func(nets []*net.IPNet) bool {
			for _, n := range nets {
				if n.Contains(ip.AsSlice()) {
					return true
				}
			}
			return false
		}
		if in(cert.ExcludedIPRanges) {
			return false
		}
		return len(cert.PermittedIPRanges) == 0 || in(cert.PermittedIPRanges)
	}
	match := func(constraints []string) bool {
		for _, con := range constraints {
			if matchDomain(host, strings.ToLower(con)) {
				return true
			}
		}
		return false
	}
	if match(cert.ExcludedDNSDomains) {
		return false
	}
	return len(cert.PermittedDNSDomains) == 0 || match(cert.PermittedDNSDomains)
}

// matchDomain: "example.com" matches itself and its subdomains;
// ".example.com" matches subdomains only; "" matches everything.
func matchDomain(host, con string) bool {
	switch {
	case con == "":
		return true
	case strings.HasPrefix(con, "."):
		return len(host) > len(con) && strings.HasSuffix(host, con)
	default:
		return host == con || strings.HasSuffix(host, "."+con)
	}
}
