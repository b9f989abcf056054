package origdst

import (
	"encoding/binary"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// soOriginalDst is SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and
// IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h): both 80.
const soOriginalDst = unix.SO_ORIGINAL_DST

func get(tc *net.TCPConn) (netip.AddrPort, bool) {
	rc, err := tc.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, false
	}
	var out netip.AddrPort
	_ = rc.Control(func(fd uintptr) {
		var b [28]byte // sockaddr_in6 (sockaddr_in fits)
		for _, level := range []int{unix.SOL_IP, unix.SOL_IPV6} {
			l := uint32(len(b))
			_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), soOriginalDst,
				uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&l)), 0)
			if e != 0 {
				continue
			}
			port := binary.BigEndian.Uint16(b[2:])
			switch binary.NativeEndian.Uint16(b[0:]) {
			case unix.AF_INET:
				out = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), port)
			case unix.AF_INET6:
				out = netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[8:24])), port)
			}
			if out.IsValid() {
				return
			}
		}
	})
	return out, out.IsValid()
}
