# Two commands do everything: `make demo` and `make test`. Both install into .venv first
# (only when pyproject.toml or the lock changed) and are safe to run again.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/cpu.lock
TOY := .toy
# This machine's pip config lists local index folders that do not all exist; drop those lines.
PIP_FILTER := sed -e "/is ignored: it is neither a file nor a directory/d"
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-unit bench lint lock clean

install: $(STAMP)
	@:

$(STAMP): pyproject.toml $(LOCK)
	@echo "installing rayalign into $(VENV) (pinned by $(LOCK)) ..."
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@set -o pipefail; { $(PY) -m pip install -q --upgrade "pip>=24" && \
	  $(PY) -m pip install -q --no-deps -r $(LOCK) && \
	  PYTHONWARNINGS=ignore $(PY) -m pip install -q --no-deps --no-build-isolation -e . ; } 2>&1 | $(PIP_FILTER)
	@$(PY) -c "import importlib.util as u, sys; bad=[m for m in ('torchvision','torchaudio','torchcodec') if u.find_spec(m)]; sys.exit(f'{bad} in .venv break transformers beside CPU torch' if bad else 0)"
	@touch $@
	@echo "installed."

demo: $(STAMP)
	@$(VENV)/bin/rayalign toy $(TOY)
	@$(VENV)/bin/rayalign run configs/demo.yaml

test: $(STAMP)
	@$(PY) -m pytest tests --durations=40; rc=$$?; \
	 if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$rc

test-unit: $(STAMP)
	@$(PY) -m pytest tests/unit

bench: $(STAMP)
	@shopt -s nullglob; scripts=(bench/bench_*.py); \
	 if [ $${#scripts[@]} -eq 0 ]; then echo "no bench/bench_*.py scripts yet"; exit 1; fi; \
	 for s in "$${scripts[@]}"; do echo "== $$s"; $(PY) $$s || exit 1; done

lint: $(STAMP)
	@$(VENV)/bin/ruff check pipeline workers tests bench

# Rebuild the lock from pyproject's ranges in a scratch venv (needs the package registries).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade "pip>=24"
	.lock-venv/bin/pip install -q torch==2.13.0 -e ".[cpu,test,bench,dev,tracking]"
	.lock-venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	{ head -2 $(LOCK); .lock-venv/bin/pip freeze --all --exclude-editable | grep -v -E "^pip=="; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(TOY) runs .cache
