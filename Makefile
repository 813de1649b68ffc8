# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PY ?= python3.11
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean isoflop-demo

$(STAMP): pyproject.toml scripts/install_system_deps.sh
	scripts/install_system_deps.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	scripts/demo.sh

isoflop-demo: setup
	scripts/isoflop_demo.sh

# Two workers, one test file each at a time: the suite is mostly separate processes (torchrun ranks,
# SLURM jobs) with waits between them, which the second worker fills. `pytest tests/x.py` runs serially.
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile

# A developer's inner loop: everything not marked slow (no training runs, codec, SLURM or torchrun).
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) data/tiny data/tiny-s2st artifacts .pytest_cache
