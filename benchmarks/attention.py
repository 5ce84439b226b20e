#!/usr/bin/env python
"""Attention kernel benchmark: the fused Triton kernel vs. torch SDPA vs. each variant's
unfused PyTorch implementation.

For every variant and sequence length T (B*T tokens fixed, default 16k; H=12, D=64, bf16) it
measures forward, backward and forward+backward time with triton.testing.do_bench and reports
TFLOP/s with FlashAttention's convention: 4*B*H*T^2*D FLOPs per forward, halved for causal
attention, backward = 2.5x forward (so fwd+bwd = 3.5x).  Every implementation is charged the
same FLOPs, so TFLOP/s ratios are speed ratios.  Peak memory (torch.cuda.max_memory_allocated
above the live inputs during one call, reset after a warm-up call of each case) is recorded for
the forward (graph kept) and for forward+backward.  SDPA only computes the default variant; for
the other variants the table's SDPA ratio is labelled "vs causal SDPA (default)".

Implementations:
    fused    the variant's `triton` path in attention_variants.py (the fused kernel with
             the entry's `kernel_flags`, then its elementwise `output_step` in torch
             where it has one: fixed_bias / scaling / gated)                   every variant
    sdpa     F.scaled_dot_product_attention(is_causal=True), its best backend  'default' only
    unfused  the variant's PyTorch path in attention_variants.py: its `sdpa` form (an explicit
             mask and an extra key column for the sink variants, SDPA plus the elementwise
             step for fixed_bias / scaling / gated), else its `reference` (sigmoid)

Inputs mimic the model: q, k, v are views of one (B, T, 3*H*D) projection; a variant's own
inputs (sink vectors, gates) come from its registry entry, computed from a block input x.  An implementation that runs out of memory is recorded
as "OOM".

Writes benchmarks/results/attention_<gpu>_<date>.json (runtime.system.run_metadata(): command line,
date, git commit, versions, GPU; plus compute capability, driver version, the tile configs the
fused kernels ran with, every measurement) and a markdown summary (printed and saved next to it).

    python -m benchmarks.attention                       # the full sweep (needs CUDA)
    python -m benchmarks.attention --seq_lens 1024 --variants default scaling gated
    python -m benchmarks.attention --interpret_smoke     # tiny CPU run through the Triton
                                                         # interpreter: exercises the code only
"""

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

if not __package__:  # run as a file, the repo's packages are not importable: say how to run it
    sys.exit(f"run it from the repo root as a module: python -m benchmarks.{os.path.basename(__file__)[:-3]} ...")

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
from attention_variants import VARIANTS as ALL_VARIANTS  # noqa: E402  (imports no triton)

MODES = ("fwd", "bwd", "fwdbwd")
SDPA_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


def parse_args(argv=None):
    from runtime.cli import ArgumentParser
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq_lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--tokens", type=int, default=16 * 1024, help="B*T per case (default 16k)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--variants", nargs="+", default=list(ALL_VARIANTS), choices=ALL_VARIANTS)
    p.add_argument("--impls", nargs="+", default=["fused", "sdpa", "unfused"],
                   choices=["fused", "sdpa", "unfused"])
    p.add_argument("--sdpa_backend", default="flash", choices=sorted(SDPA_BACKENDS),
                   help="the backend the 'sdpa' baseline is pinned to (default flash: FlashAttention-2); "
                        "'auto' lets torch choose. Recorded in the results")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--out_dir", default=None,
                   help="where the JSON/markdown go (default benchmarks/results; a temp dir for --interpret_smoke)")
    p.add_argument("--interpret_smoke", action="store_true",
                   help="run one tiny shape on CPU through the Triton interpreter (checks the code path only; "
                        "the timings mean nothing)")
    from benchmarks import bench_utils
    return bench_utils.parse_with_smoke(p, argv, "--interpret_smoke",
                                        {"seq_lens": [80], "tokens": 80, "heads": 2, "head_dim": 16})


def flops_fwd(B, H, T, D):
    return 4 * B * H * T * T * D / 2  # causal


@dataclass
class Setting:
    """What every case of one invocation shares."""
    args: argparse.Namespace
    device: str
    dtype: object        # a torch dtype
    H: int
    D: int


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.interpret_smoke:  # its sizes are set by parse_args
        # must happen before triton (and the kernels) are imported
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.interpret_smoke and not torch.cuda.is_available():
        print("error: benchmarks/attention.py needs a CUDA GPU (use --interpret_smoke for a CPU check of the "
              "code path)", file=sys.stderr)
        return 2
    import triton

    import fused_kernels.fused_attention  # noqa: F401  (imported under the interpreter flag above: tiles recorded)
    from benchmarks import bench_utils

    device = "cpu" if args.interpret_smoke else "cuda"
    s = Setting(args, device, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype],
                args.heads, args.head_dim)
    meta = bench_utils.bench_metadata("attention", "benchmarks.attention", argv, device)
    bench_utils.check_out_dir(args.out_dir, "attention")
    results = [row for T in args.seq_lens for row in sweep_length(s, T)]
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="attn_bench_smoke_") if args.interpret_smoke
                               else os.path.join(REPO_ROOT, "benchmarks", "results"))
    meta.update({
        "sdpa_backend": args.sdpa_backend if not args.interpret_smoke else "auto (interpreter smoke)",
        "interpret_smoke": args.interpret_smoke,
        "dtype": args.dtype,
        "tokens": args.tokens,
        "heads": s.H,
        "head_dim": s.D,
        "flops_convention": "fwd = 4*B*H*T^2*D / 2 (causal); bwd = 2.5 x fwd; fwdbwd = 3.5 x fwd",
        "timing": "triton.testing.do_bench median (ms)" if not args.interpret_smoke else "single call (interpreter)",
        "peak_memory": "max_memory_allocated above the live inputs during one call, after a warm-up call",
    })
    gpu = "cpu-interpreter" if args.interpret_smoke else torch.cuda.get_device_name()
    bench_utils.write_results(
        meta, results, markdown_table(results), out_dir, title="Attention benchmark", label=gpu,
        summary=f"torch {torch.__version__}, triton {triton.__version__}, {args.dtype}, "
                f"B*T = {args.tokens}, H = {s.H}, D = {s.D}, compute capability {meta['compute_capability']}")
    return 0


def sweep_length(s, T):
    """Every (variant, implementation) at sequence length T (B*T tokens), printed as it goes."""
    B = max(1, s.args.tokens // T)
    rows = []
    for variant in s.args.variants:
        for impl in s.args.impls:
            if impl == "sdpa" and variant != "default":
                continue
            res = run_case(s, impl, variant, B, T)
            if impl == "fused" and res["status"] == "ok":
                res["max_abs_diff_vs_unfused"] = max_diff_vs_unfused(s, variant, B, T)
            rows.append({"variant": variant, "impl": impl, "B": B, "H": s.H, "T": T, "D": s.D, **res})
            if res["status"] == "ok":
                print(f"T={T:5d} B={B:3d} {variant:15s} {impl:8s} "
                      + " ".join(f"{m} {res[m + '_tflops']:7.2f} TF/s" for m in MODES)
                      + (f"  peak {res['peak_mib_fwdbwd']:.0f} MiB" if res["peak_mib_fwdbwd"] is not None else "")
                      + (f"  |fused-unfused| {res['max_abs_diff_vs_unfused']:.2e}"
                         if isinstance(res.get("max_abs_diff_vs_unfused"), float) else ""),
                      flush=True)
            else:
                print(f"T={T:5d} B={B:3d} {variant:15s} {impl:8s} {res['status']}", flush=True)
    return rows


def bench(s, fn, grad_to_none):
    """Median milliseconds of fn."""
    if s.args.interpret_smoke:  # do_bench needs CUDA events; one timed call is enough here
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton
    return triton.testing.do_bench(fn, warmup=s.args.warmup, rep=s.args.rep, grad_to_none=grad_to_none,
                                   return_mode="median")


def peak_mib(s, fn, leaves):
    """Peak allocated memory of one call of fn above what is live before it (MiB), measured
    after a warm-up call (kernel compilation, cuBLAS / allocator workspaces); None on CPU."""
    import torch
    if s.device != "cuda":
        fn()
        return None
    keep = fn()  # warm-up
    del keep
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    keep = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del keep
    for t in leaves:
        t.grad = None
    return peak / 2**20


def make_inputs(s, B, T, variant):
    """(leaves, fn inputs, dout): the qkv projection, a block input x and the variant's own
    parameters (sink vectors N(0, 0.5^2), gate weights N(0, 0.02^2)) are the leaves."""
    import torch

    import attention_variants as av
    H, D = s.H, s.D
    g = torch.Generator(device="cpu").manual_seed(0)
    spec = av.get_variant(variant)
    qkv = torch.randn(B, T, 3 * H * D, generator=g).to(device=s.device, dtype=s.dtype).requires_grad_()
    x = torch.randn(B, T, H * D, generator=g).to(device=s.device, dtype=s.dtype).requires_grad_()
    layer = torch.nn.Module()  # what a variant's parameters and per-call inputs need from an attention layer
    layer.n_head = H
    av.add_variant_parameters(layer, spec, H * D, H)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.shape == (H, D) else 0.02))
    layer = layer.to(device=s.device, dtype=s.dtype)
    dout = torch.randn(B, H, T, D, generator=g).to(device=s.device, dtype=s.dtype)
    return [qkv, x, *layer.parameters()], (spec, qkv, x, layer), dout


def split(s, qkv, B, T):
    return [t.view(B, T, s.H, s.D).transpose(1, 2) for t in qkv.split(s.H * s.D, dim=2)]  # (B, H, T, D) views


def pinned_sdpa(s, q, k, v):
    """Causal SDPA on the chosen backend (an error, not a silent fallback, if it cannot run)."""
    import torch.nn.functional as F
    backend = SDPA_BACKENDS[s.args.sdpa_backend]
    if backend is None or s.args.interpret_smoke:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(getattr(SDPBackend, backend)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def make_fn(s, impl, fn_inputs, B, T):
    import attention_variants as av
    spec, qkv, x, layer = fn_inputs
    if impl == "sdpa":
        return lambda: pinned_sdpa(s, *split(s, qkv, B, T))
    # fused: the kernel path; unfused: the project's own PyTorch path (SDPA form, else reference)
    if impl == "fused":
        path = spec.triton
    elif spec.sdpa is not None:
        path = spec.sdpa
    else:
        path = lambda *a, **kw: spec.reference(*a, **kw)[0]  # noqa: E731
    return lambda: path(*split(s, qkv, B, T), **av.variant_inputs(layer, spec, x))


def run_case(s, impl, variant, B, T):
    import torch
    leaves, fn_inputs, dout = make_inputs(s, B, T, variant)
    fn = make_fn(s, impl, fn_inputs, B, T)
    res = {}
    fl = flops_fwd(B, s.H, T, s.D)
    try:
        res["peak_mib_fwd"] = peak_mib(s, fn, leaves)
        res["peak_mib_fwdbwd"] = peak_mib(s, lambda: fn().backward(dout), leaves)
        for t in leaves:
            t.grad = None
        ms_f = bench(s, fn, leaves)
        out = fn()
        ms_b = bench(s, lambda: out.backward(dout, retain_graph=True), leaves)
        out = None
        ms_fb = bench(s, lambda: fn().backward(dout), leaves)
        for mode, ms, mult in (("fwd", ms_f, 1.0), ("bwd", ms_b, 2.5), ("fwdbwd", ms_fb, 3.5)):
            res[f"{mode}_ms"] = ms
            res[f"{mode}_tflops"] = mult * fl / (ms * 1e-3) / 1e12
    except torch.cuda.OutOfMemoryError:
        res = {"status": "OOM"}
    except Exception as err:  # keep sweeping; the error goes into the results
        traceback.print_exc()
        res = {"status": f"error: {type(err).__name__}: {err}"[:300]}
    else:
        res["status"] = "ok"
    finally:
        fn_inputs = leaves = fn = None  # free the inputs before emptying the cache
        if s.device == "cuda":
            torch.cuda.empty_cache()
    return res


def max_diff_vs_unfused(s, variant, B, T):
    """Sanity check recorded with the fused results: max |fused - unfused| of the output."""
    import torch
    try:
        _, fn_inputs, _ = make_inputs(s, B, T, variant)
        with torch.no_grad():
            a = make_fn(s, "fused", fn_inputs, B, T)()
            b = make_fn(s, "unfused", fn_inputs, B, T)()
            return (a.float() - b.float()).abs().max().item()
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    except Exception as err:
        return f"error: {type(err).__name__}: {err}"[:200]
    finally:
        if s.device == "cuda":
            torch.cuda.empty_cache()


def markdown_table(results):
    """One row per (T, variant): fused TFLOP/s and the speed ratios vs SDPA and vs unfused."""
    by = {(r["T"], r["variant"], r["impl"]): r for r in results}
    sdpa_by_t = {r["T"]: r for r in results if r["impl"] == "sdpa"}

    def tf(r, mode):
        if r is None:
            return "-"
        if r.get("status") != "ok":
            return r.get("status", "?")[:12]
        return f"{r[mode + '_tflops']:.3g}"

    def ratio(a, b, mode):
        if a is None or b is None or a.get("status") != "ok" or b.get("status") != "ok":
            return "-"
        return f"{b[mode + '_ms'] / a[mode + '_ms']:.3g}x"

    def mem(r):
        if r is None or r.get("status") != "ok" or r.get("peak_mib_fwdbwd") is None:
            return "-" if r is None or r.get("status") == "ok" else r.get("status", "?")[:12]
        return f"{r['peak_mib_fwdbwd']:.0f}"

    lines = [
        "| T | variant | fused fwd | fused bwd | fused fwd+bwd | unfused fwd+bwd | causal SDPA (default) fwd+bwd "
        "| fused vs SDPA (fwd / fwd+bwd) | fused vs unfused (fwd / fwd+bwd) | peak MiB fused / unfused |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["T"], r["variant"]) for r in results},
                  key=lambda k: (k[0], ALL_VARIANTS.index(k[1])))
    for T, variant in keys:
        fused = by.get((T, variant, "fused"))
        unf = by.get((T, variant, "unfused"))
        sdpa = sdpa_by_t.get(T)
        vs_sdpa = f"{ratio(fused, sdpa, 'fwd')} / {ratio(fused, sdpa, 'fwdbwd')}"
        if variant != "default" and sdpa is not None:
            vs_sdpa += " vs causal SDPA (default)"
        lines.append(
            f"| {T} | {variant} | {tf(fused, 'fwd')} | {tf(fused, 'bwd')} | {tf(fused, 'fwdbwd')} "
            f"| {tf(unf, 'fwdbwd')} | {tf(sdpa, 'fwdbwd')} "
            f"| {vs_sdpa} "
            f"| {ratio(fused, unf, 'fwd')} / {ratio(fused, unf, 'fwdbwd')} "
            f"| {mem(fused)} / {mem(unf)} |")
    lines.append("")
    lines.append("TFLOP/s (FlashAttention convention, causal); ratios > 1 mean the fused kernel is faster "
                 "(time of the other / time of fused).  SDPA has no form of the other variants: their "
                 "'vs causal SDPA (default)' ratio compares with plain causal SDPA, i.e. it shows what the "
                 "variant costs over default attention.  Peak memory is measured after a warm-up call.")
    return "\n".join(lines)


if __name__ == "__main__":
    from runtime.cli import cli_main
    cli_main(main)
