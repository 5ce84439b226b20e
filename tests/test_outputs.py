"""runtime.outputs.output_set: a tool replaces only the files it wrote into a directory, as a whole set or not at all."""

import errno
import json
import os

import pytest

from runtime import files
from runtime.cli import UserError
from runtime.outputs import OUTPUTS_MANIFEST, output_set


def write(tool, out, files, **kw):
    with output_set(out, tool, kw.pop("names", sorted(files)), **kw) as tmp:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)


def files_in(d):
    return {n: open(os.path.join(d, n)).read() for n in os.listdir(d)
            if n != OUTPUTS_MANIFEST and os.path.isfile(os.path.join(d, n))}


def test_a_set_replaces_only_its_own_files(tmp_path):
    out = tmp_path / "o"
    write("tool", out, {"a.md": "1", "b.json": "1"})
    (out / "mine.txt").write_text("user")
    write("tool", out, {"a.md": "2"}, names=["a.md", "b.json"])  # b.json was ours and is not in the new set
    assert files_in(out) == {"a.md": "2", "mine.txt": "user"}
    tools = json.loads((out / OUTPUTS_MANIFEST).read_text())["tools"]
    st = os.stat(out / "a.md")
    assert tools == {"tool": {"files": ["a.md"], "stat": {"a.md": [st.st_size, st.st_mtime_ns]}}}
    with pytest.raises(UserError, match="was not written there by tool"):
        write("tool", out, {"mine.txt": "overwritten"})
    with pytest.raises(UserError, match="was written by tool"):
        write("other", out, {"a.md": "3"})
    assert files_in(out) == {"a.md": "2", "mine.txt": "user"}


@pytest.mark.parametrize("out, match", [("", "is empty"), ("/", "filesystem root")])
def test_empty_and_root_are_refused(out, match):
    with pytest.raises(UserError, match=match):
        write("tool", out, {"a": "x"})


def test_an_input_is_never_an_output(tmp_path):
    src = tmp_path / "a.md"
    src.write_text("input")
    with pytest.raises(UserError, match="would replace the input"):
        write("tool", tmp_path, {"a.md": "x"}, inputs=[src])
    with pytest.raises(UserError, match="is one of the inputs"):
        write("tool", tmp_path, {"b.md": "x"}, inputs=[tmp_path])
    assert src.read_text() == "input"


def test_failed_move_puts_the_previous_set_back(tmp_path, monkeypatch):
    out = tmp_path / "o"
    write("tool", out, {"a": "old a", "b": "old b", "c": "old c"})
    manifest = (out / OUTPUTS_MANIFEST).read_bytes()
    rename = os.rename

    def fails_on_c(src, dst):
        if os.path.basename(dst) == "c" and os.path.dirname(os.path.abspath(dst)) == str(out):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return rename(src, dst)
    monkeypatch.setattr(os, "rename", fails_on_c)  # persistent: c's old file cannot go back either
    with pytest.raises(UserError) as e:
        write("tool", out, {"a": "new a", "b": "new b", "c": "new c"})
    # a and b are back; c's previous file is kept where the message says, never deleted
    kept = [d for d in os.listdir(out) if d.startswith("tool-previous-")]
    assert len(kept) == 1 and open(out / kept[0] / "c").read() == "old c"
    assert f"kept in {out / kept[0]}" in str(e.value)
    assert {k: v for k, v in files_in(out).items() if k in "ab"} == {"a": "old a", "b": "old b"}
    assert (out / OUTPUTS_MANIFEST).read_bytes() == manifest
    monkeypatch.undo()
    write("tool", out, {"a": "x"}, names=["a", "b", "c"])  # a later run is not confused by the kept folder


def test_failure_inside_the_block_changes_nothing(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with output_set(out, "tool", ["a"]) as tmp:
            open(os.path.join(tmp, "a"), "w").write("x")
            raise RuntimeError("the analysis failed")
    assert not out.exists()  # the directory it created is gone again


def test_accumulating_results_keep_earlier_ones(tmp_path):
    write("bench", tmp_path, {"r1.json": "1"}, keep_previous=True)
    write("bench", tmp_path, {"r2.json": "2"}, keep_previous=True)
    assert files_in(tmp_path) == {"r1.json": "1", "r2.json": "2"}


def test_undeclared_files_are_a_bug(tmp_path):
    with pytest.raises(ValueError, match="did not declare"):
        write("tool", tmp_path / "o", {"a": "1", "surprise": "2"}, names=["a"])


def test_a_damaged_manifest_is_refused(tmp_path):
    (tmp_path / OUTPUTS_MANIFEST).write_text("[1, 2")
    with pytest.raises(UserError, match="not valid JSON"):
        write("tool", tmp_path, {"a": "1"})


def test_a_manifest_never_names_a_file_elsewhere(tmp_path):
    """A crafted or copied manifest cannot make a script delete files outside its directory."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "o"
    out.mkdir()
    for name in ("../victim.txt", str(victim), "sub/x", ".."):
        (out / OUTPUTS_MANIFEST).write_text(json.dumps({"tools": {"tool": {"files": [name]}}}))
        with pytest.raises(UserError, match="is not a file of"):
            write("tool", out, {"a": "1"})
    assert victim.read_text() == "precious"


def test_a_file_changed_since_is_not_ours_any_more(tmp_path):
    """Ownership is of the file written, not of the name: a file edited or replaced since is left alone,
    and a name another tool takes over after ours was deleted is that tool's."""
    out = tmp_path / "o"
    write("a", out, {"report.md": "by a"})
    (out / "report.md").write_text("edited by the user, longer")
    with pytest.raises(UserError, match="was changed since a wrote it"):
        write("a", out, {"report.md": "again"})
    (out / "report.md").unlink()
    write("b", out, {"report.md": "by b"})
    with pytest.raises(UserError, match="was written by b"):
        write("a", out, {"report.md": "by a"})
    tools = json.loads((out / OUTPUTS_MANIFEST).read_text())["tools"]
    assert "a" not in tools and tools["b"]["files"] == ["report.md"]  # a wrote nothing else here
    write("a", out, {"other.md": "x"})
    assert (out / "report.md").read_text() == "by b"


def test_backup_folders_are_unique(tmp_path, monkeypatch):
    """A folder of previous files a killed commit left behind is never reused (PIDs repeat in containers)."""
    out = tmp_path / "o"
    write("tool", out, {"a": "first"})
    left = out / f"tool-previous-{files.HOST}-{os.getpid()}"
    left.mkdir()
    (left / "a").write_text("the only copy of an older result")
    write("tool", out, {"a": "second"})
    assert (left / "a").read_text() == "the only copy of an older result"
    assert not [d for d in os.listdir(out) if d.startswith("tool-previous-") and d != left.name]


def test_json_readers_take_a_bom_and_refuse_deep_nesting(tmp_path):
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf{\"a\": 1}")
    assert files.read_json_file(tmp_path / "bom.json") == {"a": 1}
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(UserError, match="nested too deeply"):
        files.read_json_file(tmp_path / "deep.json")
