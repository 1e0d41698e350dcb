# Two commands on a fresh clone: `make demo` (whole pipeline on phantoms, ends in an HTML
# report) and `make test` (ruff + the test suite). Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dermkit-installed

.PHONY: setup demo test lint format bench-baseline clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: on the project's CPU machines pip takes these from local disk.
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dermkit demo --out demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

format: $(STAMP)
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

# Benchmarks (minutes; see BENCHMARKS.md for the figures they produced).
bench-baseline: $(STAMP)
	$(VENV)/bin/dermkit baseline --preset cpu out_dir=runs/bench/baseline-cpu

clean:
	rm -rf demo runs .pytest_cache .ruff_cache
