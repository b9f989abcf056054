package rules

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/common/types/ref"
	"github.com/google/cel-go/common/types/traits"
	"github.com/google/cel-go/interpreter"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/keygate/broker/internal/broker"
)

// ValueKind is what a value expression must produce.
type ValueKind int

const (
	// ValueString: the expression has type string.
	ValueString ValueKind = iota
	// ValueJSON: the expression is a map or list (written as a CEL literal,
	// e.g. {"Version": "2012-10-17", "Statement": [...]}) or a string that
	// holds a JSON object or array; the result is compact JSON.
	ValueJSON
	// ValueStringList: the expression is a list of strings, or a string of
	// space-separated words (an OAuth2 scope string, one repository name);
	// the result is the compact JSON array of the strings, in the order
	// given (a string is split on runs of ASCII spaces, tabs and newlines,
	// and an empty string is the empty list).
	ValueStringList
)

// Value is a compiled CEL expression over the rule variables (workload,
// delegator, request, now) that computes a value for a credential source:
// an STS session policy, a session tag, a scope. It is evaluated at request
// phase only, under the same cost limit as rules, and is safe for
// concurrent use.
//
// Its errors never contain the evaluated value: a session policy is derived
// from the request and may echo request data, so only its type or a JSON
// syntax position is reported.
type Value struct {
	prg   cel.Program
	kind  ValueKind
	clock broker.Clock
}

// CompileValue parses, type-checks and cost-checks expr. The error is one
// message (no file:line; the caller knows where the expression is).
func CompileValue(expr string, kind ValueKind, opts Options) (*Value, error) {
	if opts.CostLimit == 0 {
		opts.CostLimit = DefaultCostLimit
	}
	if opts.Clock == nil {
		opts.Clock = broker.SystemClock{}
	}
	if strings.TrimSpace(expr) == "" {
		return nil, errors.New("expression is empty")
	}
	env, err := newEnv()
	if err != nil {
		return nil, err
	}
	checked, iss := env.Compile(expr)
	if iss.Err() != nil {
		return nil, errors.New(strings.Join(issueMessages("", expr, iss), "; "))
	}
	t := checked.OutputType()
	switch kind {
	case ValueString:
		if !t.IsExactType(cel.StringType) && !t.IsExactType(cel.DynType) {
			return nil, fmt.Errorf("expression must be a string, but it has type %s", t)
		}
	case ValueJSON:
		if t.Kind() != types.MapKind && t.Kind() != types.ListKind && !t.IsExactType(cel.StringType) && !t.IsExactType(cel.DynType) {
			return nil, fmt.Errorf("expression must be a map, a list or a JSON string, but it has type %s", t)
		}
	case ValueStringList:
		if t.Kind() != types.ListKind && !t.IsExactType(cel.StringType) && !t.IsExactType(cel.DynType) {
			return nil, fmt.Errorf("expression must be a list of strings or a space-separated string, but it has type %s", t)
		}
	default:
		return nil, fmt.Errorf("unknown value kind %d", kind)
	}
	est, err := env.EstimateCost(checked, sizeEstimator{})
	if err != nil {
		return nil, fmt.Errorf("estimating cost: %w", err)
	}
	if est.Max > opts.CostLimit {
		return nil, fmt.Errorf("estimated cost %s exceeds the limit %d even for an ordinary request", costString(est.Max), opts.CostLimit)
	}
	prg, err := env.Program(checked,
		cel.CostLimit(opts.CostLimit),
		cel.InterruptCheckFrequency(interruptEvery),
		cel.OptimizeRegex(interpreter.MatchesRegexOptimization),
		cel.EvalOptions(cel.OptOptimize),
		loopGuard(checked))
	if err != nil {
		return nil, err
	}
	return &Value{prg: prg, kind: kind, clock: opts.Clock}, nil
}

var structValueType = reflect.TypeOf(&structpb.Value{})

// Eval computes the value for one caller and request (request phase). For
// ValueString it is the string; for ValueJSON compact JSON with object keys
// sorted, so equal policies are equal bytes (they are part of cache keys).
func (v *Value) Eval(ctx context.Context, id broker.Identity, t broker.Target) (string, error) {
	act, err := cel.NewActivation(vars(id, t, v.clock.Now(), false))
	if err != nil {
		return "", fmt.Errorf("rules: building variables: %w", err)
	}
	out, _, err := v.prg.ContextEval(ctx, act)
	if err != nil {
		return "", fmt.Errorf("rules: evaluating: %w", err)
	}
	if v.kind == ValueStringList {
		return stringList(out)
	}
	if s, ok := out.(types.String); ok {
		if v.kind == ValueString {
			return string(s), nil
		}
		return compactJSON(string(s))
	}
	if v.kind == ValueString {
		return "", fmt.Errorf("rules: result has type %s, not string", out.Type())
	}
	native, err := out.ConvertToNative(structValueType)
	if err != nil {
		return "", fmt.Errorf("rules: result of type %s is not JSON: %w", out.Type(), err)
	}
	sv, ok := native.(*structpb.Value)
	if !ok {
		return "", fmt.Errorf("rules: result of type %s is not JSON", out.Type())
	}
	switch sv.GetKind().(type) {
	case *structpb.Value_StructValue, *structpb.Value_ListValue:
	default:
		return "", fmt.Errorf("rules: result of type %s is not a JSON object or array", out.Type())
	}
	return encodeJSON(sv.AsInterface())
}

// stringList turns a string or a list of strings into a JSON array. The
// error names the type or the position of a bad element, never a value.
func stringList(out ref.Val) (string, error) {
	var items []string
	switch x := out.(type) {
	case types.String:
		items = strings.FieldsFunc(string(x), func(r rune) bool { return r == ' ' || r == '\t' || r == '\n' || r == '\r' })
	case traits.Lister:
		n, ok := x.Size().(types.Int)
		if !ok {
			return "", errors.New("rules: result list has no size")
		}
		items = make([]string, 0, int(n))
		for i := types.Int(0); i < n; i++ {
			s, ok := x.Get(i).(types.String)
			if !ok {
				return "", fmt.Errorf("rules: result element %d has type %s, not string", i, x.Get(i).Type())
			}
			items = append(items, string(s))
		}
	default:
		return "", fmt.Errorf("rules: result has type %s, not a list of strings or a string", out.Type())
	}
	if items == nil {
		items = []string{}
	}
	return encodeJSON(items)
}

// compactJSON re-encodes a JSON object or array with sorted keys; the error
// gives only the offset, never the text.
func compactJSON(s string) (string, error) {
	var x any
	dec := json.NewDecoder(strings.NewReader(s))
	dec.UseNumber()
	if err := dec.Decode(&x); err != nil {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			return "", fmt.Errorf("rules: result is not valid JSON (offset %d)", se.Offset)
		}
		return "", errors.New("rules: result is not valid JSON")
	}
	if dec.More() {
		return "", errors.New("rules: result has data after the JSON value")
	}
	switch x.(type) {
	case map[string]any, []any:
	default:
		return "", errors.New("rules: result is not a JSON object or array")
	}
	return encodeJSON(x)
}

// encodeJSON is json.Marshal without HTML escaping: a policy's "&" stays
// "&" for the service that reads it.
func encodeJSON(x any) (string, error) {
	var b strings.Builder
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(x); err != nil {
		return "", fmt.Errorf("rules: encoding the result: %w", err)
	}
	return strings.TrimSuffix(b.String(), "\n"), nil
}
