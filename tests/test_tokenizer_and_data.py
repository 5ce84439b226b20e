"""The repo's one tokenizer and its token-file helpers."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, needs_tokenizer
from runtime import token_data as data
from runtime.cli import UserError
from runtime.token_data import input_tokens, load_tokens, read_text_file, tokens_from_text, write_tokens


def test_gpt2_token_ids():
    needs_tokenizer()
    from runtime.tokenizer import EOT_TOKEN, decode, encode
    assert encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert encode("<|endoftext|>") != [EOT_TOKEN]  # special text is ordinary text
    text = "Summer is warm. Winter is cold.\n\n  Ünïcödé ✓"
    assert decode(encode(text)) == text
    assert tokens_from_text("Hi", add_eot=True)[-1] == EOT_TOKEN


def test_offline_without_cache_says_how_to_fix(tmp_path):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path),
           # an unreachable proxy makes the download fail even on a machine with network
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    code = "from runtime.cli import cli_main\nfrom runtime.tokenizer import get_tokenizer\ncli_main(lambda a: get_tokenizer() and 0)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "TIKTOKEN_CACHE_DIR" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_token_files(tmp_path):
    ids = np.array([0, 1, 50256, 65535])
    write_tokens(tmp_path / "a.bin", ids)
    assert load_tokens(tmp_path / "a.bin").tolist() == ids.tolist()
    with pytest.raises(UserError, match="does not fit uint16"):
        write_tokens(tmp_path / "b.bin", [1, 65536])
    assert not (tmp_path / "b.bin").exists() and sorted(os.listdir(tmp_path)) == ["a.bin"]
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(UserError, match="whole number"):
        load_tokens(tmp_path / "odd.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        load_tokens(tmp_path / "empty.bin")
    with pytest.raises(UserError, match="prepare_data.py"):
        load_tokens(tmp_path / "missing.bin")


def test_text_files(tmp_path):
    (tmp_path / "t.txt").write_text("héllo", encoding="utf-8")
    assert read_text_file(tmp_path / "t.txt") == "héllo"
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        read_text_file(tmp_path / "blank.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="UTF-8"):
        read_text_file(tmp_path / "bin.txt")
    # universal newlines; errors name what the file is
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\rc\n")
    assert read_text_file(tmp_path / "crlf.txt") == "a\nb\nc\n"
    with pytest.raises(UserError, match="^input .*blank.txt is empty"):
        read_text_file(tmp_path / "blank.txt", what="input")
    with pytest.raises(UserError, match="^text file .*missing.txt does not exist"):
        read_text_file(tmp_path / "missing.txt")


def test_input_tokens(tmp_path):
    needs_tokenizer()
    write_tokens(tmp_path / "a.bin", [5, 6, 7])
    got = input_tokens(data=tmp_path / "a.bin")
    assert isinstance(got, np.memmap) and got.tolist() == [5, 6, 7]  # mapped, not copied
    (tmp_path / "t.txt").write_text("Hello world", encoding="utf-8")
    assert input_tokens(text_file=tmp_path / "t.txt").tolist() == [15496, 995]
    assert input_tokens(text="Hello world").dtype == np.int64
    with pytest.raises(ValueError):
        input_tokens(data=tmp_path / "a.bin", text="x")


def test_wikitext2_goes_through_the_one_hub_id(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(name, config=None, **kw):
        calls.append((name, config, kw.get("split")))
        return {"text": [" = A = \n", "line\n"]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert data.wikitext2_split("validation") == [" = A = \n", "line\n"]
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "validation")] and data.WIKITEXT2[0] == "Salesforce/wikitext"
    with pytest.raises(UserError, match="unknown WikiText-2 split"):
        data.wikitext2_split("valid")


def test_hub_failure_is_one_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'x' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as e:
        data.load_hf_dataset("org/x", "cfg", what="--dataset x", instead="pass --text_file FILE", split="test")
    msg = str(e.value)
    assert msg.startswith("--dataset x needs the Hugging Face Hub (network)") and "\n" not in msg
    assert "org/x cfg (split test)" in msg and msg.endswith("(pass --text_file FILE)")
