#!/usr/bin/env python
"""Host time per call of the fused attention: what one call costs the CPU before the GPU has work.

The default kernel on the model's layout (q, k, v views of one (B, T, 3*H*D) projection, requiring
grad; B*T = 16k, H = 12, D = 64, bf16):

    fwd_us            fused_attention(q, k, v), autograd recording
    fwd_bwd_us        the same, then torch.autograd.grad of the output for q, k, v
    floor_fwd_us      a bare torch.autograd.Function that allocates what the fused path allocates
    floor_fwd_bwd_us  (output and log-sum-exp; then dq, dk, dv and Delta) and launches nothing

--device cpu (the default without CUDA): every kernel launch is replaced by a stub that does nothing;
everything else is the real code: argument checks, the autograd.Function, allocations, the launch
cache's lookup and the direct launch's argument list.  TRITON_INTERPRET=1 is set only so that the
fused path accepts CPU tensors; no kernel runs.  "launches_through_triton" counts the timed launches
that missed the launch cache (0 when the cache works).

--device cuda: real launches.  fwd_us, fwd_bwd_us and the floor are the host time per call while
enqueuing --calls calls without synchronising (the GPU may still be busy); sdpa_fwd_us and
sdpa_fwd_bwd_us are the same for torch SDPA pinned to FlashAttention; *_graph_us are GPU times per call
from CUDA-graph replay (triton.testing.do_bench_cudagraph, median), fused vs SDPA.

Each host time is the smallest over --repeats of the mean over --calls calls (the least disturbed
repeat, as timeit recommends); the cases take turns within a repeat, so a busy spell of a shared
machine slows all of them.  fwd_vs_floor and fwd_bwd_vs_floor are fused / floor.  With several
--seq_lens every top-level value is the largest over them (ratios included) and "by_seq_len" holds
each.  Prints one JSON line on stdout (everything else goes to stderr);
--out FILE.json also writes it.

    python -m benchmarks.host_overhead                                   # CPU, stubbed launches
    python -m benchmarks.host_overhead --device cuda --seq_lens 1024 2048 --out host.json
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time

if not __package__:  # run as a file, the repo's packages are not importable: say how to run it
    sys.exit(f"run it from the repo root as a module: python -m benchmarks.{os.path.basename(__file__)[:-3]} ...")

KEYS = ("fwd_us", "fwd_bwd_us", "floor_fwd_us", "floor_fwd_bwd_us")
CUDA_KEYS = ("sdpa_fwd_us", "sdpa_fwd_bwd_us", "fused_graph_fwd_us", "fused_graph_fwd_bwd_us",
             "sdpa_graph_fwd_us", "sdpa_graph_fwd_bwd_us")


def parse_args(argv=None):
    from runtime.cli import ArgumentParser
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="cpu: stubbed launches; cuda: real ones (default: cuda when available)")
    p.add_argument("--seq_lens", type=int, nargs="+", default=[1024])
    p.add_argument("--tokens", type=int, default=16 * 1024, help="B*T per call (default 16k)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--calls", type=int, default=None, help="calls per timed repeat (default 500 on CPU, 50 on CUDA)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


class _StubKernel:
    """Stands in for a compiled kernel: its launcher does nothing."""
    function = 0
    packed_metadata = None

    @staticmethod
    def run(*args):
        pass


def stubbed_launches(counter):
    """fused_attention with every launch a no-op: a launch key's first launch 'compiles' to the stub
    (counted in counter[0]), later ones take the launch cache's direct path to it."""
    from fused_kernels import launch
    from fused_kernels.attention_kernels import KERNELS

    def compile_and_launch(plan, kind, args):
        counter[0] += 1
        return _StubKernel(), (1,), {name: None for name in KERNELS[kind].arg_names[len(args):]}

    return launch.overrides(compile_and_launch=compile_and_launch)


def floor_function():
    import torch

    class Floor(torch.autograd.Function):
        """The fused path's allocations (default kernel, model layout) and nothing else."""

        @staticmethod
        def forward(ctx, q, k, v):
            B, H, T, D = q.shape
            o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
            lse = torch.empty((B * H, T), dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, o, lse)
            return o

        @staticmethod
        def backward(ctx, do):
            q, k, v, o, lse = ctx.saved_tensors
            B, H, T, D = q.shape
            torch.empty((B * H, T), dtype=torch.float32, device=q.device)  # Delta
            return tuple(torch.empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
                         for _ in range(3))

    return Floor.apply


def host_us(cases, calls, repeats, sync):
    """{name: smallest over ``repeats`` of the mean host time per call (us) of ``calls`` calls of fn,
    issued without synchronising in between} for {name: fn}.  The cases take turns within each
    repeat, so that a busy spell of the machine slows all of them, not one."""
    best = dict.fromkeys(cases, math.inf)
    for _ in range(repeats):
        for name, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls)
            sync()
    return {name: t * 1e6 for name, t in best.items()}


def measure(args, T, device, dtype, fa, counter):
    """One --seq_lens entry; counter[0] is reset once every case has run once (compiled, tuned)."""
    import torch

    B, H, D = max(1, args.tokens // T), args.heads, args.head_dim
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(B, T, 3 * H * D, generator=g).to(device=device, dtype=dtype)
    # leaves with the model's strides: views of the projection, detached
    q, k, v = (t.view(B, T, H, D).transpose(1, 2).detach().requires_grad_() for t in qkv.split(H * D, dim=2))
    dout = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    floor = floor_function()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def fwd_bwd(attn):
        return lambda: torch.autograd.grad(attn(q, k, v), (q, k, v), dout)

    fused = fa.fused_attention
    cases = {"fwd_us": lambda: fused(q, k, v), "fwd_bwd_us": fwd_bwd(fused),
             "floor_fwd_us": lambda: floor(q, k, v), "floor_fwd_bwd_us": fwd_bwd(floor)}
    for fn in cases.values():
        fn()  # first launches (compile, autotune) outside the timing
    counter[0] = 0
    sync()
    row = {"B": B, "H": H, "T": T, "D": D, **host_us(cases, args.calls, args.repeats, sync)}
    row["fwd_vs_floor"] = row["fwd_us"] / row["floor_fwd_us"]
    row["fwd_bwd_vs_floor"] = row["fwd_bwd_us"] / row["floor_fwd_bwd_us"]
    if device == "cuda":
        row.update(measure_cuda(q, k, v, fwd_bwd, fused, args.calls, args.repeats, sync))
    else:
        row["launches_through_triton"] = counter[0]
    return row


def measure_cuda(q, k, v, fwd_bwd, fused, calls, repeats, sync):
    """Enqueue time of SDPA (FlashAttention) and CUDA-graph GPU times, fused vs SDPA."""
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def graph_us(fn):
        return triton.testing.do_bench_cudagraph(fn, return_mode="median") * 1e3

    out = {}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        cases = {"sdpa_fwd_us": lambda: sdpa(q, k, v), "sdpa_fwd_bwd_us": fwd_bwd(sdpa)}
        for fn in cases.values():
            fn()
        out.update(host_us(cases, calls, repeats, sync))
        out["sdpa_graph_fwd_us"] = graph_us(lambda: sdpa(q, k, v))
        out["sdpa_graph_fwd_bwd_us"] = graph_us(fwd_bwd(sdpa))
    out["fused_graph_fwd_us"] = graph_us(lambda: fused(q, k, v))
    out["fused_graph_fwd_bwd_us"] = graph_us(fwd_bwd(fused))
    return out


# the head dims the fused kernel takes (fused_attention.SUPPORTED_HEAD_DIMS; that module needs triton to import)
HEAD_DIMS = (16, 32, 64, 128)


def check_args(args):
    """Every size checked before anything is allocated or imported: one line, exit 2."""
    from runtime.cli import UserError
    from runtime.files import check_writable_dir
    from runtime.system import check_fits
    for name in ("tokens", "heads", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.calls is not None and args.calls < 1:
        raise UserError(f"--calls must be at least 1, got {args.calls}")
    if min(args.seq_lens) < 1:
        raise UserError(f"--seq_lens must be at least 1, got {min(args.seq_lens)}")
    if args.head_dim not in HEAD_DIMS:
        raise UserError(f"--head_dim {args.head_dim} is not one the fused kernel takes; choose one of "
                        f"{', '.join(map(str, HEAD_DIMS))}")
    T = max(args.seq_lens)
    per_case = max(1, args.tokens // T) * T * args.heads * args.head_dim * 4 * 12  # fp32 draws, q/k/v, o, grads
    check_fits(per_case, "cpu", f"--tokens {args.tokens:,} x --heads {args.heads} x --head_dim {args.head_dim}",
               "lower --tokens or --heads")
    if args.out is not None:  # before the measurements, not after them
        if os.path.isdir(args.out):
            raise UserError(f"--out {args.out} is a directory; name the JSON file to write")
        check_writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out's directory")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    check_args(args)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU (use --device cpu for stubbed launches)", file=sys.stderr)
        return 2
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before fused_attention is imported: it accepts CPU tensors
    import fused_kernels.fused_attention as fa
    from benchmarks import bench_utils

    if device == "cpu" and not fa.interpreting():
        print("error: fused_attention was imported without TRITON_INTERPRET=1; run this script on its own",
              file=sys.stderr)
        return 2
    args.calls = args.calls or (50 if device == "cuda" else 500)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    meta = bench_utils.bench_metadata("host_overhead", "benchmarks.host_overhead", argv, device)
    counter = [0]
    # stdout carries the JSON line alone (fused_attention prints its autotuning choices)
    with contextlib.redirect_stdout(sys.stderr):
        with stubbed_launches(counter) if device == "cpu" else contextlib.nullcontext():
            rows = [measure(args, T, device, dtype, fa, counter) for T in args.seq_lens]
    keys = KEYS + ("fwd_vs_floor", "fwd_bwd_vs_floor") + (CUDA_KEYS if device == "cuda" else ())
    result = {key: max(row[key] for row in rows) for key in keys}
    result.update({
        "device": device,
        "launch": "stub" if device == "cpu" else "real",
        "dtype": args.dtype,
        "timing": f"smallest over {args.repeats} repeats of the mean of {args.calls} calls; "
                  "top-level values: the largest over --seq_lens",
        "by_seq_len": rows,
        **{k: meta.get(k) for k in ("git_commit", "date", "torch", "triton", "python", "gpu", "command",
                                    "compute_capability", "driver_version")},
    })
    if device == "cpu":
        result["launches_through_triton"] = sum(row["launches_through_triton"] for row in rows)
        result["cpu_count"] = os.cpu_count()
    line = json.dumps(result)
    if args.out:
        from runtime.files import atomic_write_json
        atomic_write_json(args.out, result)
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    from runtime.cli import cli_main
    cli_main(main)
