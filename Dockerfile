# Two images from one file (see docs/kubernetes.md):
#
#   docker build -t keygate/broker .                                  # the broker (the last stage, the default)
#   docker build --target iptables-init -t keygate/iptables-init .    # the redirect init container
#
# The broker: a static binary (CGO_ENABLED=0) on distroless/static, running as
# uid:gid 65532:65532. That uid is the default --exempt-uid of
# deploy/keygate-iptables, so the broker's own upstream connections are never
# redirected back to it; change one, change the other (and runAsUser in
# deploy/kubernetes). deploy/iptables_test.go and deploy/kubernetes check it.
#
# Read-only root filesystem: the broker writes nothing outside the paths its
# config names. With `--config`, the only runtime file is the ephemeral CA's
# `ca.cert_out` (written atomically: a temp file in the same directory, then a
# rename), so point it into a mounted, writable volume (an emptyDir shared
# with the application, e.g. /var/run/keygate/ca.pem) and mount the config
# read-only from a ConfigMap. (`demo.echo` writes a token beside the config
# and a `unix:` listener creates its socket there: development only. Without
# `--config` the quick start writes to $TMPDIR.)

ARG GO_VERSION=1.26

FROM golang:${GO_VERSION} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" \
      -o /out/broker ./cmd/broker

# The init container: deploy/keygate-iptables with nft (default backend) and
# iptables (nf_tables and legacy variants, the fallbacks). It runs as uid 0
# because Kubernetes gives added capabilities (NET_ADMIN) only to root: a
# non-root process loses them when it execs, as there is no way to set
# ambient capabilities from a pod spec. The manifests drop every other
# capability, forbid privilege escalation and mount the root read-only (with
# an emptyDir on /run for iptables-legacy's lock file).
FROM debian:bookworm-slim AS iptables-init
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables iptables \
 && rm -rf /var/lib/apt/lists/*
# The script is mode 0755 in git; COPY keeps the mode.
COPY deploy/keygate-iptables /usr/local/bin/keygate-iptables
USER 0:0
ENTRYPOINT ["/usr/local/bin/keygate-iptables"]

# The broker. Last, so a plain `docker build .` builds it.
FROM gcr.io/distroless/static-debian12:nonroot AS broker
COPY --from=build /out/broker /usr/local/bin/broker
USER 65532:65532
# 15080 listen.proxy, 15001 listen.transparent, 15090 listen.admin
EXPOSE 15001 15080 15090
ENTRYPOINT ["/usr/local/bin/broker"]
CMD ["run", "--config", "/etc/keygate/config.yaml"]
