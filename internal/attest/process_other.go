//go:build !linux

package attest

import (
	"context"
	"net"
	"net/netip"

	"github.com/keygate/broker/internal/broker"
)

// processSys is empty: only Linux exposes the socket and process tables the
// process attestor needs.
type processSys struct{}

// attestTCP does not apply off Linux.
func (p *Process) attestTCP(context.Context, netip.AddrPort, netip.AddrPort, net.Conn) (broker.Identity, error) {
	return broker.Identity{}, broker.ErrNoEvidence
}

// attestUnix does not apply off Linux.
func (p *Process) attestUnix(context.Context, *net.UnixConn) (broker.Identity, error) {
	return broker.Identity{}, broker.ErrNoEvidence
}
