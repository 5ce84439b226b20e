"""benchmarks/compress_cost.py on a tiny checkpoint: the one-line JSON, its ratios, and the same perplexities
as compress_eval.py."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import shared_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = ["-m", "benchmarks.compress_cost"]  # run from the repo root


@pytest.mark.slow
def test_tiny_run_prints_one_json_line_with_its_ratios(tmp_path):
    import compress_eval
    from planted import save_tiny, tiny_model
    text, calib = tmp_path / "test.txt", tmp_path / "valid.txt"
    for name, path in (("test.txt", text), ("valid.txt", calib)):  # a few kB of each split: quick to tokenize
        with open(shared_path("data", "wikitext-2", name), encoding="utf-8") as f:
            path.write_text(f.read(6000), encoding="utf-8")
    text, calib = str(text), str(calib)
    ckpt = save_tiny(tmp_path / "g.pt", tiny_model(vocab=50304))
    common = ["--text_file", text, "--calib_text_file", calib, "--max_tokens", "300", "--block_size", "32",
              "--calib_windows", "2"]
    proc = subprocess.run([sys.executable, *MODULE, ckpt, *common, "--methods", "w8a8+fp1,wanda", "--rounds", "2",
                           "--threads", "1", "--out", str(tmp_path / "cost.json")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and json.loads((tmp_path / "cost.json").read_text()) == json.loads(lines[0])
    doc = json.loads(lines[0])
    rows = doc["methods"]
    assert [r["method"] for r in rows] == ["fp", "w8a8+fp1", "wanda"] and doc["torch_threads"] == 1
    for r in rows:
        assert r["eval_vs_fp"] == pytest.approx(r["eval_s"] / rows[0]["eval_s"])
        assert r["eval_cpu_vs_fp"] == pytest.approx(r["eval_cpu_s"] / rows[0]["eval_cpu_s"])
        assert r["compress_vs_pass"] == pytest.approx(r["compress_s"] / doc["pass_s"])
    assert compress_eval.main([ckpt, *common, "--methods", "fp,w8a8+fp1,wanda", "--out", str(tmp_path / "o"),
                               "--no_progress"]) == 0
    table = json.loads((tmp_path / "o" / "results.json").read_text())[0]["ppl"]
    for r in rows:
        assert math.isclose(r["ppl"], table[r["method"]], rel_tol=1e-6), r["method"]
