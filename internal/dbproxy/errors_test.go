package dbproxy

import (
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/keygate/broker/internal/broker"
)

// TestFailureCodes: a rule that fails to evaluate (F-11) and a name that
// does not resolve (F-16) each reach the client and the audit line under
// their own code, not as a plain denial or an unreachable upstream.
func TestFailureCodes(t *testing.T) {
	t.Run("rule_error", func(t *testing.T) {
		f := fromBrokerError(&broker.Error{Code: broker.CodeRuleError, Rule: "r1", Message: "rule evaluation failed",
			Err: fmt.Errorf("no such key: team")}, `user "app" on database "orders"`)
		if f.be.Code != broker.CodeRuleError || f.sqlcode != sqlInvalidAuthorization ||
			f.msg != `keygate: rule_error: rule "r1" could not be evaluated for user "app" on database "orders"` {
			t.Fatalf("got %s %s %q", f.be.Code, f.sqlcode, f.msg)
		}
	})
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"NXDOMAIN", &net.DNSError{Err: "no such host", Name: "db.test", IsNotFound: true}},
		{"resolver timeout, wrapped", fmt.Errorf("egress: resolve: %w", &net.DNSError{Err: "i/o timeout", Name: "db.test", IsTimeout: true})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := upstreamFailure(tc.err)
			if f.be.Code != broker.CodeDNSFailure || f.sqlcode != sqlConnectionFailure || !strings.Contains(f.msg, "could not be resolved") {
				t.Fatalf("got %s %s %q, want dns_failure 08006", f.be.Code, f.sqlcode, f.msg)
			}
		})
	}
}
