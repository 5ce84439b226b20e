"""Each run's numbers, read from its own files (train.py's log.jsonl, analyze_outliers.py's outliers.json,
compress_eval.py's results.json): one row of reproduce.json per variant, and the environment it ran in."""

import math
import os
import platform
import sys

from reproduction.gpu_time import METHODS
from reproduction.paths import rel
from reproduction.state import compress_rows, read_outliers
from runtime.cli import is_number
from runtime.reports import loss_curve, read_training_log


def finite(x):
    return is_number(x) and math.isfinite(x)


def mean(xs):
    xs = [x for x in (xs or []) if finite(x)]
    return sum(xs) / len(xs) if xs else None


def telemetry_series(records, n_layer=None):
    """The training telemetry (log.jsonl's `outliers` records) as series over iterations: the maxima over
    layers, the first-token attention averaged over layers, and every layer's top-1 |h|, ratio to the median
    and first-token attention (lists per record, one value per layer)."""
    if n_layer is None:
        n_layer = max((int(k.rsplit("/L", 1)[1]) + 1 for r in records for k in r if k.startswith("outlier/top1_h/L")),
                      default=0)

    def layers(r, key):
        return [r.get(f"outlier/{key}/L{l}") for l in range(n_layer)]

    return {"iter": [r["iter"] for r in records],
            "max_top1_h": [r.get("outlier/max_top1_h") for r in records],
            "max_ratio_h": [r.get("outlier/max_ratio_h") for r in records],
            "max_first_attn": [r.get("outlier/max_first_attn") for r in records],
            "mean_first_attn": [mean(layers(r, "first_attn")) for r in records],
            "by_layer": {"top1_h": [layers(r, "top1_h") for r in records],
                         "ratio_h": [layers(r, "ratio_h") for r in records],
                         "first_attn": [layers(r, "first_attn") for r in records]}}


def collect_run(plan, variant, outcome):
    """One run's row of reproduce.json, read from its own log.jsonl, outliers.json and results.json."""
    failed = outcome.failed
    run_dir = plan.run_dir(variant)
    row = {"attention": variant, "status": "failed" if variant in failed else "ok", "error": failed.get(variant),
           "truncated": outcome.truncated.get(variant),
           "run_dir": rel(run_dir), "checkpoint": rel(plan.ckpt(variant)),
           "artifacts": {"log": rel(os.path.join(run_dir, "log.jsonl")),
                         "outliers": rel(os.path.join(plan.analysis_dir(variant), "outliers.json")),
                         "results": rel(os.path.join(plan.compress_dir(), "results.json"))}}
    log = read_training_log(os.path.join(run_dir, "log.jsonl"))
    evals = [r for r in log if r.get("kind") == "eval" and "val_loss" in r]
    tele = [r for r in log if r.get("kind") == "outliers"]
    row["iter_num"] = evals[-1]["iter"] if evals else None
    row["val_loss"] = evals[-1]["val_loss"] if evals else None
    row["loss_curve"] = loss_curve(log) or {"iter": [], "loss": [], "eval_iter": [], "val_loss": []}
    row["telemetry"] = telemetry_series(tele, plan.train_settings.get("n_layer"))
    doc = read_outliers(plan, variant) if row["status"] == "ok" else None
    if doc:
        h = doc["activation"]["layer_output"]
        top1 = [t[0] for t in h["top3"]]
        ratios = h.get("ratio_top1_median") or []
        att = doc.get("attention") or {}
        layer = max(range(len(top1)), key=lambda l: top1[l])
        row.update(
            analysed_iter=doc["model"]["iter_num"],
            max_top1=top1[layer], max_top1_layer=layer, median_at_max=h["median"][layer],
            max_ratio=max((r for r in ratios if finite(r)), default=None),
            top3=h["top3"], median=h["median"],
            activation_outliers=h.get("outliers_total"), tau=(doc.get("tau_by_type") or {}).get("activation", doc.get("tau")),
            first_token_attention=mean(att.get("first_token_mass")),
            first_token_attention_by_layer=att.get("first_token_mass"),
            sink_share=mean(att.get("sink_share")), sink_share_by_layer=att.get("sink_share"),
            gate={k: mean(v) for k, v in att["gate"].items()} if att.get("gate") else None,
            gate_meaning=att.get("gate_meaning"))
    res = compress_rows(plan).get(os.path.abspath(plan.ckpt(variant))) if row["status"] == "ok" else None
    if res:
        ppl = {m: res["ppl"].get(m) for m in METHODS}
        row["ppl"] = ppl
        row["ppl_change"] = {m: (ppl[m] / ppl["fp"] - 1.0 if finite(ppl[m]) and finite(ppl["fp"]) else None)
                             for m in METHODS if m != "fp"}
        row["compress_eval"] = res.get("eval")
        row["compress_dtype"] = res.get("dtype")
    else:
        row["ppl"], row["ppl_change"] = None, None
    return row


def environment(plan):
    from runtime.system import run_metadata
    meta = run_metadata(plan.args.device if plan.args.device != "auto" else None)
    meta.update(python_executable=sys.executable, cpu_count=os.cpu_count(), platform=platform.platform(),
                processor=platform.processor() or platform.machine())
    return meta

