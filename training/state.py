"""What ckpt.pt holds for an exact resume, in one dataclass (`TrainCheckpoint`: the only place its keys are
spelled), and the checks of that state as data before a resumed run writes anything."""

import math
import random
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import torch

from runtime.cli import UserError, is_int, is_number, one_line


@dataclass
class TrainCheckpoint:
    """ckpt.pt of a training (kind 'train'), or a weights-only snapshot ckpt_{iter}.pt (kind 'snapshot',
    which has no optimizer, sampler or RNG state). Each rank's RNG state is in `rng`, in rank order."""
    model: dict                          # the raw model's state dict
    model_args: dict                     # its GPTConfig fields
    iter_num: int                        # optimizer steps taken
    config: dict                         # the resolved TrainConfig
    kind: str = "train"
    optimizer: Optional[dict] = None
    scaler: Optional[dict] = None        # fp16's GradScaler (None when not in use)
    sampler: Optional[dict] = None       # the training-window generator (training.data.Batches.state_dict)
    rng: Optional[list] = None           # per rank: python, numpy, torch, cuda states (rng_state)
    world_size: int = 1
    best_val_loss: float = math.inf
    last_eval_iter: int = -1             # iterations whose evaluation / telemetry are logged already
    last_telemetry_iter: int = -1
    log_offset: Optional[int] = None     # log.jsonl's length when written: a resume truncates to it
    wandb_run_id: Optional[str] = None
    pretrained_from: Optional[str] = None
    data: Optional[dict] = None          # training.data.data_record of the data trained on (a resume compares it)

    SNAPSHOT_KEYS = ("model", "model_args", "iter_num", "config", "kind")

    def to_checkpoint(self):
        """The dict torch.save writes (a snapshot keeps only its weights and what describes them)."""
        keys = self.SNAPSHOT_KEYS if self.kind == "snapshot" else [f.name for f in fields(self)]
        return {k: getattr(self, k) for k in keys}

    @classmethod
    def from_checkpoint(cls, ckpt):
        """From a dict load_checkpoint returned (a key it lacks keeps its default)."""
        return cls(**{f.name: ckpt[f.name] for f in fields(cls) if f.name in ckpt})

    RESUME_KEYS = ("optimizer", "sampler")  # what a weights-only snapshot (or a nanoGPT checkpoint) lacks

    @classmethod
    def missing_resume_keys(cls, ckpt):
        """The keys an exact resume needs that the dict `ckpt` lacks."""
        return [k for k in cls.RESUME_KEYS if k not in ckpt]


def rng_state(device):
    """This process's RNG states, as weights_only-loadable objects (tensors, lists, numbers)."""
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state(), "cuda": None}
    if str(device).startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


RESUME_FIX = "it cannot be resumed exactly: restore it from a copy (its weights can still be analysed)"


def check_resume_state(path, ckpt):
    """The resume state of a TrainCheckpoint as data (optimizer structure, sampler, every rank's RNG), checked
    before the launch writes anything; one line naming the key."""
    opt = ckpt.optimizer
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(groups, list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    and all(is_int(i) for i in g["params"]) for g in groups)):
        raise UserError(f"{path}: optimizer is not an optimizer state (a dict of 'state' and 'param_groups'); {RESUME_FIX}")
    sampler = ckpt.sampler
    try:
        torch.Generator().set_state(sampler["generator"])
        if not is_int(sampler["draws"]) or sampler["draws"] < 0:
            raise ValueError
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError):
        raise UserError(f"{path}: sampler is not a data sampler state (its generator or draw count); {RESUME_FIX}") from None
    _check_counters(path, ckpt)
    rng = ckpt.rng
    if rng is not None and not isinstance(rng, list):
        raise UserError(f"{path}: rng is a {type(rng).__name__}, not a list of per-rank RNG states; {RESUME_FIX}")
    for rank, state in enumerate(rng or []):
        try:
            check_rng_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, OverflowError):
            raise UserError(f"{path}: rng[{rank}] is not an RNG state (python, numpy, torch); {RESUME_FIX}") from None


def _check_counters(path, ckpt):
    """The loop's counters a resume continues from: numbers of the right kind."""
    checks = (("best_val_loss", is_number(ckpt.best_val_loss) and not math.isnan(ckpt.best_val_loss),
               "a loss (a number, or inf)"),
              ("last_eval_iter", is_int(ckpt.last_eval_iter), "an iteration"),
              ("last_telemetry_iter", is_int(ckpt.last_telemetry_iter), "an iteration"),
              ("world_size", is_int(ckpt.world_size) and ckpt.world_size >= 1, "a number of processes"),
              ("log_offset", ckpt.log_offset is None or (is_int(ckpt.log_offset) and ckpt.log_offset >= 0),
               "a length of log.jsonl"))
    for key, ok, what in checks:
        if not ok:
            raise UserError(f"{path}: {key} is {getattr(ckpt, key)!r}, not {what}; {RESUME_FIX}")


def check_rng_state(state):
    """Apply `state` to throw-away generators: raises where set_rng_state would."""
    py = state["python"]
    random.Random().setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.RandomState().set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.Generator().set_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and not (isinstance(cuda, torch.Tensor) and cuda.dtype == torch.uint8):
        raise TypeError("cuda state")


def load_optimizer_state(optimizer, state, path):
    """optimizer.load_state_dict, after checking that the saved groups, their settings and the moment shapes
    fit the model's optimizer (torch checks the group sizes only; the rest would fail at the first step)."""
    sizes, saved = [len(g["params"]) for g in optimizer.param_groups], [len(g["params"]) for g in state["param_groups"]]
    if sizes != saved:
        raise UserError(f"{path}: the optimizer state has parameter groups of {saved} parameters, the model's optimizer "
                        f"{sizes}; {RESUME_FIX}")
    for i, (group, saved_group) in enumerate(zip(optimizer.param_groups, state["param_groups"])):
        for key, value in group.items():
            if key != "params" and key in saved_group and not _same_kind(value, saved_group[key]):
                raise UserError(f"{path}: optimizer param_groups[{i}][{key!r}] is {saved_group[key]!r}, where the "
                                f"optimizer takes a value like {value!r}; {RESUME_FIX}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in state["param_groups"] for i in g["params"]]
    for param, pid in zip(params, ids):
        moments = state["state"].get(pid, {})
        for name, value in (moments.items() if isinstance(moments, dict) else [("", moments)]):
            _check_moment(path, pid, name, value, param)
    try:
        optimizer.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: the optimizer state does not fit this model ({one_line(e, 120)}); {RESUME_FIX}") from None


def _same_kind(want, got):
    """Whether a saved optimizer setting is of the kind the optimizer's own is (numbers, pairs of them, ...)."""
    if isinstance(want, bool) or want is None:
        return isinstance(got, bool) or got is None
    if is_number(want):
        return is_number(got) or (isinstance(got, torch.Tensor) and got.numel() == 1)
    if isinstance(want, (tuple, list)):
        return isinstance(got, (tuple, list)) and len(got) == len(want) and all(map(_same_kind, want, got))
    return True


def _check_moment(path, pid, name, value, param):
    """An optimizer state entry: a step count, or a tensor of its parameter's shape."""
    where = f"{path}: optimizer['state'][{pid}][{name!r}]"
    if isinstance(value, torch.Tensor):
        if value.ndim and value.shape != param.shape:
            raise UserError(f"{where} has shape {tuple(value.shape)}, but its parameter has shape "
                            f"{tuple(param.shape)}; {RESUME_FIX}")
    elif not is_number(value):
        raise UserError(f"{where} is a {type(value).__name__}, not a tensor or a step count; {RESUME_FIX}")
