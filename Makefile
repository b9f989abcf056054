# keygate broker. `make test` is what CI runs (see README and .ci/run).
GO       ?= go
PKGS     := ./...
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT   ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS  := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)
FUZZTIME ?= 10s

.PHONY: run build test lint bench fuzz deps clean

run: ## serve the embedded quick start (no config, no outside service)
	$(GO) run ./cmd/broker run

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/broker ./cmd/broker

test: deps lint ## everything CI runs
	$(GO) run ./cmd/broker test configs/tests/*.yaml
	$(GO) test -race -count=1 $(PKGS)
	cd deploy/kubernetes && $(GO) test -count=1 ./...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	@# staticcheck, pinned (scripts/staticcheck.sh); the nested deploy module too.
	SC=$$(scripts/staticcheck.sh) && $$SC $(PKGS) && cd deploy/kubernetes && $$SC ./...
	@# Unsafe defaults must never ship outside tests (SECURITY-TESTS.md §1).
	@# An explicit opt-in (PostgreSQL tls: require) is marked on its line with
	@# "lint:insecure-ok" and a reason; everything else fails.
	@if git grep -n -E 'InsecureSkipVerify(:|[[:space:]]*=)[[:space:]]*true|goproxy\.GoproxyCa|goproxy\.(MitmConnect|OkConnect|RejectConnect)\b' -- '*.go' ':!*_test.go' | grep -v 'lint:insecure-ok'; then \
	  echo "unsafe default outside tests"; exit 1; fi
	@# goproxy types never leave internal/intercept.
	@if git grep -l 'elazarl/goproxy' -- '*.go' ':!internal/intercept/*' | grep -v '_test.go'; then \
	  echo "goproxy imported outside internal/intercept"; exit 1; fi

bench: ## broker vs bare goproxy vs direct, plus the micro benchmarks
	$(GO) test -run '^$$' -bench . -benchtime 3s ./internal/...

fuzz: ## each fuzz target for FUZZTIME
	$(GO) test -run '^$$' -fuzz FuzzHostNormalize -fuzztime $(FUZZTIME) ./internal/intercept/
	$(GO) test -run '^$$' -fuzz FuzzClassify -fuzztime $(FUZZTIME) ./internal/intercept/egress/
	$(GO) test -run '^$$' -fuzz FuzzHostPattern -fuzztime $(FUZZTIME) ./internal/rules/
	$(GO) test -run '^$$' -fuzz FuzzHeaderInjection -fuzztime $(FUZZTIME) ./internal/inject/
	$(GO) test -run '^$$' -fuzz FuzzInferSigV4 -fuzztime $(FUZZTIME) ./internal/inject/
	$(GO) test -run '^$$' -fuzz FuzzSigV4Inject -fuzztime $(FUZZTIME) ./internal/inject/
	$(GO) test -run '^$$' -fuzz FuzzSessionName -fuzztime $(FUZZTIME) ./internal/inject/
	$(GO) test -run '^$$' -fuzz FuzzCompactJSON -fuzztime $(FUZZTIME) ./internal/rules/
	$(GO) test -run '^$$' -fuzz FuzzVaultPathTemplate -fuzztime $(FUZZTIME) ./internal/inject/
	$(GO) test -run '^$$' -fuzz FuzzScopesParam -fuzztime $(FUZZTIME) ./internal/inject/
	$(GO) test -run '^$$' -fuzz FuzzOAuth2TokenResponse -fuzztime $(FUZZTIME) ./internal/inject/
	$(GO) test -run '^$$' -fuzz FuzzGitHubParams -fuzztime $(FUZZTIME) ./internal/inject/
	$(GO) test -run '^$$' -fuzz FuzzGitHubTokenResponse -fuzztime $(FUZZTIME) ./internal/inject/
	$(GO) test -run '^$$' -fuzz FuzzProxyToken -fuzztime $(FUZZTIME) ./internal/attest/
	$(GO) test -run '^$$' -fuzz FuzzParseProcNetTCP -fuzztime $(FUZZTIME) ./internal/attest/
	$(GO) test -run '^$$' -fuzz FuzzParseCgroup -fuzztime $(FUZZTIME) ./internal/attest/
	$(GO) test -run '^$$' -fuzz FuzzStartupMessage -fuzztime $(FUZZTIME) ./internal/dbproxy/

deps: ## the real clients the tests drive (idempotent; installs only what is missing)
	@./scripts/deps.sh

clean:
	rm -rf bin
