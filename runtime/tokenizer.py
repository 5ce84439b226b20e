"""The repo's one tokenizer: GPT-2 BPE through tiktoken.

tiktoken's `r50k_base` has exactly the ranks of `gpt2` (the same 50,257 tokens, ids and merges),
and is stored as one file, which makes it easy to cache for machines without network. tiktoken
downloads that file on first use; offline, point TIKTOKEN_CACHE_DIR at a directory that holds it.
"""

import functools
import os

from runtime.cli import UserError

ENCODING_NAME = "r50k_base"  # token for token identical to tiktoken's "gpt2"
VOCAB_SIZE = 50257
EOT_TOKEN = 50256  # <|endoftext|>


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """Return the GPT-2 BPE `tiktoken.Encoding`, or raise UserError saying how to make it load."""
    import tiktoken
    try:
        enc = tiktoken.get_encoding(ENCODING_NAME)
    except Exception as e:  # tiktoken surfaces network failures as requests/urllib/OSError types
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        where = (f"TIKTOKEN_CACHE_DIR={cache} does not hold the {ENCODING_NAME} ranks" if cache
                 else "TIKTOKEN_CACHE_DIR is not set")
        raise UserError(
            f"cannot load the GPT-2 tokenizer (tiktoken '{ENCODING_NAME}'): {where} and the download "
            f"failed ({type(e).__name__}). Connect to the network once, or set TIKTOKEN_CACHE_DIR to a "
            f"directory holding the cached ranks (for example ../shared/tiktoken_cache)") from None
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOT_TOKEN
    return enc


def encode(text):
    """GPT-2 token ids of `text`; the literal string '<|endoftext|>' is treated as ordinary text."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids):
    return get_tokenizer().decode(list(ids))
