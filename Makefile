# qwen-operator: make run (serve the demo model), make test (everything), make help (the rest)
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 8000
HOST ?= 127.0.0.1
PYTEST_ARGS ?=

.PHONY: help venv run test test-unit test-server test-cluster test-keda bench bench-gpu bench-smoke soak fuzz \
        dev-cluster dev-cluster-down e2e-kind manifests system-deps k8s-bin clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the project with its dev extras

run: $(STAMP) ## serve the built-in demo model (random weights) at http://$(HOST):$(PORT)
	$(VENV)/bin/qwen-serve --model demo --host $(HOST) --port $(PORT)

system-deps: ## install what the tests need from Debian (chromium, prometheus)
	@scripts/system-deps

k8s-bin: ## build the local control plane's binaries (cached)
	@scripts/k8s-bin

test: $(STAMP) system-deps k8s-bin ## run the whole suite: unit, server, browser, Prometheus and the local control plane
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP) ## unit and server tests only
	$(PY) -m pytest tests/unit tests/server $(PYTEST_ARGS)

test-cluster: $(STAMP) k8s-bin ## the operator against the local control plane
	$(PY) -m pytest tests/cluster $(PYTEST_ARGS)

test-keda: $(STAMP) k8s-bin ## the real KEDA scales a QwenDeployment on queue depth (builds KEDA first: long)
	scripts/system-deps keda
	scripts/k8s-bin keda >/dev/null
	QWEN_TEST_KEDA=1 $(PY) -m pytest tests/cluster/test_keda.py $(PYTEST_ARGS)

bench: $(STAMP) ## benchmark qwen-serve against the seeds' design and llama.cpp (slow; see bench/README.md)
	$(PY) -m bench.run $(BENCH_ARGS)

bench-gpu: $(STAMP) ## the CUDA path on a GPU: parity with transformers, throughput at 1-256 streams (needs a GPU)
	$(PY) -m bench.gpu $(BENCH_ARGS)

bench-smoke: $(STAMP) ## a quick run of the benchmark harness on the tiny model
	$(PY) -m bench.run --smoke

soak: $(STAMP) ## the long soak: many requests, cancellations and overload against one server
	QWEN_SOAK=long $(PY) -m pytest tests/server/test_soak.py -q $(PYTEST_ARGS)

fuzz: $(STAMP) ## the API fuzzer and the property tests on fresh examples, twenty times as many (slow)
	QWEN_FUZZ=long $(PY) -m pytest tests/server/test_fuzz.py tests/unit/test_reasoning.py tests/unit/test_toolcalls.py \
	  -q $(PYTEST_ARGS)

dev-cluster: $(STAMP) k8s-bin ## start the local control plane and run the operator against it
	scripts/dev-cluster up
	@echo; scripts/dev-cluster env; echo
	KUBECONFIG=$$(scripts/dev-cluster kubeconfig) QWEN_OPERATOR_DEFAULT_IMAGE=qwen-inference:dev \
	  $(VENV)/bin/qwen-operator

dev-cluster-down: ## stop the local control plane
	scripts/dev-cluster down

e2e-kind: ## end to end on kind (needs Docker and kind)
	tests/e2e/kind.sh

manifests: $(STAMP) k8s-bin ## render manifests/install.yaml from the chart and the CRD reference into the README
	$(PY) scripts/render.py

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache
