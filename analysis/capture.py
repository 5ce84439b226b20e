"""Hooks on every block of a model for one or more forwards: what each layer computed, captured once and
restored after (this repo's GPT or any Hugging Face causal LM, through hf_models.model_view), and the
named capture sites the analysis' statistics read (`Capture`, TransformerLens' hook points in spirit)."""

import collections
import contextlib

import numpy as np

from analysis.definitions import cumulative_attention, find_activation_outliers
from hf.models import first, model_view

# What a statistic can read, by name (a Probe records the first six; the dotted ones are what the definitions
# find in them, derived once per forward on first use). Each holds every layer of one forward.
SITES = {
    "h": "layer outputs h_l (B, T, C): the residual stream after block l",
    "attn_out": "attention branch outputs (B, T, C): what each block's attention adds to its residual",
    "mlp_out": "MLP branch outputs (B, T, C): what each block's MLP adds to its residual",
    "x_down": "down-projection inputs x_down (B, T, d_ff)",
    "up_gate": "SwiGLU (up, gate) projection outputs (B, T, d_ff) of each layer; (None, None) without a gate",
    "norm_out": "outputs of the model's norms (each block's, then the final one), (B, T, C)",
    "attention": "one layer's attention as it runs (only one layer's (B, H, T, T) weights live at a time): its "
                 "records (probs; q, k, v where recorded; sink_probs, gate), cumulative scores, outlier keys, and the "
                 "positions holding activation outliers in its input",
    "h.outliers": "activation outliers of h_l at tau_act (definitions.find_activation_outliers), found as block l ends",
    "x_down.outliers": "activation outliers of x_down at tau_act",
    "attention.keys": "(B, H, T) attention-outlier keys of each head of each layer (the attention rule)",
}


class Probe:
    """Context manager that hooks every block of a GPT or Hugging Face model (hf_models.model_view) for
    one or more forwards.

    Captures (per layer l, the last forward's tensors, detached): `h[l]` block output (and
    `block_returns_tuple`, whether the blocks return a tuple whose first element it is), `h_in0` the
    input of block 0, `attn_out[l]` / `mlp_out[l]` branch outputs (what each block adds to its residual),
    `xdown[l]` the input of the MLP down projection, `up[l]` / `gate[l]` the SwiGLU up and gate
    projection outputs (where the family has a gate), `norm_out[i]` the outputs of `view.norms` (each
    block's norms, then the final norm), as requested. With `attention_fn`, calls
    attention_fn(l, recorded, layer_input) right after each attention layer (recorded: 'probs'; 'q', 'k',
    'v' where they were recorded, else a 'qkv_missing' reason (hf_models); the variant's records for this
    repo's GPT), so that only one layer's attention matrix lives at a time. `record_qkv=False` asks a
    Hugging Face model for its probabilities only. With `block_fn`, calls block_fn(l, h_l) as soon as block l has run (before the
    next layer's attention). On exit removes every hook and restores the record flags and attention
    implementation; it never changes train/eval mode.
    """

    def __init__(self, model, *, attention_fn=None, block_fn=None, branches=False, down_input=False, norms=False,
                 record_qkv=True):
        self.model = model
        self.view = model_view(model)
        self.block_fn = block_fn
        self.blocks = self.view.blocks
        self.L = len(self.blocks)
        self.attention_fn = attention_fn
        self.record_qkv = record_qkv
        self.branches, self.down_input, self.norms = branches, down_input, norms
        self._handles = []
        self._stack = None
        self.clear()

    def clear(self):
        L = self.L
        self.h = [None] * L
        self.attn_out = [None] * L
        self.mlp_out = [None] * L
        self.xdown = [None] * L
        self.up = [None] * L
        self.gate = [None] * L
        self.norm_out = [None] * len(self.view.norms)
        self.h_in0 = None
        self.block_returns_tuple = False  # whether the blocks return (hidden states, ...) (Falcon)

    def layer_input(self, l):
        return self.h_in0 if l == 0 else self.h[l - 1]

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        try:
            self._install()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _install(self):
        view, reg = self.view, self._handles.append

        def store_h(l):
            def hook(module, inputs, output):
                self.block_returns_tuple = isinstance(output, (tuple, list))
                self.h[l] = first(output).detach()
            return hook

        def store(lst, l, copy=False):
            # a copy where the model adds into the returned tensor in place (Falcon's parallel MLP output)
            def hook(module, inputs, output):
                out = self._tokens_first(first(output).detach())
                lst[l] = out.clone() if copy else out
            return hook

        def after_block(l):
            def hook(module, inputs, output):
                self.block_fn(l, first(output).detach())  # and returns None: the output stays the block's
            return hook

        def store_in0(module, args, kwargs):
            self.h_in0 = (args[0] if args else kwargs["hidden_states"]).detach()

        reg(self.blocks[0].register_forward_pre_hook(store_in0, with_kwargs=True))
        for l, block in enumerate(self.blocks):
            reg(block.register_forward_hook(store_h(l)))
            if self.block_fn is not None:
                reg(block.register_forward_hook(after_block(l)))
            if self.branches:
                reg(view.attn_branch[l].register_forward_hook(store(self.attn_out, l, copy=True)))
                reg(view.mlp_branch[l].register_forward_hook(store(self.mlp_out, l, copy=True)))
            if self.down_input:
                def pre(module, args, l=l):
                    self.xdown[l] = self._tokens_first(args[0].detach())
                reg(view.down[l].register_forward_pre_hook(pre))
                if view.gate is not None or view.family.fused_gate_up:
                    reg(view.up[l].register_forward_hook(store(self.up, l)))
                if view.gate is not None:
                    reg(view.gate[l].register_forward_hook(store(self.gate, l)))
        if self.norms:
            for i, (_, module) in enumerate(view.norms):
                reg(module.register_forward_hook(store(self.norm_out, i)))
        if self.attention_fn is not None:
            self._stack.enter_context(view.attention_capture(
                lambda l, recorded: self.attention_fn(l, recorded, self.layer_input(l)), self.record_qkv))

    def _tokens_first(self, x):
        """(B, T, ...) view of a tensor that the model flattened to (B*T, features) (OPT's MLP)."""
        return x.view(*self.h_in0.shape[:2], -1) if x.ndim == 2 else x

    def up_gate(self, l):
        """(up, gate) outputs (B, T, d_ff) of layer l's SwiGLU, or (None, None); Phi-3's fused output is [gate, up]."""
        if self.view.family.fused_gate_up and self.up[l] is not None:
            gate, up = self.up[l].chunk(2, dim=-1)
            return up, gate
        return self.up[l], self.gate[l]

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self.clear()
        return False


def probe_for(model, sites, *, attention_fn=None, block_fn=None, record_qkv=True):
    """A Probe that hooks only what `sites` (names of SITES) need."""
    roots = {site.split(".")[0] for site in sites}
    return Probe(model, attention_fn=attention_fn if "attention" in roots else None, block_fn=block_fn,
                 branches=bool(roots & {"attn_out", "mlp_out"}), down_input=bool(roots & {"x_down", "up_gate"}),
                 norms="norm_out" in roots, record_qkv=record_qkv)


# one layer's attention (the `attention` site): records as the Probe gives them, cumulative scores (B, H, T),
# outlier keys (B, H, T) and input_rows (B, T), the positions with activation outliers in the layer's input
LayerAttention = collections.namedtuple("LayerAttention", "layer records cumulative keys input_rows")


class Capture:
    """The sites of one forward by name (SITES), and what the definitions find in them, each found once.

    Built on the lists a Probe fills as the layers run (`Capture.of`), or on tensors given per layer.
    `attention` is the LayerAttention of the layer whose attention ran last; `attention_keys` keeps every
    layer's outlier keys for the whole forward."""

    def __init__(self, rules, h, attn_out=None, mlp_out=None, x_down=None, up_gate=None, norm_out=None):
        self.rules = rules
        self.h, self.attn_out, self.mlp_out, self.x_down, self.norm_out = h, attn_out, mlp_out, x_down, norm_out
        self._up_gate = up_gate
        self.attention = None
        self.attention_keys = [None] * len(h)
        self._found = {}
        self._channels = {}

    @classmethod
    def of(cls, probe, rules):
        return cls(rules, probe.h, probe.attn_out, probe.mlp_out, probe.xdown, probe.up_gate, probe.norm_out)

    def up_gate(self, l):
        """(up, gate) of layer l's SwiGLU, or (None, None)."""
        return self._up_gate(l) if self._up_gate is not None else (None, None)

    def outliers(self, site, l):
        """The activation outliers (definitions.Outliers, with each sequence's median |x|) of `site` ('h' or
        'x_down') at layer l."""
        return self._find(site, l)[0]

    def top3(self, site, l):
        """(B, k <= 3) the largest |x| of each sequence of `site` at layer l."""
        return self._find(site, l)[1]

    def channel_counts(self, site, l):
        """(channels,) int64: the number of activation outliers of `site` at layer l in each channel."""
        if (site, l) not in self._channels:
            out = self.outliers(site, l)
            self._channels[site, l] = np.bincount(out.idx[:, 2].cpu().numpy(), minlength=getattr(self, site)[l].shape[-1])
        return self._channels[site, l]

    def _find(self, site, l):
        if (site, l) not in self._found:
            self._found[site, l] = find_activation_outliers(getattr(self, site)[l], self.rules.tau_act, stats=True)
        return self._found[site, l]

    def attend(self, l, records, layer_input):
        """Layer l's attention ran: it becomes `attention`, and its outlier keys join `attention_keys`."""
        cumulative = cumulative_attention(records["probs"])
        keys = self.rules.attention_keys(cumulative)
        # the positions carrying activation outliers in the layer's input (h_{l-1}, or the embeddings)
        rows = (find_activation_outliers(layer_input, self.rules.tau_act).rows if l == 0
                else self.outliers("h", l - 1).rows)
        self.attention_keys[l] = keys
        self.attention = LayerAttention(l, records, cumulative, keys, rows)
