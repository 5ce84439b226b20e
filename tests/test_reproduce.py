"""reproduce.py: the plan of every scale, one end-to-end tiny run (with a resumed training), skipping on
re-run, refusal of a run directory trained with other settings, and the report's statements.

The end-to-end checks compare reproduce.json with independent reads of each run's own artifacts
(ckpt.pt, log.jsonl, outliers.json, results.json), never with reproduce.py's own helpers.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import reproduce  # noqa: E402
from common import UserError  # noqa: E402
from conftest import needs_tokenizer  # noqa: E402

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

@pytest.mark.parametrize("scale", ["tiny", "gpu", "paper"])
def test_dry_run_prints_every_command_and_writes_nothing(scale, tmp_path):
    out = tmp_path / "out"
    nproc = ["--nproc_per_node", "8"] if scale == "paper" else []  # (paper's default: this node's GPUs)
    r = run_reproduce(["--scale", scale, "--out", str(out), "--dry_run", *nproc], timeout=120)
    assert r.returncode == 0, r.stderr
    import attention_variants
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
    if scale == "gpu":
        assert all("--compile=True" in l and "--n_layer=12" in l for l in trains)
        assert any("--dataset text --input" in l for l in lines)
    assert not out.exists()


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
])
def test_bad_arguments_are_user_errors(args, message):
    with pytest.raises(UserError, match=message):
        reproduce.parse_args(args)


def test_bad_arguments_exit_2_with_one_line():
    r = run_reproduce(["--scale", "tiny", "--variants", "nope", "--dry_run"], timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: --variants: unknown nope") and r.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------- findings

def _run(v, top1, ratio, outliers, w8, sparse, val):
    return {"attention": v, "status": "ok", "max_top1": top1, "max_top1_layer": 1, "max_ratio": ratio,
            "activation_outliers": outliers, "tau": 1000.0, "iter_num": 100, "val_loss": val[-1],
            "ppl": {"fp": 27.0, "w8": 27.0 * (1 + w8), "sparse50": 27.0 * (1 + sparse)},
            "ppl_change": {"w8": w8, "sparse50": sparse},
            "loss_curve": {"iter": [0, 50], "loss": [10.0, 5.0], "eval_iter": [0, 50, 100], "val_loss": val},
            "telemetry": {"iter": [0, 50, 100], "max_top1_h": [1.0, 50.0, top1], "max_ratio_h": [5.0, 90.0, ratio]}}


def test_findings_state_what_the_numbers_show():
    plan = reproduce.Plan(reproduce.parse_args(["--scale", "tiny"]))
    massive = [_run("default", 3000.0, 2500.0, 40, 2.4, 260.0, [11.0, 4.0, 3.5]),
               _run("scaling", 40.0, 30.0, 0, 0.08, 0.4, [11.0, 3.8, 3.4])]
    text = "\n".join(reproduce.findings(massive, plan))
    assert "Massive activations in `default`: yes" in text
    assert "`scaling` removes them" in text
    assert "W8 +8.0% (smaller than default's), 50% sparse +40.0% (smaller than default's)" in text
    assert "Below `default`: `scaling`" in text
    assert "not reproduced" not in text and "less than 5%" not in text
    none = [_run("default", 8.0, 6.0, 0, 0.001, 0.01, [11.0, 4.0, 3.5]),
            _run("scaling", 8.5, 6.5, 0, 0.002, 0.005, [11.0, 4.1, 3.6])]
    text = "\n".join(reproduce.findings(none, plan))
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
    plan = reproduce.Plan(reproduce.parse_args(args))
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
    from checkpoint import load_checkpoint
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
        assert run["ppl"] == {m: row["ppl"][m] for m in ("fp", "w8", "sparse50")}
        assert run["ppl_change"]["w8"] == pytest.approx(row["ppl"]["w8"] / row["ppl"]["fp"] - 1)


def test_report_has_every_variant_figure_and_command(smoke):
    out = smoke["out"]
    with open(os.path.join(out, "REPORT.md"), encoding="utf-8") as f:
        report = f.read()
    with open(os.path.join(out, "reproduce.json"), encoding="utf-8") as f:
        doc = json.load(f)
    for run in doc["runs"]:
        row = next(l for l in report.splitlines() if l.startswith(f"| `{run['attention']}` |"))
        assert f"| {run['val_loss']:.4g} |" in row and f"{run['ppl']['fp']:.4g}" in row
    for name in ("fig11_top1.png", "fig11_top3.png", "fig12_loss.png", "outlier_emergence.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000 and f"]({name})" in report
    assert "No massive activations emerged in `default`" in report  # a 2-layer model after 10 iterations
    assert "python train.py config/tiny.py" in report and "compress_eval.py" in report
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
