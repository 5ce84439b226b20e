"""The six attention formulations of the paper, chosen by name from a small registry.

Per head, with Q, K, V of shape (T, d), s = 1/sqrt(d), causal mask everywhere:

    default         softmax(s QK^T) V
    fixed_bias      softmax(s QK^T) V + v'
    context_bias    softmax(s QK^T) V + softmax(s Q[k'; K]^T) [v'; 0]
    attention_bias  softmax(s Q[k'; K]^T) [v'; V]
    scaling         S(x) * softmax(s QK^T) V,   S(x) = 2 sigmoid(W x + b), one factor per token and head
    sigmoid         sigmoid(s QK^T + b) V,      b = -ln(T) unless fixed

The k'/v' sink column is visible to every query, including the first.

Each variant has a `reference` implementation that writes its formula out (materialized scores,
explicit mask). It is the ground truth for the other backends, so it is kept obvious, not fast.
Backends:
    reference  the formula as written; also the only path that can return attention weights
    sdpa       torch scaled_dot_product_attention wherever the variant has such a form
    triton     the fused kernel in fused_attention.py (CUDA, or TRITON_INTERPRET=1 on CPU)
    auto       triton on CUDA when the kernel supports the call, else sdpa, else reference
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError

BACKENDS = ("auto", "reference", "sdpa", "triton")


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


def default_reference(q, k, v, dropout_p=0.0, **_):
    probs = _softmax(_masked_scores(q, k), q.dtype)
    return _dropout(probs, dropout_p) @ v, {"probs": probs}


def fixed_bias_reference(q, k, v, v_bias, dropout_p=0.0, **_):
    out, weights = default_reference(q, k, v, dropout_p)
    return out + v_bias[None, :, None, :].to(out.dtype), weights


def context_bias_reference(q, k, v, k_bias, v_bias, dropout_p=0.0, **_):
    out, weights = default_reference(q, k, v, dropout_p)
    # second softmax over [k'; K]: only the sink column carries a value (v'; the rest is 0)
    with_sink = _softmax(torch.cat([_sink_logits(q, k_bias), _masked_scores(q, k)], dim=-1), q.dtype)
    sink_probs = _dropout(with_sink, dropout_p)[..., 0]  # (B, nh, T)
    out = out + sink_probs.unsqueeze(-1) * v_bias[None, :, None, :].to(out.dtype)
    return out, {"probs": weights["probs"], "sink_probs": with_sink[..., 0]}


def attention_bias_reference(q, k, v, k_bias, v_bias, dropout_p=0.0, **_):
    with_sink = _softmax(torch.cat([_sink_logits(q, k_bias), _masked_scores(q, k)], dim=-1), q.dtype)
    dropped = _dropout(with_sink, dropout_p)
    out = dropped[..., :1] * v_bias[None, :, None, :].to(q.dtype) + dropped[..., 1:] @ v
    return out, {"probs": with_sink[..., 1:], "sink_probs": with_sink[..., 0]}


def scaling_reference(q, k, v, gate, dropout_p=0.0, **_):
    out, weights = default_reference(q, k, v, dropout_p)
    return out * gate.unsqueeze(-1).to(out.dtype), {**weights, "gate": gate}


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


def fixed_bias_sdpa(q, k, v, v_bias, dropout_p=0.0, **_):
    return _sdpa(q, k, v, dropout_p) + v_bias[None, :, None, :].to(q.dtype)


def context_bias_sdpa(q, k, v, k_bias, v_bias, dropout_p=0.0, **_):
    k_sink, v_sink, mask = _with_sink_column(q, k, v, k_bias, v_bias)
    v_sink_only = torch.zeros_like(v_sink)
    v_sink_only[:, :, :1] = v_sink[:, :, :1]  # [v'; 0]
    return _sdpa(q, k, v, dropout_p) + _sdpa(q, k_sink, v_sink_only, dropout_p, attn_mask=mask)


def attention_bias_sdpa(q, k, v, k_bias, v_bias, dropout_p=0.0, **_):
    k_sink, v_sink, mask = _with_sink_column(q, k, v, k_bias, v_bias)
    return _sdpa(q, k_sink, v_sink, dropout_p, attn_mask=mask)


def scaling_sdpa(q, k, v, gate, dropout_p=0.0, **_):
    return _sdpa(q, k, v, dropout_p) * gate.unsqueeze(-1).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# the registry

@dataclass(frozen=True)
class AttentionVariant:
    name: str
    formula: str
    head_params: tuple  # learnable (n_head, head_dim) tensors the layer owns, e.g. ('k_bias', 'v_bias')
    has_gate: bool      # owns scale_proj: S(x) = 2 sigmoid(W x + b)
    reference: callable
    sdpa: callable      # None where no SDPA form exists (the reference is used instead)


REGISTRY = {v.name: v for v in [
    AttentionVariant("default", "softmax(QK^T/sqrt(d)) V", (), False, default_reference, default_sdpa),
    AttentionVariant("fixed_bias", "softmax(QK^T/sqrt(d)) V + v'", ("v_bias",), False,
                     fixed_bias_reference, fixed_bias_sdpa),
    AttentionVariant("context_bias", "softmax(QK^T/sqrt(d)) V + softmax(Q[k'; K]^T/sqrt(d)) [v'; 0]",
                     ("k_bias", "v_bias"), False, context_bias_reference, context_bias_sdpa),
    AttentionVariant("attention_bias", "softmax(Q[k'; K]^T/sqrt(d)) [v'; V]", ("k_bias", "v_bias"), False,
                     attention_bias_reference, attention_bias_sdpa),
    AttentionVariant("scaling", "2 sigmoid(W x + b) * softmax(QK^T/sqrt(d)) V", (), True,
                     scaling_reference, scaling_sdpa),
    AttentionVariant("sigmoid", "sigmoid(QK^T/sqrt(d) + b) V", (), False, sigmoid_reference, None),
]}
VARIANTS = tuple(REGISTRY)


def get_variant(name):
    if name not in REGISTRY:
        raise UserError(f"unknown attention variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    return REGISTRY[name]


def check_backend(name):
    if name not in BACKENDS:
        raise UserError(f"unknown attn_backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return name


def add_variant_parameters(module, variant, n_embd, n_head):
    """Give an attention layer the variant's own parameters (names are part of the checkpoint format)."""
    head_dim = n_embd // n_head
    for name in variant.head_params:
        setattr(module, name, nn.Parameter(torch.randn(n_head, head_dim) * 0.02))
    if variant.has_gate:
        module.scale_proj = nn.Linear(n_embd, n_head, bias=True)


def variant_inputs(module, variant, x):
    """The per-call extra inputs of a variant: its head parameters and, for scaling, the gate S(x)."""
    inputs = {name: getattr(module, name) for name in variant.head_params}
    if variant.has_gate:
        inputs["gate"] = 2.0 * torch.sigmoid(module.scale_proj(x)).transpose(1, 2)  # (B, nh, T)
    return inputs


# ----------------------------------------------------------------------------------------------
# dispatch

def _triton_supported(q, variant_name, dropout_p):
    try:
        from fused_attention import is_supported
    except ImportError:  # triton missing or the kernel module unavailable
        return False
    return is_supported(q, variant_name, dropout_p)


def resolve_backend(backend, variant, q, dropout_p):
    """The backend that will actually run this call."""
    if backend == "auto":
        if q.is_cuda and _triton_supported(q, variant.name, dropout_p):
            return "triton"
        return "sdpa" if variant.sdpa is not None else "reference"
    if backend == "sdpa" and variant.sdpa is None:
        return "reference"  # sigmoid attention has no SDPA form
    if backend == "triton" and not _triton_supported(q, variant.name, dropout_p):
        raise UserError(
            f"attn_backend='triton' cannot run this call ({variant.name}, device {q.device}, dtype {q.dtype}, "
            f"head dim {q.size(-1)}, dropout {dropout_p}); it needs CUDA (or TRITON_INTERPRET=1), head dim "
            f"16/32/64/128 and dropout 0. Use attn_backend='auto' to fall back to sdpa/reference")
    return backend


def attention(variant, q, k, v, inputs, *, backend="auto", sigmoid_bias=None, dropout_p=0.0,
              return_weights=False):
    """Run one attention call. q, k, v: (B, nh, T, hs). Returns out (B, nh, T, hs) [, weights dict]."""
    if return_weights:
        return variant.reference(q, k, v, sigmoid_bias=sigmoid_bias, dropout_p=dropout_p, **inputs)
    chosen = resolve_backend(backend, variant, q, dropout_p)
    if chosen == "triton":
        from fused_attention import fused_attention
        return fused_attention(q, k, v, variant=variant.name, sigmoid_bias=sigmoid_bias, **inputs)
    if chosen == "sdpa":
        return variant.sdpa(q, k, v, dropout_p=dropout_p, **inputs)
    return variant.reference(q, k, v, sigmoid_bias=sigmoid_bias, dropout_p=dropout_p, **inputs)[0]
