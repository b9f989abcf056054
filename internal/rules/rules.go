package rules

import (
	"fmt"
	"sort"
	"strings"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/interpreter"

	"github.com/keygate/broker/internal/broker"
)

// Actions a rule may take.
const (
	ActionAllow  = "allow"
	ActionDeny   = "deny"
	ActionTunnel = "tunnel"
)

// Pos is where something is in a rule file.
type Pos struct {
	File string
	Line int
}

// Spec is one rule as written in the configuration.
type Spec struct {
	Name           string
	Hosts          []string // host patterns; see ValidateHostPattern
	Ports          []int    // empty: the protocol's default ports (see Options)
	When           string   // CEL; empty means true
	WhenPos        Pos      // position of the `when:` value
	Action         string   // "allow" (default when empty), "deny", "tunnel"
	Inject         *broker.Injection
	AllowPlaintext bool
	// AllowAnonymous lets the rule match callers no attestor vouched for
	// (workload.method "anonymous"); without it such callers skip the rule.
	AllowAnonymous bool
	Pos            Pos // position of the rule
}

// Options tune compilation and evaluation. Zero fields take defaults.
type Options struct {
	// ConnectPorts are the ports a rule without `ports` matches for https
	// and at CONNECT; default [443].
	ConnectPorts []int
	// HTTPPorts are the ports a rule without `ports` matches for plain
	// http; default [80].
	HTTPPorts []int
	// CostLimit is the CEL runtime cost limit of one `when` evaluation, and
	// the ceiling for its static estimate; default DefaultCostLimit.
	CostLimit uint64
	// Clock supplies `now`; default broker.SystemClock.
	Clock broker.Clock
}

// CompileError is one problem with one rule. Its text is
// "FILE:LINE: rule \"NAME\": message", as `broker validate` prints it.
type CompileError struct {
	Pos  Pos
	Rule string
	// Index is the rule's position in the list, for unnamed rules.
	Index int
	Msg   string
}

func (e *CompileError) Error() string {
	var b strings.Builder
	if e.Pos.File != "" {
		fmt.Fprintf(&b, "%s:%d: ", e.Pos.File, e.Pos.Line)
	}
	if e.Rule == "" {
		fmt.Fprintf(&b, "rule #%d: ", e.Index+1)
	} else {
		fmt.Fprintf(&b, "rule %q: ", e.Rule)
	}
	b.WriteString(e.Msg)
	return b.String()
}

// rule is one compiled rule.
type rule struct {
	name           string
	action         broker.Action
	inject         *broker.Injection
	allowPlaintext bool
	allowAnonymous bool
	hosts          []hostPattern
	ports          []int // nil: protocol defaults
	// full evaluates at request phase; partial at CONNECT, with the
	// request-only fields unknown. Both nil when `when` is empty.
	full, partial cel.Program
}

// Set is an immutable, compiled rule list. It is safe for concurrent use;
// a reload builds a new Set and swaps it in whole.
type Set struct {
	rules        []*rule
	ix           *index
	connectPorts []int
	httpPorts    []int
	clock        broker.Clock
	unknowns     []*cel.AttributePatternType
	// unknownsNoDelegator adds the whole delegator: at CONNECT without one,
	// the requests inside the tunnel may still carry an on-behalf-of token.
	unknownsNoDelegator []*cel.AttributePatternType
	usesHeaders         bool
}

// UsesHeaders reports whether any rule's `when` may read request.headers,
// so callers can skip building the header map when none does.
func (s *Set) UsesHeaders() bool { return s != nil && s.usesHeaders }

// Len is the number of rules.
func (s *Set) Len() int { return len(s.rules) }

// Compile validates and compiles every rule, returning every problem found.
// The Set is nil whenever any error is returned.
func Compile(specs []Spec, opts Options) (*Set, []error) {
	if len(opts.ConnectPorts) == 0 {
		opts.ConnectPorts = []int{443}
	}
	if len(opts.HTTPPorts) == 0 {
		opts.HTTPPorts = []int{80}
	}
	if opts.CostLimit == 0 {
		opts.CostLimit = DefaultCostLimit
	}
	if opts.Clock == nil {
		opts.Clock = broker.SystemClock{}
	}
	var errs []error
	for _, p := range append(append([]int(nil), opts.ConnectPorts...), opts.HTTPPorts...) {
		if p < 1 || p > 65535 {
			errs = append(errs, fmt.Errorf("rules: default port %d is out of range 1-65535", p))
		}
	}
	env, err := newEnv()
	if err != nil {
		return nil, append(errs, err)
	}
	s := &Set{
		ix:                  newIndex(),
		connectPorts:        append([]int(nil), opts.ConnectPorts...),
		httpPorts:           append([]int(nil), opts.HTTPPorts...),
		clock:               opts.Clock,
		unknowns:            unknownAtConnect(),
		unknownsNoDelegator: append(unknownAtConnect(), cel.AttributePattern(varDelegator)),
	}
	seen := map[string]int{}
	for i, sp := range specs {
		// Conservative: any mention (even in a string) counts as a use.
		s.usesHeaders = s.usesHeaders || strings.Contains(sp.When, "headers")
		r, rerrs := compileRule(env, i, sp, opts.CostLimit)
		if sp.Name != "" {
			if first, dup := seen[sp.Name]; dup {
				rerrs = append(rerrs, &CompileError{Pos: sp.Pos, Rule: sp.Name, Index: i,
					Msg: "duplicate rule name (first defined " + where(specs[first].Pos, first) + ")"})
			} else {
				seen[sp.Name] = i
			}
		}
		if len(rerrs) > 0 {
			errs = append(errs, rerrs...)
			continue
		}
		if len(errs) == 0 {
			for _, h := range r.hosts {
				s.ix.add(len(s.rules), h)
			}
			s.rules = append(s.rules, r)
		}
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return s, nil
}

// where names a rule's place for a message: file:line when known.
func where(p Pos, i int) string {
	if p.File != "" {
		return fmt.Sprintf("at %s:%d", p.File, p.Line)
	}
	return fmt.Sprintf("as rule #%d", i+1)
}

func compileRule(env *cel.Env, i int, sp Spec, limit uint64) (*rule, []error) {
	var errs []error
	fail := func(pos Pos, format string, args ...any) {
		errs = append(errs, &CompileError{Pos: pos, Rule: sp.Name, Index: i, Msg: fmt.Sprintf(format, args...)})
	}
	r := &rule{name: sp.Name, inject: sp.Inject, allowPlaintext: sp.AllowPlaintext, allowAnonymous: sp.AllowAnonymous}
	if sp.Name == "" {
		fail(sp.Pos, "name is required")
	}

	switch sp.Action {
	case "", ActionAllow:
		r.action = broker.Allow
	case ActionDeny:
		r.action = broker.Deny
	case ActionTunnel:
		r.action = broker.Tunnel
	default:
		fail(sp.Pos, "unknown action %q (want allow, deny or tunnel)", sp.Action)
	}
	if sp.Inject != nil {
		switch {
		case sp.Action == ActionTunnel:
			fail(sp.Pos, "a tunnel is never intercepted, so it cannot inject a credential")
		case sp.Action == ActionDeny:
			fail(sp.Pos, "a deny rule cannot inject a credential")
		case sp.Inject.Credential == "":
			fail(sp.Pos, "inject names no credential")
		}
	}
	if sp.AllowPlaintext && (sp.Action == ActionTunnel || sp.Action == ActionDeny) {
		fail(sp.Pos, "allow_plaintext applies only to allow rules")
	}

	if len(sp.Hosts) == 0 {
		fail(sp.Pos, "hosts is empty; use [\"*\"] to match every host")
	}
	seenHost := map[hostPattern]bool{}
	for _, h := range sp.Hosts {
		p, err := parseHostPattern(h)
		if err != nil {
			fail(sp.Pos, "%v", err)
			continue
		}
		if !seenHost[p] {
			seenHost[p] = true
			r.hosts = append(r.hosts, p)
		}
	}

	for _, p := range sp.Ports {
		if p < 1 || p > 65535 {
			fail(sp.Pos, "port %d is out of range 1-65535", p)
		}
	}
	if len(sp.Ports) > 0 {
		r.ports = append([]int(nil), sp.Ports...)
		sort.Ints(r.ports)
	}

	if strings.TrimSpace(sp.When) != "" {
		for _, msg := range compileWhen(env, r, sp.When, limit, r.action == broker.Tunnel) {
			fail(sp.WhenPos, "%s", msg)
		}
	}
	return r, errs
}

// compileWhen compiles, type-checks and cost-checks one expression and
// builds its two programs. It returns the problems as messages.
func compileWhen(env *cel.Env, r *rule, expr string, limit uint64, tunnel bool) []string {
	checked, iss := env.Compile(expr)
	if iss.Err() != nil {
		return issueMessages("when: ", expr, iss)
	}
	if t := checked.OutputType(); !t.IsExactType(cel.BoolType) {
		return []string{fmt.Sprintf("when must be a bool expression, but it has type %s (compare it, e.g. `... == true`)", t)}
	}
	if tunnel && !usesOnlyConnectFields(checked) {
		return []string{"a tunnel rule is decided at CONNECT, so its when may use only request.protocol, request.host and request.port"}
	}
	est, err := env.EstimateCost(checked, sizeEstimator{})
	if err != nil {
		return []string{fmt.Sprintf("when: estimating cost: %v", err)}
	}
	if est.Max > limit {
		return []string{fmt.Sprintf("when: estimated cost %s exceeds the limit %d even for an ordinary request (avoid nested loops and regular expressions inside loops)", costString(est.Max), limit)}
	}
	common := []cel.ProgramOption{
		cel.CostLimit(limit),
		cel.InterruptCheckFrequency(interruptEvery),
		// Compile constant regular expressions now: a bad one is a
		// compile error, and evaluation does not recompile it.
		cel.OptimizeRegex(interpreter.MatchesRegexOptimization),
		loopGuard(checked),
	}
	full, err := env.Program(checked, append(common, cel.EvalOptions(cel.OptOptimize))...)
	if err != nil {
		return []string{fmt.Sprintf("when: %v", err)}
	}
	partial, err := env.Program(checked, append(common, cel.EvalOptions(cel.OptOptimize, cel.OptPartialEval))...)
	if err != nil {
		return []string{fmt.Sprintf("when: %v", err)}
	}
	r.full, r.partial = full, partial
	return nil
}

func costString(c uint64) string {
	if c == ^uint64(0) {
		return "unbounded"
	}
	return fmt.Sprint(c)
}

// issueMessages turns CEL compile issues into one-line messages with the
// position inside the expression.
func issueMessages(prefix, expr string, iss *cel.Issues) []string {
	var msgs []string
	multiline := strings.Contains(strings.TrimSpace(expr), "\n")
	for _, e := range iss.Errors() {
		// Every expression has the same, empty container; saying so is noise.
		msg := strings.ReplaceAll(e.Message, " (in container '')", "")
		loc := e.Location
		switch {
		case loc == nil || loc.Line() <= 0:
			msgs = append(msgs, prefix+msg)
		case multiline:
			msgs = append(msgs, fmt.Sprintf("%s%s (expression line %d, column %d)", prefix, msg, loc.Line(), loc.Column()+1))
		default:
			msgs = append(msgs, fmt.Sprintf("%s%s (column %d)", prefix, msg, loc.Column()+1))
		}
	}
	return msgs
}
