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

.PHONY: install test demo reproduce-tiny gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

test: install
	$(PY) -m pytest -q --durations=15 tests

# The main job end to end on a small built-in corpus (Python standard-library source; no download):
# prepare tokens, train config/tiny.py (and a shorter attention_bias run for the comparison), analyse the
# outliers with every intervention, compare the two runs (Figures 11-12), print the compression table.
# The tiny demo model has no massive activations (max |h| is ~5x the mean), so the demo analyses
# with tau_activation=4 to fill every table and figure; real checkpoints keep the paper's tau=1000.
# Weight and attention outliers use the default rules (thresholds relative to the matrix size).
demo: install
	$(PY) prepare_data.py --dataset builtin
	$(PY) train.py config/tiny.py
	$(PY) train.py config/tiny.py --attention=attention_bias --out_dir=$(DEMO_OUT)_attention_bias --max_iters=60 \
		--lr_decay_iters=60 --eval_interval=30
	$(PY) analyze_outliers.py $(DEMO_OUT)/ckpt.pt --data data/builtin/val.bin --num_seqs 8 --tau_activation 4 \
		--intervene mean --out $(DEMO_OUT)/outliers
	$(PY) analyze_outliers.py --compare $(DEMO_OUT)/ckpt.pt $(DEMO_OUT)_attention_bias/ckpt.pt --data data/builtin/val.bin \
		--num_seqs 8 --tau_activation 4 --out $(DEMO_OUT)/compare
	$(PY) compress_eval.py $(DEMO_OUT)/ckpt.pt --data data/builtin/val.bin --max_tokens 20000 --out $(DEMO_OUT)/compress
	@echo "every variant compared in one report: make reproduce-tiny (python reproduce.py --scale tiny|gpu|paper)"

# All eight variants trained, analysed and compressed, with REPORT.md and reproduce.json (README:
# "Reproducing the paper's comparison"); at most 10 minutes on 2 CPU cores, re-runs skip finished work.
reproduce-tiny: install
	$(PY) reproduce.py --scale tiny --out out/reproduce_tiny

# Every GPU measurement (kernel tests, attention and training benchmarks, analysis/compression timings)
# into benchmarks/results/gpu-check.json and the GPU section of benchmarks/RESULTS.md; about 15 min on
# one H100. Needs no install or network on a GPU machine whose python3 has torch and triton (the
# .venv is used when present); exits 2 without CUDA.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_OUT)_attention_bias out/reproduce_tiny .pytest_cache
