"""Activation outliers of the layer outputs h and of the down-projection inputs x_down: per layer the top-3 and
median magnitudes, counts by channel, position, token and token category, and the largest outliers; the first
sequence's |h| for the 3-D surface (Figure 1 style)."""

import collections
import math

import numpy as np

from analysis.definitions import _TINY, CATEGORIES
from analysis.statistics.base import Figure, Statistic, TopList, ranked_positions
from runtime.reports import layer_axis, markdown_table, number, pyplot, save_figure, token_code

# outliers.json's name of each kind -> its capture site
KINDS = {"layer_output": "h", "down_input": "x_down"}
SURFACE_TOKENS = 64  # positions of the first sequence the surface shows


class SiteOutliers:
    """Streaming statistics of the activation outliers of one site (layer outputs or down-projection inputs)."""

    def __init__(self, site, L, C, T, tau, max_list):
        self.site, self.L, self.C, self.T, self.tau = site, L, C, T, tau
        self.top3 = np.zeros((L, 3))
        self.median = np.zeros(L)
        self.mean_abs = np.zeros(L)
        self.n = np.zeros(L, dtype=np.int64)
        self.count = np.zeros(L, dtype=np.int64)  # outlier elements
        self.seqs_with = np.zeros(L, dtype=np.int64)
        self.chan = np.zeros((L, C), dtype=np.int64)  # outlier elements per channel
        self.pos = np.zeros((L, T), dtype=np.int64)  # (sequence, position) pairs carrying an outlier
        self.cat = np.zeros((L, len(CATEGORIES)), dtype=np.int64)
        self.tok = collections.Counter()
        self.list = TopList(max_list)

    def update(self, capture, batch, token_info):
        for l in range(self.L):
            self._add_layer(l, capture, batch, token_info)

    def _add_layer(self, l, capture, batch, token_info):
        out, top = capture.outliers(self.site, l), capture.top3(self.site, l)
        B, T = out.rows.shape
        k = top.shape[1]
        self.top3[l, :k] += top.sum(0).cpu().numpy()
        self.median[l] += float(out.median.sum())
        self.mean_abs[l] += float(out.mean.sum())
        self.n[l] += B
        n_out = out.idx.shape[0]
        if n_out == 0:
            return
        self.count[l] += n_out
        self.chan[l] += capture.channel_counts(self.site, l)
        tokens, cats = batch.tokens, batch.categories
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
        rows = [{"layer": l, "seq": int(batch.first + b), "position": int(t), "token": token_info.text(tokens[b, t]),
                 "token_id": int(tokens[b, t]), "category": CATEGORIES[cats[b, t]], "channel": int(c),
                 "value": float(v), "ratio": float(abs(v) / max(means[b], _TINY))}
                for (b, t, c), v in zip(idx, vals)]
        self.list.total += n_out - len(rows)
        self.list.add(np.abs(vals), rows)

    def result(self, token_info, top_n=10):
        n = np.maximum(self.n, 1)[:, None]
        top3 = self.top3 / n
        median = self.median / n[:, 0]
        mean_abs = self.mean_abs / n[:, 0]
        return {
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
            "positions": ranked_positions(self.pos, top_n),
            "token_categories": dict(zip(CATEGORIES, self.cat.sum(0).tolist())),
            "token_categories_by_layer": self.cat.tolist(),
            "tokens": [{"token": token_info.text(t), "token_id": int(t), "count": int(c)}
                       for t, c in self.tok.most_common(top_n)],
            "outliers": self.list.result(),
            "outliers_total": int(self.list.total),
        }


# ----------------------------------------------------------------------------------------------
# report

def report_activations(doc):
    figs, L = doc["figures"], doc["model"]["n_layer"]
    lines = ["## Activation outliers", "",
             "An activation is an outlier when |x| > tau x mean|x| of its (tokens x channels) matrix. "
             "Top-3 and median magnitudes are means over sequences.", ""]
    for label, acc, fig in (("Layer outputs h", doc["activation"]["layer_output"], figs.get("activation_layer_output")),
                            ("Down-projection inputs x_down", doc["activation"]["down_input"],
                             figs.get("activation_down_input"))):
        lines += [f"### {label}", "", f"![{label}]({fig})", ""]
        rows = []
        for l in range(L):
            top = acc["top3"][l]
            chans = ", ".join(f"{c} ({n})" for c, n in acc["channels"][l][:3]) or "–"
            pos = ", ".join(f"{p} ({n})" for p, n in acc["positions"][l][:3]) or "–"
            rows.append([l, number(top[0]), number(top[1]), number(top[2]), number(acc["median"][l]),
                         number(acc["ratio_top1_median"][l]), acc["count"][l], chans, pos])
        lines += [markdown_table(["layer", "top 1", "top 2", "top 3", "median", "top1/median", "# outliers",
                                  "channels (count)", "positions (count)"], rows), ""]
        if acc["outliers_total"] == 0:
            lines += ["No activation outliers at this threshold.", ""]
        else:
            toks = ", ".join(f"{token_code(x['token'])} ({x['count']})" for x in acc["tokens"][:8])
            lines += [f"{acc['outliers_total']} outlier activations in total; carried by tokens: {toks}.", ""]
    if figs.get("outlier_channels"):
        lines += ["### Outlier channels per layer (Figures 3c, 4b-c)", "", f"![outlier channels]({figs['outlier_channels']})", ""]
    if figs.get("surface"):
        lines += [f"### Magnitudes of layer {doc['surface']['layer']} (Figure 1 style)", "", f"![surface]({figs['surface']})", ""]
    return lines


def threshold_text(th):
    return (f"- activation: {th['rule']}, tau = {number(th['tau'])}; |h| threshold per layer "
            + ", ".join(number(x) for x in th["effective"]["layer_output"]) + ".")


# ----------------------------------------------------------------------------------------------
# figures

def fig_activation(out_dir, acc, title, name):
    plt = pyplot()
    top3, med = np.asarray(acc["top3"]), np.asarray(acc["median"])
    L = len(med)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(L)
    for k, (label, marker) in enumerate((("top 1", "o"), ("top 2", "s"), ("top 3", "^"))):
        ax.plot(x, top3[:, k], marker=marker, label=label)
    ax.plot(x, med, marker="x", color="gray", label="median")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("|activation| (mean over sequences)")
    ax.set_title(title)
    layer_axis(ax, L)
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, name)


def fig_surface(out_dir, surface, layer, name="surface.png"):
    plt = pyplot()
    z = surface[layer]  # (S, C)
    S, C = z.shape
    step = max(1, math.ceil(C / 256))
    if step > 1:  # max-pool channel bins so that spikes survive the downsampling
        pad = (-C) % step
        z = np.pad(z, ((0, 0), (0, pad))).reshape(S, -1, step).max(-1)
    tt, cc = np.meshgrid(np.arange(z.shape[0]), np.arange(z.shape[1]) * step, indexing="ij")
    fig = plt.figure(figsize=(7, 5))
    ax = fig.add_subplot(111, projection="3d")
    ax.plot_surface(cc, tt, z, cmap="viridis", linewidth=0, antialiased=False)
    ax.set_xlabel("channel" + (f" (max over bins of {step})" if step > 1 else ""))
    ax.set_ylabel("token position")
    ax.set_zlabel("|h|")
    ax.set_title(f"layer {layer} output, first sequence, first {S} tokens")
    return save_figure(fig, out_dir, name)


def fig_channel_scatter(out_dir, act, name="outlier_channels.png"):
    """Figures 3c / 4b-c: the channel index of activation outliers per layer (h and x_down)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], (("layer_output", "layer outputs h"), ("down_input", "down-projection inputs x_down"))):
        pts = np.asarray(act[key]["channel_scatter"], dtype=float).reshape(-1, 3)
        if len(pts):
            size = 12 + 60 * pts[:, 2] / pts[:, 2].max()
            sc = ax.scatter(pts[:, 0], pts[:, 1], s=size, c=np.log10(pts[:, 2]), cmap="viridis")
            fig.colorbar(sc, ax=ax, label="log10(# outliers)")
        layer_axis(ax, len(act[key]["count"]))
        ax.set_xlabel("layer")
        ax.set_ylabel("channel")
        ax.set_title(f"{label}: outlier channels ({len(pts)})", fontsize=9)
    return save_figure(fig, out_dir, name)


def draw_surface(out_dir, file, doc, statistic):
    """The surface needs the captured magnitudes, which outliers.json does not hold."""
    if statistic is None:
        return None
    return fig_surface(out_dir, statistic.surface, doc["surface"]["layer"], file)


# ----------------------------------------------------------------------------------------------

KIND_SCHEMA = {
    "top3": "[L][3] the three largest |x| of each layer, mean over sequences",
    "median": "[L] median |x|, mean over sequences",
    "mean_abs": "[L] mean |x|, mean over sequences",
    "threshold": "[L] the absolute threshold tau x mean|x| applied, mean over sequences",
    "ratio_top1_median": "[L] top 1 over median",
    "count": "[L] outliers",
    "count_per_seq": "[L] outliers per sequence",
    "seqs_with_outliers": "[L] sequences with at least one outlier",
    "channels": "[L][[channel, count]] the 10 channels with the most outliers",
    "channel_scatter": "[[layer, channel, count]] every channel with outliers (the 256 most frequent per layer)",
    "positions": "[L][[position, count]] the 10 positions carrying outliers in the most sequences",
    "token_categories": "{initial, delimiter, whitespace, weak_semantic, other}: (sequence, layer, position) "
                        "triples carrying outliers",
    "token_categories_by_layer": "[L][5] the same per layer, in that order",
    "tokens": "[{token, token_id, count}] the 10 tokens carrying outliers most often",
    "outliers": "[{layer, seq, position, token, token_id, category, channel, value, ratio}] the largest by |value| "
                "(ratio: |value| over the mean |x| of its sequence and layer)",
    "outliers_total": "outliers in all (the list holds the largest)",
}


class Activation(Statistic):
    """Activation outliers of each kind in `kinds` (KINDS), and the first sequence's |h| for the surface figure."""
    name = "activation"
    schema = {"<kind>": "layer_output (the layer outputs h) or down_input (the down-projection inputs x_down)",
              **{f"<kind>.{key}": text for key, text in KIND_SCHEMA.items()}}
    figures = (
        Figure("activation_layer_output", "activation_h.png", lambda out_dir, file, doc, _: fig_activation(
            out_dir, doc["activation"]["layer_output"], "layer outputs h: top-3 and median |h|", file)),
        Figure("activation_down_input", "activation_xdown.png", lambda out_dir, file, doc, _: fig_activation(
            out_dir, doc["activation"]["down_input"], "down-projection inputs x_down: top-3 and median", file)),
        Figure("surface", "surface.png", draw_surface),
        Figure("outlier_channels", "outlier_channels.png",
               lambda out_dir, file, doc, _: fig_channel_scatter(out_dir, doc["activation"], file), paper=3),
    )
    report = staticmethod(report_activations)
    threshold_key = "activation"
    threshold_text = staticmethod(threshold_text)

    def __init__(self, setup, kinds=tuple(KINDS)):
        super().__init__(setup)
        width = {"h": setup.C, "x_down": setup.view.d_ff}
        self.kinds = {kind: SiteOutliers(KINDS[kind], setup.L, width[KINDS[kind]], setup.T, setup.rules.tau_act,
                                         setup.max_list) for kind in kinds}
        self.sites = tuple(s for kind in kinds for s in (KINDS[kind], KINDS[kind] + ".outliers"))
        self.surface = self.surface_tokens = None  # (L, S, C) |h| of the first sequence's first S tokens, its tokens

    def update(self, capture, batch):
        if self.surface is None:
            S = min(SURFACE_TOKENS, capture.h[0].shape[1])
            self.surface = np.stack([h[0, :S].float().abs().cpu().numpy() for h in capture.h])
            self.surface_tokens = batch.tokens[0, :S].tolist()
        for acc in self.kinds.values():
            acc.update(capture, batch, self.setup.token_info)

    def result(self, results):
        return {kind: acc.result(self.setup.token_info) for kind, acc in self.kinds.items()}

    def thresholds(self, results):
        T, C, tau = self.setup.T, self.setup.C, self.setup.rules.tau_act
        act = results["activation"]
        out = {"rule": "|x| > tau x mean|x| over one sequence's (tokens x channels) matrix (the paper's formula)",
               "tau": tau,
               "effective": {"layer_output": act["layer_output"]["threshold"],
                             "down_input": act["down_input"]["threshold"]},
               "max_ratio": {"layer_output": T * C, "down_input": T * self.setup.view.d_ff}}
        if tau >= T * C:
            out["note"] = f"tau {tau} >= T x C = {T * C}: no activation can qualify"
        return out


def layer_outputs_only(setup):
    """The activation statistic of the layer outputs alone (--compare)."""
    return Activation(setup, kinds=("layer_output",))
