package inject

import (
	"strings"
	"testing"

	"github.com/keygate/broker/internal/broker"
)

// FuzzSessionName: any identity yields a RoleSessionName STS accepts.
func FuzzSessionName(f *testing.F) {
	for _, s := range []string{"spiffe://example.org/ci/build", "", "a", "aws:x", "repo:acme/app:ref:refs/heads/main", "\xff\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		n := SessionName(broker.Identity{ID: id})
		if len(n) < 2 || len(n) > 64 {
			t.Fatalf("SessionName(%q) = %q: length %d", id, n, len(n))
		}
		for i := 0; i < len(n); i++ {
			c := n[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("+=,.@_-", c) >= 0) {
				t.Fatalf("SessionName(%q) = %q: byte %q outside STS's set", id, n, c)
			}
		}
	})
}
