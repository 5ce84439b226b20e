"""Outlier definitions on plain tensors: the masks, overlaps and token categories every other piece of
outlier code uses (one implementation).

The rest sits by concern: `probe.py` hooks a model for one forward, `telemetry.py` is the cheap training
telemetry (`train.py` calls `training_telemetry(raw_model, X_fixed)` every `outlier_interval` iterations),
`outlier_analysis.py` holds the streaming accumulators and `OutlierAnalyzer` behind `analyze_outliers.py`,
and `interventions.py` the edits of massive activations and LayerNorm gains.

Definitions (An et al., "Systematic Outliers in Large Language Models", ICLR 2025, Sec. 3; Sun et
al., "Massive Activations in LLMs"; Raman/Sharma/Zhang, "Rethinking the Outlier Distribution in
LLMs", 2025). Every threshold is relative to the same matrix, so it is scale free. Each rule
bounds what it can detect; the defaults are chosen so that a real outlier can meet them:

activation outlier   in the (T, C) matrix x of one sequence and one layer: |x_tc| > tau * mean_{t,c} |x|
                     (the paper's formula, tau = 1000). Applied to the layer outputs h_l (block outputs,
                     the residual stream) and to the down-projection inputs x_down (the MLP's GELU
                     output, input of mlp.c_proj). The ratio is at most T*C / (number of outliers), so
                     tau = 1000 needs T*C well above 1000 (786,432 for GPT-2 at T = 1024).
weight outlier       in a weight W of shape (out, in) (nn.Linear layout; row i = output channel i,
                     column j = input channel j). Default ('column'): |w_ij| >= s * sum_i |w_ij|, the
                     entry holds at least s = 0.1 of its column's total magnitude, i.e. the column
                     extremal ratio max_i |w_ij| / mean_i |w_ij| >= s * out (76.8 for GPT-2's W_down);
                     a Gaussian column of 768 entries has its largest entry at ~0.5% of the total.
                     The paper's formula ('paper', --weight_rule paper): |w_ij| > tau_W * mean_j |w_ij|
                     (row-wise), which cannot fire when tau_W >= in (768 or 3072 for GPT-2): the
                     paper's text speaks of column extremal ratios, its formula of rows.
attention outlier    with A (T_q, T_k) the attention weights of one head (softmax probabilities, the
                     unnormalised sigmoid weights for `sigmoid`, the key part of the softmax that
                     includes the sink for `attention_bias`), the cumulative score of key j is
                     Ahat_j = sum_i A_ij. Default ('authors', the authors' code): Ahat_j >= s * T with
                     s = 0.1, on the head-averaged score (the `mean_*` entries) and, for the per-head
                     entries and Table 1, on each head's score. The paper's formula ('paper',
                     --attention_rule paper): Ahat_j > tau_A * mean_j Ahat per head; for softmax
                     mean_j Ahat = 1 and Ahat_j <= T - j, so tau_A = 1000 can never fire at T <= 1000.

Lifecycle (per massive activation = an activation outlier (position t, channel c) of some h_l):
  massive at l     |h_l[t,c]| > tau * mean|h_l|   (mean over that sequence's h_l)
  generated at l   massive at l AND a branch output at (t, c) is itself massive on the same scale:
                   |attn_l[t,c]| > tau * mean|h_l| or |mlp_l[t,c]| > tau * mean|h_l|
  propagated at l  massive at l and at l-1, not generated at l (the residual stream carries it)
  emerged at l     massive at l, not at l-1, and no single branch output is massive (it builds up)
  cancelled at l   massive at l-1 and not massive at l.

Consistency (Table 1 of An et al.). Overlap of two sets A, B is |A & B| / |A| ("how much of A is
also in B"); both directions are reported. Row 4 follows Appendix B.2; the paper gives no formula for
rows 1-3, so these are the definitions chosen:
  wdown_vs_xdown (feature dim)  A = {(l, k): W_down of layer l has a weight outlier in input column k},
                                B = {(l, k): x_down of layer l has an activation outlier in channel k
                                     for some token of some sequence}.
  wdown_vs_h (feature dim)      A = {c: some layer's W_down has a weight outlier in output row c},
                                B = {c: some layer's h has an activation outlier in channel c}
                                (pooled over layers: the residual stream carries an h outlier far
                                beyond the layer whose W_down wrote it).
  h_vs_xdown (sequence dim)     per sequence, A = positions with an h outlier in any layer, B =
                                positions with an x_down outlier in any layer; mean over sequences
                                (A-in-B over sequences with A non-empty, B-in-A over B non-empty).
  h_vs_attention (sequence dim) Appendix B.2: per sample, layer l and head i, A = positions with an
                                activation outlier in h_l (layer l's output), K_i = attention-outlier
                                keys of head i of layer l: |A & K_i| / |A|, mean over (sample, layer,
                                head) with A non-empty, i.e. over the layers whose h_l has outliers in
                                that sample (listed per layer too); reverse: mean of |A & K_i| / |K_i|
                                over (sample, layer, head) with K_i non-empty.
"""

from __future__ import annotations

import collections
import importlib
import unicodedata

import numpy as np
import torch

import attention_variants

CATEGORIES = ("initial", "delimiter", "whitespace", "weak_semantic", "other")
# An et al.'s "weak semantic" tokens: a fixed stop-word list (articles, conjunctions, prepositions,
# pronouns, auxiliaries; digits are matched separately), compared lower-case without spaces.
WEAK_SEMANTIC = frozenset("""
a an the this that these those
and or but nor so yet if then than because while although though as whether
of in on at by for with from to into onto over under about above below between through during
before after since until up down out off near against among across along around upon within without
i me my you your he him his she her it its we us our they them their
is am are was were be been being has have had do does did will would shall should can could may might must
not no
""".split())

# Defaults of the rules that can fire on real models (see the module docstring): An et al.'s
# reference code flags a key that receives >= 10% of all attention of a sequence; a weight column
# is flagged when one entry holds >= 10% of the column's total |w|.
ATTENTION_SHARE = 0.1
WEIGHT_SHARE = 0.1
# the column rule's floor on the extremal ratio: with few rows (scale_proj has n_head) "10% of the
# column" is close to the average entry, so an outlier must also be >= 8x its column's mean |w|
WEIGHT_MIN_RATIO = 8.0
# the block's projections, then every registered variant's own Linear (scale_proj, gate_proj, ...)
WEIGHT_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") + tuple(
    f"attn.{name}" for name in attention_variants.module_params())
EOT_TOKEN = 50256
_TINY = 1e-30


# ==============================================================================================
# definitions on plain tensors

def activation_outlier_mask(x, tau):
    """x: (..., T, C). True where |x_tc| > tau * mean |x| over the (T, C) matrix of each leading index."""
    a = x.detach().float().abs()
    return a > tau * a.mean(dim=(-2, -1), keepdim=True)


def weight_outlier_mask(w, tau):
    """w: (out, in). Row-wise weight outliers: |w_ij| > tau * mean_j |w_ij|."""
    a = w.detach().float().abs()
    return a > tau * a.mean(dim=1, keepdim=True)


def column_share_outlier_mask(w, share):
    """w: (out, in). Column weight outliers: |w_ij| >= share * sum_i |w_ij| (the entry holds at least
    `share` of its column's total magnitude) and |w_ij| >= WEIGHT_MIN_RATIO * mean_i |w_ij|, i.e. an
    extremal ratio max_i|w_ij| / mean_i|w_ij| >= max(share * out, WEIGHT_MIN_RATIO). Bounded by
    1/share entries per column; zero columns have none."""
    a = w.detach().float().abs()
    total = a.sum(dim=0, keepdim=True)
    return (a >= max(share, WEIGHT_MIN_RATIO / a.shape[0]) * total) & (total > 0)


def column_extremal_ratio(w):
    """w: (out, in) -> (in,): max_i |w_ij| / mean_i |w_ij| for every input column j (0 for a zero column)."""
    a = w.detach().float().abs()
    return a.max(dim=0).values / a.mean(dim=0).clamp_min(_TINY)


def cumulative_attention(probs):
    """probs: (..., T_q, T_k) attention weights -> (..., T_k) cumulative score Ahat_j = sum_i A_ij."""
    return probs.detach().float().sum(dim=-2)


def attention_outlier_mask(cum, tau):
    """cum: (..., T_k) cumulative scores -> True where Ahat_j > tau * mean_j Ahat (An et al.'s formula)."""
    return cum > tau * cum.mean(dim=-1, keepdim=True)


def attention_share_mask(cum, share):
    """cum: (..., T) cumulative scores of T queries over T keys -> True where Ahat_j >= share * T: key j
    receives at least `share` of the sequence's attention (softmax: T in all). The authors' code rule."""
    return cum >= share * cum.shape[-1]


def attention_rule_mask(cum, rule, tau=None, share=ATTENTION_SHARE):
    """The attention-outlier mask of `rule`: 'authors' (attention_share_mask) or 'paper' (attention_outlier_mask)."""
    if rule == "authors":
        return attention_share_mask(cum, share)
    if rule == "paper":
        return attention_outlier_mask(cum, tau)
    raise ValueError(f"unknown attention rule {rule!r}")


def weight_rule_mask(w, rule, tau=None, share=WEIGHT_SHARE):
    """The weight-outlier mask of `rule`: 'column' (column_share_outlier_mask) or 'paper' (weight_outlier_mask)."""
    if rule == "column":
        return column_share_outlier_mask(w, share)
    if rule == "paper":
        return weight_outlier_mask(w, tau)
    raise ValueError(f"unknown weight rule {rule!r}")


def token_category(text, position, token_id=None):
    """'initial' (position 0), 'delimiter' (end-of-text, or only punctuation/symbols), 'whitespace'
    (only spaces/newlines), 'weak_semantic' (a WEAK_SEMANTIC word or only digits), else 'other'.
    `text` is the decoded token (None when unknown)."""
    if position == 0:
        return "initial"
    if token_id == EOT_TOKEN:
        return "delimiter"
    if text is None or "\ufffd" in text:  # unknown, or a partial UTF-8 byte sequence
        return "other"
    if text.strip() == "":
        return "whitespace"
    if all(unicodedata.category(ch)[0] in "PS" for ch in text.strip()):
        return "delimiter"
    word = text.strip().lower()
    if word in WEAK_SEMANTIC or word.isdigit():
        return "weak_semantic"
    return "other"


def overlap(a, b):
    """|A & B| / |A| for two python sets or two boolean arrays of the same shape; None when A is empty."""
    if isinstance(a, (set, frozenset)):
        return len(a & set(b)) / len(a) if a else None
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n = int(a.sum())
    return float((a & b).sum()) / n if n else None


def row_overlap(a, b):
    """a, b (..., N) bool -> (...,) |A & B| / |A| for every row (NaN where A is empty)."""
    a, b = a.bool(), b.bool()
    inter = (a & b).sum(-1).float()
    n = a.sum(-1).float()
    return torch.where(n > 0, inter / n.clamp_min(1), torch.full_like(n, float("nan")))


def head_averaged_overlap(positions, keys):
    """positions (B, T) bool, keys (B, H, T) bool -> (B,) mean over heads of |A & K_h| / |A|
    (NaN where A is empty)."""
    return row_overlap(positions[:, None, :].expand_as(keys), keys).mean(-1)


def b2_overlaps(hpos, amask):
    """Appendix B.2 of An et al. for one layer: hpos (B, T) positions with activation outliers of h_l,
    amask (B, H, T) attention-outlier keys of each head of the same layer -> ((B*H,) |A & K_i| / |A|,
    (B*H,) |A & K_i| / |K_i|), NaN where the denominator set is empty."""
    pos = hpos[:, None, :].expand_as(amask)
    return row_overlap(pos, amask).flatten(), row_overlap(amask, pos).flatten()


def channel_kurtosis(h):
    """Kurtosis of the per-channel mean squares of h (..., C): s_c = mean over tokens of h_c^2,
    kurt = mean_c(s_c^2) / mean_c(s_c)^2. About 1 for isotropic activations, up to C for one channel."""
    s = h.detach().float().pow(2).reshape(-1, h.shape[-1]).mean(0)
    return float(s.pow(2).mean() / s.mean().pow(2).clamp_min(_TINY))


def median_rows(a):
    """Lower median of each row of a (B, N) tensor (torch.median semantics), numpy on CPU (3x faster)."""
    if a.device.type == "cpu" and a.shape[1] > 4096:
        kth = (a.shape[1] - 1) // 2
        rows = a.detach().float().contiguous().numpy()
        return torch.tensor([np.partition(r, kth)[kth] for r in rows], dtype=torch.float32)
    return a.median(dim=1).values


def top_and_median(a, k):
    """a: (B, R, C) non-negative -> (top-k values over each (R, C) matrix (B, k) descending,
    lower median (B,), mean (B,)). The top-k elements lie in the k rows with the largest row maxima,
    so only those rows are searched."""
    B, R, C = a.shape
    kr = min(k, R)
    rows = a.amax(-1).topk(kr, dim=1).indices  # (B, kr)
    cand = torch.gather(a, 1, rows[..., None].expand(B, kr, C)).reshape(B, -1)
    top = cand.topk(min(k, cand.shape[1]), dim=1).values
    flat = a.reshape(B, -1)
    return top, median_rows(flat).to(a.device), flat.mean(dim=1)


class Outliers(collections.namedtuple("Outliers", "rows idx values mean")):
    """Activation outliers of a (B, T, C) tensor in sparse form: rows (B, T) bool (the token holds at
    least one outlier), idx (n, 3) long [b, t, c], values (n,) signed, mean (B,) mean |x|."""


def find_activation_outliers(x, tau, stats=False):
    """Sparse equivalent of activation_outlier_mask(x, tau) (+ top-3, median, mean when stats=True).

    Only the tokens whose largest |x| exceeds the threshold are scanned, and the sums go through a
    matrix product: elementwise passes over (T, C) are what costs time on CPUs."""
    x = x.detach()
    B, T, C = x.shape
    a = x.float().abs()
    rowmax = a.amax(-1)  # (B, T)
    mean = (a.reshape(B * T, C) @ torch.ones(C, device=a.device, dtype=a.dtype)).reshape(B, T).sum(-1) / (T * C)
    thr = tau * mean
    rows = rowmax > thr[:, None]
    cand = rows.nonzero()  # (m, 2)
    if cand.shape[0]:
        sub = a[cand[:, 0], cand[:, 1]]  # (m, C)
        r, c = (sub > thr[cand[:, 0]][:, None]).nonzero(as_tuple=True)
        idx = torch.cat([cand[r], c[:, None]], dim=1)
        values = x[idx[:, 0], idx[:, 1], idx[:, 2]].float()
    else:
        idx = torch.zeros(0, 3, dtype=torch.long, device=a.device)
        values = torch.zeros(0, device=a.device)
    out = Outliers(rows, idx, values, mean)
    if not stats:
        return out
    kr = min(3, T)
    top_rows = rowmax.topk(kr, dim=1).indices
    cand_vals = torch.gather(a, 1, top_rows[..., None].expand(B, kr, C)).reshape(B, -1)
    top = cand_vals.topk(min(3, cand_vals.shape[1]), dim=1).values
    med = median_rows(a.reshape(B, -1)).to(a.device)
    return out, top, med


class TokenInfo:
    """Token strings and categories, decoded once per id (works without a tokenizer: '<id>')."""

    def __init__(self, decode_one=None):
        self.decode_one = decode_one
        self._text = {}
        self._cat = {}

    def text(self, token_id):
        token_id = int(token_id)
        if token_id not in self._text:
            s = None
            if self.decode_one is not None:
                try:
                    s = self.decode_one(token_id)
                except Exception:  # ids beyond the tokenizer's vocabulary (padded embeddings)
                    s = None
            self._text[token_id] = s
        s = self._text[token_id]
        return s if s is not None else f"<{token_id}>"

    def categories(self, tokens):
        """tokens (B, T) int array -> (B, T) int array of indices into CATEGORIES."""
        tokens = np.asarray(tokens)
        uniq, inverse = np.unique(tokens, return_inverse=True)
        cats = np.empty(len(uniq), dtype=np.int64)
        for i, tid in enumerate(uniq.tolist()):
            if tid not in self._cat:
                self.text(tid)
                self._cat[tid] = CATEGORIES.index(token_category(self._text[tid], 1, tid))
            cats[i] = self._cat[tid]
        out = cats[inverse.reshape(tokens.shape)]
        out[:, 0] = CATEGORIES.index("initial")
        return out


# Code written against the one-module layout reaches the moved names through here; importing them lazily
# keeps `import outlier_stats` light (train.py's telemetry never loads the analyzer).
_MOVED = {"Probe": "probe", "training_telemetry": "telemetry", "INTERVENTION_TARGETS": "interventions",
          "Intervention": "interventions", "GammaIntervention": "interventions", "layer_norms": "interventions",
          **{name: "outlier_analysis" for name in ("OutlierAnalyzer", "TopList", "ActivationAccumulator",
                                                   "LifecycleAccumulator", "AttentionAccumulator",
                                                   "NormalizationAccumulator", "ConsistencyAccumulator",
                                                   "cancellation_view", "weight_statistics", "weight_link")}}


def __getattr__(name):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'outlier_stats' has no attribute {name!r}")
