"""The report's figures: Fig. 11 (top-1 and top-3 |h| per layer), Fig. 12 (loss curves) and the outlier and
attention-sink emergence over training from the telemetry."""

from reproduction.findings import MASSIVE_RATIO
from runtime.reports import have_matplotlib, plot_loss_curves, plot_top1, plot_top3, pyplot, save_figure


def make_figures(out, runs):
    """The report's figures in `out` (an output set's staging directory); {key: file name}. None where
    matplotlib is missing (a bare GPU image may lack it: the report then says so and the numbers stay in
    reproduce.json)."""
    if not have_matplotlib():
        return {}
    analysed = [r for r in runs if r.get("top3")]
    figs = {}
    if analysed:
        figs["fig11_top1"] = plot_top1(out, "fig11_top1.png", [(r["attention"], r["top3"]) for r in analysed])
        figs["fig11_top3"] = plot_top3(out, "fig11_top3.png",
                                       [(r["attention"], r["top3"], r["median"]) for r in analysed])
    curves = [r for r in runs if r["loss_curve"]["iter"] or r["loss_curve"]["eval_iter"]]
    if curves:
        figs["fig12_loss"] = plot_loss_curves(out, "fig12_loss.png", [(r["attention"], r["loss_curve"]) for r in curves])
    tele = [r for r in runs if r["telemetry"]["iter"]]
    if tele:
        plt = pyplot()
        figs["outlier_emergence"] = save_figure(_emergence_figure(plt, tele), out, "outlier_emergence.png",
                                                tight_bbox=True)
        figs["emergence_by_layer"] = save_figure(_emergence_by_layer_figure(plt, tele), out, "emergence_by_layer.png",
                                                 tight_bbox=True)
    return figs


def _emergence_figure(plt, runs):
    """Over training, per variant: the largest top-1 |h|, its ratio to the layer median (both maxima over
    layers) and the first-token attention (mean over layers, heads and queries)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, r in enumerate(runs):
        t = r["telemetry"]
        axes[0].plot(t["iter"], t["max_top1_h"], color=f"C{i}", marker=".", label=r["attention"])
        axes[1].plot(t["iter"], t["max_ratio_h"], color=f"C{i}", marker=".", label=r["attention"])
        axes[2].plot(t["iter"], t.get("mean_first_attn") or [], color=f"C{i}", marker=".", label=r["attention"])
    axes[0].set(xlabel="iteration", ylabel="max over layers of top-1 |h|", title="outlier emergence: largest |h|")
    axes[1].set(xlabel="iteration", ylabel="max over layers of top-1 / median |h|",
                title="outlier emergence: ratio to the median")
    axes[1].axhline(MASSIVE_RATIO, color="gray", ls=":", lw=1)
    axes[2].set(xlabel="iteration", ylabel="attention on the first token (mean over layers)",
                title="attention sink emergence")
    for ax in axes[:2]:
        ax.set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


def _emergence_by_layer_figure(plt, runs):
    """One column per variant: every layer's top-1 / median |h| (top) and first-token attention (bottom)."""
    fig, axes = plt.subplots(2, len(runs), figsize=(4 * len(runs), 6.5), squeeze=False, sharey="row",
                             constrained_layout=True)
    for col, r in enumerate(runs):
        t = r["telemetry"]
        by = t.get("by_layer") or {}
        n_layer = max((len(x) for x in by.get("ratio_h") or []), default=0)
        cmap = plt.get_cmap("viridis")
        for l in range(n_layer):
            color = cmap(l / max(1, n_layer - 1))
            axes[0, col].plot(t["iter"], [x[l] for x in by["ratio_h"]], color=color, lw=1, label=f"L{l}")
            axes[1, col].plot(t["iter"], [x[l] for x in by["first_attn"]], color=color, lw=1, label=f"L{l}")
        axes[0, col].set_yscale("log")
        axes[0, col].set_title(r["attention"], fontsize=9)
        axes[1, col].set_xlabel("iteration", fontsize=8)
    axes[0, 0].set_ylabel("top-1 / median |h|")
    axes[1, 0].set_ylabel("first-token attention")
    axes[0, -1].legend(fontsize=5, ncol=2)
    fig.suptitle("emergence per layer (training telemetry, one fixed validation batch)")
    return fig

