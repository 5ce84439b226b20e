"""The scales and the plan: everything reproduce.py will run, computed before anything runs (so --dry_run
shows it all). A scale's model and training settings are train.py config files (config/reproduce/*.py, or
the paper's config/<variant>.py) read through training/config.py; what else a scale sets (corpus, analysis
and compression sizes, processes, budget) is its `Scale` entry here."""

import os
import sys
from dataclasses import dataclass
from typing import Optional

from reproduction.gpu_time import METHODS, gpu_estimate, gpu_plan_iters
from reproduction.paths import REPO, read_json, rel, shared
from runtime.cli import UserError
from training.config import parse_config


@dataclass(frozen=True)
class Scale:
    what: str                     # one sentence for the log and REPORT.md
    corpus: str                   # default training corpus (CORPORA)
    configs: Optional[tuple]      # train.py config files for every variant; None: the variant's own config/<v>.py
    analysis: dict                # analyze_outliers.py settings
    compress: dict                # compress_eval.py settings
    compress_data: str            # "val": the corpus' val.bin; "wikitext2": WikiText-2 test
    nproc_per_node: int
    overlays: tuple = ()          # config files on top of `configs` (or of config/<v>.py)
    lr_decay_follows_max_iters: bool = False  # --max_iters moves lr_decay_iters (and caps warmup) with it
    variants: Optional[tuple] = None          # default --variants; None: every registered variant
    budget_s: Optional[float] = None          # default --budget_s: the scale has a time model (gpu_time)


SCALES = {
    "tiny": Scale(
        what="every variant on the builtin smoke-test corpus (Python standard-library source) on a CPU; "
             "tests the pipeline, it is too small and short for massive activations",
        corpus="builtin", configs=("config/reproduce/tiny.py",),
        # ~0.3 s per 1k evaluated tokens and method on 2 idle cores: 4k tokens for each of the nine methods
        # (the 10-minute budget's arithmetic is in the config file)
        analysis={"num_seqs": 16, "batch_size": 8}, compress={"max_tokens": 4096, "batch_size": 16},
        compress_data="val", nproc_per_node=1, lr_decay_follows_max_iters=True),
    "gpu": Scale(
        what="GPT-2 124M (12 layers, 12 heads, 768 dims, 1024-token context: the model of Sun et al.'s and "
             "An et al.'s runs) trained per variant on one H100/H200 within --budget-s, on the Python "
             "standard library's source code (no network), `default` against designs that should remove "
             "massive activations",
        corpus="pysource", configs=("config/reproduce/gpu.py",),
        analysis={"num_seqs": 8}, compress={"max_tokens": 32768}, compress_data="val", nproc_per_node=1,
        # default and two designs with direct evidence on GPT-2: explicit attention biases k', v' (Sun et
        # al. 2024, section 5.2) and softmax-off-by-one (Kaul et al. 2025 trained GPT-2 with softmax-1)
        variants=("default", "attention_bias", "softmax1"), budget_s=540),
    "gpu-long": Scale(
        what="a GPT-2-shaped 12-layer model (8 heads, 512 dims, 512-token context) per variant on one "
             "H100/H200, on the Python standard library's source code found on the machine (no network)",
        corpus="pysource", configs=("config/reproduce/gpu_long.py",),
        analysis={"num_seqs": 100}, compress={"max_tokens": 262144}, compress_data="val", nproc_per_node=1,
        lr_decay_follows_max_iters=True),
    "gpu-long-2b": Scale(
        what="the paper configs with the \"50,000 iterations, approximately 2B tokens\" reading "
             "(config/<variant>.py + config/recipe_2b.py: GPT-2 124M, 2.05B tokens of OpenWebText per "
             "variant) on the GPUs of one node; compression on WikiText-2 test",
        corpus="openwebtext", configs=None, overlays=("config/recipe_2b.py",),
        analysis={"num_seqs": 100}, compress={}, compress_data="wikitext2",
        nproc_per_node=1),  # every GPU of the node; 1 when none is visible (printing the plan)
    "paper": Scale(
        what="the paper configs (config/<variant>.py: GPT-2 124M on OpenWebText, the authors' recipe) on "
             "a GPU cluster via torchrun; compression on WikiText-2 test as in Table 3",
        corpus="openwebtext", configs=None,
        analysis={"num_seqs": 100}, compress={}, compress_data="wikitext2", nproc_per_node=8),
}
SCALE_CHOICES = ("tiny", "gpu", "gpu-long", "paper")
GPU_SCALES = ("gpu", "gpu-long", "gpu-long-2b")
CORPORA = ("builtin", "pysource", "shakespeare", "wikitext2", "openwebtext")
# the training keys train_command sets for every run: a config file's values of them never reach a training
RUN_KEYS = ("attention", "out_dir", "data_dir", "init_from", "overwrite", "wandb_log")


def scale_settings(scale):
    """{key: value} of every training key the scale's shared config files set, as train.py reads them (the
    files of config/<variant>.py scales differ by variant and are not among them)."""
    files = list(scale.configs or ()) + list(scale.overlays)
    if not files:
        return {}
    cfg, origin = parse_config([os.path.join(REPO, f) for f in files])
    return {k: getattr(cfg, k) for k in origin}


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


def data_ready(plan):
    meta = read_json(os.path.join(plan.data_dir, "meta.json"))
    return (meta is not None and all(os.path.isfile(os.path.join(plan.data_dir, f"{s}.bin")) for s in ("train", "val")))


def check_can_prepare(plan):
    """Preparing a corpus needs the `datasets` package (prepare_data.py): say so before anything runs."""
    if plan.prepare is None or data_ready(plan) or can_prepare():
        return
    raise UserError(f"preparing the {plan.corpus} corpus needs the `datasets` package, which this Python lacks; "
                    f"prepare it where it is installed (`make gpu-data` writes shared/data/pysource) and copy the "
                    f"folder here as ./shared/data/{plan.corpus}, or pass --data_dir")


class Plan:
    """Everything reproduce.py will run, computed before anything runs (so --dry_run shows it all)."""

    def __init__(self, args):
        self.args = args
        self.scale = SCALES[args.scale_key]
        self.out = args.out
        self.corpus = args.corpus or self.scale.corpus
        self.data_note = None
        if args.data_dir:
            self.data_dir, self.prepare = os.path.abspath(args.data_dir), None
        elif self.scale.configs is None and self.corpus == "openwebtext":
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
        self.nproc = args.nproc_per_node or self.scale.nproc_per_node
        if self.scale.configs is None and not args.nproc_per_node:
            import torch  # every GPU of this node; 8 (the paper's node) when printing on a machine without
            self.nproc = torch.cuda.device_count() or self.nproc or 8
        self.file_settings = scale_settings(self.scale)
        # what trains: the files' settings, then reproduce.py's (and each run's RUN_KEYS, in train_command)
        self.train_settings = {k: v for k, v in self.file_settings.items() if k not in RUN_KEYS}
        if args.max_iters is not None:
            self.train_settings["max_iters"] = args.max_iters
            if self.scale.lr_decay_follows_max_iters:
                self.train_settings["lr_decay_iters"] = args.max_iters
                self.train_settings["warmup_iters"] = min(self.train_settings.get("warmup_iters", 0),
                                                          max(0, args.max_iters // 10))
        self.train_settings["seed"] = args.seed
        self.analysis = dict(self.scale.analysis)
        if args.num_seqs is not None:
            self.analysis["num_seqs"] = args.num_seqs
        self.compress = dict(self.scale.compress)
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
        """Training tokens per iteration; None where the scale's files do not give the batch's shape."""
        t = self.train_settings
        if not all(k in t for k in ("batch_size", "gradient_accumulation_steps", "block_size")):
            return None
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

    def config_files(self, variant):
        """train.py's config files for `variant`: the scale's, or (paper) the variant's own config/<v>.py, else
        config/default.py with --attention; then the overlays."""
        configs = self.scale.configs
        if configs is None:
            own = os.path.join("config", f"{variant}.py")
            configs = [own] if os.path.isfile(os.path.join(REPO, own)) else [os.path.join("config", "default.py")]
        return list(configs) + list(self.scale.overlays)

    def train_command(self, variant, resume):
        """The one training command of every scale: train.py, under torchrun for several processes, with the
        scale's config files and, as --key=value, every setting of train_settings the files do not already
        give, then the run's own."""
        if self.nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={self.nproc}", "train.py"]
        else:
            launcher = [sys.executable, "train.py"]
        settings = {k: v for k, v in self.train_settings.items()
                    if k not in self.file_settings or self.file_settings[k] != v}
        settings.update({"attention": variant, "out_dir": rel(self.run_dir(variant)), "data_dir": rel(self.data_dir),
                         "init_from": "resume" if resume else "scratch",
                         # a start is where the run directory has no ckpt.pt: what a training killed before its
                         # first checkpoint left there (log, record) is this pipeline's own, and starts over
                         "overwrite": not resume, "wandb_log": False})
        if self.args.device != "auto":
            settings["device"] = self.args.device
        if self.args.variants_file:
            settings["variants_file"] = rel(self.args.variants_file)
        return launcher + self.config_files(variant) + [f"--{k}={v}" for k, v in settings.items()]

    def analysis_dir(self, variant):
        return os.path.join(self.run_dir(variant), "outliers")

    def analysis_command(self, variant):
        cmd = [sys.executable, "analyze_outliers.py", rel(self.ckpt(variant)), "--data",
               rel(os.path.join(self.data_dir, "val.bin")), "--out", rel(self.analysis_dir(variant)), "--no_progress"]
        for k, v in self.analysis.items():
            cmd += [f"--{k}", str(v)]
        return cmd + ["--device", self.args.device] + self.variants_file_flag()

    def compress_dir(self):
        return os.path.join(self.out, "compress")

    def compress_data_args(self):
        """The evaluation text and, for the calibrated methods, calibration data from another split: the
        train.bin beside val.bin, WikiText-2 train through `datasets`, or the local WikiText-2 validation
        text beside the local test text."""
        if self.scale.compress_data == "wikitext2":
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
        return cmd + self.variants_file_flag()

    def variants_file_flag(self):
        """--variants_file FILE for analyze_outliers.py and compress_eval.py, when reproduce.py was given one."""
        return ["--variants_file", rel(self.args.variants_file)] if self.args.variants_file else []
