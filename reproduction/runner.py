"""Running the stages: each a subprocess of the repo's own scripts from the repo root (prepare_data.py,
train.py per variant, analyze_outliers.py per checkpoint, one compress_eval.py table), skipped where an
earlier invocation finished it, stopped at its deadline under a --budget_s plan, recorded for the report."""

import os
import platform
import signal
import subprocess
import sysconfig
import time

from reproduction.gpu_time import stage_deadlines
from reproduction.paths import REPO, rel, shared, show
from reproduction.plan import data_ready
from reproduction.state import analysis_current, compress_current, run_state
from runtime.cli import UserError
from runtime.files import atomic_write_json, atomic_write_text

STAGE_GRACE_S = 30     # a training stopped at its deadline gets this long to write its checkpoint
REFRESH_S = 30         # the partial report is rewritten this often while a training runs
PYSOURCE_MAX_BYTES = 96 << 20   # ~30M tokens: several epochs' worth of distinct text at the gpu scale
PYSOURCE_SHARD_BYTES = 1 << 20  # one document of the pysource corpus: source files joined up to ~1 MB


def stage_env():
    """The stages' environment: unbuffered output, and the tiktoken cache of a shared folder when none is set
    (an offline GPU machine carries it in ./shared)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cache = shared("tiktoken_cache")
    if cache and not env.get("TIKTOKEN_CACHE_DIR"):
        env["TIKTOKEN_CACHE_DIR"] = cache
    env.setdefault("WANDB_MODE", "offline")
    return env


class Runner:
    def __init__(self, plan, dry_run, on_progress=None):
        self.plan, self.dry_run = plan, dry_run
        self.stages = []
        self.step = 0
        self.on_progress = on_progress  # rewrites the partial report: between stages, and every REFRESH_S
        self.env = stage_env()

    def say(self, text):
        print(f"[reproduce] {text}", flush=True)

    def progress(self):
        """Rewrite the partial report; a failure to do so is said and never stops the pipeline."""
        if self.on_progress is None or self.dry_run:
            return
        try:
            self.on_progress()
        except Exception as e:  # e.g. a full disk: the stages' own outputs matter more than the report
            self.say(f"could not rewrite the partial report: {type(e).__name__}: {e}")

    def skip(self, name, cmd, why, status="skipped"):
        self.stages.append({"stage": name, "command": show(cmd), "status": status, "why": why, "seconds": 0.0})
        self.say(f"{name}: {status} ({why})")

    def run(self, name, cmd, why="", deadline=None):
        """Run one stage from the repo root; its output goes straight to the terminal. Returns the exit status.
        A stage still running at `deadline` (a time.time() value) gets SIGTERM (train.py then finishes its
        step, writes ckpt.pt and exits 0), and SIGKILL STAGE_GRACE_S later; its record says
        `time_limited`."""
        self.say(f"{name}: {why + ': ' if why else ''}{show(cmd)}")
        if self.dry_run:
            self.stages.append({"stage": name, "command": show(cmd), "status": "planned", "why": why, "seconds": 0.0})
            return 0
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env)
        stopped = []

        def forward(signum, frame):  # train.py checkpoints on SIGTERM; the pipeline stops after it
            stopped.append(signum)
            proc.send_signal(signum)
        previous = signal.signal(signal.SIGTERM, forward)
        try:
            rc, limited = self._wait(name, proc, deadline)
        except KeyboardInterrupt:
            # Ctrl-C reached the child too; train.py then finishes its step and writes ckpt.pt, which
            # subprocess.run would cut short by killing it: wait (a second Ctrl-C kills it)
            self.say(f"{name}: interrupted; waiting for it to stop (a training saves its checkpoint first)")
            try:
                proc.wait()
            except KeyboardInterrupt:
                proc.kill()
                proc.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        seconds = round(time.time() - t0, 1)
        if limited:
            status = "stopped at its deadline" + ("" if rc == 0 else f" (exit {rc})")
        else:
            status = "ran" if rc == 0 else f"failed (exit {rc})"
        self.stages.append({"stage": name, "command": show(cmd), "status": status, "why": why, "seconds": seconds,
                            "time_limited": limited})
        self.say(f"{name}: {status} in {seconds:.1f} s")
        if stopped or (not limited and rc in (-signal.SIGINT, 130, -signal.SIGTERM)):
            raise KeyboardInterrupt
        return rc

    def _wait(self, name, proc, deadline):
        """Wait for `proc`, rewriting the partial report every REFRESH_S and stopping it at `deadline`.
        Returns (exit status, whether the deadline stopped it)."""
        limited, kill_at = False, None
        next_refresh = time.time() + REFRESH_S
        while True:
            wakes = [kill_at] if limited else ([deadline] if deadline is not None else [])
            if self.on_progress is not None:
                wakes.append(next_refresh)
            try:
                return proc.wait(timeout=max(0.05, min(wakes) - time.time()) if wakes else None), limited
            except subprocess.TimeoutExpired:
                pass
            now = time.time()
            if limited and now >= kill_at:
                self.say(f"{name}: still running {STAGE_GRACE_S} s after SIGTERM; killing it")
                proc.kill()
            elif not limited and deadline is not None and now >= deadline:
                self.say(f"{name}: reached its deadline in the --budget_s plan; stopping it (a training "
                         f"writes its checkpoint first)")
                proc.send_signal(signal.SIGTERM)
                limited, kill_at = True, now + STAGE_GRACE_S
            if self.on_progress is not None and now >= next_refresh:
                self.progress()
                next_refresh = time.time() + REFRESH_S


def gather_pysource(plan, runner):
    """The gpu scale's offline corpus: this interpreter's standard-library *.py files (site-packages and
    compiled caches excluded), joined in path order into ~1 MB text shards under DIR/data/pysource_text,
    so that prepare_data.py --dataset text reads a folder (thousands of file names would not fit in
    one command line) and each shard is one document of the train/val draw."""
    folder = os.path.join(plan.out, "data", "pysource_text")
    if os.path.isfile(os.path.join(folder, "SOURCES.txt.json")):
        return
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    runner.say(f"corpus pysource: {len(files):,} *.py files under {root} (at most {PYSOURCE_MAX_BYTES >> 20} MB)")
    if runner.dry_run:
        return
    shards, current, size, total, used = [], [], 0, 0, []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue  # a few test files are deliberately not UTF-8
        n = len(text.encode("utf-8"))
        if total + n > PYSOURCE_MAX_BYTES:
            break
        current.append(f"# {os.path.relpath(path, root)}\n{text}")
        used.append(os.path.relpath(path, root))
        size, total = size + n, total + n
        if size >= PYSOURCE_SHARD_BYTES:
            shards.append("\n\n".join(current))
            current, size = [], 0
    if current:
        shards.append("\n\n".join(current))
    if total < (4 << 20):
        raise UserError(f"only {total >> 10} KB of Python source under {root}: too little for the gpu scale; "
                        f"use --corpus shakespeare, or prepare your own text with prepare_data.py and pass --data_dir")
    for i, text in enumerate(shards):
        atomic_write_text(os.path.join(folder, f"shard_{i:04d}.txt"), text)
    # written last: its presence means the folder is complete (the name keeps it out of the *.txt input)
    atomic_write_json(os.path.join(folder, "SOURCES.txt.json"),
                      {"root": root, "python": platform.python_version(), "files": used, "bytes": total,
                       "shards": len(shards)})


class Outcome:
    """What the stages have done so far: final iteration per variant, failures, runs stopped at their
    deadline, plan-level notes. The partial reports are written from it while the pipeline runs."""

    def __init__(self):
        self.states, self.failed, self.truncated, self.notes = {}, {}, {}, []
        self.done = False


def execute(plan, runner, outcome=None, t0=None):
    """Run (or, dry, print) every stage, recording into `outcome` (returned)."""
    outcome = outcome or Outcome()
    deadlines = stage_deadlines(plan, time.time() if t0 is None else t0)
    prepare_stage(plan, runner, deadlines)
    if plan.args.prepare_only:
        return outcome
    runner.progress()
    for i, v in enumerate(plan.args.variant_list, 1):  # one variant after another
        train_stage(plan, runner, outcome, deadlines, v, i)
        runner.progress()
    done = [v for v in plan.args.variant_list if v not in outcome.failed]
    for i, v in enumerate(done, 1):  # the analysis of every finished run
        analysis_stage(plan, runner, outcome, deadlines, v, f"analyse {v} [{i}/{len(done)}]")
        runner.progress()
    compress_stage(plan, runner, outcome, deadlines)
    outcome.done = True
    return outcome


def prepare_stage(plan, runner, deadlines):
    if plan.prepare is None:
        if not runner.dry_run and not all(os.path.isfile(os.path.join(plan.data_dir, f"{s}.bin")) for s in ("train", "val")):
            raise UserError(f"--data_dir {plan.data_dir} has no train.bin / val.bin; make it with prepare_data.py")
        runner.say(f"data: {rel(plan.data_dir)} ({plan.data_note or 'given with --data_dir'})")
    elif data_ready(plan):
        runner.skip("prepare data", plan.prepare, f"{rel(plan.data_dir)} already prepared")
    else:
        if plan.corpus == "pysource":
            gather_pysource(plan, runner)
        if runner.run("prepare data", plan.prepare, deadline=deadlines.get("data")) != 0:
            raise UserError(f"preparing the data failed (the error is above): {show(plan.prepare)}")


def train_stage(plan, runner, outcome, deadlines, v, i):
    """Train (or resume) variant v; a training cut at its deadline is analysed as far as it got."""
    states, failed = outcome.states, outcome.failed
    state, it = run_state(plan, v)
    name = f"train {v} [{i}/{len(plan.args.variant_list)}]"
    max_iters = plan.train_settings.get("max_iters")
    deadline = deadlines.get(("train", v))
    limited = False
    if state == "done":
        runner.skip(name, plan.train_command(v, resume=True), f"finished at iter {it}")
    elif not runner.dry_run and deadline is not None and time.time() >= deadline:
        runner.skip(name, plan.train_command(v, resume=state == "resume"), "no time left in --budget_s")
        failed[v] = "not trained: the --budget_s plan ran out of time before it"
        return
    else:
        why = "start" if state == "start" else f"resume from iter {it}"
        rc = runner.run(name, plan.train_command(v, resume=state == "resume"),
                        f"{why}" + (f" to iter {max_iters}" if max_iters else ""), deadline=deadline)
        limited = bool(runner.stages and runner.stages[-1].get("time_limited"))
        if rc != 0 and not limited:
            failed[v] = f"training failed (exit {rc}); re-run reproduce.py to resume it"
            return
    if runner.dry_run:
        states[v] = max_iters
        return
    state, states[v] = run_state(plan, v)
    if state != "done" and limited and states[v] > 0:
        outcome.truncated[v] = {"iter": states[v], "max_iters": max_iters}  # analysed as far as it got
    elif state != "done":  # e.g. stopped by a signal sent to train.py alone: it exits 0 after checkpointing
        failed[v] = f"training stopped at iter {states[v]}; re-run reproduce.py to resume it"


def analysis_stage(plan, runner, outcome, deadlines, v, name):
    cmd, states, failed = plan.analysis_command(v), outcome.states, outcome.failed
    deadline = deadlines.get(("analyse", v))
    if not runner.dry_run and analysis_current(plan, v, states[v]):
        runner.skip(name, cmd, f"{rel(plan.analysis_dir(v))}/outliers.json covers iter {states[v]}")
    elif not runner.dry_run and deadline is not None and time.time() >= deadline:
        runner.skip(name, cmd, "no time left in --budget_s")
        failed[v] = "not analysed: the --budget_s plan ran out of time (its telemetry is still reported)"
    elif runner.run(name, cmd, deadline=deadline) != 0:
        failed[v] = "analysis failed; re-run reproduce.py to retry"


def compress_stage(plan, runner, outcome, deadlines):
    """The compression table over every variant that was trained and analysed."""
    done = [v for v in plan.args.variant_list if v not in outcome.failed]
    if not done:
        return
    cmd = plan.compress_command(done)
    deadline = deadlines.get("compress")
    if not runner.dry_run and compress_current(plan, {v: outcome.states[v] for v in done}):
        runner.skip("compression table", cmd, f"{rel(plan.compress_dir())}/results.json covers these checkpoints")
    elif not runner.dry_run and deadline is not None and time.time() >= deadline:
        runner.skip("compression table", cmd, "no time left in --budget_s")
        outcome.notes.append("The compression table was not made: the --budget_s plan ran out of time.")
    elif runner.run("compression table", cmd, deadline=deadline) != 0:
        outcome.notes.append("The compression evaluation failed (its error is in the command output); "
                             "re-run reproduce.py to retry.")
