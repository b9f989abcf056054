package rules

import (
	"context"
	"fmt"
	"testing"

	"github.com/keygate/broker/internal/broker"
)

// BenchmarkDecide shows that deciding costs the same with 10 or 10,000
// rules for other hosts: the host index never looks at them. Allocations per
// decision are identical; the small time difference that remains is the
// garbage collector marking the larger live heap (about 4 KiB per compiled
// rule) and disappears with GOGC=off.
func BenchmarkDecide(b *testing.B) {
	for _, others := range []int{10, 10000} {
		specs := make([]Spec, 0, others+2)
		for i := 0; i < others; i++ {
			sp := Spec{Name: fmt.Sprintf("other-%d", i), When: `request.method == "GET" && workload.id.startsWith("spiffe://example.org/")`}
			switch i % 3 {
			case 0:
				sp.Hosts = []string{fmt.Sprintf("svc-%d.example.net", i)}
			case 1:
				sp.Hosts = []string{fmt.Sprintf("*.tenant-%d.example.org", i)}
			default:
				sp.Hosts = []string{fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255)}
			}
			specs = append(specs, sp)
		}
		// The deciding rules come last, behind every other rule.
		specs = append(specs,
			Spec{Name: "gh-deny-delete", Hosts: []string{"api.github.com"}, When: `request.method == "DELETE"`, Action: "deny"},
			Spec{Name: "gh", Hosts: []string{"*.github.com"}, When: `workload.claims.repository == "acme/app" && request.method in ["GET", "HEAD"]`,
				Inject: &broker.Injection{Credential: "github-ci"}},
		)
		s, errs := Compile(specs, Options{})
		if len(errs) > 0 {
			b.Fatal(errs)
		}
		id := broker.Identity{ID: "spiffe://example.org/ci", Method: broker.MethodSPIFFEX509, Claims: map[string]any{"repository": "acme/app"}}
		for _, phase := range []broker.Phase{broker.PhaseConnect, broker.PhaseRequest} {
			t := broker.Target{Phase: phase, Protocol: "https", Host: "api.github.com", Port: 443}
			if phase == broker.PhaseRequest {
				t.Method, t.Path, t.Headers = "GET", "/repos/acme/app", map[string]string{"accept": "application/json"}
			}
			b.Run(fmt.Sprintf("others=%d/%s", others, phase), func(b *testing.B) {
				ctx := context.Background()
				b.ReportAllocs()
				for b.Loop() {
					d, err := s.Decide(ctx, id, t)
					if err != nil || d.Action != broker.Allow || d.Rule != "gh" {
						b.Fatalf("%+v %v", d, err)
					}
				}
			})
		}
	}
}
