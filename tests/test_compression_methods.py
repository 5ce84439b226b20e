"""compress/methods.py: the fake-quantizer against the formulas written out in float64 here (planted
outliers, constant groups, rows shorter than a group, ties), the activation / KV methods on models against
hand-written forwards, full-precision positions, static calibration, layer-by-layer calibration against
the model's own forward, the registry and the method table of docs/compression.md."""

import copy
import math
import os

import numpy as np
import pytest
import torch

from compress import methods as cm
from model import GPT, GPTConfig
from runtime.cli import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, BLOCK = 256, 32


def tiny_gpt(attention="default", seed=0, gain=1.0):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, attention=attention))
    if gain != 1.0:
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 2:
                    p.mul_(gain)
    return m.eval()


# ----------------------------------------------------------------------------------------------
# the formulas, written out (float64)

def ref_symmetric(x, bits=8):
    """AbsMax over all of x: scale = max|x| / (2^(b-1) - 1), round half to even, clamp."""
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(x).max() / qmax
    return x.copy() if s == 0 else np.clip(np.round(x / s), -qmax, qmax) * s


def ref_asymmetric(g, bits=4):
    """Min-max over all of g: scale = (max - min) / (2^b - 1), zero = round(-min / scale); a constant g stays."""
    qmax = 2 ** bits - 1
    lo, hi = g.min(), g.max()
    if hi == lo:
        return g.copy()
    s = (hi - lo) / qmax
    z = np.round(-lo / s)
    return (np.clip(np.round(g / s) + z, 0, qmax) - z) * s


def ref_groups(w, G, fn):
    """fn on every group of G consecutive entries of each row (the last, shorter part its own group)."""
    out = np.empty_like(w)
    for r in range(w.shape[0]):
        for lo in range(0, w.shape[1], G):
            out[r, lo:lo + G] = fn(w[r, lo:lo + G])
    return out


def assert_on_formula(got, ref, steps, tie_tol=1e-4):
    """got == ref within float32 error, except one level where the float64 step position x/scale sits at a
    rounding tie (float32 and float64 may round a tie apart)."""
    got, ref, steps = (np.asarray(a, dtype=np.float64) for a in (got, ref, steps))
    off = np.abs(got - ref)
    near_tie = np.abs(np.abs(steps - np.floor(steps)) - 0.5) < tie_tol
    bad = (off > 1e-5 * (1 + np.abs(ref))) & ~near_tie
    assert not bad.any(), f"{int(bad.sum())} entries differ from the formula, e.g. {got[bad][:3]} vs {ref[bad][:3]}"


def outlier_weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 80, generator=g) * 0.05
    w[7, 13] = 3.0  # one outlier dominates the per-tensor scale
    return w


# ----------------------------------------------------------------------------------------------
# symmetric AbsMax

def test_symmetric_per_tensor_planted_outlier():
    w = outlier_weight()
    got = cm.fake_quantize(w, cm.QuantSpec(8, "tensor")).double().numpy()
    w64 = w.double().numpy()
    s = np.abs(w64).max() / 127
    assert_on_formula(got, ref_symmetric(w64), w64 / s)
    q = got / s
    assert np.abs(q - np.round(q)).max() < 1e-3 and np.abs(q).max() <= 127 + 1e-3
    assert round(q[7, 13]) == 127 and got[7, 13] == pytest.approx(3.0, rel=1e-6)  # AbsMax keeps the outlier
    assert len(np.unique(np.round(q))) < 20  # the outlier puts the rest on a handful of levels


def test_symmetric_per_channel_and_per_token_are_per_row():
    w = outlier_weight()
    w64 = w.double().numpy()
    ref = np.stack([ref_symmetric(row) for row in w64])
    steps = w64 / (np.abs(w64).max(1, keepdims=True) / 127)
    for gran in ("channel", "token"):
        assert_on_formula(cm.fake_quantize(w, cm.QuantSpec(8, gran)).numpy(), ref, steps)
    # an activation (B, T, C): one range per token
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    x[1, 3, 4] = 40.0
    got = cm.fake_quantize(x, cm.QuantSpec(8, "token")).double().numpy()
    x64 = x.double().numpy()
    for b in range(2):
        for t in range(5):
            assert_on_formula(got[b, t], ref_symmetric(x64[b, t]), x64[b, t] / (np.abs(x64[b, t]).max() / 127))
    # the outlier coarsens only its own token
    err = np.abs(got - x64)
    assert err[1, 3].max() > 10 * err[0].max()


def test_symmetric_per_tensor_one_range_per_window():
    x = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(2))
    x[0, 2, 1] = 25.0
    got = cm.fake_quantize(x, cm.QuantSpec(8, "tensor"), batch_dims=1).double().numpy()
    x64 = x.double().numpy()
    for b in range(3):
        assert_on_formula(got[b], ref_symmetric(x64[b]), x64[b] / (np.abs(x64[b]).max() / 127))


def test_symmetric_groups_with_a_ragged_last_group():
    w = outlier_weight()[:, :20]  # groups of 8: [0, 8), [8, 16), [16, 20)
    got = cm.fake_quantize(w, cm.QuantSpec(8, "group:8")).numpy()
    w64 = w.double().numpy()
    for lo, hi in [(0, 8), (8, 16), (16, 20)]:
        g = w64[:, lo:hi]
        ref = np.stack([ref_symmetric(r) for r in g])
        assert_on_formula(got[:, lo:hi], ref, g / (np.abs(g).max(1, keepdims=True) / 127))


def test_symmetric_ties_round_to_even_and_zero_rows_stay_zero():
    # max|x| = 127: scale exactly 1, so x / scale is exact and .5 values are ties
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0]])
    assert cm.fake_quantize(x, cm.QuantSpec(8, "tensor")).tolist() == [[127, 0, 2, 2, 0, -2, -2, 3]]
    w = torch.zeros(4, 8)
    w[1] = torch.arange(8.0)
    out = cm.fake_quantize(w, cm.QuantSpec(8, "channel"))
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(8))


def test_static_scale_clamps_and_equals_dynamic_at_the_tensors_own_maximum():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    spec = cm.QuantSpec(8, "tensor")
    own = float(x.abs().max()) / 127
    assert torch.equal(cm.fake_quantize(x, spec, scale=own), cm.fake_quantize(x, spec))
    small = own / 4  # a calibration range a quarter of this tensor's: values beyond 127 steps clamp
    got = cm.fake_quantize(x, spec, scale=small).double().numpy()
    ref = np.clip(np.round(x.double().numpy() / small), -127, 127) * small
    assert_on_formula(got, ref, x.double().numpy() / small)
    assert np.abs(got).max() == pytest.approx(127 * small, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# asymmetric min-max 4-bit groups (w4gG, kv4)

def test_w4_groups_planted_outlier_constant_group_short_and_ragged_rows():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 40, generator=g) * 0.1
    w[0, 3] = 5.0             # an outlier: its group's other 15 levels spread over [min, 5]
    w[1, 16:32] = 0.3         # a constant group: kept exactly
    w[2, :16] = -0.2          # a constant negative group
    spec = cm.QuantSpec(4, "group:16", symmetric=False)
    got = cm.fake_quantize(w, spec).numpy()
    w64 = w.double().numpy()
    ref = ref_groups(w64, 16, ref_asymmetric)  # groups [0, 16), [16, 32), [32, 40)
    steps = ref_groups(w64, 16, lambda v: v / ((v.max() - v.min()) / 15 or 1.0))
    assert_on_formula(got, ref, steps)
    assert np.array_equal(got[1, 16:32], w.numpy()[1, 16:32]) and np.array_equal(got[2, :16], w.numpy()[2, :16])
    # the outlier's group sits on at most 16 levels and keeps the outlier within half a level
    s0 = (w64[0, :16].max() - w64[0, :16].min()) / 15
    assert len(np.unique(np.round(got[0, :16] / s0, 3))) <= 16 and abs(got[0, 3] - 5.0) <= s0 / 2 + 1e-6
    # a row shorter than G is one group
    short = w[:, :10]
    got = cm.fake_quantize(short, cm.QuantSpec(4, "group:128", symmetric=False)).numpy()
    s64 = short.double().numpy()
    assert_on_formula(got, np.stack([ref_asymmetric(r) for r in s64]),
                      np.stack([r / ((r.max() - r.min()) / 15 or 1.0) for r in s64]))


def test_w4_ties_and_levels():
    # min 0, max 15: scale 1, zero 0; x.5 values are ties, rounded to even
    x = torch.tensor([[0.0, 15.0, 0.5, 1.5, 2.5, 14.5, 7.0, 3.25]])
    got = cm.fake_quantize(x, cm.QuantSpec(4, "group:8", symmetric=False))
    assert got.tolist() == [[0, 15, 0, 2, 2, 14, 7, 3]]
    # an all-positive group: zero = round(-min / scale) is negative, the levels still span [min, max]
    y = torch.tensor([[10.0, 25.0, 17.5, 11.0]])
    s, z = 1.0, -10.0
    assert cm.fake_quantize(y, cm.QuantSpec(4, "group:8", symmetric=False)).tolist() == \
        [[(np.clip(np.round(v / s) + z, 0, 15) - z) * s for v in (10.0, 25.0, 17.5, 11.0)]]


# ----------------------------------------------------------------------------------------------
# full-precision positions

def test_prefix_positions_stay_bit_identical_and_out_of_the_scale():
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(5))
    x[:, 0, 3] = 1000.0  # a massive activation at position 0
    spec = cm.QuantSpec(8, "tensor")
    kept = cm.quantize_after_prefix(x, spec, fp_tokens=1)
    assert torch.equal(kept[:, :1], x[:, :1])
    x64 = x.double().numpy()
    for b in range(2):
        rest = x64[b, 1:]
        assert_on_formula(kept[b, 1:].numpy(), ref_symmetric(rest), rest / (np.abs(rest).max() / 127))
    # without it, position 0 sets the scale and the other tokens collapse onto few levels
    plain = cm.quantize_after_prefix(x, spec, fp_tokens=0)
    assert len(torch.unique(plain[:, 1:])) < 5 < len(torch.unique(kept[:, 1:]))
    assert torch.equal(cm.quantize_after_prefix(x, spec, fp_tokens=6), x)


def hidden_states(model, x):
    return cm.model_forward(model, x) if hasattr(model, "final_hidden") else _gpt_hidden(model, x)


def _gpt_hidden(model, x):
    from compress.perplexity import _hidden_states
    with torch.no_grad():
        return _hidden_states(model, x)


@pytest.mark.parametrize("name, same_as", [("w8a8+fp2", "w8"), ("w8a8_token+fp2", None), ("kv4+fp2", "fp"),
                                           ("w8a8_static+fp2", "w8")])
def test_fp_tokens_leave_those_positions_bit_identical(name, same_as):
    """Causal attention: positions < K only see positions < K, whose activations (or keys and values) are not
    quantized; so the hidden states there equal those of the model without the activation quantization."""
    base = tiny_gpt(gain=3.0)
    x = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(6))
    col = cm.parse_column(name)
    opts = cm.Options()
    model = copy.deepcopy(base)
    col.apply(model, opts, calib=x)
    ref = copy.deepcopy(base)
    if same_as is None:  # w8a8_token's weights alone: per output channel
        cm.quantize_weights_(ref, cm.QuantSpec(8, "channel"))
    else:
        cm.parse_column(same_as).apply(ref, opts)
    h, h_ref = hidden_states(model, x), hidden_states(ref, x)
    assert torch.equal(h[:, :2], h_ref[:, :2])
    assert not torch.equal(h[:, 2:], h_ref[:, 2:])


def massive_model():
    """A GPT-2-style model (biases) whose MLP unit U of block 0 fires only at position 0, near 1000, and writes
    nothing: the same function as without it, but one massive down-projection input at position 0, as in real
    LLMs. Position 0's embedding alone has dimension E; block 0's ln_2 scales E by 200 and unit U reads it
    against a bias of -250 (at other positions |LN(x)_E| = |mean/std| is far below 1.25)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=BLOCK, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, bias=True)).eval()
    E, U = 5, 17
    with torch.no_grad():
        for _, lin in cm.block_linears(m):
            lin.weight.mul_(6.0)  # larger blocks: the residual stream depends on them
        m.transformer.ln_f.weight.mul_(10.0)  # sharper next-token distributions
        m.transformer.wte.weight[:, E] = 0
        m.transformer.wpe.weight[:, E] = 0
        m.transformer.wpe.weight[0, E] = 3.0
        b0 = m.transformer.h[0]
        b0.attn.c_proj.weight[E], b0.attn.c_proj.bias[E] = 0, 0
        b0.ln_2.weight[E] = 200.0
        b0.mlp.c_fc.weight[:, E] = 0
        b0.mlp.c_fc.weight[U, E] = 1.0
        b0.mlp.c_fc.bias[U] = -250.0
        b0.mlp.c_proj.weight[:, U] = 0
    return m


def test_the_massive_activation_at_position_0_decides_w8a8():
    """Planted: one down-projection input near 1000 at position 0. Per-tensor dynamic W8A8 puts every other
    input of that c_proj on a grid of ~8: perplexity jumps; keeping position 0 in full precision, or
    per-token scales, bring it back to that of the weights alone."""
    from compress.perplexity import evaluate_perplexity
    model = massive_model()
    seen = []
    h = model.transformer.h[0].mlp.c_proj.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (4, BLOCK), generator=torch.Generator().manual_seed(13)))
    h.remove()
    assert seen[0][:, 0].abs().amax() > 500 and seen[0][:, 1:].abs().amax() < 50
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = model.generate(torch.zeros(1, 1, dtype=torch.long), 255)[0].numpy()

    def nll(name, **opts):
        m = copy.deepcopy(model)
        cm.parse_column(name).apply(m, cm.Options(**opts))
        return evaluate_perplexity(m, tokens, progress=False).nll
    fp, w8a8 = nll("fp"), nll("w8a8")
    assert w8a8 - fp > 0.1                                  # perplexity up by more than 10%
    assert abs(nll("w8a8+fp1") - nll("w8")) < (w8a8 - fp) / 10
    assert abs(nll("w8a8_token") - nll("w8", w8_granularity="channel")) < (w8a8 - fp) / 10


# ----------------------------------------------------------------------------------------------
# static calibration

def test_static_at_each_windows_own_maximum_equals_dynamic_per_tensor():
    """Static scales set, at every site, to max|x| / 127 of the input that site sees in the dynamic model
    (observed by the test's own hooks, ahead of the quantization): the same numbers as dynamic W8A8."""
    base = tiny_gpt(gain=3.0)
    x = torch.randint(0, VOCAB, (1, BLOCK), generator=torch.Generator().manual_seed(7))
    dynamic = copy.deepcopy(base)
    cm.parse_column("w8a8").apply(dynamic, cm.Options())
    own = {}
    hooks = [lin.register_forward_pre_hook(lambda m, a, n=n: own.update({n: float(a[0].abs().max()) / 127}),
                                           prepend=True) for n, lin in cm.block_linears(dynamic)]
    expected = hidden_states(dynamic, x)
    for h in hooks:
        h.remove()
    static = copy.deepcopy(base)
    cm.quantize_weights_(static, cm.QuantSpec(8, "tensor"))
    hooks = cm.add_activation_quantization(static, cm.QuantSpec(8, "tensor"), scales=own)
    torch.testing.assert_close(hidden_states(static, x), expected, rtol=1e-5, atol=1e-5)
    for h in hooks:
        h.remove()
    # at half those ranges the largest inputs clamp: different numbers
    cm.add_activation_quantization(static, cm.QuantSpec(8, "tensor"), scales={n: s / 2 for n, s in own.items()})
    assert not torch.allclose(hidden_states(static, x), expected, rtol=1e-3, atol=1e-3)


def test_static_scales_are_the_largest_window_percentile():
    """Two calibration windows, c_fc's input observed by a hook of the test: scale = max over windows of the
    nearest-rank percentile of |x| over positions fp_tokens.. of each window, / 127."""
    model = tiny_gpt(gain=3.0)
    x = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(9))
    seen = []
    target = model.transformer.h[1].mlp.c_fc
    h = target.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().double()))
    for p, k in ((100.0, 0), (99.0, 3), (50.0, 1)):
        seen.clear()
        scales = cm.calibrate_static_scales(model, x, cm.QuantSpec(8, "tensor"), fp_tokens=k, percentile=p,
                                            batch_size=1)
        per_window = []
        for win in seen:
            a = np.sort(win[0, k:].abs().numpy().ravel())
            per_window.append(a[max(1, math.ceil(p / 100 * a.size)) - 1])
        assert scales["transformer.h.1.mlp.c_fc"] == pytest.approx(max(per_window) / 127, rel=1e-6)
    h.remove()
    assert len(scales) == len(cm.block_linears(model))


# ----------------------------------------------------------------------------------------------
# kv4

def ref_heads(v, head_dim, bits=4):
    """(T, H*D) float64 -> per token and head asymmetric min-max."""
    out = v.copy()
    for t in range(v.shape[0]):
        for lo in range(0, v.shape[1], head_dim):
            out[t, lo:lo + head_dim] = ref_asymmetric(v[t, lo:lo + head_dim], bits)
    return out


@pytest.mark.parametrize("name, bits", [("kv4", 4), ("kv8", 8)])
def test_kv_on_a_one_token_window_is_the_formula_on_v(name, bits):
    """With one token, attention returns its value: the logits are those of a float64 forward written out
    here with v replaced by the formula's b-bit v (q and k do not matter)."""
    base = tiny_gpt(gain=3.0)
    model = copy.deepcopy(base)
    cm.parse_column(name).apply(model, cm.Options())
    token = 11
    with torch.no_grad():
        got = model(torch.tensor([[token]]))[0][0, -1].double()
        m = copy.deepcopy(base).double()
        tr, C = m.transformer, 32
        x = tr.wte.weight[token] + tr.wpe.weight[0]
        for block in tr.h:
            qkv = block.attn.c_attn(block.ln_1(x)).numpy()
            v_hat = ref_heads(qkv[None, 2 * C:], C // 2, bits)[0]
            x = x + block.attn.c_proj(torch.from_numpy(v_hat))
            x = x + block.mlp(block.ln_2(x))
        ref = tr.ln_f(x) @ tr.wte.weight.T
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(base(torch.tensor([[token]]))[0][0, -1].double(), ref, rtol=1e-4, atol=1e-4)


def test_kv4_leaves_learned_sinks_alone():
    base = tiny_gpt("attention_bias", gain=3.0)
    model = copy.deepcopy(base)
    cm.parse_column("kv4").apply(model, cm.Options())
    for a, b in zip(base.transformer.h, model.transformer.h):
        assert torch.equal(a.attn.k_bias, b.attn.k_bias) and torch.equal(a.attn.v_bias, b.attn.v_bias)
    x = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(10))
    assert not torch.equal(hidden_states(model, x), hidden_states(base, x))


# ----------------------------------------------------------------------------------------------
# Hugging Face models: post-RoPE keys, layer-by-layer replay

@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf import models as hf_models
    from hf_tiny import build
    d = tmp_path_factory.mktemp("hf")
    return {f: hf_models.load_hf_causal_lm(build(f, d), device="cpu") for f in ("llama", "falcon", "opt")}


def test_hf_kv4_quantizes_post_rope_keys_and_values(hf_tiny):
    """LLaMA (GQA: 4 heads, 2 KV heads) layer 0's attention output against attention written out here on
    transformers' own RoPE, with the formula's 4-bit keys and values per token and KV head."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    base = hf_tiny["llama"]
    model = copy.deepcopy(base)
    cm.parse_column("kv4+fp1").apply(model, cm.Options())
    attn = model.hf.model.layers[0].self_attn
    seen = {}
    hooks = [attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True),
             attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))]
    x = torch.randint(8, 128, (2, 12), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    cfg = model.hf.config
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        hs = seen["hidden_states"].double()
        B, T, _ = hs.shape
        a64 = copy.deepcopy(attn).double()
        q = a64.q_proj(hs).view(B, T, H, D).transpose(1, 2)
        k = a64.k_proj(hs).view(B, T, KV, D).transpose(1, 2)
        v = a64.v_proj(hs).view(B, T, KV, D).transpose(1, 2)
        cos, sin = (t.double() for t in seen["position_embeddings"])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.numpy().copy(), v.numpy().copy()
        for b in range(B):
            for h in range(KV):
                for t in range(1, T):  # position 0 stays in full precision (+fp1)
                    k[b, h, t], v[b, h, t] = ref_asymmetric(k[b, h, t]), ref_asymmetric(v[b, h, t])
        k = torch.from_numpy(k).repeat_interleave(H // KV, 1)
        v = torch.from_numpy(v).repeat_interleave(H // KV, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        ref = a64.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D))
    torch.testing.assert_close(seen["out"].double(), ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # and the fp model differs
        plain = {}
        h = base.hf.model.layers[0].self_attn.register_forward_hook(lambda m, a, out: plain.update(out=out[0]))
        base(x)
        h.remove()
    assert not torch.allclose(plain["out"].double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "falcon", "opt"])
def test_layerwise_replay_gives_every_block_its_own_inputs(hf_tiny, family):
    """The cached block calls (masks, positions, rotary embeddings replayed per block) give each block the
    output the model's own forward gives it, seen by hooks of the test."""
    from hf.models import first, model_view
    model = hf_tiny[family]
    blocks = model_view(model).blocks
    x = torch.randint(8, 128, (3, 16), generator=torch.Generator().manual_seed(12))
    own = {}
    hooks = [b.register_forward_hook(lambda m, a, out, l=l: own.setdefault(l, []).append(first(out)))
             for l, b in enumerate(blocks)]
    with torch.no_grad():
        for i in range(0, 3, 2):
            model.final_hidden(x[i:i + 2])
    for h in hooks:
        h.remove()
    replayed = {}
    cm.layerwise(model, x, lambda l, block, forward: replayed.setdefault(l, forward()) and False, batch_size=2)
    assert sorted(replayed) == list(range(len(blocks)))
    for l in range(len(blocks)):
        torch.testing.assert_close(torch.cat(replayed[l]), torch.cat(own[l]), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the registry

def test_columns_parse_and_refuse_what_does_not_apply():
    cols = cm.parse_columns("fp, w8a8,w8a8+fp1,w4g128,kv4, w8a8", fp_tokens=2)
    assert [c.name for c in cols] == ["fp", "w8a8", "w8a8+fp1", "w4g128", "kv4"]
    assert [c.fp_tokens for c in cols] == [0, 2, 1, 0, 2]  # --fp_tokens only where activations are quantized
    assert cols[3].param == 128 and cols[3].method.name == "w4gG"
    assert cols[3].header(cm.Options()) == "PPL (W4 g128 RTN)" and cols[2].short() == "W8A8 +fp1"
    for bad, msg in (("w4", "unknown method 'w4'"), ("w4g4", "at least 8"), ("w8+fp1", "quantizes no activations"),
                     ("w8a8+fp", r"\+fpK"), ("w8a8+x1", r"\+fpK"), (" , ", "empty")):
        with pytest.raises(UserError, match=msg):
            cm.parse_columns(bad)
    for name in cm.REPRODUCE:  # reproduce.py's columns are valid names
        cm.parse_column(name)


def test_every_entry_records_its_settings_and_reads_in_words():
    opts = cm.Options(fp_tokens=1)
    for m in cm.REGISTRY.values():
        name = m.name.replace("G", "128") if m.pattern else m.name
        col = cm.parse_column(name, fp_tokens=1)
        s = col.settings(opts)
        assert ("fp_tokens" in s) == m.activations
        words = cm.describe(s)
        assert words and col.header(opts).startswith("PPL (")
        if m.activations:
            assert "position 0 of every window in full precision" in words


def test_docs_method_table_is_generated_from_the_registry():
    """docs/compression.md holds the table; regenerate it with
    `python -c "from compress import methods as c; print(c.readme_table())"`."""
    with open(os.path.join(REPO, "docs", "compression.md"), encoding="utf-8") as f:
        doc = f.read()
    assert cm.readme_table() in doc, "docs/compression.md's method table differs from compress.methods.readme_table()"
    for m in cm.REGISTRY.values():
        assert f"| `{m.name}` |" in cm.readme_table()


def test_a_registered_method_is_a_column():
    """A new method is one entry: registered here, it parses, heads its column and changes a model copy."""
    def halve(model, col, opts, calib):
        with torch.no_grad():
            for _, lin in cm.block_linears(model):
                lin.weight.mul_(0.5)
    entry = cm.CompressionMethod("halve", "W/2", source="a test", short="Half", label=lambda col, opts: "W/2", apply=halve,
                                 settings=lambda col, opts: {"weights": {"scale": 0.5}})
    cm.register(entry)
    try:
        col = cm.parse_column("halve")
        model = tiny_gpt()
        before = model.transformer.h[0].mlp.c_fc.weight.clone()
        col.apply(model, cm.Options())
        assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, before * 0.5)
        assert col.header(cm.Options()) == "PPL (W/2)"
        with pytest.raises(ValueError, match="already registered"):
            cm.register(entry)
    finally:
        del cm.REGISTRY["halve"]


# ----------------------------------------------------------------------------------------------
# optional: torchao's quantization primitives

def test_cross_check_with_torchao():
    """int4 groups (asymmetric, [0, 15]) and int8 per channel (symmetric, [-127, 127]) through torchao's
    choose_qparams_affine / quantize_affine / dequantize_affine: equal but for one level at rounding ties.
    (torchao's own default int4 symmetric scale is amax / 7.5 on [-8, 7]; these ranges make its formulas
    the ones of this repo, whose symmetric grid keeps the outlier exact.)"""
    qp = pytest.importorskip("torchao.quantization.quant_primitives", reason="torchao is not installed")
    w = outlier_weight()[:, :64]
    G = 16
    scale, zero = qp.choose_qparams_affine(w, qp.MappingType.ASYMMETRIC, (1, G), torch.uint8, quant_min=0,
                                           quant_max=15)
    q = qp.quantize_affine(w, (1, G), scale, zero, torch.uint8, 0, 15)
    theirs = qp.dequantize_affine(q, (1, G), scale, zero, torch.uint8, 0, 15)
    ours = cm.fake_quantize(w, cm.QuantSpec(4, f"group:{G}", symmetric=False))
    steps = ref_groups(w.double().numpy(), G, lambda v: v / ((v.max() - v.min()) / 15))
    assert (w.view(48, -1, G).amin(-1) < 0).all() and (w.view(48, -1, G).amax(-1) > 0).all()  # torchao spans 0
    assert_on_formula(ours.numpy(), theirs.double().numpy(), steps, tie_tol=1e-3)
    scale, zero = qp.choose_qparams_affine(w, qp.MappingType.SYMMETRIC, (1, 64), torch.int8, quant_min=-127,
                                           quant_max=127)
    q = qp.quantize_affine(w, (1, 64), scale, zero, torch.int8, -127, 127)
    theirs = qp.dequantize_affine(q, (1, 64), scale, zero, torch.int8, -127, 127)
    ours = cm.fake_quantize(w, cm.QuantSpec(8, "channel"))
    w64 = w.double().numpy()
    assert_on_formula(ours.numpy(), theirs.double().numpy(), w64 / (np.abs(w64).max(1, keepdims=True) / 127),
                      tie_tol=1e-3)
