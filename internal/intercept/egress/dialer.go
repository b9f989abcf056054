package egress

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"time"

	"github.com/keygate/broker/internal/broker"
)

// ErrDenied is wrapped by every refusal of the egress guard.
var ErrDenied = errors.New("egress: destination denied")

// DeniedError is the refusal of one address. It wraps ErrDenied and carries
// only non-secret facts: the host asked for, the address and its class.
type DeniedError struct {
	Host  string         // the name that was resolved; empty for an IP literal or a bare Check
	Addr  netip.AddrPort // the refused address; zero when there is no address (empty host)
	Class Class
}

func (e *DeniedError) Error() string {
	msg := ErrDenied.Error() + ": "
	if e.Host != "" {
		msg += strconv.Quote(e.Host) + " resolves to "
	}
	if !e.Addr.IsValid() {
		return msg + string(e.Class) + " address"
	}
	return msg + string(e.Class) + " address " + e.Addr.String()
}

// Unwrap makes errors.Is(err, ErrDenied) true.
func (e *DeniedError) Unwrap() error { return ErrDenied }

// Resolver looks up the addresses of a host. *net.Resolver satisfies it.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Options configures a Dialer. The zero value allows everything except the
// broker's own listeners; configuration sets DenyPrivate to true by default.
type Options struct {
	// DenyPrivate refuses every address whose Class is not ClassPublic,
	// unless it is inside AllowCIDRs.
	DenyPrivate bool
	// AllowCIDRs are explicit exceptions, checked before the class.
	AllowCIDRs []netip.Prefix
	// SelfAddrs are the broker's own listeners; always refused. An
	// unspecified address matches every local address on that port; port 0
	// matches every port.
	SelfAddrs []netip.AddrPort
	// Resolver defaults to net.DefaultResolver.
	Resolver Resolver
	// Timeout bounds resolution plus connection (all attempts); default 10s.
	Timeout time.Duration
	// ResolveTimeout bounds name resolution on its own; default 2s. A
	// resolver that does not answer in time is a DNS failure, not a slow
	// upstream.
	ResolveTimeout time.Duration
	// KeepAlive is passed to net.Dialer (0: Go's default, negative: off).
	KeepAlive time.Duration
}

// Dialer is the SSRF-guarded egress dialer. It is safe for concurrent use and
// immutable after New.
type Dialer struct {
	denyPrivate bool
	allow       []netip.Prefix
	self        []netip.AddrPort
	resolver    Resolver
	timeout     time.Duration
	resolveTO   time.Duration
	keepAlive   time.Duration
	// localAddrs lists this host's addresses, for unspecified SelfAddrs.
	localAddrs func() ([]netip.Addr, error)
}

var _ broker.Dialer = (*Dialer)(nil)

// New builds a Dialer. Invalid prefixes and addresses in o are ignored;
// IPv4-mapped prefixes are converted to IPv4 so they match what is dialled.
func New(o Options) *Dialer {
	d := &Dialer{
		denyPrivate: o.DenyPrivate,
		resolver:    o.Resolver,
		timeout:     o.Timeout,
		resolveTO:   o.ResolveTimeout,
		keepAlive:   o.KeepAlive,
		localAddrs:  interfaceAddrs,
	}
	if d.resolver == nil {
		d.resolver = net.DefaultResolver
	}
	if d.timeout <= 0 {
		d.timeout = 10 * time.Second
	}
	if d.resolveTO <= 0 {
		d.resolveTO = DefaultResolveTimeout
	}
	for _, p := range o.AllowCIDRs {
		if !p.IsValid() {
			continue
		}
		if p.Addr().Is4In6() {
			bits := p.Bits() - 96
			if bits < 0 {
				// ::ffff:0:0/95 and shorter cover more than the mapped
				// space; keep it as IPv6 (it cannot match an unmapped v4).
				d.allow = append(d.allow, p.Masked())
				continue
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), bits)
		}
		d.allow = append(d.allow, p.Masked())
	}
	for _, ap := range o.SelfAddrs {
		if !ap.Addr().IsValid() {
			continue
		}
		d.self = append(d.self, netip.AddrPortFrom(canon(ap.Addr()), ap.Port()))
	}
	return d
}

// canon strips the zone and unmaps IPv4-mapped addresses: the form every
// comparison in this package uses.
func canon(a netip.Addr) netip.Addr { return a.WithZone("").Unmap() }

// Check decides whether addr may be dialled: nil, or a *DeniedError wrapping
// ErrDenied. Order: the broker's own listeners (always denied), then
// AllowCIDRs (allowed), then the class (only public passes under
// DenyPrivate).
func (d *Dialer) Check(addr netip.AddrPort) error {
	return d.check("", addr)
}

func (d *Dialer) check(host string, addr netip.AddrPort) error {
	a := addr.Addr()
	if !a.IsValid() {
		return &DeniedError{Host: host, Class: ClassInvalid}
	}
	if d.isSelf(canon(a), addr.Port()) {
		return &DeniedError{Host: host, Addr: addr, Class: ClassSelf}
	}
	if !d.denyPrivate {
		return nil
	}
	ca := canon(a)
	for _, p := range d.allow {
		if p.Contains(ca) {
			return nil
		}
	}
	if c := Classify(a); c != ClassPublic {
		return &DeniedError{Host: host, Addr: addr, Class: c}
	}
	return nil
}

// isSelf reports whether a:port reaches one of the broker's listeners.
func (d *Dialer) isSelf(a netip.Addr, port uint16) bool {
	var wildcard bool
	for _, s := range d.self {
		if s.Port() != 0 && s.Port() != port {
			continue
		}
		if s.Addr() == a {
			return true
		}
		if s.Addr().IsUnspecified() {
			wildcard = true
		}
	}
	if !wildcard {
		return false
	}
	// A wildcard listener on this port accepts on every local address.
	switch Classify(a) {
	case ClassLoopback, ClassUnspecified:
		return true
	}
	local, err := d.localAddrs()
	if err != nil {
		return true // fail closed: cannot prove it is not us
	}
	for _, l := range local {
		if canon(l) == a {
			return true
		}
	}
	return false
}

func interfaceAddrs() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		var ip net.IP
		switch v := a.(type) {
		case *net.IPNet:
			ip = v.IP
		case *net.IPAddr:
			ip = v.IP
		}
		if na, ok := netip.AddrFromSlice(ip); ok {
			out = append(out, na)
		}
	}
	return out, nil
}

// Control is a net.Dialer.Control hook that re-checks the exact ip:port the
// socket is about to connect to. DialContext installs it; other dialers may
// install it too, so that no connect(2) bypasses the guard.
func (d *Dialer) Control(network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return &DeniedError{Class: ClassInvalid}
	}
	return d.Check(ap)
}

// DialContext resolves address once, checks every resolved address, and
// connects to a checked address (trying the next checked one when a
// connection fails). network is "tcp", "tcp4" or "tcp6"; the port must be
// numeric.
func (d *Dialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	family, err := ipFamily(network)
	if err != nil {
		return nil, err
	}
	host, portStr, err := net.SplitHostPort(address)
	if err != nil {
		return nil, fmt.Errorf("egress: bad address %q: %w", address, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 {
		return nil, fmt.Errorf("egress: bad port %q in address %q", portStr, address)
	}
	if host == "" {
		// An empty host means "this machine" to the socket layer.
		return nil, &DeniedError{Class: ClassUnspecified}
	}

	ctx, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()

	ips, literal, err := d.resolve(ctx, family, host)
	if err != nil {
		return nil, err
	}
	name := host // reported in refusals; empty for an IP literal
	if literal {
		name = ""
	}
	targets := make([]netip.AddrPort, 0, len(ips))
	seen := make(map[netip.Addr]bool, len(ips))
	for _, ip := range ips {
		ip = ip.Unmap() // a mapped address is dialled as the IPv4 it is
		if seen[ip] {
			continue
		}
		seen[ip] = true
		ap := netip.AddrPortFrom(ip, uint16(port))
		if err := d.check(name, ap); err != nil {
			// Refuse the whole name if any answer is denied (see doc.go).
			return nil, err
		}
		targets = append(targets, ap)
	}
	return d.dialChecked(ctx, name, targets)
}

func ipFamily(network string) (string, error) {
	switch network {
	case "tcp":
		return "ip", nil
	case "tcp4":
		return "ip4", nil
	case "tcp6":
		return "ip6", nil
	}
	return "", fmt.Errorf("egress: unsupported network %q", network)
}

// resolve returns the addresses of host in family, resolving only names;
// literal reports that host was an IP literal.
func (d *Dialer) resolve(ctx context.Context, family, host string) (ips []netip.Addr, literal bool, err error) {
	if ip, perr := netip.ParseAddr(host); perr == nil {
		ips, literal = []netip.Addr{ip}, true
	} else {
		rctx, cancel := context.WithTimeout(ctx, d.resolveTO)
		ips, err = d.resolver.LookupNetIP(rctx, family, host)
		timedOut := rctx.Err() != nil && ctx.Err() == nil
		cancel()
		if err != nil {
			var dnsErr *net.DNSError
			if timedOut && !errors.As(err, &dnsErr) {
				// A resolver that honours only the context reports its
				// deadline; it is still a DNS failure.
				err = &net.DNSError{Err: "resolution timed out", Name: host, IsTimeout: true}
			}
			return nil, false, fmt.Errorf("egress: resolve %q: %w", host, err)
		}
	}
	out := ips[:0:0]
	for _, ip := range ips {
		if !ip.IsValid() {
			return nil, false, &DeniedError{Host: host, Class: ClassInvalid}
		}
		is4 := ip.Unmap().Is4()
		if (family == "ip4" && !is4) || (family == "ip6" && is4) {
			continue
		}
		out = append(out, ip)
	}
	if len(out) == 0 {
		return nil, false, fmt.Errorf("egress: no %s address for %q", family, host)
	}
	return out, literal, nil
}

// DefaultResolveTimeout bounds one name resolution when Options does not.
const DefaultResolveTimeout = 2 * time.Second

// minAttempt is the least time one connection attempt gets when several
// addresses share the deadline (as in net.Dialer).
const minAttempt = 2 * time.Second

// dialChecked connects to the first reachable address of targets, which the
// caller has checked. The Control hook checks each one again at connect
// time; a refusal there stops the dial.
func (d *Dialer) dialChecked(ctx context.Context, host string, targets []netip.AddrPort) (net.Conn, error) {
	nd := &net.Dialer{KeepAlive: d.keepAlive, Control: d.Control}
	var first error
	for i, ap := range targets {
		actx := ctx
		if deadline, ok := ctx.Deadline(); ok && len(targets)-i > 1 {
			remaining := time.Until(deadline)
			per := remaining / time.Duration(len(targets)-i)
			if per < minAttempt {
				per = min(minAttempt, remaining)
			}
			var cancel context.CancelFunc
			actx, cancel = context.WithTimeout(ctx, per)
			defer cancel()
		}
		network := "tcp6"
		if ap.Addr().Is4() {
			network = "tcp4"
		}
		conn, err := nd.DialContext(actx, network, ap.String())
		if err == nil {
			return conn, nil
		}
		var denied *DeniedError
		if errors.As(err, &denied) {
			denied.Host = host
			return nil, denied
		}
		if first == nil {
			first = fmt.Errorf("egress: dial %s: %w", ap, err)
			if host != "" {
				first = fmt.Errorf("egress: dial %q (%s): %w", host, ap, err)
			}
		}
		if ctx.Err() != nil {
			break
		}
	}
	if first == nil {
		first = errors.New("egress: no address to dial")
	}
	return nil, first
}
