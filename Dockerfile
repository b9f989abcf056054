# Multi-stage build: a static binary on a minimal, non-root image.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o /out/broker ./cmd/broker

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/broker /usr/local/bin/broker
USER 65532:65532
EXPOSE 15080 15090
ENTRYPOINT ["/usr/local/bin/broker"]
CMD ["run", "--config", "/etc/keygate/config.yaml"]
