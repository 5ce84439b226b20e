"""benchmarks/gpu_check.py (`make gpu-check`): refuses without a GPU; its plan fits the budget by
construction and shrinks with --budget_s; a run of stub steps interrupted at any point leaves valid
JSON of the steps that finished; steps overrunning their limit are stopped with their children; it
turns the benchmark scripts' JSON into gpu-check.json rows and the RESULTS.md section. The numbers
below are made up for the test and never written to the repo."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    return importlib.import_module("benchmarks.gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(capsys, tmp_path):
    out = tmp_path / "gpu-check.json"
    assert load().main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def fake_attention_doc():
    def row(variant, impl, T, ms, mem):
        return {"variant": variant, "impl": impl, "T": T, "D": 64, "status": "ok", "fwdbwd_ms": ms,
                "fwdbwd_tflops": 100.0 / ms, "peak_mib_fwdbwd": mem}
    return {"results": [row("default", "sdpa", 1024, 1.0, 100.0), row("default", "fused", 1024, 0.8, 110.0),
                        row("softmax1", "fused", 1024, 1.0, 120.0), row("softmax1", "unfused", 1024, 4.0, 400.0),
                        {"variant": "sigmoid", "impl": "fused", "T": 1024, "D": 64, "status": "OOM"}],
            "tile_configs": []}


def test_attention_rows_are_ratios_of_times_and_memory():
    rows = {r["variant"]: r for r in load().attention_rows([fake_attention_doc()])}
    assert set(rows) == {"default", "softmax1"}  # failed cases are left out
    assert rows["default"]["ratio_vs_sdpa"] == 1.25 and rows["default"]["ratio_vs_default"] == 1.0
    assert rows["softmax1"]["ratio_vs_sdpa"] == 1.0 and rows["softmax1"]["ratio_vs_default"] == 0.8
    assert rows["softmax1"]["ratio_vs_unfused"] == 4.0 and rows["softmax1"]["peak_mem_ratio_vs_sdpa"] == 1.2
    assert rows["default"]["ratio_vs_unfused"] is None


def test_results_md_section_is_regenerated(tmp_path):
    gc = load()
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# Results\n\n{gc.BEGIN}\nold text\n{gc.END}\n\n## CPU\nkept\n")
    doc = {"metadata": {"gpu": "Test GPU", "date": "d", "git_commit": "c", "torch": "t", "triton": "tr",
                        "command": "python -m benchmarks.gpu_check"},
           "attention": gc.attention_rows([fake_attention_doc()]),
           "train": gc.train_rows([{"compile": True, "results": [
               {"variant": "default", "backend": "triton", "status": "ok", "tokens_per_s": 1234.5, "mfu": 0.5}]}]),
           "timings": {"analyze_outliers_100x1024_s": 1.0},
           "steps": {"gpu_tests": {"status": "ok"}, "train_compile": {"status": "failed"}}}
    gc.update_results_md(doc, str(md))
    text = md.read_text()
    assert "old text" not in text and text.endswith("## CPU\nkept\n") and text.count(gc.BEGIN) == 1
    assert "| default | 1024 | 64 | 125.0 | 1.25 | 1.0 | None | 1.1 |" in text
    assert "| default | triton | True | 1,234 | 50.0% |" in text and "Steps that did not pass: train_compile" in text


# ------------------------------------------------------------------------------------------- the plan

def test_default_plan_fits_the_8_minute_budget_by_construction():
    gc = load()
    assert gc.BUDGET_S == 480
    plan, notes = gc.make_plan(gc.BUDGET_S)
    planned = sum(form.planned_s for _, form in plan)
    assert planned + gc.RESERVE_S <= gc.BUDGET_S * (1 - gc.SLACK)
    names = [step.name for step, _ in plan]
    # the kernel targets, both training measurements, the timings, issue 17's CUDA-graph step, the GPU tests
    assert names == ["attention_short", "train_eager", "train_compile", "attention_long", "analyze_outliers",
                     "compress_eval", "host_overhead", "gpu_tests"]
    assert dict((s.name, f.label) for s, f in plan)["attention_short"] == "T = 1024, 2048"
    assert any(n.startswith("gpu_tests: shortened") for n in notes)
    # the full forms alone would not fit: the plan really was trimmed, and says so
    assert sum(s.forms[0].planned_s for s in gc.STEPS) + gc.RESERVE_S > gc.BUDGET_S * (1 - gc.SLACK)
    host = next(s for s, _ in plan if s.name == "host_overhead")
    assert host.requires == "benchmarks/host_overhead.py"
    assert {"--device", "cuda", "--seq_lens", "1024", "2048", "--out"} <= set(host.forms[0].args)
    for step in gc.STEPS:  # every planned time says where it comes from
        assert all(f.basis and f.planned_s > 0 for f in step.forms)
    assert {name for name, _ in gc.REDUCTIONS} == {s.name for s in gc.STEPS}


@pytest.mark.parametrize("budget", [400, 300, 200, 120, 90])
def test_budget_shrinks_the_plan_and_says_how(budget):
    gc = load()
    plan, notes = gc.make_plan(budget)
    full, _ = gc.make_plan(10_000)
    assert sum(f.planned_s for _, f in plan) <= gc.available_s(budget)
    assert [s.name for s, _ in plan][0] == "attention_short"  # never dropped
    dropped = {s.name for s, _ in full} - {s.name for s, _ in plan}
    for name in dropped:
        assert any(n.startswith(f"{name}: dropped") for n in notes), (name, notes)
    for step, form in plan:
        if form is not step.forms[0]:
            assert any(n.startswith(f"{step.name}: shortened") for n in notes)
    text = gc.plan_text(plan, notes, budget)
    assert f"--budget_s {budget}" in text and "planned s" in text


def test_full_plan_without_a_tight_budget_and_a_budget_too_small():
    gc = load()
    plan, notes = gc.make_plan(10_000)
    assert all(form is step.forms[0] for step, form in plan) and notes == []
    with pytest.raises(gc.UserError, match="--budget_s 60 is too small"):
        gc.make_plan(60)


def test_plan_flag_prints_the_table_without_a_gpu(capsys):
    assert load().main(["--plan", "--budget_s", "300"]) == 0
    out = capsys.readouterr().out
    assert "gpu-check plan for --budget_s 300" in out and "attention_short" in out and "dropped" in out


def test_too_small_budget_is_one_line(capsys):
    assert load().main(["--plan", "--budget_s", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --budget_s 10 is too small") and err.count("\n") == 1


# ------------------------------------------------------------------------------------------- running

STUB_RUNNER = textwrap.dedent("""
    import json, os, sys
    from benchmarks import gpu_check as gc
    def stub(name, code, planned=30.0, requires=None):
        return gc.Step(name, "stub " + name, (gc.Form("stub", ("-c", code), planned, "test"),), requires=requires)
    plan = [(s, s.forms[0]) for s in (
        stub("first", "print('one')"),
        stub("second", "import time; time.sleep(0.3); print('two')"),
        stub("absent", "print('never')", requires="benchmarks/no_such_script.py"),
        stub("hangs", "import time; print('started', flush=True); time.sleep(600)"),
    )]
    gc.run_plan(plan, ["a note"], budget_s=900, out=sys.argv[1], results_md=sys.argv[2],
                meta={{"gpu": "stub", "command": "stub"}}, env=dict(os.environ), work=sys.argv[3])
""")


def _read_json_when(path, ready, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with open(path) as f:
                doc = json.load(f)
            if ready(doc):
                return doc
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached the expected state")


def test_a_run_cut_off_mid_step_leaves_valid_json_of_the_finished_steps(tmp_path):
    gc = load()
    out, md, work = tmp_path / "gpu-check.json", tmp_path / "RESULTS.md", tmp_path / "work"
    work.mkdir()
    md.write_text(f"# Results\n\n{gc.BEGIN}\nold\n{gc.END}\n")
    proc = subprocess.Popen([sys.executable, "-c", STUB_RUNNER.format(repo=REPO), str(out), str(md), str(work)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # as soon as the JSON lists the skipped step, the hanging one is running: cut the whole run off there
        doc = _read_json_when(out, lambda d: "absent" in d["steps"])
        time.sleep(0.3)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with open(out) as f:
        doc = json.load(f)  # valid JSON, not a half-written file
    assert doc["complete"] is False
    assert doc["finished_steps"] == ["first", "second", "absent"] and doc["not_run"] == ["hangs"]
    assert doc["steps"]["first"]["status"] == "ok" and "one" in doc["steps"]["first"]["tail"]
    assert doc["steps"]["second"]["status"] == "ok"
    assert doc["steps"]["absent"]["status"] == "skipped"
    assert "no_such_script.py is not in this checkout" in doc["steps"]["absent"]["note"]
    assert [r["step"] for r in doc["plan"]] == ["first", "second", "absent", "hangs"]
    text = md.read_text()
    assert "old" not in text and "**Incomplete:**" in text and "steps not run: hangs" in text
    assert "| absent | stub | 30 | 45 | 0.0 | skipped: benchmarks/no_such_script.py is not in this checkout |" in text
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_step_over_its_limit_is_stopped_with_its_children_and_the_plan_goes_on(tmp_path, monkeypatch):
    gc = load()
    monkeypatch.setattr(gc, "LIMIT_FACTOR", 1.0)
    pid_file = tmp_path / "child.pid"
    # the step starts a grandchild that would outlive a plain kill of the step's own process
    hang = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('waiting', flush=True); time.sleep(600)")
    plan = [(gc.Step("slow", "stub", (gc.Form("stub", ("-c", hang), 2.0, "test"),)), None),
            (gc.Step("after", "stub", (gc.Form("stub", ("-c", "print('after')"), 5.0, "test"),)), None)]
    plan = [(s, s.forms[0]) for s, _ in plan]
    t0 = time.time()
    doc = gc.run_plan(plan, [], budget_s=900, out=str(tmp_path / "g.json"), results_md=None,
                      meta={"gpu": "stub", "command": "stub"}, env=dict(os.environ), work=str(tmp_path))
    assert time.time() - t0 < 30
    assert doc["complete"] is True and doc["steps"]["slow"]["status"] == "timed out"
    assert doc["steps"]["slow"]["timeout_s"] == 2 and "waiting" in doc["steps"]["slow"]["tail"]
    assert doc["steps"]["after"]["status"] == "ok"
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild went down with the step's process group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the step's child process outlived the time limit")


def test_steps_that_no_longer_fit_before_the_deadline_are_skipped(tmp_path):
    gc = load()
    step = gc.Step("late", "stub", (gc.Form("stub", ("-c", "print(1)"), 100.0, "test"),))
    doc = gc.run_plan([(step, step.forms[0])], [], budget_s=40, out=str(tmp_path / "g.json"), results_md=None,
                      meta={"gpu": "stub", "command": "stub"}, env=dict(os.environ), work=str(tmp_path))
    assert doc["steps"]["late"]["status"] == "skipped" and "100 s planned" in doc["steps"]["late"]["note"]


def test_host_overhead_result_is_read_from_its_file_or_its_json_line(tmp_path):
    gc = load()
    assert gc.read_host_overhead(str(tmp_path), {"tail": "noise\n{\"fwd_us\": 31.5}\n"}) == {"fwd_us": 31.5}
    (tmp_path / "host_overhead.json").write_text(json.dumps({"fwd_us": 12.0, "gpu": {"x": 1}}))
    assert gc.read_host_overhead(str(tmp_path), {"tail": ""})["fwd_us"] == 12.0
