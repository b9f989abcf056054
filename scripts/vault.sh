#!/usr/bin/env bash
# Builds the Vault server (pinned version) from the Go module proxy,
# idempotently, into a cache outside the repository, and prints the binary path.
#
# `go install github.com/hashicorp/vault@vX` is refused (its go.mod has
# replace directives pointing at ./api and ./sdk, which are separate modules),
# so the module is built as the main module with those replaces dropped and
# the published api/sdk versions its go.mod already requires
# (../shared/TESTING.md §1). ~13 min cold on 2 cores, ~5.5 GB RAM; nothing is
# done when the binary is present.
set -euo pipefail
VAULT_VERSION=${VAULT_VERSION:-v1.21.0}
BIN="${XDG_CACHE_HOME:-$HOME/.cache}/keygate/bin/vault-${VAULT_VERSION}"
if [ -x "$BIN/vault" ]; then echo "$BIN/vault"; exit 0; fi
command -v go >/dev/null || { echo "vault.sh: go not found" >&2; exit 1; }
modjson() { (cd "$(mktemp -d)" && go mod download -json "$1"); }
field() { sed -n "s/^[[:space:]]*\"$1\":[[:space:]]*\"\(.*\)\",\{0,1\}\$/\1/p" | head -n1; }
SRC=$(modjson "github.com/hashicorp/vault@${VAULT_VERSION}" | field Dir)
[ -n "$SRC" ] && [ -d "$SRC" ] || { echo "vault.sh: could not download github.com/hashicorp/vault@${VAULT_VERSION}" >&2; exit 1; }
W=$(mktemp -d); TMPBIN="$BIN.tmp.$$"
trap 'rm -rf "$W" "$TMPBIN"' EXIT
cp -r "$SRC"/. "$W"; chmod -R u+w "$W"
cd "$W"
# Drop the local replaces (./api, ./sdk, ./api/auth/*); keep third-party ones.
for r in $(go mod edit -json | sed -n '/"Replace"/,$p' | grep -B3 '"Path": "\./' | sed -n 's/.*"Path": "\(github.com[^"]*\)".*/\1/p'); do
  go mod edit -dropreplace="$r"
done
# go.sum of the release lacks the published api/sdk modules: add their sums.
for pv in $(go mod edit -json | tr -d ' \t\n' | grep -o '{"Path":"github.com/hashicorp/vault/[^"]*","Version":"[^"]*"' | sed 's/{"Path":"\([^"]*\)","Version":"\([^"]*\)"/\1@\2/'); do
  j=$(modjson "$pv")
  p=${pv%@*}; v=${pv#*@}
  echo "$p $v $(echo "$j" | field Sum)" >> go.sum
  echo "$p $v/go.mod $(echo "$j" | field GoModSum)" >> go.sum
done
mkdir -p "$TMPBIN"
CGO_ENABLED=1 GOFLAGS=-mod=mod go build -trimpath -ldflags '-s -w' -o "$TMPBIN/vault" . >&2
mkdir -p "$BIN"
mv -f "$TMPBIN/vault" "$BIN/vault"
echo "$BIN/vault"
