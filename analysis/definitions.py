"""Outlier definitions on plain tensors: the masks, overlaps and token categories every other piece of
outlier code uses (one implementation).

The rest sits by concern: `analysis/capture.py` hooks a model for one forward and names what it captured,
`analysis/telemetry.py` is the cheap training telemetry (`train.py` calls `training_telemetry(raw_model,
X_fixed)` every `outlier_interval` iterations), `analysis/statistics/` holds the streaming statistics (one
module each, with its report section and figures), `analysis/analyzer.py` the `OutlierAnalyzer` that runs
them behind `analyze_outliers.py`, `analysis/report.py` the report, and `analysis/interventions.py` the edits
of massive activations and LayerNorm gains.

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
                     column j = input channel j). Default ('ratio'): |w_ij| >= R * mean_i |w_ij|, the
                     entry is at least R = 50 times its column's mean magnitude (the column extremal
                     ratio max_i |w_ij| / mean_i |w_ij| >= R), the same threshold for every module
                     whatever its number of rows (a 128-row GQA k_proj and a 4864-row up_proj alike).
                     A column's ratio is at most its row count (one entry holds everything), so below
                     2R rows the threshold is rows / 2 (the entry holds half its column's magnitude),
                     and never below 8. Gaussian columns stay near 4-6; trained LLM projections
                     rarely pass 30 (SmolLM2-135M: 99.9th percentile 13-36 per module), while
                     super weights reach 100-200. 'column' (--weight_rule column):
                     |w_ij| >= s * sum_i |w_ij|, the entry holds at least s = 0.1 of its column's total
                     magnitude, i.e. an extremal ratio >= s * out, which scales with the row count
                     (12.8 for 128 rows, 486 for 4864). The paper's formula ('paper', --weight_rule
                     paper): |w_ij| > tau_W * mean_j |w_ij| (row-wise), which cannot fire when
                     tau_W >= in: the paper's text speaks of column extremal ratios, its formula of rows.
attention outlier    with A (T_q, T_k) the attention weights of one head (softmax probabilities, the
                     unnormalised sigmoid weights for `sigmoid`, the key part of the softmax that
                     includes the sink for `attention_bias`), the cumulative score of key j is
                     Ahat_j = sum_i A_ij. Default ('authors', the authors' code): Ahat_j >= s * T with
                     s = 0.1, on the head-averaged score (the `mean_*` entries) and, for the per-head
                     entries and Table 1, on each head's score. The paper's formula ('paper',
                     --attention_rule paper): Ahat_j > tau_A * mean_j Ahat per head; for softmax
                     mean_j Ahat = 1 and Ahat_j <= T - j, so tau_A = 1000 can never fire at T <= 1000.

Lifecycle. A massive coordinate is a (sequence, position t, channel c) that is an activation outlier of
some layer output h_l (|h_l[t,c]| > tau * mean|h_l|). Its stages follow its value v_l = h_l[t,c] along
the layers, never the threshold (tau * mean|h_l| grows with depth while the value stays). With the
peak P = v at the layer where |v| is largest and every value signed along P's sign:
  generated at l   l <= peak layer and a branch output at (t, c) (attention or MLP, what the block
                   adds to its residual) adds at least GENERATION_SHARE = 25% of P: every such layer is
                   listed (a value written in two steps has two generation layers)
  emerged at l     no branch adds 25% (it builds up from many small writes): the first layer where
                   the value reaches half of P
  propagated at l  from the first generation (or emerged) layer on, until it is cancelled: the
                   residual stream carries it
  cancelled at l   after the peak the value falls below CANCELLED_BELOW = 50% of P; the layers from
                   the peak to that fall whose branch removes at least 25% of P cancel it (the layer
                   of the fall itself when no single branch removes that much)
  early at l       before the first generation layer, |v_l| >= EARLY_RATIO = 100 x the median |h_l|
                   of that sequence's layer output: an earlier, smaller stage of the same coordinate
                   (Sun et al. call an activation massive at |x| > 100 and ~1000x the median; the
                   relative part at 100x suffices here, since the value is already known to become
                   massive). Its writers are the branches that add at least 25% of the stage's own peak.
  '-'              none of these (before it appears, after it is cancelled).

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
import math
import unicodedata
from dataclasses import dataclass

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
# the default weight rule: an entry >= 50x its column's mean |w| (see the module docstring)
WEIGHT_RATIO = 50.0
# the column rule's floor on the extremal ratio: with few rows (scale_proj has n_head) "10% of the
# column" is close to the average entry, so an outlier must also be >= 8x its column's mean |w|
WEIGHT_MIN_RATIO = 8.0
# the block's projections, then every registered variant's own Linear (scale_proj, gate_proj, ...)
WEIGHT_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") + tuple(
    f"attn.{name}" for name in attention_variants.module_params())
EOT_TOKEN = 50256
_TINY = 1e-30
# the lifecycle's value rules (module docstring)
GENERATION_SHARE = 0.25
CANCELLED_BELOW = 0.5
EARLY_RATIO = 100.0
LIFECYCLE_STATUSES = ("-", "early", "generated", "emerged", "propagated", "cancelled")


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


def ratio_threshold(rows, ratio=WEIGHT_RATIO):
    """The 'ratio' rule's extremal-ratio threshold for a matrix of `rows` rows: `ratio`, or rows / 2 where
    the column cannot reach it (fewer than 2 x ratio rows), and at least WEIGHT_MIN_RATIO."""
    return max(WEIGHT_MIN_RATIO, min(ratio, rows / 2))


def column_ratio_outlier_mask(w, ratio=WEIGHT_RATIO):
    """w: (out, in). Weight outliers of the default rule: |w_ij| >= ratio_threshold(out) * mean_i |w_ij|;
    zero columns have none."""
    a = w.detach().float().abs()
    mean = a.mean(dim=0, keepdim=True)
    return (a >= ratio_threshold(a.shape[0], ratio) * mean) & (mean > 0)


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


def weight_rule_mask(w, rule, tau=None, share=WEIGHT_SHARE, ratio=WEIGHT_RATIO):
    """The weight-outlier mask of `rule`: 'ratio' (column_ratio_outlier_mask), 'column'
    (column_share_outlier_mask) or 'paper' (weight_outlier_mask)."""
    if rule == "ratio":
        return column_ratio_outlier_mask(w, ratio)
    if rule == "column":
        return column_share_outlier_mask(w, share)
    if rule == "paper":
        return weight_outlier_mask(w, tau)
    raise ValueError(f"unknown weight rule {rule!r}")


@dataclass(frozen=True)
class Rules:
    """The thresholds and rules one analysis applies (analyze_outliers.py's flags of the same meaning)."""
    tau_act: float = 1000.0
    tau_weight: float = 1000.0
    tau_attn: float = 1000.0
    tau_channel: float = 10.0
    weight_rule: str = "ratio"
    weight_share: float = WEIGHT_SHARE
    weight_ratio: float = WEIGHT_RATIO
    attention_rule: str = "authors"
    attention_share: float = ATTENTION_SHARE

    def attention_keys(self, cumulative):
        """The attention-outlier mask of cumulative scores (..., T) under this analysis' attention rule."""
        return attention_rule_mask(cumulative, self.attention_rule, self.tau_attn, self.attention_share)


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


class Outliers(collections.namedtuple("Outliers", "rows idx values mean median", defaults=(None,))):
    """Activation outliers of a (B, T, C) tensor in sparse form: rows (B, T) bool (the token holds at
    least one outlier), idx (n, 3) long [b, t, c], values (n,) signed, mean (B,) mean |x|, median (B,)
    lower median |x| (None unless computed)."""


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
    return out._replace(median=med), top, med


class Stages(collections.namedtuple("Stages", "status peak_layer sign gen_attn gen_mlp emerged_at cancel_attn "
                                                "cancel_mlp fall_at early early_attn early_mlp early_peak_layer")):
    """The lifecycle of n massive coordinates (module docstring), each a row: status (n, L) indices into
    LIFECYCLE_STATUSES; peak_layer (n,); sign (n,) of the peak value; gen_attn / gen_mlp (n, L) the
    generating branches; emerged_at (n,) (-1: generated); cancel_attn / cancel_mlp (n, L) the cancelling
    branches; fall_at (n,) the first layer after the peak below half of it (L: never); early (n, L) the
    early stage; early_attn / early_mlp (n, L) its writing branches; early_peak_layer (n,) the layer of its
    largest value (meaningful where the row has an early stage)."""

    @property
    def generated(self):
        return self.gen_attn | self.gen_mlp

    @property
    def cancelled(self):
        return self.cancel_attn | self.cancel_mlp


def _first_true(mask, none):
    """(n, L) bool -> (n,) index of the first True of each row (`none` where a row has none)."""
    L = mask.shape[1]
    first = torch.where(mask, torch.arange(L, device=mask.device), torch.full_like(mask, L, dtype=torch.long))
    first = first.min(1).values
    return torch.where(first < L, first, torch.full_like(first, none))


def lifecycle_stages(traj, attn, mlp, median=None):
    """The stages of n coordinates from their values: traj, attn, mlp (n, L) the layer outputs h_l and the
    two branch outputs at each coordinate; median (n, L) the median |h_l| of the coordinate's sequence
    (None: no early stage). Rules and constants: the module docstring."""
    traj, attn, mlp = (x.double() for x in (traj, attn, mlp))
    n, L = traj.shape
    layer = torch.arange(L, device=traj.device)[None]
    peak_layer = traj.abs().argmax(1)
    sign = torch.where(traj.gather(1, peak_layer[:, None])[:, 0] < 0, -1.0, 1.0).to(traj)
    v, a, m = (x * sign[:, None] for x in (traj, attn, mlp))
    peak = v.gather(1, peak_layer[:, None])  # (n, 1), > 0 unless the trajectory is all zeros
    upto, after = layer <= peak_layer[:, None], layer > peak_layer[:, None]
    share = GENERATION_SHARE * peak
    gen_attn, gen_mlp = upto & (a >= share) & (peak > 0), upto & (m >= share) & (peak > 0)
    generated = gen_attn | gen_mlp
    has_gen = generated.any(1)
    emerged_at = torch.where(has_gen, -1, _first_true(upto & (v >= CANCELLED_BELOW * peak), 0))
    start = torch.where(has_gen, _first_true(generated, L), emerged_at)
    fall_at = _first_true(after & (v < CANCELLED_BELOW * peak), L)
    window = after & (layer <= fall_at[:, None])
    cancel_attn, cancel_mlp = window & (a <= -share), window & (m <= -share)
    # no single branch removed a quarter of the peak: the layer where the value fell is named, with
    # the branch that removed more there
    quiet = (fall_at < L) & ~(cancel_attn | cancel_mlp).any(1)
    at_fall = quiet[:, None] & (layer == fall_at[:, None])
    attn_more = a.gather(1, fall_at.clamp_max(L - 1)[:, None]) <= m.gather(1, fall_at.clamp_max(L - 1)[:, None])
    cancel_attn |= at_fall & attn_more
    cancel_mlp |= at_fall & ~attn_more
    early = torch.zeros_like(generated)
    if median is not None:
        early = (layer < start[:, None]) & (v > 0) & (v >= EARLY_RATIO * median.double().to(v.device))
    early_peak_layer = torch.where(early, v, torch.full_like(v, -math.inf)).argmax(1)
    early_peak = v.gather(1, early_peak_layer[:, None])
    before = (layer <= early_peak_layer[:, None]) & early.any(1)[:, None]
    early_attn = before & (a >= GENERATION_SHARE * early_peak)
    early_mlp = before & (m >= GENERATION_SHARE * early_peak)
    status = torch.zeros(n, L, dtype=torch.long, device=traj.device)
    code = LIFECYCLE_STATUSES.index
    status[(layer >= start[:, None]) & (layer < fall_at[:, None])] = code("propagated")
    status[early] = code("early")
    status[generated] = code("generated")
    status[layer == emerged_at[:, None]] = code("emerged")
    status[cancel_attn | cancel_mlp] = code("cancelled")
    return Stages(status, peak_layer, sign, gen_attn, gen_mlp, emerged_at, cancel_attn, cancel_mlp, fall_at, early,
                  early_attn, early_mlp, early_peak_layer)


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
