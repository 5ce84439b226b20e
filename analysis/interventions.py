"""Interventions for the analysis (Raman, Sharma, Zhang 2025): massive activations removed from the layer
outputs where they are generated, where they are carried, or everywhere; LayerNorm gains of chosen channels
set to their norm's median.

They replay the analysis' own forward: `OutlierAnalyzer(keep_replay=True)` keeps, per batch, the massive
coordinates with the layers each target edits (decided on the clean forward, with the lifecycle's rules) and
the layer output just before the first edited layer. Each intervened forward resumes there (the blocks
before it are not run again), runs the attention path the analysis ran (so that a change of loss is the
edit's alone), and the three targets go through one batched forward. The clean loss is the analysis' own."""

import contextlib

import torch

from hf.models import HFCausalLM, forwards_replaced, model_view

# what each target edits, per massive coordinate (a (sequence, position, channel) that is an activation
# outlier of some layer output), an operational reading of Raman, Sharma, Zhang 2025 (their tests are not public):
#   generated   its generation layers (outlier_stats.lifecycle_stages): the value is removed where a branch
#               writes it, so the residual stream never carries it further (each layer of a two-step generation);
#   propagated  the layers where it is massive and no branch generates it: the generating layers keep it, the
#               copies the residual carries are removed;
#   all         both.
INTERVENTION_TARGETS = ("generated", "propagated", "all")


def edit_masks(generated, massive):
    """(n, L) generation layers and massive layers of n coordinates -> {target: (n, L) layers it edits}."""
    return {"generated": generated, "propagated": massive & ~generated, "all": massive | generated}


class ReplayBatch:
    """One analysed batch for the interventions: X, Y (B, T) on the CPU, its loss in the analysis' forward, the
    massive coordinates (n, 3) [b, t, c] with {target: (n, L) edit mask}, the first edited layer `start` (L:
    none) and the layer output before it (B, T, C) on the CPU (None where start is 0 or L)."""

    def __init__(self, X, Y, loss, h, last, returns_tuple):
        L = len(h)
        self.X, self.Y, self.loss, self.returns_tuple = X.cpu(), Y.cpu(), loss, returns_tuple
        self.coords, self.masks = last if last is not None else (None, {})
        edited = [int(m.any(0).nonzero()[0]) for m in self.masks.values() if m.any()]
        self.start = min(edited, default=L)
        self.h_start = h[self.start - 1].detach().cpu() if 0 < self.start < L else None

    def edits(self, target, mode, means):
        """(l, b, t, c, value) tensors of `target`'s edits: the value is 0 ('zero') or the mean of the
        values the target edits at that (layer, channel) over every sequence ('mean')."""
        if target not in self.masks:
            return None
        i, l = self.masks[target].nonzero(as_tuple=True)
        b, t, c = self.coords[i].unbind(1)
        values = torch.zeros(len(i))
        if mode == "mean":
            values = torch.tensor([means.get(key, 0.0) for key in zip(l.tolist(), c.tolist())])
        return l, b, t, c, values


@contextlib.contextmanager
def analysis_attention(model):
    """The attention path of the analysis' forward (this repo's GPT: the reference formula; Hugging Face
    models: eager attention), so that a replayed loss differs from the analysis' loss by its edits alone."""
    if isinstance(model, HFCausalLM):
        before = model.hf.config._attn_implementation
        model.hf.set_attn_implementation("eager")
        try:
            yield
        finally:
            model.hf.set_attn_implementation(before)
        return
    attn = model_view(model).attn
    saved = [a.backend for a in attn]
    for a in attn:
        a.backend = "reference"
    try:
        yield
    finally:
        for a, backend in zip(attn, saved):
            a.backend = backend


@contextlib.contextmanager
def skip_blocks(view, n, h, returns_tuple):
    """Blocks 0 .. n-1 return h (the output of block n-1, recorded earlier) without computing: the forward
    resumes at block n. The blocks' own forward (or a wrapper put there by accelerate) is restored on exit."""
    out = (h, None) if returns_tuple else h
    with forwards_replaced(view.blocks[:n], lambda i, block, forward: lambda *args, **kwargs: out):
        yield


def _setter(b, t, c, values):
    """A forward hook that sets output[b, t, c] = values (the hidden states where a block returns a tuple)."""
    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (hook(module, inputs, output[0]),) + output[1:]
        output = output.clone()
        output[b.to(output.device), t.to(output.device), c.to(output.device)] = values.to(output.device, output.dtype)
        return output
    return hook


def replayed_nll(model, view, X, Y, start, h_start, returns_tuple, edits=()):
    """(B,) NLL sums and (B,) target counts of a forward that resumes at block `start` from h_start (the output
    of block start - 1; from the embeddings where start is 0) and sets h_l[b, t, c] = value for every
    (l, b, t, c, value) in `edits`."""
    from compress.perplexity import sequence_nll
    handles = []
    try:
        for layer in sorted({int(x) for e in edits for x in e[0].tolist()}):
            sel = [(e[0] == layer) for e in edits]
            cat = lambda k: torch.cat([e[k][s] for e, s in zip(edits, sel)])  # noqa: E731
            handles.append(view.blocks[layer].register_forward_hook(_setter(cat(1), cat(2), cat(3), cat(4))))
        h = None
        if start > 0:
            device = next(view.blocks[start - 1].parameters()).device
            h = h_start.to(device)
        with skip_blocks(view, start, h, returns_tuple):
            return sequence_nll(model, X, Y)
    finally:
        for handle in handles:
            handle.remove()


def intervention_losses(model, batches, mode, means, gamma_channels=None, autocast=None, progress=None):
    """Mean loss over the kept batches with each target's massive activations set to `mode` ('zero' | 'mean';
    means: {target: {(layer, channel): value}}) and, with gamma_channels ({norm: [channel]}), with those
    LayerNorm gains at their norm's median. -> ({target: (loss, activations changed)}, gamma loss or None)."""
    view = model_view(model)
    totals = {target: [0.0, 0] for target in INTERVENTION_TARGETS}
    gamma_total, n_seqs = 0.0, 0
    with analysis_attention(model), torch.no_grad(), autocast or contextlib.nullcontext():
        for batch in batches:
            B = batch.X.shape[0]
            n_seqs += B
            for target, (loss, count) in _target_losses(model, view, batch, mode, means).items():
                totals[target][0] += loss * B
                totals[target][1] += count
            if gamma_channels:
                gamma_total += _gamma_loss(model, view, batch, gamma_channels) * B
            if progress is not None:
                progress.update(B)
    n_seqs = max(n_seqs, 1)
    losses = {target: (total / n_seqs, count) for target, (total, count) in totals.items()}
    return losses, (gamma_total / n_seqs if gamma_channels else None)


def _target_losses(model, view, batch, mode, means):
    """{target: (loss, edits)} of one batch. The targets that edit something share forwards: the batch is
    repeated, each copy with its target's edits, in forwards of at most max(B, number of targets) sequences
    (the analysis' own batch size where that is larger, so that memory stays as the analysis needed)."""
    B = batch.X.shape[0]
    edits = {target: batch.edits(target, mode, means.get(target, {})) for target in INTERVENTION_TARGETS}
    out = {target: (batch.loss, 0) for target in INTERVENTION_TARGETS}  # a target without edits: the clean loss
    group = [target for target, e in edits.items() if e is not None and len(e[0])]
    per_forward = max(1, max(B, len(group)) // B)  # copies of the batch in one forward
    device = next(model.parameters()).device
    for first in range(0, len(group), per_forward):
        part = group[first:first + per_forward]
        copies = len(part)
        shifted = [(e[0], e[1] + g * B, e[2], e[3], e[4]) for g, e in enumerate(edits[t] for t in part)]
        h = None if batch.h_start is None else batch.h_start.repeat(copies, 1, 1)
        nll, n = replayed_nll(model, view, batch.X.repeat(copies, 1).to(device), batch.Y.repeat(copies, 1).to(device),
                              batch.start, h, batch.returns_tuple, shifted)
        for g, target in enumerate(part):
            rows = slice(g * B, (g + 1) * B)
            out[target] = (float(nll[rows].sum() / max(int(n[rows].sum()), 1)), len(edits[target][0]))
    return out


def _gamma_loss(model, view, batch, channels):
    """The loss of one batch with the gains of `channels` at their norm's median: resumed from the batch's
    recorded layer when every changed norm lies after it, else from the embeddings."""
    gamma = GammaIntervention(model, channels)
    start = batch.start if batch.h_start is not None and gamma.first_layer() >= batch.start else 0
    device = next(model.parameters()).device
    with gamma:
        nll, n = replayed_nll(model, view, batch.X.to(device), batch.Y.to(device), start,
                              batch.h_start if start else None, batch.returns_tuple)
    return float(nll.sum() / max(int(n.sum()), 1))


class GammaIntervention:
    """Sets the LayerNorm gains gamma of the given channels ({module name: [channel]}) to the median gamma
    of their LayerNorm, and restores them on exit (the normalization test of Raman, Sharma, Zhang 2025).
    gamma is the norm's effective gain: Gemma's RMSNorm multiplies by 1 + weight."""

    def __init__(self, model, channels):
        self.model, self.channels = model, channels
        self.view = model_view(model)
        self._saved = []

    def first_layer(self):
        """The first block holding a norm whose gains are set (the number of blocks for the final norm)."""
        touched = [ln for name, ln in self.view.norms if self.channels.get(name)]
        return min((l for l, block in enumerate(self.view.blocks) for ln in touched
                    if any(m is ln for m in block.modules())), default=self.view.L)

    @torch.no_grad()
    def __enter__(self):
        for name, ln in self.view.norms:
            chans = self.channels.get(name)
            if chans:
                idx = torch.as_tensor(chans, device=ln.weight.device)
                self._saved.append((ln, idx, ln.weight[idx].clone()))
                offset = self.view.family.norm_gain_offset
                ln.weight[idx] = (ln.weight + offset).median() - offset
        return self

    @torch.no_grad()
    def __exit__(self, *exc):
        for ln, idx, old in self._saved:
            ln.weight[idx] = old
        self._saved = []
        return False
