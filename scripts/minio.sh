#!/usr/bin/env bash
# Builds MinIO (pinned pseudo-version) from the Go module proxy, idempotently,
# into a cache outside the repository, and prints the binary path.
# MinIO is the tests' real STS AssumeRole endpoint and SigV4-verifying S3
# (../shared/TESTING.md §2). ~4.5 min cold on 2 cores; nothing is done when
# the binary is present.
set -euo pipefail
MINIO_VERSION=${MINIO_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}
BIN="${XDG_CACHE_HOME:-$HOME/.cache}/keygate/bin/minio-${MINIO_VERSION}"
if [ -x "$BIN/minio" ]; then echo "$BIN/minio"; exit 0; fi
command -v go >/dev/null || { echo "minio.sh: go not found" >&2; exit 1; }
TMPBIN="$BIN.tmp.$$"
trap 'rm -rf "$TMPBIN"' EXIT
mkdir -p "$TMPBIN"
(cd / && GOFLAGS= GOBIN="$TMPBIN" go install -trimpath -ldflags '-s -w' "github.com/minio/minio@${MINIO_VERSION}") >&2
mkdir -p "$BIN"
mv -f "$TMPBIN/minio" "$BIN/minio"
echo "$BIN/minio"
