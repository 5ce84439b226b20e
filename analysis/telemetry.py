"""The cheap outlier telemetry train.py logs every `outlier_interval` iterations: one forward of a fixed
batch, per layer the largest |h| and its ratio to the median, the channel kurtosis and the attention on the
first token (the emergence curves of massive activations and attention sinks over training)."""

import torch

from analysis.capture import Probe
from analysis.definitions import channel_kurtosis, top_and_median


@torch.no_grad()
def training_telemetry(raw_model, X_fixed):
    """One forward of `raw_model` on the fixed batch X_fixed (B, T) -> flat dict of floats.

    Keys (l = 0..n_layer-1): outlier/top1_h/L{l}, outlier/median_h/L{l}, outlier/ratio_h/L{l}
    (top-1 |h_l| over median |h_l|, over the whole batch), outlier/kurtosis/L{l}
    (channel_kurtosis of h_l), outlier/first_attn/L{l} (attention weight on key 0, mean over
    batch, heads and queries), and outlier/max_top1_h, outlier/max_ratio_h, outlier/max_kurtosis,
    outlier/max_first_attn. Sink variants add outlier/sink_mass/L{l} (mean sink-column
    probability); `scaling` adds outlier/gate_first/L{l} and outlier/gate_rest/L{l} (mean gate S(x)
    at position 0 and at the other positions; gate_rest only when T > 1). Runs in eval mode under torch.no_grad() (within any
    autocast the caller set) and restores the train/eval mode, record flags and hooks.
    """
    L = len(raw_model.transformer.h)
    out = {}

    def attention_fn(l, rec, layer_input):
        out[f"outlier/first_attn/L{l}"] = float(rec["probs"][..., 0].float().mean())  # (B, nh, T) -> mean
        if "sink_probs" in rec:
            out[f"outlier/sink_mass/L{l}"] = float(rec["sink_probs"].float().mean())
        if "gate" in rec:
            gate = rec["gate"].float()  # (B, nh, T)
            out[f"outlier/gate_first/L{l}"] = float(gate[..., 0].mean())
            if gate.shape[-1] > 1:  # no other positions when T == 1: no key rather than a NaN
                out[f"outlier/gate_rest/L{l}"] = float(gate[..., 1:].mean())

    was_training = raw_model.training
    raw_model.eval()
    try:
        with Probe(raw_model, attention_fn=attention_fn) as probe:
            raw_model(X_fixed)
            top1s, ratios, kurts = [], [], []
            for l in range(L):
                a = probe.h[l].float().abs().reshape(1, -1, probe.h[l].shape[-1])
                top, med, _ = top_and_median(a, 1)
                top1, median = float(top[0, 0]), float(med[0])
                ratio = top1 / max(median, 1e-12)
                kurt = channel_kurtosis(probe.h[l])
                out[f"outlier/top1_h/L{l}"] = top1
                out[f"outlier/median_h/L{l}"] = median
                out[f"outlier/ratio_h/L{l}"] = ratio
                out[f"outlier/kurtosis/L{l}"] = kurt
                top1s.append(top1), ratios.append(ratio), kurts.append(kurt)
    finally:
        raw_model.train(was_training)
    out["outlier/max_top1_h"] = max(top1s)
    out["outlier/max_ratio_h"] = max(ratios)
    out["outlier/max_kurtosis"] = max(kurts)
    out["outlier/max_first_attn"] = max(out[f"outlier/first_attn/L{l}"] for l in range(L))
    return out
