"""The lifecycle of massive activations (generated, emerged, propagated, cancelled, the early stage), by value:
on tensors built by hand and on tiny models with outliers planted at known layers (tests/planted.py)."""

import types

import numpy as np
import pytest
import torch

from analysis import definitions as S
from analysis.analyzer import OutlierAnalyzer
from analysis.capture import Capture
from analysis.statistics.base import Batch
from analysis.statistics.lifecycle import Lifecycle
from model import GPT, GPTConfig
from planted import CH, E0, K_UNIT, PAPER_RULES, POSITIONS, SPECIAL, C, T, V, block_outputs, planted_batch


# The paper's formulas, which the planted-model tests below were written for (thresholds given explicitly);
# the default rules have their own tests.
def lifecycle_of(H, A, M, tau):
    """The Lifecycle statistic's result after one sequence of hand-made per-layer tensors: layer outputs H,
    attention and MLP branch outputs A, M (1, T, C) (no model: the statistic reads nothing else of it)."""
    setup = types.SimpleNamespace(L=len(H), rules=S.Rules(tau_act=tau), token_info=S.TokenInfo())
    lifecycle = Lifecycle(setup)
    lifecycle.update(Capture(setup.rules, H, A, M), Batch(np.zeros(H[0].shape[:2], dtype=np.int64), None, 0))
    return lifecycle.result({})


def constructed_lifecycle(attn, mlp, tau, L_, T_=4, C_=4, where=(2, 1)):
    """The Lifecycle statistic on hand-made tensors: every entry 0.1, plus the branch outputs given per layer at
    (position, channel) `where` of one sequence (layer -> value). Returns the result entry of `where`."""
    A = [torch.zeros(1, T_, C_) for _ in range(L_)]
    M = [torch.zeros(1, T_, C_) for _ in range(L_)]
    for xs, given in ((A, attn), (M, mlp)):
        for l, v in given.items():
            xs[l][0, where[0], where[1]] = v
    H, x = [], torch.full((1, T_, C_), 0.1)
    for l in range(L_):
        x = x + A[l] + M[l]
        H.append(x.clone())
    return {(e["position"], e["channel"]): e for e in lifecycle_of(H, A, M, tau)}[where], H


def test_lifecycle_emerged_propagated_cancelled_on_constructed_tensors():
    """(t=2, c=1) builds up from eight writes of 0.3 (12.5% of the 2.5 peak each, none of them 25%) in layers
    1-4, is carried in layer 5 and cancelled by the attention branch in layer 6 (-2.1, 84% of the peak).
    Every other entry is 0.1; tau = 5."""
    e, H = constructed_lifecycle({1: 0.3, 2: 0.3, 3: 0.3, 4: 0.3, 6: -2.1}, {1: 0.3, 2: 0.3, 3: 0.3, 4: 0.3},
                                 tau=5.0, L_=8)
    assert [round(float(h[0, 2, 1]), 4) for h in H] == [0.1, 0.7, 1.3, 1.9, 2.5, 2.5, 0.4, 0.4]
    # emerged where it first reaches half the peak (1.25): layer 2; no branch writes 25% of 2.5
    assert e["generated_at"] == [] and e["generated_by"] is None and e["emerged_at"] == 2
    assert e["status"] == ["-", "-", "emerged", "propagated", "propagated", "propagated", "cancelled", "-"]
    assert e["peak_layer"] == 4 and e["peak"] == pytest.approx(2.5)
    assert e["cancelled_at"] == [6]
    (c,) = e["cancellation"]
    assert (c["layer"], c["branch"], c["opposite_sign"]) == (6, "attn", True)
    assert (c["branch_output"], c["previous"], c["share"]) == (pytest.approx(-2.1), pytest.approx(2.5),
                                                                pytest.approx(2.1 / 2.5))
    assert e["trajectory"] == pytest.approx([0.1, 0.7, 1.3, 1.9, 2.5, 2.5, 0.4, 0.4], abs=1e-6)
    # An et al.'s ratios: each branch over the residual it meets (the attention at layer 6 cancels 84% of 2.5)
    rel = e["relative_contrib"]
    assert rel["attn"][6] == pytest.approx(-2.1 / 2.5) and rel["mlp"][1] == pytest.approx(0.3 / 0.4)


def test_lifecycle_value_kept_while_the_threshold_rises_is_not_cancelled():
    """Qwen2's channel 62: the value (1340) stays from layer 2 to 5 while tau x mean|h| of the other entries
    rises past it (they grow by 15 per layer); the real cancellation is in two steps, layers 6 (-600, 45%) and
    7 (-430, 32%), after which it is below half the peak. A threshold-relative lifecycle would call it cancelled
    at layer 4."""
    L_, T_, C_ = 9, 16, 16
    A = [torch.zeros(1, T_, C_) for _ in range(L_)]
    M = [torch.zeros(1, T_, C_) for _ in range(L_)]
    M[2][0, 0, 5], M[6][0, 0, 5], M[7][0, 0, 5] = 1340.0, -600.0, -430.0
    for l in range(3, L_):
        A[l] += 15.0  # every entry but (0, 5) grows; the threshold rises with the mean
        A[l][0, 0, 5] = 0.0
    H, x = [], torch.full((1, T_, C_), 0.1)
    for l in range(L_):
        x = x + A[l] + M[l]
        H.append(x.clone())
    tau = 50.0
    thr = [tau * float(h.abs().mean()) for h in H]
    assert thr[3] < 1340.1 < thr[4]  # the value stays, the threshold passes it
    (e,) = lifecycle_of(H, A, M, tau)
    assert (e["position"], e["channel"], e["first_massive_at"]) == (0, 5, 2)
    assert e["generated_at"] == [2] and e["cancelled_at"] == [6, 7]
    assert e["status"] == ["-", "-", "generated", "propagated", "propagated", "propagated", "cancelled", "cancelled",
                           "-"]
    assert [(c["layer"], c["branch"]) for c in e["cancellation"]] == [(6, "mlp"), (7, "mlp")]
    assert [c["share"] for c in e["cancellation"]] == pytest.approx([600 / 1340.1, 430 / 1340.1])
    assert e["threshold"] == pytest.approx(thr, rel=1e-5)


def test_lifecycle_stages_rules_on_rows():
    """lifecycle_stages on hand-written trajectories, one row per rule (L = 6; median |h| 1 everywhere)."""
    rows = {  # name: (attn, mlp) per layer; h is their running sum
        "two_step": ([0, 0, 0, 0, 0, 0], [0, 60, 40, 0, 0, 0]),  # 60% and 40% of 100: generated at 1 and 2
        "negative": ([0, -80, 0, 0, 60, 0], [0, 0, -20, 0, 0, 0]),  # peak -100: signs follow the peak
        "early": ([0, 0, 0, 0, 0, 0], [0, 150, 0, -140, 3000, 0]),  # 150 at layers 1-2 (>= 100x median), then 3010
        "quiet_fall": ([0, 0, 0, 0, -15, -10], [0, 100, 0, -20, -20, 0]),  # no branch removes 25%: named where it falls
    }
    attn = torch.tensor([r[0] for r in rows.values()], dtype=torch.float64)
    mlp = torch.tensor([r[1] for r in rows.values()], dtype=torch.float64)
    traj = (attn + mlp).cumsum(1)
    st = S.lifecycle_stages(traj, attn, mlp, torch.ones_like(traj))
    status = [[S.LIFECYCLE_STATUSES[i] for i in row] for row in st.status.tolist()]
    gen = st.generated.nonzero().tolist()
    assert [l for r, l in gen if r == 0] == [1, 2] and status[0] == ["-", "generated", "generated"] + ["propagated"] * 3
    assert st.sign[1] == -1 and [l for r, l in gen if r == 1] == [1]  # -80 (80%) generates, -20 (20%) does not
    assert st.gen_attn[1].nonzero().flatten().tolist() == [1] and not st.gen_mlp[1].any()
    assert st.cancel_attn[1].nonzero().flatten().tolist() == [4] and status[1][4:] == ["cancelled", "-"]
    assert st.early[2].nonzero().flatten().tolist() == [1, 2] and st.early_mlp[2].nonzero().flatten().tolist() == [1]
    assert status[2] == ["-", "early", "early", "-", "generated", "propagated"]
    assert [l for r, l in gen if r == 2] == [4]  # 3000 of 3010
    assert st.fall_at[3] == 4 and status[3] == ["-", "generated", "propagated", "propagated", "cancelled", "-"]
    assert st.cancel_mlp[3].nonzero().flatten().tolist() == [4]  # -20 of the MLP against -10 of the attention
    assert st.fall_at[0] == 6 and not st.cancelled[0].any()  # never falls: not cancelled


def staged_model(n_layer, first, follow=(), lift=()):
    """GPT (T, C = 32) whose channel CH at the SPECIAL positions goes through planted stages: MLP unit K_UNIT
    of layer first[0] fires on embedding dim E0 (which only SPECIAL carries and no layer writes) and writes
    about first[1] into CH; each (layer, value) of `follow` is an MLP unit that reads CH itself (so it fires
    only where CH already dominates its token) and writes about `value` into CH; every layer in `lift` adds
    1.0 to all other channels of every token (its MLP output bias), which raises mean |h| and the threshold."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=n_layer, n_head=2, n_embd=C, bias=True)).eval()
    with torch.no_grad():
        tr = m.transformer
        tr.wte.weight[:, E0] = 0
        tr.wpe.weight[:, E0] = 0
        tr.wte.weight[SPECIAL, E0] = 0.1
        for block in tr.h:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight[E0] = 0
                lin.bias[E0] = 0
        units = [(first[0], E0, 5.0, -3.0, first[1] / 25.0)]  # the unit's GELU output is about 25 / about 3
        units += [(layer, CH, 2.0, -8.0, value / 3.0) for layer, value in follow]
        for layer, reads, w, b, out in units:
            mlp = tr.h[layer].mlp
            mlp.c_fc.weight[K_UNIT] = 0
            mlp.c_fc.weight[K_UNIT, reads] = w
            mlp.c_fc.bias[K_UNIT] = b
            mlp.c_proj.weight[:, K_UNIT] = 0
            mlp.c_proj.weight[CH, K_UNIT] = out
        for layer in lift:
            bias = tr.h[layer].mlp.c_proj.bias
            bias += (torch.arange(C) != CH) & (torch.arange(C) != E0)
    return m


def staged_lifecycle(model, tau):
    """The analysis' lifecycle of the SPECIAL positions of planted_batch, with the float64 block outputs."""
    X, Y = planted_batch()
    an = OutlierAnalyzer(model, tau_act=tau, seq_len=T, **PAPER_RULES)
    an.run_batch(X, Y)
    life = {(e["position"], e["channel"]): e for e in an.result()["lifecycle"]}
    with torch.no_grad():
        hs, attn, mlp = block_outputs(model, X)
    return [life[(p, CH)] for p in POSITIONS], hs, attn, mlp


def test_planted_two_step_generation():
    """Layer 1's MLP writes ~11 into CH, layer 2's ~17 more (60% of the ~28 peak): both are generation layers
    (the threshold-relative lifecycle named layer 1 only)."""
    entries, hs, _, mlp = staged_lifecycle(staged_model(4, (1, 24.0), follow=[(2, 16.0)]), tau=20)
    for e, p in zip(entries, POSITIONS):
        step1, step2 = (mlp[l][:, p, CH].mean().item() for l in (1, 2))
        assert 0.25 < step1 / (step1 + step2) < 0.75  # the plant: both steps hold a substantial share
        assert e["generated_at"] == [1, 2] and [g["branch"] for g in e["generation"]] == ["mlp", "mlp"]
        peak = hs[e["peak_layer"]][:, p, CH].mean().item()
        assert [g["share"] for g in e["generation"]] == pytest.approx([step1 / peak, step2 / peak], rel=1e-3)
        assert e["status"] == ["-", "generated", "generated", "propagated"] and e["cancelled_at"] == []
        assert [d["layer"] for d in e["mlp_drivers"]] == [2] * len(e["mlp_drivers"])  # the larger step's drivers
        assert e["mlp_drivers"][0]["down_input_channel"] == K_UNIT


def test_planted_value_kept_while_the_threshold_rises():
    """Layer 1 writes ~21 into CH; layers 2-6 add 1.0 to every other channel, so tau x mean|h| passes the value
    at layer 3 while it stays; layers 5 and 6 cancel it in two steps (MLP units reading CH). The
    threshold-relative lifecycle called it cancelled at layer 3."""
    model = staged_model(7, (1, 40.0), follow=[(5, -9.5), (6, -11.0)], lift=[2, 3, 4, 5, 6])
    entries, hs, _, mlp = staged_lifecycle(model, tau=20)
    for e, p in zip(entries, POSITIONS):
        value = hs[1][:, p, CH]
        thr = [20 * h.abs().mean((1, 2)) for h in hs]
        assert (thr[2] < value).all() and (thr[3] > hs[3][:, p, CH]).all()  # the plant: the threshold passes it
        assert e["generated_at"] == [1] and e["first_massive_at"] == 1
        assert e["status"] == ["-", "generated", "propagated", "propagated", "propagated", "cancelled", "cancelled"]
        assert e["cancelled_at"] == [5, 6] and [c["branch"] for c in e["cancellation"]] == ["mlp", "mlp"]
        removed = [-mlp[l][:, p, CH].mean().item() / hs[1][:, p, CH].mean().item() for l in (5, 6)]
        assert [c["share"] for c in e["cancellation"]] == pytest.approx(removed, rel=1e-3, abs=1e-3)


def test_planted_early_stage():
    """SmolLM2's channel 507 in small: layer 1's MLP writes ~5 into CH (several hundred times the layer's median
    |h|, not massive at tau = 200 and 5% of the final value), layer 3's MLP then writes ~80. The lifecycle
    reports the early stage (layers 1-2, written by layer 1's MLP) and the generation at layer 3."""
    entries, hs, _, _ = staged_lifecycle(staged_model(5, (1, 10.0), follow=[(3, 80.0)]), tau=200)
    for e, p in zip(entries, POSITIONS):
        for l in (1, 2):
            h = hs[l]
            med = h.abs().flatten(1).median(1).values
            assert (h[:, p, CH] >= 100 * med).all() and (h[:, p, CH] < 200 * h.abs().mean((1, 2))).all()
        assert e["first_massive_at"] == 3 and e["generated_at"] == [3]
        early = e["early_stage"]
        assert early["layers"] == [1, 2] and [(w["layer"], w["branch"]) for w in early["writers"]] == [(1, "mlp")]
        assert early["writers"][0]["drivers"][0]["down_input_channel"] == K_UNIT
        assert early["peak"] == pytest.approx(hs[2][:, p, CH].mean().item() if e["count"] else 0, rel=0.05)
        assert e["status"] == ["-", "early", "early", "generated", "propagated"]
