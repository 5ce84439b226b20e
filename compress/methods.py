"""The compression table's methods, one registry entry each, and the one fake-quantizer they share.

A `CompressionMethod` entry owns its name in `--methods`, its column header and Δ label, how it changes a
fresh copy of the model (weights replaced in place, or forward hooks that fake-quantize activations or
keys and values on every forward), whether it needs calibration windows, the settings recorded in
results.json and the table's footnote, and its row in docs/compression.md (`readme_table`). compress_eval.py,
reproduce.py and the docs read them from here: a new method is one entry.

A column of the table is a method name, optionally with `+fpK` (e.g. `w8a8+fp1`): the first K positions of
every window stay in full precision and out of every scale (PrefixQuant's point; `--fp_tokens K` sets K
for every activation / KV column without a suffix).

The fake-quantizer (`QuantSpec`, `fake_quantize`) rounds to the nearest level, ties to even (torch.round),
on one grid per range; ranges run along the last dimension of a tensor, which holds the input channels of
a weight (out, in), the channels of an activation (..., T, C) and the head dimension of a key or value.
"""

import math
import re
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from runtime.cli import UserError, add_to_registry
from runtime.system import autocast_context

# ----------------------------------------------------------------------------------------------
# the fake-quantizer


def parse_granularity(spec, what="granularity"):
    """'tensor' | 'channel' | 'token' | 'group:G' -> ('tensor' | 'row' | 'group', G or None). 'channel' (an
    output row of a weight) and 'token' (a token's vector of an activation, or of one head's key) are the same
    computation: one range per vector along the last dimension."""
    if spec == "tensor":
        return "tensor", None
    if spec in ("channel", "token"):
        return "row", None
    if isinstance(spec, str) and spec.startswith("group:"):
        g = spec.split(":", 1)[1]
        if g.isdigit() and int(g) >= 1:
            return "group", int(g)
    raise UserError(f"unknown {what} {spec!r}; use tensor, channel, token or group:G (G a positive integer, e.g. "
                    f"group:128)")


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is put on integer levels (b = bits, ranges per `granularity`, see parse_granularity):

    symmetric (AbsMax):  scale = max|x| / (2^(b-1) - 1), q = clamp(round(x / scale), -(2^(b-1) - 1), 2^(b-1) - 1),
                         x̂ = q·scale
    asymmetric (min-max): scale = (max - min) / (2^b - 1), zero = round(-min / scale),
                         q = clamp(round(x / scale) + zero, 0, 2^b - 1), x̂ = (q - zero)·scale

    An all-zero range stays zero and a constant asymmetric group is kept exactly. A group:G row shorter than
    G, and the last part of a row whose length is not a multiple of G, are groups of their own."""
    bits: int = 8
    granularity: str = "tensor"
    symmetric: bool = True

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise UserError(f"quantization to {self.bits} bits is not supported (2 to 16)")
        parse_granularity(self.granularity)

    @property
    def qmax(self):
        """The largest level: 2^(b-1) - 1 symmetric (levels -qmax..qmax), 2^b - 1 asymmetric (levels 0..qmax)."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    def describe(self):
        kind, g = parse_granularity(self.granularity)
        per = {"tensor": "per tensor", "row": "per output channel" if self.granularity == "channel" else "per token",
               "group": f"per group of {g} input channels"}[kind]
        return f"{'symmetric AbsMax' if self.symmetric else 'asymmetric min-max'} {self.bits}-bit {per}"

    def as_dict(self):
        return {**asdict(self), "rounding": "nearest, ties to even"}


def _nonzero(scale):
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _round_trip_into(out, v, spec, scale, zero=None):
    """out = dequantize(quantize(v)) on the grid (scale, zero), computed in place in `out` (no temporaries the
    size of v: the activation hooks run on every forward). A zero symmetric scale gives zeros; a constant
    asymmetric group (scale 0) keeps v."""
    torch.div(v, _nonzero(scale), out=out)
    out.round_()
    if zero is None:
        out.clamp_(-spec.qmax, spec.qmax).mul_(scale)
        return
    out.add_(zero).clamp_(0, spec.qmax).sub_(zero).mul_(scale)
    torch.where(scale == 0, v, out, out=out)  # without a host sync: the KV hooks run on every forward


def _dynamic_into(out, v, spec, dims):
    """The ranges of v over `dims` (kept), then the round trip into out."""
    lo, hi = v.amin(dim=dims, keepdim=True), v.amax(dim=dims, keepdim=True)
    if spec.symmetric:
        _round_trip_into(out, v, spec, torch.maximum(hi, lo.neg()) / spec.qmax)
    else:
        scale = (hi - lo) / spec.qmax
        _round_trip_into(out, v, spec, scale, torch.round(lo.neg() / _nonzero(scale)))


def fake_quantize(x, spec, scale=None, batch_dims=0, out=None):
    """x on spec's integer levels and back, computed in float32, returned in x's dtype (or written into `out`,
    a tensor of x's shape).

    scale: a given symmetric scale (static quantization: values beyond scale·qmax clamp); None: dynamic,
    the ranges of x itself. batch_dims: with 'tensor' granularity, each index of the first batch_dims
    dimensions gets its own range (one per window of an activation (B, T, C) with batch_dims=1)."""
    xf = x.float()
    res = out if out is not None and out.dtype == torch.float32 else torch.empty_like(xf)
    if scale is not None:
        if not spec.symmetric:
            raise ValueError("a given (static) scale is symmetric")
        _round_trip_into(res, xf, spec, torch.as_tensor(scale, dtype=torch.float32, device=x.device))
    else:
        kind, g = parse_granularity(spec.granularity)
        n = x.shape[-1]
        if kind == "tensor":
            _dynamic_into(res, xf, spec, tuple(range(batch_dims, x.ndim)))
        elif kind == "row" or g >= n:
            _dynamic_into(res, xf, spec, (-1,))
        else:
            full = n - n % g
            split = (*x.shape[:-1], full // g, g)
            _dynamic_into(res[..., :full].view(split), xf[..., :full].reshape(split), spec, (-1,))
            if full < n:
                _dynamic_into(res[..., full:], xf[..., full:], spec, (-1,))
    if out is None:
        return res.to(x.dtype)
    if res is not out:
        out.copy_(res)
    return out


def quantize_after_prefix(x, spec, fp_tokens=0, scale=None):
    """x (B, T, ...) with positions fp_tokens.. fake-quantized (one 'tensor' range per window over those
    positions) and the first fp_tokens positions as they are."""
    if fp_tokens >= x.shape[1]:
        return x
    if not fp_tokens:
        return fake_quantize(x, spec, scale=scale, batch_dims=1)
    out = torch.empty_like(x)
    out[:, :fp_tokens] = x[:, :fp_tokens]
    fake_quantize(x[:, fp_tokens:], spec, scale=scale, batch_dims=1, out=out[:, fp_tokens:])
    return out


def percentile_per_window(a, percentile):
    """(B,) the nearest-rank percentile of each window's values a (B, ...): the ceil(p·n/100)-th smallest;
    p = 100 is the maximum."""
    flat = a.reshape(a.shape[0], -1)
    if percentile >= 100:
        return flat.amax(dim=1)
    k = max(1, math.ceil(percentile / 100 * flat.shape[1]))
    return flat.kthvalue(k, dim=1).values


# ----------------------------------------------------------------------------------------------
# where the methods act

def block_linears(model):
    """(name, module) of every Linear inside the decoder blocks: c_attn, c_proj, c_fc and the variant's own
    (scale_proj, gate_proj) for this repo's GPT; q/k/v/o, up/gate/down (FalconLinear included, GPT-2's Conv1D
    too) for Hugging Face models. hf_models.weight_of gives each one's weight in (out, in) layout."""
    from hf.models import is_linear, model_view
    view = model_view(model)
    return [(f"{view.family.blocks}.{l}.{name}", m) for l, block in enumerate(view.blocks)
            for name, m in block.named_modules() if is_linear(m)]


def head_is_tied(model):
    """Whether lm_head shares its weight with the token embedding: quantizing the head changes both."""
    emb = model.hf.get_input_embeddings() if hasattr(model, "hf") else model.transformer.wte
    return model.lm_head.weight is emb.weight


@torch.no_grad()
def quantize_weights_(model, spec=QuantSpec(), include_head=False):
    """Every block Linear's weight (and lm_head's with include_head) replaced by its fake-quantized copy;
    returns the names of the modules quantized."""
    from hf.models import weight_of
    targets = block_linears(model) + ([("lm_head", model.lm_head)] if include_head else [])
    for _, lin in targets:
        w = weight_of(lin)
        w.copy_(fake_quantize(w, spec))
    return [name for name, _ in targets]


def activation_sites(model, include_head=False):
    """(name, module, where) of each tensor the activation methods quantize: the input of every block Linear
    ('input'); with include_head also lm_head's input, taken where it is made, because the evaluator calls
    lm_head on row chunks: ln_f's output ('output') for this repo's GPT, the backbone's last hidden state
    ('backbone') for Hugging Face models."""
    sites = [(name, lin, "input") for name, lin in block_linears(model)]
    if include_head:
        sites.append(("lm_head", model.hf.base_model, "backbone") if hasattr(model, "hf")
                     else ("lm_head", model.transformer.ln_f, "output"))
    return sites


def _site_hook(module, where, fn):
    """A hook that replaces the site's tensor x by fn(x) on every forward."""
    if where == "input":
        return module.register_forward_pre_hook(lambda m, args: (fn(args[0]),) + tuple(args[1:]))
    if where == "output":
        return module.register_forward_hook(lambda m, args, out: fn(out))

    def backbone(m, args, out):
        out.last_hidden_state = fn(out.last_hidden_state)
        return out
    return module.register_forward_hook(backbone)


class WindowCount:
    """How many windows the current forward holds, seen at the first block's input (B, T, C) in every family:
    OPT's MLP flattens (B, T, C) to (B*T, C), and per-window ranges need the windows back."""

    def __init__(self, model):
        from hf.models import model_view
        self.n = None

        def count(module, args, kwargs):
            self.n = (args[0] if args else kwargs["hidden_states"]).shape[0]
        self.handle = model_view(model).blocks[0].register_forward_pre_hook(count, with_kwargs=True)

    def windows(self, x):
        """x as (windows, positions, ...)."""
        return x.view(self.n, -1, x.shape[-1]) if x.ndim == 2 and self.n else x


def add_activation_quantization(model, spec=QuantSpec(), fp_tokens=0, scales=None, include_head=False):
    """Fake-quantize every activation site (see activation_sites) on each forward: dynamic ranges per window
    ('tensor') or per token, or the static `scales` {site name: scale}; the first fp_tokens positions of every
    window stay as they are. Returns the hook handles."""
    counter = WindowCount(model)
    handles = [counter.handle]
    on_device = {}  # (site, device) -> its static scale as a tensor there: one host-to-device copy per site

    def static_scale(name, device):
        if scales is None:
            return None
        if (name, device) not in on_device:
            on_device[name, device] = torch.tensor(scales[name], dtype=torch.float32, device=device)
        return on_device[name, device]

    for name, module, where in activation_sites(model, include_head):
        def fn(x, name=name):
            scale = static_scale(name, x.device)
            return quantize_after_prefix(counter.windows(x), spec, fp_tokens, scale).view(x.shape)
        handles.append(_site_hook(module, where, fn))
    return handles


def model_forward(model, x):
    """A forward that reaches every block and the final norm without building full logits."""
    return model.final_hidden(x) if hasattr(model, "final_hidden") else model(x)


@torch.no_grad()
def calibrate_static_scales(model, windows, spec=QuantSpec(), fp_tokens=0, percentile=100.0, include_head=False,
                            batch_size=8, dtype=None):
    """{site: scale} for static per-tensor quantization, from one forward pass over the calibration windows:
    scale = max over windows of the percentile of |x| over the window's positions fp_tokens.. / qmax (min-max
    at percentile 100)."""
    device = next(model.parameters()).device
    counter = WindowCount(model)
    amax = {}

    def observe(name):
        def fn(x):
            w = counter.windows(x)[:, fp_tokens:]
            if w.shape[1]:  # kept on the device: float() once per site at the end, not per batch
                top = percentile_per_window(w.detach().float().abs(), percentile).max()
                amax[name] = top if name not in amax else torch.maximum(amax[name], top)
            return x
        return fn
    handles = [counter.handle] + [_site_hook(m, where, observe(name))
                                  for name, m, where in activation_sites(model, include_head)]
    try:
        with autocast_context(device, dtype):
            for i in range(0, windows.shape[0], batch_size):
                model_forward(model, windows[i:i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: float(amax.get(name, 0.0)) / spec.qmax for name, _, _ in activation_sites(model, include_head)}


KV_SPEC = QuantSpec(bits=4, granularity="token", symmetric=False)
KV8_SPEC = QuantSpec(bits=8, granularity="token", symmetric=False)
A8_TENSOR = QuantSpec(8, "tensor")   # activations of w8a8 and w8a8_static
A8_TOKEN = QuantSpec(8, "token")     # activations of w8a8_token
W8_CHANNEL = QuantSpec(8, "channel")  # weights of w8a8_token


def quantize_keys_values_(model, spec=KV_SPEC, fp_tokens=0):
    """From now on every attention layer works on fake-quantized keys and values, one range per token and head
    (spec along the head dimension), the first fp_tokens positions as they are. This repo's GPT: the k and v
    thirds of c_attn's output (no RoPE; the learned sinks k′, v′ are parameters and stay as they are). Hugging
    Face models: the post-RoPE keys and values the attention function receives (hf_models)."""
    def heads_last(t):  # (B, H, T, D) -> quantized along D per token and head
        return quantize_after_prefix(t.transpose(1, 2), spec, fp_tokens).transpose(1, 2)

    if hasattr(model, "hf"):
        from hf.models import transform_keys_values
        return transform_keys_values(model, lambda k, v: (heads_last(k), heads_last(v)))
    from hf.models import model_view

    def c_attn_hook(head_dim):
        def hook(module, args, out):  # out: [q | k | v], (B, T, 3C)
            B, T, C3 = out.shape
            q, kv = out.split([C3 // 3, 2 * C3 // 3], dim=2)
            kv = quantize_after_prefix(kv.reshape(B, T, -1, head_dim), spec, fp_tokens).view(B, T, -1)
            return torch.cat([q, kv], dim=2)
        return hook
    return [a.c_attn.register_forward_hook(c_attn_hook(a.n_embd // a.n_head)) for a in model_view(model).attn]


# ----------------------------------------------------------------------------------------------
# pruning

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


@torch.no_grad()
def prune_magnitude_(model, sparsity=0.5, scope="layer"):
    from hf.models import weight_of
    weights = [weight_of(lin) for _, lin in block_linears(model)]
    for w, mask in zip(weights, magnitude_masks(weights, sparsity, scope)):
        w.masked_fill_(mask, 0.0)


def _sumsq_hook(sumsq, name):
    """A forward pre-hook adding the squared input features of a Linear into sumsq[name] (float64)."""
    def hook(module, args):
        x = args[0].float()
        sumsq[name] += x.pow(2).reshape(-1, x.shape[-1]).sum(0, dtype=torch.float64)
    return hook


@torch.no_grad()
def prune_wanda_(model, calib, sparsity=0.5, dtype=None, batch_size=8):
    """Wanda, block by block as in its reference code: the input-feature norms of a block's Linears come
    from the calibration activations that reach it through the already pruned blocks before it."""
    from hf.models import in_features, is_linear, weight_of
    device = next(model.parameters()).device

    def visit(l, block, forward):
        linears = [(n, m) for n, m in block.named_modules() if is_linear(m)]
        sumsq = {n: torch.zeros(in_features(m), dtype=torch.float64, device=device) for n, m in linears}
        handles = [m.register_forward_pre_hook(_sumsq_hook(sumsq, n)) for n, m in linears]
        try:
            forward()
        finally:
            for h in handles:
                h.remove()
        for n, m in linears:
            w = weight_of(m)
            w.masked_fill_(wanda_mask(w, sumsq[n].sqrt(), sparsity), 0.0)
        return True  # pruned: the next block's inputs come from the pruned block
    layerwise(model, calib, visit, batch_size, dtype)


# ----------------------------------------------------------------------------------------------
# calibration layer by layer

def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, h):
    return ((h,) + tuple(args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": h})


@torch.no_grad()
def record_block_calls(model, windows, batch_size=8, dtype=None):
    """For each batch of calibration windows: (block 0's input, [(args, kwargs) of block l's call, l = 0..L-1]),
    from one forward in which no block runs (each hands its input on): the masks, positions and rotary
    embeddings a Hugging Face model gives each of its blocks, per block (sliding-window layers get their own)."""
    from hf.models import forwards_replaced, model_view
    blocks = model_view(model).blocks
    device = next(model.parameters()).device
    batches, returns_tuple = [], []

    def stub(l, block, real):
        def forward(*args, **kwargs):
            batches[-1][1].append((args, kwargs))
            h = _hidden(args, kwargs)
            if not returns_tuple:  # what a block returns, from the real block once: Falcon's return a tuple
                returns_tuple.append(isinstance(real(*args, **kwargs), (tuple, list)))
            return (h,) if returns_tuple[0] else h
        return forward
    with forwards_replaced(blocks, stub), autocast_context(device, dtype):
        for i in range(0, windows.shape[0], batch_size):
            batches.append([None, []])
            model_forward(model, windows[i:i + batch_size].to(device))
            batches[-1][0] = _hidden(*batches[-1][1][0])
    return batches


@torch.no_grad()
def layerwise(model, windows, visit, batch_size=8, dtype=None):
    """visit(l, block, forward) for every decoder block in order, where forward() runs the block on the
    calibration windows as they come out of the blocks before it (cached, so nothing before the block runs
    again) and returns the outputs. When visit returns True (it changed the block) the block runs once more
    to give the next block its inputs; otherwise the outputs of its forward() are reused. Cost: about one
    forward pass over the windows, twice for the blocks a visit changes."""
    from hf.models import first, model_view
    blocks = model_view(model).blocks
    device = next(model.parameters()).device
    calls = record_block_calls(model, windows, batch_size, dtype)
    hidden = [h for h, _ in calls]
    for l, block in enumerate(blocks):
        def run(block=block, l=l):
            with autocast_context(device, dtype):
                return [first(block(*args, **kwargs)) for h, (_, per_block) in zip(hidden, calls)
                        for args, kwargs in [_with_hidden(*per_block[l], h)]]
        seen = []

        def forward():
            seen[:] = [run()]
            return seen[0]
        changed = visit(l, block, forward)
        if l + 1 < len(blocks):
            hidden = run() if changed or not seen else seen[0]


# ----------------------------------------------------------------------------------------------
# the registry

@dataclass(frozen=True)
class Options:
    """The command-line settings the methods read (compress_eval.py fills it from its flags)."""
    precision: str = "FP32"         # the fp column's dtype label
    w8_granularity: str = "tensor"
    quantize_head: bool = False
    sparsity: float = 0.5
    prune_scope: str = "layer"
    fp_tokens: int = 0
    act_percentile: float = 100.0
    calib_batch_size: int = 8
    dtype: object = None           # autocast dtype of the calibration forwards


@dataclass(frozen=True)
class Column:
    """One column of the table: a method, its parameter (G of w4gG) and its full-precision prefix."""
    name: str                       # as written in --methods, e.g. 'w4g128', 'w8a8+fp1'
    method: "CompressionMethod"
    param: Optional[int] = None
    fp_tokens: int = 0

    def header(self, opts):
        return f"PPL ({self.method.label(self, opts)}{f', +fp{self.fp_tokens}' if self.fp_tokens else ''})"

    def short(self):
        return self.method.short.format(param=self.param) + (f" +fp{self.fp_tokens}" if self.fp_tokens else "")

    def settings(self, opts):
        s = self.method.settings(self, opts)
        return {**s, "fp_tokens": self.fp_tokens} if self.method.activations else s

    def apply(self, model, opts, calib=None):
        self.method.apply(model, self, opts, calib)


@dataclass(frozen=True)
class CompressionMethod:
    name: str                       # in --methods; 'w4gG' stands for w4g8, w4g128, ... (parameter G)
    formula: str                    # one line for docs/compression.md and --help
    source: str                     # where the setting comes from (docs/compression.md)
    short: str                      # the Δ column's label ('{param}' is the parameter)
    label: Callable                 # (column, Options) -> the header's words, "PPL (...)"
    apply: Callable                 # (model, column, Options, calibration windows or None): changes the model copy
    settings: Callable              # (column, Options) -> dict for results.json and the footnote
    calibrated: bool = False        # needs calibration windows (--calib_*)
    activations: bool = False       # quantizes activations or keys/values: --fp_tokens and +fpK apply
    pattern: Optional[str] = None   # regex of parametrized names, one group (the parameter)
    min_param: int = 1
    reproduce: tuple = ()           # its columns in reproduce.py's table


def _weights(spec, opts):
    return {"weights": {**spec.as_dict(), "lm_head": opts.quantize_head}}


def _w8(opts):
    return QuantSpec(8, opts.w8_granularity)


def _w8_label(name, opts, extra=""):
    kind, g = parse_granularity(opts.w8_granularity)
    detail = {"tensor": "", "row": ", per-channel", "group": f", group {g}"}[kind]
    return f"AbsMax {name}{detail}{extra}{', +head' if opts.quantize_head else ''}"


def _activations(spec, opts, range_):
    return {"activations": {**spec.as_dict(), "sites": "input of every block Linear"
                            + (" and of lm_head" if opts.quantize_head else ""), "range": range_}}


def _static_range(opts):
    return ("static: max |x| over the calibration windows" if opts.act_percentile >= 100 else
            f"static: max over the calibration windows of the {opts.act_percentile:g}th percentile of |x|")


def _apply_w8a8(model, col, opts, calib):
    quantize_weights_(model, _w8(opts), opts.quantize_head)
    add_activation_quantization(model, A8_TENSOR, col.fp_tokens, include_head=opts.quantize_head)


def _apply_w8a8_static(model, col, opts, calib):
    quantize_weights_(model, _w8(opts), opts.quantize_head)
    scales = calibrate_static_scales(model, calib, A8_TENSOR, col.fp_tokens, opts.act_percentile,
                                     opts.quantize_head, opts.calib_batch_size, opts.dtype)
    add_activation_quantization(model, A8_TENSOR, col.fp_tokens, scales, opts.quantize_head)


def _apply_w8a8_token(model, col, opts, calib):
    quantize_weights_(model, W8_CHANNEL, opts.quantize_head)
    add_activation_quantization(model, A8_TOKEN, col.fp_tokens, include_head=opts.quantize_head)


def _w4(col):
    return QuantSpec(4, f"group:{col.param}", symmetric=False)


def _pct(opts):
    return f"{opts.sparsity * 100:g}%"


BUILTIN = [
    CompressionMethod(
        "fp", "the model as it is (fp16 autocast on GPU by default, float32 on CPU; the column names the dtype)",
        source="An et al. 2025, Table 3",
        short="FP", label=lambda col, opts: opts.precision, apply=lambda model, col, opts, calib: None,
        settings=lambda col, opts: {}, reproduce=("fp",)),
    CompressionMethod(
        "w8", "W: symmetric AbsMax 8-bit, scale = max|W|/127, q = clamp(round(W/scale), -127, 127), Ŵ = q·scale; "
              "per tensor, or --w8_granularity channel (per output row) / group:G",
        source="An et al. 2025, Table 3",
        short="W8", label=lambda col, opts: _w8_label("W8", opts),
        apply=lambda model, col, opts, calib: quantize_weights_(model, _w8(opts), opts.quantize_head),
        settings=lambda col, opts: _weights(_w8(opts), opts), reproduce=("w8",)),
    CompressionMethod(
        "sparse50", "unstructured magnitude pruning: the round(s·n) smallest |W| of each Linear set to 0 "
                    "(--sparsity s, default 0.5; --prune_scope global: over all of them together)",
        source="An et al. 2025, Table 3",
        short="Sparse", label=lambda col, opts: f"{_pct(opts)} Sparse{', global' if opts.prune_scope == 'global' else ''}",
        apply=lambda model, col, opts, calib: prune_magnitude_(model, opts.sparsity, opts.prune_scope),
        settings=lambda col, opts: {"pruning": {"criterion": "magnitude", "sparsity": opts.sparsity,
                                                "scope": opts.prune_scope}},
        reproduce=("sparse50",)),
    CompressionMethod(
        "w8a8", "w8, and the input x of every such Linear symmetric AbsMax 8-bit per tensor, dynamic: "
                "scale = max|x|/127 over the window's positions (one scale per window)",
        source="SmoothQuant (Xiao et al. 2023), per-tensor dynamic",
        short="W8A8", label=lambda col, opts: _w8_label("W8A8", opts), apply=_apply_w8a8,
        settings=lambda col, opts: {**_weights(_w8(opts), opts),
                                    **_activations(A8_TENSOR, opts, "dynamic, one range per window")},
        activations=True, reproduce=("w8a8", "w8a8+fp1")),
    CompressionMethod(
        "w8a8_static", "w8, and each Linear's input with one static scale = max|x| over the calibration windows "
                       "/ 127 (min-max; --act_percentile p: the largest over the windows of the nearest-rank p-th "
                       "percentile of |x|); values beyond it clamp to ±127",
        source="Bondarenko et al. 2023 (Quantizable Transformers); SmoothQuant, per-tensor static",
        short="W8A8 static",
        label=lambda col, opts: _w8_label("W8A8", opts, ", static" + (f" p{opts.act_percentile:g}"
                                                                      if opts.act_percentile < 100 else "")),
        apply=_apply_w8a8_static,
        settings=lambda col, opts: {**_weights(_w8(opts), opts),
                                    **_activations(A8_TENSOR, opts, _static_range(opts))},
        calibrated=True, activations=True, reproduce=("w8a8_static",)),
    CompressionMethod(
        "w8a8_token", "W symmetric AbsMax 8-bit per output channel (scale_r = max_j |W_rj|/127), the input x of "
                      "every such Linear symmetric AbsMax 8-bit per token (scale_t = max_c |x_tc|/127), dynamic",
        source="SmoothQuant (Xiao et al. 2023), per-token dynamic",
        short="W8A8 token", label=lambda col, opts: "AbsMax W8A8, per-token"
        + (", +head" if opts.quantize_head else ""),
        apply=_apply_w8a8_token,
        settings=lambda col, opts: {**_weights(W8_CHANNEL, opts),
                                    **_activations(A8_TOKEN, opts, "dynamic, one range per token")},
        activations=True, reproduce=("w8a8_token",)),
    CompressionMethod(
        "w4gG", "W asymmetric 4-bit min-max, round to nearest (RTN), per group of G consecutive input channels "
                "of each row (G ≥ 8, e.g. w4g128): scale = (max - min)/15, zero = round(-min/scale), "
                "q = clamp(round(W/scale) + zero, 0, 15), Ŵ = (q - zero)·scale; a row shorter than G, or its last "
                "partial group, is its own group; a constant group is kept exactly",
        source="GPTQ / AWQ: the RTN baseline",
        short="W4 g{param}", label=lambda col, opts: f"W4 g{col.param} RTN{', +head' if opts.quantize_head else ''}",
        apply=lambda model, col, opts, calib: quantize_weights_(model, _w4(col), opts.quantize_head),
        settings=lambda col, opts: _weights(_w4(col), opts),
        pattern=r"w4g(\d+)", min_param=8, reproduce=("w4g128",)),
    CompressionMethod(
        "kv4", "the keys and values every attention layer computes (after RoPE, before GQA heads are repeated: "
               "what a KV cache holds) asymmetric 4-bit min-max per token and head (one group = the head "
               "dimension), w4gG's formula; learned sinks k′, v′ stay as they are",
        source="QuaRot (Ashkboos et al. 2024), PrefixQuant (Chen et al. 2024)",
        short="KV4", label=lambda col, opts: "KV4",
        apply=lambda model, col, opts, calib: quantize_keys_values_(model, KV_SPEC, col.fp_tokens),
        settings=lambda col, opts: {"kv": {**KV_SPEC.as_dict(), "granularity": "token and head"}},
        activations=True, reproduce=("kv4",)),
    CompressionMethod(
        "kv8", "kv4 at 8 bits: the keys and values asymmetric 8-bit min-max per token and head",
        source="QuaRot (Ashkboos et al. 2024), the KV8 baseline",
        short="KV8", label=lambda col, opts: "KV8",
        apply=lambda model, col, opts, calib: quantize_keys_values_(model, KV8_SPEC, col.fp_tokens),
        settings=lambda col, opts: {"kv": {**KV8_SPEC.as_dict(), "granularity": "token and head"}},
        activations=True),
    CompressionMethod(
        "wanda", "Wanda pruning: score |W_ij|·‖X_j‖ (L2 norm of input feature j over the calibration tokens); "
                 "the round(s·in) lowest of every output row set to 0, block by block on the activations that "
                 "come through the already pruned blocks",
        source="Sun et al. 2024 (Wanda)",
        short="Wanda", label=lambda col, opts: f"Wanda {_pct(opts)}",
        apply=lambda model, col, opts, calib: prune_wanda_(model, calib, opts.sparsity, opts.dtype,
                                                           opts.calib_batch_size),
        settings=lambda col, opts: {"pruning": {"criterion": "wanda", "sparsity": opts.sparsity, "scope": "row"}},
        calibrated=True),
]
REGISTRY = {m.name: m for m in BUILTIN}
METHODS = tuple(REGISTRY)
# reproduce.py's columns, in registry order
REPRODUCE = tuple(c for m in BUILTIN for c in m.reproduce)


def register(method):
    """Add a method (e.g. from a research script); its name becomes valid in --methods."""
    return add_to_registry(REGISTRY, method, "compression method")


def _method_of(name):
    """(entry, parameter or None) of a method name."""
    if name in REGISTRY and REGISTRY[name].pattern is None:
        return REGISTRY[name], None
    for m in REGISTRY.values():
        match = m.pattern and re.fullmatch(m.pattern, name)
        if match:
            param = int(match.group(1))
            if param < m.min_param:
                raise UserError(f"{name!r}: the parameter of {m.name} must be at least {m.min_param}")
            return m, param
    raise UserError(f"unknown method {name!r} in --methods; choose from {', '.join(REGISTRY)}")


def parse_column(text, fp_tokens=0):
    """A --methods entry -> Column. 'NAME+fpK' keeps the first K positions of every window in full precision
    (activation and KV methods); otherwise they get --fp_tokens."""
    name, plus, fp = text.partition("+")
    method, param = _method_of(name)
    if plus:
        if not re.fullmatch(r"fp\d+", fp):
            raise UserError(f"{text!r} in --methods: the suffix is +fpK (K positions kept in full precision), e.g. "
                            f"{name}+fp1")
        if not method.activations:
            raise UserError(f"{text!r} in --methods: {name} quantizes no activations, so +{fp} does not apply "
                            f"(it does to {', '.join(m.name for m in REGISTRY.values() if m.activations)})")
        fp_tokens = int(fp[2:])
    return Column(text, method, param, fp_tokens if method.activations else 0)


def parse_columns(spec, fp_tokens=0):
    """The comma list of --methods -> Columns, duplicates dropped, in the order given."""
    names = list(dict.fromkeys(x.strip() for x in spec.split(",") if x.strip()))
    if not names:
        raise UserError(f"--methods is empty; choose from {', '.join(REGISTRY)}")
    return [parse_column(n, fp_tokens) for n in names]


def describe(settings):
    """The footnote's words for a column's settings."""
    parts = []
    if "weights" in settings:
        w = settings["weights"]
        parts.append(f"weights {QuantSpec(w['bits'], w['granularity'], w['symmetric']).describe()}"
                     + (" (lm_head too)" if w.get("lm_head") else ""))
    if "activations" in settings:
        a = settings["activations"]
        parts.append(f"{a['sites']} {QuantSpec(a['bits'], a['granularity'], a['symmetric']).describe()}, {a['range']}")
    if "kv" in settings:
        kv = settings["kv"]
        parts.append(f"keys and values {'symmetric' if kv['symmetric'] else 'asymmetric min-max'} {kv['bits']}-bit "
                     f"per {kv['granularity']}")
    if "pruning" in settings:
        p = settings["pruning"]
        parts.append(f"{p['criterion']} pruning, sparsity {p['sparsity']:g} per {p['scope']}")
    if settings.get("fp_tokens"):
        k = settings["fp_tokens"]
        parts.append(f"position{'s' if k > 1 else ''} {'0' if k == 1 else f'0-{k - 1}'} of every window in full "
                     f"precision, out of every scale")
    return "; ".join(parts) or "unchanged"


def readme_table():
    """docs/compression.md's method table, from the registry (tests check the page holds exactly this)."""
    from runtime.reports import markdown_table
    rows = [[f"`{m.name}`", m.formula, "yes" if m.calibrated else "", "yes" if m.activations else "", m.source]
            for m in REGISTRY.values()]
    return markdown_table(["`--methods`", "what it does", "calibration", "`--fp_tokens` / `+fpK`", "from"], rows)
