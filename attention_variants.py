"""Attention formulations chosen by name from one registry; each entry owns everything about its variant.

Per head, with Q, K, V of shape (T, d), s = 1/sqrt(d), causal mask everywhere (the paper's six, then
two later designs):

    default         softmax(s QK^T) V
    fixed_bias      softmax(s QK^T) V + v'
    context_bias    softmax(s QK^T) V + softmax(s Q[k'; K]^T) [v'; 0]
    attention_bias  softmax(s Q[k'; K]^T) [v'; V]
    scaling         S(x) * softmax(s QK^T) V,   S(x) = 2 sigmoid(W x + b), one factor per token and head
    sigmoid         sigmoid(s QK^T + b) V,      b = -ln(T) unless fixed
    gated           softmax(s QK^T) V * sigmoid(x W_theta), elementwise (Qiu et al. 2025, position G1)
    softmax1        sum_j exp(s_ij) v_j / (1 + sum_j exp(s_ij)): a sink with logit 0 and value 0 (Miller 2023)

The k'/v' sink column is visible to every query, including the first; x is the attention block's
input (after ln_1).

An `AttentionVariant` entry owns: the parameters the attention layer creates for it (names are part
of the checkpoint format; shapes, initialisation, weight decay), how it computes its per-call inputs
from x, its reference formula, its SDPA form (or none), the flags the fused kernel runs it with (a
`KernelFlags`, data), its formula text, what it records for the analysis, and its parameter count at
GPT-2 124M. The model, the kernel tests, the benchmarks (the register/spill check compiles the flag sets
of the entries), the analysis and the README table all read it from here.

A variant that is "default attention, then an elementwise step on its output" (fixed_bias, scaling,
gated) is built by `output_step_variant`: its reference, SDPA and kernel paths are default attention
followed by the step in torch, and autograd differentiates the step. Adding one needs no kernel edit.

Backends:
    reference  the formula as written (materialized scores, explicit mask); the ground truth for the
               other backends, and the only path that returns attention weights (the analysis uses it)
    sdpa       torch scaled_dot_product_attention wherever the variant has such a form
    triton     the fused kernel in fused_kernels/fused_attention.py with the entry's `kernel_flags` (CUDA, or
               TRITON_INTERPRET=1 on CPU)
    auto       triton on CUDA when the kernel supports the call and T >= the entry's `fused_from_t` (where
               it was measured not to be slower than the variant's SDPA form), else sdpa, else reference
"""

import math
import os
import runpy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fused_kernels.flags import KernelFlags  # data only: imports no triton
from runtime.cli import UserError, add_to_registry

BACKENDS = ("auto", "reference", "sdpa", "triton")

# What `reference` may record besides q, k, v; every entry lists the keys it returns in `records`.
RECORDS = {
    "probs": "(B, nh, T, T) attention weight of query i on key j (row sums are 1 minus the sink share)",
    "sink_probs": "(B, nh, T) the weight each query gives to the sink column",
    "gate": "(B, nh, T) the output gate per token and head; the entry's `gate` text says what it is",
}


# ----------------------------------------------------------------------------------------------
# reference paths: the formulas written out

def _masked_scores(q, k):
    """s QK^T with the causal mask applied as -inf; (B, nh, T, T)."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf"))


def _sink_logits(q, k_bias):
    """s q . k' for every query; (B, nh, T, 1). k_bias is (nh, hs)."""
    return (q @ k_bias.unsqueeze(-1).to(q.dtype)) * (1.0 / math.sqrt(q.size(-1)))


def _at_least_fp32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _softmax(scores, dtype):
    return torch.softmax(_at_least_fp32(scores), dim=-1).to(dtype)


def _dropout(p, dropout_p):
    return F.dropout(p, p=dropout_p) if dropout_p > 0 else p


def _softmax_with_sink(q, k, sink_logits):
    """softmax over [sink; keys]: (sink column (B, nh, T, 1), key columns (B, nh, T, T))."""
    with_sink = _softmax(torch.cat([sink_logits, _masked_scores(q, k)], dim=-1), q.dtype)
    return with_sink[..., :1], with_sink[..., 1:]


def default_reference(q, k, v, dropout_p=0.0, **_):
    probs = _softmax(_masked_scores(q, k), q.dtype)
    return _dropout(probs, dropout_p) @ v, {"probs": probs}


def context_bias_reference(q, k, v, k_bias, v_bias, dropout_p=0.0, **_):
    out, weights = default_reference(q, k, v, dropout_p)
    # a second softmax over [k'; K]: only the sink column carries a value (v'; the rest is 0)
    sink, _ = _softmax_with_sink(q, k, _sink_logits(q, k_bias))
    out = out + _dropout(sink, dropout_p) * v_bias[None, :, None, :].to(out.dtype)
    return out, {"probs": weights["probs"], "sink_probs": sink[..., 0]}


def attention_bias_reference(q, k, v, k_bias, v_bias, dropout_p=0.0, **_):
    sink, probs = _softmax_with_sink(q, k, _sink_logits(q, k_bias))
    out = _dropout(sink, dropout_p) * v_bias[None, :, None, :].to(q.dtype) + _dropout(probs, dropout_p) @ v
    return out, {"probs": probs, "sink_probs": sink[..., 0]}


def softmax1_reference(q, k, v, dropout_p=0.0, **_):
    # the "+1" of the denominator is exp(0): a sink column with logit 0 whose value is 0
    sink, probs = _softmax_with_sink(q, k, q.new_zeros(*q.shape[:-1], 1))
    return _dropout(probs, dropout_p) @ v, {"probs": probs, "sink_probs": sink[..., 0]}


def sigmoid_reference(q, k, v, sigmoid_bias=None, dropout_p=0.0, **_):
    T = q.size(-2)
    b = -math.log(T) if sigmoid_bias is None else float(sigmoid_bias)
    # exp(-inf) makes the masked entries exactly 0: no normalisation, so nothing else to do
    weights = torch.sigmoid(_at_least_fp32(_masked_scores(q, k)) + b).to(q.dtype)
    return _dropout(weights, dropout_p) @ v, {"probs": weights}


# ----------------------------------------------------------------------------------------------
# sdpa paths: the same formulas through torch's fused attention where they can be expressed

def _sdpa(q, k, v, dropout_p, attn_mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=attn_mask is None)


def _with_sink_column(q, k, v, k_bias, v_bias):
    """Prepend the sink as key/value 0 and build the causal mask that lets every query see it."""
    B, nh, T, hs = k.shape
    k_sink = torch.cat([k_bias.to(k.dtype)[None, :, None, :].expand(B, nh, 1, hs), k], dim=2)  # (B, nh, T+1, hs)
    v_sink = torch.cat([v_bias.to(v.dtype)[None, :, None, :].expand(B, nh, 1, hs), v], dim=2)  # (B, nh, T+1, hs)
    mask = torch.ones(T, T + 1, dtype=torch.bool, device=q.device).tril(diagonal=1)  # col 0 = sink
    return k_sink, v_sink, mask


def default_sdpa(q, k, v, dropout_p=0.0, **_):
    return _sdpa(q, k, v, dropout_p)


def context_bias_sdpa(q, k, v, k_bias, v_bias, dropout_p=0.0, **_):
    k_sink, v_sink, mask = _with_sink_column(q, k, v, k_bias, v_bias)
    v_sink_only = torch.zeros_like(v_sink)
    v_sink_only[:, :, :1] = v_sink[:, :, :1]  # [v'; 0]
    return _sdpa(q, k, v, dropout_p) + _sdpa(q, k_sink, v_sink_only, dropout_p, attn_mask=mask)


def attention_bias_sdpa(q, k, v, k_bias, v_bias, dropout_p=0.0, **_):
    k_sink, v_sink, mask = _with_sink_column(q, k, v, k_bias, v_bias)
    return _sdpa(q, k_sink, v_sink, dropout_p, attn_mask=mask)


def softmax1_sdpa(q, k, v, dropout_p=0.0, **_):
    zero = q.new_zeros(q.size(1), q.size(-1))  # (nh, hs): q . 0 = logit 0, value 0
    return attention_bias_sdpa(q, k, v, zero, zero, dropout_p)


# ----------------------------------------------------------------------------------------------
# the registry

@dataclass(frozen=True)
class VariantParam:
    """A tensor or module that the attention layer owns for a variant."""
    name: str        # attribute of the layer: checkpoint keys transformer.h.{i}.attn.{name}[.weight|.bias]
    build: Callable  # (n_embd, n_head) -> nn.Parameter or nn.Module (GPT re-initialises every nn.Linear)
    about: str       # symbol, shape and initialisation, for the README
    weight_decay: bool = True  # its matrices join AdamW's decayed group (vectors never decay)


@dataclass(frozen=True)
class AttentionVariant:
    name: str
    formula: str                  # one line, per head (README, docs)
    source: str                   # where the design comes from
    reference: Callable           # (q, k, v, *, dropout_p, sigmoid_bias, **inputs) -> (out, records)
    sdpa: Optional[Callable]      # (q, k, v, *, dropout_p, **inputs) -> out; None: no SDPA form
    kernel_flags: KernelFlags     # the fused kernel's flags (fused_kernels/flags.py); `triton` runs with them
    params: tuple = ()            # VariantParam entries
    make_inputs: Optional[Callable] = None  # (layer, x) -> dict of per-call tensors; None: the params as they are
    records: tuple = ("probs",)   # keys of RECORDS that `reference` returns
    gate: Optional[str] = None    # what the recorded "gate" is (analysis report)
    n_params_124m: Optional[int] = None  # non-embedding parameters at GPT-2 124M (bias=False, vocab 50304)
    # `auto` runs the fused kernel on CUDA from this sequence length on, where it was measured to be at least
    # as fast as this entry's SDPA form (benchmarks/RESULTS.md); None: never (not measured)
    fused_from_t: Optional[int] = None
    # (y, **inputs) -> y: an elementwise step in torch on the kernel's output (output_step_variant); None:
    # the inputs go to the kernel (e.g. the sink vectors)
    output_step: Optional[Callable] = None

    def triton(self, q, k, v, sigmoid_bias=None, **inputs):
        """(q, k, v, *, sigmoid_bias, **inputs) -> out, through the fused kernel with `kernel_flags` (imported
        here: triton is optional)."""
        from fused_kernels.fused_attention import fused_attention
        if self.output_step is not None:
            return self.output_step(fused_attention(q, k, v, **self.kernel_flags.kwargs()), **inputs)
        return fused_attention(q, k, v, sigmoid_bias=sigmoid_bias, **self.kernel_flags.kwargs(), **inputs)

    @property
    def kernel(self):
        """How `triton` runs it, in words (the README's "fused kernel" column)."""
        step = ", then the step in torch" if self.output_step is not None else ""
        return self.kernel_flags.describe() + step


# Where the default kernel is at least as fast as SDPA (FlashAttention-2), fwd+bwd, H200, bf16, D = 64, 16k
# tokens per call: 0.28x at T = 1024, 0.43x at 2048, 0.78x at 4096, 1.29x at 8192 (benchmarks/RESULTS.md)
DEFAULT_KERNEL_FROM_T = 8192


def output_step_variant(name, formula, source, step, *, gate_record=None, **fields):
    """A variant that is default attention followed by `step(y, **inputs)`, an elementwise function of
    the attention output y (B, nh, T, hs). Every backend runs default attention and then the step in
    torch; `gate_record(**inputs)` gives the (B, nh, T) gate recorded for the analysis. `auto` switches
    to the kernel where the default kernel wins (both paths run the same step)."""

    def reference(q, k, v, dropout_p=0.0, sigmoid_bias=None, **inputs):
        out, records = default_reference(q, k, v, dropout_p)
        if gate_record is not None:
            records["gate"] = gate_record(**inputs)
        return step(out, **inputs), records

    def sdpa(q, k, v, dropout_p=0.0, **inputs):
        return step(default_sdpa(q, k, v, dropout_p), **inputs)

    records = ("probs", "gate") if gate_record is not None else ("probs",)
    fields.setdefault("fused_from_t", DEFAULT_KERNEL_FROM_T)
    return AttentionVariant(name, formula, source, reference, sdpa, KernelFlags(), records=records,
                            output_step=step, **fields)


def _head_vector(n_embd, n_head):
    return nn.Parameter(torch.randn(n_head, n_embd // n_head) * 0.02)


K_BIAS = VariantParam("k_bias", _head_vector, "k′: (n_head, d), N(0, 0.02²)")
V_BIAS = VariantParam("v_bias", _head_vector, "v′: (n_head, d), N(0, 0.02²)")
SCALE_PROJ = VariantParam("scale_proj", lambda n_embd, n_head: nn.Linear(n_embd, n_head, bias=True),
                          "W: (n_head, n_embd), b: (n_head)")
GATE_PROJ = VariantParam("gate_proj", lambda n_embd, n_head: nn.Linear(n_embd, n_embd, bias=False),
                         "W_θ: (n_embd, n_embd)")


def _heads(t, n_head):
    """(B, T, C) -> (B, nh, T, hs)."""
    B, T, C = t.shape
    return t.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, nh, T, hs)


PAPER = "An et al. 2025, Systematic Outliers in LLMs"

BUILTIN = [
    AttentionVariant(
        "default", "softmax(QKᵀ/√d) V", PAPER, default_reference, default_sdpa, KernelFlags(),
        n_params_124m=123_587_328, fused_from_t=DEFAULT_KERNEL_FROM_T),
    output_step_variant(
        "fixed_bias", "softmax(QKᵀ/√d) V + v′", PAPER,
        step=lambda y, v_bias: y + v_bias[None, :, None, :].to(y.dtype),
        params=(V_BIAS,), n_params_124m=123_596_544),
    AttentionVariant(
        "context_bias", "softmax(QKᵀ/√d) V + softmax(Q[k′; K]ᵀ/√d) [v′; 0]", PAPER,
        context_bias_reference, context_bias_sdpa, KernelFlags(sink="context"), params=(K_BIAS, V_BIAS),
        records=("probs", "sink_probs"), n_params_124m=123_605_760,
        fused_from_t=1024),  # training at T = 1024: 1.30x its SDPA form
    AttentionVariant(
        "attention_bias", "softmax(Q[k′; K]ᵀ/√d) [v′; V]", PAPER,
        attention_bias_reference, attention_bias_sdpa, KernelFlags(sink="learned"), params=(K_BIAS, V_BIAS),
        records=("probs", "sink_probs"), n_params_124m=123_605_760, fused_from_t=1024),  # training at T = 1024: 1.10x
    output_step_variant(
        "scaling", "S(x) · softmax(QKᵀ/√d) V, S(x) = 2·sigmoid(Wx + b) per token and head", PAPER,
        step=lambda y, gate: y * gate.unsqueeze(-1).to(y.dtype),
        gate_record=lambda gate: gate,
        params=(SCALE_PROJ,),
        make_inputs=lambda layer, x: {"gate": 2.0 * torch.sigmoid(layer.scale_proj(x)).transpose(1, 2)},  # (B, nh, T)
        gate="S(x) = 2·sigmoid(Wx + b), one factor per token and head, in (0, 2)",
        n_params_124m=123_698_064),
    AttentionVariant(
        "sigmoid", "sigmoid(QKᵀ/√d + b) V, b = −ln T unless `sigmoid_bias` is set", PAPER,
        sigmoid_reference, None, KernelFlags(sigmoid=True),
        # no SDPA form: the alternative materialises the T x T weights (training at T = 1024: 2.30x, 1.8x less memory)
        n_params_124m=123_587_328, fused_from_t=1),
    output_step_variant(
        "gated", "softmax(QKᵀ/√d) V ⊙ sigmoid(x W_θ), elementwise on the concatenated heads",
        "Qiu et al. 2025, Gated Attention for LLMs (G1, elementwise)",
        step=lambda y, gate: y * gate.to(y.dtype),
        gate_record=lambda gate: gate.mean(-1),
        params=(GATE_PROJ,),
        make_inputs=lambda layer, x: {"gate": _heads(torch.sigmoid(layer.gate_proj(x)), layer.n_head)},
        gate="sigmoid(x W_θ), elementwise in (0, 1); recorded as its mean over each head's channels",
        n_params_124m=130_665_216),
    AttentionVariant(
        "softmax1", "Σⱼ exp(sⱼ) vⱼ / (1 + Σⱼ exp(sⱼ)), s = QKᵀ/√d: a sink with logit 0 and value 0",
        "Miller 2023, Attention Is Off By One", softmax1_reference, softmax1_sdpa, KernelFlags(sink="zero"),
        records=("probs", "sink_probs"), n_params_124m=123_587_328, fused_from_t=1024),  # training at T = 1024: 1.17x
]
REGISTRY = {v.name: v for v in BUILTIN}
VARIANTS = tuple(REGISTRY)  # the built-in variants; `register` adds more at run time


def register(variant):
    """Add a variant (e.g. from a research script); its name becomes valid for GPTConfig(attention=...)."""
    return add_to_registry(REGISTRY, variant, "attention variant")


# what --variants_file (train.py's variants_file key) says in every script that takes it
VARIANTS_FILE_HELP = ("a Python file that registers attention variants (attention_variants.register), run before "
                      "any model is built: how a variant defined outside attention_variants.py reaches this process")
_VARIANT_FILES = set()  # real paths of the variants files this process has run


def load_variant_file(path):
    """Run the Python file `path`, which registers variants with `register`, once per process (nothing for None
    or ""). A script's subprocesses know only the variants their own process registered, so every script that
    builds models takes such a file (train.py's variants_file key; --variants_file of analyze_outliers.py,
    compress_eval.py and reproduce.py, which passes it on to every stage). An error inside the file keeps its
    traceback: it is code."""
    if not path:
        return
    real = os.path.realpath(path)
    if real in _VARIANT_FILES:
        return
    if not os.path.isfile(real):
        raise UserError(f"variants file {path} does not exist or is not a file; name a Python file that calls "
                        f"attention_variants.register(...)")
    runpy.run_path(real, run_name="__variants__")
    _VARIANT_FILES.add(real)


def get_variant(name):
    if name not in REGISTRY:
        raise UserError(f"unknown attention variant {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def check_backend(name):
    if name not in BACKENDS:
        raise UserError(f"unknown attn_backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return name


def add_variant_parameters(module, variant, n_embd, n_head):
    """Give an attention layer the variant's own parameters (names are part of the checkpoint format)."""
    for param in variant.params:
        setattr(module, param.name, param.build(n_embd, n_head))


def variant_inputs(module, variant, x):
    """The per-call inputs of a variant, from the layer and its input x (B, T, C)."""
    if variant.make_inputs is not None:
        return variant.make_inputs(module, x)
    return {param.name: getattr(module, param.name) for param in variant.params}


def variant_param_name(key):
    """'transformer.h.3.attn.scale_proj.weight' -> 'scale_proj'; None for a key outside attention layers."""
    _, sep, rest = key.partition(".attn.")
    return rest.split(".")[0] if sep else None


def owns_key(variant, key):
    """True when the state-dict `key` is one of `variant`'s own parameters."""
    return variant_param_name(key) in {param.name for param in variant.params}


def no_decay_names(variant):
    """Attribute names of the variant's parameters that stay out of weight decay."""
    return {param.name for param in variant.params if not param.weight_decay}


def module_params():
    """Names of every registered variant's nn.Module parameters (e.g. scale_proj), for weight statistics."""
    with torch.device("meta"):  # build to see the type; no memory
        return tuple(dict.fromkeys(param.name for v in REGISTRY.values() for param in v.params
                                   if isinstance(param.build(8, 2), nn.Module)))


def readme_table():
    """The README's variant table, from the registry (tests check the README holds exactly this)."""
    lines = ["| `attention=` | formula | extra parameters per layer | non-embedding params (124M) | fused kernel "
             "| `auto` uses it from T | from |",
             "|---|---|---|---|---|---:|---|"]
    for v in REGISTRY.values():
        about = "; ".join(p.about for p in v.params) or "none"
        count = f"{v.n_params_124m:,}" if v.n_params_124m is not None else "?"
        from_t = "never" if v.fused_from_t is None else "any" if v.fused_from_t <= 1 else f"{v.fused_from_t:,}"
        lines.append(f"| `{v.name}` | {v.formula} | {about} | {count} | {v.kernel} | {from_t} | {v.source} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# dispatch

def _triton_supported(q, dropout_p):
    try:
        from fused_kernels.fused_attention import is_supported
    except ImportError:  # triton missing or the kernel module unavailable
        return False
    return is_supported(q, dropout_p)


def _fused_is_faster(variant, T):
    return variant.fused_from_t is not None and T >= variant.fused_from_t


def resolve_backend(backend, variant, q, dropout_p):
    """The backend that will actually run this call."""
    if backend == "auto":
        if q.is_cuda and _fused_is_faster(variant, q.size(-2)) and _triton_supported(q, dropout_p):
            return "triton"
        return "sdpa" if variant.sdpa is not None else "reference"
    if backend == "sdpa" and variant.sdpa is None:
        return "reference"  # e.g. sigmoid attention has no SDPA form
    if backend == "triton" and not _triton_supported(q, dropout_p):
        raise UserError(
            f"attn_backend='triton' cannot run this call ({variant.name}, device {q.device}, dtype {q.dtype}, "
            f"head dim {q.size(-1)}, dropout {dropout_p}); it needs CUDA (or TRITON_INTERPRET=1), head dim "
            f"16/32/64/128 and dropout 0. Use attn_backend='auto' to fall back to sdpa/reference")
    return backend


def attention(variant, q, k, v, inputs, *, backend="auto", sigmoid_bias=None, dropout_p=0.0,
              return_weights=False):
    """Run one attention call. q, k, v: (B, nh, T, hs). Returns out (B, nh, T, hs) [, records dict]."""
    if return_weights:
        return variant.reference(q, k, v, sigmoid_bias=sigmoid_bias, dropout_p=dropout_p, **inputs)
    chosen = resolve_backend(backend, variant, q, dropout_p)
    if chosen == "triton":
        return variant.triton(q, k, v, sigmoid_bias=sigmoid_bias, **inputs)
    if chosen == "sdpa":
        return variant.sdpa(q, k, v, dropout_p=dropout_p, **inputs)
    return variant.reference(q, k, v, sigmoid_bias=sigmoid_bias, dropout_p=dropout_p, **inputs)[0]
