"""Outlier definitions, streaming accumulators and the cheap training telemetry (one implementation).

`analyze_outliers.py` is the command line and the report on top of this module; `train.py` calls
`training_telemetry(raw_model, X_fixed)` every `outlier_interval` iterations.

Definitions (An et al., "Systematic Outliers in Large Language Models", ICLR 2025, Sec. 3; Sun et
al., "Massive Activations in LLMs"; Raman/Sharma/Zhang, "Rethinking the Outlier Distribution in
LLMs", 2025). Every threshold is relative to a mean over the same matrix, so it is scale free:

activation outlier   in the (T, C) matrix x of one sequence and one layer: |x_tc| > tau * mean_{t,c} |x|.
                     Applied to the layer outputs h_l (block outputs, the residual stream) and to the
                     down-projection inputs x_down (the MLP's GELU output, input of mlp.c_proj).
weight outlier       in a weight W of shape (out, in) (nn.Linear layout; row i = output channel i,
                     column j = input channel j): |w_ij| > tau * mean_j |w_ij| (row-wise). The
                     per-column extremal ratio is max_i |w_ij| / mean_i |w_ij|.
attention outlier    with A (T_q, T_k) the attention weights of one head (softmax probabilities, the
                     unnormalised sigmoid weights for `sigmoid`, the key part of the softmax that
                     includes the sink for `attention_bias`), the cumulative score of key j is
                     Ahat_j = sum_i A_ij; key j is an outlier when Ahat_j > tau_A * mean_j Ahat.
                     For softmax, mean_j Ahat = 1 exactly (T rows summing to 1 over T keys), so
                     tau_A must be below T for any key to qualify.

Lifecycle (per massive activation = an activation outlier (position t, channel c) of some h_l):
  massive at l     |h_l[t,c]| > tau * mean|h_l|   (mean over that sequence's h_l)
  generated at l   massive at l AND a branch output at (t, c) is itself massive on the same scale:
                   |attn_l[t,c]| > tau * mean|h_l| or |mlp_l[t,c]| > tau * mean|h_l|
  propagated at l  massive at l and at l-1, not generated at l (the residual stream carries it)
  emerged at l     massive at l, not at l-1, and no single branch output is massive (it builds up)
  cancelled at l   massive at l-1 and not massive at l.

Consistency (Table 1 of An et al.). Overlap of two sets A, B is |A & B| / |A| ("how much of A is
also in B"); both directions are reported. The paper's Appendix B.2 formula could not be consulted
here, so these are the definitions implemented:
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
  h_vs_attention (sequence dim) per sequence and layer l, A = positions with an activation outlier in
                                the layer INPUT h_{l-1} (what layer l's keys are computed from; the
                                embedding output for l = 0), K_k = attention-outlier keys of head k:
                                mean over heads of |A & K_k| / |A|, then mean over (sequence, layer)
                                with A non-empty; reverse: mean of |A & K_k| / |K_k| over (sequence,
                                layer, head) with K_k non-empty.
"""

from __future__ import annotations

import collections
import math
import unicodedata

import numpy as np
import torch

CATEGORIES = ("initial", "delimiter", "whitespace", "other")
WEIGHT_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "attn.scale_proj")
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


def column_extremal_ratio(w):
    """w: (out, in) -> (in,): max_i |w_ij| / mean_i |w_ij| for every input column j (0 for a zero column)."""
    a = w.detach().float().abs()
    return a.max(dim=0).values / a.mean(dim=0).clamp_min(_TINY)


def cumulative_attention(probs):
    """probs: (..., T_q, T_k) attention weights -> (..., T_k) cumulative score Ahat_j = sum_i A_ij."""
    return probs.detach().float().sum(dim=-2)


def attention_outlier_mask(cum, tau):
    """cum: (..., T_k) cumulative scores -> True where Ahat_j > tau * mean_j Ahat."""
    return cum > tau * cum.mean(dim=-1, keepdim=True)


def token_category(text, position, token_id=None):
    """'initial' (position 0), 'delimiter' (end-of-text, or only punctuation/symbols), 'whitespace'
    (only spaces/newlines), else 'other'. `text` is the decoded token (None when unknown)."""
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
    """Context manager that hooks every block of a GPT for one or more forwards.

    Captures (per layer l, the last forward's tensors, detached): `h[l]` block output, `h_in0` the
    input of block 0, `attn_out[l]` / `mlp_out[l]` branch outputs, `xdown[l]` the input of
    mlp.c_proj, `ln1[l]` / `ln2[l]` / `lnf` LayerNorm outputs, as requested. With
    `attention_fn`, sets `attn.record = True` and calls attention_fn(l, recorded, layer_input)
    right after each attention layer, then drops `attn.recorded` so that only one layer's
    attention matrix lives at a time. With `block_fn`, calls block_fn(l, h_l) as soon as block l has
    run (before the next layer's attention). On exit removes every hook and restores the record flags
    and recorded dicts; it never changes train/eval mode.
    """

    def __init__(self, model, *, attention_fn=None, block_fn=None, branches=False, down_input=False, norms=False):
        self.model = model
        self.block_fn = block_fn
        self.blocks = list(model.transformer.h)
        self.L = len(self.blocks)
        self.attention_fn = attention_fn
        self.branches, self.down_input, self.norms = branches, down_input, norms
        self._handles = []
        self.clear()

    def clear(self):
        L = self.L
        self.h = [None] * L
        self.attn_out = [None] * L
        self.mlp_out = [None] * L
        self.xdown = [None] * L
        self.ln1 = [None] * L
        self.ln2 = [None] * L
        self.lnf = None
        self.h_in0 = None

    def layer_input(self, l):
        return self.h_in0 if l == 0 else self.h[l - 1]

    def __enter__(self):
        self._saved = [(b.attn.record, b.attn.recorded) for b in self.blocks]
        try:
            self._install()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _install(self):
        reg = self._handles.append

        def store(lst, l):
            def hook(module, inputs, output):
                lst[l] = output.detach()
            return hook

        def store_in0(module, args):
            self.h_in0 = args[0].detach()

        reg(self.blocks[0].register_forward_pre_hook(store_in0))
        for l, block in enumerate(self.blocks):
            reg(block.register_forward_hook(store(self.h, l)))
            if self.block_fn is not None:
                reg(block.register_forward_hook(lambda module, inputs, output, l=l: self.block_fn(l, output.detach())))
            if self.branches:
                reg(block.attn.register_forward_hook(store(self.attn_out, l)))
                reg(block.mlp.register_forward_hook(store(self.mlp_out, l)))
            if self.down_input:
                def pre(module, args, l=l):
                    self.xdown[l] = args[0].detach()
                reg(block.mlp.c_proj.register_forward_pre_hook(pre))
            if self.norms:
                reg(block.ln_1.register_forward_hook(store(self.ln1, l)))
                reg(block.ln_2.register_forward_hook(store(self.ln2, l)))
            if self.attention_fn is not None:
                block.attn.record = True

                def on_attn(module, inputs, output, l=l):
                    recorded = module.recorded
                    module.recorded = {}
                    self.attention_fn(l, recorded, self.layer_input(l))
                reg(block.attn.register_forward_hook(on_attn))
        if self.norms:
            def lnf_hook(module, inputs, output):
                self.lnf = output.detach()
            reg(self.model.transformer.ln_f.register_forward_hook(lnf_hook))

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for block, (record, recorded) in zip(self.blocks, self._saved):
            block.attn.record = record
            block.attn.recorded = recorded
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
            "ratio_top1_median": (top3[:, 0] / np.maximum(median, _TINY)).tolist(),
            "count": self.count.tolist(),
            "count_per_seq": (self.count / n[:, 0]).tolist(),
            "seqs_with_outliers": self.seqs_with.tolist(),
            "channels": [[[int(c), int(self.chan[l, c])] for c in np.argsort(-self.chan[l])[:top_n] if self.chan[l, c] > 0]
                         for l in range(self.L)],
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
        self.instances = 0

    def update(self, H, A, M, XD, wdown, h_out, tau, tokens, token_info):
        """Lists over layers: H, A, M (B, T, C) layer outputs, attention and MLP branch outputs; XD
        (B, T, 4C) down-projection inputs (or None); wdown (C, 4C) weights; h_out the Outliers of H."""
        L = self.L
        coords = torch.cat([o.idx for o in h_out])
        if coords.shape[0] == 0:
            return
        coords = torch.unique(coords, dim=0)  # (n, 3): b, t, c
        b, t, c = coords[:, 0], coords[:, 1], coords[:, 2]
        gather = lambda xs: torch.stack([x[b, t, c].float() for x in xs])  # noqa: E731  (L, n)
        traj, attn, mlp = gather(H), gather(A), gather(M)
        thr = tau * torch.stack([o.mean[b] for o in h_out])  # (L, n)
        massive = traj.abs() > thr
        gen_attn = massive & (attn.abs() > thr)
        gen_mlp = massive & (mlp.abs() > thr)
        generated = gen_attn | gen_mlp
        # means of the generated values per (layer, channel), for --intervene mean
        gl, gi = generated.nonzero(as_tuple=True)
        if gl.numel():
            C = H[0].shape[-1]
            keys = (gl * C + c[gi]).cpu().numpy()
            vals = traj[gl, gi].cpu().numpy()
            for key, v in zip(keys.tolist(), vals.tolist()):
                self.gen_sum[divmod(key, C)] += v
                self.gen_cnt[divmod(key, C)] += 1
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
                    "drivers": collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0]), "peak": 0.0}
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
                for k in top.tolist():
                    d = e["drivers"][k]
                    d[0] += float(prod[k]) / (total if abs(total) > _TINY else _TINY)
                    d[1] += float(xd[k])
                    d[2] += float(w[k])
                    d[3] += 1
        if len(self.entries) > 2 * self.cap:
            self._prune()

    def _prune(self):
        ranked = sorted(self.entries.items(), key=lambda kv: -(kv[1]["count"] * kv[1]["peak"]))
        self.entries = dict(ranked[:self.cap])

    def generated_means(self):
        return {k: self.gen_sum[k] / self.gen_cnt[k] for k in self.gen_sum}

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
                                 "weight": v[2] / v[3], "count": v[3]} for k, v in drivers],
            })
        return out


def weight_statistics(model, tau, top_n=10):
    """Row-wise weight outliers and column extremal ratios of every projection, per layer and module."""
    out = {}
    blocks = list(model.transformer.h)
    for name in WEIGHT_MODULES:
        first, attr = name.split(".")
        if not hasattr(getattr(blocks[0], first), attr):
            continue
        res = {"extremal_ratio": [], "extremal_channel": [], "outlier_count": [], "outlier_channels": [],
               "outlier_out_channels": [], "max_row_ratio": [], "top_entries": []}
        entries = []
        for l, block in enumerate(blocks):
            w = getattr(getattr(block, first), attr).weight.detach().float()
            ratio = column_extremal_ratio(w)
            j = int(ratio.argmax())
            mask = weight_outlier_mask(w, tau)
            a = w.abs()
            row_ratio = a / a.mean(dim=1, keepdim=True).clamp_min(_TINY)
            res["extremal_ratio"].append(float(ratio[j]))
            res["extremal_channel"].append(j)
            res["outlier_count"].append(int(mask.sum()))
            res["outlier_channels"].append(sorted(set(mask.nonzero()[:, 1].tolist())))
            res["outlier_out_channels"].append(sorted(set(mask.nonzero()[:, 0].tolist())))
            res["max_row_ratio"].append(float(row_ratio.max()))
            flat = row_ratio.flatten()
            top = flat.topk(min(top_n, flat.numel()))
            for v, i in zip(top.values.tolist(), top.indices.tolist()):
                entries.append((v, [l, i // w.shape[1], i % w.shape[1], v]))
        entries.sort(key=lambda x: -x[0])
        res["top_entries"] = [e for _, e in entries[:top_n]]  # [layer, out_channel, in_channel, |w|/row mean]
        out[name] = res
    return out


class OutlierAnalyzer:
    """Everything of analyze_outliers.py that is computed per batch of sequences, streaming.

    Usage: `an = OutlierAnalyzer(model, ...)`; for each batch `an.run_batch(X, Y)`; `an.result()`.
    Memory: per-layer accumulators of size O(L * (C + T + n_head * head_dim)) plus capped lists.
    """

    def __init__(self, model, *, tau_act=1000.0, tau_weight=1000.0, tau_attn=1000.0, tau_channel=10.0,
                 max_list=100, token_info=None, seq_len=1024, full=True, surface_tokens=64):
        cfg = model.config
        self.model = model
        self.L, self.H, self.C = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.hs = self.C // self.H
        self.variant = cfg.attention
        self.tau_act, self.tau_weight, self.tau_attn, self.tau_channel = tau_act, tau_weight, tau_attn, tau_channel
        self.full = full
        self.token_info = token_info or TokenInfo()
        self.T = seq_len
        self.surface_tokens = surface_tokens
        self.h_acc = ActivationAccumulator(self.L, self.C, seq_len, tau_act, max_list, cfg.vocab_size)
        self.n_seqs = 0
        self.loss_sum, self.loss_n = 0.0, 0
        self.surface = None
        if not full:
            return
        self.x_acc = ActivationAccumulator(self.L, 4 * self.C, seq_len, tau_act, max_list, cfg.vocab_size)
        self.weights = weight_statistics(model, tau_weight)
        blocks = list(model.transformer.h)
        self.wdown = [b.mlp.c_proj.weight.detach() for b in blocks]
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
        self.sink = np.zeros((L, H))
        self.sink_n = np.zeros(L, dtype=np.int64)
        self.first_mass = np.zeros((L, H))
        # [sum, count] at position 0 / at h-outlier positions (not 0) / elsewhere
        self.gate = np.zeros((L, 3, 2))
        self.vnorm = np.zeros((L, 3, 2))
        self.logit = np.zeros((L, 2, 2))  # mean q.k/sqrt(d) at attention-outlier keys vs other keys
        self.qk_sum = np.zeros((L, H, hs))
        self.qk_n = np.zeros((L, H), dtype=np.int64)
        # consistency
        self.cons_attn = [0.0, 0, 0.0, 0]  # A-in-K sum, count, K-in-A sum, count
        self.cons_seq = [0.0, 0, 0.0, 0]
        # normalization: per LayerNorm (ln_1 of each layer, ln_2 of each layer, ln_f) sum |y| and |y - beta|
        self.norm_abs = np.zeros((2 * L + 1, C))
        self.norm_centered = np.zeros((2 * L + 1, C))
        self.norm_n = np.zeros(2 * L + 1, dtype=np.int64)
        # intervention
        self._batch = None

    # ---------------------------------------------------------------------------------------
    def probe(self):
        if not self.full:
            return Probe(self.model, block_fn=self._block)
        return Probe(self.model, attention_fn=self._attention, block_fn=self._block, branches=True,
                     down_input=True, norms=True)

    def _block(self, l, h):
        tokens, cats, seq0 = self._batch
        self._hout[l] = self.h_acc.update(l, h, tokens, cats, seq0, self.token_info)

    def _attention(self, l, rec, layer_input):
        tokens, cats, seq0 = self._batch
        probs = rec["probs"]
        B, H, T, _ = probs.shape
        cum = cumulative_attention(probs)  # (B, H, T)
        amask = attention_outlier_mask(cum, self.tau_attn)
        avg = cum.mean(1)  # (B, T) head-averaged cumulative score
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
            # q/k alignment at outlier keys: per dimension d, mean over queries i >= j of q_i[d] k_j[d]
            full_idx = amask.nonzero()
            b_, h_, j_ = full_idx[:, 0], full_idx[:, 1], full_idx[:, 2]
            contrib = k[b_, h_, j_] * qs[b_, h_, j_] / (T - j_).float()[:, None]  # (n, hs)
            sums = torch.zeros(H, self.hs, device=contrib.device).index_add_(0, h_, contrib)
            self.qk_sum[l] += sums.cpu().numpy()
            self.qk_n[l] += torch.bincount(h_, minlength=H).cpu().numpy()
        # mean logit per key (over the queries that see it), outlier keys vs the rest
        logit = (qs * k).sum(-1) / (T - torch.arange(T, device=q.device)).float() / math.sqrt(self.hs)
        self.logit[l, 0] += [float(logit[amask].sum()), n_out]
        self.logit[l, 1] += [float(logit[~amask].sum()), int((~amask).sum())]
        # value norms and gates: position 0 / h-outlier positions (not 0) / the rest
        groups = torch.full((B, T), 2, dtype=torch.long, device=probs.device)
        groups[hpos] = 1
        groups[:, 0] = 0
        vn = rec["v"].float().norm(dim=-1).mean(1)  # (B, T), head average
        for g in range(3):
            sel = groups == g
            self.vnorm[l, g] += [float(vn[sel].sum()), int(sel.sum())]
            if "gate" in rec:
                self.gate[l, g] += [float(rec["gate"].float().mean(1)[sel].sum()), int(sel.sum())]
        if "sink_probs" in rec:
            self.sink[l] += rec["sink_probs"].float().mean(-1).sum(0).cpu().numpy()
            self.sink_n[l] += B
        # consistency: h-outlier positions of the layer input vs attention-outlier keys
        _add_finite(self.cons_attn, 0, head_averaged_overlap(hpos, amask))
        _add_finite(self.cons_attn, 2, row_overlap(amask, hpos[:, None, :].expand_as(amask)))

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
        hp = torch.stack([o.rows for o in h_out]).any(0)  # (B, T)
        xp = torch.stack([o.rows for o in x_out]).any(0)
        _add_finite(self.cons_seq, 0, row_overlap(hp, xp))
        _add_finite(self.cons_seq, 2, row_overlap(xp, hp))
        # normalization
        lns = list(p.ln1) + list(p.ln2) + [p.lnf]
        modules = ([b.ln_1 for b in self.model.transformer.h] + [b.ln_2 for b in self.model.transformer.h]
                   + [self.model.transformer.ln_f])
        for i, (y, ln) in enumerate(zip(lns, modules)):
            y = y.float().reshape(-1, y.shape[-1])
            ones = torch.ones(1, y.shape[0], device=y.device)
            col = (ones @ y.abs())[0].cpu().numpy()  # column sums through BLAS: much faster than .sum(0)
            self.norm_abs[i] += col
            if ln.bias is not None:
                col = (ones @ (y - ln.bias.detach().float()).abs())[0].cpu().numpy()
            self.norm_centered[i] += col
            self.norm_n[i] += y.shape[0]
        # lifecycle
        self.lifecycle.update(p.h, p.attn_out, p.mlp_out, p.xdown, self.wdown, h_out, self.tau_act, tokens,
                              self.token_info)

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
        }
        if self.sink_n.any():
            att["sink_share"] = (self.sink / np.maximum(self.sink_n, 1)[:, None]).mean(1).tolist()
            att["sink_share_by_head"] = (self.sink / np.maximum(self.sink_n, 1)[:, None]).tolist()
        if self.gate[:, :, 1].any():
            att["gate"] = {g: _ratio_list(self.gate[:, i]) for i, g in enumerate(("first", "h_outlier", "other"))}
        out["attention"] = att
        out["consistency"] = self._consistency()
        out["lifecycle"] = self.lifecycle.result(ti)
        out["normalization"] = self._normalization()
        return out

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
        w = self.weights["mlp.c_proj"]
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
                               "definition": "sequence dim; per sequence and layer, A = positions of activation "
                                             "outliers in the layer input, K_k = attention-outlier keys of head k; "
                                             "a_in_b = mean over heads of |A&K_k|/|A|, averaged over (seq, layer) "
                                             "with A non-empty; b_in_a = mean of |A&K_k|/|K_k| over non-empty K_k"},
        }

    def _normalization(self, top_n=5):
        blocks = list(self.model.transformer.h)
        modules = [(f"ln_1.L{l}", b.ln_1) for l, b in enumerate(blocks)] + \
                  [(f"ln_2.L{l}", b.ln_2) for l, b in enumerate(blocks)] + [("ln_f", self.model.transformer.ln_f)]
        out = []
        for i, (name, ln) in enumerate(modules):
            n = max(int(self.norm_n[i]), 1)
            m = self.norm_abs[i] / n
            gamma = ln.weight.detach().float().cpu().numpy()
            normalized = self.norm_centered[i] / n / np.maximum(np.abs(gamma), _TINY)  # mean |x_hat_c|
            med, med_hat = float(np.median(m)), float(np.median(normalized))
            ratio = m / max(med, _TINY)
            top = np.argsort(-ratio)[:top_n]
            out.append({"module": name, "median_abs": med,
                        "outlier_channels": [int(c) for c in np.nonzero(ratio > self.tau_channel)[0]],
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

class Intervention:
    """Forward hooks that, at each layer, set the massive activations GENERATED there (see the module
    docstring) to zero ('zero') or to the mean value of generated massive activations of that
    (layer, channel) measured by the analysis ('mean'; 0 where none was measured)."""

    def __init__(self, model, tau, mode, means=None):
        if mode not in ("zero", "mean"):
            raise ValueError(mode)
        self.model, self.tau, self.mode = model, tau, mode
        blocks = list(model.transformer.h)
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
        for l, block in enumerate(self.model.transformer.h):
            def keep(i, l=l):
                def hook(module, inputs, output):
                    self._branch[l][i] = output
                return hook

            def edit(module, inputs, output, l=l):
                a, m = self._branch[l]
                self._branch[l] = [None, None]
                found = find_activation_outliers(output, self.tau)
                if found.idx.shape[0] == 0:
                    return output
                b, t, c = found.idx.unbind(1)
                thr = self.tau * found.mean[b]
                gen = (a[b, t, c].float().abs() > thr) | (m[b, t, c].float().abs() > thr)
                b, t, c = b[gen], t[gen], c[gen]
                self.count += int(b.numel())
                output = output.clone()
                output[b, t, c] = self.repl[l].to(device=output.device, dtype=output.dtype)[c]
                return output

            self._handles += [block.attn.register_forward_hook(keep(0)), block.mlp.register_forward_hook(keep(1)),
                              block.register_forward_hook(edit)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False
