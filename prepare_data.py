"""Tokenize a text corpus into nanoGPT's token files: `train.bin`, `val.bin` and `meta.json`.

    python prepare_data.py --dataset builtin                      # smoke-test corpus, no network
    python prepare_data.py --dataset shakespeare                  # downloads tiny-shakespeare
    python prepare_data.py --dataset openwebtext --num_proc 16    # the paper's training corpus (~9B tokens)
    python prepare_data.py --dataset wikitext2                    # wikitext-2-raw-v1
    python prepare_data.py --dataset text --input my_corpus/ notes.txt --out_dir data/mine

Every corpus is a list of *documents*. Each document is tokenized with the repo's one tokenizer
(runtime/tokenizer.py: tiktoken's GPT-2 BPE, `<|endoftext|>` in the text is treated as ordinary text) and
followed by one end-of-text token (50256). Empty or whitespace-only documents are skipped.

Train/validation split (`--val_fraction F`):
  * wikitext2 uses its official `train` / `validation` splits (F is not used); the raw lines are
    grouped into articles (an article starts at a ` = Title = ` line) and each article is a document.
  * Otherwise, when the corpus has at least 1/F documents, round(F * n) documents chosen by a seeded
    random draw (`--seed`, default 2357 as in nanoGPT) go to val, the rest to train; both keep the
    original document order.
  * With fewer documents (for example a single text file), every document is cut at the first line
    break at or after (1 - F) of its characters (at exactly that character if no line break follows
    before the end): the text up to and including that line break goes to train, the rest to val,
    and each part is a document of its own (so each ends with end-of-text).
  Decoding train.bin (or val.bin) therefore gives back its documents in order, each followed by
  `<|endoftext|>`. Text files are read as UTF-8 with universal newlines ("\\r\\n" becomes "\\n").

Output: uint16 token ids (nanoGPT's format, so its data works here and ours there) and meta.json
(tokenizer, vocabulary size, token and document counts, SHA-256 of both files, source, split rule).
The three files are written through temporary files and renamed into place only after everything
succeeded, so an error or Ctrl-C never leaves a half-written file. An output directory that already
holds different data is an error unless --overwrite is given.

`--dataset builtin` is a *smoke-test corpus*: the source text of a fixed list of modules of the Python
standard library of the interpreter running this script (a few MB of Python code, comments and
docstrings). It needs no network, but it depends on the Python version and is not natural language:
use it for demos and tests, never for results.
"""

import hashlib
import json
import os
import pathlib
import sys
import sysconfig
import time
import urllib.error
import urllib.request

import numpy as np

from runtime import tokenizer
from runtime.cli import ArgumentParser, UserError, check_seed, cli_main, one_line
from runtime.files import atomic_path, check_writable_dir, json_text, not_a_file, write_error
from runtime.outputs import check_output_dir, output_set
from runtime.token_data import (TOKEN_DTYPE, WIKITEXT2, check_token_range, import_datasets, load_hf_dataset,
                                read_text_file, wikitext2_split)

DATASETS = ("builtin", "openwebtext", "wikitext2", "shakespeare", "text")
NETWORK_DATASETS = {"openwebtext", "wikitext2", "shakespeare"}
DEFAULT_VAL_FRACTION = {"openwebtext": 0.0005}  # nanoGPT's split; every other corpus: 0.1
HF_DATASETS = {  # Hugging Face Hub ids (overridable with --hf_dataset, e.g. for a mirror)
    "openwebtext": ("Skylion007/openwebtext", None),
    "wikitext2": WIKITEXT2,
}
OFFLINE_ALTERNATIVES = ("use --hf_dataset ID for another copy on the Hub, --dataset text --input FILES for local "
                        "text, or --dataset builtin offline")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
OUTPUT_FILES = ("train.bin", "val.bin", "meta.json")  # one set, meta.json last (it describes the .bin files)
TOOL = "prepare_data.py"
FORMAT = "nanogpt-uint16"

# A fixed list of pure-Python standard-library modules (paths relative to the stdlib directory); each
# file is one document of the builtin corpus. Files missing from a particular installation are skipped.
BUILTIN_FILES = (
    "abc.py", "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "cmd.py", "codecs.py",
    "collections/__init__.py", "colorsys.py", "configparser.py", "contextlib.py", "copy.py", "csv.py",
    "dataclasses.py", "datetime.py", "decimal.py", "difflib.py", "dis.py", "enum.py", "fileinput.py",
    "fnmatch.py", "fractions.py", "ftplib.py", "functools.py", "getopt.py", "gettext.py", "glob.py",
    "gzip.py", "heapq.py", "hmac.py", "imaplib.py", "inspect.py", "ipaddress.py", "json/__init__.py",
    "json/decoder.py", "json/encoder.py", "locale.py", "logging/__init__.py", "mailbox.py",
    "mimetypes.py", "numbers.py", "operator.py", "optparse.py", "os.py", "pathlib.py", "pdb.py",
    "pickle.py", "pprint.py", "queue.py", "random.py", "reprlib.py", "sched.py", "secrets.py",
    "selectors.py", "shlex.py", "shutil.py", "smtplib.py", "socket.py", "statistics.py", "string.py",
    "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py", "threading.py", "timeit.py",
    "tokenize.py", "traceback.py", "turtle.py", "typing.py", "uuid.py", "warnings.py", "wave.py",
    "weakref.py", "zipfile.py",
)
BUILTIN_MIN_FILES = 10


def parse_args(argv):
    p = ArgumentParser(
        description="Tokenize a corpus (GPT-2 BPE) into train.bin / val.bin / meta.json for train.py.",
        epilog="See the module docstring (python -c 'import prepare_data; help(prepare_data)') for the split rule.")
    p.add_argument("--dataset", required=True, choices=DATASETS,
                   help="builtin: offline smoke-test corpus (Python stdlib source); openwebtext, wikitext2 "
                        "(Hugging Face datasets, need network or a filled HF cache); shakespeare (downloads "
                        "tiny-shakespeare, or give --input); text: your own files/folders (--input)")
    p.add_argument("--input", nargs="+", default=None, metavar="PATH",
                   help="text files or folders (folders: every *.txt below them, sorted) for --dataset text; "
                        "a local copy of input.txt for --dataset shakespeare")
    p.add_argument("--out_dir", default=None, help="output directory (default: data/DATASET)")
    p.add_argument("--val_fraction", type=float, default=None,
                   help="fraction of the corpus for val.bin (default 0.0005 for openwebtext, else 0.1)")
    p.add_argument("--seed", type=int, default=2357, help="seed of the document-level train/val draw")
    p.add_argument("--sample_by", choices=("document", "paragraph", "line"), default="document",
                   help="--dataset text: what one document is (a whole file, a paragraph, a line)")
    p.add_argument("--num_proc", type=int, default=max(1, min(os.cpu_count() or 1, 16)),
                   help="tokenizer processes (default: CPU count, at most 16)")
    p.add_argument("--hf_dataset", default=None,
                   help="override the Hugging Face dataset id for openwebtext / wikitext2 (e.g. a mirror)")
    p.add_argument("--cache_dir", default=None, help="Hugging Face datasets cache directory (default: HF's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace train.bin / val.bin / meta.json in --out_dir even if they hold different data")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out_dir = args.out_dir or os.path.join("data", args.dataset)
    val_fraction = args.val_fraction if args.val_fraction is not None else DEFAULT_VAL_FRACTION.get(args.dataset, 0.1)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if args.num_proc < 1:
        raise UserError(f"--num_proc must be at least 1, got {args.num_proc}")
    if args.input and args.dataset not in ("text", "shakespeare"):
        raise UserError(f"--input is only used with --dataset text or shakespeare, not {args.dataset}")
    if args.dataset == "text" and not args.input:
        raise UserError("--dataset text needs --input FILE_OR_FOLDER [...] (your own text files)")
    if args.cache_dir is not None:  # the datasets cache, written while loading: not an input's fault when it fails
        check_writable_dir(args.cache_dir, "--cache_dir")
    if args.hf_dataset and args.dataset not in HF_DATASETS:
        raise UserError(f"--hf_dataset is only used with --dataset openwebtext or wikitext2")
    tokenizer.get_tokenizer()  # fail early (and in one line) when the BPE ranks cannot be loaded

    inputs = _expand_inputs(args.input) if args.input else None
    source = _source_spec(args, inputs, val_fraction)
    check_seed(args.seed)
    _check_out_dir(out_dir, source, args.overwrite)
    may_replace = _replaceable(out_dir, args.overwrite)
    # before the download and tokenization, not after
    check_output_dir(out_dir, TOOL, OUTPUT_FILES, inputs=inputs or (), flag="--out_dir", may_replace=may_replace)

    t0 = time.time()
    splits, split_rule = _load_splits(args, inputs, out_dir, val_fraction)
    meta = write_splits(splits, out_dir, source, split_rule, num_proc=args.num_proc, overwrite=args.overwrite,
                        may_replace=may_replace, inputs=inputs or ())
    print(f"wrote {out_dir}/train.bin ({meta['train_tokens']:,} tokens, {meta['train_documents']:,} documents), "
          f"{out_dir}/val.bin ({meta['val_tokens']:,} tokens, {meta['val_documents']:,} documents) and "
          f"{out_dir}/meta.json in {time.time() - t0:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------------- inputs

def _expand_inputs(paths):
    """Files as given, folders expanded to their *.txt files (recursively, sorted); absolute paths."""
    files = []
    for path in paths:
        p = pathlib.Path(path)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.txt") if q.is_file())
            if not found:
                raise UserError(f"input folder {path} holds no *.txt files")
            files.extend(found)
        elif not not_a_file(p):
            files.append(p)
        else:
            raise UserError(f"input {path} {not_a_file(p)}")
    files = [str(f.resolve()) for f in files]
    if len(set(files)) != len(files):
        raise UserError("an input file is given more than once (directly or through a folder)")
    if all(os.path.getsize(f) == 0 for f in files):
        raise UserError(f"the input is empty: {', '.join(paths)} hold{'s' if len(paths) == 1 else ''} no text")
    return files


def _source_spec(args, inputs, val_fraction):
    """What determines the data; an existing out_dir made from a different spec is 'different data'."""
    spec = {"dataset": args.dataset, "val_fraction": val_fraction, "seed": args.seed}
    if args.dataset == "text":
        spec.update(inputs=inputs, sample_by=args.sample_by)
    elif args.dataset == "shakespeare":
        spec.update(url=None if inputs else SHAKESPEARE_URL, inputs=inputs)
    elif args.dataset in HF_DATASETS:
        name, config = HF_DATASETS[args.dataset]
        spec.update(hf_dataset=args.hf_dataset or name, hf_config=config)
        if args.dataset == "wikitext2":
            spec.pop("val_fraction"), spec.pop("seed")  # official splits
    elif args.dataset == "builtin":
        spec.update(python=sys.version.split()[0], files=list(BUILTIN_FILES))
    return spec


def _check_out_dir(out_dir, source, overwrite):
    present = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(out_dir, f))]
    if not present or overwrite:
        return
    meta = _read_meta(out_dir)
    old_source = meta.get("source") if isinstance(meta, dict) else None
    if old_source != source:
        what = f"data from {_describe(old_source)}" if old_source else f"{', '.join(present)} of unknown origin"
        raise UserError(f"{out_dir} already holds {what}; pass --overwrite to replace it, or choose another --out_dir")


def _replaceable(out_dir, overwrite):
    """Output files this script may replace though its manifest does not name them: with --overwrite, on
    the user's word; else those of a data set whose meta.json says this script wrote it (directories
    prepared before the manifest existed)."""
    meta = _read_meta(out_dir)
    return OUTPUT_FILES if overwrite or (isinstance(meta, dict) and meta.get("format") == FORMAT) else ()


def _describe(source):
    if not isinstance(source, dict):
        return "an unknown source"
    extra = source.get("inputs") or source.get("hf_dataset") or source.get("url") or ""
    return f"--dataset {source.get('dataset')}" + (f" ({extra})" if extra else "")


# ---------------------------------------------------------------------------------------------- corpora

def _load_splits(args, inputs, out_dir, val_fraction):
    """Return ({'train': Dataset, 'val': Dataset} of a 'text' column, split-rule description)."""
    ds_lib = import_datasets(OFFLINE_ALTERNATIVES)
    if args.dataset == "wikitext2":
        splits = {}
        for part, hf_split in (("train", "train"), ("val", "validation")):
            lines = wikitext2_split(hf_split, what="--dataset wikitext2", instead=OFFLINE_ALTERNATIVES,
                                    name=args.hf_dataset, cache_dir=args.cache_dir)
            splits[part] = ds_lib.Dataset.from_dict({"text": _wikitext_articles(lines)})
        return splits, f"official train/validation splits of {WIKITEXT2[1]}; one document per article"
    if args.dataset == "openwebtext":
        name = args.hf_dataset or HF_DATASETS["openwebtext"][0]
        docs = load_hf_dataset(name, what="--dataset openwebtext", instead=OFFLINE_ALTERNATIVES, split="train",
                               cache_dir=args.cache_dir, num_proc=_nproc(args.num_proc, 1 << 30))
    elif args.dataset == "text":
        docs = _load_text_files(ds_lib, inputs, args)
    elif args.dataset == "shakespeare":
        if inputs and len(inputs) > 1:
            raise UserError("--dataset shakespeare takes one --input file (its input.txt)")
        text = read_text_file(inputs[0], what="input") if inputs else _download_shakespeare(out_dir)
        docs = ds_lib.Dataset.from_dict({"text": [text]})
    else:
        docs = ds_lib.Dataset.from_dict({"text": builtin_documents()})
    docs = docs.select_columns(["text"])
    docs = docs.filter(lambda b: [bool(t) and not t.isspace() for t in b["text"]], batched=True,
                       num_proc=_nproc(args.num_proc, len(docs) // 10_000), desc="dropping empty documents")
    if len(docs) == 0:
        raise UserError(f"the {args.dataset} corpus is empty (no document holds any text)")
    return split_documents(docs, val_fraction, args.seed, args.num_proc)


def _load_text_files(ds_lib, files, args):
    try:
        dd = ds_lib.load_dataset("text", data_files={"train": files}, sample_by=args.sample_by,
                                 cache_dir=args.cache_dir)
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, UnicodeDecodeError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, UnicodeDecodeError):
            bad = next(((f, r) for f in files if (r := _utf8_error(f))), ("an input file", cause.reason))
            raise UserError(f"input {bad[0]} is not UTF-8 text ({bad[1]}); convert it to UTF-8 or leave it "
                            f"out") from None
        raise UserError(f"could not read the input text files: {type(e).__name__}: {one_line(e)}") from None
    return dd["train"]


def _utf8_error(path):
    """'reason at byte N' where a file stops being UTF-8, or None (streamed: inputs may be large)."""
    import codecs
    decoder, done = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                return f"{e.reason} at byte {done - len(decoder.getstate()[0]) + e.start}"
            done += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        return f"{e.reason} at the end of the file"
    return None


def _download_shakespeare(out_dir):
    """tiny-shakespeare's input.txt, downloaded once into out_dir (atomically)."""
    path = os.path.join(out_dir, "input.txt")
    if not os.path.exists(path):
        print(f"downloading {SHAKESPEARE_URL}")
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                body = r.read()
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"--dataset shakespeare needs the network to download {SHAKESPEARE_URL} "
                            f"({type(e).__name__}: {one_line(e)}); or pass --input PATH/TO/input.txt") from None
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(body)
    return read_text_file(path, what="input")


def builtin_documents():
    """The smoke-test corpus: source files of BUILTIN_FILES from this interpreter's standard library."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for rel in BUILTIN_FILES:
        p = root / rel
        if p.is_file():
            docs.append(p.read_text(encoding="utf-8", errors="replace"))
    if len(docs) < BUILTIN_MIN_FILES:
        raise UserError(f"the builtin corpus needs the Python standard library sources, but only {len(docs)} of "
                        f"{len(BUILTIN_FILES)} files were found under {root}; use --dataset text --input FILES")
    return docs


def _wikitext_articles(lines):
    """Join wikitext lines into articles; a line ' = Title = ' (one '=' on each side) starts one."""
    articles, current = [], []
    for line in lines:
        s = line.strip()
        if s.startswith("= ") and s.endswith(" =") and not s.startswith("= ="):
            if current:
                articles.append("".join(current))
            current = []
        current.append(line)
    if current:
        articles.append("".join(current))
    # the splits open with a blank line before the first title: not a document of its own
    return [a for a in articles if a.strip()]


# ---------------------------------------------------------------------------------------------- split

def split_documents(docs, val_fraction, seed, num_proc=1):
    """Apply the split rule of the module docstring; return ({'train','val'} datasets, rule text)."""
    n = len(docs)
    if n * val_fraction >= 1:
        n_val = max(1, round(n * val_fraction))
        val_idx = np.sort(np.random.default_rng(seed).choice(n, size=n_val, replace=False))
        is_val = np.zeros(n, dtype=bool)
        is_val[val_idx] = True
        splits = {"train": docs.select(np.flatnonzero(~is_val)), "val": docs.select(val_idx)}
        rule = f"document-level: {n_val} of {n} documents drawn with seed {seed} go to val"
    else:
        def cut(batch, part):
            out = []
            for t in batch["text"]:
                c = cut_point(t, val_fraction)
                out.append(t[:c] if part == "train" else t[c:])
            return {"text": out}
        splits = {}
        for part in ("train", "val"):
            s = docs.map(cut, batched=True, fn_kwargs={"part": part}, num_proc=_nproc(num_proc, n),
                         desc=f"cutting documents ({part})")
            splits[part] = s.filter(lambda b: [len(t) > 0 for t in b["text"]], batched=True)
        rule = (f"within documents: each of the {n} documents is cut at the first line break at or after "
                f"{1 - val_fraction:g} of its characters; the head goes to train, the tail to val")
    for part in ("train", "val"):
        if len(splits[part]) == 0:
            raise UserError(f"the {part} split would be empty (corpus of {n} document(s) is too small for "
                            f"--val_fraction {val_fraction}); use more text or another --val_fraction")
    return splits, rule


def cut_point(text, val_fraction):
    """Index where a document is cut into its train head and val tail (see the module docstring)."""
    target = int(len(text) * (1 - val_fraction))
    nl = text.find("\n", target)
    if nl < 0 or nl + 1 >= len(text):  # no line break before the end: cut inside the last line
        return target
    return nl + 1


# ---------------------------------------------------------------------------------------------- tokenize + write

def _tokenize_batch(batch):
    ids = [tokenizer.encode(t) + [tokenizer.EOT_TOKEN] for t in batch["text"]]
    return {"ids": ids, "len": [len(x) for x in ids]}


def _nproc(num_proc, n_rows):
    n = min(num_proc, n_rows)
    return n if n > 1 else None


def write_splits(splits, out_dir, source, split_rule, num_proc=1, overwrite=False, may_replace=(), inputs=()):
    """Tokenize both splits and write train.bin, val.bin, meta.json as one set (runtime.outputs.output_set); return meta."""
    tokenized = {}
    for part in ("train", "val"):
        tokenized[part] = splits[part].map(_tokenize_batch, batched=True, remove_columns=["text"],
                                           num_proc=_nproc(num_proc, len(splits[part])),
                                           desc=f"tokenizing {part}")
    meta = {
        "format": FORMAT,
        "dtype": "uint16",
        "tokenizer": f"tiktoken {tokenizer.ENCODING_NAME} (GPT-2 BPE)",
        "vocab_size": tokenizer.VOCAB_SIZE,
        "eot_token": tokenizer.EOT_TOKEN,
        "eot_after_each_document": True,
    }
    with output_set(out_dir, TOOL, OUTPUT_FILES, inputs, "--out_dir", may_replace) as tmp:
        for part in ("train", "val"):
            try:
                n_tokens, digest = _write_bin(tokenized[part], os.path.join(tmp, f"{part}.bin"), part)
            except OSError as e:  # named after its destination, not the staging directory
                raise write_error(os.path.join(out_dir, f"{part}.bin"), e) from None
            meta[f"{part}_tokens"] = n_tokens
            meta[f"{part}_documents"] = len(tokenized[part])
            meta[f"{part}_sha256"] = digest
        old = _read_meta(out_dir)
        if isinstance(old, dict) and not overwrite and any(old.get(f"{p}_sha256") != meta[f"{p}_sha256"]
                                                           for p in ("train", "val")):
            if old.get("source") != source:  # written meanwhile, by a concurrent run of another source
                raise UserError(f"{out_dir} now holds data from {_describe(old.get('source'))}, written there while "
                                f"this run prepared its own; pass --overwrite to replace it, or choose another "
                                f"--out_dir")
            raise UserError(f"{out_dir} already holds data from the same source but with different contents "
                            f"(did the input change?); pass --overwrite to replace it")
        meta.update(source=source, split=split_rule, python=sys.version.split()[0],
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        try:
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                f.write(json_text(meta))
        except OSError as e:
            raise write_error(os.path.join(out_dir, "meta.json"), e) from None
    return meta


def _read_meta(out_dir):
    """meta.json's content, or None where there is none or it cannot be read (data of unknown origin)."""
    try:
        with open(os.path.join(out_dir, "meta.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def _write_bin(ds, path, part):
    """Stream the 'ids' column of `ds` into `path` as uint16; return (token count, sha256 hex)."""
    from tqdm.auto import tqdm
    total = int(np.sum(ds.with_format("numpy")["len"], dtype=np.int64)) if len(ds) else 0
    if total == 0:
        raise UserError(f"the {part} split holds no tokens; use more text")
    digest = hashlib.sha256()
    n_shards = min(1024, len(ds))
    pos = 0
    with open(path, "wb") as f:  # plain writes: a full disk raises ENOSPC here, where a memmap would get SIGBUS
        for i in tqdm(range(n_shards), desc=f"writing {part}.bin", disable=n_shards < 8):
            shard = ds.shard(num_shards=n_shards, index=i, contiguous=True).with_format("numpy")
            batch = np.concatenate([np.asarray(x, dtype=np.int64) for x in shard["ids"]])
            check_token_range(batch)
            data = batch.astype(TOKEN_DTYPE).tobytes()
            f.write(data)
            digest.update(data)
            pos += len(batch)
    assert pos == total, (pos, total)
    return total, digest.hexdigest()


if __name__ == "__main__":
    cli_main(main)
