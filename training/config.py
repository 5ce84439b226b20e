"""train.py's configuration: the keys and their defaults (`TrainConfig`), config files, `--key=value`
overrides, their checks, and which keys a resumed run may change.

Configuration: the defaults below, then each config file given (in order), then each `--key=value` (in
order). A config file is plain Python executed in a fresh namespace; every public name it defines must be
a known key of the right type.
"""

import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass

from model import PRETRAINED as GPT2_SIZES
from model import config_fields
from runtime.cli import UserError, check_seed, is_int, is_number
from runtime.files import not_a_file, read_json_file


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
    overwrite: bool = False             # start over in an out_dir that holds a run (command line only; else error)
    resume_on_new_data: bool = False    # resume on data other than the checkpoint's (else error); run.json keeps both
    snapshot_interval: int = 0          # also keep weights-only snapshots ckpt_{iter}.pt every this many iters (0: off)
    keep_snapshots: int = 0             # keep only the newest N snapshots (0: keep all)
    outlier_interval: int = 500         # telemetry.training_telemetry on a fixed val batch every N iters (0: off)
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
    variants_file: str = ""             # a Python file registering more variants (attention_variants.register), run first
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
# the keys that are GPTConfig fields: what builds the model
MODEL_KEYS = tuple(k for k in CONFIG_KEYS if k in config_fields())
# model settings a resumed run must share with its checkpoint (dropout and attn_backend may change)
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "attention", "sigmoid_bias")
PRETRAINED = tuple(GPT2_SIZES)  # init_from names of OpenAI's GPT-2 checkpoints
# keys whose change on resume does not affect the computed numbers
FREE_ON_RESUME = {"init_from", "max_iters", "out_dir", "eval_only", "log_interval", "wandb_log", "wandb_project",
                  "wandb_run_name", "overwrite", "snapshot_interval", "keep_snapshots", "compile", "attn_backend",
                  "always_save_checkpoint", "data_dir", "dataset", "device", "backend", "resume_on_new_data",
                  "variants_file"}
# keys only the command line may set: a config file names no directory of the user's, so it must not replace one
COMMAND_LINE_ONLY = {"overwrite": "replacing the run in an out_dir is asked for on the command line only "
                                  "(--overwrite=True), so that a config file never replaces a run in a directory "
                                  "named elsewhere"}


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
          int: is_int,
          float: is_number,
          str: lambda v: isinstance(v, str)}
    if _optional_float(tp):
        good = value is None or ok[float](value)
    else:
        good = ok[tp](value)
    if not good:
        raise UserError(f"{where}: {key} = {value!r} is a {type(value).__name__}, expected {_type_name(tp)} "
                        f"(default {getattr(TrainConfig(), key)!r})")
    if tp is float or (_optional_float(tp) and value is not None):
        try:
            return float(value)
        except OverflowError:  # an int beyond float's range, e.g. 10**400
            raise UserError(f"{where}: {key} is an integer of about {int(value.bit_length() * math.log10(2)) + 1} "
                            f"digits, beyond the range of a float (about 1.8e308)") from None
    return value


def _unknown_key(key, where):
    close = difflib.get_close_matches(key, CONFIG_KEYS, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return UserError(f"unknown config key {key!r} in {where}{hint} (python train.py --help lists all keys)")


def _read_config_file(path):
    why = not_a_file(path)
    if why and os.path.exists(path):  # a directory, a device: there, but not a config file
        raise UserError(f"config file {path} {why}; name a Python file of settings (e.g. config/tiny.py)")
    if why:
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")
        available = sorted(f for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_")) \
            if os.path.isdir(here) else []
        hint = f" (available in config/: {', '.join(available)})" if available else ""
        raise UserError(f"config file {path} does not exist{hint}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # Python runs a file that starts with a byte-order mark
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
        if key in COMMAND_LINE_ONLY and values[key] != getattr(TrainConfig(), key):
            raise UserError(f"config file {path} sets {key} = {values[key]!r}; {COMMAND_LINE_ONLY[key]}: remove the "
                            f"line")
    return values


def _walk_tb(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def print_help(doc):
    """`python train.py --help`: `doc`'s first paragraph, then every key with its default, type and comment."""
    print(doc.split("\n\n")[0])
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
            key = key.replace("-", "_")  # --max-iters=5 reads as --max_iters=5 (every script takes both spellings)
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
    need(not cfg.decay_lr or cfg.min_lr <= cfg.learning_rate,
         f"min_lr ({cfg.min_lr:g}) is above learning_rate ({cfg.learning_rate:g}): the schedule would rise while it "
         f"decays; lower --min_lr (or raise --learning_rate)")
    need(cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables clipping), got {cfg.grad_clip}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0 (a negative one grows the weights), got {cfg.weight_decay}")
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
    if os.path.isdir(cfg.init_from):
        _check_init_dir(cfg.init_from)
    import attention_variants
    attention_variants.load_variant_file(cfg.variants_file)
    attention_variants.get_variant(cfg.attention)
    attention_variants.check_backend(cfg.attn_backend)


def _check_init_dir(directory):
    """init_from a directory: Hugging Face GPT-2 weights, which train.py loads into this repo's GPT."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        hint = (f"; to continue the run there, pass --init_from=resume --out_dir={directory}"
                if os.path.isfile(os.path.join(directory, "ckpt.pt")) else "")
        raise UserError(f"init_from {directory} holds no config.json: not a Hugging Face GPT-2 directory{hint}")
    config = read_json_file(config_path, "model configuration")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "gpt2":
        raise UserError(f"init_from {directory} holds a {model_type!r} model, not GPT-2: train.py trains this repo's "
                        f"GPT and starts only from GPT-2 weights (analyse other models with analyze_outliers.py "
                        f"--pretrained {directory})")


def format_config(cfg, origin):
    lines = ["config:"]
    for key in CONFIG_KEYS:
        where = origin.get(key)
        lines.append(f"  {key:28s} = {getattr(cfg, key)!r}" + (f"   # {where}" if where else ""))
    return "\n".join(lines)
