"""Small pieces shared by every script: user-facing errors, atomic writes, run metadata.

Every command-line script wraps its `main` with `cli_main`, so that a `UserError` raised anywhere
(bad path, corrupt checkpoint, unknown config key, ...) ends the program with a one-line
`error: ...` on stderr and exit status 2, never a traceback from deep inside torch.
"""

import argparse
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (an unknown option, an invalid choice, a value of the wrong type) are the
    scripts' one line `error: ...` with exit status 2 (a UserError for cli_main), not a usage block."""

    def error(self, message):
        raise UserError(f"{message} (python {self.prog} --help lists the options)")


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


# ---------------------------------------------------------------------------------------------- owned outputs
# A script writes only its own files into an output directory and replaces only files it wrote there
# before: OUTPUTS_MANIFEST names, per tool, the files it wrote, with their size and modification time when
# written. A file that is not in its tool's list, or that changed since, is someone else's (a training run,
# a user's notes, another tool's results): it is never replaced or deleted, and a collision is refused.
OUTPUTS_MANIFEST = ".outlier-gpt-outputs.json"


def _plain_name(name):
    """A file name of the directory itself: no separator, not '.' or '..', not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def read_manifest(directory):
    """{tool: {file name: [size, mtime_ns] when written}} of the outputs recorded in `directory` ({} when
    there is no manifest). Names that are not plain file names of the directory are refused: a manifest
    must never make a script delete a file elsewhere."""
    path = os.path.join(directory, OUTPUTS_MANIFEST)
    if not os.path.lexists(path):
        return {}
    doc = read_json_file(path, "output manifest")
    tools = doc.get("tools") if isinstance(doc, dict) else None
    if not isinstance(tools, dict) or not all(isinstance(v, dict) and isinstance(v.get("files"), list)
                                              for v in tools.values()):
        raise UserError(f"{path} is not an outlier-gpt output manifest; move it away (the files it would name "
                        f"are then treated as not written by these scripts)")
    owned = {}
    for tool, entry in tools.items():
        bad = [n for n in entry["files"] if not _plain_name(n)]
        if bad:
            raise UserError(f"{path} names {bad[0]!r}, which is not a file of {directory}; these scripts never wrote "
                            f"it: move the manifest away")
        stats = entry.get("stat") if isinstance(entry.get("stat"), dict) else {}
        owned[tool] = {n: stats.get(n) for n in entry["files"]}
    return owned


def _write_manifest(directory, owned):
    atomic_write_json(os.path.join(directory, OUTPUTS_MANIFEST),
                      {"format": "outlier-gpt-outputs", "version": 1,
                       "tools": {tool: {"files": sorted(files), "stat": {n: files[n] for n in sorted(files)}}
                                 for tool, files in sorted(owned.items()) if files}})


def file_stat(path):
    """[size, mtime_ns]: what a manifest (or train.py's run.json) records of a file it wrote."""
    st = os.lstat(path)
    return [st.st_size, st.st_mtime_ns]


def unchanged_since(directory, name, recorded):
    """Whether the file `name` is still the one recorded by file_stat (None: recorded before it was written),
    or is gone. A record that is not a file_stat (a damaged or crafted one) matches no file."""
    try:
        return recorded is None or file_stat(os.path.join(directory, name)) == list(recorded)
    except FileNotFoundError:
        return True
    except TypeError:
        return False


def check_output_dir(out, tool, names, inputs=(), flag="--out", may_replace=()):
    """The absolute output directory, after checking (before any long work) that `tool` may write the files
    `names` into it; else a one-line UserError naming the fix.

    Refused: an empty path, the filesystem root, a path that is one of `inputs` (or whose outputs would
    replace one), an existing file, a target that is a directory, and a target that exists but was not
    written there by `tool`, or changed since (unless it is in `may_replace`, which the user asked for, e.g.
    --overwrite).
    """
    if out is None or not str(out).strip():
        raise UserError(f"{flag} is empty; name the output directory (a new one, or one this script wrote before)")
    path = os.path.abspath(os.fspath(out))
    if os.path.dirname(path) == path:
        raise UserError(f"{flag} {out} is the filesystem root; name a directory of its own for the outputs")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {out} exists and is not a directory; choose a directory")
    _check_not_an_input(out, path, names, inputs, flag)
    owned = read_manifest(path) if os.path.isdir(path) else {}
    for name in names:
        target = os.path.join(path, name)
        if os.path.isdir(target) and not os.path.islink(target):
            raise UserError(f"{target} is a directory, where {tool} writes a file; move it away or choose "
                            f"another {flag}")
        if os.path.lexists(target) and name not in may_replace:
            _check_owned(path, name, tool, owned, flag)
    return check_writable_dir(path, flag)


def _check_not_an_input(out, path, names, inputs, flag):
    real = os.path.realpath(path)
    targets = {os.path.realpath(os.path.join(path, n)): n for n in names}
    for given in inputs:
        if given is None:
            continue
        inp = os.path.realpath(os.fspath(given))
        if inp == real:
            raise UserError(f"{flag} {out} is one of the inputs ({given}); choose another output directory")
        if inp in targets:
            raise UserError(f"{flag} {out}: writing {targets[inp]} there would replace the input {given}; choose "
                            f"another output directory")


def _check_owned(path, name, tool, owned, flag):
    """UserError unless the existing file `name` is one `tool` wrote there and nobody changed since."""
    target = os.path.join(path, name)
    mine = owned.get(tool, {})
    if name in mine and unchanged_since(path, name, mine[name]):
        return
    if name in mine:
        what = f"was changed since {tool} wrote it"
    else:
        by = next((t for t, files in owned.items() if name in files and unchanged_since(path, name, files[name])), None)
        what = f"was written by {by}" if by else f"was not written there by {tool}"
    raise UserError(f"{target} exists and {what}; it is left alone: move it away, or choose another {flag} "
                    f"(a new directory, or one {tool} wrote before)")


def _tool_slug(tool):
    return re.sub(r"[^A-Za-z0-9-]+", "-", tool).strip("-") or "outputs"


@contextlib.contextmanager
def output_set(out, tool, names, inputs=(), flag="--out", may_replace=(), keep_previous=False):
    """Yield a staging directory; the files written into it become `tool`'s outputs in `out`, all or none.

    `names` are the files the tool may write (checked now, before the work, by check_output_dir); what is
    staged must be among them. On success the staged files replace their targets by renames (in the order of
    `names`), outputs of the tool's previous set that the new set lacks are removed (only those it wrote and
    nobody changed), and the manifest records the new set. If any rename fails, the previous files are put
    back: the previous set stays whole. keep_previous=True adds the set to the tool's earlier outputs instead
    (results that accumulate, such as the benchmarks' time-stamped files).
    On any failure nothing in `out` changes, and a directory this call created is removed again.
    """
    path = check_output_dir(out, tool, names, inputs, flag, may_replace)
    created = not os.path.lexists(path)
    slug = _tool_slug(tool)
    try:
        os.makedirs(path, exist_ok=True)
        remove_stale_temps(path, slug)
        staging = tempfile.mkdtemp(prefix=_temp_prefix(os.path.join(path, slug)), suffix=".tmp", dir=path)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        try:
            yield staging
        except OSError as e:  # a write into the staging directory failed (a full disk): out is as it was
            raise _staging_error(path, staging, e) from None
        present = os.listdir(staging)
        staged = [n for n in names if n in present]  # in the declared order
        unexpected = sorted(set(present) - set(names))
        if unexpected:
            raise ValueError(f"{tool} staged files it did not declare: {unexpected}")
        check_output_dir(out, tool, staged, inputs, flag, may_replace)  # a collision may have appeared meanwhile
        _commit_outputs(path, tool, staging, staged, names, keep_previous)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only when nothing landed


def _staging_error(path, staging, e):
    """The UserError for an OSError met while a tool wrote its outputs into `staging` inside `path`."""
    inside = isinstance(e.filename, str) and os.path.dirname(os.path.abspath(e.filename)) == os.path.abspath(staging)
    name = os.path.basename(e.filename) if inside else None
    target = os.path.join(path, name) if name else f"the outputs into {path}"
    return UserError(f"cannot write {target}: {_os_reason(e)}; nothing in {path} was changed (the files there before "
                     f"are kept): free some space, fix the permissions or choose another location")


def _commit_outputs(path, tool, staging, staged, declared, keep_previous=False):
    """Move the staged files into `path` in their declared order. The previous files are first moved
    aside, then the new ones moved in: a crash midway leaves a file missing rather than an old file beside
    new ones (prepare_data's meta.json, last, describes the .bin files)."""
    slug = _tool_slug(tool)
    try:
        for name in staged:  # durable before they replace anything
            with open(os.path.join(staging, name), "rb") as f:
                os.fsync(f.fileno())
        # the previous files wait in a folder of a visible name that no clean-up removes, unique to this
        # commit: what a killed process leaves there is never deleted unseen, nor reused by another
        backups = tempfile.mkdtemp(prefix=f"{slug}-previous-", dir=path)
    except OSError as e:
        raise write_error(path, e) from None
    had_manifest = os.path.lexists(os.path.join(path, OUTPUTS_MANIFEST))
    before = read_manifest(path)
    mine = before.get(tool, {})
    # only what this tool wrote (a declared name, unchanged since) may be removed as the previous set's
    previous = {n for n, st in mine.items() if n in declared and unchanged_since(path, n, st)}
    # record the union first: after a crash midway, every file of either set is still known as ours
    _write_manifest(path, {**before, tool: {**mine, **{n: None for n in staged}}})
    aside, moved_in, target = [], [], path
    try:
        for name in staged:
            target = os.path.join(path, name)
            if os.path.lexists(target):
                os.rename(target, os.path.join(backups, name))
                aside.append(name)
        for name in staged:
            target = os.path.join(path, name)
            os.rename(os.path.join(staging, name), target)
            moved_in.append(name)
    except BaseException as e:
        kept = _put_back(path, backups, moved_in, aside)
        with contextlib.suppress(UserError, OSError):
            _write_manifest(path, before) if had_manifest else os.remove(os.path.join(path, OUTPUTS_MANIFEST))
        if kept:
            raise UserError(f"cannot write {target}: {_os_reason(e) if isinstance(e, OSError) else e}; the "
                            f"previous {', '.join(kept)} could not be put back either and are kept in "
                            f"{backups}: move them back by hand") from None
        shutil.rmtree(backups, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(target, e) from None
        raise
    shutil.rmtree(backups, ignore_errors=True)
    if not keep_previous:
        for name in previous - set(staged):  # the previous set's files the new one does not have
            with contextlib.suppress(OSError):
                os.remove(os.path.join(path, name))
    written = {n: file_stat(os.path.join(path, n)) for n in staged}
    kept_entries = {n: st for n, st in mine.items() if n in previous and n not in written} if keep_previous else {}
    # the staged names are this tool's now, whatever another tool's entry said of a file that was gone
    others = {t: {n: st for n, st in files.items() if n not in written} for t, files in before.items() if t != tool}
    _write_manifest(path, {**others, tool: {**kept_entries, **written}})


def _put_back(path, backups, moved_in, aside):
    """Undo a partial commit: remove the new files moved in, return the previous ones. The names that could
    not be returned are kept in `backups` (renamed to a name no clean-up removes) and returned."""
    for name in moved_in:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(path, name))
    stuck = []
    for name in aside:
        try:
            os.rename(os.path.join(backups, name), os.path.join(path, name))
        except OSError:
            stuck.append(name)
    return stuck


# ---------------------------------------------------------------------------------------------- checked readers

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
        raise UserError(f"cannot read {what} {path}: {_os_reason(e)}") from None


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
        raise UserError(f"cannot read {what} {path}: {_os_reason(e)}") from None
    return records


def not_a_file(path):
    """Why `path` cannot be read as an input file ('does not exist', 'is a directory, not a file', ...), or None
    when it is a regular file (or a link to one)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({_os_reason(e)})"
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


# ---------------------------------------------------------------------------------------------- argument checks
SEED_MAX = 2**32 - 1  # numpy's legacy seeding takes 32 bits; torch takes 64


def is_int(x):
    """An int that is not a bool (JSON and pickles give True where a count was meant)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x):
    """An int or float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def add_to_registry(registry, entry, kind):
    """Add a named entry (an attention variant, a compression method) to its registry; a taken name is an error."""
    if entry.name in registry:
        raise ValueError(f"{kind} {entry.name!r} is already registered")
    registry[entry.name] = entry
    return entry


def check_seed(seed, flag="--seed"):
    if not is_int(seed) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"{flag} must be an integer from 0 to {SEED_MAX}, got {seed}")
    return seed


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
