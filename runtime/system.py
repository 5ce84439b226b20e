"""The machine a run uses and the record of it: devices and dtypes chosen by name, memory checks, and the
metadata (command, commit, versions, hardware) every result file carries."""

import contextlib
import datetime
import os
import platform
import re
import subprocess
import sys

from runtime.cli import UserError


def memory_bytes(device):
    """Total memory of `device` in bytes (the GPU's, or the machine's RAM), or None if unknown."""
    if str(device).startswith("cuda"):
        import torch
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_fits(nbytes, device, what, fix):
    """UserError when `nbytes` (an estimate) exceeds the device's whole memory: the allocator would fail."""
    total = memory_bytes(device)
    if total is not None and nbytes > total:
        raise UserError(f"{what} needs about {nbytes / 2**30:,.1f} GiB, more than the {total / 2**30:,.1f} GiB of "
                        f"{'GPU' if str(device).startswith('cuda') else 'RAM'} memory here; {fix}")


def git_commit(repo_dir=None):
    """The current git commit (with '-dirty' if the tree has changes), or None outside git."""
    repo_dir = repo_dir or os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device=None):
    """Human-readable name of the accelerator in use ('cpu' when there is none)."""
    import torch
    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        return torch.cuda.get_device_name(torch.device(device) if device else None)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_metadata(device=None):
    """Everything needed to trace a number back to how it was made (llm.c / modded-nanogpt style)."""
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "cwd": os.getcwd(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "gpu": device_name(device),
        "hostname": platform.node(),
    }


def resolve_device(device):
    """'auto' -> 'cuda' when available else 'cpu'; validates explicit choices."""
    import torch
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m:
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but CUDA is not available; use --device cpu")
        if m[1] is not None and int(m[1]) >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return device
    if device == "mps":  # Apple GPUs: neither the Triton kernel nor these scripts are tested there
        raise UserError("device 'mps' is not supported by these scripts; use --device cpu")
    if device != "cpu":
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    return device


def resolve_dtype(dtype, device):
    """'auto' -> bfloat16 on GPUs that support it (else float16), float32 on CPU."""
    import torch
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype in (None, "auto"):
        if str(device).startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}; choose one of auto, float32, bfloat16, float16")
    return names[dtype]


def autocast_context(device, dtype):
    """bf16/fp16 autocast on the device when dtype asks for it; nothing for float32 (or None)."""
    import torch
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
