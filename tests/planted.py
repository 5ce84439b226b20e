"""Tiny models of this repo's GPT with outliers planted where a test can find them, and the tiny
checkpoints other tests evaluate: shared by the analysis, golden, compression and benchmark tests."""

import torch

from model import GPT, GPTConfig
from training.checkpoint import model_args_from, save_checkpoint

V, T, C, L = 64, 32, 32, 4
SPECIAL, E0, K_UNIT, CH, BIG = 63, 3, 7, 11, 40.0
POSITIONS = (5, 17)
SPECIAL2, E1, K_UNIT2 = 62, 4, 9  # a second unit: fires on SPECIAL2 but writes nothing (x_down outlier only)


def planted_model():
    """Massive activation planted in layer 1: MLP unit K_UNIT fires only on token SPECIAL (through an
    embedding dimension E0 that only SPECIAL uses) and column K_UNIT of layer 1's W_down writes BIG
    into channel CH only."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=2, n_embd=C, bias=True)).eval()
    with torch.no_grad():
        b0, b1 = m.transformer.h[0], m.transformer.h[1]
        for token, dim, unit in ((SPECIAL, E0, K_UNIT), (SPECIAL2, E1, K_UNIT2)):
            m.transformer.wte.weight[:, dim] = 0
            m.transformer.wpe.weight[:, dim] = 0
            m.transformer.wte.weight[token, dim] = 0.1
            for lin in (b0.attn.c_proj, b0.mlp.c_proj):
                lin.weight[dim] = 0
                lin.bias[dim] = 0
            b1.mlp.c_fc.weight[unit] = 0
            b1.mlp.c_fc.weight[unit, dim] = 5.0
            b1.mlp.c_fc.bias[unit] = -3.0
            b1.mlp.c_proj.weight[:, unit] = 0
        b1.mlp.c_proj.weight[CH, K_UNIT] = BIG
    return m


def planted_batch(n=3):
    g = torch.Generator().manual_seed(1)
    X = torch.randint(0, SPECIAL2, (n, T), generator=g)
    for p in POSITIONS:
        X[:, p] = SPECIAL
    return X, torch.roll(X, -1, 1)


T3, C3 = 64, 64  # T x C = 4096: the default tau = 1000 x mean|h| can be met by one activation per sequence
FC_W = 100.0  # the unit's x_down (~200) must exceed 1000 x mean|x_down| over 64 x 256 GELU outputs (~0.07)


def planted_all_model():
    """One model with the three outlier types planted, for the default rules (n_layer 3, n_head 2):
    the first position (any token) fires MLP unit K_UNIT of layer 1 through position-embedding dimension E0,
    and column K_UNIT of layer 1's W_down writes BIG into channel CH only: a massive activation
    (layers 1-2) and a down-projection weight outlier (the column holds nothing else). In layer 2 every
    head's query is constant and its key reads channel CH, so all heads attend to token 0: a sink."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=T3, vocab_size=V, n_layer=3, n_head=2, n_embd=C3, bias=True)).eval()
    hs = C3 // 2
    with torch.no_grad():
        b0, b1, b2 = m.transformer.h
        m.transformer.wte.weight[:, E0] = 0
        m.transformer.wpe.weight[:, E0] = 0
        m.transformer.wpe.weight[0, E0] = 0.1
        for lin in (b0.attn.c_proj, b0.mlp.c_proj):
            lin.weight[E0] = 0
            lin.bias[E0] = 0
        b1.mlp.c_fc.weight[K_UNIT] = 0
        b1.mlp.c_fc.weight[K_UNIT, E0] = FC_W
        b1.mlp.c_fc.bias[K_UNIT] = -FC_W  # fires where ln_2 gives E0 above 1: position 0 only (about 3 there)
        b1.mlp.c_proj.weight[:, K_UNIT] = 0
        b1.mlp.c_proj.weight[CH, K_UNIT] = BIG
        qkv = b2.attn.c_attn
        for h in range(2):
            qkv.weight[h * hs] = 0
            qkv.bias[h * hs] = 10.0
            qkv.weight[C3 + h * hs] = 0
            qkv.weight[C3 + h * hs, CH] = 10.0
            qkv.bias[C3 + h * hs] = -5.0
    return m


def planted_all_batch(n=4):
    return torch.randint(0, V, (n, T3), generator=torch.Generator().manual_seed(5))


# tiny checkpoints for the compression and benchmark tests
VOCAB, BLOCK = 256, 32


def tiny_model(attention="default", vocab=VOCAB, gain=1.0, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=BLOCK, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, attention=attention))
    if gain != 1.0:  # larger weights: sharper, more input-sensitive predictions than the 0.02 init
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(gain)
    return model.eval()


def save_tiny(path, model, iter_num=100):
    save_checkpoint(path, {"model": model.state_dict(), "model_args": model_args_from(model.config),
                           "iter_num": iter_num, "config": {"note": "test"}})
    return str(path)


# The paper's formulas, which the planted-model tests were written for (thresholds given explicitly); the
# default rules have their own tests.
PAPER_RULES = {"weight_rule": "paper", "attention_rule": "paper"}


def block_outputs(model, X):
    """Independent forward: layer outputs h_l and branch outputs by calling the modules directly, float64 copies."""
    tr = model.transformer
    x = tr.wte(X) + tr.wpe(torch.arange(X.shape[1]))
    hs, attn, mlp = [], [], []
    for block in tr.h:
        a = block.attn(block.ln_1(x))
        x = x + a
        mo = block.mlp(block.ln_2(x))
        x = x + mo
        hs.append(x.double()), attn.append(a.double()), mlp.append(mo.double())
    return hs, attn, mlp
