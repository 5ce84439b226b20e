"""Interventions for the analysis (Raman, Sharma, Zhang 2025): massive activations removed from the layer
outputs where they are generated, where they are carried, or everywhere; LayerNorm gains of chosen channels
set to their norm's median. Each is a context manager that restores the model on exit."""

import torch

from hf_models import first, model_view
from outlier_stats import find_activation_outliers

INTERVENTION_TARGETS = ("generated", "propagated", "all")


class Intervention:
    """Forward hooks that edit massive activations of the layer outputs (found on the fly with the
    definitions of the module docstring) to zero ('zero') or to the mean value measured by the analysis
    for that (layer, channel) ('mean'; 0 where none was measured). `target` (an operational reading of
    Raman, Sharma, Zhang 2025, whose exact tests are not public):
      generated   only where a branch output is itself massive: the value is removed at the layer that
                  generates it, so the residual stream never carries it further;
      propagated  only where no branch output is massive (the residual carries the value): the layer
                  that generates it keeps it, and the copy is removed from the next layer's output on;
      all         every massive activation, wherever it is."""

    def __init__(self, model, tau, mode, means=None, target="generated"):
        if mode not in ("zero", "mean"):
            raise ValueError(mode)
        if target not in INTERVENTION_TARGETS:
            raise ValueError(target)
        self.model, self.tau, self.mode, self.target = model, tau, mode, target
        self.view = model_view(model)
        blocks = self.view.blocks
        C = model.config.n_embd
        self.repl = []
        for l in range(len(blocks)):
            r = torch.zeros(C)
            for (ml, c), v in (means or {}).items():
                if ml == l:
                    r[c] = v
            self.repl.append(r)
        self.count = 0
        self._handles = []
        self._branch = [[None, None] for _ in blocks]

    def __enter__(self):
        view = self.view
        for l, block in enumerate(view.blocks):
            def keep(i, l=l):
                def hook(module, inputs, output):
                    # a copy: Falcon adds the attention output into the MLP output in place
                    self._branch[l][i] = first(output).detach().clone()
                return hook

            def edit(module, inputs, output, l=l):
                if isinstance(output, tuple):  # blocks returning (hidden, ...): edit the hidden states
                    return (edit(module, inputs, output[0], l),) + output[1:]
                a, m = (x.view(output.shape) for x in self._branch[l])  # OPT's MLP works on (B*T, C)
                self._branch[l] = [None, None]
                found = find_activation_outliers(output, self.tau)
                if found.idx.shape[0] == 0:
                    return output
                b, t, c = found.idx.unbind(1)
                thr = self.tau * found.mean[b]
                gen = (a[b, t, c].float().abs() > thr) | (m[b, t, c].float().abs() > thr)
                if self.target != "all":
                    keep = gen if self.target == "generated" else ~gen
                    b, t, c = b[keep], t[keep], c[keep]
                self.count += int(b.numel())
                output = output.clone()
                output[b, t, c] = self.repl[l].to(device=output.device, dtype=output.dtype)[c]
                return output

            self._handles += [view.attn_branch[l].register_forward_hook(keep(0)),
                              view.mlp_branch[l].register_forward_hook(keep(1)), block.register_forward_hook(edit)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False


def layer_norms(model):
    """[(name, module)] of every LayerNorm / RMSNorm (each block's, then the final one), in the order of
    OutlierAnalyzer's normalization report."""
    return model_view(model).norms


class GammaIntervention:
    """Sets the LayerNorm gains gamma of the given channels ({module name: [channel]}) to the median gamma
    of their LayerNorm, and restores them on exit (the normalization test of Raman, Sharma, Zhang 2025)."""

    def __init__(self, model, channels):
        self.model, self.channels = model, channels
        self._saved = []

    @torch.no_grad()
    def __enter__(self):
        for name, ln in layer_norms(self.model):
            chans = self.channels.get(name)
            if chans:
                idx = torch.as_tensor(chans, device=ln.weight.device)
                self._saved.append((ln, idx, ln.weight[idx].clone()))
                ln.weight[idx] = ln.weight.median()
        return self

    @torch.no_grad()
    def __exit__(self, *exc):
        for ln, idx, old in self._saved:
            ln.weight[idx] = old
        self._saved = []
        return False
