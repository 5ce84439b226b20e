"""Fused causal attention for every outlier-gpt attention variant (Triton).

FlashAttention-2-style kernels: an online softmax over key tiles, no T x T tensor
is ever written to memory, and the forward saves one log-sum-exp per row (base 2)
for the backward.  One kernel family covers the attention cores that change the
inner loop, chosen by named ``tl.constexpr`` flags.  Which flags a variant uses
is the variant's own business (its entry in attention_variants.py); variants
that are "default attention + an elementwise step" (fixed_bias, scaling, gated)
run the default kernel and do the step in torch.

Public API
----------
``fused_attention(q, k, v, *, sink=None, k_bias=None, v_bias=None,
sigmoid=False, sigmoid_bias=None, sm_scale=None) -> out``

    q, k, v       (B, H, T, D), any strides (views of one fused qkv projection
                  are used as they are; nothing is made contiguous).
    sink          where an attention sink enters (per head, s = sm_scale,
                  S = Q K^T s, causal):
                    None       softmax(S) V
                    "learned"  softmax([q.k' s ; S]) [v' ; V]: a learned sink
                               key/value column seen by every query, including
                               the first (the initial state of the online
                               softmax); needs k_bias, v_bias
                    "context"  softmax(S) V + p_sink v', p_sink =
                               sigmoid(q.k' s - lse(S)): the sink's probability
                               in the softmax that includes it; needs k_bias,
                               v_bias
                    "zero"     softmax over [0 ; S] with value [0 ; V]: a sink
                               of logit 0 and value 0 (softmax off by one)
    k_bias/v_bias (H, D): the sink key/value; any float dtype, read as float32.
    sigmoid       sigmoid(S + b) V with no row max / row sum (FlashSigmoid-
                  style); b = sigmoid_bias, ``None`` meaning -ln(T) of this call.
                  Not combinable with a sink.
    sm_scale      score scale, default 1/sqrt(D).
    out           (B, H, T, D) in q's dtype.  When q is a (B, T, H, D) buffer seen
                  through ``transpose(1, 2)`` (the model's layout) the output is
                  allocated the same way, so ``out.transpose(1, 2).reshape(B, T, C)``
                  is free.

Gradients are returned for q, k, v, k_bias and v_bias.  The backward is
deterministic: a preprocess kernel (Delta, sink terms), a dK/dV kernel iterating
over query blocks and a dQ kernel iterating over key blocks; no atomics.  The
k_bias / v_bias gradients are computed per (batch, head, query block) into a
scratch buffer and summed with torch (a fixed-order reduction), so two backward
passes give bit-identical gradients.

Also exported: ``SINKS``, ``is_supported(q, dropout_p)`` and ``interpreting()``
(True when the kernels were built for Triton's CPU interpreter).  The ground
truth the tests compare against is each variant's ``reference`` in
attention_variants.py.

Supported / limits
------------------
* dtypes: float16, bfloat16, float32 (q, k, v must share one dtype).  float32
  dots use IEEE fp32 unless ``torch.get_float32_matmul_precision()`` is not
  "highest", in which case TF32 is used, mirroring PyTorch matmuls.  IEEE fp32
  is emulated with several tensor-core passes and uses small tiles: it is slow
  (meant for checks, not training); use bf16/fp16, or TF32.
* head dim D in {16, 32, 64, 128}; any B and H (B * H is on grid axis 0, so it
  is not bound by the 65535 limit of axes 1/2); 1 <= T <= 65535 * 16 = 1,048,560
  (query / key blocks are on grid axis 1; tails are masked).
* causal self-attention only (q, k, v share T; no cross-attention, no GQA/MQA,
  no padding / key masks); no dropout on the attention probabilities (use the
  PyTorch path when attention dropout > 0); no double backward.
* CUDA tensors (or CPU tensors with TRITON_INTERPRET=1, which is slow and meant
  for tests).  Launches go to q's device.  Offsets inside one (batch, head) slice
  are 32-bit: T * stride(T) and T * D must stay below 2**31 (more exactly, the
  largest element offset inside a slice of q, k, v and the output); larger
  inputs raise a ValueError.
* Tile sizes: a few candidates per kernel, architecture (sm_90+ and sm_8x),
  head dim and dtype, all compiled ahead of time without register spills
  (benchmarks/kernel_registers.py); on a GPU ``triton.autotune`` picks the
  fastest once per (kernel, head dim, dtype, flags, precision, power-of-two
  bucket of T) and the choice is printed once.  triton keeps the results in its
  cache directory (``cache_results``), so later processes reuse them; processes
  with different caches may pick different tiles, which changes the last bits;
  ``OUTLIER_GPT_AUTOTUNE=0`` (read at a launch key's first launch) uses the
  first candidate that fits everywhere.  Measured speed: benchmarks/RESULTS.md.
* Host time: eager calls (outside torch.compile and tracing) run the forward
  and backward bodies through one ``torch.autograd.Function`` that returns the
  output alone, so no zero gradients are built for the saved log-sum-exp.
  Argument checks and the kernels' integer arguments are worked out once per
  (flags, dtypes, shapes, strides, devices).  After the first launch of a
  kernel for a launch key (those plus 16-byte pointer alignment) the compiled
  kernel is launched directly, bypassing triton's autotuner and argument binder
  (triton 3.4 to 3.9, whose launch convention was checked; other versions, the
  interpreter, and launches while a triton launch hook is set go through triton
  every time).  benchmarks/host_overhead.py
  measures the host time per call.
* The CPU-interpreter tests need triton >= 3.9, or numpy < 2.4 with older
  triton: triton 3.6's interpreter breaks with numpy >= 2.4.
* Under the CPU interpreter bf16 is emulated: dot operands are upcast to fp32
  (exact) and fp32 -> bf16 casts are rounded to nearest even explicitly (the
  interpreter truncates), so results match what the GPU computes up to
  summation order.
* ``sink="context"`` also writes the plain attention output softmax(S) V as an
  extra (B, H, T, D) buffer saved for the backward (its Delta is computed from
  it, with no cancellation of the sink term).
* Under torch.compile (and export, jit tracing, or for tensor subclasses such
  as fake tensors) the same bodies run as ``torch.library`` custom ops
  (``outlier_gpt::attention_fwd`` / ``attention_bwd``) with fake implementations
  that allocate like the real ones, so ``torch.compile(model, fullgraph=True)``
  traces the model with no graph break; the kernels run as opaque calls inside the
  compiled graph.
* Probabilities and dS are cast to the input dtype before the second matmul, as
  in FlashAttention; accumulation is float32.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

try:  # present in every triton 3.x; keep a fallback so imports never break
    from triton.runtime.errors import OutOfResources as _OutOfResources
except Exception:  # pragma: no cover
    _OutOfResources = RuntimeError
try:  # ptxas failures (e.g. too many registers / shared memory); not in every version
    from triton.runtime.errors import PTXASError as _PTXASError
except Exception:  # pragma: no cover
    _PTXASError = None
# errors that mean "this tile config does not fit this GPU": try the next one
_FIT_ERRORS = tuple(e for e in (_OutOfResources, _PTXASError) if e is not None)

__all__ = [
    "SINKS",
    "fused_attention",
    "interpreting",
    "is_supported",
]

SINKS = (None, "learned", "context", "zero")
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LOG2E = 1.4426950408889634


class _Flags(NamedTuple):
    """The kernels' tl.constexpr switches, by name."""
    SIGMOID: bool = False        # sigmoid(S + b) instead of softmax
    LEARNED_SINK: bool = False   # k'/v' column inside the softmax
    CONTEXT_SINK: bool = False   # k'/v' term beside the softmax
    ZERO_SINK: bool = False      # logit-0, value-0 column inside the softmax

    @property
    def has_sink_params(self):
        return self.LEARNED_SINK or self.CONTEXT_SINK


def _flags(sink, sigmoid):
    return _Flags(SIGMOID=bool(sigmoid), LEARNED_SINK=sink == "learned", CONTEXT_SINK=sink == "context",
                  ZERO_SINK=sink == "zero")


# ----------------------------------------------------------------------------
# Triton kernels.  Scores are kept in base 2: qk2 = q.k * qk_scale + score_bias with
# qk_scale = sm_scale * log2(e) (score_bias = b * log2(e) for sigmoid, 0 otherwise);
# LSE is stored as log2(sum exp2(qk2)).
# ----------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST is only set under the Triton CPU interpreter for bfloat16, whose
    # numpy emulation stores bf16 as uint16 and cannot multiply it; bf16 -> fp32
    # is exact, so an fp32 dot reproduces the GPU's bf16 MMA with fp32 accumulate.
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def _rne(x, UPCAST: tl.constexpr):
    # Under the interpreter (UPCAST, bf16 only) fp32 -> bf16 casts truncate; round
    # to nearest even here so the later .to(bf16) is exact, as on the GPU.
    if UPCAST:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _sigmoid_base2(z2):
    # sigmoid(z) from z2 = z log2(e).  Not 0.5 tanh.approx(z / 2) + 0.5: tanh.approx's
    # error (~2^-11 of |tanh| ~ 1) is an absolute error of ~2e-4 on p, while sigmoid
    # attention's weights are ~1/T (b = -ln T), so small weights would be far off.
    return 1.0 / (1.0 + tl.exp2(-z2))


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base,
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, lo, hi, T, qk_scale, score_bias,
    SIGMOID: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
        if MASKED:
            kt = tl.load(kt_ptrs, mask=offs_n[None, :] < T, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        qk = _dot(q, kt, None, PREC, UPCAST)  # unscaled: the scale is folded into one FMA below
        if SIGMOID:
            p = _sigmoid_base2(qk * qk_scale + score_bias)
            if MASKED:
                valid = (offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] < T)
                p = tl.where(valid, p, 0.0)
            acc = _dot(_rne(p, UPCAST).to(v.dtype), v, acc, PREC, UPCAST)
        else:
            if MASKED:
                valid = (offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] < T)
                qk = tl.where(valid, qk, float("-inf"))
            # qk_scale > 0, so max(qk) * qk_scale is the max of the scaled scores
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = _dot(_rne(p, UPCAST).to(v.dtype), v, acc, PREC, UPCAST)
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, OU, LSE, KB, VB,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_kbh, stride_kbd, stride_vbh, stride_vbd,
    H, T, qk_scale, score_bias, T_BUCKET,
    SIGMOID: tl.constexpr, LEARNED_SINK: tl.constexpr,
    CONTEXT_SINK: tl.constexpr, ZERO_SINK: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # T_BUCKET is unused here: it is the autotuner's key for the sequence length.
    # B*H on grid axis 0 (up to 2**31 - 1 programs; axes 1/2 stop at 65535),
    # query blocks on axis 1, heaviest (last, most key blocks) first so that the
    # light blocks fill the end of the launch
    bh = tl.program_id(0)
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_off = off_b * stride_ob + off_h * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)

    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if LEARNED_SINK or CONTEXT_SINK:
        kb = tl.load(KB + off_h * stride_kbh + offs_d * stride_kbd).to(tl.float32)
        s0 = tl.sum(q.to(tl.float32) * kb[None, :], 1) * qk_scale
    if LEARNED_SINK:
        # the sink column starts the online softmax (m0 = s0, l0 = 1); its value
        # v' is added in the epilogue with weight exp2(s0 - m), so v' is not
        # kept live through the loop
        m_i = s0
        l_i = l_i + 1.0
    if ZERO_SINK:
        # logit 0 (base 2 as well), value 0: only the normaliser sees it
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        l_i = l_i + 1.0

    # key blocks strictly below the diagonal block: no mask, no bound checks
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, 0, start_m * BLOCK_M, T, qk_scale, score_bias,
        SIGMOID, BLOCK_N, False, PREC, UPCAST)
    # diagonal block: causal mask and key tail mask
    hi = tl.minimum((start_m + 1) * BLOCK_M, T)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, start_m * BLOCK_M, hi, T, qk_scale, score_bias,
        SIGMOID, BLOCK_N, True, PREC, UPCAST)

    if LEARNED_SINK:
        vb = tl.load(VB + off_h * stride_vbh + offs_d * stride_vbd).to(tl.float32)
        acc = acc + tl.exp2(s0 - m_i)[:, None] * vb[None, :]
    if not SIGMOID:
        acc = acc / l_i[:, None]
        lse = m_i + tl.log2(l_i)
        tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)
    o_ptrs = offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    if CONTEXT_SINK:
        # the plain attention output softmax(S) V, saved for the backward's Delta
        tl.store(OU + o_off + o_ptrs, _rne(acc, UPCAST).to(OU.dtype.element_ty), mask=row_ok[:, None])
        vb = tl.load(VB + off_h * stride_vbh + offs_d * stride_vbd).to(tl.float32)
        # p_sink = exp(s0) / (exp(s0) + sum exp(S)) = sigmoid(s0 - lse)
        p_sink = 1.0 / (1.0 + tl.exp2(lse - s0))
        acc = acc + p_sink[:, None] * vb[None, :]
    tl.store(O + o_off + o_ptrs, _rne(acc, UPCAST).to(O.dtype.element_ty), mask=row_ok[:, None])


# Backward derivations (per head, natural-log units, s = sm_scale):
#
# Softmax cores use the usual FlashAttention form
#     dP = dO V^T,  dS = P o (dP - Delta),  dQ = s dS K,  dK = s dS^T Q,  dV = P^T dO
# with Delta_i = rowsum(dO_i o O_i) and P = exp(S - LSE).  For a sink inside the
# softmax (learned or zero) LSE includes the sink, so P and Delta = dO . out are
# already right for the key columns; the zero sink has no parameters and no
# other term.
#
# learned sink: Delta_i = dO_i . out_i,  c_i = dO_i . v',  p0_i = exp(s0_i - LSE_i)
#     dS0_i = p0_i (c_i - Delta_i),  d v' = sum_i p0_i dO_i,  d k' = s sum_i dS0_i q_i,
#     dQ_i += s dS0_i k'.
#
# context sink: out_i = O_a,i + p_i v' with L_i = lse_j(S_ij) (no sink) and
#     p_i = sigmoid(s0_i - L_i).  Let c_i = dO_i . v'.  Then
#       d p_i = c_i  ->  d(s0_i - L_i) = e_i := c_i p_i (1 - p_i)
#       d s0_i = e_i,  d L_i = -e_i,  and dL_i/dS_ij = P_ij (P = softmax without sink)
#     so dS_ij = P_ij (dP_ij - Delta^a_i) - e_i P_ij = P_ij (dP_ij - (Delta^a_i + e_i)),
#     with Delta^a_i = dO_i . O_a,i (O_a saved by the forward).  Hence the usual
#     FlashAttention form with the per-row corrected
#       Delta_i = dO_i . O_a,i + c_i p_i (1 - p_i)
#     plus the sink terms  dS0_i = e_i,  d v' = sum_i p_i dO_i,  d k' = s sum_i e_i q_i,
#     dQ_i += s e_i k'.  p_i is recomputed from q_i, k' and the saved L_i.
#
# sigmoid: P = sigmoid(S + b), dS = dP o P o (1 - P); no Delta.


@triton.jit
def _bwd_preprocess(
    O, DO, Q, KB, VB, LSE, DELTA, DS0, DKB_PART, DVB_PART,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kbh, stride_kbd, stride_vbh, stride_vbd,
    H, T, NBLK, sm_scale, qk_scale,
    LEARNED_SINK: tl.constexpr, CONTEXT_SINK: tl.constexpr,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(0)
    start_m = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh
                + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    # O is the saved plain attention output softmax(S) V for the context sink,
    # and the returned output otherwise
    delta = tl.sum(o * do, 1)
    row_idx = bh.to(tl.int64) * T + offs_m
    if LEARNED_SINK or CONTEXT_SINK:
        vb = tl.load(VB + off_h * stride_vbh + offs_d * stride_vbd).to(tl.float32)
        kb = tl.load(KB + off_h * stride_kbh + offs_d * stride_kbd).to(tl.float32)
        q = tl.load(Q + off_b * stride_qb + off_h * stride_qh
                    + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0).to(tl.float32)
        s0 = tl.sum(q * kb[None, :], 1) * qk_scale
        lse = tl.load(LSE + row_idx, mask=row_ok, other=0.0)
        c = tl.sum(do * vb[None, :], 1)
        if LEARNED_SINK:
            p = tl.exp2(s0 - lse)
            ds0 = p * (c - delta)
        else:
            p = 1.0 / (1.0 + tl.exp2(lse - s0))
            ds0 = c * p * (1.0 - p)
            delta = delta + ds0
        p = tl.where(row_ok, p, 0.0)
        ds0 = tl.where(row_ok, ds0, 0.0)
        tl.store(DS0 + row_idx, ds0, mask=row_ok)
        part = (bh.to(tl.int64) * NBLK + start_m) * HEAD_D + offs_d
        tl.store(DVB_PART + part, tl.sum(p[:, None] * do, 0))
        tl.store(DKB_PART + part, tl.sum(ds0[:, None] * q, 0) * sm_scale)
    tl.store(DELTA + row_idx, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, LSE_row, DELTA_row,
    stride_qt, stride_qd, stride_dot, stride_dod,
    offs_n, offs_d, lo, hi, T, qk_scale, score_bias,
    SIGMOID: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        # rows past T load as zeros (q, dO, lse, Delta): they contribute 0
        qt = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd,
                     mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None], other=0.0)
        qkt = _dot(k, qt, None, PREC, UPCAST)
        if SIGMOID:
            pt = _sigmoid_base2(qkt * qk_scale + score_bias)
        else:
            lse = tl.load(LSE_row + offs_m, mask=row_ok, other=0.0)
            pt = tl.exp2(qkt * qk_scale - lse[None, :])
        if MASKED:
            pt = tl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
        dv = _dot(_rne(pt, UPCAST).to(do.dtype), do, dv, PREC, UPCAST)
        dpt = _dot(v, tl.trans(do), None, PREC, UPCAST)
        if SIGMOID:
            dst = pt * (1.0 - pt) * dpt
        else:
            delta = tl.load(DELTA_row + offs_m, mask=row_ok, other=0.0)
            dst = pt * (dpt - delta[None, :])
        dk = _dot(_rne(dst, UPCAST).to(qt.dtype), tl.trans(qt), dk, PREC, UPCAST)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, T, qk_scale, sm_scale, score_bias, T_BUCKET,
    SIGMOID: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # B*H on axis 0; key blocks on axis 1 in natural order (block 0 has the most work)
    bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    col_ok = offs_n < T
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh
                + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh
                + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=col_ok[:, None], other=0.0)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    lse_row = LSE + bh.to(tl.int64) * T
    delta_row = DELTA + bh.to(tl.int64) * T
    dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    # query blocks overlapping the diagonal (masked) ...
    hi = tl.minimum(start_n + BLOCK_N, T)
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_row, delta_row,
        stride_qt, stride_qd, stride_dot, stride_dod,
        offs_n, offs_d, start_n, hi, T, qk_scale, score_bias,
        SIGMOID, BLOCK_M, True, PREC, UPCAST)
    # ... then every later query block (no causal mask)
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_row, delta_row,
        stride_qt, stride_qd, stride_dot, stride_dod,
        offs_n, offs_d, start_n + BLOCK_N, T, T, qk_scale, score_bias,
        SIGMOID, BLOCK_M, False, PREC, UPCAST)
    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh
             + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             _rne(dk, UPCAST).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh
             + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             _rne(dv, UPCAST).to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base,
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, lo, hi, T, qk_scale, score_bias,
    SIGMOID: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
        vt_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd
        if MASKED:
            kt = tl.load(kt_ptrs, mask=offs_n[None, :] < T, other=0.0)
            vt = tl.load(vt_ptrs, mask=offs_n[None, :] < T, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            vt = tl.load(vt_ptrs)
        qk = _dot(q, kt, None, PREC, UPCAST)
        if SIGMOID:
            p = _sigmoid_base2(qk * qk_scale + score_bias)
        else:
            p = tl.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            valid = (offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] < T)
            p = tl.where(valid, p, 0.0)
        dp = _dot(do, vt, None, PREC, UPCAST)
        if SIGMOID:
            ds = p * (1.0 - p) * dp
        else:
            ds = p * (dp - delta[:, None])
        dq = _dot(_rne(ds, UPCAST).to(kt.dtype), tl.trans(kt), dq, PREC, UPCAST)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DS0, KB, DQ,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_kbh, stride_kbd,
    H, T, qk_scale, sm_scale, score_bias, T_BUCKET,
    SIGMOID: tl.constexpr, SINK_PARAMS: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    # B*H on axis 0; query blocks on axis 1, heaviest (last) first
    bh = tl.program_id(0)
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh
                + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    row_idx = bh.to(tl.int64) * T + offs_m
    if SIGMOID:
        lse = tl.zeros([BLOCK_M], dtype=tl.float32)
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        lse = tl.load(LSE + row_idx, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + row_idx, mask=row_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, 0, start_m * BLOCK_M, T, qk_scale, score_bias,
        SIGMOID, BLOCK_N, False, PREC, UPCAST)
    hi = tl.minimum((start_m + 1) * BLOCK_M, T)
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, start_m * BLOCK_M, hi, T, qk_scale, score_bias,
        SIGMOID, BLOCK_N, True, PREC, UPCAST)
    dq = dq * sm_scale
    if SINK_PARAMS:
        ds0 = tl.load(DS0 + row_idx, mask=row_ok, other=0.0)
        kb = tl.load(KB + off_h * stride_kbh + offs_d * stride_kbd).to(tl.float32)
        dq = dq + (ds0 * sm_scale)[:, None] * kb[None, :]
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh
             + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             _rne(dq, UPCAST).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# Triton decides interpreter vs. compiled kernels once, when @triton.jit runs
# (i.e. when this module is imported, from TRITON_INTERPRET); read that decision
# from the kernels themselves so the host code always agrees with it.
_INTERPRET = not isinstance(_fwd_kernel, triton.runtime.jit.JITFunction)

# Launch options passed explicitly: FP fusion (FMA contraction) on, which is the
# default of every Triton 3.x; passing it silences triton 3.9's warning about the
# default changing in 3.10 and keeps the numerics fixed across versions.
_LAUNCH_OPTS = {"enable_fp_fusion": True}

# ----------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------
# Each candidate: (BLOCK_M, BLOCK_N, num_warps, num_stages).  Constraints used by
# the causal loops: fwd and dq need BLOCK_M % BLOCK_N == 0, dkdv needs
# BLOCK_N % BLOCK_M == 0.  The candidates depend on the compute capability
# (Hopper and newer: larger tiles, wgmma; sm_8x: smaller tiles that fit its
# register file with mma.sync) and were compiled ahead of time for their arch
# (benchmarks/kernel_registers.py; bf16, D = 64 and 128, every flag combination)
# without register spills.  On a GPU, triton.autotune times the candidates once
# per (kernel, head dim, dtype, flags, dot precision, bucket of T) and keeps the
# fastest; configs that do not fit the GPU are skipped by the autotuner.  With
# OUTLIER_GPT_AUTOTUNE=0 the first candidate that fits is used instead, so that
# launches (and bits) are the same in every process.

_INTERP_TABLE = {
    # moderate tiles keep the numpy interpreter fast (fewer, larger steps) while
    # T > 64 still exercises the off-diagonal / diagonal / tail paths, with 2
    # sub-blocks per diagonal block as in the GPU configs
    "fwd": [(64, 32, 4, 1)],
    "dkdv": [(32, 64, 4, 1)],
    "dq": [(64, 32, 4, 1)],
}

# Hopper and newer, 16-bit inputs, by head dim (D = 16 / 32 use the D = 32 row)
_SM90_TABLE = {
    "fwd": {32: [(128, 64, 4, 3), (64, 64, 4, 3)],
            64: [(128, 128, 8, 3), (128, 64, 8, 3)],
            128: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2)]},
    "dkdv": {32: [(64, 128, 8, 2), (32, 128, 4, 3)],
             64: [(64, 128, 8, 2), (32, 128, 8, 3)],
             128: [(32, 128, 8, 2), (32, 64, 8, 2)]},
    "dq": {32: [(128, 64, 8, 2), (128, 32, 4, 3)],
           64: [(128, 64, 8, 2), (128, 32, 4, 3)],
           128: [(128, 64, 8, 2), (128, 32, 8, 2)]},
}

# sm_8x, 16-bit inputs: mma.sync keeps the accumulators in registers, so smaller tiles; at most
# 88 KB of shared memory, so they also fit sm_86/sm_89 (99 KB)
_SM8X_TABLE = {
    "fwd": {16: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
            32: [(128, 64, 4, 3), (64, 32, 4, 2)],
            64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
            128: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)]},
    "dkdv": {16: [(32, 128, 4, 3), (32, 64, 4, 2)],
             32: [(32, 128, 4, 3), (32, 64, 4, 2)],
             64: [(32, 128, 8, 3), (32, 64, 4, 3)],
             128: [(32, 64, 8, 2), (32, 32, 4, 2)]},
    "dq": {16: [(128, 32, 4, 3), (64, 32, 4, 2)],
           32: [(128, 32, 4, 3), (64, 32, 4, 2)],
           64: [(128, 32, 8, 3), (64, 32, 4, 3)],
           128: [(64, 32, 4, 3), (64, 32, 4, 2)]},
}

# fp32 inputs (any arch): 2x the registers / shared memory per element; meant for checks
_FP32_TABLE = {
    "fwd": [(64, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    "dkdv": [(32, 64, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    "dq": [(64, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)],
}


def _candidates(kind: str, D: int, dtype: torch.dtype, arch=None):
    """Tile candidates for ``kind`` in {"fwd", "dkdv", "dq"}.  ``arch`` is the
    compute capability as major * 10 + minor (90 for H100/H200, 80 for A100);
    ``None`` means the CPU interpreter."""
    if arch is None:
        return list(_INTERP_TABLE[kind])
    if dtype == torch.float32:
        return list(_FP32_TABLE[kind])
    if 90 <= arch < 120:  # Hopper / datacenter Blackwell: ~228 KB of shared memory per SM
        return list(_SM90_TABLE[kind][max(D, 32)])
    return list(_SM8X_TABLE[kind][min(D, 128)])


# (kernel, D, dtype, flags, dot precision, device, compute capability, T bucket) -> config
_CHOSEN: dict = {}
_CHOSEN_KEY_FIELDS = ("kernel", "head_dim", "dtype", "flags", "precision", "device", "arch", "t_bucket")


# Test-only hooks: _FORCE_ARCH set to a compute capability (e.g. 90 or 80) uses that GPU
# table under the interpreter, and _FORCE_CANDIDATE picks its i-th candidate (the tests run
# every GPU tile candidate, ragged tails included, under the interpreter).
_FORCE_ARCH = None
_FORCE_CANDIDATE = None

# the constexprs that select a kernel specialisation: part of the autotuning key
_TUNE_KEY = ("HEAD_D", "PREC", "SIGMOID", "LEARNED_SINK", "CONTEXT_SINK", "ZERO_SINK",
             "SINK_PARAMS", "T_BUCKET")
_TUNERS: dict = {}
_UNTUNABLE: set = set()  # launch keys whose autotuning failed to fit: the first candidate that fits is used

# triton.autotune's cache_results (in triton 3.6 and 3.9) keeps the tuning results in triton's cache
# directory, keyed on the triton build, the GPU architecture, the kernel source, the tuning key and the
# candidates: a second process does not benchmark the candidates again
_AUTOTUNE_DISK_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters


def _autotune_enabled() -> bool:
    return os.environ.get("OUTLIER_GPT_AUTOTUNE", "1") != "0"


def _t_bucket(T: int) -> int:
    """Sequence lengths that share a tuning result: powers of two from 16 to 65536."""
    return min(triton.next_power_of_2(max(T, 16)), 1 << 16)


def _tuner(kind, kernel):
    """triton.autotune over every candidate of every table, pruned per call to the candidates of
    the call's (arch, head dim, dtype)."""
    if kind not in _TUNERS:
        tables = [_SM90_TABLE[kind], _SM8X_TABLE[kind], {0: _FP32_TABLE[kind]}]
        every = list(dict.fromkeys(cfg for table in tables for cands in table.values() for cfg in cands))
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for bm, bn, w, s in every]

        def prune(configs, named_args, **kwargs):
            q = named_args["Q"]
            wanted = _candidates(kind, kwargs["HEAD_D"], q.dtype, _device_arch(q.device))
            return [c for c in configs if _config_tuple(c) in wanted]

        names = kernel.arg_names
        disk = {"cache_results": True} if _AUTOTUNE_DISK_CACHE else {}
        _TUNERS[kind] = triton.autotune(configs=configs, key=[k for k in _TUNE_KEY if k in names],
                                        prune_configs_by={"early_config_prune": prune}, **disk)(kernel)
    return _TUNERS[kind]


def _config_tuple(config):
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter
    (TRITON_INTERPRET was set when this module was imported)."""
    return _INTERPRET


_ARCH: dict = {}  # CUDA device index -> compute capability


def _device_arch(device: torch.device):
    """Compute capability of ``device`` as major * 10 + minor; None under the
    interpreter or for a non-CUDA device."""
    if _FORCE_ARCH is not None:
        return _FORCE_ARCH
    if _INTERPRET or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCH:
        major, minor = torch.cuda.get_device_capability(index)
        _ARCH[index] = 10 * major + minor
    return _ARCH[index]


def _on_device(device: torch.device):
    """Context that makes ``device`` current for the launches (Triton launches on the current CUDA
    device, not necessarily the tensors' one); nothing to do when it already is."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _compile_and_launch(call, kind, args):
    """Launch kernel ``kind`` through triton: with the autotuned tile config, or the first candidate that
    fits when not tuning; records the choice.  Returns (what triton launched: its CompiledKernel, None
    under the interpreter; the grid; the kernel's named arguments after ``args``), from which the launch
    cache builds its direct launch."""
    kernel, constexprs = _KERNELS[kind], call.constexprs[kind]
    B, H, T, D = call.shape
    BH = B * H
    if kind == "pre":  # one fixed config: nothing to tune
        grid = (BH, triton.cdiv(T, constexprs["BLOCK_M"]))
        return kernel[grid](*args, num_warps=4, **_LAUNCH_OPTS, **constexprs), grid, constexprs
    arch, dtype = call.arch, call.dtype
    bucket = _t_bucket(T)
    flags = ",".join(name for name, value in constexprs.items() if value is True) or "softmax"
    key = (kind, D, dtype, flags, constexprs.get("PREC"), str(call.device), arch, bucket)
    tile = "BLOCK_M" if kind in ("fwd", "dq") else "BLOCK_N"
    cands = _candidates(kind, D, dtype, arch)
    if _FORCE_CANDIDATE is not None:
        cands = [cands[min(_FORCE_CANDIDATE, len(cands) - 1)]]
    if not _INTERPRET and _autotune_enabled() and len(cands) > 1 and key not in _UNTUNABLE:
        tuner = _tuner(kind, kernel)
        try:
            compiled = tuner[lambda meta: (BH, triton.cdiv(T, meta[tile]))](
                *args, T_BUCKET=bucket, **_LAUNCH_OPTS, **constexprs)
        except _FIT_ERRORS:  # pragma: no cover - GPU only: no candidate fits, try them one by one below
            _UNTUNABLE.add(key)
            return _compile_and_launch(call, kind, args)
        cfg = _config_tuple(tuner.best_config)
        if _CHOSEN.get(key) != cfg:
            print(f"fused_attention: autotuned {kind} (D={D}, {str(dtype)[6:]}, {flags}, T<={bucket}, "
                  f"sm_{arch}): BLOCK_M={cfg[0]} BLOCK_N={cfg[1]} num_warps={cfg[2]} num_stages={cfg[3]}",
                  flush=True)
        _CHOSEN[key] = cfg
        grid = (BH, triton.cdiv(T, cfg[0] if tile == "BLOCK_M" else cfg[1]))
        return compiled, grid, dict(T_BUCKET=bucket, **constexprs, BLOCK_M=cfg[0], BLOCK_N=cfg[1])
    if key in _CHOSEN and _FORCE_CANDIDATE is None:
        cands = [_CHOSEN[key]]
    last_err = None
    for cfg in cands:
        bm, bn, warps, stages = cfg
        grid = (BH, triton.cdiv(T, bm if tile == "BLOCK_M" else bn))
        named = dict(T_BUCKET=bucket, **constexprs, BLOCK_M=bm, BLOCK_N=bn)
        try:
            compiled = kernel[grid](*args, num_warps=warps, num_stages=stages, **_LAUNCH_OPTS, **named)
        except _FIT_ERRORS as err:  # pragma: no cover - GPU only
            last_err = err
            continue
        _CHOSEN[key] = cfg
        return compiled, grid, named
    raise RuntimeError(f"fused_attention: no {kind} config fits this GPU "
                       f"({call.device}, sm_{arch})") from last_err


# ----------------------------------------------------------------------------
# Launch cache
# ----------------------------------------------------------------------------
# Launching through triton costs host time on every call: the autotuner builds its key from every
# argument, and the argument binder specialises each of ~40 arguments (integer divisibility, pointer
# alignment, dtypes) to find the compiled kernel.  For one launch key (the kernel, its flags,
# the arguments' dtypes, shapes, strides and 16-byte pointer alignment, the device) all of that
# gives the same compiled kernel, grid and constexprs every time, so after the first launch of a key
# the cache calls the launcher triton built for that kernel directly.  Any other key goes through
# triton (and then gets its own entry).  Checked against the sources of triton 3.4 to 3.9, where a
# CompiledKernel is launched as
#     kernel.run(grid_x, grid_y, grid_z, stream, kernel.function, kernel.packed_metadata,
#                launch_metadata, launch_enter_hook, launch_exit_hook, *every_argument_in_order)
# (constexprs included; the launcher drops them).  Other versions (a later one may change this
# private convention), the interpreter and launches with triton launch hooks set (profilers such as
# proton want their metadata) always go through triton.

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - triton < 3.4
    _knobs = None
_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split("+")[0].split(".")[:2])
_FAST_LAUNCH = _knobs is not None and not _INTERPRET and (3, 4) <= _TRITON_VERSION <= (3, 9)


def _launch_hooks_idle():
    # each hook is None (triton 3.4) or a HookChain (3.5+), idle when empty; a plain function is active
    runtime = _knobs.runtime
    return not (getattr(runtime.launch_enter_hook, "calls", runtime.launch_enter_hook)
                or getattr(runtime.launch_exit_hook, "calls", runtime.launch_exit_hook))


class _FastLaunch:
    """One compiled kernel launched directly: triton's launcher for it, with the grid and the trailing
    named arguments (T_BUCKET and the constexprs) of the launch key it was compiled for."""

    __slots__ = ("run", "function", "metadata", "grid", "tail", "device", "stream")

    def __init__(self, run, function, metadata, grid, tail, device, stream):
        self.run, self.function, self.metadata = run, function, metadata
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.tail, self.device, self.stream = tail, device, stream

    def __call__(self, args):
        if self.device is not None and self.device != torch.cuda.current_device():
            with torch.cuda.device(self.device):
                return self(args)
        self.run(*self.grid, self.stream(self.device), self.function, self.metadata, None, None, None,
                 *args, *self.tail)


def _no_stream(device):
    return 0


def _fast_launch(kind, n_args, compiled, grid, named, device):
    """The _FastLaunch of what triton just launched (``n_args`` runtime arguments, then ``named``), or
    None where it cannot be launched directly."""
    run, function = getattr(compiled, "run", None), getattr(compiled, "function", None)
    if not _FAST_LAUNCH or run is None or function is None:
        return None
    names = _KERNELS[kind].arg_names[n_args:]
    if set(names) != set(named):  # pragma: no cover - a kernel signature this code does not know
        return None
    cuda = device.type == "cuda"
    return _FastLaunch(run, function, compiled.packed_metadata, grid, tuple(named[n] for n in names),
                       device.index if cuda else None,
                       triton.runtime.driver.active.get_current_stream if cuda else _no_stream)


def _launch(call, key, args):
    """Launch kernel ``key[0]`` of ``call`` with its runtime ``args``: directly when this launch key has
    been launched before, else through triton (and remember how)."""
    fast = call.launches.get(key)
    if fast is not None and _launch_hooks_idle():
        fast(args)
        return
    with _on_device(call.device):
        compiled, grid, named = _compile_and_launch(call, key[0], args)
    if len(call.launches) < 64:  # a few alignments and dO layouts per call; more are not worth keeping
        call.launches[key] = _fast_launch(key[0], len(args), compiled, grid, named, call.device)


def _alignment(*tensors) -> int:
    """Bit i is set when tensors[i] is 16-byte aligned (triton specialises pointers on it)."""
    bits = 0
    for i, t in enumerate(tensors):
        if t is not None and t.data_ptr() % 16 == 0:
            bits |= 1 << i
    return bits


# ----------------------------------------------------------------------------
# What is the same for every call with the same flags and argument metadata
# ----------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _bthd_layout(q: torch.Tensor) -> bool:
    """True when q is a transposed (B, T, H, D) view (the model's layout)."""
    return q.stride(1) < q.stride(2)


def _alloc(shape, bthd, dtype, device) -> torch.Tensor:
    """(B, H, T, D) buffer: (B, T, H, D) storage seen through transpose(1, 2) when ``bthd`` (outputs
    follow their input's layout: the model's transposed views give (B, T, H, D) storage), else
    (B, H, T, D) storage."""
    B, H, T, D = shape
    if bthd:
        return torch.empty((B, T, H, D), dtype=dtype, device=device).transpose(1, 2)
    return torch.empty((B, H, T, D), dtype=dtype, device=device)


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
    """_slice_span of an output allocated like q (_alloc with q's layout)."""
    B, H, T, D = q.shape
    return (T - 1) * (H * D if _bthd_layout(q) else D) + D - 1


def _offsets_fit(t: torch.Tensor) -> bool:
    return _slice_span(t) < _MAX_OFFSET


def _s2(t):
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _meta(t):
    """What a call's plan depends on in an optional (H, D) sink vector."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        return type(t)  # _check rejects it
    return t.shape, t.stride(), t.dtype, t.device


class _Call:
    """Everything about a call that follows from its flags and its arguments' dtypes, shapes, strides and
    devices: the arguments are checked, and the kernels' constexprs and integer arguments worked out, on
    the first call with that metadata.  ``launches`` holds the fast launches of its kernels, by (kernel,
    pointer alignment[, dO strides])."""

    __slots__ = ("flags", "shape", "dtype", "device", "arch", "constexprs", "nblk", "layouts",
                 "fwd_ints", "bwd_ints", "launches")

    def __init__(self, q, k, v, k_bias, v_bias, sink, sigmoid, prec):
        self.flags = flags = _flags(sink, sigmoid)
        self.shape = B, H, T, D = tuple(q.shape)
        self.dtype, self.device = q.dtype, q.device
        self.arch = _device_arch(q.device)
        upcast = _INTERPRET and q.dtype == torch.bfloat16
        dots = dict(PREC=prec, UPCAST=upcast)
        self.constexprs = {
            "fwd": dict(**flags._asdict(), HEAD_D=D, **dots),
            "pre": dict(LEARNED_SINK=flags.LEARNED_SINK, CONTEXT_SINK=flags.CONTEXT_SINK, HEAD_D=D,
                        BLOCK_M=32 if self.arch is None else 64),
            "dkdv": dict(SIGMOID=flags.SIGMOID, HEAD_D=D, **dots),
            "dq": dict(SIGMOID=flags.SIGMOID, SINK_PARAMS=flags.has_sink_params, HEAD_D=D, **dots),
        }
        self.nblk = triton.cdiv(T, self.constexprs["pre"]["BLOCK_M"])  # query blocks of the preprocess
        # the layouts of o / dq, dk, dv (each allocated like its input), and the integer arguments that do
        # not depend on dO
        self.layouts = tuple(_bthd_layout(t) for t in (q, k, v))
        o, dk, dv = (_alloc(self.shape, bthd, q.dtype, "meta") for bthd in self.layouts)
        s_q, s_k, s_v, s_o, s_dk, s_dv = (t.stride() for t in (q, k, v, o, dk, dv))
        s_bias = _s2(k_bias) + _s2(v_bias)
        self.fwd_ints = s_q + s_k + s_v + s_o + s_bias + (H, T)
        self.bwd_ints = {"q": s_q, "k": s_k, "v": s_v, "dk": s_dk, "dv": s_dv, "dq": s_o,
                         "kb": _s2(k_bias), "bias": s_bias}
        self.launches: dict = {}


_CALLS: dict = {}
_MAX_CALLS = 1024  # distinct call metadata kept; past that (e.g. every T of a generation loop) start over


def _call_for(q, k, v, k_bias, v_bias, sink, sigmoid) -> _Call:
    """The _Call of these arguments; checks them (ValueError) the first time their metadata is seen."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        _check(q, k, v, sink, sigmoid, k_bias, v_bias)
    prec = _dot_precision(q.dtype)
    key = (sink, sigmoid, prec, q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
           v.shape, v.stride(), v.dtype, v.device, _meta(k_bias), _meta(v_bias), _FORCE_ARCH, _FORCE_CANDIDATE)
    call = _CALLS.get(key)
    if call is None:
        _check(q, k, v, sink, sigmoid, k_bias, v_bias)
        if len(_CALLS) >= _MAX_CALLS:
            _CALLS.clear()
        call = _CALLS[key] = _Call(q, k, v, k_bias, v_bias, sink, sigmoid, prec)
    return call


# ----------------------------------------------------------------------------
# Forward and backward bodies, shared by the eager autograd.Function and the custom ops
# ----------------------------------------------------------------------------

_NO_SINK = "none"  # custom-op schemas take str, not Optional[str]


def _fwd_outputs(q, layout, context, sigmoid, placeholders=True):
    """(o, ou, lse) buffers of the forward (o laid out by ``layout``, see _alloc), shared by the real
    and the fake op.  The context sink's backward needs ou = softmax(S) V; other cores get an empty
    placeholder (None without ``placeholders``: the eager path returns o alone)."""
    B, H, T, D = q.shape
    o = _alloc(q.shape, layout, q.dtype, q.device)
    if context:
        ou = _alloc(q.shape, layout, q.dtype, q.device)
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
    return (*(_alloc(q.shape, layout, q.dtype, q.device) for layout in layouts), dkb, dvb)


def _score_scale_bias(flags, sm_scale, sig_bias):
    """The kernels work on base-2 logits: scale s log2(e), and sigmoid's bias b log2(e)."""
    return sm_scale * _LOG2E, (sig_bias * _LOG2E if flags.SIGMOID else 0.0)


def _forward(call, q, k, v, k_bias, v_bias, sm_scale, sig_bias, placeholders=True):
    """The forward kernel: (o, ou, lse), see _fwd_outputs."""
    flags = call.flags
    o, ou, lse = _fwd_outputs(q, call.layouts[0], flags.CONTEXT_SINK, flags.SIGMOID, placeholders)
    score_scale, score_bias = _score_scale_bias(flags, sm_scale, sig_bias)
    dummy = q  # pointer placeholder for unused operands (never dereferenced)
    args = (q, k, v, o, ou if flags.CONTEXT_SINK else o, lse,
            k_bias if k_bias is not None else dummy, v_bias if v_bias is not None else dummy,
            *call.fwd_ints, score_scale, score_bias)
    _launch(call, ("fwd", _alignment(q, k, v, k_bias, v_bias)), args)
    return o, ou, lse


def _backward(call, do, q, k, v, o, lse, k_bias, v_bias, sm_scale, sig_bias, placeholders=True):
    """The backward kernels: (dq, dk, dv, dk_bias, dv_bias), see _bwd_outputs.  ``o`` is softmax(S) V
    for the context sink, the output otherwise."""
    flags = call.flags
    B, H, T, D = call.shape
    dev = q.device
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    s_do = do.stride()
    # dO laid out like the output fits (checked with the arguments); else e.g. an odd incoming layout
    if s_do != call.bwd_ints["dq"] and not _offsets_fit(do):
        do = do.contiguous()
        s_do = do.stride()
    score_scale, score_bias = _score_scale_bias(flags, sm_scale, sig_bias)
    kb, vb = k_bias, v_bias
    dummy = q
    kb_ = kb if kb is not None else dummy
    f32 = torch.float32
    sink_params = flags.has_sink_params
    dq, dk, dv, dkb, dvb = _bwd_outputs(q, call.layouts, kb, vb, placeholders)
    ints = call.bwd_ints
    s_o = o.stride()
    align = _alignment(q, k, v, do, o, lse, kb, vb)

    delta = ds0 = lse  # placeholders for sigmoid (never read)
    if not flags.SIGMOID:
        nblk = call.nblk
        delta = torch.empty((B * H, T), dtype=f32, device=dev)
        ds0 = torch.empty((B * H, T), dtype=f32, device=dev) if sink_params else delta
        dkb_part = dvb_part = delta
        if sink_params:
            dkb_part = torch.empty((B, H, nblk, D), dtype=f32, device=dev)
            dvb_part = torch.empty((B, H, nblk, D), dtype=f32, device=dev)
        _launch(call, ("pre", align, s_do, s_o), (
            o, do, q, kb_, vb if vb is not None else dummy, lse, delta, ds0, dkb_part, dvb_part,
            *s_o, *s_do, *ints["q"], *ints["bias"], H, T, nblk, sm_scale, score_scale))

    _launch(call, ("dkdv", align, s_do), (
        q, k, v, do, lse, delta, dk, dv,
        *ints["q"], *ints["k"], *ints["v"], *s_do, *ints["dk"], *ints["dv"],
        H, T, score_scale, sm_scale, score_bias))
    _launch(call, ("dq", align, s_do), (
        q, k, v, do, lse, delta, ds0, kb_, dq,
        *ints["q"], *ints["k"], *ints["v"], *s_do, *ints["dq"], *ints["kb"],
        H, T, score_scale, sm_scale, score_bias))

    if sink_params:  # a fixed-order reduction of the per-block partials: deterministic
        dkb.copy_(dkb_part.sum(dim=(0, 2)))
        dvb.copy_(dvb_part.sum(dim=(0, 2)))
    return dq, dk, dv, dkb, dvb


_KERNELS = {"fwd": _fwd_kernel, "pre": _bwd_preprocess, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}


# ----------------------------------------------------------------------------
# Eager path: one autograd.Function around the bodies
# ----------------------------------------------------------------------------


class _FusedAttention(torch.autograd.Function):
    """Eager calls: the forward and backward bodies with no custom-op dispatch in between, and no zero
    gradients built for the outputs the backward does not read (lse, softmax(S) V): the forward returns
    the output alone."""

    @staticmethod
    def forward(ctx, q, k, v, k_bias, v_bias, options):
        call, sm_scale, sig_bias = ctx.options = options
        o, ou, lse = _forward(call, q, k, v, k_bias, v_bias, sm_scale, sig_bias, placeholders=False)
        ctx.set_materialize_grads(False)
        # the context sink's Delta comes from softmax(S) V (no cancellation of the sink term)
        ctx.save_for_backward(q, k, v, ou if call.flags.CONTEXT_SINK else o, lse, k_bias, v_bias)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward
    def backward(ctx, do):
        if do is None:  # the output did not reach the loss
            return (None,) * 6
        q, k, v, o, lse, k_bias, v_bias = ctx.saved_tensors
        call, sm_scale, sig_bias = ctx.options
        dq, dk, dv, dkb, dvb = _backward(call, do, q, k, v, o, lse, k_bias, v_bias, sm_scale, sig_bias,
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
    call = _call_for(q, k, v, k_bias, v_bias, _user_sink(sink), sigmoid)
    return _forward(call, q, k, v, k_bias, v_bias, sm_scale, sig_bias)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, k_bias, v_bias, sink, sigmoid, sm_scale, sig_bias):
    return _fwd_outputs(q, _bthd_layout(q), sink == "context", sigmoid)


@torch.library.custom_op("outlier_gpt::attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, k_bias: Optional[torch.Tensor], v_bias: Optional[torch.Tensor],
                   sink: str, sigmoid: bool, sm_scale: float, sig_bias: float
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    call = _call_for(q, k, v, k_bias, v_bias, _user_sink(sink), sigmoid)
    return _backward(call, do, q, k, v, o, lse, k_bias, v_bias, sm_scale, sig_bias)


@_attention_bwd.register_fake
def _attention_bwd_fake(do, q, k, v, o, lse, k_bias, v_bias, sink, sigmoid, sm_scale, sig_bias):
    return _bwd_outputs(q, [_bthd_layout(t) for t in (q, k, v)], k_bias, v_bias)


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
    return q.is_cuda or _INTERPRET


def _check(q, k, v, sink, sigmoid, k_bias, v_bias):
    if sink not in SINKS:
        raise ValueError(f"fused_attention: unknown sink {sink!r}; expected one of {SINKS}")
    if sigmoid and sink is not None:
        raise ValueError("fused_attention: sigmoid attention has no softmax for a sink to join")
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
    if not (q.is_cuda or _INTERPRET):
        raise ValueError("fused_attention: needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)")
    # 32-bit offsets inside one (batch, head) slice: inputs and outputs (laid out
    # like q: rows of H*D or of D elements)
    spans = [(name, _slice_span(t), tuple(t.stride())) for name, t in (("q", q), ("k", k), ("v", v))]
    spans.append(("the output", _out_span(q), (H * D if _bthd_layout(q) else D, 1)))
    for name, span, strides in spans:
        if span >= _MAX_OFFSET:
            raise ValueError(
                f"fused_attention: {name} exceeds the kernels' 32-bit offsets: an element offset "
                f"inside one (batch, head) slice reaches {span} >= 2**31 (T * stride(T) and T * D "
                f"must stay below 2**31; shape {tuple(q.shape)}, strides {strides}); use shorter "
                "sequences or the PyTorch attention path")
    if sink in ("learned", "context"):
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
    call = _call_for(q, k, v, k_bias, v_bias, sink, sigmoid)
    return _FusedAttention.apply(q, k, v, k_bias, v_bias, (call, *_scales(q, sigmoid, sigmoid_bias, sm_scale)))
