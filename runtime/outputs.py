"""Owned outputs: a script replaces only files it wrote itself, recorded in a manifest beside them, and
writes a result set all or nothing (staged, then moved in, the previous set put back on failure)."""

import contextlib
import os
import re
import shutil
import tempfile

from runtime.cli import UserError
from runtime.files import (atomic_write_json, check_writable_dir, os_reason, read_json_file, remove_stale_temps,
                           temp_prefix, write_error)

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
        staging = tempfile.mkdtemp(prefix=temp_prefix(os.path.join(path, slug)), suffix=".tmp", dir=path)
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
    return UserError(f"cannot write {target}: {os_reason(e)}; nothing in {path} was changed (the files there before "
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
            raise UserError(f"cannot write {target}: {os_reason(e) if isinstance(e, OSError) else e}; the "
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
