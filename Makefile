# Everything bootstraps its own virtualenv: a fresh clone needs only python3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-integration test-faults test-memory test-sim lint migrate run bench bench-quick doctor contract clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/release-worker demo

# The whole suite: unit, integration and fault tests against real servers.
# pytest exit code 5 ("no tests ran") is turned into a failure by tests/conftest.py.
test: $(STAMP)
	$(BIN)/pytest tests

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

test-integration: $(STAMP)
	$(BIN)/pytest tests/integration

test-faults: $(STAMP)
	$(BIN)/pytest tests/faults

# The memory scenario at full size (3,000 records of 1 MiB; `make test` runs 1,000).
test-memory: $(STAMP)
	MEMORY_TEST_RECORDS=3000 $(BIN)/pytest tests/faults/test_memory.py -s

# The deterministic simulation at length: many more examples and steps, a random seed
# each run (`make test` runs a bounded, derandomized share of it).
test-sim: $(STAMP)
	SIM_LONG=1 $(BIN)/pytest tests/simulation

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python deploy/validate.py

migrate: $(STAMP)
	$(BIN)/release-worker migrate

run: $(STAMP)
	$(BIN)/release-worker run

doctor: $(STAMP)
	$(BIN)/release-worker doctor

# Regenerate docs/contract/ from the models in worker/contract.py (a unit test checks them).
contract: $(STAMP)
	$(BIN)/release-worker contract write

bench: $(STAMP)
	$(BIN)/release-worker bench

bench-quick: $(STAMP)
	$(BIN)/release-worker bench --quick --out bench/results/quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
