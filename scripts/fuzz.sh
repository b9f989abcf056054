#!/usr/bin/env bash
# Runs every native Go fuzz target of the module for FUZZTIME each.
# Targets are discovered (every `func FuzzX(f *testing.F)` in a _test.go file
# of a package `go list ./...` reports), so a new target is fuzzed without
# touching the Makefile. Each target's seed corpus (f.Add plus
# testdata/fuzz/FuzzX/) runs first, on every plain `go test` too.
#
#   scripts/fuzz.sh                 every target, FUZZTIME each (default 30s)
#   FUZZTIME=2s scripts/fuzz.sh     the short CI run (make fuzz-ci)
#   scripts/fuzz.sh Sig             only targets whose name matches the regexp
#   scripts/fuzz.sh -l              list the targets, run nothing
#
# Every target runs even after a failure; the exit status is 1 if any failed.
# A failing input is written by Go to testdata/fuzz/FuzzX/ in the package:
# reproduce with `go test -run 'FuzzX/<file>' ./pkg/`.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-30s}
# Bounds a whole `go test -fuzz` run (build, seeds, fuzzing, minimisation).
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-20m}

list=0
filter=.
case "${1:-}" in
  -l) list=1 ;;
  "") ;;
  *) filter=$1 ;;
esac

targets=()
while IFS= read -r dir; do
  rel=".${dir#"$PWD"}"
  for f in "$dir"/*_test.go; do
    [ -e "$f" ] || continue
    while IFS= read -r name; do
      targets+=("$rel $name")
    done < <(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)([A-Za-z_][A-Za-z0-9_]* \*testing\.F).*/\1/p' "$f")
  done
done < <($GO list -f '{{.Dir}}' ./...)

if [ ${#targets[@]} -eq 0 ]; then
  echo "fuzz: no fuzz targets found" >&2
  exit 1
fi

failed=()
ran=0
for t in "${targets[@]}"; do
  pkg=${t% *}
  name=${t#* }
  if ! [[ $name =~ $filter ]]; then continue; fi
  if [ $list = 1 ]; then echo "$pkg $name"; continue; fi
  ran=$((ran + 1))
  echo "fuzz: $name ($pkg) for $FUZZTIME"
  if ! $GO test -run '^$' -fuzz "^${name}\$" -fuzztime "$FUZZTIME" -timeout "$FUZZ_TIMEOUT" "$pkg"; then
    failed+=("$pkg $name")
  fi
done

if [ $list = 0 ] && [ $ran -eq 0 ]; then
  echo "fuzz: no target matches $filter" >&2
  exit 1
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED targets:" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
