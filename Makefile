# Two commands do all set-up on a fresh Linux box:  make demo  and  make test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-builds two small CPU ops (shared-memory comm, fused Adam) on first launch: cache them.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test clean

$(VENV)/.installed: setup.py requirements/cpu-pins.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -r requirements/cpu-pins.txt -e '.[test,bench]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m bmc_fast.demo --out runs/demo

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .cache runs *.egg-info
