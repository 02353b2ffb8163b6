# d2m-mediator build, test and tooling targets. `make test` is the README's
# test command and what CI runs.
GO            ?= go
BIN           := $(CURDIR)/bin
PROTOC_GEN_GO := google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
FUZZTIME      ?= 60s
TEST_TIMEOUT  ?= 20m
# The toolchain stamps vcs.revision only where .git is a directory (not in a
# git worktree); `mediator version` falls back to this.
REVISION      := $(shell git rev-parse HEAD 2>/dev/null)$(shell git diff --quiet HEAD 2>/dev/null || echo -modified)
LDFLAGS       := -ldflags '-X main.revision=$(REVISION)'

STATICCHECK   := honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: all build run cluster soak test test-cluster test-short vet fmt-check staticcheck proto proto-check fuzz bench bench-full bench-prod bench-store bench-smoke bench-postgres crashtest crashtest-cluster deploy-check clean

all: build

build: ## binaries into ./bin
	$(GO) build $(LDFLAGS) -o $(BIN)/ ./cmd/...

# run builds the mediator and execs it: the shell make starts is replaced by
# the server, so the SIGTERM make forwards to its child and the SIGINT of
# Ctrl-C reach the server itself (`go run` would not pass them on and leave
# the server holding its ports and the database lock). Flags: RUN_ARGS or
# MEDIATOR_<FLAG> variables, e.g. MEDIATOR_DATA=/tmp/d make run.
run: ## build and exec the mediator with local defaults (./data, stand-in chat server)
	$(GO) build $(LDFLAGS) -o $(BIN)/mediator ./cmd/mediator
	exec $(BIN)/mediator serve $(RUN_ARGS)

# cluster starts three etcd members, one stand-in chat server, three nodes
# and HAProxy on this machine and prints how to connect a device; Ctrl-C
# stops all of it (deploy/local/cluster.sh; needs the Debian packages
# etcd-server, haproxy and curl). CLUSTER_* variables change its ports and
# data directory (./data/cluster).
cluster: ## a three-node cluster on this machine behind HAProxy (Ctrl-C stops it)
	$(GO) build $(LDFLAGS) -o $(BIN)/ ./cmd/mediator ./cmd/chatstub ./cmd/d2m-device
	exec env BIN=$(BIN) deploy/local/cluster.sh

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

staticcheck: ## pinned; first run builds it (~30 s)
	$(GO) run $(STATICCHECK) ./...

# integration/cluster is a module of its own (the embedded etcd server
# must not become a dependency of the mediator binary); it runs here too.
CLUSTER_TESTS := integration/cluster

test: fmt-check vet ## vet + race tests of every package (CI)
	$(GO) test -race -count=1 -timeout=$(TEST_TIMEOUT) ./...
	cd $(CLUSTER_TESTS) && $(GO) vet ./... && $(GO) test -race -count=1 -timeout=$(TEST_TIMEOUT) ./...

test-cluster: ## only the cluster control plane against 3 embedded etcd members
	$(GO) test -race -count=1 ./cluster/...
	cd $(CLUSTER_TESTS) && $(GO) test -race -count=1 -v ./...

test-short:
	$(GO) test -short -count=1 ./...

# proto regenerates the committed protobuf code byte for byte. Needs protoc
# 3.21.12 (Debian: apt-get install protobuf-compiler); protoc-gen-go is
# pinned here.
proto:
	GOBIN=$(BIN) $(GO) install $(PROTOC_GEN_GO)
	protoc --plugin=protoc-gen-go=$(BIN)/protoc-gen-go -I proto --go_out=proto \
		--go_opt=paths=source_relative proto/d2mpb/d2m.proto proto/d2dpb/d2d.proto

proto-check: proto
	git diff --exit-code proto/

# fuzz runs every fuzz target for FUZZTIME each (go test -fuzz takes one
# target per invocation).
fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
		for t in $$($(GO) test -list '^Fuzz' $$pkg 2>/dev/null | grep '^Fuzz' || true); do \
			echo "== $$pkg $$t ($(FUZZTIME))"; \
			$(GO) test -run='^$$' -fuzz="^$$t$$" -fuzztime=$(FUZZTIME) $$pkg; \
		done; \
	done

bench: ## short benchmark run: Go benchmarks + every d2m-load scenario (<5 min)
	cmd/d2m-load/bench.sh

bench-full: ## the runs behind BENCHMARKS.md (~8 min); results in $$BENCH_OUT
	FULL=1 cmd/d2m-load/bench.sh

# bench-prod: the production-shape workload (d2m-load --scenario mixed)
# against a mediator and a separate chatstub process; sizes from the
# environment, e.g. DEVICES=50000 DURATION=10m make bench-prod (see
# cmd/d2m-load/prodbench.sh for the others and for the limits it raises).
bench-prod: build ## production-shape mixed workload, 5,000 devices for 3 min by default (~4 min); results in $$BENCH_OUT
	BIN=$(BIN) cmd/d2m-load/prodbench.sh

bench-store: build ## reflection-store figures: the store alone at fixed rates, then ReflectAck latency, CPU, commits, bytes per reflect (~3 min)
	REFLECTION_PACED=1 $(GO) test -count=1 -run 'TestPacedLoad|TestPagesPerCommitFlat|TestBacklogMemory' -v ./reflection/
	BIN=$(BIN) cmd/d2m-load/storebench.sh

crashtest: ## long SIGKILL crash loop, then 50 power cuts (needs FUSE: root and /dev/fuse)
	CRASH_ITERATIONS=200 $(GO) test -count=1 -timeout=60m -run 'TestCrashLoop' ./integration/
	POWERCUT_ITERATIONS=50 $(GO) test -count=1 -timeout=60m -run 'TestPowerCut' ./integration/...

crashtest-cluster: ## 50 rounds of SIGKILL to a node of 3 on one PostgreSQL database under load (needs the Debian package postgresql)
	cd $(CLUSTER_TESTS) && CRASH_CLUSTER_ROUNDS=50 $(GO) test -count=1 -timeout=60m -run 'TestPostgresSIGKILLUnderLoad' -v .

# soak runs three `mediator serve` processes and three etcd members under a
# mixed workload with moves every minute, a drain and undrain every 15
# minutes and a SIGKILL every 10, first with bbolt, then with PostgreSQL
# (SOAK each; SOAK_STORE=bbolt or postgres for one); it samples the nodes'
# resources every 30 s and ends with the delivery and slope checks
# (integration/cluster/soak_test.go). Samples, plots and summaries go to
# SOAK_OUT. Not in CI.
SOAK      ?= 60m
SOAK_OUT  ?= $(CURDIR)/docs/soak
soak: ## SOAK (60m) with bbolt, then SOAK with PostgreSQL: resource slopes, delivery check, plots in docs/soak/
	cd $(CLUSTER_TESTS) && SOAK=$(SOAK) SOAK_OUT=$(SOAK_OUT) $(GO) test -count=1 -timeout=0 -run 'TestSoak' -v .

# deploy-check checks deploy/ with the tools that read those files
# (systemd-analyze, nginx, haproxy, caddy, promtool; Debian packages
# systemd, nginx, haproxy, caddy, prometheus). Missing tools are skipped
# with a message; CI installs them and sets DEPLOY_CHECK_STRICT=1. The metric
# names in the rules and dashboard are checked by TestDeployMetricsExist in
# make test.
bench-postgres: build ## PostgreSQL store (primary + synchronous standby) against bbolt, alternating, in one run (~3 min)
	BIN=bin cmd/d2m-load/pgbench.sh

bench-smoke: ## every Go benchmark once, so none can rot (CI, ~30 s)
	$(GO) test -run '^$$' -bench=. -benchtime=1x ./...

deploy-check: ## check deploy/: systemd unit, nginx/haproxy/caddy configs, Prometheus rules (~5 s)
	deploy/check.sh

clean:
	rm -rf $(BIN)
