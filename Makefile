# MedAutoLabel developer commands. Every target sets up .venv on a fresh machine first.
#   make demo   label a synthetic CT angiogram with the built-in model (writes out/demo/)
#   make test   lint (ruff, Python 3.9 rules) + the whole test suite
#   make test-fast  lint + the tests not marked slow (the inner loop; make test runs everything)
#   make bench  MONAI bundle runner vs medautolabel label: time, peak RSS, agreement (docs/benchmarks.md)


PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint pytest bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medautolabel demo --out out/demo --device auto

lint: $(STAMP)
	$(BIN)/ruff check .

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint pytest

test-fast: lint $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python tools/bench.py --out docs/benchmarks.md --work out/bench

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
