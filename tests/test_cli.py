"""runtime.cli: one option spelling in --help, both on the command line; usage errors as one line."""

import re

import pytest

from conftest import first_party_sources
from runtime.cli import ArgumentParser, UserError
from training.config import parse_config


def parser():
    p = ArgumentParser(prog="tool.py")
    p.add_argument("--num_seqs", type=int)
    p.add_argument("--seq_lens", nargs="+", type=int)
    p.add_argument("--text")
    p.add_argument("rest", nargs="*")
    return p


def test_hyphens_and_underscores_name_the_same_option():
    args = parser().parse_args(["--num-seqs", "3", "--seq_lens", "1", "2", "--text=--not-an-option"])
    assert (args.num_seqs, args.seq_lens, args.text) == (3, [1, 2], "--not-an-option")
    assert parser().parse_args(["--num-s=4"]).num_seqs == 4  # an unambiguous prefix, in either spelling
    assert parser().parse_args(["--", "--num-seqs"]).rest == ["--num-seqs"]  # after --, values stay as typed


def test_help_lists_one_spelling(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--num_seqs" in out and "--num-seqs" not in out


def test_an_unknown_option_is_one_line():
    with pytest.raises(UserError, match=r"^unrecognized arguments: --num-sequences \(python tool.py --help lists"):
        parser().parse_args(["--num-sequences", "3"])


def test_train_config_takes_both_spellings():
    cfg, origin = parse_config(["--max-iters=7", "--learning_rate=0.01"])
    assert (cfg.max_iters, cfg.learning_rate) == (7, 0.01) and origin["max_iters"] == "command line"


def test_every_script_uses_the_shared_parser():
    """Every first-party argument parser is runtime.cli.ArgumentParser: one-line usage errors, both spellings."""
    plain = [path for path in first_party_sources() if not path.endswith("runtime/cli.py")
             and re.search(r"argparse\.ArgumentParser\(", open(path, encoding="utf-8").read())]
    assert plain == []
