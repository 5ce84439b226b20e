"""The streaming accumulators behind analyze_outliers.py and `OutlierAnalyzer`, which feeds them one batch of
sequences at a time through a Probe: activation outliers (layer outputs and down-projection inputs), the
lifecycle of massive activations, weight outliers and their link to x_down, attention (per head, head-averaged,
q/k/v where recorded), normalization channels and Table 1's overlaps. Memory does not grow with the number of
sequences. The definitions they apply are outlier_stats'."""

import collections
import contextlib
import math

import numpy as np
import torch

from analysis.capture import Probe
from analysis.definitions import (_TINY, ATTENTION_SHARE, CATEGORIES, LIFECYCLE_STATUSES, WEIGHT_MIN_RATIO,
                                  WEIGHT_MODULES, WEIGHT_RATIO, WEIGHT_SHARE, TokenInfo, attention_rule_mask,
                                  b2_overlaps, column_extremal_ratio, cumulative_attention, find_activation_outliers,
                                  lifecycle_stages, median_rows, overlap, ratio_threshold, row_overlap, top_and_median,
                                  weight_rule_mask)
from analysis.interventions import INTERVENTION_TARGETS, ReplayBatch, edit_masks
from hf.models import NANOGPT, model_view


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
    """Massive activations keyed by (position, channel), aggregated over sequences (capped): the stages of
    each (sequence, position, channel) from its values (outlier_stats.lifecycle_stages), then per (position,
    channel) the layers that hold a stage in at least half of its sequences. Also the sums behind
    --intervene mean and, for the interventions, the last batch's coordinates and their edit masks."""

    def __init__(self, L, cap=256, per_seq=32):
        self.L, self.cap, self.per_seq = L, cap, per_seq
        self.entries = {}
        # target -> (layer, channel) -> [sum of the values it edits, count], for --intervene mean
        self.edit_sums = {target: collections.defaultdict(lambda: [0.0, 0]) for target in INTERVENTION_TARGETS}
        self.instances = 0
        self.last = None  # (coords (n, 3) [b, t, c], {target: (n, L) edit mask}) of the last batch

    def update(self, H, A, M, XD, wdown, h_out, tau, tokens, token_info, up_gate=None, down_bias=None):
        """Lists over layers: H, A, M (B, T, C) layer outputs, attention and MLP branch outputs; XD
        (B, T, d_ff) down-projection inputs (or None); wdown (C, d_ff) weights and down_bias (C,) biases
        (or None); h_out the Outliers of H (their `median`, when given, allows the early stage); up_gate: per
        layer (up, gate) SwiGLU projection outputs (B, T, d_ff), x_down = act(gate) * up, or (None, None):
        the drivers then also carry the mean up and gate values (Figure 7's mechanism)."""
        # layers may sit on different GPUs (device_map="auto"): the few gathered values meet on the first's device
        dev = h_out[0].idx.device
        coords = torch.cat([o.idx.to(dev) for o in h_out])
        self.last = None
        if coords.shape[0] == 0:
            return
        coords = torch.unique(coords, dim=0)  # (n, 3): b, t, c
        b, t, c = coords.unbind(1)
        gather = lambda xs: torch.stack([x[b.to(x.device), t.to(x.device), c.to(x.device)].float().to(dev)  # noqa: E731
                                         for x in xs], 1)  # (n, L)
        traj, attn, mlp = gather(H), gather(A), gather(M)
        per_seq = lambda vals: torch.stack([v.to(dev)[b] for v in vals], 1)  # noqa: E731  (B,) per layer -> (n, L)
        thr = tau * per_seq([o.mean for o in h_out])
        median = per_seq([o.median if o.median is not None else median_rows(h.float().abs().flatten(1))
                          for o, h in zip(h_out, H)])
        massive = traj.abs() > thr
        st = lifecycle_stages(traj, attn, mlp, median)
        masks = edit_masks(st.generated, massive)
        self._add_edit_sums(traj, masks, c)
        self.last = (coords.cpu(), {k: m.cpu() for k, m in masks.items()})
        cols = {"traj": traj, "attn": attn, "mlp": mlp, "thr": thr, "median": median, "massive": massive,
                **st._asdict()}
        keep = self._largest_per_sequence(traj, b).cpu().numpy()
        rows = {k: v.cpu().numpy()[keep] for k, v in cols.items()}
        bs, ts, cs = (x.cpu().numpy()[keep] for x in (b, t, c))
        for j in range(len(keep)):
            self._add_instance({k: v[j] for k, v in rows.items()}, int(bs[j]), int(ts[j]), int(cs[j]), XD, wdown,
                               down_bias, tokens, up_gate)
        if len(self.entries) > 2 * self.cap:
            self._prune()

    def _add_edit_sums(self, traj, masks, c):
        """Per target, sums of the values it edits per (layer, channel), for --intervene mean."""
        for target, mask in masks.items():
            i, l = mask.nonzero(as_tuple=True)
            sums = self.edit_sums[target]
            for key, v in zip(zip(l.tolist(), c[i].tolist()), traj[i, l].tolist()):
                sums[key][0] += v
                sums[key][1] += 1

    def _largest_per_sequence(self, traj, b):
        """Indices of the `per_seq` coordinates of each sequence with the largest peak |h|, sorted."""
        keep = []
        bs = b.cpu().numpy()
        peak = traj.abs().max(1).values.cpu().numpy()
        for seq in np.unique(bs):
            idx = np.nonzero(bs == seq)[0]
            keep.extend(idx[np.argsort(-peak[idx])[:self.per_seq]].tolist())
        return torch.as_tensor(sorted(keep), dtype=torch.long)

    def _entry(self, key):
        e = self.entries.get(key)
        if e is None:
            L = self.L
            e = self.entries[key] = {
                "count": 0, "traj": np.zeros(L), "attn": np.zeros(L), "mlp": np.zeros(L), "thr": np.zeros(L),
                "median": np.zeros(L), "status": np.zeros((L, len(LIFECYCLE_STATUSES)), dtype=np.int64),
                "first": collections.Counter(), "peak_layer": collections.Counter(), "emerged": collections.Counter(),
                "tokens": collections.Counter(), "peak_sum": 0.0, "early": np.zeros(L, dtype=np.int64),
                "early_peak": [0.0, 0.0, 0],  # sum of the early stage's peak value, of its ratio to the median, count
                # (stage, layer, branch) -> [sum of the branch output, sum of its share of the (stage's) peak, count]
                "writers": collections.defaultdict(lambda: [0.0, 0.0, 0]),
                # (layer, down-projection input k) -> [share, x_down, weight, count, up, gate, count with up/gate]
                "drivers": collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0, 0.0, 0.0, 0])}
        return e

    def _add_instance(self, r, seq, pos, ch, XD, wdown, down_bias, tokens, up_gate):
        """One massive (sequence, position, channel): its stages into its (position, channel) entry."""
        self.instances += 1
        e = self._entry((pos, ch))
        e["count"] += 1
        for k in ("traj", "attn", "mlp", "thr", "median"):
            e[k] += r[k]
        e["status"][np.arange(self.L), r["status"]] += 1
        e["first"][int(np.argmax(r["massive"])) if r["massive"].any() else None] += 1
        lp, sign = int(r["peak_layer"]), float(r["sign"])
        e["peak_layer"][lp] += 1
        e["emerged"][int(r["emerged_at"]) if r["emerged_at"] >= 0 else None] += 1
        e["tokens"][int(tokens[seq, pos])] += 1
        e["peak_sum"] += abs(float(r["traj"][lp]))
        e["early"] += r["early"]
        early_peak = 0.0
        if r["early"].any():
            ep = int(np.argmax(np.where(r["early"], sign * r["traj"], -np.inf)))
            early_peak = abs(float(r["traj"][ep]))
            e["early_peak"][0] += float(r["traj"][ep])
            e["early_peak"][1] += early_peak / max(float(r["median"][ep]), _TINY)
            e["early_peak"][2] += 1
        peak = abs(float(r["traj"][lp]))
        stages = (("generation", r["gen_attn"], r["gen_mlp"], peak), ("cancellation", r["cancel_attn"], r["cancel_mlp"], peak),
                  ("early", r["early_attn"], r["early_mlp"], early_peak))
        for stage, attn_mask, mlp_mask, peak in stages:
            for branch, mask in (("attn", attn_mask), ("mlp", mlp_mask)):
                for l in np.nonzero(mask)[0].tolist():
                    out = float(r[branch][l])
                    w = e["writers"][(stage, l, branch)]
                    w[0] += out
                    w[1] += sign * out / max(peak, _TINY)
                    w[2] += 1
                    if branch == "mlp" and stage != "cancellation" and XD is not None and XD[l] is not None:
                        self._add_drivers(e, l, seq, pos, ch, XD, wdown, down_bias, up_gate)

    @staticmethod
    def _add_drivers(e, layer, seq, pos, ch, XD, wdown, down_bias, up_gate):
        """The 3 down-projection inputs k contributing most to the down projection's output at `ch`,
        x_down[k] w[ch, k]; their share is of that output (bias included), which is the MLP branch itself
        except where a norm follows the MLP (Gemma 2/3)."""
        xd = XD[layer][seq, pos].float()
        w = wdown[layer][ch].float().to(xd.device)
        prod = xd * w
        total = float(prod.sum()) + (float(down_bias[layer][ch]) if down_bias and down_bias[layer] is not None else 0.0)
        top = prod.abs().topk(min(3, prod.numel())).indices
        up, gate = up_gate[layer] if up_gate else (None, None)
        for k in top.tolist():
            d = e["drivers"][(layer, k)]
            d[0] += float(prod[k]) / (total if abs(total) > _TINY else _TINY)
            d[1] += float(xd[k])
            d[2] += float(w[k])
            d[3] += 1
            if gate is not None:
                d[4] += float(up[seq, pos, k])
                d[5] += float(gate[seq, pos, k])
                d[6] += 1

    def _prune(self):
        self.entries = dict(self._ranked()[:self.cap])

    def means(self, target):
        """(layer, channel) -> mean of the values `target` edits there (--intervene mean)."""
        return {k: s / n for k, (s, n) in self.edit_sums[target].items()}

    def result(self, token_info, top_n=20):
        self._prune()
        return [self._entry_result(t, c, e, token_info) for (t, c), e in self._ranked()[:top_n]]

    def _ranked(self):
        """Entries by total peak |h| over their sequences (how often x how large), largest first."""
        return sorted(self.entries.items(), key=lambda kv: -kv[1]["peak_sum"])

    def _entry_result(self, t, c, e, token_info):
        n = e["count"]
        half = lambda k: 2 * k >= n  # noqa: E731  (a stage holds where it holds in at least half of the sequences)
        tok, tok_n = e["tokens"].most_common(1)[0]
        emerged, emerged_n = e["emerged"].most_common(1)[0]
        out = {"position": t, "channel": c, "token": token_info.text(tok), "token_id": tok,
               "distinct_tokens": len(e["tokens"]), "token_count": tok_n, "count": n,
               "peak": e["peak_sum"] / n, "peak_layer": e["peak_layer"].most_common(1)[0][0],
               "first_massive_at": e["first"].most_common(1)[0][0]}
        writers = {stage: self._writers(e, stage, half) for stage in ("generation", "early", "cancellation")}
        out["generation"] = writers["generation"]
        out["generated_at"] = sorted({w["layer"] for w in writers["generation"]})
        main = max(writers["generation"], key=lambda w: w["share"], default=None)
        out["generated_by"] = (None if main is None else
                               "both" if sum(w["layer"] == main["layer"] for w in writers["generation"]) > 1
                               else main["branch"])
        out["emerged_at"] = emerged if emerged is not None and half(emerged_n) else None
        early_layers = [l for l in range(self.L) if half(e["early"][l])]
        s, ratio, k = e["early_peak"]
        out["early_stage"] = ({"layers": early_layers, "peak": s / k, "peak_over_median": ratio / k,
                               "writers": writers["early"]} if early_layers and k else None)
        out["status"] = [LIFECYCLE_STATUSES[int(np.argmax(row))] for row in e["status"]]
        out["cancelled_at"] = sorted({w["layer"] for w in writers["cancellation"]})
        out["trajectory"] = (e["traj"] / n).tolist()
        out["attn_contrib"] = (e["attn"] / n).tolist()
        out["mlp_contrib"] = (e["mlp"] / n).tolist()
        out["threshold"] = (e["thr"] / n).tolist()
        out["median"] = (e["median"] / n).tolist()
        mlp_gen = [w for w in writers["generation"] if w["branch"] == "mlp"]
        out["mlp_drivers"] = max(mlp_gen, key=lambda w: w["share"])["drivers"] if mlp_gen else []
        out["cancellation"] = [{"layer": w["layer"], "branch": w["branch"], "branch_output": w["contribution"],
                                "previous": out["trajectory"][w["layer"] - 1] if w["layer"] else 0.0,
                                "share": -w["share"], "opposite_sign": bool(w["contribution"] * out["trajectory"][
                                    out["peak_layer"]] < 0)} for w in writers["cancellation"]]
        out["relative_contrib"] = relative_contributions(out)
        return out

    @staticmethod
    def _writers(e, stage, half):
        """The (layer, branch) pairs of `stage` in at least half of the entry's sequences: mean branch output,
        mean share of the peak (signed along the peak), count, and for MLP writers their drivers."""
        rows = []
        for (s, l, branch), (out, share, k) in sorted(e["writers"].items(), key=lambda kv: kv[0][1:]):
            if s != stage or not half(k):
                continue
            row = {"layer": l, "branch": branch, "contribution": out / k, "share": share / k, "count": k}
            if branch == "mlp" and stage != "cancellation":
                drivers = sorted(((kk, v) for (dl, kk), v in e["drivers"].items() if dl == l),
                                 key=lambda kv: -abs(kv[1][0]) * kv[1][3])[:3]
                row["drivers"] = [{"layer": l, "down_input_channel": kk, "share": v[0] / v[3], "x_down": v[1] / v[3],
                                   "weight": v[2] / v[3], "count": v[3],
                                   **({"up": v[4] / v[6], "gate": v[5] / v[6]} if v[6] else {})} for kk, v in drivers]
            rows.append(row)
        return rows


def relative_contributions(e):
    """An et al.'s Figures 8-9 ratios from one lifecycle entry's mean trajectory: each branch output relative
    to the residual value it is added to (attn_l / h_{l-1}, mlp_l / (h_{l-1} + attn_l); -1 cancels it
    exactly, None where that value is 0). They explode where the residual is near 0, so the figures plot
    values instead; the ratios stay in outliers.json."""
    traj, attn, mlp = e["trajectory"], e["attn_contrib"], e["mlp_contrib"]
    rel_attn, rel_mlp = [None], [None]
    for l in range(1, len(traj)):
        before_mlp = traj[l - 1] + attn[l]
        rel_attn.append(attn[l] / traj[l - 1] if traj[l - 1] else None)
        rel_mlp.append(mlp[l] / before_mlp if before_mlp else None)
    return {"attn": rel_attn, "mlp": rel_mlp}


def weight_statistics(model, tau=None, top_n=10, rule="ratio", share=WEIGHT_SHARE, ratio=WEIGHT_RATIO):
    """Weight outliers (`rule`: see weight_rule_mask) and column extremal ratios of every projection,
    per layer and module. `top_entries` ranks entries by the rule's own score (extremal ratio
    |w_ij| / mean_i |w_ij|, column share |w_ij| / sum_i |w_ij|, or row ratio |w_ij| / mean_j |w_ij|);
    `profile` holds the per-column and per-row max |w| of the layer with the largest extremal ratio
    (Figure 5b-c); `threshold` the threshold the rule came to for this module's shape."""
    out = {}
    view = model_view(model)
    for name in view.weight_names(WEIGHT_MODULES if view.family is NANOGPT else None):
        res = {"extremal_ratio": [], "extremal_channel": [], "outlier_count": [], "outlier_channels": [],
               "outlier_out_channels": [], "max_row_ratio": [], "top_entries": []}
        entries = []
        profile = None
        for l, w in enumerate(view.weights(name)):
            w = w.detach().float()
            ratio_j = column_extremal_ratio(w)
            j = int(ratio_j.argmax())
            mask = weight_rule_mask(w, rule, tau, share, ratio)
            a = w.abs()
            row_ratio = a / a.mean(dim=1, keepdim=True).clamp_min(_TINY)
            score = {"ratio": lambda: a / a.mean(dim=0, keepdim=True).clamp_min(_TINY),
                     "column": lambda: a / a.sum(dim=0, keepdim=True).clamp_min(_TINY),
                     "paper": lambda: row_ratio}[rule]()
            res["extremal_ratio"].append(float(ratio_j[j]))
            res["extremal_channel"].append(j)
            res["outlier_count"].append(int(mask.sum()))
            res["outlier_channels"].append(sorted(set(mask.nonzero()[:, 1].tolist())))
            res["outlier_out_channels"].append(sorted(set(mask.nonzero()[:, 0].tolist())))
            res["max_row_ratio"].append(float(row_ratio.max()))
            if profile is None or float(ratio_j[j]) > profile[0]:
                profile = (float(ratio_j[j]), {"layer": l, "column": j, "column_max_abs": a.max(0).values.tolist(),
                                               "row_max_abs": a.max(1).values.tolist(), "column_abs": a[:, j].tolist()})
            flat = score.flatten()
            top = flat.topk(min(top_n, flat.numel()))
            for v, i in zip(top.values.tolist(), top.indices.tolist()):
                entries.append((v, [l, i // w.shape[1], i % w.shape[1], v]))
        entries.sort(key=lambda x: -x[0])
        res["top_entries"] = [e for _, e in entries[:top_n]]  # [layer, out_channel, in_channel, score]
        res["profile"] = profile[1]
        res["rule"] = rule
        res["threshold"] = weight_threshold(rule, w.shape, tau, share, ratio)
        out[name] = res
    return out


def weight_threshold(rule, shape, tau, share, ratio):
    """What `rule` comes to for a matrix of `shape` (out, in): the extremal-ratio threshold of the column
    rules, the row ratio of the paper's."""
    rows, cols = shape
    if rule == "ratio":
        return {"ratio": ratio, "extremal_ratio": ratio_threshold(rows, ratio), "rows": rows}
    if rule == "column":
        return {"column_share": share, "extremal_ratio": max(share * rows, WEIGHT_MIN_RATIO), "rows": rows}
    return {"tau": tau, "row_ratio": tau, "max_possible_row_ratio": cols}


def weight_link(model, xdown_counts, top_n=3, layer=None, drivers=()):
    """Figure 7 of An et al.: which up-projection rows and down-projection columns belong to the MLP units
    whose output x_down spikes. xdown_counts (L, d_ff): x_down outlier counts per unit. Per layer with
    spikes, its `top_n` most frequent units k: |up row k| (L2) over the median row, up row k's largest
    entry, and W_down column k's extremal ratio and largest share. `profile` holds every unit's up-row norm
    and W_down column max |w| for `layer` (the layer whose MLP generates the largest massive activation),
    or where none is given for the layer with the most spikes; `drivers` (the down-projection inputs that
    generate it) are named there. SwiGLU models (x_down = act(gate) * up): each unit also gets its gate
    row's norm ratio and largest entry (`gate_row_norm_ratio`, `gate_top_weight`; `gate_row_norm` in the
    profile). The JSON keys say `fc` for the up projection (c_fc in GPT-2)."""
    view = model_view(model)
    counts_all = np.asarray(xdown_counts)
    if layer is None and counts_all.any():
        layer = int(np.argmax(counts_all.sum(1)))
    rows, profile = [], None
    for l in range(view.L):
        counts = counts_all[l]
        if not counts.any() and l != layer:
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
        if l == layer:
            profile = {"layer": l, "units": [int(k) for k in np.nonzero(counts)[0]],
                       "drivers": [int(k) for k in drivers], "fc_row_norm": norms.tolist(),
                       "down_column_max_abs": down.max(0).values.tolist()}
            if gate is not None:
                profile["gate_row_norm"] = gate_norms.tolist()
    return {"units": rows, "profile": profile}


class AttentionAccumulator:
    """Streaming attention statistics: cumulative scores and outlier keys per head and head-averaged, the
    first token's share, sink and gate records, and where q, k, v were recorded their value norms, mean
    logits and q/k alignment at the outlier keys."""

    def __init__(self, L, H, hs, T, rule, tau, share, max_list):
        self.L, self.H, self.hs = L, H, hs
        self.rule, self.tau, self.share = rule, tau, share
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

    def update(self, l, rec, hpos, tokens, cats, seq0, token_info):
        """Layer l's records ('probs' (B, H, T, T), ...); hpos (B, T) the positions of activation outliers of
        the layer's input. Returns the per-head outlier keys (B, H, T) (Table 1 needs them once h_l is known)."""
        probs = rec["probs"]
        B = probs.shape[0]
        cum = cumulative_attention(probs)  # (B, H, T)
        amask = attention_rule_mask(cum, self.rule, self.tau, self.share)
        avg = cum.mean(1)  # (B, T) head-averaged cumulative score
        self._head_averaged_keys(l, cum, avg, tokens, cats, seq0, token_info)
        top, med, mean = top_and_median(avg[..., None], 2)
        self.top2[l, :top.shape[1]] += top.sum(0).cpu().numpy()
        self.median[l] += float(med.sum())
        self.mean[l] += float(mean.sum())
        self.n[l] += B
        self.head_top1[l] += cum.max(-1).values.sum(0).cpu().numpy()
        self.head_median[l] += cum.median(-1).values.sum(0).cpu().numpy()
        self.first_mass[l] += probs[..., 0].float().mean(-1).sum(0).cpu().numpy()
        if int(amask.sum()):
            self._outlier_keys(l, cum, amask, tokens, cats, seq0, token_info)
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
        return amask

    def _outlier_keys(self, l, cum, amask, tokens, cats, seq0, token_info):
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

    def _head_averaged_keys(self, l, cum, avg, tokens, cats, seq0, token_info):
        B, H, T = cum.shape
        self.thr[l] += (self.share * T * B if self.rule == "authors"
                        else float(self.tau * cum.mean(-1).mean(1).sum()))
        mask = attention_rule_mask(avg, self.rule, self.tau, self.share)  # (B, T)
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

    def result(self, gate_meaning=None):
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
            "positions": _ranked_positions(self.pos),
            "token_categories": dict(zip(CATEGORIES, self.cat.sum(0).tolist())),
            "token_categories_by_layer": self.cat.tolist(),
            "outlier_keys": self.list.result(),
            "outlier_keys_total": int(self.list.total),
            "mean_logit_outlier_keys": _ratio_list(self.logit[:, 0]),
            "mean_logit_other_keys": _ratio_list(self.logit[:, 1]),
            "value_norm": {g: _ratio_list(self.vnorm[:, i]) for i, g in enumerate(("first", "h_outlier", "other"))},
            "qk_alignment": self._qk_alignment(),
            "qkv": self._qkv_source(),
            "rule": self.rule,
            "threshold": (self.thr / n).tolist(),
            "mean_outlier_count": self.avg_count.tolist(),
            "mean_outlier_seqs": self.avg_seqs.tolist(),
            "mean_positions": _ranked_positions(self.avg_pos),
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
            att["gate_meaning"] = gate_meaning
        return att

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


def _suffix_sums(x):
    """x (..., T, d) -> sum over i >= j of x_i, for every j."""
    cs = x.cumsum(-2)
    return cs[..., -1:, :] - cs + x


def _ranked_positions(counts, top_n=10):
    """Per layer, the top_n positions with the most outliers: [[position, count], ...]."""
    return [[[int(t), int(row[t])] for t in np.argsort(-row, kind="stable")[:top_n] if row[t] > 0] for row in counts]


class NormalizationAccumulator:
    """Per norm (each block's, then the final one): mean |y| per channel, and mean |y - beta| to tell the
    channels the gain gamma makes large from those whose normalized input already is (Raman et al.)."""

    def __init__(self, n_norms, C):
        self.abs = np.zeros((n_norms, C))
        self.centered = np.zeros((n_norms, C))
        self.n = np.zeros(n_norms, dtype=np.int64)

    def update(self, outputs, norms):
        for i, (y, (_, ln)) in enumerate(zip(outputs, norms)):
            y = y.float().reshape(-1, y.shape[-1])
            ones = torch.ones(1, y.shape[0], device=y.device)
            col = (ones @ y.abs())[0].cpu().numpy()  # column sums through BLAS: much faster than .sum(0)
            self.abs[i] += col
            if getattr(ln, "bias", None) is not None:  # RMSNorm has none
                col = (ones @ (y - ln.bias.detach().float()).abs())[0].cpu().numpy()
            self.centered[i] += col
            self.n[i] += y.shape[0]

    def result(self, view, tau_channel, top_n=5):
        """Per norm: its outlier channels and the gamma-driven ones among them, largest ratio first."""
        out = []
        for i, (name, ln) in enumerate(view.norms):
            n = max(int(self.n[i]), 1)
            m = self.abs[i] / n
            gamma = view.norm_gain(ln).cpu().numpy()
            normalized = self.centered[i] / n / np.maximum(np.abs(gamma), _TINY)  # mean |x_hat_c|
            med, med_hat = float(np.median(m)), float(np.median(normalized))
            ratio = m / max(med, _TINY)
            ranked = np.argsort(-ratio, kind="stable")
            outliers = [int(c) for c in ranked if ratio[c] > tau_channel]
            before = normalized / max(med_hat, _TINY)
            out.append({"module": name, "median_abs": med,
                        "outlier_channels": outliers,
                        # outliers only after the gain: gamma, not the normalized input, makes them
                        "gamma_driven": [c for c in outliers if before[c] <= tau_channel],
                        "top": [{"channel": int(c), "ratio": float(ratio[c]), "mean_abs": float(m[c]),
                                 "gamma": float(gamma[c]),
                                 "ratio_before_gamma": float(normalized[c] / max(med_hat, _TINY))}
                                for c in ranked[:top_n]]})
        return out


class ConsistencyAccumulator:
    """Table 1 of An et al.: overlaps of weight, activation and attention outliers (definitions in
    outlier_stats' docstring). The sequence-dimension rows stream; the feature-dimension rows come from the
    weight statistics and the activation accumulators at the end."""

    def __init__(self, L):
        self.attn = [0.0, 0, 0.0, 0]  # A-in-K sum, count, K-in-A sum, count
        self.attn_layer = [[0.0, 0, 0.0, 0] for _ in range(L)]
        self.seq = [0.0, 0, 0.0, 0]

    def update_attention(self, l, hpos, amask):
        """Appendix B.2 for layer l: h_l's outlier positions against each head's outlier keys."""
        a_in_k, k_in_a = b2_overlaps(hpos, amask)
        for acc in (self.attn, self.attn_layer[l]):
            _add_finite(acc, 0, a_in_k)
            _add_finite(acc, 2, k_in_a)

    def update_sequences(self, h_positions, xdown_positions):
        """(B, T) positions with h outliers / x_down outliers in any layer."""
        _add_finite(self.seq, 0, row_overlap(h_positions, xdown_positions))
        _add_finite(self.seq, 2, row_overlap(xdown_positions, h_positions))

    def result(self, weights, down_name, h_acc, x_acc, attn_rule):
        L = len(self.attn_layer)
        w = weights[down_name]
        A_x = {(l, k) for l in range(L) for k in w["outlier_channels"][l]}
        B_x = {(l, int(k)) for l in range(L) for k in np.nonzero(x_acc.chan_any[l])[0]}
        A_h = {c for l in range(L) for c in w["outlier_out_channels"][l]}
        B_h = {int(c) for c in np.nonzero(h_acc.chan_any.any(0))[0]}

        def pair(a, b, what):
            return {"a_in_b": overlap(a, b), "b_in_a": overlap(b, a), "n_a": len(a), "n_b": len(b), "definition": what}

        def mean(s, n):
            return s / n if n else None

        return {
            "wdown_vs_xdown": pair(A_x, B_x, "feature dim; A = (layer, input column) of W_down weight outliers, "
                                             "B = (layer, channel) of x_down activation outliers"),
            "wdown_vs_h": pair(A_h, B_h, "feature dim; A = output rows of W_down weight outliers (any layer), "
                                         "B = channels of h activation outliers (any layer)"),
            "h_vs_xdown": {"a_in_b": mean(*self.seq[0:2]), "b_in_a": mean(*self.seq[2:4]),
                           "n_a": self.seq[1], "n_b": self.seq[3],
                           "definition": "sequence dim; per sequence, A = positions of h outliers (any layer), "
                                         "B = positions of x_down outliers (any layer); mean over sequences"},
            "h_vs_attention": {"a_in_b": mean(*self.attn[0:2]), "b_in_a": mean(*self.attn[2:4]),
                               "n_a": self.attn[1], "n_b": self.attn[3],
                               "by_layer": [{"a_in_b": mean(*c[0:2]), "b_in_a": mean(*c[2:4]), "n_a": c[1], "n_b": c[3]}
                                            for c in self.attn_layer],
                               "layers": [l for l, c in enumerate(self.attn_layer) if c[1]],
                               "definition": "Appendix B.2; sequence dim; per sample, layer l and head i, A = positions "
                                             "of activation outliers of h_l (layer l's output), K_i = attention-outlier "
                                             f"keys of head i of layer l ({attn_rule} rule); a_in_b = mean of "
                                             "|A&K_i|/|A| over (sample, layer, head) with A non-empty (n_a of them: "
                                             "the layers listed in 'layers'); b_in_a = mean of |A&K_i|/|K_i| over "
                                             "non-empty K_i"},
        }


# a down-projection input that makes up at least 5% of the generating output is named a driver in Figure 7
MEANINGFUL_DRIVER = 0.05


class OutlierAnalyzer:
    """Everything of analyze_outliers.py that is computed per batch of sequences, streaming.

    Usage: `an = OutlierAnalyzer(model, ...)`; for each batch `an.run_batch(X, Y)`; `an.result()`.
    Memory: per-layer accumulators of size O(L * (C + T + n_head * head_dim)) plus capped lists; with
    keep_replay (for --intervene), per batch its tokens, its massive coordinates and one layer output
    (B, T, C) on the CPU (`replay`, interventions.ReplayBatch).
    """

    def __init__(self, model, *, tau_act=1000.0, tau_weight=1000.0, tau_attn=1000.0, tau_channel=10.0,
                 max_list=100, token_info=None, seq_len=1024, full=True, surface_tokens=64,
                 weight_rule="ratio", weight_share=WEIGHT_SHARE, weight_ratio=WEIGHT_RATIO, attention_rule="authors",
                 attention_share=ATTENTION_SHARE, record_qkv=True, keep_replay=False):
        cfg = model.config
        self.model = model
        self.view = model_view(model)
        self.L, self.H, self.C = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.hs = getattr(cfg, "head_dim", None) or self.C // self.H
        self.tau_act, self.tau_channel = tau_act, tau_channel
        self.attn_rule = attention_rule
        self.full = full
        self.record_qkv = record_qkv
        self.token_info = token_info or TokenInfo()
        self.surface_tokens = surface_tokens
        self.h_acc = ActivationAccumulator(self.L, self.C, seq_len, tau_act, max_list, cfg.vocab_size)
        self.n_seqs = 0
        self.loss_sum, self.loss_n = 0.0, 0
        self.surface = self.surface_tokens_ids = None
        self._batch = self._hout = None  # the batch in flight: (tokens, categories, first sequence), h Outliers
        self.keep_replay = keep_replay
        self.replay = []
        if not full:
            return
        self.x_acc = ActivationAccumulator(self.L, self.view.d_ff, seq_len, tau_act, max_list, cfg.vocab_size)
        self.weights = weight_statistics(model, tau_weight, rule=weight_rule, share=weight_share, ratio=weight_ratio)
        self.wdown = [w.detach() for w in self.view.weights(self.view.down_name)]
        self.down_bias = [getattr(m, "bias", None) for m in self.view.down]
        self.lifecycle = LifecycleAccumulator(self.L)
        self.attention = AttentionAccumulator(self.L, self.H, self.hs, seq_len, attention_rule, tau_attn,
                                              attention_share, max_list)
        self.consistency = ConsistencyAccumulator(self.L)
        self.normalization = NormalizationAccumulator(len(self.view.norms), self.C)
        self._amask = [None] * self.L  # per-head outlier keys of layer l, until h_l is known (Table 1)

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
            self.consistency.update_attention(l, self._hout[l].rows, self._amask[l])
            self._amask[l] = None

    def _attention(self, l, rec, layer_input):
        # the positions carrying activation outliers in the layer's input (h_{l-1}, or the embeddings)
        hpos = find_activation_outliers(layer_input, self.tau_act).rows if l == 0 else self._hout[l - 1].rows
        self._amask[l] = self.attention.update(l, rec, hpos, *self._batch, self.token_info)

    @torch.no_grad()
    def run_batch(self, X, Y=None, autocast=None):
        """X (B, T) long on the model's device; Y the targets (for the loss) or None."""
        tokens = X.cpu().numpy()
        cats = self.token_info.categories(tokens)
        self._batch = (tokens, cats, self.n_seqs)
        self._hout = [None] * self.L
        with self.probe() as p:
            with autocast if autocast is not None else contextlib.nullcontext():
                _, loss = self.model(X, Y)
            if loss is not None:
                self.loss_sum += float(loss) * X.shape[0]
                self.loss_n += X.shape[0]
            self._after_forward(p)
            if self.keep_replay and loss is not None:
                self.replay.append(ReplayBatch(X, Y, float(loss), p.h, self.lifecycle.last, p.block_returns_tuple))
        self._batch = self._hout = None
        self.n_seqs += X.shape[0]

    def _after_forward(self, p):
        L = self.L
        tokens, cats, seq0 = self._batch
        if self.surface is None:
            S = min(self.surface_tokens, p.h[0].shape[1])
            self.surface = np.stack([p.h[l][0, :S].float().abs().cpu().numpy() for l in range(L)])
            self.surface_tokens_ids = tokens[0, :S].tolist()
        if not self.full:
            return
        x_out = [self.x_acc.update(l, p.xdown[l], tokens, cats, seq0, self.token_info) for l in range(L)]
        # h vs x_down positions, per sequence pooled over layers (cpu: layers may sit on several GPUs)
        self.consistency.update_sequences(torch.stack([o.rows.cpu() for o in self._hout]).any(0),
                                          torch.stack([o.rows.cpu() for o in x_out]).any(0))
        self.normalization.update(p.norm_out, self.view.norms)
        self.lifecycle.update(p.h, p.attn_out, p.mlp_out, p.xdown, self.wdown, self._hout, self.tau_act, tokens,
                              self.token_info, up_gate=[p.up_gate(l) for l in range(L)], down_bias=self.down_bias)

    # ---------------------------------------------------------------------------------------
    def result(self):
        ti = self.token_info
        out = {"layer_output": self.h_acc.result(ti)}
        if self.loss_n:
            out["loss"] = self.loss_sum / self.loss_n
        if not self.full:
            return out
        out["down_input"] = self.x_acc.result(ti)
        out["weight"] = self.weights
        out["lifecycle"] = self.lifecycle.result(ti)
        drivers = out["lifecycle"][0]["mlp_drivers"] if out["lifecycle"] else []
        # Figure 7 shows the layer whose MLP generates the largest massive activation, and the units that do
        out["weight_link"] = weight_link(self.model, self.x_acc.chan, layer=drivers[0]["layer"] if drivers else None,
                                         drivers=[d["down_input_channel"] for d in drivers
                                                  if abs(d["share"]) >= MEANINGFUL_DRIVER])
        gate = getattr(getattr(self.view.attn[0], "variant", None), "gate", None)
        out["attention"] = self.attention.result(gate_meaning=gate)
        out["consistency"] = self.consistency.result(self.weights, self.view.down_name, self.h_acc, self.x_acc,
                                                     self.attn_rule)
        out["normalization"] = self.normalization.result(self.view, self.tau_channel)
        return out


def _ratio_list(arr):
    """arr (L, 2) of [sum, count] -> list of means (None where count is 0)."""
    return [float(s / c) if c else None for s, c in arr]


def _add_finite(acc, i, values):
    """acc[i] += sum of the non-NaN values, acc[i + 1] += their number."""
    ok = ~torch.isnan(values)
    acc[i] += float(values[ok].sum())
    acc[i + 1] += int(ok.sum())
