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

from hf_models import NANOGPT, model_view
from outlier_stats import (ATTENTION_SHARE, CATEGORIES, WEIGHT_MIN_RATIO, WEIGHT_MODULES, WEIGHT_SHARE, _TINY,
                           TokenInfo, attention_rule_mask, b2_overlaps, column_extremal_ratio, cumulative_attention,
                           find_activation_outliers, overlap, row_overlap, top_and_median, weight_rule_mask)
from probe import Probe


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
        self._add_means(traj, massive, gen_attn | gen_mlp, c, H[0].shape[-1])
        keep = self._largest_per_sequence(traj, b)
        to_np = lambda x: x[..., keep].cpu().numpy()  # noqa: E731
        rows = {"traj": to_np(traj), "attn": to_np(attn), "mlp": to_np(mlp), "thr": to_np(thr),
                "massive": to_np(massive), "gen_attn": to_np(gen_attn), "gen_mlp": to_np(gen_mlp),
                "b": b.cpu().numpy()[keep.cpu().numpy()], "t": to_np(t), "c": to_np(c)}
        for j in range(len(rows["b"])):
            self._add_instance({k: v[..., j] for k, v in rows.items()}, XD, wdown, tokens, up_gate)
        if len(self.entries) > 2 * self.cap:
            self._prune()

    def _add_means(self, traj, massive, generated, c, C):
        """Sums of the generated and of all massive values per (layer, channel), for --intervene mean."""
        for mask, sums, counts in ((generated, self.gen_sum, self.gen_cnt), (massive, self.mass_sum, self.mass_cnt)):
            gl, gi = mask.nonzero(as_tuple=True)
            keys = (gl * C + c[gi]).cpu().numpy()
            vals = traj[gl, gi].cpu().numpy()
            for key, v in zip(keys.tolist(), vals.tolist()):
                sums[divmod(key, C)] += v
                counts[divmod(key, C)] += 1

    def _largest_per_sequence(self, traj, b):
        """Indices of the `per_seq` coordinates of each sequence with the largest peak |h|, sorted."""
        keep = []
        bs = b.cpu().numpy()
        peak = traj.abs().max(0).values.cpu().numpy()
        for seq in np.unique(bs):
            idx = np.nonzero(bs == seq)[0]
            keep.extend(idx[np.argsort(-peak[idx])[:self.per_seq]].tolist())
        return torch.as_tensor(sorted(keep), device=traj.device)

    def _add_instance(self, r, XD, wdown, tokens, up_gate):
        """One massive (sequence, position, channel): its per-layer status into its (position, channel) entry."""
        L = self.L
        self.instances += 1
        m, ga, gm = r["massive"], r["gen_attn"], r["gen_mlp"]
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
        key = (int(r["t"]), int(r["c"]))
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = {
                "count": 0, "traj": np.zeros(L), "attn": np.zeros(L), "mlp": np.zeros(L), "thr": np.zeros(L),
                "status": np.zeros((L, 4), dtype=np.int64), "gen": collections.Counter(),
                "first": collections.Counter(),
                "branch": collections.Counter(), "cancel": collections.Counter(), "tokens": collections.Counter(),
                "drivers": collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0, 0.0, 0.0, 0]), "peak": 0.0}
        e["count"] += 1
        e["traj"] += r["traj"]
        e["attn"] += r["attn"]
        e["mlp"] += r["mlp"]
        e["thr"] += r["thr"]
        e["status"][np.arange(L), status] += 1
        e["gen"][first_gen] += 1
        e["first"][int(np.argmax(m))] += 1
        e["branch"][branch] += 1
        e["cancel"].update(cancelled)
        e["tokens"][int(tokens[r["b"], r["t"]])] += 1
        e["peak"] = max(e["peak"], float(np.abs(r["traj"]).max()))
        if first_gen is not None and gm[first_gen] and XD is not None and XD[first_gen] is not None:
            self._add_drivers(e, first_gen, int(r["b"]), key, float(r["mlp"][first_gen]), XD, wdown, up_gate)

    @staticmethod
    def _add_drivers(e, layer, seq, key, total, XD, wdown, up_gate):
        """The 3 down-projection inputs k contributing most to the generating MLP output x_down[k] w[c, k]."""
        xd = XD[layer][seq, key[0]].float()
        w = wdown[layer][key[1]].float().to(xd.device)
        prod = xd * w
        top = prod.abs().topk(min(3, prod.numel())).indices
        up, gate = up_gate[layer] if up_gate else (None, None)
        for k in top.tolist():
            d = e["drivers"][k]
            d[0] += float(prod[k]) / (total if abs(total) > _TINY else _TINY)
            d[1] += float(xd[k])
            d[2] += float(w[k])
            d[3] += 1
            if gate is not None:
                d[4] += float(up[seq, key[0], k])
                d[5] += float(gate[seq, key[0], k])
                d[6] += 1

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
        self.logit = np.zeros((L, 2, 2))  # mean q.k/sqrt(d) at attention-outlier keys vs other keys
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
        at outlier keys: per dimension d, mean over queries i >= j of q_i[d] k_j[d]."""
        q, k = rec["q"].float(), rec["k"].float()
        H, T = q.shape[1], q.shape[2]
        cs = q.cumsum(2)
        qs = cs[:, :, -1:] - cs + q  # suffix sums over queries: sum_{i >= j} q_i
        n_out = int(amask.sum())
        if n_out:
            b_, h_, j_ = amask.nonzero().unbind(1)
            contrib = k[b_, h_, j_] * qs[b_, h_, j_] / (T - j_).float()[:, None]  # (n, hs)
            sums = torch.zeros(H, self.hs, device=contrib.device).index_add_(0, h_, contrib)
            self.qk_sum[l] += sums.cpu().numpy()
            self.qk_n[l] += torch.bincount(h_, minlength=H).cpu().numpy()
        logit = (qs * k).sum(-1) / (T - torch.arange(T, device=q.device)).float() / math.sqrt(self.hs)
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

    def result(self, norms, tau_channel, top_n=5):
        out = []
        for i, (name, ln) in enumerate(norms):
            n = max(int(self.n[i]), 1)
            m = self.abs[i] / n
            gamma = ln.weight.detach().float().cpu().numpy()
            normalized = self.centered[i] / n / np.maximum(np.abs(gamma), _TINY)  # mean |x_hat_c|
            med, med_hat = float(np.median(m)), float(np.median(normalized))
            ratio = m / max(med, _TINY)
            top = np.argsort(-ratio)[:top_n]
            outliers = np.nonzero(ratio > tau_channel)[0]
            before = normalized / max(med_hat, _TINY)
            out.append({"module": name, "median_abs": med,
                        "outlier_channels": [int(c) for c in outliers],
                        # outliers only after the gain: gamma, not the normalized input, makes them
                        "gamma_driven": [int(c) for c in outliers if before[c] <= tau_channel],
                        "top": [{"channel": int(c), "ratio": float(ratio[c]), "mean_abs": float(m[c]),
                                 "gamma": float(gamma[c]),
                                 "ratio_before_gamma": float(normalized[c] / max(med_hat, _TINY))} for c in top]})
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
        if not full:
            return
        self.x_acc = ActivationAccumulator(self.L, self.view.d_ff, seq_len, tau_act, max_list, cfg.vocab_size)
        self.weights = weight_statistics(model, tau_weight, rule=weight_rule, share=weight_share)
        self.wdown = [w.detach() for w in self.view.weights(self.view.down_name)]
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
                              self.token_info, up_gate=[p.up_gate(l) for l in range(L)])

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
        out["weight_link"] = weight_link(self.model, self.x_acc.chan)
        gate = getattr(getattr(self.view.attn[0], "variant", None), "gate", None)
        out["attention"] = self.attention.result(gate_meaning=gate)
        out["consistency"] = self.consistency.result(self.weights, self.view.down_name, self.h_acc, self.x_acc,
                                                     self.attn_rule)
        out["lifecycle"] = self.lifecycle.result(ti)
        out["normalization"] = self.normalization.result(self.view.norms, self.tau_channel)
        return out


def _ratio_list(arr):
    """arr (L, 2) of [sum, count] -> list of means (None where count is 0)."""
    return [float(s / c) if c else None for s, c in arr]


def _add_finite(acc, i, values):
    """acc[i] += sum of the non-NaN values, acc[i + 1] += their number."""
    ok = ~torch.isnan(values)
    acc[i] += float(values[ok].sum())
    acc[i + 1] += int(ok.sum())
