"""analyze_outliers.py end to end: outputs, outliers.json schema, compare mode, bad input, atomic output."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import analyze_outliers
from checkpoint import model_args_from, save_checkpoint
from common import cli_main
from data import write_tokens
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared")
TIKTOKEN_CACHE = os.path.join(SHARED, "tiktoken_cache")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_outlier_stats import CH, K_UNIT, SPECIAL, planted_model  # noqa: E402


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
    """The documented outliers.json format (README)."""
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
    return [p for p in os.listdir(parent) if p.startswith(f".{name}.")]


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
    assert life and all(e["channel"] == CH and e["generated_at"] == 1 for e in life)
    assert life[0]["mlp_drivers"][0]["down_input_channel"] == K_UNIT
    iv = doc["intervention"]
    assert iv["mode"] == "mean" and iv["activations_changed"] == 10
    # setting massive activations to their mean keeps the loss (Sun et al.); zeroing them is tested in test_outlier_stats
    assert abs(iv["loss_change"]) < 0.05 and iv["loss"] == pytest.approx(iv["loss_intervened"] - iv["loss_change"])
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


def test_compare_and_replace_existing_output(files, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    rc = analyze_outliers.main(["--compare", files["ckpt"], files["scaling"], "--data", files["bin"],
                                "--num_seqs", "2", "--tau", "20", "--out", str(out), "--no_progress"])
    assert rc == 0
    assert not (out / "stale.txt").exists()
    doc = json.loads((out / "compare.json").read_text())
    assert [r["model"]["attention"] for r in doc["runs"]] == ["default", "scaling"]
    assert all(len(r["top3"]) == 4 for r in doc["runs"])
    check_png(out / "compare_top1.png")
    check_png(out / "compare_top3.png")
    assert "| checkpoint |" in (out / "report.md").read_text()
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
    # the text is shorter than the block size: one sequence of all its tokens
    assert analyze_outliers.main([ckpt, "--text", "Summer is warm. Winter is cold.", "--tau", "3", "--tau_attention", "1.5",
                                  "--out", str(out), "--no_progress"]) == 0
    doc = json.loads((out / "outliers.json").read_text())
    assert doc["data"]["num_seqs"] == 1 and doc["data"]["seq_len"] == 7  # 8 GPT-2 tokens
    assert doc["surface"]["tokens"][:3] == ["Summer", " is", " warm"]
    for o in doc["attention"]["outlier_keys"]:
        expected = {0: "initial", 3: "delimiter", 7: "delimiter"}.get(o["position"], "other")
        assert o["category"] == expected, o


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(analyze_outliers.main, argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "seq_len", "empty_text", "empty_file", "no_data",
                                  "directory"])
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
    }[case] + ["--out", str(out), "--no_progress"]
    code, err = run_cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    expected = {"missing": "does not exist", "not_a_checkpoint": "checkpoint", "seq_len": "block size",
                "empty_text": "empty", "empty_file": "empty", "no_data": "no data", "directory": "directory"}[case]
    assert expected in lines[0]
    assert not out.exists() and no_leftovers(tmp_path, "never") == []


def test_failure_midway_leaves_no_partial_output(files, tmp_path, monkeypatch):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "previous.md").write_text("previous result")

    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(analyze_outliers, "write_report", broken)
    with pytest.raises(RuntimeError):
        analyze_outliers.main([files["ckpt"], "--data", files["bin"], "--num_seqs", "1", "--out", str(out), "--no_progress"])
    assert os.listdir(out) == ["previous.md"]  # the old output is untouched
    assert no_leftovers(tmp_path, "keep") == []


def test_cli_subprocess_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "analyze_outliers.py"), str(tmp_path / "missing.pt"),
                        "--text", "hi there", "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'missing.pt'} does not exist"]
    assert not (tmp_path / "o").exists()
