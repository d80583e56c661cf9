# Ferry: `make serve` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ferry-installed
export MLFLOW_TRACKING_URI ?= sqlite:///.ferry/mlflow.db
DEMO_MODELS ?= tabular-mlp-onnx=models:/tabular-mlp-onnx@champion,tabular-mlp=models:/tabular-mlp@champion,image-cnn=models:/image-cnn@champion
# Tools installed into the venv (kubectl, hadolint, zizmor, ...) come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install tools serve register-demo test lint unit integration ops loadtest-smoke fmt clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh locks/cpu-dev.txt
	bash scripts/install.sh
	touch $@

# Refresh the hashed lock files (locks/*.txt) from pyproject.toml and pin every Dockerfile FROM by digest
# (locks/images.txt): scripts/lock.py. Needs PyPI, and the registries for the digests.
.PHONY: lock
lock:
	python3 scripts/lock.py

tools:
	bash scripts/tools.sh

register-demo: install
	$(PY) -m service register-demo

serve: register-demo
	FERRY_MODELS="$${FERRY_MODELS:-$(DEMO_MODELS)}" $(PY) -m service serve --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff check service tests models loadtests
	$(VENV)/bin/ruff format --check service tests models loadtests
	$(VENV)/bin/mypy

test: install tools lint
	$(VENV)/bin/pytest

unit: install
	$(VENV)/bin/pytest tests/unit

integration: install tools
	$(VENV)/bin/pytest tests/integration

ops: install tools
	$(VENV)/bin/pytest tests/ops

loadtest-smoke: install tools
	$(VENV)/bin/pytest tests/perf -q

fmt: install
	$(VENV)/bin/ruff format service tests models loadtests
	$(VENV)/bin/ruff check --fix service tests models loadtests

clean:
	rm -rf $(VENV) .ferry .pytest_cache .mypy_cache .ruff_cache

# Benchmark (docs/benchmarks.md, bench/results/) and the gated Locust run (loadtests/reports/).
# Extra arguments: make bench BENCH_ARGS="--duration 5 --warmup 2"; make loadtest LOADTEST_ARGS="--duration 60".
# The soak (README, Reliability): 10 minutes of mixed traffic at 64 connections against a Ferry on a registry
# of its own, results in loadtests/reports/soak/; make soak SOAK_ARGS="--duration 60".
.PHONY: bench loadtest soak
bench: register-demo tools
	$(PY) models/tabular.py churn-sklearn
	$(PY) loadtests/bench.py --duration 20 --warmup 5 --docs docs/benchmarks.md $(BENCH_ARGS)

loadtest: register-demo tools
	$(PY) loadtests/loadtest.py --profile full --duration 45 --floor-duration 15 --users 32 --reports loadtests/reports $(LOADTEST_ARGS)

soak: install
	$(PY) loadtests/soak.py --duration 600 --connections 64 --out loadtests/reports/soak $(SOAK_ARGS)
