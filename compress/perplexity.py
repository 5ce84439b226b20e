"""Token-level perplexity of a GPT on a token stream, and the evaluation texts it is usually measured on.

Window conventions (see `make_windows`): the text's N tokens give N - 1 next-token predictions, and
every one of them is scored exactly once.

- non-overlapping (default, `stride=None`, the quantization papers' convention): the model reads
  tokens [0, T), [T, 2T), ... (T = block size) and every position in a window is scored; the last
  window may be shorter.
- sliding (`stride=s`, Hugging Face's convention): windows start at 0, s, 2s, ...; each reads up to
  T tokens, the first window scores all its positions, every later one only its last s (new)
  predictions, so each scored token sees at least T - s tokens of context.
- GPTQ's (`drop_tail=True`): floor(N / T) windows [kT, (k+1)T), each scoring the T - 1 predictions
  inside it; the tokens after the last full window, and each window's prediction of the next window's
  first token, are not scored (the numbers GPTQ, AWQ and most quantization papers report).

perplexity = exp(total negative log-likelihood / number of scored tokens). The cross-entropy is
computed in float32 from the final hidden states (captured from `transformer.ln_f`), in row chunks
so that the (tokens x vocab) logits never sit in memory at once.
"""

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from runtime.cli import UserError
from runtime.system import autocast_context
from runtime.token_data import WIKITEXT2, input_tokens, read_text_file, wikitext2_split

# rows of (rows x vocab) float32 logits computed at once: 4096 x 50304 x 4 B = 0.8 GB on GPU, 0.2 GB on CPU
LOGIT_CHUNK_ROWS = {"cuda": 4096, "cpu": 1024}


# ----------------------------------------------------------------------------------------------
# evaluation texts

def wikitext2_text(split="test", instead=None):
    """The raw WikiText-2 split through Hugging Face `datasets`, its lines joined with blank lines (the
    usual way). `instead`: what the offline error tells the user to pass (default: --text_file / --data)."""
    if instead is None:
        local = "valid" if split == "validation" else split
        instead = (f"pass a local text with --text_file FILE (e.g. ../shared/data/wikitext-2/{local}.txt) "
                   f"or prepared tokens with --data TOKENS.bin")
    return "\n\n".join(wikitext2_split(split, what="the WikiText-2 evaluation", instead=instead))


def text_ids(text, encode=None):
    """int64 token ids of `text`: GPT-2 BPE, or `encode` (a Hugging Face model's own tokenizer)."""
    return input_tokens(text=text) if encode is None else np.asarray(encode(text), dtype=np.int64)


def load_eval_tokens(dataset=None, text_file=None, data=None, split="test", encode=None):
    """(int64 token array, description) from exactly one of: dataset 'wikitext2', a text file, a .bin file.
    Text goes through `encode` when given (a Hugging Face model's tokenizer), else GPT-2 BPE."""
    given = [x is not None for x in (dataset, text_file, data)]
    if sum(given) != 1:
        raise UserError("give exactly one evaluation text: --dataset wikitext2, --text_file FILE or --data TOKENS.bin")
    if text_file is not None and encode is not None:
        return text_ids(read_text_file(text_file), encode), f"text {text_file}"
    if data is not None or text_file is not None:
        tokens = input_tokens(data=data, text_file=text_file)
        return np.asarray(tokens, dtype=np.int64), f"tokens {data}" if data is not None else f"text {text_file}"
    if dataset != "wikitext2":
        raise UserError(f"unknown dataset {dataset!r}; the one built in is wikitext2 "
                        f"(or pass --text_file FILE / --data TOKENS.bin)")
    return text_ids(wikitext2_text(split), encode), f"wikitext2 ({WIKITEXT2[1]}, {split})"


# ----------------------------------------------------------------------------------------------
# windows

def make_windows(n_tokens, block_size, stride=None, drop_tail=False):
    """List of (begin, end, score_from): the model reads tokens[begin:end] to predict tokens[begin+1:end+1],
    and positions j >= score_from of that window (window coordinates) are scored.

    Every prediction 1..n_tokens-1 is scored exactly once; `stride=None` means stride = block_size
    (non-overlapping windows). drop_tail: GPTQ's windows (module doc); a window of T tokens predicts its
    last T - 1, so it reads its first T - 1 (the last token is a target only).
    """
    if block_size < 1:
        raise UserError(f"block size must be positive, got {block_size}")
    if drop_tail:
        if stride is not None:
            raise UserError("--drop_tail evaluates non-overlapping windows; leave out --stride")
        if n_tokens < block_size or block_size < 2:
            raise UserError(f"the evaluation text has {n_tokens} tokens, fewer than one window of {block_size} "
                            f"(--drop_tail scores whole windows of at least 2 tokens); use a longer text or another "
                            f"--block_size")
        return [(k * block_size, (k + 1) * block_size - 1, 0) for k in range(n_tokens // block_size)]
    stride = block_size if stride is None else int(stride)
    if not 1 <= stride <= block_size:
        raise UserError(f"--stride must be between 1 and the block size {block_size}, got {stride}")
    n_targets = n_tokens - 1
    if n_targets < block_size:
        raise UserError(f"the evaluation text has {n_tokens} tokens, fewer than one window of {block_size} + 1; "
                        f"use a longer text or a smaller --block_size")
    windows, scored_until, begin = [], 0, 0
    while scored_until < n_targets:
        end = min(begin + block_size, n_targets)
        windows.append((begin, end, scored_until - begin))
        scored_until, begin = end, begin + stride
    return windows


# ----------------------------------------------------------------------------------------------
# evaluation

@dataclass
class PerplexityResult:
    ppl: float            # exp(nll)
    nll: float            # mean negative log-likelihood per scored token (nats)
    n_tokens: int         # scored tokens
    n_windows: int
    block_size: int
    stride: int
    seconds: float

    def as_dict(self):
        return asdict(self)


def safe_exp(x):
    """exp(x) that gives inf instead of OverflowError (and nan for nan)."""
    if math.isnan(x):
        return math.nan
    return math.exp(x) if x < 709.0 else math.inf


def model_device(model):
    return next(model.parameters()).device


def default_batch_size(device, block_size):
    """Windows per forward: enough to fill a GPU, few on CPU (no gain there, only memory)."""
    if torch.device(device).type == "cuda":
        return max(1, 16 * 1024 // max(block_size, 1))
    return max(1, 2 * 1024 // max(block_size, 1))


def _hidden_states(model, x):
    """Final-layer-norm output (B, T, C) for input ids x, captured with a forward hook on ln_f.

    The model's own forward without targets projects only the last position through lm_head, so the
    full logits are never built there; we project the scored rows ourselves, in chunks.
    """
    if hasattr(model, "final_hidden"):  # hf_models.HFCausalLM: the backbone's output, the input of lm_head
        return model.final_hidden(x)
    captured = []

    def hook(module, inputs, output):
        captured.append(output)

    handle = model.transformer.ln_f.register_forward_hook(hook)
    try:
        model(x)
    finally:
        handle.remove()
    if len(captured) != 1 or tuple(captured[0].shape[:2]) != tuple(x.shape):
        raise RuntimeError("could not capture the final hidden states from transformer.ln_f "
                           f"(got {[tuple(c.shape) for c in captured]} for input {tuple(x.shape)})")
    return captured[0]


def head(model):
    """What maps final hidden states to logits: lm_head, soft-capped where the model caps its logits
    (hf_models.HFCausalLM.head_logits, Gemma 2)."""
    return getattr(model, "head_logits", model.lm_head)


def sequence_nll(model, x, y, chunk_rows=None):
    """(B,) float64 sums of -log p(y) over each sequence's targets (y != -1) and (B,) their numbers: one
    forward for the final hidden states, the logits in row chunks."""
    h = _hidden_states(model, x)
    chunk_rows = chunk_rows or LOGIT_CHUNK_ROWS.get(h.device.type, 1024)
    nll, n = [], []
    for hb, yb in zip(h, y.to(h.device)):
        ok = yb != -1
        nll.append(_nll_sum(head(model), hb[ok], yb[ok], chunk_rows).cpu())
        n.append(int(ok.sum()))
    return torch.stack(nll), torch.tensor(n)


def _nll_sum(lm_head, h, y, chunk_rows):
    """Sum over rows of -log softmax(lm_head(h))[y], logits in float32, `chunk_rows` rows at a time."""
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for i in range(0, h.shape[0], chunk_rows):
        logits = lm_head(h[i:i + chunk_rows]).float().to(y.device)  # lm_head may sit on another GPU (device_map)
        total += F.cross_entropy(logits, y[i:i + chunk_rows], reduction="sum").double()
    return total


def evaluate_perplexity(model, tokens, block_size=None, stride=None, batch_size=None, dtype=None,
                        progress=True, desc="perplexity", chunk_rows=None, drop_tail=False):
    """Perplexity of `model` (a model.GPT, on its device, in eval mode) on the 1-D token array `tokens`.

    block_size: window length (default and maximum: model.config.block_size); stride: None for
    non-overlapping windows, else sliding windows; drop_tail: GPTQ's windows (see module doc). dtype: autocast dtype (None or
    float32: plain float32). Returns a PerplexityResult.
    """
    device = model_device(model)
    max_block = model.config.block_size
    block_size = max_block if block_size is None else int(block_size)
    if block_size > max_block:
        raise UserError(f"--block_size {block_size} exceeds the model's block size {max_block}")
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    vocab = model.config.vocab_size
    if tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        raise UserError(f"the evaluation tokens range over [{int(tokens.min())}, {int(tokens.max())}] but the model's "
                        f"vocabulary has {vocab} entries; evaluate with data tokenized for this model")
    windows = make_windows(tokens.numel(), block_size, stride, drop_tail)
    batch_size = batch_size or default_batch_size(device, block_size)
    chunk_rows = chunk_rows or LOGIT_CHUNK_ROWS.get(device.type, 1024)
    # batch windows of equal length (all but possibly the last one)
    batches, current = [], []
    for w in windows:
        if current and (len(current) == batch_size or (w[1] - w[0]) != (current[0][1] - current[0][0])):
            batches.append(current)
            current = []
        current.append(w)
    batches.append(current)

    from tqdm import tqdm
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    n_scored = 0
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast_context(device, dtype), \
                tqdm(total=len(windows), desc=desc, unit="win", disable=not progress, leave=False,
                     dynamic_ncols=True, mininterval=1.0) as bar:
            for batch in batches:
                length = batch[0][1] - batch[0][0]
                x = torch.stack([tokens[b:e] for b, e, _ in batch]).to(device, non_blocking=True)
                y = torch.stack([tokens[b + 1:e + 1] for b, e, _ in batch]).to(device, non_blocking=True)
                scored = torch.arange(length)[None, :] >= torch.tensor([s for _, _, s in batch])[:, None]
                scored = scored.to(device, non_blocking=True)
                h = _hidden_states(model, x)
                total_nll += _nll_sum(head(model), h[scored], y[scored], chunk_rows)
                n_scored += sum(e - b - s for b, e, s in batch)  # counted on the host: no device sync
                bar.update(len(batch))
    finally:
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    assert drop_tail or n_scored == tokens.numel() - 1, (n_scored, tokens.numel())
    nll = float(total_nll) / n_scored
    return PerplexityResult(ppl=safe_exp(nll), nll=nll, n_tokens=n_scored,
                            n_windows=len(windows), block_size=block_size,
                            stride=block_size if stride is None else int(stride), seconds=seconds)

