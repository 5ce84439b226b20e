"""Small pieces shared by every script: user-facing errors, atomic writes, run metadata.

Every command-line script wraps its `main` with `cli_main`, so that a `UserError` raised anywhere
(bad path, corrupt checkpoint, unknown config key, ...) ends the program with a one-line
`error: ...` on stderr and exit status 2, never a traceback from deep inside torch.
"""

import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile


class UserError(Exception):
    """An error caused by the user's input; its message says what is wrong and how to fix it."""


def cli_main(main, argv=None):
    """Run `main(argv)` and turn UserError / Ctrl-C into a clean exit."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is renamed over `path`, else removed.

    The rename is atomic on POSIX, so a reader (or a crash at any moment) sees either the old
    file or the complete new one, never a half-written file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # make the bytes durable before they replace the old file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(x):
    if hasattr(x, "tolist"):  # numpy / torch scalars and arrays
        return x.tolist()
    return str(x)


def one_line(e, limit=300):
    """An exception's message on one line (whitespace collapsed), at most `limit` characters."""
    text = " ".join(str(e).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def json_safe(x):
    """`x` with every NaN / inf float replaced by None (and numpy scalars by Python numbers), so that
    json.dumps(..., allow_nan=False) accepts it: strict JSON has no NaN or Infinity."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", None) == 0:  # numpy / torch scalars
        return json_safe(x.item())
    return x


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
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if not (str(device) in ("cpu", "mps") or str(device).startswith("cuda")):
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    return str(device)


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
