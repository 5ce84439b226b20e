"""Fault scenarios of tests/FAULTS.md: the review of rounds A-G, and round 3 (issue 26)."""

import errno
import importlib.util
import json
import os
import shutil
import sys

import pytest
import torch

import analyze_outliers
import compress_eval
import prepare_data
import train
from conftest import REPO_ROOT, needs_tokenizer
from faults_common import (TINY, VOCAB, analyze_args, cli, eval_data, make_data, must_not_run, no_temporaries,
                           refused_by_analyze, refused_by_compress, resume_with, run_copy, save_model, scenario,
                           slow_scenario, tiny_model, token_stream, train_fresh, train_with_config, train_with_meta,
                           tree_bytes)
from model import GPT, GPTConfig
from runtime import files, outputs
from training.checkpoint import load_checkpoint, model_args_from, save_checkpoint

# ------------------------------------------------------------------------------------------ review of the above

@scenario
def outputs_manifest_escape(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / outputs.OUTPUTS_MANIFEST).write_text(json.dumps(
        {"format": "outlier-gpt-outputs", "version": 1, "tools": {"compress_eval.py": {"files": ["../victim.txt"]}}}))
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, "--data", eval_data(tmp_path), "--out", out, "--no_progress"], capsys)
    assert victim.read_text() == "precious\n"
    return code, err, {"out": str(out), "manifest": str(out / outputs.OUTPUTS_MANIFEST)}


@slow_scenario
def analyze_own_output_edited(tmp_path, capsys, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "o"
    assert cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out), capsys)[0] == 0
    (out / "report.md").write_text("the user's notes on the analysis\n")
    before = tree_bytes(out)
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out), capsys)
    assert tree_bytes(out) == before
    return code, err, {"out": str(out)}


def _foreign_run_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name, text in (("log.jsonl", '{"kind": "eval", "iter": 0}\n'), ("run.json", "{}"), ("ckpt_4000.pt", "x"),
                       ("ckpt_keep.pt", "y")):
        (out / name).write_text(text)
    return out


@scenario
def train_scratch_into_run_files(tmp_path, capsys, trained, **_):
    out = _foreign_run_files(tmp_path)
    before = tree_bytes(out)
    code, err = cli(train.main, TINY + [f"--data_dir={trained['data']}", f"--out_dir={out}", "--max_iters=2"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"out": str(out)}


@scenario
def train_eval_only_into_run_files(tmp_path, capsys, trained, **_):
    out = _foreign_run_files(tmp_path)
    before = tree_bytes(out)
    code, err = cli(train.main, TINY + [f"--data_dir={trained['data']}", f"--out_dir={out}", "--eval_only=True"],
                    capsys)
    assert tree_bytes(out) == before
    return code, err, {"out": str(out)}


@scenario
def resume_best_val_loss_text(tmp_path, capsys, trained, **_):
    return resume_with(tmp_path, capsys, trained, lambda c: c.update(best_val_loss="abc"))


@scenario
def resume_log_offset_negative(tmp_path, capsys, trained, **_):
    return resume_with(tmp_path, capsys, trained, lambda c: c.update(log_offset=-5))


@scenario
def resume_sampler_draws_inf(tmp_path, capsys, trained, **_):
    return resume_with(tmp_path, capsys, trained, lambda c: c["sampler"].update(draws=float("inf")))


@scenario
def resume_param_id_list(tmp_path, capsys, trained, **_):
    def edit(c):
        c["optimizer"]["param_groups"][0]["params"][0] = [0]
    return resume_with(tmp_path, capsys, trained, edit)


@scenario
def resume_betas_text(tmp_path, capsys, trained, **_):
    def edit(c):
        c["optimizer"]["param_groups"][0]["betas"] = "ab"
    return resume_with(tmp_path, capsys, trained, edit)


@scenario
def resume_step_text(tmp_path, capsys, trained, **_):
    def edit(c):
        c["optimizer"]["state"][0]["step"] = "x"
    return resume_with(tmp_path, capsys, trained, edit)


@scenario
def ckpt_no_weights_huge_args(tmp_path, capsys, **_):
    def edit(c):
        c["model"] = {}
        c["model_args"].update(n_embd=2**18, n_head=1, vocab_size=2**24)
    return refused_by_compress(tmp_path, capsys, edit)


@scenario
def ckpt_int_weight(tmp_path, capsys, **_):
    return refused_by_analyze(tmp_path, capsys, lambda c: c["model"].update(
        {"transformer.h.0.ln_1.weight": torch.ones(32, dtype=torch.int64)}))


@scenario
def ckpt_weight_twice(tmp_path, capsys, **_):
    return refused_by_compress(tmp_path, capsys, lambda c: c["model"].update(
        {"_orig_mod.transformer.h.0.ln_1.weight": torch.ones(32)}))


@scenario
def train_meta_nested(tmp_path, capsys, trained, **_):
    return train_with_meta(tmp_path, capsys, trained, "[" * 100000 + "]" * 100000)


@scenario
def train_eval_iters_huge(tmp_path, capsys, trained, **_):
    code, err = train_fresh(tmp_path, capsys, trained, f"--eval_iters={2**40}", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {}


@scenario
def resume_nanogpt_checkpoint(tmp_path, capsys, trained, **_):
    def edit(c):  # what nanoGPT's train.py writes: no kind, no sampler
        del c["kind"], c["sampler"]
    return resume_with(tmp_path, capsys, trained, edit)


@scenario
def resume_sampler_none(tmp_path, capsys, trained, **_):
    return resume_with(tmp_path, capsys, trained, lambda c: c.update(sampler=None))


# ------------------------------------------------------------------------------------------ round 3 (issue 26)
# A: data loss

@scenario
def train_config_overwrite(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    cfg = tmp_path / "demo.py"
    cfg.write_text('out_dir = "out/demo"\noverwrite = True\n')  # what config/tiny.py used to set
    before = tree_bytes(out)
    code, err = cli(train.main, [cfg] + args + ["--max_iters=1"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"cfg": str(cfg)}


@scenario
def train_tiny_config_into_run(tmp_path, capsys, trained, **_):
    out, _ = run_copy(trained, tmp_path)
    before = tree_bytes(out)
    code, err = cli(train.main, [os.path.join(REPO_ROOT, "config", "tiny.py"), f"--data_dir={trained['data']}",
                                 f"--out_dir={out}", "--max_iters=1"], capsys)
    assert tree_bytes(out) == before  # ckpt.pt, the snapshots and log.jsonl of the run
    return code, err, {"out": out, "ckpt": os.path.join(out, "ckpt.pt")}


def _other_snapshot(path):
    """A weights-only snapshot of another run (other weights), as a user might copy one in."""
    model = tiny_model(1)
    save_checkpoint(path, {"model": model.state_dict(), "model_args": model_args_from(model.config), "iter_num": 2,
                           "config": {}, "kind": "snapshot"})


@scenario
def resume_prune_only_own(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    _other_snapshot(os.path.join(out, "ckpt_2.pt"))  # replaces the run's own: no longer the file run.json records
    with open(os.path.join(out, "ckpt_1.pt"), "wb") as f:
        f.write(b"the user's own file\n")
    foreign = {n: open(os.path.join(out, n), "rb").read() for n in ("ckpt_1.pt", "ckpt_2.pt")}
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume", "--snapshot_interval=1",
                                        "--keep_snapshots=1"], capsys)
    assert {n: open(os.path.join(out, n), "rb").read() for n in foreign} == foreign
    assert sorted(n for n in os.listdir(out) if train.SNAPSHOT.fullmatch(n)) == ["ckpt_1.pt", "ckpt_2.pt", "ckpt_6.pt"]
    assert list(json.load(open(os.path.join(out, "run.json")))["snapshots"]) == ["ckpt_6.pt"]
    return code, err, {}


@scenario
def train_snapshot_would_replace(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    with open(os.path.join(out, "ckpt_6.pt"), "wb") as f:
        f.write(b"kept by the user\n")
    before = tree_bytes(out)
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"path": os.path.join(out, "ckpt_6.pt")}


@slow_scenario
def train_overwrite_keeps_foreign(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    _other_snapshot(os.path.join(out, "ckpt_3.pt"))
    kept = open(os.path.join(out, "ckpt_3.pt"), "rb").read()
    code, err = cli(train.main, args + ["--max_iters=2", "--overwrite=True"], capsys)
    assert open(os.path.join(out, "ckpt_3.pt"), "rb").read() == kept
    # ckpt_4.pt was the replaced run's (run.json recorded it): gone; ckpt_3.pt was never the run's: kept
    assert sorted(n for n in os.listdir(out) if train.SNAPSHOT.fullmatch(n)) == ["ckpt_2.pt", "ckpt_3.pt"]
    assert [launch["start_iter"] for launch in json.load(open(os.path.join(out, "run.json")))["launches"]] == [0]
    return code, err, {}


# B: silent wrong results

def _other_data(tmp_path, **kwargs):
    return make_data(tmp_path / "other", val=token_stream(2000, 5), **kwargs)  # same sizes, other tokens


def _resume_on(tmp_path, capsys, trained, other):
    """Resume a copy of the trained run on the data in `other`: refused, the run byte-identical."""
    out, args = run_copy(trained, tmp_path)
    before = tree_bytes(out)
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume", f"--data_dir={other}"], capsys)
    assert tree_bytes(out) == before
    return code, err, {"ckpt": os.path.join(out, "ckpt.pt"), "other": os.path.abspath(other),
                       "data": os.path.abspath(trained["data"])}


@scenario
def resume_other_data(tmp_path, capsys, trained, **_):
    return _resume_on(tmp_path, capsys, trained, _other_data(tmp_path))


@scenario
def resume_other_data_no_meta(tmp_path, capsys, trained, **_):  # nanoGPT data: the token counts are compared
    return _resume_on(tmp_path, capsys, trained, make_data(tmp_path / "other", meta=False, train_tokens=6000))


@slow_scenario
def resume_other_data_meant(tmp_path, capsys, trained, **_):
    out, args = run_copy(trained, tmp_path)
    other = _other_data(tmp_path)
    code, err = cli(train.main, args + ["--max_iters=6", "--init_from=resume", f"--data_dir={other}",
                                        "--resume_on_new_data=True"], capsys)
    record = json.load(open(os.path.join(out, "run.json")))
    assert record["data"]["data_dir"] == os.path.abspath(other)
    earlier = [(d["data_dir"], d["until_iter"]) for d in record["previous_data"]]
    assert earlier == [(os.path.abspath(trained["data"]), 4)]
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["data"]["data_dir"] == os.path.abspath(other)
    return code, err, {}


@scenario
def ckpt_tied_differ(tmp_path, capsys, **_):
    def edit(c):  # model.GPT stores one tensor under both names; here two different ones
        c["model"]["lm_head.weight"] = c["model"]["lm_head.weight"].clone() + 1.0
    return refused_by_compress(tmp_path, capsys, edit)


def _huge_weights(c):
    c["model"]["transformer.h.0.mlp.c_fc.weight"] = torch.full_like(c["model"]["transformer.h.0.mlp.c_fc.weight"], 1e38)


@scenario
def ckpt_overflow_analyze(tmp_path, capsys, **_):
    code, err, values = refused_by_analyze(tmp_path, capsys, _huge_weights)
    return code, err, {"ckpt": os.path.abspath(values["ckpt"])}


@scenario
def ckpt_overflow_compress(tmp_path, capsys, **_):
    return refused_by_compress(tmp_path, capsys, _huge_weights)


def _api(fn):
    """An API call run as a script runs its main (the UserError is its one line)."""
    return lambda argv: (fn(), 0)[1]


@scenario
def api_dict_nonfinite(tmp_path, capsys, **_):
    from training.checkpoint import model_from_checkpoint
    model = tiny_model()
    ckpt = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "model_args": model_args_from(model.config),
            "iter_num": 0, "config": {}}
    ckpt["model"]["transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")
    return (*cli(_api(lambda: model_from_checkpoint(ckpt)), [], capsys), {})


@scenario
def api_dict_bad_args(tmp_path, capsys, **_):
    from training.checkpoint import model_from_checkpoint
    model = tiny_model()
    ckpt = {"model": model.state_dict(), "model_args": {**model_args_from(model.config), "n_layer": None},
            "iter_num": 0, "config": {}}
    return (*cli(_api(lambda: model_from_checkpoint(ckpt)), [], capsys), {})


def _gpt2_dir(path, edit=None):
    """A Hugging Face GPT-2 directory (config.json, model.safetensors in transformers' names and Conv1D layout)
    of a tiny random model.GPT, written without transformers; `edit` changes its state dict first."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, bias=True))
    conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
    state = {k[len("transformer."):]: (v.t() if k.endswith(conv1d) else v).contiguous().clone()
             for k, v in model.state_dict().items() if k.startswith("transformer.")}
    if edit:
        edit(state)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32,
                   "vocab_size": VOCAB, "activation_function": "gelu_new"}, f)
    save_file(state, os.path.join(path, "model.safetensors"))
    return str(path)


def _analyze_pretrained(tmp_path, capsys, model_dir):
    code, err = cli(analyze_outliers.main, ["--pretrained", model_dir, "--data", eval_data(tmp_path), "--out",
                                            tmp_path / "o", "--no_progress", "--num_seqs", "1", "--seq_len", "8",
                                            "--tau", "4"], capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"dir": model_dir}


@scenario
def hf_gpt2_nonfinite(tmp_path, capsys, **_):
    def edit(state):
        state["h.0.mlp.c_fc.weight"][3, 4] = float("nan")
    return _analyze_pretrained(tmp_path, capsys, _gpt2_dir(tmp_path / "gpt2", edit))


@scenario
def hf_gpt2_tied_differ(tmp_path, capsys, **_):
    def edit(state):  # some save_pretrained directories store lm_head.weight too; here it is not the embedding
        state["lm_head.weight"] = state["wte.weight"] * 2
    return _analyze_pretrained(tmp_path, capsys, _gpt2_dir(tmp_path / "gpt2", edit))


@scenario
def hf_gpt2_damaged(tmp_path, capsys, **_):
    model_dir = _gpt2_dir(tmp_path / "gpt2")
    weights = os.path.join(model_dir, "model.safetensors")
    blob = open(weights, "rb").read()
    open(weights, "wb").write(blob[:len(blob) // 2])  # a download cut short
    return _analyze_pretrained(tmp_path, capsys, model_dir)


_LLAMA = {}


def _llama_dir(tmp_path, edit=None):
    """A copy of one tiny random LLaMA save_pretrained directory (made once per session, with transformers);
    `edit` changes its weights."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file
    if "dir" not in _LLAMA:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
        _LLAMA["dir"] = str(tmp_path / "llama_made")
        transformers.LlamaForCausalLM(config).save_pretrained(_LLAMA["dir"])
    path = str(tmp_path / "llama")
    shutil.copytree(_LLAMA["dir"], path)
    if edit:
        weights = os.path.join(path, "model.safetensors")
        state = load_file(weights)
        edit(state)
        save_file(state, weights, metadata={"format": "pt"})
    return path


@slow_scenario
def hf_nonfinite_analyze(tmp_path, capsys, **_):
    def edit(state):
        state["model.layers.1.mlp.down_proj.weight"][0, 1] = float("nan")
    return _analyze_pretrained(tmp_path, capsys, _llama_dir(tmp_path, edit))


@slow_scenario
def hf_nonfinite_compress(tmp_path, capsys, **_):
    def edit(state):
        state["model.layers.0.self_attn.q_proj.weight"][2, 2] = float("inf")
    model_dir = _llama_dir(tmp_path, edit)
    code, err = cli(compress_eval.main, ["--pretrained", model_dir, "--data", eval_data(tmp_path), "--out",
                                         tmp_path / "o", "--no_progress", "--methods", "fp"], capsys)
    assert not (tmp_path / "o").exists()
    return code, err, {"dir": model_dir}


# C: code from a model directory

_CUSTOM_CODE = "open({marker!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as C, LlamaForCausalLM as M\n"


def _with_custom_code(model_dir, model_type, marker):
    """config.json of `model_dir` mapped (auto_map) to a Python file of the directory that leaves `marker`."""
    path = os.path.join(model_dir, "config.json")
    config = json.load(open(path))
    config.update(model_type=model_type, auto_map={"AutoConfig": "modeling_custom.C",
                                                   "AutoModelForCausalLM": "modeling_custom.M"})
    json.dump(config, open(path, "w"))
    open(os.path.join(model_dir, "modeling_custom.py"), "w").write(_CUSTOM_CODE.format(marker=str(marker)))


@scenario
def hf_custom_code(tmp_path, capsys, **_):
    model_dir = str(tmp_path / "custom")
    shutil.copytree(_gpt2_dir(tmp_path / "gpt2"), model_dir)
    marker = tmp_path / "code_ran"
    _with_custom_code(model_dir, "custom_llama", marker)
    code, err, values = _analyze_pretrained(tmp_path, capsys, model_dir)
    assert not marker.exists()
    return code, err, values


@slow_scenario
def hf_custom_code_known_type(tmp_path, capsys, **_):
    model_dir = _llama_dir(tmp_path)
    marker = tmp_path / "code_ran"
    _with_custom_code(model_dir, "llama", marker)  # a type transformers knows: its own class, never the file
    code, err = cli(analyze_outliers.main, ["--pretrained", model_dir, "--data", eval_data(tmp_path), "--out",
                                            tmp_path / "o", "--no_progress", "--num_seqs", "1", "--seq_len", "8",
                                            "--tau", "4", "--intervene", "none"], capsys)
    assert not marker.exists() and (tmp_path / "o" / "report.md").exists()
    return code, err, {}


@scenario
def hf_config_damaged(tmp_path, capsys, **_):
    model_dir = str(tmp_path / "llama")
    os.makedirs(model_dir)
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama", ')
    return _analyze_pretrained(tmp_path, capsys, model_dir)


# D: tracebacks

def _float8(name, dtype):
    def edit(c):
        c["model"][name] = c["model"][name].to(dtype)
    return edit


@scenario
def ckpt_float8_analyze(tmp_path, capsys, **_):
    return refused_by_analyze(tmp_path, capsys, _float8("transformer.h.0.attn.c_attn.weight", torch.float8_e4m3fn))


@scenario
def ckpt_float8_compress(tmp_path, capsys, **_):
    return refused_by_compress(tmp_path, capsys, _float8("transformer.h.1.mlp.c_proj.weight", torch.float8_e5m2))


@scenario
def train_init_from_llama_dir(tmp_path, capsys, trained, **_):
    model_dir = tmp_path / "llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    code, err = train_fresh(tmp_path, capsys, trained, f"--init_from={model_dir}", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {"dir": str(model_dir)}


@scenario
def train_init_from_run_dir(tmp_path, capsys, trained, **_):
    out, _ = run_copy(trained, tmp_path)
    code, err = train_fresh(tmp_path, capsys, trained, f"--init_from={out}", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {"dir": out}


@scenario
def analyze_figures_disk_full(tmp_path, capsys, monkeypatch, **_):
    import matplotlib.figure
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.md").write_text("the user's notes\n")

    def full(self, fname, *args, **kwargs):  # PIL's write fails midway, as on a full disk (no file name)
        open(fname, "wb").write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, out), capsys)
    assert tree_bytes(out) == {"notes.md": b"the user's notes\n"} and no_temporaries(str(out)) == []
    return code, err, {"out": str(out)}


@scenario
def train_config_huge_float(tmp_path, capsys, trained, **_):
    return train_with_config(tmp_path, capsys, trained, b"learning_rate = 10**400\n")


@scenario
def train_accumulation_huge(tmp_path, capsys, trained, **_):
    code, err = train_fresh(tmp_path, capsys, trained, "--gradient_accumulation_steps=100000000000", "--max_iters=2")
    assert not (tmp_path / "o").exists()  # no run.json or log.jsonl left behind
    return code, err, {}


def _bench_main(script, monkeypatch):
    """The main of benchmarks/SCRIPT, imported as the golden --help test does (TRITON_INTERPRET restored after)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return importlib.import_module(f"benchmarks.{script[:-3]}").main


@scenario
def kernel_registers_head_dim(tmp_path, capsys, monkeypatch, **_):
    return (*cli(_bench_main("kernel_registers.py", monkeypatch), ["--head_dim", "7"], capsys), {})


@scenario
def kernel_registers_arch(tmp_path, capsys, monkeypatch, **_):
    return (*cli(_bench_main("kernel_registers.py", monkeypatch), ["--arch", "5"], capsys), {})


@scenario
def host_overhead_seq_len_zero(tmp_path, capsys, monkeypatch, **_):
    return (*cli(_bench_main("host_overhead.py", monkeypatch), ["--device", "cpu", "--seq_lens", "0"], capsys), {})


@scenario
def host_overhead_head_dim(tmp_path, capsys, monkeypatch, **_):
    return (*cli(_bench_main("host_overhead.py", monkeypatch), ["--device", "cpu", "--head_dim", "8"], capsys), {})


# E: messages that named the wrong cause

@scenario
def train_overflow_at_start(tmp_path, capsys, trained, **_):
    code, err = train_fresh(tmp_path, capsys, trained, "--attention=sigmoid", "--sigmoid_bias=1e308", "--max_iters=2")
    assert not (tmp_path / "o").exists()
    return code, err, {}


@scenario
def resume_weights_overflow(tmp_path, capsys, trained, **_):
    return resume_with(tmp_path, capsys, trained, _huge_weights)


def _fifo(tmp_path):
    path = str(tmp_path / "pipe")
    os.mkfifo(path)
    return path


@scenario
def analyze_data_fifo(tmp_path, capsys, **_):
    ckpt, fifo = save_model(tmp_path / "ckpt.pt", tiny_model()), _fifo(tmp_path)
    code, err = cli(analyze_outliers.main, [ckpt, "--data", fifo, "--out", tmp_path / "o", "--no_progress"], capsys)
    return code, err, {"fifo": fifo}


@scenario
def analyze_ckpt_fifo(tmp_path, capsys, **_):
    fifo = _fifo(tmp_path)  # its CRC check used to wait forever for a writer
    code, err = cli(analyze_outliers.main, [fifo, "--data", eval_data(tmp_path), "--out", tmp_path / "o",
                                            "--no_progress"], capsys)
    return code, err, {"fifo": fifo}


@scenario
def compress_data_fifo(tmp_path, capsys, monkeypatch, **_):
    ckpt, fifo = save_model(tmp_path / "ckpt.pt", tiny_model()), _fifo(tmp_path)
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, "--data", fifo, "--out", tmp_path / "o", "--no_progress"], capsys)
    return code, err, {"fifo": fifo}


@scenario
def prepare_input_fifo(tmp_path, capsys, monkeypatch, **_):
    needs_tokenizer()
    fifo = _fifo(tmp_path)
    monkeypatch.setattr(prepare_data, "_load_splits", must_not_run)
    code, err = cli(prepare_data.main, ["--dataset", "text", "--input", fifo, "--out_dir", tmp_path / "d"], capsys)
    return code, err, {"fifo": fifo}


@scenario
def prepare_concurrent_sources(tmp_path, capsys, monkeypatch, **_):
    needs_tokenizer()
    a, b, out = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "data"
    a.write_text("".join(f"line {i} of corpus a\n" for i in range(300)))
    b.write_text("".join(f"line {i} of corpus b\n" for i in range(300)))
    argv = ["--dataset", "text", "--out_dir", str(out), "--num_proc", "1", "--cache_dir", str(tmp_path / "hf"),
            "--input"]
    real = prepare_data._load_splits

    def meanwhile(*args, **kwargs):  # while this run (of b) tokenizes, a run of a finishes in the same out_dir
        monkeypatch.setattr(prepare_data, "_load_splits", real)
        assert prepare_data.main(argv + [str(a)]) == 0
        return real(*args, **kwargs)
    monkeypatch.setattr(prepare_data, "_load_splits", meanwhile)
    code, err = cli(prepare_data.main, argv + [b], capsys)
    assert json.load(open(out / "meta.json"))["source"]["inputs"] == [str(a.resolve())]  # a's data, whole
    return code, err, {"out": str(out)}


@scenario
def analyze_compare_same(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(analyze_outliers, "model_and_info", must_not_run)
    code, err = cli(analyze_outliers.main, ["--compare", ckpt, ckpt, "--data", eval_data(tmp_path), "--out",
                                            tmp_path / "cmp", "--no_progress"], capsys)
    return code, err, {"ckpt": ckpt}


@scenario
def train_min_lr_above_lr(tmp_path, capsys, trained, **_):
    return (*train_fresh(tmp_path, capsys, trained, "--learning_rate=1e-3", "--min_lr=1e-2", "--max_iters=2"), {})


@scenario
def bench_train_smoke_sizes(tmp_path, capsys, monkeypatch, **_):
    main = _bench_main("train_throughput.py", monkeypatch)
    return (*cli(main, ["--smoke", "--batch_size", "64", "--out_dir", tmp_path / "b"], capsys), {})


@scenario
def bench_attention_smoke_sizes(tmp_path, capsys, monkeypatch, **_):
    main = _bench_main("attention.py", monkeypatch)
    return (*cli(main, ["--interpret_smoke", "--seq_lens", "4096", "--heads", "16", "--out_dir", tmp_path / "b"],
                 capsys), {})


@slow_scenario
def train_record_write_fails(tmp_path, capsys, trained, monkeypatch, **_):
    out = tmp_path / "o"
    writes = []

    def full(path, obj):  # run.json's first write (the launch) lands; the disk is full after it
        writes.append(path)
        if len(writes) > 1:
            raise files.write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        files.atomic_write_json(path, obj)

    def no_space(path, ckpt):
        raise files.write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    monkeypatch.setattr(train, "atomic_write_json", full)
    monkeypatch.setattr(train, "save_checkpoint", no_space)
    code, err = train_fresh(tmp_path, capsys, trained, "--max_iters=2", "--snapshot_interval=0")
    assert json.load(open(out / "run.json"))["launches"][-1]["status"] == "running"  # as the message says
    return code, err, {"out": str(out)}


# found by the hostile pass of issue 26

@scenario
def train_config_is_dir(tmp_path, capsys, trained, **_):
    code, err = cli(train.main, [trained["data"]] + TINY + [f"--out_dir={tmp_path / 'o'}"], capsys)
    return code, err, {"dir": trained["data"]}


@scenario
def train_weight_decay_negative(tmp_path, capsys, trained, **_):
    return (*train_fresh(tmp_path, capsys, trained, "--weight_decay=-0.1", "--max_iters=2"), {})


@scenario
def analyze_usage_error(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(sys, "argv", ["analyze_outliers.py"])  # argparse names the program after argv[0]
    code, err = cli(analyze_outliers.main, analyze_args(ckpt, tmp_path, tmp_path / "o") + ["--intervene", "nope"],
                    capsys)
    return code, err, {}


@scenario
def compress_same_twice(tmp_path, capsys, monkeypatch, **_):
    ckpt = save_model(tmp_path / "ckpt.pt", tiny_model())
    monkeypatch.setattr(compress_eval, "evaluate_perplexity", must_not_run)
    code, err = cli(compress_eval.main, [ckpt, str(tmp_path / "." / "ckpt.pt"), "--data", eval_data(tmp_path), "--out",
                                         tmp_path / "o", "--no_progress"], capsys)
    return code, err, {"ckpt": os.path.realpath(ckpt)}


@scenario
def prepare_cache_dir_is_file(tmp_path, capsys, monkeypatch, **_):
    needs_tokenizer()
    src, cache = tmp_path / "in.txt", tmp_path / "cache"
    src.write_text("some text\n" * 50)
    cache.write_text("not a directory\n")
    monkeypatch.setattr(prepare_data, "_load_splits", must_not_run)
    code, err = cli(prepare_data.main, ["--dataset", "text", "--input", src, "--out_dir", tmp_path / "d",
                                        "--cache_dir", cache], capsys)
    return code, err, {"cache": str(cache)}


@scenario
def host_overhead_out_unwritable(tmp_path, capsys, monkeypatch, **_):
    (tmp_path / "file").write_text("a regular file\n")
    out = tmp_path / "file" / "host.json"
    code, err = cli(_bench_main("host_overhead.py", monkeypatch), ["--device", "cpu", "--out", out], capsys)
    return code, err, {"dir": str(out.parent)}


@scenario
def hf_dir_without_config(tmp_path, capsys, **_):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    return _analyze_pretrained(tmp_path, capsys, str(model_dir))


@scenario
def hf_dir_missing(tmp_path, capsys, monkeypatch, **_):
    import runtime.token_data
    monkeypatch.setattr(runtime.token_data, "offline_unless_hub_reachable", must_not_run)  # no hub lookup
    return _analyze_pretrained(tmp_path, capsys, str(tmp_path / "models" / "missing"))
