"""Small pieces shared by every script: user-facing errors, atomic writes, run metadata.

Every command-line script wraps its `main` with `cli_main`, so that a `UserError` raised anywhere
(bad path, corrupt checkpoint, unknown config key, ...) ends the program with a one-line
`error: ...` on stderr and exit status 2, never a traceback from deep inside torch.
"""

import contextlib
import datetime
import errno
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile


class UserError(Exception):
    """An error caused by the user's input; its message says what is wrong and how to fix it.

    `exit_status` is the program's exit status (2 unless a subclass says otherwise)."""
    exit_status = 2


def cli_main(main, argv=None):
    """Run `main(argv)` and turn UserError / Ctrl-C into a clean exit."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


# ---------------------------------------------------------------------------------------------- safe writing
# Temporary files and directories are named .NAME.HOST.PID.RANDOM.tmp beside NAME, so that the
# leftovers of a killed process can be told apart from the live temporaries of a concurrent one.
HOST = re.sub(r"[^A-Za-z0-9-]", "-", platform.node() or "localhost")
_TEMP = re.compile(r"\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.(tmp|old)$")


def umask():
    """The process umask (Linux reports it in /proc without the race of setting and restoring it)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _os_reason(e):
    reason = e.strerror or one_line(e) or type(e).__name__
    if e.errno == errno.ENOTDIR and e.filename:
        reason += f" (a component of {e.filename} is a file, not a directory)"
    elif e.errno == errno.EEXIST and e.filename:
        reason += f" ({e.filename} is a file, not a directory)"
    return reason


def write_error(path, e):
    """The UserError for an OSError met while writing `path`: one line, no traceback."""
    return UserError(f"cannot write {path}: {_os_reason(e)}; nothing was written there (free some space, fix "
                     f"the permissions or choose another location)")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(directory, name):
    """Remove the temporaries of NAME in `directory` left by killed processes of this host."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            m = _TEMP.search(entry)
            if not (m and entry.startswith(f".{name}.") and len(entry) == len(name) + 1 + len(m.group(0))):
                continue
            if m["host"] != HOST or _pid_alive(int(m["pid"])):
                continue
            full = os.path.join(directory, entry)
            with contextlib.suppress(OSError):
                shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)


def _temp_prefix(path):
    return f".{os.path.basename(path)}.{HOST}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is renamed over `path`, else removed.

    The rename is atomic on POSIX, so a reader (or a crash at any moment) sees either the old
    file or the complete new one, never a half-written file. The file gets the mode the umask
    gives a new file (mkstemp alone would make it 0600, unreadable to others on a shared disk).
    An OSError (read-only or full filesystem, a path under a regular file) becomes a UserError.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        remove_stale_temps(directory, os.path.basename(path))
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o666 & ~umask())
        finally:
            os.close(fd)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        with open(tmp, "rb") as f:  # make the bytes durable before they replace the old file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory beside `path`; renamed to `path` on success (replacing an old
    one), removed on failure. Mode and errors as for atomic_path."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(parent, os.path.basename(path))
        tmp = tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=parent)
        os.chmod(tmp, 0o777 & ~umask())
    except OSError as e:
        raise write_error(path, e) from None
    old = None
    try:
        yield tmp
        if os.path.exists(path):
            old = tmp[:-len(".tmp")] + ".old"
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        if old and not os.path.lexists(path):  # the new one did not land: put the previous one back
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def check_writable_dir(path, what="output directory"):
    """UserError now, before any long work, when no file can be written in directory `path`.

    Creates the missing directories and writes and fsyncs a small probe file (a full disk fails
    there), then removes everything it created: a run that fails later leaves no empty folders.
    """
    path = os.path.abspath(os.fspath(path))
    created, p = [], path
    while not os.path.lexists(p) and os.path.dirname(p) != p:
        created.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(os.path.join(path, "probe")), suffix=".tmp", dir=path)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise UserError(f"{what} {path} is not writable: {_os_reason(e)}; fix the permissions, free some space "
                        f"or choose another location") from None
    finally:
        for d in created:
            with contextlib.suppress(OSError):
                os.rmdir(d)
    return path


LOCK_NAME = "train.lock"


@contextlib.contextmanager
def directory_lock(directory, what="run"):
    """Hold an exclusive lock on `directory` (flock on DIRECTORY/train.lock, which names the holder)
    for the duration of the block; UserError at once when another process holds it.

    The kernel releases an flock when its holder dies, so the lock of a killed run is never stale:
    its leftover file is simply locked again. The file is removed on release; a second open of a
    file that was removed meanwhile is detected (by inode) and retried.
    """
    import fcntl
    directory = os.path.abspath(directory)
    path = os.path.join(directory, LOCK_NAME)
    created = not os.path.lexists(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "a process that has not said who it is"
                os.close(fd)
                raise UserError(f"{directory} is in use by another {what} ({holder}); two runs in one directory "
                                f"would mix their checkpoints and logs: wait for it to end, stop it, or choose "
                                f"another --out_dir") from None
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder removed the file between our open and flock: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"host {platform.node()} pid {os.getpid()} since "
                     f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n".encode())
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only when nothing else was written into it


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def json_text(obj):
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def atomic_write_json(path, obj):
    atomic_write_text(path, json_text(obj))


def atomic_write_texts(files):
    """Write {path: text} so that either every file is replaced or none is: all temporaries are
    written before the first rename (a full disk stops the batch with the old files intact)."""
    with contextlib.ExitStack() as stack:
        for path, text in files.items():
            tmp = stack.enter_context(atomic_path(path))
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)


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
