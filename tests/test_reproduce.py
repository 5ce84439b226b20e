"""reproduce.py: the plan of every scale, the gpu scale's budgeted plan and time estimate (from the H200
throughput measurements), its stage deadlines and partial reports, one end-to-end tiny run (with a resumed
training), skipping on re-run, refusal of a run directory trained with other settings, and the report's
statements.

The end-to-end checks compare reproduce.json with independent reads of each run's own artifacts
(ckpt.pt, log.jsonl, outliers.json, results.json), never with reproduce.py's own helpers.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

import attention_variants
import reproduce
from conftest import needs_tokenizer
from reproduction import findings, gpu_time, paths
from reproduction import plan as plans
from reproduction import runner as running
from reproduction import state
from reproduction.plan import Plan
from reproduction.report import write_outputs
from runtime.cli import UserError
from training.config import parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # end-to-end runs: `make test-fast` leaves them out

VARIANTS = ("default", "scaling")
# 2 variants x 10 iterations, 4 analysed sequences, 2,048 compression tokens: the CI smoke run
SMOKE = ["--scale", "tiny", "--variants", ",".join(VARIANTS), "--max_iters", "10", "--num_seqs", "4",
         "--max_tokens", "2048"]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    cache = os.path.normpath(os.path.join(REPO, "..", "shared", "tiktoken_cache"))
    if os.path.isdir(cache):
        env.setdefault("TIKTOKEN_CACHE_DIR", cache)
    return env


def run_reproduce(args, timeout=600):
    return subprocess.run([sys.executable, "reproduce.py", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------- plans

@pytest.mark.parametrize("scale", ["tiny", "gpu-long", "paper"])
def test_dry_run_prints_every_command_and_writes_nothing(scale, tmp_path, monkeypatch):
    out = tmp_path / "out"
    nproc = ["--nproc_per_node", "8"] if scale == "paper" else []  # (paper's default: this node's GPUs)
    r = run_reproduce(["--scale", scale, "--out", str(out), "--dry_run", *nproc], timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    trains = [l for l in lines if "train.py" in l]
    assert len(trains) == len(attention_variants.VARIANTS)
    for v in attention_variants.VARIANTS:
        line = next(l for l in trains if f"--attention={v} " in l)
        assert "--init_from=scratch" in line and "--seed=1337" in line and f"runs/{v}" in line
        assert any(f"analyze_outliers.py {out}/runs/{v}/ckpt.pt" in l for l in lines)
    assert sum("compress_eval.py" in l for l in lines) == 1
    assert any("prepare_data.py" in l for l in lines)
    if scale == "paper":  # the variant's own config file under torchrun
        assert all(l.split(": ")[-1].startswith("torchrun --standalone --nproc_per_node=8 train.py config/")
                   for l in trains)
        assert all(f"config/{v}.py" in next(l for l in trains if f"--attention={v} " in l)
                   for v in attention_variants.VARIANTS)
        assert "--execute" in r.stdout and "resumable" in r.stdout
    else:
        assert all(": python train.py" in l for l in trains)
    if scale == "gpu-long":  # its config file's settings are what train.py runs with
        assert all(": python train.py config/reproduce/gpu_long.py " in l for l in trains)
        for cfg in (train_config(l, monkeypatch) for l in trains):
            assert cfg.compile is True and (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 8, 512, 512)
        assert any("--dataset text --input" in l for l in lines)
    assert not out.exists()


def train_config(line, monkeypatch):
    """The TrainConfig that the train.py command of a printed plan line runs with, as train.py reads it."""
    monkeypatch.chdir(REPO)
    cmd = shlex.split(line.split(": ")[-1])
    return parse_config(cmd[cmd.index("train.py") + 1:])[0]


@pytest.mark.parametrize("scale, base", [("tiny", "config/tiny.py"), ("gpu", "config/default.py"),
                                         ("gpu_long", "config/default.py")])
def test_each_scale_is_one_train_config_file(scale, base, monkeypatch):
    """`python train.py config/reproduce/SCALE.py` is a training command: the scale's model is its base config's
    (written once), and reproduce.py's plan trains with exactly the file's settings."""
    monkeypatch.chdir(REPO)
    cfg, origin = parse_config([f"config/reproduce/{scale}.py"])
    ref, _ = parse_config([base])
    shape = ("n_layer", "vocab_size", "bias", "dropout", "weight_decay", "beta1", "beta2", "grad_clip")
    assert {k: getattr(cfg, k) for k in shape} == {k: getattr(ref, k) for k in shape}
    assert cfg.attention == "default" and cfg.wandb_run_name == ""  # train.py names a run after its variant
    key = {"gpu_long": "gpu-long"}.get(scale, scale)
    plan = Plan(reproduce.parse_args(["--scale", key, "--out", "/tmp/unused", "--dry_run"]))
    own = [k for k in origin if k not in plans.RUN_KEYS + ("max_iters",)]  # max_iters: sized from the budget
    assert {k: v for k, v in plan.train_settings.items() if k in origin and k != "max_iters"} == \
        {k: getattr(cfg, k) for k in own}


def test_paper_scale_only_prints_without_execute(tmp_path):
    out = tmp_path / "paper"
    r = run_reproduce(["--scale", "paper", "--variants", "scaling", "--out", str(out), "--nproc_per_node", "4"],
                      timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torchrun --standalone --nproc_per_node=4 train.py config/scaling.py" in r.stdout
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--scale", "tiny", "--variants", "default,nope"], "unknown nope"),
    (["--scale", "tiny", "--variants", "default,default"], "twice"),
    (["--scale", "tiny", "--max_iters", "0"], "--max_iters must be at least 1"),
    (["--scale", "tiny", "--budget-s", "100"], "--budget_s applies to --scale gpu"),
    (["--scale", "gpu", "--budget-s", "0"], "--budget_s must be positive"),
    (["--scale", "gpu", "--recipe", "2b"], "--recipe applies to --scale gpu-long"),
])
def test_bad_arguments_are_user_errors(args, message):
    with pytest.raises(UserError, match=message):
        reproduce.parse_args(args)


def test_bad_arguments_exit_2_with_one_line():
    r = run_reproduce(["--scale", "tiny", "--variants", "nope", "--dry_run"], timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: --variants: unknown nope") and r.stderr.count("\n") == 1


# ------------------------------------------------------------------------------- variants registered at run time

RUNTIME_VARIANT = "tests/runtime_variant.py"  # registers `half_attention`


@pytest.fixture
def fresh_registry(monkeypatch):
    """A variants file run in this process registers into attention_variants.REGISTRY: put it back afterwards."""
    before = dict(attention_variants.REGISTRY)
    monkeypatch.setattr(attention_variants, "_VARIANT_FILES", set())
    yield
    attention_variants.REGISTRY.clear()
    attention_variants.REGISTRY.update(before)


def test_variants_are_names_of_the_registry_and_its_file_reaches_every_stage(fresh_registry, monkeypatch, tmp_path):
    with pytest.raises(UserError, match="unknown half_attention; choose from default, .*--variants_file"):
        reproduce.parse_args(["--scale", "tiny", "--variants", "default,half_attention"])
    with pytest.raises(UserError, match="variants file .*nope.py does not exist"):
        reproduce.parse_args(["--scale", "tiny", "--variants_file", str(tmp_path / "nope.py")])
    monkeypatch.chdir(tmp_path)  # the file is named from anywhere; the stages get it relative to the repo root
    args = reproduce.parse_args(["--scale", "tiny", "--variants_file", os.path.join(REPO, RUNTIME_VARIANT),
                                 "--out", str(tmp_path / "o")])
    assert args.variant_list == list(attention_variants.VARIANTS) + ["half_attention"]  # tiny: every variant
    plan = Plan(args)
    cmd = plan.train_command("half_attention", resume=False)
    assert f"--variants_file={RUNTIME_VARIANT}" in cmd
    monkeypatch.chdir(REPO)
    cfg, _ = parse_config(cmd[2:])  # train.py runs the file (once per process: no second registration)
    assert cfg.attention == "half_attention" and cfg.variants_file == RUNTIME_VARIANT
    assert plan.analysis_command("half_attention")[-2:] == ["--variants_file", RUNTIME_VARIANT]
    assert plan.compress_command(["default", "half_attention"])[-2:] == ["--variants_file", RUNTIME_VARIANT]
    plain = Plan(reproduce.parse_args(["--scale", "tiny", "--variants", "default", "--out", str(tmp_path / "o")]))
    assert not any("variants_file" in " ".join(c) for c in (plain.train_command("default", False),
                                                            plain.analysis_command("default"),
                                                            plain.compress_command(["default"])))


def test_gpu_dry_run_of_a_runtime_variant_without_a_measurement(tmp_path):
    r = run_reproduce(["--scale", "gpu", "--dry-run", "--variants", "default,half_attention", "--variants_file",
                       RUNTIME_VARIANT, "--out", str(tmp_path / "o")], timeout=120)
    assert r.returncode == 0, r.stderr
    rows, total = _estimate_lines(r.stdout)
    assert rows["half_attention"][1] == rows["default"][1] == 353_890 and total[0] <= 540
    line = next(l for l in r.stdout.splitlines() if "]   train half_attention " in l)
    assert line.endswith("(tokens/s not measured: `default`'s rate)")
    trains = [l for l in r.stdout.splitlines() if ": python train.py" in l]
    assert len(trains) == 2 and all(f"--variants_file={RUNTIME_VARIANT}" in l for l in trains)


def test_a_variant_registered_at_run_time_is_reproduced(tmp_path):
    """A variant defined in a test file and registered only by --variants_file is trained, analysed and
    compressed: train.py, analyze_outliers.py and compress_eval.py, each a subprocess, run the file."""
    needs_tokenizer()
    out = tmp_path / "out"
    r = run_reproduce(["--scale", "tiny", "--variants", "half_attention", "--variants_file", RUNTIME_VARIANT,
                       "--max_iters", "10", "--num_seqs", "2", "--max_tokens", "1024", "--out", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import torch
    ckpt = torch.load(out / "runs" / "half_attention" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["model_args"]["attention"] == "half_attention" and ckpt["iter_num"] == 10
    assert ckpt["config"]["variants_file"] == RUNTIME_VARIANT
    with open(out / "runs" / "half_attention" / "outliers" / "outliers.json", encoding="utf-8") as f:
        model = json.load(f)["model"]
    assert model["attention"] == "half_attention" and model["iter_num"] == 10
    with open(out / "compress" / "results.json", encoding="utf-8") as f:
        (row,) = json.load(f)
    assert row["attention"] == "half_attention" and row["iter_num"] == 10 and row["ppl"]["fp"] > 1
    with open(out / "reproduce.json", encoding="utf-8") as f:
        doc = json.load(f)
    (run,) = doc["runs"]
    assert run["status"] == "ok" and run["ppl"] == {m: row["ppl"][m] for m in run["ppl"]}
    assert doc["settings"]["variants_file"] == RUNTIME_VARIANT
    assert [s["stage"].split()[0] for s in doc["stages"]] == ["prepare", "train", "analyse", "compression"]
    assert all("variants_file" in s["command"] for s in doc["stages"][1:])


# ------------------------------------------------------------------------------------------- gpu scale

MEASURED = os.path.join(REPO, "..", "shared", "gpu-measurements", "2026-12-04-h200",
                        "train_throughput_nvidia-h200_20261204-021013.json")


def _estimate_lines(stdout):
    rows = {}
    for line in stdout.splitlines():
        m = re.search(r"\]\s+train (\w+)\s+([\d,]+)\s+([\d,]+)\s+(\d+)\s", line)
        if m:
            rows[m.group(1)] = tuple(int(x.replace(",", "")) for x in m.groups()[1:])
    total = re.search(r"estimated total: (\d+) s of the (\d+) s budget", stdout)
    return rows, (int(total.group(1)), int(total.group(2))) if total else None


@pytest.mark.parametrize("flag", ["--dry-run", "--dry_run"])
def test_gpu_dry_run_prints_tokens_per_variant_and_an_estimate_within_540_s(flag, tmp_path, monkeypatch):
    out = tmp_path / "out"
    r = run_reproduce(["--scale", "gpu", "--out", str(out), flag], timeout=120)
    assert r.returncode == 0, r.stderr
    rows, total = _estimate_lines(r.stdout)
    assert total is not None and total[1] == 540 and 0 < total[0] <= 540
    assert list(rows) == ["default", "attention_bias", "softmax1"]  # default and two designs
    tokens = {t for t, _, _ in rows.values()}
    assert len(tokens) == 1 and tokens.pop() >= 200 * 16 * 1024  # the same tokens for every variant
    assert rows["default"][1] == 353_890 and rows["attention_bias"][1] == 313_085 and rows["softmax1"][1] == 333_154
    # each training's seconds cover at least its tokens at the measured rate
    assert all(sec >= tok / rate for tok, rate, sec in rows.values())
    trains = [l for l in r.stdout.splitlines() if ": python train.py config/reproduce/gpu.py " in l]
    assert len(trains) == 3
    configs = [train_config(line, monkeypatch) for line in trains]
    for cfg in configs:
        assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size, cfg.gradient_accumulation_steps,
                cfg.compile, cfg.outlier_interval, cfg.learning_rate, cfg.min_lr) == \
            (12, 12, 768, 1024, 16, 1, False, 40, 6e-4, 6e-4)
    assert configs[0].max_iters * 16 * 1024 == rows["default"][0]
    assert not out.exists()


def test_budget_sizes_the_gpu_plan(monkeypatch, tmp_path):
    def plan(*extra):
        return Plan(reproduce.parse_args(["--scale", "gpu", "--out", str(tmp_path / "o"), *extra]))
    monkeypatch.setattr(paths, "SHARED_DIRS", (str(tmp_path / "shared"),))
    monkeypatch.setattr(plans, "can_prepare", lambda: True)
    full, short = plan(), plan("--budget-s", "420")
    assert short.train_settings["max_iters"] < full.train_settings["max_iters"]
    for p in (full, short):
        assert p.estimate["total_s"] <= gpu_time.PLAN_SHARE * p.budget_s
        # one more step of iterations would not have fitted
        bigger = gpu_time.gpu_estimate(p, p.train_settings["max_iters"] + gpu_time.GPU_ITERS_STEP)
        assert bigger["total_s"] > gpu_time.PLAN_SHARE * p.budget_s
    # a prepared copy of the corpus (carried to an offline GPU machine) saves the preparation: more iterations
    copy = tmp_path / "shared" / "data" / "pysource"
    copy.mkdir(parents=True)
    for f in ("train.bin", "val.bin", "meta.json"):
        (copy / f).write_text("x")
    assert plan().prepare is not None  # where it can be prepared, it is (the copy may be stale)
    monkeypatch.setattr(plans, "can_prepare", lambda: False)  # a bare GPU image: no `datasets`
    carried = plan()
    assert carried.data_dir == str(copy) and carried.prepare is None
    assert carried.train_settings["max_iters"] > full.train_settings["max_iters"]
    assert carried.estimate["rows"][0]["seconds"] == gpu_time.GPU_ASSUMED["data_copy_s"]
    with pytest.raises(UserError, match="--max_iters"):
        plan("--max_iters", "100000")
    with pytest.raises(UserError, match="--budget_s 200 is too small for 3 variants"):
        plan("--budget-s", "200")


@pytest.mark.skipif(not os.path.isfile(MEASURED), reason="needs ../shared/gpu-measurements")
def test_h200_throughputs_are_the_measurement():
    with open(MEASURED, encoding="utf-8") as f:
        doc = json.load(f)
    measured = {r["variant"]: round(r["tokens_per_s"]) for r in doc["results"] if r["backend"] == "triton"}
    assert gpu_time.measured_throughputs() == measured
    assert doc["batch_size"] == 16 and doc["block_size"] == 1024 and doc["git_commit"].startswith("c99af85")


def test_throughput_results_file_covers_every_variant_at_the_gpu_scales_shape(monkeypatch):
    """The results file says what was measured (device, versions, commit, command) on the shape the gpu scale
    trains, for every built-in variant."""
    with open(gpu_time.THROUGHPUT_FILE, encoding="utf-8") as f:
        doc = json.load(f)
    assert doc["gpu"] == "NVIDIA H200" and doc["torch"] and doc["triton"] and doc["command"] and doc["git_commit"]
    assert set(gpu_time.measured_throughputs()) == set(attention_variants.VARIANTS)
    monkeypatch.chdir(REPO)
    cfg, _ = parse_config(["config/reproduce/gpu.py"])
    assert (doc["batch_size"], doc["block_size"], cfg.gradient_accumulation_steps) == (cfg.batch_size, cfg.block_size, 1)
    assert doc["model"] == {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                            "vocab_size": cfg.vocab_size}
    assert gpu_time.throughput_source() == "H200, commit c99af85, GPT-2 124M, batch 16 x 1024, bf16, eager, fused kernel"


def test_a_variant_without_a_measurement_is_estimated_at_defaults_rate(monkeypatch, tmp_path):
    """`--variants default,gated` with no measurement of gated: the estimate says it used default's rate (no
    KeyError)."""
    with open(gpu_time.THROUGHPUT_FILE, encoding="utf-8") as f:
        doc = json.load(f)
    doc["results"] = [r for r in doc["results"] if r["variant"] != "gated"]
    (tmp_path / "m.json").write_text(json.dumps(doc))
    monkeypatch.setattr(gpu_time, "THROUGHPUT_FILE", str(tmp_path / "m.json"))
    monkeypatch.setattr(paths, "SHARED_DIRS", (str(tmp_path / "shared"),))
    monkeypatch.setattr(plans, "can_prepare", lambda: True)
    plan = Plan(reproduce.parse_args(["--scale", "gpu", "--dry-run", "--variants", "default,gated"]))
    rows = {r["stage"]: r for r in plan.estimate["rows"]}
    assert rows["train gated"]["tokens_per_s"] == rows["train default"]["tokens_per_s"] == 353_890
    assert rows["train gated"]["tokens_per_s_note"] == "not measured: `default`'s rate"
    assert "(tokens/s not measured: `default`'s rate)" in rows["train gated"]["what"]
    assert "tokens_per_s_note" not in rows["train default"]
    assert any("not measured: `default`'s rate" in line for line in gpu_time.estimate_text(plan))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("scale", ["gpu", "gpu-long"])
def test_gpu_scales_refuse_without_cuda_in_one_line(scale, tmp_path):
    out = tmp_path / "out"
    r = run_reproduce(["--scale", scale, "--out", str(out)], timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: --scale {scale} needs a CUDA GPU") and r.stderr.count("\n") == 1
    assert not out.exists()


def test_preparing_without_the_datasets_package_is_refused_up_front(monkeypatch, tmp_path):
    import importlib.util
    monkeypatch.setattr(paths, "SHARED_DIRS", (str(tmp_path / "shared"),))  # no prepared copy either
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    plan = Plan(reproduce.parse_args(["--scale", "gpu", "--out", str(tmp_path / "o")]))
    with pytest.raises(UserError, match="needs the `datasets` package.*make gpu-data"):
        plans.check_can_prepare(plan)


def test_stage_deadlines_fill_the_budget_in_stage_order(tmp_path):
    plan = Plan(reproduce.parse_args(["--scale", "gpu", "--out", str(tmp_path / "o")]))
    d = gpu_time.stage_deadlines(plan, 1000.0)
    order = ["data"] + [(k, v) for k in ("train", "analyse") for v in plan.args.variant_list] + ["compress"]
    times = [d[k] for k in order]
    assert times == sorted(times) and times[0] > 1000.0
    # the reports' share stays after the last stage's deadline, within the budget
    assert d["compress"] < 1000.0 + plan.budget_s
    assert d["compress"] == pytest.approx(1000.0 + plan.budget_s * (1 - gpu_time.GPU_ASSUMED["report_s"]
                                                                    / plan.estimate["total_s"]))
    assert gpu_time.stage_deadlines(Plan(reproduce.parse_args(["--scale", "tiny"])), 0.0) == {}


STOPPABLE = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: (print('saving', flush=True), sys.exit(0)))\n"
             "time.sleep(60)\n")
STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n"


def test_a_stage_past_its_deadline_is_stopped_like_a_preempted_training(monkeypatch, tmp_path):
    monkeypatch.setattr(running, "REFRESH_S", 0.2)
    monkeypatch.setattr(running, "STAGE_GRACE_S", 1.0)
    plan = Plan(reproduce.parse_args(["--scale", "tiny", "--out", str(tmp_path / "o")]))
    calls = []
    runner = running.Runner(plan, dry_run=False, on_progress=lambda: calls.append(time.time()))
    t0 = time.time()
    rc = runner.run("train stub", [sys.executable, "-c", STOPPABLE], deadline=time.time() + 1.0)
    assert rc == 0 and time.time() - t0 < 20
    assert runner.stages[-1]["status"] == "stopped at its deadline" and runner.stages[-1]["time_limited"]
    assert len(calls) >= 2  # the partial report was rewritten while it ran
    rc = runner.run("stubborn", [sys.executable, "-c", STUBBORN], deadline=time.time() + 0.5)
    assert rc == -signal.SIGKILL and runner.stages[-1]["status"] == f"stopped at its deadline (exit {rc})"
    rc = runner.run("quick", [sys.executable, "-c", "pass"], deadline=time.time() + 30)
    assert rc == 0 and runner.stages[-1]["status"] == "ran" and not runner.stages[-1]["time_limited"]


def _telemetry_log(path, ratios, first_attn, n_layer=12, every=40):
    with open(path, "w", encoding="utf-8") as f:
        for k, (ratio, attn) in enumerate(zip(ratios, first_attn)):
            it = k * every
            rec = {"kind": "outliers", "iter": it}
            for l in range(n_layer):
                r = ratio if l == 3 else 5.0
                rec.update({f"outlier/top1_h/L{l}": r * 0.5, f"outlier/median_h/L{l}": 0.5,
                            f"outlier/ratio_h/L{l}": r, f"outlier/first_attn/L{l}": attn})
            rec.update({"outlier/max_top1_h": max(ratio, 5.0) * 0.5, "outlier/max_ratio_h": max(ratio, 5.0),
                        "outlier/max_first_attn": attn})
            f.write(json.dumps(rec) + "\n")
            f.write(json.dumps({"kind": "train", "iter": it, "loss": 10.0 - k}) + "\n")


def test_partial_report_from_the_telemetry_alone(tmp_path):
    out, report_dir = tmp_path / "out", tmp_path / "copy"
    args = reproduce.parse_args(["--scale", "gpu", "--out", str(out), "--data_dir", str(tmp_path / "data"),
                                 "--report_dir", str(report_dir)])
    plan = Plan(args)
    for v in args.variant_list:
        os.makedirs(plan.run_dir(v))
    _telemetry_log(os.path.join(plan.run_dir("default"), "log.jsonl"), [5, 40, 160, 900], [0.01, 0.2, 0.5, 0.7])
    _telemetry_log(os.path.join(plan.run_dir("attention_bias"), "log.jsonl"), [5, 6, 7], [0.01, 0.02, 0.03])
    os.makedirs(report_dir)
    outcome = running.Outcome()
    outcome.truncated["attention_bias"] = {"iter": 80, "max_iters": plan.train_settings["max_iters"]}
    runner = running.Runner(plan, dry_run=False)
    runner.stages.append({"stage": "train default [1/3]", "command": "python train.py", "status": "ran",
                          "why": "", "seconds": 1.0})
    write_outputs(plan, runner, outcome, time.time(), {"date": "today", "gpu": "test"}, partial=True)
    for d in (out, report_dir):
        report = (d / "REPORT.md").read_text()
        assert "**Partial report**" in report
        assert "**Emergence:** `default`'s largest activation first reached 100x its layer median at iter 80 " \
               "(1,310,720 tokens; 160x)" in report
        assert "First-token attention" in report and "`default` 0.01 -> 0.7 (iter 120)" in report
        assert "`attention_bias` at iter 80 of" in report
        assert "Plan: " in report and "tokens) per variant" in report
        for name in ("outlier_emergence.png", "emergence_by_layer.png", "fig12_loss.png"):
            assert os.path.getsize(d / name) > 1000 and f"]({name})" in report
        doc = json.loads((d / "reproduce.json").read_text())
        assert doc["partial"] is True and doc["plan"]["iters"] == plan.train_settings["max_iters"]
        tele = {r["attention"]: r["telemetry"] for r in doc["runs"]}
        assert tele["default"]["iter"] == [0, 40, 80, 120]
        assert tele["default"]["by_layer"]["ratio_h"][2][3] == 160 and len(tele["default"]["by_layer"]["first_attn"][0]) == 12
        assert tele["default"]["mean_first_attn"] == pytest.approx([0.01, 0.2, 0.5, 0.7])
        assert tele["softmax1"]["iter"] == []


def test_a_budgeted_run_stops_a_training_at_its_deadline_and_analyses_it(tmp_path):
    """The gpu scale's machinery end to end on a CPU: its plan with a 2-layer model and short stage deadlines.
    The real train.py is stopped through its SIGTERM handler, saves, and is analysed as far as it got; the
    partial report is written while it trains."""
    needs_tokenizer()
    data = tmp_path / "data"
    prep = subprocess.run([sys.executable, "prepare_data.py", "--dataset", "builtin", "--out_dir", str(data)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr
    out = tmp_path / "out"
    args = reproduce.parse_args(["--scale", "gpu", "--variants", "default", "--data_dir", str(data), "--out", str(out),
                                 "--num_seqs", "2", "--max_tokens", "1024", "--max_iters", "5000", "--device", "cpu"])
    plan = Plan(args)
    plan.train_settings.update(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=4, eval_iters=2,
                               outlier_interval=5, log_interval=5)
    t0 = time.time()
    # 30 s for the training: several times train.py's start-up here, far short of 5,000 iterations
    rows = [("data", 0), ("train default", 30), ("analyses", 60), ("compression table", 60), ("reports", 10)]
    plan.budget_s = 160.0
    plan.estimate = {"iters": 5000, "tokens_per_variant": 5000 * 256, "total_s": 160.0,
                     "rows": [{"stage": n, "seconds": sec, "what": ""} for n, sec in rows]}
    outcome = running.Outcome()
    calls = []

    def progress():
        calls.append(time.time())
        write_outputs(plan, runner, outcome, t0, {"date": "d", "gpu": "cpu"}, partial=True)
    runner = running.Runner(plan, dry_run=False, on_progress=progress)
    running.execute(plan, runner, outcome, t0)
    write_outputs(plan, runner, outcome, t0, {"date": "d", "gpu": "cpu"}, partial=False)
    assert time.time() - t0 < 160
    train = next(s for s in runner.stages if s["stage"].startswith("train default"))
    assert train["status"] == "stopped at its deadline" and train["time_limited"]
    it = outcome.truncated["default"]["iter"]
    assert 0 < it < 5000 and outcome.failed == {}
    from training.checkpoint import load_checkpoint
    assert load_checkpoint(str(out / "runs" / "default" / "ckpt.pt"))["iter_num"] == it
    with open(out / "runs" / "default" / "outliers" / "outliers.json", encoding="utf-8") as f:
        assert json.load(f)["model"]["iter_num"] == it  # analysed as far as it got
    assert len(calls) >= 3  # after the training, the analysis and the compression at least
    report = (out / "REPORT.md").read_text()
    assert f"`default` at iter {it} of 5000" in report and "Partial report" not in report
    doc = json.loads((out / "reproduce.json").read_text())
    assert doc["runs"][0]["truncated"] == {"iter": it, "max_iters": 5000} and doc["runs"][0]["ppl"]["fp"] > 1


# ------------------------------------------------------------------------------------------- findings

def _run(v, top1, ratio, outliers, w8, sparse, val):
    return {"attention": v, "status": "ok", "max_top1": top1, "max_top1_layer": 1, "max_ratio": ratio,
            "activation_outliers": outliers, "tau": 1000.0, "iter_num": 100, "val_loss": val[-1],
            "ppl": {"fp": 27.0, "w8": 27.0 * (1 + w8), "sparse50": 27.0 * (1 + sparse)},
            "ppl_change": {"w8": w8, "sparse50": sparse},
            "loss_curve": {"iter": [0, 50], "loss": [10.0, 5.0], "eval_iter": [0, 50, 100], "val_loss": val},
            "telemetry": {"iter": [0, 50, 100], "max_top1_h": [1.0, 50.0, top1], "max_ratio_h": [5.0, 90.0, ratio]}}


def test_findings_state_what_the_numbers_show():
    plan = Plan(reproduce.parse_args(["--scale", "tiny"]))
    massive = [_run("default", 3000.0, 2500.0, 40, 2.4, 260.0, [11.0, 4.0, 3.5]),
               _run("scaling", 40.0, 30.0, 0, 0.08, 0.4, [11.0, 3.8, 3.4])]
    text = "\n".join(findings.findings(massive, plan))
    assert "Massive activations in `default`: yes" in text
    assert "`scaling` removes them" in text
    assert "W8 +8.0% (smaller than default's), 50% sparse +40.0% (smaller than default's)" in text
    assert "Below `default`: `scaling`" in text
    assert "not reproduced" not in text and "less than 5%" not in text
    none = [_run("default", 8.0, 6.0, 0, 0.001, 0.01, [11.0, 4.0, 3.5]),
            _run("scaling", 8.5, 6.5, 0, 0.002, 0.005, [11.0, 4.1, 3.6])]
    text = "\n".join(findings.findings(none, plan))
    assert "No massive activations emerged in `default`" in text and "**not reproduced**" in text
    assert "did not grow into a massive activation" in text
    assert "W8 +0.2% (about the same as default's)" in text
    assert "Below `default`: none" in text
    assert "Every variant loses less than 5% perplexity" in text


# ------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The CI smoke run, with `scaling` interrupted at iter 5 beforehand (resumed by reproduce.py),
    then the same command again (everything skipped)."""
    needs_tokenizer()
    out = str(tmp_path_factory.mktemp("reproduce") / "out")
    args = SMOKE + ["--out", out]
    # an interrupted run: the plan's own command, stopped after 5 of its 10 iterations
    plan = Plan(reproduce.parse_args(args))
    prep = subprocess.run(plan.prepare, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr
    cmd = plan.train_command("scaling", resume=False) + ["--max_iters=5"]
    part = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert part.returncode == 0, part.stderr
    first = run_reproduce(args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stamps = {p: os.path.getmtime(p) for v in VARIANTS for p in (
        os.path.join(out, "runs", v, "ckpt.pt"), os.path.join(out, "runs", v, "outliers", "outliers.json"))}
    stamps[os.path.join(out, "compress", "results.json")] = os.path.getmtime(os.path.join(out, "compress", "results.json"))
    second = run_reproduce(args)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {"out": out, "first": first, "second": second, "stamps": stamps, "args": args}


def test_smoke_resumes_the_interrupted_run(smoke):
    out = smoke["out"]
    assert "train scaling [2/2]: resume from iter 5 to iter 10" in smoke["first"].stdout
    assert "train default [1/2]: start to iter 10" in smoke["first"].stdout
    with open(os.path.join(out, "runs", "scaling", "run.json"), encoding="utf-8") as f:
        launches = json.load(f)["launches"]
    assert [(l["init_from"], l["start_iter"], l["end_iter"]) for l in launches] == [("scratch", 0, 5), ("resume", 5, 10)]


def test_json_agrees_with_every_runs_artifacts(smoke):
    out = smoke["out"]
    from training.checkpoint import load_checkpoint
    with open(os.path.join(out, "reproduce.json"), encoding="utf-8") as f:
        doc = json.load(f)
    with open(os.path.join(out, "compress", "results.json"), encoding="utf-8") as f:
        results = {os.path.realpath(os.path.join(REPO, r["checkpoint"])): r for r in json.load(f)}
    assert doc["scale"] == "tiny" and [r["attention"] for r in doc["runs"]] == list(VARIANTS)
    for run in doc["runs"]:
        v = run["attention"]
        run_dir = os.path.join(out, "runs", v)
        ckpt = os.path.join(run_dir, "ckpt.pt")
        assert os.path.realpath(os.path.join(REPO, run["checkpoint"])) == os.path.realpath(ckpt)
        assert run["status"] == "ok"
        it = load_checkpoint(ckpt)["iter_num"]
        assert it == 10 == run["iter_num"]
        evals = [r for r in read_jsonl(os.path.join(run_dir, "log.jsonl")) if r["kind"] == "eval"]
        assert evals[-1]["iter"] == it and run["val_loss"] == evals[-1]["val_loss"]
        with open(os.path.join(run_dir, "outliers", "outliers.json"), encoding="utf-8") as f:
            an = json.load(f)
        assert an["model"]["attention"] == v and an["model"]["iter_num"] == it
        h = an["activation"]["layer_output"]
        assert run["max_top1"] == max(t[0] for t in h["top3"])
        assert run["max_ratio"] == max(h["ratio_top1_median"])
        assert run["activation_outliers"] == h["outliers_total"]
        first = an["attention"]["first_token_mass"]
        assert run["first_token_attention"] == pytest.approx(sum(first) / len(first))
        assert (run["gate"] is not None) == (v == "scaling")
        row = results[os.path.realpath(ckpt)]
        assert row["attention"] == v and row["iter_num"] == it
        assert set(run["ppl"]) >= {"fp", "w8", "sparse50", "w8a8", "w8a8+fp1", "w8a8_static", "w8a8_token", "w4g128",
                                   "kv4"}
        assert run["ppl"] == {m: row["ppl"][m] for m in run["ppl"]}
        assert run["ppl_change"]["w8"] == pytest.approx(row["ppl"]["w8"] / row["ppl"]["fp"] - 1)


def test_report_has_every_variant_figure_and_command(smoke):
    out = smoke["out"]
    with open(os.path.join(out, "REPORT.md"), encoding="utf-8") as f:
        report = f.read()
    with open(os.path.join(out, "reproduce.json"), encoding="utf-8") as f:
        doc = json.load(f)
    per_variant, compression = report.split("## Compression\n")
    for run in doc["runs"]:
        row = next(l for l in per_variant.splitlines() if l.startswith(f"| `{run['attention']}` |"))
        assert f"| {run['val_loss']:.4g} |" in row
        row = next(l for l in compression.splitlines() if l.startswith(f"| `{run['attention']}` |"))
        assert all(f"{run['ppl'][m]:.4g}" in row for m in run["ppl"]) and "w8a8+fp1" in compression
    for name in ("fig11_top1.png", "fig11_top3.png", "fig12_loss.png", "outlier_emergence.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000 and f"]({name})" in report
    assert "No massive activations emerged in `default`" in report  # a 2-layer model after 10 iterations
    assert "python train.py config/reproduce/tiny.py" in report and "compress_eval.py" in report
    assert "torch: `" in report and "gpu: `cpu" in report


def test_rerun_skips_finished_work(smoke):
    out, second = smoke["out"], smoke["second"]
    for i, v in enumerate(VARIANTS, 1):
        assert f"train {v} [{i}/{len(VARIANTS)}]: skipped (finished at iter 10)" in second.stdout
        assert f"analyse {v} [{i}/{len(VARIANTS)}]: skipped" in second.stdout
    assert "compression table: skipped" in second.stdout
    assert "step 0:" not in second.stdout  # train.py was not started
    for path, mtime in smoke["stamps"].items():
        assert os.path.getmtime(path) == mtime, path
    with open(os.path.join(out, "reproduce.json"), encoding="utf-8") as f:
        stages = json.load(f)["stages"]
    assert [s["status"] for s in stages] == ["skipped"] * (1 + 2 * len(VARIANTS) + 1)


def test_run_with_other_settings_is_refused(smoke):
    # 20 iterations change the cosine schedule (lr_decay_iters follows max_iters): not a continuation
    args = [a if a != "10" else "20" for a in smoke["args"]]
    r = run_reproduce(args, timeout=120)
    assert r.returncode == 2
    assert "holds a run with other settings: lr_decay_iters (run 10, now 20)" in r.stderr
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize("outliers, results", [("[1]", "5"), ('{"activation": {}}', "[{}]"), ("null", '{"a": 1}')])
def test_damaged_stage_outputs_count_as_missing(tmp_path, outliers, results):
    """A rerun over stage outputs that are not what the stage writes runs the stage again (whose own output
    rules then decide) instead of ending in a traceback."""
    class Plan:
        def analysis_dir(self, variant):
            return str(tmp_path / variant)

        def compress_dir(self):
            return str(tmp_path / "compress")
    for d in ("default", "compress"):
        (tmp_path / d).mkdir()
    (tmp_path / "default" / "outliers.json").write_text(outliers)
    (tmp_path / "compress" / "results.json").write_text(results)
    assert state.read_outliers(Plan(), "default") is None
    assert state.compress_rows(Plan()) == {}
    good = {"model": {"iter_num": 3}, "activation": {"layer_output": {"top3": [[1.0, 0.5, 0.2]], "median": [0.1]}}}
    (tmp_path / "default" / "outliers.json").write_text(json.dumps(good))
    assert state.read_outliers(Plan(), "default") == good
