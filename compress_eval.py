"""Perplexity of checkpoints before and after compression: the paper's Table 3 as a command.

    python compress_eval.py out/default/ckpt.pt out/scaling/ckpt.pt            # WikiText-2 test (raw)
    python compress_eval.py CKPT --data data/builtin/val.bin --methods fp,w8,sparse50,w8a8,wanda

Methods (each applied to a fresh copy of the model; the checkpoint file is only read):
    fp        the model as trained (bf16/fp16 autocast on GPU, float32 on CPU)
    w8        symmetric AbsMax 8-bit weights (scale = max|W| / 127, round to nearest, clamp to
              [-127, 127]) for every nn.Linear in the transformer blocks (the variant's scale_proj
              included); --w8_granularity tensor (default) | channel (per output row) | group:G
    sparse50  unstructured magnitude pruning of the same Linears (--sparsity, default 0.5), per layer
              or --prune_scope global
    w8a8      w8 plus per-tensor dynamic AbsMax 8-bit quantization of every such Linear's input
              (one scale per window's activation tensor, so results do not depend on batching)
    wanda     Wanda pruning (score |W| * ||X||, the L2 norm of each input feature over calibration
              tokens drawn from a training split; --sparsity per output row), layer by layer
Embeddings and the (tied) lm_head are kept unless --quantize_head (w8, w8a8 only).
Writes DIR/results.md (the table), DIR/results.json and DIR/results.csv atomically.
"""

import argparse
import copy
import csv
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from common import (ArgumentParser, UserError, autocast_context, check_fits, check_output_dir, check_seed, cli_main,
                    json_text, output_set, resolve_device, resolve_dtype, run_metadata)
from data import WIKITEXT2, input_tokens, read_text_file
from perplexity import evaluate_perplexity, load_eval_tokens, make_windows, text_ids, wikitext2_text
import reports

METHODS = ("fp", "w8", "sparse50", "w8a8", "wanda")
DEFAULT_METHODS = "fp,w8,sparse50"
QMAX = 127  # symmetric 8-bit: levels -127..127 (255 of them)
DTYPE_LABELS = {torch.float32: "FP32", torch.bfloat16: "BF16", torch.float16: "FP16"}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def table_dtype(name, device):
    """--dtype -> torch dtype. 'auto' is float16 on GPU, because Table 3 reports "PPL (FP16)", and
    float32 on CPU (where half-precision autocast would only be slower)."""
    if name in (None, "auto"):
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return resolve_dtype(name, device)
GPT2_VOCAB = 50257  # vocabularies at least this large are GPT-2's BPE (possibly padded)


# ----------------------------------------------------------------------------------------------
# quantization and pruning on tensors

def parse_granularity(spec):
    """'tensor' | 'channel' | 'group:G' -> (kind, group_size or None)."""
    if spec in ("tensor", "channel"):
        return spec, None
    if isinstance(spec, str) and spec.startswith("group:"):
        try:
            g = int(spec.split(":", 1)[1])
        except ValueError:
            g = 0
        if g >= 1:
            return "group", g
    raise UserError(f"unknown --w8_granularity {spec!r}; use tensor, channel or group:G (G a positive integer, e.g. group:128)")


def absmax_scale(w, granularity="tensor"):
    """AbsMax scale of a 2-D weight (out, in), broadcastable against the view used by absmax_quantize."""
    kind, g = parse_granularity(granularity)
    a = w.detach().float().abs()
    if kind == "tensor":
        amax = a.amax()
    elif kind == "channel":
        amax = a.amax(dim=1, keepdim=True)  # (out, 1): one scale per output row
    else:
        amax = _grouped(a, g).amax(dim=-1, keepdim=True)  # (out, n_groups, 1)
    return amax / QMAX


def _grouped(w, g):
    """(out, in) -> (out, ceil(in / g), g), zero-padding the last group (zeros change no max)."""
    out_f, in_f = w.shape
    pad = (-in_f) % g
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_f, -1, g)


def absmax_quantize(w, granularity="tensor"):
    """Fake-quantize a 2-D weight to symmetric 8-bit AbsMax levels; returns (dequantized float32 weight, scale).

    q = clamp(round(w / scale), -127, 127), w_hat = q * scale; an all-zero slice keeps scale 0 and stays 0.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    kind, g = parse_granularity(granularity)
    scale = absmax_scale(w, granularity)
    wf = w.detach().float()
    view = _grouped(wf, g) if kind == "group" else wf
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(view / safe).clamp_(-QMAX, QMAX)
    w_hat = q * scale
    if kind == "group":
        w_hat = w_hat.reshape(w.shape[0], -1)[:, :w.shape[1]]
    return w_hat, scale


def fake_quantize_activation(x):
    """Dynamic symmetric 8-bit AbsMax quantization with one scale per leading (batch) element."""
    xf = x.float()
    dims = tuple(range(1, x.ndim)) if x.ndim > 1 else (0,)
    scale = xf.abs().amax(dim=dims, keepdim=True) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(xf / safe).clamp_(-QMAX, QMAX) * scale).to(x.dtype)


def n_pruned(n, sparsity):
    """How many of n weights a sparsity fraction removes."""
    return int(round(n * sparsity))


def smallest_k_mask(scores, k):
    """Boolean mask (shape of scores) marking exactly k smallest entries; ties broken by flat index order."""
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return mask.view(scores.shape)
    if k >= flat.numel():
        return ~mask.view(scores.shape)
    threshold = flat.kthvalue(k).values
    mask |= flat < threshold
    need = k - int(mask.sum())
    if need > 0:
        ties = (flat == threshold).nonzero().squeeze(1)[:need]
        mask[ties] = True
    return mask.view(scores.shape)


def magnitude_masks(weights, sparsity, scope="layer"):
    """Masks of the weights unstructured magnitude pruning removes: exactly round(sparsity * n) smallest |w|
    in each tensor (scope 'layer') or over all of them together (scope 'global')."""
    if scope == "layer":
        return [smallest_k_mask(w.detach().abs(), n_pruned(w.numel(), sparsity)) for w in weights]
    if scope != "global":
        raise UserError(f"unknown --prune_scope {scope!r}; use layer or global")
    flat = torch.cat([w.detach().abs().float().reshape(-1) for w in weights])
    mask = smallest_k_mask(flat, n_pruned(flat.numel(), sparsity))
    out, i = [], 0
    for w in weights:
        out.append(mask[i:i + w.numel()].view(w.shape))
        i += w.numel()
    return out


def wanda_mask(weight, feature_norm, sparsity):
    """Wanda: score_ij = |W_ij| * ||X_j||; in every output row remove the round(sparsity * in) lowest scores."""
    score = weight.detach().float().abs() * feature_norm.float()[None, :]
    k = n_pruned(weight.shape[1], sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, idx, True)
    return mask


# ----------------------------------------------------------------------------------------------
# applying them to a model

def block_linears(model):
    """(name, module) of every Linear inside the decoder blocks: c_attn, c_proj, c_fc and the variant's own
    (scale_proj) for this repo's GPT; q/k/v/o, up/gate/down (FalconLinear included, GPT-2's Conv1D too)
    for Hugging Face models. hf_models.weight_of gives each one's weight in (out, in) layout."""
    from hf_models import is_linear, model_view
    view = model_view(model)
    return [(f"{view.family.blocks}.{l}.{name}", m) for l, block in enumerate(view.blocks)
            for name, m in block.named_modules() if is_linear(m)]


def head_is_tied(model):
    """Whether lm_head shares its weight with the token embedding: quantizing the head changes both."""
    emb = model.hf.get_input_embeddings() if hasattr(model, "hf") else model.transformer.wte
    return model.lm_head.weight is emb.weight


@torch.no_grad()
def quantize_weights_(model, granularity="tensor", include_head=False):
    from hf_models import weight_of
    targets = block_linears(model) + ([("lm_head", model.lm_head)] if include_head else [])
    for _, lin in targets:
        w = weight_of(lin)
        w_hat, _ = absmax_quantize(w, granularity)
        w.copy_(w_hat.to(w.dtype))
    return [name for name, _ in targets]


def add_activation_quantization(model, include_head=False):
    """Fake-quantize the input of every block Linear (and of lm_head with include_head) on each forward."""
    windows = {}

    def quantize(module, args):
        x = args[0]
        if x.ndim == 2 and windows:  # OPT's MLP flattens (B, T, C) to (B*T, C): still one scale per window
            return (fake_quantize_activation(x.view(windows["B"], -1, x.shape[-1])).view(x.shape),) + tuple(args[1:])
        return (fake_quantize_activation(x),) + tuple(args[1:])

    handles = [lin.register_forward_pre_hook(quantize) for _, lin in block_linears(model)]
    if hasattr(model, "hf"):  # the first block's input is (B, T, C) in every family
        from hf_models import model_view

        def count_windows(module, args, kwargs):
            windows["B"] = (args[0] if args else kwargs["hidden_states"]).shape[0]
        handles.append(model_view(model).blocks[0].register_forward_pre_hook(count_windows, with_kwargs=True))
    if include_head and hasattr(model, "hf"):  # lm_head's input is the backbone's last hidden state
        def quantize_last_hidden(module, args, out):
            out.last_hidden_state = fake_quantize_activation(out.last_hidden_state)
            return out
        handles.append(model.hf.base_model.register_forward_hook(quantize_last_hidden))
    elif include_head:  # lm_head's input is ln_f's output (and it is called on row chunks by the evaluator)
        handles.append(model.transformer.ln_f.register_forward_hook(lambda m, args, out: fake_quantize_activation(out)))
    return handles


@torch.no_grad()
def prune_magnitude_(model, sparsity=0.5, scope="layer"):
    from hf_models import weight_of
    weights = [weight_of(lin) for _, lin in block_linears(model)]
    for w, mask in zip(weights, magnitude_masks(weights, sparsity, scope)):
        w.masked_fill_(mask, 0.0)


class _StopForward(Exception):
    pass


@torch.no_grad()
def prune_wanda_(model, calib, sparsity=0.5, dtype=None, batch_size=8):
    """Wanda, block by block as in its reference code: the input-feature norms of a block's Linears come
    from the calibration activations that reach it through the already pruned blocks before it."""
    if hasattr(model, "hf"):
        return _prune_wanda_forwards_(model, calib, sparsity, dtype, batch_size)
    device = next(model.parameters()).device
    blocks = model.transformer.h
    inps = []

    def grab(module, args):
        inps.append(args[0])
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab)
    try:
        _forwards_until_stopped(model, calib, batch_size, device, dtype)
    finally:
        handle.remove()
    for block in blocks:
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        sumsq = {n: torch.zeros(m.in_features, dtype=torch.float64, device=device) for n, m in linears}

        handles = [m.register_forward_pre_hook(_sumsq_hook(sumsq, n)) for n, m in linears]
        try:
            with autocast_context(device, dtype):
                for x in inps:
                    block(x)
        finally:
            for h in handles:
                h.remove()
        for n, m in linears:
            m.weight.masked_fill_(wanda_mask(m.weight, sumsq[n].sqrt(), sparsity), 0.0)
        with autocast_context(device, dtype):
            inps = [block(x) for x in inps]


def _forwards_until_stopped(model, calib, batch_size, device, dtype):
    """Forward the calibration windows in batches; a hook raising _StopForward ends each forward early."""
    with autocast_context(device, dtype):
        for i in range(0, calib.shape[0], batch_size):
            try:
                model(calib[i:i + batch_size].to(device))
            except _StopForward:
                pass


def _sumsq_hook(sumsq, name):
    """A forward pre-hook adding the squared input features of a Linear into sumsq[name] (float64)."""
    def hook(module, args):
        x = args[0].float()
        sumsq[name] += x.pow(2).reshape(-1, x.shape[-1]).sum(0, dtype=torch.float64)
    return hook


@torch.no_grad()
def _prune_wanda_forwards_(model, calib, sparsity, dtype, batch_size):
    """Wanda for Hugging Face models, whose blocks need the backbone's masks and position embeddings:
    block l's input-feature norms come from forwards of the whole model (its blocks before l already
    pruned) that stop after block l, so the activations are the same as in the block-by-block form."""
    from hf_models import in_features, is_linear, model_view, weight_of
    view = model_view(model)
    device = next(model.parameters()).device
    for block in view.blocks:
        linears = [(n, m) for n, m in block.named_modules() if is_linear(m)]
        sumsq = {n: torch.zeros(in_features(m), dtype=torch.float64, device=device) for n, m in linears}

        def stop(module, args, output):
            raise _StopForward

        handles = [m.register_forward_pre_hook(_sumsq_hook(sumsq, n)) for n, m in linears]
        handles.append(block.register_forward_hook(stop))
        try:
            _forwards_until_stopped(model, calib, batch_size, device, dtype)
        finally:
            for h in handles:
                h.remove()
        for n, m in linears:
            w = weight_of(m)
            w.masked_fill_(wanda_mask(w, sumsq[n].sqrt(), sparsity), 0.0)


# the longest default window: the usual 2,048 of LLM perplexity tables, so that models whose
# max_position_embeddings is 32k-128k are not evaluated on a handful of huge windows
MAX_DEFAULT_WINDOW = 2048


def window_length(args, source):
    """--block_size, else the model's block size up to MAX_DEFAULT_WINDOW."""
    return args.block_size or min(source.block_size, MAX_DEFAULT_WINDOW)


def calibration_windows(tokens, n_windows, block_size, seed=0):
    """(n_windows, block_size) int64 windows at random (seeded) offsets of a calibration token stream."""
    n = len(tokens)  # a memory-mapped token file is only read where the windows are
    if n < block_size:
        raise UserError(f"the calibration data has {n} tokens, fewer than one window of {block_size}")
    starts = np.random.default_rng(seed).integers(0, n - block_size + 1, size=n_windows)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + block_size], dtype=np.int64) for s in starts]))


# ----------------------------------------------------------------------------------------------
# what to evaluate

@dataclass
class Source:
    checkpoint: str          # file path, or 'pretrained:NAME'
    attention: str
    iter_num: object
    vocab_size: int
    block_size: int
    pretrained: str = None
    model: object = None     # kept only for --pretrained (built once, on CPU)
    name: str = ""
    results: dict = field(default_factory=dict)


def load_sources(paths, pretrained, attn_backend):
    from checkpoint import load_checkpoint, load_model
    sources = []
    for path in paths:
        ckpt = load_checkpoint(path)
        args = ckpt["model_args"]
        sources.append(Source(checkpoint=path, attention=args.get("attention", "default"), iter_num=ckpt.get("iter_num"),
                              vocab_size=int(args.get("vocab_size", 50304)), block_size=int(args.get("block_size", 1024))))
        del ckpt
    for name in pretrained:
        model, _ = load_model(pretrained=name, device="cpu", attn_backend=attn_backend)
        sources.append(Source(checkpoint=f"pretrained:{name}", attention=model.config.attention, iter_num=None,
                              vocab_size=model.config.vocab_size, block_size=model.config.block_size,
                              pretrained=name, model=model))
    names = [f"{s.pretrained} (pretrained)" if s.pretrained else f"{s.attention} @ iter {s.iter_num}" for s in sources]
    for s, n in zip(sources, names):
        s.name = n if names.count(n) == 1 else f"{n} [{s.checkpoint}]"
    return sources


def check_vocabularies(sources):
    """All rows of one table must share a vocabulary (GPT-2's BPE, padded or not, counts as one)."""
    def family(v):
        return "gpt2" if v >= GPT2_VOCAB else v
    first = sources[0]
    for s in sources[1:]:
        if family(s.vocab_size) != family(first.vocab_size):
            raise UserError(f"{first.checkpoint} (vocabulary {first.vocab_size}) and {s.checkpoint} (vocabulary "
                            f"{s.vocab_size}) have different vocabularies, so their perplexities are not comparable; "
                            f"evaluate them in separate tables")


def build_model(source, device, attn_backend):
    if source.model is not None:
        return copy.deepcopy(source.model).to(device).eval()
    from checkpoint import load_model
    model, _ = load_model(source.checkpoint, device=device, attn_backend=attn_backend)
    return model


# ----------------------------------------------------------------------------------------------
# table

def method_header(method, args, dtype):
    pct = f"{args.sparsity * 100:g}%"
    if method == "fp":
        return f"PPL ({DTYPE_LABELS[dtype]})"
    if method in ("w8", "w8a8"):
        kind, g = parse_granularity(args.w8_granularity)
        detail = {"tensor": "", "channel": ", per-channel", "group": f", group {g}"}[kind]
        head = ", +head" if args.quantize_head else ""
        return f"PPL (AbsMax {'W8' if method == 'w8' else 'W8A8'}{detail}{head})"
    if method == "sparse50":
        return f"PPL ({pct} Sparse{', global' if args.prune_scope == 'global' else ''})"
    if method == "wanda":
        return f"PPL (Wanda {pct})"
    raise ValueError(method)


SHORT = {"w8": "W8", "sparse50": "Sparse", "w8a8": "W8A8", "wanda": "Wanda"}


def fmt_ppl(x):
    if x is None or not math.isfinite(x):
        return "inf" if x == math.inf else "nan"
    return f"{x:.2f}"


def fmt_change(x, ref):
    if x is None or ref is None or not (math.isfinite(x) and math.isfinite(ref)) or ref <= 0:
        return "n/a"
    return f"{(x / ref - 1) * 100:+.1f}%"


def markdown_table(rows, methods, headers):
    cols = ["Model"] + [headers[m] for m in methods]
    degr = [m for m in methods if m != "fp"] if "fp" in methods else []
    cols += [f"Δ {SHORT[m]}" for m in degr]
    cells = [[r["name"]] + [fmt_ppl(r["ppl"][m]) for m in methods] + [fmt_change(r["ppl"][m], r["ppl"]["fp"]) for m in degr]
             for r in rows]
    return reports.markdown_table(cols, cells, align="l" + "r" * (len(cols) - 1)) + "\n"


def csv_text(rows, methods):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "checkpoint", "attention", "iter_num", "dtype"] + [f"ppl_{m}" for m in methods])
    for r in rows:
        w.writerow([r["name"], r["checkpoint"], r["attention"], r["iter_num"], r["dtype"]]
                   + ["" if r["ppl"][m] is None else repr(r["ppl"][m]) for m in methods])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# CLI

def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n", 1)[1])
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="checkpoint files (one table row each)")
    p.add_argument("--pretrained", action="append", default=[], metavar="NAME",
                   help="also evaluate pretrained weights: OpenAI GPT-2 (gpt2, gpt2-medium, ...) or any supported Hugging Face "
                        "causal LM (hub name ORG/NAME or save_pretrained directory: LLaMA, Mistral, Qwen2/3, Phi-2/3, OPT, "
                        "Falcon, GPT-NeoX); repeatable")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=["wikitext2"], default=None,
                     help="WikiText-2 raw through Hugging Face datasets (default when no --text_file/--data)")
    src.add_argument("--text_file", help="evaluate on a local UTF-8 text file (GPT-2 BPE)")
    src.add_argument("--data", help="evaluate on a prepared uint16 token file (.bin)")
    p.add_argument("--split", default="test", choices=["test", "validation"], help="WikiText-2 split (default test)")
    p.add_argument("--max_tokens", type=int, default=None, help="evaluate only the first N tokens (quick runs)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of {', '.join(METHODS)} (default {DEFAULT_METHODS})")
    p.add_argument("--w8_granularity", default="tensor", help="tensor (default) | channel | group:G")
    p.add_argument("--quantize_head", action="store_true", help="w8/w8a8 also quantize the tied embedding / lm_head")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights pruned (sparse50, wanda)")
    p.add_argument("--prune_scope", default="layer", choices=["layer", "global"], help="magnitude pruning per layer or global")
    p.add_argument("--calib_data", help="wanda calibration tokens (.bin); default: the WikiText-2 train split, "
                                        "or train.bin beside --data")
    p.add_argument("--calib_text_file", help="wanda calibration text file")
    p.add_argument("--calib_windows", type=int, default=32, help="wanda calibration windows of one block each (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing calibration windows")
    p.add_argument("--block_size", type=int, default=None, help=f"window length (default: each model's block size, at most {MAX_DEFAULT_WINDOW})")
    p.add_argument("--stride", type=int, default=None, help="sliding windows scoring the last STRIDE tokens of each")
    p.add_argument("--batch_size", type=int, default=None, help="windows per forward (default: 16 on GPU, 2 on CPU at T=1024)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (float16 on GPU, the paper's Table 3 'PPL (FP16)'; float32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--attn_backend", default="auto", help="attention backend for every model (default auto)")
    p.add_argument("--out", default=os.path.join("out", "compress"), help="output directory (default out/compress)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def parse_methods(spec):
    methods = []
    for m in (x.strip() for x in spec.split(",")):
        if not m:
            continue
        if m not in METHODS:
            raise UserError(f"unknown method {m!r} in --methods; choose from {', '.join(METHODS)}")
        if m not in methods:
            methods.append(m)
    if not methods:
        raise UserError(f"--methods is empty; choose from {', '.join(METHODS)}")
    return methods


def validate_args(args):
    methods = parse_methods(args.methods)
    parse_granularity(args.w8_granularity)
    if not 0.0 <= args.sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    for name in ("batch_size", "block_size", "calib_windows", "max_tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be a positive integer, got {v}")
    if args.stride is not None and args.stride < 1:
        raise UserError(f"--stride must be a positive integer, got {args.stride}")
    if args.calib_data and args.calib_text_file:
        raise UserError("give at most one of --calib_data and --calib_text_file")
    if not args.checkpoints and not args.pretrained:
        raise UserError("no checkpoints given: pass one or more checkpoint files (train.py writes OUT_DIR/ckpt.pt, "
                        "e.g. out/demo/ckpt.pt for config/tiny.py) or --pretrained gpt2")
    models = [os.path.realpath(c) for c in args.checkpoints] + [f"pretrained:{n}" for n in args.pretrained]
    twice = next((m for i, m in enumerate(models) if m in models[:i]), None)
    if twice:  # two rows of one model, labelled alike
        raise UserError(f"{twice} is given twice; each row of the table is a different model")
    check_seed(args.seed)
    check_output_dir(args.out, TOOL, RESULT_FILES, inputs=input_paths(args))  # now, not after every evaluation
    return methods


TOOL, RESULT_FILES = "compress_eval.py", ("results.md", "results.json", "results.csv")


def input_paths(args):
    return [*args.checkpoints, args.text_file, args.data, args.calib_data, args.calib_text_file]


def check_calibration(calib, n_windows, sources, args):
    """Wanda's calibration draw, checked before the first method runs: enough tokens for one window of every
    model, no more windows than distinct ones, and memory for them."""
    for s in sources:
        T = window_length(args, s)
        if len(calib) < T:
            raise UserError(f"the calibration data has {len(calib)} tokens, fewer than one window of {T}")
        distinct = len(calib) - T + 1
        if n_windows > distinct:
            raise UserError(f"--calib_windows {n_windows:,} is more than the {distinct:,} distinct windows of {T} "
                            f"tokens in the calibration data; use --calib_windows {distinct:,} or less")
        check_fits(n_windows * T * 8, "cpu", f"--calib_windows {n_windows:,} x {T} tokens", "lower --calib_windows")


def text_encoder(sources, needed):
    """The tokenizer text goes through: GPT-2 BPE (None) for this repo's models, a Hugging Face model's
    own tokenizer for Hugging Face models; one table cannot mix them on text input."""
    hf = [s for s in sources if hasattr(s.model, "hf")]
    if not needed or not hf:
        return None
    if len(hf) < len(sources):
        raise UserError("text input is tokenized with each model's own tokenizer, and this table mixes GPT-2 BPE models "
                        "with Hugging Face models of another tokenizer; evaluate them in separate tables or pass --data")
    from hf_models import load_tokenizer
    vocabs = [load_tokenizer(s.model).get_vocab() for s in hf]
    if any(v != vocabs[0] for v in vocabs[1:]):
        raise UserError(f"{hf[0].checkpoint} and another model have different tokenizers, so one text cannot be scored "
                        f"for both; evaluate them in separate tables or pass --data")
    from hf_models import tokenization
    return tokenization(hf[0].model, required=True)[0]


def calibration_tokens(args, encode=None):
    """(tokens, description) for wanda: never the evaluation text. Token files stay memory-mapped."""
    if args.calib_data:
        return input_tokens(data=args.calib_data), f"tokens {args.calib_data}"
    if args.calib_text_file:
        return text_ids(read_text_file(args.calib_text_file), encode), f"text {args.calib_text_file}"
    if args.data:
        sibling = os.path.join(os.path.dirname(os.path.abspath(args.data)), "train.bin")
        if os.path.basename(args.data) != "train.bin" and os.path.isfile(sibling):
            return input_tokens(data=sibling), f"tokens {sibling}"
        raise UserError(f"wanda needs calibration data from a training split and there is no train.bin beside {args.data}; "
                        f"pass --calib_data TRAIN.bin or --calib_text_file FILE")
    if args.text_file:
        raise UserError("wanda needs calibration data from a training split, not the evaluation text; "
                        "pass --calib_data TRAIN.bin or --calib_text_file FILE")
    text = wikitext2_text("train", instead="pass --calib_data TRAIN.bin or --calib_text_file FILE")
    return text_ids(text, encode), f"wikitext2 ({WIKITEXT2[1]}, train)"


def main(argv=None):
    args = parse_args(argv)
    methods = validate_args(args)
    device = resolve_device(args.device)
    dtype = table_dtype(args.dtype, device)
    from attention_variants import check_backend
    check_backend(args.attn_backend)
    inputs = load_inputs(args, methods)  # everything that can be wrong with the input, before any evaluation
    settings = {"w8_granularity": args.w8_granularity, "quantize_head": args.quantize_head, "sparsity": args.sparsity,
                "prune_scope": args.prune_scope, "calibration": inputs.calib_desc,
                "calib_windows": args.calib_windows if inputs.calib is not None else None,
                "seed": args.seed if inputs.calib is not None else None}
    print(f"evaluating {len(inputs.sources)} model(s) x {len(methods)} method(s) on {inputs.data_desc} "
          f"({inputs.tokens.size:,} tokens), device {device}, dtype {DTYPE_NAMES[dtype]}", file=sys.stderr)
    metadata = run_metadata(device)
    rows = [evaluate_source(s, methods, inputs, args, device, dtype, settings, metadata) for s in inputs.sources]
    table = markdown_table(rows, methods, {m: method_header(m, args, dtype) for m in methods})
    print(table, end="")
    with output_set(args.out, TOOL, RESULT_FILES, inputs=input_paths(args)) as tmp:
        for name, text in (("results.md", table + "\n" + table_notes(rows, inputs, args, device, dtype)),
                           ("results.json", json_text(rows)), ("results.csv", csv_text(rows, methods))):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
    print(f"wrote {os.path.join(args.out, 'results.md')}, results.json, results.csv", file=sys.stderr)
    return 0


@dataclass
class Inputs:
    """What every row of the table is evaluated on (and wanda calibrated on)."""
    sources: list
    tokens: np.ndarray
    data_desc: str
    calib: object = None                 # wanda's calibration tokens (a token array), or None
    calib_desc: str = None


def load_inputs(args, methods):
    """The models and the evaluation / calibration tokens, each checked against every model."""
    sources = load_sources(args.checkpoints, args.pretrained, args.attn_backend)
    check_vocabularies(sources)
    if args.data is None and args.text_file is None and args.dataset is None:
        args.dataset = "wikitext2"
    encode = text_encoder(sources, needed=args.data is None or (args.calib_text_file is not None))
    tokens, data_desc = load_eval_tokens(args.dataset, args.text_file, args.data, split=args.split, encode=encode)
    if args.max_tokens:
        tokens = tokens[:args.max_tokens]
        data_desc += f", first {tokens.size} tokens"
    for s in sources:
        T = window_length(args, s)
        if T > s.block_size:
            raise UserError(f"--block_size {T} exceeds the block size {s.block_size} of {s.checkpoint}")
        make_windows(tokens.size, T, args.stride)
        if tokens.size and int(tokens.max()) >= s.vocab_size:
            raise UserError(f"the evaluation tokens go up to id {int(tokens.max())} but {s.checkpoint} has a vocabulary "
                            f"of {s.vocab_size}; evaluate with data tokenized for this model")
    calib, calib_desc = (calibration_tokens(args, encode) if "wanda" in methods else (None, None))
    if calib is not None and calib.size and int(calib.max()) >= min(s.vocab_size for s in sources):
        raise UserError(f"the calibration tokens go up to id {int(calib.max())}, beyond the models' vocabulary")
    if calib is not None:
        check_calibration(calib, args.calib_windows, sources, args)
    return Inputs(sources, tokens, data_desc, calib, calib_desc)


def evaluate_source(s, methods, inputs, args, device, dtype, settings, metadata):
    """One row of the table: the model's perplexity under every method (each on its own copy)."""
    base = build_model(s, device, args.attn_backend)
    T = window_length(args, s)
    check_forward(base, inputs.tokens, T, s, device, dtype)
    row = {"name": s.name, "checkpoint": s.checkpoint, "attention": s.attention, "iter_num": s.iter_num,
           "dtype": DTYPE_NAMES[dtype], "device": str(device), "ppl": {}, "nll": {}, "seconds": {},
           "eval": None, "settings": settings, "metadata": metadata, "head_tied": head_is_tied(base)}
    for m in methods:
        t0 = time.perf_counter()
        model = base if m == "fp" else copy.deepcopy(base)
        compress_(model, m, args, inputs.calib, T, dtype)
        res = evaluate_perplexity(model, inputs.tokens, block_size=T, stride=args.stride, batch_size=args.batch_size,
                                  dtype=dtype, progress=not args.no_progress, desc=f"{s.name} [{m}]")
        del model
        if m == "fp" and not math.isfinite(res.nll):  # the model itself overflowed: no table of NaN
            from checkpoint import overflow_error
            raise overflow_error(s.checkpoint, base, f"mean loss {res.nll} over {res.n_tokens:,} tokens", dtype)
        row["ppl"][m] = res.ppl if math.isfinite(res.ppl) else None
        row["nll"][m] = res.nll if math.isfinite(res.nll) else None
        row["seconds"][m] = round(time.perf_counter() - t0, 3)
        row["eval"] = {"data": inputs.data_desc, "tokens": res.n_tokens, "windows": res.n_windows,
                       "block_size": res.block_size, "stride": res.stride}
        print(f"{s.name} [{m}]: ppl {fmt_ppl(res.ppl)} ({res.n_tokens:,} tokens, {res.n_windows} windows, "
              f"{res.seconds:.1f} s)", file=sys.stderr)
    s.model = None
    return row


def check_forward(model, tokens, T, source, device, dtype):
    """A model whose forward overflows (finite but huge weights, fp16's range) is an error before any method runs."""
    from checkpoint import check_forward_finite
    window = torch.as_tensor(np.asarray(tokens[:T + 1], dtype=np.int64), device=device)[None]
    autocast = autocast_context(device, dtype)
    check_forward_finite(model, window[:, :-1], window[:, 1:], source.checkpoint, autocast, dtype)


def compress_(model, method, args, calib, T, dtype):
    """Apply `method` to `model` in place ('fp' leaves it as it is)."""
    if method in ("w8", "w8a8"):
        quantize_weights_(model, args.w8_granularity, args.quantize_head)
    if method == "w8a8":
        add_activation_quantization(model, args.quantize_head)
    if method == "sparse50":
        prune_magnitude_(model, args.sparsity, args.prune_scope)
    if method == "wanda":
        windows = calibration_windows(calib, args.calib_windows, T, args.seed)
        prune_wanda_(model, windows, args.sparsity, dtype, args.batch_size or 8)


def table_notes(rows, inputs, args, device, dtype):
    """The lines under the table: what was evaluated, how, and what Δ means."""
    ev = rows[0]["eval"]
    windows = "non-overlapping windows" if args.stride is None else f"sliding windows (stride {args.stride})"
    tied = [r["name"] for r in rows if r["head_tied"]]
    return (f"Token-level perplexity on {inputs.data_desc}: {ev['tokens']:,} scored tokens, {windows} of "
            f"{ev['block_size']} tokens; device {device}, {DTYPE_NAMES[dtype]}. "
            f"W8 granularity {args.w8_granularity}; sparsity {args.sparsity:g} ({args.prune_scope})"
            + (f"; wanda calibration: {args.calib_windows} windows of {inputs.calib_desc}"
               if inputs.calib is not None else "")
            + ". Δ = relative change of perplexity against the unquantized model.\n"
            + ("--quantize_head on a tied head (" + ", ".join(tied) + "): the token embedding shares the head's "
               "weight, so it is quantized too.\n" if args.quantize_head and tied else ""))


if __name__ == "__main__":
    cli_main(main)
