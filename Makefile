# The two commands of the README: `make run` and `make test`. Both install what they need.
VENV ?= .venv
# Extra arguments of `meterflow run`, e.g. make run RUN_ARGS=--airflow
RUN_ARGS ?=
BIN := $(VENV)/bin

.PHONY: install run test lint bench clean

install:
	@./scripts/bootstrap.sh

run: install
	$(BIN)/meterflow run $(RUN_ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python -m bench.streaming_throughput
	$(BIN)/python -m bench.simulator_rate
	$(BIN)/python -m bench.daily_batch
	$(BIN)/python -m bench.chaos
	$(BIN)/python -m bench.memory

clean:
	rm -rf data .pytest_cache
