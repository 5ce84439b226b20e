"""Test-session setup shared by every test module (keep each block self-contained).

Environment variables are set here, at collection time, because some libraries read them when
they are first imported: triton decides at `@triton.jit` time whether to use its CPU interpreter.
"""

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DIR = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared"))
TIKTOKEN_CACHE = os.path.join(SHARED_DIR, "tiktoken_cache")

# --- tiktoken: the offline cache of the GPT-2 ranks, when the shared folder is there -------------
if os.path.isdir(TIKTOKEN_CACHE):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)

# --- wandb never reaches the network from tests ---------------------------------------------------
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# --- Triton interpreter on machines without CUDA ---------------------------------------------------
# Triton decides interpreter vs. GPU when a kernel is decorated with @triton.jit, i.e. when
# fused_kernels/attention_kernels.py is first imported (possibly lazily, through attention_variants / model).
# Setting the variable at collection time, before any test module is imported, makes the
# kernels run on CPU tensors in CI.
try:
    import torch
    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


# --- helpers for tests that need the shared data or the tokenizer ----------------------------------
def shared_path(*parts):
    """Path under ../shared, or skip the test (with the reason) on a clone without it."""
    path = os.path.join(SHARED_DIR, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (the shared data folder sits beside the repo only in this workplace)")
    return path


def needs_tokenizer():
    """Skip when the GPT-2 BPE cannot be loaded (no network and no tiktoken cache)."""
    from runtime.cli import UserError
    from runtime.tokenizer import get_tokenizer
    try:
        get_tokenizer()
    except UserError as e:
        pytest.skip(f"GPT-2 tokenizer unavailable offline: {e}")


# --- two-process training runs ----------------------------------------------------------------------
def run_torchrun(args, env, timeout=180, nproc=2):
    """`torchrun --standalone --nproc_per_node=NPROC train.py ARGS` in its own session.

    On timeout torchrun gets SIGTERM, which it passes on to its workers (each in a session of its own,
    out of reach of a kill of torchrun's group), killing them after its shutdown timeout; the test then
    fails with the tail of what was printed. Workers left running would load the rest of the suite.
    """
    import signal
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py", *args]
    p = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = "", "(torchrun did not stop within 60 s of SIGTERM; killed it)"
        pytest.fail(f"torchrun did not exit within {timeout} s\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)

