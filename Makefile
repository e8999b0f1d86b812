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

.PHONY: demo test bench docs docs-check lint venv clean asv asv-full asv-compare asv-publish asv-machine

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
	$(PY) asv_bench/report.py $(BENCH_ARGS)

# airspeed velocity (asv_bench/). asv keeps its machine description in
# ~/.asv-machine.json: HOME points at a folder of the checkout instead, so no
# target ever prompts, and results are kept per ASV_MACHINE (name a GPU box
# apart, e.g. ASV_MACHINE=mybox-h100). The quick tier takes minutes; the full
# tier adds large shapes and the p-sweep. make asv and asv-full measure this
# checkout in $(VENV) (recorded under HEAD); asv-compare and asv-publish build
# commits in fresh virtualenvs (committed code only).
ASV_MACHINE ?= $(shell hostname)
ASV_HOME := $(CURDIR)/asv_bench/.asv/home
ASV_PY = cd asv_bench && PIP_CACHE_DIR="$${PIP_CACHE_DIR:-$$HOME/.cache/pip}" \
	HOME="$(ASV_HOME)" FLAGAGG_ASV_TIER=$(1) $(abspath $(PY))
ASV_RUN = $(call ASV_PY,$(1)) -m asv
BASE ?= main
FACTOR ?= 1.3
COMPARE_BENCH ?= track_ratio
HISTORY ?= main~10..main
HISTORY_BENCH ?= track_ratio
# One process imports the suite and forks every benchmark from it (asv's
# default spawns a fresh interpreter per benchmark: seconds each). The suite's
# modules import only numpy at module level, and make no CUDA call there.
ASV_LAUNCH ?= --launch-method forkserver

asv-machine: $(STAMP)
	mkdir -p "$(ASV_HOME)"
	$(call ASV_RUN,quick) machine --yes --machine "$(ASV_MACHINE)" >/dev/null

asv: asv-machine
	FLAGAGG_ASV_TIER=quick $(PY) asv_bench/plan.py
	$(call ASV_RUN,quick) run --python=same --machine "$(ASV_MACHINE)" $(ASV_LAUNCH) \
		--set-commit-hash "$$(git rev-parse HEAD)" $(ASV_ARGS)

asv-full: asv-machine
	FLAGAGG_ASV_TIER=full $(PY) asv_bench/plan.py
	$(call ASV_RUN,full) run --python=same --machine "$(ASV_MACHINE)" $(ASV_LAUNCH) \
		--set-commit-hash "$$(git rev-parse HEAD)" $(ASV_ARGS)

# Exit status 1 when a benchmark matching COMPARE_BENCH (the ratio tracks of
# the quick tier) is slower at HEAD than at BASE by more than FACTOR, in asv's
# comparison and again in the median over CONFIRM further runs of each flagged
# row on each commit (asv_bench/compare.py: one run of a ratio is noisy).
# NEW names the commit to compare with BASE (default: the checkout's HEAD).
CONFIRM ?= 2
NEW ?= HEAD
asv-compare: asv-machine
	$(call ASV_PY,quick) compare.py --factor $(FACTOR) \
		--bench '$(COMPARE_BENCH)' --confirm $(CONFIRM) --machine "$(ASV_MACHINE)" \
		--base "$$(git rev-parse $(BASE))" --head "$$(git rev-parse $(NEW))" -- $(ASV_LAUNCH)

# The ratio tracks over HISTORY (first-parent commits); commits whose flagagg
# lacks an API a benchmark needs record it as skipped or failed, so asv's
# status 2 (some failed) does not stop the publication.
asv-publish: asv-machine
	$(call ASV_RUN,quick) run --bench '$(HISTORY_BENCH)' --skip-existing-successful \
		$(ASV_LAUNCH) --machine "$(ASV_MACHINE)" "$(HISTORY)" || test $$? -eq 2
	$(call ASV_RUN,quick) publish
	$(PY) asv_bench/history.py --machine "$(ASV_MACHINE)"

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

# The built pages in headless Chromium, offline, at 1400 px: fails on clipped
# code, empty sidebars, two tables of contents, unrendered math and network
# requests, and writes screenshots of the main pages to docs/_build/screenshots.
# Needs Debian's chromium (apt-get install chromium); not part of `make test`.
docs-check: docs
	$(PY) docs/check_browser.py --screenshots docs/_build/screenshots

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) docs/_build docs/auto_examples docs/sg_execution_times.rst .pytest_cache .hypothesis
