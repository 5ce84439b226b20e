"""Hooks on every block of a model for one or more forwards: what each layer computed, captured once and
restored after (this repo's GPT or any Hugging Face causal LM, through hf_models.model_view)."""

import contextlib

from hf.models import first, model_view


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

        def store_in0(module, args, kwargs):
            self.h_in0 = (args[0] if args else kwargs["hidden_states"]).detach()

        reg(self.blocks[0].register_forward_pre_hook(store_in0, with_kwargs=True))
        for l, block in enumerate(self.blocks):
            reg(block.register_forward_hook(store_h(l)))
            if self.block_fn is not None:
                reg(block.register_forward_hook(lambda module, inputs, output, l=l: self.block_fn(l, first(output).detach())))
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
