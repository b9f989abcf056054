// Package egress is keygate's single egress dialer: the SSRF guard every
// outbound connection goes through (MITM'd upstream requests, CONNECT
// tunnels, database sessions and the broker's own backend clients).
//
// Security contract:
//
//   - Every address is checked, never a name. DialContext resolves the host
//     once (IP literals skip DNS), checks every resolved address, and dials
//     only the addresses it checked, as IP literals. It never resolves the
//     name a second time, so a DNS answer that changes between the check and
//     the dial (rebinding, TOCTOU) cannot change the destination.
//   - If ANY resolved address is denied, the whole name is refused, before
//     anything is dialled. A name that answers with both a public and an
//     internal address is either misconfigured or an attack; skipping the bad
//     address would still let an attacker steer traffic by ordering records.
//     (smokescreen dials only the first answer; we are stricter.) When the
//     first checked address fails to connect, the next checked one is tried,
//     splitting the remaining timeout the way net.Dialer does.
//   - A net.Dialer.Control hook re-checks the exact ip:port at connect time,
//     after the socket is created and before connect(2). Any path that hands
//     the socket an address the resolver-time check did not see is refused
//     there. Control is exported so other dialers can install the same guard.
//   - With DenyPrivate (the configured default) only ClassPublic addresses
//     pass, unless an address is inside an explicit AllowCIDRs exception.
//     Denied: loopback, RFC 1918, link-local (including 169.254.169.254
//     metadata), CGNAT, "this network" 0.0.0.0/8, ULA, IPv6 site-local,
//     multicast, broadcast, 240/4, IETF protocol assignments 192.0.0.0/24 and
//     2001::/23, the deprecated 6to4 relay anycast 192.88.99.0/24,
//     benchmarking, every documentation range (TEST-NET-1/2/3, 2001:db8::/32,
//     3fff::/20: they are never real destinations, so reaching one is a bug
//     or a probe), Teredo, the local-use NAT64 prefix 64:ff9b:1::/48 (its
//     embedding is site-defined), and all IPv6 outside 2000::/3.
//   - Addresses that embed IPv4 are judged by the embedded address:
//     IPv4-mapped ::ffff:a.b.c.d classifies exactly as a.b.c.d (and is dialled
//     as IPv4); the well-known NAT64 prefix 64:ff9b::/96 and 6to4 2002::/16
//     are public only when the embedded IPv4 is public, and otherwise
//     classify as nat64 / 6to4.
//   - AllowCIDRs matches the address as dialled (IPv4-mapped forms unmapped,
//     zones ignored). Reaching an internal IPv4 through NAT64 needs the NAT64
//     prefix itself to be allowed.
//   - SelfAddrs (the broker's own listeners) are always denied, even inside
//     AllowCIDRs and even without DenyPrivate, so the broker cannot be made to
//     connect to itself. An unspecified listen address (0.0.0.0:p, [::]:p)
//     matches every local address on port p: loopback, 0.0.0.0/8, ::, and
//     every interface address (read at check time; if that read fails, the
//     port is refused). A self address with port 0 matches every port.
//   - The dialer never reads HTTP_PROXY, HTTPS_PROXY, ALL_PROXY or NO_PROXY.
//   - Every refusal wraps ErrDenied (errors.Is) as a *DeniedError that names
//     the class, the address and the host; nothing secret is ever in it.
package egress
