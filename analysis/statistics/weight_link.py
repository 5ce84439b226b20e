"""Figure 7 of An et al.: the up-projection rows and down-projection columns of the MLP units whose output x_down
spikes, and of the layer whose MLP generates the largest massive activation."""

import numpy as np

from analysis.definitions import _TINY, column_extremal_ratio
from analysis.statistics.base import Figure, Statistic
from hf.models import model_view
from runtime.reports import markdown_table, number, percent, pyplot, save_figure

# a down-projection input that makes up at least 5% of the generating output is named a driver in Figure 7
MEANINGFUL_DRIVER = 0.05


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


def report_weight_link(doc):
    link, figs = doc["weight_link"], doc["figures"]
    if not link["units"]:
        return []
    lines = ["### Weight-outlier link (Figure 7)", "",
             "MLP units whose output x_down spikes: their up-projection row (L2 norm over the median row; largest "
             "entry) and down-projection (W_down) column (extremal ratio; share and row of its largest entry). The "
             f"figure shows layer {link['profile']['layer'] if link['profile'] else '–'}"
             + (", whose MLP generates the largest massive activation (through units "
                + ", ".join(map(str, link["profile"]["drivers"])) + ")" if link["profile"] and link["profile"].get("drivers")
                else ", the layer with the most x_down spikes") + ".", ""]
    if figs.get("weight_link"):
        lines += [f"![weight link]({figs['weight_link']})", ""]
    gated = any("gate_row_norm_ratio" in u for u in link["units"])  # SwiGLU: also the gate projection
    rows = [[u["layer"], u["unit"], u["spikes"], number(u["fc_row_norm_ratio"]),
             f"{u['fc_top_input']} ({number(u['fc_top_weight'])})"]
            + ([number(u.get("gate_row_norm_ratio")), f"{u.get('gate_top_input')} ({number(u.get('gate_top_weight'))})"]
               if gated else [])
            + [number(u["down_extremal_ratio"]), f"{percent(u['down_top_share'])} (row {u['down_top_output']})"]
            for u in link["units"]]
    return lines + [markdown_table(["layer", "unit", "x_down outliers", "up row norm / median", "up top input (w)"]
                                   + (["gate row norm / median", "gate top input (w)"] if gated else [])
                                   + ["W_down col. extremal ratio", "W_down top share (row)"], rows), ""]


def fig_weight_link(out_dir, link, name="weight_link.png"):
    """Figure 7: the MLP units of the layer that generates the largest massive activation (or, without one,
    of the layer with the most x_down spikes): up-projection row norm against down-projection column max;
    the units whose x_down spikes and the units that drive the massive activation are marked."""
    plt = pyplot()
    prof = link["profile"]
    norms, cols = np.asarray(prof["fc_row_norm"]), np.asarray(prof["down_column_max_abs"])
    units, drivers = prof["units"], prof.get("drivers", [])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter(norms, cols, s=6, color="tab:gray", label="MLP units")
    if units:
        ax.scatter(norms[units], cols[units], s=30, color="tab:red", label=f"units with x_down outliers ({len(units)})")
    if drivers:
        ax.scatter(norms[drivers], cols[drivers], s=80, facecolors="none", edgecolors="tab:blue", lw=1.5,
                   label="units generating the largest massive activation")
    for k in list(dict.fromkeys(drivers + sorted(units, key=lambda k: -cols[k])))[:5]:
        ax.annotate(str(k), (norms[k], cols[k]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("|up-projection row| (L2)")
    ax.set_ylabel("max |down-projection column|")
    ax.set_title(f"layer {prof['layer']}: up-projection rows and down-projection columns of the MLP units", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)


def draw_weight_link(out_dir, file, doc, statistic):
    return fig_weight_link(out_dir, doc["weight_link"], file) if doc["weight_link"]["profile"] is not None else None


class WeightLink(Statistic):
    """Counts the x_down outliers of every MLP unit; the weights are read at the end."""
    name = "weight_link"
    sites = ("x_down", "x_down.outliers")
    schema = {
        "units": "[{layer, unit, spikes, fc_row_norm_ratio, fc_top_input, fc_top_weight, down_extremal_ratio, "
                 "down_top_share, down_top_output, gate_row_norm_ratio, gate_top_input, gate_top_weight}] the 3 units "
                 "of each layer whose x_down spikes most often ('fc': the up projection; gate_*: SwiGLU models)",
        "profile": "{layer, units, drivers, fc_row_norm[d_ff], down_column_max_abs[d_ff], gate_row_norm[d_ff]} | null: "
                   "the layer whose MLP generates the largest massive activation, drivers its driving units (else the "
                   "layer with the most spikes)",
    }
    figures = (Figure("weight_link", "weight_link.png", draw_weight_link, paper=7),)
    report = staticmethod(report_weight_link)

    def __init__(self, setup):
        super().__init__(setup)
        self.counts = np.zeros((setup.L, setup.view.d_ff), dtype=np.int64)  # x_down outliers per (layer, unit)

    def update(self, capture, batch):
        for l in range(self.setup.L):
            self.counts[l] += capture.channel_counts("x_down", l)

    def result(self, results):
        lifecycle = results["lifecycle"]
        drivers = lifecycle[0]["mlp_drivers"] if lifecycle else []
        # Figure 7 shows the layer whose MLP generates the largest massive activation, and the units that do
        return weight_link(self.setup.model, self.counts, layer=drivers[0]["layer"] if drivers else None,
                           drivers=[d["down_input_channel"] for d in drivers if abs(d["share"]) >= MEANINGFUL_DRIVER])
