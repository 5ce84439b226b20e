"""The one place that saves and loads checkpoints and builds models from them (or from OpenAI GPT-2
weights, `load_model`); every script goes through it.

A checkpoint is a dict with at least
    model       the model's state dict
    model_args  the GPTConfig fields (attention variant included)
    iter_num    the training iteration it was written at
    config      the resolved run configuration
and whatever else training needs to resume exactly (optimizer, RNG states, ...). It is written
atomically and read with torch.load(weights_only=True), so that opening an untrusted file can never
run code: a checkpoint may therefore only hold tensors, numbers, strings, None and lists / tuples /
dicts of those.

torch.load does not check the CRC-32 that the zip format stores for every record, so a damaged file
(bit rot, a bad copy) would load silently with wrong weights or optimizer moments; load_checkpoint
checks them all first (zipfile's testzip: about 0.2 s per 500 MB from the page cache) and names the
damaged tensor. Non-finite model weights are refused too: they can only come from a diverged run.
"""

import collections
import contextlib
import math
import os
import pickle
import struct
import zipfile
from dataclasses import asdict

import torch

from attention_variants import REGISTRY
from model import GPT, GPTConfig, config_fields
from runtime.cli import UserError, is_int, is_number, one_line
from runtime.files import atomic_path, not_a_file, write_error

REQUIRED_KEYS = ("model", "model_args", "iter_num", "config")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # what the model computes in (float8: no)
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


def model_args_from(config):
    return asdict(config)


def save_checkpoint(path, checkpoint):
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint is missing {missing}")
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:  # a Python file: a failed write keeps its OSError as the context
                torch.save(checkpoint, f)
        except RuntimeError as e:  # torch reports a failed write as "enforce fail ... unexpected pos"
            cause = e.__context__ or e.__cause__
            if isinstance(cause, OSError):
                raise write_error(path, cause) from None
            raise UserError(f"cannot write {path}: {one_line(e, 200)}") from None


def unwrapped_name(key):
    """A weight's name without torch.compile / DDP wrapper prefixes."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def strip_wrapper_prefixes(state_dict):
    return {unwrapped_name(key): value for key, value in state_dict.items()}


def check_checkpoint_path(path):
    """UserError unless `path` is an existing file (scripts call it early, before any other work)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; pass the checkpoint file inside it (e.g. {os.path.join(path, 'ckpt.pt')})")
    why = not_a_file(path)
    if why:  # a named pipe would block the CRC check's read forever
        raise UserError(f"checkpoint {path} {why}")
    return path


def load_checkpoint(path, map_location="cpu"):
    """Read and validate a checkpoint; every failure is a UserError naming the file and the cause."""
    path = check_checkpoint_path(path)
    check_integrity(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        unsafe = unsafe_globals(path)
        if unsafe:  # the pickle names a callable: loading it could run code
            raise UserError(f"refusing to load {path}: it could run code when unpickled (it names "
                            f"{', '.join(unsafe[:3])}; only tensors and plain containers are allowed)") from None
        raise UserError(f"{path} is not a readable checkpoint: not a torch file, or truncated or corrupt") from None
    except Exception as e:  # torch reports damaged archives as many different exception types
        raise UserError(f"{path} is not a readable checkpoint: truncated or corrupt ({one_line(e, 200) or type(e).__name__})") from None
    return check_checkpoint(ckpt, path)


def check_checkpoint(ckpt, source="checkpoint"):
    """The checks of a checkpoint as data, the same for a file's (load_checkpoint) and for a dict handed to
    model_from_checkpoint: its keys, the weights (dense, supported dtypes, finite, tied ones equal), model_args
    and their agreement with the weights' sizes. Returns a copy whose weight names have no wrapper prefixes."""
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{source} is not an outlier-gpt checkpoint: expected keys {list(REQUIRED_KEYS)}, found {have}")
    _check_state_dict(source, ckpt["model"])
    _check_model_args(source, ckpt["model_args"], ckpt["config"])
    ckpt = {**ckpt, "model": strip_wrapper_prefixes(ckpt["model"])}
    _check_sizes_match(source, ckpt["model_args"], ckpt["model"])
    if not is_int(ckpt["iter_num"]) or ckpt["iter_num"] < 0:
        raise UserError(f"{source}: iter_num is {ckpt['iter_num']!r}, not a count of iterations")
    if not isinstance(ckpt["config"], dict):
        raise UserError(f"{source}: config is a {type(ckpt['config']).__name__}, not a dict")
    check_finite_weights(source, ckpt["model"].items(), "the run had diverged when it was written; use an earlier "
                                                        "checkpoint")
    check_tied(source, ckpt["model"], TIED_WEIGHTS)
    return ckpt


def check_integrity(path):
    """UserError when a record of the checkpoint's zip archive fails its CRC-32 check."""
    if not zipfile.is_zipfile(path):
        return  # not a zip at all: torch.load says what it is
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise UserError(f"{path} is damaged: its zip archive cannot be read ({one_line(e, 150)}); restore it "
                        f"from a copy or use an earlier checkpoint") from None
    if bad is not None:
        raise UserError(f"{path} is damaged: the CRC check fails for {_damaged_part(path, bad)} (zip record "
                        f"{bad}); restore it from a copy or use an earlier checkpoint")


def _damaged_part(path, record):
    """Which tensor of the checkpoint a damaged zip record holds, found by comparing bytes."""
    if record.endswith("data.pkl"):
        return "the pickled structure"
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(record)
        with open(path, "rb") as f:  # the record's bytes as stored (zipfile would refuse them)
            f.seek(info.header_offset)
            header = f.read(30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            stored = f.read(info.compress_size)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # the structure itself is unreadable: the record name is all we can say
        return f"record {record}"
    expected = torch.frombuffer(bytearray(stored), dtype=torch.uint8)
    names = [name for name, t in _tensors(ckpt, "") if t.untyped_storage().nbytes() == len(stored)
             and torch.equal(_storage_bytes(t), expected)]
    if not names:
        return f"record {record}"
    return "the stored bytes of " + ", ".join(names[:2]) + (f" (and {len(names) - 2} more)" if len(names) > 2 else "")


def _storage_bytes(t):
    """The bytes of t's whole storage as a uint8 tensor (a view: compared at memcmp speed)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())


def _tensors(obj, prefix):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}[{k!r}]" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def unsafe_globals(path):
    """The callables ('posix.system', ...) a checkpoint's pickle names that weights_only refuses."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # torch's scanner stops at some protocol 4/5 opcodes: scan them ourselves
        pass
    import pickletools
    try:
        with zipfile.ZipFile(path) as z:
            pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        found, strings = [], []
        for op, arg, _ in pickletools.genops(pkl):
            if op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:
        return []
    allowed = set(torch._weights_only_unpickler._get_allowed_globals())
    return [g for g in found if g not in allowed]


def all_finite(t):
    """No NaN or inf in `t`: its min and max are finite (one pass, no mask: 25x faster than isfinite().all())."""
    t = t.detach()
    if t.dtype.itemsize == 1:  # float8: torch has no aminmax for it
        t = t.float()
    return t.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def check_finite_weights(source, named_weights, why):
    """UserError naming the first of (name, tensor) `named_weights` that holds NaN or inf; `why` says what that
    means for `source` and what to do."""
    bad = [k for k, v in named_weights if isinstance(v, torch.Tensor) and v.is_floating_point()
           and v.device.type != "meta" and not all_finite(v)]
    if bad:
        raise UserError(f"{source}: weight {bad[0]!r}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                        + f" holds NaN or inf: {why}")


def largest_weight(model):
    """The largest magnitude of any of the model's weights (for messages about overflowing forwards)."""
    return max((float(p.detach().abs().max()) for p in model.parameters()
                if p.is_floating_point() and p.numel() and p.device.type != "meta"), default=0.0)


def forward_loss(model, X, Y, autocast=None):
    """The model's mean loss on one batch (inputs X, targets Y; -1: no target), without gradients or RNG use."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast or contextlib.nullcontext():
            return float(model(X, Y)[1])
    finally:
        model.train(was_training)


def overflow_error(source, model, what, dtype=None):
    """The UserError for a forward pass whose `what` (e.g. 'loss nan') is not finite although every weight is."""
    half = dtype == torch.float16
    return UserError(f"{source}: the forward pass overflows ({what}) although every weight is finite; the largest "
                     f"weight magnitude is {largest_weight(model):.3g}: "
                     + ("float16's range (65504) is too small for its activations: use --dtype float32 or bfloat16"
                        if half else "the weights are damaged or not those of a trained model; use another copy"))


CHECK_TOKENS = 64  # the prefix check_forward_finite runs: weights that overflow do so on any tokens


def check_forward_finite(model, X, Y, source, autocast=None, dtype=None):
    """UserError (overflow_error) when the model's loss on the first CHECK_TOKENS of (X, Y) is not finite: said
    before the long work, at a small part of its cost."""
    X, Y = X[:, :CHECK_TOKENS], Y[:, :CHECK_TOKENS]
    loss = forward_loss(model, X, Y, autocast)
    if not math.isfinite(loss):
        raise overflow_error(source, model, f"loss {loss} on the first {X.shape[-1]} tokens", dtype)


# model.GPT ties lm_head to the token embedding: one tensor stored under both names
TIED_WEIGHTS = (("lm_head.weight", "transformer.wte.weight"),)


def check_tied(source, state_dict, pairs):
    """UserError when a pair of weight names that the model ties (one tensor) holds two different tensors:
    loading would keep one of them silently and drop the other."""
    for a, b in pairs:
        x, y = state_dict.get(a), state_dict.get(b)
        if x is None or y is None or x is y:
            continue
        if x.shape != y.shape or not torch.equal(x, y):
            raise UserError(f"{source}: {a} and {b} differ, but the model ties them (one tensor serves both), so "
                            f"loading would silently keep one and drop the other; the weights are inconsistent "
                            f"(edited, or from an untied model): use another copy")


def _check_state_dict(path, state_dict):
    """The model's weights as data: a dict of names to dense tensors that hold their values."""
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: model is a {type(state_dict).__name__}, not a dict of weights")
    for key, value in state_dict.items():
        where = f"{path}: model[{key!r}]"
        if not isinstance(key, str):
            raise UserError(f"{where}: weight names must be strings")
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{where} is a {type(value).__name__}, not a tensor")
        if value.device.type == "meta":
            raise UserError(f"{where} is on the meta device: the checkpoint holds no values for it")
        if value.layout != torch.strided:
            raise UserError(f"{where} is a {value.layout} tensor; checkpoints hold dense weights")
        if not value.is_floating_point():
            raise UserError(f"{where} is a {str(value.dtype)[6:]} tensor; the model's weights are floating point")
        if value.dtype not in WEIGHT_DTYPES:
            raise UserError(f"{where} is a {str(value.dtype)[6:]} tensor; the model's weights are float32, bfloat16, "
                            f"float16 or float64: convert the checkpoint's weights to one of those first")
    twice = sorted(n for n, c in collections.Counter(map(unwrapped_name, state_dict)).items() if c > 1)
    if twice:
        raise UserError(f"{path}: model holds {twice[0]!r} twice (with and without a torch.compile / DDP prefix); "
                        f"the checkpoint is inconsistent: use another copy")


# model_args fields that are sizes (positive integers) and other typed fields; bounds far above any
# trained model, so that a damaged value is refused before anything is allocated
_SIZES = {"block_size": 1 << 24, "vocab_size": 1 << 24, "n_layer": 1 << 12, "n_head": 1 << 12, "n_embd": 1 << 18}


def _check_model_args(path, model_args, config):
    if not isinstance(model_args, dict):
        raise UserError(f"{path}: model_args is a {type(model_args).__name__}, not a dict")
    unknown = set(model_args) - set(config_fields())
    if unknown:
        raise UserError(f"{path}: model_args has unknown fields {sorted(unknown)}")
    for key, value in model_args.items():
        bad = _bad_model_arg(key, value)
        if bad:
            raise UserError(f"{path}: model_args[{key!r}] = {value!r} {bad}")
    attention = model_args.get("attention", "default")
    if attention not in REGISTRY:
        made_by = config.get("variants_file") if isinstance(config, dict) else None
        hint = (f"; its training registered it from {made_by} (variants_file): pass --variants_file {made_by}"
                if made_by else "; a variant registered at run time needs its file (--variants_file)")
        raise UserError(f"{path}: checkpoint uses attention variant {attention!r}, which this repo does not "
                        f"know (known: {', '.join(REGISTRY)}){hint}")
    heads, width = model_args.get("n_head", 12), model_args.get("n_embd", 768)
    if width % heads:
        raise UserError(f"{path}: model_args n_embd {width} is not divisible by n_head {heads}")


def _bad_model_arg(key, value):
    """Why `value` cannot be model_args[key] (None when it can)."""
    if key in _SIZES:
        if not is_int(value):
            return "is not an integer"
        return None if 1 <= value <= _SIZES[key] else f"is outside 1..{_SIZES[key]:,}"
    if key == "dropout":
        ok = is_number(value) and 0 <= value < 1
        return None if ok else "is not a number in [0, 1)"
    if key == "bias":
        return None if isinstance(value, bool) else "is not true or false"
    if key == "sigmoid_bias":
        ok = value is None or (is_number(value) and math.isfinite(value))
        return None if ok else "is not a finite number or None"
    if key in ("attention", "attn_backend", "gelu_approximate"):
        return None if isinstance(value, str) else "is not a string"
    return None


def _check_sizes_match(path, model_args, state_dict):
    """model_args against the weights' own sizes, so that no model is built (or allocated) from sizes the
    weights do not have."""
    wte, wpe = state_dict.get("transformer.wte.weight"), state_dict.get("transformer.wpe.weight")
    implied = {}
    if wte is not None and wte.ndim == 2:
        implied.update(vocab_size=wte.shape[0], n_embd=wte.shape[1])
    if wpe is not None and wpe.ndim == 2:
        implied["block_size"] = wpe.shape[0]
    layers = {int(k.split(".")[2]) for k in state_dict if k.startswith("transformer.h.") and k.split(".")[2].isdigit()}
    if layers:
        implied["n_layer"] = max(layers) + 1
    for key, size in implied.items():
        if key in model_args and model_args[key] != size:
            raise UserError(f"{path}: model_args[{key!r}] = {model_args[key]!r}, but the weights have {key} {size}; "
                            f"the checkpoint is inconsistent: use another copy or an earlier checkpoint")


def load_state_dict_checked(model, state_dict, source="checkpoint"):
    """load_state_dict with errors that name the offending key instead of a torch traceback."""
    state_dict = strip_wrapper_prefixes(state_dict)
    check_state_dict_fits(model.state_dict(), state_dict, source)
    model.load_state_dict(state_dict)


def check_state_dict_fits(expected, state_dict, source="checkpoint"):
    """UserError naming the first weight that is missing, unexpected or of another shape than `expected`'s."""
    state_dict = strip_wrapper_prefixes(state_dict)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise UserError(f"{source}: missing weight {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + "; is it a checkpoint of another attention variant?")
    if unexpected:
        raise UserError(f"{source}: unexpected weight {unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserError(f"{source}: weight {key!r} has shape {tuple(value.shape)} but the model expects "
                            f"{tuple(expected[key].shape)}")


def model_from_checkpoint(path_or_ckpt, device="cpu", **config_overrides):
    """Build the checkpoint's model on `device` in eval mode; returns (model, checkpoint dict)."""
    if isinstance(path_or_ckpt, (str, os.PathLike)):
        source, ckpt = os.fspath(path_or_ckpt), load_checkpoint(path_or_ckpt)
    else:  # a dict (train.py's resume, the API): the same checks as a file's
        source, ckpt = "checkpoint", check_checkpoint(path_or_ckpt)
    try:
        config = GPTConfig(**{**ckpt["model_args"], **config_overrides})
    except TypeError as e:
        raise UserError(f"{source}: bad model configuration ({e})") from None
    with torch.device("meta"):  # names and shapes first: nothing is allocated for a model the weights do not fit
        check_state_dict_fits(GPT(config).state_dict(), ckpt["model"], source)
    model = GPT(config)
    model.load_state_dict(ckpt["model"])  # its names and shapes are checked above
    return model.to(device).eval(), ckpt


def looks_like_a_path(name):
    """Whether a --pretrained value can only be a local path: a hub name is NAME or ORG/NAME."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def load_model(path=None, pretrained=None, device="cpu", **overrides):
    """A model in eval mode on `device`, from exactly one of a checkpoint of this repo (`path`: a file or
    an already loaded checkpoint dict) or pretrained weights (`pretrained`): OpenAI GPT-2 (gpt2,
    gpt2-medium, ... or a local Hugging Face GPT-2 directory) into model.GPT, any other Hugging Face causal
    LM that hf_models supports (a hub name or a save_pretrained directory) as an hf_models.HFCausalLM.
    Returns (model, checkpoint dict, or None for pretrained weights).

    `overrides`: GPTConfig fields; for pretrained weights `attention` (the variant to load them into),
    `dropout`, `attn_backend` and `sigmoid_bias`.
    """
    if (path is None) == (pretrained is None):
        raise ValueError("give exactly one of path and pretrained")
    if path is not None:
        return model_from_checkpoint(path, device=device, **overrides)
    if not os.path.isdir(pretrained) and looks_like_a_path(pretrained):
        raise UserError(f"--pretrained {pretrained}: no such directory (a Hugging Face hub name is ORG/NAME)")
    if not os.path.isdir(pretrained):
        from runtime.token_data import offline_unless_hub_reachable
        offline_unless_hub_reachable()  # offline, fail now instead of after the hub client's retries
    from hf import models as hf_models
    if not hf_models.is_gpt2(pretrained):  # LLaMA, Mistral, Qwen, Phi, OPT, Falcon, GPT-NeoX: transformers
        return hf_models.load_hf_causal_lm(pretrained, device=device), None
    try:
        model = GPT.from_pretrained(pretrained, **overrides)
    except UserError:
        raise
    except Exception as e:  # network / cache / format trouble deep inside the hub client
        if os.path.isdir(pretrained):  # a local directory needs neither: its files are the trouble
            raise UserError(f"cannot read the GPT-2 model in {pretrained} ({type(e).__name__}: {one_line(e, 200)}); "
                            f"its files are damaged or incomplete: restore them, or save the model again") from None
        raise UserError(f"cannot load pretrained {pretrained!r} ({type(e).__name__}: {one_line(e, 200)}); "
                        f"it needs network or a Hugging Face cache") from None
    return model.to(device).eval(), None
