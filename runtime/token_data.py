"""Token files, text inputs and Hugging Face datasets shared by prepare_data.py, train.py,
compress/perplexity.py, analyze_outliers.py and compress_eval.py.

Token files use nanoGPT's format: a flat array of uint16 GPT-2 token ids (`train.bin`, `val.bin`),
so data prepared by nanoGPT works here as is.
"""

import functools
import os
import socket
import urllib.parse

import numpy as np

from runtime.cli import UserError, one_line
from runtime.files import atomic_path, not_a_file
from runtime.tokenizer import EOT_TOKEN, encode

TOKEN_DTYPE = np.uint16
# WikiText-2 (raw) on the Hugging Face Hub: (dataset id, config); the canonical id (formerly "wikitext").
# The one hub id of the repo: prepare_data.py and compress/perplexity.py both load it through wikitext2_split.
WIKITEXT2 = ("Salesforce/wikitext", "wikitext-2-raw-v1")
WIKITEXT2_SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------------------------------------- token files

def load_tokens(path):
    """Memory-map a uint16 token file, with clear errors for missing, empty or malformed files."""
    path = os.fspath(path)
    why = not_a_file(path)
    if why:
        hint = " (make one with prepare_data.py)" if why == "does not exist" else ""
        raise UserError(f"token file {path} {why}{hint}")
    size = os.path.getsize(path)
    if size == 0:
        raise UserError(f"token file {path} is empty")
    if size % np.dtype(TOKEN_DTYPE).itemsize:
        raise UserError(f"token file {path} has {size} bytes, not a whole number of uint16 tokens; "
                        f"is it a prepared .bin file?")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def check_token_range(ids):
    """UserError when token ids do not fit TOKEN_DTYPE (they would silently wrap around)."""
    ids = np.asarray(ids)
    limit = np.iinfo(TOKEN_DTYPE).max
    if ids.size and (ids.min() < 0 or ids.max() > limit):
        raise UserError(f"token ids range over [{ids.min()}, {ids.max()}], which does not fit uint16; "
                        f"this format holds vocabularies of at most {limit + 1:,} tokens")


def check_vocab(ids, vocab_size, source):
    """UserError when token ids reach beyond a model's vocabulary (the embedding would raise an
    IndexError, or assert on the GPU)."""
    top = int(np.max(ids)) if np.size(ids) else -1
    if top >= vocab_size:
        raise UserError(f"{source} holds token id {top}, outside the model's vocabulary of {vocab_size} ids; "
                        f"use data tokenized for this model")


def write_tokens(path, ids):
    """Write token ids atomically as uint16; ids that do not fit are an error, not a silent wrap."""
    ids = np.asarray(ids)
    check_token_range(ids)
    with atomic_path(path) as tmp:
        ids.astype(TOKEN_DTYPE).tofile(tmp)


# ---------------------------------------------------------------------------------------------- text

def read_text_file(path, what="text file"):
    """The text of a UTF-8 file, read with universal newlines ("\\r\\n" and "\\r" become "\\n").

    Missing files, files that are not UTF-8 and files holding no text (empty or whitespace only) are
    a UserError naming `what` (e.g. "text file", "input") and the path.
    """
    path = os.fspath(path)
    why = not_a_file(path)
    if why:
        raise UserError(f"{what} {path} {why}")
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines, like datasets' text loader
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"{what} {path} is empty (it holds no text)")
    return text


def tokens_from_text(text, add_eot=False):
    """GPT-2 token ids of `text` as an int64 array (optionally followed by an end-of-text token)."""
    ids = encode(text)
    if add_eot:
        ids.append(EOT_TOKEN)
    return np.asarray(ids, dtype=np.int64)


def input_tokens(data=None, text_file=None, text=None):
    """GPT-2 token ids of exactly one input: `data`, a prepared token file (memory-mapped uint16, not
    copied), `text_file`, a UTF-8 text file, or `text` itself (int64 arrays)."""
    if sum(x is not None for x in (data, text_file, text)) != 1:
        raise ValueError("give exactly one of data, text_file, text")
    if data is not None:
        return load_tokens(data)
    return tokens_from_text(read_text_file(text_file) if text_file is not None else text)


# ---------------------------------------------------------------------------------------------- Hugging Face datasets

def import_datasets(instead):
    """The `datasets` package (quiet), or a UserError that says to install it or to pass `instead`."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"this needs the `datasets` package (pip install datasets); or {instead}") from None
    datasets.logging.set_verbosity_error()
    return datasets


HUB_TIMEOUT_S = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_reachable(timeout=HUB_TIMEOUT_S):
    """Whether the Hugging Face Hub (HF_ENDPOINT) accepts a connection within `timeout` seconds."""
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def offline_unless_hub_reachable():
    """Put the Hub clients in offline mode (cache only) when the Hub cannot be reached, since without
    network `datasets` retries for about 25 s before failing. True when it did so. Behind a proxy
    a direct connection says nothing, so the clients are left alone there."""
    if os.environ.get("HF_HUB_OFFLINE") or any(os.environ.get(v) for v in PROXY_VARIABLES) or hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by the clients at import ...
    import importlib
    for module in ("huggingface_hub.constants", "datasets.config"):  # ... and here when they are imported already
        try:
            importlib.import_module(module).HF_HUB_OFFLINE = True
        except ImportError:
            pass
    return True


def load_hf_dataset(name, config=None, *, what, instead, split=None, cache_dir=None, num_proc=None):
    """datasets.load_dataset(name, config, ...) with one clear UserError when it fails (no network and
    no cache, a Hub copy that needs a loading script, ...). `what` names what needs the data (e.g.
    "--dataset wikitext2"), `instead` says what to pass without network (e.g. "pass --text_file FILE")."""
    datasets = import_datasets(instead)
    offline = offline_unless_hub_reachable()
    try:
        return datasets.load_dataset(name, config, split=split, cache_dir=cache_dir, num_proc=num_proc)
    except Exception as e:  # ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError, RuntimeError, ...
        msg = one_line(e)
        if "scripts are no longer supported" in msg:
            raise UserError(f"{what}: the Hub copy {name} still needs a loading script, which this version of "
                            f"`datasets` cannot run; pass a parquet copy of it, or {instead}") from None
        held = f"{name}{' ' + config if config else ''}{f' (split {split})' if split else ''}"
        why = f"the Hub did not answer within {HUB_TIMEOUT_S:g} s, so only the cache was tried" if offline else \
            f"loading it failed: {type(e).__name__}: {msg}"
        raise UserError(f"{what} needs the Hugging Face Hub (network) or a datasets cache that already holds "
                        f"{held}; {why} ({instead})") from None


def wikitext2_split(split, *, what="WikiText-2", instead="pass local text instead", name=None, cache_dir=None):
    """The raw lines (the 'text' column, a list of str) of a WikiText-2 split: train, validation or test.

    `name` overrides the Hub id WIKITEXT2[0] (e.g. a mirror); `what` / `instead`: see load_hf_dataset.
    """
    if split not in WIKITEXT2_SPLITS:
        raise UserError(f"unknown WikiText-2 split {split!r}; choose one of {', '.join(WIKITEXT2_SPLITS)}")
    ds = load_hf_dataset(name or WIKITEXT2[0], WIKITEXT2[1], what=what, instead=instead, split=split,
                         cache_dir=cache_dir)
    return ds["text"]
