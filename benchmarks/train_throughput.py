#!/usr/bin/env python
"""Training throughput of GPT-2 124M per attention variant and attention backend on one GPU.

For each (variant, backend) it builds GPT(GPTConfig(attention=variant, attn_backend=backend))
(12 layers, 12 heads, 768 wide, block 1024, vocab 50304, no dropout), trains on random tokens
(batch 16 x 1024 by default) under bf16 autocast with fused AdamW and grad clipping like
train.py, and reports after the warm-up steps: ms per step, tokens/s, MFU
(model.estimate_mfu; PaLM FLOPs over the GPU's peak dense bf16) and peak memory.

Backends: 'triton' is the fused kernel (fused_kernels/fused_attention.py); 'sdpa' is the project's unfused
PyTorch path (torch SDPA where the variant has such a form, the materialised reference for
sigmoid); 'reference' and 'auto' are accepted too.  An out-of-memory case is recorded as "OOM".

Writes benchmarks/results/train_throughput_<gpu>_<date>.json (runtime.system.run_metadata(): command
line, date, git commit, versions, GPU; plus compute capability, driver version, the tile configs
the fused kernels ran with, every measurement) and a markdown summary (printed and saved next
to it).

    python -m benchmarks.train_throughput                      # all variants, triton vs sdpa
    python -m benchmarks.train_throughput --compile --variants default sigmoid
    python -m benchmarks.train_throughput --smoke              # tiny model, 2 steps, CPU
"""

import argparse
import os
import sys
import tempfile
import time
import traceback

if not __package__:  # run as a file, the repo's packages are not importable: say how to run it
    sys.exit(f"run it from the repo root as a module: python -m benchmarks.{os.path.basename(__file__)[:-3]} ...")

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
from attention_variants import VARIANTS as ALL_VARIANTS  # noqa: E402  (imports no triton)


def parse_args(argv=None):
    from runtime.cli import ArgumentParser
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(ALL_VARIANTS), choices=ALL_VARIANTS)
    p.add_argument("--backends", nargs="+", default=["triton", "sdpa"],
                   choices=["triton", "sdpa", "reference", "auto"])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--vocab_size", type=int, default=50304)
    p.add_argument("--warmup_steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=30, help="timed steps after the warm-up")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s for MFU when the GPU is not in model.PEAK_BF16_FLOPS")
    p.add_argument("--out_dir", default=None,
                   help="where the JSON/markdown go (default benchmarks/results; a temp dir for --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model for 2 steps on CPU (Triton interpreter for the fused kernel): checks the "
                        "code path only, the numbers mean nothing")
    from benchmarks import bench_utils
    return bench_utils.parse_with_smoke(p, argv, "--smoke",
                                        {"batch_size": 2, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32,
                                         "vocab_size": 128, "warmup_steps": 1, "steps": 2})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.smoke:  # its sizes are set by parse_args
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: benchmarks/train_throughput.py needs a CUDA GPU (use --smoke for a tiny CPU check of the "
              "code path)", file=sys.stderr)
        return 2
    try:
        import model  # noqa: F401  (this repo's model.py, found through the path above)
    except ImportError as err:
        print(f"error: cannot import model.py ({err})", file=sys.stderr)
        return 2
    from benchmarks import bench_utils

    device = "cpu" if args.smoke else "cuda"
    gpu = "cpu-interpreter" if args.smoke else torch.cuda.get_device_name()
    meta = bench_utils.bench_metadata("train_throughput", "benchmarks.train_throughput", argv, device)
    bench_utils.check_out_dir(args.out_dir, "train_throughput")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device == "cuda"
                else torch.amp.autocast(device_type="cpu", enabled=False))
    B, T = args.batch_size, args.block_size
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else None

    results = []
    for variant in args.variants:
        for backend in args.backends:
            res = run_case(args, device, autocast, variant, backend, peak_flops)
            results.append({"variant": variant, "backend": backend, **res})
            if res["status"] == "ok":
                mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] is not None else "n/a"
                print(f"{variant:15s} {backend:9s} {res['ms_per_step']:9.1f} ms/step "
                      f"{res['tokens_per_s']:12,.0f} tok/s  MFU {mfu}  loss {res['final_loss']:.3f}", flush=True)
            else:
                print(f"{variant:15s} {backend:9s} {res['status']}", flush=True)

    table = markdown_table(results, args.backends)
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="train_bench_smoke_") if args.smoke
                               else os.path.join(REPO_ROOT, "benchmarks", "results"))
    meta.update({
        "smoke": args.smoke,
        "compile": args.compile,
        "batch_size": B,
        "block_size": T,
        "model": {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                  "vocab_size": args.vocab_size},
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "precision": "bf16 autocast" if device == "cuda" else "fp32 (CPU smoke)",
    })
    bench_utils.write_results(
        meta, results, table, out_dir, title="Training throughput", label=gpu,
        summary=f"torch {torch.__version__}, triton {meta['triton']}, batch {B} x {T}, "
                f"compile={args.compile}, compute capability {meta['compute_capability']}")
    return 0


def run_case(args, device, autocast, variant, backend, peak_flops):
    """Steps/s of one (variant, backend): warm-up steps, then timed steps on 4 fixed random batches."""
    import torch

    from model import GPT, GPTConfig
    B, T = args.batch_size, args.block_size
    model = optimizer = None
    try:
        config = GPTConfig(block_size=T, vocab_size=args.vocab_size, n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd, dropout=0.0, bias=False,
                           attention=variant, attn_backend=backend)
        torch.manual_seed(0)
        model = GPT(config).to(device)
        optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device)
        step_model = torch.compile(model) if args.compile else model
        g = torch.Generator(device="cpu").manual_seed(1)
        batches = []
        for _ in range(4):
            data = torch.randint(0, args.vocab_size, (B, T + 1), generator=g)
            batches.append((data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)))

        def step(i):
            x, y = batches[i % len(batches)]
            with autocast:
                _, loss = step_model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        t0 = time.perf_counter()
        for i in range(args.warmup_steps):
            step(i)
        sync()
        warmup_s = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(args.steps):
            loss = step(i)
        sync()
        dt = (time.perf_counter() - t0) / args.steps
        return {
            "status": "ok",
            "ms_per_step": dt * 1e3,
            "tokens_per_s": B * T / dt,
            "mfu": model.estimate_mfu(B, dt, peak_flops=peak_flops),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "warmup_s": warmup_s,
            "final_loss": float(loss.detach()),
            "params": model.get_num_params(),
        }
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    except Exception as err:  # keep sweeping; the error goes into the results
        traceback.print_exc()
        return {"status": f"error: {type(err).__name__}: {err}"[:300]}
    finally:
        model = optimizer = None
        if device == "cuda":
            torch.cuda.empty_cache()
        if args.compile:
            torch._dynamo.reset()


def markdown_table(results, backends):
    by = {(r["variant"], r["backend"]): r for r in results}
    base = "sdpa" if "sdpa" in backends else None
    lines = ["| variant | backend | ms/step | tokens/s | MFU | peak GiB | speed-up vs sdpa |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['backend']} | {r['status'][:40]} | | | | |")
            continue
        ref = by.get((r["variant"], base)) if base else None
        speed = (f"{ref['ms_per_step'] / r['ms_per_step']:.2f}x"
                 if ref is not None and ref["status"] == "ok" else "-")
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['backend']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} "
                     f"| {mfu} | {peak} | {speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from runtime.cli import cli_main
    cli_main(main)
