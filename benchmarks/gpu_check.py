#!/usr/bin/env python
"""`make gpu-check`: every GPU measurement of this repo in one command, within 8 minutes on one GPU.

Runs a plan of steps, each its own process under its own time limit (so one failure or overrun is
recorded and the rest still runs), in this order:
  attention_short  benchmarks/attention.py, D = 64, T = 1024/2048, every variant: fused vs torch SDPA
                   pinned to its FlashAttention backend vs unfused (the kernel targets);
  train_eager      benchmarks/train_throughput.py, GPT-2 124M, every variant, no torch.compile;
  train_compile    the same for `default` under torch.compile;
  attention_long   benchmarks/attention.py at T = 4096/8192 for default, softmax1, sigmoid (peak memory);
  analyze_outliers the wall time of analyze_outliers.py (100 x 1024 tokens) on a random 124M checkpoint;
  compress_eval    the wall time of one compress_eval.py pass (fp) over WikiText-2 test;
  host_overhead    benchmarks/host_overhead.py: enqueue time and CUDA-graph GPU time per call, fused vs
                   SDPA (skipped, with a note, in a checkout that does not have that script yet);
  gpu_tests        the GPU tests of tests/test_fused_attention.py.

The plan has a planned time per step, from the step timings measured on one H200 (commit c99af85,
2026-12-04) where a step was measured and from stated estimates where not (`python -m
benchmarks.gpu_check --plan` prints the table). The default budget is 480 s: the planned times
plus a reserve for this process fit in it by construction, shortening the longest sweeps first;
`--budget_s` shrinks the plan further (shortening, then dropping steps, and saying which). Each step
runs under a time limit of 1.5x its planned time, never past the budget's deadline.

After every step it writes benchmarks/results/gpu-check.json (device, versions, commit, command, the
plan, steps{status, seconds, ...}, and attention[{variant, T, D, fwd_bwd_tflops, ratio_vs_sdpa,
ratio_vs_default, ratio_vs_unfused, peak_mem_ratio_vs_sdpa}], train[{variant, compile, tokens_per_s,
mfu}], timings{...}, host_overhead) and regenerates the GPU section of benchmarks/RESULTS.md, both
atomically: a run cut off at any point leaves valid JSON of the steps that finished. Without CUDA
it exits with status 2.

Offline by design: the tokenizer cache and WikiText-2 come from $TIKTOKEN_CACHE_DIR or a
`tiktoken_cache/` and `data/wikitext-2/` found in ../shared or in ./shared (a git-ignored copy
carried to a GPU machine); without WikiText-2 the compress_eval timing runs on random tokens and
says so.

    python -m benchmarks.gpu_check                     # or: make gpu-check   (<= 480 s)
    python -m benchmarks.gpu_check --budget_s 300       # a shorter plan
    python -m benchmarks.gpu_check --plan               # print the plan for the budget; run nothing
"""

import argparse
import collections
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

if not __package__:  # run as a file, the repo's packages are not importable: say how to run it
    sys.exit(f"run it from the repo root as a module: python -m benchmarks.{os.path.basename(__file__)[:-3]} ...")

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)

from runtime.cli import ArgumentParser, UserError  # noqa: E402
from runtime.files import atomic_write_json, atomic_write_text  # noqa: E402

RESULTS_MD = os.path.join(BENCH_DIR, "RESULTS.md")
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"

BUDGET_S = 480      # issue 20: 8 minutes wall on one H100/H200 from a bare machine, compiles included
RESERVE_S = 20      # this process: torch import, CUDA init, the random 124M checkpoint, the JSON writes
SLACK = 0.10        # share of the budget left unplanned: the estimates below are for a warm machine
LIMIT_FACTOR = 1.5  # a step's time limit is this times its planned time (never past the deadline)
MIN_SHARE = 0.5     # a step with less than this share of its planned time left before the deadline is skipped
MEASURED = "measured on one H200 (commit c99af85, 2026-12-04, ../shared/gpu-measurements/2026-12-04-h200)"


@dataclasses.dataclass(frozen=True)
class Form:
    """One way to run a step: its arguments (after the interpreter), planned seconds and their basis.
    `{work}`, `{ckpt}`, `{tokens}` are filled in at run time; `{text}` becomes the compress_eval source."""
    label: str
    args: tuple
    planned_s: float
    basis: str


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    what: str
    forms: tuple            # full first, shortest last
    requires: str = None    # a repo file the step needs; skipped with a note when absent


def _attention(out, *args):
    return ("-m", "benchmarks.attention", *args, "--warmup", "10", "--rep", "40", "--sdpa_backend", "flash",
            "--out_dir", "{work}/" + out)


def _train(out, *args):
    return ("-m", "benchmarks.train_throughput", *args, "--warmup_steps", "5", "--steps", "20", "--out_dir", "{work}/" + out)


GPU_TESTS = ("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fused_attention.py", "-k")

STEPS = (
    Step("attention_short", "fused vs SDPA (flash) vs unfused, every variant, D = 64, T = 1024/2048", (
        Form("T = 1024, 2048", _attention("attention_short", "--seq_lens", "1024", "2048", "--head_dim", "64"), 85,
             f"66 s {MEASURED}, run after a model check had compiled the T = 1024 kernels; 19 s added for a "
             "cold Triton cache (an estimate)"),
        Form("T = 2048 only", _attention("attention_short", "--seq_lens", "2048", "--head_dim", "64"), 55,
             "estimate: the same compiles as the 85 s form, half its timed cases"))),
    Step("train_eager", "GPT-2 124M training tokens/s, every variant, eager (batch 16 x 1024, bf16)", (
        Form("fused and SDPA backends", _train("train_eager", "--backends", "triton", "sdpa"), 82, f"82 s {MEASURED}"),
        Form("fused backend only", _train("train_eager", "--backends", "triton"), 50,
             "estimate: the 82 s measurement ran both backends; about half, plus start-up"))),
    Step("train_compile", "GPT-2 124M training tokens/s, default, torch.compile", (
        Form("fused and SDPA backends", _train("train_compile", "--compile", "--variants", "default", "--backends",
                                               "triton", "sdpa"), 71, f"71 s {MEASURED}"),
        Form("fused backend only", _train("train_compile", "--compile", "--variants", "default", "--backends",
                                          "triton"), 52,
             "estimate: 71 s measured with both backends, less the SDPA model's 19 s compile warm-up"))),
    Step("attention_long", "peak memory and speed at long T: default, softmax1, sigmoid, fused vs SDPA", (
        Form("T = 4096, 8192", _attention("attention_long", "--seq_lens", "4096", "8192", "--variants", "default",
                                          "softmax1", "sigmoid", "--impls", "fused", "sdpa"), 27, f"27 s {MEASURED}"),
        Form("T = 8192 only", _attention("attention_long", "--seq_lens", "8192", "--variants", "default", "softmax1",
                                         "sigmoid", "--impls", "fused", "sdpa"), 18,
             "estimate: two thirds of the 27 s measurement (the T = 8192 cases dominate)"))),
    Step("analyze_outliers", "wall time of analyze_outliers.py, 100 x 1024 tokens, random GPT-2 124M", (
        Form("100 x 1024 tokens", ("analyze_outliers.py", "{ckpt}", "--data", "{tokens}", "--num_seqs", "100",
                                   "--no_progress", "--out", "{work}/analysis"), 60,
             "not measured on a GPU yet: the RESULTS.md target (<= 60 s)"),)),
    Step("compress_eval", "wall time of one compress_eval.py pass (fp) over WikiText-2 test", (
        Form("one fp pass", ("compress_eval.py", "{ckpt}", "{text}", "--methods", "fp", "--no_progress", "--out",
                             "{work}/compress"), 25,
             "not measured on a GPU yet: the RESULTS.md target (<= 10 s) plus 15 s of start-up"),)),
    Step("host_overhead", "host enqueue time and CUDA-graph GPU time per attention call, fused vs SDPA", (
        Form("T = 1024, 2048", ("-m", "benchmarks.host_overhead", "--device", "cuda", "--seq_lens", "1024", "2048",
                                "--out", "{work}/host_overhead.json"), 40,
             "not measured yet (a new script): an estimate"),), requires="benchmarks/host_overhead.py"),
    Step("gpu_tests", "GPU tests of the fused kernel (tests/test_fused_attention.py)", (
        Form("every GPU test", GPU_TESTS + ("gpu",), 151, f"151 s {MEASURED} (49 passed)"),
        Form("bf16 at D = 64, determinism, many heads",
             GPU_TESTS + ("(gpu_real_sizes_bf16 and (64-1024 or 64-2048)) or gpu_backward_is_deterministic "
                          "or gpu_many_heads_grid",), 80,
             "estimate: 25 of the 49 tests, those whose kernels the benchmark steps already compiled"))),
)

# How the plan shrinks to fit a budget: each entry shortens a step to its next form or drops it, in
# this order, until the plan fits; the kernel targets (attention_short) are shortened last and never dropped.
REDUCTIONS = (("gpu_tests", "shorten"), ("train_eager", "shorten"), ("attention_long", "shorten"),
              ("train_compile", "shorten"), ("host_overhead", "drop"), ("gpu_tests", "drop"),
              ("analyze_outliers", "drop"), ("compress_eval", "drop"), ("attention_long", "drop"),
              ("train_compile", "drop"), ("attention_short", "shorten"), ("train_eager", "drop"))


def available_s(budget_s):
    """Seconds of planned step time a budget allows."""
    return budget_s * (1 - SLACK) - RESERVE_S


def make_plan(budget_s, steps=STEPS, reductions=REDUCTIONS):
    """[(step, form)] in run order fitting `budget_s`, and the notes saying what was shortened or dropped."""
    chosen = {s.name: 0 for s in steps}  # form index per step; None = dropped
    by_name = {s.name: s for s in steps}
    notes = []

    def total():
        return sum(by_name[n].forms[i].planned_s for n, i in chosen.items() if i is not None)

    for name, action in reductions:
        if total() <= available_s(budget_s):
            break
        i, step = chosen.get(name), by_name.get(name)
        if i is None:
            continue
        if action == "shorten" and i + 1 < len(step.forms):
            old, new = step.forms[i], step.forms[i + 1]
            chosen[name] = i + 1
            notes.append(f"{name}: shortened to {new.label} ({new.planned_s:g} s planned instead of {old.planned_s:g} s)")
        elif action == "drop":
            chosen[name] = None
            notes.append(f"{name}: dropped ({step.forms[i].planned_s:g} s planned)")
    # a later drop can leave room for a smaller step dropped before it: take it back, at its longest fitting form
    for note in [n for n in notes if n.endswith("planned)") and ": dropped" in n][::-1]:
        name = note.split(":", 1)[0]
        for i in range(len(by_name[name].forms)):
            chosen[name] = i
            if total() <= available_s(budget_s):
                notes[notes.index(note)] = f"{name}: kept at {by_name[name].forms[i].label} (it fits after the later drops)"
                break
            chosen[name] = None
    if total() > available_s(budget_s):
        need = (total() + RESERVE_S) / (1 - SLACK)
        raise UserError(f"--budget_s {budget_s:g} is too small: the shortest plan needs {need:.0f} s "
                        f"({total():.0f} s of steps, {RESERVE_S} s reserve, {SLACK:.0%} slack)")
    if notes:
        notes.insert(0, f"to fit --budget_s {budget_s:g} ({available_s(budget_s):.0f} s of planned step time):")
    return [(s, s.forms[chosen[s.name]]) for s in steps if chosen[s.name] is not None], notes


def plan_rows(plan):
    return [{"step": s.name, "what": s.what, "form": f.label, "planned_s": f.planned_s,
             "limit_s": round(f.planned_s * LIMIT_FACTOR), "basis": f.basis} for s, f in plan]


def plan_text(plan, notes, budget_s):
    rows = plan_rows(plan)
    lines = [f"gpu-check plan for --budget_s {budget_s:g}:",
             f"  {'step':<17} {'planned s':>9} {'limit s':>7}  form"]
    lines += [f"  {r['step']:<17} {r['planned_s']:>9g} {r['limit_s']:>7}  {r['form']}" for r in rows]
    planned = sum(r["planned_s"] for r in rows)
    lines.append(f"  {'total':<17} {planned:>9g}          + {RESERVE_S} s reserve, {SLACK:.0%} of the budget unplanned")
    return "\n".join(lines + [f"  {n}" for n in notes])


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "gpu-check.json"))
    p.add_argument("--budget_s", dest="budget_s", type=float, default=BUDGET_S,
                   help=f"wall-clock budget in seconds (default {BUDGET_S}); a smaller one shortens or drops steps")
    p.add_argument("--results_md", default=RESULTS_MD,
                   help="the markdown file whose GPU section is regenerated after every step (default "
                        "benchmarks/RESULTS.md; give a copy elsewhere to leave the repo's file alone)")
    p.add_argument("--no_results_md", action="store_true", help="do not write a RESULTS.md section")
    p.add_argument("--plan", action="store_true", help="print the plan for the budget and exit (no GPU needed)")
    args = p.parse_args(argv)
    if not args.budget_s > 0:
        raise UserError(f"--budget_s must be positive, got {args.budget_s:g}")
    return args


def shared_dir(name):
    """A folder of the shared files (../shared next to the repo, or ./shared copied into it)."""
    for base in (os.path.join(REPO_ROOT, "..", "shared"), os.path.join(REPO_ROOT, "shared")):
        path = os.path.join(base, name)
        if os.path.exists(path):
            return os.path.abspath(path)
    return None


# ------------------------------------------------------------------------------------------- steps

def kill_group(proc, grace_s=5.0):
    """SIGTERM the step's process group (pytest, inductor's compile workers ...), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(name, cmd, env, log, timeout_s):
    """Run one step in its own process group under `timeout_s`; returns its record (status ok / failed /
    timed out, seconds, returncode, output tail). Output is echoed as it comes."""
    print(f"\n=== gpu-check: {name} (limit {timeout_s:.0f} s): {shlex.join(cmd)}", flush=True)
    log.write(f"=== {name}: {shlex.join(cmd)}\n")
    tail = collections.deque(maxlen=60)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail.append(line)
        sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc)
    except BaseException:  # Ctrl-C: take the step's children down with it
        kill_group(proc, grace_s=2.0)
        raise
    reader.join(timeout=10)
    seconds = round(time.perf_counter() - t0, 2)
    status = "timed out" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    return {"command": shlex.join(cmd), "returncode": proc.returncode, "seconds": seconds, "timeout_s": round(timeout_s),
            "status": status, "tail": "".join(tail)[-2000:]}


def newest_json(directory, prefix):
    if not os.path.isdir(directory):
        return None
    files = sorted(f for f in os.listdir(directory) if f.startswith(prefix) and f.endswith(".json"))
    if not files:
        return None
    try:
        with open(os.path.join(directory, files[-1])) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_host_overhead(work, record):
    """host_overhead.py's result: the file it wrote, else the last JSON line it printed."""
    doc = newest_json(work, "host_overhead")
    if doc is not None:
        return doc
    for line in reversed((record.get("tail") or "").splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def attention_rows(bench_docs):
    """gpu-check attention rows from benchmarks/attention.py results (one doc per sweep)."""
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
                rows.append({"variant": r["variant"], "backend": r.get("backend"), "compile": bool(doc.get("compile")),
                             "tokens_per_s": round(r["tokens_per_s"]), "mfu": r.get("mfu")})
    return rows


# ------------------------------------------------------------------------------------------- results

def build_doc(meta, plan, notes, budget_s, steps, work, timings, complete, elapsed_s):
    """gpu-check.json from what has finished so far."""
    att_docs = [d for d in (newest_json(os.path.join(work, n), "attention_") for n in ("attention_short",
                                                                                      "attention_long")) if d]
    train_docs = []
    for name in ("train_eager", "train_compile"):
        doc = newest_json(os.path.join(work, name), "train_throughput_")
        if doc:
            doc["compile"] = name == "train_compile"
            train_docs.append(doc)
    host = read_host_overhead(work, steps["host_overhead"]) if "host_overhead" in steps else None
    return {"metadata": meta, "device": meta.get("gpu"), "budget_s": budget_s,
            "plan": plan_rows(plan), "plan_notes": notes,
            "planned_total_s": sum(f.planned_s for _, f in plan),
            "complete": complete, "elapsed_s": round(elapsed_s, 1),
            "finished_steps": list(steps), "not_run": [s.name for s, _ in plan if s.name not in steps],
            "attention": attention_rows(att_docs), "train": train_rows(train_docs), "timings": timings,
            "host_overhead": host,
            "timing_note": "wall seconds of the whole command, including Python start-up and CUDA initialisation",
            "sdpa_backend": "flash", "steps": steps,
            "tile_configs": [row for d in att_docs + train_docs for row in d.get("tile_configs", [])]}


def results_markdown(doc):
    """The GPU section of RESULTS.md, generated from gpu-check.json."""
    meta = doc["metadata"]
    lines = [BEGIN, f"## GPU: `make gpu-check` on {meta.get('gpu')}", "",
             f"{meta.get('date')}, commit {meta.get('git_commit')}, torch {meta.get('torch')}, "
             f"triton {meta.get('triton')}, `{meta.get('command')}`. Generated from "
             "`benchmarks/results/gpu-check.json`; ratios > 1 mean the fused kernel is faster (or, for "
             "memory, uses more).", ""]
    if doc.get("complete") is False:
        not_run = ", ".join(doc.get("not_run") or []) or "none"
        lines += [f"**Incomplete:** this run stopped after {doc.get('elapsed_s')} s; steps not run: {not_run}.", ""]
    if doc["attention"]:
        lines += ["| variant | T | D | fused fwd+bwd TFLOP/s | vs SDPA (flash) | vs fused default | vs unfused "
                  "| peak memory vs SDPA |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['T']} | {r['D']} | {r['fwd_bwd_tflops']} | {r['ratio_vs_sdpa']} "
                  f"| {r['ratio_vs_default']} | {r['ratio_vs_unfused']} | {r['peak_mem_ratio_vs_sdpa']} |"
                  for r in doc["attention"]]
        lines.append("")
    if doc["train"]:
        lines += ["| variant | backend | torch.compile | tokens/s | MFU |", "|---|---|---|---:|---:|"]
        lines += [f"| {r['variant']} | {r.get('backend')} | {r['compile']} | {r['tokens_per_s']:,} | {_percent(r['mfu'])} |"
                  for r in doc["train"]]
        lines.append("")
    if doc["timings"]:
        lines += ["| timing | seconds |", "|---|---:|"]
        lines += [f"| {name} | {value} |" for name, value in doc["timings"].items()]
        lines.append("")
    host = doc.get("host_overhead")
    if isinstance(host, dict):
        flat = {k: v for k, v in host.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        if flat:
            lines += ["| host_overhead.py | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in flat.items()]
            lines.append("")
    if doc.get("plan"):
        lines += ["| step | form | planned s | limit s | took s | status |", "|---|---|---:|---:|---:|---|"]
        for r in doc["plan"]:
            step = doc["steps"].get(r["step"], {})
            lines.append(f"| {r['step']} | {r['form']} | {r['planned_s']:g} | {step.get('timeout_s', r['limit_s'])} "
                         f"| {step.get('seconds', '–')} | {step.get('status', 'not run')}"
                         + (f": {step['note']}" if step.get("note") else "") + " |")
        lines.append("")
        lines += [f"{n}" for n in doc.get("plan_notes") or []]
        if doc.get("plan_notes"):
            lines.append("")
    failed = [name for name, step in doc["steps"].items() if step["status"] not in ("ok", "skipped")]
    lines += [f"Steps that did not pass: {', '.join(failed)} (see the JSON)." if failed
              else "Every step that ran passed.", END]
    return "\n".join(lines)


def _percent(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def update_results_md(doc, path=RESULTS_MD):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if BEGIN not in text or END not in text:
        raise UserError(f"{path} has no {BEGIN} ... {END} section to regenerate")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(path, head + results_markdown(doc) + tail)


def random_checkpoint(path):
    """A random GPT-2 124M checkpoint in this repo's format (for the timing steps)."""
    from model import GPT, GPTConfig
    from training.checkpoint import save_checkpoint
    config = GPTConfig()
    model = GPT(config)
    save_checkpoint(path, {"model": model.state_dict(), "model_args": vars(config), "iter_num": 0,
                           "config": {"note": "random init, written by benchmarks/gpu_check.py"}})


def random_tokens(path, n):
    import numpy as np
    np.random.default_rng(0).integers(0, 50257, size=n, dtype=np.uint16).tofile(path)


def command(form, py, paths, text_source):
    """The step's command line: the interpreter, then the form's arguments with the placeholders filled."""
    cmd = [py]
    for a in form.args:
        cmd += text_source if a == "{text}" else [a.format(**paths)]
    return cmd


def needs_inputs(form):
    return any("{ckpt}" in a or "{tokens}" in a or a == "{text}" for a in form.args)


def run_plan(plan, notes, *, budget_s, out, results_md, meta, env, work, py=sys.executable, t0=None,
             inputs=None):
    """Run the plan's steps in order; after each one write `out` (and the `results_md` section) atomically,
    so a run cut off anywhere leaves valid JSON of the steps that finished. `inputs(paths)` makes the
    random checkpoint and tokens the first time a step needs them. Returns the final doc."""
    t0 = time.perf_counter() if t0 is None else t0
    deadline = t0 + budget_s
    steps, timings = {}, {}
    wikitext = shared_dir(os.path.join("data", "wikitext-2", "test.txt"))
    paths = {"work": work, "ckpt": os.path.join(work, "random124m.pt"), "tokens": os.path.join(work, "tokens.bin")}
    text_source = ["--text_file", wikitext] if wikitext else ["--data", paths["tokens"]]

    def write(complete):
        doc = build_doc(meta, plan, notes, budget_s, steps, work, timings, complete, time.perf_counter() - t0)
        atomic_write_json(out, doc)
        if results_md:
            update_results_md(doc, results_md)
        return doc

    write(False)
    with open(os.path.join(work, "log.txt"), "w") as log:
        for step, form in plan:
            left = deadline - time.perf_counter() - RESERVE_S / 4  # time for the last writes
            if step.requires and not os.path.exists(os.path.join(REPO_ROOT, step.requires)):
                record = {"status": "skipped", "seconds": 0.0, "note": f"{step.requires} is not in this checkout"}
            elif left < MIN_SHARE * form.planned_s:
                record = {"status": "skipped", "seconds": 0.0,
                          "note": f"{max(0.0, left):.0f} s left of the budget, {form.planned_s:g} s planned"}
            else:
                if inputs is not None and needs_inputs(form):
                    inputs(paths)
                record = run_step(step.name, command(form, py, paths, text_source), env, log,
                                  min(LIMIT_FACTOR * form.planned_s, left))
            steps[step.name] = {**record, "planned_s": form.planned_s, "form": form.label}
            if record["status"] == "ok" and step.name == "analyze_outliers":
                timings["analyze_outliers_100x1024_s"] = record["seconds"]
            if record["status"] == "ok" and step.name == "compress_eval":
                timings["compress_eval_fp_pass_s"] = record["seconds"]
                timings["compress_eval_data"] = ("WikiText-2 test (tokenized release)" if wikitext
                                                 else "100k random tokens: WikiText-2 was not found")
            write(False)
    return write(True)


def make_inputs(paths):
    if not os.path.exists(paths["ckpt"]):
        random_checkpoint(paths["ckpt"])
        random_tokens(paths["tokens"], 100 * 1024 + 1)


def main(argv=None):
    t0 = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        plan, notes = make_plan(args.budget_s)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    if args.plan:
        print(plan_text(plan, notes, args.budget_s))
        return 0
    import torch
    if not torch.cuda.is_available():
        print("error: make gpu-check needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
              "run it on a machine with one (--plan prints the plan anywhere)", file=sys.stderr)
        return 2
    from benchmarks import bench_utils

    print(plan_text(plan, notes, args.budget_s), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or shared_dir("tiktoken_cache")
    if cache:
        env["TIKTOKEN_CACHE_DIR"] = cache
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = bench_utils.bench_metadata("gpu-check", "benchmarks.gpu_check", argv, "cuda")
    try:
        doc = run_plan(plan, notes, budget_s=args.budget_s, out=args.out,
                       results_md=None if args.no_results_md else args.results_md, meta=meta, env=env,
                       work=tempfile.mkdtemp(prefix="gpu_check_"), t0=t0, inputs=make_inputs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    print(f"\nwrote {args.out}" + ("" if args.no_results_md else f" and the GPU section of {args.results_md}")
          + f" in {time.perf_counter() - t0:.0f} s")
    return 0 if all(step["status"] in ("ok", "skipped") for step in doc["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
