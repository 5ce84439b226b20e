"""One command from raw text to the paper's headline comparison, for every attention variant.

    python reproduce.py --scale tiny --out out/reproduce_tiny          # every variant, <= 10 min on 2 CPU cores
    python reproduce.py --scale gpu --out out/reproduce_gpu            # default vs 2 designs, <= 9 min on one H100/H200
    python reproduce.py --scale gpu --dry-run                          # its plan, tokens and time estimate (any machine)
    python reproduce.py --scale gpu-long --out out/reproduce_gpu-long  # every variant, larger runs (~25 min, estimate)
    python reproduce.py --scale paper --out out/paper                  # prints the torchrun commands
    python reproduce.py --scale paper --out out/paper --execute        # ... and runs them (GPU cluster)
    python reproduce.py --scale tiny --variants default,scaling --max_iters 10 --out /tmp/smoke   # CI smoke

Stages, each a subprocess of the repo's own scripts (run from the repo root; scripts never import
each other): prepare_data.py for the scale's corpus; train.py once per variant, all with the same
seed and therefore the same initial-weight RNG stream and data order (under torchrun when
--nproc_per_node > 1); analyze_outliers.py on every checkpoint; compress_eval.py over all of them
(the columns of compression_methods.REPRODUCE: the paper's W8 and 50% sparsity, W8A8 per tensor with
and without position 0 in full precision, static and per token, W4 groups of 128, a 4-bit KV cache).
Then DIR/REPORT.md, DIR/reproduce.json and the figures (Fig. 11 top-1 / top-3 |h| per layer, Fig. 12
loss curves, outlier emergence over training from the telemetry).

--scale gpu fits a wall-clock budget (--budget-s, default 540 s): the iterations per variant are
sized from the training throughput measured on one H200 plus stated overheads, every stage has a
deadline (a training past it is stopped through its checkpointing SIGTERM handler and analysed as
far as it got), and the report is rewritten after every stage and every 30 s of training, so a run
cut off anywhere still reports what it saw.

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

from compress import methods as compression_methods
from runtime.cli import ArgumentParser, UserError, check_seed, cli_main, is_number
from runtime.files import atomic_write_json, atomic_write_text, json_safe, json_text, read_json_file
from runtime.outputs import check_output_dir, output_set
from runtime.reports import (have_matplotlib, loss_curve, markdown_table, number, plot_loss_curves, plot_top1,
                             plot_top3, pyplot, read_training_log, save_figure, signed_percent)
from runtime.system import resolve_device
from training.config import FREE_ON_RESUME

REPO = os.path.dirname(os.path.abspath(__file__))
# shared files: ../shared beside the repo, or a git-ignored ./shared copy carried to a GPU machine
SHARED_DIRS = (os.path.normpath(os.path.join(REPO, "..", "shared")), os.path.join(REPO, "shared"))
FORMAT = "outlier-gpt/reproduce"
FORMAT_VERSION = 1
# what reproduce.py itself writes into --out, as one set (runtime.outputs.output_set); each stage's script owns its folder
TOOL = "reproduce.py"
REPORT_FILES = ("fig11_top1.png", "fig11_top3.png", "fig12_loss.png", "outlier_emergence.png", "emergence_by_layer.png",
                "reproduce.json", "REPORT.md")
METHODS = compression_methods.REPRODUCE  # compress_eval.py's columns, from the method registry

# ------------------------------------------------------------------------------------------- scales
# Each scale: corpus, training settings (config files + --key=value on top), analysis and compression
# settings. Settings a resume may not change are compared with the checkpoint's (see run_state).
SCALES = {
    "tiny": {
        "what": "every variant on the builtin smoke-test corpus (Python standard-library source) on a CPU; "
                "tests the pipeline, it is too small and short for massive activations",
        "corpus": "builtin",
        "configs": ["config/tiny.py"],
        # config/tiny.py is 2 layers x 64 dims, 8 x 64 tokens per iteration. Its 50k-entry output layer
        # dominates the cost (~0.2 s per iteration, ~0.3 s per 1k evaluated tokens and method on 2 idle
        # cores); 60 iterations, 4 evaluations of 4 batches and 4k compression tokens for each of the
        # nine methods keep all eight variants near 5-6 minutes idle, leaving room within the 10-minute
        # budget for a CPU shared with other work (80 iterations took 11 minutes at a load average of 3-4)
        "train": {"max_iters": 60, "lr_decay_iters": 60, "warmup_iters": 6, "eval_interval": 20,
                  "eval_iters": 4, "log_interval": 5, "outlier_interval": 10, "compile": False,
                  "snapshot_interval": 0},
        "lr_decay_follows_max_iters": True,
        "analysis": {"num_seqs": 16, "batch_size": 8},
        "compress": {"max_tokens": 4096, "batch_size": 16},
        "compress_data": "val",
        "nproc_per_node": 1,
    },
    "gpu": {
        "what": "GPT-2 124M (12 layers, 12 heads, 768 dims, 1024-token context: the model of Sun et al.'s and "
                "An et al.'s runs) trained per variant on one H100/H200 within --budget-s, on the Python "
                "standard library's source code (no network), `default` against designs that should remove "
                "massive activations",
        "corpus": "pysource",
        "configs": [],
        # default and two designs with direct evidence on GPT-2: explicit attention biases k', v' (Sun et
        # al. 2024, section 5.2) and softmax-off-by-one (Kaul et al. 2025 trained GPT-2 with softmax-1)
        "variants": ("default", "attention_bias", "softmax1"),
        # batch 16 x 1024 is the shape whose throughput was measured on an H200 (H200_TOKENS_PER_S);
        # max_iters is sized from --budget-s (gpu_plan_iters). Learning rate: nanoGPT's / the paper
        # recipe's 6e-4, held constant after a short warmup (min_lr = learning_rate) like Gu et al.'s
        # constant-rate runs: a small or early-decayed rate delays the attention sink (Gu et al. 2025);
        # weight decay 0.1 as in the paper recipe (Gu et al.: weight decay encourages the sink).
        "train": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50304,
                  "bias": False, "dropout": 0.0, "batch_size": 16, "gradient_accumulation_steps": 1,
                  "max_iters": None, "warmup_iters": 100, "learning_rate": 6e-4, "min_lr": 6e-4,
                  "weight_decay": 0.1, "grad_clip": 1.0, "eval_interval": 1000, "eval_iters": 20,
                  "log_interval": 10, "outlier_interval": 40, "compile": False, "snapshot_interval": 0},
        "lr_decay_follows_max_iters": False,
        "analysis": {"num_seqs": 8},
        "compress": {"max_tokens": 32768},
        "compress_data": "val",
        "nproc_per_node": 1,
        "budget_s": 540,
    },
    "gpu-long": {
        "what": "a GPT-2-shaped 12-layer model (8 heads, 512 dims, 512-token context) per variant on one "
                "H100/H200, on the Python standard library's source code found on the machine (no network)",
        "corpus": "pysource",
        "configs": [],
        # 32 x 2 x 512 = 32,768 tokens/iter x 2,000 iters = 65.5M tokens per variant, bf16, compiled;
        # pysource of CPython 3.11 is 15.3M tokens (measured), so about 4 epochs.
        # Estimated (not measured) at 2-3 minutes per variant on one H100 including compilation, i.e.
        # about 20-25 minutes for all eight.
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
    "gpu-long-2b": {
        "what": "the paper configs with the \"50,000 iterations, approximately 2B tokens\" reading "
                "(config/<variant>.py + config/recipe_2b.py: GPT-2 124M, 2.05B tokens of OpenWebText per "
                "variant) on the GPUs of one node; compression on WikiText-2 test",
        "corpus": "openwebtext",
        "configs": None,  # config/<variant>.py
        "overlays": ["config/recipe_2b.py"],
        "train": {},
        "lr_decay_follows_max_iters": False,
        "analysis": {"num_seqs": 100},
        "compress": {},
        "compress_data": "wikitext2",
        "nproc_per_node": 1,  # every GPU of the node; 1 when none is visible (printing the plan)
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

# ------------------------------------------------------------------------------------------- gpu time model
# Training tokens/s measured on one NVIDIA H200 (commit c99af85, torch 2.11, triton 3.6, 2026-12-04):
# benchmarks/train_throughput.py, GPT-2 124M, batch 16 x 1024, bf16 autocast, eager, the fused kernel
# (the path attn_backend=auto takes on CUDA); ../shared/gpu-measurements/2026-12-04-h200/
# train_throughput_nvidia-h200_20261204-021013.json (a test checks these against that file).
H200_TOKENS_PER_S = {"default": 353_890, "fixed_bias": 346_713, "context_bias": 335_344, "attention_bias": 313_085,
                     "scaling": 296_231, "sigmoid": 337_149, "gated": 292_414, "softmax1": 333_154}
H200_SOURCE = "H200, commit c99af85, GPT-2 124M, batch 16 x 1024, bf16, eager, fused kernel"
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
STAGE_GRACE_S = 30     # a training stopped at its deadline gets this long to write its checkpoint
REFRESH_S = 30         # the partial report is rewritten this often while a training runs


SCALE_CHOICES = ("tiny", "gpu", "gpu-long", "paper")
GPU_SCALES = ("gpu", "gpu-long", "gpu-long-2b")


def parse_args(argv):
    import attention_variants
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", required=True, choices=SCALE_CHOICES,
                   help="tiny: CPU, minutes; gpu: one H100/H200 within --budget-s (9 min); gpu-long: one GPU, "
                        "~25 min (--recipe 2b: the paper's 2B-token reading); paper: the paper configs via torchrun")
    p.add_argument("--variants", default=None,
                   help=f"comma list of attention variants (default: default,attention_bias,softmax1 for gpu, "
                        f"else all of {', '.join(attention_variants.VARIANTS)})")
    p.add_argument("--out", default=None, help="output directory (default out/reproduce_SCALE)")
    p.add_argument("--report_dir", "--report-dir", default=None,
                   help="also write REPORT.md, reproduce.json and the figures here after every stage (e.g. a "
                        "folder copied back from a remote GPU machine, while the checkpoints stay in --out)")
    p.add_argument("--corpus", choices=CORPORA, default=None,
                   help="training corpus (default: builtin for tiny, pysource for gpu and gpu-long, openwebtext "
                        "for paper); pysource is this Python installation's standard-library source (or a "
                        "prepared copy in ../shared/data/pysource or ./shared/data/pysource); shakespeare and "
                        "wikitext2 use ../shared/data when present")
    p.add_argument("--data_dir", default=None,
                   help="use this prepared data directory (train.bin, val.bin) instead of preparing the corpus "
                        "(default: DIR/data/CORPUS; data/openwebtext for paper)")
    p.add_argument("--seed", type=int, default=1337, help="training seed shared by every variant (default 1337)")
    p.add_argument("--max_iters", type=int, default=None,
                   help="override the scale's iterations (smoke tests; gpu: instead of sizing them from the budget)")
    p.add_argument("--budget_s", "--budget-s", type=float, default=None,
                   help="--scale gpu: wall-clock budget in seconds (default 540); sizes the iterations per "
                        "variant and sets every stage's deadline")
    p.add_argument("--recipe", choices=("small", "2b"), default="small",
                   help="--scale gpu-long: small (12 layers x 512 dims, 65.5M tokens per variant, default) or 2b "
                        "(config/<variant>.py + config/recipe_2b.py: GPT-2 124M, 2.05B tokens of OpenWebText)")
    p.add_argument("--num_seqs", type=int, default=None, help="override the analysis' number of sequences")
    p.add_argument("--max_tokens", type=int, default=None, help="override the compression evaluation's token count")
    p.add_argument("--nproc_per_node", type=int, default=None,
                   help="processes (GPUs) per training; >1 trains under torchrun (default 1; paper: 8)")
    p.add_argument("--device", default="auto", help="device for every stage (default auto)")
    p.add_argument("--dry_run", "--dry-run", action="store_true",
                   help="print the plan (for gpu: tokens per variant and the time estimate) and the commands; "
                        "run and write nothing; works without a GPU")
    p.add_argument("--prepare_only", "--prepare-only", action="store_true",
                   help="only prepare the scale's corpus under DIR/data (e.g. to carry it to an offline GPU machine)")
    p.add_argument("--execute", action="store_true",
                   help="--scale paper: run the commands (without it paper only prints them)")
    args = p.parse_args(argv)
    if args.recipe != "small" and args.scale != "gpu-long":
        raise UserError("--recipe applies to --scale gpu-long")
    if args.budget_s is not None and args.scale != "gpu":
        raise UserError("--budget_s applies to --scale gpu (the other scales have no time model)")
    if args.budget_s is not None and not args.budget_s > 0:
        raise UserError(f"--budget_s must be positive, got {args.budget_s:g}")
    args.scale_key = "gpu-long-2b" if args.scale == "gpu-long" and args.recipe == "2b" else args.scale
    if args.scale == "gpu" and args.budget_s is None:
        args.budget_s = float(SCALES["gpu"]["budget_s"])
    default_variants = SCALES[args.scale_key].get("variants") or attention_variants.VARIANTS
    names = [v.strip() for v in (args.variants or ",".join(default_variants)).split(",") if v.strip()]
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
    if args.report_dir:
        args.report_dir = os.path.abspath(args.report_dir)
    return args


def require_cuda(args):
    """The GPU scales refuse a machine without CUDA in one line, before anything is written."""
    if args.scale_key not in GPU_SCALES or args.dry_run or args.prepare_only:
        return
    if args.device != "auto" and not str(args.device).startswith("cuda"):
        raise UserError(f"--scale {args.scale} runs on CUDA, not --device {args.device}; use --scale tiny on a CPU")
    import torch
    if not torch.cuda.is_available():
        raise UserError(f"--scale {args.scale} needs a CUDA GPU and none is visible (torch.cuda.is_available() is "
                        f"False); --dry_run prints its plan and time estimate on any machine")


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
    for base in SHARED_DIRS:
        path = os.path.join(base, *parts)
        if os.path.exists(path):
            return path
    return None


def can_prepare():
    """Whether prepare_data.py can run here: it needs the `datasets` package."""
    import importlib.util
    try:
        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):  # a broken install, or one blocked through sys.modules
        return False


def prepared_copy(corpus):
    """A prepared copy of `corpus` (train.bin, val.bin, meta.json) in shared/data/<corpus>, or None: how an
    offline GPU machine without the `datasets` package gets its data (make gpu-data writes ./shared)."""
    path = shared("data", corpus)
    if path and all(os.path.isfile(os.path.join(path, f)) for f in ("train.bin", "val.bin", "meta.json")):
        return path
    return None


# ------------------------------------------------------------------------------------------- plan

class Plan:
    """Everything reproduce.py will run, computed before anything runs (so --dry_run shows it all)."""

    def __init__(self, args):
        self.args = args
        self.scale = SCALES[args.scale_key]
        self.out = args.out
        self.corpus = args.corpus or self.scale["corpus"]
        self.data_note = None
        if args.data_dir:
            self.data_dir, self.prepare = os.path.abspath(args.data_dir), None
        elif self.scale["configs"] is None and self.corpus == "openwebtext":
            # OpenWebText is ~17 GB of tokens: kept where every other command expects it, shared by runs
            self.data_dir = os.path.join(REPO, "data", "openwebtext")
            self.prepare = self.prepare_command()
        elif self.corpus == "pysource" and not args.prepare_only and not can_prepare() and prepared_copy("pysource"):
            # this Python cannot prepare it (a bare GPU image has no `datasets`): the copy carried in shared/
            self.data_dir, self.prepare = prepared_copy("pysource"), None
            self.data_note = "prepared copy from make gpu-data"
        else:
            self.data_dir = os.path.join(self.out, "data", self.corpus)
            self.prepare = self.prepare_command()
        self.nproc = args.nproc_per_node or self.scale["nproc_per_node"]
        if self.scale["configs"] is None and not args.nproc_per_node:
            import torch  # every GPU of this node; 8 (the paper's node) when printing on a machine without
            self.nproc = torch.cuda.device_count() or self.nproc or 8
        self.train_settings = {k: v for k, v in self.scale["train"].items() if v is not None}
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
        self.budget_s = args.budget_s
        self.estimate = None
        if self.budget_s is not None:
            if args.max_iters is None:
                self.train_settings["max_iters"] = gpu_plan_iters(self)
            self.estimate = gpu_estimate(self, self.train_settings["max_iters"])
            if self.estimate["total_s"] > self.budget_s:
                raise UserError(f"the plan needs an estimated {self.estimate['total_s']:.0f} s, more than --budget_s "
                                f"{self.budget_s:g}; lower --max_iters or raise --budget_s")

    def tokens_per_iter(self):
        t = self.train_settings
        return t["batch_size"] * t["gradient_accumulation_steps"] * t["block_size"]

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
        configs = configs + self.scale.get("overlays", [])
        settings = {**self.train_settings, "attention": variant, "out_dir": rel(self.run_dir(variant)),
                    "data_dir": rel(self.data_dir), "init_from": "resume" if resume else "scratch",
                    # a start is where the run directory has no ckpt.pt: what a training killed before its first
                    # checkpoint left there (log, record) is this pipeline's own, and starts over
                    "overwrite": not resume, "wandb_log": False}
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
        """The evaluation text and, for the calibrated methods, calibration data from another split: the
        train.bin beside val.bin, WikiText-2 train through `datasets`, or the local WikiText-2 validation
        text beside the local test text."""
        if self.scale["compress_data"] == "wikitext2":
            local = shared("data", "wikitext-2", "test.txt")
            valid = shared("data", "wikitext-2", "valid.txt")
            if not local:
                return ["--dataset", "wikitext2"]
            return ["--text_file", local] + (["--calib_text_file", valid] if valid else [])
        return ["--data", rel(os.path.join(self.data_dir, "val.bin"))]

    def compress_command(self, variants):
        cmd = [sys.executable, "compress_eval.py"] + [rel(self.ckpt(v)) for v in variants]
        cmd += self.compress_data_args() + ["--methods", ",".join(METHODS), "--out", rel(self.compress_dir()),
                                            "--no_progress", "--device", self.args.device]
        for k, v in self.compress.items():
            cmd += [f"--{k}", str(v)]
        return cmd


# ------------------------------------------------------------------------------------------- gpu estimate

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
        tok_s = H200_TOKENS_PER_S[v]
        train_s = tokens / (tok_s * a["train_efficiency"])
        extra = a["train_start_s"] + evals * a["eval_s"] + (evals - 1) * a["save_s"] + records * a["telemetry_s"]
        rows.append({"stage": f"train {v}", "tokens": tokens, "tokens_per_s": tok_s, "train_s": round(train_s, 1),
                     "seconds": round(train_s + extra, 1),
                     "what": f"{tokens / tok_s / a['train_efficiency']:.0f} s of steps + {extra:.0f} s for start-up, "
                             f"{evals} evaluations, {evals - 1} checkpoint(s), {records} telemetry records"})
    n = len(plan.args.variant_list)
    rows.append({"stage": "analyses", "what": f"{n} x analyze_outliers.py", "seconds": n * a["analysis_s"]})
    rows.append({"stage": "compression table", "what": f"compress_eval.py, {n} checkpoints",
                 "seconds": a["compress_s"] + n * len(METHODS) * a["compress_per_method_s"]})
    rows.append({"stage": "reports", "what": "REPORT.md, reproduce.json, figures", "seconds": a["report_s"]})
    return {"iters": iters, "tokens_per_variant": tokens, "rows": rows, "total_s": round(sum(r["seconds"] for r in rows), 1),
            "budget_s": plan.budget_s, "plan_share": PLAN_SHARE, "throughput_source": H200_SOURCE,
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
             f"time estimate (training: tokens/s measured on an {H200_SOURCE}; the rest assumed, see GPU_ASSUMED "
             f"in reproduce.py and the README):",
             f"  {'stage':<26} {'tokens':>12} {'tokens/s':>9} {'seconds':>8}  what"]
    for r in e["rows"]:
        tokens = f"{r['tokens']:,}" if "tokens" in r else ""
        tok_s = f"{r['tokens_per_s']:,}" if "tokens_per_s" in r else ""
        lines.append(f"  {r['stage']:<26} {tokens:>12} {tok_s:>9} {r['seconds']:>8.0f}  {r['what']}")
    lines.append(f"estimated total: {e['total_s']:.0f} s of the {plan.budget_s:g} s budget")
    return lines


# ------------------------------------------------------------------------------------------- state

def read_json(path, kind=dict):
    """A JSON file a stage wrote, or None where there is none yet, or where it is not a `kind` (damaged:
    the stage runs again and writes it anew)."""
    doc = read_json_file(path) if os.path.lexists(path) else None
    return doc if isinstance(doc, kind) else None


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


# settings a resume may change without changing what the run computes (train_config's), less the data, which
# the plan fixes: a run directory trained on other data is another run
FREE_KEYS = FREE_ON_RESUME - {"data_dir", "dataset"}


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


# ------------------------------------------------------------------------------------------- running

def stage_env():
    """The stages' environment: unbuffered output, and the tiktoken cache of a shared folder when none is set
    (an offline GPU machine carries it in ./shared)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cache = shared("tiktoken_cache")
    if cache and not env.get("TIKTOKEN_CACHE_DIR"):
        env["TIKTOKEN_CACHE_DIR"] = cache
    env.setdefault("WANDB_MODE", "offline")
    return env


class Runner:
    def __init__(self, plan, dry_run, on_progress=None):
        self.plan, self.dry_run = plan, dry_run
        self.stages = []
        self.step = 0
        self.on_progress = on_progress  # rewrites the partial report: between stages, and every REFRESH_S
        self.env = stage_env()

    def say(self, text):
        print(f"[reproduce] {text}", flush=True)

    def progress(self):
        """Rewrite the partial report; a failure to do so is said and never stops the pipeline."""
        if self.on_progress is None or self.dry_run:
            return
        try:
            self.on_progress()
        except Exception as e:  # e.g. a full disk: the stages' own outputs matter more than the report
            self.say(f"could not rewrite the partial report: {type(e).__name__}: {e}")

    def skip(self, name, cmd, why, status="skipped"):
        self.stages.append({"stage": name, "command": show(cmd), "status": status, "why": why, "seconds": 0.0})
        self.say(f"{name}: {status} ({why})")

    def run(self, name, cmd, why="", deadline=None):
        """Run one stage from the repo root; its output goes straight to the terminal. Returns the exit status.
        A stage still running at `deadline` (a time.time() value) gets SIGTERM (train.py then finishes its
        step, writes ckpt.pt and exits 0), and SIGKILL STAGE_GRACE_S later; its record says
        `time_limited`."""
        self.say(f"{name}: {why + ': ' if why else ''}{show(cmd)}")
        if self.dry_run:
            self.stages.append({"stage": name, "command": show(cmd), "status": "planned", "why": why, "seconds": 0.0})
            return 0
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env)
        stopped = []

        def forward(signum, frame):  # train.py checkpoints on SIGTERM; the pipeline stops after it
            stopped.append(signum)
            proc.send_signal(signum)
        previous = signal.signal(signal.SIGTERM, forward)
        try:
            rc, limited = self._wait(name, proc, deadline)
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
        if limited:
            status = "stopped at its deadline" + ("" if rc == 0 else f" (exit {rc})")
        else:
            status = "ran" if rc == 0 else f"failed (exit {rc})"
        self.stages.append({"stage": name, "command": show(cmd), "status": status, "why": why, "seconds": seconds,
                            "time_limited": limited})
        self.say(f"{name}: {status} in {seconds:.1f} s")
        if stopped or (not limited and rc in (-signal.SIGINT, 130, -signal.SIGTERM)):
            raise KeyboardInterrupt
        return rc

    def _wait(self, name, proc, deadline):
        """Wait for `proc`, rewriting the partial report every REFRESH_S and stopping it at `deadline`.
        Returns (exit status, whether the deadline stopped it)."""
        limited, kill_at = False, None
        next_refresh = time.time() + REFRESH_S
        while True:
            wakes = [kill_at] if limited else ([deadline] if deadline is not None else [])
            if self.on_progress is not None:
                wakes.append(next_refresh)
            try:
                return proc.wait(timeout=max(0.05, min(wakes) - time.time()) if wakes else None), limited
            except subprocess.TimeoutExpired:
                pass
            now = time.time()
            if limited and now >= kill_at:
                self.say(f"{name}: still running {STAGE_GRACE_S} s after SIGTERM; killing it")
                proc.kill()
            elif not limited and deadline is not None and now >= deadline:
                self.say(f"{name}: reached its deadline in the --budget_s plan; stopping it (a training "
                         f"writes its checkpoint first)")
                proc.send_signal(signal.SIGTERM)
                limited, kill_at = True, now + STAGE_GRACE_S
            if self.on_progress is not None and now >= next_refresh:
                self.progress()
                next_refresh = time.time() + REFRESH_S


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


class Outcome:
    """What the stages have done so far: final iteration per variant, failures, runs stopped at their
    deadline, plan-level notes. The partial reports are written from it while the pipeline runs."""

    def __init__(self):
        self.states, self.failed, self.truncated, self.notes = {}, {}, {}, []
        self.done = False


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


def check_can_prepare(plan):
    """Preparing a corpus needs the `datasets` package (prepare_data.py): say so before anything runs."""
    if plan.prepare is None or data_ready(plan) or can_prepare():
        return
    raise UserError(f"preparing the {plan.corpus} corpus needs the `datasets` package, which this Python lacks; "
                    f"prepare it where it is installed (`make gpu-data` writes shared/data/pysource) and copy the "
                    f"folder here as ./shared/data/{plan.corpus}, or pass --data_dir")


def execute(plan, runner, outcome=None, t0=None):
    """Run (or, dry, print) every stage, recording into `outcome` (returned)."""
    outcome = outcome or Outcome()
    deadlines = stage_deadlines(plan, time.time() if t0 is None else t0)
    prepare_stage(plan, runner, deadlines)
    if plan.args.prepare_only:
        return outcome
    runner.progress()
    for i, v in enumerate(plan.args.variant_list, 1):  # one variant after another
        train_stage(plan, runner, outcome, deadlines, v, i)
        runner.progress()
    done = [v for v in plan.args.variant_list if v not in outcome.failed]
    for i, v in enumerate(done, 1):  # the analysis of every finished run
        analysis_stage(plan, runner, outcome, deadlines, v, f"analyse {v} [{i}/{len(done)}]")
        runner.progress()
    compress_stage(plan, runner, outcome, deadlines)
    outcome.done = True
    return outcome


def prepare_stage(plan, runner, deadlines):
    if plan.prepare is None:
        if not runner.dry_run and not all(os.path.isfile(os.path.join(plan.data_dir, f"{s}.bin")) for s in ("train", "val")):
            raise UserError(f"--data_dir {plan.data_dir} has no train.bin / val.bin; make it with prepare_data.py")
        runner.say(f"data: {rel(plan.data_dir)} ({plan.data_note or 'given with --data_dir'})")
    elif data_ready(plan):
        runner.skip("prepare data", plan.prepare, f"{rel(plan.data_dir)} already prepared")
    else:
        if plan.corpus == "pysource":
            gather_pysource(plan, runner)
        if runner.run("prepare data", plan.prepare, deadline=deadlines.get("data")) != 0:
            raise UserError(f"preparing the data failed (the error is above): {show(plan.prepare)}")


def train_stage(plan, runner, outcome, deadlines, v, i):
    """Train (or resume) variant v; a training cut at its deadline is analysed as far as it got."""
    states, failed = outcome.states, outcome.failed
    state, it = run_state(plan, v)
    name = f"train {v} [{i}/{len(plan.args.variant_list)}]"
    max_iters = plan.train_settings.get("max_iters")
    deadline = deadlines.get(("train", v))
    limited = False
    if state == "done":
        runner.skip(name, plan.train_command(v, resume=True), f"finished at iter {it}")
    elif not runner.dry_run and deadline is not None and time.time() >= deadline:
        runner.skip(name, plan.train_command(v, resume=state == "resume"), "no time left in --budget_s")
        failed[v] = "not trained: the --budget_s plan ran out of time before it"
        return
    else:
        why = "start" if state == "start" else f"resume from iter {it}"
        rc = runner.run(name, plan.train_command(v, resume=state == "resume"),
                        f"{why}" + (f" to iter {max_iters}" if max_iters else ""), deadline=deadline)
        limited = bool(runner.stages and runner.stages[-1].get("time_limited"))
        if rc != 0 and not limited:
            failed[v] = f"training failed (exit {rc}); re-run reproduce.py to resume it"
            return
    if runner.dry_run:
        states[v] = max_iters
        return
    state, states[v] = run_state(plan, v)
    if state != "done" and limited and states[v] > 0:
        outcome.truncated[v] = {"iter": states[v], "max_iters": max_iters}  # analysed as far as it got
    elif state != "done":  # e.g. stopped by a signal sent to train.py alone: it exits 0 after checkpointing
        failed[v] = f"training stopped at iter {states[v]}; re-run reproduce.py to resume it"


def analysis_stage(plan, runner, outcome, deadlines, v, name):
    cmd, states, failed = plan.analysis_command(v), outcome.states, outcome.failed
    deadline = deadlines.get(("analyse", v))
    if not runner.dry_run and analysis_current(plan, v, states[v]):
        runner.skip(name, cmd, f"{rel(plan.analysis_dir(v))}/outliers.json covers iter {states[v]}")
    elif not runner.dry_run and deadline is not None and time.time() >= deadline:
        runner.skip(name, cmd, "no time left in --budget_s")
        failed[v] = "not analysed: the --budget_s plan ran out of time (its telemetry is still reported)"
    elif runner.run(name, cmd, deadline=deadline) != 0:
        failed[v] = "analysis failed; re-run reproduce.py to retry"


def compress_stage(plan, runner, outcome, deadlines):
    """The compression table over every variant that was trained and analysed."""
    done = [v for v in plan.args.variant_list if v not in outcome.failed]
    if not done:
        return
    cmd = plan.compress_command(done)
    deadline = deadlines.get("compress")
    if not runner.dry_run and compress_current(plan, {v: outcome.states[v] for v in done}):
        runner.skip("compression table", cmd, f"{rel(plan.compress_dir())}/results.json covers these checkpoints")
    elif not runner.dry_run and deadline is not None and time.time() >= deadline:
        runner.skip("compression table", cmd, "no time left in --budget_s")
        outcome.notes.append("The compression table was not made: the --budget_s plan ran out of time.")
    elif runner.run("compression table", cmd, deadline=deadline) != 0:
        outcome.notes.append("The compression evaluation failed (its error is in the command output); "
                             "re-run reproduce.py to retry.")


# ------------------------------------------------------------------------------------------- collect

def _finite(x):
    return is_number(x) and math.isfinite(x)


def _mean(xs):
    xs = [x for x in (xs or []) if _finite(x)]
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
            "mean_first_attn": [_mean(layers(r, "first_attn")) for r in records],
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
    from runtime.system import run_metadata
    meta = run_metadata(plan.args.device if plan.args.device != "auto" else None)
    meta.update(python_executable=sys.executable, cpu_count=os.cpu_count(), platform=platform.platform(),
                processor=platform.processor() or platform.machine())
    return meta


# ------------------------------------------------------------------------------------------- figures

def make_figures(out, runs):
    """The report's figures in `out` (an output set's staging directory); {key: file name}. None where
    matplotlib is missing (a bare GPU image may lack it: the report then says so and the numbers stay in
    reproduce.json)."""
    if not have_matplotlib():
        return {}
    analysed = [r for r in runs if r.get("top3")]
    figs = {}
    if analysed:
        figs["fig11_top1"] = plot_top1(out, "fig11_top1.png", [(r["attention"], r["top3"]) for r in analysed])
        figs["fig11_top3"] = plot_top3(out, "fig11_top3.png",
                                       [(r["attention"], r["top3"], r["median"]) for r in analysed])
    curves = [r for r in runs if r["loss_curve"]["iter"] or r["loss_curve"]["eval_iter"]]
    if curves:
        figs["fig12_loss"] = plot_loss_curves(out, "fig12_loss.png", [(r["attention"], r["loss_curve"]) for r in curves])
    tele = [r for r in runs if r["telemetry"]["iter"]]
    if tele:
        plt = pyplot()
        figs["outlier_emergence"] = save_figure(_emergence_figure(plt, tele), out, "outlier_emergence.png",
                                                tight_bbox=True)
        figs["emergence_by_layer"] = save_figure(_emergence_by_layer_figure(plt, tele), out, "emergence_by_layer.png",
                                                 tight_bbox=True)
    return figs


def _emergence_figure(plt, runs):
    """Over training, per variant: the largest top-1 |h|, its ratio to the layer median (both maxima over
    layers) and the first-token attention (mean over layers, heads and queries)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, r in enumerate(runs):
        t = r["telemetry"]
        axes[0].plot(t["iter"], t["max_top1_h"], color=f"C{i}", marker=".", label=r["attention"])
        axes[1].plot(t["iter"], t["max_ratio_h"], color=f"C{i}", marker=".", label=r["attention"])
        axes[2].plot(t["iter"], t.get("mean_first_attn") or [], color=f"C{i}", marker=".", label=r["attention"])
    axes[0].set(xlabel="iteration", ylabel="max over layers of top-1 |h|", title="outlier emergence: largest |h|")
    axes[1].set(xlabel="iteration", ylabel="max over layers of top-1 / median |h|",
                title="outlier emergence: ratio to the median")
    axes[1].axhline(MASSIVE_RATIO, color="gray", ls=":", lw=1)
    axes[2].set(xlabel="iteration", ylabel="attention on the first token (mean over layers)",
                title="attention sink emergence")
    for ax in axes[:2]:
        ax.set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


def _emergence_by_layer_figure(plt, runs):
    """One column per variant: every layer's top-1 / median |h| (top) and first-token attention (bottom)."""
    fig, axes = plt.subplots(2, len(runs), figsize=(4 * len(runs), 6.5), squeeze=False, sharey="row",
                             constrained_layout=True)
    for col, r in enumerate(runs):
        t = r["telemetry"]
        by = t.get("by_layer") or {}
        n_layer = max((len(x) for x in by.get("ratio_h") or []), default=0)
        cmap = plt.get_cmap("viridis")
        for l in range(n_layer):
            color = cmap(l / max(1, n_layer - 1))
            axes[0, col].plot(t["iter"], [x[l] for x in by["ratio_h"]], color=color, lw=1, label=f"L{l}")
            axes[1, col].plot(t["iter"], [x[l] for x in by["first_attn"]], color=color, lw=1, label=f"L{l}")
        axes[0, col].set_yscale("log")
        axes[0, col].set_title(r["attention"], fontsize=9)
        axes[1, col].set_xlabel("iteration", fontsize=8)
    axes[0, 0].set_ylabel("top-1 / median |h|")
    axes[1, 0].set_ylabel("first-token attention")
    axes[0, -1].legend(fontsize=5, ncol=2)
    fig.suptitle("emergence per layer (training telemetry, one fixed validation batch)")
    return fig


# ------------------------------------------------------------------------------------------- report

def _num(x, digits=4):
    return number(x, digits, scientific=False)


def _md_table(header, rows):
    return markdown_table(header, rows, align="l" * len(header))


MASSIVE_RATIO = 100.0  # top-1 / median |h| well beyond a Gaussian's (~5-10x): the paper's are in the thousands


SAME_CHANGE = 0.01  # perplexity changes within 1 percentage point of default's are reported as the same


def _versus(change, base):
    if change is None or base is None:
        return "not comparable"
    if abs(change - base) < SAME_CHANGE:
        return "about the same as default's"
    return "smaller than default's" if change < base else "larger than default's"


def telemetry_findings(runs, plan):
    """What the training telemetry shows: how `default`'s largest activation grew (and when, if ever, it
    passed MASSIVE_RATIO x its layer median), and the first-token attention of every run."""
    out = []
    by = {r["attention"]: r for r in runs if r["telemetry"]["iter"]}
    base = by.get("default")
    interval = plan.train_settings.get("outlier_interval", "?")
    tokens_per_iter = plan.tokens_per_iter() if plan.train_settings.get("batch_size") else None
    if base is not None:
        tele = base["telemetry"]
        ratios = [(i, x) for i, x in zip(tele["iter"], tele["max_ratio_h"]) if _finite(x)]
        if ratios:
            peak = max(ratios, key=lambda p: p[1])
            out.append(f"Telemetry (one fixed validation batch every {interval} iterations): `default`'s max "
                       f"top-1/median ratio went from {_num(ratios[0][1])} at iter {ratios[0][0]} to {_num(ratios[-1][1])} "
                       f"at iter {ratios[-1][0]} (peak {_num(peak[1])} at iter {peak[0]})"
                       + (", i.e. it did not grow into a massive activation during training."
                          if peak[1] < MASSIVE_RATIO else "."))
            first = next(((i, x) for i, x in ratios if x >= MASSIVE_RATIO), None)
            if first:
                out.append(f"**Emergence:** `default`'s largest activation first reached {MASSIVE_RATIO:g}x its layer "
                           f"median at iter {first[0]} ("
                           + (f"{first[0] * tokens_per_iter:,} tokens; " if tokens_per_iter else "")
                           + f"{_num(first[1])}x).")
    attn = []
    for v, r in by.items():
        pts = [(i, x) for i, x in zip(r["telemetry"]["iter"], r["telemetry"].get("mean_first_attn") or []) if _finite(x)]
        if pts:
            attn.append(f"`{v}` {_num(pts[0][1], 3)} -> {_num(pts[-1][1], 3)} (iter {pts[-1][0]})")
    if attn:
        out.append("First-token attention (telemetry, mean over layers, heads and queries; about ln(T)/T under "
                   "uniform causal attention, near 1 for a full sink): " + "; ".join(attn) + ".")
    others = [r for v, r in by.items() if v != "default"]
    if base is not None and others:
        peak = max((x for x in base["telemetry"]["max_ratio_h"] if _finite(x)), default=None)
        parts = []
        for r in others:
            p = max((x for x in r["telemetry"]["max_ratio_h"] if _finite(x)), default=None)
            if p is not None and peak:
                parts.append(f"`{r['attention']}` {_num(p)} ({_num(p / peak, 3)}x default's {_num(peak)})")
        if parts:
            out.append("Peak top-1/median ratio over training: " + "; ".join(parts) + ".")
    return out


def findings(runs, plan):
    """Plain statements of what the numbers show, including where they do not reproduce the paper."""
    ok = {r["attention"]: r for r in runs if r["status"] == "ok" and r.get("max_top1") is not None}
    out = []
    base = ok.get("default")
    if base is None:
        out.append("`default` was not run (or not analysed yet), so no analysis can be compared with it.")
        return out + telemetry_findings(runs, plan)
    others = [r for v, r in ok.items() if v != "default"]
    n_out = base.get("activation_outliers") or 0
    massive = n_out > 0 or (base.get("max_ratio") or 0) >= MASSIVE_RATIO
    tau = base.get("tau")
    if massive:
        out.append(f"**Massive activations in `default`: yes.** Its largest |h| is {_num(base['max_top1'])} "
                   f"(layer {base['max_top1_layer']}), {_num(base['max_ratio'])}x the layer median, with {n_out} "
                   f"activation outliers above tau={_num(tau)} x mean|h|.")
        bullets = []
        for r in sorted(others, key=lambda r: r["max_ratio"] or 0):
            rel_top = r["max_top1"] / base["max_top1"] if base["max_top1"] else None
            verdict = ("removes them at this scale" if (r.get("activation_outliers") or 0) == 0
                       and (r.get("max_ratio") or 0) < MASSIVE_RATIO else "does not remove them")
            bullets.append(f"- `{r['attention']}` {verdict}: largest |h| {_num(r['max_top1'])} ({_num(rel_top, 3)}x "
                           f"default's), {_num(r['max_ratio'])}x its median, {r.get('activation_outliers') or 0} outliers.")
        if bullets:
            out.append("\n".join(bullets))
    else:
        out.append(f"**No massive activations emerged in `default` at this scale**: its largest |h| is "
                   f"{_num(base['max_top1'])}, only {_num(base['max_ratio'])}x the layer median and {n_out} "
                   f"activations pass tau={_num(tau)} x mean|h| (the paper's are thousands of times the median). "
                   f"The paper's Fig. 10-11 comparison (outliers in default, none with an explicit sink or "
                   f"scaling) is therefore **not reproduced** here: there is nothing for the variants to remove.")
        biggest = max(ok.values(), key=lambda r: r["max_ratio"] or 0)
        out.append(f"Across variants the top-1/median ratio ranges from "
                   f"{_num(min(r['max_ratio'] or 0 for r in ok.values()))} to {_num(biggest['max_ratio'])} "
                   f"(`{biggest['attention']}`); differences of this size are not massive activations.")
    out += telemetry_findings(runs, plan)
    # compression
    if base.get("ppl_change"):
        dw, ds = base["ppl_change"]["w8"], base["ppl_change"]["sparse50"]
        out.append(f"**Compression** (`default`: PPL {_num(base['ppl']['fp'])} -> W8 {_num(base['ppl']['w8'])} "
                   f"({signed_percent(dw)}), 50% sparse {_num(base['ppl']['sparse50'])} ({signed_percent(ds)}); paper Table 3: 27.24 -> "
                   f"93.44 (+243%) / 7235.68 for default, 26.95 -> 29.22 (+8.4%) / 39.47 for scaling).")
        bullets = []
        for r in others:
            if not r.get("ppl_change"):
                continue
            cw, cs = r["ppl_change"]["w8"], r["ppl_change"]["sparse50"]
            bullets.append(f"- `{r['attention']}`: W8 {signed_percent(cw)} ({_versus(cw, dw)}), 50% sparse {signed_percent(cs)} "
                           f"({_versus(cs, ds)}).")
        if bullets:
            out.append("\n".join(bullets))
        changes = [c for r in ok.values() for m, c in (r.get("ppl_change") or {}).items()
                   if m in ("w8", "sparse50") and c is not None]
        if changes and max(abs(c) for c in changes) < 0.05:
            out.append(f"Every variant loses less than 5% perplexity to either method here (`default`: W8 "
                       f"{signed_percent(dw)}, 50% sparse {signed_percent(ds)}), so the differences above are not the paper's effect: "
                       f"without massive activations the per-tensor AbsMax scale of W8 is not blown up, and the "
                       f"paper's gap between default and scaling cannot appear at this scale.")
        out += first_position_finding(ok)
    # early convergence
    early = [r for r in ok.values() if len(r["loss_curve"]["eval_iter"]) > 1]
    if base in early and len(early) > 1:
        k = 1  # first evaluation after initialization
        at = base["loss_curve"]["eval_iter"][k]
        rows = [(r["attention"], r["loss_curve"]["val_loss"][k]) for r in early if r["loss_curve"]["eval_iter"][k] == at]
        faster = [v for v, l in rows if v != "default" and l < base["loss_curve"]["val_loss"][k]]
        spread = max(l for _, l in rows) - min(l for _, l in rows)
        out.append(f"**Early convergence** (val loss at iter {at}, the first evaluation): "
                   + ", ".join(f"`{v}` {_num(l)}" for v, l in sorted(rows, key=lambda x: x[1]))
                   + f". Below `default`: {', '.join(f'`{v}`' for v in faster) or 'none'}. "
                   f"Final val loss (iter {base['iter_num']}): "
                   + ", ".join(f"`{r['attention']}` {_num(r['val_loss'])}" for r in sorted(early, key=lambda r: r['val_loss']))
                   + f". One seed per variant: the spread at iter {at} ({_num(spread, 2)} nats) is not compared with "
                   f"seed-to-seed variation, so small differences are not evidence of faster convergence.")
    return out


def first_position_finding(ok):
    """W8A8 per tensor with and without position 0 in full precision, per variant: what the token that carries
    a massive activation (where there is one) does to the per-tensor scales."""
    have = [r for r in ok.values() if (r.get("ppl_change") or {}).get("w8a8") is not None
            and r["ppl_change"].get("w8a8+fp1") is not None]
    if not have:
        return []
    return ["**Position 0 in full precision** (W8A8 per tensor, dynamic -> the same with position 0 kept out of the "
            "scales, `w8a8+fp1`): " + ", ".join(f"`{r['attention']}` {signed_percent(r['ppl_change']['w8a8'])} -> "
                                                f"{signed_percent(r['ppl_change']['w8a8+fp1'])}" for r in have)
            + ". A large gap means the first token alone sets the activation ranges, as a massive activation does."]


def write_report(plan, runner, runs, figs, env, doc_name, outcome, partial=False):
    return "\n".join(report_intro(plan, env, doc_name, partial) + report_findings(plan, runs, outcome)
                     + report_table(plan, runs) + report_figures(figs) + report_provenance(plan, runner, env))


def report_intro(plan, env, doc_name, partial):
    args, what = plan.args, plan.scale["what"]
    out = [f"# Reproducing the attention-variant comparison: `--scale {args.scale}`\n",
           f"{what[0].upper() + what[1:]}. Generated by `reproduce.py` on {env['date']} "
           f"({env['gpu']}). All numbers below are read from each run's own `log.jsonl`, "
           f"`outliers/outliers.json` and the shared `compress/results.json`; `{doc_name}` holds them.\n"]
    if partial:
        out.append(f"> **Partial report**, rewritten while the pipeline runs ({time.strftime('%H:%M:%S')}); stages "
                   "done so far are listed under \"How it was made\". A run cut off here reports what it had seen.\n")
    if plan.estimate is not None:
        e = plan.estimate
        out.append(f"Plan: {e['iters']:,} iterations of {plan.tokens_per_iter():,} tokens ({e['tokens_per_variant']:,} "
                   f"tokens) per variant, sized so that the estimate ({e['total_s']:.0f} s: training at the tokens/s "
                   f"measured on an {H200_SOURCE}, other stages assumed) fits --budget_s {plan.budget_s:g}. Model, "
                   "context, batch, learning rate and corpus follow the evidence cited in the README (\"Reproducing "
                   "the paper's comparison\"): whether massive activations emerge this early is what the telemetry "
                   "below measures.\n")
    if args.scale == "tiny":
        out.append("> This is the **tiny** scale: a 2-layer, 64-dimensional model trained for a few hundred "
                   "thousand tokens of Python source. It checks the pipeline end to end; it is far too small and "
                   "short for the paper's phenomena, and nothing below is evidence for or against the paper.\n")
    return out


def report_findings(plan, runs, outcome):
    out = ["## What this run shows\n"] + [f"{line}\n" for line in findings(runs, plan)]
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        out.append("**Incomplete:** " + "; ".join(f"`{r['attention']}`: {r['error']}" for r in failed) + ".\n")
    cut = [r for r in runs if r.get("truncated")]
    if cut:
        out.append("**Stopped at their stage deadline** (analysed as far as they got, so they are not compared at "
                   "equal length): " + "; ".join(f"`{r['attention']}` at iter {r['truncated']['iter']} of "
                                                 f"{r['truncated']['max_iters']}" for r in cut) + ".\n")
    return out + [f"{note}\n" for note in outcome.notes]


def report_table(plan, runs):
    header = ["variant", "iters", "final val loss", "max top-1 |h| (layer)", "top-1 / median",
              "activation outliers", "first-token attention", "sink share", "gate (first / other)"]
    return ["## Per variant\n", _md_table(header, [variant_row(r) for r in runs]) + "\n",
            "Columns: final val loss is train.py's last evaluation; |h| columns come from analyze_outliers.py "
            f"({plan.analysis['num_seqs']} sequences of `{rel(os.path.join(plan.data_dir, 'val.bin'))}`; largest "
            "|h| of a layer's output, mean over sequences; the ratio is to that layer's median |h|, maximum over "
            "layers); activation outliers are |h| > tau x mean|h| of a sequence (tau in outliers.json); "
            "first-token attention and sink share are means over layers and heads; the gate columns are "
            "the variant's output gate at the first token and elsewhere (where the variant has one).\n"]\
        + compression_table(runs)


def compression_table(runs):
    """Perplexity of every variant under every reproduce column (compress_eval.py's results.json)."""
    columns = [compression_methods.parse_column(m) for m in METHODS]
    header = ["variant"] + [f"PPL {c.short()}" + (" (Δ)" if c.name != "fp" else "") for c in columns]
    rows = []
    for r in runs:
        ppl, ch = r.get("ppl") or {}, r.get("ppl_change") or {}
        rows.append([f"`{r['attention']}`" + (" (failed)" if r["status"] != "ok" else "")]
                    + [("–" if not ppl else _num(ppl.get(c.name)) if c.name == "fp"
                        else f"{_num(ppl.get(c.name))} ({signed_percent(ch.get(c.name))})") for c in columns])
    ev = next((r.get("compress_eval") for r in runs if r.get("compress_eval")), None)
    settings = "; ".join(f"`{c.name}`: {compression_methods.describe(c.settings(compression_methods.Options()))}"
                         for c in columns if c.name != "fp")
    return ["## Compression\n", _md_table(header, rows) + "\n",
            "Perplexity from compress_eval.py" + (f" on {ev['data']} ({ev['tokens']:,} scored tokens)" if ev else "")
            + "; Δ is the change relative to fp. On the blocks (the tied embedding and lm_head kept): "
            + settings + ".\n"]


def variant_row(r):
    gate = r.get("gate")
    return [f"`{r['attention']}`" + (" (failed)" if r["status"] != "ok" else ""), _num(r.get("iter_num")),
            _num(r.get("val_loss")),
            f"{_num(r.get('max_top1'))} (L{r['max_top1_layer']})" if r.get("max_top1") is not None else "–",
            _num(r.get("max_ratio")), _num(r.get("activation_outliers")), _num(r.get("first_token_attention"), 3),
            _num(r.get("sink_share"), 3),
            f"{_num(gate.get('first'), 3)} / {_num(gate.get('other'), 3)}" if gate else "–"]


FIGURE_TITLES = {"fig11_top1": "Fig. 11: largest |h| per layer, all variants",
                 "fig11_top3": "Fig. 11: top-3 and median |h| per layer",
                 "fig12_loss": "Fig. 12: loss curves",
                 "outlier_emergence": "Outlier and attention-sink emergence over training (telemetry in log.jsonl)",
                 "emergence_by_layer": "Emergence per layer (telemetry)"}


def report_figures(figs):
    out = ["## Figures\n"] + [f"### {FIGURE_TITLES[key]}\n\n![{key}]({name})\n" for key, name in figs.items()]
    if not figs:
        out.append("No figures: " + ("matplotlib is not installed here; the numbers are in reproduce.json.\n"
                                     if not have_matplotlib() else "no run has been analysed or logged yet.\n"))
    return out


def report_provenance(plan, runner, env):
    args = plan.args
    keys = ("date", "git_commit", "python", "torch", "triton", "cuda", "gpu", "cpu_count", "platform", "hostname")
    return ["## How it was made\n",
            f"Data: `{rel(plan.data_dir)}` (corpus `{plan.corpus}`"
            + (", this Python installation's standard-library source, see `data/pysource_text/SOURCES.txt.json`"
               if plan.corpus == "pysource" else "") + "). Every variant trains with seed "
            f"{args.seed}: the same initial-weight RNG stream and the same data order.\n",
            f"Commands, run from the repo root (`{REPO}`) with `{sys.executable}`; `skipped` stages were "
            "already done by an earlier invocation:\n",
            "```\n" + "\n".join(f"# {s['stage']}: {s['status']}" + (f" ({s['seconds']} s)" if s['seconds'] else "")
                                 + f"\n{s['command']}" for s in runner.stages) + "\n```\n",
            f"Whole pipeline: `{show([sys.executable, os.path.relpath(__file__, REPO)] + args.argv)}`\n",
            "Environment:\n",
            "\n".join(f"- {k}: `{env.get(k)}`" for k in keys) + "\n"]


# ------------------------------------------------------------------------------------------- main

def print_paper_notes(plan):
    print(f"\nThe paper scale trains eight GPT-2 124M models for 50,000 iterations of 491,520 tokens each; "
          f"run each command on a node with {plan.nproc} GPUs (or pass --nproc_per_node), or the whole list with "
          f"`python reproduce.py --scale paper --execute`. Every training command is resumable: re-running "
          f"reproduce.py (or the printed command with --init_from=resume) continues from ckpt.pt. Multi-node: "
          f"replace `--standalone` by `--nnodes=N --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:29500` "
          f"(out_dir on a shared filesystem).", flush=True)


def write_outputs(plan, runner, outcome, t0, env, partial):
    """reproduce.json, REPORT.md and the figures from what is on disk now, as one set into --out (and
    --report_dir): each lands whole or not at all (runtime.outputs.output_set)."""
    args = plan.args
    runs = [collect_run(plan, v, outcome) for v in args.variant_list]
    for out, flag in output_dirs(args):
        with output_set(out, TOOL, REPORT_FILES, inputs=[args.data_dir], flag=flag) as tmp:
            figs = make_figures(tmp, runs)
            doc = {"format": FORMAT, "version": FORMAT_VERSION, "scale": args.scale, "variants": args.variant_list,
                   "partial": partial, "out": args.out, "corpus": plan.corpus, "data_dir": rel(plan.data_dir),
                   "data_meta": {k: v for k, v in (read_json(os.path.join(plan.data_dir, "meta.json")) or {}).items()
                                 if k != "source"},
                   "settings": {"seed": args.seed, "train": plan.train_settings, "analysis": plan.analysis,
                                "compress": {**plan.compress, "methods": list(METHODS),
                                             "data": plan.compress_data_args()},
                                "nproc_per_node": plan.nproc},
                   "plan": plan.estimate, "notes": outcome.notes,
                   "runs": runs, "figures": figs, "stages": runner.stages, "environment": env,
                   "seconds": round(time.time() - t0, 1)}
            with open(os.path.join(tmp, "reproduce.json"), "w", encoding="utf-8") as f:
                f.write(json_text(json_safe(doc)))
            with open(os.path.join(tmp, "REPORT.md"), "w", encoding="utf-8") as f:
                f.write(write_report(plan, runner, runs, figs, env, "reproduce.json", outcome, partial))


def output_dirs(args):
    return [(args.out, "--out")] + ([(args.report_dir, "--report_dir")] if args.report_dir else [])


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    plan = Plan(args)
    print_only = args.dry_run or (args.scale == "paper" and not args.execute)
    if not print_only:
        require_cuda(args)
        check_can_prepare(plan)
        resolve_device(args.device)  # every stage gets it: refuse an unusable one before the first
        for out, flag in output_dirs(args):
            check_output_dir(out, TOOL, REPORT_FILES, inputs=[args.data_dir], flag=flag)
    runner = Runner(plan, dry_run=print_only)
    runner.say(f"scale {args.scale}: {plan.scale['what']}")
    runner.say(f"variants: {', '.join(args.variant_list)}; output {rel(args.out)}"
               + (" (dry run: nothing is run or written)" if print_only else ""))
    if plan.estimate is not None:
        for line in estimate_text(plan):
            runner.say(line)
    outcome = Outcome()
    env = None
    if plan.budget_s is not None and not print_only:  # partial reports: a run cut off still reports what it saw
        env = environment(plan)
        runner.on_progress = lambda: write_outputs(plan, runner, outcome, t0, env, partial=True)
    execute(plan, runner, outcome, t0)
    if print_only or args.prepare_only:
        if args.scale == "paper":
            print_paper_notes(plan)
        if args.prepare_only:
            runner.say(f"data ready in {rel(plan.data_dir)}")
        return 0

    write_outputs(plan, runner, outcome, t0, env or environment(plan), partial=False)
    runner.say(f"wrote {rel(os.path.join(args.out, 'REPORT.md'))} and reproduce.json in {time.time() - t0:.0f} s"
               + (f" (and into {rel(args.report_dir)})" if args.report_dir else ""))
    if outcome.failed or outcome.notes:
        raise UserError(f"{len(outcome.failed)} of {len(args.variant_list)} variants did not finish"
                        + (" (" + "; ".join(f"{v}: {e}" for v, e in outcome.failed.items()) + ")" if outcome.failed else "")
                        + "".join(f"; {n}" for n in outcome.notes)
                        + "; the report covers the rest; re-run the same command to continue")
    return 0


if __name__ == "__main__":
    cli_main(main)
