"""One command from raw text to the paper's headline comparison, for every attention variant.

    python reproduce.py --scale tiny --out out/reproduce_tiny          # every variant, <= 10 min on 2 CPU cores
    python reproduce.py --scale gpu --out out/reproduce_gpu            # default vs 2 designs, <= 9 min on one H100/H200
    python reproduce.py --scale gpu --dry-run                          # its plan, tokens and time estimate (any machine)
    python reproduce.py --scale gpu-long --out out/reproduce_gpu-long  # every variant, larger runs (~25 min, estimate)
    python reproduce.py --scale paper --out out/paper                  # prints the torchrun commands
    python reproduce.py --scale paper --out out/paper --execute        # ... and runs them (GPU cluster)
    python reproduce.py --scale tiny --variants default,scaling --max_iters 10 --out /tmp/smoke   # CI smoke

Stages, each a subprocess of the repo's own scripts (run from the repo root; scripts never import
each other): prepare_data.py for the scale's corpus; train.py once per variant, all with the same
seed and therefore the same initial-weight RNG stream and data order (under torchrun when
--nproc_per_node > 1); analyze_outliers.py on every checkpoint; compress_eval.py over all of them
(the columns of compress.methods.REPRODUCE: the paper's W8 and 50% sparsity, W8A8 per tensor with
and without position 0 in full precision, static and per token, W4 groups of 128, a 4-bit KV cache).
Then DIR/REPORT.md, DIR/reproduce.json and the figures (Fig. 11 top-1 / top-3 |h| per layer, Fig. 12
loss curves, outlier emergence over training from the telemetry).

Each scale's model and training settings are one train.py config file (config/reproduce/tiny.py, gpu.py,
gpu_long.py; the paper's own config/<variant>.py), named on every training command; its corpus, analysis
and compression sizes are its entry in reproduction/plan.py.

A variant registered at run time (attention_variants.register) is reproduced with --variants_file FILE.py,
the file that registers it: reproduce.py runs it before checking --variants (every registered variant is
then a choice, and part of the default list where that is every variant), and passes it on to every stage
(train.py's variants_file key, --variants_file of analyze_outliers.py and compress_eval.py), which runs it
before building a model.

--scale gpu fits a wall-clock budget (--budget-s, default 540 s): the iterations per variant are
sized from the training throughput measured on one H200 plus stated overheads, every stage has a
deadline (a training past it is stopped through its checkpointing SIGTERM handler and analysed as
far as it got), and the report is rewritten after every stage and every 30 s of training, so a run
cut off anywhere still reports what it saw.

Re-running continues where it stopped: data already prepared is kept, a run whose ckpt.pt reached
max_iters is skipped, an interrupted one resumes exactly (--init_from=resume), an analysis or a
compression table that already covers the current checkpoints is kept. A run directory holding a
run with other settings is an error (choose another --out), never silently mixed.
"""

import argparse
import os
import sys
import time

import attention_variants
from reproduction.collect import environment
from reproduction.gpu_time import estimate_text
from reproduction.paths import rel
from reproduction.plan import CORPORA, GPU_SCALES, SCALE_CHOICES, SCALES, Plan, check_can_prepare
from reproduction.report import REPORT_FILES, TOOL, output_dirs, write_outputs
from reproduction.runner import Outcome, Runner, execute
from runtime.cli import ArgumentParser, UserError, check_seed, cli_main
from runtime.outputs import check_output_dir
from runtime.system import resolve_device


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", required=True, choices=SCALE_CHOICES,
                   help="tiny: CPU, minutes; gpu: one H100/H200 within --budget-s (9 min); gpu-long: one GPU, "
                        "~25 min (--recipe 2b: the paper's 2B-token reading); paper: the paper configs via torchrun")
    p.add_argument("--variants", default=None,
                   help=f"comma list of attention variants (default: default,attention_bias,softmax1 for gpu, "
                        f"else every registered variant: {', '.join(attention_variants.VARIANTS)} and those "
                        f"of --variants_file)")
    p.add_argument("--variants_file", metavar="FILE.py",
                   help=attention_variants.VARIANTS_FILE_HELP + "; passed on to every stage")
    p.add_argument("--out", default=None, help="output directory (default out/reproduce_SCALE)")
    p.add_argument("--report_dir", default=None,
                   help="also write REPORT.md, reproduce.json and the figures here after every stage (e.g. a "
                        "folder copied back from a remote GPU machine, while the checkpoints stay in --out)")
    p.add_argument("--corpus", choices=CORPORA, default=None,
                   help="training corpus (default: builtin for tiny, pysource for gpu and gpu-long, openwebtext "
                        "for paper); pysource is this Python installation's standard-library source (or a "
                        "prepared copy in ../shared/data/pysource or ./shared/data/pysource); shakespeare and "
                        "wikitext2 use ../shared/data when present")
    p.add_argument("--data_dir", default=None,
                   help="use this prepared data directory (train.bin, val.bin) instead of preparing the corpus "
                        "(default: DIR/data/CORPUS; data/openwebtext for paper)")
    p.add_argument("--seed", type=int, default=1337, help="training seed shared by every variant (default 1337)")
    p.add_argument("--max_iters", type=int, default=None,
                   help="override the scale's iterations (smoke tests; gpu: instead of sizing them from the budget)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="--scale gpu: wall-clock budget in seconds (default 540); sizes the iterations per "
                        "variant and sets every stage's deadline")
    p.add_argument("--recipe", choices=("small", "2b"), default="small",
                   help="--scale gpu-long: small (12 layers x 512 dims, 65.5M tokens per variant, default) or 2b "
                        "(config/<variant>.py + config/recipe_2b.py: GPT-2 124M, 2.05B tokens of OpenWebText)")
    p.add_argument("--num_seqs", type=int, default=None, help="override the analysis' number of sequences")
    p.add_argument("--max_tokens", type=int, default=None, help="override the compression evaluation's token count")
    p.add_argument("--nproc_per_node", type=int, default=None,
                   help="processes (GPUs) per training; >1 trains under torchrun (default 1; paper: 8)")
    p.add_argument("--device", default="auto", help="device for every stage (default auto)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the plan (for gpu: tokens per variant and the time estimate) and the commands; "
                        "run and write nothing; works without a GPU")
    p.add_argument("--prepare_only", action="store_true",
                   help="only prepare the scale's corpus under DIR/data (e.g. to carry it to an offline GPU machine)")
    p.add_argument("--execute", action="store_true",
                   help="--scale paper: run the commands (without it paper only prints them)")
    args = p.parse_args(argv)
    if args.recipe != "small" and args.scale != "gpu-long":
        raise UserError("--recipe applies to --scale gpu-long")
    if args.budget_s is not None and args.scale != "gpu":
        raise UserError("--budget_s applies to --scale gpu (the other scales have no time model)")
    if args.budget_s is not None and not args.budget_s > 0:
        raise UserError(f"--budget_s must be positive, got {args.budget_s:g}")
    args.scale_key = "gpu-long-2b" if args.scale == "gpu-long" and args.recipe == "2b" else args.scale
    scale = SCALES[args.scale_key]
    if args.budget_s is None and scale.budget_s is not None:
        args.budget_s = float(scale.budget_s)
    args.variant_list = check_variants(args, scale)
    check_seed(args.seed)
    for key in ("max_iters", "num_seqs", "max_tokens", "nproc_per_node"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise UserError(f"--{key} must be at least 1, got {value}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.out = os.path.abspath(args.out or os.path.join("out", f"reproduce_{args.scale}"))
    if args.report_dir:
        args.report_dir = os.path.abspath(args.report_dir)
    return args


def check_variants(args, scale):
    """--variants (or the scale's default list) as names of the registry, after running --variants_file."""
    attention_variants.load_variant_file(args.variants_file)
    if args.variants_file:
        args.variants_file = os.path.abspath(args.variants_file)
    registered = tuple(attention_variants.REGISTRY)
    names = [v.strip() for v in (args.variants or ",".join(scale.variants or registered)).split(",") if v.strip()]
    unknown = [v for v in names if v not in registered]
    if unknown or not names:
        raise UserError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(registered)}" + ("" if args.variants_file else
                                                      " (or register one with --variants_file)"))
    if len(set(names)) != len(names):
        raise UserError("--variants names a variant twice")
    return names


def require_cuda(args):
    """The GPU scales refuse a machine without CUDA in one line, before anything is written."""
    if args.scale_key not in GPU_SCALES or args.dry_run or args.prepare_only:
        return
    if args.device != "auto" and not str(args.device).startswith("cuda"):
        raise UserError(f"--scale {args.scale} runs on CUDA, not --device {args.device}; use --scale tiny on a CPU")
    import torch
    if not torch.cuda.is_available():
        raise UserError(f"--scale {args.scale} needs a CUDA GPU and none is visible (torch.cuda.is_available() is "
                        f"False); --dry_run prints its plan and time estimate on any machine")


def print_paper_notes(plan):
    print(f"\nThe paper scale trains eight GPT-2 124M models for 50,000 iterations of 491,520 tokens each; "
          f"run each command on a node with {plan.nproc} GPUs (or pass --nproc_per_node), or the whole list with "
          f"`python reproduce.py --scale paper --execute`. Every training command is resumable: re-running "
          f"reproduce.py (or the printed command with --init_from=resume) continues from ckpt.pt. Multi-node: "
          f"replace `--standalone` by `--nnodes=N --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:29500` "
          f"(out_dir on a shared filesystem).", flush=True)


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    plan = Plan(args)
    print_only = args.dry_run or (args.scale == "paper" and not args.execute)
    if not print_only:
        require_cuda(args)
        check_can_prepare(plan)
        resolve_device(args.device)  # every stage gets it: refuse an unusable one before the first
        for out, flag in output_dirs(args):
            check_output_dir(out, TOOL, REPORT_FILES, inputs=[args.data_dir], flag=flag)
    runner = Runner(plan, dry_run=print_only)
    runner.say(f"scale {args.scale}: {plan.scale.what}")
    runner.say(f"variants: {', '.join(args.variant_list)}; output {rel(args.out)}"
               + (" (dry run: nothing is run or written)" if print_only else ""))
    if plan.estimate is not None:
        for line in estimate_text(plan):
            runner.say(line)
    outcome = Outcome()
    env = None
    if plan.budget_s is not None and not print_only:  # partial reports: a run cut off still reports what it saw
        env = environment(plan)
        runner.on_progress = lambda: write_outputs(plan, runner, outcome, t0, env, partial=True)
    execute(plan, runner, outcome, t0)
    if print_only or args.prepare_only:
        if args.scale == "paper":
            print_paper_notes(plan)
        if args.prepare_only:
            runner.say(f"data ready in {rel(plan.data_dir)}")
        return 0

    write_outputs(plan, runner, outcome, t0, env or environment(plan), partial=False)
    runner.say(f"wrote {rel(os.path.join(args.out, 'REPORT.md'))} and reproduce.json in {time.time() - t0:.0f} s"
               + (f" (and into {rel(args.report_dir)})" if args.report_dir else ""))
    if outcome.failed or outcome.notes:
        raise UserError(f"{len(outcome.failed)} of {len(args.variant_list)} variants did not finish"
                        + (" (" + "; ".join(f"{v}: {e}" for v, e in outcome.failed.items()) + ")" if outcome.failed else "")
                        + "".join(f"; {n}" for n in outcome.notes)
                        + "; the report covers the rest; re-run the same command to continue")
    return 0


if __name__ == "__main__":
    cli_main(main)
