package inject

import (
	"os"
	"testing"

	"github.com/keygate/broker/internal/canarytest"
)

// TestMain runs the package under the suite-wide secret sweep: a
// registered canary in captured stdout/stderr or observed output fails the
// package (SECURITY-TESTS.md T-B4).
func TestMain(m *testing.M) { os.Exit(canarytest.Main(m)) }
