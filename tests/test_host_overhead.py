"""benchmarks/host_overhead.py on CPU (stubbed kernel launches): the one-line JSON other scripts read."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = ["-m", "benchmarks.host_overhead"]  # run from the repo root


def _run(*args):
    return subprocess.run([sys.executable, *MODULE, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cpu_run_prints_one_json_line(tmp_path):
    out = tmp_path / "host.json"
    proc = _run("--device", "cpu", "--seq_lens", "64", "128", "--tokens", "256", "--calls", "30", "--repeats", "2",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]
    data = json.loads(lines[0])
    rows = data["by_seq_len"]
    assert [(r["B"], r["T"]) for r in rows] == [(4, 64), (2, 128)]
    for key in ("fwd_us", "fwd_bwd_us", "floor_fwd_us", "floor_fwd_bwd_us"):
        assert math.isfinite(data[key]) and data[key] > 0, key
        assert data[key] == max(r[key] for r in rows), key
    assert data["fwd_bwd_us"] > data["fwd_us"] and data["floor_fwd_bwd_us"] > data["floor_fwd_us"]
    for r in rows:
        assert r["fwd_vs_floor"] == r["fwd_us"] / r["floor_fwd_us"]
    assert data["fwd_bwd_vs_floor"] == max(r["fwd_bwd_us"] / r["floor_fwd_bwd_us"] for r in rows)
    # every timed launch took the launch cache's direct path
    assert data["launches_through_triton"] == 0 and all(r["launches_through_triton"] == 0 for r in rows)
    assert data["device"] == "cpu" and data["launch"] == "stub" and data["triton"] and data["torch"]
    assert json.loads(out.read_text()) == data


@pytest.mark.slow
def test_cuda_request_without_cuda_is_one_line_error():
    import torch
    if torch.cuda.is_available():
        return
    proc = _run("--device", "cuda")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
