package testservers

import (
	"fmt"
	"os"
	"testing"
)

// Missing reports that something a test needs is not on this machine (a
// server, a tool, root, an address): the test is skipped on a developer's
// machine and fails in CI (CI=true), where scripts/deps.sh provides
// everything and a skip would hide a test that never ran.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg + " (required in CI)")
	}
	t.Skip(msg + "; skipping")
}
