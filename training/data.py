"""The data a training run reads: windows of the prepared token files drawn from one seeded generator (the
same windows on any number of ranks), the checks that the files fit the model, and the record that lets a
resume tell whether it continues on the data the run trained on."""

import os

import numpy as np
import torch

from runtime.cli import UserError, is_int
from runtime.files import not_a_file, read_json_file
from runtime.token_data import TOKEN_DTYPE, load_tokens


class Batches:
    """Random windows of a token file, drawn for the global batch from one seeded generator.

    Every rank holds an identical generator (seeded by `seed`); each draw covers the global batch of
    gradient_accumulation_steps * batch_size windows and rank r uses its contiguous slice, so the
    windows of a run do not depend on the number of ranks. The generator state is checkpointed.
    """

    def __init__(self, path, block_size, device, seed, vocab_size=None):
        self.path = path
        self.block_size = block_size
        self.device = device
        self.vocab_size = vocab_size
        self.n_tokens = len(load_tokens(path))
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.draws = 0

    def draw(self, n):
        self.draws += 1
        return torch.randint(self.n_tokens - self.block_size, (n,), generator=self.generator)

    def get(self, offsets):
        """(x, y) on the device for window starts `offsets` (1-D tensor)."""
        data = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")  # re-open per batch: avoids a memmap leak
        T = self.block_size
        starts = offsets.tolist()
        x = torch.from_numpy(np.stack([data[i:i + T] for i in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + T] for i in starts]).astype(np.int64))
        if self.vocab_size is not None:
            self._check_ids(x, y)
        if str(self.device).startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def _check_ids(self, x, y):
        """A token id beyond the vocabulary (data that does not match its meta.json) is a clear error
        here, not an IndexError inside the embedding (or a device-side assert on CUDA)."""
        top = max(int(x.max()), int(y.max()))
        if top >= self.vocab_size:
            raise UserError(f"{self.path} holds token id {top}, outside the model's vocabulary of {self.vocab_size}: "
                            f"the file does not match its meta.json or this model; prepare it again with "
                            f"prepare_data.py, or set --vocab_size larger")

    def state_dict(self):
        return {"seed": self.seed, "draws": self.draws, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.draws = int(state["draws"])


PREPARE_COMMANDS = {"openwebtext": "python prepare_data.py --dataset openwebtext",
                    "wikitext2": "python prepare_data.py --dataset wikitext2",
                    "shakespeare": "python prepare_data.py --dataset shakespeare",
                    "builtin": "python prepare_data.py --dataset builtin"}


def check_data(cfg, data_dir):
    """Validate the data directory against the config; returns meta.json's content (or {})."""
    cmd = PREPARE_COMMANDS.get(cfg.dataset)
    if cmd is None:
        cmd = f"python prepare_data.py --dataset text --input YOUR_TEXT_FILES --out_dir {data_dir}"
    elif os.path.normpath(data_dir) != os.path.join("data", cfg.dataset):  # prepare_data's default out_dir
        cmd += f" --out_dir {data_dir}"
    for split in ("train", "val"):
        why = not_a_file(os.path.join(data_dir, f"{split}.bin"))
        if why and os.path.lexists(os.path.join(data_dir, f"{split}.bin")):
            raise UserError(f"{os.path.join(data_dir, f'{split}.bin')} {why}")
        if why:
            what = "does not exist" if not os.path.isdir(data_dir) else f"has no {split}.bin"
            raise UserError(f"data directory {data_dir} {what}; make it with: {cmd}"
                            + ("" if cfg.data_dir else " (or set --data_dir)"))
    meta_path = os.path.join(data_dir, "meta.json")
    meta = read_meta(meta_path) if os.path.lexists(meta_path) else {}
    lengths = {s: len(load_tokens(os.path.join(data_dir, f"{s}.bin"))) for s in ("train", "val")}
    for split, n in lengths.items():
        if n <= cfg.block_size + 1:
            raise UserError(f"block_size {cfg.block_size} is larger than the data: {data_dir}/{split}.bin holds only "
                            f"{n:,} tokens; use a smaller --block_size or more data")
    if "vocab_size" in meta:
        data_vocab, where = int(meta["vocab_size"]), f"{meta_path} says vocab_size {meta['vocab_size']}"
    else:  # nanoGPT-made data without meta.json: look at the ids themselves (chunked; once per launch)
        data_vocab = 1 + max(_max_token(os.path.join(data_dir, f"{s}.bin")) for s in ("train", "val"))
        where = f"{data_dir} holds token id {data_vocab - 1}"
    if data_vocab > cfg.vocab_size:
        raise UserError(f"the data's vocabulary is larger than the model's: {where}, but vocab_size is "
                        f"{cfg.vocab_size}; set --vocab_size={data_vocab} or more")
    return meta


def read_meta(path):
    """prepare_data.py's meta.json, checked: a dict whose vocab_size, when present, is a positive integer."""
    meta = read_json_file(path, "data description")
    fix = "prepare the data again with prepare_data.py (or remove meta.json to have the ids checked instead)"
    if not isinstance(meta, dict):
        raise UserError(f"{path} holds a {type(meta).__name__}, not a data description; {fix}")
    vocab = meta.get("vocab_size", 1)
    if not is_int(vocab) or vocab < 1:
        raise UserError(f"{path}: vocab_size {vocab!r} is not a positive integer; {fix}")
    return meta


def _max_token(path, chunk=1 << 26):
    data = load_tokens(path)
    return int(max(data[i:i + chunk].max() for i in range(0, len(data), chunk)))


def data_record(data_dir, meta):
    """What run.json and ckpt.pt record of the data a launch trains on: the directory, its meta.json and the
    token count of each split (nanoGPT data has no meta.json, hence no hashes, to compare)."""
    return {"data_dir": os.path.abspath(data_dir), "meta": meta,
            "tokens": {s: len(load_tokens(os.path.join(data_dir, f"{s}.bin"))) for s in ("train", "val")}}


def data_differences(old, new):
    """How the data of two data records differ: meta.json's SHA-256 of each split where both have it, else
    the token counts where both have them (what cannot be compared is not called a difference)."""
    def get(record, *keys):
        for key in keys:
            record = record.get(key) if isinstance(record, dict) else None
        return record
    diffs = []
    for split in ("train", "val"):
        a, b = get(old, "meta", f"{split}_sha256"), get(new, "meta", f"{split}_sha256")
        if a is not None and b is not None:
            if a != b:
                diffs.append(f"{split}.bin's SHA-256 in meta.json")
            continue
        a, b = get(old, "tokens", split), get(new, "tokens", split)
        if a is not None and b is not None and a != b:
            diffs.append(f"{split}.bin holds {b} tokens, {a} then")
    return diffs


def check_same_data(cfg, ckpt_path, old, new):
    """A resume continues on the data the run trained on; another data set is refused unless
    --resume_on_new_data says the change is meant. Returns the replaced data record (None: same data)."""
    diffs = data_differences(old, new) if isinstance(old, dict) else []
    if not diffs:
        return None
    if not cfg.resume_on_new_data:
        was = old.get("data_dir") if isinstance(old.get("data_dir"), str) else "other data"
        raise UserError(f"cannot resume {ckpt_path} on {new['data_dir']}: the run trained on {was}, and the data "
                        f"differ ({'; '.join(diffs)}); resume with --data_dir={was}, or pass "
                        f"--resume_on_new_data=True if the change is meant (run.json then records both)")
    return old
