"""Outlier definitions, streaming accumulators and the cheap training telemetry (one implementation).

`analyze_outliers.py` is the command line and the report on top of this module; `train.py` calls
`training_telemetry(raw_model, X_fixed)` every `outlier_interval` iterations.

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
import contextlib
import math
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


def _add_finite(acc, i, values):
    """acc[i] += sum of the non-NaN values, acc[i + 1] += their number."""
    ok = ~torch.isnan(values)
    acc[i] += float(values[ok].sum())
    acc[i + 1] += int(ok.sum())


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


# ==============================================================================================
# hooks: one forward, everything captured, everything restored

class Probe:
    """Context manager that hooks every block of a GPT or Hugging Face model (hf_models.model_view) for
    one or more forwards.

    Captures (per layer l, the last forward's tensors, detached): `h[l]` block output, `h_in0` the
    input of block 0, `attn_out[l]` / `mlp_out[l]` branch outputs (what each block adds to its residual),
    `xdown[l]` the input of the MLP down projection, `up[l]` / `gate[l]` the SwiGLU up and gate
    projection outputs (where the family has a gate), `norm_out[i]` the outputs of `view.norms` (each
    block's norms, then the final norm), as requested. With `attention_fn`, calls
    attention_fn(l, recorded, layer_input) right after each attention layer (recorded: 'probs'; 'q', 'k',
    'v' where they were recorded, else a 'qkv_missing' reason (hf_models); the variant's records for this
    repo's GPT), so that only one layer's attention matrix lives at a time. `record_qkv=False` asks a
    Hugging Face model for its probabilities only. With `block_fn`, calls block_fn(l, h_l) as soon as block l has run (before the
    next layer's attention). On exit removes every hook and restores the record flags and attention
    implementation; it never changes train/eval mode.
    """

    def __init__(self, model, *, attention_fn=None, block_fn=None, branches=False, down_input=False, norms=False,
                 record_qkv=True):
        from hf_models import model_view
        self.model = model
        self.view = model_view(model)
        self.block_fn = block_fn
        self.blocks = self.view.blocks
        self.L = len(self.blocks)
        self.attention_fn = attention_fn
        self.record_qkv = record_qkv
        self.branches, self.down_input, self.norms = branches, down_input, norms
        self._handles = []
        self._stack = None
        self.clear()

    def clear(self):
        L = self.L
        self.h = [None] * L
        self.attn_out = [None] * L
        self.mlp_out = [None] * L
        self.xdown = [None] * L
        self.up = [None] * L
        self.gate = [None] * L
        self.norm_out = [None] * len(self.view.norms)
        self.h_in0 = None

    def layer_input(self, l):
        return self.h_in0 if l == 0 else self.h[l - 1]

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        try:
            self._install()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _install(self):
        from hf_models import first
        view, reg = self.view, self._handles.append

        def store(lst, l, copy=False):
            # a copy where the model adds into the returned tensor in place (Falcon's parallel MLP output)
            def hook(module, inputs, output):
                out = self._tokens_first(first(output).detach())
                lst[l] = out.clone() if copy else out
            return hook

        def store_in0(module, args, kwargs):
            self.h_in0 = (args[0] if args else kwargs["hidden_states"]).detach()

        reg(self.blocks[0].register_forward_pre_hook(store_in0, with_kwargs=True))
        for l, block in enumerate(self.blocks):
            reg(block.register_forward_hook(store(self.h, l)))
            if self.block_fn is not None:
                reg(block.register_forward_hook(lambda module, inputs, output, l=l: self.block_fn(l, first(output).detach())))
            if self.branches:
                reg(view.attn_branch[l].register_forward_hook(store(self.attn_out, l, copy=True)))
                reg(view.mlp_branch[l].register_forward_hook(store(self.mlp_out, l, copy=True)))
            if self.down_input:
                def pre(module, args, l=l):
                    self.xdown[l] = self._tokens_first(args[0].detach())
                reg(view.down[l].register_forward_pre_hook(pre))
                if view.gate is not None or view.family.fused_gate_up:
                    reg(view.up[l].register_forward_hook(store(self.up, l)))
                if view.gate is not None:
                    reg(view.gate[l].register_forward_hook(store(self.gate, l)))
        if self.norms:
            for i, (_, module) in enumerate(view.norms):
                reg(module.register_forward_hook(store(self.norm_out, i)))
        if self.attention_fn is not None:
            self._stack.enter_context(view.attention_capture(
                lambda l, recorded: self.attention_fn(l, recorded, self.layer_input(l)), self.record_qkv))

    def _tokens_first(self, x):
        """(B, T, ...) view of a tensor that the model flattened to (B*T, features) (OPT's MLP)."""
        return x.view(*self.h_in0.shape[:2], -1) if x.ndim == 2 else x

    def up_gate(self, l):
        """(up, gate) outputs (B, T, d_ff) of layer l's SwiGLU, or (None, None); Phi-3's fused output is [gate, up]."""
        if self.view.family.fused_gate_up and self.up[l] is not None:
            gate, up = self.up[l].chunk(2, dim=-1)
            return up, gate
        return self.up[l], self.gate[l]

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self.clear()
        return False


# ==============================================================================================
# training telemetry

@torch.no_grad()
def training_telemetry(raw_model, X_fixed):
    """One forward of `raw_model` on the fixed batch X_fixed (B, T) -> flat dict of floats.

    Keys (l = 0..n_layer-1): outlier/top1_h/L{l}, outlier/median_h/L{l}, outlier/ratio_h/L{l}
    (top-1 |h_l| over median |h_l|, over the whole batch), outlier/kurtosis/L{l}
    (channel_kurtosis of h_l), outlier/first_attn/L{l} (attention weight on key 0, mean over
    batch, heads and queries), and outlier/max_top1_h, outlier/max_ratio_h, outlier/max_kurtosis,
    outlier/max_first_attn. Sink variants add outlier/sink_mass/L{l} (mean sink-column
    probability); `scaling` adds outlier/gate_first/L{l} and outlier/gate_rest/L{l} (mean gate S(x)
    at position 0 and at the other positions; gate_rest only when T > 1). Runs in eval mode under torch.no_grad() (within any
    autocast the caller set) and restores the train/eval mode, record flags and hooks.
    """
    L = len(raw_model.transformer.h)
    out = {}

    def attention_fn(l, rec, layer_input):
        out[f"outlier/first_attn/L{l}"] = float(rec["probs"][..., 0].float().mean())  # (B, nh, T) -> mean
        if "sink_probs" in rec:
            out[f"outlier/sink_mass/L{l}"] = float(rec["sink_probs"].float().mean())
        if "gate" in rec:
            gate = rec["gate"].float()  # (B, nh, T)
            out[f"outlier/gate_first/L{l}"] = float(gate[..., 0].mean())
            if gate.shape[-1] > 1:  # no other positions when T == 1: no key rather than a NaN
                out[f"outlier/gate_rest/L{l}"] = float(gate[..., 1:].mean())

    was_training = raw_model.training
    raw_model.eval()
    try:
        with Probe(raw_model, attention_fn=attention_fn) as probe:
            raw_model(X_fixed)
            top1s, ratios, kurts = [], [], []
            for l in range(L):
                a = probe.h[l].float().abs().reshape(1, -1, probe.h[l].shape[-1])
                top, med, _ = top_and_median(a, 1)
                top1, median = float(top[0, 0]), float(med[0])
                ratio = top1 / max(median, 1e-12)
                kurt = channel_kurtosis(probe.h[l])
                out[f"outlier/top1_h/L{l}"] = top1
                out[f"outlier/median_h/L{l}"] = median
                out[f"outlier/ratio_h/L{l}"] = ratio
                out[f"outlier/kurtosis/L{l}"] = kurt
                top1s.append(top1), ratios.append(ratio), kurts.append(kurt)
    finally:
        raw_model.train(was_training)
    out["outlier/max_top1_h"] = max(top1s)
    out["outlier/max_ratio_h"] = max(ratios)
    out["outlier/max_kurtosis"] = max(kurts)
    out["outlier/max_first_attn"] = max(out[f"outlier/first_attn/L{l}"] for l in range(L))
    return out


# ==============================================================================================
# streaming accumulators

class TopList:
    """The `cap` entries with the largest score seen so far, plus the total number offered."""

    def __init__(self, cap):
        self.cap = cap
        self.items = []
        self.total = 0

    def add(self, scores, rows):
        self.total += len(rows)
        self.items.extend(zip((float(s) for s in scores), rows))
        if len(self.items) > 4 * self.cap:
            self._prune()

    def _prune(self):
        self.items.sort(key=lambda x: -x[0])
        del self.items[self.cap:]

    def result(self):
        self._prune()
        return [row for _, row in self.items]


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


class ActivationAccumulator:
    """Streaming statistics of activation outliers of one kind (layer outputs or down-proj inputs)."""

    def __init__(self, L, C, T, tau, max_list, vocab):
        self.L, self.C, self.T, self.tau = L, C, T, tau
        self.top3 = np.zeros((L, 3))
        self.median = np.zeros(L)
        self.mean_abs = np.zeros(L)
        self.n = np.zeros(L, dtype=np.int64)
        self.count = np.zeros(L, dtype=np.int64)  # outlier elements
        self.seqs_with = np.zeros(L, dtype=np.int64)
        self.chan = np.zeros((L, C), dtype=np.int64)  # outlier elements per channel
        self.chan_any = np.zeros((L, C), dtype=bool)
        self.pos = np.zeros((L, T), dtype=np.int64)  # (sequence, position) pairs carrying an outlier
        self.cat = np.zeros((L, len(CATEGORIES)), dtype=np.int64)
        self.tok = collections.Counter()
        self.list = TopList(max_list)

    def update(self, l, x, tokens, cats, seq0, token_info):
        """x (B, T, C) of layer l; tokens, cats (B, T) numpy; returns its Outliers (sparse)."""
        B, T, C = x.shape
        out, top, med = find_activation_outliers(x, self.tau, stats=True)
        k = top.shape[1]
        self.top3[l, :k] += top.sum(0).cpu().numpy()
        self.median[l] += float(med.sum())
        self.mean_abs[l] += float(out.mean.sum())
        self.n[l] += B
        n_out = out.idx.shape[0]
        if n_out == 0:
            return out
        self.count[l] += n_out
        per_chan = np.bincount(out.idx[:, 2].cpu().numpy(), minlength=C)
        self.chan[l] += per_chan
        self.chan_any[l] |= per_chan > 0
        pos_mask = out.rows.cpu().numpy()  # (B, T)
        self.pos[l, :T] += pos_mask.sum(0)
        self.seqs_with[l] += int(pos_mask.any(-1).sum())
        self.cat[l] += np.bincount(cats[pos_mask], minlength=len(CATEGORIES))
        self.tok.update(tokens[pos_mask].tolist())
        # the largest outliers of this layer (at most `cap` of them) go to the global list
        vals, idx = out.values, out.idx
        if n_out > self.list.cap:
            keep = vals.abs().topk(self.list.cap).indices
            vals, idx = vals[keep], idx[keep]
        vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
        means = out.mean.cpu().numpy()
        rows = [{"layer": l, "seq": int(seq0 + b), "position": int(t), "token": token_info.text(tokens[b, t]),
                 "token_id": int(tokens[b, t]), "category": CATEGORIES[cats[b, t]], "channel": int(c),
                 "value": float(v), "ratio": float(abs(v) / max(means[b], _TINY))}
                for (b, t, c), v in zip(idx, vals)]
        self.list.total += n_out - len(rows)
        self.list.add(np.abs(vals), rows)
        return out

    def result(self, token_info, top_n=10):
        n = np.maximum(self.n, 1)[:, None]
        top3 = self.top3 / n
        median = self.median / n[:, 0]
        mean_abs = self.mean_abs / n[:, 0]
        out = {
            "top3": top3.tolist(),
            "median": median.tolist(),
            "mean_abs": mean_abs.tolist(),
            "threshold": (self.tau * mean_abs).tolist(),  # the absolute |x| threshold applied, mean over sequences
            "ratio_top1_median": (top3[:, 0] / np.maximum(median, _TINY)).tolist(),
            "count": self.count.tolist(),
            "count_per_seq": (self.count / n[:, 0]).tolist(),
            "seqs_with_outliers": self.seqs_with.tolist(),
            "channels": [[[int(c), int(self.chan[l, c])] for c in np.argsort(-self.chan[l])[:top_n] if self.chan[l, c] > 0]
                         for l in range(self.L)],
            # [layer, channel, outlier count] of every channel with outliers (the 256 most frequent per layer)
            "channel_scatter": [[l, int(c), int(self.chan[l, c])] for l in range(self.L)
                                for c in np.argsort(-self.chan[l], kind="stable")[:256] if self.chan[l, c] > 0],
            "positions": [[[int(t), int(self.pos[l, t])] for t in np.argsort(-self.pos[l], kind="stable")[:top_n]
                           if self.pos[l, t] > 0] for l in range(self.L)],
            "token_categories": dict(zip(CATEGORIES, self.cat.sum(0).tolist())),
            "token_categories_by_layer": self.cat.tolist(),
            "tokens": [{"token": token_info.text(t), "token_id": int(t), "count": int(c)}
                       for t, c in self.tok.most_common(top_n)],
            "outliers": self.list.result(),
            "outliers_total": int(self.list.total),
        }
        return out


class LifecycleAccumulator:
    """Massive activations keyed by (position, channel), aggregated over sequences (capped)."""

    def __init__(self, L, cap=256, per_seq=32):
        self.L, self.cap, self.per_seq = L, cap, per_seq
        self.entries = {}
        self.gen_sum = collections.defaultdict(float)  # (layer, channel) -> sum of generated values
        self.gen_cnt = collections.defaultdict(int)
        self.mass_sum = collections.defaultdict(float)  # the same over every massive activation
        self.mass_cnt = collections.defaultdict(int)
        self.instances = 0

    def update(self, H, A, M, XD, wdown, h_out, tau, tokens, token_info, up_gate=None):
        """Lists over layers: H, A, M (B, T, C) layer outputs, attention and MLP branch outputs; XD
        (B, T, d_ff) down-projection inputs (or None); wdown (C, d_ff) weights; h_out the Outliers of H;
        up_gate: per layer (up, gate) SwiGLU projection outputs (B, T, d_ff), x_down = act(gate) * up,
        or (None, None): the drivers then also carry the mean up and gate values (Figure 7's mechanism)."""
        L = self.L
        # layers may sit on different GPUs (device_map="auto"): the few gathered values meet on the first's device
        dev = h_out[0].idx.device
        coords = torch.cat([o.idx.to(dev) for o in h_out])
        if coords.shape[0] == 0:
            return
        coords = torch.unique(coords, dim=0)  # (n, 3): b, t, c
        b, t, c = coords[:, 0], coords[:, 1], coords[:, 2]
        gather = lambda xs: torch.stack([x[b.to(x.device), t.to(x.device), c.to(x.device)].float().to(dev)  # noqa: E731
                                         for x in xs])  # (L, n)
        traj, attn, mlp = gather(H), gather(A), gather(M)
        thr = tau * torch.stack([o.mean[b.to(o.mean.device)].to(dev) for o in h_out])  # (L, n)
        massive = traj.abs() > thr
        gen_attn = massive & (attn.abs() > thr)
        gen_mlp = massive & (mlp.abs() > thr)
        generated = gen_attn | gen_mlp
        # means of the generated values per (layer, channel), for --intervene mean
        C = H[0].shape[-1]
        for mask, sums, counts in ((generated, self.gen_sum, self.gen_cnt), (massive, self.mass_sum, self.mass_cnt)):
            gl, gi = mask.nonzero(as_tuple=True)
            keys = (gl * C + c[gi]).cpu().numpy()
            vals = traj[gl, gi].cpu().numpy()
            for key, v in zip(keys.tolist(), vals.tolist()):
                sums[divmod(key, C)] += v
                counts[divmod(key, C)] += 1
        # keep the `per_seq` largest coordinates of each sequence
        peak = traj.abs().max(0).values
        keep = []
        bs = b.cpu().numpy()
        peak_np = peak.cpu().numpy()
        for seq in np.unique(bs):
            idx = np.nonzero(bs == seq)[0]
            keep.extend(idx[np.argsort(-peak_np[idx])[:self.per_seq]].tolist())
        keep = torch.as_tensor(sorted(keep), device=coords.device)
        to_np = lambda x: x[..., keep].cpu().numpy()  # noqa: E731
        traj_k, attn_k, mlp_k, thr_k = to_np(traj), to_np(attn), to_np(mlp), to_np(thr)
        massive_k, gen_attn_k, gen_mlp_k = to_np(massive), to_np(gen_attn), to_np(gen_mlp)
        b_k, t_k, c_k = bs[keep.cpu().numpy()], to_np(t), to_np(c)
        for j in range(len(b_k)):
            self.instances += 1
            m, ga, gm = massive_k[:, j], gen_attn_k[:, j], gen_mlp_k[:, j]
            gen = ga | gm
            prev = np.concatenate([[False], m[:-1]])
            # 2 generated, 1 propagated (massive before, no massive branch), 3 emerged (newly massive from
            # several non-massive contributions), 0 not massive
            status = np.where(gen, 2, np.where(m & prev, 1, np.where(m, 3, 0)))
            first_gen = int(np.argmax(gen)) if gen.any() else None
            branch = None
            if first_gen is not None:
                branch = "both" if ga[first_gen] and gm[first_gen] else ("attn" if ga[first_gen] else "mlp")
            cancelled = [l for l in range(1, L) if m[l - 1] and not m[l]]
            key = (int(t_k[j]), int(c_k[j]))
            e = self.entries.get(key)
            if e is None:
                e = self.entries[key] = {
                    "count": 0, "traj": np.zeros(L), "attn": np.zeros(L), "mlp": np.zeros(L), "thr": np.zeros(L),
                    "status": np.zeros((L, 4), dtype=np.int64), "gen": collections.Counter(),
                    "first": collections.Counter(),
                    "branch": collections.Counter(), "cancel": collections.Counter(), "tokens": collections.Counter(),
                    "drivers": collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0, 0.0, 0.0, 0]), "peak": 0.0}
            e["count"] += 1
            e["traj"] += traj_k[:, j]
            e["attn"] += attn_k[:, j]
            e["mlp"] += mlp_k[:, j]
            e["thr"] += thr_k[:, j]
            e["status"][np.arange(L), status] += 1
            e["gen"][first_gen] += 1
            e["first"][int(np.argmax(m))] += 1
            e["branch"][branch] += 1
            e["cancel"].update(cancelled)
            e["tokens"][int(tokens[b_k[j], t_k[j]])] += 1
            e["peak"] = max(e["peak"], float(np.abs(traj_k[:, j]).max()))
            if first_gen is not None and gm[first_gen] and XD is not None and XD[first_gen] is not None:
                xd = XD[first_gen][int(b_k[j]), key[0]].float()
                w = wdown[first_gen][key[1]].float().to(xd.device)
                prod = xd * w
                total = float(mlp_k[first_gen, j])
                top = prod.abs().topk(min(3, prod.numel())).indices
                up, gate = up_gate[first_gen] if up_gate else (None, None)
                for k in top.tolist():
                    d = e["drivers"][k]
                    d[0] += float(prod[k]) / (total if abs(total) > _TINY else _TINY)
                    d[1] += float(xd[k])
                    d[2] += float(w[k])
                    d[3] += 1
                    if gate is not None:
                        d[4] += float(up[int(b_k[j]), key[0], k])
                        d[5] += float(gate[int(b_k[j]), key[0], k])
                        d[6] += 1
        if len(self.entries) > 2 * self.cap:
            self._prune()

    def _prune(self):
        ranked = sorted(self.entries.items(), key=lambda kv: -(kv[1]["count"] * kv[1]["peak"]))
        self.entries = dict(ranked[:self.cap])

    def generated_means(self):
        return {k: self.gen_sum[k] / self.gen_cnt[k] for k in self.gen_sum}

    def massive_means(self):
        """(layer, channel) -> mean value of every massive activation there (generated or carried)."""
        return {k: self.mass_sum[k] / self.mass_cnt[k] for k in self.mass_sum}

    def result(self, token_info, top_n=20):
        self._prune()
        names = ("-", "propagated", "generated", "emerged")
        out = []
        for (t, c), e in sorted(self.entries.items(), key=lambda kv: -(kv[1]["count"] * kv[1]["peak"]))[:top_n]:
            n = e["count"]
            gen_at, _ = e["gen"].most_common(1)[0]
            branch, _ = e["branch"].most_common(1)[0]
            tok, _ = e["tokens"].most_common(1)[0]
            drivers = sorted(e["drivers"].items(), key=lambda kv: -abs(kv[1][0]) * kv[1][3])[:3]
            out.append({
                "position": t, "channel": c, "token": token_info.text(tok), "token_id": tok, "count": n,
                "generated_at": gen_at, "generated_by": branch,
                "first_massive_at": e["first"].most_common(1)[0][0],
                "status": [names[int(np.argmax(row))] for row in e["status"]],
                "cancelled_at": sorted(l for l, k in e["cancel"].items() if 2 * k >= n),
                "peak": e["peak"],
                "trajectory": (e["traj"] / n).tolist(),
                "attn_contrib": (e["attn"] / n).tolist(),
                "mlp_contrib": (e["mlp"] / n).tolist(),
                "threshold": (e["thr"] / n).tolist(),
                "mlp_drivers": [{"down_input_channel": k, "share": v[0] / v[3], "x_down": v[1] / v[3],
                                 "weight": v[2] / v[3], "count": v[3],
                                 **({"up": v[4] / v[6], "gate": v[5] / v[6]} if v[6] else {})} for k, v in drivers],
            })
            out[-1].update(cancellation_view(out[-1]))
        return out


def cancellation_view(e):
    """Figures 8-9 of An et al. from one lifecycle entry's mean trajectory: each branch output relative to
    the residual value it is added to (attn_l / h_{l-1}, mlp_l / (h_{l-1} + attn_l); -1 cancels it
    exactly, None where that value is 0) and, per cancelled layer, the branch that pushes hardest
    against the sign of the value it meets and whether that branch's output has the opposite sign."""
    traj, attn, mlp = e["trajectory"], e["attn_contrib"], e["mlp_contrib"]
    rel_attn, rel_mlp = [None], [None]
    for l in range(1, len(traj)):
        before_mlp = traj[l - 1] + attn[l]
        rel_attn.append(attn[l] / traj[l - 1] if traj[l - 1] else None)
        rel_mlp.append(mlp[l] / before_mlp if before_mlp else None)
    cancels = []
    for l in e["cancelled_at"]:
        sign = 1.0 if traj[l - 1] >= 0 else -1.0
        branch, value = min((("attn", attn[l]), ("mlp", mlp[l])), key=lambda bv: sign * bv[1])
        cancels.append({"layer": l, "branch": branch, "branch_output": value, "previous": traj[l - 1],
                        "opposite_sign": bool(sign * value < 0)})
    return {"relative_contrib": {"attn": rel_attn, "mlp": rel_mlp}, "cancellation": cancels}


def weight_statistics(model, tau=None, top_n=10, rule="column", share=WEIGHT_SHARE):
    """Weight outliers (`rule`: see weight_rule_mask) and column extremal ratios of every projection,
    per layer and module. `top_entries` ranks entries by the rule's own score (column share
    |w_ij| / sum_i |w_ij|, or row ratio |w_ij| / mean_j |w_ij|); `profile` holds the per-column and
    per-row max |w| of the layer with the largest extremal ratio (Figure 5b-c)."""
    from hf_models import NANOGPT, model_view
    out = {}
    view = model_view(model)
    for name in view.weight_names(WEIGHT_MODULES if view.family is NANOGPT else None):
        res = {"extremal_ratio": [], "extremal_channel": [], "outlier_count": [], "outlier_channels": [],
               "outlier_out_channels": [], "max_row_ratio": [], "top_entries": []}
        entries = []
        profile = None
        for l, w in enumerate(view.weights(name)):
            w = w.detach().float()
            ratio = column_extremal_ratio(w)
            j = int(ratio.argmax())
            mask = weight_rule_mask(w, rule, tau, share)
            a = w.abs()
            row_ratio = a / a.mean(dim=1, keepdim=True).clamp_min(_TINY)
            score = a / a.sum(dim=0, keepdim=True).clamp_min(_TINY) if rule == "column" else row_ratio
            res["extremal_ratio"].append(float(ratio[j]))
            res["extremal_channel"].append(j)
            res["outlier_count"].append(int(mask.sum()))
            res["outlier_channels"].append(sorted(set(mask.nonzero()[:, 1].tolist())))
            res["outlier_out_channels"].append(sorted(set(mask.nonzero()[:, 0].tolist())))
            res["max_row_ratio"].append(float(row_ratio.max()))
            if profile is None or float(ratio[j]) > profile[0]:
                profile = (float(ratio[j]), {"layer": l, "column": j, "column_max_abs": a.max(0).values.tolist(),
                                             "row_max_abs": a.max(1).values.tolist(), "column_abs": a[:, j].tolist()})
            flat = score.flatten()
            top = flat.topk(min(top_n, flat.numel()))
            for v, i in zip(top.values.tolist(), top.indices.tolist()):
                entries.append((v, [l, i // w.shape[1], i % w.shape[1], v]))
        entries.sort(key=lambda x: -x[0])
        res["top_entries"] = [e for _, e in entries[:top_n]]  # [layer, out_channel, in_channel, score]
        res["profile"] = profile[1]
        n_rows = w.shape[0]
        res["rule"] = rule
        res["threshold"] = ({"column_share": share, "extremal_ratio": max(share * n_rows, WEIGHT_MIN_RATIO),
                             "rows": n_rows} if rule == "column"
                            else {"tau": tau, "row_ratio": tau, "max_possible_row_ratio": w.shape[1]})
        out[name] = res
    return out


def weight_link(model, xdown_counts, top_n=3):
    """Figure 7 of An et al.: which up-projection (c_fc) rows and down-projection (c_proj) columns belong
    to the MLP units whose output x_down spikes. xdown_counts (L, 4C): x_down outlier counts per unit.
    Per layer with spikes, its `top_n` most frequent units k: |c_fc row k| (L2) over the median row,
    c_fc row k's largest entry, and W_down column k's extremal ratio and largest share; `profile` holds
    every unit's c_fc row norm and W_down column max |w| for the layer with the most spikes. SwiGLU
    models (x_down = act(gate) * up): `fc` is the up projection, and each unit also gets its gate row's
    norm ratio and largest entry (`gate_row_norm_ratio`, `gate_top_weight`; `gate_row_norm` in the profile)."""
    from hf_models import model_view
    view = model_view(model)
    rows, profile = [], None
    for l in range(view.L):
        counts = np.asarray(xdown_counts[l])
        if not counts.any():
            continue
        up, gate = view.up_gate_weights(l)
        fc = up.float().cpu()  # (d_ff, C): row k computes unit k
        down = view.weights(view.down_name)[l].detach().float().cpu().abs()  # (C, d_ff): column k writes unit k
        norms = fc.norm(dim=1)
        gate = gate.float().cpu() if gate is not None else None
        gate_norms = gate.norm(dim=1) if gate is not None else None
        med = float(norms.median())
        ratio = column_extremal_ratio(down)
        share = down.max(0).values / down.sum(0).clamp_min(_TINY)
        units = [int(k) for k in np.argsort(-counts, kind="stable")[:top_n] if counts[k] > 0]
        for k in units:
            j = int(fc[k].abs().argmax())
            rows.append({"layer": l, "unit": k, "spikes": int(counts[k]), "fc_row_norm_ratio": float(norms[k]) / max(med, _TINY),
                         "fc_top_input": j, "fc_top_weight": float(fc[k, j]), "down_extremal_ratio": float(ratio[k]),
                         "down_top_share": float(share[k]), "down_top_output": int(down[:, k].argmax())})
            if gate is not None:
                g = int(gate[k].abs().argmax())
                rows[-1].update(gate_row_norm_ratio=float(gate_norms[k]) / max(float(gate_norms.median()), _TINY),
                                gate_top_input=g, gate_top_weight=float(gate[k, g]))
        if profile is None or counts.sum() > profile[0]:
            profile = (counts.sum(), {"layer": l, "units": [int(k) for k in np.nonzero(counts)[0]],
                                      "fc_row_norm": norms.tolist(), "down_column_max_abs": down.max(0).values.tolist()})
            if gate is not None:
                profile[1]["gate_row_norm"] = gate_norms.tolist()
    return {"units": rows, "profile": profile[1] if profile else None}


class OutlierAnalyzer:
    """Everything of analyze_outliers.py that is computed per batch of sequences, streaming.

    Usage: `an = OutlierAnalyzer(model, ...)`; for each batch `an.run_batch(X, Y)`; `an.result()`.
    Memory: per-layer accumulators of size O(L * (C + T + n_head * head_dim)) plus capped lists.
    """

    def __init__(self, model, *, tau_act=1000.0, tau_weight=1000.0, tau_attn=1000.0, tau_channel=10.0,
                 max_list=100, token_info=None, seq_len=1024, full=True, surface_tokens=64,
                 weight_rule="column", weight_share=WEIGHT_SHARE, attention_rule="authors",
                 attention_share=ATTENTION_SHARE, record_qkv=True):
        cfg = model.config
        self.model = model
        from hf_models import model_view
        self.view = model_view(model)
        self.L, self.H, self.C = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.hs = getattr(cfg, "head_dim", None) or self.C // self.H
        self.variant = cfg.attention
        self.tau_act, self.tau_weight, self.tau_attn, self.tau_channel = tau_act, tau_weight, tau_attn, tau_channel
        self.weight_rule, self.weight_share = weight_rule, weight_share
        self.attn_rule, self.attn_share = attention_rule, attention_share
        self.full = full
        self.record_qkv = record_qkv
        self.token_info = token_info or TokenInfo()
        self.T = seq_len
        self.surface_tokens = surface_tokens
        self.h_acc = ActivationAccumulator(self.L, self.C, seq_len, tau_act, max_list, cfg.vocab_size)
        self.n_seqs = 0
        self.loss_sum, self.loss_n = 0.0, 0
        self.surface = None
        if not full:
            return
        self.x_acc = ActivationAccumulator(self.L, self.view.d_ff, seq_len, tau_act, max_list, cfg.vocab_size)
        self.weights = weight_statistics(model, tau_weight, rule=weight_rule, share=weight_share)
        self.wdown = [w.detach() for w in self.view.weights(self.view.down_name)]
        self.lifecycle = LifecycleAccumulator(self.L)
        L, H, C, hs = self.L, self.H, self.C, self.hs
        # attention
        self.att_top2 = np.zeros((L, 2))
        self.att_median = np.zeros(L)
        self.att_mean = np.zeros(L)
        self.att_head_top1 = np.zeros((L, H))
        self.att_head_median = np.zeros((L, H))
        self.att_head_count = np.zeros((L, H), dtype=np.int64)  # outlier keys
        self.att_head_seqs = np.zeros((L, H), dtype=np.int64)  # sequences with >= 1 outlier key
        self.att_n = np.zeros(L, dtype=np.int64)
        self.att_pos = np.zeros((L, seq_len), dtype=np.int64)
        self.att_cat = np.zeros((L, len(CATEGORIES)), dtype=np.int64)
        self.att_list = TopList(max_list)
        # keys that are outliers of the head-averaged cumulative score (the authors' code)
        self.avg_count = np.zeros(L, dtype=np.int64)
        self.avg_seqs = np.zeros(L, dtype=np.int64)
        self.avg_pos = np.zeros((L, seq_len), dtype=np.int64)
        self.avg_list = TopList(max_list)
        self.avg_share = np.zeros((L, H))  # share of each head's attention taken by those keys (Figure 6c)
        self.att_thr = np.zeros(L)  # absolute threshold on Ahat actually applied, mean over (sequence, head)
        self._amask = [None] * L  # per-head outlier keys of layer l, until h_l is known (Table 1)
        self.sink = np.zeros((L, H))
        self.sink_n = np.zeros(L, dtype=np.int64)
        self.first_mass = np.zeros((L, H))
        # [sum, count] at position 0 / at h-outlier positions (not 0) / elsewhere
        self.gate = np.zeros((L, 3, 2))
        self.vnorm = np.zeros((L, 3, 2))
        self.logit = np.zeros((L, 2, 2))  # mean q.k/sqrt(d) at attention-outlier keys vs other keys
        self.qk_sum = np.zeros((L, H, hs))
        self.qk_n = np.zeros((L, H), dtype=np.int64)
        self.qkv_seqs = np.zeros(L, dtype=np.int64)  # sequences whose q, k, v were recorded, per layer
        self.qkv_missing = {}  # why not: reason -> layers
        # consistency
        self.cons_attn = [0.0, 0, 0.0, 0]  # A-in-K sum, count, K-in-A sum, count
        self.cons_attn_layer = [[0.0, 0, 0.0, 0] for _ in range(L)]
        self.cons_seq = [0.0, 0, 0.0, 0]
        # normalization: per norm of view.norms (each block's, then the final one) sum |y| and |y - beta|
        n_norms = len(self.view.norms)
        self.norm_abs = np.zeros((n_norms, C))
        self.norm_centered = np.zeros((n_norms, C))
        self.norm_n = np.zeros(n_norms, dtype=np.int64)
        # intervention
        self._batch = None

    # ---------------------------------------------------------------------------------------
    def probe(self):
        if not self.full:
            return Probe(self.model, block_fn=self._block)
        return Probe(self.model, attention_fn=self._attention, block_fn=self._block, branches=True,
                     down_input=True, norms=True, record_qkv=self.record_qkv)

    def _block(self, l, h):
        tokens, cats, seq0 = self._batch
        self._hout[l] = self.h_acc.update(l, h, tokens, cats, seq0, self.token_info)
        if self.full and self._amask[l] is not None:
            self._table1_attention(l, self._hout[l].rows, self._amask[l])
            self._amask[l] = None

    def _table1_attention(self, l, hpos, amask):
        a_in_k, k_in_a = b2_overlaps(hpos, amask)
        for acc in (self.cons_attn, self.cons_attn_layer[l]):
            _add_finite(acc, 0, a_in_k)
            _add_finite(acc, 2, k_in_a)

    def _attention(self, l, rec, layer_input):
        tokens, cats, seq0 = self._batch
        probs = rec["probs"]
        B, H, T, _ = probs.shape
        cum = cumulative_attention(probs)  # (B, H, T)
        amask = attention_rule_mask(cum, self.attn_rule, self.tau_attn, self.attn_share)
        avg = cum.mean(1)  # (B, T) head-averaged cumulative score
        self._amask[l] = amask
        self._head_averaged_keys(l, cum, avg, tokens, cats, seq0)
        top, med, mean = top_and_median(avg[..., None], 2)
        self.att_top2[l, :top.shape[1]] += top.sum(0).cpu().numpy()
        self.att_median[l] += float(med.sum())
        self.att_mean[l] += float(mean.sum())
        self.att_n[l] += B
        self.att_head_top1[l] += cum.max(-1).values.sum(0).cpu().numpy()
        self.att_head_median[l] += cum.median(-1).values.sum(0).cpu().numpy()
        self.first_mass[l] += probs[..., 0].float().mean(-1).sum(0).cpu().numpy()
        if l == 0:
            hpos = find_activation_outliers(layer_input, self.tau_act).rows  # (B, T)
        else:
            hpos = self._hout[l - 1].rows
        # the q/k/v statistics (logits, q.k alignment, value norms) need recorded q, k, v: whether a Hugging
        # Face model's attention gave them is observed per forward (hf_models)
        has_qkv = "q" in rec
        if has_qkv:
            self.qkv_seqs[l] += B
        else:
            self.qkv_missing.setdefault(rec.get("qkv_missing", "not recorded"), set()).add(l)
        if has_qkv:
            q, k = rec["q"].float(), rec["k"].float()
            cs = q.cumsum(2)
            qs = cs[:, :, -1:] - cs + q  # suffix sums over queries: sum_{i >= j} q_i
        n_out = int(amask.sum())
        if n_out:
            self.att_head_count[l] += amask.sum((0, 2)).cpu().numpy()
            self.att_head_seqs[l] += amask.any(-1).sum(0).cpu().numpy()
            key_any = amask.any(1).cpu().numpy()  # (B, T)
            self.att_pos[l, :T] += key_any.sum(0)
            self.att_cat[l] += np.bincount(cats[key_any], minlength=len(CATEGORIES))
            idx = amask.nonzero()
            scores = cum[amask]
            if n_out > self.att_list.cap:
                keep = scores.topk(self.att_list.cap).indices
                idx, scores = idx[keep], scores[keep]
            idx, scores_np = idx.cpu().numpy(), scores.cpu().numpy()
            ratio_den = cum.mean(-1).cpu().numpy()
            rows = [{"layer": l, "head": int(h), "seq": int(seq0 + b), "position": int(t),
                     "token": self.token_info.text(tokens[b, t]), "token_id": int(tokens[b, t]),
                     "category": CATEGORIES[cats[b, t]], "score": float(s),
                     "ratio": float(s / max(ratio_den[b, h], _TINY))}
                    for (b, h, t), s in zip(idx, scores_np)]
            self.att_list.total += n_out - len(rows)
            self.att_list.add(scores_np, rows)
        if n_out and has_qkv:
            # q/k alignment at outlier keys: per dimension d, mean over queries i >= j of q_i[d] k_j[d]
            full_idx = amask.nonzero()
            b_, h_, j_ = full_idx[:, 0], full_idx[:, 1], full_idx[:, 2]
            contrib = k[b_, h_, j_] * qs[b_, h_, j_] / (T - j_).float()[:, None]  # (n, hs)
            sums = torch.zeros(H, self.hs, device=contrib.device).index_add_(0, h_, contrib)
            self.qk_sum[l] += sums.cpu().numpy()
            self.qk_n[l] += torch.bincount(h_, minlength=H).cpu().numpy()
        if has_qkv:
            # mean logit per key (over the queries that see it), outlier keys vs the rest
            logit = (qs * k).sum(-1) / (T - torch.arange(T, device=q.device)).float() / math.sqrt(self.hs)
            self.logit[l, 0] += [float(logit[amask].sum()), n_out]
            self.logit[l, 1] += [float(logit[~amask].sum()), int((~amask).sum())]
        # value norms and gates: position 0 / h-outlier positions (not 0) / the rest
        groups = torch.full((B, T), 2, dtype=torch.long, device=probs.device)
        groups[hpos.to(groups.device)] = 1  # the previous layer may sit on another GPU
        groups[:, 0] = 0
        vn = rec["v"].float().norm(dim=-1).mean(1) if has_qkv else None  # (B, T), head average
        for g in range(3):
            sel = groups == g
            if vn is not None:
                self.vnorm[l, g] += [float(vn[sel].sum()), int(sel.sum())]
            if "gate" in rec:
                self.gate[l, g] += [float(rec["gate"].float().mean(1)[sel].sum()), int(sel.sum())]
        if "sink_probs" in rec:
            self.sink[l] += rec["sink_probs"].float().mean(-1).sum(0).cpu().numpy()
            self.sink_n[l] += B

    def _head_averaged_keys(self, l, cum, avg, tokens, cats, seq0):
        B, H, T = cum.shape
        self.att_thr[l] += (self.attn_share * T * B if self.attn_rule == "authors"
                            else float(self.tau_attn * cum.mean(-1).mean(1).sum()))
        mask = attention_rule_mask(avg, self.attn_rule, self.tau_attn, self.attn_share)  # (B, T)
        self.avg_share[l] += ((cum * mask[:, None, :]).sum(-1) / cum.sum(-1).clamp_min(_TINY)).sum(0).cpu().numpy()
        n = int(mask.sum())
        if not n:
            return
        self.avg_count[l] += n
        self.avg_seqs[l] += int(mask.any(-1).sum())
        self.avg_pos[l, :T] += mask.sum(0).cpu().numpy()
        idx = mask.nonzero().cpu().numpy()
        scores = avg[mask].cpu().numpy()
        rows = [{"layer": l, "seq": int(seq0 + b), "position": int(t), "token": self.token_info.text(tokens[b, t]),
                 "token_id": int(tokens[b, t]), "category": CATEGORIES[cats[b, t]], "score": float(sc),
                 "share": float(sc / T)} for (b, t), sc in zip(idx, scores)]
        self.avg_list.add(scores, rows)

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def run_batch(self, X, Y=None, autocast=None):
        """X (B, T) long on the model's device; Y the targets (for the loss) or None."""
        tokens = X.cpu().numpy()
        cats = self.token_info.categories(tokens)
        seq0 = self.n_seqs
        self._batch = (tokens, cats, seq0)
        self._hout = [None] * self.L
        with self.probe() as p:
            with (autocast if autocast is not None else _null()):
                _, loss = self.model(X, Y)
            if loss is not None:
                self.loss_sum += float(loss) * X.shape[0]
                self.loss_n += X.shape[0]
            self._after_forward(p, tokens, cats, seq0)
        self._hout = None
        self.n_seqs += X.shape[0]

    def _after_forward(self, p, tokens, cats, seq0):
        L = self.L
        h_out = self._hout
        if self.surface is None:
            S = min(self.surface_tokens, p.h[0].shape[1])
            self.surface = np.stack([p.h[l][0, :S].float().abs().cpu().numpy() for l in range(L)])
            self.surface_tokens_ids = tokens[0, :S].tolist()
        if not self.full:
            return
        x_out = [self.x_acc.update(l, p.xdown[l], tokens, cats, seq0, self.token_info) for l in range(L)]
        # consistency: h vs x_down positions, per sequence pooled over layers
        hp = torch.stack([o.rows.cpu() for o in h_out]).any(0)  # (B, T); cpu: layers may sit on several GPUs
        xp = torch.stack([o.rows.cpu() for o in x_out]).any(0)
        _add_finite(self.cons_seq, 0, row_overlap(hp, xp))
        _add_finite(self.cons_seq, 2, row_overlap(xp, hp))
        # normalization
        for i, (y, (_, ln)) in enumerate(zip(p.norm_out, self.view.norms)):
            y = y.float().reshape(-1, y.shape[-1])
            ones = torch.ones(1, y.shape[0], device=y.device)
            col = (ones @ y.abs())[0].cpu().numpy()  # column sums through BLAS: much faster than .sum(0)
            self.norm_abs[i] += col
            if getattr(ln, "bias", None) is not None:  # RMSNorm has none
                col = (ones @ (y - ln.bias.detach().float()).abs())[0].cpu().numpy()
            self.norm_centered[i] += col
            self.norm_n[i] += y.shape[0]
        # lifecycle
        self.lifecycle.update(p.h, p.attn_out, p.mlp_out, p.xdown, self.wdown, h_out, self.tau_act, tokens,
                              self.token_info, up_gate=[p.up_gate(l) for l in range(L)])

    # ---------------------------------------------------------------------------------------
    def result(self):
        ti = self.token_info
        out = {"layer_output": self.h_acc.result(ti)}
        if self.loss_n:
            out["loss"] = self.loss_sum / self.loss_n
        if not self.full:
            return out
        L, H = self.L, self.H
        out["down_input"] = self.x_acc.result(ti)
        out["weight"] = self.weights
        out["weight_link"] = weight_link(self.model, self.x_acc.chan)
        n = np.maximum(self.att_n, 1)
        att = {
            "top2": (self.att_top2 / n[:, None]).tolist(),
            "median": (self.att_median / n).tolist(),
            "mean": (self.att_mean / n).tolist(),
            "head_top1": (self.att_head_top1 / n[:, None]).tolist(),
            "head_median": (self.att_head_median / n[:, None]).tolist(),
            "head_outlier_keys": self.att_head_count.tolist(),
            "head_seqs_with_outliers": self.att_head_seqs.tolist(),
            "first_token_mass": (self.first_mass / n[:, None]).mean(1).tolist(),
            "positions": [[[int(t), int(self.att_pos[l, t])] for t in np.argsort(-self.att_pos[l], kind="stable")[:10]
                           if self.att_pos[l, t] > 0] for l in range(L)],
            "token_categories": dict(zip(CATEGORIES, self.att_cat.sum(0).tolist())),
            "token_categories_by_layer": self.att_cat.tolist(),
            "outlier_keys": self.att_list.result(),
            "outlier_keys_total": int(self.att_list.total),
            "mean_logit_outlier_keys": _ratio_list(self.logit[:, 0]),
            "mean_logit_other_keys": _ratio_list(self.logit[:, 1]),
            "value_norm": {g: _ratio_list(self.vnorm[:, i]) for i, g in enumerate(("first", "h_outlier", "other"))},
            "qk_alignment": self._qk_alignment(),
            "qkv": self._qkv_source(),
            "rule": self.attn_rule,
            "threshold": (self.att_thr / n).tolist(),
            "mean_outlier_count": self.avg_count.tolist(),
            "mean_outlier_seqs": self.avg_seqs.tolist(),
            "mean_positions": [[[int(t), int(self.avg_pos[l, t])] for t in np.argsort(-self.avg_pos[l], kind="stable")[:10]
                                if self.avg_pos[l, t] > 0] for l in range(L)],
            "mean_outlier_keys": self.avg_list.result(),
            "mean_outlier_keys_total": int(self.avg_list.total),
            "outlier_key_share_by_head": (self.avg_share / n[:, None]).tolist(),
        }
        if self.sink_n.any():
            att["sink_share"] = (self.sink / np.maximum(self.sink_n, 1)[:, None]).mean(1).tolist()
            att["sink_share_by_head"] = (self.sink / np.maximum(self.sink_n, 1)[:, None]).tolist()
        if self.gate[:, :, 1].any():
            att["gate"] = {g: _ratio_list(self.gate[:, i]) for i, g in enumerate(("first", "h_outlier", "other"))}
            # what the recorded gate is, from the variant's registry entry (S(x) in (0, 2), sigmoid(xW) in (0, 1), ...)
            att["gate_meaning"] = self.view.attn[0].variant.gate
        out["attention"] = att
        out["consistency"] = self._consistency()
        out["lifecycle"] = self.lifecycle.result(ti)
        out["normalization"] = self._normalization()
        return out

    def _qkv_source(self):
        """Which layers' q, k, v were recorded (their value norms, logits and q/k alignment are reported),
        and why the others were not."""
        return {"recorded_layers": [l for l in range(self.L) if 0 < self.qkv_seqs[l] == self.att_n[l]],
                "missing": [{"reason": reason, "layers": sorted(layers)} for reason, layers in self.qkv_missing.items()]}

    def _qk_alignment(self):
        """Per (layer, head) with attention-outlier keys: the mean logit q.k/sqrt(d) they receive and the
        3 dimensions d contributing most to it (mean over queries of q_i[d] k_j[d] / sqrt(d))."""
        rows = []
        scale = 1.0 / math.sqrt(self.hs)
        for l in range(self.L):
            for h in range(self.H):
                if self.qk_n[l, h] == 0:
                    continue
                s = self.qk_sum[l, h] / self.qk_n[l, h] * scale
                top = np.argsort(-s)[:3]
                rows.append({"layer": l, "head": h, "n_keys": int(self.qk_n[l, h]), "logit": float(s.sum()),
                             "dims": [[int(d), float(s[d])] for d in top]})
        return rows

    def _consistency(self):
        # weight outliers of W_down vs activation outliers
        w = self.weights[self.view.down_name]
        A_x = {(l, k) for l in range(self.L) for k in w["outlier_channels"][l]}
        B_x = {(l, int(k)) for l in range(self.L) for k in np.nonzero(self.x_acc.chan_any[l])[0]}
        A_h = {c for l in range(self.L) for c in w["outlier_out_channels"][l]}
        B_h = {int(c) for c in np.nonzero(self.h_acc.chan_any.any(0))[0]}

        def pair(a, b, what):
            return {"a_in_b": overlap(a, b), "b_in_a": overlap(b, a), "n_a": len(a), "n_b": len(b), "definition": what}

        def mean(s, n):
            return s / n if n else None

        return {
            "wdown_vs_xdown": pair(A_x, B_x, "feature dim; A = (layer, input column) of W_down weight outliers, "
                                             "B = (layer, channel) of x_down activation outliers"),
            "wdown_vs_h": pair(A_h, B_h, "feature dim; A = output rows of W_down weight outliers (any layer), "
                                         "B = channels of h activation outliers (any layer)"),
            "h_vs_xdown": {"a_in_b": mean(*self.cons_seq[0:2]), "b_in_a": mean(*self.cons_seq[2:4]),
                           "n_a": self.cons_seq[1], "n_b": self.cons_seq[3],
                           "definition": "sequence dim; per sequence, A = positions of h outliers (any layer), "
                                         "B = positions of x_down outliers (any layer); mean over sequences"},
            "h_vs_attention": {"a_in_b": mean(*self.cons_attn[0:2]), "b_in_a": mean(*self.cons_attn[2:4]),
                               "n_a": self.cons_attn[1], "n_b": self.cons_attn[3],
                               "by_layer": [{"a_in_b": mean(*c[0:2]), "b_in_a": mean(*c[2:4]), "n_a": c[1], "n_b": c[3]}
                                            for c in self.cons_attn_layer],
                               "layers": [l for l, c in enumerate(self.cons_attn_layer) if c[1]],
                               "definition": "Appendix B.2; sequence dim; per sample, layer l and head i, A = positions "
                                             "of activation outliers of h_l (layer l's output), K_i = attention-outlier "
                                             f"keys of head i of layer l ({self.attn_rule} rule); a_in_b = mean of "
                                             "|A&K_i|/|A| over (sample, layer, head) with A non-empty (n_a of them: "
                                             "the layers listed in 'layers'); b_in_a = mean of |A&K_i|/|K_i| over "
                                             "non-empty K_i"},
        }

    def _normalization(self, top_n=5):
        out = []
        for i, (name, ln) in enumerate(layer_norms(self.model)):
            n = max(int(self.norm_n[i]), 1)
            m = self.norm_abs[i] / n
            gamma = ln.weight.detach().float().cpu().numpy()
            normalized = self.norm_centered[i] / n / np.maximum(np.abs(gamma), _TINY)  # mean |x_hat_c|
            med, med_hat = float(np.median(m)), float(np.median(normalized))
            ratio = m / max(med, _TINY)
            top = np.argsort(-ratio)[:top_n]
            outliers = np.nonzero(ratio > self.tau_channel)[0]
            before = normalized / max(med_hat, _TINY)
            out.append({"module": name, "median_abs": med,
                        "outlier_channels": [int(c) for c in outliers],
                        # outliers only after the gain: gamma, not the normalized input, makes them
                        "gamma_driven": [int(c) for c in outliers if before[c] <= self.tau_channel],
                        "top": [{"channel": int(c), "ratio": float(ratio[c]), "mean_abs": float(m[c]),
                                 "gamma": float(gamma[c]),
                                 "ratio_before_gamma": float(normalized[c] / max(med_hat, _TINY))} for c in top]})
        return out


def _ratio_list(arr):
    """arr (L, 2) of [sum, count] -> list of means (None where count is 0)."""
    return [float(s / c) if c else None for s, c in arr]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ==============================================================================================
# intervention

INTERVENTION_TARGETS = ("generated", "propagated", "all")


class Intervention:
    """Forward hooks that edit massive activations of the layer outputs (found on the fly with the
    definitions of the module docstring) to zero ('zero') or to the mean value measured by the analysis
    for that (layer, channel) ('mean'; 0 where none was measured). `target` (an operational reading of
    Raman, Sharma, Zhang 2025, whose exact tests are not public):
      generated   only where a branch output is itself massive: the value is removed at the layer that
                  generates it, so the residual stream never carries it further;
      propagated  only where no branch output is massive (the residual carries the value): the layer
                  that generates it keeps it, and the copy is removed from the next layer's output on;
      all         every massive activation, wherever it is."""

    def __init__(self, model, tau, mode, means=None, target="generated"):
        if mode not in ("zero", "mean"):
            raise ValueError(mode)
        if target not in INTERVENTION_TARGETS:
            raise ValueError(target)
        from hf_models import model_view
        self.model, self.tau, self.mode, self.target = model, tau, mode, target
        self.view = model_view(model)
        blocks = self.view.blocks
        C = model.config.n_embd
        self.repl = []
        for l in range(len(blocks)):
            r = torch.zeros(C)
            for (ml, c), v in (means or {}).items():
                if ml == l:
                    r[c] = v
            self.repl.append(r)
        self.count = 0
        self._handles = []
        self._branch = [[None, None] for _ in blocks]

    def __enter__(self):
        from hf_models import first
        view = self.view
        for l, block in enumerate(view.blocks):
            def keep(i, l=l):
                def hook(module, inputs, output):
                    # a copy: Falcon adds the attention output into the MLP output in place
                    self._branch[l][i] = first(output).detach().clone()
                return hook

            def edit(module, inputs, output, l=l):
                if isinstance(output, tuple):  # blocks returning (hidden, ...): edit the hidden states
                    return (edit(module, inputs, output[0], l),) + output[1:]
                a, m = (x.view(output.shape) for x in self._branch[l])  # OPT's MLP works on (B*T, C)
                self._branch[l] = [None, None]
                found = find_activation_outliers(output, self.tau)
                if found.idx.shape[0] == 0:
                    return output
                b, t, c = found.idx.unbind(1)
                thr = self.tau * found.mean[b]
                gen = (a[b, t, c].float().abs() > thr) | (m[b, t, c].float().abs() > thr)
                if self.target != "all":
                    keep = gen if self.target == "generated" else ~gen
                    b, t, c = b[keep], t[keep], c[keep]
                self.count += int(b.numel())
                output = output.clone()
                output[b, t, c] = self.repl[l].to(device=output.device, dtype=output.dtype)[c]
                return output

            self._handles += [view.attn_branch[l].register_forward_hook(keep(0)),
                              view.mlp_branch[l].register_forward_hook(keep(1)), block.register_forward_hook(edit)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False


def layer_norms(model):
    """[(name, module)] of every LayerNorm / RMSNorm (each block's, then the final one), in the order of
    OutlierAnalyzer's normalization report."""
    from hf_models import model_view
    return model_view(model).norms


class GammaIntervention:
    """Sets the LayerNorm gains gamma of the given channels ({module name: [channel]}) to the median gamma
    of their LayerNorm, and restores them on exit (the normalization test of Raman, Sharma, Zhang 2025)."""

    def __init__(self, model, channels):
        self.model, self.channels = model, channels
        self._saved = []

    @torch.no_grad()
    def __enter__(self):
        for name, ln in layer_norms(self.model):
            chans = self.channels.get(name)
            if chans:
                idx = torch.as_tensor(chans, device=ln.weight.device)
                self._saved.append((ln, idx, ln.weight[idx].clone()))
                ln.weight[idx] = ln.weight.median()
        return self

    @torch.no_grad()
    def __exit__(self, *exc):
        for ln, idx, old in self._saved:
            ln.weight[idx] = old
        self._saved = []
        return False
