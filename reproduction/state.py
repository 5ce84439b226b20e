"""What earlier invocations left done, so that a re-run continues where it stopped: a run's state (start,
resume, done; or a run with other settings, refused), and whether an analysis or the compression table
already covers the current checkpoints."""

import math
import os

from reproduction.paths import REPO, read_json, rel
from runtime.cli import UserError
from training.config import FREE_ON_RESUME

# settings a resume may change without changing what the run computes (train_config's), less the data, which
# the plan fixes: a run directory trained on other data is another run
FREE_KEYS = FREE_ON_RESUME - {"data_dir", "dataset"}


def read_outliers(plan, variant):
    """The analysis' outliers.json, or None where it is missing or lacks what the report reads."""
    doc = read_json(os.path.join(plan.analysis_dir(variant), "outliers.json"))
    try:
        h = doc["activation"]["layer_output"]
        ok = (isinstance(doc["model"], dict) and isinstance(h["top3"], list) and isinstance(h["median"], list)
              and len(h["top3"]) == len(h["median"]) > 0 and all(isinstance(t, list) and t for t in h["top3"]))
    except (TypeError, KeyError):
        return None
    return doc if ok else None


def _same(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return str(a) == str(b)


def run_state(plan, variant):
    """('start', 0) | ('resume', iter) | ('done', iter) for a variant's run directory; UserError when it
    holds a run with settings other than the plan's (it would not continue the same training)."""
    path = plan.ckpt(variant)
    if not os.path.exists(path):
        return "start", 0
    from training.checkpoint import load_checkpoint
    ckpt = load_checkpoint(path, map_location="cpu")
    config = ckpt.get("config") or {}
    want = {**plan.train_settings, "attention": variant, "data_dir": rel(plan.data_dir)}
    diffs = [f"{k} (run {config.get(k)!r}, now {v!r})" for k, v in want.items()
             if k not in FREE_KEYS and k in config and not _same(config[k], v)]
    it, max_iters = int(ckpt["iter_num"]), int(want.get("max_iters", config.get("max_iters", 0)))
    if it > max_iters:
        diffs.append(f"iterations (run at {it}, now max_iters {max_iters})")
    if diffs:
        raise UserError(f"{rel(plan.run_dir(variant))} holds a run with other settings: {'; '.join(diffs)}; use "
                        f"another --out (or remove that run directory) to train with these settings")
    if it < max_iters or "optimizer" not in ckpt:
        return "resume", it
    return "done", it


def same_command(recorded, cmd):
    """Whether a script's recorded command line (runtime.system.run_metadata: interpreter name + argv) ran `cmd`."""
    return isinstance(recorded, str) and recorded.split(" ", 1)[-1] == " ".join(cmd[1:])


def analysis_current(plan, variant, iter_num):
    doc = read_outliers(plan, variant)
    return doc is not None and doc["model"].get("iter_num") == iter_num and isinstance(doc.get("meta"), dict) and \
        same_command((doc.get("meta") or {}).get("command"), plan.analysis_command(variant))


def compress_rows(plan):
    """results.json's rows by absolute checkpoint path, or {}."""
    rows = read_json(os.path.join(plan.compress_dir(), "results.json"), kind=list) or []
    return {os.path.abspath(os.path.join(REPO, r["checkpoint"])): r for r in rows
            if isinstance(r, dict) and isinstance(r.get("checkpoint"), str)}


def compress_current(plan, iters):
    """Whether results.json has a row for exactly these {variant: iter} checkpoints, with these settings."""
    rows = compress_rows(plan)
    if set(rows) != {os.path.abspath(plan.ckpt(v)) for v in iters}:
        return False
    cmd = plan.compress_command(list(iters))
    return all(rows[os.path.abspath(plan.ckpt(v))].get("iter_num") == it
               and same_command((rows[os.path.abspath(plan.ckpt(v))].get("metadata") or {}).get("command"), cmd)
               for v, it in iters.items())
