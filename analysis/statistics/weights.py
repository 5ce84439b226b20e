"""Weight outliers of every projection, per layer and module (the rule of --weight_rule), column extremal ratios,
the largest entries and the W_down profile of Figures 5b-c. A statistic of the weights alone: no capture site."""

import numpy as np

from analysis.definitions import (_TINY, WEIGHT_MIN_RATIO, WEIGHT_MODULES, WEIGHT_RATIO, WEIGHT_SHARE,
                                  column_extremal_ratio, ratio_threshold, weight_rule_mask)
from analysis.statistics.base import Figure, Statistic
from hf.models import NANOGPT, model_view
from runtime.reports import layer_axis, markdown_table, number, pyplot, save_figure


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


def weight_definition(rules):
    if rules.weight_rule == "ratio":
        r = number(rules.weight_ratio)
        return (f"|w_ij| >= {r} x mean_i |w_ij| (W (out, in); the entry is at least {r} times its input column's "
                f"mean magnitude): column extremal ratio >= {r} in every module with at least "
                f"{number(2 * rules.weight_ratio)} rows, rows / 2 in smaller ones, never below 8")
    if rules.weight_rule == "column":
        return (f"|w_ij| >= {rules.weight_share} x sum_i |w_ij| (W (out, in); an entry holding that share of its input "
                f"column's magnitude), i.e. column extremal ratio >= {rules.weight_share} x rows (at least 8)")
    return f"|w_ij| > {rules.tau_weight} x mean_j |w_ij| (row-wise)"


def in_sizes(weight):
    """'576 / 1536': the input sizes of the model's projections (what bounds the paper's row ratio)."""
    sizes = sorted({len(w["profile"]["column_max_abs"]) for w in weight.values()})
    return " / ".join(str(n) for n in sizes)


def down_proj_name(doc):
    """The down projection's name in doc['weight'] (this repo's GPT: mlp.c_proj; LLaMA: mlp.down_proj, ...)."""
    return doc["model"].get("down_proj", "mlp.c_proj")


# ----------------------------------------------------------------------------------------------
# report

def report_weights(doc):
    figs, L = doc["figures"], doc["model"]["n_layer"]
    lines = ["## Weight outliers", "",
             f"Outliers: {doc['thresholds']['weight']['definition']} (W in nn.Linear (out, in) layout). "
             "Extremal ratio: max over input columns j of max_i|w_ij| / mean_i|w_ij|.", "",
             f"![weights]({figs.get('weights')})", ""]
    modules = list(doc["weight"])
    rows = [[l] + [f"{number(w['extremal_ratio'][l])} (col {w['extremal_channel'][l]}; {w['outlier_count'][l]} outl.)"
                   for w in (doc["weight"][mod] for mod in modules)] for l in range(L)]
    lines += [markdown_table(["layer"] + [f"{mod}: extremal ratio (column; # outliers)" for mod in modules], rows), ""]
    wd = doc["weight"].get(down_proj_name(doc))
    if wd and wd["top_entries"]:
        score = {"ratio": "|w|/column-mean", "column": "column share |w|/sum|w|",
                 "paper": "|w|/row-mean"}[doc["thresholds"]["weight"]["rule"]]
        lines += [f"Largest {score} entries of {down_proj_name(doc)} (W_down): " + ", ".join(
            f"L{e[0]} out {e[1]} in {e[2]}: {number(e[3])}" for e in wd["top_entries"][:5]) + ".", ""]
    if figs.get("down_proj_weights"):
        lines += ["### Down-projection magnitudes (Figures 5b-c)", "", f"![down projection]({figs['down_proj_weights']})", ""]
    return lines


def threshold_text(th):
    return (f"- weight ({th['rule']}): {th['definition']}" + weight_thresholds_text(th)
            + f". Paper: {th['paper_formula']}.")


def weight_thresholds_text(th):
    """'; extremal-ratio threshold 50 in every module' or per module with its row count (column rules)."""
    if th["rule"] == "paper":
        return ""
    eff = th["effective"]
    values = {v["extremal_ratio"] for v in eff.values()}
    if len(values) == 1:
        rows = sorted({v["rows"] for v in eff.values()})
        return (f"; extremal-ratio threshold {number(values.pop())} in every module of this model (rows "
                + " / ".join(map(str, rows)) + ")")
    return "; extremal-ratio threshold per module (rows): " + ", ".join(
        f"{k} {number(v['extremal_ratio'])} ({v['rows']})" for k, v in eff.items())


# ----------------------------------------------------------------------------------------------
# figures

def fig_weights(out_dir, weight, name="weights.png"):
    """Extremal ratio per layer and module, with each module's outlier threshold (column rules): a module
    has weight outliers in a layer exactly where its curve reaches its threshold line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    L = len(next(iter(weight.values()))["extremal_ratio"])
    thresholds = {}
    for i, (module, res) in enumerate(weight.items()):
        ax.plot(res["extremal_ratio"], marker="o", ms=3, color=f"C{i}", label=module)
        if "extremal_ratio" in res["threshold"]:
            thresholds.setdefault(res["threshold"]["extremal_ratio"], []).append(i)
    for value, modules in thresholds.items():
        color = f"C{modules[0]}" if len(modules) == 1 else "k"
        ax.axhline(value, color=color, ls="--", lw=0.8)
        label = "outlier threshold" + ("" if len(modules) == len(weight) else f" ({len(modules)} modules)")
        ax.annotate(f"{label} {number(value)}", (0.99, value), xycoords=("axes fraction", "data"), fontsize=7,
                    color=color, va="bottom", ha="right")
    ax.set_yscale("log")
    layer_axis(ax, L)
    ax.set_xlabel("layer")
    ax.set_ylabel("max over columns of max|w|/mean|w|")
    ax.set_title("weight extremal ratio by layer and module")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, out_dir, name)


def fig_down_weights(out_dir, weight, name="down_proj_weights.png", down="mlp.c_proj"):
    """Figures 5b-c: W_down magnitudes of the layer with the largest column extremal ratio: max |w| of
    every input column (= x_down channel), outlier columns marked, and |w| along the extremal column."""
    plt = pyplot()
    w = weight[down]
    prof = w["profile"]
    l, j = prof["layer"], prof["column"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    ax = axes[0, 0]
    cols = np.asarray(prof["column_max_abs"])
    ax.plot(cols, lw=0.6, color="tab:blue")
    marked = w["outlier_channels"][l]
    ax.scatter(marked, cols[marked], color="tab:red", zorder=3, label=f"weight-outlier columns ({len(marked)})")
    ax.set_xlabel("input column (x_down channel)")
    ax.set_ylabel("max_i |w_ij|")
    ax.set_title(f"{down} layer {l}: column maxima", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    col = np.asarray(prof["column_abs"])
    ax.bar(np.arange(len(col)), col, width=1.0, color="tab:gray")
    i = int(np.argmax(col))
    ax.bar([i], [col[i]], width=1.0, color="tab:red")
    ax.scatter([i], [col[i]], color="tab:red", zorder=3, label=f"row {i}")  # one bar of hundreds is a pixel wide
    ax.set_xlabel("output row (h channel)")
    ax.set_ylabel(f"|w_i,{j}|")
    ax.set_title(f"column {j} (extremal ratio {number(w['extremal_ratio'][l])})", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)


# ----------------------------------------------------------------------------------------------

class Weights(Statistic):
    name = "weight"
    schema = {
        "<module>": "each projection of a block by its name (this repo's GPT: attn.c_attn, attn.c_proj, mlp.c_fc, "
                    "mlp.c_proj and a variant's own Linear such as attn.scale_proj; Hugging Face models: each Linear)",
        "<module>.rule": "the weight rule (ratio | column | paper)",
        "<module>.threshold": "what the rule comes to for this module's shape, as thresholds.weight.effective",
        "<module>.extremal_ratio": "[L] max over input columns of max|w| / mean|w| of the column",
        "<module>.extremal_channel": "[L] the input column where it is reached",
        "<module>.outlier_count": "[L] weight outliers",
        "<module>.outlier_channels": "[L][input channel] the input columns holding weight outliers",
        "<module>.outlier_out_channels": "[L][output channel] the output rows holding weight outliers",
        "<module>.max_row_ratio": "[L] max over entries of |w| / the mean |w| of its row",
        "<module>.top_entries": "[[layer, out, in, score]] the largest entries by the rule's own score",
        "<module>.profile": "{layer, column, column_max_abs[in], row_max_abs[out], column_abs[out]} of the layer "
                            "with the largest extremal ratio (Figures 5b-c)",
    }
    figures = (Figure("weights", "weights.png", lambda out_dir, file, doc, _: fig_weights(out_dir, doc["weight"], file)),
               Figure("down_proj_weights", "down_proj_weights.png", lambda out_dir, file, doc, _: fig_down_weights(
                   out_dir, doc["weight"], file, down=down_proj_name(doc)), paper=5))
    report = staticmethod(report_weights)
    threshold_key = "weight"
    threshold_text = staticmethod(threshold_text)

    def result(self, results):
        rules = self.setup.rules
        return weight_statistics(self.setup.model, rules.tau_weight, rule=rules.weight_rule, share=rules.weight_share,
                                 ratio=rules.weight_ratio)

    def thresholds(self, results):
        weight = results["weight"]
        return {"rule": self.setup.rules.weight_rule,
                "definition": weight_definition(self.setup.rules),
                "effective": {name: w["threshold"] for name, w in weight.items()},
                "paper_formula": "|w_ij| > tau_W x mean_j |w_ij| (row-wise), tau_W = 1000: the row ratio is at most "
                                 f"the input size ({in_sizes(weight)} in this model), so it cannot fire; the paper's "
                                 "text speaks of column extremal ratios"}
