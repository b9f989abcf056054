#!/usr/bin/env bash
# Installs the real clients the tests drive (curl, git) and the real servers
# they run (SPIRE, MinIO, Vault), idempotently.
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
# SPIRE server + agent for the SPIFFE integration tests: built once from the
# Go module proxy into a version-keyed cache (scripts/spire.sh; ~8 min cold).
# MinIO (STS + SigV4-verifying S3) and Vault likewise (scripts/minio.sh,
# scripts/vault.sh). Built one after the other: 2 cores, Vault peaks at ~5 GB.
for server in spire minio vault; do
  if ! "$(dirname "$0")/$server.sh" >/dev/null; then
    if [ "${CI:-}" = true ]; then echo "deps: building $server failed" >&2; exit 1; fi
    echo "deps: building $server failed; the tests that need it will skip" >&2
  fi
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
elif [ "${CI:-}" = true ]; then
  echo "deps: missing ${need[*]} and cannot install them" >&2; exit 1
else
  echo "deps: missing ${need[*]}; the tests that need them will say so" >&2
fi
