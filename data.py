"""Token files and text inputs shared by prepare_data.py, train.py, analyze_outliers.py and compress_eval.py.

Token files use nanoGPT's format: a flat array of uint16 GPT-2 token ids (`train.bin`, `val.bin`),
so data prepared by nanoGPT works here as is.
"""

import os

import numpy as np

from common import UserError, atomic_path
from tokenizer import EOT_TOKEN, encode

TOKEN_DTYPE = np.uint16


def load_tokens(path):
    """Memory-map a uint16 token file, with clear errors for missing, empty or malformed files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"token file {path} does not exist (make one with prepare_data.py)")
    size = os.path.getsize(path)
    if size == 0:
        raise UserError(f"token file {path} is empty")
    if size % np.dtype(TOKEN_DTYPE).itemsize:
        raise UserError(f"token file {path} has {size} bytes, not a whole number of uint16 tokens; "
                        f"is it a prepared .bin file?")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def write_tokens(path, ids):
    """Write token ids atomically as uint16; ids that do not fit are an error, not a silent wrap."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(TOKEN_DTYPE).max):
        raise UserError(f"token ids range over [{ids.min()}, {ids.max()}], which does not fit uint16; "
                        f"this format holds vocabularies of at most 65,536 tokens")
    with atomic_path(path) as tmp:
        ids.astype(TOKEN_DTYPE).tofile(tmp)


def read_text_file(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"text file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"text file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"text file {path} is empty")
    return text


def tokens_from_text(text, add_eot=False):
    """GPT-2 token ids of `text` as an int64 array (optionally followed by an end-of-text token)."""
    ids = encode(text)
    if add_eot:
        ids.append(EOT_TOKEN)
    return np.asarray(ids, dtype=np.int64)
