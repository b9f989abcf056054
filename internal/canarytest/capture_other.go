//go:build !linux

package canarytest

import (
	"fmt"
	"os"
)

// capture is a no-op off Linux: only Observe'd output is swept there.
type capture struct{}

func startCapture(*Registry) (*capture, error) {
	fmt.Fprintln(os.Stderr, "canarytest: stdout/stderr capture is Linux-only; sweeping observed output only")
	return &capture{}, nil
}

func (*capture) stop() {}
