# Two commands do everything on a fresh machine with only Python:
#   make demo   - create .venv, install, show a ResNet-18 learning on CIFAR-10 (scripts/demo.py:
#                 ~5 min on 2 CPU cores; the authors' CIFAR-10 MoCo recipe on a GPU)
#   make test   - create .venv, install, run lint, type checks and the whole test suite
# On a GPU machine (no venv needed: its python3 with PYTHONPATH=.), see scripts/gpu_check.py --help:
#   make gpu-pack             - here, once: gpu-pack/ (CIFAR-10 + pytest) with the venv's Python
#   make gpu-check            - there, gpu-pack/ carried: CUDA tests, pairs/s, decode, learning,
#                               compile (< 7 min, one GPU); records in $OUT or runs/gpu-check
#   make gpu-check DRY_RUN=1  - the same script on the CPU with tiny sizes (CI runs it)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint setup clean gpu-check gpu-pack

# The editable install as a path entry in site-packages (editable_mode=compat), which type
# checkers and editors follow; setuptools' default import hook is invisible to them.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check moco tests benchmarks scripts
	$(BIN)/mypy moco

test: lint
	$(BIN)/pytest -q -ra -n 2

test-fast: $(STAMP)
	$(BIN)/pytest -q -n 2 -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The pack reads the data with the moco package: the venv's Python.
gpu-pack: $(STAMP)
	$(BIN)/python scripts/pack_cifar_subset.py $(PACK_ARGS)

# No dependency on the venv rule: the GPU machine has python3 + torch and nothing to install.
CHECK_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	PYTHONPATH=.$(if $(PYTHONPATH),:$(PYTHONPATH)) $(CHECK_PY) scripts/gpu_check.py $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(GPU_CHECK_ARGS)
