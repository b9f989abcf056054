# keygate broker. `make test` is what CI runs (see README and .ci/run).
GO       ?= go
PKGS     := ./...
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT   ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS  := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)
FUZZTIME ?= 30s
FUZZTIME_CI ?= 2s
LOAD_DURATION ?= 30s
LOAD_SOAK     ?= 20m

.PHONY: run build test lint bench fuzz fuzz-ci load deps clean

run: ## serve the embedded quick start (no config, no outside service)
	$(GO) run ./cmd/broker run

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/broker ./cmd/broker

test: deps lint ## everything CI runs
	$(GO) run ./cmd/broker test configs/tests/*.yaml
	$(GO) test -race -count=1 $(PKGS)
	cd deploy/kubernetes && $(GO) test -count=1 ./...
	$(MAKE) fuzz-ci

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) vet -tags load ./integration/
	@# staticcheck, pinned (scripts/staticcheck.sh); the nested deploy module too.
	SC=$$(scripts/staticcheck.sh) && $$SC $(PKGS) && cd deploy/kubernetes && $$SC ./...
	@# govulncheck, pinned; skipped with one line when its database is
	@# unreachable (KEYGATE_VULNDB, KEYGATE_REQUIRE_VULNCHECK=1: scripts/govulncheck.sh).
	scripts/govulncheck.sh $(PKGS) && cd deploy/kubernetes && ../../scripts/govulncheck.sh ./...
	@# Unsafe defaults must never ship outside tests (SECURITY-TESTS.md §1).
	@# An explicit opt-in (PostgreSQL tls: require) is marked on its line with
	@# "lint:insecure-ok" and a reason; everything else fails.
	@# Any InsecureSkipVerify set to anything but a literal false (true in
	@# any spacing, on the next line, a variable, an expression) counts.
	@if git grep --untracked -n -E 'InsecureSkipVerify[[:space:]]*(:|=($$|[^=]))|goproxy\.GoproxyCa|goproxy\.(MitmConnect|OkConnect|RejectConnect)\b' -- '*.go' ':!*_test.go' | grep -v -E 'lint:insecure-ok|InsecureSkipVerify[[:space:]]*(:|=)[[:space:]]*false[[:space:]]*[,}]*[[:space:]]*(//.*)?$$'; then \
	  echo "unsafe default outside tests"; exit 1; fi
	@# goproxy types never leave internal/intercept.
	@if git grep -l 'elazarl/goproxy' -- '*.go' ':!internal/intercept/*' | grep -v '_test.go'; then \
	  echo "goproxy imported outside internal/intercept"; exit 1; fi
	@# The secret sweep (internal/canarytest) is test-only: imported by
	@# _test.go files and internal/testservers, never linked into a command.
	@if grep -rl --include='*.go' --exclude='*_test.go' 'keygate/broker/internal/canarytest"' . | grep -v -e '^./internal/testservers/' -e '^./internal/canarytest/'; then \
	  echo "internal/canarytest imported outside tests"; exit 1; fi
	@if $(GO) list -deps ./cmd/... | grep -qx 'github.com/keygate/broker/internal/canarytest'; then \
	  echo "internal/canarytest is linked into a command"; exit 1; fi

bench: ## broker vs bare goproxy vs direct, plus the micro benchmarks
	$(GO) test -run '^$$' -bench . -benchtime 3s ./internal/...

fuzz: ## every fuzz target (discovered by scripts/fuzz.sh) for FUZZTIME each
	FUZZTIME=$(FUZZTIME) GO=$(GO) scripts/fuzz.sh

fuzz-ci: ## the short fuzz run of `make test`: every target for FUZZTIME_CI
	FUZZTIME=$(FUZZTIME_CI) GO=$(GO) scripts/fuzz.sh

load: ## load scenarios L-01..L-11 (SECURITY-TESTS.md §6); not part of `make test`
	@mkdir -p bin && rm -f bin/load-results.txt
	@# bin/load.log is the whole run, bin/load-results.txt its "LOAD L-nn" lines.
	{ LOAD_DURATION=$(LOAD_DURATION) LOAD_SOAK=$(LOAD_SOAK) LOAD_RESULTS=$(CURDIR)/bin/load-results.txt \
	  $(GO) test -tags load -run '^TestLoad' -count=1 -timeout 90m -v ./integration/; echo $$? > bin/load.rc; } 2>&1 | tee bin/load.log; \
	  exit $$(cat bin/load.rc)

deps: ## the real clients the tests drive (idempotent; installs only what is missing)
	@./scripts/deps.sh

clean:
	rm -rf bin
