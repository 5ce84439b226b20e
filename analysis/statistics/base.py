"""The protocol every statistic of the analysis follows, what it is built from, and the helpers statistics share."""

import collections
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from analysis.definitions import Rules, TokenInfo
from hf.models import model_view


class Setup:
    """What every statistic is built from: the model and its hf.models view, the sequence length T, the token
    strings, the rules (thresholds) and the length of the outlier lists."""

    def __init__(self, model, seq_len, rules=None, token_info=None, max_list=100):
        cfg = model.config
        self.model, self.view = model, model_view(model)
        self.L, self.H, self.C = cfg.n_layer, cfg.n_head, cfg.n_embd
        self.head_dim = getattr(cfg, "head_dim", None) or self.C // self.H
        self.T = seq_len
        self.rules = rules or Rules()
        self.token_info = token_info or TokenInfo()
        self.max_list = max_list


# one batch as the statistics see it: tokens and their categories (B, T) numpy, the index of its first sequence
Batch = collections.namedtuple("Batch", "tokens categories first")


@dataclass(frozen=True)
class Figure:
    """A figure of a statistic. `draw(out_dir, file, doc, statistic)` draws it from outliers.json (`doc`) into
    out_dir/file and returns the file, or None when there is nothing to draw; `statistic` is the live statistic,
    or None when the figure is redrawn from a written outliers.json. `paper`: the figure of An et al. it
    reproduces (outliers.json lists the paper's figures after the others, in the paper's order)."""
    name: str
    file: str
    draw: Callable
    paper: Optional[int] = None


class Statistic:
    """One statistic of the analysis: a function of named capture sites, accumulated over batches.

    A subclass sets `name` (its key in outliers.json: its result, report sections and figures live under it),
    `sites` (what it reads, analysis.capture.SITES: the Probe hooks what the statistics read, nothing more),
    `schema` ({key: description} of its result, for docs/analysis.md; dots separate nested keys, '[]' stands for
    the entries of a list, '<name>' for keys that vary (such as module names), and a trailing '?' marks a key that
    some models lack) and `figures` (Figure entries); and
    defines `update(capture, batch)`, `result(results)` and `report(doc)`. It is built from a Setup.

    update   adds one batch (capture: analysis.capture.Capture; batch: Batch). A statistic that reads
             'attention' is updated as each layer's attention runs (capture.attention is that layer's), the
             others once the forward has run.
    result   its part of outliers.json, in JSON types; `results` maps every statistic's name to its result,
             computed on first use (the weight link reads the lifecycle's)
    report   its report sections, markdown lines, from outliers.json (`doc`) alone
    thresholds (optional) its entry `threshold_key` of outliers.json's `thresholds`: the rule, and the
             absolute threshold it came to; `threshold_text(entry)` its line at the top of report.md
    """
    name = None
    sites = ()
    schema = {}
    figures = ()
    threshold_key = None

    def __init__(self, setup):
        self.setup = setup

    def update(self, capture, batch):
        pass

    def result(self, results):
        raise NotImplementedError

    @staticmethod
    def report(doc):
        return []

    def thresholds(self, results):
        return None

    @staticmethod
    def threshold_text(entry):
        return None


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


def ratio_list(arr):
    """arr (L, 2) of [sum, count] -> list of means (None where count is 0)."""
    return [float(s / c) if c else None for s, c in arr]


def add_finite(acc, i, values):
    """acc[i] += sum of the non-NaN values, acc[i + 1] += their number."""
    ok = ~torch.isnan(values)
    acc[i] += float(values[ok].sum())
    acc[i + 1] += int(ok.sum())


def ranked_positions(counts, top_n=10):
    """Per layer, the top_n positions with the most outliers: [[position, count], ...]."""
    return [[[int(t), int(row[t])] for t in np.argsort(-row, kind="stable")[:top_n] if row[t] > 0] for row in counts]
