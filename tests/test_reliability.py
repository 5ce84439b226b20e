"""The catalogue of bad inputs and faults (tests/FAULTS.md), run row by row.

Each row of FAULTS.md names a scenario here (registered with @scenario). A scenario plants its fault,
runs the script's `main` through `runtime.cli.cli_main` (in process, so the exit status and stderr are the
real ones) and returns (exit status, stderr, {placeholder: value}); the row's expected line, with its
placeholders filled in, must be the one error line of stderr, and its last. Scenarios also check what
must NOT happen (a file overwritten, output or temporaries left behind, work done before a doomed write).
"""

import errno
import hashlib
import importlib.util
import json
import os
import platform
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
from model import GPT, GPTConfig
from runtime import files, outputs
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


# ------------------------------------------------------------------------------------------ the catalogue

def catalogue():
    """The rows of FAULTS.md's table: {id: {script, fault, expected, exit, test}}."""
    rows = {}
    with open(FAULTS_MD, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    for line in lines[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split(" | "))))
        rows[cells["id"]] = {**cells, "exit": int(cells["exit"]), "expected": cells["expected"].strip("`")}
    return rows


ROWS = catalogue()


def expected_regex(pattern, values):
    """FAULTS.md's expected line as a regex: `{name}` is values[name], `...` any text."""
    parts = re.split(r"(\{\w+\}|\.\.\.)", pattern)
    out = []
    for part in parts:
        if part == "...":
            out.append(".*?")
        elif re.fullmatch(r"\{\w+\}", part):
            out.append(re.escape(str(values[part[1:-1]])))
        else:
            out.append(re.escape(part))
    return "".join(out)


def test_catalogue_and_scenarios_match():
    here = {k for k, r in ROWS.items() if not r["test"]}
    assert here == set(SCENARIOS), (here ^ set(SCENARIOS))
    for key, row in ROWS.items():
        if row["test"]:  # covered by a test elsewhere, which names the row
            path, name = row["test"].split("::")
            with open(os.path.join(REPO_ROOT, "tests", path), encoding="utf-8") as f:
                source = f.read()
            assert f"def {name}(" in source and f"FAULTS: {key}" in source, row


def pytest_generate_tests(metafunc):
    """test_fault's rows, parametrized once the module has run (the scenarios below fill SLOW)."""
    if metafunc.function.__name__ == "test_fault":
        metafunc.parametrize("key", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k
                                     for k in sorted(k for k, r in ROWS.items() if not r["test"])])


def test_fault(key, tmp_path, capsys, monkeypatch, trained):
    code, err, values = SCENARIOS[key](tmp_path=tmp_path, capsys=capsys, monkeypatch=monkeypatch, trained=trained)
    row = ROWS[key]
    assert "Traceback" not in err, err
    assert code == row["exit"], (code, err)
    if row["expected"] == "—":
        assert not [line for line in err.splitlines() if line.startswith("error")], err
    else:  # progress lines may come first; the error is one line, and the last
        lines = err.strip().splitlines()
        assert [line for line in lines if line.startswith("error")] == lines[-1:], err
        assert re.fullmatch(expected_regex(row["expected"], values), lines[-1]), (lines[-1], row["expected"])


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training to iter 4 (evaluation, telemetry and ckpt.pt at 2 and 4; snapshots ckpt_2/4.pt).
    Scenarios work on copies (`run_copy`)."""
    root = tmp_path_factory.mktemp("trained")
    data_dir = make_data(root / "data")
    out = str(root / "run")
    assert train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4"]) == 0
    return {"data": data_dir, "out": out}


def run_copy(trained, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(trained["out"], out)
    return out, TINY + [f"--data_dir={trained['data']}", f"--out_dir={out}"]


def _train_fresh(tmp_path, capsys, trained, *extra):
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
    code, err = _train_fresh(tmp_path, capsys, trained, "--learning_rate=inf", "--max_iters=4")
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


# ------------------------------------------------------------------------------------------ output locations (A, B)
# Scripts write only their own files into an output directory and replace only what they wrote there
# (outputs.output_set and its manifest); everything else there is byte-identical afterwards.

def analyze_args(ckpt, tmp_path, out):
    return [ckpt, "--data", eval_data(tmp_path), "--out", out, "--no_progress", "--num_seqs", "1", "--seq_len", "8",
            "--tau", "4"]


@slow_scenario
def analyze_out_is_run_dir(tmp_path, capsys, trained, **_):
    out, _ = run_copy(trained, tmp_path)
    before = tree_bytes(out)
    code, err = cli(analyze_outliers.main, analyze_args(os.path.join(out, "ckpt.pt"), tmp_path, out), capsys)
    after = tree_bytes(out)
    assert {k: after[k] for k in before} == before  # the run's checkpoint, snapshots and logs untouched
    assert "report.md" in after and "outliers.json" in after
    return code, err, {}


@scenario
def analyze_out_empty(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    argv = analyze_args(ckpt, tmp_path, "")
    monkeypatch.chdir(tmp_path)
    before = tree_bytes(tmp_path)
    monkeypatch.setattr(analyze_outliers, "model_and_info", must_not_run)
    code, err = cli(analyze_outliers.main, argv, capsys)
    assert tree_bytes(tmp_path) == before
    return code, err, {}


@scenario
def analyze_out_root(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(analyze_outliers, "model_and_info", must_not_run)
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, "/"), capsys)
    return code, err, {}


@scenario
def analyze_out_is_input(tmp_path, capsys, monkeypatch, **_):
    from safetensors.torch import save_file
    hf_dir = tmp_path / "hf_gpt2"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16,
                                                    "n_positions": 32, "vocab_size": VOCAB}))
    save_file({"wte.weight": torch.zeros(VOCAB, 16)}, str(hf_dir / "model.safetensors"))
    before = tree_bytes(hf_dir)
    monkeypatch.setattr(analyze_outliers, "model_and_info", must_not_run)
    code, err = cli(analyze_outliers.main, ["--pretrained", hf_dir, "--data", eval_data(tmp_path), "--out", hf_dir,
                                            "--no_progress"], capsys)
    assert tree_bytes(hf_dir) == before
    return code, err, {"out": str(hf_dir)}


@scenario
def analyze_out_foreign_file(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "notes"
    out.mkdir()
    (out / "report.md").write_text("my own notes\n")
    monkeypatch.setattr(analyze_outliers, "model_and_info", must_not_run)
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out), capsys)
    assert tree_bytes(out) == {"report.md": b"my own notes\n"}
    return code, err, {"out": str(out)}


@slow_scenario
def analyze_compare_into_analysis(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "o"
    assert cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out), capsys)[0] == 0
    before = tree_bytes(out)
    other = save_model(tmp_path / "other.pt", tiny_model(1))
    code, err = cli(analyze_outliers.main, ["--compare", ckpt, other, "--data", eval_data(tmp_path), "--out", out,
                                            "--no_progress", "--num_seqs", "1", "--seq_len", "8"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"out": str(out)}


@slow_scenario
def analyze_replaces_its_own(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "o"
    assert cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out), capsys)[0] == 0
    (out / "my_notes.txt").write_text("kept\n")
    first = json.loads((out / "outliers.json").read_text())
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out) + ["--seed", "5"], capsys)
    assert (out / "my_notes.txt").read_text() == "kept\n"
    assert json.loads((out / "outliers.json").read_text())["data"]["seed"] == 5 != first["data"]["seed"]
    return code, err, {}


@scenario
def compress_results_is_dir(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "results"
    argv = [ckpt, "--data", eval_data(tmp_path), "--out", out, "--no_progress", "--methods", "fp"]
    assert cli(compress_eval.main, argv, capsys)[0] == 0
    (out / "results.md").unlink()
    (out / "results.md").mkdir()
    before = tree_bytes(out)
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, argv, capsys)
    assert tree_bytes(out) == before  # results.json and results.csv of the first run, untouched
    return code, err, {"out": str(out)}


@scenario
def compress_out_empty(tmp_path, capsys, monkeypatch, **_):
    ckpt, val = save_model(tmp_path / "ckpt.pt", tiny_model()), eval_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = tree_bytes(tmp_path)
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, "--data", val, "--out", "", "--no_progress"], capsys)
    assert tree_bytes(tmp_path) == before
    return code, err, {}


@scenario
def compress_out_foreign_file(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.csv").write_text("a,b\n1,2\n")
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", out, "--no_progress"], capsys)
    assert tree_bytes(out) == {"results.csv": b"a,b\n1,2\n"}
    return code, err, {"out": str(out)}


@scenario
def prepare_meta_is_dir(tmp_path, capsys, monkeypatch, **_):
    needs_tokenizer()
    src = tmp_path / "in.txt"
    src.write_text("some text\n" * 50)
    out = tmp_path / "data"
    out.mkdir()
    (out / "meta.json").mkdir()
    (out / "train.bin").write_bytes(b"\0\0")
    monkeypatch.setattr(prepare_data, "_load_splits", must_not_run)
    code, err = cli(prepare_data.main, ["--dataset", "text", "--input", src, "--out_dir", out, "--num_proc", "1",
                                        "--overwrite"], capsys)
    assert tree_bytes(out) == {"train.bin": b"\0\0"}
    return code, err, {"out": str(out)}


@scenario
def prepare_out_is_input(tmp_path, capsys, monkeypatch, **_):
    needs_tokenizer()
    out = tmp_path / "data"
    out.mkdir()
    src = out / "train.bin"  # a text file that happens to carry an output's name
    src.write_text("some text\n" * 50)
    monkeypatch.setattr(prepare_data, "_load_splits", must_not_run)
    code, err = cli(prepare_data.main, ["--dataset", "text", "--input", src, "--out_dir", out, "--num_proc", "1",
                                        "--overwrite"], capsys)
    assert src.read_text() == "some text\n" * 50
    return code, err, {"out": str(out), "input": str(src)}


@scenario
def reproduce_out_foreign_report(tmp_path, capsys, monkeypatch, **_):
    import reproduce
    out = tmp_path / "repro"
    out.mkdir()
    (out / "REPORT.md").write_text("someone else's report\n")
    monkeypatch.setattr(reproduce, "execute", must_not_run)
    code, err = cli(reproduce.main, ["--scale", "tiny", "--variants", "default", "--out", out], capsys)
    assert tree_bytes(out) == {"REPORT.md": b"someone else's report\n"}
    return code, err, {"out": str(out)}


# ------------------------------------------------------------------------------------------ checkpoint contents (C)

def _edited_checkpoint(tmp_path, edit):
    """A tiny checkpoint (valid CRCs) whose contents `edit` changed in memory before saving."""
    model = tiny_model()
    ckpt = {"model": model.state_dict(), "model_args": model_args_from(model.config), "iter_num": 3, "config": {}}
    edit(ckpt)
    path = str(tmp_path / "ckpt.pt")
    torch.save(ckpt, path)
    return path


def _refused_by_analyze(tmp_path, capsys, edit):
    ckpt = _edited_checkpoint(tmp_path, edit)
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, tmp_path / "o"), capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"ckpt": ckpt}


def _refused_by_compress(tmp_path, capsys, edit):
    ckpt = _edited_checkpoint(tmp_path, edit)
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o",
                                         "--no_progress"], capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"ckpt": ckpt}


@scenario
def ckpt_model_is_list(tmp_path, capsys, **_):
    return _refused_by_analyze(tmp_path, capsys, lambda c: c.update(model=list(c["model"].values())))


@scenario
def ckpt_weight_is_int(tmp_path, capsys, **_):
    return _refused_by_compress(tmp_path, capsys, lambda c: c["model"].update({"transformer.h.0.ln_1.weight": 3}))


@scenario
def ckpt_weight_is_dict(tmp_path, capsys, **_):
    return _refused_by_analyze(tmp_path, capsys, lambda c: c["model"].update({"transformer.h.1.mlp.c_fc.weight": {}}))


@scenario
def ckpt_weight_on_meta(tmp_path, capsys, **_):
    return _refused_by_compress(tmp_path, capsys, lambda c: c["model"].update(
        {"transformer.h.0.attn.c_proj.weight": torch.empty(32, 32, device="meta")}))


@scenario
def ckpt_n_layer_none(tmp_path, capsys, **_):
    return _refused_by_analyze(tmp_path, capsys, lambda c: c["model_args"].update(n_layer=None))


@scenario
def ckpt_n_embd_huge(tmp_path, capsys, **_):
    return _refused_by_compress(tmp_path, capsys, lambda c: c["model_args"].update(n_embd=2**20))


@scenario
def ckpt_n_embd_mismatch(tmp_path, capsys, **_):
    return _refused_by_analyze(tmp_path, capsys, lambda c: c["model_args"].update(n_embd=64))


@scenario
def ckpt_dropout_text(tmp_path, capsys, **_):
    return _refused_by_compress(tmp_path, capsys, lambda c: c["model_args"].update(dropout="0.1"))


@scenario
def ckpt_iter_num_text(tmp_path, capsys, **_):
    return _refused_by_analyze(tmp_path, capsys, lambda c: c.update(iter_num="3"))


def _resume_with(tmp_path, capsys, trained, edit):
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


@scenario
def resume_optimizer_empty(tmp_path, capsys, trained, **_):
    return _resume_with(tmp_path, capsys, trained, lambda c: c.update(optimizer={}))


@scenario
def resume_optimizer_wrong_shape(tmp_path, capsys, trained, **_):
    def edit(c):
        c["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 3)
    return _resume_with(tmp_path, capsys, trained, edit)


@scenario
def resume_optimizer_groups(tmp_path, capsys, trained, **_):
    def edit(c):
        c["optimizer"]["param_groups"][0]["params"] = c["optimizer"]["param_groups"][0]["params"][:-1]
    return _resume_with(tmp_path, capsys, trained, edit)


@scenario
def resume_sampler_bad(tmp_path, capsys, trained, **_):
    return _resume_with(tmp_path, capsys, trained, lambda c: c["sampler"].update(generator=torch.zeros(7)))


@scenario
def resume_rng_bad(tmp_path, capsys, trained, **_):
    return _resume_with(tmp_path, capsys, trained, lambda c: c["rng"][0].update(numpy=["MT19937", [1, 2], 0, 0, 0.0]))


@scenario
def resume_rng_not_list(tmp_path, capsys, trained, **_):
    return _resume_with(tmp_path, capsys, trained, lambda c: c.update(rng={"python": None}))


# ------------------------------------------------------------------------------------------ run directory and data files (D)

def _train_with_meta(tmp_path, capsys, trained, text):
    data_dir = tmp_path / "data"
    shutil.copytree(trained["data"], data_dir)
    (data_dir / "meta.json").write_text(text)
    code, err = cli(train.main, TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--max_iters=2"],
                    capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"meta": str(data_dir / "meta.json")}


@scenario
def train_meta_truncated(tmp_path, capsys, trained, **_):
    return _train_with_meta(tmp_path, capsys, trained, '{"vocab_size": 6')


@scenario
def train_meta_vocab_text(tmp_path, capsys, trained, **_):
    return _train_with_meta(tmp_path, capsys, trained, '{"vocab_size": "lots"}')


@scenario
def train_meta_vocab_null(tmp_path, capsys, trained, **_):
    return _train_with_meta(tmp_path, capsys, trained, '{"vocab_size": null}')


@scenario
def train_meta_is_dir(tmp_path, capsys, trained, **_):
    data_dir = tmp_path / "data"
    shutil.copytree(trained["data"], data_dir)
    (data_dir / "meta.json").unlink()
    (data_dir / "meta.json").mkdir()
    code, err = cli(train.main, TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--max_iters=2"],
                    capsys)
    return code, err, {"meta": str(data_dir / "meta.json")}


@scenario
def resume_run_json_truncated(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    path = os.path.join(out, "run.json")
    with open(path, "r+") as f:
        f.truncate(40)
    before = tree_bytes(out)
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"path": path}


@scenario
def resume_log_is_dir(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    log = os.path.join(out, "log.jsonl")
    os.remove(log)
    os.mkdir(log)
    before = tree_bytes(out)
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"log": log}


@scenario
def train_out_dir_empty(tmp_path, capsys, trained, monkeypatch, **_):
    monkeypatch.chdir(tmp_path)
    code, err = cli(train.main, TINY + [f"--data_dir={trained['data']}", "--out_dir=", "--max_iters=2"], capsys)
    assert os.listdir(tmp_path) == []
    return code, err, {}


@scenario
def analyze_compare_log_is_dir(tmp_path, capsys, **_):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = save_model(run / "ckpt.pt", tiny_model())
    (run / "log.jsonl").mkdir()
    other = save_model(tmp_path / "other.pt", tiny_model(1))
    code, err = cli(analyze_outliers.main, ["--compare", ckpt, other, "--data", eval_data(tmp_path), "--out",
                                            tmp_path / "cmp", "--no_progress", "--num_seqs", "1", "--seq_len", "8"],
                    capsys)
    assert not (tmp_path / "cmp").exists()
    return code, err, {"log": str(run / "log.jsonl")}


# ------------------------------------------------------------------------------------------ arguments (E)

@scenario
def train_seed_huge(tmp_path, capsys, trained, **_):
    code, err = _train_fresh(tmp_path, capsys, trained, f"--seed={2**70}", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {"seed": 2**70}


@scenario
def train_seed_negative(tmp_path, capsys, trained, **_):
    code, err = _train_fresh(tmp_path, capsys, trained, "--seed=-3", "--max_iters=2")
    return code, err, {}


@scenario
def train_batch_huge(tmp_path, capsys, trained, **_):
    code, err = _train_fresh(tmp_path, capsys, trained, f"--batch_size={2**40}", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {}


@scenario
def analyze_seed_negative(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(analyze_outliers, "model_and_info", must_not_run)
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, tmp_path / "o") + ["--seed", "-1"], capsys)
    return code, err, {}


@scenario
def compress_seed_negative(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)  # not fp, not sparse50: nothing runs
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o", "--no_progress",
                                         "--methods", "fp,sparse50,wanda", "--calib_data", eval_data(tmp_path),
                                         "--seed", "-1"], capsys)
    return code, err, {}


@scenario
def analyze_num_seqs_huge(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, tmp_path / "o") + ["--num_seqs", str(10**12)],
                    capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"data": eval_data(tmp_path)}


@scenario
def compress_calib_windows_huge(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o", "--no_progress",
                                         "--methods", "fp,wanda", "--calib_data", eval_data(tmp_path),
                                         "--calib_windows", str(10**11)], capsys)
    return code, err, {}


@scenario
def compress_calib_too_short(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    short = tmp_path / "short.bin"
    data.write_tokens(short, np.arange(10) % VOCAB)
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o", "--no_progress",
                                         "--methods", "fp,sparse50,wanda", "--calib_data", short], capsys)
    return code, err, {}


@scenario
def train_device_mps(tmp_path, capsys, trained, **_):
    code, err = _train_fresh(tmp_path, capsys, trained, "--device=mps", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {}


@scenario
def compress_device_mps(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o", "--no_progress",
                                         "--device", "mps"], capsys)
    return code, err, {}


@scenario
def analyze_device_mps(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, tmp_path / "o") + ["--device", "mps"], capsys)
    return code, err, {}


@scenario
def reproduce_device_mps(tmp_path, capsys, monkeypatch, **_):
    import reproduce
    monkeypatch.setattr(reproduce, "execute", must_not_run)
    code, err = cli(reproduce.main, ["--scale", "tiny", "--variants", "default", "--out", tmp_path / "r",
                                     "--device", "mps"], capsys)
    assert not (tmp_path / "r").exists()
    return code, err, {}


@scenario
def train_device_gpu_index(tmp_path, capsys, trained, monkeypatch, **_):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, err = _train_fresh(tmp_path, capsys, trained, "--device=cuda:3", "--max_iters=2")
    return code, err, {}


# ------------------------------------------------------------------------------------------ config files (F)

def _train_with_config(tmp_path, capsys, trained, content):
    """train.py with a config file holding `content` (bytes), then the tiny settings, into a new out_dir."""
    cfg = tmp_path / "config_file.py"
    cfg.write_bytes(content)
    code, err = cli(train.main, [cfg] + TINY + [f"--data_dir={trained['data']}", f"--out_dir={tmp_path / 'o'}"], capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"cfg": str(cfg)}


@scenario
def train_config_not_utf8(tmp_path, capsys, trained, **_):
    return _train_with_config(tmp_path, capsys, trained, b"batch_size = 4  # caf\xff\n")


@scenario
def train_config_sys_exit(tmp_path, capsys, trained, **_):
    return _train_with_config(tmp_path, capsys, trained, b"import sys\nsys.exit(5)\n")


# ------------------------------------------------------------------------------------------ wrong behaviour (G)

@scenario
def train_eval_only_into_run(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    before = tree_bytes(out)
    code, err = cli(train.main, args + ["--eval_only=True"], capsys)  # init_from=scratch: random weights
    assert tree_bytes(out) == before
    return code, err, {"out": out}


# ------------------------------------------------------------------------------------------ review of the above

@scenario
def outputs_manifest_escape(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / outputs.OUTPUTS_MANIFEST).write_text(json.dumps(
        {"format": "outlier-gpt-outputs", "version": 1, "tools": {"compress_eval.py": {"files": ["../victim.txt"]}}}))
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", out, "--no_progress"], capsys)
    assert victim.read_text() == "precious\n"
    return code, err, {"out": str(out), "manifest": str(out / outputs.OUTPUTS_MANIFEST)}


@slow_scenario
def analyze_own_output_edited(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "o"
    assert cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out), capsys)[0] == 0
    (out / "report.md").write_text("the user's notes on the analysis\n")
    before = tree_bytes(out)
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out), capsys)
    assert tree_bytes(out) == before
    return code, err, {"out": str(out)}


def _foreign_run_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name, text in (("log.jsonl", '{"kind": "eval", "iter": 0}\n'), ("run.json", "{}"), ("ckpt_4000.pt", "x"),
                       ("ckpt_keep.pt", "y")):
        (out / name).write_text(text)
    return out


@scenario
def train_scratch_into_run_files(tmp_path, capsys, trained, **_):
    out = _foreign_run_files(tmp_path)
    before = tree_bytes(out)
    code, err = cli(train.main, TINY + [f"--data_dir={trained['data']}", f"--out_dir={out}", "--max_iters=2"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"out": str(out)}


@scenario
def train_eval_only_into_run_files(tmp_path, capsys, trained, **_):
    out = _foreign_run_files(tmp_path)
    before = tree_bytes(out)
    code, err = cli(train.main, TINY + [f"--data_dir={trained['data']}", f"--out_dir={out}", "--eval_only=True"],
                    capsys)
    assert tree_bytes(out) == before
    return code, err, {"out": str(out)}


@scenario
def resume_best_val_loss_text(tmp_path, capsys, trained, **_):
    return _resume_with(tmp_path, capsys, trained, lambda c: c.update(best_val_loss="abc"))


@scenario
def resume_log_offset_negative(tmp_path, capsys, trained, **_):
    return _resume_with(tmp_path, capsys, trained, lambda c: c.update(log_offset=-5))


@scenario
def resume_sampler_draws_inf(tmp_path, capsys, trained, **_):
    return _resume_with(tmp_path, capsys, trained, lambda c: c["sampler"].update(draws=float("inf")))


@scenario
def resume_param_id_list(tmp_path, capsys, trained, **_):
    def edit(c):
        c["optimizer"]["param_groups"][0]["params"][0] = [0]
    return _resume_with(tmp_path, capsys, trained, edit)


@scenario
def resume_betas_text(tmp_path, capsys, trained, **_):
    def edit(c):
        c["optimizer"]["param_groups"][0]["betas"] = "ab"
    return _resume_with(tmp_path, capsys, trained, edit)


@scenario
def resume_step_text(tmp_path, capsys, trained, **_):
    def edit(c):
        c["optimizer"]["state"][0]["step"] = "x"
    return _resume_with(tmp_path, capsys, trained, edit)


@scenario
def ckpt_no_weights_huge_args(tmp_path, capsys, **_):
    def edit(c):
        c["model"] = {}
        c["model_args"].update(n_embd=2**18, n_head=1, vocab_size=2**24)
    return _refused_by_compress(tmp_path, capsys, edit)


@scenario
def ckpt_int_weight(tmp_path, capsys, **_):
    return _refused_by_analyze(tmp_path, capsys, lambda c: c["model"].update(
        {"transformer.h.0.ln_1.weight": torch.ones(32, dtype=torch.int64)}))


@scenario
def ckpt_weight_twice(tmp_path, capsys, **_):
    return _refused_by_compress(tmp_path, capsys, lambda c: c["model"].update(
        {"_orig_mod.transformer.h.0.ln_1.weight": torch.ones(32)}))


@scenario
def train_meta_nested(tmp_path, capsys, trained, **_):
    return _train_with_meta(tmp_path, capsys, trained, "[" * 100000 + "]" * 100000)


@scenario
def train_eval_iters_huge(tmp_path, capsys, trained, **_):
    code, err = _train_fresh(tmp_path, capsys, trained, f"--eval_iters={2**40}", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {}


@scenario
def resume_nanogpt_checkpoint(tmp_path, capsys, trained, **_):
    def edit(c):  # what nanoGPT's train.py writes: no kind, no sampler
        del c["kind"], c["sampler"]
    return _resume_with(tmp_path, capsys, trained, edit)


@scenario
def resume_sampler_none(tmp_path, capsys, trained, **_):
    return _resume_with(tmp_path, capsys, trained, lambda c: c.update(sampler=None))


# ------------------------------------------------------------------------------------------ round 3 (issue 26)
# A: data loss

@scenario
def train_config_overwrite(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    cfg = tmp_path / "demo.py"
    cfg.write_text('out_dir = "out/demo"\noverwrite = True\n')  # what config/tiny.py used to set
    before = tree_bytes(out)
    code, err = cli(train.main, [cfg] + args + ["--max_iters=1"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"cfg": str(cfg)}


@scenario
def train_tiny_config_into_run(tmp_path, capsys, trained, **_):
    out, _ = run_copy(trained, tmp_path)
    before = tree_bytes(out)
    code, err = cli(train.main, [os.path.join(REPO_ROOT, "config", "tiny.py"), f"--data_dir={trained['data']}",
                                 f"--out_dir={out}", "--max_iters=1"], capsys)
    assert tree_bytes(out) == before  # ckpt.pt, the snapshots and log.jsonl of the run
    return code, err, {"out": out, "ckpt": os.path.join(out, "ckpt.pt")}


def _other_snapshot(path):
    """A weights-only snapshot of another run (other weights), as a user might copy one in."""
    model = tiny_model(1)
    save_checkpoint(path, {"model": model.state_dict(), "model_args": model_args_from(model.config), "iter_num": 2,
                           "config": {}, "kind": "snapshot"})


@scenario
def resume_prune_only_own(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    _other_snapshot(os.path.join(out, "ckpt_2.pt"))  # replaces the run's own: no longer the file run.json records
    with open(os.path.join(out, "ckpt_1.pt"), "wb") as f:
        f.write(b"the user's own file\n")
    foreign = {n: open(os.path.join(out, n), "rb").read() for n in ("ckpt_1.pt", "ckpt_2.pt")}
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume", "--snapshot_interval=1",
                                        "--keep_snapshots=1"], capsys)
    assert {n: open(os.path.join(out, n), "rb").read() for n in foreign} == foreign
    assert sorted(n for n in os.listdir(out) if train.SNAPSHOT.fullmatch(n)) == ["ckpt_1.pt", "ckpt_2.pt", "ckpt_6.pt"]
    assert list(json.load(open(os.path.join(out, "run.json")))["snapshots"]) == ["ckpt_6.pt"]
    return code, err, {}


@scenario
def train_snapshot_would_replace(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    with open(os.path.join(out, "ckpt_6.pt"), "wb") as f:
        f.write(b"kept by the user\n")
    before = tree_bytes(out)
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"path": os.path.join(out, "ckpt_6.pt")}


@slow_scenario
def train_overwrite_keeps_foreign(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    _other_snapshot(os.path.join(out, "ckpt_3.pt"))
    kept = open(os.path.join(out, "ckpt_3.pt"), "rb").read()
    code, err = cli(train.main, args + ["--max_iters=2", "--overwrite=True"], capsys)
    assert open(os.path.join(out, "ckpt_3.pt"), "rb").read() == kept
    # ckpt_4.pt was the replaced run's (run.json recorded it): gone; ckpt_3.pt was never the run's: kept
    assert sorted(n for n in os.listdir(out) if train.SNAPSHOT.fullmatch(n)) == ["ckpt_2.pt", "ckpt_3.pt"]
    assert [launch["start_iter"] for launch in json.load(open(os.path.join(out, "run.json")))["launches"]] == [0]
    return code, err, {}


# B: silent wrong results

def _other_data(tmp_path, **kwargs):
    return make_data(tmp_path / "other", val=token_stream(2000, 5), **kwargs)  # same sizes, other tokens


def _resume_on(tmp_path, capsys, trained, other):
    """Resume a copy of the trained run on the data in `other`: refused, the run byte-identical."""
    out, args = run_copy(trained, tmp_path)
    before = tree_bytes(out)
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume", f"--data_dir={other}"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"ckpt": os.path.join(out, "ckpt.pt"), "other": os.path.abspath(other),
                       "data": os.path.abspath(trained["data"])}


@scenario
def resume_other_data(tmp_path, capsys, trained, **_):
    return _resume_on(tmp_path, capsys, trained, _other_data(tmp_path))


@scenario
def resume_other_data_no_meta(tmp_path, capsys, trained, **_):  # nanoGPT data: the token counts are compared
    return _resume_on(tmp_path, capsys, trained, make_data(tmp_path / "other", meta=False, train_tokens=6000))


@slow_scenario
def resume_other_data_meant(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    other = _other_data(tmp_path)
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume", f"--data_dir={other}",
                                        "--resume_on_new_data=True"], capsys)
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["data"]["data_dir"] == os.path.abspath(other)
    earlier = [(d["data_dir"], d["until_iter"]) for d in record["previous_data"]]
    assert earlier == [(os.path.abspath(trained["data"]), 4)]
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["data"]["data_dir"] == os.path.abspath(other)
    return code, err, {}


@scenario
def ckpt_tied_differ(tmp_path, capsys, **_):
    def edit(c):  # model.GPT stores one tensor under both names; here two different ones
        c["model"]["lm_head.weight"] = c["model"]["lm_head.weight"].clone() + 1.0
    return _refused_by_compress(tmp_path, capsys, edit)


def _huge_weights(c):
    c["model"]["transformer.h.0.mlp.c_fc.weight"] = torch.full_like(c["model"]["transformer.h.0.mlp.c_fc.weight"], 1e38)


@scenario
def ckpt_overflow_analyze(tmp_path, capsys, **_):
    code, err, values = _refused_by_analyze(tmp_path, capsys, _huge_weights)
    return code, err, {"ckpt": os.path.abspath(values["ckpt"])}


@scenario
def ckpt_overflow_compress(tmp_path, capsys, **_):
    return _refused_by_compress(tmp_path, capsys, _huge_weights)


def _api(fn):
    """An API call run as a script runs its main (the UserError is its one line)."""
    return lambda argv: (fn(), 0)[1]


@scenario
def api_dict_nonfinite(tmp_path, capsys, **_):
    from training.checkpoint import model_from_checkpoint
    model = tiny_model()
    ckpt = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "model_args": model_args_from(model.config),
            "iter_num": 0, "config": {}}
    ckpt["model"]["transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")
    return (*cli(_api(lambda: model_from_checkpoint(ckpt)), [], capsys), {})


@scenario
def api_dict_bad_args(tmp_path, capsys, **_):
    from training.checkpoint import model_from_checkpoint
    model = tiny_model()
    ckpt = {"model": model.state_dict(), "model_args": {**model_args_from(model.config), "n_layer": None},
            "iter_num": 0, "config": {}}
    return (*cli(_api(lambda: model_from_checkpoint(ckpt)), [], capsys), {})


def _gpt2_dir(path, edit=None):
    """A Hugging Face GPT-2 directory (config.json, model.safetensors in transformers' names and Conv1D layout)
    of a tiny random model.GPT, written without transformers; `edit` changes its state dict first."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, bias=True))
    conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
    state = {k[len("transformer."):]: (v.t() if k.endswith(conv1d) else v).contiguous().clone()
             for k, v in model.state_dict().items() if k.startswith("transformer.")}
    if edit:
        edit(state)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32,
                   "vocab_size": VOCAB, "activation_function": "gelu_new"}, f)
    save_file(state, os.path.join(path, "model.safetensors"))
    return str(path)


def _analyze_pretrained(tmp_path, capsys, model_dir):
    code, err = cli(analyze_outliers.main, ["--pretrained", model_dir, "--data", eval_data(tmp_path), "--out",
                                            tmp_path / "o", "--no_progress", "--num_seqs", "1", "--seq_len", "8",
                                            "--tau", "4"], capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"dir": model_dir}


@scenario
def hf_gpt2_nonfinite(tmp_path, capsys, **_):
    def edit(state):
        state["h.0.mlp.c_fc.weight"][3, 4] = float("nan")
    return _analyze_pretrained(tmp_path, capsys, _gpt2_dir(tmp_path / "gpt2", edit))


@scenario
def hf_gpt2_tied_differ(tmp_path, capsys, **_):
    def edit(state):  # some save_pretrained directories store lm_head.weight too; here it is not the embedding
        state["lm_head.weight"] = state["wte.weight"] * 2
    return _analyze_pretrained(tmp_path, capsys, _gpt2_dir(tmp_path / "gpt2", edit))


@scenario
def hf_gpt2_damaged(tmp_path, capsys, **_):
    model_dir = _gpt2_dir(tmp_path / "gpt2")
    weights = os.path.join(model_dir, "model.safetensors")
    blob = open(weights, "rb").read()
    open(weights, "wb").write(blob[:len(blob) // 2])  # a download cut short
    return _analyze_pretrained(tmp_path, capsys, model_dir)


_LLAMA = {}


def _llama_dir(tmp_path, edit=None):
    """A copy of one tiny random LLaMA save_pretrained directory (made once per session, with transformers);
    `edit` changes its weights."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file
    if "dir" not in _LLAMA:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
        _LLAMA["dir"] = str(tmp_path / "llama_made")
        transformers.LlamaForCausalLM(config).save_pretrained(_LLAMA["dir"])
    path = str(tmp_path / "llama")
    shutil.copytree(_LLAMA["dir"], path)
    if edit:
        weights = os.path.join(path, "model.safetensors")
        state = load_file(weights)
        edit(state)
        save_file(state, weights, metadata={"format": "pt"})
    return path


@slow_scenario
def hf_nonfinite_analyze(tmp_path, capsys, **_):
    def edit(state):
        state["model.layers.1.mlp.down_proj.weight"][0, 1] = float("nan")
    return _analyze_pretrained(tmp_path, capsys, _llama_dir(tmp_path, edit))


@slow_scenario
def hf_nonfinite_compress(tmp_path, capsys, **_):
    def edit(state):
        state["model.layers.0.self_attn.q_proj.weight"][2, 2] = float("inf")
    model_dir = _llama_dir(tmp_path, edit)
    code, err = cli(compress_eval.main, ["--pretrained", model_dir, "--data", eval_data(tmp_path), "--out",
                                         tmp_path / "o", "--no_progress", "--methods", "fp"], capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"dir": model_dir}


# C: code from a model directory

_CUSTOM_CODE = "open({marker!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as C, LlamaForCausalLM as M\n"


def _with_custom_code(model_dir, model_type, marker):
    """config.json of `model_dir` mapped (auto_map) to a Python file of the directory that leaves `marker`."""
    path = os.path.join(model_dir, "config.json")
    config = json.load(open(path))
    config.update(model_type=model_type, auto_map={"AutoConfig": "modeling_custom.C",
                                                   "AutoModelForCausalLM": "modeling_custom.M"})
    json.dump(config, open(path, "w"))
    open(os.path.join(model_dir, "modeling_custom.py"), "w").write(_CUSTOM_CODE.format(marker=str(marker)))


def first_party_sources():
    """The repo's own Python files: the root's scripts and every package of the layout (not tests, venvs, data)."""
    skip = {"tests", "data", "out", "shared"}
    for top in sorted(os.listdir(REPO_ROOT)):
        path = os.path.join(REPO_ROOT, top)
        if top.endswith(".py"):
            yield path
        elif os.path.isfile(os.path.join(path, "__init__.py")) and top not in skip:
            for folder, dirs, files in os.walk(path):
                yield from (os.path.join(folder, f) for f in sorted(files) if f.endswith(".py"))


def test_every_from_pretrained_refuses_remote_code():
    """Every transformers Auto*.from_pretrained call of the repo passes trust_remote_code=False (transformers
    would otherwise ask on a terminal, and run the model directory's code on 'y')."""
    calls = []
    for path in first_party_sources():
        source = open(path, encoding="utf-8").read()
        calls += [(path, c) for c in re.findall(r"Auto\w+\.from_pretrained\(([^)]*)\)", source)]
    assert len(calls) >= 3, calls  # config, model, tokenizer
    assert all("trust_remote_code=False" in args or '"trust_remote_code": False' in args or "**kwargs" in args
               for _, args in calls), calls
    from hf import models as hf_models
    assert '"trust_remote_code": False' in open(hf_models.__file__).read()


@scenario
def hf_custom_code(tmp_path, capsys, **_):
    model_dir = str(tmp_path / "custom")
    shutil.copytree(_gpt2_dir(tmp_path / "gpt2"), model_dir)
    marker = tmp_path / "code_ran"
    _with_custom_code(model_dir, "custom_llama", marker)
    code, err, values = _analyze_pretrained(tmp_path, capsys, model_dir)
    assert not marker.exists()
    return code, err, values


@slow_scenario
def hf_custom_code_known_type(tmp_path, capsys, **_):
    model_dir = _llama_dir(tmp_path)
    marker = tmp_path / "code_ran"
    _with_custom_code(model_dir, "llama", marker)  # a type transformers knows: its own class, never the file
    code, err = cli(analyze_outliers.main, ["--pretrained", model_dir, "--data", eval_data(tmp_path), "--out",
                                            tmp_path / "o", "--no_progress", "--num_seqs", "1", "--seq_len", "8",
                                            "--tau", "4", "--intervene", "none"], capsys)
    assert not marker.exists() and (tmp_path / "o" / "report.md").exists()
    return code, err, {}


@scenario
def hf_config_damaged(tmp_path, capsys, **_):
    model_dir = str(tmp_path / "llama")
    os.makedirs(model_dir)
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama", ')
    return _analyze_pretrained(tmp_path, capsys, model_dir)


# D: tracebacks

def _float8(name, dtype):
    def edit(c):
        c["model"][name] = c["model"][name].to(dtype)
    return edit


@scenario
def ckpt_float8_analyze(tmp_path, capsys, **_):
    return _refused_by_analyze(tmp_path, capsys, _float8("transformer.h.0.attn.c_attn.weight", torch.float8_e4m3fn))


@scenario
def ckpt_float8_compress(tmp_path, capsys, **_):
    return _refused_by_compress(tmp_path, capsys, _float8("transformer.h.1.mlp.c_proj.weight", torch.float8_e5m2))


@scenario
def train_init_from_llama_dir(tmp_path, capsys, trained, **_):
    model_dir = tmp_path / "llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    code, err = _train_fresh(tmp_path, capsys, trained, f"--init_from={model_dir}", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {"dir": str(model_dir)}


@scenario
def train_init_from_run_dir(tmp_path, capsys, trained, **_):
    out, _ = run_copy(trained, tmp_path)
    code, err = _train_fresh(tmp_path, capsys, trained, f"--init_from={out}", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {"dir": out}


@scenario
def analyze_figures_disk_full(tmp_path, capsys, monkeypatch, **_):
    import matplotlib.figure
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.md").write_text("the user's notes\n")

    def full(self, fname, *args, **kwargs):  # PIL's write fails midway, as on a full disk (no file name)
        open(fname, "wb").write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out), capsys)
    assert tree_bytes(out) == {"notes.md": b"the user's notes\n"} and no_temporaries(str(out)) == []
    return code, err, {"out": str(out)}


@scenario
def train_config_huge_float(tmp_path, capsys, trained, **_):
    return _train_with_config(tmp_path, capsys, trained, b"learning_rate = 10**400\n")


@scenario
def train_accumulation_huge(tmp_path, capsys, trained, **_):
    code, err = _train_fresh(tmp_path, capsys, trained, "--gradient_accumulation_steps=100000000000", "--max_iters=2")
    assert not (tmp_path / "o").exists()  # no run.json or log.jsonl left behind
    return code, err, {}


def _bench_main(script, monkeypatch):
    """The main of benchmarks/SCRIPT, imported as the golden --help test does (TRITON_INTERPRET restored after)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return importlib.import_module(f"benchmarks.{script[:-3]}").main


@scenario
def kernel_registers_head_dim(tmp_path, capsys, monkeypatch, **_):
    return (*cli(_bench_main("kernel_registers.py", monkeypatch), ["--head_dim", "7"], capsys), {})


@scenario
def kernel_registers_arch(tmp_path, capsys, monkeypatch, **_):
    return (*cli(_bench_main("kernel_registers.py", monkeypatch), ["--arch", "5"], capsys), {})


@scenario
def host_overhead_seq_len_zero(tmp_path, capsys, monkeypatch, **_):
    return (*cli(_bench_main("host_overhead.py", monkeypatch), ["--device", "cpu", "--seq_lens", "0"], capsys), {})


@scenario
def host_overhead_head_dim(tmp_path, capsys, monkeypatch, **_):
    return (*cli(_bench_main("host_overhead.py", monkeypatch), ["--device", "cpu", "--head_dim", "8"], capsys), {})


# E: messages that named the wrong cause

@scenario
def train_overflow_at_start(tmp_path, capsys, trained, **_):
    code, err = _train_fresh(tmp_path, capsys, trained, "--attention=sigmoid", "--sigmoid_bias=1e308", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {}


@scenario
def resume_weights_overflow(tmp_path, capsys, trained, **_):
    return _resume_with(tmp_path, capsys, trained, _huge_weights)


def _fifo(tmp_path):
    path = str(tmp_path / "pipe")
    os.mkfifo(path)
    return path


@scenario
def analyze_data_fifo(tmp_path, capsys, **_):
    ckpt, fifo = save_model(tmp_path / "ckpt.pt", tiny_model()), _fifo(tmp_path)
    code, err = cli(analyze_outliers.main, [ckpt, "--data", fifo, "--out", tmp_path / "o", "--no_progress"], capsys)
    return code, err, {"fifo": fifo}


@scenario
def analyze_ckpt_fifo(tmp_path, capsys, **_):
    fifo = _fifo(tmp_path)  # its CRC check used to wait forever for a writer
    code, err = cli(analyze_outliers.main, [fifo, "--data", eval_data(tmp_path), "--out", tmp_path / "o",
                                            "--no_progress"], capsys)
    return code, err, {"fifo": fifo}


@scenario
def compress_data_fifo(tmp_path, capsys, monkeypatch, **_):
    ckpt, fifo = save_model(tmp_path / "ckpt.pt", tiny_model()), _fifo(tmp_path)
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, "--data", fifo, "--out", tmp_path / "o", "--no_progress"], capsys)
    return code, err, {"fifo": fifo}


@scenario
def prepare_input_fifo(tmp_path, capsys, monkeypatch, **_):
    needs_tokenizer()
    fifo = _fifo(tmp_path)
    monkeypatch.setattr(prepare_data, "_load_splits", must_not_run)
    code, err = cli(prepare_data.main, ["--dataset", "text", "--input", fifo, "--out_dir", tmp_path / "d"], capsys)
    return code, err, {"fifo": fifo}


@scenario
def prepare_concurrent_sources(tmp_path, capsys, monkeypatch, **_):
    needs_tokenizer()
    a, b, out = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "data"
    a.write_text("".join(f"line {i} of corpus a\n" for i in range(300)))
    b.write_text("".join(f"line {i} of corpus b\n" for i in range(300)))
    argv = ["--dataset", "text", "--out_dir", str(out), "--num_proc", "1", "--cache_dir", str(tmp_path / "hf"),
            "--input"]
    real = prepare_data._load_splits

    def meanwhile(*args, **kwargs):  # while this run (of b) tokenizes, a run of a finishes in the same out_dir
        monkeypatch.setattr(prepare_data, "_load_splits", real)
        assert prepare_data.main(argv + [str(a)]) == 0
        return real(*args, **kwargs)
    monkeypatch.setattr(prepare_data, "_load_splits", meanwhile)
    code, err = cli(prepare_data.main, argv + [b], capsys)
    assert json.load(open(out / "meta.json"))["source"]["inputs"] == [str(a.resolve())]  # a's data, whole
    return code, err, {"out": str(out)}


@scenario
def analyze_compare_same(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(analyze_outliers, "model_and_info", must_not_run)
    code, err = cli(analyze_outliers.main, ["--compare", ckpt, ckpt, "--data", eval_data(tmp_path), "--out",
                                            tmp_path / "cmp", "--no_progress"], capsys)
    return code, err, {"ckpt": ckpt}


@scenario
def train_min_lr_above_lr(tmp_path, capsys, trained, **_):
    return (*_train_fresh(tmp_path, capsys, trained, "--learning_rate=1e-3", "--min_lr=1e-2", "--max_iters=2"), {})


@scenario
def bench_train_smoke_sizes(tmp_path, capsys, monkeypatch, **_):
    main = _bench_main("train_throughput.py", monkeypatch)
    return (*cli(main, ["--smoke", "--batch_size", "64", "--out_dir", tmp_path / "b"], capsys), {})


@scenario
def bench_attention_smoke_sizes(tmp_path, capsys, monkeypatch, **_):
    main = _bench_main("attention.py", monkeypatch)
    return (*cli(main, ["--interpret_smoke", "--seq_lens", "4096", "--heads", "16", "--out_dir", tmp_path / "b"],
                 capsys), {})


@slow_scenario
def train_record_write_fails(tmp_path, capsys, trained, monkeypatch, **_):
    out = tmp_path / "o"
    writes = []

    def full(path, obj):  # run.json's first write (the launch) lands; the disk is full after it
        writes.append(path)
        if len(writes) > 1:
            raise files.write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        files.atomic_write_json(path, obj)

    def no_space(path, ckpt):
        raise files.write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    monkeypatch.setattr(train, "atomic_write_json", full)
    monkeypatch.setattr(train, "save_checkpoint", no_space)
    code, err = _train_fresh(tmp_path, capsys, trained, "--max_iters=2", "--snapshot_interval=0")
    assert json.load(open(out / "run.json"))["launches"][-1]["status"] == "running"  # as the message says
    return code, err, {"out": str(out)}


# found by the hostile pass of issue 26

@scenario
def train_config_is_dir(tmp_path, capsys, trained, **_):
    code, err = cli(train.main, [trained["data"]] + TINY + [f"--out_dir={tmp_path / 'o'}"], capsys)
    return code, err, {"dir": trained["data"]}


@scenario
def train_weight_decay_negative(tmp_path, capsys, trained, **_):
    return (*_train_fresh(tmp_path, capsys, trained, "--weight_decay=-0.1", "--max_iters=2"), {})


@scenario
def analyze_usage_error(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(sys, "argv", ["analyze_outliers.py"])  # argparse names the program after argv[0]
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, tmp_path / "o") + ["--intervene", "nope"],
                    capsys)
    return code, err, {}


@scenario
def compress_same_twice(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, str(tmp_path / "." / "ckpt.pt"), "--data", eval_data(tmp_path), "--out",
                                         tmp_path / "o", "--no_progress"], capsys)
    return code, err, {"ckpt": os.path.realpath(ckpt)}


@scenario
def prepare_cache_dir_is_file(tmp_path, capsys, monkeypatch, **_):
    needs_tokenizer()
    src, cache = tmp_path / "in.txt", tmp_path / "cache"
    src.write_text("some text\n" * 50)
    cache.write_text("not a directory\n")
    monkeypatch.setattr(prepare_data, "_load_splits", must_not_run)
    code, err = cli(prepare_data.main, ["--dataset", "text", "--input", src, "--out_dir", tmp_path / "d",
                                        "--cache_dir", cache], capsys)
    return code, err, {"cache": str(cache)}


@scenario
def host_overhead_out_unwritable(tmp_path, capsys, monkeypatch, **_):
    (tmp_path / "file").write_text("a regular file\n")
    out = tmp_path / "file" / "host.json"
    code, err = cli(_bench_main("host_overhead.py", monkeypatch), ["--device", "cpu", "--out", out], capsys)
    return code, err, {"dir": str(out.parent)}


@scenario
def hf_dir_without_config(tmp_path, capsys, **_):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    return _analyze_pretrained(tmp_path, capsys, str(model_dir))
