# Every target sets itself up from nothing: a local virtual environment in
# $(VENV) with torch installed first, as TORCH_SPEC says (an unpinned torch
# pulls a multi-GB CUDA wheel). The default pin resolves to a CPU wheel on the
# project's build machines, which serve one from a local wheel folder; on
# another Linux machine PyPI's torch==2.13.0 is the CUDA build, so ask for the
# CPU one explicitly, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.flagagg-installed

.PHONY: demo test bench docs lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m flagagg demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m flagagg bench

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) docs/_build .pytest_cache .hypothesis
