"""Channel-wise outliers of the LayerNorm / RMSNorm outputs, and those among them that the gain gamma alone makes
(Raman, Sharma, Zhang 2025)."""

import numpy as np
import torch

from analysis.definitions import _TINY
from analysis.statistics.base import Statistic
from runtime.reports import markdown_table, number


def listed(items, n=5):
    """The first n items, comma-separated, and '… (+k more)' when some are left out ('–' when none)."""
    items = list(items)
    text = ", ".join(map(str, items[:n])) or "–"
    return text + (f", … (+{len(items) - n} more)" if len(items) > n else "")


def report_normalization(doc):
    rows = []
    for n in doc["normalization"]:
        top = n["top"][0]
        rows.append([n["module"], len(n["outlier_channels"]), listed(n["outlier_channels"]), listed(n["gamma_driven"]),
                     top["channel"], number(top["ratio"]), number(top["gamma"]), number(top["ratio_before_gamma"])])
    return ["## Normalization (channel-wise outliers)", "",
            f"Channels whose mean |norm output| (LayerNorm or RMSNorm) over tokens exceeds tau_channel "
            f"({number(doc['tau_by_type']['channel'])}) x the median "
            "channel, largest first; 'before gamma' divides out the norm's gain (a ratio near 1 there means the "
            "outlier comes from gamma's rescaling). 'gamma-driven': outlier channels whose ratio before gamma is at "
            "most tau_channel (gamma alone makes them outliers).", "",
            markdown_table(["norm", "# outlier channels", "channels", "gamma-driven", "top channel", "ratio",
                            "gamma", "ratio before gamma"], rows), ""]


def threshold_text(th):
    return f"- channel: {th['rule']}, tau_channel = {number(th['tau'])}."


class Normalization(Statistic):
    """Per norm (each block's, then the final one): mean |y| per channel, and mean |y - beta| to tell the
    channels the gain gamma makes large from those whose normalized input already is."""
    name = "normalization"
    sites = ("norm_out",)
    schema = {
        "[].module": "the norm's name (each block's, then the final one)",
        "[].median_abs": "median over channels of the mean |output|",
        "[].outlier_channels": "channels whose mean |output| exceeds tau_channel x the median, largest ratio first",
        "[].gamma_driven": "those among them whose ratio before the gain is at most tau_channel",
        "[].top": "[{channel, ratio, mean_abs, gamma, ratio_before_gamma}] the 5 largest ratios",
    }
    report = staticmethod(report_normalization)
    threshold_key = "channel"
    threshold_text = staticmethod(threshold_text)

    def __init__(self, setup):
        super().__init__(setup)
        n_norms = len(setup.view.norms)
        self.abs = np.zeros((n_norms, setup.C))
        self.centered = np.zeros((n_norms, setup.C))
        self.n = np.zeros(n_norms, dtype=np.int64)

    def update(self, capture, batch):
        for i, (y, (_, ln)) in enumerate(zip(capture.norm_out, self.setup.view.norms)):
            y = y.float().reshape(-1, y.shape[-1])
            ones = torch.ones(1, y.shape[0], device=y.device)
            col = (ones @ y.abs())[0].cpu().numpy()  # column sums through BLAS: much faster than .sum(0)
            self.abs[i] += col
            if getattr(ln, "bias", None) is not None:  # RMSNorm has none
                col = (ones @ (y - ln.bias.detach().float()).abs())[0].cpu().numpy()
            self.centered[i] += col
            self.n[i] += y.shape[0]

    def result(self, results, top_n=5):
        """Per norm: its outlier channels and the gamma-driven ones among them, largest ratio first."""
        view, tau_channel = self.setup.view, self.setup.rules.tau_channel
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

    def thresholds(self, results):
        return {"rule": "mean |LayerNorm output| of a channel > tau_channel x the median channel",
                "tau": self.setup.rules.tau_channel}
