"""Every attention variant against an independent float64 implementation, on every backend, and the
registry's contract: one entry describes a variant, and a new entry needs nothing else."""

import math
import re
from pathlib import Path

import pytest
import torch

import attention_variants
from attention_variants import RECORDS, VARIANTS, attention, get_variant
from fused_kernels.flags import KernelFlags
from model import GPT, GPTConfig
from runtime.cli import UserError

try:
    import fused_kernels.fused_attention  # noqa: F401
    HAVE_TRITON = True
except Exception:  # triton not installed
    HAVE_TRITON = False

BACKENDS = ["reference", "sdpa"] + (["triton"] if HAVE_TRITON else [])
README = Path(__file__).resolve().parent.parent / "README.md"


class Layer(torch.nn.Module):
    """What a variant's parameters and per-call inputs need from an attention layer."""

    def __init__(self, variant, H, D):
        super().__init__()
        self.n_head = H
        attention_variants.add_variant_parameters(self, variant, H * D, H)


def naive_attention(name, q, k, v, layer, x, sigmoid_bias=None):
    """One query at a time, float64, keys 0..i only (no mask tensor), the variant's own inputs computed
    here from the layer's weights and the block input x (B, T, C): the formulas as in the papers."""
    q, k, v, x = q.double(), k.double(), v.double(), x.double()
    p64 = {n: t.detach().double() for n, t in layer.named_parameters()}
    B, H, T, D = q.shape
    s = 1.0 / math.sqrt(D)
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                logits = torch.stack([q[b, h, i] @ k[b, h, j] for j in range(i + 1)]) * s
                if name == "sigmoid":
                    bias = -math.log(T) if sigmoid_bias is None else sigmoid_bias
                    w = 1.0 / (1.0 + torch.exp(-(logits + bias)))
                    out[b, h, i] = (w[:, None] * v[b, h, : i + 1]).sum(0)
                    continue
                if name == "softmax1":
                    e = torch.exp(logits)
                    out[b, h, i] = (e[:, None] * v[b, h, : i + 1]).sum(0) / (1.0 + e.sum())
                    continue
                p = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
                o = (p[:, None] * v[b, h, : i + 1]).sum(0)
                if name in ("context_bias", "attention_bias"):
                    sink = (q[b, h, i] @ p64["k_bias"][h]) * s
                    all_logits = torch.cat([sink[None], logits])
                    ps = torch.exp(all_logits - all_logits.max()) / torch.exp(all_logits - all_logits.max()).sum()
                    if name == "context_bias":
                        o = o + ps[0] * p64["v_bias"][h]
                    else:
                        o = ps[0] * p64["v_bias"][h] + (ps[1:, None] * v[b, h, : i + 1]).sum(0)
                if name == "fixed_bias":
                    o = o + p64["v_bias"][h]
                if name == "scaling":  # S(x) = 2 sigmoid(W x + b), head h's row of W
                    o = o * 2.0 / (1.0 + torch.exp(-(x[b, i] @ p64["scale_proj.weight"][h] + p64["scale_proj.bias"][h])))
                if name == "gated":  # sigmoid(x W_theta), head h's D output channels
                    w = p64["gate_proj.weight"][h * D:(h + 1) * D]  # (D, C)
                    o = o / (1.0 + torch.exp(-(w @ x[b, i])))
                out[b, h, i] = o
    return out


def random_inputs(name, B=2, H=3, T=7, D=16, dtype=torch.float64, seed=0):
    """(variant, q, k, v, layer, x) with sink vectors and gate weights large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    variant = get_variant(name)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(3))
    x = torch.randn(B, T, H * D, generator=g, dtype=dtype)
    layer = Layer(variant, H, D).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    return variant, q, k, v, layer, x


def run(backend, variant, q, k, v, layer, x, **kw):
    if backend == "triton":  # the kernel takes fp16/bf16/fp32
        q, k, v, x, layer = q.float(), k.float(), v.float(), x.float(), layer.float()
    return attention(variant, q, k, v, attention_variants.variant_inputs(layer, variant, x), backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", VARIANTS)
def test_matches_float64_formula(name, backend):
    variant, q, k, v, layer, x = random_inputs(name)
    expected = naive_attention(name, q, k, v, layer, x)
    got = run(backend, variant, q, k, v, layer, x).double()
    tol = 1e-10 if backend != "triton" else 2e-5
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert (expected - naive_attention("default", q, k, v, layer, x)).abs().max() > 1e-3 or name == "default"


@pytest.mark.parametrize("b", [None, -2.5])
def test_sigmoid_bias(b):
    variant, q, k, v, layer, x = random_inputs("sigmoid", T=5)
    expected = naive_attention("sigmoid", q, k, v, layer, x, sigmoid_bias=b)
    torch.testing.assert_close(run("reference", variant, q, k, v, layer, x, sigmoid_bias=b), expected)
    other = naive_attention("sigmoid", q, k, v, layer, x, sigmoid_bias=-math.log(5) + 1.0)
    assert not torch.allclose(expected, other)  # the bias matters, so the check above can fail


@pytest.mark.parametrize("name", ["attention_bias", "softmax1"])
def test_sink_visible_to_first_query(name):
    # with one token, a sink still takes weight: it is a key for query 0 too
    variant, q, k, v, layer, x = random_inputs(name, T=1)
    out = run("reference", variant, q, k, v, layer, x)
    assert not torch.allclose(out, v)
    torch.testing.assert_close(out, naive_attention(name, q, k, v, layer, x))


@pytest.mark.parametrize("name", VARIANTS)
def test_records_are_documented(name):
    """The reference returns exactly the record keys its entry lists, with the documented shapes;
    probabilities sum to one with the sink share; a gate is recorded only with its meaning."""
    variant, q, k, v, layer, x = random_inputs(name)
    B, H, T, D = q.shape
    _, rec = run("reference", variant, q, k, v, layer, x, return_weights=True)
    assert set(rec) == set(variant.records) and set(variant.records) <= set(RECORDS)
    shapes = {"probs": (B, H, T, T), "sink_probs": (B, H, T), "gate": (B, H, T)}
    for key, t in rec.items():
        assert tuple(t.shape) == shapes[key], (key, tuple(t.shape))
    assert ("gate" in rec) == bool(variant.gate)
    assert torch.all(rec["probs"].triu(1) == 0)
    if name != "sigmoid":
        total = rec["probs"].sum(-1) + (rec["sink_probs"] if "sink_probs" in rec and name != "context_bias" else 0)
        torch.testing.assert_close(total, torch.ones_like(total))


def test_gate_records_are_what_they_say():
    """scaling records S(x) in (0, 2) per head; gated records the mean over each head's channels of
    sigmoid(x W_theta), in (0, 1) -- computed here from the weights, independently."""
    for name in ("scaling", "gated"):
        variant, q, k, v, layer, x = random_inputs(name)
        _, rec = run("reference", variant, q, k, v, layer, x, return_weights=True)
        B, H, T, D = q.shape
        if name == "scaling":
            w, b = layer.scale_proj.weight.detach(), layer.scale_proj.bias.detach()
            expected = (2 * torch.sigmoid(x @ w.T + b)).transpose(1, 2)  # (B, H, T)
            assert "(0, 2)" in variant.gate
        else:
            expected = torch.sigmoid(x @ layer.gate_proj.weight.detach().T).view(B, T, H, D).mean(-1).transpose(1, 2)
            assert "(0, 1)" in variant.gate
        torch.testing.assert_close(rec["gate"], expected)


def test_unknown_variant_lists_every_variant():
    with pytest.raises(UserError) as e:
        get_variant("flash")
    assert all(v in str(e.value) for v in VARIANTS)
    with pytest.raises(UserError):
        GPTConfig(attention="nope")
    with pytest.raises(UserError):
        GPTConfig(attn_backend="cuda-magic")


def test_readme_variant_table_is_the_registry():
    """The README's table is generated from the registry (`python -c "import attention_variants as a;
    print(a.readme_table())"`): it lists every variant and cannot drift."""
    table = attention_variants.readme_table()
    assert table in README.read_text(), "README variant table differs from attention_variants.readme_table()"
    rows = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert rows == list(VARIANTS) and len(rows) == 8


def tiny_config(name, backend, **kw):
    return GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, attention=name,
                     attn_backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", VARIANTS)
def test_causality(name, backend):
    torch.manual_seed(0)
    model = GPT(tiny_config(name, backend)).eval()
    idx = torch.randint(0, 64, (2, 12))
    changed = idx.clone()
    t = 5
    changed[:, t:] = torch.randint(0, 64, (2, 12 - t))
    with torch.no_grad():
        a, _ = model(idx, idx)
        b, _ = model(changed, changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:])


def variant_param_names(model, variant):
    return [n for n, _ in model.named_parameters() if attention_variants.owns_key(variant, n)]


@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_reach_variant_params_and_backends_agree(name):
    grads, outs = {}, {}
    variant = get_variant(name)
    for backend in BACKENDS:
        torch.manual_seed(0)
        model = GPT(tiny_config(name, backend))
        with torch.no_grad():  # make the sink parameters large enough to matter
            for n, p in model.named_parameters():
                if n.endswith(("k_bias", "v_bias")):
                    p.normal_(0, 0.5)
        idx = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
        logits, loss = model(idx, idx)
        loss.backward()
        outs[backend] = logits.detach()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
        for n in variant_param_names(model, variant):
            assert grads[backend][n].abs().sum() > 0, f"no gradient reaches {n} on {backend}"
    # every tensor of the variant's own parameters, in every layer
    per_layer = len(list(Layer(variant, 2, 16).parameters()))
    assert len(variant_param_names(model, variant)) == 2 * per_layer
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(outs[backend], outs["reference"], atol=2e-5, rtol=1e-4)
        for n in grads["reference"]:
            torch.testing.assert_close(grads[backend][n], grads["reference"][n], atol=2e-5, rtol=1e-3, msg=n)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("name", VARIANTS)
def test_dropout_is_active_in_training_only(name, backend):
    torch.manual_seed(0)
    model = GPT(tiny_config(name, backend, dropout=0.5))
    idx = torch.randint(0, 64, (2, 9))
    model.eval()
    with torch.no_grad():
        e1, e2 = model(idx, idx)[0], model(idx, idx)[0]
    torch.testing.assert_close(e1, e2)
    model.train()
    # the attention-probability dropout itself: the variant's attention call, not only resid dropout
    variant, q, k, v, layer, x = random_inputs(name, dtype=torch.float32)
    torch.manual_seed(1)
    a = run(backend, variant, q, k, v, layer, x, dropout_p=0.5)
    b = run(backend, variant, q, k, v, layer, x, dropout_p=0.0)
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_auto_backend_on_cpu_avoids_triton():
    variant, q, k, v, _, _ = random_inputs("default", dtype=torch.float32)
    assert attention_variants.resolve_backend("auto", variant, q, 0.0) == "sdpa"
    assert attention_variants.resolve_backend("auto", get_variant("sigmoid"), q, 0.0) == "reference"


# ----------------------------------------------------------------------------------------------
# a new variant is one registry entry

HALF = attention_variants.output_step_variant(
    "half_default", "0.5 · softmax(QKᵀ/√d) V", "a throw-away test variant", step=lambda y: 0.5 * y)


@pytest.fixture
def half_variant(monkeypatch):
    monkeypatch.setitem(attention_variants.REGISTRY, HALF.name, HALF)
    return HALF


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_variant_needs_only_a_registry_entry(half_variant, backend):
    """Registered from inside the test, it computes 0.5 x default attention on every backend and
    trains two steps of a tiny model: nothing outside the registry had to know about it."""
    _, q, k, v, layer, x = random_inputs("default", dtype=torch.float32)
    got = attention(half_variant, q, k, v, {}, backend=backend).double()
    torch.testing.assert_close(got, 0.5 * naive_attention("default", q, k, v, layer, x), atol=2e-5, rtol=2e-5)
    torch.manual_seed(0)
    model = GPT(tiny_config("half_default", backend))
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(2):
        _, loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="already registered"):
        attention_variants.register(half_variant)


# a variant whose attention core the kernel already has: one entry naming the flags it runs with
ZERO_SINK_COPY = attention_variants.AttentionVariant(
    "zero_sink_copy", "softmax1 under another name", "a throw-away test variant",
    attention_variants.softmax1_reference, attention_variants.softmax1_sdpa, KernelFlags(sink="zero"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_variant_reusing_kernel_flags_is_one_entry(monkeypatch, backend):
    """Registered from inside the test with softmax1's flags, it computes softmax-off-by-one on every backend
    (the float64 formula), and the README table describes its kernel from the flags."""
    monkeypatch.setitem(attention_variants.REGISTRY, ZERO_SINK_COPY.name, ZERO_SINK_COPY)
    _, q, k, v, layer, x = random_inputs("softmax1")
    got = run(backend, ZERO_SINK_COPY, q, k, v, layer, x).double()
    tol = 1e-10 if backend != "triton" else 2e-5
    torch.testing.assert_close(got, naive_attention("softmax1", q, k, v, layer, x), atol=tol, rtol=tol)
    row = next(line for line in attention_variants.readme_table().splitlines() if "`zero_sink_copy`" in line)
    assert "| flag `sink='zero'` |" in row


@pytest.mark.parametrize("name", ["scaling", "gated", "softmax1"])
def test_analysis_reports_each_variant_by_its_entry(name):
    """The analysis labels a gate with what its entry says it is (never another variant's S(x)), reports
    the sink share of sink variants, and lists the variant's own Linear among the weight statistics."""
    from analysis.analyzer import OutlierAnalyzer

    variant = get_variant(name)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, attention=name)).eval()
    X = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    an = OutlierAnalyzer(model, seq_len=16)
    an.run_batch(X)
    res = an.result()
    att = res["attention"]
    if variant.gate:
        assert att["gate_meaning"] == variant.gate
        layer = model.transformer.h[0].attn
        with torch.no_grad():  # the layer-0 gate at position 0, from the weights, independently
            x = model.transformer.h[0].ln_1(model.transformer.wte(X) + model.transformer.wpe(torch.arange(16)))
            proj = getattr(layer, variant.params[0].name)(x).double()
            gate = 2 * torch.sigmoid(proj) if name == "scaling" else torch.sigmoid(proj)
        assert att["gate"]["first"][0] == pytest.approx(gate[:, 0].mean().item(), rel=1e-4)
        assert f"attn.{variant.params[0].name}" in res["weight"]
    else:
        assert "gate" not in att and "gate_meaning" not in att
    assert ("sink_share" in att) == ("sink_probs" in variant.records)


# ----------------------------------------------------------------------------------------------
# `auto`: the fused kernel only where it was measured not to be slower than the variant's SDPA form

# fused time / SDPA-form time inverted (> 1: fused faster), one H200, commit c99af85, bf16, D = 64
# (benchmarks/RESULTS.md): GPT-2 124M training tokens/s at T = 1024; the attention benchmark's fwd+bwd at
# T = 2048 (the variant's unfused path) and at 4096 / 8192 (default vs FlashAttention). sigmoid has no SDPA
# form: its alternative is the reference formula.
MEASURED_FUSED_SPEEDUP = {
    ("default", 1024): 0.97, ("default", 2048): 0.286, ("default", 4096): 0.78, ("default", 8192): 1.29,
    ("fixed_bias", 1024): 0.97, ("fixed_bias", 2048): 0.298,
    ("context_bias", 1024): 1.30, ("context_bias", 2048): 1.54,
    ("attention_bias", 1024): 1.10, ("attention_bias", 2048): 1.34,
    ("scaling", 1024): 0.89, ("scaling", 2048): 0.556,
    ("sigmoid", 1024): 2.30, ("sigmoid", 2048): 9.58,
    ("gated", 1024): 0.87, ("gated", 2048): 0.648,
    ("softmax1", 1024): 1.17, ("softmax1", 2048): 1.16,
}


@pytest.fixture
def on_cuda(monkeypatch):
    """Tensors report is_cuda (meta tensors stand in for CUDA ones: no memory, no GPU)."""
    if not HAVE_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))


def _auto(name, T, dropout_p=0.0):
    q = torch.empty(2, 12, T, 64, device="meta", dtype=torch.bfloat16)
    return attention_variants.resolve_backend("auto", get_variant(name), q, dropout_p)


def test_auto_uses_the_kernel_where_it_was_measured_faster(on_cuda):
    assert {name for name, _ in MEASURED_FUSED_SPEEDUP} == set(VARIANTS)
    for (name, T), speedup in MEASURED_FUSED_SPEEDUP.items():
        assert (_auto(name, T) == "triton") == (speedup >= 1.0), (name, T, speedup)


def test_auto_keeps_the_sdpa_form_where_nothing_was_measured(on_cuda):
    for name in VARIANTS:
        variant = get_variant(name)
        # below the smallest measured T, and between the default kernel's measured points
        assert _auto(name, 512) == ("triton" if variant.sdpa is None else "sdpa"), name
        if variant.fused_from_t == attention_variants.DEFAULT_KERNEL_FROM_T:
            assert _auto(name, 6000) == "sdpa" and _auto(name, 16384) == "triton", name
        assert _auto(name, 16384, dropout_p=0.1) in ("sdpa", "reference"), name  # the kernel has no dropout
    unmeasured = attention_variants.AttentionVariant("unmeasured", "f", "s", reference=None, sdpa=None,
                                                     kernel_flags=KernelFlags())
    assert unmeasured.fused_from_t is None
    assert HALF.fused_from_t == attention_variants.DEFAULT_KERNEL_FROM_T  # an output step runs the default kernel
