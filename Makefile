# One command to run the server on the embedded demo model, one to run the tests.
#   make run      -> http://127.0.0.1:8000
#   make test
# TORCH_SPEC/PIP_EXTRA let a machine without a local CPU wheel pick one, e.g.
#   make test PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test lint bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_EXTRA) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(PIP_EXTRA) -e ".[dev]"
	touch $@

run: install
	$(VENV)/bin/bitdance serve --host $(HOST) --port $(PORT)

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q -ra

bench: install
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_pipeline.py
