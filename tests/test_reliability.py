"""The catalogue of bad inputs and faults (tests/FAULTS.md), run row by row.

Each row of FAULTS.md names a scenario (registered with @scenario in tests/faults_training.py,
faults_outputs.py and faults_round3.py; what they share is in faults_common.py). A scenario plants its fault,
runs the script's `main` through `runtime.cli.cli_main` (in process, so the exit status and stderr are the
real ones) and returns (exit status, stderr, {placeholder: value}); the row's expected line, with its
placeholders filled in, must be the one error line of stderr, and its last. Scenarios also check what
must NOT happen (a file overwritten, output or temporaries left behind, work done before a doomed write).
"""

import os
import re

import pytest

import faults_outputs
import faults_round3
import faults_training
import train
from conftest import REPO_ROOT, first_party_sources
from faults_common import FAULTS_MD, SCENARIOS, SLOW, TINY, make_data

SCENARIO_MODULES = (faults_training, faults_outputs, faults_round3)  # importing them registers their scenarios

# ------------------------------------------------------------------------------------------ the catalogue

def catalogue():
    """The rows of FAULTS.md's table: {id: {script, fault, expected, exit, test}}."""
    rows = {}
    with open(FAULTS_MD, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    for line in lines[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split(" | "))))
        rows[cells["id"]] = {**cells, "exit": int(cells["exit"]), "expected": cells["expected"].strip("`")}
    return rows


ROWS = catalogue()


def expected_regex(pattern, values):
    """FAULTS.md's expected line as a regex: `{name}` is values[name], `...` any text."""
    parts = re.split(r"(\{\w+\}|\.\.\.)", pattern)
    out = []
    for part in parts:
        if part == "...":
            out.append(".*?")
        elif re.fullmatch(r"\{\w+\}", part):
            out.append(re.escape(str(values[part[1:-1]])))
        else:
            out.append(re.escape(part))
    return "".join(out)


def test_catalogue_and_scenarios_match():
    here = {k for k, r in ROWS.items() if not r["test"]}
    assert here == set(SCENARIOS), (here ^ set(SCENARIOS))
    assert {fn.__module__ for fn in SCENARIOS.values()} == {m.__name__ for m in SCENARIO_MODULES}
    for key, row in ROWS.items():
        if row["test"]:  # covered by a test elsewhere, which names the row
            path, name = row["test"].split("::")
            with open(os.path.join(REPO_ROOT, "tests", path), encoding="utf-8") as f:
                source = f.read()
            assert f"def {name}(" in source and f"FAULTS: {key}" in source, row


def pytest_generate_tests(metafunc):
    """test_fault's rows, parametrized once the module has run (the scenarios below fill SLOW)."""
    if metafunc.function.__name__ == "test_fault":
        metafunc.parametrize("key", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k
                                     for k in sorted(k for k, r in ROWS.items() if not r["test"])])


def test_fault(key, tmp_path, capsys, monkeypatch, trained):
    code, err, values = SCENARIOS[key](tmp_path=tmp_path, capsys=capsys, monkeypatch=monkeypatch, trained=trained)
    row = ROWS[key]
    assert "Traceback" not in err, err
    assert code == row["exit"], (code, err)
    if row["expected"] == "—":
        assert not [line for line in err.splitlines() if line.startswith("error")], err
    else:  # progress lines may come first; the error is one line, and the last
        lines = err.strip().splitlines()
        assert [line for line in lines if line.startswith("error")] == lines[-1:], err
        assert re.fullmatch(expected_regex(row["expected"], values), lines[-1]), (lines[-1], row["expected"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training to iter 4 (evaluation, telemetry and ckpt.pt at 2 and 4; snapshots ckpt_2/4.pt).
    Scenarios work on copies (`run_copy`)."""
    root = tmp_path_factory.mktemp("trained")
    data_dir = make_data(root / "data")
    out = str(root / "run")
    assert train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4"]) == 0
    return {"data": data_dir, "out": out}


def test_every_from_pretrained_refuses_remote_code():
    """Every transformers Auto*.from_pretrained call of the repo passes trust_remote_code=False (transformers
    would otherwise ask on a terminal, and run the model directory's code on 'y')."""
    calls = []
    for path in first_party_sources():
        source = open(path, encoding="utf-8").read()
        calls += [(path, c) for c in re.findall(r"Auto\w+\.from_pretrained\(([^)]*)\)", source)]
    assert len(calls) >= 3, calls  # config, model, tokenizer
    assert all("trust_remote_code=False" in args or '"trust_remote_code": False' in args or "**kwargs" in args
               for _, args in calls), calls
    from hf import models as hf_models
    assert '"trust_remote_code": False' in open(hf_models.__file__).read()
