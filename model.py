"""GPT-2 in one file, nanoGPT style, with the attention formulation chosen by name.

References:
1) OpenAI's GPT-2 TensorFlow implementation and 2) Hugging Face's transformers GPT-2, whose
parameter names this file keeps so that weights move between this repo, nanoGPT and Hugging Face.
The attention variants live in attention_variants.py, one registry entry each.
"""

import inspect
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

import attention_variants
from runtime.cli import UserError


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.backend = config.attn_backend
        self.sigmoid_bias = config.sigmoid_bias
        self.variant = attention_variants.get_variant(config.attention)
        # key, query, value projections for all heads, in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        attention_variants.add_variant_parameters(self, self.variant, config.n_embd, config.n_head)
        # analysis hook: when set, run the reference path and keep q, k, v and the attention weights
        self.record = False
        self.recorded = {}

    def forward(self, x):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        inputs = attention_variants.variant_inputs(self, self.variant, x)
        dropout_p = self.dropout if self.training else 0.0
        y = attention_variants.attention(self.variant, q, k, v, inputs, backend=self.backend,
                                         sigmoid_bias=self.sigmoid_bias, dropout_p=dropout_p,
                                         return_weights=self.record)
        if self.record:
            y, weights = y
            self.recorded = {name: t.detach() for name, t in {"q": q, "k": k, "v": v, **weights}.items()}
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): re-assemble all heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    attention: str = "default"  # one of attention_variants.VARIANTS
    attn_backend: str = "auto"  # one of attention_variants.BACKENDS
    sigmoid_bias: Optional[float] = None  # sigmoid attention's b; None means -ln(T)
    gelu_approximate: str = "none"  # 'none': exact erf GELU (nanoGPT); 'tanh': OpenAI GPT-2's GELU

    def __post_init__(self):
        attention_variants.get_variant(self.attention)
        attention_variants.check_backend(self.attn_backend)
        if self.gelu_approximate not in ("none", "tanh"):
            raise UserError(f"gelu_approximate must be 'none' or 'tanh', not {self.gelu_approximate!r}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


def config_fields():
    return [f.name for f in fields(GPTConfig)]


# peak dense bf16 tensor-core FLOP/s (no sparsity) by GPU name, for estimate_mfu
PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A10G": 70e12,
                   "L4": 121e12, "L40S": 362e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "B200": 2250e12}

# OpenAI GPT-2 checkpoints: name -> (n_layer, n_head, n_embd)
PRETRAINED = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600)}


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: https://paperswithcode.com/method/weight-tying
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        """Parameter count. The token embedding counts (it is tied to lm_head); the position one
        does not when non_embedding=True, as in nanoGPT and the paper."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        if t > self.config.block_size:
            raise UserError(f"cannot forward a sequence of length {t}: block size is {self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=device)  # (t)

        tok_emb = self.transformer.wte(idx)  # (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)  # (b, t, vocab_size)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        else:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :])  # (b, 1, vocab_size); list index keeps the time dim
            loss = None
        return logits, loss

    def crop_block_size(self, block_size):
        """Model surgery to decrease the block size, e.g. to use GPT-2 (1024) with a smaller context."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_dir, attention="default", **overrides):
        """OpenAI GPT-2 weights (a name in PRETRAINED, or a local Hugging Face GPT-2 directory) in any
        variant; the variant's own parameters keep their initial values. Only `dropout`,
        `attn_backend` and `sigmoid_bias` may be overridden: the rest is fixed by the weights."""
        allowed = {"dropout", "attn_backend", "sigmoid_bias"}
        if set(overrides) - allowed:
            raise UserError(f"from_pretrained can only override {sorted(allowed)}, not {sorted(set(overrides) - allowed)}")
        directory = _pretrained_directory(name_or_dir)
        hf_config, hf_state = _read_hf_gpt2(directory)
        from training.checkpoint import TIED_WEIGHTS, check_finite_weights, check_tied  # checkpoint imports this module
        check_finite_weights(directory, hf_state.items(), "the model's files are damaged; use another copy")
        check_tied(directory, hf_state, TIED_WEIGHTS)
        config = GPTConfig(
            n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=hf_config["n_embd"],
            block_size=hf_config.get("n_positions", 1024), vocab_size=hf_config.get("vocab_size", 50257),
            bias=True,  # OpenAI GPT-2 has biases everywhere
            gelu_approximate=_gelu_form(hf_config.get("activation_function", "gelu_new")),
            attention=attention, **overrides)
        print(f"loading {name_or_dir} into a GPT-2 with {attention} attention "
              f"(n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd})")
        model = GPT(config)
        sd = model.state_dict()
        # Hugging Face stores these as Conv1D (in, out); nn.Linear wants (out, in)
        transposed = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
        with torch.no_grad():
            for key, value in hf_state.items():
                if key not in sd:
                    raise UserError(f"{directory}: unexpected GPT-2 weight {key!r}")
                value = value.t() if key.endswith(transposed) else value
                if value.shape != sd[key].shape:
                    raise UserError(f"{directory}: weight {key} has shape {tuple(value.shape)}, "
                                    f"expected {tuple(sd[key].shape)}")
                sd[key].copy_(value)
        variant = attention_variants.get_variant(attention)
        missing = {k for k in set(sd) - set(hf_state) - {"lm_head.weight"} if not attention_variants.owns_key(variant, k)}
        if missing:
            raise UserError(f"{directory}: GPT-2 weights are missing {sorted(missing)[:5]}")
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        # nanoGPT's rule, as in the paper authors' code: every tensor with >= 2 dims (matmul weights,
        # embeddings, the (n_head, head_dim) sink vectors k'/v') decays; biases and LayerNorm gains do
        # not. A variant's registry entry may keep one of its own parameters out of decay.
        no_decay = attention_variants.no_decay_names(attention_variants.get_variant(self.config.attention))

        def decays(name, p):
            return p.dim() >= 2 and attention_variants.variant_param_name(name) not in no_decay

        decay_params = [p for n, p in param_dict.items() if decays(n, p)]
        nodecay_params = [p for n, p in param_dict.items() if not decays(n, p)]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        print(f"num decayed parameter tensors: {len(decay_params)}, with {sum(p.numel() for p in decay_params):,} parameters")
        print(f"num non-decayed parameter tensors: {len(nodecay_params)}, with {sum(p.numel() for p in nodecay_params):,} parameters")
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == "cuda"
        extra_args = dict(fused=True) if use_fused else dict()
        optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
        print(f"using fused AdamW: {use_fused}")
        return optimizer

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=None):
        """Model FLOPs utilization: achieved FLOP/s over the GPU's peak dense bf16 FLOP/s.

        Returns None when the peak is unknown (CPU, or a GPU missing from PEAK_BF16_FLOPS): pass
        `peak_flops` explicitly then. FLOPs per token follow the PaLM paper, Appendix B.
        """
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        peak_flops = peak_flops or peak_bf16_flops()
        if peak_flops is None or dt <= 0:
            return None
        return flops_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Complete the sequence idx (LongTensor of shape (b,t)) max_new_tokens times."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def peak_bf16_flops():
    """Peak dense bf16 FLOP/s of the current CUDA device, or None if unknown / no GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


# ----------------------------------------------------------------------------------------------
# reading Hugging Face GPT-2 checkpoints (no `transformers` needed)

def _gelu_form(activation_function):
    forms = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
    if activation_function not in forms:
        raise UserError(f"unsupported GPT-2 activation_function {activation_function!r}; known: {sorted(forms)}")
    return forms[activation_function]


def _pretrained_directory(name_or_dir):
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if name_or_dir not in PRETRAINED:
        raise UserError(f"{name_or_dir!r} is neither a directory nor one of {', '.join(PRETRAINED)}")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name_or_dir, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:
        raise UserError(f"cannot download {name_or_dir} from the Hugging Face hub ({type(e).__name__}); "
                        f"without network, pass a local directory holding config.json and model.safetensors") from None


def _read_hf_gpt2(directory):
    """(config dict, state dict in this repo's names) of a Hugging Face GPT-2 directory."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{directory} has no config.json: not a Hugging Face model directory")
    with open(config_path) as f:
        hf_config = json.load(f)
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{directory} holds a {hf_config.get('model_type')!r} model, not GPT-2")
    safetensors_path = os.path.join(directory, "model.safetensors")
    bin_path = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file
        state = load_file(safetensors_path)
    elif os.path.isfile(bin_path):
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{directory} has neither model.safetensors nor pytorch_model.bin")
    ours = {}
    for key, value in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal-mask buffers of old transformers versions, not weights
        key = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        ours[key] = value.float()
    return hf_config, ours
