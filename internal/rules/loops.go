package rules

import (
	"fmt"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/ast"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/common/types/ref"
	"github.com/google/cel-go/common/types/traits"
	"github.com/google/cel-go/interpreter"
)

// Loop bounds. cel-go's runtime cost tracker does not bound loops by itself:
//
//   - an iteration whose body is free in its cost model (filter(x, false),
//     exists_one(x, false): a constant condition and a ternary) costs 0, so
//     the cost limit never stops such a loop;
//   - the tracker keeps a value stack that grows by about two entries per
//     iteration of every running loop and is searched linearly many times
//     per step, so CPU per cost unit grows with the loop's length: 4,000
//     cheap iterations take ~15 ms, 33,000 (what a 100,000 budget allowed)
//     ~1 s.
//
// Both are bounded here, outside the cost model, with counts that do not
// depend on the machine: a loop refuses a range larger than maxLoopRange
// elements, and one evaluation runs at most maxLoopIterations iterations in
// all its loops together. Either stop reports as the cost limit (the same
// error, a deny). Ordinary rules stay far below both: a request has at most
// limits.max_header_count (default 200) headers.
const (
	maxLoopRange      = 1000
	maxLoopIterations = 5000
)

// loopCounterVar is the activation name under which lazyVars exposes its
// iteration counter. It contains characters no CEL identifier can, so no
// expression can read it.
const loopCounterVar = "@keygate.loops"

// loopCounter counts one evaluation's loop iterations.
type loopCounter struct{ n int }

func loopLimitExceeded(msg string) interpreter.EvalCancelledError {
	return interpreter.EvalCancelledError{Cause: interpreter.CostLimitExceeded,
		Message: "operation cancelled: actual cost limit exceeded (" + msg + ")"}
}

// loopGuard is the program option that enforces the loop bounds on a
// checked expression: it finds every comprehension's range and condition
// by node id and wraps them as they are planned.
func loopGuard(checked *cel.Ast) cel.ProgramOption {
	ranges := map[int64]bool{}
	conds := map[int64]bool{}
	root := ast.NavigateAST(checked.NativeRep())
	for _, c := range ast.MatchDescendants(root, ast.KindMatcher(ast.ComprehensionKind)) {
		comp := c.AsComprehension()
		ranges[comp.IterRange().ID()] = true
		conds[comp.LoopCondition().ID()] = true
	}
	return cel.CustomDecoratorV2(func(i interpreter.InterpretableV2) (interpreter.InterpretableV2, error) {
		id := i.ID()
		switch {
		case ranges[id]:
			if a, ok := i.(interpreter.InterpretableAttribute); ok {
				return &rangeGuardAttr{InterpretableAttribute: a}, nil
			}
			return &rangeGuard{InterpretableV2: i}, nil
		case conds[id]:
			// The condition runs once per iteration, also when it is the
			// constant true (filter, map, exists_one). Constants are
			// wrapped as plain interpretables: the observer that would
			// watch a constant reads its value without running it.
			if c, ok := i.(interpreter.InterpretableCall); ok {
				return &condGuardCall{InterpretableCall: c}, nil
			}
			return &condGuard{InterpretableV2: i}, nil
		}
		return i, nil
	})
}

// checkRange refuses a loop over more than maxLoopRange elements.
func checkRange(v ref.Val) {
	s, ok := v.(traits.Sizer)
	if !ok {
		return
	}
	if n, ok := s.Size().(types.Int); ok && n > maxLoopRange {
		panic(loopLimitExceeded(fmt.Sprintf("a loop over more than %d elements", maxLoopRange)))
	}
}

// countIteration charges one iteration to the evaluation's counter.
func countIteration(frame *interpreter.ExecutionFrame) {
	x, _ := frame.ResolveName(loopCounterVar)
	c, ok := x.(*loopCounter)
	if !ok {
		// Every activation comes from vars; fail closed if one does not.
		panic("rules: evaluation has no loop counter")
	}
	c.n++
	if c.n > maxLoopIterations {
		panic(loopLimitExceeded(fmt.Sprintf("more than %d loop iterations", maxLoopIterations)))
	}
}

type rangeGuard struct{ interpreter.InterpretableV2 }

func (g *rangeGuard) Exec(f *interpreter.ExecutionFrame) ref.Val {
	v := g.InterpretableV2.Exec(f)
	checkRange(v)
	return v
}

func (g *rangeGuard) Eval(a interpreter.Activation) ref.Val { return g.Exec(interpreter.AsFrame(a)) }

type rangeGuardAttr struct {
	interpreter.InterpretableAttribute
}

func (g *rangeGuardAttr) Exec(f *interpreter.ExecutionFrame) ref.Val {
	v := g.InterpretableAttribute.Exec(f)
	checkRange(v)
	return v
}

func (g *rangeGuardAttr) Eval(a interpreter.Activation) ref.Val {
	return g.Exec(interpreter.AsFrame(a))
}

type condGuard struct{ interpreter.InterpretableV2 }

func (g *condGuard) Exec(f *interpreter.ExecutionFrame) ref.Val {
	countIteration(f)
	return g.InterpretableV2.Exec(f)
}

func (g *condGuard) Eval(a interpreter.Activation) ref.Val { return g.Exec(interpreter.AsFrame(a)) }

type condGuardCall struct{ interpreter.InterpretableCall }

func (g *condGuardCall) Exec(f *interpreter.ExecutionFrame) ref.Val {
	countIteration(f)
	return g.InterpretableCall.Exec(f)
}

func (g *condGuardCall) Eval(a interpreter.Activation) ref.Val {
	return g.Exec(interpreter.AsFrame(a))
}
