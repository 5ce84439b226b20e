"""`OutlierAnalyzer`: runs the registered statistics (analysis/statistics/) over batches of sequences, one forward
per batch through a Probe that hooks what they read, streaming: memory does not grow with the number of
sequences."""

import contextlib

import torch

from analysis.capture import Capture, probe_for
from analysis.definitions import ATTENTION_SHARE, WEIGHT_RATIO, WEIGHT_SHARE, Rules
from analysis.interventions import ReplayBatch
from analysis.statistics import REGISTRY
from analysis.statistics.base import Batch, Setup


class Results(dict):
    """name -> result of each statistic, each computed once, on first use (a result may read another's)."""

    def __init__(self, statistics):
        super().__init__()
        self.statistics = statistics

    def __missing__(self, name):
        self[name] = self.statistics[name].result(self)
        return self[name]


class OutlierAnalyzer:
    """Everything of analyze_outliers.py that is computed per batch of sequences, streaming.

    Usage: `an = OutlierAnalyzer(model, ...)`; for each batch `an.run_batch(X, Y)`; `an.result()`.
    `statistics`: what builds each statistic from the Setup (default: the registry's classes, in its order).
    Memory: per-layer accumulators of size O(L * (C + T + n_head * head_dim)) plus capped lists; with
    keep_replay (for --intervene), per batch its tokens, its massive coordinates and one layer output
    (B, T, C) on the CPU (`replay`, interventions.ReplayBatch).
    """

    def __init__(self, model, *, tau_act=1000.0, tau_weight=1000.0, tau_attn=1000.0, tau_channel=10.0,
                 max_list=100, token_info=None, seq_len=1024, weight_rule="ratio", weight_share=WEIGHT_SHARE,
                 weight_ratio=WEIGHT_RATIO, attention_rule="authors", attention_share=ATTENTION_SHARE,
                 record_qkv=True, keep_replay=False, statistics=None):
        rules = Rules(tau_act, tau_weight, tau_attn, tau_channel, weight_rule, weight_share, weight_ratio,
                      attention_rule, attention_share)
        self.model = model
        self.setup = Setup(model, seq_len, rules, token_info, max_list)
        built = [build(self.setup) for build in (statistics or REGISTRY.values())]
        self.statistics = {s.name: s for s in built}
        self.sites = {site for s in built for site in s.sites}
        # a statistic reading the attention runs as each layer's attention does (one (B, H, T, T) at a time)
        self.streamed = [s for s in built if "attention" in s.sites]
        self.after_forward = [s for s in built if "attention" not in s.sites]
        self.record_qkv = record_qkv
        self.n_seqs = 0
        self.loss_sum, self.loss_n = 0.0, 0
        self.keep_replay = keep_replay
        self.replay = []
        self._capture = self._batch = None  # the batch in flight

    def _probe(self):
        # h's outliers as each block ends (the next layer's attention reads its input's), inside the forward
        block_fn = (lambda l, h: self._capture.outliers("h", l)) if "h.outliers" in self.sites else None
        return probe_for(self.model, self.sites, attention_fn=self._attention, block_fn=block_fn,
                         record_qkv=self.record_qkv)

    def _attention(self, l, records, layer_input):
        self._capture.attend(l, records, layer_input)
        for s in self.streamed:
            s.update(self._capture, self._batch)
        self._capture.attention = None  # only one layer's (B, H, T, T) weights alive at a time

    @torch.no_grad()
    def run_batch(self, X, Y=None, autocast=None):
        """X (B, T) long on the model's device; Y the targets (for the loss) or None."""
        tokens = X.cpu().numpy()
        self._batch = Batch(tokens, self.setup.token_info.categories(tokens), self.n_seqs)
        with self._probe() as p:
            self._capture = Capture.of(p, self.setup.rules)
            with autocast if autocast is not None else contextlib.nullcontext():
                _, loss = self.model(X, Y)
            if loss is not None:
                self.loss_sum += float(loss) * X.shape[0]
                self.loss_n += X.shape[0]
            for s in self.after_forward:
                s.update(self._capture, self._batch)
            if self.keep_replay and loss is not None:
                self.replay.append(ReplayBatch(X, Y, float(loss), p.h, self.statistics["lifecycle"].last,
                                               p.block_returns_tuple))
        self._capture = self._batch = None
        self.n_seqs += X.shape[0]

    def result(self):
        """{statistic name: its result}, in the statistics' order (outliers.json's)."""
        results = Results(self.statistics)
        return {name: results[name] for name in self.statistics}

    def thresholds(self, results):
        """outliers.json's `thresholds`: each statistic's rule and the absolute threshold it came to."""
        return {s.threshold_key: s.thresholds(results) for s in self.statistics.values() if s.threshold_key}
