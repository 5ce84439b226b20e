"""Tiny Hugging Face causal LMs of every supported family, built offline from transformers' config classes,
with a massive activation and a weight outlier planted at a known token, channel and MLP unit."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf import models as hf_models  # noqa: E402

V, C, FF, L, NH = 128, 64, 128, 2, 4
TAU = 100.0
PLANT_TOKEN, PLANT_CHANNEL, PLANT_UNIT, PLANT_IN = 7, 5, 11, 3  # token, h channel, MLP unit, input channel read

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=FF, num_hidden_layers=L,
                                              num_attention_heads=NH, num_key_value_heads=2, max_position_embeddings=64),
    "mistral": lambda: transformers.MistralConfig(vocab_size=V, hidden_size=C, intermediate_size=FF, num_hidden_layers=L,
                                                  num_attention_heads=NH, num_key_value_heads=2, max_position_embeddings=64,
                                                  sliding_window=16),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=V, hidden_size=C, intermediate_size=FF, num_hidden_layers=L,
                                              num_attention_heads=NH, num_key_value_heads=2, max_position_embeddings=64),
    "qwen3": lambda: transformers.Qwen3Config(vocab_size=V, hidden_size=C, intermediate_size=FF, num_hidden_layers=L,
                                              num_attention_heads=NH, num_key_value_heads=2, head_dim=16,
                                              max_position_embeddings=64),
    "phi3": lambda: transformers.Phi3Config(vocab_size=V, hidden_size=C, intermediate_size=FF, num_hidden_layers=L,
                                            num_attention_heads=NH, num_key_value_heads=2, max_position_embeddings=64,
                                            pad_token_id=0),
    "phi": lambda: transformers.PhiConfig(vocab_size=V, hidden_size=C, intermediate_size=FF, num_hidden_layers=L,
                                          num_attention_heads=NH, max_position_embeddings=64),
    "opt": lambda: transformers.OPTConfig(vocab_size=V, hidden_size=C, ffn_dim=FF, num_hidden_layers=L,
                                          num_attention_heads=NH, max_position_embeddings=64, word_embed_proj_dim=C),
    "falcon": lambda: transformers.FalconConfig(vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=NH),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=V, hidden_size=C, intermediate_size=FF, num_hidden_layers=L,
                                                   num_attention_heads=NH, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=C, n_layer=L, n_head=NH, n_positions=64),
    # Gemma: embeddings scaled by sqrt(C), RMSNorm gains 1 + weight; Gemma 2 / 3: a norm after each branch,
    # and Gemma 2's soft-capping of the attention logits (50, its default) and of the output logits (0.5 here:
    # this tiny model's logits are far below its default of 30, which would change nothing)
    "gemma": lambda: transformers.GemmaConfig(vocab_size=V, hidden_size=C, intermediate_size=FF, num_hidden_layers=L,
                                              num_attention_heads=NH, num_key_value_heads=2, head_dim=16,
                                              max_position_embeddings=64),
    "gemma2": lambda: transformers.Gemma2Config(vocab_size=V, hidden_size=C, intermediate_size=FF, num_hidden_layers=L,
                                                num_attention_heads=NH, num_key_value_heads=2, head_dim=16,
                                                max_position_embeddings=64, sliding_window=16,
                                                final_logit_softcapping=0.5),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(vocab_size=V, hidden_size=C, intermediate_size=FF,
                                                         num_hidden_layers=L, num_attention_heads=NH,
                                                         num_key_value_heads=2, head_dim=16,
                                                         max_position_embeddings=64, sliding_window=16,
                                                final_logit_softcapping=0.5),
}
POST_NORM = {"gemma2", "gemma3_text"}  # the branch outputs are norms' outputs
FAMILIES = sorted(CONFIGS)


@torch.no_grad()
def plant(hf):
    """Token PLANT_TOKEN alone carries input channel PLANT_IN; MLP unit PLANT_UNIT of layer 0 reads only
    that channel (its up and gate rows) and its down-projection column writes only h channel PLANT_CHANNEL:
    a weight outlier (the whole column in one entry) and, at that token, a massive x_down and h value."""
    emb = hf.get_input_embeddings().weight
    emb[:, PLANT_IN] = 0.0
    emb[PLANT_TOKEN, PLANT_IN] = 1.0
    for path in ("transformer.wpe", "model.decoder.embed_positions"):  # learned positions must not carry it either
        positions = hf_models.get_path(hf, path)
        if positions is not None:
            positions.weight[:, PLANT_IN] = 0.0
    view = hf_models.ModelView(hf_models.HFCausalLM(hf, "test"), hf_models.family_of(hf.config))
    up = hf_models.weight_of(view.up[0])
    rows = [PLANT_UNIT, PLANT_UNIT + view.d_ff] if view.family.fused_gate_up else [PLANT_UNIT]
    for r in rows:
        up[r] = 0.0
        up[r, PLANT_IN] = 8.0
        if getattr(view.up[0], "bias", None) is not None:
            view.up[0].bias[r] = 0.0
    if view.gate is not None:
        g = hf_models.weight_of(view.gate[0])
        g[PLANT_UNIT] = 0.0
        g[PLANT_UNIT, PLANT_IN] = 8.0
    out = view.attn_branch[0]  # layer 0's attention must not write the channel either (normalized, it would count)
    if not hf_models.is_linear(out):  # Gemma 2 / 3: a norm after the output projection, which writes nothing there
        out = view.blocks[0].self_attn.o_proj
    hf_models.weight_of(out)[PLANT_IN] = 0.0
    if getattr(out, "bias", None) is not None:
        out.bias[PLANT_IN] = 0.0
    down = hf_models.weight_of(view.down[0])
    down[:, PLANT_UNIT] = 0.0
    down[PLANT_CHANNEL, PLANT_UNIT] = 20.0
    if not hf_models.is_linear(view.mlp_branch[0]):
        # Gemma 2 / 3 normalize the MLP output: the planted channel alone at the token, and a gain of 51 there
        # (1 + weight) make it massive; elsewhere the channel gets nothing from the down projection
        down[PLANT_CHANNEL] = 0.0
        down[PLANT_CHANNEL, PLANT_UNIT] = 20.0
        view.mlp_branch[0].weight[PLANT_CHANNEL] = 50.0


def build(family, tmp_path):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    plant(hf)
    path = tmp_path / family
    hf.save_pretrained(path)
    return str(path)


def tokens(n=32, batch=2, seed=0):
    x = torch.randint(8, V, (batch, n), generator=torch.Generator().manual_seed(seed))
    x[:, 9] = PLANT_TOKEN
    x[1, 20] = PLANT_TOKEN
    return x
