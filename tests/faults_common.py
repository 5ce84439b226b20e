"""What the fault scenarios share (tests/test_reliability.py runs them): the scenario registry, the tiny
training settings, and helpers that plant data, models and damaged files."""

import hashlib
import json
import os
import platform
import re
import shutil

import numpy as np
import pytest
import torch

import analyze_outliers
import compress_eval
import train
from conftest import REPO_ROOT
from model import GPT, GPTConfig
from runtime import token_data as data
from runtime.cli import cli_main
from training.checkpoint import load_checkpoint, model_args_from, save_checkpoint

FAULTS_MD = os.path.join(REPO_ROOT, "tests", "FAULTS.md")
VOCAB = 64
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", f"--vocab_size={VOCAB}",
        "--gradient_accumulation_steps=1", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--lr_decay_iters=100", "--eval_interval=2",
        "--outlier_interval=2", "--snapshot_interval=2", "--compile=False", "--device=cpu", "--dtype=float32",
        "--seed=7"]
SCENARIOS = {}
SLOW = set()  # scenarios that take more than a few seconds (marked slow: `make test-fast` leaves them out)
LOCK = "train.lock"
HOST = re.sub(r"[^A-Za-z0-9-]", "-", platform.node())  # as temporary file names spell the host


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def slow_scenario(fn):
    SLOW.add(fn.__name__)
    return scenario(fn)


# ------------------------------------------------------------------------------------------ helpers

def cli(main, argv, capsys):
    """(exit status, stderr) of `main` run as its script runs it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(main, [str(a) for a in argv])
    return e.value.code or 0, capsys.readouterr().err


def token_stream(n, seed):
    """A learnable stream over VOCAB - 3 ids: mostly t -> (7 t + 3) mod 61, sometimes random."""
    rng = np.random.default_rng(seed)
    ids = np.empty(n, dtype=np.int64)
    ids[0] = 1
    jump, rand = rng.random(n) < 0.1, rng.integers(0, 61, n)
    for i in range(1, n):
        ids[i] = rand[i] if jump[i] else (7 * ids[i - 1] + 3) % 61
    return ids


def make_data(d, val=None, meta=True, train_tokens=8000):
    """train.bin, val.bin and (meta=True) a meta.json with their SHA-256, as prepare_data.py writes it."""
    os.makedirs(d, exist_ok=True)
    data.write_tokens(os.path.join(d, "train.bin"), token_stream(train_tokens, 0))
    data.write_tokens(os.path.join(d, "val.bin"), token_stream(2000, 1) if val is None else val)
    if meta:
        hashes = {f"{s}_sha256": hashlib.sha256(open(os.path.join(d, f"{s}.bin"), "rb").read()).hexdigest()
                  for s in ("train", "val")}
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump({"vocab_size": VOCAB, "source": "synthetic", **hashes}, f)
    return str(d)


def run_copy(trained, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained["out"], out)
    return out, TINY + [f"--data_dir={trained['data']}", f"--out_dir={out}"]


def train_fresh(tmp_path, capsys, trained, *extra):
    """train.py with the tiny settings into a new out_dir (tmp_path/o), plus `extra` arguments."""
    return cli(train.main, TINY + [f"--data_dir={trained['data']}", f"--out_dir={tmp_path / 'o'}", *extra], capsys)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)).eval()


def save_model(path, model, **extra):
    save_checkpoint(path, {"model": model.state_dict(), "model_args": model_args_from(model.config), "iter_num": 3,
                           "config": {}, **extra})
    return str(path)


def flip_bytes_of(path, tensor, n=4096):
    """Damage (XOR 0xFF) `n` bytes of the stored data of `tensor` inside the file at `path`."""
    blob = bytearray(open(path, "rb").read())
    raw = tensor.detach().contiguous().numpy().tobytes()
    at = blob.find(raw)
    assert at > 0 and blob.find(raw, at + 1) < 0, "the tensor's bytes must be in the file exactly once"
    n = min(n, len(raw))
    blob[at:at + n] = bytes(b ^ 0xFF for b in blob[at:at + n])
    open(path, "wb").write(bytes(blob))


def eval_data(tmp_path):
    path = tmp_path / "val.bin"
    data.write_tokens(path, np.random.default_rng(0).integers(0, VOCAB, 400))
    return str(path)


def must_not_run(*args, **kwargs):
    raise AssertionError("the output location was not checked before the long work")


def tree_bytes(root):
    """{relative path: bytes} of every file below `root` (what must be byte-identical after a refusal)."""
    root = str(root)
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, files in os.walk(root) for n in files}


def no_temporaries(*dirs):
    return [os.path.join(d, n) for d in dirs if os.path.isdir(d) for n in os.listdir(d) if n.endswith((".tmp", ".old"))]


def analyze_args(ckpt, tmp_path, out):
    return [ckpt, "--data", eval_data(tmp_path), "--out", out, "--no_progress", "--num_seqs", "1", "--seq_len", "8",
            "--tau", "4"]


def edited_checkpoint(tmp_path, edit):
    """A tiny checkpoint (valid CRCs) whose contents `edit` changed in memory before saving."""
    model = tiny_model()
    ckpt = {"model": model.state_dict(), "model_args": model_args_from(model.config), "iter_num": 3, "config": {}}
    edit(ckpt)
    path = str(tmp_path / "ckpt.pt")
    torch.save(ckpt, path)
    return path


def refused_by_analyze(tmp_path, capsys, edit):
    ckpt = edited_checkpoint(tmp_path, edit)
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, tmp_path / "o"), capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"ckpt": ckpt}


def refused_by_compress(tmp_path, capsys, edit):
    ckpt = edited_checkpoint(tmp_path, edit)
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o",
                                         "--no_progress"], capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"ckpt": ckpt}


def resume_with(tmp_path, capsys, trained, edit):
    """Resume a copy of the trained run from a checkpoint that `edit` changed; the run's files must be
    byte-identical afterwards (nothing is written before the resume state is checked)."""
    out, args = run_copy(trained, tmp_path)
    ckpt_path = os.path.join(out, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path)
    edit(ckpt)
    save_checkpoint(ckpt_path, ckpt)
    before = tree_bytes(out)
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"ckpt": ckpt_path, "out": out}


def train_with_meta(tmp_path, capsys, trained, text):
    data_dir = tmp_path / "data"
    shutil.copytree(trained["data"], data_dir)
    (data_dir / "meta.json").write_text(text)
    code, err = cli(train.main, TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--max_iters=2"],
                    capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"meta": str(data_dir / "meta.json")}


def train_with_config(tmp_path, capsys, trained, content):
    """train.py with a config file holding `content` (bytes), then the tiny settings, into a new out_dir."""
    cfg = tmp_path / "config_file.py"
    cfg.write_bytes(content)
    code, err = cli(train.main, [cfg] + TINY + [f"--data_dir={trained['data']}", f"--out_dir={tmp_path / 'o'}"], capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"cfg": str(cfg)}
