"""Correctness tests for the fused Triton attention kernels (fused_kernels/), run through every
attention variant's registry entry (attention_variants.py): its `triton` path against its `reference`.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1,
set in tests/conftest.py before anything imports triton); the GPU tests at real
sizes skip cleanly.  The registry references themselves are checked against
independent float64 formulas in tests/test_attention_variants.py.

Tolerance rule (FlashAttention's): ground truth is the variant's reference on
float64 copies of the inputs; the reference run in the test dtype gives the
error budget.  The kernel path must satisfy

    max|kernel - truth| <= 2 * max|ref_dtype - truth| + atol[dtype]   (output)
    max|kernel - truth| <= 3 * max|ref_dtype - truth| + atol[dtype]   (gradients)

Gradients are those of q, k, v, the block input x (through the variant's per-call
inputs, e.g. a gate) and every parameter the variant owns (k', v', gate weights).
The atol term matters when the reference path is itself almost exact (fp32,
where both errors are ~1e-7..1e-6 and only the summation order differs): 1e-5
is ~100 fp32 ulps at magnitude 1.  For fp16 (ulp 1e-3 at 1) and bf16 (ulp 8e-3
at 1) the atol is about one ulp at unit magnitude, i.e. it only forgives a
single extra rounding of an O(1) value; the 2x / 3x factor does the real work.
"""

import copy
import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # conftest does this too; harmless if repeated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attention_variants as av  # noqa: E402
import fused_kernels.fused_attention as fa  # noqa: E402
from fused_kernels import attention_kernels, launch  # noqa: E402
from fused_kernels.flags import SWITCHES, KernelFlags  # noqa: E402
from fused_kernels.fused_attention import fused_attention, interpreting, is_supported  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
VARIANTS = av.VARIANTS


class _Layer(torch.nn.Module):
    """What a variant's parameters and inputs need from an attention layer."""

    def __init__(self, variant, H, D):
        super().__init__()
        self.n_head = H
        av.add_variant_parameters(self, variant, H * D, H)


def _master(variant, B, H, T, D, seed=0, device=DEVICE):
    """float32 master values for one variant; every run casts copies of these."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    layer = _Layer(av.get_variant(variant), H, D)
    with torch.no_grad():  # large enough to matter: sinks of N(0, 1), gates that vary
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.dim() == 2 and p.shape == (H, D) else 0.3))
    m = {
        "qkv": torch.randn(B, T, 3 * H * D, generator=g),
        "x": torch.randn(B, T, H * D, generator=g),
        "dout": torch.randn(B, H, T, D, generator=g),
    }
    return {"layer": layer.to(device), "variant": variant, **{k: v.to(device) for k, v in m.items()}}


def _split(qkv, H, layout):
    B, T, C3 = qkv.shape
    D = C3 // (3 * H)
    qkv_heads = [t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2)]  # (B, H, T, D) views
    return qkv_heads if layout == "qkv" else [t.contiguous() for t in qkv_heads]


def _run(path, m, dtype, sigmoid_bias=None, layout="qkv", param_dtype=None):
    """Forward + backward of the variant's `path` ("triton" or "reference") on dtype copies of m;
    returns out and a dict of gradients."""
    variant = av.get_variant(m["variant"])
    layer = copy.deepcopy(m["layer"]).to(dtype if param_dtype is None else param_dtype)
    qkv = m["qkv"].to(dtype).clone().requires_grad_()
    x = m["x"].to(dtype).clone().requires_grad_()
    H = layer.n_head
    q, k, v = _split(qkv, H, layout)
    inputs = av.variant_inputs(layer, variant, x)
    if path == "triton":
        out = variant.triton(q, k, v, sigmoid_bias=sigmoid_bias, **inputs)
    else:
        out = variant.reference(q, k, v, sigmoid_bias=sigmoid_bias, **inputs)[0]
    out.backward(m["dout"].to(dtype))
    B, T, _ = qkv.shape
    dq, dk, dv = (t.view(B, T, H, -1) for t in qkv.grad.split(qkv.shape[-1] // 3, dim=2))
    grads = {"q": dq, "k": dk, "v": dv}
    if x.grad is not None:
        grads["x"] = x.grad
    grads.update({n: p.grad for n, p in layer.named_parameters()})
    return out, grads


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check_against_truth(m, dtype, **kw):
    out_k, g_k = _run("triton", m, dtype, **kw)
    out_r, g_r = _run("reference", m, dtype, **kw)
    out_t, g_t = _run("reference", m, torch.float64, **{k: v for k, v in kw.items() if k != "param_dtype"})
    atol = ATOL[dtype]
    variant = m["variant"]
    assert out_k.dtype == dtype and out_k.shape == out_t.shape
    ek, er = _err(out_k, out_t), _err(out_r, out_t)
    assert ek <= 2 * er + atol, f"{variant} {dtype} out: kernel {ek:.3e} vs ref {er:.3e}"
    assert set(g_k) == set(g_t)
    for name in g_t:
        assert g_k[name] is not None, f"missing gradient for {name}"
        assert g_k[name].shape == g_t[name].shape
        ek, er = _err(g_k[name], g_t[name]), _err(g_r[name], g_t[name])
        assert ek <= 3 * er + atol, f"{variant} {dtype} d{name}: kernel {ek:.3e} vs ref {er:.3e}"


def test_every_variant_parameter_gets_a_gradient():
    for variant in VARIANTS:
        m = _master(variant, 1, 2, 9, 16, seed=1)
        _, grads = _run("triton", m, torch.float32)
        for name, _ in m["layer"].named_parameters():
            assert grads[name] is not None and grads[name].abs().sum() > 0, (variant, name)


# A covering subset instead of the full cross product (the interpreter is slow):
# every variant sees fp32 with several query/key blocks and a ragged tail, bf16
# and fp16 at D=64 with a tail, and bf16 with a single token.
CASES = [
    # (dtype, B, H, T, D)
    (torch.float32, 1, 3, 130, 16),
    (torch.bfloat16, 2, 3, 37, 64),
    (torch.float16, 1, 3, 37, 32),
    (torch.bfloat16, 2, 3, 1, 16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-B{c[1]}H{c[2]}T{c[3]}D{c[4]}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(variant, case):
    dtype, B, H, T, D = case
    _check_against_truth(_master(variant, B, H, T, D, seed=T + D), dtype)


# extra coverage of the kernel flags: off-diagonal key blocks at D=64 in half precision, and D=128
EXTRA = [
    ("attention_bias", torch.bfloat16, 130, 64),
    ("context_bias", torch.bfloat16, 130, 64),
    ("softmax1", torch.bfloat16, 130, 64),
    ("context_bias", torch.float16, 70, 64),
    ("sigmoid", torch.float16, 70, 64),
    ("default", torch.float16, 20, 128),
    ("attention_bias", torch.bfloat16, 20, 128),
    ("softmax1", torch.float16, 20, 128),
    ("sigmoid", torch.float32, 20, 128),
]


@pytest.mark.parametrize("variant,dtype,T,D", EXTRA, ids=lambda x: str(x).replace("torch.", ""))
def test_matches_reference_extra(variant, dtype, T, D):
    _check_against_truth(_master(variant, 1, 2, T, D, seed=3 + T), dtype)


@pytest.mark.parametrize("variant", ["attention_bias", "softmax1", "scaling"])
def test_contiguous_layout(variant):
    _check_against_truth(_master(variant, 1, 3, 45, 16, seed=5), torch.float32, layout="bhtd")


@pytest.mark.parametrize("sink", [None, "learned", "zero"])
def test_sm_scale(sink):
    """sm_scale s' equals the default scale applied to q * s' sqrt(D)."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 45, 16, generator=g, device="cpu").to(DEVICE) for _ in range(3))
    bias = {"k_bias": torch.randn(2, 16, device=DEVICE), "v_bias": torch.randn(2, 16, device=DEVICE)} \
        if sink == "learned" else {}
    got = fused_attention(q, k, v, sink=sink, sm_scale=0.3, **bias)
    expected = fused_attention(q * (0.3 * math.sqrt(16)), k, v, sink=sink, **bias)
    assert _err(got, expected) < 1e-5
    assert _err(got, fused_attention(q, k, v, sink=sink, **bias)) > 1e-3  # the scale matters


def test_sigmoid_explicit_bias():
    _check_against_truth(_master("sigmoid", 2, 1, 50, 16, seed=7), torch.float32, sigmoid_bias=1.5)


def test_fp32_params_with_bf16_activations():
    """Sink vectors and gate weights kept in fp32 (fp32 parameters) while q/k/v and x are bf16."""
    for variant in ("context_bias", "attention_bias"):
        m = _master(variant, 1, 2, 20, 16, seed=11)
        _check_against_truth(m, torch.bfloat16, param_dtype=torch.float32)
        _, g_k = _run("triton", m, torch.bfloat16, param_dtype=torch.float32)
        assert g_k["k_bias"].dtype == torch.float32 and g_k["v_bias"].dtype == torch.float32


def test_expanded_grad_output():
    """out.sum().backward() hands the kernel a dO with zero strides."""
    for variant in ("default", "attention_bias"):
        m = _master(variant, 1, 2, 33, 16, seed=13)
        m["dout"] = torch.ones(1, 1, 1, 1, device=DEVICE).expand(1, 2, 33, 16)
        _, g_k = _run("triton", m, torch.float32)
        _, g_t = _run("reference", m, torch.float64)
        for name in g_t:
            assert _err(g_k[name], g_t[name]) < 1e-4, (variant, name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_is_deterministic(variant):
    m = _master(variant, 1, 3, 37, 16, seed=17)
    _, g1 = _run("triton", m, torch.bfloat16)
    _, g2 = _run("triton", m, torch.bfloat16)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"{variant}: d{name} differs between runs"


def test_sigmoid_bias_none_is_minus_log_t():
    T = 29
    m = _master("sigmoid", 1, 2, T, 16, seed=19)
    out_none, g_none = _run("triton", m, torch.float32, sigmoid_bias=None)
    out_expl, g_expl = _run("triton", m, torch.float32, sigmoid_bias=-math.log(T))
    assert torch.equal(out_none, out_expl)
    for name in g_none:
        assert torch.equal(g_none[name], g_expl[name])
    out_t, _ = _run("reference", m, torch.float64, sigmoid_bias=-math.log(T))
    assert _err(out_none, out_t) < 1e-5
    out_other, _ = _run("reference", m, torch.float64, sigmoid_bias=0.0)
    assert _err(out_other, out_t) > 1e-2  # the bias matters, so the check above can fail


@pytest.mark.parametrize("sink", ["learned", "context", "zero"])
def test_sink_visible_to_first_query(sink):
    """T = 1: an explicit formula, independent of the reference implementation."""
    B, H, D = 2, 3, 16
    g = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(B, H, 1, D, generator=g) for _ in range(3))
    kb, vb = torch.randn(H, D, generator=g), torch.randn(H, D, generator=g)
    bias = {"k_bias": kb.to(DEVICE), "v_bias": vb.to(DEVICE)} if sink != "zero" else {}
    out = fused_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), sink=sink, **bias)[:, :, 0].cpu()
    q, k, v = (t[:, :, 0].double() for t in (q, k, v))  # (B, H, D)
    s = 1 / math.sqrt(D)
    s_sink = (q * kb.double()).sum(-1) * s if sink != "zero" else torch.zeros(B, H, dtype=torch.float64)
    p_sink = torch.sigmoid(s_sink - (q * k).sum(-1) * s)[..., None]  # softmax over [sink, key 0]
    if sink == "learned":
        expected = p_sink * vb.double() + (1 - p_sink) * v
    elif sink == "context":  # plain softmax over one key is 1
        expected = v + p_sink * vb.double()
    else:  # value 0 for the sink
        expected = (1 - p_sink) * v
    assert _err(out, expected) < 1e-5
    assert _err(out, v) > 1e-2  # the sink must actually change the answer for query 0


# ----------------------------------------------------------------------------
# torch.compile: the kernels are torch.library custom ops, traced without a graph break
# ----------------------------------------------------------------------------

OP_CASES = [("none", False), ("learned", False), ("context", False), ("zero", False), ("none", True)]


@pytest.mark.parametrize("sink,sigmoid", OP_CASES)
@pytest.mark.slow
def test_custom_ops_pass_opcheck(sink, sigmoid):
    """torch.library.opcheck: schema, autograd registration, fake tensors (shapes, dtypes and
    strides of the fake outputs equal the real ones) and AOT dispatch equal to eager."""
    g = torch.Generator().manual_seed(31)
    B, H, T, D = 1, 2, 20, 16
    qkv = torch.randn(B, T, 3 * H * D, generator=g).to(DEVICE).requires_grad_()
    q, k, v = _split(qkv, H, "qkv")
    with_bias = sink in ("learned", "context")
    kb, vb = (torch.randn(H, D, generator=g).to(DEVICE).requires_grad_() if with_bias else None for _ in range(2))
    args = (q, k, v, kb, vb, sink, sigmoid, 0.25, -1.0)
    torch.library.opcheck(fa._attention_fwd, args)
    o, ou, lse = fa._attention_fwd(*args)
    bwd_args = (torch.randn_like(o), *(t.detach() for t in (q, k, v)), ou if sink == "context" else o, lse,
                *(t.detach() if t is not None else None for t in (kb, vb)), sink, sigmoid, 0.25, -1.0)
    torch.library.opcheck(fa._attention_bwd, tuple(t.detach() if isinstance(t, torch.Tensor) else t
                                                   for t in bwd_args))


def test_fake_outputs_have_the_real_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v = _split(torch.randn(2, 9, 3 * 2 * 16, device=DEVICE), 2, "qkv")  # the model's layout
    kb, vb = torch.randn(2, 2, 16, device=DEVICE)
    real = fa._attention_fwd(q, k, v, kb, vb, "context", False, 0.25, 0.0)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = fa._attention_fwd(*(mode.from_tensor(t) for t in (q, k, v, kb, vb)), "context", False, 0.25, 0.0)
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
    assert real[0].stride() == (9 * 2 * 16, 16, 2 * 16, 1)  # (B, T, H, D) storage like q


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.slow
def test_compile_fullgraph_without_graph_break(variant):
    """torch.compile(model, fullgraph=True) traces every variant through the kernel with zero graph
    breaks, and the compiled forward and backward equal eager (aot_eager: the same kernels)."""
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, attention=variant,
                          attn_backend="triton")).to(DEVICE)
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(idx, idx)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits_c, loss_c = compiled(idx, idx)
    loss_c.backward()
    grads_c = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits_e, loss_e = model(idx, idx)
    loss_e.backward()
    torch.testing.assert_close(logits_c, logits_e, atol=0, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads_c[n], p.grad, atol=0, rtol=0, msg=n)
    torch._dynamo.reset()


def _qkv(B=1, H=2, T=8, D=16, dtype=torch.float32):
    return [torch.randn(B, H, T, D, device=DEVICE, dtype=dtype) for _ in range(3)]


def test_bad_inputs_raise_value_error():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown sink"):
        fused_attention(q, k, v, sink="nope")
    with pytest.raises(ValueError, match="sigmoid"):
        fused_attention(q, k, v, sink="zero", sigmoid=True)
    q24, k24, v24 = _qkv(D=24)
    with pytest.raises(ValueError, match="head dim"):
        fused_attention(q24, k24, v24)
    with pytest.raises(ValueError, match="same"):
        fused_attention(q, k[:, :, :4], v)
    with pytest.raises(ValueError, match="4-D"):
        fused_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="dtypes differ"):
        fused_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="not supported"):
        fused_attention(*(t.double() for t in (q, k, v)))
    zeros = torch.zeros(2, 16, device=DEVICE)
    for sink in ("learned", "context"):
        with pytest.raises(ValueError, match="k_bias"):
            fused_attention(q, k, v, sink=sink, v_bias=zeros)
        with pytest.raises(ValueError, match="v_bias"):
            fused_attention(q, k, v, sink=sink, k_bias=zeros)
        with pytest.raises(ValueError, match=r"\(H, D\)"):
            fused_attention(q, k, v, sink=sink, k_bias=zeros, v_bias=torch.zeros(3, 16, device=DEVICE))
    with pytest.raises(ValueError, match="only read"):
        fused_attention(q, k, v, v_bias=zeros)  # a sink vector that would be silently ignored


# The GPU tile tables, run under the interpreter through launch.overrides(arch=..., candidate=...): the
# interpreter's own table uses small tiles, these are the configs the
# autotuner may pick on a GPU (BLOCK_M != BLOCK_N, several off-diagonal blocks, diagonal
# sub-blocks and ragged tails).  Every candidate of the main training shape (sm_90, D = 64, bf16)
# runs; the other tables run their first and second candidates.
GPU_TILE_CASES = [
    # (arch, candidate index, variant, dtype, T, D)
    (90, 0, "context_bias", torch.bfloat16, 300, 64),
    (90, 1, "attention_bias", torch.bfloat16, 300, 64),
    (90, 2, "softmax1", torch.bfloat16, 300, 64),
    (90, 0, "sigmoid", torch.float16, 129, 32),
    (90, 1, "default", torch.bfloat16, 200, 128),
    (90, 0, "attention_bias", torch.float16, 200, 128),
    (80, 0, "attention_bias", torch.bfloat16, 300, 64),
    (80, 1, "default", torch.float16, 129, 32),
    (80, 0, "sigmoid", torch.bfloat16, 200, 128),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run of the GPU tile tables")
@pytest.mark.parametrize("arch,index,variant,dtype,T,D", GPU_TILE_CASES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.slow
def test_gpu_tile_table_under_interpreter(arch, index, variant, dtype, T, D):
    with launch.overrides(arch=arch, candidate=index):
        _check_against_truth(_master(variant, 1, 2, T, D, seed=T + D + arch), dtype)
        chosen = launch.chosen_tiles()
    used = {row["kernel"]: (row["BLOCK_M"], row["BLOCK_N"], row["num_warps"], row["num_stages"]) for row in chosen
            if (row["head_dim"], row["dtype"], row["arch"]) == (D, dtype, arch)}
    assert len(used) == len(chosen) == 3  # fwd, dkdv, dq; the preprocess has one fixed tile
    for kind in ("fwd", "dkdv", "dq"):
        cands = launch.candidates(kind, D, dtype, arch)
        expected = cands[min(index, len(cands) - 1)]
        assert used[kind] == expected, (kind, used.get(kind), expected)
        assert T % expected[0] and T % expected[1]  # ragged tails in both tile dims
    assert any(cfg[0] != cfg[1] for cfg in used.values())


def test_autotune_key_and_buckets():
    """The tuning key covers head dim, dot precision, every flag and the T bucket (dtype is added by
    triton); sequence lengths share a result within a power-of-two bucket."""
    assert [launch.t_bucket(t) for t in (1, 16, 17, 1024, 1025, 10**6)] == [16, 16, 32, 1024, 2048, 65536]
    for kind in ("fwd", "dkdv", "dq"):
        kernel = attention_kernels.KERNELS[kind]
        names = set(kernel.arg_names)
        flags = {n for n in names if n.isupper() and n not in {"Q", "K", "V", "O", "OU", "LSE", "KB", "VB", "DO",
                                                                "DELTA", "DS0", "DK", "DV", "DQ", "H", "T",
                                                                "BLOCK_M", "BLOCK_N", "UPCAST"}}
        assert flags <= set(launch.TUNE_KEY), (kind, flags - set(launch.TUNE_KEY))


def test_tile_tables_are_consistent():
    """Every candidate obeys the causal loops' divisibility constraints and the tables
    differ per architecture (sm_8x gets smaller tiles than Hopper)."""
    for arch in (None, 75, 80, 86, 89, 90, 100):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for D in (16, 32, 64, 128):
                for kind in ("fwd", "dkdv", "dq"):
                    cands = launch.candidates(kind, D, dtype, arch)
                    assert cands, (arch, dtype, D, kind)
                    assert len(set(cands)) == len(cands), (arch, dtype, D, kind)
                    for bm, bn, warps, stages in cands:
                        if kind == "dkdv":
                            assert bn % bm == 0, (arch, dtype, D, kind, bm, bn)
                        else:
                            assert bm % bn == 0, (arch, dtype, D, kind, bm, bn)
                        assert warps in (1, 2, 4, 8) and stages >= 1
    assert launch.candidates("dkdv", 128, torch.bfloat16, 80) != launch.candidates("dkdv", 128, torch.bfloat16, 90)


def test_interpreting_flag():
    """interpreting() reports the decision triton took when the kernels were decorated."""
    import triton
    assert interpreting() == (not isinstance(attention_kernels.fwd_kernel, triton.runtime.jit.JITFunction))
    if not torch.cuda.is_available():  # conftest sets TRITON_INTERPRET=1 before the import
        assert interpreting()


def test_32bit_offset_limit_raises():
    """Offsets inside one (batch, head) slice are 32-bit: a clear ValueError, not a wrong answer.
    Meta tensors: no memory is allocated."""
    if not interpreting():
        pytest.skip("meta tensors only pass the device check under the interpreter")
    # the model's (B, T, H, D) layout: rows of H * D elements, (T - 1) * H * D >= 2**31
    T, H, D = 600_000, 32, 128
    big = [torch.empty(1, T, H, D, device="meta").transpose(1, 2) for _ in range(3)]
    with pytest.raises(ValueError, match="32-bit"):
        fused_attention(*big)
    assert not is_supported(big[0])
    # a small T with a huge row stride (e.g. a view into a very wide buffer)
    T, D, stride_t = 2049, 16, 2**20  # (T - 1) * stride_t == 2**31
    wide = [torch.empty_strided((1, 1, T, D), (T * stride_t, T * stride_t, stride_t, 1), device="meta")
            for _ in range(3)]
    with pytest.raises(ValueError, match=r"2\*\*31"):
        fused_attention(*wide)
    ok = [torch.empty_strided((1, 1, 1024, D), (2**30, 2**30, 2**20, 1), device="meta") for _ in range(3)]
    fa._check(*ok, None, False, None, None)  # 1023 * 2**20 + 15 < 2**31: accepted
    # query / key blocks on grid axis 1: at most 65535 blocks of 16
    long = [torch.empty(1, 1, 65535 * 16 + 1, 16, device="meta") for _ in range(3)]
    with pytest.raises(ValueError, match="above the supported"):
        fused_attention(*long)


def test_is_supported():
    q = _qkv()[0]
    assert is_supported(q, 0.0)
    assert not is_supported(q, 0.1)
    assert not is_supported(_qkv(D=24)[0], 0.0)
    assert not is_supported(q.double(), 0.0)
    assert is_supported(q.half(), 0.0) and is_supported(q.bfloat16(), 0.0)


# ----------------------------------------------------------------------------
# The launch cache and the eager path, with a stub in place of triton's compile-and-launch (what the
# cache does is host-side logic; the kernels themselves are tested above)
# ----------------------------------------------------------------------------

class _Recorder:
    """Stands in for triton: counts the launches that go through it, and returns a fake compiled kernel
    whose launcher records what the launch cache passes it."""

    def __init__(self):
        self.through_triton = []  # (kind, args, named) of each launch that missed the cache
        self.direct = []          # (kind, every argument of the launcher call) of each cached launch
        self.switches = []        # (kind, the tl.constexpr switches triton would get) of each missed launch

    def compile_and_launch(self, plan, kind, args):
        named = {name: ("named", name) for name in attention_kernels.KERNELS[kind].arg_names[len(args):]}
        named["T_BUCKET"] = launch.t_bucket(plan.shape[2]) if "T_BUCKET" in named else None
        self.through_triton.append((kind, args, named))
        self.switches.append((kind, {n: v for n, v in plan.constexprs[kind].items() if n in SWITCHES}))
        recorder = self

        class Compiled:
            function = ("function", kind)
            packed_metadata = ("metadata", kind)

            @staticmethod
            def run(*launcher_args):
                recorder.direct.append((kind, launcher_args))

        return Compiled(), (7, 3), {k: v for k, v in named.items() if v is not None}

    def kinds(self):
        return [kind for kind, _, _ in self.through_triton]


@pytest.fixture
def recorder():
    rec = _Recorder()
    with launch.overrides(compile_and_launch=rec.compile_and_launch):
        yield rec


def _model_qkv(B=2, T=40, H=2, D=16, dtype=torch.float32, offset=0):
    """q, k, v views of one (B, T, 3*H*D) projection, as in the model; ``offset`` elements into the storage."""
    flat = torch.randn(offset + B * T * 3 * H * D, device=DEVICE, dtype=dtype)
    qkv = flat[offset:].view(B, T, 3 * H * D)
    return [t.detach().requires_grad_() for t in _split(qkv, H, "qkv")]


def test_launch_cache_launches_directly_with_the_kernels_arguments(recorder):
    q, k, v = _model_qkv()
    fused_attention(q, k, v)
    assert recorder.kinds() == ["fwd"] and not recorder.direct
    out = fused_attention(q, k, v)
    assert recorder.kinds() == ["fwd"], "the second identical call went through triton again"
    ((kind, launched),) = recorder.direct
    assert kind == "fwd"
    grid, stream, function, metadata, launch_meta, enter, exit_ = launched[:3], *launched[3:9]
    assert grid == (7, 3, 1) and stream == 0 and function == ("function", "fwd")
    assert metadata == ("metadata", "fwd") and launch_meta is None and enter is None and exit_ is None
    # every kernel parameter, by name: triton's launcher takes them all, in the kernel's order
    names = attention_kernels.fwd_kernel.arg_names
    full = dict(zip(names, launched[9:]))
    assert len(launched) - 9 == len(names)
    assert full["Q"] is q and full["K"] is k and full["V"] is v
    assert full["O"].data_ptr() == out.data_ptr() and full["OU"] is full["O"]
    assert full["LSE"].shape == (2 * 2, 40) and full["KB"] is q  # unused pointers: placeholders
    B, H, T, D = q.shape
    assert (full["stride_qb"], full["stride_qh"], full["stride_qt"], full["stride_qd"]) == q.stride()
    assert (full["stride_ob"], full["stride_oh"], full["stride_ot"], full["stride_od"]) == out.stride()
    assert (full["H"], full["T"], full["T_BUCKET"]) == (H, T, launch.t_bucket(T))
    assert full["qk_scale"] == pytest.approx(math.log2(math.e) / math.sqrt(D))
    for name in ("SIGMOID", "LEARNED_SINK", "CONTEXT_SINK", "ZERO_SINK", "HEAD_D", "BLOCK_M", "BLOCK_N", "PREC",
                 "UPCAST"):
        assert full[name] == ("named", name)


def test_launch_cache_misses_on_any_other_key(recorder):
    q, k, v = _model_qkv()
    fused_attention(q, k, v)
    fused_attention(q, k, v)
    assert len(recorder.through_triton) == 1
    others = {
        "misaligned pointers": _model_qkv(offset=1),          # 4 bytes off 16-byte alignment
        "other strides": [t.detach().contiguous().requires_grad_() for t in (q, k, v)],
        "other dtype": _model_qkv(dtype=torch.float16),
        "other T": _model_qkv(T=41),
        "other batch": _model_qkv(B=3),
    }
    for what, (q2, k2, v2) in others.items():
        before = len(recorder.through_triton)
        fused_attention(q2, k2, v2)
        assert len(recorder.through_triton) == before + 1, what
        fused_attention(q2, k2, v2)
        assert len(recorder.through_triton) == before + 1, what + " (second call)"
    before = len(recorder.through_triton)
    fused_attention(q, k, v, sink="zero")  # other flags
    fused_attention(q, k, v, sigmoid=True)
    assert len(recorder.through_triton) == before + 2
    fused_attention(q, k, v)  # the first key is still cached
    assert len(recorder.through_triton) == before + 2


def test_launch_cache_backward(recorder):
    q, k, v = _model_qkv()
    dout = torch.randn(2, 40, 2, 16, device=DEVICE).transpose(1, 2)  # the output's layout
    for _ in range(2):
        torch.autograd.grad(fused_attention(q, k, v), (q, k, v), dout)
    assert recorder.kinds() == ["fwd", "pre", "dkdv", "dq"]
    assert [kind for kind, _ in recorder.direct] == ["fwd", "pre", "dkdv", "dq"]
    dkdv = dict(zip(attention_kernels.bwd_dkdv_kernel.arg_names, recorder.direct[2][1][9:]))
    assert dkdv["DO"] is dout and (dkdv["stride_dob"], dkdv["stride_doh"], dkdv["stride_dot"],
                                   dkdv["stride_dod"]) == dout.stride()
    torch.autograd.grad(fused_attention(q, k, v), (q, k, v), dout.contiguous())  # dO in another layout
    assert recorder.kinds()[4:] == ["pre", "dkdv", "dq"]


def test_launch_hooks_take_the_triton_path(recorder):
    """A profiler's launch hook (e.g. proton) needs triton's launch metadata: no direct launch then."""
    knobs = pytest.importorskip("triton.knobs")
    hooks = knobs.runtime.launch_enter_hook
    if not hasattr(hooks, "add"):
        pytest.skip("this triton has no HookChain launch hooks")
    q, k, v = _model_qkv()
    fused_attention(q, k, v)
    hook = lambda metadata: None  # noqa: E731
    hooks.add(hook)
    try:
        fused_attention(q, k, v)
    finally:
        hooks.remove(hook)
    assert len(recorder.through_triton) == 2 and not recorder.direct
    fused_attention(q, k, v)
    assert len(recorder.direct) == 1


def test_eager_path_builds_no_zero_gradients(recorder):
    """Eager calls bypass the custom ops, and the backward gets no materialised zero gradients
    (for lse and the unused outputs)."""
    from torch.profiler import profile

    for sink in (None, "context"):
        q, k, v = _model_qkv()
        bias = {"k_bias": torch.randn(2, 16, device=DEVICE), "v_bias": torch.randn(2, 16, device=DEVICE)} \
            if sink else {}
        dout = torch.randn(2, 40, 2, 16, device=DEVICE).transpose(1, 2)
        with profile() as prof:
            out = fused_attention(q, k, v, sink=sink, **bias)
            torch.autograd.grad(out, (q, k, v), dout)
        events = prof.events()
        # the sink gradients' reduction (aten::sum) fills its own output: not a materialised gradient
        zeros = [e.name for e in events if e.name in ("aten::zeros", "aten::zero_", "aten::fill_")
                 and (e.cpu_parent is None or e.cpu_parent.name != "aten::sum")]
        assert not zeros, (sink, zeros)
        assert not any(e.name.startswith("outlier_gpt::") for e in events), sink
        assert any(e.name == "aten::sum" for e in events) == (sink is not None)


def test_launch_cache_unused_under_the_interpreter():
    """The interpreter has no compiled kernel to launch directly: every launch goes through triton."""
    if not interpreting():
        pytest.skip("interpreter only")
    q, k, v = _model_qkv(T=9)
    fused_attention(q, k, v)
    plan = launch.plan(q, k, v, None, None, None, False, fa._check)  # the plan the call above made
    assert plan.launches and all(fast is None for fast in plan.launches.values())


def test_overrides_end_with_their_block():
    """Plans and chosen tiles made under launch.overrides stay inside it: after the block, the same arguments
    get the interpreter's plan and tiles again, not the forced architecture's."""
    if not interpreting():
        pytest.skip("interpreter only")
    q, k, v = _model_qkv(T=70)
    with launch.overrides(arch=80, candidate=1):
        fused_attention(q, k, v)
        inside = launch.plan(q, k, v, None, None, None, False, fa._check)
        assert inside.arch == 80 and {row["arch"] for row in launch.chosen_tiles()} == {80}
    fused_attention(q, k, v)
    after = launch.plan(q, k, v, None, None, None, False, fa._check)
    assert after is not inside and after.arch is None
    assert all(row["arch"] is None for row in launch.chosen_tiles())


# ----------------------------------------------------------------------------
# Kernel flags are data: each registry entry's flags are what its fused path runs, and the register/spill
# check compiles every flag set the registry gives the kernels
# ----------------------------------------------------------------------------

EVERY_FLAG_SET = [KernelFlags(), KernelFlags(sink="learned"), KernelFlags(sink="context"), KernelFlags(sink="zero"),
                  KernelFlags(sigmoid=True)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_runs_the_kernel_with_its_flags(variant):
    """The variant's fused output is the kernel's with its entry's flags (then its output step, if any), and
    not the kernel's with any other flag set: the flags in the entry are the ones that run."""
    spec = av.get_variant(variant)
    m = _master(variant, 1, 2, 20, 16, seed=37)
    q, k, v = _split(m["qkv"], 2, "qkv")
    inputs = av.variant_inputs(m["layer"], spec, m["x"])
    g = torch.Generator().manual_seed(41)
    sink_vectors = {name: inputs.get(name, torch.randn(2, 16, generator=g).to(DEVICE)) for name in ("k_bias", "v_bias")}
    with torch.no_grad():
        got = spec.triton(q, k, v, **inputs)
        by_flags = {}
        for flags in EVERY_FLAG_SET:
            core = fused_attention(q, k, v, sink=flags.sink, sigmoid=flags.sigmoid,
                                   **(sink_vectors if flags.sink in ("learned", "context") else {}))
            by_flags[flags] = spec.output_step(core, **inputs) if spec.output_step is not None else core
    assert spec.kernel_flags in by_flags
    assert torch.equal(got, by_flags[spec.kernel_flags])
    for flags, out in by_flags.items():
        if flags != spec.kernel_flags:
            assert _err(got, out) > 1e-3, (variant, flags)  # another core gives another output


def test_kernel_registers_covers_every_flag_set_of_the_registry(recorder):
    """The register/spill check compiles, per kernel, exactly the switch sets the registry's variants launch
    the kernels with (recorded from their fused forward and backward); it follows the registry."""
    registers = _load_script("kernel_registers.py")
    for variant in VARIANTS:
        spec = av.get_variant(variant)
        m = _master(variant, 1, 2, 9, 16, seed=43)
        qkv = m["qkv"].clone().requires_grad_()
        q, k, v = _split(qkv, 2, "qkv")
        spec.triton(q, k, v, **av.variant_inputs(m["layer"], spec, m["x"])).sum().backward()
    compiled = registers.flag_sets()
    assert set(compiled) == {"fwd", "dkdv", "dq"}
    for kind, labelled in compiled.items():
        launched = {tuple(sorted(switches.items())) for k, switches in recorder.switches if k == kind}
        assert launched == {tuple(sorted(switches.items())) for switches in labelled.values()}, kind
    # what the counts of the sm_90 check below rest on: 5 forward cores, 2 dK/dV, 3 dQ
    assert {kind: len(labelled) for kind, labelled in compiled.items()} == {"fwd": 5, "dkdv": 2, "dq": 3}
    assert set(compiled["fwd"]) == {"softmax", "learned sink", "context sink", "zero sink", "sigmoid"}
    # derived from the entries given: without sigmoid's entry no kernel is compiled with SIGMOID on
    without_sigmoid = registers.flag_sets([av.get_variant(name) for name in VARIANTS if name != "sigmoid"])
    assert all(not s.get("SIGMOID") for labelled in without_sigmoid.values() for s in labelled.values())
    assert len(without_sigmoid["dkdv"]) == 1


# ----------------------------------------------------------------------------
# GPU tests at real sizes (skipped without CUDA)
# ----------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("T", [1024, 2048])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_real_sizes_bf16(variant, D, T):
    _check_against_truth(_master(variant, 2, 4, T, D, seed=T + D, device="cuda"), torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("variant", ["attention_bias", "context_bias", "softmax1", "sigmoid"])
def test_gpu_other_dtypes(variant, dtype):
    _check_against_truth(_master(variant, 2, 3, 517, 64, seed=1, device="cuda"), dtype)


@needs_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_backward_is_deterministic(variant):
    m = _master(variant, 4, 6, 1024, 64, seed=2, device="cuda")
    _, g1 = _run("triton", m, torch.bfloat16)
    _, g2 = _run("triton", m, torch.bfloat16)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"{variant}: d{name} differs between runs"


@needs_cuda
def test_gpu_many_heads_grid():
    """B*H > 65535 (the CUDA limit of grid axes 1 and 2): B*H lives on grid axis 0."""
    B, H, T, D = 2, 32771, 16, 16
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = fused_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert _err(out, ref) < 2e-2
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_second_device():
    """Launches go to the tensors' device, not the current one."""
    m = _master("context_bias", 1, 2, 300, 64, seed=4, device="cuda:1")
    with torch.cuda.device(0):
        _check_against_truth(m, torch.bfloat16)


# ----------------------------------------------------------------------------
# the benchmark scripts' CPU smoke paths (the GPU sweeps themselves need CUDA)
# ----------------------------------------------------------------------------

def _load_script(name):
    import importlib
    return importlib.import_module(f"benchmarks.{name[:-3]}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="smoke mode is the CPU-interpreter path")
@pytest.mark.slow
def test_attention_benchmark_smoke(tmp_path):
    import json
    import shlex
    bench = _load_script("attention.py")
    argv = ["--interpret_smoke", "--variants", "context_bias", "--out_dir", str(tmp_path)]
    assert bench.main(argv) == 0
    (out,) = tmp_path.glob("attention_*.json")
    data = json.loads(out.read_text())
    assert shlex.split(data["command"])[3:] == argv  # the argv given to main, not sys.argv
    for key in ("git_commit", "date", "torch", "triton", "gpu", "compute_capability", "driver_version"):
        assert key in data
    assert {"fwd", "dkdv", "dq"} <= {row["kernel"] for row in data["tile_configs"]}
    assert {r["impl"] for r in data["results"]} == {"fused", "unfused"}
    assert all(r["status"] == "ok" for r in data["results"])
    fused = next(r for r in data["results"] if r["impl"] == "fused")
    assert fused["max_abs_diff_vs_unfused"] < 5e-2  # bf16 outputs of two implementations


@pytest.mark.skipif(torch.cuda.is_available(), reason="smoke mode is the CPU-interpreter path")
@pytest.mark.slow
def test_train_throughput_smoke(tmp_path):
    import json
    bench = _load_script("train_throughput.py")
    argv = ["--smoke", "--variants", "attention_bias", "--backends", "triton", "sdpa", "--out_dir", str(tmp_path)]
    assert bench.main(argv) == 0
    (out,) = tmp_path.glob("train_throughput_*.json")
    data = json.loads(out.read_text())
    assert data["command"].endswith(" ".join(argv)) and "git_commit" in data and "tile_configs" in data
    res = {r["backend"]: r for r in data["results"]}
    assert res["triton"]["status"] == "ok" and res["sdpa"]["status"] == "ok"
    assert abs(res["triton"]["final_loss"] - res["sdpa"]["final_loss"]) < 1e-3


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills():
    """Ahead-of-time compile for sm_90 (no GPU needed: triton ships ptxas): every kernel, flag
    combination and tile candidate at D = 64 bf16 has no register spills, and the sink forwards need
    at most 10% more registers than the default forward with the same tiles."""
    import subprocess

    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton build has no NVIDIA backend (ptxas)")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_registers", "--arch", "90",
                           "--head_dim", "64", "--check", "--max_sink_reg_ratio", "1.1"],
                          cwd=repo, capture_output=True, text=True, env=env, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if "registers" in line]
    assert len(rows) == 2 * 5 + 2 * 2 + 2 * 3  # every kernel x flags x candidate was compiled
