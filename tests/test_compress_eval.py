"""compress_eval.py and compress/perplexity.py: quantization / pruning against explicit float64 references,
perplexity against a per-token float64 loop, and the command line's outputs and errors."""

import copy
import csv
import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import compress_eval as ce
from compress import methods as cm
from compress.perplexity import evaluate_perplexity, make_windows
from planted import BLOCK, VOCAB, save_tiny, tiny_model
from runtime.cli import UserError, cli_main
from runtime.token_data import write_tokens
from training.checkpoint import model_from_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")


def random_tokens(n, vocab=VOCAB, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.int64)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------------------------
# W8 on a model (the quantizer itself: tests/test_compression_methods.py)

def test_bad_granularity_is_refused():
    for bad in ("row", "group:0", "group:x", "group"):
        with pytest.raises(UserError, match="granularity"):
            cm.QuantSpec(8, bad)


def test_w8_on_a_model_touches_exactly_the_block_linears():
    model = tiny_model("scaling")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = cm.quantize_weights_(model, cm.QuantSpec(8, "tensor"))
    assert any(n.endswith("scale_proj") for n in names) and len(names) == 2 * 5  # c_attn, c_proj, c_fc, c_proj, scale_proj
    for key, value in model.state_dict().items():
        changed = not torch.equal(value, before[key])
        is_target = key.startswith("transformer.h.") and key.endswith(".weight") and any(
            key.startswith(n + ".") for n in names)
        assert changed == is_target, key
        if is_target:
            scale = before[key].abs().max() / 127
            assert torch.allclose(value / scale, torch.round(value / scale), atol=1e-3), key


# ----------------------------------------------------------------------------------------------
# pruning

def tied_weights(seed=0):
    # integer magnitudes: many ties, some weights already zero
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (16, 32), generator=g).float()


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_magnitude_pruning_exact_count_with_ties(sparsity):
    w = tied_weights()
    k = round(sparsity * w.numel())
    assert int((w == 0).sum()) < k
    mask = cm.smallest_k_mask(w.abs(), k)
    pruned = w.masked_fill(mask, 0.0)
    assert int(mask.sum()) == k and int((pruned == 0).sum()) == k
    assert w.abs()[mask].max() <= w.abs()[~mask].min()  # the smallest magnitudes go


def test_prune_per_layer_and_global_on_a_model():
    model = tiny_model("scaling")
    with torch.no_grad():  # different scales per layer make global pruning differ from per-layer pruning
        for i, (_, lin) in enumerate(cm.block_linears(model)):
            lin.weight.mul_(1.0 + i)
    orig = {n: lin.weight.detach().clone() for n, lin in cm.block_linears(model)}
    embed = model.transformer.wte.weight.detach().clone()

    per_layer = copy.deepcopy(model)
    cm.prune_magnitude_(per_layer, 0.5, "layer")
    for n, lin in cm.block_linears(per_layer):
        assert int((lin.weight == 0).sum()) == round(0.5 * lin.weight.numel()), n
        removed = lin.weight == 0
        assert orig[n].abs()[removed].max() <= orig[n].abs()[~removed].min(), n
    assert torch.equal(per_layer.transformer.wte.weight, embed)

    glob = copy.deepcopy(model)
    cm.prune_magnitude_(glob, 0.5, "global")
    weights = [lin.weight for _, lin in cm.block_linears(glob)]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * total)
    fractions = [float((w == 0).float().mean()) for w in weights]
    assert max(fractions) - min(fractions) > 0.2  # global: small layers lose more than large ones
    removed = torch.cat([orig[n].abs()[lin.weight == 0] for n, lin in cm.block_linears(glob)])
    kept = torch.cat([orig[n].abs()[lin.weight != 0] for n, lin in cm.block_linears(glob)])
    assert removed.max() <= kept.min()


def test_wanda_mask_per_row():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 40, generator=g)
    norm = torch.rand(40, generator=g) + 0.1
    norm[5] = 1e4  # an input feature with huge activations is never pruned
    mask = cm.wanda_mask(w, norm, 0.5)
    assert torch.equal(mask.sum(1), torch.full((12,), 20))
    assert not mask[:, 5].any()
    score = (w.double().abs() * norm.double()).numpy()
    m = mask.numpy()
    for r in range(12):
        assert score[r][m[r]].max() <= score[r][~m[r]].min()


def test_wanda_on_a_model_uses_the_calibration_activations():
    model = tiny_model("default", gain=3.0)
    w0 = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    calib = torch.from_numpy(random_tokens(4 * BLOCK, seed=3)).view(4, BLOCK)
    cm.prune_wanda_(model, calib, 0.5, batch_size=3)
    for n, lin in cm.block_linears(model):
        per_row = (lin.weight == 0).sum(1)
        assert torch.equal(per_row, torch.full_like(per_row, lin.in_features // 2)), n
    # block 0's c_attn input, written out in float64: ln_1(wte(x) + wpe(pos))
    ref = tiny_model("default", gain=3.0).double()
    with torch.no_grad():
        x = ref.transformer.wte(calib) + ref.transformer.wpe(torch.arange(BLOCK))
        feats = ref.transformer.h[0].ln_1(x).reshape(-1, 32)
    norms = feats.pow(2).sum(0).sqrt()
    expected = cm.wanda_mask(w0.double(), norms, 0.5)
    got = model.transformer.h[0].attn.c_attn.weight == 0
    assert (expected != got).float().mean() < 0.01
    assert not torch.equal(expected, cm.wanda_mask(w0, torch.ones(32), 0.5))  # norms matter


# ----------------------------------------------------------------------------------------------
# perplexity

def test_windows_cover_every_prediction_once():
    assert make_windows(100, 32) == [(0, 32, 0), (32, 64, 0), (64, 96, 0), (96, 99, 0)]
    assert make_windows(50, 32, stride=8) == [(0, 32, 0), (8, 40, 24), (16, 48, 24), (24, 49, 24)]
    for n, T, s in [(100, 32, None), (100, 32, 8), (77, 16, 5), (33, 32, 1)]:
        scored = []
        for b, e, sf in make_windows(n, T, s):
            assert e - b <= T and sf >= 0
            scored += list(range(b + 1 + sf, e + 1))  # token ids predicted and scored
        assert scored == list(range(1, n))
    with pytest.raises(UserError, match="fewer than one window"):
        make_windows(32, 32)
    with pytest.raises(UserError, match="stride"):
        make_windows(100, 32, stride=33)


def test_drop_tail_windows_are_gptqs():
    # floor(100 / 32) = 3 windows of 32 tokens, each predicting its last 31 from its first 31
    assert make_windows(100, 32, drop_tail=True) == [(0, 31, 0), (32, 63, 0), (64, 95, 0)]
    assert make_windows(64, 32, drop_tail=True) == [(0, 31, 0), (32, 63, 0)]
    with pytest.raises(UserError, match="stride"):
        make_windows(100, 32, stride=8, drop_tail=True)
    with pytest.raises(UserError, match="fewer than one window"):
        make_windows(31, 32, drop_tail=True)


def test_drop_tail_perplexity_matches_gptqs_loop():
    """GPTQ's evaluation: for each full window, the mean NLL of predictions 1..T-1 inside it; ppl = exp of
    the mean over windows (all windows have T - 1 predictions). Written out in float64."""
    model = tiny_model(gain=4.0)
    tokens = random_tokens(150, seed=2)  # 4 windows of 32, 22 tokens dropped
    res = evaluate_perplexity(model, tokens, drop_tail=True, batch_size=3, progress=False)
    m64 = copy.deepcopy(model).double()
    nlls = []
    for k in range(len(tokens) // BLOCK):
        x = torch.from_numpy(tokens[k * BLOCK:(k + 1) * BLOCK])
        with torch.no_grad():
            logits, _ = m64(x[None], x[None])  # targets given: logits at every position
        logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
        nlls.append(-logp.gather(1, x[1:, None]).mean().item())
    assert res.n_tokens == 4 * (BLOCK - 1) and res.n_windows == 4
    assert res.ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def reference_ppl(model, tokens, T, stride):
    """Per predicted token, the context its window gives it, one float64 forward each."""
    m64 = copy.deepcopy(model).double()
    t = torch.from_numpy(tokens)
    nll = 0.0
    for i in range(1, len(tokens)):
        if stride is None:
            b = ((i - 1) // T) * T
        else:
            b = 0 if i <= T else math.ceil((i - T) / stride) * stride
        with torch.no_grad():
            logits, _ = m64(t[b:i][None])
        nll -= torch.log_softmax(logits[0, -1].double(), dim=-1)[tokens[i]].item()
    return math.exp(nll / (len(tokens) - 1))


@pytest.mark.parametrize("stride", [None, 8])
def test_perplexity_matches_a_float64_per_token_loop(stride):
    model = tiny_model(gain=4.0)
    tokens = random_tokens(150, seed=1)  # not a multiple of the window: a short last window
    res = evaluate_perplexity(model, tokens, stride=stride, batch_size=3, progress=False)
    assert res.n_tokens == 149
    ref = reference_ppl(model, tokens, BLOCK, stride)
    assert res.ppl == pytest.approx(ref, rel=1e-5)
    assert 1.5 < ref < VOCAB * 20  # a non-trivial distribution, not a constant


def test_planted_outlier_hurts_per_tensor_w8_far_more_than_per_channel():
    """One query channel of layer 0's c_attn (a column of GPT-2's Conv1D weight) scaled up 100x and the
    matching key channel scaled down 100x: the model computes exactly the same function, but per-tensor
    AbsMax now flattens every other channel of c_attn, while per-channel AbsMax confines the coarse grid
    to the two planted rows. Perplexity changes are measured against the fp model itself, on text it
    generated (so that its predictions are sharp and the comparison sensitive)."""
    clean = tiny_model(seed=0)
    with torch.no_grad():
        for _, lin in cm.block_linears(clean):
            lin.weight.mul_(6.0)              # larger blocks: the residual stream depends on them
        clean.transformer.ln_f.weight.mul_(10.0)  # sharper next-token distributions
    planted = copy.deepcopy(clean)
    with torch.no_grad():
        w = planted.transformer.h[0].attn.c_attn.weight  # rows: [q (32) | k (32) | v (32)]
        w[3] *= 100.0
        w[32 + 3] /= 100.0
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = planted.generate(torch.zeros(1, 1, dtype=torch.long), 256)[0].numpy()

    def change(model, granularity):
        fp = evaluate_perplexity(model, tokens, progress=False).nll
        q = copy.deepcopy(model)
        cm.quantize_weights_(q, cm.QuantSpec(8, granularity))
        return abs(evaluate_perplexity(q, tokens, progress=False).nll - fp)

    assert evaluate_perplexity(planted, tokens, progress=False).nll == pytest.approx(
        evaluate_perplexity(clean, tokens, progress=False).nll, rel=1e-5)  # same function
    tensor_hit, channel_hit = change(planted, "tensor"), change(planted, "channel")
    assert tensor_hit > 0.1                        # perplexity up by more than 10 %
    assert tensor_hit > 20 * channel_hit
    assert tensor_hit > 20 * change(clean, "tensor")  # without the outlier per-tensor W8 is harmless


# ----------------------------------------------------------------------------------------------
# command line

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ce")
    ckpts = [save_tiny(d / "a.pt", tiny_model("default", gain=3.0), 120),
             save_tiny(d / "b.pt", tiny_model("scaling", gain=3.0, seed=1), 240)]
    write_tokens(d / "val.bin", random_tokens(300, seed=4))
    write_tokens(d / "train.bin", random_tokens(2000, seed=5))
    hashes = [sha256(c) for c in ckpts]
    out = d / "out"
    ce.main(ckpts + ["--data", str(d / "val.bin"), "--out", str(out), "--no_progress",
                     "--methods", "fp,w8,sparse50,w8a8,wanda", "--calib_windows", "4"])
    return d, ckpts, hashes, out


def test_cli_writes_the_table_and_leaves_checkpoints_alone(tiny_run):
    d, ckpts, hashes, out = tiny_run
    assert [sha256(c) for c in ckpts] == hashes
    assert sorted(os.listdir(out)) == [".outlier-gpt-outputs.json", "results.csv", "results.json", "results.md"]
    manifest = json.loads((out / ".outlier-gpt-outputs.json").read_text())  # the files it may replace next time
    assert manifest["tools"]["compress_eval.py"]["files"] == ["results.csv", "results.json", "results.md"]
    rows = json.loads((out / "results.json").read_text())
    assert [r["attention"] for r in rows] == ["default", "scaling"] and [r["iter_num"] for r in rows] == [120, 240]
    assert all(r["dtype"] == "float32" and set(r["ppl"]) == {"fp", "w8", "sparse50", "w8a8", "wanda"} for r in rows)
    assert rows[0]["eval"]["tokens"] == 299 and rows[0]["checkpoint"] == ckpts[0]
    # the fp column is the plain evaluation of the checkpoint's model
    model, _ = model_from_checkpoint(ckpts[1])
    tokens = np.fromfile(d / "val.bin", dtype=np.uint16).astype(np.int64)
    assert rows[1]["ppl"]["fp"] == pytest.approx(evaluate_perplexity(model, tokens, progress=False).ppl, rel=1e-6)
    assert len({rows[0]["ppl"][m] for m in rows[0]["ppl"]}) == 5  # every method changed something
    md = (out / "results.md").read_text()
    header = md.splitlines()[0]
    assert header.startswith("| Model | PPL (FP32) | PPL (AbsMax W8) | PPL (50% Sparse) | PPL (AbsMax W8A8) | PPL (Wanda 50%) |")
    assert "default @ iter 120" in md and "scaling @ iter 240" in md
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[0]["ppl_w8"]) == pytest.approx(rows[0]["ppl"]["w8"])


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(ce.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    return exc.value.code, err


@pytest.mark.parametrize("case", ["no_ckpt", "method", "short", "max_tokens", "vocab", "granularity", "calib"])
def test_bad_input_is_one_line_exit_2_and_no_output(tiny_run, tmp_path, capsys, case):
    d, ckpts, _, _ = tiny_run
    out = tmp_path / "never"
    data = ["--data", str(d / "val.bin"), "--out", str(out), "--no_progress"]
    if case == "no_ckpt":
        argv, msg = data, "no checkpoints"
    elif case == "method":
        argv, msg = [ckpts[0], "--methods", "fp,w4"] + data, "unknown method 'w4'"
    elif case == "short":
        write_tokens(tmp_path / "short.bin", random_tokens(BLOCK))
        argv, msg = [ckpts[0], "--data", str(tmp_path / "short.bin"), "--out", str(out)], "fewer than one window"
    elif case == "max_tokens":  # the text is long enough; --max_tokens cuts it below the default window
        argv, msg = [ckpts[0], "--max_tokens", str(BLOCK)] + data, (
            f"has {BLOCK} tokens (cut by --max_tokens {BLOCK}), fewer than one window of {BLOCK} (the default window")
    elif case == "vocab":
        other = save_tiny(tmp_path / "c.pt", tiny_model(vocab=128))
        argv, msg = [ckpts[0], other] + data, "different vocabularies"
    elif case == "granularity":
        argv, msg = [ckpts[0], "--w8_granularity", "row"] + data, "w8_granularity"
    else:
        (tmp_path / "eval.bin").write_bytes((d / "val.bin").read_bytes())  # no train.bin beside it
        argv, msg = [ckpts[0], "--methods", "fp,wanda", "--data", str(tmp_path / "eval.bin"), "--out", str(out)], "calibration"
    code, err = run_cli(argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert not out.exists()


def test_offline_wikitext_says_what_to_do(tiny_run, tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    code, err = run_cli([tiny_run[1][0], "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err) == 1 and "--text_file" in err[0] and "--data" in err[0]
    assert not (tmp_path / "o").exists()


def test_wikitext2_text_joins_lines_of_the_one_loader(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from compress import perplexity
    calls = []

    def fake(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        return {"text": [" = T = \n", " x\n"]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert perplexity.wikitext2_text("test") == " = T = \n\n\n x\n"
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]


@pytest.mark.slow
def test_script_entry_point(tiny_run, tmp_path):
    d, ckpts, _, _ = tiny_run
    ok = subprocess.run([sys.executable, "compress_eval.py", ckpts[0], "--data", str(d / "val.bin"),
                         "--methods", "fp,w8", "--w8_granularity", "channel", "--out", str(tmp_path / "o")],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "| Model | PPL (FP32) | PPL (AbsMax W8, per-channel) |" in ok.stdout
    bad = subprocess.run([sys.executable, "compress_eval.py", "--data", str(d / "val.bin")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [bad.stderr.strip()]


def test_cli_new_columns_settings_and_summary(tiny_run, tmp_path):
    """Every column of the issue on one table: +fpK columns, --fp_tokens, static calibration from train.bin,
    --drop_tail; results.json records each column's settings, results.md says them, --summary adds two lines."""
    d, ckpts, _, _ = tiny_run
    outliers = tmp_path / "outliers.json"
    outliers.write_text(json.dumps({"tau": 1000, "activation": {"layer_output": {
        "top3": [[5.0, 4.0, 3.0], [900.0, 5.0, 4.0]], "ratio_top1_median": [3.0, 1500.0], "outliers_total": 2,
        "outliers": [{"layer": 1, "seq": 0, "position": 0, "token": "<s>", "token_id": 1, "channel": 7,
                      "value": 900.0, "ratio": 1500.0},
                     {"layer": 1, "seq": 1, "position": 0, "token": "<s>", "token_id": 1, "channel": 7,
                      "value": -850.0, "ratio": 1400.0}]}}}))
    out = tmp_path / "o"
    argv = [ckpts[0], "--data", str(d / "val.bin"), "--out", str(out), "--no_progress", "--fp_tokens", "2",
            "--methods", "fp,w8a8+fp0,w8a8+fp1,w8a8,w8a8_static,w8a8_token+fp0,w4g16,kv4", "--calib_windows", "3",
            "--drop_tail", "--summary", str(outliers)]
    assert ce.main(argv) == 0
    row = json.loads((out / "results.json").read_text())[0]
    names = ["fp", "w8a8+fp0", "w8a8+fp1", "w8a8", "w8a8_static", "w8a8_token+fp0", "w4g16", "kv4"]
    assert list(row["ppl"]) == names and all(math.isfinite(v) for v in row["ppl"].values())
    assert row["eval"]["drop_tail"] and row["eval"]["tokens"] == (300 // BLOCK) * (BLOCK - 1)
    m = row["settings"]["methods"]
    assert [m[n].get("fp_tokens") for n in names] == [None, 0, 1, 2, 2, 0, None, 2]
    tok = m["w8a8_token+fp0"]
    assert tok["weights"]["granularity"] == "channel" and tok["activations"]["granularity"] == "token"
    assert m["w4g16"]["weights"] == {"bits": 4, "granularity": "group:16", "symmetric": False,
                                     "rounding": "nearest, ties to even", "lm_head": False}
    assert m["w8a8_static"]["activations"]["range"].startswith("static") and row["settings"]["calib_windows"] == 3
    assert row["settings"]["calibration"].endswith("train.bin")
    assert set(row["compress_seconds"]) == set(row["eval_seconds"]) == set(names)
    md = (out / "results.md").read_text()
    assert "| PPL (AbsMax W8A8, +fp1) |" in md and "| Δ W4 g16 |" in md and "GPTQ's protocol" in md
    assert "- `w8a8+fp1`: weights symmetric AbsMax 8-bit per tensor; input of every block Linear" in md
    assert "positions 0-1 of every window in full precision" in md
    summary = md.strip().splitlines()[-3:]
    assert summary[0] == ("Massive activation: |h| up to 900 (1,500x the layer median) in channel 7, layers 1-1, at "
                          "position 0 (the largest on token '<s>'); 2 activations above tau = 1000 x mean |h|.")
    p = row["ppl"]
    def pc(n):
        return f"{p[n]:.2f} ({(p[n] / p['fp'] - 1) * 100:+.1f}%)"
    assert summary[2] == (f"W8A8 per tensor: PPL {p['fp']:.2f} -> {pc('w8a8+fp0')}; with position 0 in full "
                          f"precision (w8a8+fp1): {pc('w8a8+fp1')}; per-token scales (w8a8_token+fp0): "
                          f"{pc('w8a8_token+fp0')}.")


@pytest.mark.parametrize("case", ["plus_fp", "fp_tokens", "static_calib", "drop_tail_stride", "summary", "percentile"])
def test_new_flags_refuse_bad_input(tiny_run, tmp_path, capsys, case):
    d, ckpts, _, _ = tiny_run
    out = tmp_path / "never"
    data = [ckpts[0], "--data", str(d / "val.bin"), "--out", str(out), "--no_progress"]
    argv, msg = {
        "plus_fp": (data + ["--methods", "fp,w8+fp1"], "quantizes no activations"),
        "fp_tokens": (data + ["--methods", "w8a8", "--fp_tokens", str(BLOCK)], "leave nothing"),
        "drop_tail_stride": (data + ["--drop_tail", "--stride", "8"], "--drop_tail"),
        "summary": (data + ["--summary", str(d / "val.bin")], "outliers.json"),
        "percentile": (data + ["--act_percentile", "0"], "--act_percentile"),
    }.get(case, (None, None))
    if case == "static_calib":
        (tmp_path / "eval.bin").write_bytes((d / "val.bin").read_bytes())  # no train.bin beside it
        argv, msg = ([ckpts[0], "--methods", "fp,w8a8_static", "--data", str(tmp_path / "eval.bin"), "--out", str(out)],
                     "w8a8_static needs calibration data")
    code, err = run_cli(argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert not out.exists()


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared (WikiText-2 text) is not available")
def test_wikitext_text_file_with_gpt2_vocabulary(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
    ckpt = save_tiny(tmp_path / "g.pt", tiny_model(vocab=50304))
    ce.main([ckpt, "--text_file", os.path.join(SHARED, "data", "wikitext-2", "test.txt"), "--max_tokens", "600",
             "--methods", "fp", "--stride", "16", "--out", str(tmp_path / "o"), "--no_progress"])
    row = json.loads((tmp_path / "o" / "results.json").read_text())[0]
    assert row["eval"]["tokens"] == 599 and row["eval"]["stride"] == 16
    assert 1000 < row["ppl"]["fp"] < 2 * 50304  # near-uniform random model
