// Package origdst recovers the pre-NAT destination of a TCP connection that
// an iptables/nft REDIRECT (or DNAT) sent to this process: SO_ORIGINAL_DST
// for IPv4 and IP6T_SO_ORIGINAL_DST for IPv6, read from conntrack by the
// kernel.
//
// Security contract: the address is what the kernel recorded for the
// connection, not anything the peer sent. A connection that was not
// redirected yields its own local address (conntrack's original tuple),
// which callers must treat as "no redirect" rather than as a destination.
package origdst

import (
	"net"
	"net/netip"
)

// Get returns the original destination of c and whether one is known.
func Get(c net.Conn) (netip.AddrPort, bool) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return netip.AddrPort{}, false
	}
	return get(tc)
}
