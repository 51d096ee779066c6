# Quickstart: `make demo` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,eval]"
	# quanda pins captum<0.9 (numpy<2), which zarr 3.1 cannot use; it runs with captum 0.9 (tests/test_quanda.py)
	$(BIN)/python -m pip install --quiet --no-deps "quanda==0.5.0"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m lightning_tracetrain demo --config configs/digits.yaml

test: $(STAMP)
	$(BIN)/python -m ruff check lightning_tracetrain tests benchmarks
	$(BIN)/python -m ruff format --check lightning_tracetrain tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m ruff check lightning_tracetrain tests benchmarks
	$(BIN)/python -m ruff format --check lightning_tracetrain tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
