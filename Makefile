# One command to run the server on the embedded demo model, one to run the tests.
#   make run                          -> http://127.0.0.1:8000 (make run HOST=0.0.0.0 PORT=8080)
#   make test                         the CI gate: every test (installs Debian chromium for the browser tests as
#                                     root; otherwise its last line names each skipped group and what runs it)
#   make test-fast                    the developer loop: every module, no slow end-to-end test (-m "not slow")
#   Both run on every usable CPU (pytest-xdist, one worker per CPU, a test module's tests on one worker so that
#   its servers and models start once); TEST_WORKERS=0 runs them in this process, one after the other.
# TORCH_SPEC/PIP_EXTRA let a machine without a local CPU wheel pick one, e.g.
#   make test PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=
HOST ?= 127.0.0.1
PORT ?= 8000
# the CPUs this process may use (affinity and cgroup quota, as the server counts them); not os.cpu_count()
TEST_WORKERS ?= $(shell $(PY) -c "from bitdance_core.cpu_threads import usable_cpus; print(usable_cpus())")
PYTEST = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
APT_TEST_PACKAGES := chromium chromium-driver
# bytecode caches on (some images set PYTHONDONTWRITEBYTECODE): every test process and every server, worker and CLI
# process the tests start would otherwise compile bitdance_core and rewrite the test modules' asserts again
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install run test test-fast test-deps lint bench
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
	$(VENV)/bin/lint-imports

# what the tests need beyond pip: Debian chromium + its driver (the browser tests), installed when root can
test-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian $(APT_TEST_PACKAGES) for the browser tests"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(APT_TEST_PACKAGES) >/dev/null; } \
	    || echo "could not install $(APT_TEST_PACKAGES); the browser tests will be skipped"; \
	fi

test: install lint test-deps
	$(PYTEST) -ra

test-fast: install
	$(PYTEST) -m "not slow"

bench: install
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_pipeline.py
