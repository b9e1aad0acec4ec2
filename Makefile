# infergrid — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CACHE ?= $(HOME)/.cache/infergrid
TORCH_VERSION ?= 2.11.0
PYTEST_ARGS ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install lint test test-unit e2e bench gpu-wheels demo testbed-build testbed-up testbed-down clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: worker/pyproject.toml operator/pyproject.toml testbed/pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e worker -e operator -e testbed -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed ## create .venv with both packages (editable) and the test tools

lint: install ## ruff over the whole repo
	$(VENV)/bin/ruff check .

testbed-build: install ## build the pinned control-plane binaries into ~/.cache/infergrid (skips what is built)
	$(PY) -m infergrid.testbed.cli build

testbed-up: testbed-build ## start the local control plane in the background; kubeconfig in .testbed/kubeconfig
	$(PY) -m infergrid.testbed.cli up

testbed-down: ## stop the local control plane started by testbed-up
	$(PY) -m infergrid.testbed.cli down

test: install testbed-build ## the whole suite (what .ci/run calls)
	$(VENV)/bin/ruff check .
	$(PY) -m infergrid.testbed.cli exec -- $(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-unit: install ## fast CPU unit tests only (no control plane)
	$(PY) -m pytest -m "not gpu and not controlplane" tests $(PYTEST_ARGS)

e2e: install testbed-build ## end-to-end scenarios on the local control plane
	$(PY) -m infergrid.testbed.cli exec -- $(PY) -m pytest e2e $(PYTEST_ARGS)

bench: install testbed-build ## benchmarks: operator (any machine) + GPU set (needs CUDA); see bench/README.md
	$(PY) -m infergrid.testbed.cli exec -- $(PY) bench/bench_operator.py --services 1000 --out bench/results/operator.json
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  $(PY) bench/bench_prefix_cache.py --out bench/results/prefix_cache.json && \
	  $(PY) bench/bench_spec_decode.py --out bench/results/spec_decode.json && \
	  $(PY) bench/bench_tensor_parallel.py --out bench/results/tensor_parallel.json; \
	else echo "no CUDA device: GPU benchmarks skipped (run them on a GPU machine)"; fi

gpu-wheels: install ## wheels the lent GPU machine lacks (pytest tools, py-spy, the worker server's HTTP stack) into build/gpu-wheels
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d build/gpu-wheels \
	  pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0 pytest-timeout==2.4.0 py-spy==0.4.3 \
	  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
	  typing-inspection==0.4.5 typing_extensions==4.16.0 uvicorn==0.55.0 opentelemetry-api==1.45.3

demo: install testbed-build ## local control plane + operator + tiny model + one completion (DEMO_ONCE=1 tears down)
	$(PY) -m infergrid.testbed.demo

clean: ## remove .venv and .testbed (the binary cache in ~/.cache/infergrid stays)
	rm -rf $(VENV) .testbed
