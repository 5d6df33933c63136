# Two commands do everything on a fresh machine with only Python:
#   make demo   - create .venv, install, pretrain MoCo v2 on CIFAR-10 (~5 min on 2 CPU cores)
#   make test   - create .venv, install, run lint, type checks and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint setup clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check moco tests benchmarks scripts
	$(BIN)/mypy moco

test: lint
	$(BIN)/pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
