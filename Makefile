# Two commands do all set-up on a fresh Linux box:  make demo  and  make test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-quick lint clean gpu-check gpu-wheelhouse

$(VENV)/.installed: setup.py requirements/cpu-pins.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -r requirements/cpu-pins.txt -e '.[train,eval,test,bench]'
	touch $@

# Build DeepSpeed's CPU ops (shared-memory comm, fused Adam) once, so no run waits ~75 s for g++; with the venv's
# ninja, as the tests and an activated venv use it (another ninja version would rebuild them: tests/conftest.py).
$(TORCH_EXTENSIONS_DIR)/.built: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -c "from deepspeed.accelerator import get_accelerator as acc; \
	[acc().create_op_builder(n).load() for n in ('ShareMemCommBuilder', 'FusedAdamBuilder')]"
	touch $@

venv: $(VENV)/.installed $(TORCH_EXTENSIONS_DIR)/.built

demo: venv
	$(PY) -m bmc_fast.trainer.demo --out runs/demo

# The lint, then every test (the slow ones launch DeepSpeed or spawn processes, and run first, the longest
# first), two at a time, handed out one by one: a launch spends much of its time starting processes, so two
# workers finish in ~14 min where one takes ~29.
test: lint
	$(VENV)/bin/pytest -q -n 2 --maxschedchunk 1 --durations=15

# The inner loop: everything but the slow tests (a few minutes less).
test-quick: venv
	$(VENV)/bin/pytest -q -m "not slow"

lint: venv
	$(VENV)/bin/ruff check .

# The GPU path on one CUDA GPU, ~5 minutes (benchmarks/gpu_check.py; ARGS=--dry-run lists its steps). It runs on
# whatever python holds a CUDA torch: make's venv where there is one, else $(PYTHON) (a lent GPU machine, a
# cluster node's environment); missing packages come from .wheelhouse, never from an index.
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(ARGS)

# Wheels of what gpu-check needs beyond a CUDA torch, for a machine without a package index (<= 50 MiB).
gpu-wheelhouse: venv
	$(PY) benchmarks/gpu_wheelhouse.py --out .wheelhouse

clean:
	rm -rf $(VENV) .cache runs *.egg-info .wheelhouse
