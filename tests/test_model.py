"""GPT-2 model: parameter counts, Hugging Face weights, GELU form, utilities."""

import json

import pytest
import torch

import attention_variants
from attention_variants import VARIANTS, get_variant
from model import GPT, GPTConfig
from runtime.cli import UserError


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_counts_gpt2_124m(name):
    """Each registry entry states its count at GPT-2 124M (the paper's 123.59M / 123.70M for default /
    scaling; 130,665,216 for gated); the model built from the entry must have exactly that many."""
    with torch.device("meta"):  # no memory, no init time
        model = GPT(GPTConfig(attention=name))
    assert model.get_num_params(non_embedding=True) == get_variant(name).n_params_124m


def test_paper_parameter_counts():
    # the numbers the paper (and the gated-attention issue) give, written out independently
    assert get_variant("default").n_params_124m == 123_587_328  # "123.59M"
    assert get_variant("scaling").n_params_124m == 123_698_064  # "123.70M"
    assert get_variant("gated").n_params_124m == 123_587_328 + 12 * 768 * 768


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


@pytest.mark.parametrize("name", ["attention_bias", "scaling", "gated"])
def test_optimizer_groups(name):
    """nanoGPT's rule as in the paper authors' code: every matrix decays, k'/v' (n_head, d) included;
    biases and LayerNorm gains do not."""
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, attention=name,
                          bias=True))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, nodecay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and nodecay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    for n, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() == 2), n
        if n.endswith(("k_bias", "v_bias", "scale_proj.weight", "gate_proj.weight")):
            assert id(p) in decayed, n
    total = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())


def test_registry_entry_can_keep_a_parameter_out_of_decay(monkeypatch):
    base = get_variant("attention_bias")
    no_decay_sink = attention_variants.VariantParam("k_bias", base.params[0].build, "k'", weight_decay=False)
    entry = attention_variants.AttentionVariant(**{**base.__dict__, "name": "nd_sink",
                                                   "params": (no_decay_sink, base.params[1])})
    monkeypatch.setitem(attention_variants.REGISTRY, "nd_sink", entry)
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16, attention="nd_sink"))
    decay, _ = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    decayed = {id(p) for p in decay["params"]}
    attn = model.transformer.h[0].attn
    assert id(attn.k_bias) not in decayed and id(attn.v_bias) in decayed


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
    variant = get_variant(name)
    assert extra == {k for k in sd if attention_variants.owns_key(variant, k)}
    assert bool(extra) == bool(variant.params)
    # the pretrained weights work through the variant: a forward gives finite logits
    idx = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model.eval()(idx, idx)[0]).all()


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(UserError, match="neither a directory"):
        GPT.from_pretrained("gpt3")
    with pytest.raises(UserError, match="config.json"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8}))
    with pytest.raises(UserError, match="safetensors"):
        GPT.from_pretrained(str(tmp_path))


def test_checkpoints_of_the_six_paper_variants_still_load():
    """tests/fixtures/six_variants_v1.pt was written by the repo before the registry refactor (tiny
    models, every weight perturbed, with their logits): parameter names are part of the checkpoint
    format, and the loaded models must compute the same function on every backend."""
    from pathlib import Path

    from training.checkpoint import load_state_dict_checked

    fixture = torch.load(Path(__file__).parent / "fixtures" / "six_variants_v1.pt", weights_only=True)
    assert sorted(fixture["models"]) == sorted(VARIANTS[:6])
    for name, saved in fixture["models"].items():
        for backend in ("reference", "sdpa"):
            model = GPT(GPTConfig(**{**saved["model_args"], "attn_backend": backend})).eval()
            load_state_dict_checked(model, saved["model"], f"fixture {name}")
            with torch.no_grad():
                logits, _ = model(fixture["idx"], fixture["idx"])
            torch.testing.assert_close(logits, saved["logits"], atol=1e-5, rtol=1e-5, msg=f"{name} {backend}")
