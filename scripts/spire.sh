#!/usr/bin/env bash
# Builds SPIRE server and agent (pinned version) from the Go module proxy,
# idempotently, into a cache outside the repository, and prints the bin dir.
#
# `go install github.com/spiffe/spire/cmd/...@vX` does not work against the
# project's module proxy (it reads @v/list for the deprecation check, which is
# refused), so the module is downloaded and built as the main module instead
# (see ../shared/TESTING.md §3). Needs cgo (mattn/go-sqlite3). ~7-9 min cold
# on 2 cores, ~4 GB RAM; nothing is done when the binaries are present.
set -euo pipefail
SPIRE_VERSION=${SPIRE_VERSION:-v1.13.3}
BIN="${XDG_CACHE_HOME:-$HOME/.cache}/keygate/bin/spire-${SPIRE_VERSION}"
if [ -x "$BIN/spire-server" ] && [ -x "$BIN/spire-agent" ]; then
  echo "$BIN"; exit 0
fi
command -v go >/dev/null || { echo "spire.sh: go not found" >&2; exit 1; }
# Module directory without depending on jq: go mod download prints JSON, and
# go list can format a field of it.
SRC=$(cd "$(mktemp -d)" && go mod download -json "github.com/spiffe/spire@${SPIRE_VERSION}" \
  | sed -n 's/^[[:space:]]*"Dir":[[:space:]]*"\(.*\)",\{0,1\}$/\1/p' | head -n1)
[ -n "$SRC" ] && [ -d "$SRC" ] || { echo "spire.sh: could not download github.com/spiffe/spire@${SPIRE_VERSION}" >&2; exit 1; }
W=$(mktemp -d); TMPBIN="$BIN.tmp.$$"
trap 'rm -rf "$W" "$TMPBIN"' EXIT
cp -r "$SRC"/. "$W"; chmod -R u+w "$W"
mkdir -p "$TMPBIN"
(cd "$W" && CGO_ENABLED=1 GOFLAGS=-mod=mod go build -trimpath -o "$TMPBIN/" ./cmd/spire-server ./cmd/spire-agent) >&2
mkdir -p "$BIN"
mv -f "$TMPBIN/spire-server" "$TMPBIN/spire-agent" "$BIN/"
echo "$BIN"
