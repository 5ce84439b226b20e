"""requirements.lock: exact pins of everything `make install` installs but torch and triton (TORCH_SPEC), and
a venv installed with it holds exactly those versions."""

import importlib.metadata
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNLOCKED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|pip|setuptools|wheel)$")  # TORCH_SPEC's, CUDA-only, tooling


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins():
    pins = {}
    with open(os.path.join(ROOT, "requirements.lock"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^=;\s]+)", line)
                assert m, f"requirements.lock: {line!r} is not an exact name==version pin"
                pins[canonical(m[1])] = m[2]
    return pins


def requirement_names(path):
    names = set()
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                names.add(canonical(re.match(r"[A-Za-z0-9._-]+", line)[0]))
    return names


def test_lock_pins_every_direct_requirement_but_torch_and_triton():
    pins = lock_pins()
    direct = requirement_names("requirements.txt") | requirement_names("requirements-test.txt")
    assert direct - {"torch", "triton"} <= set(pins), f"unpinned: {sorted(direct - {'torch', 'triton'} - set(pins))}"
    assert not [n for n in pins if UNLOCKED.match(n)], "torch, triton and CUDA-only packages are TORCH_SPEC's"


def test_installed_versions_are_the_locked_ones():
    """Run inside the venv `make install` made: every installed distribution but torch and triton is in the
    lock, at its pinned version (what `pip freeze` would list)."""
    marker = os.path.join(sys.prefix, ".installed")
    if not os.path.isfile(marker):
        pytest.skip("not running in a venv made by `make install`")
    with open(marker, encoding="utf-8") as f:
        if f.read().strip() != "lock=1":
            pytest.skip("this venv was installed without the lock (make test-latest / LOCK=0)")
    pins = lock_pins()
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    unpinned = sorted(n for n in installed if n not in pins and not UNLOCKED.match(n))
    wrong = {n: (installed[n], pins[n]) for n in installed if n in pins and installed[n] != pins[n]}
    assert not unpinned, f"installed but not in requirements.lock: {unpinned}"
    assert not wrong, f"installed version differs from the lock (installed, locked): {wrong}"
