"""The lifecycle of massive activations (An et al. Sec. 4; Figures 7-9 in values): each massive (position, channel)
followed by its value along the layers, with the layers and branches that generate, carry and cancel it, its
early stage, and the down-projection inputs that drive its generation (the rules: analysis/definitions.py)."""

import collections

import numpy as np
import torch

from analysis.definitions import _TINY, LIFECYCLE_STATUSES, lifecycle_stages
from analysis.interventions import INTERVENTION_TARGETS, edit_masks
from analysis.statistics.base import Figure, Statistic
from runtime.reports import layer_axis, layer_ranges, markdown_table, number, percent, pyplot, save_figure, token_code

# ----------------------------------------------------------------------------------------------
# report

def report_lifecycle(doc):
    figs = doc["figures"]
    lines = ["## Lifecycle of massive activations", ""]
    if not doc["lifecycle"]:
        return lines + ["No massive activations at this threshold.", ""]
    lines += ["Each (position, channel) that is an activation outlier of some layer output, followed by its **value** "
              "along the layers (never by the threshold, which grows with depth while the value stays), over the "
              "sequences where it is massive; a stage is listed where it holds in at least half of them. Peak: the "
              "largest |h| along the layers (mean over those sequences). **Generated** at every layer (up to the peak) whose attention or MLP branch adds at least "
              "25% of the peak (share in parentheses); **emerged** where no branch does (the first layer at half the "
              "peak); **propagated** while the residual stream carries it; **cancelled** at the layers after the peak "
              "whose branch removes at least 25% of it, once the value falls below half of it. **Early stage**: "
              "before the generation, the value is already at least 100x the median |h| of its layer (Sun et al. "
              "call |x| > 100 and ~1000x the median massive); its writers add 25% of that stage's peak. Drivers: the "
              "down-projection inputs k whose products w[c, k] x_down[k] make up the generating MLP output.", ""]
    if figs.get("lifecycle"):
        lines += [f"![lifecycle]({figs['lifecycle']})", ""]
    lines += [markdown_table(["position", "tokens", "channel", "sequences", "peak |h| (layer)", "massive from",
                              "early stage (x median; written at)", "generated at (share)", "propagated in",
                              "cancelled at (share removed)", "down-projection inputs driving it (share)"],
                             [lifecycle_row(e) for e in doc["lifecycle"][:10]]), ""]
    if len(doc["lifecycle"]) > 10:
        lines += [f"{len(doc['lifecycle']) - 10} more in `outliers.json`.", ""]
    early = [(e, w) for e in doc["lifecycle"][:10] if e.get("early_stage") for w in e["early_stage"]["writers"]
             if w.get("drivers")]
    if early:
        lines += ["Early-stage writers' down-projection inputs: " + "; ".join(
            f"position {e['position']} channel {e['channel']}, layer {w['layer']}: " + drivers_text(w["drivers"])
            for e, w in early) + ".", ""]
    if figs.get("lifecycle_cancellation"):
        lines += ["Branch outputs and the value as a share of the peak (Figures 8-9 in values; a cancellation is a "
                  "bar down to where the line falls):", "", f"![cancellation]({figs['lifecycle_cancellation']})", ""]
    rows = [[e["position"], e["channel"], c["layer"], c["branch"], number(c["previous"]), number(c["branch_output"]),
             percent(c["share"]), "yes" if c["opposite_sign"] else "no"] for e in doc["lifecycle"] for c in e["cancellation"]]
    if rows:
        lines += [markdown_table(["position", "channel", "cancelled at", "by", "h before", "branch output",
                                  "share of the peak removed", "opposite sign"], rows), ""]
    return lines


def drivers_text(drivers):
    """'1229 (73.2%), 1487 (26.4%)' (with the SwiGLU gate and up values where recorded)."""
    return ", ".join(f"{d['down_input_channel']} ({percent(d['share'])}"
                     + (f"; gate {number(d['gate'])}, up {number(d['up'])}" if "gate" in d else "") + ")"
                     for d in drivers) or "–"


def lifecycle_row(e):
    prop = [l for l, s in enumerate(e["status"]) if s == "propagated"]
    early = e.get("early_stage")
    early_text = (f"{layer_ranges(early['layers'])} ({number(early['peak_over_median'])}x; "
                  + (", ".join(f"L{w['layer']} {w['branch']}" for w in early["writers"]) or "–") + ")") if early else "–"
    gen = ", ".join(f"{w['layer']} {w['branch']} ({percent(w['share'])})" for w in e["generation"])
    if not gen:
        gen = f"– (emerged at {e['emerged_at']})" if e.get("emerged_at") is not None else "–"
    cancel = ", ".join(f"{c['layer']} {c['branch']} ({percent(c['share'])})" for c in e["cancellation"]) or "–"
    tokens = token_code(e["token"]) if e.get("distinct_tokens", 1) <= 1 else f"{e['distinct_tokens']} different"
    return [e["position"], tokens, e["channel"], e["count"], f"{number(e['peak'])} ({e['peak_layer']})",
            e["first_massive_at"], early_text, gen, layer_ranges(prop), cancel, drivers_text(e["mlp_drivers"])]


# ----------------------------------------------------------------------------------------------
# figures

def position_label(e):
    """'position 5 ('the')', or where the position holds different tokens in different sequences (position
    0 does) how many."""
    if e.get("distinct_tokens", 1) <= 1:
        return f"position {e['position']} ({e['token']!r})"
    return f"position {e['position']} ({e['distinct_tokens']} different tokens in {e['count']} sequences)"


def stage_summary(e):
    """'early 2-8 (L2 mlp); generated 11 (mlp); cancelled 28 (mlp)': the stages of one lifecycle entry."""
    def writers(ws):
        return ", ".join(f"{w['layer']} ({w['branch']})" for w in ws)
    parts = []
    if e.get("early_stage"):
        parts.append(f"early {layer_ranges(e['early_stage']['layers'])}"
                     + (f" (written at {writers(e['early_stage']['writers'])})" if e["early_stage"]["writers"] else ""))
    if e["generation"]:
        parts.append(f"generated at {writers(e['generation'])}")
    elif e.get("emerged_at") is not None:
        parts.append(f"emerged at {e['emerged_at']}")
    parts.append(f"cancelled at {writers(e['cancellation'])}" if e["cancellation"] else "not cancelled")
    return "; ".join(parts)


def shade_stages(ax, e):
    """Bands behind a lifecycle plot: the early stage, the generation and the cancellation layers."""
    for layers, color in ((e["early_stage"]["layers"] if e.get("early_stage") else [], "tab:orange"),
                          (e["generated_at"], "tab:green"), (e["cancelled_at"], "tab:red")):
        for l in layers:
            ax.axvspan(l - 0.5, l + 0.5, color=color, alpha=0.15, lw=0)


def entry_panels(lifecycle, n=3):
    """A figure of one panel per entry, for the n largest lifecycle entries: (figure, [(axes, entry)])."""
    plt = pyplot()
    entries = lifecycle[:n]
    fig, axes = plt.subplots(len(entries), 1, figsize=(8, 2.9 * len(entries)), squeeze=False)
    return fig, list(zip(axes[:, 0], entries))


def fig_lifecycle(out_dir, lifecycle, name="lifecycle.png"):
    """The largest massive activations' |h| along the layers on a log scale, against the layer's median |h|
    and the tau threshold: an early stage reads as a value far above the median before the generation, a
    value kept while the threshold rises stays flat. Bands: early stage, generation, cancellation layers."""
    fig, panels = entry_panels(lifecycle)
    for ax, e in panels:
        L = len(e["trajectory"])
        x = np.arange(L)
        shade_stages(ax, e)
        ax.plot(x, np.abs(e["trajectory"]), marker="o", ms=3, color="k", label=f"|h| at channel {e['channel']}")
        ax.plot(x, e["threshold"], color="tab:purple", ls=":", label="tau x mean|h| (massive above)")
        ax.plot(x, e["median"], color="gray", ls="--", label="median |h| of the layer")
        ax.set_yscale("log")
        layer_axis(ax, L)
        ax.set_xlabel("layer")
        ax.set_title(f"{position_label(e)}, channel {e['channel']}\n{stage_summary(e)}", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    return save_figure(fig, out_dir, name)


def fig_cancellation(out_dir, lifecycle, name="lifecycle_cancellation.png"):
    """Figures 8-9 in values: per layer the attention and MLP branch outputs at the coordinate and the value
    h after the layer, all as a share of the peak value (signed along it, so that the peak is +1): a
    generation is a bar up to the line, a cancellation a bar down with the line falling after it. The
    dashed lines are the rules' 25% of the peak (a branch that adds / removes that much generates /
    cancels) and half the peak (below it the value counts as cancelled)."""
    fig, panels = entry_panels(lifecycle)
    for ax, e in panels:
        L = len(e["trajectory"])
        x = np.arange(L)
        peak = e["trajectory"][e["peak_layer"]] or 1.0
        shade_stages(ax, e)
        ax.bar(x - 0.2, np.asarray(e["attn_contrib"]) / peak, 0.4, color="tab:blue", label="attention branch / peak")
        ax.bar(x + 0.2, np.asarray(e["mlp_contrib"]) / peak, 0.4, color="tab:orange", label="MLP branch / peak")
        ax.plot(x, np.asarray(e["trajectory"]) / peak, marker="o", ms=3, color="k", label="h after the layer / peak")
        for y, style in ((0.25, "--"), (-0.25, "--"), (0.5, ":")):
            ax.axhline(y, color="gray", ls=style, lw=0.7)
        ax.axhline(0, color="gray", lw=0.5)
        for c in e["cancellation"]:
            right = c["layer"] > 0.75 * L  # keep the label inside the axes
            ax.annotate(f"L{c['layer']} {c['branch']}: {-c['share']:+.0%} of the peak", (c["layer"], -c["share"]),
                        fontsize=7, color="tab:red", ha="right" if right else "left", va="top",
                        xytext=(-4 if right else 4, -2), textcoords="offset points")
        ax.set_ylim(min(-1.1, ax.get_ylim()[0]), max(1.25, ax.get_ylim()[1]))
        layer_axis(ax, L)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of the peak")
        ax.set_title(f"{position_label(e)}, channel {e['channel']}, peak {number(peak)} at layer {e['peak_layer']}\n"
                     f"{stage_summary(e)}", fontsize=8)
        ax.legend(fontsize=6, loc="lower left")
    return save_figure(fig, out_dir, name)


FIGURES = (
    Figure("lifecycle", "lifecycle.png",
           lambda out_dir, file, doc, _: fig_lifecycle(out_dir, doc["lifecycle"], file) if doc["lifecycle"] else None),
    Figure("lifecycle_cancellation", "lifecycle_cancellation.png",
           lambda out_dir, file, doc, _: fig_cancellation(out_dir, doc["lifecycle"], file) if doc["lifecycle"] else None,
           paper=8),
)

_WRITERS = "[{layer, branch, contribution, share, count, drivers}]"
SCHEMA = {
    "[].position": "the position",
    "[].channel": "the channel",
    "[].token": "its most common token there",
    "[].token_id": "that token's id",
    "[].distinct_tokens": "different tokens at the position over the sequences",
    "[].token_count": "sequences holding the most common token",
    "[].count": "sequences where the coordinate is massive",
    "[].peak": "the largest |h| along the layers, mean over those sequences",
    "[].peak_layer": "its layer",
    "[].first_massive_at": "the first layer where it passes tau x mean|h|",
    "[].generation": f"{_WRITERS} the branches adding at least 25% of the peak up to it (share: of the peak; "
                  "drivers: as mlp_drivers)",
    "[].generated_at": "[layers] of the generation",
    "[].generated_by": "attn | mlp | both: the largest writer",
    "[].emerged_at": "the first layer at half the peak where no branch generates it, or null",
    "[].early_stage": f"{{layers, peak, peak_over_median, writers{_WRITERS}}} | null: the value already at least 100x "
                   "the median |h| of its layer before the generation",
    "[].status": "[L] - | early | generated | emerged | propagated | cancelled",
    "[].cancelled_at": "[layers] of the cancellation",
    "[].cancellation": "[{layer, branch, branch_output, previous, share, opposite_sign}] the branches removing at least "
                    "25% of the peak after it (share: of the peak removed; previous: h before the layer)",
    "[].trajectory": "[L] the value h_l at the coordinate, mean over the sequences",
    "[].attn_contrib": "[L] the attention branch output there",
    "[].mlp_contrib": "[L] the MLP branch output there",
    "[].threshold": "[L] tau x mean|h|",
    "[].median": "[L] median |h|",
    "[].mlp_drivers": "[{layer, down_input_channel, share, x_down, weight, count, up, gate}] the down-projection inputs "
                   "whose products make up the largest MLP generation (up, gate: SwiGLU models)",
    "[].relative_contrib": "{attn[L], mlp[L]} An et al.'s branch / residual ratios",
}


# ----------------------------------------------------------------------------------------------
# the statistic

class Lifecycle(Statistic):
    """Massive activations keyed by (position, channel), aggregated over sequences (capped): the stages of
    each (sequence, position, channel) from its values (definitions.lifecycle_stages), then per (position,
    channel) the layers that hold a stage in at least half of its sequences. Also the sums behind
    --intervene mean and, for the interventions, the last batch's coordinates and their edit masks."""
    name = "lifecycle"
    sites = ("h", "h.outliers", "attn_out", "mlp_out", "x_down", "up_gate")
    schema = SCHEMA
    figures = FIGURES
    report = staticmethod(report_lifecycle)

    def __init__(self, setup, cap=256, per_seq=32):
        super().__init__(setup)
        self.L, self.cap, self.per_seq = setup.L, cap, per_seq
        self.entries = {}
        # target -> (layer, channel) -> [sum of the values it edits, count], for --intervene mean
        self.edit_sums = {target: collections.defaultdict(lambda: [0.0, 0]) for target in INTERVENTION_TARGETS}
        self.instances = 0
        self.last = None  # (coords (n, 3) [b, t, c], {target: (n, L) edit mask}) of the last batch
        self._down = None  # per layer, the down projection's weight (C, d_ff) and bias (C,) or None

    def update(self, capture, batch):
        """The massive coordinates of the batch (activation outliers of some layer output) with their values
        along the layers and the branch outputs there; where x_down was captured, the down-projection inputs
        that drive each MLP generation (with the SwiGLU up and gate values where the family has a gate:
        Figure 7's mechanism)."""
        H, A, M, XD = capture.h, capture.attn_out, capture.mlp_out, capture.x_down
        h_out = [capture.outliers("h", l) for l in range(len(H))]
        up_gate = [capture.up_gate(l) for l in range(len(H))]
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
        thr = self.setup.rules.tau_act * per_seq([o.mean for o in h_out])
        median = per_seq([o.median for o in h_out])
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
        down = self._down_projection() if XD is not None else None
        for j in range(len(keep)):
            self._add_instance({k: v[j] for k, v in rows.items()}, int(bs[j]), int(ts[j]), int(cs[j]), XD, down,
                               batch.tokens, up_gate)
        if len(self.entries) > 2 * self.cap:
            self._prune()

    def _down_projection(self):
        if self._down is None:
            view = self.setup.view
            self._down = ([w.detach() for w in view.weights(view.down_name)],
                          [getattr(m, "bias", None) for m in view.down])
        return self._down

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

    def _add_instance(self, r, seq, pos, ch, XD, down, tokens, up_gate):
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
        peak = abs(float(r["traj"][lp]))
        e["peak_sum"] += peak
        e["early"] += r["early"]
        early_peak = 0.0
        if r["early"].any():
            ep = int(r["early_peak_layer"])
            early_peak = abs(float(r["traj"][ep]))
            e["early_peak"][0] += float(r["traj"][ep])
            e["early_peak"][1] += early_peak / max(float(r["median"][ep]), _TINY)
            e["early_peak"][2] += 1
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
                        self._add_drivers(e, l, seq, pos, ch, XD, *down, up_gate)

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
        # one device-to-host copy for the drivers' numbers, not one per number
        products, inputs, weights = torch.stack([prod[top], xd[top], w[top]]).tolist()
        if gate is not None:
            ups, gates = torch.stack([up[seq, pos, top].float(), gate[seq, pos, top].float()]).tolist()
        for i, k in enumerate(top.tolist()):
            d = e["drivers"][(layer, k)]
            d[0] += products[i] / (total if abs(total) > _TINY else _TINY)
            d[1] += inputs[i]
            d[2] += weights[i]
            d[3] += 1
            if gate is not None:
                d[4] += ups[i]
                d[5] += gates[i]
                d[6] += 1

    def _prune(self):
        self.entries = dict(self._ranked()[:self.cap])

    def means(self, target):
        """(layer, channel) -> mean of the values `target` edits there (--intervene mean)."""
        return {k: s / n for k, (s, n) in self.edit_sums[target].items()}

    def result(self, results, top_n=20):
        self._prune()
        return [self._entry_result(t, c, e, self.setup.token_info) for (t, c), e in self._ranked()[:top_n]]

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

