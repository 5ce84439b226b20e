"""What the scripts' reports share: number formats, markdown tables, figures (saved into an output set's
staging directory), train.py's log.jsonl as curves, and the Figure 11 / 12 plotters that the analysis'
--compare and reproduce.py both draw."""

import math
import os

from runtime.files import read_jsonl_file

# ---------------------------------------------------------------------------------------------- text

def number(x, digits=3, scientific=True):
    """A number for a report: '–' for None, `digits` significant digits. With `scientific`, magnitudes of
    1e4 and above or below 1e-3 in e-notation and 1000..9999 as integers; without, plain `g` format."""
    if x is None:
        return "–"
    if not isinstance(x, float):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    if not scientific:
        return f"{x:.{digits}g}"
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def percent(x):
    """A fraction as a percentage, '12.3%' ('–' for None)."""
    return "–" if x is None else f"{100 * x:.1f}%"


def signed_percent(x):
    """A relative change as a signed percentage, '+12.3%' ('–' for None; never '-0.0%')."""
    return "–" if x is None else f"{x * 100 + 0.0:+.1f}%".replace("-0.0%", "+0.0%")


def layer_ranges(layers):
    """[0, 1, 2, 5] -> '0-2, 5' ('–' when empty)."""
    layers = sorted(layers)
    if not layers:
        return "–"
    out, start, prev = [], layers[0], layers[0]
    for l in layers[1:] + [None]:
        if l is not None and l == prev + 1:
            prev = l
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if l is not None:
            start = prev = l
    return ", ".join(out)


def token_code(s):
    """A token's text as inline code, escapes visible (a newline reads as \\n)."""
    return "`" + repr(s)[1:-1].replace("`", "'") + "`"


def markdown_table(header, rows, align=None):
    """A markdown table; '|' and newlines inside cells are escaped. `align`: None for a plain '---' rule, or
    one letter per column, 'l' or 'r' (right-aligned numbers)."""
    def cell(c):
        return str(c).replace("|", "\\|").replace("\n", "\\n")
    rule = ("|" + "---|" * len(header) if align is None
            else "|" + "|".join(" ---: " if a == "r" else " --- " for a in align) + "|")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", rule]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- figures

def have_matplotlib():
    """Whether figures can be drawn (a bare GPU image may lack matplotlib: reports then give numbers only)."""
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def layer_axis(ax, n_layers, axis="x", limits=True):
    """Integer layer ticks on `axis`, thinned so that their labels never overlap (every layer up to 16 layers,
    then every 2nd, 5th, 10th, ...: at most 16 ticks for 12 to 80 layers); with `limits`, the axis spans the layers."""
    from matplotlib.ticker import MultipleLocator
    step = next(s for s in (1, 2, 5, 10, 20, 50, 100, 10 ** 9) if n_layers / s <= 16)
    getattr(ax, f"{axis}axis").set_major_locator(MultipleLocator(step))
    if limits:
        getattr(ax, f"set_{axis}lim")(-0.5, n_layers - 0.5)


def save_figure(fig, out_dir, name, tight_bbox=False):
    """Save `fig` as out_dir/name (PNG, 110 dpi) and close it; returns the name. The scripts save into an
    output set's staging directory (runtime.outputs.output_set), which makes the figures land with the report."""
    if not tight_bbox:
        fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), format="png", dpi=110, **({"bbox_inches": "tight"} if tight_bbox else {}))
    pyplot().close(fig)
    return name


def plot_top1(out_dir, name, runs):
    """Figure 11: the largest |h| per layer of several models; runs: [(label, top3 per layer)]."""
    from matplotlib.ticker import MaxNLocator
    fig, ax = pyplot().subplots(figsize=(7.5, 4))
    for i, (label, top3) in enumerate(runs):
        ax.plot([t[0] for t in top3], marker="o", color=f"C{i}", label=label)
    ax.set_yscale("log")
    ax.set(xlabel="layer", ylabel="top-1 |h| (mean over sequences)", title="largest activation per layer (Figure 11)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)


def plot_top3(out_dir, name, runs):
    """Figure 11, one panel per model: top-3 and median |h| per layer; runs: [(title, top3, median)]."""
    from matplotlib.ticker import MaxNLocator
    cols = min(4, len(runs))
    rows = -(-len(runs) // cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False, sharey=True,
                                  constrained_layout=True)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    for ax, (title, top3, median) in zip(axes.flat, runs):
        for k in range(3):
            ax.plot([t[k] for t in top3], marker="os^"[k], label=f"top {k + 1}")
        ax.plot(median, marker="x", color="gray", label="median")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend(fontsize=6)
    fig.suptitle("top-3 and median |h| per layer (Figure 11)")
    return save_figure(fig, out_dir, name, tight_bbox=True)


def plot_loss_curves(out_dir, name, runs):
    """Figure 12: training and validation loss of several runs; runs: [(label, loss_curve or None)]."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
    for i, (label, c) in enumerate(runs):
        if not c:
            continue
        axes[0].plot(c["iter"], c["loss"], color=f"C{i}", lw=1, label=label)
        axes[1].plot(c["eval_iter"], c["val_loss"], color=f"C{i}", marker="o", ms=3, label=label)
    axes[0].set(xlabel="iteration", ylabel="training loss", title="training loss (Figure 12)")
    axes[1].set(xlabel="iteration", ylabel="validation loss", title="validation loss")
    for ax in axes:
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)


# ---------------------------------------------------------------------------------------------- train.py's log

def read_training_log(path):
    """The records of a run's log.jsonl ([] where there is none; a line cut short by a killed run is skipped)."""
    return read_jsonl_file(path, "training log") if os.path.lexists(path) else []


def loss_curve(records):
    """{'iter', 'loss', 'eval_iter', 'val_loss'} of train.py's records, or None when they hold no loss."""
    curve = {"iter": [], "loss": [], "eval_iter": [], "val_loss": []}
    for rec in records:
        if rec.get("kind") == "train" and "loss" in rec:
            curve["iter"].append(rec["iter"])
            curve["loss"].append(rec["loss"])
        elif rec.get("kind") == "eval" and "val_loss" in rec:
            curve["eval_iter"].append(rec["iter"])
            curve["val_loss"].append(rec["val_loss"])
    return curve if curve["iter"] or curve["eval_iter"] else None
