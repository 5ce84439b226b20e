"""Fused causal attention for the six outlier-gpt attention variants (Triton).

FlashAttention-2-style kernels: an online softmax over key tiles, no T x T tensor
is ever written to memory, and the forward saves one log-sum-exp per row (base 2)
for the backward.  A single kernel family is specialised per variant through
``tl.constexpr`` switches, wrapped in a ``torch.autograd.Function``.

Public API
----------
``fused_attention(q, k, v, *, variant="default", k_bias=None, v_bias=None,
gate=None, sigmoid_bias=None, sm_scale=None) -> out``

    q, k, v       (B, H, T, D), any strides (views of one fused qkv projection
                  are used as they are; nothing is made contiguous).
    k_bias/v_bias (H, D): the sink key/value (``attention_bias``,
                  ``context_bias``) or the value bias (``fixed_bias``).
    gate          (B, H, T), any strides: per token and head output gate
                  (``scaling``).
    sigmoid_bias  float, ``sigmoid`` only; ``None`` means b = -ln(T).
    sm_scale      score scale, default 1/sqrt(D).
    out           (B, H, T, D) in q's dtype.  When q is a (B, T, H, D) buffer seen
                  through ``transpose(1, 2)`` (the model's layout) the output is
                  allocated the same way, so ``out.transpose(1, 2).reshape(B, T, C)``
                  is free.

Arguments that a variant does not use are ignored (the model may pass them all).

Variants (per head, causal mask everywhere, s = sm_scale, S = Q K^T s):
    default         softmax(S) V
    fixed_bias      softmax(S) V + v_bias                  (added in the epilogue)
    attention_bias  softmax([q.k' s ; S]) [v' ; V]         (sink column, seen by
                    every query including the first; it is the initial state of
                    the online softmax: m0 = q.k' s, l0 = 1, acc0 = v')
    context_bias    softmax(S) V + p_sink v',  p_sink = sigmoid(q.k' s - lse(S))
                    (the sink's probability in the softmax that includes it)
    scaling         gate * softmax(S) V                    (gate fused in epilogue)
    sigmoid         sigmoid(S + b) V, no row max / row sum (FlashSigmoid-style)

Gradients are returned for q, k, v, k_bias, v_bias and gate.  The backward is
deterministic: a preprocess kernel (Delta, sink terms), a dK/dV kernel iterating
over query blocks and a dQ kernel iterating over key blocks; no atomics.  The
k_bias / v_bias gradients are computed per (batch, head, query block) into a
scratch buffer and summed with torch (a fixed-order reduction), so two backward
passes give bit-identical gradients.

Also exported: ``fused_attention_ref`` (plain PyTorch reference with the same
signature, materialised scores, explicit causal mask; matmuls in the input dtype,
softmax/sigmoid in float32 -- or float64 for float64 inputs -- then cast back),
``VARIANTS``, ``is_supported(q, variant, dropout_p)`` and ``interpreting()``
(True when the kernels were built for Triton's CPU interpreter).

Supported / limits (honest list)
--------------------------------
* dtypes: float16, bfloat16, float32 (q, k, v must share one dtype; biases and
  gate may be any float dtype, they are read as float32).  float32 dots use IEEE
  fp32 unless ``torch.get_float32_matmul_precision()`` is not "highest", in which
  case TF32 is used, mirroring PyTorch matmuls.  IEEE fp32 ("ieee") is emulated
  with several tensor-core passes and uses small tiles: it is slow (meant for
  checks, not training); use bf16/fp16, or TF32 via
  ``torch.set_float32_matmul_precision("high")``.
* head dim D in {16, 32, 64, 128}; any B and H (B * H is on grid axis 0, so it
  is not bound by the 65535 limit of axes 1/2); 1 <= T <= 65535 * 16 = 1,048,560
  (query / key blocks are on grid axis 1; tails are masked).
* causal self-attention only (q, k, v share T; no cross-attention, no GQA/MQA,
  no padding / key masks); no dropout on the attention probabilities (use the
  PyTorch path when attention dropout > 0); no double backward.
* CUDA tensors (or CPU tensors with TRITON_INTERPRET=1, which is slow and meant
  for tests).  Launches go to q's device.  Offsets inside one (batch, head) slice
  are 32-bit: T * stride(T) and T * D must stay below 2**31 (more exactly, the
  largest element offset inside a slice of q, k, v, the output and the gate);
  larger inputs raise a ValueError.
* Tile sizes are a fixed table per (D, dtype) and architecture: one for Hopper
  and newer (sm_90+: H100/H200, wgmma, up to 128 KB of shared memory) and one
  with smaller tiles for sm_8x (A100 and Ampere/Ada: mma.sync, 255 registers per
  thread).  A config that does not fit the GPU (OutOfResources or a ptxas error)
  is skipped for the next one; the choice is cached per device and compute
  capability.  No autotuning, so launches (and bits) are reproducible across
  processes.  When this file was written no GPU was available: the kernels were
  validated under the Triton interpreter (the GPU tile tables included) and
  compiled ahead-of-time for sm_90 and sm_80 with triton 3.6 and 3.9 (the first
  config of each table compiles without register spills for bf16 D=64/128, every
  variant), but their speed was never measured; run benchmarks/attention.py and
  the GPU tests in tests/test_fused_attention.py on the target GPU.
* The CPU-interpreter tests need triton >= 3.9, or numpy < 2.4 with older
  triton: triton 3.6's interpreter breaks with numpy >= 2.4.
* Under the CPU interpreter bf16 is emulated: dot operands are upcast to fp32
  (exact) and fp32 -> bf16 casts are rounded to nearest even explicitly (the
  interpreter truncates), so results match what the GPU computes up to
  summation order.
* ``fixed_bias``, ``context_bias`` and ``scaling`` also write the plain attention
  output softmax(S) V as an extra (B, H, T, D) buffer saved for the backward
  (Delta and d gate are computed from it: no bias cancellation, no division by
  the gate).  This costs one extra T x D write and the same saved memory as the
  unfused PyTorch implementation.
* ``sigmoid`` with ``sigmoid_bias=None`` uses b = -ln(T) of the *current* call.
* Under ``torch.compile`` the kernel call is a graph break (``torch.compiler.disable``):
  it runs eagerly between compiled regions.
* Probabilities and dS are cast to the input dtype before the second matmul, as
  in FlashAttention; accumulation is float32.
"""

from __future__ import annotations

import contextlib
import math

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
    "VARIANTS",
    "fused_attention",
    "fused_attention_ref",
    "interpreting",
    "is_supported",
]

VARIANTS = (
    "default",
    "fixed_bias",
    "attention_bias",
    "context_bias",
    "scaling",
    "sigmoid",
)
_VID = {name: i for i, name in enumerate(VARIANTS)}
_DEFAULT, _FIXED, _ATTN_BIAS, _CTX_BIAS, _SCALING, _SIGMOID = range(6)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------
# Triton kernels.  Variant ids: 0 default, 1 fixed_bias, 2 attention_bias,
# 3 context_bias, 4 scaling, 5 sigmoid.  Scores are kept in base 2:
# qk2 = q.k * sm_scale * log2(e), LSE is stored as log2(sum exp2(qk2)).
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
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base,
    stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, lo, hi, T, qk_scale, sig_bias2,
    VARIANT: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
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
        qk = _dot(q, kt, None, PREC, UPCAST) * qk_scale
        if VARIANT == 5:
            p = 1.0 / (1.0 + tl.exp2(-(qk + sig_bias2)))
            if MASKED:
                valid = (offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] < T)
                p = tl.where(valid, p, 0.0)
            acc = _dot(_rne(p, UPCAST).to(v.dtype), v, acc, PREC, UPCAST)
        else:
            if MASKED:
                valid = (offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] < T)
                qk = tl.where(valid, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = _dot(_rne(p, UPCAST).to(v.dtype), v, acc, PREC, UPCAST)
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, OU, LSE, KB, VB, G,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_kbh, stride_kbd, stride_vbh, stride_vbd,
    stride_gb, stride_gh, stride_gt,
    H, T, qk_scale, sig_bias2,
    VARIANT: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
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
    if VARIANT == 1 or VARIANT == 2 or VARIANT == 3:
        vb = tl.load(VB + off_h * stride_vbh + offs_d * stride_vbd).to(tl.float32)
    if VARIANT == 2 or VARIANT == 3:
        kb = tl.load(KB + off_h * stride_kbh + offs_d * stride_kbd).to(tl.float32)
        s0 = tl.sum(q.to(tl.float32) * kb[None, :], 1) * qk_scale
    if VARIANT == 2:
        # the sink column starts the online softmax: m0 = s0, l0 = 1, acc0 = v'
        m_i = s0
        l_i = l_i + 1.0
        acc = acc + vb[None, :]

    # key blocks strictly below the diagonal block: no mask, no bound checks
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, 0, start_m * BLOCK_M, T, qk_scale, sig_bias2,
        VARIANT, BLOCK_N, False, PREC, UPCAST)
    # diagonal block: causal mask and key tail mask
    hi = tl.minimum((start_m + 1) * BLOCK_M, T)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, start_m * BLOCK_M, hi, T, qk_scale, sig_bias2,
        VARIANT, BLOCK_N, True, PREC, UPCAST)

    if VARIANT != 5:
        acc = acc / l_i[:, None]
        lse = m_i + tl.log2(l_i)
        tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)
    o_ptrs = offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    if VARIANT == 1 or VARIANT == 3 or VARIANT == 4:
        # the plain attention output softmax(S) V, saved for the backward's Delta
        tl.store(OU + o_off + o_ptrs, _rne(acc, UPCAST).to(OU.dtype.element_ty), mask=row_ok[:, None])
    if VARIANT == 1:
        acc = acc + vb[None, :]
    if VARIANT == 3:
        # p_sink = exp(s0) / (exp(s0) + sum exp(S)) = sigmoid(s0 - lse)
        p_sink = 1.0 / (1.0 + tl.exp2(lse - s0))
        acc = acc + p_sink[:, None] * vb[None, :]
    if VARIANT == 4:
        g = tl.load(G + off_b * stride_gb + off_h * stride_gh + offs_m * stride_gt,
                    mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * g[:, None]
    tl.store(O + o_off + o_ptrs, _rne(acc, UPCAST).to(O.dtype.element_ty), mask=row_ok[:, None])


# Backward derivations (per head, natural-log units, s = sm_scale):
#
# Softmax variants use the usual FlashAttention form
#     dP = dO V^T,  dS = P o (dP - Delta),  dQ = s dS K,  dK = s dS^T Q,  dV = P^T dO
# with Delta_i = rowsum(dO_i o O_i) for the plain softmax.
#
# fixed_bias, context_bias and scaling save the plain attention output
# O_a = softmax(S) V (written by the forward next to the returned output) so
# Delta never has to undo a bias or a gate (no cancellation, no division by g).
#
# fixed_bias: out = O_a + v'.  Delta_i = dO_i . O_a,i; d v' = sum_{b,t} dO.
#
# scaling: out = g O_u.  dO_u = g dO (applied when dO is loaded), Delta_i =
#     rowsum(dO_u o O_u), d g_i = rowsum(dO_i o O_u,i).
#
# attention_bias: ordinary softmax over [sink; keys], LSE includes the sink.
#     Delta_i = dO_i . out_i,  c_i = dO_i . v',  p0_i = exp(s0_i - LSE_i)
#     dS0_i = p0_i (c_i - Delta_i),  d v' = sum_i p0_i dO_i,  d k' = s sum_i dS0_i q_i,
#     dQ_i += s dS0_i k'.
#
# context_bias: out_i = O_a,i + p_i v' with L_i = lse_j(S_ij) (no sink) and
#     p_i = sigmoid(s0_i - L_i).  Let c_i = dO_i . v'.  Then
#       d p_i = c_i  ->  d(s0_i - L_i) = e_i := c_i p_i (1 - p_i)
#       d s0_i = e_i,  d L_i = -e_i,  and dL_i/dS_ij = P_ij (P = softmax without sink)
#     so dS_ij = P_ij (dP_ij - Delta^a_i) - e_i P_ij = P_ij (dP_ij - (Delta^a_i + e_i)),
#     with Delta^a_i = dO_i . O_a,i.  Hence the usual FlashAttention form with the
#     per-row corrected
#       Delta_i = dO_i . O_a,i + c_i p_i (1 - p_i)    (= dO_i . out_i - p_i^2 c_i)
#     plus the sink terms  dS0_i = e_i,  d v' = sum_i p_i dO_i,  d k' = s sum_i e_i q_i,
#     dQ_i += s e_i k'.  p_i is recomputed from q_i, k' and the saved L_i.
#
# sigmoid: P = sigmoid(S + b), dS = dP o P o (1 - P); no Delta.


@triton.jit
def _bwd_preprocess(
    O, DO, Q, KB, VB, G, LSE, DELTA, DS0, DG, DKB_PART, DVB_PART,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kbh, stride_kbd, stride_vbh, stride_vbd,
    stride_gb, stride_gh, stride_gt,
    H, T, NBLK, sm_scale, qk_scale,
    VARIANT: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr,
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
    # O is the saved plain attention output softmax(S) V for fixed_bias,
    # context_bias and scaling, and the full output for default / attention_bias
    delta = tl.sum(o * do, 1)
    row_idx = bh.to(tl.int64) * T + offs_m
    if VARIANT == 4:
        g = tl.load(G + off_b * stride_gb + off_h * stride_gh + offs_m * stride_gt,
                    mask=row_ok, other=0.0).to(tl.float32)
        tl.store(DG + row_idx, delta, mask=row_ok)
        # Delta = rowsum(dO_u o O_u) with dO_u = g dO rounded exactly as the dK/dV
        # and dQ kernels round it, so that dP - Delta stays consistent
        do_u = _rne(do * g[:, None], UPCAST).to(DO.dtype.element_ty).to(tl.float32)
        delta = tl.sum(o * do_u, 1)
    if VARIANT == 2 or VARIANT == 3:
        vb = tl.load(VB + off_h * stride_vbh + offs_d * stride_vbd).to(tl.float32)
        kb = tl.load(KB + off_h * stride_kbh + offs_d * stride_kbd).to(tl.float32)
        q = tl.load(Q + off_b * stride_qb + off_h * stride_qh
                    + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0).to(tl.float32)
        s0 = tl.sum(q * kb[None, :], 1) * qk_scale
        lse = tl.load(LSE + row_idx, mask=row_ok, other=0.0)
        c = tl.sum(do * vb[None, :], 1)
        if VARIANT == 2:
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
    dk, dv, k, v, q_base, do_base, G_base, LSE_row, DELTA_row,
    stride_qt, stride_qd, stride_dot, stride_dod, stride_gt,
    offs_n, offs_d, lo, hi, T, qk_scale, sig_bias2,
    VARIANT: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        # rows past T load as zeros (q, dO, lse, Delta, gate): they contribute 0
        qt = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd,
                     mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None], other=0.0)
        if VARIANT == 4:
            g = tl.load(G_base + offs_m * stride_gt, mask=row_ok, other=0.0).to(tl.float32)
            do = _rne(do.to(tl.float32) * g[:, None], UPCAST).to(k.dtype)
        qkt = _dot(k, qt, None, PREC, UPCAST) * qk_scale
        if VARIANT == 5:
            pt = 1.0 / (1.0 + tl.exp2(-(qkt + sig_bias2)))
        else:
            lse = tl.load(LSE_row + offs_m, mask=row_ok, other=0.0)
            pt = tl.exp2(qkt - lse[None, :])
        if MASKED:
            pt = tl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
        dv = _dot(_rne(pt, UPCAST).to(do.dtype), do, dv, PREC, UPCAST)
        dpt = _dot(v, tl.trans(do), None, PREC, UPCAST)
        if VARIANT == 5:
            dst = pt * (1.0 - pt) * dpt
        else:
            delta = tl.load(DELTA_row + offs_m, mask=row_ok, other=0.0)
            dst = pt * (dpt - delta[None, :])
        dk = _dot(_rne(dst, UPCAST).to(qt.dtype), tl.trans(qt), dk, PREC, UPCAST)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, G, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_gb, stride_gh, stride_gt,
    H, T, qk_scale, sm_scale, sig_bias2,
    VARIANT: tl.constexpr, HEAD_D: tl.constexpr,
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
    g_base = G + off_b * stride_gb + off_h * stride_gh
    lse_row = LSE + bh.to(tl.int64) * T
    delta_row = DELTA + bh.to(tl.int64) * T
    dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    # query blocks overlapping the diagonal (masked) ...
    hi = tl.minimum(start_n + BLOCK_N, T)
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, g_base, lse_row, delta_row,
        stride_qt, stride_qd, stride_dot, stride_dod, stride_gt,
        offs_n, offs_d, start_n, hi, T, qk_scale, sig_bias2,
        VARIANT, BLOCK_M, True, PREC, UPCAST)
    # ... then every later query block (no causal mask)
    dk, dv = _bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, g_base, lse_row, delta_row,
        stride_qt, stride_qd, stride_dot, stride_dod, stride_gt,
        offs_n, offs_d, start_n + BLOCK_N, T, T, qk_scale, sig_bias2,
        VARIANT, BLOCK_M, False, PREC, UPCAST)
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
    offs_m, offs_d, lo, hi, T, qk_scale, sig_bias2,
    VARIANT: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
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
        qk = _dot(q, kt, None, PREC, UPCAST) * qk_scale
        if VARIANT == 5:
            p = 1.0 / (1.0 + tl.exp2(-(qk + sig_bias2)))
        else:
            p = tl.exp2(qk - lse[:, None])
        if MASKED:
            valid = (offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] < T)
            p = tl.where(valid, p, 0.0)
        dp = _dot(do, vt, None, PREC, UPCAST)
        if VARIANT == 5:
            ds = p * (1.0 - p) * dp
        else:
            ds = p * (dp - delta[:, None])
        dq = _dot(_rne(ds, UPCAST).to(kt.dtype), tl.trans(kt), dq, PREC, UPCAST)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, G, LSE, DELTA, DS0, KB, DQ,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_gb, stride_gh, stride_gt,
    stride_kbh, stride_kbd,
    H, T, qk_scale, sm_scale, sig_bias2,
    VARIANT: tl.constexpr, HEAD_D: tl.constexpr,
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
    if VARIANT == 4:
        g = tl.load(G + off_b * stride_gb + off_h * stride_gh + offs_m * stride_gt,
                    mask=row_ok, other=0.0).to(tl.float32)
        do = _rne(do.to(tl.float32) * g[:, None], UPCAST).to(q.dtype)
    row_idx = bh.to(tl.int64) * T + offs_m
    if VARIANT == 5:
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
        offs_m, offs_d, 0, start_m * BLOCK_M, T, qk_scale, sig_bias2,
        VARIANT, BLOCK_N, False, PREC, UPCAST)
    hi = tl.minimum((start_m + 1) * BLOCK_M, T)
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, start_m * BLOCK_M, hi, T, qk_scale, sig_bias2,
        VARIANT, BLOCK_N, True, PREC, UPCAST)
    dq = dq * sm_scale
    if VARIANT == 2 or VARIANT == 3:
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
# Each entry: (BLOCK_M, BLOCK_N, num_warps, num_stages).  Constraints used by the
# causal loops: fwd and dq need BLOCK_M % BLOCK_N == 0, dkdv needs
# BLOCK_N % BLOCK_M == 0.  The table is chosen by compute capability (Hopper and
# newer: larger tiles, wgmma; sm_8x: smaller tiles that fit its register file
# with mma.sync).  Candidates are tried in order; one that does not fit the GPU
# (OutOfResources, or a ptxas failure) is skipped and the choice is cached per
# (kernel, D, dtype, variant, precision, device, compute capability).
# The first candidates were checked ahead of time (triton 3.6 and 3.9, bf16,
# D = 64 / 128, every variant) to compile without register spills on their arch.

_INTERP_TABLE = {
    # moderate tiles keep the numpy interpreter fast (fewer, larger steps) while
    # T > 64 still exercises the off-diagonal / diagonal / tail paths, with 2
    # sub-blocks per diagonal block as in the GPU configs
    "fwd": [(64, 32, 4, 1)],
    "dkdv": [(32, 64, 4, 1)],
    "dq": [(64, 32, 4, 1)],
}


def _candidates(kind: str, D: int, dtype: torch.dtype, arch=None):
    """Tile candidates for ``kind`` in {"fwd", "dkdv", "dq"}.  ``arch`` is the
    compute capability as major * 10 + minor (90 for H100/H200, 80 for A100);
    ``None`` means the CPU interpreter."""
    if arch is None:
        return list(_INTERP_TABLE[kind])
    wide = dtype == torch.float32
    big = D >= 64
    if wide:  # fp32 operands: 2x the registers / shared memory per element
        c = {
            "fwd": [(64, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
            "dkdv": [(32, 64, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
            "dq": [(64, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)],
        }[kind]
    elif arch >= 90:  # Hopper and newer
        if kind == "fwd":
            if big:
                c = [(128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 2), (32, 16, 4, 1)]
            else:
                c = [(128, 64, 4, 3), (64, 32, 4, 2), (32, 16, 4, 1)]
        elif kind == "dkdv":  # BLOCK_M = query tile, BLOCK_N = key tile
            if big:  # 8 warps: with 4, D=64 spills (255 registers) on sm_90
                c = [(32, 128, 8, 3), (32, 64, 4, 2), (16, 32, 4, 1)]
            else:
                c = [(32, 128, 4, 3), (32, 64, 4, 2), (16, 32, 4, 1)]
        else:  # dq: BLOCK_M = query tile, BLOCK_N = key tile
            if D >= 128:
                c = [(128, 32, 8, 3), (64, 32, 4, 2), (32, 16, 4, 1)]
            else:
                c = [(128, 32, 4, 3), (64, 32, 4, 2), (32, 16, 4, 1)]
    else:  # sm_8x (and older): mma.sync, 255 registers per thread, less shared memory
        c = _SM8X_TABLE[kind][min(D, 128)]
    return list(c)


# sm_8x, 16-bit dtypes.  Hopper's first configs spill registers here for D=128
# (mma.sync keeps the accumulators in registers; e.g. dkdv (32, 128, 8, 3)
# spilled ~1-18 KB) and dq (128, 32, 4, 3) spills at D=64; the first configs
# below do not (ptxas for sm_80, triton 3.6 and 3.9, every variant, D=16..128)
# and use <= 88 KB of shared memory, so they also fit sm_86/sm_89 (99 KB).
_SM8X_TABLE = {
    "fwd": {16: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2), (32, 16, 4, 1)],
            32: [(128, 64, 4, 3), (64, 32, 4, 2), (32, 16, 4, 1)],
            64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 16, 4, 1)],
            128: [(64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (32, 16, 4, 1)]},
    "dkdv": {16: [(32, 128, 4, 3), (32, 64, 4, 2), (16, 32, 4, 1)],
             32: [(32, 128, 4, 3), (32, 64, 4, 2), (16, 32, 4, 1)],
             64: [(32, 128, 8, 3), (32, 64, 4, 3), (16, 32, 4, 1)],
             128: [(32, 64, 8, 2), (32, 32, 4, 2), (16, 32, 4, 1)]},
    "dq": {16: [(128, 32, 4, 3), (64, 32, 4, 2), (32, 16, 4, 1)],
           32: [(128, 32, 4, 3), (64, 32, 4, 2), (32, 16, 4, 1)],
           64: [(128, 32, 8, 3), (64, 32, 4, 3), (32, 16, 4, 1)],
           128: [(64, 32, 4, 3), (64, 32, 4, 2), (32, 16, 4, 1)]},
}

# (kernel, D, dtype, variant, dot precision, device, compute capability) -> config
_CHOSEN: dict = {}
_CHOSEN_KEY_FIELDS = ("kernel", "head_dim", "dtype", "variant", "precision", "device", "arch")

# Test-only hook: set to a compute capability (e.g. 90 or 80) to use that GPU
# tile table instead of the interpreter's (the tests run the real GPU tiles,
# ragged tails included, under the interpreter).  None: decided by the device.
_FORCE_ARCH = None


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter
    (TRITON_INTERPRET was set when this module was imported)."""
    return _INTERPRET


def _device_arch(device: torch.device):
    """Compute capability of ``device`` as major * 10 + minor; None under the
    interpreter or for a non-CUDA device."""
    if _FORCE_ARCH is not None:
        return _FORCE_ARCH
    if _INTERPRET or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _on_device(device: torch.device):
    """Context that makes ``device`` current for the launches (Triton launches on
    the current CUDA device, not necessarily the tensors' one)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch(kind, kernel, q, T, BH, D, args, constexprs):
    """Launch ``kernel`` with the first candidate config that fits; cache it.
    Must run under ``_on_device(q.device)``."""
    arch = _device_arch(q.device)
    key = (kind, D, q.dtype, constexprs.get("VARIANT"), constexprs.get("PREC"),
           str(q.device), arch)
    cands = [_CHOSEN[key]] if key in _CHOSEN else _candidates(kind, D, q.dtype, arch)
    last_err = None
    for cfg in cands:
        bm, bn, warps, stages = cfg
        tile = bm if kind in ("fwd", "dq") else bn
        grid = (BH, triton.cdiv(T, tile))
        try:
            kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                         num_stages=stages, **_LAUNCH_OPTS, **constexprs)
        except _FIT_ERRORS as err:  # pragma: no cover - GPU only
            last_err = err
            continue
        _CHOSEN[key] = cfg
        return
    raise RuntimeError(f"fused_attention: no {kind} config fits this GPU "
                       f"({q.device}, sm_{arch})") from last_err


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _bthd_layout(q: torch.Tensor) -> bool:
    """True when q is a transposed (B, T, H, D) view (the model's layout)."""
    return q.stride(1) < q.stride(2)


def _alloc_like(q: torch.Tensor, dtype=None) -> torch.Tensor:
    """(B, H, T, D) buffer whose memory layout follows q's: (B, T, H, D) storage
    when q is a transposed (B, T, H, D) view (the model's layout), else (B, H, T, D)."""
    B, H, T, D = q.shape
    dtype = q.dtype if dtype is None else dtype
    if _bthd_layout(q):
        return torch.empty((B, T, H, D), dtype=dtype, device=q.device).transpose(1, 2)
    return torch.empty((B, H, T, D), dtype=dtype, device=q.device)


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
    """_slice_span of an output allocated by _alloc_like(q)."""
    B, H, T, D = q.shape
    return (T - 1) * (H * D if _bthd_layout(q) else D) + D - 1


def _offsets_fit(t: torch.Tensor) -> bool:
    return _slice_span(t) < _MAX_OFFSET


def _s4(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_bias, v_bias, gate, vid, sm_scale, sig_bias):
        B, H, T, D = q.shape
        dummy = q  # pointer placeholder for unused operands (never dereferenced)
        kb = k_bias if vid in (_ATTN_BIAS, _CTX_BIAS) else None
        vb = v_bias if vid in (_FIXED, _ATTN_BIAS, _CTX_BIAS) else None
        g = gate if vid == _SCALING else None
        o = _alloc_like(q)
        ou = _alloc_like(q) if vid in (_FIXED, _CTX_BIAS, _SCALING) else o
        if vid != _SIGMOID:
            lse = torch.empty((B * H, T), dtype=torch.float32, device=q.device)
        else:
            lse = torch.empty((1,), dtype=torch.float32, device=q.device)
        kb_ = kb if kb is not None else dummy
        vb_ = vb if vb is not None else dummy
        g_ = g if g is not None else dummy
        kbs = (kb.stride(0), kb.stride(1)) if kb is not None else (0, 0)
        vbs = (vb.stride(0), vb.stride(1)) if vb is not None else (0, 0)
        gs = (g.stride(0), g.stride(1), g.stride(2)) if g is not None else (0, 0, 0)
        qk_scale = sm_scale * _LOG2E
        sig2 = sig_bias * _LOG2E
        prec = _dot_precision(q.dtype)
        upcast = _INTERPRET and q.dtype == torch.bfloat16
        args = (q, k, v, o, ou, lse, kb_, vb_, g_,
                *_s4(q), *_s4(k), *_s4(v), *_s4(o), *kbs, *vbs, *gs,
                H, T, qk_scale, sig2)
        with _on_device(q.device):
            _launch("fwd", _fwd_kernel, q, T, B * H, D, args,
                    dict(VARIANT=vid, HEAD_D=D, PREC=prec, UPCAST=upcast))
        saved_o = ou  # == o for default / attention_bias / sigmoid
        ctx.save_for_backward(q, k, v, saved_o, lse, kb, vb, g)
        ctx.vid = vid
        ctx.sm_scale = sm_scale
        ctx.sig_bias = sig_bias
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, kb, vb, g = ctx.saved_tensors
        vid = ctx.vid
        sm_scale = ctx.sm_scale
        B, H, T, D = q.shape
        dev = q.device
        if do.dtype != q.dtype:
            do = do.to(q.dtype)
        if not _offsets_fit(do):  # e.g. an odd incoming gradient layout
            do = do.contiguous()
        qk_scale = sm_scale * _LOG2E
        sig2 = ctx.sig_bias * _LOG2E
        prec = _dot_precision(q.dtype)
        upcast = _INTERPRET and q.dtype == torch.bfloat16
        dummy = q
        kb_ = kb if kb is not None else dummy
        vb_ = vb if vb is not None else dummy
        g_ = g if g is not None else dummy
        kbs = (kb.stride(0), kb.stride(1)) if kb is not None else (0, 0)
        vbs = (vb.stride(0), vb.stride(1)) if vb is not None else (0, 0)
        gs = (g.stride(0), g.stride(1), g.stride(2)) if g is not None else (0, 0, 0)
        f32 = torch.float32
        sink = vid in (_ATTN_BIAS, _CTX_BIAS)

        with _on_device(dev):
            delta = lse  # placeholder for sigmoid (never read)
            ds0 = lse
            dg = None
            dkb_part = dvb_part = None
            if vid != _SIGMOID:
                pre_bm = 32 if _device_arch(dev) is None else 64
                nblk = triton.cdiv(T, pre_bm)
                delta = torch.empty((B * H, T), dtype=f32, device=dev)
                ds0 = torch.empty((B * H, T), dtype=f32, device=dev) if sink else delta
                dg = torch.empty((B, H, T), dtype=f32, device=dev) if vid == _SCALING else None
                if sink:
                    dkb_part = torch.empty((B, H, nblk, D), dtype=f32, device=dev)
                    dvb_part = torch.empty((B, H, nblk, D), dtype=f32, device=dev)
                _bwd_preprocess[(B * H, nblk)](
                    o, do, q, kb_, vb_, g_, lse, delta, ds0,
                    dg if dg is not None else delta,
                    dkb_part if sink else delta, dvb_part if sink else delta,
                    *_s4(o), *_s4(do), *_s4(q), *kbs, *vbs, *gs,
                    H, T, nblk, sm_scale, qk_scale,
                    VARIANT=vid, HEAD_D=D, BLOCK_M=pre_bm, UPCAST=upcast, num_warps=4,
                    **_LAUNCH_OPTS)

            dq = _alloc_like(q)
            dk = _alloc_like(k)
            dv = _alloc_like(v)
            args = (q, k, v, do, g_, lse, delta, dk, dv,
                    *_s4(q), *_s4(k), *_s4(v), *_s4(do), *_s4(dk), *_s4(dv), *gs,
                    H, T, qk_scale, sm_scale, sig2)
            _launch("dkdv", _bwd_dkdv_kernel, q, T, B * H, D, args,
                    dict(VARIANT=vid, HEAD_D=D, PREC=prec, UPCAST=upcast))
            args = (q, k, v, do, g_, lse, delta, ds0, kb_, dq,
                    *_s4(q), *_s4(k), *_s4(v), *_s4(do), *_s4(dq), *gs, *kbs,
                    H, T, qk_scale, sm_scale, sig2)
            _launch("dq", _bwd_dq_kernel, q, T, B * H, D, args,
                    dict(VARIANT=vid, HEAD_D=D, PREC=prec, UPCAST=upcast))

        dkb = dvb = dgate = None
        if sink:
            dkb = dkb_part.sum(dim=(0, 2)).to(kb.dtype)
            dvb = dvb_part.sum(dim=(0, 2)).to(vb.dtype)
        elif vid == _FIXED:
            dvb = do.to(f32).sum(dim=(0, 2)).to(vb.dtype)
        elif vid == _SCALING:
            dgate = dg.to(g.dtype)
        return dq, dk, dv, dkb, dvb, dgate, None, None, None


def _compiler_disable(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


@_compiler_disable
def _apply(*args):
    # torch.compile must not trace into the launch code (it would try to turn the
    # Triton launches into graph nodes); the call is a graph break and runs eagerly,
    # the rest of a compiled model stays compiled.
    return _FusedAttention.apply(*args)


# ----------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------


def is_supported(q: torch.Tensor, variant: str = "default", dropout_p: float = 0.0) -> bool:
    """True when ``fused_attention`` can run this call: CUDA tensor (or any tensor
    with TRITON_INTERPRET set), head dim in {16, 32, 64, 128}, dtype fp16/bf16/fp32,
    known variant, no attention dropout and offsets of q's (batch, head) slices
    (and of the output's) within 32 bits."""
    if variant not in _VID or dropout_p:
        return False
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        return False
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or q.dtype not in SUPPORTED_DTYPES:
        return False
    if q.shape[2] > _MAX_T or not _offsets_fit(q) or _out_span(q) >= _MAX_OFFSET:
        return False
    return q.is_cuda or _INTERPRET


def _check(q, k, v, variant, k_bias, v_bias, gate):
    if variant not in _VID:
        raise ValueError(f"fused_attention: unknown variant {variant!r}; expected one of {VARIANTS}")
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
    # 32-bit offsets inside one (batch, head) slice: inputs, outputs (laid out
    # like q: rows of H*D or of D elements) and the gate
    spans = [(name, _slice_span(t), tuple(t.stride())) for name, t in (("q", q), ("k", k), ("v", v))]
    spans.append(("the output", _out_span(q), (H * D if _bthd_layout(q) else D, 1)))
    if variant == "scaling" and isinstance(gate, torch.Tensor) and gate.dim() == 3:
        spans.append(("gate", _slice_span(gate), tuple(gate.stride())))
    for name, span, strides in spans:
        if span >= _MAX_OFFSET:
            raise ValueError(
                f"fused_attention: {name} exceeds the kernels' 32-bit offsets: an element offset "
                f"inside one (batch, head) slice reaches {span} >= 2**31 (T * stride(T) and T * D "
                f"must stay below 2**31; shape {tuple(q.shape)}, strides {strides}); use shorter "
                "sequences or the PyTorch attention path")

    def _bias(name, t):
        if t is None:
            raise ValueError(f"fused_attention: variant {variant!r} needs {name} of shape (H, D)")
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (H, D):
            raise ValueError(f"fused_attention: {name} must have shape (H, D)=({H}, {D}), "
                             f"got {tuple(getattr(t, 'shape', ()))}")
        if t.device != q.device or not t.is_floating_point():
            raise ValueError(f"fused_attention: {name} must be a floating tensor on {q.device}")

    if variant in ("attention_bias", "context_bias"):
        _bias("k_bias", k_bias)
        _bias("v_bias", v_bias)
    if variant == "fixed_bias":
        _bias("v_bias", v_bias)
    if variant == "scaling":
        if gate is None:
            raise ValueError("fused_attention: variant 'scaling' needs gate of shape (B, H, T)")
        if not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (B, H, T):
            raise ValueError(f"fused_attention: gate must have shape (B, H, T)=({B}, {H}, {T}), "
                             f"got {tuple(getattr(gate, 'shape', ()))}")
        if gate.device != q.device or not gate.is_floating_point():
            raise ValueError(f"fused_attention: gate must be a floating tensor on {q.device}")


def fused_attention(q, k, v, *, variant="default", k_bias=None, v_bias=None,
                    gate=None, sigmoid_bias=None, sm_scale=None):
    """Causal fused attention; see the module docstring for the variants."""
    _check(q, k, v, variant, k_bias, v_bias, gate)
    B, H, T, D = q.shape
    vid = _VID[variant]
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    if vid == _SIGMOID:
        sig_bias = float(sigmoid_bias) if sigmoid_bias is not None else -math.log(T)
    else:
        sig_bias = 0.0
    kb = k_bias if vid in (_ATTN_BIAS, _CTX_BIAS) else None
    vb = v_bias if vid in (_FIXED, _ATTN_BIAS, _CTX_BIAS) else None
    g = gate if vid == _SCALING else None
    return _apply(q, k, v, kb, vb, g, vid, scale, sig_bias)


def fused_attention_ref(q, k, v, *, variant="default", k_bias=None, v_bias=None,
                        gate=None, sigmoid_bias=None, sm_scale=None):
    """Plain PyTorch reference: materialised (B, H, T, T) scores, explicit causal
    mask, matmuls in the input dtype, softmax / sigmoid in float32 (float64 for
    float64 inputs) then cast back to the input dtype -- the way a typical PyTorch
    attention computes.  Call it on float64 copies for ground truth."""
    if variant not in _VID:
        raise ValueError(f"fused_attention_ref: unknown variant {variant!r}; expected one of {VARIANTS}")
    B, H, T, D = q.shape
    dt = q.dtype
    up = torch.promote_types(dt, torch.float32)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if variant == "sigmoid":
        b = float(sigmoid_bias) if sigmoid_bias is not None else -math.log(T)
        p = torch.sigmoid(s.to(up) + b).masked_fill(~causal, 0.0).to(dt)
        return torch.matmul(p, v)
    s = s.masked_fill(~causal, float("-inf"))
    if variant in ("attention_bias", "context_bias"):
        kb = k_bias.to(dt)
        vb = v_bias.to(dt)
        s0 = torch.matmul(q, kb[None, :, :, None]) * scale  # (B, H, T, 1)
        p_full = torch.softmax(torch.cat([s0, s], dim=-1).to(up), dim=-1).to(dt)
        sink_term = p_full[..., :1] * vb[None, :, None, :]
        if variant == "attention_bias":
            return torch.matmul(p_full[..., 1:], v) + sink_term
        p = torch.softmax(s.to(up), dim=-1).to(dt)
        return torch.matmul(p, v) + sink_term
    p = torch.softmax(s.to(up), dim=-1).to(dt)
    out = torch.matmul(p, v)
    if variant == "fixed_bias":
        out = out + v_bias.to(dt)[None, :, None, :]
    elif variant == "scaling":
        out = out * gate.to(dt).unsqueeze(-1)
    return out
