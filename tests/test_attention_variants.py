"""Every attention variant against an independent float64 implementation, on every backend."""

import math

import pytest
import torch

import attention_variants
from attention_variants import VARIANTS, attention, get_variant
from common import UserError
from model import GPT, GPTConfig

try:
    import fused_attention  # noqa: F401
    HAVE_TRITON = True
except Exception:  # triton not installed
    HAVE_TRITON = False

BACKENDS = ["reference", "sdpa"] + (["triton"] if HAVE_TRITON else [])


def naive_attention(name, q, k, v, k_bias=None, v_bias=None, gate=None, sigmoid_bias=None):
    """One query at a time, float64, keys 0..i only (no mask tensor): the formulas as in the paper."""
    q, k, v = q.double(), k.double(), v.double()
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
                p = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
                o = (p[:, None] * v[b, h, : i + 1]).sum(0)
                if name in ("context_bias", "attention_bias"):
                    sink = (q[b, h, i] @ k_bias[h].double()) * s
                    all_logits = torch.cat([sink[None], logits])
                    ps = torch.exp(all_logits - all_logits.max()) / torch.exp(all_logits - all_logits.max()).sum()
                    if name == "context_bias":
                        o = o + ps[0] * v_bias[h].double()
                    else:
                        o = ps[0] * v_bias[h].double() + (ps[1:, None] * v[b, h, : i + 1]).sum(0)
                if name == "fixed_bias":
                    o = o + v_bias[h].double()
                if name == "scaling":
                    o = o * gate[b, h, i].double()
                out[b, h, i] = o
    return out


def random_inputs(name, B=2, H=3, T=7, D=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(3))
    variant = get_variant(name)
    inputs = {p: torch.randn(H, D, generator=g, dtype=dtype) for p in variant.head_params}
    if variant.has_gate:
        inputs["gate"] = 2 * torch.sigmoid(torch.randn(B, H, T, generator=g, dtype=dtype))
    return variant, q, k, v, inputs


def run(backend, variant, q, k, v, inputs, **kw):
    if backend == "triton":  # the kernel takes fp16/bf16/fp32
        q, k, v = q.float(), k.float(), v.float()
        inputs = {n: t.float() for n, t in inputs.items()}
    return attention(variant, q, k, v, inputs, backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", VARIANTS)
def test_matches_float64_formula(name, backend):
    variant, q, k, v, inputs = random_inputs(name)
    expected = naive_attention(name, q, k, v, **inputs)
    got = run(backend, variant, q, k, v, inputs).double()
    tol = 1e-10 if backend != "triton" else 2e-5
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("b", [None, -2.5])
def test_sigmoid_bias(b):
    variant, q, k, v, inputs = random_inputs("sigmoid", T=5)
    expected = naive_attention("sigmoid", q, k, v, sigmoid_bias=b)
    torch.testing.assert_close(attention(variant, q, k, v, inputs, backend="reference", sigmoid_bias=b), expected)
    other = naive_attention("sigmoid", q, k, v, sigmoid_bias=-math.log(5) + 1.0)
    assert not torch.allclose(expected, other)  # the bias matters, so the check above can fail


def test_sink_visible_to_first_query():
    # with one token, attention_bias still mixes v' in: the sink is a key for query 0 too
    variant, q, k, v, inputs = random_inputs("attention_bias", T=1)
    out = attention(variant, q, k, v, inputs, backend="reference")
    assert not torch.allclose(out, v)
    torch.testing.assert_close(out, naive_attention("attention_bias", q, k, v, **inputs))


def test_recorded_weights_are_probabilities():
    for name in ("default", "attention_bias", "context_bias"):
        variant, q, k, v, inputs = random_inputs(name)
        _, w = attention(variant, q, k, v, inputs, return_weights=True)
        total = w["probs"].sum(-1) + (w["sink_probs"] if name == "attention_bias" else 0)
        torch.testing.assert_close(total, torch.ones_like(total))
        assert torch.all(w["probs"].triu(1) == 0)


def test_unknown_variant_lists_the_six():
    with pytest.raises(UserError) as e:
        get_variant("flash")
    assert all(v in str(e.value) for v in VARIANTS)
    with pytest.raises(UserError):
        GPTConfig(attention="nope")
    with pytest.raises(UserError):
        GPTConfig(attn_backend="cuda-magic")


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


def variant_param_names(model):
    return [n for n, _ in model.named_parameters() if n.endswith(("k_bias", "v_bias")) or "scale_proj" in n]


@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_reach_variant_params_and_backends_agree(name):
    grads, outs = {}, {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        model = GPT(tiny_config(name, backend))
        with torch.no_grad():  # make the sink / gate parameters large enough to matter
            for n, p in model.named_parameters():
                if n.endswith(("k_bias", "v_bias")):
                    p.normal_(0, 0.5)
        idx = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
        logits, loss = model(idx, idx)
        loss.backward()
        outs[backend] = logits.detach()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
        for n in variant_param_names(model):
            assert grads[backend][n].abs().sum() > 0, f"no gradient reaches {n} on {backend}"
    expected_params = {"default": 0, "fixed_bias": 2, "context_bias": 4, "attention_bias": 4, "scaling": 4, "sigmoid": 0}
    assert len(variant_param_names(model)) == expected_params[name]
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
    variant, q, k, v, inputs = random_inputs(name, dtype=torch.float32)
    torch.manual_seed(1)
    a = attention(variant, q, k, v, inputs, backend=backend, dropout_p=0.5)
    b = attention(variant, q, k, v, inputs, backend=backend, dropout_p=0.0)
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_auto_backend_on_cpu_avoids_triton():
    variant, q, k, v, _ = random_inputs("default", dtype=torch.float32)
    assert attention_variants.resolve_backend("auto", variant, q, 0.0) == "sdpa"
    assert attention_variants.resolve_backend("auto", get_variant("sigmoid"), q, 0.0) == "reference"
