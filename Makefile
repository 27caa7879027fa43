# The commands a newcomer needs: `make demo` and `make test`.
# Everything else is for development and packaging.

SHELL := bash
CARGO ?= cargo
VENV ?= $(CURDIR)/.venv
export VENV

.PHONY: help demo test test-rust test-python test-soak prereqs lint fmt crds bench soak build

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

prereqs: ## Install or check PostgreSQL, Java, the Pub/Sub emulator and the Python tools
	scripts/prereqs.sh

demo: ## Run producer -> outbox -> relay -> Pub/Sub -> inbox -> consumer on throwaway infrastructure
	scripts/prereqs.sh no-python
	$(CARGO) build --release -q -p worker -p devkit
	target/release/outbox-demo $(DEMO_ARGS)

test: prereqs test-rust test-python test-soak ## Run every test, then a 2-minute soak (starts its own PostgreSQL and emulator)

test-rust:
	$(CARGO) test --workspace --all-targets --no-fail-fast -- --test-threads 2

test-python:
	$(CARGO) build -q -p operator --bin outbox-operator
	$(CARGO) build -q -p worker -p devkit --bins  # charts/tests/test_chart_alerts.py runs them
	OUTBOX_OPERATOR_BIN=$(CURDIR)/target/debug/outbox-operator operator/tests/python/run.sh
	OUTBOX_OPERATOR_BIN=$(CURDIR)/target/debug/outbox-operator charts/tests/run.sh

# The short soak CI runs: a fixed seed, so that a failure reruns the same way
# (`make soak SOAK_ARGS="--seed 11 --duration 2m --rate 500"`). It checks the
# promises under faults, not capacity: at 1,000/s the two shared cores have
# little headroom once the emulator restarts cold, and how long the relay then
# takes to catch up is a figure of the machine (docs/soak.md). Without a
# backtrace, the report and the reason for a failure are the last lines printed.
CI_SOAK_ARGS ?= --duration 2m --seed 11 --rate 500 --report target/soak/ci-report.json
test-soak:
	$(CARGO) build --release -q -p worker -p devkit
	RUST_BACKTRACE=0 target/release/outbox-soak $(CI_SOAK_ARGS)

lint: ## rustfmt and clippy, as CI wants them
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

crds: ## Regenerate crds/ from the operator's types
	$(CARGO) run -q -p operator -- crd outboxrelays > crds/outboxrelays.outbox.dev.yaml
	$(CARGO) run -q -p operator -- crd inboxrelays > crds/inboxrelays.outbox.dev.yaml

# The durable-database variants (fsync, full_page_writes and synchronous_commit on) run by
# default; BENCH_DURABLE=false leaves them out.
BENCH_DURABLE ?= true

bench: ## Relay and inbox throughput/latency vs. the database and Pub/Sub ceilings, relaxed and durable database (BENCH.md; BENCH_ARGS="--rows 100000")
	scripts/prereqs.sh no-python
	$(CARGO) build --release -q -p worker -p devkit
	BENCH_DURABLE=$(BENCH_DURABLE) target/release/outbox-bench $(BENCH_ARGS)

soak: ## Chaos soak: 10 min at 1,000 transactions/s with faults, report in target/soak/ (docs/soak.md; SOAK_ARGS="--seed 7")
	scripts/prereqs.sh no-python
	$(CARGO) build --release -q -p worker -p devkit
	target/release/outbox-soak $(SOAK_ARGS)

build: ## Release build of both binaries
	$(CARGO) build --release -p worker -p operator

# ---- Images, Helm chart, kind quickstart (docs/kubernetes.md). These targets need Docker,
# kind and helm on the machine; CI has no Docker and does not run them.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -n1)
IMAGE_REGISTRY ?= ghcr.io/outbox-dev
IMAGE_TAG ?= $(VERSION)
WORKER_REPO ?= $(IMAGE_REGISTRY)/outbox-worker
OPERATOR_REPO ?= $(IMAGE_REGISTRY)/outbox-operator
WORKER_IMG = $(WORKER_REPO):$(IMAGE_TAG)
OPERATOR_IMG = $(OPERATOR_REPO):$(IMAGE_TAG)
DOCKER ?= docker
KIND ?= kind
HELM ?= helm
KIND_CLUSTER ?= outbox
OPERATOR_NAMESPACE ?= outbox-system
KIND_ENV = KIND=$(KIND) DOCKER=$(DOCKER) HELM=$(HELM) KIND_CLUSTER=$(KIND_CLUSTER) \
	OPERATOR_NAMESPACE=$(OPERATOR_NAMESPACE) WORKER_IMAGE=$(WORKER_IMG) OPERATOR_IMAGE=$(OPERATOR_IMG)

.PHONY: images kind-up kind-down helm-install e2e test-charts

images: ## Build the outbox-worker and outbox-operator images (tag: the crate version)
	$(DOCKER) build --target worker -t $(WORKER_IMG) .
	$(DOCKER) build --target operator -t $(OPERATOR_IMG) .

kind-up: images ## kind cluster from kind-config.yaml with both images loaded
	$(KIND_ENV) scripts/kind-up.sh

helm-install: ## Install or upgrade the chart (CRD + operator) in the current kubectl context
	$(HELM) upgrade --install outbox-operator charts/outbox-operator \
		--namespace $(OPERATOR_NAMESPACE) --create-namespace \
		--set image.repository=$(OPERATOR_REPO) --set image.tag=$(IMAGE_TAG) \
		--set workerImage.repository=$(WORKER_REPO) --set workerImage.tag=$(IMAGE_TAG) \
		--wait --timeout 5m

e2e: kind-up ## End-to-end on kind: install, relay rows, fail over, delete (needs Docker)
	$(KIND_ENV) scripts/e2e.sh

kind-down: ## Delete the kind cluster
	$(KIND) delete cluster --name $(KIND_CLUSTER)

test-charts: ## Chart, RBAC, examples and Dockerfile checks (also run by test-python)
	$(CARGO) build -q -p operator --bin outbox-operator
	$(CARGO) build -q -p worker -p devkit --bins
	OUTBOX_OPERATOR_BIN=$(CURDIR)/target/debug/outbox-operator charts/tests/run.sh
