#!/usr/bin/env python
"""`make gpu-check`: every GPU measurement of this repo in one command, on one CUDA GPU.

Runs, each as its own process (so one failure is recorded and the rest still runs):
  1. the GPU tests of tests/test_fused_attention.py (bf16 at T = 1024/2048, D = 64/128, ...);
  2. benchmarks/attention.py for D = 64 and 128, T = 1k..8k: fwd / bwd / fwd+bwd TFLOP/s and peak
     memory of every variant, fused vs torch SDPA pinned to its FlashAttention backend vs unfused;
  3. benchmarks/train_throughput.py: GPT-2 124M, every variant, torch.compile off and on;
  4. the wall time of analyze_outliers.py (100 x 1024 tokens) and of compress_eval.py (one
     WikiText-2 test pass, fp only) on a random GPT-2 124M checkpoint.
It writes benchmarks/results/gpu-check.json (device, versions, commit, command, and
attention[{variant, T, D, fwd_bwd_tflops, ratio_vs_sdpa, ratio_vs_default, ratio_vs_unfused,
peak_mem_ratio_vs_sdpa}], train[{variant, compile, tokens_per_s, mfu}], timings{...}, steps{...})
and regenerates the GPU section of benchmarks/RESULTS.md from it. Budget: about 15 minutes on one
H100. Without CUDA it exits with status 2.

Offline by design: the tokenizer cache and WikiText-2 come from $TIKTOKEN_CACHE_DIR or a
`tiktoken_cache/` and `data/wikitext-2/` found in ../shared or in ./shared (a git-ignored copy
carried to a GPU machine); without WikiText-2 the compress_eval timing runs on random tokens and
says so.

    python benchmarks/gpu_check.py            # or: make gpu-check
    python benchmarks/gpu_check.py --quick    # T = 1024, 2048 and no compile: a few minutes
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, BENCH_DIR)

RESULTS_MD = os.path.join(BENCH_DIR, "RESULTS.md")
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "gpu-check.json"))
    p.add_argument("--quick", action="store_true", help="T = 1024, 2048, D = 64 and no torch.compile")
    p.add_argument("--no-results-md", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    return p.parse_args(argv)


def shared_dir(name):
    """A folder of the shared files (../shared next to the repo, or ./shared copied into it)."""
    for base in (os.path.join(REPO_ROOT, "..", "shared"), os.path.join(REPO_ROOT, "shared")):
        path = os.path.join(base, name)
        if os.path.exists(path):
            return os.path.abspath(path)
    return None


def run_step(name, cmd, env, log):
    """Run one step; returns {status, seconds, returncode, output tail}."""
    print(f"\n=== gpu-check: {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    log.write(f"=== {name}\n{proc.stdout}\n")
    print(proc.stdout[-4000:], flush=True)
    return {"command": " ".join(cmd), "returncode": proc.returncode, "seconds": round(seconds, 2),
            "status": "ok" if proc.returncode == 0 else "failed", "tail": proc.stdout[-2000:]}


def newest_json(directory, prefix):
    files = sorted(f for f in os.listdir(directory) if f.startswith(prefix) and f.endswith(".json"))
    if not files:
        return None
    with open(os.path.join(directory, files[-1])) as f:
        return json.load(f)


def attention_rows(bench_docs):
    """gpu-check attention rows from benchmarks/attention.py results (one doc per head dim)."""
    rows = []
    for doc in bench_docs:
        results = [r for r in doc.get("results", []) if r.get("status") == "ok"]
        by = {(r["T"], r["D"], r["variant"], r["impl"]): r for r in results}
        for (T, D, variant, impl), r in sorted(by.items()):
            if impl != "fused":
                continue
            sdpa, default = by.get((T, D, "default", "sdpa")), by.get((T, D, "default", "fused"))
            unfused = by.get((T, D, variant, "unfused"))

            def ratio(other, key="fwdbwd_ms"):
                return round(other[key] / r[key], 3) if other and other.get(key) and r.get(key) else None

            mem = r.get("peak_mib_fwdbwd")
            rows.append({"variant": variant, "T": T, "D": D, "fwd_bwd_tflops": round(r["fwdbwd_tflops"], 2),
                         "ratio_vs_sdpa": ratio(sdpa), "ratio_vs_default": ratio(default),
                         "ratio_vs_unfused": ratio(unfused),
                         "peak_mem_ratio_vs_sdpa": round(mem / sdpa["peak_mib_fwdbwd"], 3)
                         if mem and sdpa and sdpa.get("peak_mib_fwdbwd") else None})
    return rows


def train_rows(train_docs):
    rows = []
    for doc in train_docs:
        for r in doc.get("results", []):
            if r.get("status") == "ok":
                rows.append({"variant": r["variant"], "compile": bool(doc.get("compile")),
                             "tokens_per_s": round(r["tokens_per_s"]), "mfu": r.get("mfu")})
    return rows


def results_markdown(doc):
    """The GPU section of RESULTS.md, generated from gpu-check.json."""
    meta = doc["metadata"]
    lines = [BEGIN, f"## GPU: `make gpu-check` on {meta.get('gpu')}", "",
             f"{meta.get('date')}, commit {meta.get('git_commit')}, torch {meta.get('torch')}, "
             f"triton {meta.get('triton')}, `{meta.get('command')}`. Generated from "
             "`benchmarks/results/gpu-check.json`; ratios > 1 mean the fused kernel is faster (or, for "
             "memory, uses more).", ""]
    if doc["attention"]:
        lines += ["| variant | T | D | fused fwd+bwd TFLOP/s | vs SDPA (flash) | vs fused default | vs unfused "
                  "| peak memory vs SDPA |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['T']} | {r['D']} | {r['fwd_bwd_tflops']} | {r['ratio_vs_sdpa']} "
                  f"| {r['ratio_vs_default']} | {r['ratio_vs_unfused']} | {r['peak_mem_ratio_vs_sdpa']} |"
                  for r in doc["attention"]]
        lines.append("")
    if doc["train"]:
        lines += ["| variant | torch.compile | tokens/s | MFU |", "|---|---|---:|---:|"]
        lines += [f"| {r['variant']} | {r['compile']} | {r['tokens_per_s']:,} | {_percent(r['mfu'])} |"
                  for r in doc["train"]]
        lines.append("")
    if doc["timings"]:
        lines += ["| timing | seconds |", "|---|---:|"]
        lines += [f"| {name} | {value} |" for name, value in doc["timings"].items()]
        lines.append("")
    failed = [name for name, step in doc["steps"].items() if step["status"] != "ok"]
    lines += [f"Steps that failed: {', '.join(failed)} (see the JSON)." if failed else "Every step passed.", END]
    return "\n".join(lines)


def _percent(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def update_results_md(doc, path=RESULTS_MD):
    import common
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {path} has no {BEGIN} ... {END} section to regenerate")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    common.atomic_write_text(path, head + results_markdown(doc) + tail)


def random_checkpoint(path):
    """A random GPT-2 124M checkpoint in this repo's format (for the timing steps)."""
    import torch

    from checkpoint import save_checkpoint
    from model import GPT, GPTConfig
    config = GPTConfig()
    model = GPT(config)
    save_checkpoint(path, {"model": model.state_dict(), "model_args": vars(config), "iter_num": 0,
                           "config": {"note": "random init, written by benchmarks/gpu_check.py"}})
    del model, torch


def random_tokens(path, n):
    import numpy as np
    np.random.default_rng(0).integers(0, 50257, size=n, dtype=np.uint16).tofile(path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("error: make gpu-check needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
              "run it on a machine with one", file=sys.stderr)
        return 2
    import bench_utils

    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or shared_dir("tiktoken_cache")
    if cache:
        env["TIKTOKEN_CACHE_DIR"] = cache
    wikitext = shared_dir(os.path.join("data", "wikitext-2", "test.txt"))
    seq_lens = ["1024", "2048"] if args.quick else ["1024", "2048", "4096", "8192"]
    head_dims = ["64"] if args.quick else ["64", "128"]
    work = tempfile.mkdtemp(prefix="gpu_check_")
    py = sys.executable
    steps, timings = {}, {}
    with open(os.path.join(work, "log.txt"), "w") as log:
        steps["gpu_tests"] = run_step("GPU tests", [py, "-m", "pytest", "-q", "-k", "gpu",
                                                    "tests/test_fused_attention.py"], env, log)
        for D in head_dims:
            steps[f"attention_D{D}"] = run_step(
                f"attention benchmark D={D}", [py, "benchmarks/attention.py", "--seq-lens", *seq_lens, "--head-dim", D,
                                               "--sdpa-backend", "flash", "--out-dir", os.path.join(work, f"att{D}")],
                env, log)
        for compiled in ([False] if args.quick else [False, True]):
            name = "train_compile" if compiled else "train_eager"
            steps[name] = run_step(
                f"training throughput (compile={compiled})",
                [py, "benchmarks/train_throughput.py", "--backends", "triton", "--out-dir", os.path.join(work, name)]
                + (["--compile"] if compiled else []), env, log)
        ckpt, tokens = os.path.join(work, "random124m.pt"), os.path.join(work, "tokens.bin")
        random_checkpoint(ckpt)
        random_tokens(tokens, 100 * 1024 + 1)
        steps["analyze_outliers"] = run_step(
            "analyze_outliers.py, 100 x 1024 tokens", [py, "analyze_outliers.py", ckpt, "--data", tokens,
                                                       "--num_seqs", "100", "--out", os.path.join(work, "an")], env, log)
        timings["analyze_outliers_100x1024_s"] = steps["analyze_outliers"]["seconds"]
        source = ["--text_file", wikitext] if wikitext else ["--data", tokens]
        steps["compress_eval"] = run_step(
            "compress_eval.py, one pass", [py, "compress_eval.py", ckpt, *source, "--methods", "fp", "--no_progress",
                                           "--out", os.path.join(work, "ce")], env, log)
        timings["compress_eval_fp_pass_s"] = steps["compress_eval"]["seconds"]
        timings["compress_eval_data"] = ("WikiText-2 test (tokenized release)" if wikitext
                                         else "100k random tokens: WikiText-2 was not found")

    att_docs = [d for d in (newest_json(os.path.join(work, f"att{D}"), "attention_") for D in head_dims
                            if os.path.isdir(os.path.join(work, f"att{D}"))) if d]
    train_docs = []
    for name in ("train_eager", "train_compile"):
        directory = os.path.join(work, name)
        doc = newest_json(directory, "train_throughput_") if os.path.isdir(directory) else None
        if doc:
            doc["compile"] = name == "train_compile"
            train_docs.append(doc)
    meta = bench_utils.bench_metadata("gpu-check", "benchmarks/gpu_check.py", argv, "cuda")
    doc = {"metadata": meta, "device": meta.get("gpu"), "attention": attention_rows(att_docs),
           "train": train_rows(train_docs), "timings": timings,
           "timing_note": "wall seconds of the whole command, including Python start-up and CUDA initialisation",
           "sdpa_backend": "flash", "steps": steps,
           "tile_configs": [row for d in att_docs + train_docs for row in d.get("tile_configs", [])]}
    import common
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    common.atomic_write_json(args.out, doc)
    if not args.no_results_md:
        update_results_md(doc)
    print(f"\nwrote {args.out}" + ("" if args.no_results_md else f" and the GPU section of {RESULTS_MD}"))
    return 0 if all(step["status"] == "ok" for step in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
