"""Attention outliers: cumulative attention per key (per head and head-averaged), the outlier keys under the
attention rule, the first token's share, sink and gate records, and where q, k, v were recorded the value
norms, centred logits and q/k alignment at the outlier keys (Figure 6); with the token categories of every
kind of outlier."""

import math

import numpy as np
import torch

from analysis.definitions import _TINY, CATEGORIES, top_and_median
from analysis.statistics.base import Figure, Statistic, TopList, ranked_positions, ratio_list
from runtime.reports import layer_axis, layer_ranges, markdown_table, number, pyplot, save_figure

# ----------------------------------------------------------------------------------------------
# report

def report_attention(doc):
    att, figs, L = doc["attention"], doc["figures"], doc["model"]["n_layer"]
    lines = ["## Attention outliers", "",
             f"Cumulative attention of key j: Ahat_j = sum over queries of A_ij. Outlier: "
             f"{doc['thresholds']['attention']['definition']}. '# outlier keys' counts (sequence, head, key) triples; "
             "'head-avg keys' the outlier keys of the head-averaged score. Top-2 and median are over keys of the "
             "head-averaged score.", "",
             f"![attention]({figs.get('attention')})", "", f"![heads]({figs.get('attention_heads')})", ""]
    header = ["layer", "top 1", "top 2", "median", "# outlier keys", "head-avg keys", "key positions (count)",
              "attn to pos 0", "|v| pos 0", "|v| others", "q.k outlier keys", "q.k other keys"]
    header += ["sink share"] if "sink_share" in att else []
    header += ["gate pos 0", "gate h-outlier tok.", "gate others"] if "gate" in att else []
    lines += [markdown_table(header, [attention_row(att, l) for l in range(L)]), ""]
    if "gate" in att:
        lines += [f"Gate: {att.get('gate_meaning', 'the variant output gate')}; shown at position 0, at tokens "
                  "that carry activation outliers in the layer input, and at the other tokens (mean over heads).", ""]
    qkv = att.get("qkv")
    if qkv and qkv["missing"]:
        recorded = qkv["recorded_layers"]
        lines += [f"q/k/v statistics (|v|, q.k, q/k alignment) are given for {len(recorded)} of {L} layers"
                  + (f" ({layer_ranges(recorded)})" if recorded else "") + "; "
                  + "; ".join(f"layers {layer_ranges(m['layers'])}: {m['reason']}" for m in qkv["missing"]) + ".", ""]
    if att["qk_alignment"]:
        top = sorted(att["qk_alignment"], key=lambda r: -r["n_keys"])[:6]
        lines += ["q/k alignment at attention-outlier keys: mean logit q.k/sqrt(d) they receive, and the dimensions "
                  "contributing most to it: " + "; ".join(
                      f"L{r['layer']}h{r['head']} {number(r['logit'])} ("
                      + ", ".join(f"d{dd} {number(v)}" for dd, v in r["dims"][:2]) + ")" for r in top) + ".", ""]
    if figs.get("attention_outlier_share"):
        lines += ["Share of each head's attention taken by the outlier keys of the head-averaged score (Figure 6c):", "",
                  f"![outlier key share]({figs['attention_outlier_share']})", ""]
    return lines


def threshold_text(th):
    return (f"- attention ({th['rule']}): {th['definition']}; Ahat threshold per layer "
            + ", ".join(number(x) for x in th["effective"]) + f". Paper: {th['paper_formula']}.")


def attention_row(att, l):
    pos = ", ".join(f"{p} ({n})" for p, n in att["positions"][l][:3]) or "–"
    row = [l, number(att["top2"][l][0]), number(att["top2"][l][1]), number(att["median"][l]),
           sum(att["head_outlier_keys"][l]), att["mean_outlier_count"][l], pos, number(att["first_token_mass"][l]),
           number(att["value_norm"]["first"][l]), number(att["value_norm"]["other"][l]),
           number(att["mean_logit_outlier_keys"][l]), number(att["mean_logit_other_keys"][l])]
    if "sink_share" in att:
        row.append(number(att["sink_share"][l]))
    if "gate" in att:
        row += [number(att["gate"][g][l]) for g in ("first", "h_outlier", "other")]
    return row


def category_counts(doc):
    """{outlier type: {category: count}} of h, x_down and attention-key outliers."""
    act, att = doc["activation"], doc["attention"]
    return {"h": act["layer_output"]["token_categories"], "x_down": act["down_input"]["token_categories"],
            "attention keys": att["token_categories"]}


def report_token_categories(doc):
    counts = category_counts(doc)
    rows = [[label] + [c[k] for k in CATEGORIES] for label, c in zip(
        ("h outliers", "x_down outliers", "attention-outlier keys"), counts.values())]
    return ["## Token categories", "", f"![categories]({doc['figures'].get('token_categories')})", "",
            markdown_table(["outlier type"] + list(CATEGORIES), rows),
            "", "Counts of (sequence, layer, position) triples that carry at least one outlier.", ""]


# ----------------------------------------------------------------------------------------------
# figures

def fig_attention(out_dir, att, name="attention.png"):
    plt = pyplot()
    top2, med = np.asarray(att["top2"]), np.asarray(att["median"])
    x = np.arange(len(med))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(x, top2[:, 0], marker="o", label="top 1")
    ax.plot(x, top2[:, 1], marker="s", label="top 2")
    ax.plot(x, med, marker="x", color="gray", label="median")
    ax.set_yscale("log")
    layer_axis(ax, len(med))
    ax.set_xlabel("layer")
    ax.set_ylabel("cumulative attention (head mean)")
    ax.set_title("cumulative attention per key: top-2 and median by layer")
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, name)


def fig_heads(out_dir, att, name="attention_heads.png"):
    plt = pyplot()
    ratio = np.asarray(att["head_top1"]) / np.maximum(np.asarray(att["head_median"]), 1e-12)
    fig, ax = plt.subplots(figsize=(7, 4))
    im = ax.imshow(np.log10(np.maximum(ratio, 1e-12)), aspect="auto", cmap="magma")
    fig.colorbar(im, ax=ax, label="log10(top-1 / median) of cumulative attention")
    layer_axis(ax, ratio.shape[0], "y", limits=False)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("per-head spread of cumulative attention")
    return save_figure(fig, out_dir, name)


def fig_categories(out_dir, groups, name="token_categories.png"):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(groups), 1)
    for i, (label, counts) in enumerate(groups.items()):
        total = max(sum(counts.values()), 1)
        ax.bar(np.arange(len(CATEGORIES)) + i * width, [counts[c] / total for c in CATEGORIES], width,
               label=f"{label} (n={total})")
    ax.set_xticks(np.arange(len(CATEGORIES)) + width * (len(groups) - 1) / 2)
    ax.set_xticklabels(CATEGORIES)
    ax.set_ylabel("share of outlier tokens")
    ax.set_title("token categories of outlier-carrying tokens")
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, name)


def fig_outlier_key_share(out_dir, att, name="attention_outlier_share.png"):
    """Figure 6c: per layer, the share of each head's attention taken by the outlier keys of the
    head-averaged score: mean over heads with the min-max range."""
    plt = pyplot()
    share = np.asarray(att["outlier_key_share_by_head"])  # (L, H)
    x = np.arange(share.shape[0])
    mean, lo, hi = share.mean(1), share.min(1), share.max(1)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="o-", capsize=3, label="mean over heads (min-max)")
    ax.set_ylim(0, 1.02)
    layer_axis(ax, len(x))
    ax.set_xlabel("layer")
    ax.set_ylabel("attention share of outlier keys")
    ax.set_title("share of attention taken by attention-outlier keys", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, name)


FIGURES = (
    Figure("attention", "attention.png", lambda out_dir, file, doc, _: fig_attention(out_dir, doc["attention"], file)),
    Figure("attention_heads", "attention_heads.png",
           lambda out_dir, file, doc, _: fig_heads(out_dir, doc["attention"], file)),
    Figure("token_categories", "token_categories.png",
           lambda out_dir, file, doc, _: fig_categories(out_dir, category_counts(doc), file)),
    Figure("attention_outlier_share", "attention_outlier_share.png",
           lambda out_dir, file, doc, _: fig_outlier_key_share(out_dir, doc["attention"], file), paper=6),
)

SCHEMA = {
    "top2": "[L][2] the two largest head-averaged cumulative scores Ahat of each layer, mean over sequences",
    "median": "[L] median head-averaged Ahat, mean over sequences",
    "mean": "[L] mean head-averaged Ahat, mean over sequences",
    "head_top1": "[L][H] the largest Ahat of each head, mean over sequences",
    "head_median": "[L][H] median Ahat of each head, mean over sequences",
    "head_outlier_keys": "[L][H] outlier keys of each head's score, (sequence, key) pairs",
    "head_seqs_with_outliers": "[L][H] sequences where the head has an outlier key",
    "first_token_mass": "[L] mean attention weight on position 0",
    "positions": "[L][[position, count]] the 10 positions that are an outlier key of some head most often",
    "token_categories": "{initial, delimiter, whitespace, weak_semantic, other}: (sequence, layer, position) "
                        "triples that are an outlier key of some head",
    "token_categories_by_layer": "[L][5] the same per layer",
    "outlier_keys": "[{layer, head, seq, position, token, token_id, category, score, ratio}] per-head outlier keys, "
                    "the largest by score (ratio: over the head's mean Ahat)",
    "outlier_keys_total": "per-head outlier keys in all",
    "mean_logit_outlier_keys": "[L] mean query-centred logit q.k/sqrt(d) at outlier keys (null: q, k not recorded)",
    "mean_logit_other_keys": "[L] the same at the other keys",
    "value_norm": "{first, h_outlier, other}[L] mean |v| at position 0, at positions with activation outliers in "
                  "the layer input, elsewhere",
    "qk_alignment": "[{layer, head, n_keys, logit, dims[[d, contribution]]}] per head with outlier keys: the mean "
                    "query-centred logit they receive and the 3 dimensions contributing most",
    "qkv": "{recorded_layers, missing[{reason, layers}]}: where q, k, v were recorded (Hugging Face models)",
    "rule": "the attention rule (authors | paper)",
    "threshold": "[L] the Ahat threshold applied, mean over sequences",
    "mean_outlier_count": "[L] outlier keys of the head-averaged score",
    "mean_outlier_seqs": "[L] sequences with such a key",
    "mean_positions": "[L][[position, count]] their most frequent positions",
    "mean_outlier_keys": "[{layer, seq, position, token, token_id, category, score, share}] the largest",
    "mean_outlier_keys_total": "outlier keys of the head-averaged score in all",
    "outlier_key_share_by_head": "[L][H] share of each head's attention taken by those keys (Figure 6c)",
    "sink_share?": "[L] mean attention weight on the sink (sink variants)",
    "sink_share_by_head?": "[L][H] the same per head",
    "gate?": "{first, h_outlier, other}[L] mean output gate at position 0, at activation-outlier positions of the "
             "layer input, elsewhere (gated variants)",
    "gate_meaning?": "what the gate is (the variant's registry entry)",
}


# ----------------------------------------------------------------------------------------------
# the statistic

def _suffix_sums(x):
    """x (..., T, d) -> sum over i >= j of x_i, for every j."""
    cs = x.cumsum(-2)
    return cs[..., -1:, :] - cs + x


class Attention(Statistic):
    """Streaming attention statistics: cumulative scores and outlier keys per head and head-averaged, the
    first token's share, sink and gate records, and where q, k, v were recorded their value norms, mean
    logits and q/k alignment at the outlier keys. Updated as each layer's attention runs."""
    name = "attention"
    sites = ("attention",)
    schema = SCHEMA
    figures = FIGURES
    threshold_key = "attention"
    threshold_text = staticmethod(threshold_text)

    @staticmethod
    def report(doc):
        return report_attention(doc) + report_token_categories(doc)

    def __init__(self, setup):
        super().__init__(setup)
        L, H, hs, T, max_list = setup.L, setup.H, setup.head_dim, setup.T, setup.max_list
        self.L, self.H, self.hs = L, H, hs
        self.rule, self.tau, self.share = setup.rules.attention_rule, setup.rules.tau_attn, setup.rules.attention_share
        self.top2 = np.zeros((L, 2))
        self.median = np.zeros(L)
        self.mean = np.zeros(L)
        self.head_top1 = np.zeros((L, H))
        self.head_median = np.zeros((L, H))
        self.head_count = np.zeros((L, H), dtype=np.int64)  # outlier keys
        self.head_seqs = np.zeros((L, H), dtype=np.int64)  # sequences with >= 1 outlier key
        self.n = np.zeros(L, dtype=np.int64)
        self.pos = np.zeros((L, T), dtype=np.int64)
        self.cat = np.zeros((L, len(CATEGORIES)), dtype=np.int64)
        self.list = TopList(max_list)
        # keys that are outliers of the head-averaged cumulative score (the authors' code)
        self.avg_count = np.zeros(L, dtype=np.int64)
        self.avg_seqs = np.zeros(L, dtype=np.int64)
        self.avg_pos = np.zeros((L, T), dtype=np.int64)
        self.avg_list = TopList(max_list)
        self.avg_share = np.zeros((L, H))  # share of each head's attention taken by those keys (Figure 6c)
        self.thr = np.zeros(L)  # absolute threshold on Ahat actually applied, mean over (sequence, head)
        self.sink = np.zeros((L, H))
        self.sink_n = np.zeros(L, dtype=np.int64)
        self.first_mass = np.zeros((L, H))
        # [sum, count] at position 0 / at h-outlier positions (not 0) / elsewhere
        self.gate = np.zeros((L, 3, 2))
        self.vnorm = np.zeros((L, 3, 2))
        self.logit = np.zeros((L, 2, 2))  # mean query-centred q.k/sqrt(d) at attention-outlier keys vs other keys
        self.qk_sum = np.zeros((L, H, hs))
        self.qk_n = np.zeros((L, H), dtype=np.int64)
        self.qkv_seqs = np.zeros(L, dtype=np.int64)  # sequences whose q, k, v were recorded, per layer
        self.qkv_missing = {}  # why not: reason -> layers

    def update(self, capture, batch):
        """Layer capture.attention.layer's records ('probs' (B, H, T, T), ...), its outlier keys and the positions
        of activation outliers of its input."""
        l, rec, cum, amask, hpos = capture.attention
        token_info = self.setup.token_info
        probs = rec["probs"]
        B = probs.shape[0]
        avg = cum.mean(1)  # (B, T) head-averaged cumulative score
        self._head_averaged_keys(l, cum, avg, batch, token_info)
        top, med, mean = top_and_median(avg[..., None], 2)
        self.top2[l, :top.shape[1]] += top.sum(0).cpu().numpy()
        self.median[l] += float(med.sum())
        self.mean[l] += float(mean.sum())
        self.n[l] += B
        self.head_top1[l] += cum.max(-1).values.sum(0).cpu().numpy()
        self.head_median[l] += cum.median(-1).values.sum(0).cpu().numpy()
        self.first_mass[l] += probs[..., 0].float().mean(-1).sum(0).cpu().numpy()
        if int(amask.sum()):
            self._outlier_keys(l, cum, amask, batch, token_info)
        # the q/k/v statistics (logits, q.k alignment, value norms) need recorded q, k, v: whether a Hugging
        # Face model's attention gave them is observed per forward (hf_models)
        if "q" in rec:
            self.qkv_seqs[l] += B
            self._qk_statistics(l, rec, amask)
        else:
            self.qkv_missing.setdefault(rec.get("qkv_missing", "not recorded"), set()).add(l)
        self._by_position_group(l, rec, hpos)
        if "sink_probs" in rec:
            self.sink[l] += rec["sink_probs"].float().mean(-1).sum(0).cpu().numpy()
            self.sink_n[l] += B

    def _outlier_keys(self, l, cum, amask, batch, token_info):
        tokens, cats, seq0 = batch
        n_out = int(amask.sum())
        T = cum.shape[-1]
        self.head_count[l] += amask.sum((0, 2)).cpu().numpy()
        self.head_seqs[l] += amask.any(-1).sum(0).cpu().numpy()
        key_any = amask.any(1).cpu().numpy()  # (B, T)
        self.pos[l, :T] += key_any.sum(0)
        self.cat[l] += np.bincount(cats[key_any], minlength=len(CATEGORIES))
        idx = amask.nonzero()
        scores = cum[amask]
        if n_out > self.list.cap:
            keep = scores.topk(self.list.cap).indices
            idx, scores = idx[keep], scores[keep]
        idx, scores_np = idx.cpu().numpy(), scores.cpu().numpy()
        ratio_den = cum.mean(-1).cpu().numpy()
        rows = [{"layer": l, "head": int(h), "seq": int(seq0 + b), "position": int(t),
                 "token": token_info.text(tokens[b, t]), "token_id": int(tokens[b, t]),
                 "category": CATEGORIES[cats[b, t]], "score": float(s),
                 "ratio": float(s / max(ratio_den[b, h], _TINY))}
                for (b, h, t), s in zip(idx, scores_np)]
        self.list.total += n_out - len(rows)
        self.list.add(scores_np, rows)

    def _qk_statistics(self, l, rec, amask):
        """Mean logit per key (over the queries that see it), outlier keys vs the rest, and the q/k alignment
        at outlier keys: per dimension d, mean over queries i >= j of q_i[d] (k_j[d] - kbar_i[d]). Logits are
        centred per query (logit - the mean of that query's logits over its keys, kbar_i = mean_{j <= i} k_j):
        softmax ignores what every key of a query shares, such as the part a k bias adds, which otherwise
        dominates the raw q.k of models with one (Qwen2)."""
        q, k = rec["q"].float(), rec["k"].float()
        H, T = q.shape[1], q.shape[2]
        n_keys = torch.arange(1, T + 1, device=q.device, dtype=q.dtype)
        kbar = k.cumsum(2) / n_keys[:, None]  # prefix means: the mean key of each query
        qs = _suffix_sums(q)  # sum_{i >= j} q_i
        qkbar = _suffix_sums(q * kbar)  # sum_{i >= j} q_i * kbar_i, per dimension
        n_queries = (T - torch.arange(T, device=q.device)).to(q.dtype)  # queries that see key j
        n_out = int(amask.sum())
        if n_out:
            b_, h_, j_ = amask.nonzero().unbind(1)
            contrib = (k[b_, h_, j_] * qs[b_, h_, j_] - qkbar[b_, h_, j_]) / n_queries[j_][:, None]  # (n, hs)
            sums = torch.zeros(H, self.hs, device=contrib.device).index_add_(0, h_, contrib)
            self.qk_sum[l] += sums.cpu().numpy()
            self.qk_n[l] += torch.bincount(h_, minlength=H).cpu().numpy()
        logit = ((qs * k).sum(-1) - qkbar.sum(-1)) / n_queries / math.sqrt(self.hs)
        self.logit[l, 0] += [float(logit[amask].sum()), n_out]
        self.logit[l, 1] += [float(logit[~amask].sum()), int((~amask).sum())]

    def _by_position_group(self, l, rec, hpos):
        """Value norms and gates at position 0 / at h-outlier positions (not 0) / the rest."""
        probs = rec["probs"]
        B, _, T, _ = probs.shape
        groups = torch.full((B, T), 2, dtype=torch.long, device=probs.device)
        groups[hpos.to(groups.device)] = 1  # the previous layer may sit on another GPU
        groups[:, 0] = 0
        vn = rec["v"].float().norm(dim=-1).mean(1) if "q" in rec else None  # (B, T), head average
        for g in range(3):
            sel = groups == g
            if vn is not None:
                self.vnorm[l, g] += [float(vn[sel].sum()), int(sel.sum())]
            if "gate" in rec:
                self.gate[l, g] += [float(rec["gate"].float().mean(1)[sel].sum()), int(sel.sum())]

    def _head_averaged_keys(self, l, cum, avg, batch, token_info):
        tokens, cats, seq0 = batch
        B, H, T = cum.shape
        self.thr[l] += (self.share * T * B if self.rule == "authors"
                        else float(self.tau * cum.mean(-1).mean(1).sum()))
        mask = self.setup.rules.attention_keys(avg)  # (B, T)
        self.avg_share[l] += ((cum * mask[:, None, :]).sum(-1) / cum.sum(-1).clamp_min(_TINY)).sum(0).cpu().numpy()
        n = int(mask.sum())
        if not n:
            return
        self.avg_count[l] += n
        self.avg_seqs[l] += int(mask.any(-1).sum())
        self.avg_pos[l, :T] += mask.sum(0).cpu().numpy()
        idx = mask.nonzero().cpu().numpy()
        scores = avg[mask].cpu().numpy()
        rows = [{"layer": l, "seq": int(seq0 + b), "position": int(t), "token": token_info.text(tokens[b, t]),
                 "token_id": int(tokens[b, t]), "category": CATEGORIES[cats[b, t]], "score": float(sc),
                 "share": float(sc / T)} for (b, t), sc in zip(idx, scores)]
        self.avg_list.add(scores, rows)

    def result(self, results):
        n = np.maximum(self.n, 1)
        att = {
            "top2": (self.top2 / n[:, None]).tolist(),
            "median": (self.median / n).tolist(),
            "mean": (self.mean / n).tolist(),
            "head_top1": (self.head_top1 / n[:, None]).tolist(),
            "head_median": (self.head_median / n[:, None]).tolist(),
            "head_outlier_keys": self.head_count.tolist(),
            "head_seqs_with_outliers": self.head_seqs.tolist(),
            "first_token_mass": (self.first_mass / n[:, None]).mean(1).tolist(),
            "positions": ranked_positions(self.pos),
            "token_categories": dict(zip(CATEGORIES, self.cat.sum(0).tolist())),
            "token_categories_by_layer": self.cat.tolist(),
            "outlier_keys": self.list.result(),
            "outlier_keys_total": int(self.list.total),
            "mean_logit_outlier_keys": ratio_list(self.logit[:, 0]),
            "mean_logit_other_keys": ratio_list(self.logit[:, 1]),
            "value_norm": {g: ratio_list(self.vnorm[:, i]) for i, g in enumerate(("first", "h_outlier", "other"))},
            "qk_alignment": self._qk_alignment(),
            "qkv": self._qkv_source(),
            "rule": self.rule,
            "threshold": (self.thr / n).tolist(),
            "mean_outlier_count": self.avg_count.tolist(),
            "mean_outlier_seqs": self.avg_seqs.tolist(),
            "mean_positions": ranked_positions(self.avg_pos),
            "mean_outlier_keys": self.avg_list.result(),
            "mean_outlier_keys_total": int(self.avg_list.total),
            "outlier_key_share_by_head": (self.avg_share / n[:, None]).tolist(),
        }
        if self.sink_n.any():
            att["sink_share"] = (self.sink / np.maximum(self.sink_n, 1)[:, None]).mean(1).tolist()
            att["sink_share_by_head"] = (self.sink / np.maximum(self.sink_n, 1)[:, None]).tolist()
        if self.gate[:, :, 1].any():
            att["gate"] = {g: ratio_list(self.gate[:, i]) for i, g in enumerate(("first", "h_outlier", "other"))}
            # what the recorded gate is, from the variant's registry entry (S(x) in (0, 2), sigmoid(xW) in (0, 1), ...)
            att["gate_meaning"] = getattr(getattr(self.setup.view.attn[0], "variant", None), "gate", None)
        return att

    def thresholds(self, results):
        T, rules = self.setup.T, self.setup.rules
        return {
            "rule": rules.attention_rule,
            "definition": (f"Ahat_j = sum_i A_ij >= {rules.attention_share} x T (the authors' code), on the head-averaged "
                           f"score and on each head's score" if rules.attention_rule == "authors"
                           else f"Ahat_j > {rules.tau_attn} x mean_j Ahat, per head"),
            "effective": results["attention"]["threshold"],
            "paper_formula": f"Ahat_j > tau_A x mean_j Ahat per head, tau_A = 1000; softmax: mean Ahat = 1 and "
                             f"Ahat_j <= T - j, so it cannot fire at T = {T}" if T <= 1000 else
                             "Ahat_j > tau_A x mean_j Ahat per head, tau_A = 1000: only keys j < T - 1000 holding "
                             f"{1000 / T:.1%} or more of all attention",
        }

    def _qkv_source(self):
        """Which layers' q, k, v were recorded (their value norms, logits and q/k alignment are reported),
        and why the others were not."""
        return {"recorded_layers": [l for l in range(self.L) if 0 < self.qkv_seqs[l] == self.n[l]],
                "missing": [{"reason": reason, "layers": sorted(layers)} for reason, layers in self.qkv_missing.items()]}

    def _qk_alignment(self):
        """Per (layer, head) with attention-outlier keys: the mean query-centred logit they receive
        (q_i.(k_j - kbar_i)/sqrt(d)) and the 3 dimensions d contributing most to it."""
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
