#!/usr/bin/env bash
# Installs the real OpenID provider the oauth2 tests run — the npm package
# oidc-provider, pinned (exact version and lockfile in
# internal/testservers/oidcprovider/) — idempotently, into a cache outside
# the repository, and prints the path of its entry point. Node.js (>= 20)
# and npm must be on PATH; nothing is done when the pinned version is
# already installed.
set -euo pipefail
OIDC_PROVIDER_VERSION=${OIDC_PROVIDER_VERSION:-9.13.3}
SRC="$(cd "$(dirname "$0")/.." && pwd)/internal/testservers/oidcprovider"
DIR="${XDG_CACHE_HOME:-$HOME/.cache}/keygate/npm/oidc-provider-${OIDC_PROVIDER_VERSION}"
ENTRY="$DIR/node_modules/oidc-provider/lib/index.js"
installed() {
  [ -f "$ENTRY" ] && grep -q "\"version\": \"${OIDC_PROVIDER_VERSION}\"" "$DIR/node_modules/oidc-provider/package.json"
}
if installed; then echo "$ENTRY"; exit 0; fi
command -v node >/dev/null || { echo "oidc-provider.sh: node not found (apt-get install nodejs)" >&2; exit 1; }
command -v npm >/dev/null || { echo "oidc-provider.sh: npm not found (apt-get install npm)" >&2; exit 1; }
grep -q "\"oidc-provider\": \"${OIDC_PROVIDER_VERSION}\"" "$SRC/package.json" || {
  echo "oidc-provider.sh: $SRC/package.json does not pin oidc-provider ${OIDC_PROVIDER_VERSION}" >&2; exit 1; }
mkdir -p "$DIR"
cp "$SRC/package.json" "$SRC/package-lock.json" "$DIR/"
# npm ci: exactly the lockfile's tree; no install scripts run.
npm ci --prefix "$DIR" --ignore-scripts --no-audit --no-fund --loglevel=error >&2
installed || { echo "oidc-provider.sh: install did not produce oidc-provider ${OIDC_PROVIDER_VERSION}" >&2; exit 1; }
echo "$ENTRY"
