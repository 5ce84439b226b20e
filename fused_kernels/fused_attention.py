"""Fused causal attention for every outlier-gpt attention variant: the public API and its autograd.

``fused_attention(q, k, v, *, sink=None, k_bias=None, v_bias=None, sigmoid=False, sigmoid_bias=None,
sm_scale=None) -> out``

    q, k, v       (B, H, T, D) of one dtype (float16, bfloat16 or float32), any strides (the model's
                  views of its fused qkv projection are used as they are); D in {16, 32, 64, 128};
                  1 <= T <= 65535 * 16; offsets inside one (batch, head) slice below 2**31
    sink, sigmoid the attention core (a KernelFlags, fused_kernels/flags.py): sink None / "learned" /
                  "context" / "zero", or sigmoid=True
    k_bias/v_bias (H, D) sink key / value of sink="learned" or "context", any float dtype (read as fp32)
    sigmoid_bias  b of sigmoid(S + b); None: -ln(T) of this call
    sm_scale      score scale, default 1/sqrt(D); positive
    out           (B, H, T, D) in q's dtype, laid out like q ((B, T, H, D) storage for the model's views)

Causal self-attention only: no cross-attention, GQA, padding masks, attention dropout or double
backward. CUDA tensors, or CPU tensors when the kernels were built for triton's interpreter
(TRITON_INTERPRET=1 at import; ``interpreting()``). Gradients reach q, k, v, k_bias and v_bias; the
backward is deterministic. float32 dots are IEEE unless torch's float32 matmul precision is not
"highest" (then TF32). Bad arguments raise ValueError; ``is_supported(q, dropout_p)`` says beforehand
whether q's shape, dtype and device can run.

Eager calls run one ``torch.autograd.Function`` that returns the output alone (no zero gradients built
for the saved log-sum-exp); under torch.compile, export, jit tracing or tensor subclasses the same
bodies run as the ``torch.library`` custom ops ``outlier_gpt::attention_fwd`` / ``attention_bwd``, whose
fake implementations allocate like the real ones, so compiled models trace with no graph break.
Arguments are checked once per metadata (fused_kernels/launch.py plans them). The full reference, with the
math of each core and every limit, is docs/kernels.md.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from fused_kernels import launch
from fused_kernels.attention_kernels import INTERPRET
from fused_kernels.flags import SINKS, KernelFlags
from fused_kernels.launch import alloc, bthd_layout

__all__ = [
    "SINKS",
    "fused_attention",
    "interpreting",
    "is_supported",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LOG2E = 1.4426950408889634

# Offsets inside one (batch, head) slice are computed in 32-bit integers by the
# kernels (the batch / head offsets and the (B*H, T) row buffers use 64-bit).
_MAX_OFFSET = 2**31
# query / key blocks are on grid axis 1 (at most 65535); the smallest tile is 16
_MAX_T = 65535 * 16


def _slice_span(t: torch.Tensor) -> int:
    """Largest element offset inside one (batch, head) slice of a (B, H, T[, D])
    tensor: sum over the T (and D) dims of (size - 1) * stride."""
    return sum((t.shape[i] - 1) * abs(t.stride(i)) for i in range(2, t.dim()))


def _out_span(q: torch.Tensor) -> int:
    """_slice_span of an output allocated like q (launch.alloc with q's layout)."""
    B, H, T, D = q.shape
    return (T - 1) * (H * D if bthd_layout(q) else D) + D - 1


def _offsets_fit(t: torch.Tensor) -> bool:
    return _slice_span(t) < _MAX_OFFSET


def _plan_for(q, k, v, k_bias, v_bias, sink, sigmoid) -> launch.Plan:
    """The launch plan of these arguments; checks them (ValueError) the first time their metadata is seen."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        _check(q, k, v, sink, sigmoid, k_bias, v_bias)
    return launch.plan(q, k, v, k_bias, v_bias, sink, sigmoid, _check)


# ----------------------------------------------------------------------------
# Forward and backward bodies, shared by the eager autograd.Function and the custom ops
# ----------------------------------------------------------------------------

_NO_SINK = "none"  # custom-op schemas take str, not Optional[str]


def _fwd_outputs(q, layout, context, sigmoid, placeholders=True):
    """(o, ou, lse) buffers of the forward (o laid out by ``layout``, see launch.alloc), shared by the real
    and the fake op.  The context sink's backward needs ou = softmax(S) V; other cores get an empty
    placeholder (None without ``placeholders``: the eager path returns o alone)."""
    B, H, T, D = q.shape
    o = alloc(q.shape, layout, q.dtype, q.device)
    if context:
        ou = alloc(q.shape, layout, q.dtype, q.device)
    else:
        ou = q.new_empty(0) if placeholders else None
    if sigmoid:  # no log-sum-exp: a defined placeholder, so the op's outputs are deterministic
        return o, ou, torch.zeros((1,), dtype=torch.float32, device=q.device)
    return o, ou, torch.empty((B * H, T), dtype=torch.float32, device=q.device)


def _bwd_outputs(q, layouts, k_bias, v_bias, placeholders=True):
    """(dq, dk, dv, dk_bias, dv_bias) buffers, dq / dk / dv laid out like q / k / v (``layouts``);
    without sink vectors the sink gradients are empty, or None without ``placeholders``."""
    def sink_grad(bias):
        if bias is not None:
            return torch.empty_like(bias)
        return q.new_empty(0) if placeholders else None  # one each: custom-op outputs must not alias

    dkb, dvb = sink_grad(k_bias), sink_grad(v_bias)
    return (*(alloc(q.shape, layout, q.dtype, q.device) for layout in layouts), dkb, dvb)


def _score_scale_bias(sigmoid, sm_scale, sig_bias):
    """The kernels work on base-2 logits: scale s log2(e), and sigmoid's bias b log2(e)."""
    return sm_scale * _LOG2E, (sig_bias * _LOG2E if sigmoid else 0.0)


def _forward(plan, q, k, v, k_bias, v_bias, sm_scale, sig_bias, placeholders=True):
    """The forward kernel: (o, ou, lse), see _fwd_outputs."""
    context, sigmoid = plan.switches["CONTEXT_SINK"], plan.switches["SIGMOID"]
    o, ou, lse = _fwd_outputs(q, plan.layouts[0], context, sigmoid, placeholders)
    score_scale, score_bias = _score_scale_bias(sigmoid, sm_scale, sig_bias)
    dummy = q  # pointer placeholder for unused operands (never dereferenced)
    args = (q, k, v, o, ou if context else o, lse,
            k_bias if k_bias is not None else dummy, v_bias if v_bias is not None else dummy,
            *plan.fwd_ints, score_scale, score_bias)
    launch.run(plan, ("fwd", launch.alignment(q, k, v, k_bias, v_bias)), args)
    return o, ou, lse


def _backward(plan, do, q, k, v, o, lse, k_bias, v_bias, sm_scale, sig_bias, placeholders=True):
    """The backward kernels: (dq, dk, dv, dk_bias, dv_bias), see _bwd_outputs.  ``o`` is softmax(S) V
    for the context sink, the output otherwise."""
    sigmoid = plan.switches["SIGMOID"]
    B, H, T, D = plan.shape
    dev = q.device
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    s_do = do.stride()
    # dO laid out like the output fits (checked with the arguments); else e.g. an odd incoming layout
    if s_do != plan.bwd_ints["dq"] and not _offsets_fit(do):
        do = do.contiguous()
        s_do = do.stride()
    score_scale, score_bias = _score_scale_bias(sigmoid, sm_scale, sig_bias)
    kb, vb = k_bias, v_bias
    dummy = q
    kb_ = kb if kb is not None else dummy
    f32 = torch.float32
    sink_params = plan.switches["SINK_PARAMS"]
    dq, dk, dv, dkb, dvb = _bwd_outputs(q, plan.layouts, kb, vb, placeholders)
    ints = plan.bwd_ints
    s_o = o.stride()
    align = launch.alignment(q, k, v, do, o, lse, kb, vb)

    delta = ds0 = lse  # placeholders for sigmoid (never read)
    if not sigmoid:
        nblk = plan.nblk
        delta = torch.empty((B * H, T), dtype=f32, device=dev)
        ds0 = torch.empty((B * H, T), dtype=f32, device=dev) if sink_params else delta
        dkb_part = dvb_part = delta
        if sink_params:
            dkb_part = torch.empty((B, H, nblk, D), dtype=f32, device=dev)
            dvb_part = torch.empty((B, H, nblk, D), dtype=f32, device=dev)
        launch.run(plan, ("pre", align, s_do, s_o), (
            o, do, q, kb_, vb if vb is not None else dummy, lse, delta, ds0, dkb_part, dvb_part,
            *s_o, *s_do, *ints["q"], *ints["bias"], H, T, nblk, sm_scale, score_scale))

    launch.run(plan, ("dkdv", align, s_do), (
        q, k, v, do, lse, delta, dk, dv,
        *ints["q"], *ints["k"], *ints["v"], *s_do, *ints["dk"], *ints["dv"],
        H, T, score_scale, sm_scale, score_bias))
    launch.run(plan, ("dq", align, s_do), (
        q, k, v, do, lse, delta, ds0, kb_, dq,
        *ints["q"], *ints["k"], *ints["v"], *s_do, *ints["dq"], *ints["kb"],
        H, T, score_scale, sm_scale, score_bias))

    if sink_params:  # a fixed-order reduction of the per-block partials: deterministic
        dkb.copy_(dkb_part.sum(dim=(0, 2)))
        dvb.copy_(dvb_part.sum(dim=(0, 2)))
    return dq, dk, dv, dkb, dvb


# ----------------------------------------------------------------------------
# Eager path: one autograd.Function around the bodies
# ----------------------------------------------------------------------------


class _FusedAttention(torch.autograd.Function):
    """Eager calls: the forward and backward bodies with no custom-op dispatch in between, and no zero
    gradients built for the outputs the backward does not read (lse, softmax(S) V): the forward returns
    the output alone."""

    @staticmethod
    def forward(ctx, q, k, v, k_bias, v_bias, options):
        plan, sm_scale, sig_bias = ctx.options = options
        o, ou, lse = _forward(plan, q, k, v, k_bias, v_bias, sm_scale, sig_bias, placeholders=False)
        ctx.set_materialize_grads(False)
        # the context sink's Delta comes from softmax(S) V (no cancellation of the sink term)
        ctx.save_for_backward(q, k, v, ou if plan.switches["CONTEXT_SINK"] else o, lse, k_bias, v_bias)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward
    def backward(ctx, do):
        if do is None:  # the output did not reach the loss
            return (None,) * 6
        q, k, v, o, lse, k_bias, v_bias = ctx.saved_tensors
        plan, sm_scale, sig_bias = ctx.options
        dq, dk, dv, dkb, dvb = _backward(plan, do, q, k, v, o, lse, k_bias, v_bias, sm_scale, sig_bias,
                                         placeholders=False)
        return dq, dk, dv, dkb, dvb, None


# ----------------------------------------------------------------------------
# torch.library custom ops: what torch.compile traces (opaque, no graph break), with fake
# implementations that allocate exactly like the real ones (same strides)
# ----------------------------------------------------------------------------


def _user_sink(sink: str):
    return None if sink == _NO_SINK else sink


@torch.library.custom_op("outlier_gpt::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_bias: Optional[torch.Tensor],
                   v_bias: Optional[torch.Tensor], sink: str, sigmoid: bool, sm_scale: float,
                   sig_bias: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan_for(q, k, v, k_bias, v_bias, _user_sink(sink), sigmoid)
    return _forward(plan, q, k, v, k_bias, v_bias, sm_scale, sig_bias)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, k_bias, v_bias, sink, sigmoid, sm_scale, sig_bias):
    return _fwd_outputs(q, bthd_layout(q), sink == "context", sigmoid)


@torch.library.custom_op("outlier_gpt::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, k_bias: Optional[torch.Tensor], v_bias: Optional[torch.Tensor],
                   sink: str, sigmoid: bool, sm_scale: float, sig_bias: float
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan_for(q, k, v, k_bias, v_bias, _user_sink(sink), sigmoid)
    return _backward(plan, do, q, k, v, o, lse, k_bias, v_bias, sm_scale, sig_bias)


@_attention_bwd.register_fake
def _attention_bwd_fake(do, q, k, v, o, lse, k_bias, v_bias, sink, sigmoid, sm_scale, sig_bias):
    return _bwd_outputs(q, [bthd_layout(t) for t in (q, k, v)], k_bias, v_bias)


def _setup_context(ctx, inputs, output):
    q, k, v, k_bias, v_bias, sink, sigmoid, sm_scale, sig_bias = inputs
    o, ou, lse = output
    # the context sink's Delta comes from softmax(S) V (no cancellation of the sink term)
    ctx.save_for_backward(q, k, v, ou if sink == "context" else o, lse, k_bias, v_bias)
    ctx.options = (sink, sigmoid, sm_scale, sig_bias)


def _op_backward(ctx, do, _d_ou, _d_lse):
    q, k, v, o, lse, k_bias, v_bias = ctx.saved_tensors
    dq, dk, dv, dkb, dvb = _attention_bwd(do, q, k, v, o, lse, k_bias, v_bias, *ctx.options)
    sink_params = k_bias is not None
    return (dq, dk, dv, dkb if sink_params else None, dvb if sink_params else None, None, None, None, None)


_attention_fwd.register_autograd(_op_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter
    (TRITON_INTERPRET was set when they were imported)."""
    return INTERPRET


def is_supported(q: torch.Tensor, dropout_p: float = 0.0) -> bool:
    """True when ``fused_attention`` can run this call: CUDA tensor (or any tensor
    with TRITON_INTERPRET set), head dim in {16, 32, 64, 128}, dtype fp16/bf16/fp32,
    no attention dropout and offsets of q's (batch, head) slices (and of the
    output's) within 32 bits."""
    if dropout_p:
        return False
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        return False
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or q.dtype not in SUPPORTED_DTYPES:
        return False
    if q.shape[2] > _MAX_T or not _offsets_fit(q) or _out_span(q) >= _MAX_OFFSET:
        return False
    return q.is_cuda or INTERPRET


def _check(q, k, v, sink, sigmoid, k_bias, v_bias):
    flags = KernelFlags(sink, sigmoid)  # ValueError for an unknown sink or a sink with sigmoid
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"fused_attention: {name} must be a 4-D (B, H, T, D) tensor, "
                             f"got {getattr(t, 'shape', type(t))}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError("fused_attention: q, k, v must have the same (B, H, T, D) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"fused_attention: head dim D={D} not supported; "
                         f"supported: {SUPPORTED_HEAD_DIMS}")
    if T < 1 or B < 1 or H < 1:
        raise ValueError(f"fused_attention: empty input shape {tuple(q.shape)}")
    if T > _MAX_T:
        raise ValueError(f"fused_attention: T={T} is above the supported {_MAX_T} "
                         "(65535 blocks of 16 on grid axis 1)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"fused_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fused_attention: dtype {q.dtype} not supported; "
                         "use float16, bfloat16 or float32")
    if not (q.device == k.device == v.device):
        raise ValueError("fused_attention: q, k, v are on different devices")
    if not (q.is_cuda or INTERPRET):
        raise ValueError("fused_attention: needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)")
    # 32-bit offsets inside one (batch, head) slice: inputs and outputs (laid out
    # like q: rows of H*D or of D elements)
    spans = [(name, _slice_span(t), tuple(t.stride())) for name, t in (("q", q), ("k", k), ("v", v))]
    spans.append(("the output", _out_span(q), (H * D if bthd_layout(q) else D, 1)))
    for name, span, strides in spans:
        if span >= _MAX_OFFSET:
            raise ValueError(
                f"fused_attention: {name} exceeds the kernels' 32-bit offsets: an element offset "
                f"inside one (batch, head) slice reaches {span} >= 2**31 (T * stride(T) and T * D "
                f"must stay below 2**31; shape {tuple(q.shape)}, strides {strides}); use shorter "
                "sequences or the PyTorch attention path")
    if flags.sink_params:
        for name, t in (("k_bias", k_bias), ("v_bias", v_bias)):
            if t is None:
                raise ValueError(f"fused_attention: sink={sink!r} needs {name} of shape (H, D)")
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (H, D):
                raise ValueError(f"fused_attention: {name} must have shape (H, D)=({H}, {D}), "
                                 f"got {tuple(getattr(t, 'shape', ()))}")
            if t.device != q.device or not t.is_floating_point():
                raise ValueError(f"fused_attention: {name} must be a floating tensor on {q.device}")
    elif k_bias is not None or v_bias is not None:
        raise ValueError(f"fused_attention: k_bias / v_bias are only read with sink='learned' or 'context', "
                         f"not sink={sink!r}")


def _traced(q) -> bool:
    """True under torch.compile, export or jit tracing, and for tensor subclasses (fake or functional
    tensors): these see the custom ops, which trace as one opaque node each."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or type(q) is not torch.Tensor


def _scales(q, sigmoid, sigmoid_bias, sm_scale):
    """(sm_scale, sigmoid bias) as floats, with their defaults."""
    T, D = q.shape[2], q.shape[3]
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    if not scale > 0:  # the forward takes the row max of unscaled scores
        raise ValueError(f"fused_attention: sm_scale must be positive, got {sm_scale}")
    if sigmoid:
        return scale, float(sigmoid_bias) if sigmoid_bias is not None else -math.log(T)
    return scale, 0.0


def fused_attention(q, k, v, *, sink=None, k_bias=None, v_bias=None, sigmoid=False,
                    sigmoid_bias=None, sm_scale=None):
    """Causal fused attention; see the module docstring for the options."""
    sigmoid = bool(sigmoid)
    if _traced(q):
        _check(q, k, v, sink, sigmoid, k_bias, v_bias)
        scale, sig_bias = _scales(q, sigmoid, sigmoid_bias, sm_scale)
        out, _, _ = _attention_fwd(q, k, v, k_bias, v_bias, sink or _NO_SINK, sigmoid, scale, sig_bias)
        return out
    plan = _plan_for(q, k, v, k_bias, v_bias, sink, sigmoid)
    return _FusedAttention.apply(q, k, v, k_bias, v_bias, (plan, *_scales(q, sigmoid, sigmoid_bias, sm_scale)))
