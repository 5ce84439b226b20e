"""The analysis' report.md, figures and outliers.json schema, assembled from the statistics (analysis/statistics/):
each statistic's report sections and figures, between the header (model, data, thresholds) and the
interventions and footer."""

import inspect
import os

from analysis.statistics import REGISTRY
from runtime.reports import markdown_table, number

FORMAT = "outlier-gpt/outliers"
FORMAT_VERSION = 1


def statistics_in(doc):
    """The registered statistics whose results `doc` holds, in the registry's order."""
    return [s for s in REGISTRY.values() if s.name in doc]


def figure_entries(statistics):
    """(statistic, Figure) of every figure of `statistics`, in outliers.json's order: the overview figures in the
    statistics' order, then the figures of An et al. in the paper's order."""
    entries = [(s, f) for s in statistics for f in s.figures]
    return ([e for e in entries if e[1].paper is None]
            + sorted((e for e in entries if e[1].paper is not None), key=lambda e: e[1].paper))


def output_files():
    """What an analysis may write into its output directory."""
    return ("report.md", "outliers.json") + tuple(f.file for _, f in figure_entries(REGISTRY.values()))


def draw_figures(out_dir, doc, live=None):
    """{figure name: file} of the figures drawn into out_dir from outliers.json (`doc`); `live`: the analyzer's
    statistics by name, for the figures that need more than the JSON (without them those are left out)."""
    drawn = {}
    for statistic, figure in figure_entries(statistics_in(doc)):
        file = figure.draw(out_dir, figure.file, doc, (live or {}).get(statistic.name))
        if file is not None:
            drawn[figure.name] = file
    return drawn


def write_report(out_dir, doc):
    lines = report_header(doc)
    for statistic in statistics_in(doc):
        lines += statistic.report(doc)
    lines += report_intervention(doc) + report_footer(doc)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def report_header(doc):
    m, d, t, th = doc["model"], doc["data"], doc["tau_by_type"], doc["thresholds"]
    kind = f"{m['attention']} attention" if m.get("family", "outlier-gpt") == "outlier-gpt" else m["family"]
    lines = [f"# Outlier analysis: {os.path.basename(str(m['source']))} ({kind})", ""]
    lines.append(f"Model: `{m['source']}`" + (f" (iter {m['iter_num']})" if m.get("iter_num") is not None else "")
                 + f", {m['n_layer']} layers, {m['n_head']} heads, n_embd {m['n_embd']}.  ")
    lines.append(f"Data: `{d['source']}`, {d['num_seqs']} sequences x {d['seq_len']} tokens.  ")
    lines += ["", "Thresholds (rule, and the absolute threshold it came to; `thresholds` in `outliers.json`):", ""]
    lines += [s.threshold_text(th[s.threshold_key]) for s in statistics_in(doc) if s.threshold_key in th]
    lines += ["", "Definitions: see `analysis/definitions.py`; numbers: `outliers.json`."]
    if th["attention"]["rule"] == "paper" and t["attention"] >= d["seq_len"] and m["attention"] != "sigmoid":
        lines.append(f"\n> Note: with softmax the mean cumulative attention is 1, so no key can exceed tau_attention "
                     f"{number(t['attention'])} >= seq_len {d['seq_len']}; use a smaller --tau_attention.")
    return lines + [""]


def report_intervention(doc):
    iv = doc.get("intervention")
    if not iv:
        return []
    rows = ([["none", "", number(iv["loss"], 5), number(iv["perplexity"], 5), ""]]
            + [[k, v["activations_changed"], number(v["loss_intervened"], 5), number(v["perplexity_intervened"], 5),
                number(v["loss_change"], 4)] for k, v in iv["targets"].items()]
            + [["gamma", iv["gamma"]["count"], number(iv["gamma"]["loss_intervened"], 5),
                number(iv["gamma"]["perplexity_intervened"], 5), number(iv["gamma"]["loss_change"], 4)]])
    return ["## Intervention", "",
            f"Massive activations set to **{iv['mode']}**"
            + (" (the mean of the values the target edits at that layer and channel)" if iv["mode"] == "mean" else "")
            + ": at their generation layers (generated; each layer of a value written in several steps), only where "
            "the residual stream carries them (propagated), or both (all); the layers are those of the clean "
            "forward's lifecycle. And the LayerNorm channels whose outlier comes from gamma alone set to the "
            "median gamma (gamma). The loss without is the analysis' own; each intervened forward replays it (the "
            "same attention path) from the first edited layer.", "",
            markdown_table(["intervention", "activations / channels changed", "loss", "perplexity", "loss change"],
                           rows), ""]


def report_footer(doc):
    tm, meta = doc["timing"], doc["meta"]
    return ["---", f"Analysis {tm.get('analysis_s', 0):.1f} s"
            + (f", intervention {tm['intervention_s']:.1f} s" if "intervention_s" in tm else "")
            + f"; `{meta['command']}` at {meta['date']} (commit {meta['git_commit']}, {meta['gpu']}).", ""]


# ----------------------------------------------------------------------------------------------
# the schema of outliers.json: the document's own keys around the statistics' (each declares its own)

HEAD_SCHEMA = {
    "format": f"`{FORMAT}`",
    "version": f"{FORMAT_VERSION}",
    "model": "{source, iter_num, attention, n_layer, n_head, n_embd, block_size, vocab_size, bias, family, "
             "down_proj, d_ff, parallel_residual}",
    "data": "{source, num_seqs, seq_len, tokens, seed}",
    "tau": "--tau",
    "tau_by_type": "{activation, weight, attention, channel}: the tau of each outlier type",
    "thresholds": "{activation{rule, tau, effective{layer_output[L], down_input[L]}, max_ratio, note?}, weight{rule, "
                  "definition, effective{module: threshold}, paper_formula}, attention{rule, definition, effective[L], "
                  "paper_formula}, channel{rule, tau}}: each rule and the absolute threshold it came to",
}
TAIL_SCHEMA = {
    "intervention": "{mode, loss, perplexity, activations_changed, loss_intervened, perplexity_intervened, "
                    "loss_change (of generated), targets{generated|propagated|all: {activations_changed, "
                    "loss_intervened, perplexity_intervened, loss_change}}, gamma{channels{module: [channel]}, count, "
                    "loss_intervened, perplexity_intervened, loss_change}} | null (without --intervene)",
    "surface": "{layer, tokens}: the layer and first-sequence tokens of the 3-D magnitude plot",
    "timing": "{analysis_s, intervention_s, figures_s, load_s, total_s}",
    "figures": "{name: file} of the figures drawn",
    "meta": "{command, git_commit, date, gpu, ...}: the run",
}


def schema_path(name, key):
    """'lifecycle[].peak', 'activation.<kind>.top3': a statistic's schema key under its name in outliers.json."""
    if name is None:
        return key
    return name + ("" if key.startswith("[]") else ".") + key


def schema_markdown():
    """outliers.json's schema, from the statistics' declarations: docs/analysis.md holds it (a test checks)."""
    def table(name, schema):
        return markdown_table(["key", "what it holds"], [[f"`{schema_path(name, key)}`", text]
                                                         for key, text in schema.items()])

    lines = [f"`outliers.json` (format `{FORMAT}`, version {FORMAT_VERSION}): L layers, H heads, T tokens per "
             "sequence; lists of outliers hold the `--max_list` largest, totals count all; undefined ratios are "
             "`null`. `[]` stands for the entries of a list, `<name>` for keys that vary; a key ending in `?` is absent "
             "where it does not apply.", "",
             table(None, HEAD_SCHEMA), ""]
    for statistic in REGISTRY.values():
        doc_line = " ".join((inspect.getmodule(statistic).__doc__ or "").split("\n\n")[0].split())
        lines += [f"### `{statistic.name}`", "", doc_line, "", table(statistic.name, statistic.schema), ""]
    lines += ["### The rest", "", table(None, TAIL_SCHEMA), ""]
    return "\n".join(lines)
