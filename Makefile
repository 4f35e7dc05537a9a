# Run `make help` for the targets.
PYTHON ?= .venv/bin/python
VENV ?= .venv
CODE := service tools tests $(wildcard bench)

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: ## Create .venv and install the service with its dev tools
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[dev,bench]'

# $(call protoc,DIR): the stubs of protos/ into DIR, as they are committed in generated/.
protoc = rm -rf $(1)/agent && mkdir -p $(1) && \
	$(PYTHON) -m grpc_tools.protoc -I protos --python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) \
		protos/agent/v1/agent.proto && \
	touch $(1)/agent/__init__.py $(1)/agent/v1/__init__.py

proto: ## Regenerate generated/ from protos/
	$(call protoc,generated)

proto-check: ## Fail if generated/ is not what `make proto` would make
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && $(call protoc,$$tmp) && \
		diff -r -x __pycache__ generated "$$tmp" >&2 || \
		{ echo "generated/ is stale: run 'make proto' and commit the result" >&2; exit 1; }

docs: ## Regenerate docs/configuration.md from the config models
	$(PYTHON) -m service.configdoc > docs/configuration.md.tmp
	mv docs/configuration.md.tmp docs/configuration.md

docs-check: ## Fail if docs/configuration.md is not what `make docs` would write
	$(PYTHON) -m service.configdoc --check docs/configuration.md

run: ## Start the service (offline scripted model unless ANTHROPIC_API_KEY is set)
	$(PYTHON) -m service

lint: ## ruff and mypy
	$(PYTHON) -m ruff check $(CODE)
	$(PYTHON) -m ruff format --check $(CODE)
	$(PYTHON) -m mypy

fmt: ## Format the code
	$(PYTHON) -m ruff format $(CODE)
	$(PYTHON) -m ruff check --fix $(CODE)

test: ## Run the tests (pytest's "no tests collected", exit 5, counts as a pass)
	$(PYTHON) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

screenshot: ## Rewrite docs/viewer.png: the run viewer's test in a headless chromium, keeping its screenshot
	UPDATE_SCREENSHOT=1 $(PYTHON) -m pytest tests/test_viewer.py -k demo_run

layers: ## The import contract alone: the core imports no grpc, protobuf or generated code (a test)
	$(PYTHON) -m pytest tests/test_layers.py

check: lint proto-check docs-check test ## Everything CI runs: lint, types, generated/ and docs fresh, tests (the import contract among them)

bench: h2load a2a-venv ## Benchmark C=1,100,1000 against the baselines, then redis vs memory and 2 workers vs 1 (ARGS=--full adds C=5000)
	$(PYTHON) -m bench $(ARGS)

bench-smoke: h2load ## Tiny benchmark run (CI runs it through the tests), into bench/results/smoke/
	$(PYTHON) -m bench --smoke

bench-replicas: h2load ## Only the replica stages (Redis state, workers) into bench/results/<date>-replicas.md
	$(PYTHON) -m bench.replicas $(ARGS)

chaos: ## A minute of kill -9 against 3 replicas on the local Redis and PostgreSQL (ARGS: see python -m bench.chaos -h)
	$(PYTHON) -m bench.chaos --json bench/results/chaos.json $(ARGS)

# The A2A SDK baseline's own venv: the SDK pins its own grpc and protobuf, which the service's venv must not take.
A2A_VENV := .a2a-venv
a2a-venv: ## Build .a2a-venv with a2a-sdk[grpc], the benchmark's A2A SDK baseline (bench/a2a_baseline.py)
	test -x $(A2A_VENV)/bin/python || python3 -m venv $(A2A_VENV)
	$(A2A_VENV)/bin/python -m pip install -q 'a2a-sdk[grpc]>=1.3,<2' 'grpcio-health-checking>=1.85,<2' 'pyyaml>=6,<7'

bench-sse: h2load ## The HTTP face against the gRPC face and FastAPI SSE into bench/results/<date>-sse-face.md
	$(PYTHON) -m bench.sse_face --out bench/results/$$(date -u +%Y-%m-%d)-sse-face $(ARGS)

# h2load drives the benchmark's gRPC and SSE load; without it the bench runs and says its rows were skipped.
h2load: ## Install h2load (Debian's nghttp2-client) when it is missing and this is root with apt-get
	@command -v h2load >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq nghttp2-client; \
	else \
		echo "h2load is missing and cannot be installed here (not root, or no apt-get): install Debian's"; \
		echo "nghttp2-client (sudo apt-get install nghttp2-client); until then the h2load rows are skipped"; \
	fi

.PHONY: help install proto proto-check docs docs-check run lint fmt test check bench bench-smoke bench-replicas bench-sse chaos h2load a2a-venv layers
