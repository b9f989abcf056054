package harden

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// Apply changes the whole process, so it runs in a child: the test binary
// re-executed with KEYGATE_HARDEN_CHILD set.
func TestApplyInChild(t *testing.T) {
	if os.Getenv("KEYGATE_HARDEN_CHILD") == "1" {
		if _, err := Apply(); err != nil {
			t.Fatal(err)
		}
		st, err := Current()
		if err != nil {
			t.Fatal(err)
		}
		if !st.CoreLimitZero || !st.NotDumpable {
			t.Fatalf("after Apply: %+v", st)
		}
		return
	}
	before, err := Current()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run", "^TestApplyInChild$", "-test.v")
	cmd.Env = append(os.Environ(), "KEYGATE_HARDEN_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestApplyInChild") {
		t.Fatalf("child: %v\n%s", err, out)
	}
	// The parent is untouched (Apply is per process).
	after, _ := Current()
	if after != before {
		t.Fatalf("the parent changed: %+v -> %+v", before, after)
	}
}
