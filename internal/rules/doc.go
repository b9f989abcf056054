// Package rules compiles the configured rule list (DESIGN.md §5, §6) and
// decides, for one attested caller and one target, what the broker does:
// deny, tunnel, or allow (and, for an allow, which credential to inject).
//
// Rules are ordered; the first rule whose host pattern, port and `when`
// expression all match decides. `when` is CEL over the variables workload,
// delegator, request and now (see DESIGN.md §6).
//
// Security contract:
//
//   - Default deny. No matching rule yields the zero broker.Decision, which
//     denies.
//   - Errors deny. Any error while evaluating a rule (a missing map key, a
//     type mismatch, the cost limit, a cancelled context, even a panic)
//     ends the decision with a deny naming that rule and a non-nil error.
//     Evaluation never skips a failing rule to reach a later, more
//     permissive one. Write `has(workload.claims.x) && ...` for optional
//     fields.
//   - Cost limits. Every evaluation runs under a CEL runtime cost limit
//     (Options.CostLimit, default DefaultCostLimit). At compile time an
//     expression whose estimated cost for an ordinary request exceeds the
//     same limit is rejected; the runtime limit is what bounds a hostile
//     request. Loops are bounded too, outside CEL's cost model (which
//     charges nothing for some loop bodies and whose tracker slows down
//     with loop length): a loop over more than 1,000 elements, or more
//     than 5,000 loop iterations in one evaluation, stops with the same
//     cost-limit error.
//   - Compiled once. Every expression is parsed, type-checked (it must be
//     bool) and planned in Compile; Decide only evaluates. A Set is
//     immutable and safe for concurrent use; reloading builds a new Set.
//   - Indexed by host. Deciding looks only at rules whose host pattern can
//     match the target (exact names by map, wildcards by label suffix, "*"
//     rules by list), so its cost does not grow with rules for other hosts.
//   - Tunnels stay blind. A tunnel rule's `when` may use only the request's
//     protocol, host and port, and it never injects a credential. At
//     CONNECT a rule that depends on request fields makes the broker
//     intercept rather than tunnel, so those fields are judged per request.
//   - Reasons are data-free. Decision.Reason never contains header values
//     or other request data.
package rules
