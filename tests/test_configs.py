"""The paper configs follow the authors' reference code (nanoGPT's recipe); config/recipe_2b.py is the
"about 2B tokens" reading of the paper's text, applied on top of any variant config."""

import glob
import os

import pytest

import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = ("default", "fixed_bias", "context_bias", "attention_bias", "scaling", "sigmoid")


def variant_configs():
    """The six paper configs plus any later variant config built on config/default.py."""
    names = set(PAPER)
    for path in glob.glob(os.path.join(REPO, "config", "*.py")):
        with open(path, encoding="utf-8") as f:
            if "from config.default import" in f.read():
                names.add(os.path.basename(path)[:-3])
    return sorted(names)


@pytest.mark.parametrize("name", variant_configs())
def test_variant_configs_use_the_authors_recipe(name, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg, _ = train.parse_config([f"config/{name}.py"])
    # 12 sequences x 1024 tokens x 40 micro-steps (nanoGPT's GPT-2 recipe), written out by hand
    assert cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps == 491_520
    assert (cfg.max_iters, cfg.lr_decay_iters, cfg.warmup_iters) == (50_000, 600_000, 2000)
    assert cfg.attention == name and cfg.out_dir == f"out/{name}"
    # at iteration 50,000 the cosine schedule has decayed by under 2%: 6e-5 + 5.4e-4 * (1 + cos(pi * 48/598)) / 2
    assert train.get_lr(cfg, 50_000) == pytest.approx(5.915e-4, rel=1e-3)


def test_recipe_2b_overlay_keeps_the_variant(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg, origin = train.parse_config(["config/scaling.py", "config/recipe_2b.py", "--out_dir=out/scaling_2b"])
    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * cfg.max_iters
    assert tokens == 2_048_000_000 and cfg.lr_decay_iters == cfg.max_iters == 50_000
    assert cfg.attention == "scaling" and cfg.out_dir == "out/scaling_2b" and cfg.n_layer == 12
    assert train.get_lr(cfg, 50_000) == pytest.approx(cfg.min_lr)
    assert origin["batch_size"] == "config/recipe_2b.py" and origin["attention"] == "config/scaling.py"
