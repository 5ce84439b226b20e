"""Train (or fine-tune) one GPT-2 attention variant: single process on CPU / one GPU, or DDP under torchrun.

    python train.py config/tiny.py                                     # minutes on a CPU
    python train.py config/default.py --batch_size=8 --compile=False   # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/scaling.py
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train.py config/sigmoid.py          # (and node_rank=1 on the other)
    python train.py config/scaling.py --init_from=resume               # continue out_dir/ckpt.pt exactly

Configuration: the defaults below (`TrainConfig`), then each config file given (in order), then each
`--key=value` (in order). A config file is plain Python executed in a fresh namespace; every public
name it defines must be a known key of the right type. `python train.py --help` lists the keys.

Outputs in `out_dir`: `ckpt.pt` (latest, written atomically; everything needed for an exact resume),
optional snapshots `ckpt_{iter}.pt` (model weights only, for studying outliers over training),
`log.jsonl` (one JSON object per logged step, evaluation and outlier telemetry) and `run.json`
(resolved config, command, git commit, library versions, GPU; one entry per launch).

Exactness: data windows are drawn from one generator seeded by `seed`, identical on every rank, for
the whole global batch; rank r takes its slice. The data order thus does not depend on the number of
ranks, and (dropout aside) world_size x (gradient_accumulation_steps / world_size) computes the same
update for any world size. Its state, the RNG states of every rank, the optimizer and grad scaler are
all in ckpt.pt; `--init_from=resume` with the same world size continues bit for bit on CPU.

Preemption: SIGTERM, SIGINT and SIGUSR1 make every rank finish the current step, write ckpt.pt and
exit with status 0 (a second SIGINT aborts at once). Under torchrun the workers have the agent's
grace period (30 s by default) after the agent forwards a SIGTERM.

Divergence: a non-finite training loss or gradient norm (checked before the optimizer applies the
step, all ranks together), a non-finite evaluation loss, or non-finite weights about to be saved
stop the run with exit status 3 and a one-line error saying which checkpoint is the last good one.
ckpt.pt is never overwritten by a diverged state. The step is neither skipped nor retried: the data
order and state are deterministic, so a retry diverges again, and skipping hides an instability that
needs a lower learning rate (or more warmup / clipping) on resume. (fp16's GradScaler still skips
its own overflow steps: an inf gradient norm is only divergence when no scaler is in use.)

One run per out_dir: rank 0 holds an flock on out_dir/train.lock (which names host and pid) for the
whole run; a second training into the same directory stops at once with exit status 2.
"""

import contextlib
import dataclasses
import difflib
import gc
import io
import json
import math
import os
import random
import secrets
import signal
import sys
import time
import traceback
import types
import typing
from dataclasses import dataclass

import numpy as np
import torch

from telemetry import training_telemetry
from common import (UserError, atomic_path, atomic_write_json, autocast_context, check_fits, check_regular_file, check_seed,
                    cli_main, directory_lock, json_safe, one_line, read_json_file, resolve_device, resolve_dtype,
                    run_metadata, write_error)
from data import TOKEN_DTYPE, load_tokens


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    eval_interval: int = 2000           # evaluate train/val loss (and save ckpt.pt) every this many iterations
    log_interval: int = 10              # log the training loss every this many iterations
    eval_iters: int = 200               # batches per split and evaluation (the same fixed batches every time)
    eval_only: bool = False             # evaluate once and exit
    always_save_checkpoint: bool = True  # False: ckpt.pt only when the val loss improves (plus at the end / on signals)
    init_from: str = "scratch"          # scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | HF GPT-2 dir
    overwrite: bool = False             # scratch/gpt2 start in an out_dir that holds a run: replace it (else error)
    snapshot_interval: int = 0          # also keep weights-only snapshots ckpt_{iter}.pt every this many iters (0: off)
    keep_snapshots: int = 0             # keep only the newest N snapshots (0: keep all)
    outlier_interval: int = 500         # outlier_stats.training_telemetry on a fixed val batch every N iters (0: off)
    # wandb (logs the same records as log.jsonl; works with WANDB_MODE=offline)
    wandb_log: bool = False
    wandb_project: str = "outlier-gpt"
    wandb_run_name: str = ""            # "" -> "{attention}-{basename(out_dir)}"
    # data
    dataset: str = "openwebtext"        # data/{dataset}/{train,val}.bin, unless data_dir is set
    data_dir: str = ""
    gradient_accumulation_steps: int = 40  # over ALL ranks (must divide by the world size)
    batch_size: int = 12                # micro-batch per rank
    block_size: int = 1024
    # model
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50304             # GPT-2's 50257 padded to a multiple of 64
    dropout: float = 0.0
    bias: bool = False
    attention: str = "default"          # a name in attention_variants.REGISTRY (default, scaling, gated, ...)
    attn_backend: str = "auto"          # auto | reference | sdpa | triton
    sigmoid_bias: typing.Optional[float] = None  # sigmoid attention's b (None: -ln T)
    # AdamW and schedule
    learning_rate: float = 6e-4
    max_iters: int = 600000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0              # 0: no clipping
    decay_lr: bool = True               # linear warmup then cosine decay to min_lr; False: constant learning_rate
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000
    min_lr: float = 6e-5
    # system
    device: str = "auto"                # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK or cpu)
    dtype: str = "auto"                 # auto (bf16 if supported, else fp16, on GPU; fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False               # torch.compile the model
    backend: str = "auto"               # DDP backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo
    seed: int = 1337
    deterministic: bool = False         # torch.use_deterministic_algorithms (slower on GPU)


CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout", "bias", "attention",
              "attn_backend", "sigmoid_bias")
# model settings a resumed run must share with its checkpoint (dropout and attn_backend may change)
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "attention", "sigmoid_bias")
PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# keys whose change on resume does not affect the computed numbers
FREE_ON_RESUME = {"init_from", "max_iters", "out_dir", "eval_only", "log_interval", "wandb_log", "wandb_project",
                  "wandb_run_name", "overwrite", "snapshot_interval", "keep_snapshots", "compile", "attn_backend",
                  "always_save_checkpoint", "data_dir", "dataset", "device", "backend"}
PREPARE_COMMANDS = {"openwebtext": "python prepare_data.py --dataset openwebtext",
                    "wikitext2": "python prepare_data.py --dataset wikitext2",
                    "shakespeare": "python prepare_data.py --dataset shakespeare",
                    "builtin": "python prepare_data.py --dataset builtin"}
STOP_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, s))
RESUME_KEYS = ("optimizer", "sampler")  # what a weights-only snapshot lacks
OUTPUT_FILES = ("ckpt.pt", "run.json", "log.jsonl")


class Diverged(UserError):
    """Training produced a non-finite loss, gradient norm or weight."""
    exit_status = 3


# ================================================================================================ config

def _optional_float(tp):
    """Optional[float] (compared by structure: typing may hand out different but equal objects)."""
    return typing.get_origin(tp) is typing.Union and set(typing.get_args(tp)) == {float, type(None)}


def _type_name(tp):
    if _optional_float(tp):
        return "float or None"
    return tp.__name__


def _coerce_string(key, text):
    """Convert the text of --key=value to the key's type, or raise UserError."""
    tp = TrainConfig.__annotations__[key]
    if isinstance(tp, str):  # postponed annotations are not used here, but be safe
        tp = eval(tp, vars(typing))
    s = text.strip()
    try:
        if tp is bool:
            low = s.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(s)
        if tp is float:
            return float(s)
        if _optional_float(tp):
            return None if s.lower() in ("none", "null", "") else float(s)
        return text
    except ValueError:
        default = getattr(TrainConfig(), key)
        raise UserError(f"--{key}={text}: expected {_type_name(tp)} (default {default!r})") from None


def _coerce_value(key, value, where):
    """Check a value set in a config file against the key's type (ints are accepted for floats)."""
    tp = TrainConfig.__annotations__[key]
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}
    if _optional_float(tp):
        good = value is None or ok[float](value)
    else:
        good = ok[tp](value)
    if not good:
        raise UserError(f"{where}: {key} = {value!r} is a {type(value).__name__}, expected {_type_name(tp)} "
                        f"(default {getattr(TrainConfig(), key)!r})")
    if tp is float or (_optional_float(tp) and value is not None):
        return float(value)
    return value


def _unknown_key(key, where):
    close = difflib.get_close_matches(key, CONFIG_KEYS, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return UserError(f"unknown config key {key!r} in {where}{hint} (python train.py --help lists all keys)")


def _read_config_file(path):
    if not os.path.isfile(path):
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
        available = sorted(f for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_")) \
            if os.path.isdir(here) else []
        hint = f" (available in config/: {', '.join(available)})" if available else ""
        raise UserError(f"config file {path} does not exist{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror or e}") from None
    namespace = {"__file__": os.path.abspath(path), "__name__": "__config__"}
    try:
        exec(compile(source, path, "exec"), namespace)
    except SyntaxError as e:
        raise UserError(f"config file {path}, line {e.lineno}: syntax error ({e.msg})") from None
    except SystemExit as e:
        raise UserError(f"config file {path} calls sys.exit({e.code!r}); a config file only sets keys") from None
    except UserError:
        raise
    except Exception as e:
        line = next((tb.tb_lineno for tb in _walk_tb(e.__traceback__) if tb.tb_frame.f_code.co_filename == path), "?")
        raise UserError(f"config file {path}, line {line}: {type(e).__name__}: {e}") from None
    values = {}
    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
            continue
        if key not in CONFIG_KEYS:
            raise _unknown_key(key, path)
        values[key] = _coerce_value(key, value, path)
    return values


def _walk_tb(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def print_help():
    print(__doc__.split("\n\n")[0])
    print("\nusage: python train.py [CONFIG.py ...] [--key=value ...]\n\nkeys (default):")
    import inspect
    import re
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(TrainConfig), re.M))
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        opt = f"--{f.name}={getattr(defaults, f.name)!r}"
        print(f"  {opt:40s} {_type_name(f.type):13s} {comments.get(f.name, '')}".rstrip())


def parse_config(argv=None):
    """Resolve the configuration from argv; returns (TrainConfig, {key: where it was set})."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        return None, None
    values, origin = {}, {}
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise UserError(f"argument {arg!r}: write --key=value (e.g. --batch_size=8)")
            key, text = arg[2:].split("=", 1)
            if key not in CONFIG_KEYS:
                raise _unknown_key(key, f"--{key}={text}")
            values[key], origin[key] = _coerce_string(key, text), "command line"
        elif arg.startswith("-"):
            raise UserError(f"argument {arg!r}: options are written --key=value")
        else:
            for key, value in _read_config_file(arg).items():
                values[key], origin[key] = value, arg
    cfg = TrainConfig(**values)
    validate_config(cfg)
    return cfg, origin


def validate_config(cfg):
    def need(cond, msg):
        if not cond:
            raise UserError(msg)
    for key in ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
                "block_size", "n_layer", "n_head", "n_embd", "vocab_size"):
        need(getattr(cfg, key) >= 1, f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("max_iters", "warmup_iters", "snapshot_interval", "keep_snapshots", "outlier_interval"):
        need(getattr(cfg, key) >= 0, f"{key} must be at least 0, got {getattr(cfg, key)}")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "dropout", "beta1", "beta2"):
        need(math.isfinite(getattr(cfg, key)), f"{key} must be a finite number, got {getattr(cfg, key)}")
    need(cfg.sigmoid_bias is None or math.isfinite(cfg.sigmoid_bias),
         f"sigmoid_bias must be a finite number or None, got {cfg.sigmoid_bias}")
    need(0.0 <= cfg.dropout < 1.0, f"dropout must be in [0, 1), got {cfg.dropout}")
    need(cfg.learning_rate > 0 and cfg.min_lr >= 0, "learning_rate must be > 0 and min_lr >= 0")
    need(cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables clipping), got {cfg.grad_clip}")
    need(0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
    need(not cfg.decay_lr or cfg.lr_decay_iters > cfg.warmup_iters,
         f"lr_decay_iters ({cfg.lr_decay_iters}) must be larger than warmup_iters ({cfg.warmup_iters})")
    need(cfg.n_embd % cfg.n_head == 0, f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    need(cfg.backend in ("auto", "nccl", "gloo"), f"backend must be auto, nccl or gloo, not {cfg.backend!r}")
    need(cfg.dtype in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
         f"unknown dtype {cfg.dtype!r}; choose auto, float32, bfloat16 or float16")
    need(cfg.out_dir.strip() != "", "out_dir is empty; name the run's directory, e.g. --out_dir=out/my_run")
    need(os.path.dirname(os.path.abspath(cfg.out_dir)) != os.path.abspath(cfg.out_dir),
         f"out_dir {cfg.out_dir} is the filesystem root; name a directory of the run's own")
    check_seed(cfg.seed, "seed")
    need(cfg.init_from in ("scratch", "resume") + PRETRAINED or os.path.isdir(cfg.init_from),
         f"init_from must be scratch, resume, one of {', '.join(PRETRAINED)} or a Hugging Face GPT-2 "
         f"directory, not {cfg.init_from!r}")
    import attention_variants
    attention_variants.get_variant(cfg.attention)
    attention_variants.check_backend(cfg.attn_backend)


def format_config(cfg, origin):
    lines = ["config:"]
    for key in CONFIG_KEYS:
        where = origin.get(key)
        lines.append(f"  {key:28s} = {getattr(cfg, key)!r}" + (f"   # {where}" if where else ""))
    return "\n".join(lines)


# ================================================================================================ data

class Batches:
    """Random windows of a token file, drawn for the global batch from one seeded generator.

    Every rank holds an identical generator (seeded by `seed`); each draw covers the global batch of
    gradient_accumulation_steps * batch_size windows and rank r uses its contiguous slice, so the
    windows of a run do not depend on the number of ranks. The generator state is checkpointed.
    """

    def __init__(self, path, block_size, device, seed, vocab_size=None):
        self.path = path
        self.block_size = block_size
        self.device = device
        self.vocab_size = vocab_size
        self.n_tokens = len(load_tokens(path))
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.draws = 0

    def draw(self, n):
        self.draws += 1
        return torch.randint(self.n_tokens - self.block_size, (n,), generator=self.generator)

    def get(self, offsets):
        """(x, y) on the device for window starts `offsets` (1-D tensor)."""
        data = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")  # re-open per batch: avoids a memmap leak
        T = self.block_size
        starts = offsets.tolist()
        x = torch.from_numpy(np.stack([data[i:i + T] for i in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + T] for i in starts]).astype(np.int64))
        if self.vocab_size is not None:
            self._check_ids(x, y)
        if str(self.device).startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def _check_ids(self, x, y):
        """A token id beyond the vocabulary (data that does not match its meta.json) is a clear error
        here, not an IndexError inside the embedding (or a device-side assert on CUDA)."""
        top = max(int(x.max()), int(y.max()))
        if top >= self.vocab_size:
            raise UserError(f"{self.path} holds token id {top}, outside the model's vocabulary of {self.vocab_size}: "
                            f"the file does not match its meta.json or this model; prepare it again with "
                            f"prepare_data.py, or set --vocab_size larger")

    def state_dict(self):
        return {"seed": self.seed, "draws": self.draws, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.draws = int(state["draws"])


def check_data(cfg, data_dir):
    """Validate the data directory against the config; returns meta.json's content (or {})."""
    cmd = PREPARE_COMMANDS.get(cfg.dataset)
    if cmd is None:
        cmd = f"python prepare_data.py --dataset text --input YOUR_TEXT_FILES --out_dir {data_dir}"
    elif os.path.normpath(data_dir) != os.path.join("data", cfg.dataset):  # prepare_data's default out_dir
        cmd += f" --out_dir {data_dir}"
    for split in ("train", "val"):
        if not os.path.isfile(os.path.join(data_dir, f"{split}.bin")):
            what = "does not exist" if not os.path.isdir(data_dir) else f"has no {split}.bin"
            raise UserError(f"data directory {data_dir} {what}; make it with: {cmd}"
                            + ("" if cfg.data_dir else f" (or set --data_dir)"))
    meta_path = os.path.join(data_dir, "meta.json")
    meta = read_meta(meta_path) if os.path.lexists(meta_path) else {}
    lengths = {s: len(load_tokens(os.path.join(data_dir, f"{s}.bin"))) for s in ("train", "val")}
    for split, n in lengths.items():
        if n <= cfg.block_size + 1:
            raise UserError(f"block_size {cfg.block_size} is larger than the data: {data_dir}/{split}.bin holds only "
                            f"{n:,} tokens; use a smaller --block_size or more data")
    if "vocab_size" in meta:
        data_vocab, where = int(meta["vocab_size"]), f"{meta_path} says vocab_size {meta['vocab_size']}"
    else:  # nanoGPT-made data without meta.json: look at the ids themselves (chunked; once per launch)
        data_vocab = 1 + max(_max_token(os.path.join(data_dir, f"{s}.bin")) for s in ("train", "val"))
        where = f"{data_dir} holds token id {data_vocab - 1}"
    if data_vocab > cfg.vocab_size:
        raise UserError(f"the data's vocabulary is larger than the model's: {where}, but vocab_size is "
                        f"{cfg.vocab_size}; set --vocab_size={data_vocab} or more")
    return meta


def read_meta(path):
    """prepare_data.py's meta.json, checked: a dict whose vocab_size, when present, is a positive integer."""
    meta = read_json_file(path, "data description")
    fix = "prepare the data again with prepare_data.py (or remove meta.json to have the ids checked instead)"
    if not isinstance(meta, dict):
        raise UserError(f"{path} holds a {type(meta).__name__}, not a data description; {fix}")
    vocab = meta.get("vocab_size", 1)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise UserError(f"{path}: vocab_size {vocab!r} is not a positive integer; {fix}")
    return meta


def _max_token(path, chunk=1 << 26):
    data = load_tokens(path)
    return int(max(data[i:i + chunk].max() for i in range(0, len(data), chunk)))


# ================================================================================================ resume state

RESUME_FIX = "it cannot be resumed exactly: restore it from a copy (its weights can still be analysed)"


def check_resume_state(path, ckpt):
    """The resume state of a checkpoint as data (optimizer structure, sampler, every rank's RNG), checked
    before the launch writes anything; one line naming the key."""
    opt = ckpt["optimizer"]
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(groups, list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise UserError(f"{path}: optimizer is not an optimizer state (a dict of 'state' and 'param_groups'); {RESUME_FIX}")
    sampler = ckpt["sampler"]
    try:
        torch.Generator().set_state(sampler["generator"])
        if isinstance(sampler["draws"], bool) or int(sampler["draws"]) < 0:
            raise ValueError
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError):
        raise UserError(f"{path}: sampler is not a data sampler state (its generator or draw count); {RESUME_FIX}") from None
    rng = ckpt.get("rng")
    if rng is not None and not isinstance(rng, list):
        raise UserError(f"{path}: rng is a {type(rng).__name__}, not a list of per-rank RNG states; {RESUME_FIX}")
    for rank, state in enumerate(rng or []):
        try:
            check_rng_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, OverflowError):
            raise UserError(f"{path}: rng[{rank}] is not an RNG state (python, numpy, torch); {RESUME_FIX}") from None


def check_rng_state(state):
    """Apply `state` to throw-away generators: raises where set_rng_state would."""
    py = state["python"]
    random.Random().setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.RandomState().set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.Generator().set_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and not (isinstance(cuda, torch.Tensor) and cuda.dtype == torch.uint8):
        raise TypeError("cuda state")


def load_optimizer_state(optimizer, state, path):
    """optimizer.load_state_dict, after checking that the saved groups and moment shapes fit the model's
    parameters (torch checks the group sizes only; a wrong moment shape would fail at the first step)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sizes, saved = [len(g["params"]) for g in optimizer.param_groups], [len(g["params"]) for g in state["param_groups"]]
    if sizes != saved:
        raise UserError(f"{path}: the optimizer state has parameter groups of {saved} parameters, the model's optimizer "
                        f"{sizes}; {RESUME_FIX}")
    ids = [i for g in state["param_groups"] for i in g["params"]]
    for param, pid in zip(params, ids):
        moments = state["state"].get(pid, {})
        for name, value in (moments.items() if isinstance(moments, dict) else [("", moments)]):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)  # a step count
            if not (number or isinstance(value, torch.Tensor)) or (number is False and value.ndim
                                                                   and value.shape != param.shape):
                what = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
                raise UserError(f"{path}: optimizer['state'][{pid}][{name!r}] has {what}, but its parameter has shape "
                                f"{tuple(param.shape)}; {RESUME_FIX}")
    try:
        optimizer.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: the optimizer state does not fit this model ({one_line(e, 120)}); {RESUME_FIX}") from None


def read_run_record(path):
    """run.json of earlier launches ({} where there is none), checked: a dict whose launches are a list."""
    if not os.path.lexists(path):
        return {}
    record = read_json_file(path, "run record")
    if not isinstance(record, dict) or not isinstance(record.get("launches", []), list):
        raise UserError(f"run record {path} is not one train.py wrote (a dict with a list of launches); restore it "
                        f"or move it away")
    return record


def training_bytes(cfg):
    """A low estimate of training's memory: fp32 weights, gradients and AdamW moments, plus the activations
    and logits one micro-batch keeps for the backward. Above the device's memory, the run cannot fit."""
    n_params = 12 * cfg.n_layer * cfg.n_embd ** 2 + (cfg.vocab_size + cfg.block_size) * cfg.n_embd
    tokens = cfg.batch_size * cfg.block_size
    return 16 * n_params + tokens * (16 * cfg.n_layer * cfg.n_embd + 4 * cfg.vocab_size)


# ================================================================================================ helpers

def micro_steps_per_rank(gradient_accumulation_steps, world_size):
    if gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by the "
                        f"number of processes ({world_size})")
    return gradient_accumulation_steps // world_size


def get_lr(cfg, it):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def rng_state(device):
    """This process's RNG states, as weights_only-loadable objects (tensors, lists, numbers)."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state(), "cuda": None}
    if str(device).startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


class StopFlag:
    """Set by SIGTERM / SIGINT / SIGUSR1; the loop checks it after each step. A second SIGINT aborts."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def install(self):
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        os.write(2, f"received {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                    f"(Ctrl-C again to abort)\n".encode())


class JsonlLog:
    """Rank 0's log.jsonl (and wandb): one JSON object per line, flushed at once.

    The file is strict JSON: a non-finite number (a diverged loss, an inf gradient norm) is written
    as null; wandb gets the numbers as they are.
    """

    def __init__(self, path, wandb_run=None):
        self.path = path
        try:
            self.file = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(path, e) from None
        self.wandb_run = wandb_run

    def write(self, record):
        try:  # a partial last line (full disk) is cut off by the resume, which truncates to the checkpoint's offset
            self.file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self.file.flush()
        except OSError as e:
            raise write_error(self.path, e) from None
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k not in ("iter", "kind")}, step=record["iter"])

    def offset(self):
        self.file.flush()
        return self.file.tell()

    def close(self):
        with contextlib.suppress(OSError):  # write() has already reported a failing disk
            self.file.close()


def truncate_log(path, offset):
    """Drop what a resumed run re-does: keep the first `offset` bytes of log.jsonl (atomically)."""
    if not os.path.exists(path) or offset is None:
        return
    if os.path.getsize(path) < offset:
        print(f"warning: {path} is shorter than when the checkpoint was written; appending to it")
        return
    with open(path, "rb") as f:
        head = f.read(offset)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(head)


# ================================================================================================ main

def main(argv=None):
    cfg, origin = parse_config(argv)
    if cfg is None:
        print_help()
        return 0
    return Trainer(cfg, origin).run()


class Trainer:

    def __init__(self, cfg, origin):
        self.cfg, self.origin = cfg, origin
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        self.stop = StopFlag()

    # ---------------------------------------------------------------------------------------- setup
    def setup_distributed(self):
        cfg = self.cfg
        if self.ddp:
            self.rank = int(os.environ["RANK"])
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
            self.world = int(os.environ["WORLD_SIZE"])
            want = resolve_device(cfg.device)
            self.device = resolve_device(f"cuda:{self.local_rank}" if want.startswith("cuda") else want)
            if self.device.startswith("cuda"):
                torch.cuda.set_device(self.device)
            backend = cfg.backend if cfg.backend != "auto" else ("nccl" if self.device.startswith("cuda") else "gloo")
            if backend == "nccl" and not self.device.startswith("cuda"):
                raise UserError("backend nccl needs GPUs; use --backend=gloo (or auto) on CPU")
            torch.distributed.init_process_group(backend=backend)
        else:
            self.rank, self.local_rank, self.world = 0, 0, 1
            self.device = resolve_device(cfg.device)
            if self.device == "cuda":
                self.device = f"cuda:{torch.cuda.current_device()}"  # an explicit index for set_device / RNG state
            if self.device.startswith("cuda"):
                torch.cuda.set_device(self.device)
        self.master = self.rank == 0
        self.local_accum = micro_steps_per_rank(cfg.gradient_accumulation_steps, self.world)
        self.device_type = "cuda" if self.device.startswith("cuda") else "cpu"

    def log(self, *args):
        if self.master:
            print(*args, flush=True)

    def quiet(self):
        """Silence what library code prints on ranks other than 0 (one copy of each setup line)."""
        return contextlib.nullcontext() if self.master else contextlib.redirect_stdout(io.StringIO())

    def any_rank(self, *flags):
        """For each flag, whether it holds on any rank: one collective keeps all ranks deciding alike."""
        t = torch.stack([torch.as_tensor(f, device=self.device).reshape(()).int() for f in flags])
        if self.ddp:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def fail(self, error):
        """Raise `error` on rank 0 and exit quietly with its status elsewhere: the message appears once.
        Every rank calls it at the same point."""
        self.failing_together = True
        if self.master:
            raise error
        raise SystemExit(error.exit_status)

    def run(self):
        self.setup_distributed()
        self.failing_together = False
        try:
            with self.out_dir_lock():
                return self._run()
        finally:
            if self.ddp and torch.distributed.is_initialized():
                if self.failing_together:  # the others wait for rank 0's message and run.json: torchrun
                    torch.distributed.barrier()  # kills the remaining ranks as soon as one exits
                # DDP's reducer holds the process group; freed last by the reducer (at interpreter exit, with
                # the GIL held), gloo's destructor joins worker threads that wait for the GIL: a hang.
                # Dropping DDP first leaves the last reference to destroy_process_group, which frees it
                # without the GIL.
                # a failure's traceback (an interrupt inside DDP's forward, a no_sync context) holds DDP too
                traceback.clear_frames(sys.exc_info()[2])
                self.model = self.fwd_model = None
                gc.collect()
                torch.distributed.destroy_process_group()

    @contextlib.contextmanager
    def out_dir_lock(self):
        """Rank 0 holds out_dir's lock for the whole run; if it cannot, every rank stops before any work."""
        with contextlib.ExitStack() as stack:
            error = None
            if self.master:
                try:
                    stack.enter_context(directory_lock(self.cfg.out_dir, "training run"))
                except UserError as e:
                    error = e
            if self.any_rank(error is not None)[0]:
                self.fail(error or UserError("out_dir is locked"))
            yield

    def _run(self):
        cfg = self.cfg
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if self.device_type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
        self.ptdtype = resolve_dtype(cfg.dtype, self.device)
        self.autocast = autocast_context(self.device, self.ptdtype)
        self.data_dir = cfg.data_dir or os.path.join("data", cfg.dataset)
        ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        self.ckpt_path, self.log_path = ckpt_path, os.path.join(cfg.out_dir, "log.jsonl")

        # ---- out_dir: refuse to clobber a run unless asked; resume needs a checkpoint
        ckpt = None
        if cfg.init_from == "resume":
            if not os.path.exists(ckpt_path):
                raise UserError(f"--init_from=resume: {ckpt_path} does not exist; start with --init_from=scratch "
                                f"(or point --out_dir at the run to continue)")
            from checkpoint import load_checkpoint
            ckpt = load_checkpoint(ckpt_path, map_location="cpu")
            missing = [k for k in RESUME_KEYS if k not in ckpt]
            if missing:
                kind = ckpt.get("kind", "checkpoint")
                raise UserError(f"cannot resume from {ckpt_path}: it is a weights-only {kind} (iter {ckpt['iter_num']})"
                                f" without the {' and '.join(missing)} state an exact resume "
                                f"needs; resume from the ckpt.pt train.py wrote, or analyse this file with "
                                f"analyze_outliers.py")
            check_resume_state(ckpt_path, ckpt)
            self.check_resume_config(ckpt)
        elif os.path.exists(ckpt_path) and not cfg.overwrite:
            if cfg.eval_only:  # its log and run record would get an evaluation of other weights
                raise UserError(f"{cfg.out_dir} holds a run ({ckpt_path}); --eval_only with --init_from="
                                f"{cfg.init_from} would log an evaluation of other weights into it: evaluate the run "
                                f"with --init_from=resume --eval_only=True, or choose another --out_dir")
            raise UserError(f"{cfg.out_dir} already holds a run ({ckpt_path}); continue it with --init_from=resume, "
                            f"or pass --overwrite=True to start over, or choose another --out_dir")
        # every file of the run directory this launch reads or replaces, checked before anything is written
        check_regular_file(self.log_path, "training log")
        keeps_record = ckpt is not None or cfg.eval_only
        self.previous_record = read_run_record(os.path.join(cfg.out_dir, "run.json")) if keeps_record else {}
        check_fits(training_bytes(cfg), self.device,
                   f"training {cfg.n_layer} layers of width {cfg.n_embd} on {cfg.batch_size} x {cfg.block_size} tokens",
                   "lower --batch_size (and raise --gradient_accumulation_steps to keep the tokens per iteration)")

        meta = check_data(cfg, self.data_dir)
        self.log(format_config(cfg, self.origin))
        tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
        self.log(f"world size {self.world}, {self.local_accum} micro-steps of {cfg.batch_size} x {cfg.block_size} "
                 f"tokens per rank: {tokens_per_iter:,} tokens per iteration, "
                 f"{tokens_per_iter * cfg.max_iters:,} over max_iters={cfg.max_iters:,}")

        # ---- model and optimizer
        with self.quiet():
            model = self.build_model(ckpt)
            model.to(self.device)
            optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                                   self.device_type)
        scaler = torch.amp.GradScaler(self.device_type, enabled=(self.ptdtype == torch.float16))
        self.base_model, self.optimizer, self.scaler = model, optimizer, scaler

        # ---- data: one train generator shared (identically) by all ranks; fixed evaluation windows
        self.train_batches = Batches(os.path.join(self.data_dir, "train.bin"), cfg.block_size, self.device, cfg.seed,
                                     cfg.vocab_size)
        self.eval_batches = {}
        for i, split in enumerate(("train", "val")):
            b = Batches(os.path.join(self.data_dir, f"{split}.bin"), cfg.block_size, self.device, cfg.seed + 1 + i,
                        cfg.vocab_size)
            self.eval_batches[split] = (b, b.draw(cfg.eval_iters * cfg.batch_size).view(cfg.eval_iters, cfg.batch_size))

        self.iter_num, self.best_val_loss, self.last_eval_iter, self.last_telemetry_iter = 0, float("inf"), -1, -1
        wandb_id = None
        if ckpt is not None:
            load_optimizer_state(optimizer, ckpt["optimizer"], ckpt_path)
            if ckpt.get("scaler"):
                try:
                    scaler.load_state_dict(ckpt["scaler"])
                except (KeyError, TypeError, ValueError, RuntimeError) as e:
                    raise UserError(f"{ckpt_path}: scaler is not a grad scaler state ({one_line(e, 120)}); "
                                    f"{RESUME_FIX}") from None
            self.iter_num = int(ckpt["iter_num"])
            self.best_val_loss = float(ckpt.get("best_val_loss", float("inf")))
            self.last_eval_iter = int(ckpt.get("last_eval_iter", -1))
            self.last_telemetry_iter = int(ckpt.get("last_telemetry_iter", -1))
            self.train_batches.load_state_dict(ckpt["sampler"])
            wandb_id = ckpt.get("wandb_run_id")

        # ---- compile / DDP
        self.fwd_model = torch.compile(model) if cfg.compile else model  # no DDP: evaluation
        self.model = self.fwd_model
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(self.fwd_model, device_ids=[self.local_rank] if self.device_type == "cuda" else None)

        # ---- outlier telemetry hook
        self.telemetry = training_telemetry if cfg.outlier_interval > 0 else None
        val_b, val_offsets = self.eval_batches["val"]
        self.X_fixed = val_b.get(val_offsets[0])[0]

        # ---- run record, log, wandb (rank 0)
        self.out_log = None
        if self.master:
            for name in os.listdir(cfg.out_dir):  # temp files of writes killed midway: ours alone, as we hold the lock
                ours = name.startswith(".ckpt") or any(name.startswith(f".{f}.") for f in OUTPUT_FILES)
                if ours and name.endswith(".tmp"):
                    os.remove(os.path.join(cfg.out_dir, name))
            if ckpt is not None:
                truncate_log(self.log_path, ckpt.get("log_offset"))
            elif not cfg.eval_only:
                for name in os.listdir(cfg.out_dir):  # start over: old snapshots and log belong to the old run
                    if name == "log.jsonl" or (name.startswith("ckpt_") and name.endswith(".pt")):
                        os.remove(os.path.join(cfg.out_dir, name))
            wandb_run = None
            if cfg.wandb_log:
                wandb_run, wandb_id = self.init_wandb(wandb_id)
            self.wandb_id = wandb_id
            self.out_log = JsonlLog(self.log_path, wandb_run)
            self.write_run_record(meta, model, tokens_per_iter, start=ckpt is None and not cfg.eval_only)
        else:
            self.wandb_id = wandb_id

        # ---- RNG: model init used `seed` on every rank; training streams are per rank
        if ckpt is not None and ckpt.get("world_size") == self.world and ckpt.get("rng"):
            set_rng_state(ckpt["rng"][self.rank], self.device)
        else:
            if ckpt is not None:
                self.log(f"warning: checkpoint was written by {ckpt.get('world_size')} processes, this run has "
                         f"{self.world}: data order is preserved, dropout RNG streams are not")
            seed = cfg.seed + self.rank + 1_000_003 * self.iter_num
            random.seed(seed), np.random.seed(seed % 2**32), torch.manual_seed(seed)
        del ckpt

        self.stop.install()
        status = "failed"
        try:
            status = self.loop(tokens_per_iter)
        except Diverged:
            status = "diverged"
            raise
        finally:
            self.stop.uninstall()
            if self.master:
                # when the run already failed (e.g. a full disk), its own error is the one to report
                with contextlib.suppress(*(() if status in ("finished", "stopped") else (UserError,))):
                    self.finish_run_record(status)
                self.out_log.close()
                if self.out_log.wandb_run is not None:
                    self.out_log.wandb_run.finish(exit_code=0 if status in ("finished", "stopped") else 1)
        out = cfg.out_dir
        self.log(f"{status} at iter {self.iter_num}: checkpoint {os.path.join(out, 'ckpt.pt')}, log "
                 f"{os.path.join(out, 'log.jsonl')}, run record {os.path.join(out, 'run.json')}"
                 + ("; continue with the same command plus --init_from=resume" if status == "stopped" else ""))
        return 0

    def build_model(self, ckpt):
        cfg = self.cfg
        from checkpoint import load_model
        from model import GPT, GPTConfig
        if ckpt is not None:
            model, _ = load_model(ckpt, device="cpu", dropout=cfg.dropout, attn_backend=cfg.attn_backend)
            return model.train()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and for every world size
        self.pretrained_from = None if cfg.init_from == "scratch" else cfg.init_from
        if cfg.init_from == "scratch":
            model = GPT(GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS}))
        else:
            model, _ = load_model(pretrained=cfg.init_from, device="cpu", attention=cfg.attention, dropout=cfg.dropout,
                                  attn_backend=cfg.attn_backend, sigmoid_bias=cfg.sigmoid_bias)
            model.train()
            if cfg.block_size < model.config.block_size:
                model.crop_block_size(cfg.block_size)
            for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias"):
                if getattr(cfg, key) != getattr(model.config, key):
                    self.log(f"note: {key} = {getattr(model.config, key)} from {cfg.init_from} (config said "
                             f"{getattr(cfg, key)})")
                    setattr(self.cfg, key, getattr(model.config, key))
            check_data(self.cfg, self.data_dir)
        self.log(f"model: {cfg.attention} attention, {model.get_num_params() / 1e6:.2f}M parameters")
        return model

    def check_resume_config(self, ckpt):
        cfg = self.cfg
        args = ckpt["model_args"]
        self.pretrained_from = ckpt.get("pretrained_from")
        if self.pretrained_from:  # the shape came from the OpenAI weights, not from the config
            for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias"):
                setattr(cfg, key, args[key])
        diffs = [f"{k} (checkpoint {args[k]!r}, config {getattr(cfg, k)!r})" for k in SHAPE_KEYS
                 if k in args and args[k] != getattr(cfg, k)]
        if diffs:
            raise UserError(f"cannot resume {self.ckpt_path}: the model differs from the checkpoint's in "
                            f"{'; '.join(diffs)}. Resume with the original config (saved in "
                            f"{os.path.join(cfg.out_dir, 'run.json')}) plus --init_from=resume")
        old = ckpt.get("config") or {}
        changed = [f"{k}: {old[k]!r} -> {getattr(cfg, k)!r}" for k in CONFIG_KEYS
                   if k in old and k not in FREE_ON_RESUME and old[k] != getattr(cfg, k)]
        if changed:
            self.log(f"warning: resuming with changed settings ({'; '.join(changed)}); the run will not continue "
                     f"exactly as the uninterrupted one would")

    def init_wandb(self, wandb_id):
        cfg = self.cfg
        try:
            import wandb
            wandb_id = wandb_id or secrets.token_hex(4)  # os.urandom: leaves the seeded RNGs alone
            run = wandb.init(project=cfg.wandb_project, id=wandb_id, resume="allow",
                             name=cfg.wandb_run_name or f"{cfg.attention}-{os.path.basename(os.path.abspath(cfg.out_dir))}",
                             config=dataclasses.asdict(cfg))
        except Exception as e:
            raise UserError(f"wandb could not start ({type(e).__name__}: {one_line(e, 200)}); run "
                            f"`wandb login`, set WANDB_MODE=offline, or pass --wandb_log=False") from None
        return run, wandb_id

    def write_run_record(self, meta, model, tokens_per_iter, start):
        path = os.path.join(self.cfg.out_dir, "run.json")
        record = {} if start else dict(self.previous_record)
        launch = {**run_metadata(self.device), "init_from": self.cfg.init_from, "start_iter": self.iter_num,
                  "world_size": self.world, "status": "running", "end_iter": None}
        record["config"] = dataclasses.asdict(self.cfg)
        record["model_args"] = dataclasses.asdict(model.config)
        record["num_params"] = model.get_num_params()
        record["tokens_per_iter"] = tokens_per_iter
        record["data"] = {"data_dir": os.path.abspath(self.data_dir), "meta": meta}
        record["wandb_run_id"] = self.wandb_id
        record.setdefault("launches", []).append(launch)
        self.run_record = record
        atomic_write_json(path, record)

    def finish_run_record(self, status):
        self.run_record["launches"][-1].update(status=status, end_iter=self.iter_num,
                                               end_date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        atomic_write_json(os.path.join(self.cfg.out_dir, "run.json"), self.run_record)

    # ---------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self):
        """Mean loss over the same eval_iters fixed batches per split, shared out over the ranks."""
        self.fwd_model.eval()
        out = {}
        for split, (batches, offsets) in self.eval_batches.items():
            total = torch.zeros((), device=self.device, dtype=torch.float64)
            for i in range(self.rank, self.cfg.eval_iters, self.world):
                X, Y = batches.get(offsets[i])
                with self.autocast:
                    _, loss = self.fwd_model(X, Y)
                total += loss.double()
            if self.ddp:
                torch.distributed.all_reduce(total)
            out[split] = total.item() / self.cfg.eval_iters
        self.fwd_model.train()
        return out

    # ---------------------------------------------------------------------------------------- checkpoints
    def save(self, reason):
        """Write ckpt.pt (all ranks take part: every rank's RNG state goes in)."""
        from checkpoint import model_args_from, save_checkpoint
        self.check_weights()
        state = rng_state(self.device)
        if self.ddp:
            states = [None] * self.world
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        if self.master:
            ckpt = {"model": self.base_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                    "model_args": model_args_from(self.base_model.config), "iter_num": self.iter_num,
                    "best_val_loss": self.best_val_loss, "last_eval_iter": self.last_eval_iter,
                    "config": dataclasses.asdict(self.cfg), "rng": states, "sampler": self.train_batches.state_dict(),
                    "world_size": self.world, "wandb_run_id": self.wandb_id, "log_offset": self.out_log.offset(),
                    "last_telemetry_iter": self.last_telemetry_iter,
                    "pretrained_from": self.pretrained_from, "kind": "train"}
            t0 = time.time()
            save_checkpoint(self.ckpt_path, ckpt)
            print(f"saved {self.ckpt_path} at iter {self.iter_num} ({reason}, {time.time() - t0:.1f} s)", flush=True)
        self.saved_at = self.iter_num

    def snapshot(self):
        """Weights-only ckpt_{iter}.pt for studying outliers over training (rank 0, no collectives)."""
        if not self.master:
            return
        from checkpoint import model_args_from, save_checkpoint
        path = os.path.join(self.cfg.out_dir, f"ckpt_{self.iter_num}.pt")
        save_checkpoint(path, {"model": self.base_model.state_dict(), "model_args": model_args_from(self.base_model.config),
                               "iter_num": self.iter_num, "config": dataclasses.asdict(self.cfg), "kind": "snapshot"})
        if self.cfg.keep_snapshots:
            snaps = sorted((int(n[5:-3]), n) for n in os.listdir(self.cfg.out_dir)
                           if n.startswith("ckpt_") and n.endswith(".pt") and n[5:-3].isdigit())
            for _, name in snaps[:-self.cfg.keep_snapshots]:
                os.remove(os.path.join(self.cfg.out_dir, name))

    # ---------------------------------------------------------------------------------------- divergence
    def check_weights(self):
        """Diverged unless every weight is finite (identical on all ranks, so they all stop together)."""
        from checkpoint import all_finite
        if not all(all_finite(p) for p in self.base_model.parameters()):
            self.fail(self.diverged(self.iter_num, "the weights hold NaN or inf"))

    def diverged(self, it, what):
        cfg = self.cfg
        if self.saved_at is None:
            where = (f"no checkpoint of this run was written; start again with a lower --learning_rate "
                     f"(now {cfg.learning_rate:g})")
        else:
            where = (f"{self.ckpt_path} was not overwritten and holds iter {self.saved_at}, the last good state: "
                     f"resume from it with the same command plus --init_from=resume and a lower learning rate, "
                     f"e.g. --learning_rate={cfg.learning_rate / 10:g}")
        return Diverged(f"training diverged at iter {it}: {what}; {where}")

    # ---------------------------------------------------------------------------------------- training

    def loop(self, tokens_per_iter):
        # self.model, never a local: a failure's traceback would keep the DDP wrapper alive past teardown
        cfg, optimizer, scaler = self.cfg, self.optimizer, self.scaler
        self.saved_at = self.iter_num if cfg.init_from == "resume" else None
        last_log_time, last_log_iter = time.time(), self.iter_num
        while True:
            it = self.iter_num
            # ---- telemetry, evaluation, checkpoint: weights after `it` steps
            paused = False
            if (self.telemetry is not None and it % cfg.outlier_interval == 0 and not cfg.eval_only
                    and it != self.last_telemetry_iter):  # a resume at `it` finds its record already logged
                if self.master:
                    with self.autocast:
                        stats = self.telemetry(self.base_model, self.X_fixed)
                    self.out_log.write({"kind": "outliers", "iter": it, **{k: float(v) for k, v in stats.items()}})
                self.last_telemetry_iter = it
                paused = True
            if (it % cfg.eval_interval == 0 or it == cfg.max_iters or cfg.eval_only) and it != self.last_eval_iter:
                losses = self.evaluate()
                self.last_eval_iter = it
                if self.master:
                    print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
                    self.out_log.write({"kind": "eval", "iter": it, "train_loss": losses["train"],
                                        "val_loss": losses["val"], "lr": get_lr(cfg, it),
                                        "tokens": it * tokens_per_iter})
                if not all(math.isfinite(v) for v in losses.values()):
                    self.fail(self.diverged(it, f"the evaluation loss is not finite (train {losses['train']}, "
                                                f"val {losses['val']})"))
                improved = losses["val"] < self.best_val_loss
                self.best_val_loss = min(self.best_val_loss, losses["val"])
                if it > 0 and not cfg.eval_only and (improved or cfg.always_save_checkpoint):
                    self.save("evaluation")
                paused = True
            if paused:  # keep evaluation and checkpoint time out of the throughput numbers
                last_log_time, last_log_iter = time.time(), it
            if cfg.eval_only or it >= cfg.max_iters:
                break

            # ---- one optimizer step over the global batch
            lr = get_lr(cfg, it)
            for group in optimizer.param_groups:
                group["lr"] = lr
            offsets = self.train_batches.draw(cfg.gradient_accumulation_steps * cfg.batch_size)
            offsets = offsets.view(self.world, self.local_accum, cfg.batch_size)[self.rank]
            X, Y = self.train_batches.get(offsets[0])
            loss_sum = torch.zeros((), device=self.device)
            for micro in range(self.local_accum):
                last = micro == self.local_accum - 1
                sync = contextlib.nullcontext() if (last or not self.ddp) else self.model.no_sync()
                with sync:
                    with self.autocast:
                        _, loss = self.model(X, Y)
                    loss_sum += loss.detach().float()
                    if not last:
                        X, Y = self.train_batches.get(offsets[micro + 1])  # prefetch while the GPU works
                    scaler.scale(loss / self.local_accum).backward()
            grad_norm = None
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.base_model.parameters(), cfg.grad_clip)
            # the one per-step collective: a stop signal on any rank, a non-finite step on any rank
            nonfinite = ~torch.isfinite(loss_sum)
            if grad_norm is not None and not scaler.is_enabled():  # fp16's scaler skips overflow steps itself
                nonfinite = nonfinite | ~torch.isfinite(grad_norm)
            stop, bad = self.any_rank(self.stop.signum is not None, nonfinite)
            if bad:  # before the optimizer applies it: the moments and weights stay those of the last good step
                norm = f"{float(grad_norm):.4g}" if grad_norm is not None else "not computed"
                self.fail(self.diverged(it, f"the training loss or gradient norm is not finite (rank {self.rank}: "
                                            f"loss {loss_sum.item() / self.local_accum:.4g}, grad norm {norm})"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            # ---- log: the mean loss over the whole global batch (all ranks), throughput, MFU
            if it % cfg.log_interval == 0:
                if self.ddp:
                    torch.distributed.all_reduce(loss_sum)
                loss_val = loss_sum.item() / cfg.gradient_accumulation_steps
                now = time.time()
                dt = (now - last_log_time) / max(1, it + 1 - last_log_iter)
                last_log_time, last_log_iter = now, it + 1
                if self.master:
                    mfu = self.base_model.estimate_mfu(cfg.batch_size * self.local_accum, dt)
                    record = {"kind": "train", "iter": it, "loss": loss_val, "lr": lr,
                              "grad_norm": float(grad_norm) if grad_norm is not None else None,
                              "tokens_per_sec": tokens_per_iter / dt, "mfu": mfu, "time_ms": dt * 1000,
                              "tokens": (it + 1) * tokens_per_iter}
                    self.out_log.write(record)
                    print(f"iter {it}: loss {loss_val:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms, "
                          f"{tokens_per_iter / dt:,.0f} tok/s" + (f", mfu {mfu * 100:.1f}%" if mfu else ""), flush=True)

            self.iter_num = it + 1
            if cfg.snapshot_interval and self.iter_num % cfg.snapshot_interval == 0:
                self.check_weights()
                self.snapshot()
            if stop:
                self.save(f"stopped by {signal.Signals(self.stop.signum).name if self.stop.signum else 'a signal'}")
                return "stopped"
        if not cfg.eval_only and self.saved_at != self.iter_num:
            self.save("end of training")
        return "finished"


if __name__ == "__main__":
    cli_main(main)
