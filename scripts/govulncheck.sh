#!/usr/bin/env bash
# Runs govulncheck (pinned, installed from the Go module proxy into a cache
# outside the repository, idempotently) on the given packages (default ./...).
#
# The vulnerability database is KEYGATE_VULNDB (default https://vuln.go.dev).
# An operator without internet access points it at a local mirror:
#   curl -fsSLo vulndb.zip https://vuln.go.dev/vulndb.zip   # on a connected host
#   unzip -q vulndb.zip -d /srv/vulndb                      # index/ and ID/
#   KEYGATE_VULNDB=file:///srv/vulndb scripts/govulncheck.sh
# When the database cannot be reached the check is skipped with one line
# saying so (exit 0), unless KEYGATE_REQUIRE_VULNCHECK=1 (exit 1). A database
# that answers is always used: findings and tool errors fail.
set -euo pipefail
GOVULNCHECK_VERSION=${GOVULNCHECK_VERSION:-v1.9.0}
DB=${KEYGATE_VULNDB:-https://vuln.go.dev}
BIN="${XDG_CACHE_HOME:-$HOME/.cache}/keygate/bin/govulncheck-${GOVULNCHECK_VERSION}"

unreachable() {
  echo "govulncheck: vulnerability database $DB unreachable; not checked" >&2
  if [ "${KEYGATE_REQUIRE_VULNCHECK:-0}" = 1 ]; then exit 1; fi
  exit 0
}

# Probe the database's index (the v1 layout govulncheck reads) before
# installing or loading packages, so an offline run costs nothing.
case "$DB" in
  file://*)
    [ -r "${DB#file://}/index/db.json" ] || unreachable ;;
  http://* | https://*)
    if command -v curl >/dev/null; then
      curl -fsS --max-time 15 -o /dev/null "${DB%/}/index/db.json" 2>/dev/null || unreachable
    else
      wget -q -T 15 -O /dev/null "${DB%/}/index/db.json" 2>/dev/null || unreachable
    fi ;;
  *)
    echo "govulncheck: KEYGATE_VULNDB must be an http(s):// or file:// URL" >&2
    exit 2 ;;
esac

if [ ! -x "$BIN/govulncheck" ]; then
  (cd / && GOFLAGS='' GOBIN="$BIN" go install "golang.org/x/vuln/cmd/govulncheck@${GOVULNCHECK_VERSION}") >&2
fi
[ $# -gt 0 ] || set -- ./...
exec "$BIN/govulncheck" -db "$DB" "$@"
