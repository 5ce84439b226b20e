#!/usr/bin/env python
"""Registers and spills of every fused-attention kernel, compiled ahead of time for a GPU
architecture without a GPU (triton.compile for a GPUTarget; ptxas and cuobjdump ship with triton).

For each kernel (fwd, dkdv, dq), each combination of its tl.constexpr switches that the kernel flags of
a registry variant (attention_variants.py) give it, and each tile candidate of fused_kernels/launch.py's table
for (arch, head dim, dtype), it prints
registers per thread, spill bytes (LOCAL / STACK) and shared memory. `--check` exits 1 when a
config spills, or, with --max_sink_reg_ratio R, when a sink variant's forward needs more than R
times the registers of the default forward with the same tiles (its extra state must not cost
occupancy).

    python -m benchmarks.kernel_registers --check --max_sink_reg_ratio 1.1   # sm_90, D = 64, bf16
    python -m benchmarks.kernel_registers --arch 80 --head_dim 128 --check
"""

import inspect
import os
import re
import subprocess
import sys
import tempfile

if not __package__:  # run as a file, the repo's packages are not importable: say how to run it
    sys.exit(f"run it from the repo root as a module: python -m benchmarks.{os.path.basename(__file__)[:-3]} ...")

KINDS = ("fwd", "dkdv", "dq")  # the preprocess kernel has no tiles to choose
DTYPES = {"bf16": "*bf16", "fp16": "*fp16"}


def parse_args(argv=None):
    from runtime.cli import ArgumentParser
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--first_only", action="store_true", help="only the first tile candidate of each kernel")
    p.add_argument("--check", action="store_true", help="exit 1 on spills (and on --max_sink_reg_ratio)")
    p.add_argument("--max_sink_reg_ratio", type=float, default=None,
                   help="also refuse a sink forward with more than this times the default forward's registers")
    return p.parse_args(argv)


def _signature(fn, dtype_ptr, constexprs):
    """(signature, attrs) for triton.compile: 16-bit q/k/v/o, fp32 row buffers and sink vectors,
    unit innermost strides (as the model's tensors have), 16-divisible pointers and strides."""
    names = list(inspect.signature(fn.fn).parameters)
    fp32_ptrs = {"LSE", "DELTA", "DS0", "KB", "VB"}
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.startswith("stride_") and name.endswith("d"):
            sig[name] = "constexpr"
            constexprs[name] = 1
        elif name in ("qk_scale", "sm_scale", "score_bias"):
            sig[name] = "fp32"
        elif name.isupper() and name not in ("H", "T", "T_BUCKET"):
            sig[name] = "*fp32" if name in fp32_ptrs else dtype_ptr
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def flag_sets(variants=None):
    """{kernel: {label: switches}}: the distinct tl.constexpr switches each kernel runs with for the kernel
    flags of ``variants`` (default: every registered attention variant), in registry order; a label names
    the switches that are on ("softmax" when none is)."""
    from attention_variants import REGISTRY
    from fused_kernels.attention_kernels import switches

    variants = REGISTRY.values() if variants is None else variants
    sets = {kind: {} for kind in KINDS}
    for variant in variants:
        for kind in KINDS:
            on = switches(kind, variant.kernel_flags)
            label = " ".join(name.lower().replace("_", " ") for name, value in on.items() if value) or "softmax"
            sets[kind].setdefault(label, on)
    return sets


def compile_usage(kernel, flags, cfg, head_dim, dtype, arch):
    """Resource usage of one compiled kernel: dict(regs, local, stack, shared)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_kernels.launch import LAUNCH_OPTS

    bm, bn, warps, stages = cfg
    constexprs = dict(**flags, HEAD_D=head_dim, BLOCK_M=bm, BLOCK_N=bn, PREC="tf32", UPCAST=False)
    sig, attrs = _signature(kernel, DTYPES[dtype], constexprs)
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 128 if arch >= 90 else 64),
                              options={"num_warps": warps, "num_stages": stages, **LAUNCH_OPTS})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|LOCAL|STACK):(\d+)", report)}
    usage["shared"] = int(getattr(compiled.metadata, "shared", 0))
    return usage


def sweep(arch, head_dim, dtype, first_only=False, log=print):
    """One row per (kernel, flags, tile config)."""
    import torch

    from fused_kernels.attention_kernels import KERNELS
    from fused_kernels.launch import candidates

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    rows = []
    for kind, labelled in flag_sets().items():
        cands = candidates(kind, head_dim, torch_dtype, arch)
        for cfg in cands[:1] if first_only else cands:
            for label, flags in labelled.items():
                usage = compile_usage(KERNELS[kind], flags, cfg, head_dim, dtype, arch)
                row = {"kernel": kind, "flags": label, "config": cfg, **usage}
                rows.append(row)
                log(f"sm_{arch} D={head_dim} {dtype} {kind:4s} {label:13s} BLOCK_M={cfg[0]:3d} BLOCK_N={cfg[1]:3d} "
                    f"warps={cfg[2]} stages={cfg[3]}: {usage['reg']:3d} registers, spills "
                    f"{usage['local']} B local / {usage['stack']} B stack, {usage['shared'] // 1024} KiB shared")
    return rows


def problems(rows, max_sink_reg_ratio=None):
    """What --check refuses: spills anywhere; with a ratio, a sink forward over that many times the
    default forward's registers (same tiles)."""
    out = [f"{r['kernel']} {r['flags']} {r['config']} spills ({r['local']} B local, {r['stack']} B stack)"
           for r in rows if r["local"] or r["stack"]]
    fwd = {(r["flags"], r["config"]): r["reg"] for r in rows if r["kernel"] == "fwd"}
    for (label, cfg), regs in fwd.items():
        base = fwd.get(("softmax", cfg))
        if max_sink_reg_ratio and "sink" in label and base and regs > max_sink_reg_ratio * base:
            out.append(f"fwd {label} {cfg}: {regs} registers > {max_sink_reg_ratio} x default's {base}")
    return out


# compute capabilities (x 10) of the GPUs the tile tables of fused_kernels/launch.py are for, which triton compiles for
ARCHS = (80, 86, 89, 90, 100, 120)


def check_args(args):
    """--arch and --head_dim before anything is compiled (an unknown architecture aborts inside LLVM)."""
    from fused_kernels import fused_attention as fa
    from runtime.cli import UserError
    if args.arch not in ARCHS:
        raise UserError(f"--arch {args.arch} is not a GPU architecture these kernels are tuned for; choose one of "
                        f"{', '.join(map(str, ARCHS))} (compute capability x 10: 90 for H100/H200, 80 for A100)")
    if args.head_dim not in fa.SUPPORTED_HEAD_DIMS:
        raise UserError(f"--head_dim {args.head_dim} is not one the fused kernel takes; choose one of "
                        f"{', '.join(map(str, fa.SUPPORTED_HEAD_DIMS))}")
    if args.max_sink_reg_ratio is not None and not args.max_sink_reg_ratio > 0:
        raise UserError(f"--max_sink_reg_ratio must be a positive number, got {args.max_sink_reg_ratio}")


def main(argv=None):
    args = parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's
    check_args(args)
    rows = sweep(args.arch, args.head_dim, args.dtype, args.first_only)
    bad = problems(rows, args.max_sink_reg_ratio)
    for line in bad:
        print("PROBLEM:", line)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    from runtime.cli import cli_main
    cli_main(main)
