"""benchmarks/gpu_check.py (`make gpu-check`): refuses without a GPU, and turns the benchmark
scripts' JSON into gpu-check.json rows and the RESULTS.md section. The numbers below are made up
for the test and never written to the repo."""

import importlib.util
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    spec = importlib.util.spec_from_file_location("_gpu_check", os.path.join(REPO, "benchmarks", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(capsys, tmp_path):
    out = tmp_path / "gpu-check.json"
    assert load().main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def fake_attention_doc():
    def row(variant, impl, T, ms, mem):
        return {"variant": variant, "impl": impl, "T": T, "D": 64, "status": "ok", "fwdbwd_ms": ms,
                "fwdbwd_tflops": 100.0 / ms, "peak_mib_fwdbwd": mem}
    return {"results": [row("default", "sdpa", 1024, 1.0, 100.0), row("default", "fused", 1024, 0.8, 110.0),
                        row("softmax1", "fused", 1024, 1.0, 120.0), row("softmax1", "unfused", 1024, 4.0, 400.0),
                        {"variant": "sigmoid", "impl": "fused", "T": 1024, "D": 64, "status": "OOM"}],
            "tile_configs": []}


def test_attention_rows_are_ratios_of_times_and_memory():
    rows = {r["variant"]: r for r in load().attention_rows([fake_attention_doc()])}
    assert set(rows) == {"default", "softmax1"}  # failed cases are left out
    assert rows["default"]["ratio_vs_sdpa"] == 1.25 and rows["default"]["ratio_vs_default"] == 1.0
    assert rows["softmax1"]["ratio_vs_sdpa"] == 1.0 and rows["softmax1"]["ratio_vs_default"] == 0.8
    assert rows["softmax1"]["ratio_vs_unfused"] == 4.0 and rows["softmax1"]["peak_mem_ratio_vs_sdpa"] == 1.2
    assert rows["default"]["ratio_vs_unfused"] is None


def test_results_md_section_is_regenerated(tmp_path):
    gc = load()
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Results\n\n{gc.BEGIN}\nold text\n{gc.END}\n\n## CPU\nkept\n")
    doc = {"metadata": {"gpu": "Test GPU", "date": "d", "git_commit": "c", "torch": "t", "triton": "tr",
                        "command": "python benchmarks/gpu_check.py"},
           "attention": gc.attention_rows([fake_attention_doc()]),
           "train": gc.train_rows([{"compile": True, "results": [
               {"variant": "default", "status": "ok", "tokens_per_s": 1234.5, "mfu": 0.5}]}]),
           "timings": {"analyze_outliers_100x1024_s": 1.0},
           "steps": {"gpu_tests": {"status": "ok"}, "train_compile": {"status": "failed"}}}
    gc.update_results_md(doc, str(md))
    text = md.read_text()
    assert "old text" not in text and text.endswith("## CPU\nkept\n") and text.count(gc.BEGIN) == 1
    assert "| default | 1024 | 64 | 125.0 | 1.25 | 1.0 | None | 1.1 |" in text
    assert "| default | True | 1,234 | 50.0% |" in text and "Steps that failed: train_compile" in text
