"""Train (or fine-tune) one GPT-2 attention variant: single process on CPU / one GPU, or DDP under torchrun.

    python train.py config/tiny.py                                     # minutes on a CPU
    python train.py config/default.py --batch_size=8 --compile=False   # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/scaling.py
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train.py config/sigmoid.py          # (and node_rank=1 on the other)
    python train.py config/scaling.py --init_from=resume               # continue out_dir/ckpt.pt exactly

Configuration (training/config.py): the defaults of `TrainConfig`, then each config file given (in order), then each
`--key=value` (in order). A config file is plain Python executed in a fresh namespace; every public
name it defines must be a known key of the right type. `python train.py --help` lists the keys.

Outputs in `out_dir`: `ckpt.pt` (latest, written atomically; everything needed for an exact resume),
optional snapshots `ckpt_{iter}.pt` (model weights only, for studying outliers over training),
`log.jsonl` (one JSON object per logged step, evaluation and outlier telemetry) and `run.json`
(resolved config, command, git commit, library versions, GPU; one entry per launch).

Exactness: data windows are drawn from one generator seeded by `seed`, identical on every rank, for
the whole global batch; rank r takes its slice. The data order thus does not depend on the number of
ranks, and (dropout aside) world_size x (gradient_accumulation_steps / world_size) computes the same
update for any world size. Its state, the RNG states of every rank, the optimizer and grad scaler are
all in ckpt.pt; `--init_from=resume` with the same world size continues bit for bit on CPU.

Preemption: SIGTERM, SIGINT and SIGUSR1 make every rank finish the current step, write ckpt.pt and
exit with status 0 (a second SIGINT aborts at once). Under torchrun the workers have the agent's
grace period (30 s by default) after the agent forwards a SIGTERM.

Divergence: a non-finite training loss or gradient norm (checked before the optimizer applies the
step, all ranks together), a non-finite evaluation loss, or non-finite weights about to be saved
stop the run with exit status 3 and a one-line error saying which checkpoint is the last good one.
ckpt.pt is never overwritten by a diverged state. The step is neither skipped nor retried: the data
order and state are deterministic, so a retry diverges again, and skipping hides an instability that
needs a lower learning rate (or more warmup / clipping) on resume. (fp16's GradScaler still skips
its own overflow steps: an inf gradient norm is only divergence when no scaler is in use.)

One run per out_dir: rank 0 holds an flock on out_dir/train.lock (which names host and pid) for the
whole run; a second training into the same directory stops at once with exit status 2.
"""

import contextlib
import dataclasses
import math
import os
import random
import re
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from analysis.telemetry import training_telemetry
from model import GPT, GPTConfig
from runtime.cli import UserError, cli_main, one_line
from runtime.files import atomic_write_json, check_regular_file
from runtime.outputs import file_stat, unchanged_since
from runtime.system import autocast_context, resolve_dtype, run_metadata
from training.checkpoint import (all_finite, forward_loss, largest_weight, load_checkpoint, load_model, model_args_from,
                                 save_checkpoint)
from training.config import CONFIG_KEYS, FREE_ON_RESUME, MODEL_KEYS, SHAPE_KEYS, format_config, parse_config, print_help
from training.data import Batches, check_data, check_same_data, data_record
from training.run import JsonlLog, check_memory, read_run_record, replaced_run_record, run_context, truncate_log
from training.state import (RESUME_FIX, TrainCheckpoint, check_resume_state, load_optimizer_state, rng_state,
                            set_rng_state)

OUTPUT_FILES = ("ckpt.pt", "run.json", "log.jsonl")
SNAPSHOT = re.compile(r"ckpt_(\d+)\.pt")  # ckpt_{iter}.pt
RUN_FILE = re.compile(rf"ckpt\.pt|run\.json|log\.jsonl|{SNAPSHOT.pattern}")  # what a training writes into out_dir


class Diverged(UserError):
    """Training produced a non-finite loss, gradient norm or weight."""
    exit_status = 3


# ================================================================================================ schedule

def get_lr(cfg, it):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


# ================================================================================================ the state

@dataclass
class TrainState:
    """What the loop works on, built once by build(). The counters go into the checkpoint."""
    model: torch.nn.Module                       # the raw model: weights, checkpoints, telemetry
    eval_model: torch.nn.Module                  # what evaluation calls: the compiled model, or the model
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_batches: Batches
    eval_batches: dict                           # split -> (Batches, fixed window offsets (eval_iters, batch_size))
    X_fixed: torch.Tensor                        # the telemetry batch: the first validation batch
    autocast: contextlib.AbstractContextManager
    tokens_per_iter: int
    ckpt_path: str
    log_path: str
    log: Optional[JsonlLog] = None               # rank 0's log.jsonl (and wandb)
    run_record: dict = dataclasses.field(default_factory=dict)
    iter_num: int = 0
    best_val_loss: float = math.inf
    last_eval_iter: int = -1
    last_telemetry_iter: int = -1
    saved_at: Optional[int] = None               # the iteration ckpt.pt holds (None: none written by this run)
    wandb_id: Optional[str] = None
    pretrained_from: Optional[str] = None
    start_iter: int = 0                          # the iteration this launch started at (no step taken before it)
    data: Optional[dict] = None                  # data_record of the data this launch trains on
    replaced_data: Optional[dict] = None         # the run's earlier data record (resume_on_new_data), else None
    snapshots: dict = dataclasses.field(default_factory=dict)  # this run's snapshots run.json records (owned_snapshots)

    def checkpoint(self, cfg, rng, world_size, kind="train"):
        return TrainCheckpoint(
            model=self.model.state_dict(), model_args=model_args_from(self.model.config), iter_num=self.iter_num,
            config=dataclasses.asdict(cfg), kind=kind, optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None,
            sampler=self.train_batches.state_dict(), rng=rng, world_size=world_size,
            best_val_loss=self.best_val_loss, last_eval_iter=self.last_eval_iter,
            last_telemetry_iter=self.last_telemetry_iter, log_offset=self.log.offset() if self.log else None,
            wandb_run_id=self.wandb_id, pretrained_from=self.pretrained_from, data=self.data)

    def restore(self, ckpt, path):
        """The optimizer, scaler, sampler and counters of a TrainCheckpoint."""
        load_optimizer_state(self.optimizer, ckpt.optimizer, path)
        if ckpt.scaler:
            try:
                self.scaler.load_state_dict(ckpt.scaler)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise UserError(f"{path}: scaler is not a grad scaler state ({one_line(e, 120)}); {RESUME_FIX}") from None
        self.iter_num, self.best_val_loss = int(ckpt.iter_num), float(ckpt.best_val_loss)
        self.last_eval_iter, self.last_telemetry_iter = int(ckpt.last_eval_iter), int(ckpt.last_telemetry_iter)
        self.train_batches.load_state_dict(ckpt.sampler)
        self.wandb_id = ckpt.wandb_run_id
        self.start_iter = self.iter_num


# ================================================================================================ build

def build(cfg, origin, run):
    """The TrainState of this launch. Everything it reads is checked before anything in out_dir is written."""
    configure_torch(cfg, run)
    ptdtype = resolve_dtype(cfg.dtype, run.device)
    data_dir = cfg.data_dir or os.path.join("data", cfg.dataset)
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    ckpt = load_resume(cfg, run, ckpt_path) if cfg.init_from == "resume" else None
    if ckpt is None:
        refuse_to_replace_a_run(cfg, ckpt_path)
    # every file of the run directory this launch reads or replaces, checked before anything is written
    check_regular_file(log_path, "training log")
    keeps_record = ckpt is not None or cfg.eval_only
    record_path = os.path.join(cfg.out_dir, "run.json")
    previous_record = read_run_record(record_path) if keeps_record else replaced_run_record(record_path)
    snapshots = owned_snapshots(cfg.out_dir, previous_record)
    check_snapshot_names(cfg, ckpt.iter_num if ckpt is not None else 0, snapshots)
    check_memory(cfg, run.device)
    meta = check_data(cfg, data_dir)
    data = data_record(data_dir, meta)
    replaced_data = None
    if ckpt is not None:
        replaced_data = check_same_data(cfg, ckpt_path, ckpt.data or previous_record.get("data"), data)
    run.log(format_config(cfg, origin))
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    run.log(f"world size {run.world}, {run.local_accum} micro-steps of {cfg.batch_size} x {cfg.block_size} "
            f"tokens per rank: {tokens_per_iter:,} tokens per iteration, "
            f"{tokens_per_iter * cfg.max_iters:,} over max_iters={cfg.max_iters:,}")
    with run.quiet():
        model, pretrained_from = build_model(cfg, run, ckpt, data_dir)
        model.to(run.device)
        optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                               run.device_type)
    train_batches, eval_batches = make_batches(cfg, data_dir, run.device)
    val_batches, val_offsets = eval_batches["val"]
    X_val, Y_val = val_batches.get(val_offsets[0])
    state = TrainState(model=model, eval_model=model, optimizer=optimizer,
                       scaler=torch.amp.GradScaler(run.device_type, enabled=(ptdtype == torch.float16)),
                       train_batches=train_batches, eval_batches=eval_batches, X_fixed=X_val,
                       autocast=autocast_context(run.device, ptdtype), tokens_per_iter=tokens_per_iter,
                       ckpt_path=ckpt_path, log_path=log_path, pretrained_from=pretrained_from, data=data,
                       replaced_data=replaced_data, snapshots=snapshots)
    if ckpt is not None:
        state.restore(ckpt, ckpt_path)
    loss = forward_loss(model, X_val, Y_val, state.autocast)
    if run.any_rank(not math.isfinite(loss))[0]:  # before anything is written, and before a step could be blamed
        run.fail(overflow_before_training(cfg, state, ptdtype, f"the loss on the first validation batch is {loss}"))
    state.eval_model = torch.compile(model) if cfg.compile else model  # no DDP: evaluation
    run.step_model = state.eval_model
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        run.step_model = DDP(state.eval_model, device_ids=[run.local_rank] if run.device_type == "cuda" else None)
    if run.master:
        open_outputs(cfg, run, state, ckpt, previous_record)
    seed_rngs(cfg, run, ckpt, state.iter_num)
    return state


def configure_torch(cfg, run):
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if run.device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls


def load_resume(cfg, run, ckpt_path):
    """The TrainCheckpoint --init_from=resume continues, checked as data and against the config."""
    if not os.path.exists(ckpt_path):
        raise UserError(f"--init_from=resume: {ckpt_path} does not exist; start with --init_from=scratch "
                        f"(or point --out_dir at the run to continue)")
    raw = load_checkpoint(ckpt_path, map_location="cpu")
    missing = TrainCheckpoint.missing_resume_keys(raw)
    if missing:
        raise UserError(f"cannot resume from {ckpt_path}: it is a weights-only {raw.get('kind', 'checkpoint')} "
                        f"(iter {raw['iter_num']})"
                        f" without the {' and '.join(missing)} state an exact resume "
                        f"needs; resume from the ckpt.pt train.py wrote, or analyse this file with "
                        f"analyze_outliers.py")
    ckpt = TrainCheckpoint.from_checkpoint(raw)
    check_resume_state(ckpt_path, ckpt)
    check_resume_config(cfg, run, ckpt, ckpt_path)
    return ckpt


def owned_snapshots(out_dir, record):
    """{name: file_stat} of the snapshots run.json records as this run's that nobody changed (or removed) since:
    the only ckpt_N.pt files training replaces or deletes."""
    recorded = record.get("snapshots")
    if not isinstance(recorded, dict):
        return {}
    return {n: st for n, st in recorded.items() if isinstance(n, str) and SNAPSHOT.fullmatch(n)
            and os.path.lexists(os.path.join(out_dir, n)) and unchanged_since(out_dir, n, st)}


def check_snapshot_names(cfg, start_iter, owned):
    """The snapshots this launch will write must not replace a ckpt_N.pt that is not the run's own (copied from
    another run, or the user's): refused before anything is written."""
    if not cfg.snapshot_interval or cfg.eval_only or not os.path.isdir(cfg.out_dir):
        return
    for name in sorted(os.listdir(cfg.out_dir)):
        m = SNAPSHOT.fullmatch(name)
        if not m or name in owned or name != f"ckpt_{int(m[1])}.pt":
            continue
        it = int(m[1])
        if start_iter < it <= cfg.max_iters and it % cfg.snapshot_interval == 0:
            raise UserError(f"{os.path.join(cfg.out_dir, name)} is not a snapshot of this run (run.json does not "
                            f"record it, or it changed since), and this run's snapshot at iter {it} would replace it: "
                            f"move it away, or choose another --out_dir")


def overflow_before_training(cfg, state, dtype, what):
    """The error for a forward that is not finite before this launch took a step: the learning rate is not the
    cause; the weights, the model settings or float16's range are."""
    if dtype == torch.float16:
        cause = "float16's range (65504) is too small for the activations: use --dtype=bfloat16 or float32"
    elif cfg.init_from == "scratch":
        bias = f", e.g. sigmoid_bias = {cfg.sigmoid_bias:g}" if cfg.sigmoid_bias is not None else ""
        cause = f"the model settings make the forward pass overflow{bias}: change them"
    else:
        source = state.ckpt_path if cfg.init_from == "resume" else cfg.init_from
        cause = (f"the weights of {source} make the forward pass overflow (largest magnitude "
                 f"{largest_weight(state.model):.3g}): they are damaged; use another copy or an earlier checkpoint")
    return UserError(f"{what} at iter {state.iter_num}, before any training step of this launch, so the learning "
                     f"rate is not the cause; {cause}")


def refuse_to_replace_a_run(cfg, ckpt_path):
    """A start (scratch or pretrained weights) in an out_dir that holds a run's files (its checkpoint, log,
    record or snapshots) needs --overwrite, which replaces those files alone."""
    held = sorted(n for n in os.listdir(cfg.out_dir) if RUN_FILE.fullmatch(n)) if os.path.isdir(cfg.out_dir) else []
    if not held or cfg.overwrite:
        return
    what = ckpt_path if "ckpt.pt" in held else ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    if cfg.eval_only:  # its log and run record would get an evaluation of other weights
        raise UserError(f"{cfg.out_dir} holds a run ({what}); --eval_only with --init_from="
                        f"{cfg.init_from} would log an evaluation of other weights into it: evaluate the run "
                        f"with --init_from=resume --eval_only=True, or choose another --out_dir")
    if "ckpt.pt" in held:
        raise UserError(f"{cfg.out_dir} already holds a run ({ckpt_path}); continue it with --init_from=resume, "
                        f"or pass --overwrite=True to start over, or choose another --out_dir")
    raise UserError(f"{cfg.out_dir} holds the files of a training run ({what}) but no ckpt.pt to continue; pass "
                    f"--overwrite=True to start over there (the run's own files are replaced), or choose another "
                    f"--out_dir")


def check_resume_config(cfg, run, ckpt, ckpt_path):
    """A resume keeps the checkpoint's model (an error otherwise); other changed settings get a warning."""
    args = ckpt.model_args
    if ckpt.pretrained_from:  # the shape came from the OpenAI weights, not from the config
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias"):
            setattr(cfg, key, args[key])
    diffs = [f"{k} (checkpoint {args[k]!r}, config {getattr(cfg, k)!r})" for k in SHAPE_KEYS
             if k in args and args[k] != getattr(cfg, k)]
    if diffs:
        raise UserError(f"cannot resume {ckpt_path}: the model differs from the checkpoint's in "
                        f"{'; '.join(diffs)}. Resume with the original config (saved in "
                        f"{os.path.join(cfg.out_dir, 'run.json')}) plus --init_from=resume")
    old = ckpt.config or {}
    changed = [f"{k}: {old[k]!r} -> {getattr(cfg, k)!r}" for k in CONFIG_KEYS
               if k in old and k not in FREE_ON_RESUME and old[k] != getattr(cfg, k)]
    if changed:
        run.log(f"warning: resuming with changed settings ({'; '.join(changed)}); the run will not continue "
                f"exactly as the uninterrupted one would")


def build_model(cfg, run, ckpt, data_dir):
    """(model in train mode on the CPU, the pretrained weights' name or None)."""
    if ckpt is not None:
        model, _ = load_model(ckpt.to_checkpoint(), device="cpu", dropout=cfg.dropout, attn_backend=cfg.attn_backend)
        return model.train(), ckpt.pretrained_from
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and for every world size
    if cfg.init_from == "scratch":
        model = GPT(GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS}))
    else:
        model, _ = load_model(pretrained=cfg.init_from, device="cpu", attention=cfg.attention, dropout=cfg.dropout,
                              attn_backend=cfg.attn_backend, sigmoid_bias=cfg.sigmoid_bias)
        model.train()
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias"):
            if getattr(cfg, key) != getattr(model.config, key):
                run.log(f"note: {key} = {getattr(model.config, key)} from {cfg.init_from} (config said "
                        f"{getattr(cfg, key)})")
                setattr(cfg, key, getattr(model.config, key))
        check_data(cfg, data_dir)
    run.log(f"model: {cfg.attention} attention, {model.get_num_params() / 1e6:.2f}M parameters")
    return model, None if cfg.init_from == "scratch" else cfg.init_from


def make_batches(cfg, data_dir, device):
    """One train generator shared (identically) by all ranks; fixed evaluation windows per split."""
    train = Batches(os.path.join(data_dir, "train.bin"), cfg.block_size, device, cfg.seed, cfg.vocab_size)
    evals = {}
    for i, split in enumerate(("train", "val")):
        b = Batches(os.path.join(data_dir, f"{split}.bin"), cfg.block_size, device, cfg.seed + 1 + i, cfg.vocab_size)
        evals[split] = (b, b.draw(cfg.eval_iters * cfg.batch_size).view(cfg.eval_iters, cfg.batch_size))
    return train, evals


def open_outputs(cfg, run, state, ckpt, previous_record):
    """Rank 0: out_dir's leftovers cleared, log.jsonl opened (wandb too), run.json with this launch."""
    for name in os.listdir(cfg.out_dir):  # temp files of writes killed midway: ours alone, as we hold the lock
        ours = name.startswith(".ckpt") or any(name.startswith(f".{f}.") for f in OUTPUT_FILES)
        if ours and name.endswith(".tmp"):
            os.remove(os.path.join(cfg.out_dir, name))
    if ckpt is not None:
        truncate_log(state.log_path, ckpt.log_offset)
    elif not cfg.eval_only:  # start over: the old run's log and the snapshots its run.json records go
        for name in ["log.jsonl", *state.snapshots]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(cfg.out_dir, name))
        state.snapshots = {}
    wandb_run = None
    if cfg.wandb_log:
        wandb_run, state.wandb_id = init_wandb(cfg, state.wandb_id)
    state.log = JsonlLog(state.log_path, wandb_run)
    start = ckpt is None and not cfg.eval_only
    state.run_record = run_record(cfg, run, state, {} if start else previous_record)
    atomic_write_json(os.path.join(cfg.out_dir, "run.json"), state.run_record)


def run_record(cfg, run, state, record):
    """run.json: the resolved config and model, the data, and one entry per launch (this one 'running')."""
    launch = {**run_metadata(run.device), "init_from": cfg.init_from, "start_iter": state.iter_num,
              "world_size": run.world, "status": "running", "end_iter": None}
    record = dict(record)
    record["config"] = dataclasses.asdict(cfg)
    record["model_args"] = dataclasses.asdict(state.model.config)
    record["num_params"] = state.model.get_num_params()
    record["tokens_per_iter"] = state.tokens_per_iter
    if state.replaced_data is not None:  # --resume_on_new_data: the data trained on until now stays on record
        earlier = record.get("previous_data") if isinstance(record.get("previous_data"), list) else []
        record["previous_data"] = [*earlier, {**state.replaced_data, "until_iter": state.iter_num}]
    record["data"] = state.data
    record["snapshots"] = state.snapshots
    record["wandb_run_id"] = state.wandb_id
    record.setdefault("launches", []).append(launch)
    return record


def init_wandb(cfg, wandb_id):
    try:
        import wandb
        wandb_id = wandb_id or secrets.token_hex(4)  # os.urandom: leaves the seeded RNGs alone
        run = wandb.init(project=cfg.wandb_project, id=wandb_id, resume="allow",
                         name=cfg.wandb_run_name or f"{cfg.attention}-{os.path.basename(os.path.abspath(cfg.out_dir))}",
                         config=dataclasses.asdict(cfg))
    except Exception as e:
        raise UserError(f"wandb could not start ({type(e).__name__}: {one_line(e, 200)}); run "
                        f"`wandb login`, set WANDB_MODE=offline, or pass --wandb_log=False") from None
    return run, wandb_id


def seed_rngs(cfg, run, ckpt, iter_num):
    """Model init used `seed` on every rank; the training streams are per rank (restored on a resume)."""
    if ckpt is not None and ckpt.world_size == run.world and ckpt.rng:
        set_rng_state(ckpt.rng[run.rank], run.device)
        return
    if ckpt is not None:
        run.log(f"warning: checkpoint was written by {ckpt.world_size} processes, this run has "
                f"{run.world}: data order is preserved, dropout RNG streams are not")
    seed = cfg.seed + run.rank + 1_000_003 * iter_num
    random.seed(seed), np.random.seed(seed % 2**32), torch.manual_seed(seed)


# ================================================================================================ the loop

def main(argv=None):
    cfg, origin = parse_config(argv)
    if cfg is None:
        print_help(__doc__)
        return 0
    with run_context(cfg) as run:
        state = build(cfg, origin, run)
        return train(cfg, run, state)


def train(cfg, run, state):
    """The loop, under the stop signals, and the run record's status whatever happens."""
    run.stop.install()
    status = "failed"
    try:
        status = loop(cfg, run, state)
    except Diverged:
        status = "diverged"
        raise
    finally:
        run.stop.uninstall()
        if run.master:
            state.log.close()
            if state.log.wandb_run is not None:
                state.log.wandb_run.finish(exit_code=0 if status in ("finished", "stopped") else 1)
            unrecorded = end_launch(cfg, state, status)
            error = sys.exc_info()[1]
            if unrecorded and isinstance(error, UserError):  # the run's own error, and run.json's state with it
                raise type(error)(f"{error}; {unrecorded}") from None
    out = cfg.out_dir
    run.log(f"{status} at iter {state.iter_num}: checkpoint {os.path.join(out, 'ckpt.pt')}, log "
            f"{os.path.join(out, 'log.jsonl')}, run record {os.path.join(out, 'run.json')}"
            + ("; continue with the same command plus --init_from=resume" if status == "stopped" else ""))
    return 0


def loop(cfg, run, state):
    """Each iteration: telemetry and evaluation (and ckpt.pt) of the weights after `it` steps, then one
    optimizer step over the global batch, its log line, a snapshot, and ckpt.pt on a stop signal.
    run.step_model, never a local: a failure's traceback would keep the DDP wrapper alive past teardown."""
    state.saved_at = state.iter_num if cfg.init_from == "resume" else None
    clock = LogClock(state.iter_num)
    while True:
        it = state.iter_num
        paused = log_telemetry(cfg, run, state, it)
        paused = evaluate_and_save(cfg, run, state, it) or paused
        if paused:  # keep evaluation and checkpoint time out of the throughput numbers
            clock.restart(it)
        if cfg.eval_only or it >= cfg.max_iters:
            break
        lr = get_lr(cfg, it)
        loss_sum, grad_norm, stop = train_step(cfg, run, state, it, lr)
        if it % cfg.log_interval == 0:
            log_train(cfg, run, state, it, lr, loss_sum, grad_norm, clock)
        state.iter_num = it + 1
        if cfg.snapshot_interval and state.iter_num % cfg.snapshot_interval == 0:
            check_weights(cfg, run, state)
            snapshot(cfg, run, state)
        if stop:
            save(cfg, run, state, f"stopped by {signal.Signals(run.stop.signum).name if run.stop.signum else 'a signal'}")
            return "stopped"
    if not cfg.eval_only and state.saved_at != state.iter_num:
        save(cfg, run, state, "end of training")
    return "finished"


def log_telemetry(cfg, run, state, it):
    """The outlier telemetry of the weights after `it` steps, every outlier_interval (once per iteration:
    a resume at `it` finds its record already logged)."""
    if (not cfg.outlier_interval or it % cfg.outlier_interval or cfg.eval_only
            or it == state.last_telemetry_iter):
        return False
    if run.master:
        with state.autocast:
            stats = training_telemetry(state.model, state.X_fixed)
        state.log.write({"kind": "outliers", "iter": it, **{k: float(v) for k, v in stats.items()}})
    state.last_telemetry_iter = it
    return True


def evaluate_and_save(cfg, run, state, it):
    """Evaluation every eval_interval (and at the end), and ckpt.pt after it (on improvement only unless
    always_save_checkpoint); a non-finite evaluation loss stops the run."""
    if not (it % cfg.eval_interval == 0 or it == cfg.max_iters or cfg.eval_only) or it == state.last_eval_iter:
        return False
    losses = evaluate(cfg, run, state)
    state.last_eval_iter = it
    if run.master:
        print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
        state.log.write({"kind": "eval", "iter": it, "train_loss": losses["train"], "val_loss": losses["val"],
                         "lr": get_lr(cfg, it), "tokens": it * state.tokens_per_iter})
    if not all(math.isfinite(v) for v in losses.values()):
        what = f"the evaluation loss is not finite (train {losses['train']}, val {losses['val']})"
        if it == state.start_iter:  # no step of this launch can be blamed
            run.fail(overflow_before_training(cfg, state, resolve_dtype(cfg.dtype, run.device), what))
        run.fail(diverged(cfg, state, it, what))
    improved = losses["val"] < state.best_val_loss
    state.best_val_loss = min(state.best_val_loss, losses["val"])
    if it > 0 and not cfg.eval_only and (improved or cfg.always_save_checkpoint):
        save(cfg, run, state, "evaluation")
    return True


@torch.no_grad()
def evaluate(cfg, run, state):
    """Mean loss over the same eval_iters fixed batches per split, shared out over the ranks."""
    state.eval_model.eval()
    out = {}
    for split, (batches, offsets) in state.eval_batches.items():
        total = torch.zeros((), device=run.device, dtype=torch.float64)
        for i in range(run.rank, cfg.eval_iters, run.world):
            X, Y = batches.get(offsets[i])
            with state.autocast:
                _, loss = state.eval_model(X, Y)
            total += loss.double()
        if run.ddp:
            torch.distributed.all_reduce(total)
        out[split] = total.item() / cfg.eval_iters
    state.eval_model.train()
    return out


def train_step(cfg, run, state, it, lr):
    """One optimizer step over the global batch: (summed micro-step loss, gradient norm or None, stop?).
    A non-finite loss or gradient norm on any rank stops every rank before the optimizer applies it."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    offsets = state.train_batches.draw(cfg.gradient_accumulation_steps * cfg.batch_size)
    offsets = offsets.view(run.world, run.local_accum, cfg.batch_size)[run.rank]
    X, Y = state.train_batches.get(offsets[0])
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(run.local_accum):
        last = micro == run.local_accum - 1
        sync = contextlib.nullcontext() if (last or not run.ddp) else run.step_model.no_sync()
        with sync:
            with state.autocast:
                _, loss = run.step_model(X, Y)
            loss_sum += loss.detach().float()
            if not last:
                X, Y = state.train_batches.get(offsets[micro + 1])  # prefetch while the GPU works
            state.scaler.scale(loss / run.local_accum).backward()
    grad_norm = None
    if cfg.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    # the one per-step collective: a stop signal on any rank, a non-finite step on any rank
    nonfinite = ~torch.isfinite(loss_sum)
    if grad_norm is not None and not state.scaler.is_enabled():  # fp16's scaler skips overflow steps itself
        nonfinite = nonfinite | ~torch.isfinite(grad_norm)
    stop, bad = run.any_rank(run.stop.signum is not None, nonfinite)
    if bad:  # before the optimizer applies it: the moments and weights stay those of the last good step
        norm = f"{float(grad_norm):.4g}" if grad_norm is not None else "not computed"
        run.fail(diverged(cfg, state, it, f"the training loss or gradient norm is not finite (rank {run.rank}: "
                                          f"loss {loss_sum.item() / run.local_accum:.4g}, grad norm {norm})"))
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, stop


class LogClock:
    """Wall time per iteration since the last log line (evaluation and checkpoint time left out)."""

    def __init__(self, it):
        self.restart(it)

    def restart(self, it):
        self.time, self.iter = time.time(), it

    def per_iter(self, it):
        """Seconds per iteration up to and including `it`; restarts after it."""
        now = time.time()
        dt = (now - self.time) / max(1, it + 1 - self.iter)
        self.time, self.iter = now, it + 1
        return dt


def log_train(cfg, run, state, it, lr, loss_sum, grad_norm, clock):
    """The mean loss over the whole global batch (all ranks), throughput and MFU: log.jsonl and a line."""
    if run.ddp:
        torch.distributed.all_reduce(loss_sum)
    loss_val = loss_sum.item() / cfg.gradient_accumulation_steps
    dt = clock.per_iter(it)
    if not run.master:
        return
    mfu = state.model.estimate_mfu(cfg.batch_size * run.local_accum, dt)
    state.log.write({"kind": "train", "iter": it, "loss": loss_val, "lr": lr,
                     "grad_norm": float(grad_norm) if grad_norm is not None else None,
                     "tokens_per_sec": state.tokens_per_iter / dt, "mfu": mfu, "time_ms": dt * 1000,
                     "tokens": (it + 1) * state.tokens_per_iter})
    print(f"iter {it}: loss {loss_val:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms, "
          f"{state.tokens_per_iter / dt:,.0f} tok/s" + (f", mfu {mfu * 100:.1f}%" if mfu else ""), flush=True)


# ================================================================================================ checkpoints

def save(cfg, run, state, reason):
    """Write ckpt.pt (all ranks take part: every rank's RNG state goes in)."""
    check_weights(cfg, run, state)
    rng = rng_state(run.device)
    if run.ddp:
        states = [None] * run.world
        torch.distributed.all_gather_object(states, rng)
    else:
        states = [rng]
    if run.master:
        t0 = time.time()
        save_checkpoint(state.ckpt_path, state.checkpoint(cfg, states, run.world).to_checkpoint())
        print(f"saved {state.ckpt_path} at iter {state.iter_num} ({reason}, {time.time() - t0:.1f} s)", flush=True)
    state.saved_at = state.iter_num


def snapshot(cfg, run, state):
    """Weights-only ckpt_{iter}.pt for studying outliers over training (rank 0, no collectives), recorded in
    run.json as this run's (before it is written: a crash midway leaves no snapshot that is nobody's)."""
    if not run.master:
        return
    name = f"ckpt_{state.iter_num}.pt"
    path = os.path.join(cfg.out_dir, name)
    state.snapshots[name] = None
    write_run_record(cfg, state)
    snap = TrainCheckpoint(model=state.model.state_dict(), model_args=model_args_from(state.model.config),
                           iter_num=state.iter_num, config=dataclasses.asdict(cfg), kind="snapshot")
    save_checkpoint(path, snap.to_checkpoint())
    state.snapshots[name] = file_stat(path)
    if cfg.keep_snapshots:
        prune_snapshots(cfg, state)
    write_run_record(cfg, state)


def prune_snapshots(cfg, state):
    """Keep the newest keep_snapshots of this run's snapshots; a ckpt_N.pt run.json does not record as the run's
    (or that changed since) is neither counted nor deleted."""
    owned = owned_snapshots(cfg.out_dir, {"snapshots": state.snapshots})
    state.snapshots = owned
    for _, name in sorted((int(SNAPSHOT.fullmatch(n)[1]), n) for n in owned)[:-cfg.keep_snapshots]:
        try:
            os.remove(os.path.join(cfg.out_dir, name))
        except FileNotFoundError:
            pass
        except OSError as e:  # kept, and still the run's: pruned at the next snapshot
            print(f"warning: cannot remove the old snapshot {os.path.join(cfg.out_dir, name)}: {e.strerror}",
                  flush=True)
            continue
        del state.snapshots[name]


def write_run_record(cfg, state):
    state.run_record["snapshots"] = state.snapshots
    atomic_write_json(os.path.join(cfg.out_dir, "run.json"), state.run_record)


def check_weights(cfg, run, state):
    """Diverged unless every weight is finite (identical on all ranks, so they all stop together)."""
    if not all(all_finite(p) for p in state.model.parameters()):
        run.fail(diverged(cfg, state, state.iter_num, "the weights hold NaN or inf"))


def diverged(cfg, state, it, what):
    if state.saved_at is None:
        where = (f"no checkpoint of this run was written; start again with a lower --learning_rate "
                 f"(now {cfg.learning_rate:g})")
    else:
        where = (f"{state.ckpt_path} was not overwritten and holds iter {state.saved_at}, the last good state: "
                 f"resume from it with the same command plus --init_from=resume and a lower learning rate, "
                 f"e.g. --learning_rate={cfg.learning_rate / 10:g}")
    return Diverged(f"training diverged at iter {it}: {what}; {where}")


def end_launch(cfg, state, status):
    """Write how the launch ended into run.json. A failing write is the error of a run that ended well; after a
    failure, whose own error is the one to report, it becomes a note for that error (run.json still says
    'running')."""
    try:
        finish_run_record(cfg, state, status)
    except UserError as e:
        if status in ("finished", "stopped"):
            raise
        return (f"{os.path.join(cfg.out_dir, 'run.json')} could not be updated either and still says this launch "
                f"is running ({str(e).partition(': ')[2].split(';')[0]})")
    return None


def finish_run_record(cfg, state, status):
    state.run_record["launches"][-1].update(status=status, end_iter=state.iter_num,
                                            end_date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_run_record(cfg, state)


if __name__ == "__main__":
    cli_main(main)
