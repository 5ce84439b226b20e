"""The analysis statistics: definitions against explicit loops, planted outliers in tiny models, interventions,
telemetry (the lifecycle has tests/test_lifecycle.py).

References are independent of the code under test: explicit Python loops in float64, hand-computed
numbers, or models whose outliers are planted at known layers / channels / positions.
"""

import json
import math

import numpy as np
import pytest
import torch

from analysis import definitions as S
from analysis.analyzer import OutlierAnalyzer
from analysis.capture import Probe
from analysis.interventions import INTERVENTION_TARGETS, GammaIntervention, intervention_losses
from analysis.statistics.base import TopList
from analysis.statistics.weights import weight_statistics
from analysis.telemetry import training_telemetry
from attention_variants import REGISTRY, VARIANTS
from model import GPT, GPTConfig
from planted import (BIG, C3, CH, E0, FC_W, K_UNIT, K_UNIT2, PAPER_RULES, POSITIONS, SPECIAL, SPECIAL2, T3, C, L, T, V,
                     block_outputs, planted_all_batch, planted_all_model, planted_batch, planted_model)

# ----------------------------------------------------------------------------------------------
# definitions on hand-made tensors

def test_activation_outlier_mask_matches_loop():
    x = torch.full((2, 4, 5), 0.5, dtype=torch.float64)
    x[0, 0, 3] = 100.0  # mean|x| of seq 0 = (19*0.5 + 100)/20 = 5.475 -> 100 > 10*5.475
    x[0, 2, 1] = -60.0  # mean now (18*0.5+160)/20 = 8.45 -> 60 < 84.5 at tau 10, > 42.25 at tau 5
    x[1, 3, 4] = -40.0  # seq 1: mean (19*0.5+40)/20 = 2.475 -> 40 > 24.75
    for tau, expected in ((10, {(0, 0, 3), (1, 3, 4)}), (5, {(0, 0, 3), (0, 2, 1), (1, 3, 4)})):
        got = {tuple(i) for i in S.activation_outlier_mask(x.float(), tau).nonzero().tolist()}
        assert got == expected
        ref = set()
        for b in range(2):
            mean = sum(abs(float(v)) for v in x[b].flatten()) / 20
            for t in range(4):
                for c in range(5):
                    if abs(float(x[b, t, c])) > tau * mean:
                        ref.add((b, t, c))
        assert got == ref


def test_sparse_activation_outliers_equal_dense_definition():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 50, 40, generator=g)
    x[0, 7, 5], x[0, 7, 9], x[2, 0, 1], x[2, 49, 39] = 300.0, -250.0, 500.0, -90.0
    for tau in (3.0, 30.0, 100.0):
        out, top, med = S.find_activation_outliers(x, tau, stats=True)
        dense = S.activation_outlier_mask(x, tau)
        assert {tuple(i) for i in out.idx.tolist()} == {tuple(i) for i in dense.nonzero().tolist()}
        assert torch.equal(out.rows, dense.any(-1))
        assert torch.equal(out.values, x[dense.nonzero(as_tuple=True)]) or \
            sorted(out.values.tolist()) == sorted(x[dense].tolist())
        assert out.mean.tolist() == pytest.approx(x.abs().double().mean((1, 2)).tolist(), rel=1e-5)
    assert {tuple(i) for i in S.find_activation_outliers(x, 100.0).idx.tolist()} == {(0, 7, 5), (0, 7, 9), (2, 0, 1)}


def test_weight_outlier_mask_and_extremal_ratio_match_loops():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 9, generator=g, dtype=torch.float64) * 0.1
    w[2, 4] = 9.0
    w[5, 0] = -7.0
    w[1, 2] = 2.0  # an outlier of its row, but not of its column (which also holds ...)
    w[3, 2] = 20.0  # ... this one): the definition is row-wise
    mask = S.weight_outlier_mask(w.float(), 5.0)
    ratio = S.column_extremal_ratio(w.float())
    for i in range(6):
        row_mean = sum(abs(float(v)) for v in w[i]) / 9
        for j in range(9):
            assert bool(mask[i, j]) == (abs(float(w[i, j])) > 5.0 * row_mean)
    assert {tuple(i) for i in mask.nonzero().tolist()} == {(2, 4), (5, 0), (1, 2), (3, 2)}
    for j in range(9):
        col = [abs(float(w[i, j])) for i in range(6)]
        assert math.isclose(float(ratio[j]), max(col) / (sum(col) / 6), rel_tol=1e-5)
    assert float(S.column_extremal_ratio(torch.zeros(3, 2))[0]) == 0.0
    # the per-layer, per-module report of a model whose layer-1 W_down is this matrix
    m = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=2, n_head=1, n_embd=6))
    with torch.no_grad():
        m.transformer.h[1].mlp.c_proj.weight.copy_(torch.nn.functional.pad(w.float(), (0, 24 - 9)))
    res = weight_statistics(m, 5.0, rule="paper")["mlp.c_proj"]
    wp = torch.nn.functional.pad(w, (0, 24 - 9))
    loop = {(i, j) for i in range(6) for j in range(24) if abs(float(wp[i, j])) > 5.0 * float(wp[i].abs().mean())}
    assert res["outlier_count"][1] == len(loop) and {(1, 2), (3, 2)} <= loop
    assert res["outlier_channels"][1] == sorted({j for _, j in loop})
    assert res["outlier_out_channels"][1] == sorted({i for i, _ in loop})
    cols = [max(abs(float(wp[i, j])) for i in range(6)) / max(float(wp[:, j].abs().mean()), 1e-30) for j in range(24)]
    assert res["extremal_ratio"][1] == pytest.approx(max(cols), rel=1e-5)
    assert res["extremal_channel"][1] == int(np.argmax(cols))
    assert "attn.scale_proj" not in weight_statistics(m, 5.0, rule="paper")


def test_attention_outliers_match_loop():
    T = 6
    probs = torch.zeros(1, 2, T, T, dtype=torch.float64)
    for i in range(T):  # head 0: every query puts 0.9 on key 0 (a sink); head 1: uniform causal
        probs[0, 0, i, 0] = 0.9 if i else 1.0
        for j in range(1, i + 1):
            probs[0, 0, i, j] = 0.1 / i
        probs[0, 1, i, :i + 1] = 1.0 / (i + 1)
    cum = S.cumulative_attention(probs.float())
    for h in range(2):
        for j in range(T):
            assert math.isclose(float(cum[0, h, j]), sum(float(probs[0, h, i, j]) for i in range(T)), rel_tol=1e-6)
    # softmax rows sum to 1, so the mean cumulative score is exactly 1
    assert torch.allclose(cum.mean(-1), torch.ones(1, 2))
    mask = S.attention_outlier_mask(cum, 2.0)
    assert mask[0, 0].nonzero().flatten().tolist() == [0]  # 5.5 > 2
    assert mask[0, 1].nonzero().flatten().tolist() == [0]  # harmonic number H_6 = 2.45 > 2
    assert not S.attention_outlier_mask(cum, 3.0)[0, 1].any()


def test_token_categories():
    assert S.token_category("Hello", 0) == "initial"
    assert S.token_category(".", 3) == "delimiter"
    assert S.token_category(" ,", 3) == "delimiter"
    assert S.token_category("<|endoftext|>", 3, 50256) == "delimiter"
    assert S.token_category("\n\n", 3) == "whitespace"
    assert S.token_category(" ", 3) == "whitespace"
    # An et al.'s weak-semantic class: stop words (case and spaces ignored) and digits
    for word in (" the", "The", " and", " of", " is", "2024", " 7", " an"):
        assert S.token_category(word, 3) == "weak_semantic", word
    for word in (" Summer", " warm", " theory", "x2", " 7.5", "Ofelia"):
        assert S.token_category(word, 3) != "weak_semantic", word
    assert S.token_category(" warm", 3) == "other"
    assert S.token_category("\ufffd", 3) == "other"
    assert S.token_category(None, 3) == "other"


def test_token_info_categories_and_fallback():
    texts = {5: "Hi", 1: ".", 2: "\n", 3: " the", 4: " cat", 50256: "<|endoftext|>"}
    ti = S.TokenInfo(lambda i: texts[i])
    got = ti.categories(np.array([[5, 1, 2, 3, 50256], [1, 5, 3, 4, 1]]))
    names = [[S.CATEGORIES[c] for c in row] for row in got]
    assert names == [["initial", "delimiter", "whitespace", "weak_semantic", "delimiter"],
                     ["initial", "other", "weak_semantic", "other", "delimiter"]]
    assert ti.text(3) == " the" and ti.text(99) == "<99>"  # unknown id: shown as <id>
    assert S.TokenInfo(None).text(7) == "<7>"


def test_overlap_hand_computed():
    assert S.overlap({1, 2, 3, 4}, {2, 4, 9}) == 0.5
    assert S.overlap({2, 4, 9}, {1, 2, 3, 4}) == pytest.approx(2 / 3)
    assert S.overlap(set(), {1}) is None
    assert S.overlap([True, True, False, False], [True, False, True, False]) == 0.5
    # per head |A & K_h| / |A|, then mean over heads
    A = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)  # seq 0: positions {0, 1, 3}; seq 1 empty
    K = torch.tensor([[[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 1, 0]],
                      [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.bool)
    got = S.head_averaged_overlap(A, K)
    assert got[0].item() == pytest.approx((1 / 3 + 3 / 3 + 0 / 3) / 3)
    assert math.isnan(got[1].item())
    rev = S.row_overlap(K, A[:, None, :].expand_as(K))  # |K_h & A| / |K_h|
    assert rev[0].tolist() == pytest.approx([1.0, 3 / 4, 0.0])
    assert rev[1, 0].item() == 0.0 and math.isnan(rev[1, 1].item())


def test_top_and_median_match_sorting():
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 7, 5), (3, 40, 300), (1, 3, 1)):  # the last one: fewer elements per row than k
        a = torch.randn(*shape, generator=g).abs()
        a[0, 1, :] = 5.0  # a row holding several of the largest values (ties included)
        top, med, mean = S.top_and_median(a, 3)
        for b in range(shape[0]):
            vals = sorted(a[b].flatten().double().tolist())
            k = min(3, len(vals))
            assert top[b].tolist() == pytest.approx(vals[::-1][:k])
            assert med[b].item() == pytest.approx(vals[(len(vals) - 1) // 2])  # lower median
            assert mean[b].item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)


def test_channel_kurtosis_float64_reference():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 16, 8, generator=g)
    h[:, :, 3] *= 30
    s = (h.double() ** 2).reshape(-1, 8).mean(0).numpy()
    assert S.channel_kurtosis(h) == pytest.approx(float((s ** 2).mean() / s.mean() ** 2), rel=1e-5)


def test_toplist_keeps_largest_and_counts():
    tl = TopList(3)
    for chunk in range(5):
        vals = [chunk * 10 + i for i in range(4)]
        tl.add(vals, [{"v": v} for v in vals])
    assert [r["v"] for r in tl.result()] == [43, 42, 41] and tl.total == 20


# ----------------------------------------------------------------------------------------------
# tiny models with planted outliers (tests/planted.py)



@pytest.fixture(scope="module")
def planted_result():
    m = planted_model()
    X, Y = planted_batch()
    an = OutlierAnalyzer(m, tau_act=20, tau_weight=20, tau_attn=8, seq_len=T, **PAPER_RULES)
    with torch.no_grad():
        an.run_batch(X[:2], Y[:2])
        an.run_batch(X[2:], Y[2:])
        hs, _, _ = block_outputs(m, X)
    return m, X, Y, an, an.result(), hs


def test_planted_massive_activation_location(planted_result):
    m, X, Y, an, r, hs = planted_result
    h = r["activation"]["layer_output"]
    # independent detection on the float64 block outputs
    ref = set()
    for l, x in enumerate(hs):
        for b in range(X.shape[0]):
            mean = x[b].abs().mean().item()
            for t, c in (x[b].abs() > 20 * mean).nonzero().tolist():
                ref.add((l, b, t, c))
    assert ref == {(l, b, p, CH) for l in (1, 2, 3) for b in range(3) for p in POSITIONS}
    got = {(o["layer"], o["seq"], o["position"], o["channel"]) for o in h["outliers"]}
    assert got == ref and h["outliers_total"] == len(ref)
    assert h["count"] == [0, 6, 6, 6]
    assert h["channels"][1] == [[CH, 6]]
    assert sorted(p for p, _ in h["positions"][2]) == list(POSITIONS)
    for o in h["outliers"]:
        assert o["value"] == pytest.approx(hs[o["layer"]][o["seq"], o["position"], o["channel"]].item(), rel=1e-4)
    # top-3 / median per layer: means over sequences of float64 references
    for l, x in enumerate(hs):
        flat = x.abs().reshape(3, -1)
        top3 = flat.sort(dim=1, descending=True).values[:, :3].mean(0)
        med = flat.sort(dim=1).values[:, (flat.shape[1] - 1) // 2].mean()
        assert h["top3"][l] == pytest.approx(top3.tolist(), rel=1e-4)
        # float32 rounding of the layer's largest values reaches the small ones through the norms: an absolute
        # floor of one float32 step of the layer's maximum (other CPU code paths round differently; seen: 0.05)
        floor = torch.finfo(torch.float32).eps * flat.max().item()
        assert h["median"][l] == pytest.approx(med.item(), rel=1e-4, abs=floor)
    # the MLP unit that creates it is the down-projection input outlier, in layer 1 only
    xd = r["activation"]["down_input"]
    assert xd["count"] == [0, 6, 0, 0] and xd["channels"][1] == [[K_UNIT, 6]]
    # and the planted W_down entry is the weight outlier
    w = r["weight"]["mlp.c_proj"]
    assert w["outlier_channels"][1] == [K_UNIT] and w["outlier_out_channels"][1] == [CH]
    assert w["top_entries"][0][:3] == [1, CH, K_UNIT]


def test_planted_lifecycle_generated_then_propagated(planted_result):
    m, X, Y, an, r, hs = planted_result
    life = {(e["position"], e["channel"]): e for e in r["lifecycle"]}
    assert set(life) == {(p, CH) for p in POSITIONS}
    for p in POSITIONS:
        e = life[(p, CH)]
        assert e["count"] == 3
        assert e["generated_at"] == [1] and e["generated_by"] == "mlp" and e["first_massive_at"] == 1
        assert [(g["layer"], g["branch"]) for g in e["generation"]] == [(1, "mlp")]
        assert e["generation"][0]["share"] == pytest.approx(e["mlp_contrib"][1] / e["trajectory"][e["peak_layer"]])
        assert e["status"] == ["-", "generated", "propagated", "propagated"]
        assert e["cancelled_at"] == [] and e["early_stage"] is None and e["emerged_at"] is None
        assert e["mlp_drivers"][0]["down_input_channel"] == K_UNIT and e["mlp_drivers"][0]["layer"] == 1
        assert e["mlp_drivers"][0]["share"] == pytest.approx(1.0, abs=1e-3)
        for l in range(L):
            assert e["trajectory"][l] == pytest.approx(hs[l][:, p, CH].mean().item(), rel=1e-4, abs=1e-6)
        # the residual stream carries it: h_l - h_{l-1} = attention + MLP contributions
        for l in range(1, L):
            step = e["trajectory"][l] - e["trajectory"][l - 1]
            assert step == pytest.approx(e["attn_contrib"][l] + e["mlp_contrib"][l], abs=1e-3)


def test_planted_consistency_hand_computed(planted_result):
    c = planted_result[4]["consistency"]
    # W_down weight outlier (1, K_UNIT) vs x_down outlier channels {(1, K_UNIT)}; out row CH vs h channels {CH}
    for key in ("wdown_vs_xdown", "wdown_vs_h"):
        assert (c[key]["a_in_b"], c[key]["b_in_a"], c[key]["n_a"], c[key]["n_b"]) == (1.0, 1.0, 1, 1)
    # h outliers and x_down outliers sit at the same positions in every sequence
    assert (c["h_vs_xdown"]["a_in_b"], c["h_vs_xdown"]["b_in_a"], c["h_vs_xdown"]["n_a"]) == (1.0, 1.0, 3)


def test_consistency_h_vs_xdown_differing_sets():
    """Add SPECIAL2 at position 9: an x_down outlier (unit K_UNIT2) without any h outlier. Per sequence
    A (h positions) = {5, 17}, B (x_down positions) = {5, 9, 17}: A in B = 1, B in A = 2/3."""
    m = planted_model()
    X, _ = planted_batch(2)
    X[:, 9] = SPECIAL2
    an = OutlierAnalyzer(m, tau_act=20, tau_weight=20, tau_attn=8, seq_len=T, **PAPER_RULES)
    an.run_batch(X)
    r = an.result()
    assert r["activation"]["down_input"]["channels"][1] == [[K_UNIT, 4], [K_UNIT2, 2]]
    assert {o["position"] for o in r["activation"]["layer_output"]["outliers"]} == set(POSITIONS)
    c = r["consistency"]["h_vs_xdown"]
    assert (c["a_in_b"], c["b_in_a"], c["n_a"], c["n_b"]) == (1.0, pytest.approx(2 / 3), 2, 2)
    w = r["consistency"]["wdown_vs_xdown"]  # A = {(1, K_UNIT)}, B = {(1, K_UNIT), (1, K_UNIT2)}
    assert (w["a_in_b"], w["b_in_a"], w["n_a"], w["n_b"]) == (1.0, 0.5, 1, 2)


def replay(model, X, Y, tau, mode, batch=2):
    """The analysis with keep_replay over X in batches, then the interventions. -> (analyzer, {target: (loss,
    edits)})"""
    an = OutlierAnalyzer(model, tau_act=tau, seq_len=X.shape[1], keep_replay=True, **PAPER_RULES)
    for i in range(0, X.shape[0], batch):
        an.run_batch(X[i:i + batch], Y[i:i + batch])
    means = {t: an.statistics["lifecycle"].means(t) for t in INTERVENTION_TARGETS} if mode == "mean" else {}
    losses, _ = intervention_losses(model, an.replay, mode, means)
    return an, losses


def test_intervention_zero_and_mean_change_the_loss(planted_result):
    m, X, Y, an, r, hs = planted_result
    with torch.no_grad():
        _, base = m(X, Y)
    an_zero, zero = replay(m, X, Y, 20, "zero")
    assert an_zero.loss_sum / an_zero.loss_n == pytest.approx(base.item(), rel=1e-6)
    assert zero["generated"][1] == 6  # generated in layer 1 at 2 positions x 3 sequences, nowhere else
    means = an_zero.statistics["lifecycle"].means("generated")
    assert set(means) == {(1, CH)}
    assert means[(1, CH)] == pytest.approx(hs[1][:, list(POSITIONS), CH].mean().item(), rel=1e-4)
    _, mean = replay(m, X, Y, 20, "mean")
    assert abs(zero["generated"][0] - base.item()) > 1e-3
    assert abs(mean["generated"][0] - zero["generated"][0]) > 1e-4
    with torch.no_grad():
        assert m(X, Y)[1].item() == base.item()  # hooks removed, blocks restored
    for mod in m.modules():
        assert not mod._forward_hooks and "forward" not in mod.__dict__


def test_intervention_targets_generated_propagated_all(planted_result):
    """The planted value is generated in layer 1 (MLP) and carried in layers 2-3: 'generated' removes it in
    layer 1, 'propagated' keeps layer 1 and removes the copies in layers 2 and 3, 'all' removes all three;
    each against an independent block-by-block forward with those edits."""
    m, X, Y = planted_result[:3]
    expected = {"generated": [(1, POSITIONS, CH)], "propagated": [(2, POSITIONS, CH), (3, POSITIONS, CH)],
                "all": [(1, POSITIONS, CH), (2, POSITIONS, CH), (3, POSITIONS, CH)]}
    an, losses = replay(m, X, Y, 100, "zero")
    with torch.no_grad():
        base = m(X, Y)[1].item()
        for target, edits in expected.items():
            loss, count = losses[target]
            assert count == 6 * len(edits), target  # 3 sequences x 2 positions per edited layer
            assert loss == pytest.approx(edited_loss(m, X, Y, edits), abs=1e-5), target
            assert abs(loss - base) > 1e-4
    # every batch resumes at the first edited layer: block 0 is not run again
    assert [b.start for b in an.replay] == [1, 1]
    calls = []
    handle = m.transformer.h[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        intervention_losses(m, an.replay, "zero", {})
    finally:
        handle.remove()
    assert calls == []


def test_replay_without_edits_gives_the_analysis_loss():
    """A replayed forward without edits, from the recorded layer, gives the analysis' own loss: the
    interventions' loss changes are their edits' alone."""
    from analysis.interventions import analysis_attention, replayed_nll
    from hf.models import model_view
    m = planted_model()
    X, Y = planted_batch()
    an = OutlierAnalyzer(m, tau_act=20, seq_len=T, keep_replay=True, **PAPER_RULES)
    an.run_batch(X, Y)
    (b,) = an.replay
    assert b.start == 1 and b.h_start.shape == (3, T, C)
    with analysis_attention(m), torch.no_grad():
        nll, n = replayed_nll(m, model_view(m), X, Y, b.start, b.h_start, b.returns_tuple)
    assert float(nll.sum() / n.sum()) == pytest.approx(an.loss_sum / an.loss_n, rel=1e-6)
    assert m.transformer.h[0].attn.backend == "auto"  # restored


def sink_model():
    """Layer 0, head 0: every query has q[0] = 10 and only token SPECIAL has a large positive k[0]."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=2, n_embd=C, bias=True)).eval()
    with torch.no_grad():
        m.transformer.wte.weight[:, E0] = 0
        m.transformer.wpe.weight[:, E0] = 0
        m.transformer.wte.weight[SPECIAL, E0] = 0.1
        qkv = m.transformer.h[0].attn.c_attn
        qkv.weight[0] = 0
        qkv.bias[0] = 10.0  # q, head 0, dim 0
        qkv.weight[C] = 0
        qkv.weight[C, E0] = 10.0  # k, head 0, dim 0 reads E0 ...
        qkv.bias[C] = -5.0  # ... and is negative for every other token
    return m


@pytest.mark.parametrize("variant", ["default", "sigmoid"])
def test_constructed_attention_sink_found(variant):
    m = sink_model()
    if variant != "default":  # same weights, other formulation
        m2 = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=2, n_embd=C, bias=True, attention=variant)).eval()
        m2.load_state_dict(m.state_dict())
        m = m2
    g = torch.Generator().manual_seed(2)
    X = torch.randint(0, V - 1, (2, T), generator=g)
    X[:, 7] = SPECIAL
    an = OutlierAnalyzer(m, tau_act=1000, tau_weight=1000, tau_attn=8, seq_len=T, **PAPER_RULES)
    an.run_batch(X)
    r = an.result()
    att = r["attention"]
    # independent reference: attention weights from q, k computed by hand
    with torch.no_grad():
        x = m.transformer.h[0].ln_1(m.transformer.wte(X) + m.transformer.wpe(torch.arange(T))).double()
        W, b = m.transformer.h[0].attn.c_attn.weight.double(), m.transformer.h[0].attn.c_attn.bias.double()
        qkv = x @ W.T + b
        q, k = qkv[..., :16], qkv[..., C:C + 16]  # head 0
        scores = (q @ k.transpose(-1, -2)) / 4.0
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        A = torch.softmax(scores, -1) if variant == "default" else torch.sigmoid(scores - math.log(T))
        cum = A.sum(1)  # (B, T)
    expected = {(b, j) for b in range(2) for j in range(T) if cum[b, j] > 8 * cum[b].mean()}
    assert expected == {(0, 7), (1, 7)}
    got = {(o["seq"], o["position"]) for o in att["outlier_keys"] if o["layer"] == 0 and o["head"] == 0}
    assert got == expected
    for o in att["outlier_keys"]:
        if o["layer"] == 0 and o["head"] == 0:
            assert o["score"] == pytest.approx(cum[o["seq"], 7].item(), rel=1e-4)
            assert o["category"] == "other"
    assert att["positions"][0][0][0] == 7
    qk = {(r_["layer"], r_["head"]): r_ for r_ in att["qk_alignment"]}
    assert qk[(0, 0)]["dims"][0][0] == 0  # aligned in dimension 0, where q and k were planted
    # mean query-centred logit (q.k/sqrt(d) minus that query's mean over its keys j <= i) over the queries that
    # see the outlier key 7 (i >= 7), mean over sequences
    assert qk[(0, 0)]["n_keys"] == 2
    finite = torch.where(torch.isinf(scores), torch.zeros_like(scores), scores)
    centred = scores - finite.sum(-1, keepdim=True) / torch.arange(1, T + 1, dtype=scores.dtype)[:, None]
    assert qk[(0, 0)]["logit"] == pytest.approx(centred[:, 7:, 7].mean().item(), rel=1e-4)


def layer0_logits(m, X):
    """float64 q.k/sqrt(d) of every head of layer 0 (B, H, T, T), -inf above the diagonal, by hand."""
    with torch.no_grad():
        x = m.transformer.h[0].ln_1(m.transformer.wte(X) + m.transformer.wpe(torch.arange(T))).double()
        qkv = x @ m.transformer.h[0].attn.c_attn.weight.double().T + m.transformer.h[0].attn.c_attn.bias.double()
        q, k = (qkv[..., i * C:(i + 1) * C].view(X.shape[0], T, 2, 16).transpose(1, 2) for i in (0, 1))
        return (q @ k.transpose(-1, -2) / 4.0).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)


def test_query_centred_logits_ignore_a_k_bias():
    """Qwen2-style k bias: adding 20 to head 0's k[0] (where every query has q[0] = 10) adds 10 * 20 / 4 = 50 to
    every logit of every query, which softmax ignores. The reported q.k of outlier and other keys are
    centred per query (logit - the query's mean logit over its keys), so they match a float64 reference and
    do not move with the bias; the raw mean logit would move by 50."""
    X = torch.randint(0, V - 1, (2, T), generator=torch.Generator().manual_seed(2))
    X[:, 7] = SPECIAL
    reports, raws = [], []
    for k_bias in (0.0, 20.0):
        m = sink_model()
        with torch.no_grad():
            m.transformer.h[0].attn.c_attn.bias[C] += k_bias
        an = OutlierAnalyzer(m, tau_act=1000, tau_weight=1000, tau_attn=8, seq_len=T, **PAPER_RULES)
        an.run_batch(X)
        att = an.result()["attention"]
        logits = layer0_logits(m, X)
        finite = torch.where(torch.isinf(logits), torch.zeros_like(logits), logits)
        centred = logits - finite.sum(-1, keepdim=True) / torch.arange(1, T + 1, dtype=logits.dtype)[:, None]
        per_key = torch.where(torch.isinf(logits), torch.zeros_like(logits), centred).sum(-2) / (T - torch.arange(T))
        cum = torch.softmax(logits, -1).sum(-2)  # (B, H, T)
        outlier = cum > 8 * cum.mean(-1, keepdim=True)
        assert outlier[:, 0, 7].all()
        assert att["mean_logit_outlier_keys"][0] == pytest.approx(per_key[outlier].mean().item(), rel=1e-4)
        assert att["mean_logit_other_keys"][0] == pytest.approx(per_key[~outlier].mean().item(), rel=1e-4, abs=1e-5)
        reports.append(att)
        raws.append(finite.sum(-2)[:, 0] / (T - torch.arange(T)))  # raw mean logit per key, head 0
    assert (raws[1] - raws[0]).mean().item() == pytest.approx(50.0, rel=1e-3)
    a, b = reports
    assert b["mean_logit_other_keys"][0] == pytest.approx(a["mean_logit_other_keys"][0], rel=1e-4, abs=1e-4)
    assert b["mean_logit_outlier_keys"][0] == pytest.approx(a["mean_logit_outlier_keys"][0], rel=1e-4)
    qa, qb = ({(r["layer"], r["head"]): r for r in att["qk_alignment"]}[(0, 0)] for att in (a, b))
    assert qb["logit"] == pytest.approx(qa["logit"], rel=1e-4) and qb["dims"][0][0] == qa["dims"][0][0] == 0


@pytest.mark.parametrize("variant", ["context_bias", "attention_bias", "scaling"])
def test_variant_specific_attention_reports(variant):
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=16, attention=variant)).eval()
    X = torch.randint(0, V, (2, 16))
    an = OutlierAnalyzer(m, tau_act=5, tau_weight=5, tau_attn=2, seq_len=16, **PAPER_RULES)
    an.run_batch(X)
    att = an.result()["attention"]
    blk = m.transformer.h[0].attn
    with torch.no_grad():
        for b in m.transformer.h:
            b.attn.record = True
        m(X)
        rec = blk.recorded
        for b in m.transformer.h:
            b.attn.record = False
    if variant == "scaling":
        gate = rec["gate"].double().mean(1)  # (B, T)
        assert att["gate"]["first"][0] == pytest.approx(gate[:, 0].mean().item(), rel=1e-5)
        assert "sink_share" not in att
    else:
        assert att["sink_share"][0] == pytest.approx(rec["sink_probs"].double().mean().item(), rel=1e-5)
        assert "gate" not in att
    assert "scale_proj" not in str(an.result()["weight"].keys()) or variant == "scaling"


# ----------------------------------------------------------------------------------------------
# telemetry

@pytest.mark.parametrize("variant", VARIANTS)
def test_training_telemetry_keys_values_and_restored_state(variant):
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=16, attention=variant, dropout=0.1))
    m.train()
    X = torch.randint(0, V, (2, 16))
    out = training_telemetry(m, X)
    keys = {f"outlier/{k}/L{l}" for k in ("top1_h", "median_h", "ratio_h", "kurtosis", "first_attn") for l in range(2)}
    keys |= {"outlier/max_top1_h", "outlier/max_ratio_h", "outlier/max_kurtosis", "outlier/max_first_attn"}
    records = REGISTRY[variant].records  # what the variant's reference path records, from its registry entry
    if "sink_probs" in records:
        keys |= {f"outlier/sink_mass/L{l}" for l in range(2)}
    if "gate" in records:
        keys |= {f"outlier/{k}/L{l}" for k in ("gate_first", "gate_rest") for l in range(2)}
    assert set(out) == keys
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    # state restored: train mode, record flags, recorded dicts, no hooks left
    assert m.training
    for b in m.transformer.h:
        assert b.attn.record is False and b.attn.recorded == {}
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    # values against an independent eval-mode forward
    m.eval()
    with torch.no_grad():
        hs, _, _ = block_outputs(m, X)
    for l, h in enumerate(hs):
        flat = h.abs().flatten()
        assert out[f"outlier/top1_h/L{l}"] == pytest.approx(flat.max().item(), rel=1e-5)
        assert out[f"outlier/median_h/L{l}"] == pytest.approx(flat.sort().values[(flat.numel() - 1) // 2].item(), rel=1e-5)
        s = (h ** 2).reshape(-1, 16).mean(0)
        assert out[f"outlier/kurtosis/L{l}"] == pytest.approx(((s ** 2).mean() / s.mean() ** 2).item(), rel=1e-4)


def test_telemetry_of_a_single_token_is_finite_json():
    """T == 1: scaling's gate_rest has no positions to average and is left out (never NaN)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=16, attention="scaling"))
    out = training_telemetry(m, torch.randint(0, V, (2, 1)))
    assert "outlier/gate_first/L0" in out and not any(k.startswith("outlier/gate_rest/") for k in out)
    assert all(math.isfinite(v) for v in out.values())
    json.dumps(out, allow_nan=False)


def test_telemetry_first_token_attention_of_a_sink():
    m = sink_model()
    X = torch.randint(0, V - 1, (1, T))
    X[:, 0] = SPECIAL  # the sink token at position 0: head 0 of layer 0 puts ~all attention on it
    out = training_telemetry(m, X)
    assert out["outlier/first_attn/L0"] > 0.45  # head 0 ~1, head 1 ~ mean 1/(i+1)
    assert out["outlier/max_first_attn"] == out["outlier/first_attn/L0"]


def test_probe_restores_state_on_error():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=16)).eval()

    def boom(l, rec, x):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with Probe(m, attention_fn=boom, branches=True, down_input=True, norms=True):
            m(torch.zeros(1, 4, dtype=torch.long))
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert all(b.attn.record is False for b in m.transformer.h)


# ----------------------------------------------------------------------------------------------
# the default rules (no threshold given): hand-made tensors, then one model with all three outliers planted

def test_column_share_weight_rule_matches_loop():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 6, generator=g, dtype=torch.float64) * 0.02
    w[7, 2] = 1.0  # holds ~0.6 of column 2's magnitude
    w[:, 4] = 0.0  # a zero column has no outlier
    w[3, 5], w[9, 5] = 0.4, -0.4  # two entries sharing column 5: ~0.3 each
    mask = S.column_share_outlier_mask(w.float(), 0.1)
    ref = set()
    for j in range(6):
        total = sum(abs(float(w[i, j])) for i in range(40))
        ref |= {(i, j) for i in range(40) if total > 0 and abs(float(w[i, j])) >= 0.1 * total}
    assert {tuple(i) for i in mask.nonzero().tolist()} == ref == {(7, 2), (3, 5), (9, 5)}
    # equivalently, the column extremal ratio against share x rows (40 x 0.1 = 4)
    ratio = S.column_extremal_ratio(w.float())
    assert [j for j in range(6) if ratio[j] >= 4.0] == [2, 5]
    # the paper's row-wise formula cannot fire once tau >= the number of columns (here 6)
    assert not S.weight_outlier_mask(w.float(), 6.0).any()


def planted_ratio(w, row, col, ratio):
    """Sets w[row, col] so that it is `ratio` times its column's mean |w| (the mean including itself)."""
    n = w.shape[0]
    rest = w[:, col].abs().sum() - w[row, col].abs()
    w[row, col] = ratio * rest / (n - ratio)


def test_ratio_rule_has_one_threshold_for_every_module_shape():
    """A 4864-row up_proj and a 128-row GQA k_proj (Qwen2-0.5B's shapes, 64 columns here): the same entry, 60x
    its column's mean |w|, is an outlier of both under the default rule (threshold 50 for both); the share
    rule (threshold 0.1 x rows) finds it in the k_proj (12.8) but could never in the up_proj (486.4); 40x is
    an outlier of neither, and the Gaussian columns of both are clean."""
    g = torch.Generator().manual_seed(4)
    for rows in (4864, 128):
        w = torch.randn(rows, 64, generator=g, dtype=torch.float64) * 0.02
        planted_ratio(w, 5, 3, 60.0)
        planted_ratio(w, 9, 10, 40.0)
        a = w.abs()
        ref = {tuple(x) for x in (a >= 50 * a.mean(0, keepdim=True)).nonzero().tolist()}  # float64
        assert ref == {(5, 3)}, rows
        assert {tuple(x) for x in S.column_ratio_outlier_mask(w.float()).nonzero().tolist()} == ref
        assert {tuple(x) for x in S.weight_rule_mask(w.float(), "ratio").nonzero().tolist()} == ref
        share = {tuple(x) for x in S.column_share_outlier_mask(w.float(), 0.1).nonzero().tolist()}
        assert share == ({(5, 3), (9, 10)} if rows == 128 else set()), rows
        assert S.ratio_threshold(rows) == 50.0
    # below 2 x 50 rows a column cannot reach 50: the threshold is rows / 2 (half the column in one entry), >= 8
    assert (S.ratio_threshold(64), S.ratio_threshold(12)) == (32.0, 8.0)


def test_attention_share_rule_matches_loop():
    T = 10
    probs = torch.zeros(2, 2, T, T, dtype=torch.float64)
    for i in range(T):
        probs[0, 0, i, 0] = 1.0  # head 0 of seq 0: a sink on key 0 (Ahat_0 = 10)
        probs[0, 1, i, :i + 1] = 1.0 / (i + 1)  # uniform causal: Ahat_0 = H_10 = 2.93
        probs[1, :, i, max(i - 1, 0)] = 1.0  # seq 1: every query attends to the previous token
    cum = S.cumulative_attention(probs.float())
    got = S.attention_share_mask(cum, 0.1)
    for b in range(2):
        for h in range(2):
            for j in range(T):
                ahat = sum(float(probs[b, h, i, j]) for i in range(T))
                assert bool(got[b, h, j]) == (ahat >= 0.1 * T - 1e-9)
    assert got[0, 0].nonzero().flatten().tolist() == [0]
    assert got[0, 1].nonzero().flatten().tolist() == [0, 1, 2, 3]  # H_10 - H_j: 2.93, 1.93, 1.43, 1.10, 0.85
    assert got[1, 0].nonzero().flatten().tolist() == list(range(9))  # Ahat = 2, 1, ..., 1, 0
    # head-averaged (the authors' code): key 0 of seq 0 gets (10 + 2.93) / 2, key 1 only 1.93 / 2 < 1
    avg = S.attention_rule_mask(cum.mean(1), "authors")
    assert avg[0].nonzero().flatten().tolist() == [0]
    # the paper's formula at tau_A = 1000 can never fire on softmax weights: mean Ahat = 1, Ahat_j <= T - j
    assert not S.attention_rule_mask(cum, "paper", tau=1000.0).any()
    with pytest.raises(ValueError):
        S.attention_rule_mask(cum, "median")


def test_b2_overlap_per_head_hand_computed():
    """Appendix B.2: per sample and head, |O_act & O_att^i| / |O_act| (and the reverse)."""
    hpos = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)  # sample 0: {0, 3}; sample 1: none
    keys = torch.tensor([[[1, 0, 0, 0, 0], [1, 1, 1, 1, 0]],
                         [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]], dtype=torch.bool)
    a_in_k, k_in_a = S.b2_overlaps(hpos, keys)
    assert a_in_k[:2].tolist() == [0.5, 1.0] and torch.isnan(a_in_k[2:]).all()
    assert k_in_a[:2].tolist() == [1.0, 0.5] and k_in_a[2].item() == 0.0 and math.isnan(k_in_a[3].item())


def test_defaults_find_planted_activation_weight_outlier_and_sink():
    m = planted_all_model()
    X = planted_all_batch()
    an = OutlierAnalyzer(m, seq_len=T3)  # no thresholds: the defaults
    an.run_batch(X[:2])
    an.run_batch(X[2:])
    r = an.result()
    # independent references on float64 copies of the block outputs and of the layer-2 attention
    hs_, _, _ = block_outputs(m, X)
    ref = {(l, b, t, c) for l, x in enumerate(hs_) for b in range(4)
           for t, c in (x[b].abs() > 1000 * x[b].abs().mean()).nonzero().tolist()}
    assert ref == {(l, b, 0, CH) for l in (1, 2) for b in range(4)}
    xd = r["activation"]["down_input"]
    assert xd["count"] == [0, 4, 0] and xd["channels"][1] == [[K_UNIT, 4]]
    assert {(o["layer"], o["seq"], o["position"], o["channel"]) for o in r["activation"]["layer_output"]["outliers"]} == ref
    w = m.transformer.h[1].mlp.c_proj.weight.double().abs()
    col_ratio = w / w.mean(0, keepdim=True).clamp_min(1e-300)  # the default rule: >= 50x the column mean, or
    assert {tuple(i) for i in (col_ratio >= 32).nonzero().tolist()} == {(CH, K_UNIT)}  # rows / 2 = 32 below 100 rows
    wr = r["weight"]["mlp.c_proj"]
    assert wr["outlier_channels"] == [[], [K_UNIT], []] and wr["outlier_out_channels"][1] == [CH]
    assert wr["top_entries"][0][:3] == [1, CH, K_UNIT] and wr["threshold"]["extremal_ratio"] == pytest.approx(32.0)
    with torch.no_grad():
        x2 = m.transformer.h[2].ln_1(hs_[1].float()).double()
        qkv = x2 @ m.transformer.h[2].attn.c_attn.weight.double().T + m.transformer.h[2].attn.c_attn.bias.double()
        q = qkv[..., :C3].view(4, T3, 2, 32).transpose(1, 2)
        k = qkv[..., C3:2 * C3].view(4, T3, 2, 32).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(32)).masked_fill(~torch.ones(T3, T3, dtype=torch.bool).tril(), -math.inf)
        cum = torch.softmax(scores, -1).sum(-2)  # (B, H, T)
    assert {tuple(i) for i in (cum >= 6.4).nonzero().tolist()} == {(b, h, 0) for b in range(4) for h in range(2)}
    att = r["attention"]
    got = {(o["layer"], o["seq"], o["head"], o["position"]) for o in att["outlier_keys"]}
    assert got == {(2, b, h, 0) for b in range(4) for h in range(2)}
    assert {(o["layer"], o["seq"], o["position"]) for o in att["mean_outlier_keys"]} == {(2, b, 0) for b in range(4)}
    assert att["mean_outlier_count"] == [0, 0, 4] and att["threshold"] == pytest.approx([6.4] * 3)
    assert att["outlier_key_share_by_head"][2] == pytest.approx((cum[:, :, 0] / T3).mean(0).tolist(), rel=1e-4)
    # Table 1 row 4 (B.2): A = {0} in layers 1 and 2; K_i = {0} for both heads of layer 2, empty in layer 1
    c = r["consistency"]["h_vs_attention"]
    assert [v["a_in_b"] for v in c["by_layer"]] == [None, 0.0, 1.0] and c["layers"] == [1, 2]
    assert (c["a_in_b"], c["n_a"], c["b_in_a"], c["n_b"]) == (0.5, 16, 1.0, 8)
    # Figure 7: the spiking unit's c_fc row reads E0 and its W_down column writes only CH
    (u,) = r["weight_link"]["units"]
    fc = m.transformer.h[1].mlp.c_fc.weight.double()
    norms = fc.norm(dim=1)
    assert (u["layer"], u["unit"], u["spikes"], u["fc_top_input"], u["down_top_output"]) == (1, K_UNIT, 4, E0, CH)
    assert u["fc_top_weight"] == FC_W and u["down_top_share"] == 1.0 and u["down_extremal_ratio"] == pytest.approx(C3)
    assert u["fc_row_norm_ratio"] == pytest.approx(FC_W / norms.median().item(), rel=1e-5)
    assert r["weight_link"]["profile"]["layer"] == 1 and r["weight_link"]["profile"]["units"] == [K_UNIT]
    # Figure 5b-c: the profile is the layer-1 W_down and its extremal column
    prof = r["weight"]["mlp.c_proj"]["profile"]
    assert (prof["layer"], prof["column"]) == (1, K_UNIT) and prof["column_abs"][CH] == BIG
    assert prof["column_max_abs"] == pytest.approx(w.max(0).values.tolist())


# ----------------------------------------------------------------------------------------------
# interventions of "Rethinking the Outlier Distribution": targets and LayerNorm gains

def edited_loss(model, X, Y, edits):
    """Loss of an independent block-by-block forward in which h_l[:, positions, channel] is set to 0 for
    every (l, positions, channel) in `edits`."""
    tr = model.transformer
    x = tr.wte(X) + tr.wpe(torch.arange(X.shape[1]))
    for l, block in enumerate(tr.h):
        x = x + block.attn(block.ln_1(x))
        x = x + block.mlp(block.ln_2(x))
        for el, positions, channel in edits:
            if el == l:
                x[:, list(positions), channel] = 0.0
    logits = model.lm_head(tr.ln_f(x))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1)).item()


def test_gamma_driven_channel_found_and_set_to_median():
    """ln_f's gain of channel 5 is 30 (all others 1): an outlier channel of ln_f's output that the
    normalized input does not have; the intervention sets that gain to the median (1) and restores it."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        m.transformer.ln_f.weight[5] = 30.0
    X = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    Y = torch.roll(X, -1, 1)
    an = OutlierAnalyzer(m, seq_len=16)
    an.run_batch(X, Y)
    norm = {n["module"]: n for n in an.result()["normalization"]}
    assert norm["ln_f"]["outlier_channels"] == [5] and norm["ln_f"]["gamma_driven"] == [5]
    assert all(not n["gamma_driven"] for name, n in norm.items() if name != "ln_f")
    ref = GPT(m.config).eval()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        ref.transformer.ln_f.weight[5] = 1.0
        with GammaIntervention(m, {"ln_f": [5]}):
            assert m(X, Y)[1].item() == pytest.approx(ref(X, Y)[1].item(), rel=1e-6)
        assert m.transformer.ln_f.weight[5].item() == 30.0


def test_column_rule_needs_eight_times_the_column_mean_in_few_row_matrices():
    """(12, 768) matrices (scale_proj at 124M) of Gaussian entries have no column outliers (10% of a
    12-entry column is about the average entry); a planted entry of ~10x the column mean is found."""
    g = torch.Generator().manual_seed(1)
    for _ in range(20):  # 20 x 768 columns: a 5x floor would flag ~17 of them
        assert not S.column_share_outlier_mask(torch.randn(12, 768, generator=g) * 0.02, 0.1).any()
    w = torch.randn(12, 768, generator=g) * 0.02
    w[3, 100] = 100 * w[:, 100].abs().mean()
    a = w.abs().double()
    ref = {(i, j) for i in range(12) for j in range(768)
           if a[i, j] >= 0.1 * a[:, j].sum() and a[i, j] >= 8 * a[:, j].mean()}
    assert {tuple(x) for x in S.column_share_outlier_mask(w, 0.1).nonzero().tolist()} == ref == {(3, 100)}
