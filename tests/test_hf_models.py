"""Hugging Face causal LMs of every supported family, tiny and random, built offline: the planted massive
activation and down-projection weight outlier are found, attention probabilities match transformers' own
output_attentions, and perplexity under fp / W8 / 50% sparsity matches an independent float64 computation."""

import copy
import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import compress_eval  # noqa: E402
from analysis.analyzer import OutlierAnalyzer  # noqa: E402
from analysis.capture import Probe  # noqa: E402
from compress import methods as compression_methods  # noqa: E402
from compress.perplexity import evaluate_perplexity  # noqa: E402
from hf import models as hf_models  # noqa: E402
from hf_tiny import (CONFIGS, FAMILIES, FF, NH, PLANT_CHANNEL, PLANT_TOKEN, PLANT_UNIT, POST_NORM, TAU, C,  # noqa: E402
                     L, V, build, tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_outliers_found(family, tmp_path):
    model = hf_models.load_hf_causal_lm(build(family, tmp_path), device="cpu")
    assert isinstance(model, hf_models.HFCausalLM)
    an = OutlierAnalyzer(model, tau_act=TAU, seq_len=32)
    X = tokens()
    an.run_batch(X, X)
    res = an.result()
    view = hf_models.model_view(model)
    # activation outliers of h: the planted channel at exactly the planted positions, from layer 0 on
    h = res["activation"]["layer_output"]["outliers"]
    assert h and {o["channel"] for o in h} == {PLANT_CHANNEL}
    assert {(o["seq"], o["position"]) for o in h if o["layer"] == 0} == {(0, 9), (1, 9), (1, 20)}
    # x_down outliers: the planted unit
    xd = res["activation"]["down_input"]["outliers"]
    assert {o["channel"] for o in xd if o["layer"] == 0} == {PLANT_UNIT}
    # the weight outlier: W_down column PLANT_UNIT, row PLANT_CHANNEL of layer 0
    w = res["weight"][view.down_name]
    assert PLANT_UNIT in w["outlier_channels"][0] and PLANT_CHANNEL in w["outlier_out_channels"][0]
    assert w["top_entries"][0][:3] == [0, PLANT_CHANNEL, PLANT_UNIT]
    # Table 1 rows 1-2 see the plant; the Figure 7 link names the planted unit
    assert res["consistency"]["wdown_vs_xdown"]["a_in_b"] == 1.0
    assert res["consistency"]["wdown_vs_h"]["a_in_b"] == 1.0
    assert res["consistency"]["h_vs_attention"]["n_a"] == 2 * L * NH  # (sample, layer, head) with h outliers
    assert any(u["layer"] == 0 and u["unit"] == PLANT_UNIT for u in res["weight_link"]["units"])
    # lifecycle: generated at layer 0 by the MLP, carried to layer 1
    life = [e for e in res["lifecycle"] if e["channel"] == PLANT_CHANNEL and e["position"] == 9]
    assert life and life[0]["generated_at"] == [0] and life[0]["generated_by"] == "mlp"
    assert life[0]["mlp_drivers"][0]["down_input_channel"] == PLANT_UNIT
    if view.gate is not None or view.family.fused_gate_up:
        assert "gate" in life[0]["mlp_drivers"][0] and "up" in life[0]["mlp_drivers"][0]
    # one normalization entry per norm, all of width C
    assert len(res["normalization"]) == len(view.norms)
    # the q/k/v statistics exist exactly where the installed transformers' attention calls the interface (and
    # the logits are not soft-capped)
    att = res["attention"]
    has_qkv = calls_attention_interface(model.hf, X) and not softcapped(model.hf)
    assert (att["value_norm"]["first"][0] is not None) == has_qkv
    assert (att["mean_logit_other_keys"][0] is not None) == has_qkv
    assert bool(att["qk_alignment"]) == has_qkv
    assert att["qkv"]["recorded_layers"] == (list(range(L)) if has_qkv else [])
    assert bool(att["qkv"]["missing"]) != has_qkv


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_branches_add_up_to_transformers_hidden_states(family, tmp_path):
    """The capture against transformers' own output_hidden_states: block l's input (after Gemma's embedding
    scaling) and output are hidden_states[l] and [l + 1] (the last one before the final norm), and the two
    branch outputs are exactly what each block adds to its residual stream (for Gemma 2 / 3 the outputs of
    the norms that follow each branch)."""
    model = hf_models.load_hf_causal_lm(build(family, tmp_path), device="cpu")
    X = tokens()
    with torch.no_grad():
        ref = model.hf(input_ids=X, output_hidden_states=True, use_cache=False).hidden_states
        with Probe(model, branches=True) as p:
            model(X)
            h, h_in0 = [x.double() for x in p.h], p.h_in0.double()
            added = [a.double() + m.double() for a, m in zip(p.attn_out, p.mlp_out)]
    torch.testing.assert_close(h_in0, ref[0].double(), rtol=1e-6, atol=1e-6)
    for l in range(L):
        if l < L - 1:
            torch.testing.assert_close(h[l], ref[l + 1].double(), rtol=1e-6, atol=1e-6)
        # float32 sums: rounding errors scale with the largest value (the planted one)
        torch.testing.assert_close(added[l], h[l] - (h[l - 1] if l else h_in0), rtol=1e-5,
                                   atol=1e-6 * float(h[l].abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_interventions_replay_the_analysis_forward(family, tmp_path):
    """--intervene in every family: each target's loss equals transformers' own eager forward with the same
    coordinates zeroed by hooks (float64 cross-entropy of its logits), and a forward resumed at block 1 from
    the recorded output of block 0 (block 0 skipped, Falcon's tuple outputs included) gives the analysis' loss."""
    from analysis.interventions import INTERVENTION_TARGETS, analysis_attention, intervention_losses, replayed_nll
    model = hf_models.load_hf_causal_lm(build(family, tmp_path), device="cpu")
    X = tokens()
    Y = torch.roll(X, -1, 1)
    an = OutlierAnalyzer(model, tau_act=TAU, seq_len=32, keep_replay=True)
    an.run_batch(X, Y)
    (batch,) = an.replay
    losses, _ = intervention_losses(model, an.replay, "zero", {})
    view = hf_models.model_view(model)
    model.hf.set_attn_implementation("eager")
    for target in INTERVENTION_TARGETS:
        i, layer = batch.masks[target].nonzero(as_tuple=True)
        b, t, c = batch.coords[i].unbind(1)
        assert losses[target][1] == len(i) > 0

        def zero(module, inputs, output, l):
            h = output[0] if isinstance(output, tuple) else output
            h[b[layer == l], t[layer == l], c[layer == l]] = 0.0
        hooks = [blk.register_forward_hook(lambda m, a, o, l=l: zero(m, a, o, l)) for l, blk in enumerate(view.blocks)]
        with torch.no_grad():
            logits = model.hf(input_ids=X, use_cache=False).logits.double()
        for h in hooks:
            h.remove()
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1)).item()
        assert losses[target][0] == pytest.approx(ref, rel=1e-5), target
    with Probe(model) as p, torch.no_grad():
        model(X)
        h0, returns_tuple = p.h[0].clone(), p.block_returns_tuple
    assert returns_tuple == (family == "falcon")
    with analysis_attention(model), torch.no_grad():
        nll, n = replayed_nll(model, view, X, Y, 1, h0, returns_tuple)
    assert float(nll.sum() / n.sum()) == pytest.approx(an.loss_sum / an.loss_n, rel=1e-6)


def softcapped(hf):
    return getattr(hf.config, "attn_logit_softcapping", None) is not None


def calls_attention_interface(hf, X):
    """Whether every attention layer of `hf` calls transformers' AttentionInterface, observed here with a
    counting function registered under a name of this test's own (independent of hf_models' recorder)."""
    import sys
    calls = []

    def spy(module, *args, **kwargs):
        calls.append(module)
        return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)
    try:
        transformers.AttentionInterface.register("test_spy", spy)
        transformers.AttentionMaskInterface.register("test_spy", transformers.masking_utils.eager_mask)
        before = hf.config._attn_implementation
        hf.set_attn_implementation("test_spy")
    except Exception:  # transformers refuses the name, or the module file has no eager function
        return False
    try:
        with torch.no_grad():
            hf(input_ids=X, use_cache=False)
    except AttributeError:
        return False
    finally:
        hf.set_attn_implementation(before)
    return len(calls) == hf.config.num_hidden_layers


def test_falcon_records_q_k_v_under_current_transformers(tmp_path):
    """transformers 5.25 routes Falcon's attention through the AttentionInterface: its q/k/v statistics
    are reported (5.23 and earlier did not; the per-family test covers either)."""
    from packaging.version import Version
    if Version(transformers.__version__) < Version("5.25"):
        pytest.skip(f"transformers {transformers.__version__} predates Falcon's AttentionInterface path")
    model = hf_models.load_hf_causal_lm(build("falcon", tmp_path), device="cpu")
    an = OutlierAnalyzer(model, tau_act=TAU, seq_len=32)
    an.run_batch(tokens())
    att = an.result()["attention"]
    assert att["qkv"] == {"recorded_layers": list(range(L)), "missing": []}
    assert all(v is not None for v in att["value_norm"]["first"] + att["mean_logit_other_keys"])


def test_alibi_bias_gives_probabilities_only():
    """Falcon with ALiBi adds its position bias through the mask: q.k/sqrt(d) is not the logit the model
    used, so the logit statistics are withheld (with the reason) while the probabilities stay exact."""
    cfg = CONFIGS["falcon"]()
    cfg.alibi = True
    model = hf_models.HFCausalLM(transformers.AutoModelForCausalLM.from_config(cfg).eval(), "test")
    got, X = {}, tokens()
    with Probe(model, attention_fn=lambda l, rec, x: got.__setitem__(l, rec)):
        model(X)
    assert all(rec.get("qkv_missing") == hf_models.QKV_ADDITIVE_MASK and "q" not in rec for rec in got.values())
    model.hf.set_attn_implementation("eager")
    ref = reference_cumulative_attention(model.hf, X)
    for l in range(L):
        torch.testing.assert_close(got[l]["probs"].double().sum(-2), ref[l], rtol=1e-6, atol=1e-6)


def ignore_recorder(monkeypatch):
    """Simulates attention modules that never call the recording function: whatever hf_models registers
    under its name, transformers gets the module file's plain eager attention instead."""
    import sys
    register = transformers.AttentionInterface.register

    def plain_eager(module, *args, **kwargs):
        return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)

    def register_plain(key, fn):
        return register(key, plain_eager if key == hf_models.RECORD_ATTENTION else fn)
    monkeypatch.setattr(transformers.AttentionInterface, "register", register_plain)


@pytest.mark.parametrize("how", ["switched_off", "not_called"])
def test_probabilities_only_fallback(how, tmp_path, monkeypatch):
    """Forcing the interface off (record_qkv=False), or attention that does not call the recorder, leaves
    the probabilities-only path: probabilities exact, q/k/v statistics absent, and the reason reported."""
    model = hf_models.load_hf_causal_lm(build("llama", tmp_path), device="cpu")
    if how == "not_called":
        ignore_recorder(monkeypatch)
    X = tokens()
    an = OutlierAnalyzer(model, tau_act=TAU, seq_len=32, record_qkv=how != "switched_off")
    got = {}
    with Probe(model, record_qkv=how != "switched_off",
                             attention_fn=lambda l, rec, x: got.__setitem__(l, rec)):
        model(X)
    reason = hf_models.QKV_OFF if how == "switched_off" else hf_models.QKV_NOT_CALLED
    assert all(set(rec) == {"probs", "qkv_missing"} and rec["qkv_missing"] == reason for rec in got.values())
    model.hf.set_attn_implementation("eager")
    ref = reference_cumulative_attention(model.hf, X)
    model.hf.set_attn_implementation("sdpa")
    for l in range(L):
        torch.testing.assert_close(got[l]["probs"].double().sum(-2), ref[l], rtol=1e-6, atol=1e-6)
    an.run_batch(X)
    att = an.result()["attention"]
    assert att["qkv"] == {"recorded_layers": [], "missing": [{"reason": reason, "layers": list(range(L))}]}
    assert att["value_norm"]["first"] == [None] * L and att["qk_alignment"] == []
    assert model.hf.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("family, overrides, bias", [
    ("llama", {}, False), ("llama", {"mlp_bias": True}, True), ("qwen2", {}, True), ("gpt2", {}, True),
    ("opt", {}, True), ("opt", {"enable_bias": False}, False)])
def test_config_bias_is_whether_a_block_linear_has_one(family, overrides, bias):
    """outliers.json's model.bias: read from the model's own Linears (Conv1D included), not assumed."""
    cfg = CONFIGS[family]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = hf_models.HFCausalLM(transformers.AutoModelForCausalLM.from_config(cfg).eval(), "test")
    assert model.config.bias is bias


@pytest.mark.parametrize("family, overrides, parallel", [
    ("gpt_neox", {}, True), ("gpt_neox", {"use_parallel_residual": False}, False),
    ("falcon", {}, True), ("falcon", {"parallel_attn": False}, False),
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}, True),
    ("phi", {}, True), ("llama", {}, False), ("opt", {}, False)])
def test_parallel_residual_follows_the_config(family, overrides, parallel):
    cfg = CONFIGS[family]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = hf_models.HFCausalLM(transformers.AutoModelForCausalLM.from_config(cfg).eval(), "test")
    view = hf_models.model_view(model)
    assert view.parallel is parallel
    # the definition: in a parallel block the MLP reads the block input, so silencing the attention branch
    # leaves layer 0's MLP output unchanged; in a sequential block the MLP reads input + attention
    X = tokens()

    def mlp_output(silence_attention):
        got = []
        hooks = [view.mlp_branch[0].register_forward_hook(lambda m, a, o: got.append(o.clone()))]
        if silence_attention:
            hooks.append(view.attn_branch[0].register_forward_hook(lambda m, a, o: torch.zeros_like(o)))
        with torch.no_grad():
            model(X)
        for h in hooks:
            h.remove()
        return got[0]

    unchanged = torch.equal(mlp_output(False), mlp_output(True))
    assert unchanged is parallel


def reference_cumulative_attention(hf, X):
    out = hf(input_ids=X, output_attentions=True, use_cache=False)
    return [a.double().sum(-2) for a in out.attentions]  # (B, H, T) per layer


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_probabilities_match_transformers(family, tmp_path):
    model = hf_models.load_hf_causal_lm(build(family, tmp_path), device="cpu")
    got = {}
    X = tokens()
    before = model.hf.config._attn_implementation
    with Probe(model, attention_fn=lambda l, rec, x: got.__setitem__(l, rec["probs"].double().sum(-2))):
        model(X)
    assert model.hf.config._attn_implementation == before  # restored after the probe
    model.hf.set_attn_implementation("eager")
    ref = reference_cumulative_attention(model.hf, X)
    assert len(got) == L
    for l in range(L):
        torch.testing.assert_close(got[l], ref[l], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_q_k_v_give_the_models_attention(family, tmp_path):
    """The recorded post-RoPE q, k (GQA heads repeated, q scaled so that q.k/sqrt(d) is the logit) and v,
    recomputed here in float64 with the causal (and sliding-window) mask, give transformers' own
    probabilities and the attention output that reaches the output projection."""
    model = hf_models.load_hf_causal_lm(build(family, tmp_path), device="cpu")
    view = hf_models.model_view(model)
    before = model.hf.config._attn_implementation
    recs, branch_in = {}, {}
    out_proj = [b.self_attn.o_proj if family in POST_NORM else m for b, m in zip(view.blocks, view.attn_branch)]
    handles = [m.register_forward_pre_hook(lambda mod, args, l=l: branch_in.__setitem__(l, args[0].double()))
               for l, m in enumerate(out_proj)]
    X = tokens()
    with Probe(model, attention_fn=lambda l, rec, x: recs.__setitem__(l, rec)):
        model(X)
    for h in handles:
        h.remove()
    if not calls_attention_interface(model.hf, X):  # this transformers' attention bypasses the interface
        assert all(set(r) == {"probs", "qkv_missing"} for r in recs.values())
        return
    if softcapped(model.hf):  # Gemma 2: cap * tanh(q.k s / cap) is not q.k/sqrt(d); the reason is given
        assert all(r.get("qkv_missing") == hf_models.QKV_SOFTCAP and "q" not in r for r in recs.values())
        return
    T = X.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & (i - j < (getattr(model.hf.config, "sliding_window", None) or T))
    for l in range(L):
        q, k, v = (recs[l][n].double() for n in "qkv")
        assert q.shape == k.shape == (2, NH, T, view.model.config.head_dim)
        logits = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        torch.testing.assert_close(probs, recs[l]["probs"].double(), rtol=1e-5, atol=1e-6)
        out = probs @ v.repeat_interleave(NH // v.shape[1], dim=1)  # (B, H, T, hs)
        out = out.transpose(1, 2).reshape(2, T, -1)  # (B, T, H * hs)
        torch.testing.assert_close(out, branch_in[l], rtol=1e-5, atol=1e-5)
    assert model.hf.config._attn_implementation == before  # restored after the probe


# ----------------------------------------------------------------------------------------------
# compression: perplexity against an independent float64 computation

BLOCKS = {"llama": "model.layers.", "mistral": "model.layers.", "qwen2": "model.layers.", "qwen3": "model.layers.",
          "phi3": "model.layers.", "phi": "model.layers.", "opt": "model.decoder.layers.", "falcon": "transformer.h.",
          "gpt_neox": "gpt_neox.layers.", "gpt2": "transformer.h.", "gemma": "model.layers.", "gemma2": "model.layers.",
          "gemma3_text": "model.layers."}
T_EVAL = 16


def reference_ppl(path, family, ids, method):
    """float64 forward of the saved model with the blocks' 2-D projection weights AbsMax-quantized per
    tensor or 50% magnitude-pruned per tensor, written out here; non-overlapping windows of T_EVAL."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not (name.startswith(BLOCKS[family]) and name.endswith(".weight") and p.ndim == 2):
                continue
            w = p.data
            if method == "w8":
                s = w.abs().max() / 127.0
                p.data = torch.clamp(torch.round(w / s), -127, 127) * s
            elif method == "sparse50":
                flat = w.abs().flatten()
                k = int(round(0.5 * flat.numel()))
                p.data = w.flatten().index_fill(0, torch.argsort(flat)[:k], 0.0).view_as(w)
        nll, n = 0.0, 0
        for b in range(0, len(ids) - 1, T_EVAL):
            x = torch.as_tensor(ids[b:b + T_EVAL])[None]
            y = torch.as_tensor(ids[b + 1:b + T_EVAL + 1])[None]
            x = x[:, :y.shape[1]]
            logp = torch.log_softmax(hf(input_ids=x).logits, dim=-1)
            nll -= float(logp.gather(-1, y[..., None]).sum())
            n += y.numel()
    return math.exp(nll / n)


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_under_compression_matches_float64(family, tmp_path):
    path = build(family, tmp_path)
    ids = np.random.default_rng(1).integers(0, V, size=3 * T_EVAL + 1)
    base = hf_models.load_hf_causal_lm(path, device="cpu")
    for method, apply in (("fp", lambda m: None), ("w8", compression_methods.quantize_weights_),
                          ("sparse50", compression_methods.prune_magnitude_)):
        model = base if method == "fp" else copy.deepcopy(base)
        apply(model)
        got = evaluate_perplexity(model, ids, block_size=T_EVAL, progress=False).ppl
        ref = reference_ppl(path, family, ids, method)
        assert got == pytest.approx(ref, rel=1e-5), method
    assert compression_methods.head_is_tied(base) == bool(base.hf.config.tie_word_embeddings)


# ----------------------------------------------------------------------------------------------
# the two command lines on a save_pretrained directory (GPT-2 directories load into model.GPT)

def token_file(tmp_path, n=600):
    ids = np.random.default_rng(2).integers(8, V, size=n).astype(np.uint16)
    ids[::37] = PLANT_TOKEN
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    return str(path)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_command_lines(family, tmp_path):
    import analyze_outliers
    path, data = build(family, tmp_path), token_file(tmp_path)
    out = tmp_path / "outliers"
    assert analyze_outliers.main([f"--pretrained={path}", f"--data={data}", "--num_seqs=2", "--seq_len=32",
                                  f"--tau={TAU}", "--intervene=zero", f"--out={out}", "--no_progress"]) == 0
    doc = json.loads((out / "outliers.json").read_text())
    h = doc["activation"]["layer_output"]["outliers"]
    assert h and {o["channel"] for o in h} == {PLANT_CHANNEL}
    assert {o["token_id"] for o in h} == {PLANT_TOKEN}
    if family != "gpt2":  # no tokenizer saved: ids stand for themselves (GPT-2 goes through model.GPT and tiktoken)
        assert {o["token"] for o in h} == {f"<{PLANT_TOKEN}>"}
    down = doc["model"].get("down_proj", "mlp.c_proj")
    assert PLANT_UNIT in doc["weight"][down]["outlier_channels"][0]
    assert doc["intervention"]["targets"]["all"]["activations_changed"] > 0
    assert doc["intervention"]["targets"]["all"]["loss_change"] != 0
    assert (out / "report.md").is_file() and doc["figures"]
    out = tmp_path / "compress"
    assert compress_eval.main([f"--pretrained={path}", f"--data={data}", f"--calib_data={data}", "--block_size=32",
                               "--methods=fp,w8,sparse50,w8a8,wanda", f"--out={out}", "--no_progress"]) == 0
    row = json.loads((out / "results.json").read_text())[0]
    assert all(math.isfinite(v) for v in row["ppl"].values()) and len(row["ppl"]) == 5


@pytest.mark.slow
def test_forced_probabilities_only_is_reported_and_no_gpt2_tokenizer_is_loaded(tmp_path, monkeypatch, capsys):
    """--attention_capture eager: report.md and outliers.json say why the q/k/v statistics are missing. A
    non-GPT-2 model never loads the GPT-2 tokenizer (no misleading warning when it is unavailable)."""
    import analyze_outliers
    from runtime import tokenizer
    from runtime.cli import UserError

    def no_gpt2_bpe():
        raise UserError("cannot load the GPT-2 tokenizer (test)")
    monkeypatch.setattr(tokenizer, "get_tokenizer", no_gpt2_bpe)
    analyze_outliers.gpt2_token_info.cache_clear()
    path, data = build("llama", tmp_path), token_file(tmp_path)
    out = tmp_path / "eager"
    assert analyze_outliers.main([f"--pretrained={path}", f"--data={data}", "--num_seqs=1", "--seq_len=32",
                                  f"--tau={TAU}", "--attention_capture=eager", f"--out={out}", "--no_progress"]) == 0
    assert "token strings unavailable" not in capsys.readouterr().err
    doc = json.loads((out / "outliers.json").read_text())
    assert doc["attention"]["qkv"]["missing"] == [{"reason": hf_models.QKV_OFF, "layers": list(range(L))}]
    assert f"layers 0-{L - 1}: {hf_models.QKV_OFF}" in (out / "report.md").read_text()
    # this repo's GPT does use GPT-2 BPE: there the warning is right
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(CONFIGS["gpt2"]()).save_pretrained(gpt2)
    assert analyze_outliers.main([f"--pretrained={gpt2}", f"--data={data}", "--num_seqs=1", "--seq_len=32",
                                  f"--out={tmp_path / 'gpt'}", "--no_progress"]) == 0
    assert "token strings unavailable" in capsys.readouterr().err
    analyze_outliers.gpt2_token_info.cache_clear()


def save_word_tokenizer(path):
    """A word-level tokenizer of V words ('w0' ... ; PLANT_TOKEN is 'planted'), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = {f"w{i}": i for i in range(V)}
    words["planted"] = words.pop(f"w{PLANT_TOKEN}")
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)


@pytest.mark.slow
def test_text_goes_through_the_models_own_tokenizer_and_compare(tmp_path):
    import analyze_outliers
    llama, opt = build("llama", tmp_path), build("opt", tmp_path)
    save_word_tokenizer(llama)
    words = [f"w{i}" for i in np.random.default_rng(3).integers(8, V, size=40)]
    words[5] = words[17] = "planted"
    out = tmp_path / "text"
    assert analyze_outliers.main([f"--pretrained={llama}", "--text", " ".join(words), f"--tau={TAU}", f"--out={out}",
                                  "--no_progress"]) == 0
    doc = json.loads((out / "outliers.json").read_text())
    h = [o for o in doc["activation"]["layer_output"]["outliers"] if o["layer"] == 0]
    assert {(o["position"], o["token"]) for o in h} == {(5, "planted"), (17, "planted")}
    out = tmp_path / "compare"
    assert analyze_outliers.main(["--compare", llama, opt, f"--data={token_file(tmp_path)}", "--num_seqs=2",
                                  "--seq_len=32", f"--tau={TAU}", f"--out={out}", "--no_progress"]) == 0
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["model"]["family"] for r in runs] == ["llama", "opt"]
    assert all(max(t[0] for t in r["top3"]) > 100 for r in runs)  # the planted massive activation, in both


def test_mixture_of_experts_and_unknown_families_are_refused(tmp_path):
    from runtime.cli import UserError
    cfg = transformers.MixtralConfig(vocab_size=V, hidden_size=C, intermediate_size=FF, num_hidden_layers=1,
                                     num_attention_heads=NH, num_key_value_heads=2, num_local_experts=2)
    with pytest.raises(UserError, match="mixture-of-experts"):
        hf_models.family_of(cfg)
    with pytest.raises(UserError, match="not supported"):
        hf_models.family_of(transformers.BloomConfig(vocab_size=V, hidden_size=C, n_layer=1, n_head=NH))
    with pytest.raises(UserError, match="'gemma3_text' language model"):  # Gemma 3 with vision
        hf_models.family_of(transformers.Gemma3Config())


def test_compress_text_uses_the_models_tokenizer(tmp_path):
    from runtime.cli import UserError
    llama, qwen = build("llama", tmp_path), build("qwen2", tmp_path)
    save_word_tokenizer(llama)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{i}" for i in np.random.default_rng(4).integers(8, V, size=70)))
    out = tmp_path / "compress"
    assert compress_eval.main([f"--pretrained={llama}", f"--text_file={text}", "--block_size=32", "--methods=fp",
                               f"--out={out}", "--no_progress"]) == 0
    row = json.loads((out / "results.json").read_text())[0]
    assert row["eval"]["tokens"] == 69  # one id per word: the word-level tokenizer, not GPT-2 BPE
    with pytest.raises(UserError, match="tokenizer"):  # qwen2's directory has none
        compress_eval.main([f"--pretrained={llama}", f"--pretrained={qwen}", f"--text_file={text}", "--block_size=32",
                            "--methods=fp", f"--out={out}", "--no_progress"])


def test_which_names_load_into_model_gpt(tmp_path):
    llama, gpt2 = build("llama", tmp_path), build("gpt2", tmp_path)
    assert hf_models.is_gpt2("gpt2") and hf_models.is_gpt2("openai-community/gpt2-xl") and hf_models.is_gpt2(gpt2)
    assert hf_models.is_gpt2("gpt3")  # a bare unknown name: model.GPT lists the names it knows
    assert not hf_models.is_gpt2(llama) and not hf_models.is_gpt2("meta-llama/Llama-2-7b-hf")


def test_w8a8_uses_one_activation_scale_per_window_in_every_family(tmp_path):
    """OPT's MLP sees (B*T, C) inputs: the quantized input of fc1 must still lie on one grid per window,
    max|x| / 127 of that window (a per-token scale would put each token on its own grid)."""
    model = hf_models.load_hf_causal_lm(build("opt", tmp_path), device="cpu")
    handles = compression_methods.add_activation_quantization(model)
    seen = []
    fc1 = hf_models.model_view(model).up[0]
    handles.append(fc1.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().double())))
    X = tokens()
    with torch.no_grad():
        model(X)
    for h in handles:
        h.remove()
    x = seen[0].view(X.shape[0], -1, seen[0].shape[-1])
    for b in range(X.shape[0]):
        steps = x[b] / (x[b].abs().max() / 127.0)
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
        assert steps.abs().max() == pytest.approx(127.0)
