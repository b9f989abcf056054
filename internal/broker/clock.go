package broker

import (
	"context"
	"net"
	"time"
)

// Clock is the time source for every expiry decision, so tests can run on a
// fake clock.
type Clock interface {
	Now() time.Time
}

// SystemClock is the wall clock.
type SystemClock struct{}

func (SystemClock) Now() time.Time { return time.Now() }

// Dialer is the one egress path. Implementations resolve the name, classify
// every address, and dial only an address they checked.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}
