"""analyze_outliers.py end to end: outputs, outliers.json schema, compare mode, bad input, atomic output."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import analysis.report
import analyze_outliers
from analysis.report import draw_figures
from model import GPT, GPTConfig
from runtime.cli import cli_main
from runtime.token_data import write_tokens
from training.checkpoint import model_args_from, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
TIKTOKEN_CACHE = os.path.join(SHARED, "tiktoken_cache")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

from planted import CH, E0, K_UNIT, SPECIAL, planted_all_model, planted_model  # noqa: E402


def save(model, path):
    save_checkpoint(path, {"model": model.state_dict(), "model_args": model_args_from(model.config),
                           "iter_num": 7, "config": {}})
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("oa")
    ckpt = save(planted_model(), d / "planted.pt")
    torch.manual_seed(0)
    scaling = save(GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=4, n_head=2, n_embd=32, bias=True,
                                 attention="scaling")).eval(), d / "scaling.pt")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, SPECIAL, size=2000)
    ids[::16] = SPECIAL  # every window of 32 tokens holds the trigger token twice
    write_tokens(d / "val.bin", ids)
    return {"dir": d, "ckpt": ckpt, "scaling": scaling, "bin": str(d / "val.bin")}


def check_schema(doc, L, H):
    """The documented outliers.json format (docs/analysis.md)."""
    assert doc["format"] == "outlier-gpt/outliers" and doc["version"] == 1
    assert {"attention", "n_layer", "n_head", "n_embd"} <= set(doc["model"]) and doc["model"]["n_layer"] == L
    assert {"source", "num_seqs", "seq_len"} <= set(doc["data"])
    assert isinstance(doc["tau"], float)
    assert set(doc["tau_by_type"]) == {"activation", "weight", "attention", "channel"}
    for kind in ("layer_output", "down_input"):
        a = doc["activation"][kind]
        assert len(a["top3"]) == L and all(len(r) == 3 for r in a["top3"]) and len(a["median"]) == L
        assert all(r[0] >= r[1] >= r[2] >= 0 for r in a["top3"])
        assert isinstance(a["outliers_total"], int) and len(a["outliers"]) <= a["outliers_total"]
        for o in a["outliers"]:
            assert {"layer", "position", "token", "channel", "value"} <= set(o) and 0 <= o["layer"] < L
    for module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        w = doc["weight"][module]
        assert len(w["extremal_ratio"]) == L and len(w["outlier_channels"]) == L
        assert all(isinstance(ch, list) for ch in w["outlier_channels"])
    att = doc["attention"]
    assert len(att["top2"]) == L and all(len(r) == 2 for r in att["top2"]) and len(att["median"]) == L
    assert len(att["head_top1"]) == L and all(len(r) == H for r in att["head_top1"])
    for o in att["outlier_keys"]:
        assert {"layer", "head", "position", "token", "score"} <= set(o)
    assert set(doc["consistency"]) == {"wdown_vs_xdown", "wdown_vs_h", "h_vs_xdown", "h_vs_attention"}
    for v in doc["consistency"].values():
        for key in ("a_in_b", "b_in_a"):
            assert v[key] is None or 0.0 <= v[key] <= 1.0
    for e in doc["lifecycle"]:
        assert {"position", "channel", "generated_at", "trajectory", "attn_contrib", "mlp_contrib"} <= set(e)
        assert len(e["trajectory"]) == len(e["attn_contrib"]) == len(e["mlp_contrib"]) == L


def check_png(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def no_leftovers(parent, name):
    """Temporaries beside the output directory or inside it (a staging directory)."""
    inside = os.path.join(parent, name)
    return ([p for p in os.listdir(parent) if p.startswith(f".{name}.")]
            + ([p for p in os.listdir(inside) if p.endswith((".tmp", ".old"))] if os.path.isdir(inside) else []))


def test_end_to_end_planted_checkpoint(files, tmp_path):
    out = tmp_path / "report"
    rc = analyze_outliers.main([files["ckpt"], "--data", files["bin"], "--num_seqs", "5", "--tau", "20",
                                "--tau_attention", "8", "--intervene", "mean", "--out", str(out), "--no_progress"])
    assert rc == 0
    doc = json.loads((out / "outliers.json").read_text())
    check_schema(doc, L=4, H=2)
    assert doc["data"]["num_seqs"] == 5 and doc["data"]["seq_len"] == 32 and doc["model"]["iter_num"] == 7
    # the planted activation: channel CH from layer 1 on, generated in layer 1 by the MLP through unit K_UNIT
    h = doc["activation"]["layer_output"]
    assert h["count"][0] == 0 and all(c == 10 for c in h["count"][1:])
    assert {o["channel"] for o in h["outliers"]} == {CH}
    life = doc["lifecycle"]
    assert life and all(e["channel"] == CH and e["generated_at"] == [1] for e in life)
    assert life[0]["mlp_drivers"][0]["down_input_channel"] == K_UNIT
    iv = doc["intervention"]
    assert iv["mode"] == "mean" and iv["activations_changed"] == 10
    # setting massive activations to their mean keeps the loss (Sun et al.); zeroing them is tested in test_outlier_stats
    assert abs(iv["loss_change"]) < 0.05 and iv["loss"] == pytest.approx(iv["loss_intervened"] - iv["loss_change"])
    assert set(iv["targets"]) == {"generated", "propagated", "all"}
    assert iv["targets"]["generated"]["loss_change"] == iv["loss_change"]
    for v in iv["targets"].values():
        assert v["loss_intervened"] == pytest.approx(iv["loss"] + v["loss_change"])
    assert iv["gamma"]["count"] == sum(len(n["gamma_driven"]) for n in doc["normalization"])
    for name in doc["figures"].values():
        check_png(out / name)
    assert set(doc["figures"]) >= {"activation_layer_output", "activation_down_input", "surface", "weights",
                                   "attention", "attention_heads", "token_categories", "lifecycle"}
    report = (out / "report.md").read_text()
    for heading in ("## Activation outliers", "## Weight outliers", "## Attention outliers", "## Consistency",
                    "## Lifecycle", "## Normalization", "## Intervention"):
        assert heading in report
    for name in doc["figures"].values():
        assert f"]({name})" in report
    assert no_leftovers(tmp_path, "report") == []


# the figures of An et al. that the planted model of the defaults test shows
PAPER_FIGURES = {"outlier_channels", "down_proj_weights", "attention_outlier_share", "weight_link",
                 "lifecycle_cancellation"}
# drawn from what the forward captured (the 3-D magnitudes), which outliers.json does not hold; every other
# figure redraws from outliers.json alone
LIVE_FIGURES = {"surface"}


def same_image(a, b):
    import matplotlib.image as mpimg
    return np.array_equal(mpimg.imread(a), mpimg.imread(b))


def test_defaults_report_all_three_planted_outliers_and_json_figures(tmp_path):
    """No threshold flag: the massive activation, the W_down weight outlier and the layer-2 sink on token 0
    are all reported, with the rules and absolute thresholds; the figures redraw from outliers.json."""
    ckpt = save(planted_all_model(), tmp_path / "all.pt")
    write_tokens(tmp_path / "v.bin", np.random.default_rng(1).integers(0, 64, size=400))
    out = tmp_path / "o"
    assert analyze_outliers.main([ckpt, "--data", str(tmp_path / "v.bin"), "--num_seqs", "3", "--out", str(out),
                                  "--no_progress"]) == 0
    doc = json.loads((out / "outliers.json").read_text())
    check_schema(doc, L=3, H=2)
    assert doc["data"]["seq_len"] == 64 and doc["data"]["num_seqs"] == 3  # T = the block size (< 2,048)
    h = doc["activation"]["layer_output"]
    assert {(o["layer"], o["position"], o["channel"]) for o in h["outliers"]} == {(1, 0, CH), (2, 0, CH)}
    w = doc["weight"]["mlp.c_proj"]
    assert w["outlier_channels"][1] == [K_UNIT] and w["outlier_out_channels"][1] == [CH]
    att = doc["attention"]
    assert {(o["layer"], o["position"]) for o in att["mean_outlier_keys"]} == {(2, 0)}
    assert {(o["layer"], o["head"], o["position"]) for o in att["outlier_keys"]} == {(2, 0, 0), (2, 1, 0)}
    th = doc["thresholds"]
    assert th["attention"]["rule"] == "authors" and th["attention"]["effective"] == pytest.approx([6.4] * 3)
    # the ratio rule: 50 x the column mean, or rows / 2 = 32 in a 64-row W_down (a column cannot reach 50 there)
    assert th["weight"]["rule"] == "ratio" and th["weight"]["effective"]["mlp.c_proj"]["extremal_ratio"] == 32.0
    assert "extremal-ratio threshold per module (rows): attn.c_attn 50 (192), attn.c_proj 32 (64)" in \
        (out / "report.md").read_text()
    assert th["activation"]["tau"] == 1000.0
    assert th["activation"]["effective"]["layer_output"] == pytest.approx([1000 * m for m in h["mean_abs"]])
    assert "cannot fire at T = 64" in th["attention"]["paper_formula"]
    assert doc["consistency"]["h_vs_attention"]["layers"] == [1, 2]
    assert doc["weight_link"]["units"][0]["fc_top_input"] == E0
    # every figure drawn from the JSON alone is a real image, and redrawing it from the written file gives it again
    assert set(doc["figures"]) >= PAPER_FIGURES | LIVE_FIGURES
    json_figures = {k: f for k, f in doc["figures"].items() if k not in LIVE_FIGURES}
    redraw = tmp_path / "redraw"
    redraw.mkdir()
    assert draw_figures(str(redraw), doc) == json_figures
    for name in json_figures:
        check_png(out / doc["figures"][name])
        assert same_image(out / doc["figures"][name], redraw / doc["figures"][name]), name
    report = (out / "report.md").read_text()
    for name in doc["figures"].values():
        assert f"]({name})" in report
    assert "Appendix B.2" in report and "authors" in report


def test_compare_and_replace_existing_output(files, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    # Figure 12: a log.jsonl beside the first checkpoint (train.py's records), none beside the second
    run = tmp_path / "run_a"
    run.mkdir()
    ckpt_a = save(planted_model(), run / "ckpt.pt")
    records = [{"kind": "train", "iter": 0, "loss": 4.2}, {"kind": "outliers", "iter": 0, "outlier/max_top1_h": 1.0},
               {"kind": "train", "iter": 10, "loss": 3.1}, {"kind": "eval", "iter": 10, "train_loss": 3.0, "val_loss": 3.3}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tra')  # cut short
    rc = analyze_outliers.main(["--compare", ckpt_a, files["scaling"], "--data", files["bin"],
                                "--num_seqs", "2", "--tau", "20", "--out", str(out), "--no_progress"])
    assert rc == 0
    assert (out / "stale.txt").read_text() == "old"  # not written by the comparison: left alone
    doc = json.loads((out / "compare.json").read_text())
    assert [r["model"]["attention"] for r in doc["runs"]] == ["default", "scaling"]
    assert all(len(r["top3"]) == 4 for r in doc["runs"])
    assert doc["runs"][0]["loss_curve"] == {"iter": [0, 10], "loss": [4.2, 3.1], "eval_iter": [10], "val_loss": [3.3]}
    assert doc["runs"][1]["loss_curve"] is None
    check_png(out / "compare_top1.png")
    check_png(out / "compare_top3.png")
    check_png(out / doc["figures"]["loss"])
    redraw = tmp_path / "redraw"
    redraw.mkdir()
    analyze_outliers.fig_loss_curves(str(redraw), doc["runs"])
    assert same_image(out / "compare_loss.png", redraw / "compare_loss.png")
    assert "](compare_loss.png)" in (out / "report.md").read_text()
    assert "| checkpoint |" in (out / "report.md").read_text()
    assert no_leftovers(tmp_path, "cmp") == []
    # run again without the log: the comparison replaces its own set, and its loss figure goes with it
    (run / "log.jsonl").unlink()
    assert analyze_outliers.main(["--compare", ckpt_a, files["scaling"], "--data", files["bin"], "--num_seqs", "2",
                                  "--tau", "20", "--out", str(out), "--no_progress"]) == 0
    assert not (out / "compare_loss.png").exists() and (out / "stale.txt").read_text() == "old"
    assert "loss" not in json.loads((out / "compare.json").read_text())["figures"]
    assert no_leftovers(tmp_path, "cmp") == []


def test_pretrained_local_hf_directory(tmp_path):
    """--pretrained with a local Hugging Face GPT-2 directory (Conv1D layout, no network)."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16, bias=True, gelu_approximate="tanh"))
    conv = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
    sd = {k[len("transformer."):]: (v.t() if k.endswith(conv) else v).contiguous()
          for k, v in m.state_dict().items() if k.startswith("transformer.")}
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(sd, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 16,
                                                "n_positions": 32, "vocab_size": 64, "activation_function": "gelu_new"}))
    ids = np.random.default_rng(0).integers(0, 64, size=200)
    write_tokens(tmp_path / "v.bin", ids)
    out = tmp_path / "o"
    assert analyze_outliers.main(["--pretrained", str(hf), "--data", str(tmp_path / "v.bin"), "--num_seqs", "2",
                                  "--seq_len", "16", "--out", str(out), "--no_progress"]) == 0
    doc = json.loads((out / "outliers.json").read_text())
    check_schema(doc, L=2, H=2)
    assert doc["data"]["seq_len"] == 16 and doc["model"]["bias"] is True


@pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE), reason="needs ../shared/tiktoken_cache for the GPT-2 tokenizer")
def test_short_text_and_token_categories(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.abspath(TIKTOKEN_CACHE))
    torch.manual_seed(0)
    ckpt = save(GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=16)), tmp_path / "c.pt")
    out = tmp_path / "t"
    # the paper's Figure 10 input, shorter than the block size: one sequence of all 8 tokens (none dropped)
    assert analyze_outliers.main([ckpt, "--text", "Summer is warm. Winter is cold.", "--tau", "3",
                                  "--attention_share", "0.05", "--intervene", "zero", "--out", str(out), "--no_progress"]) == 0
    doc = json.loads((out / "outliers.json").read_text())
    assert doc["data"]["num_seqs"] == 1 and doc["data"]["seq_len"] == 8 and doc["data"]["tokens"] == 8
    assert doc["surface"]["tokens"] == ["Summer", " is", " warm", ".", " Winter", " is", " cold", "."]
    # at share 0.05 a key needs Ahat_j >= 0.4; near-uniform causal attention gives Ahat_0 ~ H_8 = 2.7, Ahat_1 ~ 1.7
    assert {o["position"] for o in doc["attention"]["outlier_keys"]} >= {0, 1}
    expected_cat = {0: "initial", 1: "weak_semantic", 3: "delimiter", 5: "weak_semantic", 7: "delimiter"}
    for o in doc["attention"]["outlier_keys"]:
        assert o["category"] == expected_cat.get(o["position"], "other"), o
    assert doc["attention"]["token_categories"]["weak_semantic"] > 0
    # the loss scores the 7 tokens that have a next token (the last one has none)
    assert math.isfinite(doc["intervention"]["loss"])


@pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE), reason="needs ../shared/tiktoken_cache for the GPT-2 tokenizer")
def test_text_file_samples_are_random_nonoverlapping_windows(tmp_path, monkeypatch):
    """Appendix B.2's randomly selected samples: seeded, non-overlapping, not simply the first windows."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.abspath(TIKTOKEN_CACHE))
    from runtime.tokenizer import get_tokenizer
    text = " ".join(f"w{i}" for i in range(600))
    (tmp_path / "t.txt").write_text(text)
    ids = get_tokenizer().encode_ordinary(text)
    args = analyze_outliers.parse_args(["c.pt", "--text_file", str(tmp_path / "t.txt"), "--num_seqs", "4", "--seq_len", "16"])
    seqs, info = analyze_outliers.load_sequences(args, 64)
    assert seqs.shape == (4, 17) and info["tokens"] == 64
    starts = []
    for row in seqs:
        (k,) = [k for k in range(0, len(ids) - 16, 16) if list(ids[k:k + 17]) == row.tolist()]
        starts.append(k)
    assert starts == sorted(set(starts)) and starts != [0, 16, 32, 48]
    assert np.array_equal(seqs, analyze_outliers.load_sequences(args, 64)[0])  # the seed fixes the draw


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(analyze_outliers.main, argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "seq_len", "empty_text", "empty_file", "no_data",
                                  "directory", "share"])
def test_bad_input_one_line_exit_2_no_output(case, files, tmp_path, capsys):
    out = tmp_path / "never"
    bad = tmp_path / "bad.pt"
    bad.write_text("this is not a checkpoint\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    argv = {
        "missing": [str(tmp_path / "nope.pt"), "--data", files["bin"]],
        "not_a_checkpoint": [str(bad), "--data", files["bin"]],
        "seq_len": [files["ckpt"], "--data", files["bin"], "--seq_len", "33"],
        "empty_text": [files["ckpt"], "--text", "   "],
        "empty_file": [files["ckpt"], "--text_file", str(empty)],
        "no_data": [files["ckpt"]],
        "directory": [str(tmp_path), "--data", files["bin"]],
        "share": [files["ckpt"], "--data", files["bin"], "--attention_share", "1.5"],
    }[case] + ["--out", str(out), "--no_progress"]
    code, err = run_cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    expected = {"missing": "does not exist", "not_a_checkpoint": "checkpoint", "seq_len": "block size",
                "empty_text": "empty", "empty_file": "empty", "no_data": "no data", "directory": "directory",
                "share": "at most 1"}[case]
    assert expected in lines[0]
    assert not out.exists() and no_leftovers(tmp_path, "never") == []


@pytest.mark.slow
def test_failure_midway_leaves_no_partial_output(files, tmp_path, monkeypatch):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "previous.md").write_text("previous result")

    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(analysis.report, "write_report", broken)
    with pytest.raises(RuntimeError):
        analyze_outliers.main([files["ckpt"], "--data", files["bin"], "--num_seqs", "1", "--out", str(out), "--no_progress"])
    assert os.listdir(out) == ["previous.md"]  # the old output is untouched
    assert no_leftovers(tmp_path, "keep") == []


@pytest.mark.slow
def test_cli_subprocess_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "analyze_outliers.py"), str(tmp_path / "missing.pt"),
                        "--text", "hi there", "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'missing.pt'} does not exist"]
    assert not (tmp_path / "o").exists()
