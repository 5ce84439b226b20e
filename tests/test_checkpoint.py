"""Checkpoints: bit-exact round trips and clear errors for anything else."""

import os
import pickle

import pytest
import torch

from attention_variants import VARIANTS
from model import GPT, GPTConfig
from runtime.cli import UserError
from training.checkpoint import load_checkpoint, load_model, model_args_from, model_from_checkpoint, save_checkpoint


def tiny(name="default", **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, attention=name, **kw))


def write(model, path, **extra):
    save_checkpoint(path, {"model": model.state_dict(), "model_args": model_args_from(model.config),
                           "iter_num": 7, "config": {"lr": 1e-3}, **extra})


@pytest.mark.parametrize("name", VARIANTS)
def test_round_trip_is_bit_exact(tmp_path, name):
    model = tiny(name).eval()
    path = tmp_path / "ckpt.pt"
    write(model, path)
    loaded, ckpt = model_from_checkpoint(str(path))
    assert ckpt["iter_num"] == 7 and ckpt["model_args"]["attention"] == name
    for (n1, a), (n2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx, idx)[0], loaded(idx, idx)[0])
    assert not [f for f in os.listdir(tmp_path) if f != "ckpt.pt"]  # no temp files left behind


def test_wrapper_prefixes_are_stripped(tmp_path):
    model = tiny()
    sd = {"_orig_mod.module." + k: v for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "c.pt", {"model": sd, "model_args": model_args_from(model.config), "iter_num": 0, "config": {}})
    loaded, _ = model_from_checkpoint(str(tmp_path / "c.pt"))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_other_shape_names_the_key(tmp_path):
    model = tiny()
    path = tmp_path / "c.pt"
    write(model, path)
    ckpt = load_checkpoint(path)
    ckpt["model_args"]["n_embd"] = 64  # the dict form is checked as a file's is: model_args against the weights
    with pytest.raises(UserError, match=r"model_args\['n_embd'\] = 64, but the weights have n_embd 32"):
        model_from_checkpoint(ckpt)
    ckpt = load_checkpoint(path)
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(3, 32)
    with pytest.raises(UserError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight.*shape \(3, 32\)"):
        model_from_checkpoint(ckpt)
    ckpt = load_checkpoint(path)
    ckpt["model_args"]["attention"] = "attention_bias"
    with pytest.raises(UserError, match="missing weight .*k_bias"):
        model_from_checkpoint(ckpt)


def test_unknown_variant(tmp_path):
    model = tiny()
    args = model_args_from(model.config)
    args["attention"] = "softmax_one"
    torch.save({"model": model.state_dict(), "model_args": args, "iter_num": 0, "config": {}}, tmp_path / "c.pt")
    with pytest.raises(UserError, match="softmax_one.*known: default"):
        load_checkpoint(tmp_path / "c.pt")
    args["attention"] = "half_attention"  # a run-time variant: the run's variants_file says where it came from
    config = {"variants_file": "tests/runtime_variant.py"}
    torch.save({"model": model.state_dict(), "model_args": args, "iter_num": 0, "config": config}, tmp_path / "c.pt")
    with pytest.raises(UserError, match="registered it from tests/runtime_variant.py .*pass --variants_file "
                                        "tests/runtime_variant.py"):
        load_checkpoint(tmp_path / "c.pt")


def test_truncated_and_foreign_files(tmp_path):
    model = tiny()
    path = tmp_path / "c.pt"
    write(model, path)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "trunc.pt")
    for i, text in enumerate(["hello", "# a markdown file\n\nwith text\n"]):
        (tmp_path / f"text{i}.pt").write_text(text)
        with pytest.raises(UserError, match="not a readable checkpoint"):
            load_checkpoint(tmp_path / f"text{i}.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not an outlier-gpt checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="directory"):
        load_checkpoint(tmp_path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    model = tiny()
    ckpt = {"model": model.state_dict(), "model_args": model_args_from(model.config), "iter_num": 0,
            "config": {"x": _Exploit(marker)}}
    torch.save(ckpt, tmp_path / "evil.pt")  # torch's default pickle protocol
    with open(tmp_path / "evil5.pt", "wb") as f:
        torch.save(ckpt, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    assert not os.path.exists(marker)
    with pytest.raises(UserError, match="could run code"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(UserError):  # refused too, though torch's unpickler stops earlier on protocol 5
        load_checkpoint(tmp_path / "evil5.pt")
    assert not os.path.exists(marker)


def test_save_requires_the_documented_keys(tmp_path):
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path / "c.pt", {"model": {}})


def test_load_model_from_a_checkpoint_or_pretrained(tmp_path):
    model = tiny("scaling").eval()
    write(model, tmp_path / "c.pt")
    loaded, ckpt = load_model(str(tmp_path / "c.pt"), attn_backend="reference")
    assert ckpt["iter_num"] == 7 and not loaded.training and loaded.config.attn_backend == "reference"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError):
        load_model(str(tmp_path / "c.pt"), pretrained="gpt2")
    with pytest.raises(UserError, match="neither a directory nor one of"):
        load_model(pretrained="gpt3")
