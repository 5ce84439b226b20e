"""The fused causal attention kernels (Triton): only the ``@triton.jit`` code and its switches.

FlashAttention-2 style: an online softmax over key tiles, no T x T tensor in memory, one log-sum-exp
per row saved for the backward. Four kernels (``KERNELS``): the forward; the backward's preprocess
(Delta and the sink terms per row), dK/dV (iterating over query blocks) and dQ (iterating over key
blocks), with no atomics, so the backward is deterministic.

Shapes and layout: q, k, v, o and their gradients are (B, H, T, D) read through four strides each (any
layout); k'/v' are (H, D) read as float32; row buffers (LSE, Delta, dS0) are (B * H, T) float32. B * H
is grid axis 0 (not bound by the 65535 of axes 1 and 2), query / key blocks are axis 1. Offsets inside
one (batch, head) slice are 32-bit; the batch / head offsets and row indices are 64-bit.

Switches (``tl.constexpr``): the attention core, from a ``KernelFlags`` (fused_kernels/flags.py) through
``switches(kind, flags)``: SIGMOID, LEARNED_SINK, CONTEXT_SINK, ZERO_SINK, SINK_PARAMS, each kernel
taking those among its parameters; HEAD_D (16, 32, 64 or 128); BLOCK_M / BLOCK_N (the tiles,
fused_kernels/launch.py); PREC, the dot precision ("ieee" or "tf32"); UPCAST, set only under triton's CPU
interpreter for bfloat16 (see ``_dot``). Accumulation is float32; probabilities and dS are cast to the
input dtype before the second matmul, as in FlashAttention.
"""

import triton
import triton.language as tl

from fused_kernels.flags import SWITCHES

# Scores are kept in base 2: qk2 = q.k * qk_scale + score_bias with qk_scale = sm_scale * log2(e)
# (score_bias = b * log2(e) for sigmoid, 0 otherwise); LSE is stored as log2(sum exp2(qk2)).


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
def fwd_kernel(
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
def bwd_preprocess(
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
def bwd_dkdv_kernel(
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
def bwd_dq_kernel(
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


KERNELS = {"fwd": fwd_kernel, "pre": bwd_preprocess, "dkdv": bwd_dkdv_kernel, "dq": bwd_dq_kernel}

# Triton decides interpreter vs. compiled kernels once, when @triton.jit runs (i.e. when this module is
# imported, from TRITON_INTERPRET); read that decision from the kernels themselves so the host code
# always agrees with it.
INTERPRET = not isinstance(fwd_kernel, triton.runtime.jit.JITFunction)


def switches(kind: str, flags) -> dict:
    """The switches kernel ``kind`` takes, set for ``flags`` (a KernelFlags), in the kernel's order."""
    names = KERNELS[kind].arg_names
    wanted = flags.switches()
    return {name: wanted[name] for name in names if name in SWITCHES}
