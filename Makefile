# The two commands of the README: `make run` and `make test`. Both install what they need.
# `make help` lists every target.
VENV ?= .venv
# Extra arguments of `meterflow run`, e.g. make run RUN_ARGS=--airflow
RUN_ARGS ?=
BIN := $(VENV)/bin

.PHONY: help install run test test-unit lint bench docs clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12

install:  ## create .venv and install the pinned dependencies (a no-op once done)
	@./scripts/bootstrap.sh

run: install  ## run the platform natively: broker, stream, sink, simulator (RUN_ARGS=--airflow)
	$(BIN)/meterflow run $(RUN_ARGS)

test: install lint  ## lint, type-check, then every test (tests/unit, then tests/integration)
	$(BIN)/python -m pytest

test-unit: install  ## the inner loop: tests/unit/ needs no broker, Spark or Airflow
	$(BIN)/python -m pytest tests/unit

lint: install  ## ruff, ruff format and mypy (also the pre-commit hooks)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy

bench: install  ## every benchmark under bench/, writing bench/results/ and docs/benchmarks.md
	$(BIN)/python -m bench.streaming_throughput
	$(BIN)/python -m bench.latency
	$(BIN)/python -m bench.simulator_rate
	$(BIN)/python -m bench.daily_batch
	$(BIN)/python -m bench.daily_scale
	$(BIN)/python -m bench.detection
	$(BIN)/python -m bench.detection_fleet
	$(BIN)/python -m bench.detection_real
	$(BIN)/python -m bench.chaos
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.report

docs: install  ## rewrite the generated parts of docs/ (configuration table, benchmarks page)
	$(BIN)/python scripts/generate_docs.py
	$(BIN)/python -m bench.report

clean:  ## remove local state (data/) and pytest's cache
	rm -rf data .pytest_cache
