"""Files written whole or not at all (atomic renames, named temporaries a killed process leaves
recognisable), checked readers of the JSON files the scripts exchange, and the lock of a run directory."""

import contextlib
import datetime
import errno
import json
import math
import os
import platform
import re
import shutil
import stat
import tempfile

from runtime.cli import UserError, one_line

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


def os_reason(e):
    reason = e.strerror or one_line(e) or type(e).__name__
    if e.errno == errno.ENOTDIR and e.filename:
        reason += f" (a component of {e.filename} is a file, not a directory)"
    elif e.errno == errno.EEXIST and e.filename:
        reason += f" ({e.filename} is a file, not a directory)"
    return reason


def write_error(path, e):
    """The UserError for an OSError met while writing `path`: one line, no traceback."""
    return UserError(f"cannot write {path}: {os_reason(e)}; nothing was written there (free some space, fix "
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


def temp_prefix(path):
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
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=directory)
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
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(os.path.join(path, "probe")), suffix=".tmp", dir=path)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise UserError(f"{what} {path} is not writable: {os_reason(e)}; fix the permissions, free some space "
                        f"or choose another location") from None
    finally:
        for d in created:
            with contextlib.suppress(OSError):
                os.rmdir(d)
    return path


def read_json_file(path, what="file"):
    """The parsed JSON of `path`; a one-line UserError naming the file when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark, as some editors write, is no damage
            return json.load(f)
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a JSON file; move it away") from None
    except RecursionError:
        raise UserError(f"{what} {path} is nested too deeply to be one these scripts wrote; move it away") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start}); it is damaged: restore it or move it "
                        f"away") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); it is "
                        f"truncated or damaged: restore it or move it away") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {os_reason(e)}") from None


def read_jsonl_file(path, what="log"):
    """The records of a JSON-lines file, in order; a line that does not parse (the last one of a run killed
    while writing) is skipped. A one-line UserError when the file cannot be read."""
    records = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if isinstance(rec, dict):
                        records.append(rec)
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a JSON-lines file; move it away") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {os_reason(e)}") from None
    return records


def not_a_file(path):
    """Why `path` cannot be read as an input file ('does not exist', 'is a directory, not a file', ...), or None
    when it is a regular file (or a link to one)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({os_reason(e)})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):  # reading one blocks until someone writes, and can be done once
        return ("is a named pipe (FIFO), not a regular file: these scripts read an input more than once; write it to "
                "a file first")
    return "is a device or socket, not a regular file"


def check_regular_file(path, what="file"):
    """UserError when `path` exists but is not a regular file (a directory in its place, say)."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UserError(f"{what} {path} is not a regular file (a directory?); move it away")
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


def _json_default(x):
    if hasattr(x, "tolist"):  # numpy / torch scalars and arrays
        return x.tolist()
    return str(x)


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
