# Run `make help` for the targets.
PYTHON ?= .venv/bin/python
VENV ?= .venv
CODE := service tools tests $(wildcard bench)

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: ## Create .venv and install the service with its dev tools
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[dev,bench]'

proto: ## Regenerate generated/ from protos/
	rm -rf generated/agent
	mkdir -p generated
	$(PYTHON) -m grpc_tools.protoc -I protos --python_out=generated --pyi_out=generated \
		--grpc_python_out=generated protos/agent/v1/agent.proto
	touch generated/agent/__init__.py generated/agent/v1/__init__.py

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

layers: ## The import contract alone: the core imports no grpc, protobuf or generated code (a test)
	$(PYTHON) -m pytest tests/test_layers.py

check: lint test ## Lint, types and tests (the import contract among them), as CI runs them

bench: ## Benchmark C=1,100,1000 against the baselines into bench/results/ (ARGS=--full adds C=5000)
	$(PYTHON) -m bench $(ARGS)

bench-smoke: ## Tiny benchmark run (CI runs it through the tests), into bench/results/smoke/
	$(PYTHON) -m bench --smoke

.PHONY: help install proto run lint fmt test layers check bench bench-smoke
