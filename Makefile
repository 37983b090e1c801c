# Two commands from a fresh clone: `make run` and `make test`. Each builds .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The suite mostly waits on servers and subprocesses: two pytest-xdist workers halve its time on
# two cores, and more only contend for them. 0 runs it in this process (for -s, --pdb).
TEST_WORKERS ?= 2

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
