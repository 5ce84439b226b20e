"""Hugging Face causal LMs (LLaMA, Mistral, Qwen2/3, Gemma 1/2/3, Phi-2/3, OPT, Falcon, GPT-NeoX, GPT-2) for the
outlier analysis and the compression table, next to this repo's own GPT.

One `Family` entry per architecture says where things are (FAMILIES, keyed by config.model_type); the
analysis and compression code only ever see a `ModelView` built from it, so no script branches on the
architecture. Capture is by forward hooks and pre-hooks on the model's own modules:

    h_l          output of decoder block l (a tensor, or the first element of a tuple)
    x_down       input of the MLP down projection (pre-hook)
    branches     output of the attention output projection and of the down projection: exactly what
                 each block adds to its residual stream (sequential or parallel residual alike)
    attention    the attention module's second output, the probabilities, which transformers returns
                 under eager attention (GQA heads repeated, sliding windows masked by it); for modules
                 that call transformers' AttentionInterface, a registered attention function runs the
                 family's own eager attention and also keeps its post-RoPE q, k and its v
    norms        outputs of each block's norms and of the final norm

transformers is imported only when a Hugging Face model is loaded, so the GPT paths do not pay for it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.cli import UserError, one_line


@dataclass(frozen=True)
class Family:
    """Where a family keeps its parts. Paths are dotted attribute paths: `blocks` and `final_norm` from the
    top-level model, the others from one block. A norm path missing from a block is skipped (Falcon's
    norms depend on its config)."""
    blocks: str
    attn: str                # attention module (its output holds the probabilities for 'eager')
    attn_branch: str         # module whose output is the attention branch added to the residual
    mlp_branch: str          # module whose output is the MLP branch added to the residual
    down: str                # MLP down projection: its input is the x_down outlier site
    up: str                  # up projection; with fused_gate_up, [gate; up] stacked along the output
    gate: str | None         # SwiGLU gate projection
    norms: tuple             # per-block norms, in block order
    final_norm: str
    parallel: object = False  # attention and MLP read the same block input: a bool, or a function of the config
    fused_gate_up: bool = False
    capture: str = "eager"   # how attention probabilities are obtained: 'eager' or 'record' (this repo's GPT)
    norm_gain_offset: float = 0.0  # the norms' gain is weight + this (Gemma's RMSNorm: 1 + weight)


_LLAMA = Family(blocks="model.layers", attn="self_attn", attn_branch="self_attn.o_proj", mlp_branch="mlp.down_proj",
                down="mlp.down_proj", up="mlp.up_proj", gate="mlp.gate_proj",
                norms=("input_layernorm", "post_attention_layernorm"), final_norm="model.norm")

# Gemma 2 / 3 normalize each branch before adding it to the residual: the branch outputs are those norms'
_GEMMA2 = Family(blocks="model.layers", attn="self_attn", attn_branch="post_attention_layernorm",
                 mlp_branch="post_feedforward_layernorm", down="mlp.down_proj", up="mlp.up_proj", gate="mlp.gate_proj",
                 norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                        "post_feedforward_layernorm"), final_norm="model.norm", norm_gain_offset=1.0)

FAMILIES = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": Family(blocks="model.layers", attn="self_attn", attn_branch="self_attn.o_proj", mlp_branch="mlp.down_proj",
                    down="mlp.down_proj", up="mlp.up_proj", gate="mlp.gate_proj",
                    norms=("input_layernorm", "post_attention_layernorm"), final_norm="model.norm", norm_gain_offset=1.0),
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "phi3": Family(blocks="model.layers", attn="self_attn", attn_branch="self_attn.o_proj", mlp_branch="mlp.down_proj",
                   down="mlp.down_proj", up="mlp.gate_up_proj", gate=None, fused_gate_up=True,
                   norms=("input_layernorm", "post_attention_layernorm"), final_norm="model.norm"),
    "phi": Family(blocks="model.layers", attn="self_attn", attn_branch="self_attn.dense", mlp_branch="mlp.fc2",
                  down="mlp.fc2", up="mlp.fc1", gate=None, norms=("input_layernorm",),
                  final_norm="model.final_layernorm", parallel=True),
    "opt": Family(blocks="model.decoder.layers", attn="self_attn", attn_branch="self_attn.out_proj", mlp_branch="fc2",
                  down="fc2", up="fc1", gate=None, norms=("self_attn_layer_norm", "final_layer_norm"),
                  final_norm="model.decoder.final_layer_norm"),
    "falcon": Family(blocks="transformer.h", attn="self_attention", attn_branch="self_attention.dense",
                     mlp_branch="mlp.dense_4h_to_h", down="mlp.dense_4h_to_h", up="mlp.dense_h_to_4h", gate=None,
                     norms=("input_layernorm", "post_attention_layernorm", "ln_attn", "ln_mlp"),
                     final_norm="transformer.ln_f",
                     parallel=lambda cfg: bool(cfg.new_decoder_architecture or cfg.parallel_attn)),
    "gpt_neox": Family(blocks="gpt_neox.layers", attn="attention", attn_branch="attention.dense",
                       mlp_branch="mlp.dense_4h_to_h", down="mlp.dense_4h_to_h", up="mlp.dense_h_to_4h", gate=None,
                       norms=("input_layernorm", "post_attention_layernorm"), final_norm="gpt_neox.final_layer_norm",
                       parallel=lambda cfg: bool(cfg.use_parallel_residual)),
    "gpt2": Family(blocks="transformer.h", attn="attn", attn_branch="attn.c_proj", mlp_branch="mlp.c_proj",
                   down="mlp.c_proj", up="mlp.c_fc", gate=None, norms=("ln_1", "ln_2"), final_norm="transformer.ln_f"),
}
# this repo's model.GPT: its attention records probabilities, q, k, v on request (attn.record)
NANOGPT = Family(blocks="transformer.h", attn="attn", attn_branch="attn", mlp_branch="mlp", down="mlp.c_proj",
                 up="mlp.c_fc", gate=None, norms=("ln_1", "ln_2"), final_norm="transformer.ln_f", capture="record")
# each family's name in docs/hf-models.md (family_table)
FAMILY_NAMES = {"llama": "LLaMA 1/2/3", "mistral": "Mistral", "qwen2": "Qwen2 / Qwen2.5", "qwen3": "Qwen3",
                "gemma": "Gemma", "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)",
                "phi3": "Phi-3", "phi": "Phi-1.5 / Phi-2", "opt": "OPT", "falcon": "Falcon", "gpt_neox": "GPT-NeoX / Pythia",
                "gpt2": "GPT-2"}
# what --pretrained takes, in the scripts' --help
PRETRAINED_FAMILIES = ", ".join(name for t, name in FAMILY_NAMES.items() if t != "gpt2")
# multimodal model types whose language model is a supported family (their configs nest it; not supported whole)
WRAPPED_TEXT_MODELS = {"gemma3": "gemma3_text"}
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-community/gpt2", "openai-community/gpt2-medium",
              "openai-community/gpt2-large", "openai-community/gpt2-xl")


def family_table():
    """docs/hf-models.md's family table, from FAMILIES (tests check the doc holds exactly this): model types
    that share one entry share a row."""
    from runtime.reports import markdown_table

    types_of = {}
    for model_type, family in FAMILIES.items():
        types_of.setdefault(id(family), []).append(model_type)
    rows = []
    for types in types_of.values():
        f = FAMILIES[types[0]]
        up_gate = (f"fused `{f.up}` ([gate; up])" if f.fused_gate_up
                   else f"`{f.up}` / `{f.gate}`" if f.gate else f"`{f.up}`")
        gain = f"{f.norm_gain_offset:g} + weight" if f.norm_gain_offset else "weight"
        residual = "parallel per config" if callable(f.parallel) else "parallel" if f.parallel else "sequential"
        rows.append([", ".join(f"`{t}`" for t in types), ", ".join(FAMILY_NAMES[t] for t in types), f"`{f.blocks}[i]`",
                     f"`{f.attn_branch}` / `{f.mlp_branch}`", f"`{f.down}`", up_gate,
                     ", ".join(f"`{n}`" for n in f.norms), f"`{f.final_norm}`", gain, residual])
    return markdown_table(["`config.model_type`", "family", "decoder blocks", "branch outputs (attention / MLP)",
                           "x_down site (down projection)", "up / gate (Figure 7)", "per-block norms", "final norm",
                           "norm gain", "attention and MLP"], rows)


@contextlib.contextmanager
def forwards_replaced(blocks, make_forward):
    """Inside the context each block's forward is make_forward(index, block, its current forward); on exit the
    block's own forward (or a wrapper that accelerate put on the instance) is back."""
    saved = [(b, b.__dict__.get("forward")) for b in blocks]
    try:
        for i, b in enumerate(blocks):
            b.forward = make_forward(i, b, b.forward)
        yield
    finally:
        for b, forward in saved:
            if forward is None:
                del b.forward
            else:
                b.forward = forward

def get_path(root, path):
    """The module at dotted `path` below `root`, or None when some part is missing."""
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def is_conv1d(module):
    """GPT-2's Conv1D stores its weight as (in, out); it is recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module):
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_of(module):
    """The weight in nn.Linear's (out, in) layout (a view: writes through it reach the module)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def in_features(module):
    return module.weight.shape[0] if is_conv1d(module) else module.in_features


def first(output):
    """A block's hidden states: transformers 5 blocks return a tensor, some families (Falcon) a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


# ==============================================================================================
# the uniform view

class ModelView:
    """Per-layer lists of the modules the analysis hooks, for any supported model."""

    def __init__(self, model, family):
        self.model, self.family = model, family
        root = model.hf if isinstance(model, HFCausalLM) else model
        self.root = root
        self.blocks = list(get_path(root, family.blocks))
        self.L = len(self.blocks)
        part = lambda path: [get_path(b, path) for b in self.blocks]  # noqa: E731
        self.attn, self.attn_branch, self.mlp_branch = part(family.attn), part(family.attn_branch), part(family.mlp_branch)
        self.down, self.up = part(family.down), part(family.up)
        self.gate = part(family.gate) if family.gate else None
        self.down_name = family.down
        self.norms = [(f"{name}.L{l}", get_path(b, name)) for name in family.norms
                      if get_path(self.blocks[0], name) is not None for l, b in enumerate(self.blocks)]
        final = get_path(root, family.final_norm)
        self.final_norm = final
        if final is not None:
            self.norms.append((family.final_norm.rsplit(".", 1)[-1], final))
        self.d_ff = weight_of(self.down[0]).shape[1]
        self.parallel = bool(family.parallel(root.config) if callable(family.parallel) else family.parallel)

    def norm_gain(self, norm):
        """A norm's effective gain gamma (Gemma's RMSNorm multiplies by 1 + weight)."""
        return norm.weight.detach().float() + self.family.norm_gain_offset

    def weight_names(self, gpt_names=None):
        """Relative names of the Linear (or Conv1D) modules of a block, in module order."""
        if gpt_names is not None:  # this repo's GPT: a fixed order the reports and tests rely on
            return [n for n in gpt_names if get_path(self.blocks[0], n) is not None]
        return [n for n, m in self.blocks[0].named_modules() if n and is_linear(m)]

    def weights(self, name):
        return [weight_of(get_path(b, name)) for b in self.blocks]

    def up_gate_weights(self, l):
        """(up (d_ff, C), gate (d_ff, C) or None) of layer l; Phi-3's fused projection is [gate; up]."""
        w = weight_of(self.up[l]).detach()
        if self.family.fused_gate_up:
            gate, up = w.chunk(2, dim=0)
            return up, gate
        return w, (weight_of(self.gate[l]).detach() if self.gate else None)

    @contextlib.contextmanager
    def attention_capture(self, fn, record_qkv=True):
        """Calls fn(l, {'probs': (B, H, T, T), ...}) after each attention layer, through the family's capture.
        Hugging Face models add their post-RoPE 'q', 'k' and 'v' where the attention ran the registered
        recording function, else a 'qkv_missing' reason; record_qkv=False asks for probabilities only."""
        with CAPTURES[self.family.capture](self, fn, record_qkv):
            yield


@contextlib.contextmanager
def _capture_record(view, fn, record_qkv=True):  # this repo's GPT always records its q, k, v
    saved = [(a.record, a.recorded) for a in view.attn]
    handles = []
    try:
        for l, a in enumerate(view.attn):
            a.record = True

            def hook(module, inputs, output, l=l):
                recorded, module.recorded = module.recorded, {}
                fn(l, recorded)
            handles.append(a.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        for a, (record, recorded) in zip(view.attn, saved):
            a.record, a.recorded = record, recorded


RECORD_ATTENTION = "outlier_gpt_record"  # the attention function registered with transformers while recording
_QKV = "_outlier_gpt_qkv"                 # where it leaves q, k, v on the module for the forward hook
# why a layer's record holds no q, k, v (the "qkv_missing" entry the analysis reports)
QKV_NOT_CALLED = ("the attention module did not call the registered attention function during the forward "
                  "(transformers' AttentionInterface); probabilities only, from eager attention")
QKV_NOT_REGISTERED = ("the model's attention modules have no eager attention function to record through, or "
                      "transformers refused to switch to it; probabilities only, from eager attention")
QKV_OFF = "q/k/v recording switched off (--attention_capture eager); probabilities only"
QKV_ADDITIVE_MASK = ("the attention mask adds a bias to q.k (ALiBi): the logits are not q.k/sqrt(d); "
                     "probabilities only")
QKV_SOFTCAP = ("the attention logits are soft-capped (cap * tanh(logit / cap), Gemma 2): they are not q.k/sqrt(d); "
               "probabilities only")


def _family_eager(module):
    """The eager attention function of the module's own modeling file (None if it has none)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _is_pure_mask(mask):
    """Whether an attention mask only hides keys (boolean, or 0 / a very negative number), so that the
    logits the model used are q.k times its scaling; an additive bias (ALiBi) is not."""
    if mask is None or mask.dtype == torch.bool:
        return True
    hidden = mask <= torch.finfo(mask.dtype).min / 2
    return bool((mask.masked_fill(hidden, 0) == 0).all())


def _record_attention(module, query, key, value, attention_mask=None, *args, **kwargs):
    """The family's eager attention, keeping its post-RoPE q and k (GQA heads repeated, as the
    probabilities) and its v on the module. q is stored times scaling * sqrt(d), so that q.k / sqrt(d) is
    the logit the model used: OPT scales q before the call and passes scaling=1."""
    out, probs = _family_eager(module)(module, query, key, value, attention_mask, *args, **kwargs)
    if not _is_pure_mask(attention_mask) or kwargs.get("softcap") is not None:
        setattr(module, _QKV, {"qkv_missing": QKV_ADDITIVE_MASK if kwargs.get("softcap") is None else QKV_SOFTCAP})
        return out, probs
    d = query.shape[-1]
    scaling = kwargs.get("scaling")
    q = query.detach() * ((d ** -0.5 if scaling is None else scaling) * math.sqrt(d))
    k = key.detach().repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # (B, H, T, hs)
    setattr(module, _QKV, {"q": q, "k": k, "v": value.detach()})
    return out, probs


def _switch_attention(hf, name, fn, mask_fn):
    """Registers the attention function fn and the mask function it needs with transformers under `name`
    and switches the model to it; False (and the model left as it was) when transformers refuses."""
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, mask_fn)
    try:
        hf.set_attn_implementation(name)
    except (ValueError, ImportError, NotImplementedError):
        return False
    return True


def _use_record_attention(hf, attn_modules):
    """Registers the recording attention function and switches the model to it; False (and the model
    left as it was) when a module has no eager function to run or transformers refuses the switch."""
    if not all(_family_eager(a) is not None for a in attn_modules):
        return False
    from transformers.masking_utils import eager_mask
    return _switch_attention(hf, RECORD_ATTENTION, _record_attention, eager_mask)  # the masks eager attention gets


_KV = "_outlier_gpt_kv"  # per attention module: (transform, the attention function it runs after it)
_KV_CALLED = "_outlier_gpt_kv_called"


def _kv_attention(module, query, key, value, attention_mask=None, *args, **kwargs):
    """The model's own attention function on keys and values changed by the module's transform."""
    transform, inner = module.__dict__[_KV]
    key, value = transform(key, value)
    module.__dict__[_KV_CALLED] = True
    return inner(module, query, key, value, attention_mask, *args, **kwargs)


def transform_keys_values(model, transform):
    """From now on every attention layer of the HFCausalLM runs its attention function (sdpa, eager, ...) on
    transform(key, value): the (B, kv_heads, T, head_dim) keys and values it computed, after RoPE and before
    GQA heads are repeated, as a KV cache holds them. Registered with transformers' AttentionInterface like
    the q/k/v recording; the model stays switched (compress_eval changes a copy made for one method). A short
    forward checks that every layer went through it: a UserError where one did not."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    hf, view = model.hf, model_view(model)
    impl = hf.config._attn_implementation
    for a in view.attn:
        inner = _family_eager(a) if impl == "eager" else ALL_ATTENTION_FUNCTIONS.get(impl)
        if inner is None:
            raise UserError(f"{model.source}: no {impl!r} attention function to run after changing the keys and values")
        a.__dict__[_KV] = (transform, inner)
    mask = eager_mask if impl == "eager" else ALL_MASK_ATTENTION_FUNCTIONS[impl]
    if not _switch_attention(hf, f"outlier_gpt_kv_{impl}", _kv_attention, mask):
        raise UserError(f"{model.source}: transformers refused a registered attention function, so its keys and "
                        f"values cannot be changed")
    device = next(model.parameters()).device
    with torch.no_grad():
        hf(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    missing = [l for l, a in enumerate(view.attn) if not a.__dict__.pop(_KV_CALLED, False)]
    if missing:
        raise UserError(f"{model.source}: the attention of layer(s) {missing} does not call transformers' "
                        f"AttentionInterface, so its keys and values cannot be changed")


@contextlib.contextmanager
def _capture_eager(view, fn, record_qkv=True):
    """Whether the recording function runs is observed per layer and per forward, not assumed per
    family: a layer whose attention did not call it reports its probabilities with a `qkv_missing`
    reason in place of q, k, v."""
    hf = view.model.hf
    before = hf.config._attn_implementation
    # modules with an output_attentions argument (GPT-2, OPT, Falcon) return probabilities only when asked
    asks = ["output_attentions" in inspect.signature(a.forward).parameters for a in view.attn]
    recording = record_qkv and _use_record_attention(hf, view.attn)
    if not recording and record_qkv:
        missing = QKV_NOT_REGISTERED
    else:
        missing = QKV_NOT_CALLED if recording else QKV_OFF
    if not recording:
        hf.set_attn_implementation("eager")
    handles = []
    try:
        for l, a in enumerate(view.attn):
            if asks[l]:
                handles.append(a.register_forward_pre_hook(
                    lambda module, args, kwargs: (args, {**kwargs, "output_attentions": True}), with_kwargs=True))

            def hook(module, inputs, output, l=l):
                probs = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
                if probs is None:
                    raise UserError(f"layer {l}: the attention module returned no probabilities (under "
                                    f"{hf.config._attn_implementation!r} attention); analyse this model with "
                                    f"--attention_capture eager")
                qkv = module.__dict__.pop(_QKV, None) or {"qkv_missing": missing}
                fn(l, {"probs": probs.detach(), **qkv})
            handles.append(a.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        for a in view.attn:
            a.__dict__.pop(_QKV, None)
        if hf.config._attn_implementation != before:
            hf.set_attn_implementation(before)


CAPTURES = {"record": _capture_record, "eager": _capture_eager}


def model_view(model):
    """The ModelView of this repo's GPT or of a loaded HFCausalLM."""
    if isinstance(model, HFCausalLM):
        return ModelView(model, model.family)
    return ModelView(model, NANOGPT)


# ==============================================================================================
# loading

@dataclass
class HFConfig:
    """The GPTConfig fields the scripts read, for a Hugging Face model."""
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    model_type: str
    n_kv_head: int
    head_dim: int
    bias: bool = True  # whether any Linear of the blocks has a bias (set from the model)
    attention: str = "default"  # plain softmax attention, as the repo's `default` variant


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM with this repo's GPT calling convention: model(X, Y) -> (logits, loss),
    loss = mean cross-entropy in float32 over targets != -1; `final_hidden(x)` and `lm_head` for
    perplexity in chunks."""

    def __init__(self, hf, source, tokenizer_dir=None):
        super().__init__()
        self.hf = hf
        self.source = source
        self.tokenizer_dir = tokenizer_dir
        cfg = hf.config
        self.family = family_of(cfg)
        n_head = cfg.num_attention_heads
        n_embd = cfg.hidden_size
        kv = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_kv_heads", None) or n_head
        if cfg.model_type == "falcon" and not cfg.new_decoder_architecture and cfg.multi_query:
            kv = 1
        block = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        self.config = HFConfig(n_layer=cfg.num_hidden_layers, n_head=n_head, n_embd=n_embd, block_size=int(block),
                               vocab_size=hf.get_output_embeddings().weight.shape[0], model_type=cfg.model_type,
                               n_kv_head=int(kv), head_dim=int(getattr(cfg, "head_dim", None) or n_embd // n_head),
                               bias=any(is_linear(m) and m.bias is not None
                                        for m in get_path(hf, self.family.blocks).modules()))

    @property
    def lm_head(self):
        return self.hf.get_output_embeddings()

    def head_logits(self, hidden):
        """lm_head's logits of final hidden states, soft-capped where the model caps them (Gemma 2:
        cap * tanh(logits / cap)) as its own forward does."""
        logits = self.lm_head(hidden)
        cap = getattr(self.hf.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def final_hidden(self, idx):
        """(B, T, C) hidden states that lm_head maps to logits (after the final norm and any projection)."""
        # on the input's device: under device_map="auto" the last block may sit on another GPU
        return self.hf.base_model(input_ids=idx, use_cache=False).last_hidden_state.to(idx.device)

    def forward(self, idx, targets=None):
        logits = self.hf(input_ids=idx, use_cache=False).logits
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.to(logits.device).reshape(-1),
                                   ignore_index=-1)
        return logits, loss


def family_of(config):
    if any(getattr(config, k, None) for k in MOE_KEYS):
        raise UserError(f"{config.model_type} is a mixture-of-experts model; its MLP has no single down projection, "
                        f"so the x_down and W_down analyses are not defined for it (not supported)")
    if config.model_type in WRAPPED_TEXT_MODELS:
        raise UserError(f"model type {config.model_type!r} wraps a vision model around a "
                        f"{WRAPPED_TEXT_MODELS[config.model_type]!r} language model, which is supported on its own: "
                        f"analyse a text-only checkpoint (e.g. Gemma 3 1B) or the language model saved alone")
    if config.model_type not in FAMILIES:
        raise UserError(f"model type {config.model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[config.model_type]


def is_gpt2(name_or_dir):
    """Whether --pretrained loads into this repo's model.GPT: GPT-2 names, directories whose config says
    gpt2, and any other bare name (hub models of other families are named ORG/NAME), which model.GPT
    then refuses with the list of names it knows."""
    if name_or_dir in GPT2_NAMES:
        return True
    cfg = os.path.join(name_or_dir, "config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg, encoding="utf-8") as f:
                return json.load(f).get("model_type") == "gpt2"
        except (OSError, ValueError):
            return False
    return not os.path.isdir(name_or_dir) and "/" not in name_or_dir


def is_pretrained_dir(path):
    """A save_pretrained directory (config.json inside) rather than a checkpoint file of this repo."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face models need the `transformers` package (pip install transformers)") from None
    transformers.logging.set_verbosity_error()
    return transformers


def load_dtype(device):
    """bf16 (fp16 where bf16 is missing) on GPU, fp32 on CPU."""
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _needs_device_map(transformers, config, device, dtype):
    """device_map='auto' when the weights do not fit on the one GPU (counted on the meta device)."""
    if not str(device).startswith("cuda"):
        return False
    with torch.device("meta"):
        n = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return n * torch.finfo(dtype).bits // 8 > 0.85 * free


def _check_no_custom_code(directory):
    """UserError when a model directory's config.json names a model type transformers does not know but maps
    it to Python files of its own (auto_map): these scripts never run code from a model directory."""
    if not os.path.lexists(os.path.join(directory, "config.json")):
        raise UserError(f"{directory} holds no config.json: not a Hugging Face model directory (save_pretrained "
                        f"writes one)")
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"cannot read {os.path.join(directory, 'config.json')} ({one_line(e, 150)}); the model "
                        f"directory is damaged or incomplete: restore it, or save the model again") from None
    if not isinstance(config, dict):
        raise UserError(f"{os.path.join(directory, 'config.json')} holds no model configuration (a JSON object); the "
                        f"model directory is damaged: restore it, or save the model again")
    if config.get("auto_map") and config.get("model_type") not in FAMILIES:
        raise UserError(f"{directory} needs its own Python code (config.json maps model type "
                        f"{config.get('model_type')!r} to auto_map classes), and these scripts never run code from a "
                        f"model directory (trust_remote_code=False); supported types: {', '.join(FAMILIES)}")


def _load_failure(name_or_dir, e):
    """The UserError for a transformers load that failed: a local directory's files are damaged or incomplete,
    a hub name needs network (or a cache), and custom code is never run."""
    if "trust_remote_code" in str(e):
        return UserError(f"{name_or_dir} needs its own Python code (custom modeling files), and these scripts never "
                         f"run code from a model (trust_remote_code=False); supported types: {', '.join(FAMILIES)}")
    if os.path.isdir(name_or_dir):
        return UserError(f"cannot load the model in {name_or_dir} ({type(e).__name__}: {one_line(e, 200)}); its files "
                         f"are damaged or incomplete: restore them, or save the model again")
    return UserError(f"cannot load {name_or_dir!r} ({type(e).__name__}: {one_line(e, 200)}); a Hugging Face hub name "
                     f"needs network or a cache, a directory needs config.json from save_pretrained")


def load_hf_causal_lm(name_or_dir, device="cpu", dtype=None, attn_implementation=None):
    """An HFCausalLM in eval mode from a hub name or a save_pretrained directory, with transformers' default
    attention (SDPA where the family has it); the analysis switches to eager only while it records
    probabilities. No code from the model's files is ever run (trust_remote_code=False); weights that are
    not finite are refused."""
    if os.path.isdir(name_or_dir):
        _check_no_custom_code(name_or_dir)
    transformers = _import_transformers()
    dtype = dtype or load_dtype(device)
    try:
        config = transformers.AutoConfig.from_pretrained(name_or_dir, trust_remote_code=False)
    except Exception as e:
        raise _load_failure(name_or_dir, e) from None
    family_of(config)
    kwargs = {"dtype": dtype, "trust_remote_code": False,
              **({"attn_implementation": attn_implementation} if attn_implementation else {})}
    sharded = _needs_device_map(transformers, config, device, dtype)
    if sharded:
        kwargs["device_map"] = "auto"  # accelerate spreads the layers over the GPUs (and CPU)
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(name_or_dir, **kwargs)
    except Exception as e:
        raise _load_failure(name_or_dir, e) from None
    from training.checkpoint import check_finite_weights
    check_finite_weights(name_or_dir, hf.named_parameters(), "the model's files are damaged; use another copy")
    model = HFCausalLM(hf, name_or_dir, tokenizer_dir=name_or_dir)
    if not sharded:
        model.to(device)
    return model.eval()


def load_tokenizer(model):
    """The model's own tokenizer (AutoTokenizer from its directory or hub name)."""
    transformers = _import_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model.tokenizer_dir, trust_remote_code=False)
    except Exception as e:
        raise UserError(f"no tokenizer for {model.source!r} ({one_line(e, 200)}); pass token ids with --data FILE.bin") from None
    # without tokenizer files transformers builds an empty tokenizer of the config's class instead of failing
    if len(tok) < model.config.vocab_size // 2:
        raise UserError(f"no tokenizer for {model.source!r} (its tokenizer has {len(tok)} of the model's "
                        f"{model.config.vocab_size} ids); pass token ids with --data FILE.bin")
    return tok


def tokenization(model, required):
    """(encode(text) -> ids, decode_one(id) -> str) for an HFCausalLM, (None, None) for this repo's GPT
    (GPT-2 BPE through runtime/tokenizer.py). Without a tokenizer in the model's directory: a UserError when
    `required` (text input), else (None, None) and token ids stand for themselves."""
    if not isinstance(model, HFCausalLM):
        return None, None
    try:
        tok = load_tokenizer(model)
    except UserError:
        if required:
            raise
        return None, None
    return (lambda text: tok(text, add_special_tokens=False)["input_ids"]), (lambda i: tok.decode([int(i)]))
