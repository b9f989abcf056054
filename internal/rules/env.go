package rules

import (
	"fmt"
	"time"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/checker"
	"github.com/google/cel-go/common/ast"
	"github.com/google/cel-go/ext"
	"github.com/google/cel-go/interpreter"

	"github.com/keygate/broker/internal/broker"
)

// CEL variable names (DESIGN.md §6).
const (
	varWorkload  = "workload"
	varDelegator = "delegator"
	varRequest   = "request"
	varNow       = "now"
)

// Keys of the request map. Only protocol, host and port are known at
// CONNECT; unknownAtConnect marks the rest.
const (
	keyProtocol = "protocol"
	keyMethod   = "method"
	keyHost     = "host"
	keyPort     = "port"
	keyPath     = "path"
	keyQuery    = "query"
	keyHeaders  = "headers"
	keyDatabase = "database"
	keyUser     = "user"
)

// isConnectKey reports whether a request field is known at CONNECT, the
// only fields a tunnel rule may use: a tunnel never sees a request.
func isConnectKey(k string) bool {
	return k == keyProtocol || k == keyHost || k == keyPort
}

const (
	// DefaultCostLimit is the CEL runtime cost budget of one `when`
	// evaluation. One unit is roughly one cheap operation (a comparison, a
	// field access, ten characters of string scanning). 30000 allows a
	// regular expression over every header of an ordinary request many
	// times over (the static estimate of every rule shipped in configs/ is
	// under 600) and bounds a hostile request: with the loop bounds in
	// loops.go, the worst shapes measured by BenchmarkCostLimitWorstCase
	// (regular expressions over 8 KiB values, 1,000-element loops with wide
	// bodies) stop after about 10 ms of CPU on a 2-core Xeon, and well under
	// 20 ms.
	DefaultCostLimit = 30000

	// maxExprLen bounds the source size of one expression.
	maxExprLen = 16 << 10

	// interruptEvery is how many comprehension iterations run between
	// checks of the Decide context.
	interruptEvery = 100

	// Sizes the static cost estimate assumes for data whose size is only
	// known at run time. They describe an ordinary request, not a bound:
	// the estimate exists to reject expressions that are too expensive even
	// for ordinary input (nested loops over headers, regular expressions in
	// loops over claims); the runtime cost limit enforces the real budget.
	assumedEntries = 64  // headers, claims, process fields
	assumedSize    = 256 // any other string, list or map
)

func newEnv() (*cel.Env, error) {
	m := cel.MapType(cel.StringType, cel.DynType)
	env, err := cel.NewEnv(
		cel.Variable(varWorkload, m),
		cel.Variable(varDelegator, m),
		cel.Variable(varRequest, m),
		cel.Variable(varNow, cel.TimestampType),
		// Token claims arrive from JSON as doubles; let `claims.n > 5` work.
		cel.CrossTypeNumericComparisons(true),
		cel.DefaultUTCTimeZone(true),
		cel.ParserExpressionSizeLimit(maxExprLen),
		// split, substring, lowerAscii, join...: session policies and tags
		// are built from parts of the path and of claims.
		ext.Strings(),
	)
	if err != nil {
		return nil, fmt.Errorf("rules: building the CEL environment: %w", err)
	}
	return env, nil
}

// unknownAtConnect marks the request fields a CONNECT does not know.
func unknownAtConnect() []*cel.AttributePatternType {
	keys := []string{keyMethod, keyPath, keyQuery, keyHeaders, keyDatabase, keyUser}
	pats := make([]*cel.AttributePatternType, 0, len(keys))
	for _, k := range keys {
		pats = append(pats, cel.AttributePattern(varRequest).QualString(k))
	}
	return pats
}

// sizeEstimator supplies the assumed sizes above to the static estimate.
type sizeEstimator struct{}

func (sizeEstimator) EstimateSize(n checker.AstNode) *checker.SizeEstimate {
	path := n.Path()
	if len(path) == 0 {
		return nil
	}
	size := uint64(assumedSize)
	if len(path) == 2 {
		switch {
		case path[0] == varRequest && path[1] == keyHeaders,
			path[0] == varWorkload && (path[1] == "claims" || path[1] == "process"),
			path[0] == varDelegator && path[1] == "claims":
			size = assumedEntries
		}
	}
	return &checker.SizeEstimate{Min: 0, Max: size}
}

func (sizeEstimator) EstimateCallCost(string, string, *checker.AstNode, []checker.AstNode) *checker.CallEstimate {
	return nil
}

// usesOnlyConnectFields reports whether every use of `request` in the
// expression is request.protocol, request.host or request.port. Anything
// else (request.method, request["path"], size(request), a comprehension
// over request) needs the request.
func usesOnlyConnectFields(a *cel.Ast) bool {
	root := ast.NavigateAST(a.NativeRep())
	for _, id := range ast.MatchDescendants(root, ast.KindMatcher(ast.IdentKind)) {
		if id.AsIdent() != varRequest {
			continue
		}
		parent, ok := id.Parent()
		if !ok || parent.Kind() != ast.SelectKind || !isConnectKey(parent.AsSelect().FieldName()) {
			return false
		}
	}
	return true
}

// vars builds the activation for one decision. Absent parts are empty maps,
// so `has(workload.claims.x)` works for every workload.
// lazyVars resolves the top-level CEL variables on first use, so a rule
// that reads only request fields does not pay for the workload, process and
// delegator maps. It implements interpreter.Activation; it is built per
// evaluation and not shared across goroutines.
type lazyVars struct {
	id      broker.Identity
	t       broker.Target
	now     time.Time
	connect bool
	cache   map[string]any
	loops   loopCounter // reset before each evaluation; see loops.go
}

func vars(id broker.Identity, t broker.Target, now time.Time, connect bool) *lazyVars {
	return &lazyVars{id: id, t: t, now: now, connect: connect}
}

// ResolveName implements interpreter.Activation.
func (v *lazyVars) ResolveName(name string) (any, bool) {
	if name == loopCounterVar {
		return &v.loops, true
	}
	if x, ok := v.cache[name]; ok {
		return x, true
	}
	var x any
	switch name {
	case varWorkload:
		x = workloadVar(v.id)
	case varDelegator:
		x = delegatorVar(v.id)
	case varRequest:
		x = requestVar(v.t, v.connect)
	case varNow:
		x = v.now
	default:
		return nil, false
	}
	if v.cache == nil {
		v.cache = make(map[string]any, 4)
	}
	v.cache[name] = x
	return x, true
}

// Parent implements interpreter.Activation.
func (v *lazyVars) Parent() interpreter.Activation { return nil }

func workloadVar(id broker.Identity) map[string]any {
	claims := id.Claims
	if claims == nil {
		claims = map[string]any{}
	}
	process := map[string]any{}
	if p := id.Process; p != nil {
		process = map[string]any{
			"pid":          int64(p.PID),
			"uid":          int64(p.UID),
			"gid":          int64(p.GID),
			"exe":          p.Exe,
			"sha256":       p.SHA256,
			"container_id": p.ContainerID,
		}
	}
	return map[string]any{
		"id":           id.ID,
		"method":       id.Method,
		"trust_domain": id.TrustDomain,
		"claims":       claims,
		"process":      process,
	}
}

func delegatorVar(id broker.Identity) map[string]any {
	if id.Delegator.Sub == "" {
		return map[string]any{}
	}
	dc := id.Delegator.Claims
	if dc == nil {
		dc = map[string]any{}
	}
	return map[string]any{"sub": id.Delegator.Sub, "claims": dc}
}

func requestVar(t broker.Target, connect bool) map[string]any {
	request := map[string]any{
		keyProtocol: t.Protocol,
		keyHost:     t.Host,
		keyPort:     int64(t.Port),
	}
	// At CONNECT the request-only keys are left out: they are marked
	// unknown, and a fake empty value must never decide anything.
	if !connect {
		headers := t.Headers
		if headers == nil {
			headers = map[string]string{}
		}
		request[keyMethod] = t.Method
		request[keyPath] = t.Path
		request[keyQuery] = t.Query
		request[keyHeaders] = headers
		request[keyDatabase] = t.Database
		request[keyUser] = t.User
	}
	return request
}
