package testservers

import (
	"strings"
	"testing"
)

// recordTB records how Missing ended the test instead of ending it.
type recordTB struct {
	testing.TB
	fatal, skip string
}

func (r *recordTB) Helper() {}

// Fatal and Skip end the caller, as the real ones do (here by a panic the
// test recovers).
func (r *recordTB) Fatal(args ...any) { r.fatal = args[0].(string); panic(r) }
func (r *recordTB) Skip(args ...any)  { r.skip = args[0].(string); panic(r) }

func TestMissingFailsInCI(t *testing.T) {
	for _, tc := range []struct {
		ci         string
		fail, skip bool
	}{{"true", true, false}, {"", false, true}, {"1", false, true}} {
		t.Run("CI="+tc.ci, func(t *testing.T) {
			t.Setenv("CI", tc.ci)
			r := &recordTB{TB: t}
			func() {
				defer func() { recover() }()
				Missing(r, "psql not found on %s", "PATH")
			}()
			if (r.fatal != "") != tc.fail || (r.skip != "") != tc.skip {
				t.Fatalf("fatal %q skip %q, want fail=%v skip=%v", r.fatal, r.skip, tc.fail, tc.skip)
			}
			if !strings.Contains(r.fatal+r.skip, "psql not found on PATH") {
				t.Fatalf("the message is lost: %q%q", r.fatal, r.skip)
			}
		})
	}
}
