"""Golden outputs that a behaviour-preserving change must leave as they are: the analysis' report.md and
outliers.json of a fixed planted checkpoint, a training run's checkpoint keys and log / run records, and every
command line's --help.

The fixture is built from seeds (no binary in the repo); what varies between runs (dates, timings, commit,
temporary paths) is masked, and numbers in outliers.json are compared to 6 significant digits. After an
intended change, regenerate with `UPDATE_GOLDEN=1 pytest tests/test_golden.py` and review the diff.
"""

import importlib
import importlib.util
import json
import os
import re
import sys

import numpy as np
import pytest

import analyze_outliers
import outlier_stats
import train
from checkpoint import load_checkpoint, model_args_from, save_checkpoint
from conftest import REPO_ROOT
from data import write_tokens

GOLDEN = os.path.join(REPO_ROOT, "tests", "golden")
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_outlier_stats import SPECIAL, planted_all_model  # noqa: E402


def golden(name, text):
    """Compare `text` with tests/golden/NAME (or write it there under UPDATE_GOLDEN=1)."""
    path = os.path.join(GOLDEN, name)
    if UPDATE:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    assert os.path.exists(path), f"{path} missing: run UPDATE_GOLDEN=1 pytest {__file__}"
    with open(path, encoding="utf-8") as f:
        expected = f.read()
    assert text == expected, f"{name} differs from the golden copy (UPDATE_GOLDEN=1 regenerates it after review)"


def rounded(x):
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------- the analysis

@pytest.fixture(scope="module")
def analysis(tmp_path_factory, monkeypatch_module):
    d = tmp_path_factory.mktemp("golden")
    model = planted_all_model()
    ckpt = str(d / "planted.pt")
    save_checkpoint(ckpt, {"model": model.state_dict(), "model_args": model_args_from(model.config), "iter_num": 7,
                           "config": {}})
    ids = np.random.default_rng(0).integers(0, SPECIAL, size=3000)
    write_tokens(d / "val.bin", ids)
    # token strings as ids: the golden copy must not depend on the tokenizer cache being present
    monkeypatch_module.setattr(analyze_outliers, "gpt2_token_info", lambda: outlier_stats.TokenInfo(None))
    out = d / "report"
    assert analyze_outliers.main([ckpt, "--data", str(d / "val.bin"), "--num_seqs", "4", "--tau", "20",
                                  "--intervene", "mean", "--out", str(out), "--no_progress"]) == 0
    return d, out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def masked(text, d):
    text = text.replace(str(d), "TMP")
    return re.sub(r"(?m)^Analysis [0-9.]+ s.*$", "Analysis (timing, command, date, commit, device masked)", text)


def test_report_md(analysis):
    d, out = analysis
    golden("analysis/report.md", masked((out / "report.md").read_text(encoding="utf-8"), d))


def test_outliers_json(analysis):
    d, out = analysis
    doc = json.loads((out / "outliers.json").read_text())
    doc.pop("meta")
    doc["timing"] = sorted(doc["timing"])  # which timings, not how long
    text = json.dumps(rounded(doc), indent=1, sort_keys=False).replace(str(d), "TMP")
    golden("analysis/outliers.json", text + "\n")


def test_output_file_names(analysis):
    _, out = analysis
    golden("analysis/files.txt", "\n".join(sorted(os.listdir(out))) + "\n")


# ---------------------------------------------------------------------------------------------- training records

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--vocab_size=64",
        "--gradient_accumulation_steps=1", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--lr_decay_iters=100", "--eval_interval=2", "--outlier_interval=2",
        "--snapshot_interval=2", "--compile=False", "--device=cpu", "--dtype=float32", "--seed=7", "--max_iters=4"]


def shape_of(x):
    """The structure of a JSON value: keys and types, not values."""
    if isinstance(x, dict):
        return {k: shape_of(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shape_of(x[0])] if x else []
    return type(x).__name__


def test_training_records(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    write_tokens(data_dir / "train.bin", rng.integers(0, 61, 4000))
    write_tokens(data_dir / "val.bin", rng.integers(0, 61, 1000))
    (data_dir / "meta.json").write_text(json.dumps({"vocab_size": 64}))
    out = tmp_path / "run"
    assert train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}"]) == 0
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    with open(out / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    run = json.loads((out / "run.json").read_text())
    doc = {"files": sorted(os.listdir(out)),
           "checkpoint_keys": sorted(ckpt),
           "snapshot_keys": sorted(load_checkpoint(str(out / "ckpt_2.pt"))),
           "config_keys": sorted(ckpt["config"]),
           "log": [[r["kind"], r["iter"], sorted(r)] for r in records],
           # the launch records carry run_metadata, whose values depend on the machine (a CUDA build's version)
           "run_json": shape_of({k: v for k, v in run.items() if k not in ("config", "data", "launches")}),
           "launch_keys": sorted(run["launches"][0]),
           "run_config_keys": sorted(run["config"])}
    golden("training/records.json", json.dumps(doc, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- command lines

def _main_of(path):
    if "/" not in path:  # the top-level scripts import by name
        return importlib.import_module(path[:-3]).main
    name = "golden_" + os.path.splitext(os.path.basename(path))[0]
    if os.path.dirname(path) not in sys.path:
        sys.path.insert(0, os.path.join(REPO_ROOT, os.path.dirname(path)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


CLIS = ["train.py", "analyze_outliers.py", "compress_eval.py", "prepare_data.py", "reproduce.py",
        "benchmarks/attention.py", "benchmarks/train_throughput.py", "benchmarks/gpu_check.py",
        "benchmarks/kernel_registers.py", "benchmarks/host_overhead.py", "benchmarks/compress_cost.py"]


@pytest.mark.parametrize("script", CLIS)
def test_help(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(sys, "argv", [os.path.basename(script)])
    try:
        code = _main_of(script)(["--help"])
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    golden(f"help/{script.replace('/', '__')}.txt", capsys.readouterr().out)
