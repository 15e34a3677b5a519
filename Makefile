# One entry point for people and CI. `make test` installs what it needs into .venv, then tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: on the CPU-only CI machines pip takes the CPU build from /opt/wheels; elsewhere the CUDA build.
TORCH ?= torch==2.13.0
TRITON_CPU ?= triton==3.6.0
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
PIP := $(PY) -m pip install -q $(FIND_LINKS)
PROTOS := $(shell find protos -name '*.proto' 2>/dev/null)
MODEL ?=
DEMO_DIR ?= .cache/demo-model
ENGINE_PORT ?=
TOKENIZER_PORT ?=
ENGINE_ARGS ?=
TOKENIZER_ARGS ?=
REPLICAS ?= 2
HTTP_PORT ?= 30000
PROMETHEUS_PORT ?= 29000

.PHONY: install proto proto-gen test test-gpu fuzz soak serve serve-cluster demo-model bench lint clean

$(VENV)/.installed: pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	@# CPU builds of torch come without triton; its interpreter runs the kernel tests on CPU. Installed before
	@# the package, so that xgrammar's own triton requirement is already met by the pin.
	if $(PY) -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then $(PIP) "$(TRITON_CPU)"; fi
	$(PIP) -e ".[test]"
	touch $@

# `pip install` itself generates the gRPC code (setup.py); a .proto edit regenerates only that code.
install: $(VENV)/.installed qwen3serve/__init__.py

qwen3serve/__init__.py: $(PROTOS) | $(VENV)/.installed
	$(MAKE) --no-print-directory proto-gen

# Python code for the protos, generated (never edited) into the package tree that mirrors the proto packages.
proto: $(VENV)/.installed proto-gen

# The generation step alone, for machines with their own Python (`make proto-gen PY=python3`).
proto-gen:
	$(PY) -c "import setup; setup.generate_grpc_code()"

# Lint first: a style or type error fails CI before the slower tests run.
test: lint
	$(PY) -m pytest -q -m "not gpu" -p no:cacheprovider

# The fuzzer of tests/test_fuzz.py at length (`make test` sends 1,000 requests of seed 0): prints the tally.
SEED ?= 1
N ?= 10000
fuzz: install
	QWEN3SERVE_FUZZ_SEED=$(SEED) QWEN3SERVE_FUZZ_N=$(N) $(PY) -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py

# The issue-11 soak: request-id reuse at 1,000 rounds (`make test` runs 150), then the long fuzzer run.
soak: install
	QWEN3SERVE_REUSE_ROUNDS=1000 $(PY) -m pytest -q -p no:cacheprovider tests/test_request_identity.py
	$(MAKE) --no-print-directory fuzz

# On a CUDA machine: the GPU-only tests (kernels, CUDA graphs, backend parity).
test-gpu: install
	$(PY) -m pytest -q -m gpu -p no:cacheprovider

demo-model: install
	$(PY) -m qwen3.testing.make_checkpoint --preset demo --out $(DEMO_DIR) --skip-if-exists

# Both services under scripts/serve.py (exec: make's child is the supervisor, so SIGTERM to make reaches
# it): Ctrl-C/SIGTERM drains both; either dying stops the other and fails make. More options:
# make serve ENGINE_ARGS="--max-num-seqs 64" TOKENIZER_ARGS="--log-format json". Ports: ENGINE_PORT=,
# TOKENIZER_PORT= (unset: scripts/serve.py's defaults, which are service_common/options.py's).
serve: install
	@if [ -z "$(MODEL)" ]; then $(MAKE) --no-print-directory demo-model; fi
	exec $(PY) scripts/serve.py --model $(or $(MODEL),$(DEMO_DIR)) $(if $(ENGINE_PORT),--engine-port $(ENGINE_PORT)) \
	  $(if $(TOKENIZER_PORT),--tokenizer-port $(TOKENIZER_PORT)) --engine-args '$(ENGINE_ARGS)' \
	  --tokenizer-args '$(TOKENIZER_ARGS)'

# N engine replicas (one GPU each where there are several) and the SMG gateway in front: OpenAI HTTP on
# HTTP_PORT, Prometheus on PROMETHEUS_PORT (engine_service/cluster.py; smg comes with the test/gateway extras).
serve-cluster: install
	@if [ -z "$(MODEL)" ]; then $(MAKE) --no-print-directory demo-model; fi
	exec $(PY) -m engine_service.cluster --model $(or $(MODEL),$(DEMO_DIR)) --replicas $(REPLICAS) \
	  --http-port $(HTTP_PORT) --prometheus-port $(PROMETHEUS_PORT)

# ruff (lint + format check), mypy and buf lint on the protos (style guide + a comment on every element; needs
# npm). Versions pinned in pyproject.toml's test extra and BUF_VERSION; .pre-commit-config.yaml runs the same.
BUF_VERSION ?= 1.75.0
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	npx --yes @bufbuild/buf@$(BUF_VERSION) lint

bench: install
	$(PY) bench/throughput.py --help

clean:
	rm -rf $(VENV) qwen3serve .cache .pytest_cache
