# Quick start: `make demo` then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Installing torch first, pinned, keeps pip from pulling a different build (several GB of CUDA
# packages) for the `torch>=2.4` in requirements.txt. Override for your platform, e.g.
#   make TORCH_SPEC="torch==2.11.0" demo
TORCH_SPEC ?= torch==2.13.0

# tiktoken downloads the GPT-2 BPE on first use; machines without network can use a cache
ifneq ($(wildcard ../shared/tiktoken_cache),)
export TIKTOKEN_CACHE_DIR ?= $(abspath ../shared/tiktoken_cache)
endif
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

DEMO_OUT := out/demo

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

test: install
	$(PY) -m pytest -q --durations=15 tests

# The main job end to end on a small built-in corpus (Python standard-library source; no download):
# prepare tokens, train config/tiny.py, analyse its outliers, print its compression table.
# The tiny demo model has no massive activations (max |h| is ~5x the mean), so the demo analyses
# with tau=4 to fill every table and figure; real checkpoints keep the paper's tau=1000.
demo: install
	$(PY) prepare_data.py --dataset builtin
	$(PY) train.py config/tiny.py
	$(PY) analyze_outliers.py $(DEMO_OUT)/ckpt.pt --data data/builtin/val.bin --num_seqs 8 --tau 4 --out $(DEMO_OUT)/outliers
	$(PY) compress_eval.py $(DEMO_OUT)/ckpt.pt --data data/builtin/val.bin --max_tokens 20000 --out $(DEMO_OUT)/compress

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
