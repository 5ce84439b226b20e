"""One command from raw text to the paper's headline comparison, for every attention variant.

    python reproduce.py --scale tiny --out out/reproduce_tiny          # every variant, <= 10 min on 2 CPU cores
    python reproduce.py --scale gpu --out out/reproduce_gpu            # one H100/H200, about 25 min (estimate)
    python reproduce.py --scale paper --out out/paper                  # prints the torchrun commands
    python reproduce.py --scale paper --out out/paper --execute        # ... and runs them (GPU cluster)
    python reproduce.py --scale tiny --variants default,scaling --max_iters 10 --out /tmp/smoke   # CI smoke
    python reproduce.py --scale gpu --dry_run                          # the plan and commands, nothing run

Stages, each a subprocess of the repo's own scripts (run from the repo root; scripts never import
each other): prepare_data.py for the scale's corpus; train.py once per variant, all with the same
seed and therefore the same initial-weight RNG stream and data order (under torchrun when
--nproc_per_node > 1); analyze_outliers.py on every checkpoint; compress_eval.py over all of them
(fp / W8 / 50% sparse). Then DIR/REPORT.md, DIR/reproduce.json and the figures (Fig. 11 top-1 /
top-3 |h| per layer, Fig. 12 loss curves, outlier emergence over training from the telemetry).

Re-running continues where it stopped: data already prepared is kept, a run whose ckpt.pt reached
max_iters is skipped, an interrupted one resumes exactly (--init_from=resume), an analysis or a
compression table that already covers the current checkpoints is kept. A run directory holding a
run with other settings is an error (choose another --out), never silently mixed.
"""

import argparse
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import sysconfig
import time

from common import (UserError, atomic_write_json, atomic_write_text, check_output_dir, check_seed, cli_main, json_text,
                    output_set, read_json_file, read_jsonl_file, resolve_device)

REPO = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared"))
FORMAT = "outlier-gpt/reproduce"
FORMAT_VERSION = 1
# what reproduce.py itself writes into --out, as one set (common.output_set); each stage's script owns its folder
TOOL = "reproduce.py"
REPORT_FILES = ("fig11_top1.png", "fig11_top3.png", "fig12_loss.png", "outlier_emergence.png", "reproduce.json",
                "REPORT.md")
METHODS = ("fp", "w8", "sparse50")

# ------------------------------------------------------------------------------------------- scales
# Each scale: corpus, training settings (config files + --key=value on top), analysis and compression
# settings. Settings a resume may not change are compared with the checkpoint's (see check_run).
SCALES = {
    "tiny": {
        "what": "every variant on the builtin smoke-test corpus (Python standard-library source) on a CPU; "
                "tests the pipeline, it is too small and short for massive activations",
        "corpus": "builtin",
        "configs": ["config/tiny.py"],
        # config/tiny.py is 2 layers x 64 dims, 8 x 64 tokens per iteration. Its 50k-entry output layer
        # dominates the cost (~0.2 s per iteration, ~0.3 s per 1k evaluated tokens and method on 2 idle
        # cores); 60 iterations, 4 evaluations of 4 batches and 8k compression tokens keep all eight
        # variants near 5 minutes idle, leaving room within the 10-minute budget for a CPU shared with
        # other work (80 iterations took 11 minutes at a load average of 3-4)
        "train": {"max_iters": 60, "lr_decay_iters": 60, "warmup_iters": 6, "eval_interval": 20,
                  "eval_iters": 4, "log_interval": 5, "outlier_interval": 10, "compile": False,
                  "snapshot_interval": 0},
        "lr_decay_follows_max_iters": True,
        "analysis": {"num_seqs": 16, "batch_size": 8},
        "compress": {"max_tokens": 8192, "batch_size": 16},
        "compress_data": "val",
        "nproc_per_node": 1,
    },
    "gpu": {
        "what": "a GPT-2-shaped 12-layer model (8 heads, 512 dims, 512-token context) per variant on one "
                "H100/H200, on the Python standard library's source code found on the machine (no network)",
        "corpus": "pysource",
        "configs": [],
        # 32 x 2 x 512 = 32,768 tokens/iter x 2,000 iters = 65.5M tokens per variant, bf16, compiled;
        # pysource of CPython 3.11 is 15.3M tokens (measured), so about 4 epochs.
        # Estimated (not measured: this repo has had no GPU to time it) at 2-3 minutes per variant on
        # one H100 including compilation, i.e. about 20-25 minutes for all eight.
        "train": {"n_layer": 12, "n_head": 8, "n_embd": 512, "block_size": 512, "vocab_size": 50304,
                  "bias": False, "dropout": 0.0, "batch_size": 32, "gradient_accumulation_steps": 2,
                  "max_iters": 2000, "lr_decay_iters": 2000, "warmup_iters": 200, "learning_rate": 1e-3,
                  "min_lr": 1e-4, "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 250,
                  "eval_iters": 20, "log_interval": 10, "outlier_interval": 50, "compile": True,
                  "snapshot_interval": 0},
        "lr_decay_follows_max_iters": True,
        "analysis": {"num_seqs": 100},
        "compress": {"max_tokens": 262144},
        "compress_data": "val",
        "nproc_per_node": 1,
    },
    "paper": {
        "what": "the paper configs (config/<variant>.py: GPT-2 124M on OpenWebText, the authors' recipe) on "
                "a GPU cluster via torchrun; compression on WikiText-2 test as in Table 3",
        "corpus": "openwebtext",
        "configs": None,  # config/<variant>.py
        "train": {},
        "lr_decay_follows_max_iters": False,
        "analysis": {"num_seqs": 100},
        "compress": {},
        "compress_data": "wikitext2",
        "nproc_per_node": 8,
    },
}

CORPORA = ("builtin", "pysource", "shakespeare", "wikitext2", "openwebtext")
PYSOURCE_MAX_BYTES = 96 << 20   # ~30M tokens: several epochs' worth of distinct text at the gpu scale
PYSOURCE_SHARD_BYTES = 1 << 20  # one document of the pysource corpus: source files joined up to ~1 MB


def parse_args(argv):
    import attention_variants
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", required=True, choices=tuple(SCALES),
                   help="tiny: CPU, minutes; gpu: one H100/H200, ~25 min; paper: the paper configs via torchrun")
    p.add_argument("--variants", default=",".join(attention_variants.VARIANTS),
                   help=f"comma list of attention variants (default: all of {', '.join(attention_variants.VARIANTS)})")
    p.add_argument("--out", default=None, help="output directory (default out/reproduce_SCALE)")
    p.add_argument("--corpus", choices=CORPORA, default=None,
                   help="training corpus (default: builtin for tiny, pysource for gpu, openwebtext for paper); "
                        "pysource is this Python installation's standard-library source; shakespeare and "
                        "wikitext2 use ../shared/data when present")
    p.add_argument("--data_dir", default=None,
                   help="use this prepared data directory (train.bin, val.bin) instead of preparing the corpus "
                        "(default: DIR/data/CORPUS; data/openwebtext for paper)")
    p.add_argument("--seed", type=int, default=1337, help="training seed shared by every variant (default 1337)")
    p.add_argument("--max_iters", type=int, default=None, help="override the scale's iterations (smoke tests)")
    p.add_argument("--num_seqs", type=int, default=None, help="override the analysis' number of sequences")
    p.add_argument("--max_tokens", type=int, default=None, help="override the compression evaluation's token count")
    p.add_argument("--nproc_per_node", type=int, default=None,
                   help="processes (GPUs) per training; >1 trains under torchrun (default 1; paper: 8)")
    p.add_argument("--device", default="auto", help="device for every stage (default auto)")
    p.add_argument("--dry_run", action="store_true", help="print the plan and the commands; run and write nothing")
    p.add_argument("--execute", action="store_true",
                   help="--scale paper: run the commands (without it paper only prints them)")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in attention_variants.VARIANTS]
    if unknown or not names:
        raise UserError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(attention_variants.VARIANTS)}")
    if len(set(names)) != len(names):
        raise UserError("--variants names a variant twice")
    args.variant_list = names
    check_seed(args.seed)
    for key in ("max_iters", "num_seqs", "max_tokens", "nproc_per_node"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise UserError(f"--{key} must be at least 1, got {value}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.out = os.path.abspath(args.out or os.path.join("out", f"reproduce_{args.scale}"))
    return args


# ------------------------------------------------------------------------------------------- paths

def rel(path):
    """`path` relative to the repo root when inside it: commands are printed to be run from there."""
    path = os.path.abspath(path)
    r = os.path.relpath(path, REPO)
    return path if r.startswith("..") else r


def show(cmd):
    """A command as the user would type it from the repo root ('python' for this interpreter)."""
    if cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]:
        cmd = ["torchrun"] + cmd[3:]
    elif cmd[0] == sys.executable:
        cmd = ["python"] + cmd[1:]
    return " ".join(shlex.quote(c) for c in cmd)


def shared(*parts):
    path = os.path.join(SHARED, *parts)
    return path if os.path.exists(path) else None


# ------------------------------------------------------------------------------------------- plan

class Plan:
    """Everything reproduce.py will run, computed before anything runs (so --dry_run shows it all)."""

    def __init__(self, args):
        self.args = args
        self.scale = SCALES[args.scale]
        self.out = args.out
        self.corpus = args.corpus or self.scale["corpus"]
        if args.data_dir:
            self.data_dir, self.prepare = os.path.abspath(args.data_dir), None
        elif args.scale == "paper" and self.corpus == "openwebtext":
            # OpenWebText is ~17 GB of tokens: kept where every other command expects it, shared by runs
            self.data_dir = os.path.join(REPO, "data", "openwebtext")
            self.prepare = self.prepare_command()
        else:
            self.data_dir = os.path.join(self.out, "data", self.corpus)
            self.prepare = self.prepare_command()
        self.nproc = args.nproc_per_node or self.scale["nproc_per_node"]
        if args.scale == "paper" and not args.nproc_per_node:
            import torch  # every GPU of this node; 8 (the paper's node) when printing on a machine without
            self.nproc = torch.cuda.device_count() or self.nproc
        self.train_settings = dict(self.scale["train"])
        if args.max_iters is not None:
            self.train_settings["max_iters"] = args.max_iters
            if self.scale["lr_decay_follows_max_iters"]:
                self.train_settings["lr_decay_iters"] = args.max_iters
                self.train_settings["warmup_iters"] = min(self.train_settings.get("warmup_iters", 0),
                                                          max(0, args.max_iters // 10))
        self.train_settings["seed"] = args.seed
        self.analysis = dict(self.scale["analysis"])
        if args.num_seqs is not None:
            self.analysis["num_seqs"] = args.num_seqs
        self.compress = dict(self.scale["compress"])
        if args.max_tokens is not None:
            self.compress["max_tokens"] = args.max_tokens

    # ---- corpus
    def prepare_command(self):
        py = [sys.executable, "prepare_data.py", "--out_dir", rel(self.data_dir)]
        if self.corpus == "builtin":
            return py + ["--dataset", "builtin"]
        if self.corpus == "pysource":
            return py + ["--dataset", "text", "--input", rel(os.path.join(self.out, "data", "pysource_text"))]
        if self.corpus == "shakespeare":
            local = shared("data", "tinyshakespeare", "input.txt")
            return py + ["--dataset", "shakespeare"] + (["--input", local] if local else [])
        return py + ["--dataset", self.corpus]  # wikitext2 / openwebtext: Hugging Face (network or cache)

    # ---- runs
    def run_dir(self, variant):
        return os.path.join(self.out, "runs", variant)

    def ckpt(self, variant):
        return os.path.join(self.run_dir(variant), "ckpt.pt")

    def train_command(self, variant, resume):
        """The one training command of every scale: train.py, under torchrun for several processes."""
        if self.nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={self.nproc}", "train.py"]
        else:
            launcher = [sys.executable, "train.py"]
        configs = self.scale["configs"]
        if configs is None:  # paper: the variant's own config file, or the default one plus --attention
            own = os.path.join("config", f"{variant}.py")
            configs = [own] if os.path.isfile(os.path.join(REPO, own)) else [os.path.join("config", "default.py")]
        settings = {**self.train_settings, "attention": variant, "out_dir": rel(self.run_dir(variant)),
                    "data_dir": rel(self.data_dir), "init_from": "resume" if resume else "scratch",
                    "overwrite": False, "wandb_log": False}
        if self.args.device != "auto":
            settings["device"] = self.args.device
        return launcher + configs + [f"--{k}={v}" for k, v in settings.items()]

    def analysis_dir(self, variant):
        return os.path.join(self.run_dir(variant), "outliers")

    def analysis_command(self, variant):
        cmd = [sys.executable, "analyze_outliers.py", rel(self.ckpt(variant)), "--data",
               rel(os.path.join(self.data_dir, "val.bin")), "--out", rel(self.analysis_dir(variant)), "--no_progress"]
        for k, v in self.analysis.items():
            cmd += [f"--{k}", str(v)]
        return cmd + ["--device", self.args.device]

    def compress_dir(self):
        return os.path.join(self.out, "compress")

    def compress_data_args(self):
        if self.scale["compress_data"] == "wikitext2":
            local = shared("data", "wikitext-2", "test.txt")
            return ["--text_file", local] if local else ["--dataset", "wikitext2"]
        return ["--data", rel(os.path.join(self.data_dir, "val.bin"))]

    def compress_command(self, variants):
        cmd = [sys.executable, "compress_eval.py"] + [rel(self.ckpt(v)) for v in variants]
        cmd += self.compress_data_args() + ["--methods", ",".join(METHODS), "--out", rel(self.compress_dir()),
                                            "--no_progress", "--device", self.args.device]
        for k, v in self.compress.items():
            cmd += [f"--{k}", str(v)]
        return cmd


# ------------------------------------------------------------------------------------------- state

def read_json(path):
    """A JSON file a stage wrote, or None where there is none yet (common's checked reader otherwise)."""
    return read_json_file(path) if os.path.lexists(path) else None


def read_log(path):
    """train.py's log.jsonl records (a line cut short by a killed run is skipped)."""
    return read_jsonl_file(path, "training log") if os.path.lexists(path) else []


def _same(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return str(a) == str(b)


# settings that do not change what a run computes (train.py's FREE_ON_RESUME, plus the stage's own)
FREE_KEYS = {"init_from", "max_iters", "out_dir", "overwrite", "wandb_log", "compile", "device",
             "log_interval", "snapshot_interval"}


def run_state(plan, variant):
    """('start', 0) | ('resume', iter) | ('done', iter) for a variant's run directory; UserError when it
    holds a run with settings other than the plan's (it would not continue the same training)."""
    path = plan.ckpt(variant)
    if not os.path.exists(path):
        return "start", 0
    from checkpoint import load_checkpoint
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
    """Whether a script's recorded command line (common.run_metadata: interpreter name + argv) ran `cmd`."""
    return isinstance(recorded, str) and recorded.split(" ", 1)[-1] == " ".join(cmd[1:])


def analysis_current(plan, variant, iter_num):
    doc = read_json(os.path.join(plan.analysis_dir(variant), "outliers.json"))
    return bool(doc) and (doc.get("model") or {}).get("iter_num") == iter_num and \
        same_command((doc.get("meta") or {}).get("command"), plan.analysis_command(variant))


def compress_rows(plan):
    """results.json's rows by absolute checkpoint path, or {}."""
    rows = read_json(os.path.join(plan.compress_dir(), "results.json")) or []
    return {os.path.abspath(os.path.join(REPO, r["checkpoint"])): r for r in rows if isinstance(r, dict)}


def compress_current(plan, iters):
    """Whether results.json has a row for exactly these {variant: iter} checkpoints, with these settings."""
    rows = compress_rows(plan)
    if set(rows) != {os.path.abspath(plan.ckpt(v)) for v in iters}:
        return False
    cmd = plan.compress_command(list(iters))
    return all(rows[os.path.abspath(plan.ckpt(v))].get("iter_num") == it
               and same_command((rows[os.path.abspath(plan.ckpt(v))].get("metadata") or {}).get("command"), cmd)
               for v, it in iters.items())


# ------------------------------------------------------------------------------------------- running

class Runner:
    def __init__(self, plan, dry_run):
        self.plan, self.dry_run = plan, dry_run
        self.stages = []
        self.step = 0

    def say(self, text):
        print(f"[reproduce] {text}", flush=True)

    def skip(self, name, cmd, why):
        self.stages.append({"stage": name, "command": show(cmd), "status": "skipped", "why": why, "seconds": 0.0})
        self.say(f"{name}: skipped ({why})")

    def run(self, name, cmd, why=""):
        """Run one stage from the repo root; its output goes straight to the terminal. Returns the exit status."""
        self.say(f"{name}: {why + ': ' if why else ''}{show(cmd)}")
        if self.dry_run:
            self.stages.append({"stage": name, "command": show(cmd), "status": "planned", "why": why, "seconds": 0.0})
            return 0
        t0 = time.time()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env)
        stopped = []

        def forward(signum, frame):  # train.py checkpoints on SIGTERM; the pipeline stops after it
            stopped.append(signum)
            proc.send_signal(signum)
        previous = signal.signal(signal.SIGTERM, forward)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the child too; train.py then finishes its step and writes ckpt.pt, which
            # subprocess.run would cut short by killing it: wait (a second Ctrl-C kills it)
            self.say(f"{name}: interrupted; waiting for it to stop (a training saves its checkpoint first)")
            try:
                proc.wait()
            except KeyboardInterrupt:
                proc.kill()
                proc.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        seconds = round(time.time() - t0, 1)
        status = "ran" if rc == 0 else f"failed (exit {rc})"
        self.stages.append({"stage": name, "command": show(cmd), "status": status, "why": why, "seconds": seconds})
        self.say(f"{name}: {status} in {seconds:.1f} s")
        if stopped or rc in (-signal.SIGINT, 130, -signal.SIGTERM):
            raise KeyboardInterrupt
        return rc


def gather_pysource(plan, runner):
    """The gpu scale's offline corpus: this interpreter's standard-library *.py files (site-packages and
    compiled caches excluded), joined in path order into ~1 MB text shards under DIR/data/pysource_text,
    so that prepare_data.py --dataset text reads a folder (thousands of file names would not fit in
    one command line) and each shard is one document of the train/val draw."""
    folder = os.path.join(plan.out, "data", "pysource_text")
    if os.path.isfile(os.path.join(folder, "SOURCES.txt.json")):
        return
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    runner.say(f"corpus pysource: {len(files):,} *.py files under {root} (at most {PYSOURCE_MAX_BYTES >> 20} MB)")
    if runner.dry_run:
        return
    shards, current, size, total, used = [], [], 0, 0, []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue  # a few test files are deliberately not UTF-8
        n = len(text.encode("utf-8"))
        if total + n > PYSOURCE_MAX_BYTES:
            break
        current.append(f"# {os.path.relpath(path, root)}\n{text}")
        used.append(os.path.relpath(path, root))
        size, total = size + n, total + n
        if size >= PYSOURCE_SHARD_BYTES:
            shards.append("\n\n".join(current))
            current, size = [], 0
    if current:
        shards.append("\n\n".join(current))
    if total < (4 << 20):
        raise UserError(f"only {total >> 10} KB of Python source under {root}: too little for the gpu scale; "
                        f"use --corpus shakespeare, or prepare your own text with prepare_data.py and pass --data_dir")
    for i, text in enumerate(shards):
        atomic_write_text(os.path.join(folder, f"shard_{i:04d}.txt"), text)
    # written last: its presence means the folder is complete (the name keeps it out of the *.txt input)
    atomic_write_json(os.path.join(folder, "SOURCES.txt.json"),
                      {"root": root, "python": platform.python_version(), "files": used, "bytes": total,
                       "shards": len(shards)})


def data_ready(plan):
    meta = read_json(os.path.join(plan.data_dir, "meta.json"))
    return (meta is not None and all(os.path.isfile(os.path.join(plan.data_dir, f"{s}.bin")) for s in ("train", "val")))


def execute(plan, runner):
    """Run (or, dry, print) every stage; returns {variant: final state}."""
    args = plan.args
    # ---- data
    if plan.prepare is None:
        if not runner.dry_run and not all(os.path.isfile(os.path.join(plan.data_dir, f"{s}.bin")) for s in ("train", "val")):
            raise UserError(f"--data_dir {plan.data_dir} has no train.bin / val.bin; make it with prepare_data.py")
        runner.say(f"data: {rel(plan.data_dir)} (given with --data_dir)")
    elif data_ready(plan):
        runner.skip("prepare data", plan.prepare, f"{rel(plan.data_dir)} already prepared")
    else:
        if plan.corpus == "pysource":
            gather_pysource(plan, runner)
        if runner.run("prepare data", plan.prepare) != 0:
            raise UserError(f"preparing the data failed (the error is above): {show(plan.prepare)}")

    # ---- training, one variant after another
    states, failed = {}, {}
    n = len(args.variant_list)
    for i, v in enumerate(args.variant_list, 1):
        state, it = run_state(plan, v)
        name = f"train {v} [{i}/{n}]"
        max_iters = plan.train_settings.get("max_iters")
        if state == "done":
            runner.skip(name, plan.train_command(v, resume=True), f"finished at iter {it}")
        else:
            why = "start" if state == "start" else f"resume from iter {it}"
            rc = runner.run(name, plan.train_command(v, resume=state == "resume"),
                            f"{why}" + (f" to iter {max_iters}" if max_iters else ""))
            if rc != 0:
                failed[v] = f"training failed (exit {rc}); re-run reproduce.py to resume it"
                continue
        if runner.dry_run:
            states[v] = max_iters
            continue
        state, states[v] = run_state(plan, v)
        if state != "done":  # e.g. stopped by a signal sent to train.py alone: it exits 0 after checkpointing
            failed[v] = f"training stopped at iter {states[v]}; re-run reproduce.py to resume it"

    # ---- analysis of every finished run
    done = [v for v in args.variant_list if v not in failed]
    for i, v in enumerate(done, 1):
        name = f"analyse {v} [{i}/{len(done)}]"
        cmd = plan.analysis_command(v)
        if not runner.dry_run and analysis_current(plan, v, states[v]):
            runner.skip(name, cmd, f"{rel(plan.analysis_dir(v))}/outliers.json covers iter {states[v]}")
        elif runner.run(name, cmd) != 0:
            failed[v] = "analysis failed; re-run reproduce.py to retry"

    # ---- the compression table over all of them
    done = [v for v in args.variant_list if v not in failed]
    if done:
        cmd = plan.compress_command(done)
        if not runner.dry_run and compress_current(plan, {v: states[v] for v in done}):
            runner.skip("compression table", cmd, f"{rel(plan.compress_dir())}/results.json covers these checkpoints")
        elif runner.run("compression table", cmd) != 0:
            for v in done:
                failed[v] = "compression evaluation failed; re-run reproduce.py to retry"
    return states, failed


# ------------------------------------------------------------------------------------------- collect

def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _mean(xs):
    xs = [x for x in (xs or []) if _finite(x)]
    return sum(xs) / len(xs) if xs else None


def collect_run(plan, variant, failed):
    """One run's row of reproduce.json, read from its own log.jsonl, outliers.json and results.json."""
    run_dir = plan.run_dir(variant)
    row = {"attention": variant, "status": "failed" if variant in failed else "ok", "error": failed.get(variant),
           "run_dir": rel(run_dir), "checkpoint": rel(plan.ckpt(variant)),
           "artifacts": {"log": rel(os.path.join(run_dir, "log.jsonl")),
                         "outliers": rel(os.path.join(plan.analysis_dir(variant), "outliers.json")),
                         "results": rel(os.path.join(plan.compress_dir(), "results.json"))}}
    log = read_log(os.path.join(run_dir, "log.jsonl"))
    evals = [r for r in log if r.get("kind") == "eval" and "val_loss" in r]
    train = [r for r in log if r.get("kind") == "train" and "loss" in r]
    tele = [r for r in log if r.get("kind") == "outliers"]
    row["iter_num"] = evals[-1]["iter"] if evals else None
    row["val_loss"] = evals[-1]["val_loss"] if evals else None
    row["loss_curve"] = {"iter": [r["iter"] for r in train], "loss": [r["loss"] for r in train],
                         "eval_iter": [r["iter"] for r in evals], "val_loss": [r["val_loss"] for r in evals]}
    row["telemetry"] = {"iter": [r["iter"] for r in tele],
                        "max_top1_h": [r.get("outlier/max_top1_h") for r in tele],
                        "max_ratio_h": [r.get("outlier/max_ratio_h") for r in tele]}
    doc = read_json(os.path.join(plan.analysis_dir(variant), "outliers.json")) if row["status"] == "ok" else None
    if doc:
        h = doc["activation"]["layer_output"]
        top1 = [t[0] for t in h["top3"]]
        ratios = h.get("ratio_top1_median") or []
        att = doc.get("attention") or {}
        layer = max(range(len(top1)), key=lambda l: top1[l])
        row.update(
            analysed_iter=doc["model"]["iter_num"],
            max_top1=top1[layer], max_top1_layer=layer, median_at_max=h["median"][layer],
            max_ratio=max((r for r in ratios if _finite(r)), default=None),
            top3=h["top3"], median=h["median"],
            activation_outliers=h.get("outliers_total"), tau=(doc.get("tau_by_type") or {}).get("activation", doc.get("tau")),
            first_token_attention=_mean(att.get("first_token_mass")),
            first_token_attention_by_layer=att.get("first_token_mass"),
            sink_share=_mean(att.get("sink_share")), sink_share_by_layer=att.get("sink_share"),
            gate={k: _mean(v) for k, v in att["gate"].items()} if att.get("gate") else None,
            gate_meaning=att.get("gate_meaning"))
    res = compress_rows(plan).get(os.path.abspath(plan.ckpt(variant))) if row["status"] == "ok" else None
    if res:
        ppl = {m: res["ppl"].get(m) for m in METHODS}
        row["ppl"] = ppl
        row["ppl_change"] = {m: (ppl[m] / ppl["fp"] - 1.0 if _finite(ppl[m]) and _finite(ppl["fp"]) else None)
                             for m in METHODS if m != "fp"}
        row["compress_eval"] = res.get("eval")
        row["compress_dtype"] = res.get("dtype")
    else:
        row["ppl"], row["ppl_change"] = None, None
    return row


def environment(plan):
    from common import run_metadata
    meta = run_metadata(plan.args.device if plan.args.device != "auto" else None)
    meta.update(python_executable=sys.executable, cpu_count=os.cpu_count(), platform=platform.platform(),
                processor=platform.processor() or platform.machine())
    return meta


# ------------------------------------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out, name):
    fig.savefig(os.path.join(out, name), format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return name


def make_figures(out, runs):
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    analysed = [r for r in runs if r.get("top3")]
    figs = {}
    if analysed:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for i, r in enumerate(analysed):
            ax.plot([t[0] for t in r["top3"]], marker="o", color=f"C{i}", label=r["attention"])
        ax.set_yscale("log")
        ax.set(xlabel="layer", ylabel="top-1 |h| (mean over sequences)", title="largest activation per layer (Fig. 11)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        figs["fig11_top1"] = _save(fig, out, "fig11_top1.png")
        cols = min(4, len(analysed))
        rows = -(-len(analysed) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, sharey=True,
                                 constrained_layout=True)
        for ax in axes.flat[len(analysed):]:
            ax.set_visible(False)
        for ax, r in zip(axes.flat, analysed):
            for k in range(3):
                ax.plot([t[k] for t in r["top3"]], marker="os^"[k], label=f"top {k + 1}")
            ax.plot(r["median"], marker="x", color="gray", label="median")
            ax.set_yscale("log")
            ax.set_title(r["attention"], fontsize=9)
            ax.set_xlabel("layer", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0, 0].legend(fontsize=6)
        fig.suptitle("top-3 and median |h| per layer (Fig. 11)")
        figs["fig11_top3"] = _save(fig, out, "fig11_top3.png")
    curves = [r for r in runs if r["loss_curve"]["iter"] or r["loss_curve"]["eval_iter"]]
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for i, r in enumerate(curves):
            c = r["loss_curve"]
            axes[0].plot(c["iter"], c["loss"], color=f"C{i}", lw=1, label=r["attention"])
            axes[1].plot(c["eval_iter"], c["val_loss"], color=f"C{i}", marker="o", ms=3, label=r["attention"])
        axes[0].set(xlabel="iteration", ylabel="training loss", title="training loss (Fig. 12)")
        axes[1].set(xlabel="iteration", ylabel="validation loss", title="validation loss")
        for ax in axes:
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        figs["fig12_loss"] = _save(fig, out, "fig12_loss.png")
    tele = [r for r in runs if r["telemetry"]["iter"]]
    if tele:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for i, r in enumerate(tele):
            t = r["telemetry"]
            axes[0].plot(t["iter"], t["max_top1_h"], color=f"C{i}", marker=".", label=r["attention"])
            axes[1].plot(t["iter"], t["max_ratio_h"], color=f"C{i}", marker=".", label=r["attention"])
        axes[0].set(xlabel="iteration", ylabel="max over layers of top-1 |h|", title="outlier emergence: largest |h|")
        axes[1].set(xlabel="iteration", ylabel="max over layers of top-1 / median |h|",
                    title="outlier emergence: ratio to the median")
        for ax in axes:
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        figs["outlier_emergence"] = _save(fig, out, "outlier_emergence.png")
    return figs


# ------------------------------------------------------------------------------------------- report

def _f(x, digits=4):
    if x is None:
        return "–"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{digits}g}"
    return str(x)


def _pct(x):
    return "–" if x is None else f"{x * 100 + 0.0:+.1f}%".replace("-0.0%", "+0.0%")


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


MASSIVE_RATIO = 100.0  # top-1 / median |h| well beyond a Gaussian's (~5-10x): the paper's are in the thousands


SAME_CHANGE = 0.01  # perplexity changes within 1 percentage point of default's are reported as the same


def _versus(change, base):
    if change is None or base is None:
        return "not comparable"
    if abs(change - base) < SAME_CHANGE:
        return "about the same as default's"
    return "smaller than default's" if change < base else "larger than default's"


def findings(runs, plan):
    """Plain statements of what the numbers show, including where they do not reproduce the paper."""
    ok = {r["attention"]: r for r in runs if r["status"] == "ok" and r.get("max_top1") is not None}
    out = []
    base = ok.get("default")
    if base is None:
        out.append("`default` was not run (or not analysed), so nothing here can be compared with it.")
        return out
    others = [r for v, r in ok.items() if v != "default"]
    n_out = base.get("activation_outliers") or 0
    massive = n_out > 0 or (base.get("max_ratio") or 0) >= MASSIVE_RATIO
    tau = base.get("tau")
    if massive:
        out.append(f"**Massive activations in `default`: yes.** Its largest |h| is {_f(base['max_top1'])} "
                   f"(layer {base['max_top1_layer']}), {_f(base['max_ratio'])}x the layer median, with {n_out} "
                   f"activation outliers above tau={_f(tau)} x mean|h|.")
        bullets = []
        for r in sorted(others, key=lambda r: r["max_ratio"] or 0):
            rel_top = r["max_top1"] / base["max_top1"] if base["max_top1"] else None
            verdict = ("removes them at this scale" if (r.get("activation_outliers") or 0) == 0
                       and (r.get("max_ratio") or 0) < MASSIVE_RATIO else "does not remove them")
            bullets.append(f"- `{r['attention']}` {verdict}: largest |h| {_f(r['max_top1'])} ({_f(rel_top, 3)}x "
                           f"default's), {_f(r['max_ratio'])}x its median, {r.get('activation_outliers') or 0} outliers.")
        if bullets:
            out.append("\n".join(bullets))
    else:
        out.append(f"**No massive activations emerged in `default` at this scale**: its largest |h| is "
                   f"{_f(base['max_top1'])}, only {_f(base['max_ratio'])}x the layer median and {n_out} "
                   f"activations pass tau={_f(tau)} x mean|h| (the paper's are thousands of times the median). "
                   f"The paper's Fig. 10-11 comparison (outliers in default, none with an explicit sink or "
                   f"scaling) is therefore **not reproduced** here: there is nothing for the variants to remove.")
        biggest = max(ok.values(), key=lambda r: r["max_ratio"] or 0)
        out.append(f"Across variants the top-1/median ratio ranges from "
                   f"{_f(min(r['max_ratio'] or 0 for r in ok.values()))} to {_f(biggest['max_ratio'])} "
                   f"(`{biggest['attention']}`); differences of this size are not massive activations.")
    tele = base["telemetry"]
    ratios = [(i, x) for i, x in zip(tele["iter"], tele["max_ratio_h"]) if _finite(x)]
    if ratios:
        peak = max(ratios, key=lambda p: p[1])
        out.append(f"Telemetry (one fixed validation batch every {plan.train_settings.get('outlier_interval', '?')} "
                   f"iterations): `default`'s max top-1/median ratio went from {_f(ratios[0][1])} at iter "
                   f"{ratios[0][0]} to {_f(ratios[-1][1])} at iter {ratios[-1][0]} (peak {_f(peak[1])} at iter "
                   f"{peak[0]})" + (", i.e. it did not grow into a massive activation during training."
                                    if peak[1] < MASSIVE_RATIO else "."))
    # compression
    if base.get("ppl_change"):
        dw, ds = base["ppl_change"]["w8"], base["ppl_change"]["sparse50"]
        out.append(f"**Compression** (`default`: PPL {_f(base['ppl']['fp'])} -> W8 {_f(base['ppl']['w8'])} "
                   f"({_pct(dw)}), 50% sparse {_f(base['ppl']['sparse50'])} ({_pct(ds)}); paper Table 3: 27.24 -> "
                   f"93.44 (+243%) / 7235.68 for default, 26.95 -> 29.22 (+8.4%) / 39.47 for scaling).")
        bullets = []
        for r in others:
            if not r.get("ppl_change"):
                continue
            cw, cs = r["ppl_change"]["w8"], r["ppl_change"]["sparse50"]
            bullets.append(f"- `{r['attention']}`: W8 {_pct(cw)} ({_versus(cw, dw)}), 50% sparse {_pct(cs)} "
                           f"({_versus(cs, ds)}).")
        if bullets:
            out.append("\n".join(bullets))
        changes = [c for r in ok.values() for c in (r.get("ppl_change") or {}).values() if c is not None]
        if changes and max(abs(c) for c in changes) < 0.05:
            out.append(f"Every variant loses less than 5% perplexity to either method here (`default`: W8 "
                       f"{_pct(dw)}, 50% sparse {_pct(ds)}), so the differences above are not the paper's effect: "
                       f"without massive activations the per-tensor AbsMax scale of W8 is not blown up, and the "
                       f"paper's gap between default and scaling cannot appear at this scale.")
    # early convergence
    early = [r for r in ok.values() if len(r["loss_curve"]["eval_iter"]) > 1]
    if base in early and len(early) > 1:
        k = 1  # first evaluation after initialization
        at = base["loss_curve"]["eval_iter"][k]
        rows = [(r["attention"], r["loss_curve"]["val_loss"][k]) for r in early if r["loss_curve"]["eval_iter"][k] == at]
        faster = [v for v, l in rows if v != "default" and l < base["loss_curve"]["val_loss"][k]]
        spread = max(l for _, l in rows) - min(l for _, l in rows)
        out.append(f"**Early convergence** (val loss at iter {at}, the first evaluation): "
                   + ", ".join(f"`{v}` {_f(l)}" for v, l in sorted(rows, key=lambda x: x[1]))
                   + f". Below `default`: {', '.join(f'`{v}`' for v in faster) or 'none'}. "
                   f"Final val loss (iter {base['iter_num']}): "
                   + ", ".join(f"`{r['attention']}` {_f(r['val_loss'])}" for r in sorted(early, key=lambda r: r['val_loss']))
                   + f". One seed per variant: the spread at iter {at} ({_f(spread, 2)} nats) is not compared with "
                   f"seed-to-seed variation, so small differences are not evidence of faster convergence.")
    return out


def write_report(plan, runner, runs, figs, env, doc_name):
    args = plan.args
    out = []
    out.append(f"# Reproducing the attention-variant comparison: `--scale {args.scale}`\n")
    what = plan.scale["what"]
    out.append(f"{what[0].upper() + what[1:]}. Generated by `reproduce.py` on {env['date']} "
               f"({env['gpu']}). All numbers below are read from each run's own `log.jsonl`, "
               f"`outliers/outliers.json` and the shared `compress/results.json`; `{doc_name}` holds them.\n")
    if args.scale == "tiny":
        out.append("> This is the **tiny** scale: a 2-layer, 64-dimensional model trained for a few hundred "
                   "thousand tokens of Python source. It checks the pipeline end to end; it is far too small and "
                   "short for the paper's phenomena, and nothing below is evidence for or against the paper.\n")
    out.append("## What this run shows\n")
    out += [f"{line}\n" for line in findings(runs, plan)]
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        out.append("**Incomplete:** " + "; ".join(f"`{r['attention']}`: {r['error']}" for r in failed) + ".\n")
    out.append("## Per variant\n")
    header = ["variant", "iters", "final val loss", "max top-1 \\|h\\| (layer)", "top-1 / median",
              "activation outliers", "first-token attention", "sink share", "gate (first / other)",
              "PPL fp", "PPL W8 (Δ)", "PPL 50% sparse (Δ)"]
    rows = []
    for r in runs:
        gate = r.get("gate")
        ppl, ch = r.get("ppl") or {}, r.get("ppl_change") or {}
        rows.append([f"`{r['attention']}`" + (" (failed)" if r["status"] != "ok" else ""), _f(r.get("iter_num")),
                     _f(r.get("val_loss")),
                     f"{_f(r.get('max_top1'))} (L{r['max_top1_layer']})" if r.get("max_top1") is not None else "–",
                     _f(r.get("max_ratio")), _f(r.get("activation_outliers")), _f(r.get("first_token_attention"), 3),
                     _f(r.get("sink_share"), 3),
                     f"{_f(gate.get('first'), 3)} / {_f(gate.get('other'), 3)}" if gate else "–",
                     _f(ppl.get("fp")), f"{_f(ppl.get('w8'))} ({_pct(ch.get('w8'))})" if ppl else "–",
                     f"{_f(ppl.get('sparse50'))} ({_pct(ch.get('sparse50'))})" if ppl else "–"])
    out.append(_table(header, rows) + "\n")
    ev = next((r.get("compress_eval") for r in runs if r.get("compress_eval")), None)
    out.append("Columns: final val loss is train.py's last evaluation; |h| columns come from analyze_outliers.py "
               f"({plan.analysis['num_seqs']} sequences of `{rel(os.path.join(plan.data_dir, 'val.bin'))}`; largest "
               "|h| of a layer's output, mean over sequences; the ratio is to that layer's median |h|, maximum over "
               "layers); activation outliers are |h| > tau x mean|h| of a sequence (tau in outliers.json); "
               "first-token attention and sink share are means over layers and heads; the gate columns are "
               "the variant's output gate at the first token and elsewhere (where the variant has one); "
               "PPL from compress_eval.py"
               + (f" on {ev['data']} ({ev['tokens']:,} scored tokens)" if ev else "")
               + "; Δ is the change relative to fp.\n")
    titles = {"fig11_top1": "Fig. 11: largest |h| per layer, all variants",
              "fig11_top3": "Fig. 11: top-3 and median |h| per layer",
              "fig12_loss": "Fig. 12: loss curves",
              "outlier_emergence": "Outlier emergence over training (telemetry in log.jsonl)"}
    out.append("## Figures\n")
    for key, name in figs.items():
        out.append(f"### {titles[key]}\n\n![{key}]({name})\n")
    if not figs:
        out.append("No figures: no run has been analysed or logged yet.\n")
    out.append("## How it was made\n")
    out.append(f"Data: `{rel(plan.data_dir)}` (corpus `{plan.corpus}`"
               + (", this Python installation's standard-library source, see `data/pysource_text/SOURCES.txt.json`"
                  if plan.corpus == "pysource" else "") + "). Every variant trains with seed "
               f"{args.seed}: the same initial-weight RNG stream and the same data order.\n")
    out.append(f"Commands, run from the repo root (`{REPO}`) with `{sys.executable}`; `skipped` stages were "
               "already done by an earlier invocation:\n")
    out.append("```\n" + "\n".join(f"# {s['stage']}: {s['status']}" + (f" ({s['seconds']} s)" if s['seconds'] else "")
                                   + f"\n{s['command']}" for s in runner.stages) + "\n```\n")
    out.append(f"Whole pipeline: `{show([sys.executable, os.path.relpath(__file__, REPO)] + args.argv)}`\n")
    out.append("Environment:\n")
    keys = ("date", "git_commit", "python", "torch", "triton", "cuda", "gpu", "cpu_count", "platform", "hostname")
    out.append("\n".join(f"- {k}: `{env.get(k)}`" for k in keys) + "\n")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- main

def print_paper_notes(plan):
    print(f"\nThe paper scale trains eight GPT-2 124M models for 50,000 iterations of 491,520 tokens each; "
          f"run each command on a node with {plan.nproc} GPUs (or pass --nproc_per_node), or the whole list with "
          f"`python reproduce.py --scale paper --execute`. Every training command is resumable: re-running "
          f"reproduce.py (or the printed command with --init_from=resume) continues from ckpt.pt. Multi-node: "
          f"replace `--standalone` by `--nnodes=N --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:29500` "
          f"(out_dir on a shared filesystem).", flush=True)


def main(argv=None):
    args = parse_args(argv)
    plan = Plan(args)
    print_only = args.dry_run or (args.scale == "paper" and not args.execute)
    if not print_only:
        resolve_device(args.device)  # every stage gets it: refuse an unusable one before the first
        check_output_dir(args.out, TOOL, REPORT_FILES, inputs=[args.data_dir])
    runner = Runner(plan, dry_run=print_only)
    runner.say(f"scale {args.scale}: {plan.scale['what']}")
    runner.say(f"variants: {', '.join(args.variant_list)}; output {rel(args.out)}"
               + (" (dry run: nothing is run or written)" if print_only else ""))
    t0 = time.time()
    states, failed = execute(plan, runner)
    if print_only:
        if args.scale == "paper":
            print_paper_notes(plan)
        return 0

    runs = [collect_run(plan, v, failed) for v in args.variant_list]
    env = environment(plan)
    with output_set(args.out, TOOL, REPORT_FILES, inputs=[args.data_dir]) as tmp:
        write_outputs(tmp, plan, runner, runs, env, t0)
    runner.say(f"wrote {rel(os.path.join(args.out, 'REPORT.md'))} and reproduce.json in {time.time() - t0:.0f} s")
    if failed:
        raise UserError(f"{len(failed)} of {len(args.variant_list)} variants did not finish ("
                        + "; ".join(f"{v}: {e}" for v, e in failed.items())
                        + f"); the report covers the others; re-run the same command to continue")
    return 0


def write_outputs(out, plan, runner, runs, env, t0):
    """The figures, reproduce.json and REPORT.md into `out` (a staging directory: they land as one set)."""
    args = plan.args
    figs = make_figures(out, runs)
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "scale": args.scale, "variants": args.variant_list,
           "out": args.out, "corpus": plan.corpus, "data_dir": rel(plan.data_dir),
           "data_meta": {k: v for k, v in (read_json(os.path.join(plan.data_dir, "meta.json")) or {}).items()
                         if k != "source"},
           "settings": {"seed": args.seed, "train": plan.train_settings, "analysis": plan.analysis,
                        "compress": {**plan.compress, "methods": list(METHODS), "data": plan.compress_data_args()},
                        "nproc_per_node": plan.nproc},
           "runs": runs, "figures": figs, "stages": runner.stages, "environment": env,
           "seconds": round(time.time() - t0, 1)}
    from common import json_safe
    with open(os.path.join(out, "reproduce.json"), "w", encoding="utf-8") as f:
        f.write(json_text(json_safe(doc)))
    with open(os.path.join(out, "REPORT.md"), "w", encoding="utf-8") as f:
        f.write(write_report(plan, runner, runs, figs, env, "reproduce.json"))


if __name__ == "__main__":
    cli_main(main)
