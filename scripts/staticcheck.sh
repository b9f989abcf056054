#!/usr/bin/env bash
# Installs staticcheck (pinned) from the Go module proxy into a cache outside
# the repository, idempotently, and prints the binary's path.
set -euo pipefail
STATICCHECK_VERSION=${STATICCHECK_VERSION:-v0.8.2}
BIN="${XDG_CACHE_HOME:-$HOME/.cache}/keygate/bin/staticcheck-${STATICCHECK_VERSION}"
if [ ! -x "$BIN/staticcheck" ]; then
  (cd / && GOFLAGS= GOBIN="$BIN" go install "honnef.co/go/tools/cmd/staticcheck@${STATICCHECK_VERSION}") >&2
fi
echo "$BIN/staticcheck"
