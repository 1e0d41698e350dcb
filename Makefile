# Two commands on a fresh clone: `make demo` (whole pipeline on phantoms, ends in an HTML
# report) and `make test` (ruff + the test suite). Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dermkit-installed
# The web page's in-browser runtime (onnxruntime-web from npm, served by `dermkit serve`)
# and the browser the web tests drive (Debian's chromium): installed once, then skipped.
WEB_STAMP := web/node_modules/.dermkit-installed
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint format bench-baseline bench-ablation clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: on the project's CPU machines pip takes these from local disk.
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[all,dev,imagenet]"
	touch $(STAMP)

$(WEB_STAMP): web/package.json web/package-lock.json
	command -v npm >/dev/null || ($(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm)
	cd web && npm ci --no-audit --no-fund
	touch $(WEB_STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

setup: $(STAMP) $(WEB_STAMP) $(CHROMIUM)

# The whole pipeline (pipelines/dermae-tiny.yaml) on phantoms, offline, a few minutes on 2
# cores; stages are cached in demo/dermae-tiny, so a second `make demo` is instant.
demo: setup
	$(VENV)/bin/dermkit run pipelines/dermae-tiny.yaml

# Two pytest workers, one per core (each test process runs torch on one thread: tests/conftest.py);
# --dist loadfile keeps a file's tests, and so its module fixtures (the tiny pipeline), on one
# worker. 10 min instead of 20 on 2 cores (BENCHMARKS.md, "The test suite").
test: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(PY) -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

format: $(STAMP)
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

# Benchmarks (minutes; see BENCHMARKS.md for the figures they produced).
bench-baseline: $(STAMP)
	$(VENV)/bin/dermkit baseline --preset cpu out_dir=runs/bench/baseline-cpu

# The ablation table (about 3 h on 2 cores, resumable): runs/bench/ablation/ablation.md
bench-ablation: $(STAMP)
	$(VENV)/bin/dermkit bench ablation --preset cpu

clean:
	rm -rf demo runs .pytest_cache .ruff_cache
