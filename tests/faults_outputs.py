"""Fault scenarios of tests/FAULTS.md: output locations, checkpoint contents, run directory and data
files, arguments, config files, wrong behaviour (rounds A-G)."""

import json
import os
import shutil

import numpy as np
import torch

import analyze_outliers
import compress_eval
import prepare_data
import train
from conftest import needs_tokenizer
from faults_common import (TINY, VOCAB, analyze_args, cli, eval_data, must_not_run, refused_by_analyze,
                           refused_by_compress, resume_with, run_copy, save_model, scenario, slow_scenario, tiny_model,
                           train_fresh, train_with_config, train_with_meta, tree_bytes)
from runtime import token_data as data

# ------------------------------------------------------------------------------------------ output locations (A, B)
# Scripts write only their own files into an output directory and replace only what they wrote there
# (outputs.output_set and its manifest); everything else there is byte-identical afterwards.

@slow_scenario
def analyze_out_is_run_dir(tmp_path, capsys, trained, **_):
    out, _ = run_copy(trained, tmp_path)
    before = tree_bytes(out)
    code, err = cli(analyze_outliers.main, analyze_args(os.path.join(out, "ckpt.pt"), tmp_path, out), capsys)
    after = tree_bytes(out)
    assert {k: after[k] for k in before} == before  # the run's checkpoint, snapshots and logs untouched
    assert "report.md" in after and "outliers.json" in after
    return code, err, {}


@scenario
def analyze_out_empty(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    argv = analyze_args(ckpt, tmp_path, "")
    monkeypatch.chdir(tmp_path)
    before = tree_bytes(tmp_path)
    monkeypatch.setattr(analyze_outliers, "model_and_info", must_not_run)
    code, err = cli(analyze_outliers.main, argv, capsys)
    assert tree_bytes(tmp_path) == before
    return code, err, {}


@scenario
def analyze_out_root(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(analyze_outliers, "model_and_info", must_not_run)
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, "/"), capsys)
    return code, err, {}


@scenario
def analyze_out_is_input(tmp_path, capsys, monkeypatch, **_):
    from safetensors.torch import save_file
    hf_dir = tmp_path / "hf_gpt2"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16,
                                                    "n_positions": 32, "vocab_size": VOCAB}))
    save_file({"wte.weight": torch.zeros(VOCAB, 16)}, str(hf_dir / "model.safetensors"))
    before = tree_bytes(hf_dir)
    monkeypatch.setattr(analyze_outliers, "model_and_info", must_not_run)
    code, err = cli(analyze_outliers.main, ["--pretrained", hf_dir, "--data", eval_data(tmp_path), "--out", hf_dir,
                                            "--no_progress"], capsys)
    assert tree_bytes(hf_dir) == before
    return code, err, {"out": str(hf_dir)}


@scenario
def analyze_out_foreign_file(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "notes"
    out.mkdir()
    (out / "report.md").write_text("my own notes\n")
    monkeypatch.setattr(analyze_outliers, "model_and_info", must_not_run)
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out), capsys)
    assert tree_bytes(out) == {"report.md": b"my own notes\n"}
    return code, err, {"out": str(out)}


@slow_scenario
def analyze_compare_into_analysis(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "o"
    assert cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out), capsys)[0] == 0
    before = tree_bytes(out)
    other = save_model(tmp_path / "other.pt", tiny_model(1))
    code, err = cli(analyze_outliers.main, ["--compare", ckpt, other, "--data", eval_data(tmp_path), "--out", out,
                                            "--no_progress", "--num_seqs", "1", "--seq_len", "8"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"out": str(out)}


@slow_scenario
def analyze_replaces_its_own(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "o"
    assert cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out), capsys)[0] == 0
    (out / "my_notes.txt").write_text("kept\n")
    first = json.loads((out / "outliers.json").read_text())
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out) + ["--seed", "5"], capsys)
    assert (out / "my_notes.txt").read_text() == "kept\n"
    assert json.loads((out / "outliers.json").read_text())["data"]["seed"] == 5 != first["data"]["seed"]
    return code, err, {}


@scenario
def compress_results_is_dir(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "results"
    argv = [ckpt, "--data", eval_data(tmp_path), "--out", out, "--no_progress", "--methods", "fp"]
    assert cli(compress_eval.main, argv, capsys)[0] == 0
    (out / "results.md").unlink()
    (out / "results.md").mkdir()
    before = tree_bytes(out)
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, argv, capsys)
    assert tree_bytes(out) == before  # results.json and results.csv of the first run, untouched
    return code, err, {"out": str(out)}


@scenario
def compress_out_empty(tmp_path, capsys, monkeypatch, **_):
    ckpt, val = save_model(tmp_path / "ckpt.pt", tiny_model()), eval_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = tree_bytes(tmp_path)
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, "--data", val, "--out", "", "--no_progress"], capsys)
    assert tree_bytes(tmp_path) == before
    return code, err, {}


@scenario
def compress_out_foreign_file(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.csv").write_text("a,b\n1,2\n")
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", out, "--no_progress"], capsys)
    assert tree_bytes(out) == {"results.csv": b"a,b\n1,2\n"}
    return code, err, {"out": str(out)}


@scenario
def prepare_meta_is_dir(tmp_path, capsys, monkeypatch, **_):
    needs_tokenizer()
    src = tmp_path / "in.txt"
    src.write_text("some text\n" * 50)
    out = tmp_path / "data"
    out.mkdir()
    (out / "meta.json").mkdir()
    (out / "train.bin").write_bytes(b"\0\0")
    monkeypatch.setattr(prepare_data, "_load_splits", must_not_run)
    code, err = cli(prepare_data.main, ["--dataset", "text", "--input", src, "--out_dir", out, "--num_proc", "1",
                                        "--overwrite"], capsys)
    assert tree_bytes(out) == {"train.bin": b"\0\0"}
    return code, err, {"out": str(out)}


@scenario
def prepare_out_is_input(tmp_path, capsys, monkeypatch, **_):
    needs_tokenizer()
    out = tmp_path / "data"
    out.mkdir()
    src = out / "train.bin"  # a text file that happens to carry an output's name
    src.write_text("some text\n" * 50)
    monkeypatch.setattr(prepare_data, "_load_splits", must_not_run)
    code, err = cli(prepare_data.main, ["--dataset", "text", "--input", src, "--out_dir", out, "--num_proc", "1",
                                        "--overwrite"], capsys)
    assert src.read_text() == "some text\n" * 50
    return code, err, {"out": str(out), "input": str(src)}


@scenario
def reproduce_out_foreign_report(tmp_path, capsys, monkeypatch, **_):
    import reproduce
    out = tmp_path / "repro"
    out.mkdir()
    (out / "REPORT.md").write_text("someone else's report\n")
    monkeypatch.setattr(reproduce, "execute", must_not_run)
    code, err = cli(reproduce.main, ["--scale", "tiny", "--variants", "default", "--out", out], capsys)
    assert tree_bytes(out) == {"REPORT.md": b"someone else's report\n"}
    return code, err, {"out": str(out)}


# ------------------------------------------------------------------------------------------ checkpoint contents (C)

@scenario
def ckpt_model_is_list(tmp_path, capsys, **_):
    return refused_by_analyze(tmp_path, capsys, lambda c: c.update(model=list(c["model"].values())))


@scenario
def ckpt_weight_is_int(tmp_path, capsys, **_):
    return refused_by_compress(tmp_path, capsys, lambda c: c["model"].update({"transformer.h.0.ln_1.weight": 3}))


@scenario
def ckpt_weight_is_dict(tmp_path, capsys, **_):
    return refused_by_analyze(tmp_path, capsys, lambda c: c["model"].update({"transformer.h.1.mlp.c_fc.weight": {}}))


@scenario
def ckpt_weight_on_meta(tmp_path, capsys, **_):
    return refused_by_compress(tmp_path, capsys, lambda c: c["model"].update(
        {"transformer.h.0.attn.c_proj.weight": torch.empty(32, 32, device="meta")}))


@scenario
def ckpt_n_layer_none(tmp_path, capsys, **_):
    return refused_by_analyze(tmp_path, capsys, lambda c: c["model_args"].update(n_layer=None))


@scenario
def ckpt_n_embd_huge(tmp_path, capsys, **_):
    return refused_by_compress(tmp_path, capsys, lambda c: c["model_args"].update(n_embd=2**20))


@scenario
def ckpt_n_embd_mismatch(tmp_path, capsys, **_):
    return refused_by_analyze(tmp_path, capsys, lambda c: c["model_args"].update(n_embd=64))


@scenario
def ckpt_dropout_text(tmp_path, capsys, **_):
    return refused_by_compress(tmp_path, capsys, lambda c: c["model_args"].update(dropout="0.1"))


@scenario
def ckpt_iter_num_text(tmp_path, capsys, **_):
    return refused_by_analyze(tmp_path, capsys, lambda c: c.update(iter_num="3"))


@scenario
def resume_optimizer_empty(tmp_path, capsys, trained, **_):
    return resume_with(tmp_path, capsys, trained, lambda c: c.update(optimizer={}))


@scenario
def resume_optimizer_wrong_shape(tmp_path, capsys, trained, **_):
    def edit(c):
        c["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 3)
    return resume_with(tmp_path, capsys, trained, edit)


@scenario
def resume_optimizer_groups(tmp_path, capsys, trained, **_):
    def edit(c):
        c["optimizer"]["param_groups"][0]["params"] = c["optimizer"]["param_groups"][0]["params"][:-1]
    return resume_with(tmp_path, capsys, trained, edit)


@scenario
def resume_sampler_bad(tmp_path, capsys, trained, **_):
    return resume_with(tmp_path, capsys, trained, lambda c: c["sampler"].update(generator=torch.zeros(7)))


@scenario
def resume_rng_bad(tmp_path, capsys, trained, **_):
    return resume_with(tmp_path, capsys, trained, lambda c: c["rng"][0].update(numpy=["MT19937", [1, 2], 0, 0, 0.0]))


@scenario
def resume_rng_not_list(tmp_path, capsys, trained, **_):
    return resume_with(tmp_path, capsys, trained, lambda c: c.update(rng={"python": None}))


# ------------------------------------------------------------------------------------------ run directory and data files (D)

@scenario
def train_meta_truncated(tmp_path, capsys, trained, **_):
    return train_with_meta(tmp_path, capsys, trained, '{"vocab_size": 6')


@scenario
def train_meta_vocab_text(tmp_path, capsys, trained, **_):
    return train_with_meta(tmp_path, capsys, trained, '{"vocab_size": "lots"}')


@scenario
def train_meta_vocab_null(tmp_path, capsys, trained, **_):
    return train_with_meta(tmp_path, capsys, trained, '{"vocab_size": null}')


@scenario
def train_meta_is_dir(tmp_path, capsys, trained, **_):
    data_dir = tmp_path / "data"
    shutil.copytree(trained["data"], data_dir)
    (data_dir / "meta.json").unlink()
    (data_dir / "meta.json").mkdir()
    code, err = cli(train.main, TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--max_iters=2"],
                    capsys)
    return code, err, {"meta": str(data_dir / "meta.json")}


@scenario
def resume_run_json_truncated(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    path = os.path.join(out, "run.json")
    with open(path, "r+") as f:
        f.truncate(40)
    before = tree_bytes(out)
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"path": path}


@scenario
def resume_log_is_dir(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    log = os.path.join(out, "log.jsonl")
    os.remove(log)
    os.mkdir(log)
    before = tree_bytes(out)
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"log": log}


@scenario
def train_out_dir_empty(tmp_path, capsys, trained, monkeypatch, **_):
    monkeypatch.chdir(tmp_path)
    code, err = cli(train.main, TINY + [f"--data_dir={trained['data']}", "--out_dir=", "--max_iters=2"], capsys)
    assert os.listdir(tmp_path) == []
    return code, err, {}


@scenario
def analyze_compare_log_is_dir(tmp_path, capsys, **_):
    run = tmp_path / "run"
    run.mkdir()
    ckpt = save_model(run / "ckpt.pt", tiny_model())
    (run / "log.jsonl").mkdir()
    other = save_model(tmp_path / "other.pt", tiny_model(1))
    code, err = cli(analyze_outliers.main, ["--compare", ckpt, other, "--data", eval_data(tmp_path), "--out",
                                            tmp_path / "cmp", "--no_progress", "--num_seqs", "1", "--seq_len", "8"],
                    capsys)
    assert not (tmp_path / "cmp").exists()
    return code, err, {"log": str(run / "log.jsonl")}


# ------------------------------------------------------------------------------------------ arguments (E)

@scenario
def train_seed_huge(tmp_path, capsys, trained, **_):
    code, err = train_fresh(tmp_path, capsys, trained, f"--seed={2**70}", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {"seed": 2**70}


@scenario
def train_seed_negative(tmp_path, capsys, trained, **_):
    code, err = train_fresh(tmp_path, capsys, trained, "--seed=-3", "--max_iters=2")
    return code, err, {}


@scenario
def train_batch_huge(tmp_path, capsys, trained, **_):
    code, err = train_fresh(tmp_path, capsys, trained, f"--batch_size={2**40}", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {}


@scenario
def analyze_seed_negative(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(analyze_outliers, "model_and_info", must_not_run)
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, tmp_path / "o") + ["--seed", "-1"], capsys)
    return code, err, {}


@scenario
def compress_seed_negative(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)  # not fp, not sparse50: nothing runs
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o", "--no_progress",
                                         "--methods", "fp,sparse50,wanda", "--calib_data", eval_data(tmp_path),
                                         "--seed", "-1"], capsys)
    return code, err, {}


@scenario
def analyze_num_seqs_huge(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, tmp_path / "o") + ["--num_seqs", str(10**12)],
                    capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"data": eval_data(tmp_path)}


@scenario
def compress_calib_windows_huge(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o", "--no_progress",
                                         "--methods", "fp,wanda", "--calib_data", eval_data(tmp_path),
                                         "--calib_windows", str(10**11)], capsys)
    return code, err, {}


@scenario
def compress_calib_too_short(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    short = tmp_path / "short.bin"
    data.write_tokens(short, np.arange(10) % VOCAB)
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o", "--no_progress",
                                         "--methods", "fp,sparse50,wanda", "--calib_data", short], capsys)
    return code, err, {}


@scenario
def train_device_mps(tmp_path, capsys, trained, **_):
    code, err = train_fresh(tmp_path, capsys, trained, "--device=mps", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {}


@scenario
def compress_device_mps(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", tmp_path / "o", "--no_progress",
                                         "--device", "mps"], capsys)
    return code, err, {}


@scenario
def analyze_device_mps(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, tmp_path / "o") + ["--device", "mps"], capsys)
    return code, err, {}


@scenario
def reproduce_device_mps(tmp_path, capsys, monkeypatch, **_):
    import reproduce
    monkeypatch.setattr(reproduce, "execute", must_not_run)
    code, err = cli(reproduce.main, ["--scale", "tiny", "--variants", "default", "--out", tmp_path / "r",
                                     "--device", "mps"], capsys)
    assert not (tmp_path / "r").exists()
    return code, err, {}


@scenario
def train_device_gpu_index(tmp_path, capsys, trained, monkeypatch, **_):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, err = train_fresh(tmp_path, capsys, trained, "--device=cuda:3", "--max_iters=2")
    return code, err, {}


# ------------------------------------------------------------------------------------------ config files (F)

@scenario
def train_config_not_utf8(tmp_path, capsys, trained, **_):
    return train_with_config(tmp_path, capsys, trained, b"batch_size = 4  # caf\xff\n")


@scenario
def train_config_sys_exit(tmp_path, capsys, trained, **_):
    return train_with_config(tmp_path, capsys, trained, b"import sys\nsys.exit(5)\n")


# ------------------------------------------------------------------------------------------ wrong behaviour (G)

@scenario
def train_eval_only_into_run(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    before = tree_bytes(out)
    code, err = cli(train.main, args + ["--eval_only=True"], capsys)  # init_from=scratch: random weights
    assert tree_bytes(out) == before
    return code, err, {"out": out}
