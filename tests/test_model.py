"""GPT-2 model: parameter counts, Hugging Face weights, GELU form, utilities."""

import json

import pytest
import torch

from attention_variants import VARIANTS
from common import UserError
from model import GPT, GPTConfig

# the paper's non-embedding counts for GPT-2 124M (bias=False, vocab 50304)
PAPER_COUNTS = {"default": 123_587_328, "fixed_bias": 123_596_544, "context_bias": 123_605_760,
                "attention_bias": 123_605_760, "scaling": 123_698_064, "sigmoid": 123_587_328}


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_counts_gpt2_124m(name):
    with torch.device("meta"):  # no memory, no init time
        model = GPT(GPTConfig(attention=name))
    assert model.get_num_params(non_embedding=True) == PAPER_COUNTS[name]


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 50, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 50) and loss is None
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 50)
    expected = torch.nn.functional.cross_entropy(logits.double().reshape(-1, 50), idx.reshape(-1))
    assert abs(loss.item() - expected.item()) < 1e-5
    with pytest.raises(UserError):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_generate_and_crop():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16)).eval()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=20, top_k=5)
    assert out.shape == (2, 23) and out.max() < 50
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape[0] == 8 and model.config.block_size == 8
    model(torch.zeros(1, 8, dtype=torch.long))


def test_optimizer_groups():
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, attention="attention_bias",
                          bias=True))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, nodecay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and nodecay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    ids = {id(p) for p in nodecay["params"]}
    for n, p in model.named_parameters():
        if n.endswith(("k_bias", "v_bias")) or p.dim() == 1:
            assert id(p) in ids, n
    total = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())


def test_estimate_mfu():
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    if not torch.cuda.is_available():
        assert model.estimate_mfu(1, 1.0) is None  # no known peak on a CPU
    N = model.get_num_params()
    flops = (6 * N + 12 * 1 * 2 * 8 * 8) * 8 * 4
    assert model.estimate_mfu(4, 2.0, peak_flops=1e9) == pytest.approx(flops / 2.0 / 1e9)


def test_gelu_form_is_a_config_field():
    x = torch.linspace(-4, 4, 101)
    exact = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16)).transformer.h[0].mlp.gelu
    tanh = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16,
                         gelu_approximate="tanh")).transformer.h[0].mlp.gelu
    erf_ref = 0.5 * x.double() * (1 + torch.erf(x.double() / 2 ** 0.5))
    tanh_ref = 0.5 * x.double() * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x.double() + 0.044715 * x.double() ** 3)))
    torch.testing.assert_close(exact(x).double(), erf_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(tanh(x).double(), tanh_ref, atol=1e-6, rtol=0)
    with pytest.raises(UserError):
        GPTConfig(gelu_approximate="sigmoid")


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=24, vocab_size=97,
                                  activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make every weight (biases too) non-trivial so a wrong mapping shows
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(path, safe_serialization=True)
    return path, hf


def test_from_pretrained_matches_hugging_face(hf_gpt2_dir):
    path, hf = hf_gpt2_dir
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
    model = GPT.from_pretrained(str(path)).eval()
    assert model.config.gelu_approximate == "tanh" and model.config.bias and model.config.vocab_size == 97
    with torch.no_grad():
        got, _ = model(idx, idx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_from_pretrained_needs_tanh_gelu(hf_gpt2_dir):
    # the same weights with nanoGPT's exact GELU give different logits: the field is load-bearing
    path, hf = hf_gpt2_dir
    model = GPT.from_pretrained(str(path)).eval()
    idx = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        for block in model.transformer.h:
            block.mlp.gelu.approximate = "none"
        wrong, _ = model(idx, idx)
    # the GELU forms differ by at most ~1e-3 per activation; 10x the tolerance of the match above
    assert (wrong - expected).abs().max() > 1e-4, (wrong - expected).abs().max()


@pytest.mark.parametrize("name", [v for v in VARIANTS if v != "default"])
def test_from_pretrained_into_other_variants(hf_gpt2_dir, name):
    path, _ = hf_gpt2_dir
    model = GPT.from_pretrained(str(path), attention=name)
    base = GPT.from_pretrained(str(path))
    sd, base_sd = model.state_dict(), base.state_dict()
    for key, value in base_sd.items():
        torch.testing.assert_close(sd[key], value, atol=0, rtol=0)
    extra = set(sd) - set(base_sd)
    assert len(extra) == {"fixed_bias": 1, "context_bias": 2, "attention_bias": 2, "scaling": 2, "sigmoid": 0}[name] * 2


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(UserError, match="neither a directory"):
        GPT.from_pretrained("gpt3")
    with pytest.raises(UserError, match="config.json"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8}))
    with pytest.raises(UserError, match="safetensors"):
        GPT.from_pretrained(str(tmp_path))
