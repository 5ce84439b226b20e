"""Where reproduce.py runs its stages (the repo root), how it prints paths and commands, the shared
folders it reads, and how it reads the JSON files the stages wrote."""

import os
import shlex
import sys

from runtime.files import read_json_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# shared files: ../shared beside the repo, or a git-ignored ./shared copy carried to a GPU machine
SHARED_DIRS = (os.path.normpath(os.path.join(REPO, "..", "shared")), os.path.join(REPO, "shared"))


def rel(path):
    """`path` relative to the repo root when inside it: commands are printed to be run from there."""
    path = os.path.abspath(path)
    r = os.path.relpath(path, REPO)
    return path if r.startswith("..") else r


def show(cmd):
    """A command as the user would type it from the repo root ('python' for this interpreter)."""
    if cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]:
        cmd = ["torchrun"] + cmd[3:]
    elif cmd[0] == sys.executable:
        cmd = ["python"] + cmd[1:]
    return " ".join(shlex.quote(c) for c in cmd)


def shared(*parts):
    for base in SHARED_DIRS:
        path = os.path.join(base, *parts)
        if os.path.exists(path):
            return path
    return None


def read_json(path, kind=dict):
    """A JSON file a stage wrote, or None where there is none yet, or where it is not a `kind` (damaged:
    the stage runs again and writes it anew)."""
    doc = read_json_file(path) if os.path.lexists(path) else None
    return doc if isinstance(doc, kind) else None
