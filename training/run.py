"""A training process's place in its run: rank, device and micro-steps (single process or torchrun), the stop
flag that signals set, the teardown that frees the process group last, the lock of the run directory, the
log.jsonl writer, run.json's reader, and the memory estimate checked before anything is allocated."""

import contextlib
import gc
import io
import json
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from typing import Optional

import torch

from runtime.cli import UserError
from runtime.files import atomic_path, directory_lock, json_safe, read_json_file, write_error
from runtime.system import check_fits, resolve_device

STOP_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, s))


class StopFlag:
    """Set by SIGTERM / SIGINT / SIGUSR1; the loop checks it after each step. A second SIGINT aborts."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def install(self):
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        os.write(2, f"received {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                    f"(Ctrl-C again to abort)\n".encode())


def micro_steps_per_rank(gradient_accumulation_steps, world_size):
    if gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by the "
                        f"number of processes ({world_size})")
    return gradient_accumulation_steps // world_size


@dataclass
class Run:
    """This process's place in the run (rank, device, micro-steps) and what it holds for the run's length:
    the stop flag and `step_model`, what a training step calls (DDP, else the compiled or plain model).
    Teardown drops `step_model` before the process group (run_context)."""
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: str
    local_accum: int                             # micro-steps per rank and optimizer step
    stop: StopFlag
    step_model: Optional[torch.nn.Module] = None
    failing_together: bool = False               # every rank stops at the same point (Run.fail)

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return "cuda" if self.device.startswith("cuda") else "cpu"

    def log(self, *args):
        if self.master:
            print(*args, flush=True)

    def quiet(self):
        """Silence what library code prints on ranks other than 0 (one copy of each setup line)."""
        return contextlib.nullcontext() if self.master else contextlib.redirect_stdout(io.StringIO())

    def any_rank(self, *flags):
        """For each flag, whether it holds on any rank: one collective keeps all ranks deciding alike."""
        t = torch.stack([torch.as_tensor(f, device=self.device).reshape(()).int() for f in flags])
        if self.ddp:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def fail(self, error):
        """Raise `error` on rank 0 and exit quietly with its status elsewhere: the message appears once.
        Every rank calls it at the same point."""
        self.failing_together = True
        if self.master:
            raise error
        raise SystemExit(error.exit_status)


def setup_distributed(cfg):
    """The Run of this process: single process, or a rank under torchrun (its process group initialised)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
        want = resolve_device(cfg.device)
        device = resolve_device(f"cuda:{local_rank}" if want.startswith("cuda") else want)
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        if backend == "nccl" and not device.startswith("cuda"):
            raise UserError("backend nccl needs GPUs; use --backend=gloo (or auto) on CPU")
        torch.distributed.init_process_group(backend=backend)
    else:
        rank, local_rank, world = 0, 0, 1
        device = resolve_device(cfg.device)
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"  # an explicit index for set_device / RNG state
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
    return Run(ddp=ddp, rank=rank, local_rank=local_rank, world=world, device=device,
               local_accum=micro_steps_per_rank(cfg.gradient_accumulation_steps, world), stop=StopFlag())


@contextlib.contextmanager
def run_context(cfg):
    """Distributed setup; rank 0 holds out_dir's lock for the whole run; the teardown frees the process
    group last."""
    run = setup_distributed(cfg)
    try:
        with out_dir_lock(run, cfg.out_dir):
            yield run
    finally:
        if run.ddp and torch.distributed.is_initialized():
            if run.failing_together:  # the others wait for rank 0's message and run.json: torchrun
                torch.distributed.barrier()  # kills the remaining ranks as soon as one exits
            # DDP's reducer holds the process group; freed last by the reducer (at interpreter exit, with
            # the GIL held), gloo's destructor joins worker threads that wait for the GIL: a hang.
            # Dropping DDP first leaves the last reference to destroy_process_group, which frees it
            # without the GIL.
            # a failure's traceback (an interrupt inside DDP's forward, a no_sync context) holds DDP too
            clear_exception_frames(sys.exc_info()[1])
            run.step_model = None
            gc.collect()
            torch.distributed.destroy_process_group()


def clear_exception_frames(error):
    """Clear the frames of `error`'s traceback and of every exception it was raised while handling (or from):
    any of them may hold the DDP wrapper."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


@contextlib.contextmanager
def out_dir_lock(run, out_dir):
    """Rank 0 holds out_dir's lock for the whole run; if it cannot, every rank stops before any work."""
    with contextlib.ExitStack() as stack:
        error = None
        if run.master:
            try:
                stack.enter_context(directory_lock(out_dir, "training run"))
            except UserError as e:
                error = e
        if run.any_rank(error is not None)[0]:
            run.fail(error or UserError("out_dir is locked"))
        yield


class JsonlLog:
    """Rank 0's log.jsonl (and wandb): one JSON object per line, flushed at once.

    The file is strict JSON: a non-finite number (a diverged loss, an inf gradient norm) is written
    as null; wandb gets the numbers as they are.
    """

    def __init__(self, path, wandb_run=None):
        self.path = path
        try:
            self.file = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise write_error(path, e) from None
        self.wandb_run = wandb_run

    def write(self, record):
        try:  # a partial last line (full disk) is cut off by the resume, which truncates to the checkpoint's offset
            self.file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self.file.flush()
        except OSError as e:
            raise write_error(self.path, e) from None
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k not in ("iter", "kind")}, step=record["iter"])

    def offset(self):
        self.file.flush()
        return self.file.tell()

    def close(self):
        with contextlib.suppress(OSError):  # write() has already reported a failing disk
            self.file.close()


def truncate_log(path, offset):
    """Drop what a resumed run re-does: keep the first `offset` bytes of log.jsonl (atomically)."""
    if not os.path.exists(path) or offset is None:
        return
    if os.path.getsize(path) < offset:
        print(f"warning: {path} is shorter than when the checkpoint was written; appending to it")
        return
    with open(path, "rb") as f:
        head = f.read(offset)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(head)


def read_run_record(path):
    """run.json of earlier launches ({} where there is none), checked: a dict whose launches are a list."""
    if not os.path.lexists(path):
        return {}
    record = read_json_file(path, "run record")
    if not isinstance(record, dict) or not isinstance(record.get("launches", []), list):
        raise UserError(f"run record {path} is not one train.py wrote (a dict with a list of launches); restore it "
                        f"or move it away")
    return record


def replaced_run_record(path):
    """run.json of the run a start with --overwrite=True replaces: what it recorded, or {} when it cannot be read
    (then none of its snapshots is known to be the run's, and none is deleted)."""
    try:
        return read_run_record(path)
    except UserError:
        return {}


def training_bytes(cfg):
    """A low estimate of training's memory, by part: fp32 weights, gradients and AdamW moments; the activations
    and logits one micro-batch keeps for the backward; the offsets of one iteration's windows (drawn at once for
    every accumulation step); the fixed evaluation windows' offsets. Above the device's memory, the run cannot fit."""
    n_params = 12 * cfg.n_layer * cfg.n_embd ** 2 + (cfg.vocab_size + cfg.block_size) * cfg.n_embd
    tokens = cfg.batch_size * cfg.block_size
    return {"weights": 16 * n_params,
            "activations": tokens * (16 * cfg.n_layer * cfg.n_embd + 4 * cfg.vocab_size),
            "windows": 8 * cfg.gradient_accumulation_steps * cfg.batch_size,
            "evaluation": 8 * 2 * cfg.eval_iters * cfg.batch_size}


# what lowers the largest part of training_bytes
MEMORY_FIXES = {"weights": "use a smaller model (--n_layer, --n_embd, --vocab_size)",
                "activations": "lower --batch_size (raising --gradient_accumulation_steps keeps the tokens per "
                               "iteration)",
                "windows": "lower --gradient_accumulation_steps (an iteration draws all its windows at once)",
                "evaluation": "lower --eval_iters"}


def check_memory(cfg, device):
    parts = training_bytes(cfg)
    check_fits(sum(parts.values()), device,
               f"training {cfg.n_layer} layers of width {cfg.n_embd} on {cfg.gradient_accumulation_steps:,} x "
               f"{cfg.batch_size:,} x {cfg.block_size:,} tokens per iteration with {cfg.eval_iters:,} evaluation "
               f"batches per split", MEMORY_FIXES[max(parts, key=parts.get)])
