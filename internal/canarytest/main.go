package canarytest

import (
	"fmt"
	"os"
	"testing"
)

// ForwarderFunc is the function of the goroutines that forward captured
// stdout and stderr while tests run; a goroutine-leak check must ignore it
// (goleak.IgnoreAnyFunction(canarytest.ForwarderFunc)).
const ForwarderFunc = "github.com/keygate/broker/internal/canarytest.(*capture).forward"

// Main runs a package's tests under the sweep:
//
//	func TestMain(m *testing.M) { os.Exit(canarytest.Main(m)) }
//
// It returns m.Run's code, or 1 when a canary was found anywhere.
func Main(m *testing.M) int { return Run(m.Run) }

// Run is Main for a TestMain that does its own setup and teardown around
// m.Run: run is called with fds 1 and 2 captured, and its output is swept
// after it returns.
func Run(run func() int) int {
	c, err := startCapture(Default)
	if err != nil {
		fmt.Fprintf(os.Stderr, "canarytest: capturing stdout and stderr: %v\n", err)
		return 1
	}
	code := run()
	c.stop()
	return finish(code, Default)
}

func finish(code int, r *Registry) int {
	if r.Report(os.Stderr) > 0 {
		fmt.Fprintln(os.Stderr, "FAIL (canarytest: a registered secret reached captured output)")
		return 1
	}
	return code
}
