#!/usr/bin/env python
"""Cost of the compression methods: evaluation time against fp's, calibration against one forward pass.

Issue 27's targets: each method's perplexity evaluation within 1.5x the fp evaluation, calibration (wanda,
w8a8_static) about one forward pass over the calibration windows. For every method: `compress` (changing a
fresh copy of the model: weight quantization, hooks, calibration) and `eval` (its perplexity evaluation,
exactly as compress_eval.py runs it), as wall time and as CPU time of this process. `pass` is one forward pass
over the calibration windows (the batches calibration uses), the unit of calibration cost. Every method (fp
too) runs once per round; each number is the smallest over --rounds (the least disturbed round), and every
ratio is to fp's. On a CPU shared with other jobs, --threads 1 gives the steadiest CPU times: with several
threads a descheduled thread makes the others spin, which counts as CPU time. Prints one JSON line on
stdout and, with --markdown, a table on stderr; --out FILE.json also writes it.

    python -m benchmarks.compress_cost --pretrained .cache/smollm2-135m \\
        --text_file ../shared/data/wikitext-2/test.txt --calib_text_file ../shared/data/wikitext-2/valid.txt \\
        --max_tokens 2048 --block_size 512 --calib_windows 4 --threads 1 --rounds 2 --markdown
"""

import argparse
import copy
import json
import os
import sys
import time

if not __package__:  # run as a file, the repo's packages are not importable: say how to run it
    sys.exit(f"run it from the repo root as a module: python -m benchmarks.{os.path.basename(__file__)[:-3]} ...")

import torch  # noqa: E402

import compress_eval as ce  # noqa: E402
from compress import methods as cm  # noqa: E402
from compress.perplexity import evaluate_perplexity  # noqa: E402
from runtime.cli import ArgumentParser, UserError, cli_main  # noqa: E402
from runtime.files import atomic_write_text  # noqa: E402

DEFAULT_METHODS = "w8,w8a8,w8a8+fp1,w8a8_token,w8a8_static,w4g128,kv4,kv8,wanda"


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 1)[1])
    p.add_argument("checkpoint", nargs="?", help="a checkpoint file (or --pretrained)")
    p.add_argument("--pretrained", help="a Hugging Face model directory or name (or GPT-2 name)")
    p.add_argument("--text_file", required=True, help="evaluation text")
    p.add_argument("--calib_text_file", required=True, help="calibration text (another split)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"methods besides fp (default {DEFAULT_METHODS})")
    p.add_argument("--max_tokens", type=int, default=2048, help="evaluation tokens (default 2048)")
    p.add_argument("--block_size", type=int, default=512, help="window length (default 512)")
    p.add_argument("--calib_windows", type=int, default=4, help="calibration windows (default 4)")
    p.add_argument("--batch_size", type=int, default=None, help="windows per forward (compress_eval.py's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over every method; the smallest time counts (default 2)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table on stderr")
    return p.parse_args(argv)


def timed(fn):
    """(result, wall s, CPU s of this process)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None):
    args = parse_args(argv)
    if bool(args.checkpoint) == bool(args.pretrained):
        raise UserError("give one model: a checkpoint file or --pretrained NAME_OR_DIR")
    if args.rounds < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--rounds and --threads must be positive integers")
    if args.threads:
        torch.set_num_threads(args.threads)
    cargs = ce.parse_args(([args.checkpoint] if args.checkpoint else ["--pretrained", args.pretrained])
                          + ["--text_file", args.text_file, "--calib_text_file", args.calib_text_file,
                             "--max_tokens", str(args.max_tokens), "--block_size", str(args.block_size),
                             "--calib_windows", str(args.calib_windows), "--methods", "fp," + args.methods,
                             "--device", args.device, "--no_progress", "--out", os.devnull]
                          + (["--batch_size", str(args.batch_size)] if args.batch_size else []))
    columns = cm.parse_columns(cargs.methods)
    device = ce.resolve_device(cargs.device)
    dtype = ce.table_dtype(cargs.dtype, device)
    inputs = ce.load_inputs(cargs, columns)
    source = inputs.sources[0]
    base = ce.build_model(source, device, cargs.attn_backend)
    T = ce.window_length(cargs, source)
    calib = ce.calibration_windows(inputs.calib, cargs.calib_windows, T, cargs.seed)
    opts = ce.method_options(cargs, dtype)

    def evaluate(model):
        return evaluate_perplexity(model, inputs.tokens, block_size=T, batch_size=cargs.batch_size, dtype=dtype,
                                   progress=False)

    def one(col):
        model = base if col.name == "fp" else copy.deepcopy(base)
        _, cw, cc = timed(lambda: col.apply(model, opts, calib if col.method.calibrated else None))
        res, ew, ec = timed(lambda: evaluate(model))
        print(f"{col.name}: ppl {res.ppl:.2f}, compress {cw:.1f} s, eval {ew:.1f} s wall / {ec:.1f} s CPU",
              file=sys.stderr)
        return {"method": col.name, "ppl": res.ppl, "compress_s": cw, "compress_cpu_s": cc, "eval_s": ew,
                "eval_cpu_s": ec}

    def calibration_pass():
        with torch.no_grad():
            for i in range(0, calib.shape[0], opts.calib_batch_size):
                cm.model_forward(base, calib[i:i + opts.calib_batch_size].to(device))

    rounds = [[one(c) for c in columns] for _ in range(args.rounds)]
    passes = [timed(calibration_pass)[1:] for _ in range(args.rounds)]
    pw, pc = min(p[0] for p in passes), min(p[1] for p in passes)
    keys = ("compress_s", "compress_cpu_s", "eval_s", "eval_cpu_s")
    rows = [{"method": runs[0]["method"], "ppl": runs[0]["ppl"], **{k: min(r[k] for r in runs) for k in keys}}
            for runs in zip(*rounds)]
    fp = rows[0]
    for r in rows:
        r.update(eval_vs_fp=r["eval_s"] / fp["eval_s"], eval_cpu_vs_fp=r["eval_cpu_s"] / fp["eval_cpu_s"],
                 compress_vs_pass=r["compress_s"] / pw, compress_cpu_vs_pass=r["compress_cpu_s"] / pc)
    doc = {"model": source.checkpoint, "device": str(device), "tokens": int(inputs.tokens.size), "block_size": T,
           "calib_windows": int(calib.shape[0]), "rounds": args.rounds, "pass_s": pw, "pass_cpu_s": pc,
           "load": os.getloadavg(), "torch_threads": torch.get_num_threads(), "methods": rows}
    line = json.dumps(doc)
    print(line)
    if args.out:
        atomic_write_text(args.out, line + "\n")
    if args.markdown:
        print(markdown(doc), file=sys.stderr)
    return 0


def markdown(doc):
    from runtime.reports import markdown_table
    rows = [[f"`{r['method']}`", f"{r['ppl']:.2f}", f"{r['eval_s']:.1f} / {r['eval_cpu_s']:.1f}",
             f"{r['eval_vs_fp']:.2f}x / {r['eval_cpu_vs_fp']:.2f}x", f"{r['compress_s']:.1f} / {r['compress_cpu_s']:.1f}",
             f"{r['compress_vs_pass']:.2f} / {r['compress_cpu_vs_pass']:.2f}"] for r in doc["methods"]]
    return markdown_table(["method", "PPL", "eval s (wall / CPU)", "eval vs fp (wall / CPU)",
                           "compress s (wall / CPU)", "compress in calibration passes (wall / CPU)"], rows)


if __name__ == "__main__":
    cli_main(main)
