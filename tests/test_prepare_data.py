"""prepare_data.py: round trips through the token files, meta.json, the split rule, clear errors, atomicity.

References are independent of the code under test: the token ids are checked against tiktoken's own
`gpt2` encoding (not runtime/tokenizer.py), file hashes against hashlib, the builtin corpus against the
standard-library files read directly.
"""

import hashlib
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import prepare_data
from conftest import REPO_ROOT, needs_tokenizer
from runtime.cli import UserError

EOT = 50256


@pytest.fixture(autouse=True)
def _tokenizer():
    needs_tokenizer()


def reference_encoding():
    import tiktoken
    return tiktoken.get_encoding("r50k_base")  # GPT-2's ranks, loaded directly (not through runtime/tokenizer.py)


def read_ids(path):
    return np.fromfile(path, dtype=np.uint16).astype(np.int64).tolist()


def documents(ids):
    """Split a token list at end-of-text tokens; every document must end with one."""
    assert ids and ids[-1] == EOT
    docs, cur = [], []
    for i in ids:
        if i == EOT:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    return docs


def run_cli(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "prepare_data.py", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


TEXT = "".join(f"Line {i}: the quick brown fox — naïve café {i * i} ✓ <|endoftext|> stays text\n" for i in range(300))


def test_single_text_file_round_trip(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    p = run_cli(["--dataset", "text", "--input", str(src), "--out_dir", str(out), "--val_fraction", "0.2",
                 "--cache_dir", str(tmp_path / "hf"), "--num_proc", "1"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(os.listdir(out)) == [".outlier-gpt-outputs.json", "meta.json", "train.bin", "val.bin"]
    # documented rule: one document, cut after the first line break at or after 80% of its characters
    cut = TEXT.index("\n", int(len(TEXT) * 0.8)) + 1
    enc = reference_encoding()
    train, val = read_ids(out / "train.bin"), read_ids(out / "val.bin")
    assert train == enc.encode_ordinary(TEXT[:cut]) + [EOT]
    assert val == enc.encode_ordinary(TEXT[cut:]) + [EOT]
    assert enc.decode(train[:-1]) + enc.decode(val[:-1]) == TEXT
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 50257 and meta["eot_token"] == EOT and meta["dtype"] == "uint16"
    assert "GPT-2" in meta["tokenizer"]
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert (meta["train_documents"], meta["val_documents"]) == (1, 1)
    for split in ("train", "val"):
        assert meta[f"{split}_sha256"] == hashlib.sha256((out / f"{split}.bin").read_bytes()).hexdigest()
    assert meta["source"]["dataset"] == "text" and meta["source"]["inputs"] == [str(src.resolve())]


def test_folder_is_split_by_documents(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    texts = {}
    for i in range(20):
        path = folder / ("sub" if i % 2 else "") / f"doc{i:02d}.txt"
        texts[str(path.resolve())] = f"Document {i}.\nIt has {'many ' * i}words.\n"
        path.write_text(texts[str(path.resolve())])
    (folder / "notes.md").write_text("not a .txt file: ignored\n")
    (folder / "empty.txt").write_text("   \n")  # whitespace only: skipped
    out = tmp_path / "out"
    prepare_data.main(["--dataset", "text", "--input", str(folder), "--out_dir", str(out), "--val_fraction", "0.1",
                       "--cache_dir", str(tmp_path / "hf"), "--num_proc", "2"])
    enc = reference_encoding()
    train = [enc.decode(d) for d in documents(read_ids(out / "train.bin"))]
    val = [enc.decode(d) for d in documents(read_ids(out / "val.bin"))]
    ordered = [texts[k] for k in sorted(texts)]  # folders expand to their *.txt files, sorted by path
    assert len(val) == 2 and len(train) == 18
    assert sorted(train + val) == sorted(ordered)
    assert train == [t for t in ordered if t in train] and val == [t for t in ordered if t in val]  # order kept
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_documents"], meta["val_documents"]) == (18, 2)
    assert "document-level" in meta["split"]


@pytest.mark.slow
def test_builtin_corpus_is_offline_and_deterministic(tmp_path):
    out1, out2 = tmp_path / "a", tmp_path / "b"
    prepare_data.main(["--dataset", "builtin", "--out_dir", str(out1), "--num_proc", "2"])
    prepare_data.main(["--dataset", "builtin", "--out_dir", str(out2), "--num_proc", "1"])
    m1, m2 = (json.loads((o / "meta.json").read_text()) for o in (out1, out2))
    assert m1["train_sha256"] == m2["train_sha256"] and m1["val_sha256"] == m2["val_sha256"]
    assert 300_000 < m1["train_tokens"] < 5_000_000 and m1["val_tokens"] > 10_000
    enc = reference_encoding()
    docs = [enc.decode(d) for split in ("train", "val") for d in documents(read_ids(out1 / f"{split}.bin"))]
    stdlib = sysconfig.get_paths()["stdlib"]
    with open(os.path.join(stdlib, "textwrap.py"), encoding="utf-8") as f:
        assert f.read() in docs  # each module's source is one document
    # running again into the same directory with the same source is fine and changes nothing
    prepare_data.main(["--dataset", "builtin", "--out_dir", str(out1), "--num_proc", "1"])
    assert json.loads((out1 / "meta.json").read_text())["train_sha256"] == m1["train_sha256"]


def test_errors_are_clear_and_leave_no_files(tmp_path):
    out = tmp_path / "out"
    hf = ["--cache_dir", str(tmp_path / "hf"), "--num_proc", "1"]
    with pytest.raises(UserError, match="input .*missing.txt does not exist"):
        prepare_data.main(["--dataset", "text", "--input", str(tmp_path / "missing.txt"), "--out_dir", str(out)] + hf)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="the input is empty"):
        prepare_data.main(["--dataset", "text", "--input", str(empty), "--out_dir", str(out)] + hf)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    with pytest.raises(UserError, match="corpus is empty"):
        prepare_data.main(["--dataset", "text", "--input", str(blank), "--out_dir", str(out)] + hf)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        prepare_data.main(["--dataset", "text", "--input", str(latin1), "--out_dir", str(out)] + hf)
    with pytest.raises(UserError, match="needs --input"):
        prepare_data.main(["--dataset", "text", "--out_dir", str(out)] + hf)
    with pytest.raises(UserError, match="--val_fraction must be between 0 and 1"):
        prepare_data.main(["--dataset", "builtin", "--out_dir", str(out), "--val_fraction", "1.5"])
    assert not out.exists() or not os.listdir(out)


@pytest.mark.parametrize("failure", ["overflow", "interrupt"])
def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch, failure):
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT)
    out = tmp_path / "out"
    if failure == "overflow":  # a tokenizer whose ids do not fit uint16
        monkeypatch.setattr(prepare_data.tokenizer, "encode", lambda text: [70_000, 1, 2])
        expected, match = UserError, "does not fit uint16"
    else:  # Ctrl-C in the middle of writing train.bin
        real = prepare_data.hashlib.sha256

        class Interrupting:
            def __init__(self):
                self.h = real()

            def update(self, data):
                raise KeyboardInterrupt

        monkeypatch.setattr(prepare_data.hashlib, "sha256", Interrupting)
        expected, match = KeyboardInterrupt, None
    with pytest.raises(expected, match=match):
        prepare_data.main(["--dataset", "text", "--input", str(src), "--out_dir", str(out),
                           "--cache_dir", str(tmp_path / "hf"), "--num_proc", "1"])
    assert not out.exists() or os.listdir(out) == []  # no half-written train.bin, no temporary files


def test_existing_different_data_needs_overwrite(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text(TEXT.upper())
    out = tmp_path / "out"
    common = ["--dataset", "text", "--out_dir", str(out), "--cache_dir", str(tmp_path / "hf"), "--num_proc", "1"]
    prepare_data.main(common + ["--input", str(a)])
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(UserError, match="already holds data from --dataset text.*--overwrite"):
        prepare_data.main(common + ["--input", str(b)])
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before  # untouched
    a.write_text(TEXT + "one more line\n")  # same source, changed contents
    with pytest.raises(UserError, match="different contents"):
        prepare_data.main(common + ["--input", str(a)])
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    prepare_data.main(common + ["--input", str(b), "--overwrite"])
    assert reference_encoding().decode(read_ids(out / "val.bin")[:-1]).isupper()


def test_cli_errors_exit_2_without_traceback(tmp_path):
    p = run_cli(["--dataset", "nosuch"])
    assert p.returncode == 2 and "invalid choice: 'nosuch'" in p.stderr and "Traceback" not in p.stderr
    # network datasets offline: one clear line instead of a stack of HTTP retries
    p = run_cli(["--dataset", "wikitext2", "--out_dir", str(tmp_path / "w"), "--cache_dir", str(tmp_path / "hf")],
                env_extra={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --dataset wikitext2 needs the Hugging Face Hub (network)")
    assert not (tmp_path / "w").exists() or not os.listdir(tmp_path / "w")


def test_wikitext2_official_splits_one_document_per_article(tmp_path, monkeypatch):
    """Through data.wikitext2_split (the one WikiText-2 loader); the Hub is replaced by two tiny splits."""
    datasets = pytest.importorskip("datasets")
    # the real splits open with a blank line before the first title: it must not become a document
    lines = {"train": ["", " = Alpha = \n", " a1\n", " = = Sub = = \n", " a2\n", " = Beta = \n", " b\n"],
             "validation": [" = Gamma = \n", " g\n"]}
    calls = []

    def fake(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        return {"text": lines[split]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    out = tmp_path / "w"
    code = prepare_data.main(["--dataset", "wikitext2", "--out_dir", str(out), "--num_proc", "1"])
    assert code == 0 and calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", s) for s in ("train", "validation")]
    enc = reference_encoding()
    train_docs = [enc.decode(d) for d in documents(read_ids(out / "train.bin"))]
    assert train_docs == [" = Alpha = \n a1\n = = Sub = = \n a2\n", " = Beta = \n b\n"]
    assert [enc.decode(d) for d in documents(read_ids(out / "val.bin"))] == [" = Gamma = \n g\n"]
    source = json.loads((out / "meta.json").read_text())["source"]
    assert source["hf_dataset"] == "Salesforce/wikitext" and source["hf_config"] == "wikitext-2-raw-v1"
