"""Fault scenarios of tests/FAULTS.md: checkpoints, training, the other scripts, file modes."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import analyze_outliers
import compress_eval
import prepare_data
import train
from conftest import REPO_ROOT, needs_tokenizer, run_torchrun
from faults_common import (HOST, LOCK, TINY, VOCAB, cli, eval_data, flip_bytes_of, make_data, must_not_run,
                           no_temporaries, run_copy, save_model, scenario, slow_scenario, tiny_model, token_stream,
                           train_fresh, tree_bytes)
from runtime import files, outputs
from runtime import token_data as data
from training.checkpoint import load_checkpoint, model_args_from

# ------------------------------------------------------------------------------------------ checkpoints

@scenario
def ckpt_crc_weights(tmp_path, capsys, **_):
    model = tiny_model()
    ckpt = save_model(tmp_path / "ckpt.pt", model)
    flip_bytes_of(ckpt, model.transformer.wte.weight)
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o", "--no_progress"],
                    capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"ckpt": ckpt}


@scenario
def ckpt_crc_optimizer(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    ckpt = os.path.join(out, "ckpt.pt")
    flip_bytes_of(ckpt, load_checkpoint(ckpt)["optimizer"]["state"][0]["exp_avg"])
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume"], capsys)
    return code, err, {"ckpt": ckpt}


def _nonfinite(tmp_path, name, value):
    model = tiny_model()
    with torch.no_grad():
        model.get_parameter(name)[0, 1] = value
    return save_model(tmp_path / "ckpt.pt", model)


@scenario
def ckpt_nonfinite_analyze(tmp_path, capsys, **_):
    ckpt = _nonfinite(tmp_path, "transformer.h.0.attn.c_attn.weight", float("nan"))
    code, err = cli(analyze_outliers.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o",
                                            "--no_progress"], capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"ckpt": ckpt}


@scenario
def ckpt_nonfinite_compress(tmp_path, capsys, **_):
    ckpt = _nonfinite(tmp_path, "transformer.h.1.mlp.c_fc.weight", float("inf"))
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o",
                                         "--no_progress"], capsys)
    return code, err, {"ckpt": ckpt}


class _System:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@scenario
def ckpt_unsafe_system(tmp_path, capsys, **_):
    model = tiny_model()
    ckpt = str(tmp_path / "evil.pt")
    torch.save({"model": model.state_dict(), "model_args": model_args_from(model.config), "iter_num": 0,
                "config": {"x": _System()}}, ckpt)
    code, err = cli(analyze_outliers.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o",
                                            "--no_progress"], capsys)
    return code, err, {"ckpt": ckpt}


# ------------------------------------------------------------------------------------------ training

@scenario
def train_lr_inf(tmp_path, capsys, trained, **_):
    code, err = train_fresh(tmp_path, capsys, trained, "--learning_rate=inf", "--max_iters=4")
    assert not (tmp_path / "o").exists()
    return code, err, {}


@scenario
def train_diverges(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    ckpt = os.path.join(out, "ckpt.pt")
    before = open(ckpt, "rb").read()
    code, err = cli(train.main, args + ["--max_iters=8", "--init_from=resume", "--learning_rate=1e30"], capsys)
    assert open(ckpt, "rb").read() == before  # the last good checkpoint is untouched
    assert not [n for n in os.listdir(out) if n in ("ckpt_6.pt", "ckpt_8.pt")]
    assert json.load(open(os.path.join(out, "run.json")))["launches"][-1]["status"] == "diverged"
    assert load_checkpoint(ckpt)["iter_num"] == 4  # and it still loads: resumable with a lower learning rate
    return code, err, {"ckpt": ckpt}


@slow_scenario
def train_diverges_ddp(tmp_path, trained, **_):
    out = str(tmp_path / "run")
    p = run_torchrun([*TINY, f"--data_dir={trained['data']}", f"--out_dir={out}", "--max_iters=6",
                      "--gradient_accumulation_steps=2", "--learning_rate=1e30", "--warmup_iters=0"],
                     env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    # torchrun reports its workers' exit codes (and prints its own traceback): every rank stops with 3
    codes = re.findall(r"^\s+exitcode\s*:\s*(-?\d+)", p.stderr, re.M)
    # every rank decides to stop at the same step; torchrun may SIGTERM (-15) a rank that is still
    # exiting once the first one has returned 3
    assert "3" in codes and set(codes) <= {"3", "-15"}, p.stderr[-3000:]
    assert json.load(open(os.path.join(out, "run.json")))["launches"][-1]["status"] == "diverged"
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))
    errors = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("error")]
    return 3, "\n".join(errors), {}


@scenario
def train_locked(tmp_path, capsys, trained, **_):
    import fcntl
    out, args = run_copy(trained, tmp_path)
    ckpt = os.path.join(out, "ckpt.pt")
    before = open(ckpt, "rb").read()
    with open(os.path.join(out, LOCK), "w") as holder:  # another training's lock: an flock and who holds it
        holder.write("host node7 pid 4242 since 2026-01-01T00:00:00+00:00\n")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume"], capsys)
    assert open(ckpt, "rb").read() == before
    return code, err, {"out": os.path.abspath(out), "host": "node7", "pid": 4242}


@scenario
def train_stale_lock(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    with open(os.path.join(out, LOCK), "w") as f:
        f.write("host elsewhere pid 999999 since 2020-01-01T00:00:00+00:00\n")  # nobody holds its flock
    code, err = cli(train.main, args + ["--max_iters=5", "--init_from=resume"], capsys)
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["iter_num"] == 5
    assert not os.path.exists(os.path.join(out, LOCK))  # released at the end
    return code, err, {}


@scenario
def train_out_under_file(tmp_path, capsys, trained, **_):
    (tmp_path / "file").write_text("a regular file\n")
    out = str(tmp_path / "file" / "run")
    code, err = cli(train.main, TINY + [f"--data_dir={trained['data']}", f"--out_dir={out}", "--max_iters=2"], capsys)
    return code, err, {"out": out}


DISK_FULL = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
import train
from runtime.cli import cli_main
cli_main(train.main, sys.argv[1:])
"""


@slow_scenario
def train_disk_full(tmp_path, trained, **_):
    out = str(tmp_path / "run")
    p = subprocess.run([sys.executable, "-c", DISK_FULL, *TINY, f"--data_dir={trained['data']}", f"--out_dir={out}",
                        "--max_iters=2", "--outlier_interval=0", "--snapshot_interval=0"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert not os.path.exists(os.path.join(out, "ckpt.pt")) and no_temporaries(out) == []
    assert json.load(open(os.path.join(out, "run.json")))["launches"][-1]["status"] == "failed"
    return p.returncode, p.stderr, {"out": out}


@scenario
def train_oov_meta(tmp_path, capsys, **_):
    val = token_stream(2000, 1)
    val[::50] = 100  # beyond vocab_size 64, which meta.json claims
    data_dir = make_data(tmp_path / "data", val=val)
    code, err = cli(train.main, TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--max_iters=2"],
                    capsys)
    return code, err, {"data": os.path.join(data_dir, "val.bin")}


@scenario
def train_resume_snapshot(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    ckpt = os.path.join(out, "ckpt.pt")
    shutil.copy(os.path.join(out, "ckpt_4.pt"), ckpt)
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume"], capsys)
    return code, err, {"ckpt": ckpt}


@scenario
def train_leftover_tmp(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    leftovers = [".run.json.k3j2h1.tmp", f".log.jsonl.{HOST}.999999.abc.tmp", ".ckpt.pt.x7y8z9.tmp"]
    for name in leftovers:  # what SIGKILL leaves in the middle of atomic writes (old and new naming)
        open(os.path.join(out, name), "w").write("partial")
    code, err = cli(train.main, args + ["--max_iters=5", "--init_from=resume"], capsys)
    assert no_temporaries(out) == []
    return code, err, {}


@scenario
def train_resume_telemetry(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)  # ckpt.pt was written at iter 4, after iter 4's telemetry record
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume"], capsys)
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["iter"] for r in records if r["kind"] == "outliers"] == [0, 2, 4, 6]
    assert [r["iter"] for r in records if r["kind"] == "eval"] == [0, 2, 4, 6]
    return code, err, {}


@scenario
def train_data_dir_missing(tmp_path, capsys, **_):
    missing = str(tmp_path / "shakespeare_here")
    code, err = cli(train.main, TINY + ["--dataset=shakespeare", f"--data_dir={missing}",
                                        f"--out_dir={tmp_path / 'o'}", "--max_iters=2"], capsys)
    assert not (tmp_path / "o").exists()  # the run's out_dir is not left behind empty
    return code, err, {"data": missing}


# ------------------------------------------------------------------------------------------ other scripts

@scenario
def prepare_out_under_file(tmp_path, capsys, monkeypatch, **_):
    needs_tokenizer()
    (tmp_path / "file").write_text("a regular file\n")
    src = tmp_path / "in.txt"
    src.write_text("some text\n" * 50)
    monkeypatch.setattr(prepare_data, "_load_splits", must_not_run)
    out = str(tmp_path / "file" / "data")
    code, err = cli(prepare_data.main, ["--dataset", "text", "--input", src, "--out_dir", out, "--num_proc", "1"],
                    capsys)
    return code, err, {"out": out}


@scenario
def prepare_disk_full(tmp_path, capsys, monkeypatch, **_):
    needs_tokenizer()
    src = tmp_path / "in.txt"
    src.write_text("".join(f"line {i} of some text\n" for i in range(2000)))
    out = tmp_path / "data"

    class Full:  # a disk that fills up after 1 KiB of a token file
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(prepare_data, "open", lambda p, mode="r", *a, **k: Full(open(p, mode, *a, **k))
                        if mode == "wb" else open(p, mode, *a, **k), raising=False)
    code, err = cli(prepare_data.main, ["--dataset", "text", "--input", src, "--out_dir", out, "--num_proc", "1",
                                        "--cache_dir", tmp_path / "hf"], capsys)
    assert not out.exists() or os.listdir(out) == []
    return code, err, {"out": str(out)}


@scenario
def prepare_non_utf8(tmp_path, capsys, **_):
    needs_tokenizer()
    good, bad = tmp_path / "good.txt", tmp_path / "latin1.txt"
    good.write_text("plain text\n" * 20)
    bad.write_bytes("café au lait\n".encode("latin-1"))
    out = tmp_path / "out"
    code, err = cli(prepare_data.main, ["--dataset", "text", "--input", good, bad, "--out_dir", out, "--num_proc",
                                        "1", "--cache_dir", tmp_path / "hf"], capsys)
    assert not out.exists()
    return code, err, {"file": str(bad)}


@scenario
def analyze_out_under_file(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    (tmp_path / "file").write_text("a regular file\n")
    monkeypatch.setattr(analyze_outliers, "model_and_info", must_not_run)
    out = tmp_path / "file" / "sub" / "report"
    code, err = cli(analyze_outliers.main, [ckpt, "--data", eval_data(tmp_path), "--out", out, "--no_progress"],
                    capsys)
    return code, err, {"out": str(out), "parent": str(out.parent)}


@scenario
def analyze_oov(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    ids = np.random.default_rng(0).integers(0, VOCAB, 400)
    ids[::7] = 100
    data.write_tokens(tmp_path / "oov.bin", ids)
    code, err = cli(analyze_outliers.main, [ckpt, "--data", tmp_path / "oov.bin", "--out", tmp_path / "o",
                                            "--no_progress", "--num_seqs", "2"], capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"data": str(tmp_path / "oov.bin")}


@slow_scenario
def analyze_write_fails(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "report"
    real_rename = os.rename

    def read_only(src, dst):  # moving a finished file into --out fails
        if os.path.dirname(os.path.abspath(dst)) == str(out):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        return real_rename(src, dst)
    monkeypatch.setattr(os, "rename", read_only)
    code, err = cli(analyze_outliers.main, [ckpt, "--data", eval_data(tmp_path), "--out", out, "--no_progress",
                                            "--num_seqs", "1", "--tau", "4"], capsys)
    assert not out.exists() and [n for n in os.listdir(tmp_path) if n.startswith(".report.")] == []
    return code, err, {"out": str(out)}


@slow_scenario
def analyze_leftover_dirs(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "report"
    out.mkdir()
    dead = out / f".analyze-outliers-py.{HOST}.999999.abcdefgh.tmp"
    live = out / f".analyze-outliers-py.{HOST}.{os.getpid()}.abcdefgh.tmp"  # a concurrent analysis: not ours
    for d in (dead, live):
        d.mkdir()
        (d / "report.md").write_text("partial")
    code, err = cli(analyze_outliers.main, [ckpt, "--data", eval_data(tmp_path), "--out", out,
                                            "--no_progress", "--num_seqs", "1", "--tau", "4"], capsys)
    assert not dead.exists() and live.exists() and (out / "report.md").exists()
    return code, err, {}


@scenario
def compress_out_under_file(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    (tmp_path / "file").write_text("a regular file\n")
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    out = str(tmp_path / "file" / "results")
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", out, "--no_progress"], capsys)
    return code, err, {"out": out}


@scenario
def compress_write_fails(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "results"
    argv = [ckpt, "--data", eval_data(tmp_path), "--out", out, "--no_progress", "--methods", "fp"]
    assert cli(compress_eval.main, argv, capsys)[0] == 0
    before = tree_bytes(out)
    real_rename = os.rename

    failed = []

    def full(src, dst):  # the last file of the new set cannot be moved in (once): the others must go back
        if os.path.abspath(dst) == str(out / "results.csv") and not failed:
            failed.append(dst)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_rename(src, dst)
    monkeypatch.setattr(os, "rename", full)
    code, err = cli(compress_eval.main, argv + ["--max_tokens", "200"], capsys)
    assert tree_bytes(out) == before  # the previous results, whole
    return code, err, {"out": str(out)}


@scenario
def compress_no_args(tmp_path, capsys, **_):
    cfg, _ = train.parse_config([os.path.join(REPO_ROOT, "config", "tiny.py")])
    assert cfg.out_dir == "out/demo"  # the example path in the message is the one config/tiny.py writes
    code, err = cli(compress_eval.main, [], capsys)
    return code, err, {}


@scenario
def compress_offline(tmp_path, capsys, monkeypatch, **_):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # restored after the test, like the two module flags
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    for var in data.PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=data.HUB_TIMEOUT_S: False)
    data.offline_unless_hub_reachable.cache_clear()
    try:
        t0 = time.time()
        code, err = cli(compress_eval.main, [ckpt, "--out", tmp_path / "o", "--no_progress"], capsys)
        assert time.time() - t0 < 10, "the Hub's retries were not skipped"
    finally:
        data.offline_unless_hub_reachable.cache_clear()
    return code, err, {}


# ------------------------------------------------------------------------------------------ file modes

@scenario
def umask(tmp_path, capsys, trained, **_):
    for mask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
        old = os.umask(mask)
        try:
            d = tmp_path / f"m{mask:o}"
            save_model(d / "ckpt.pt", tiny_model())
            files.atomic_write_json(d / "x.json", {"a": 1})
            with outputs.output_set(d / "report", "a test", ["r.md"]) as tmp:
                open(os.path.join(tmp, "r.md"), "w").write("x")
            data.write_tokens(d / "t.bin", [1, 2, 3])
            names = ("ckpt.pt", "x.json", "t.bin", "report", "report/r.md")
            modes = {n: os.stat(d / n).st_mode & 0o777 for n in names}
            assert modes == {"ckpt.pt": file_mode, "x.json": file_mode, "t.bin": file_mode, "report": dir_mode,
                             "report/r.md": file_mode}, modes
        finally:
            os.umask(old)
    # and what train.py wrote under the test run's umask
    current = os.umask(0o022)
    os.umask(current)
    expected = 0o666 & ~current
    for name in ("ckpt.pt", "ckpt_2.pt", "run.json", "log.jsonl"):
        assert os.stat(os.path.join(trained["out"], name)).st_mode & 0o777 == expected, name
    return 0, "", {}
