#!/usr/bin/env bash
# Installs the real clients the tests drive (curl, git) and the real servers
# they run (PostgreSQL, SPIRE, MinIO, Vault, oidc-provider), idempotently.
# Nothing is downloaded when they are already present; in CI (CI=true) a
# missing tool that cannot be installed is an error, never a silent skip.
set -euo pipefail
need=()
command -v curl >/dev/null || need+=(curl)
command -v git >/dev/null || need+=(git)
[ -x "$(git --exec-path 2>/dev/null)/git-http-backend" ] || need+=(git)
# Transparent mode: the redirect script's backends and network namespaces.
command -v iptables >/dev/null || need+=(iptables)
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v setpriv >/dev/null || need+=(util-linux)
command -v shellcheck >/dev/null || need+=(shellcheck)   # lints deploy/keygate-iptables
command -v node >/dev/null || need+=(nodejs)            # runs oidc-provider
# PostgreSQL 15: temporary clusters (initdb, pg_ctl) and the clients psql, pgbench.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v psql >/dev/null || need+=(postgresql-client)
command -v pgbench >/dev/null || need+=(postgresql-client)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  elif [ "${CI:-}" = true ]; then
    echo "deps: missing ${need[*]} and cannot install them" >&2; exit 1
  else
    echo "deps: missing ${need[*]}; the tests that need them will say so" >&2
  fi
fi
# Servers, after the packages (oidc-provider needs node). SPIRE server +
# agent for the SPIFFE integration tests: built once from the Go module proxy
# into a version-keyed cache (scripts/spire.sh; ~8 min cold). MinIO (STS +
# SigV4-verifying S3) and Vault likewise (scripts/minio.sh, scripts/vault.sh),
# one after the other: 2 cores, Vault peaks at ~5 GB. oidc-provider (npm,
# pinned by lockfile) is the OAuth2 token endpoint.
for server in spire minio vault oidc-provider; do
  if ! "$(dirname "$0")/$server.sh" >/dev/null; then
    if [ "${CI:-}" = true ]; then echo "deps: building $server failed" >&2; exit 1; fi
    echo "deps: building $server failed; the tests that need it will skip" >&2
  fi
done
