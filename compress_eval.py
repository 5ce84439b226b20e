"""Perplexity of checkpoints before and after compression: the paper's Table 3 as a command.

    python compress_eval.py out/default/ckpt.pt out/scaling/ckpt.pt            # WikiText-2 test (raw)
    python compress_eval.py CKPT --data data/builtin/val.bin --methods fp,w8,sparse50,w8a8,wanda
    python compress_eval.py --pretrained DIR --methods fp,w8a8,w8a8+fp1,w8a8_token,w8a8_static,w4g128,kv4

Each method runs on a fresh copy of the model (the checkpoint file is only read), on the Linears of the
transformer blocks (embeddings and the tied lm_head only with --quantize_head); the methods are the
entries of compress/methods.py (listed below). NAME+fpK (e.g. w8a8+fp1) keeps the first K positions of
every window in full precision and out of every scale; --fp_tokens K does so for every activation / KV
column without a suffix. Writes DIR/results.md (the table), DIR/results.json and DIR/results.csv atomically.
"""

import argparse
import copy
import csv
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from attention_variants import VARIANTS_FILE_HELP, check_backend, load_variant_file
from compress import methods as cm
from compress.perplexity import evaluate_perplexity, load_eval_tokens, make_windows, text_ids, wikitext2_text
from hf.models import PRETRAINED_FAMILIES
from runtime import reports
from runtime.cli import ArgumentParser, UserError, check_seed, cli_main
from runtime.files import json_text, read_json_file
from runtime.outputs import check_output_dir, output_set
from runtime.system import autocast_context, check_fits, resolve_device, resolve_dtype, run_metadata
from runtime.token_data import WIKITEXT2, input_tokens, read_text_file

DEFAULT_METHODS = "fp,w8,sparse50"
DTYPE_LABELS = {torch.float32: "FP32", torch.bfloat16: "BF16", torch.float16: "FP16"}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
GPT2_VOCAB = 50257  # vocabularies at least this large are GPT-2's BPE (possibly padded)


def table_dtype(name, device):
    """--dtype -> torch dtype. 'auto' is float16 on GPU, because Table 3 reports "PPL (FP16)", and
    float32 on CPU (where half-precision autocast would only be slower)."""
    if name in (None, "auto"):
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return resolve_dtype(name, device)


# the longest default window: the usual 2,048 of LLM perplexity tables, so that models whose
# max_position_embeddings is 32k-128k are not evaluated on a handful of huge windows
MAX_DEFAULT_WINDOW = 2048


def window_length(args, source):
    """--block_size, else the model's block size up to MAX_DEFAULT_WINDOW."""
    return args.block_size or min(source.block_size, MAX_DEFAULT_WINDOW)


def calibration_windows(tokens, n_windows, block_size, seed=0):
    """(n_windows, block_size) int64 windows at random (seeded) offsets of a calibration token stream."""
    n = len(tokens)  # a memory-mapped token file is only read where the windows are
    if n < block_size:
        raise UserError(f"the calibration data has {n} tokens, fewer than one window of {block_size}")
    starts = np.random.default_rng(seed).integers(0, n - block_size + 1, size=n_windows)
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + block_size], dtype=np.int64) for s in starts]))


# ----------------------------------------------------------------------------------------------
# what to evaluate

@dataclass
class Source:
    checkpoint: str          # file path, or 'pretrained:NAME'
    attention: str
    iter_num: object
    vocab_size: int
    block_size: int
    pretrained: str = None
    model: object = None     # kept only for --pretrained (built once, on CPU)
    name: str = ""
    results: dict = field(default_factory=dict)


def load_sources(paths, pretrained, attn_backend):
    from training.checkpoint import load_checkpoint, load_model
    sources = []
    for path in paths:
        ckpt = load_checkpoint(path)
        args = ckpt["model_args"]
        sources.append(Source(checkpoint=path, attention=args.get("attention", "default"), iter_num=ckpt.get("iter_num"),
                              vocab_size=int(args.get("vocab_size", 50304)), block_size=int(args.get("block_size", 1024))))
        del ckpt
    for name in pretrained:
        model, _ = load_model(pretrained=name, device="cpu", attn_backend=attn_backend)
        sources.append(Source(checkpoint=f"pretrained:{name}", attention=model.config.attention, iter_num=None,
                              vocab_size=model.config.vocab_size, block_size=model.config.block_size,
                              pretrained=name, model=model))
    names = [f"{s.pretrained} (pretrained)" if s.pretrained else f"{s.attention} @ iter {s.iter_num}" for s in sources]
    for s, n in zip(sources, names):
        s.name = n if names.count(n) == 1 else f"{n} [{s.checkpoint}]"
    return sources


def check_vocabularies(sources):
    """All rows of one table must share a vocabulary (GPT-2's BPE, padded or not, counts as one)."""
    def family(v):
        return "gpt2" if v >= GPT2_VOCAB else v
    first = sources[0]
    for s in sources[1:]:
        if family(s.vocab_size) != family(first.vocab_size):
            raise UserError(f"{first.checkpoint} (vocabulary {first.vocab_size}) and {s.checkpoint} (vocabulary "
                            f"{s.vocab_size}) have different vocabularies, so their perplexities are not comparable; "
                            f"evaluate them in separate tables")


def build_model(source, device, attn_backend):
    if source.model is not None:
        return copy.deepcopy(source.model).to(device).eval()
    from training.checkpoint import load_model
    model, _ = load_model(source.checkpoint, device=device, attn_backend=attn_backend)
    return model


# ----------------------------------------------------------------------------------------------
# table

def fmt_ppl(x):
    if x is None or not math.isfinite(x):
        return "inf" if x == math.inf else "nan"
    return f"{x:.2f}"


def fmt_change(x, ref):
    if x is None or ref is None or not (math.isfinite(x) and math.isfinite(ref)) or ref <= 0:
        return "n/a"
    return f"{(x / ref - 1) * 100:+.1f}%"


def markdown_table(rows, columns, opts):
    """Model | PPL per column | Δ per column against fp (when fp is one of them)."""
    names = [c.name for c in columns]
    degr = [c for c in columns if c.name != "fp"] if "fp" in names else []
    cols = ["Model"] + [c.header(opts) for c in columns] + [f"Δ {c.short()}" for c in degr]
    cells = [[r["name"]] + [fmt_ppl(r["ppl"][n]) for n in names]
             + [fmt_change(r["ppl"][c.name], r["ppl"]["fp"]) for c in degr] for r in rows]
    return reports.markdown_table(cols, cells, align="l" + "r" * (len(cols) - 1)) + "\n"


def csv_text(rows, methods):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "checkpoint", "attention", "iter_num", "dtype"] + [f"ppl_{m}" for m in methods])
    for r in rows:
        w.writerow([r["name"], r["checkpoint"], r["attention"], r["iter_num"], r["dtype"]]
                   + ["" if r["ppl"][m] is None else repr(r["ppl"][m]) for m in methods])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# CLI

def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n", 1)[1] + "\nMethods:\n" + method_list())
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="checkpoint files (one table row each)")
    p.add_argument("--pretrained", action="append", default=[], metavar="NAME",
                   help="also evaluate pretrained weights: OpenAI GPT-2 (gpt2, gpt2-medium, ...) or any supported Hugging Face "
                        f"causal LM (hub name ORG/NAME or save_pretrained directory: {PRETRAINED_FAMILIES}); repeatable")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=["wikitext2"], default=None,
                     help="WikiText-2 raw through Hugging Face datasets (default when no --text_file/--data)")
    src.add_argument("--text_file", help="evaluate on a local UTF-8 text file, tokenized with each model's own tokenizer "
                                            "(GPT-2 BPE for this repo's checkpoints)")
    src.add_argument("--data", help="evaluate on a prepared uint16 token file (.bin)")
    p.add_argument("--split", default="test", choices=["test", "validation"], help="WikiText-2 split (default test)")
    p.add_argument("--max_tokens", type=int, default=None, help="evaluate only the first N tokens (quick runs)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma list of {', '.join(cm.METHODS)}, each optionally NAME+fpK (default {DEFAULT_METHODS})")
    p.add_argument("--w8_granularity", default="tensor",
                   help="weights of w8, w8a8, w8a8_static: tensor (default) | channel | group:G")
    p.add_argument("--quantize_head", action="store_true",
                   help="the weight methods also quantize the tied embedding / lm_head, the activation methods its input")
    p.add_argument("--fp_tokens", type=int, default=0,
                   help="activation and KV methods: the first K positions of every window stay in full precision and "
                        "out of every scale (default 0; NAME+fpK sets it per column)")
    p.add_argument("--act_percentile", type=float, default=100.0,
                   help="w8a8_static: the static range is the largest per-window p-th percentile of |x| (default 100: "
                        "min-max)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights pruned (sparse50, wanda)")
    p.add_argument("--prune_scope", default="layer", choices=["layer", "global"], help="magnitude pruning per layer or global")
    p.add_argument("--calib_data", help="calibration tokens (.bin) of wanda and w8a8_static; default: the WikiText-2 "
                                        "train split, or train.bin beside --data")
    p.add_argument("--calib_text_file", help="calibration text file (wanda, w8a8_static)")
    p.add_argument("--calib_windows", type=int, default=32,
                   help="calibration windows of one block each (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing calibration windows")
    p.add_argument("--block_size", type=int, default=None, help=f"window length (default: each model's block size, at most {MAX_DEFAULT_WINDOW})")
    p.add_argument("--stride", type=int, default=None, help="sliding windows scoring the last STRIDE tokens of each")
    p.add_argument("--drop_tail", action="store_true",
                   help="GPTQ's protocol: floor(N / T) non-overlapping windows of T tokens, each scoring its T - 1 "
                        "predictions inside the window; the last partial window dropped")
    p.add_argument("--batch_size", type=int, default=None, help="windows per forward (default: 16 on GPU, 2 on CPU at T=1024)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (float16 on GPU, the paper's Table 3 'PPL (FP16)'; float32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--attn_backend", default="auto", help="attention backend for every model (default auto)")
    p.add_argument("--variants_file", metavar="FILE.py", help=VARIANTS_FILE_HELP)
    p.add_argument("--out", default=os.path.join("out", "compress"), help="output directory (default out/compress)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--summary", metavar="OUTLIERS_JSON",
                   help="outliers.json of analyze_outliers.py on the same model: after the table, two lines on where "
                        "its largest activation sits and what the w8a8 / w8a8+fpK columns show about it")
    return p.parse_args(argv)


def method_list():
    """The --help list of methods, from the registry."""
    import textwrap
    return "\n".join(textwrap.fill(m.formula, 100, initial_indent=f"  {m.name:<13}", subsequent_indent=" " * 15)
                     for m in cm.REGISTRY.values())


def validate_args(args):
    columns = cm.parse_columns(args.methods, args.fp_tokens)
    if cm.parse_granularity(args.w8_granularity, "--w8_granularity")[0] == "row" and args.w8_granularity != "channel":
        raise UserError(f"--w8_granularity {args.w8_granularity!r} is for activations; weights use tensor, channel or group:G")
    if not 0.0 <= args.sparsity < 1.0:
        raise UserError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if not 0.0 < args.act_percentile <= 100.0:
        raise UserError(f"--act_percentile must be in (0, 100], got {args.act_percentile}")
    for name in ("batch_size", "block_size", "calib_windows", "max_tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be a positive integer, got {v}")
    if args.fp_tokens < 0:
        raise UserError(f"--fp_tokens must be 0 or more, got {args.fp_tokens}")
    if args.stride is not None and args.stride < 1:
        raise UserError(f"--stride must be a positive integer, got {args.stride}")
    if args.drop_tail and args.stride is not None:
        raise UserError("--drop_tail evaluates non-overlapping windows; leave out --stride")
    if args.calib_data and args.calib_text_file:
        raise UserError("give at most one of --calib_data and --calib_text_file")
    if not args.checkpoints and not args.pretrained:
        raise UserError("no checkpoints given: pass one or more checkpoint files (train.py writes OUT_DIR/ckpt.pt, "
                        "e.g. out/demo/ckpt.pt for config/tiny.py) or --pretrained gpt2")
    models = [os.path.realpath(c) for c in args.checkpoints] + [f"pretrained:{n}" for n in args.pretrained]
    twice = next((m for i, m in enumerate(models) if m in models[:i]), None)
    if twice:  # two rows of one model, labelled alike
        raise UserError(f"{twice} is given twice; each row of the table is a different model")
    check_seed(args.seed)
    check_output_dir(args.out, TOOL, RESULT_FILES, inputs=input_paths(args))  # now, not after every evaluation
    return columns


TOOL, RESULT_FILES = "compress_eval.py", ("results.md", "results.json", "results.csv")


def input_paths(args):
    return [*args.checkpoints, args.text_file, args.data, args.calib_data, args.calib_text_file, args.summary]


def check_calibration(calib, n_windows, sources, args):
    """The calibration draw, checked before the first method runs: enough tokens for one window of every
    model, no more windows than distinct ones, and memory for them."""
    for s in sources:
        T = window_length(args, s)
        if len(calib) < T:
            raise UserError(f"the calibration data has {len(calib)} tokens, fewer than one window of {T}")
        distinct = len(calib) - T + 1
        if n_windows > distinct:
            raise UserError(f"--calib_windows {n_windows:,} is more than the {distinct:,} distinct windows of {T} "
                            f"tokens in the calibration data; use --calib_windows {distinct:,} or less")
        check_fits(n_windows * T * 8, "cpu", f"--calib_windows {n_windows:,} x {T} tokens", "lower --calib_windows")


def text_encoder(sources, needed):
    """The tokenizer text goes through: GPT-2 BPE (None) for this repo's models, a Hugging Face model's
    own tokenizer for Hugging Face models; one table cannot mix them on text input."""
    hf = [s for s in sources if hasattr(s.model, "hf")]
    if not needed or not hf:
        return None
    if len(hf) < len(sources):
        raise UserError("text input is tokenized with each model's own tokenizer, and this table mixes GPT-2 BPE models "
                        "with Hugging Face models of another tokenizer; evaluate them in separate tables or pass --data")
    from hf.models import load_tokenizer
    vocabs = [load_tokenizer(s.model).get_vocab() for s in hf]
    if any(v != vocabs[0] for v in vocabs[1:]):
        raise UserError(f"{hf[0].checkpoint} and another model have different tokenizers, so one text cannot be scored "
                        f"for both; evaluate them in separate tables or pass --data")
    from hf.models import tokenization
    return tokenization(hf[0].model, required=True)[0]


def calibration_tokens(args, who, encode=None):
    """(tokens, description) for the calibrated methods `who`: never the evaluation text. Token files stay
    memory-mapped."""
    if args.calib_data:
        return input_tokens(data=args.calib_data), f"tokens {args.calib_data}"
    if args.calib_text_file:
        return text_ids(read_text_file(args.calib_text_file), encode), f"text {args.calib_text_file}"
    needs = f"{' and '.join(who)} need{'s' if len(who) == 1 else ''} calibration data from a training split"
    if args.data:
        sibling = os.path.join(os.path.dirname(os.path.abspath(args.data)), "train.bin")
        if os.path.basename(args.data) != "train.bin" and os.path.isfile(sibling):
            return input_tokens(data=sibling), f"tokens {sibling}"
        raise UserError(f"{needs} and there is no train.bin beside {args.data}; "
                        f"pass --calib_data TRAIN.bin or --calib_text_file FILE")
    if args.text_file:
        raise UserError(f"{needs}, not the evaluation text; pass --calib_data TRAIN.bin or --calib_text_file FILE")
    text = wikitext2_text("train", instead="pass --calib_data TRAIN.bin or --calib_text_file FILE")
    return text_ids(text, encode), f"wikitext2 ({WIKITEXT2[1]}, train)"


def main(argv=None):
    args = parse_args(argv)
    columns = validate_args(args)
    device = resolve_device(args.device)
    dtype = table_dtype(args.dtype, device)
    check_backend(args.attn_backend)
    load_variant_file(args.variants_file)
    inputs = load_inputs(args, columns)  # everything that can be wrong with the input, before any evaluation
    opts = method_options(args, dtype)
    settings = {"w8_granularity": args.w8_granularity, "quantize_head": args.quantize_head, "sparsity": args.sparsity,
                "prune_scope": args.prune_scope, "fp_tokens": args.fp_tokens, "act_percentile": args.act_percentile,
                "drop_tail": args.drop_tail, "calibration": inputs.calib_desc,
                "calib_windows": args.calib_windows if inputs.calib is not None else None,
                "seed": args.seed if inputs.calib is not None else None,
                "methods": {c.name: c.settings(opts) for c in columns}}
    print(f"evaluating {len(inputs.sources)} model(s) x {len(columns)} method(s) on {inputs.data_desc} "
          f"({inputs.tokens.size:,} tokens), device {device}, dtype {DTYPE_NAMES[dtype]}", file=sys.stderr)
    metadata = run_metadata(device)
    rows = [evaluate_source(s, columns, inputs, args, opts, device, dtype, settings, metadata) for s in inputs.sources]
    table = markdown_table(rows, columns, opts)
    summary = summary_lines(inputs.outliers, rows[0], columns) if inputs.outliers is not None else []
    print(table + "".join(f"\n{line}" for line in summary) + ("\n" if summary else ""), end="")
    notes = table_notes(rows, columns, inputs, args, opts, device, dtype)
    with output_set(args.out, TOOL, RESULT_FILES, inputs=input_paths(args)) as tmp:
        for name, text in (("results.md", table + "\n" + notes + "".join(f"\n{line}\n" for line in summary)),
                           ("results.json", json_text(rows)), ("results.csv", csv_text(rows, [c.name for c in columns]))):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
    print(f"wrote {os.path.join(args.out, 'results.md')}, results.json, results.csv", file=sys.stderr)
    return 0


def method_options(args, dtype):
    return cm.Options(precision=DTYPE_LABELS[dtype], w8_granularity=args.w8_granularity,
                      quantize_head=args.quantize_head, sparsity=args.sparsity, prune_scope=args.prune_scope,
                      fp_tokens=args.fp_tokens, act_percentile=args.act_percentile,
                      calib_batch_size=args.batch_size or 8, dtype=dtype)


@dataclass
class Inputs:
    """What every row of the table is evaluated on (and the calibrated methods calibrated on)."""
    sources: list
    tokens: np.ndarray
    data_desc: str
    calib: object = None                 # calibration tokens (a token array), or None
    calib_desc: str = None
    outliers: dict = None                # --summary's outliers.json


def check_one_window(n_tokens, T, args, source):
    """The evaluation tokens hold one window of T (+1 target) for `source`; the error names what set each."""
    if n_tokens - (0 if args.drop_tail else 1) >= T:
        return
    cut = f" (cut by --max_tokens {args.max_tokens})" if args.max_tokens else ""
    window = (f"--block_size {T}" if args.block_size
              else f"{T} (the default window: {source.checkpoint}'s block size, at most {MAX_DEFAULT_WINDOW})")
    raise UserError(f"the evaluation text has {n_tokens} tokens{cut}, fewer than one window of {window} + 1; "
                    f"pass more tokens or a smaller --block_size")


def load_inputs(args, columns):
    """The models and the evaluation / calibration tokens, each checked against every model."""
    outliers = read_outliers(args.summary) if args.summary else None
    sources = load_sources(args.checkpoints, args.pretrained, args.attn_backend)
    check_vocabularies(sources)
    if args.data is None and args.text_file is None and args.dataset is None:
        args.dataset = "wikitext2"
    calibrated = list(dict.fromkeys(c.method.name for c in columns if c.method.calibrated))
    encode = text_encoder(sources, needed=args.data is None or (args.calib_text_file is not None))
    tokens, data_desc = load_eval_tokens(args.dataset, args.text_file, args.data, split=args.split, encode=encode)
    if args.max_tokens:
        tokens = tokens[:args.max_tokens]
        data_desc += f", first {tokens.size} tokens"
    for s in sources:
        T = window_length(args, s)
        if T > s.block_size:
            raise UserError(f"--block_size {T} exceeds the block size {s.block_size} of {s.checkpoint}")
        check_one_window(tokens.size, T, args, s)
        make_windows(tokens.size, T, args.stride, args.drop_tail)
        if tokens.size and int(tokens.max()) >= s.vocab_size:
            raise UserError(f"the evaluation tokens go up to id {int(tokens.max())} but {s.checkpoint} has a vocabulary "
                            f"of {s.vocab_size}; evaluate with data tokenized for this model")
        check_fp_tokens(columns, T - 1 if args.drop_tail else T)  # a --drop_tail window reads T - 1 tokens
    calib, calib_desc = calibration_tokens(args, calibrated, encode) if calibrated else (None, None)
    if calib is not None and calib.size and int(calib.max()) >= min(s.vocab_size for s in sources):
        raise UserError(f"the calibration tokens go up to id {int(calib.max())}, beyond the models' vocabulary")
    if calib is not None:
        check_calibration(calib, args.calib_windows, sources, args)
    return Inputs(sources, tokens, data_desc, calib, calib_desc, outliers)


def check_fp_tokens(columns, T):
    """Every activation / KV column quantizes something of a window of T tokens."""
    for c in columns:
        if c.fp_tokens >= T:
            raise UserError(f"{c.name}: {c.fp_tokens} full-precision positions leave nothing of a {T}-token window to "
                            f"quantize; use fewer (--fp_tokens or +fpK)")


def evaluate_source(s, columns, inputs, args, opts, device, dtype, settings, metadata):
    """One row of the table: the model's perplexity under every column's method (each on its own copy)."""
    base = build_model(s, device, args.attn_backend)
    T = window_length(args, s)
    check_forward(base, inputs.tokens, T, s, device, dtype)
    calib = (calibration_windows(inputs.calib, args.calib_windows, T, args.seed) if inputs.calib is not None else None)
    row = {"name": s.name, "checkpoint": s.checkpoint, "attention": s.attention, "iter_num": s.iter_num,
           "dtype": DTYPE_NAMES[dtype], "device": str(device), "ppl": {}, "nll": {}, "seconds": {},
           "compress_seconds": {}, "eval_seconds": {}, "eval": None, "settings": settings, "metadata": metadata,
           "head_tied": cm.head_is_tied(base)}
    for c in columns:
        t0 = time.perf_counter()
        model = base if c.name == "fp" else copy.deepcopy(base)
        c.apply(model, opts, calib if c.method.calibrated else None)
        compressed = time.perf_counter()
        res = evaluate_perplexity(model, inputs.tokens, block_size=T, stride=args.stride, batch_size=args.batch_size,
                                  dtype=dtype, progress=not args.no_progress, desc=f"{s.name} [{c.name}]",
                                  drop_tail=args.drop_tail)
        del model
        if c.name == "fp" and not math.isfinite(res.nll):  # the model itself overflowed: no table of NaN
            from training.checkpoint import overflow_error
            raise overflow_error(s.checkpoint, base, f"mean loss {res.nll} over {res.n_tokens:,} tokens", dtype)
        row["ppl"][c.name] = res.ppl if math.isfinite(res.ppl) else None
        row["nll"][c.name] = res.nll if math.isfinite(res.nll) else None
        row["seconds"][c.name] = round(time.perf_counter() - t0, 3)
        row["compress_seconds"][c.name] = round(compressed - t0, 3)
        row["eval_seconds"][c.name] = round(res.seconds, 3)
        row["eval"] = {"data": inputs.data_desc, "tokens": res.n_tokens, "windows": res.n_windows,
                       "block_size": res.block_size, "stride": res.stride, "drop_tail": args.drop_tail}
        print(f"{s.name} [{c.name}]: ppl {fmt_ppl(res.ppl)} ({res.n_tokens:,} tokens, {res.n_windows} windows, "
              f"{res.seconds:.1f} s)", file=sys.stderr)
    s.model = None
    return row


def check_forward(model, tokens, T, source, device, dtype):
    """A model whose forward overflows (finite but huge weights, fp16's range) is an error before any method runs."""
    from training.checkpoint import check_forward_finite
    window = torch.as_tensor(np.asarray(tokens[:T + 1], dtype=np.int64), device=device)[None]
    autocast = autocast_context(device, dtype)
    check_forward_finite(model, window[:, :-1], window[:, 1:], source.checkpoint, autocast, dtype)


def table_notes(rows, columns, inputs, args, opts, device, dtype):
    """The lines under the table: what was evaluated, how, every column's settings, and what Δ means."""
    ev = rows[0]["eval"]
    windows = ("GPTQ's protocol (--drop_tail): non-overlapping windows, each scoring its T - 1 predictions inside it, "
               "the last partial window dropped;" if args.drop_tail else
               "non-overlapping windows" if args.stride is None else f"sliding windows (stride {args.stride})")
    tied = [r["name"] for r in rows if r["head_tied"]]
    settings = rows[0]["settings"]["methods"]
    return (f"Token-level perplexity on {inputs.data_desc}: {ev['tokens']:,} scored tokens, {ev['windows']} "
            f"{windows} of {ev['block_size']} tokens; device {device}, {DTYPE_NAMES[dtype]}"
            + (f"; calibration: {args.calib_windows} windows of {inputs.calib_desc} (seed {args.seed})"
               if inputs.calib is not None else "")
            + ". Δ = relative change of perplexity against the unquantized model. Columns (on the Linears of the "
              "blocks; embeddings and lm_head only with --quantize_head):\n"
            + "".join(f"- `{c.name}`: {cm.describe(settings[c.name])}\n" for c in columns)
            + ("--quantize_head on a tied head (" + ", ".join(tied) + "): the token embedding shares the head's "
               "weight, so it is quantized too.\n" if args.quantize_head and tied else ""))


# ----------------------------------------------------------------------------------------------
# --summary: the massive activation and what keeping its position in full precision does

def read_outliers(path):
    doc = read_json_file(path, "outliers.json")
    if not isinstance(doc, dict) or not isinstance((doc.get("activation") or {}).get("layer_output"), dict):
        raise UserError(f"{path} is not an outliers.json of analyze_outliers.py (no activation.layer_output); "
                        f"pass the one its --out folder holds")
    return doc


def summary_lines(doc, row, columns):
    """Two lines: where the model's largest activation sits (outliers.json), and the W8A8 columns with and
    without full-precision positions (this table)."""
    h = doc["activation"]["layer_output"]
    found = h.get("outliers") or []
    if found:
        top = max(found, key=lambda o: abs(o["value"]))
        layers = sorted({o["layer"] for o in found if o["channel"] == top["channel"]})
        positions = sorted({o["position"] for o in found})
        where = (f"Massive activation: |h| up to {abs(top['value']):,.0f} ({top['ratio']:,.0f}x the layer median) in "
                 f"channel {top['channel']}, layers {layers[0]}-{layers[-1]}, at {positions_text(positions)} "
                 f"(the largest on token {top['token']!r}); {h.get('outliers_total', len(found))} activations above "
                 f"tau = {doc.get('tau_by_type', {}).get('activation', doc.get('tau')):g} x mean |h|.")
    else:
        top1 = [t[0] for t in h["top3"]]
        l = max(range(len(top1)), key=lambda i: top1[i])
        where = (f"No massive activation: no |h| above the threshold of outliers.json (largest {top1[l]:,.1f} at layer "
                 f"{l}, {h['ratio_top1_median'][l]:,.0f}x the layer median).")
    return [where, quantization_line(row, columns)]


def positions_text(positions):
    shown = ", ".join(map(str, positions[:5])) + (" ..." if len(positions) > 5 else "")
    return f"position{'s' if len(positions) > 1 else ''} {shown}"


def quantization_line(row, columns):
    ppl = row["ppl"]
    kept = [c for c in columns if c.method.name == "w8a8" and c.fp_tokens]
    plain = next((c for c in columns if c.method.name == "w8a8" and not c.fp_tokens), None)
    if plain is None or not kept or ppl.get("fp") is None:
        return "(fp, w8a8 and w8a8+fpK columns give the effect of full-precision positions; this table lacks one)"
    k = kept[0]
    token = next((c for c in columns if c.method.name == "w8a8_token" and not c.fp_tokens), None)

    def ppl_change(c):
        return f"{fmt_ppl(ppl[c.name])} ({fmt_change(ppl[c.name], ppl['fp'])})"
    return (f"W8A8 per tensor: PPL {fmt_ppl(ppl['fp'])} -> {ppl_change(plain)}; with "
            f"{positions_text(list(range(k.fp_tokens)))} in full precision ({k.name}): {ppl_change(k)}"
            + (f"; per-token scales ({token.name}): {ppl_change(token)}" if token is not None else "") + ".")


if __name__ == "__main__":
    cli_main(main)
