"""The gpu scale's time model: training seconds from the tokens/s measured per variant on one H200 (a
results file of benchmarks/train_throughput.py), every other stage's seconds assumed and stated; the most
iterations per variant that fit --budget_s, and each stage's deadline within it."""

import functools
import os

from compress import methods as compression_methods
from reproduction.paths import REPO
from runtime.cli import UserError
from runtime.files import read_json_file

METHODS = compression_methods.REPRODUCE  # compress_eval.py's columns, from the method registry

# Training tokens/s of every variant, measured on one NVIDIA H200 at commit c99af85 (torch 2.11, triton 3.6,
# 2026-12-04): python benchmarks/train_throughput.py --backends triton sdpa --warmup-steps 5 --steps 20, GPT-2
# 124M, batch 16 x 1024, bf16 autocast, eager; the benchmark's own JSON, copied from
# ../shared/gpu-measurements/2026-12-04-h200/ (a test checks the copy against it)
THROUGHPUT_FILE = os.path.join(REPO, "benchmarks", "results", "train_throughput_nvidia-h200_20261204-021013.json")
THROUGHPUT_BACKEND = "triton"  # the fused kernel's rows
FALLBACK_VARIANT = "default"   # whose rate a variant without a measurement is estimated at (and the row says so)
# Everything else in the estimate is assumed, not measured (no GPU has run this scale yet):
GPU_ASSUMED = {
    "train_efficiency": 0.9,   # train.py vs the benchmark loop: batches from the memmap, one host sync per step, logs
    "train_start_s": 25,       # per train.py: imports, CUDA init, model build, Triton compile + autotune (cold cache;
                               # the H200 model check took 17.8 s for its first variant, CUDA init included)
    "eval_s": 2,               # per evaluation: 2 x eval_iters forward batches
    "save_s": 5,               # per ckpt.pt: 124M weights + AdamW moments, about 1.5 GB
    "telemetry_s": 0.25,       # per telemetry record: one forward of the fixed batch on the reference attention path
    "data_copy_s": 5,          # reading a prepared copy of the corpus
    "data_prepare_s": 20,      # preparing pysource here (needs `datasets`; 6 s on a 2-core CPU, measured)
    "analysis_s": 20,          # per variant: analyze_outliers.py start-up and num_seqs x 1024 tokens
    "compress_s": 15,          # compress_eval.py start-up ...
    "compress_per_method_s": 3.5,  # ... and each method over max_tokens per checkpoint (10 s for fp / W8 / 50% sparse)
    "report_s": 15,            # REPORT.md, reproduce.json and the figures, rewritten after every stage
}
PLAN_SHARE = 0.9       # the plan fills 90% of --budget-s; the rest absorbs estimate errors
MIN_GPU_ITERS = 200    # fewer iterations per variant would not show anything: refuse instead
GPU_ITERS_STEP = 50


@functools.lru_cache(maxsize=None)
def _measurement(path):
    """(the results file's document, {variant: tokens/s rounded} of its THROUGHPUT_BACKEND rows that ran)."""
    doc = read_json_file(path, "throughput measurement")
    rates = {r["variant"]: round(r["tokens_per_s"]) for r in doc["results"]
             if r["backend"] == THROUGHPUT_BACKEND and r.get("status", "ok") == "ok"}
    return doc, rates


def measured_throughputs():
    """{variant: training tokens/s} as measured, from THROUGHPUT_FILE."""
    return dict(_measurement(THROUGHPUT_FILE)[1])


def training_throughput(variant):
    """(tokens/s, note) of `variant`'s training: its measurement, or FALLBACK_VARIANT's with a note saying so
    (a variant registered at run time, or one added after the measurement)."""
    rates = measured_throughputs()
    if variant in rates:
        return rates[variant], None
    return rates[FALLBACK_VARIANT], f"not measured: `{FALLBACK_VARIANT}`'s rate"


def throughput_source():
    """The measurement in words: device, commit, model, batch, precision, mode, kernel."""
    doc = _measurement(THROUGHPUT_FILE)[0]
    m = doc["model"]
    model = "GPT-2 124M" if (m["n_layer"], m["n_head"], m["n_embd"]) == (12, 12, 768) else \
        f"{m['n_layer']} layers x {m['n_embd']} dims"
    return (f"{doc['gpu'].removeprefix('NVIDIA ')}, commit {doc['git_commit'][:7]}, {model}, batch "
            f"{doc['batch_size']} x {doc['block_size']}, {doc['precision'].split()[0]}, "
            f"{'compiled' if doc['compile'] else 'eager'}, fused kernel")


def gpu_estimate(plan, iters):
    """Estimated wall seconds of every stage for `iters` iterations per variant: training from the
    H200-measured tokens/s, everything else from GPU_ASSUMED. Returns {rows, total_s, ...}."""
    a, t = GPU_ASSUMED, plan.train_settings
    tokens = iters * plan.tokens_per_iter()
    evals = len({0, iters} | set(range(0, iters + 1, t["eval_interval"])))
    records = iters // t["outlier_interval"] + 1 if t.get("outlier_interval") else 0
    rows = [{"stage": "data", "what": f"{'read ' + plan.data_note if plan.data_note else 'prepare ' + plan.corpus}",
             "seconds": a["data_copy_s"] if plan.prepare is None else a["data_prepare_s"]}]
    for v in plan.args.variant_list:
        tok_s, note = training_throughput(v)
        train_s = tokens / (tok_s * a["train_efficiency"])
        extra = a["train_start_s"] + evals * a["eval_s"] + (evals - 1) * a["save_s"] + records * a["telemetry_s"]
        rows.append({"stage": f"train {v}", "tokens": tokens, "tokens_per_s": tok_s, "train_s": round(train_s, 1),
                     "seconds": round(train_s + extra, 1),
                     "what": f"{tokens / tok_s / a['train_efficiency']:.0f} s of steps + {extra:.0f} s for start-up, "
                             f"{evals} evaluations, {evals - 1} checkpoint(s), {records} telemetry records"
                             + (f" (tokens/s {note})" if note else "")})
        if note:
            rows[-1]["tokens_per_s_note"] = note
    n = len(plan.args.variant_list)
    rows.append({"stage": "analyses", "what": f"{n} x analyze_outliers.py", "seconds": n * a["analysis_s"]})
    rows.append({"stage": "compression table", "what": f"compress_eval.py, {n} checkpoints",
                 "seconds": a["compress_s"] + n * len(METHODS) * a["compress_per_method_s"]})
    rows.append({"stage": "reports", "what": "REPORT.md, reproduce.json, figures", "seconds": a["report_s"]})
    return {"iters": iters, "tokens_per_variant": tokens, "rows": rows, "total_s": round(sum(r["seconds"] for r in rows), 1),
            "budget_s": plan.budget_s, "plan_share": PLAN_SHARE, "throughput_source": throughput_source(),
            "assumed": dict(GPU_ASSUMED)}


def gpu_plan_iters(plan):
    """The most iterations per variant (a multiple of GPU_ITERS_STEP) whose estimate fits PLAN_SHARE of the
    budget; UserError when not even MIN_GPU_ITERS fit."""
    target = PLAN_SHARE * plan.budget_s
    iters = MIN_GPU_ITERS
    if gpu_estimate(plan, iters)["total_s"] > target:
        need = gpu_estimate(plan, iters)["total_s"] / PLAN_SHARE
        raise UserError(f"--budget_s {plan.budget_s:g} is too small for {len(plan.args.variant_list)} variants: "
                        f"{MIN_GPU_ITERS} iterations each need about {need:.0f} s; raise it or pass fewer --variants")
    while gpu_estimate(plan, iters + GPU_ITERS_STEP)["total_s"] <= target:
        iters += GPU_ITERS_STEP
    return iters


def estimate_text(plan):
    """The --dry_run plan of a budgeted scale: tokens per variant and the time estimate."""
    e = plan.estimate
    lines = [f"plan: {e['iters']:,} iterations x {plan.tokens_per_iter():,} tokens = {e['tokens_per_variant']:,} "
             f"tokens per variant, sized to {PLAN_SHARE:.0%} of --budget_s {plan.budget_s:g}",
             f"time estimate (training: tokens/s measured on an {throughput_source()}; the rest assumed, see "
             f"GPU_ASSUMED in reproduction/gpu_time.py and docs/reproduce.md):",
             f"  {'stage':<26} {'tokens':>12} {'tokens/s':>9} {'seconds':>8}  what"]
    for r in e["rows"]:
        tokens = f"{r['tokens']:,}" if "tokens" in r else ""
        tok_s = f"{r['tokens_per_s']:,}" if "tokens_per_s" in r else ""
        lines.append(f"  {r['stage']:<26} {tokens:>12} {tok_s:>9} {r['seconds']:>8.0f}  {r['what']}")
    lines.append(f"estimated total: {e['total_s']:.0f} s of the {plan.budget_s:g} s budget")
    return lines


def stage_deadlines(plan, t0):
    """{stage: time.time() deadline} of a budgeted plan: each stage's estimated end, with the budget's
    unplanned share spread over all of them (a stage that ends early leaves its time to the next)."""
    if plan.estimate is None:
        return {}
    stretch = plan.budget_s / plan.estimate["total_s"]
    rows = {r["stage"]: r["seconds"] for r in plan.estimate["rows"]}
    analysis_s = rows["analyses"] / len(plan.args.variant_list)
    deadlines, end = {}, rows["data"]
    deadlines["data"] = t0 + end * stretch
    for v in plan.args.variant_list:
        end += rows[f"train {v}"]
        deadlines[("train", v)] = t0 + end * stretch
    for v in plan.args.variant_list:
        end += analysis_s
        deadlines[("analyse", v)] = t0 + end * stretch
    end += rows["compression table"]
    deadlines["compress"] = t0 + end * stretch
    return deadlines
