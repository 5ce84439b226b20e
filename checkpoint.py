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
"""

import os
import pickle
from dataclasses import asdict

import torch

from attention_variants import VARIANTS
from common import UserError, atomic_path, one_line
from model import GPT, GPTConfig, config_fields

REQUIRED_KEYS = ("model", "model_args", "iter_num", "config")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


def model_args_from(config):
    return asdict(config)


def save_checkpoint(path, checkpoint):
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint is missing {missing}")
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def strip_wrapper_prefixes(state_dict):
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def check_checkpoint_path(path):
    """UserError unless `path` is an existing file (scripts call it early, before any other work)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; pass the checkpoint file inside it (e.g. {os.path.join(path, 'ckpt.pt')})")
    return path


def load_checkpoint(path, map_location="cpu"):
    """Read and validate a checkpoint; every failure is a UserError naming the file and the cause."""
    path = check_checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # the pickle names a callable: loading it could run code
            raise UserError(f"refusing to load {path}: it contains Python objects that could run code when "
                            f"unpickled (only tensors and plain containers are allowed)") from None
        raise UserError(f"{path} is not a readable checkpoint: not a torch file, or truncated or corrupt") from None
    except Exception as e:  # torch reports damaged archives as many different exception types
        raise UserError(f"{path} is not a readable checkpoint: truncated or corrupt ({one_line(e, 200) or type(e).__name__})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        have = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not an outlier-gpt checkpoint: expected keys {list(REQUIRED_KEYS)}, found {have}")
    _check_model_args(path, ckpt["model_args"])
    ckpt["model"] = strip_wrapper_prefixes(ckpt["model"])
    return ckpt


def _check_model_args(path, model_args):
    if not isinstance(model_args, dict):
        raise UserError(f"{path}: model_args is a {type(model_args).__name__}, not a dict")
    unknown = set(model_args) - set(config_fields())
    if unknown:
        raise UserError(f"{path}: model_args has unknown fields {sorted(unknown)}")
    attention = model_args.get("attention", "default")
    if attention not in VARIANTS:
        raise UserError(f"{path}: checkpoint uses attention variant {attention!r}, which this repo does not "
                        f"know (known: {', '.join(VARIANTS)})")


def load_state_dict_checked(model, state_dict, source="checkpoint"):
    """load_state_dict with errors that name the offending key instead of a torch traceback."""
    expected = model.state_dict()
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
    model.load_state_dict(state_dict)


def model_from_checkpoint(path_or_ckpt, device="cpu", **config_overrides):
    """Build the checkpoint's model on `device` in eval mode; returns (model, checkpoint dict)."""
    ckpt = load_checkpoint(path_or_ckpt) if isinstance(path_or_ckpt, (str, os.PathLike)) else path_or_ckpt
    source = os.fspath(path_or_ckpt) if isinstance(path_or_ckpt, (str, os.PathLike)) else "checkpoint"
    try:
        config = GPTConfig(**{**ckpt["model_args"], **config_overrides})
    except TypeError as e:
        raise UserError(f"{source}: bad model configuration ({e})") from None
    model = GPT(config)
    load_state_dict_checked(model, ckpt["model"], source)
    return model.to(device).eval(), ckpt


def load_model(path=None, pretrained=None, device="cpu", **overrides):
    """A model in eval mode on `device`, from exactly one of a checkpoint of this repo (`path`: a file or
    an already loaded checkpoint dict) or OpenAI GPT-2 weights (`pretrained`: gpt2, gpt2-medium, ... or a
    local Hugging Face GPT-2 directory). Returns (model, checkpoint dict, or None for pretrained weights).

    `overrides`: GPTConfig fields; for pretrained weights `attention` (the variant to load them into),
    `dropout`, `attn_backend` and `sigmoid_bias`.
    """
    if (path is None) == (pretrained is None):
        raise ValueError("give exactly one of path and pretrained")
    if path is not None:
        return model_from_checkpoint(path, device=device, **overrides)
    try:
        model = GPT.from_pretrained(pretrained, **overrides)
    except UserError:
        raise
    except Exception as e:  # network / cache / format trouble deep inside the hub client
        raise UserError(f"cannot load pretrained {pretrained!r} ({type(e).__name__}: {one_line(e, 200)}); "
                        f"it needs network or a Hugging Face cache") from None
    return model.to(device).eval(), None
