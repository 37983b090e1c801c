# Two commands from a fresh clone: `make run` and `make test`. Each builds .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The suite mostly waits on servers and subprocesses starting, so on two cores a third pytest-xdist
# worker still pays: 379 s against 516 s with two, 342 s with four (the same 1,720 tests, a quiet
# machine, 2026-12-08); three leave the tests' own timing some room. 0 runs it in this process (for -s, --pdb).
TEST_WORKERS ?= 3

.PHONY: run test bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tipstream run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/ingest.py --events 50000

docs: $(STAMP)
	$(BIN)/tipstream docs

# Not data/: the default TIPSTREAM_DATA_DIR holds the NATS store, the log everything is rebuilt from.
clean:
	rm -rf $(VENV) .pytest_cache
