"""Table 1 of An et al.: overlaps of weight, activation and attention outliers (the sets are defined in
analysis/definitions.py's docstring). The sequence-dimension rows stream; the feature-dimension rows pool the
outlier channels of every batch and meet the weight outliers at the end."""

import numpy as np
import torch

from analysis.definitions import b2_overlaps, overlap, row_overlap
from analysis.statistics.base import Statistic, add_finite
from runtime.reports import layer_ranges, markdown_table, percent


def report_consistency(doc):
    c = doc["consistency"]
    rows = [[name, percent(v["a_in_b"]), percent(v["b_in_a"]), v["n_a"], v["n_b"], v["definition"]]
            for name, v in c.items()]
    ha = c["h_vs_attention"]
    by_layer = [[l, percent(v["a_in_b"]), percent(v["b_in_a"]), v["n_a"], v["n_b"]] for l, v in enumerate(ha["by_layer"])]
    return ["## Consistency (Table 1)", "",
            "Overlap |A∩B|/|A| of the sets below, in both directions (definitions in `outliers.json` and "
            "`analysis/definitions.py`).", "",
            markdown_table(["pair", "A in B", "B in A", "n A", "n B", "sets"], rows), "",
            "Row 4 (h vs attention, Appendix B.2) per layer: the overall value averages over the (sample, layer, head) "
            f"triples of layers {layer_ranges(ha['layers'])} (those whose output h_l has activation outliers).", "",
            markdown_table(["layer", "A in B", "B in A", "n A", "n B"], by_layer), ""]


class Consistency(Statistic):
    name = "consistency"
    sites = ("h.outliers", "x_down.outliers", "attention.keys")
    schema = {
        "<pair>": "wdown_vs_xdown, wdown_vs_h (feature dimension), h_vs_xdown, h_vs_attention (sequence dimension): "
                  "Table 1's rows",
        "<pair>.a_in_b": "|A&B|/|A| (null when A is empty)",
        "<pair>.b_in_a": "|A&B|/|B|",
        "<pair>.n_a": "|A|, or the number of (sequence, ...) terms the mean is over",
        "<pair>.n_b": "|B|, likewise",
        "<pair>.definition": "the sets A and B",
        "<pair>.by_layer?": "[L]{a_in_b, b_in_a, n_a, n_b} (h_vs_attention) per layer",
        "<pair>.layers?": "(h_vs_attention) the layers whose h_l has activation outliers",
    }
    report = staticmethod(report_consistency)

    def __init__(self, setup):
        super().__init__(setup)
        L = setup.L
        self.attn = [0.0, 0, 0.0, 0]  # A-in-K sum, count, K-in-A sum, count
        self.attn_layer = [[0.0, 0, 0.0, 0] for _ in range(L)]
        self.seq = [0.0, 0, 0.0, 0]
        self.h_channels = np.zeros(setup.C, dtype=bool)  # channels of h outliers, any layer
        self.x_channels = np.zeros((L, setup.view.d_ff), dtype=bool)  # (layer, channel) of x_down outliers

    def update(self, capture, batch):
        L = self.setup.L
        h_rows = [capture.outliers("h", l).rows for l in range(L)]
        for l in range(L):
            if capture.attention_keys[l] is not None:
                self._attention(l, h_rows[l], capture.attention_keys[l])
        # h vs x_down positions, per sequence pooled over layers (cpu: layers may sit on several GPUs)
        h_positions = torch.stack([r.cpu() for r in h_rows]).any(0)
        x_positions = torch.stack([capture.outliers("x_down", l).rows.cpu() for l in range(L)]).any(0)
        add_finite(self.seq, 0, row_overlap(h_positions, x_positions))
        add_finite(self.seq, 2, row_overlap(x_positions, h_positions))
        for l in range(L):
            self.h_channels |= capture.channel_counts("h", l) > 0
            self.x_channels[l] |= capture.channel_counts("x_down", l) > 0

    def _attention(self, l, hpos, keys):
        """Appendix B.2 for layer l: h_l's outlier positions against each head's outlier keys."""
        a_in_k, k_in_a = b2_overlaps(hpos, keys)
        for acc in (self.attn, self.attn_layer[l]):
            add_finite(acc, 0, a_in_k)
            add_finite(acc, 2, k_in_a)

    def result(self, results):
        L = self.setup.L
        w = results["weight"][self.setup.view.down_name]
        A_x = {(l, k) for l in range(L) for k in w["outlier_channels"][l]}
        B_x = {(l, int(k)) for l in range(L) for k in np.nonzero(self.x_channels[l])[0]}
        A_h = {c for l in range(L) for c in w["outlier_out_channels"][l]}
        B_h = {int(c) for c in np.nonzero(self.h_channels)[0]}

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
                                             f"keys of head i of layer l ({self.setup.rules.attention_rule} rule); "
                                             "a_in_b = mean of |A&K_i|/|A| over (sample, layer, head) with A non-empty "
                                             "(n_a of them: the layers listed in 'layers'); b_in_a = mean of "
                                             "|A&K_i|/|K_i| over non-empty K_i"},
        }
