"""Launching the fused attention kernels: tile tables, autotuning, call plans and the launch cache.

Tiles: a few (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel, architecture (sm_90+ and
sm_8x), head dim and dtype, each compiled ahead of time without register spills
(benchmarks/kernel_registers.py). On a GPU ``triton.autotune`` picks the fastest once per (kernel, head
dim, dtype, flags, dot precision, power-of-two bucket of T), prints the choice once and keeps it in
triton's cache directory, so later processes reuse it (processes with different caches may pick
different tiles, which changes the last bits). ``OUTLIER_GPT_AUTOTUNE=0``, read at a launch key's first
launch, uses the first candidate that fits instead. ``chosen_tiles()`` lists what each kernel ran with.

Plans: what follows from a call's flags and its arguments' dtypes, shapes, strides and devices (the
kernels' constexprs and integer arguments, the output layouts) is worked out once (``plan``).

Launch cache: after the first launch of a kernel for a launch key (the plan, 16-byte pointer alignment
and dO's strides) the compiled kernel is launched directly through the launcher triton built for it,
bypassing triton's autotuner and argument binder; only on triton 3.4 to 3.9, whose launch convention was
read, and never under the interpreter or while a triton launch hook is set.

``overrides(...)`` is the context manager for tests and benchmarks: a GPU architecture's tile table under
the interpreter, one fixed tile candidate, or a stand-in for triton's compile-and-launch.
"""

import contextlib
import inspect
import os

import torch
import triton

from fused_kernels.attention_kernels import INTERPRET, KERNELS, switches
from fused_kernels.flags import SWITCHES, KernelFlags

try:  # present in every triton 3.x; keep a fallback so imports never break
    from triton.runtime.errors import OutOfResources as _OutOfResources
except Exception:  # pragma: no cover
    _OutOfResources = RuntimeError
try:  # ptxas failures (e.g. too many registers / shared memory); not in every version
    from triton.runtime.errors import PTXASError as _PTXASError
except Exception:  # pragma: no cover
    _PTXASError = None
# errors that mean "this tile config does not fit this GPU": try the next one
_FIT_ERRORS = tuple(e for e in (_OutOfResources, _PTXASError) if e is not None)

# Launch options passed explicitly: FP fusion (FMA contraction) on, which is the
# default of every Triton 3.x; passing it silences triton 3.9's warning about the
# default changing in 3.10 and keeps the numerics fixed across versions.
LAUNCH_OPTS = {"enable_fp_fusion": True}

# ----------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------
# Each candidate: (BLOCK_M, BLOCK_N, num_warps, num_stages).  Constraints used by
# the causal loops: fwd and dq need BLOCK_M % BLOCK_N == 0, dkdv needs
# BLOCK_N % BLOCK_M == 0.  The candidates depend on the compute capability
# (Hopper and newer: larger tiles, wgmma; sm_8x: smaller tiles that fit its
# register file with mma.sync) and were compiled ahead of time for their arch
# (benchmarks/kernel_registers.py; bf16, D = 64 and 128, every flag combination)
# without register spills.  On a GPU, triton.autotune times the candidates once
# per (kernel, head dim, dtype, flags, dot precision, bucket of T) and keeps the
# fastest; configs that do not fit the GPU are skipped by the autotuner.  With
# OUTLIER_GPT_AUTOTUNE=0 the first candidate that fits is used instead, so that
# launches (and bits) are the same in every process.

_INTERP_TABLE = {
    # moderate tiles keep the numpy interpreter fast (fewer, larger steps) while
    # T > 64 still exercises the off-diagonal / diagonal / tail paths, with 2
    # sub-blocks per diagonal block as in the GPU configs
    "fwd": [(64, 32, 4, 1)],
    "dkdv": [(32, 64, 4, 1)],
    "dq": [(64, 32, 4, 1)],
}

# Hopper and newer, 16-bit inputs, by head dim (D = 16 / 32 use the D = 32 row)
_SM90_TABLE = {
    "fwd": {32: [(128, 64, 4, 3), (64, 64, 4, 3)],
            64: [(128, 128, 8, 3), (128, 64, 8, 3)],
            128: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2)]},
    "dkdv": {32: [(64, 128, 8, 2), (32, 128, 4, 3)],
             64: [(64, 128, 8, 2), (32, 128, 8, 3)],
             128: [(32, 128, 8, 2), (32, 64, 8, 2)]},
    "dq": {32: [(128, 64, 8, 2), (128, 32, 4, 3)],
           64: [(128, 64, 8, 2), (128, 32, 4, 3)],
           128: [(128, 64, 8, 2), (128, 32, 8, 2)]},
}

# sm_8x, 16-bit inputs: mma.sync keeps the accumulators in registers, so smaller tiles; at most
# 88 KB of shared memory, so they also fit sm_86/sm_89 (99 KB)
_SM8X_TABLE = {
    "fwd": {16: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
            32: [(128, 64, 4, 3), (64, 32, 4, 2)],
            64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
            128: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)]},
    "dkdv": {16: [(32, 128, 4, 3), (32, 64, 4, 2)],
             32: [(32, 128, 4, 3), (32, 64, 4, 2)],
             64: [(32, 128, 8, 3), (32, 64, 4, 3)],
             128: [(32, 64, 8, 2), (32, 32, 4, 2)]},
    "dq": {16: [(128, 32, 4, 3), (64, 32, 4, 2)],
           32: [(128, 32, 4, 3), (64, 32, 4, 2)],
           64: [(128, 32, 8, 3), (64, 32, 4, 3)],
           128: [(64, 32, 4, 3), (64, 32, 4, 2)]},
}

# fp32 inputs (any arch): 2x the registers / shared memory per element; meant for checks
_FP32_TABLE = {
    "fwd": [(64, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    "dkdv": [(32, 64, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    "dq": [(64, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)],
}


def candidates(kind: str, D: int, dtype: torch.dtype, arch=None):
    """Tile candidates for ``kind`` in {"fwd", "dkdv", "dq"}.  ``arch`` is the
    compute capability as major * 10 + minor (90 for H100/H200, 80 for A100);
    ``None`` means the CPU interpreter."""
    if arch is None:
        return list(_INTERP_TABLE[kind])
    if dtype == torch.float32:
        return list(_FP32_TABLE[kind])
    if 90 <= arch < 120:  # Hopper / datacenter Blackwell: ~228 KB of shared memory per SM
        return list(_SM90_TABLE[kind][max(D, 32)])
    return list(_SM8X_TABLE[kind][min(D, 128)])


# the fields of a launch key of chosen_tiles(), in the order of the keys of _State.chosen
CHOSEN_KEY_FIELDS = ("kernel", "head_dim", "dtype", "flags", "precision", "device", "arch", "t_bucket")


def chosen_tiles() -> list:
    """The tile config each kernel ran with in this process (under ``overrides``: inside its block), one
    dict per launch key: CHOSEN_KEY_FIELDS (dtype a torch.dtype, arch None under the interpreter), then
    BLOCK_M, BLOCK_N, num_warps, num_stages."""
    return [dict(zip(CHOSEN_KEY_FIELDS, key), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
            for key, (bm, bn, warps, stages) in list(_state.chosen.items())]


# the constexprs that select a kernel specialisation: part of the autotuning key
TUNE_KEY = ("HEAD_D", "PREC", *SWITCHES, "T_BUCKET")
_TUNERS: dict = {}
_UNTUNABLE: set = set()  # launch keys whose autotuning failed to fit: the first candidate that fits is used

# triton.autotune's cache_results (in triton 3.6 and 3.9) keeps the tuning results in triton's cache
# directory, keyed on the triton build, the GPU architecture, the kernel source, the tuning key and the
# candidates: a second process does not benchmark the candidates again
_AUTOTUNE_DISK_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters


def _autotune_enabled() -> bool:
    return os.environ.get("OUTLIER_GPT_AUTOTUNE", "1") != "0"


def t_bucket(T: int) -> int:
    """Sequence lengths that share a tuning result: powers of two from 16 to 65536."""
    return min(triton.next_power_of_2(max(T, 16)), 1 << 16)


def _tuner(kind, kernel):
    """triton.autotune over every candidate of every table, pruned per call to the candidates of
    the call's (arch, head dim, dtype)."""
    if kind not in _TUNERS:
        tables = [_SM90_TABLE[kind], _SM8X_TABLE[kind], {0: _FP32_TABLE[kind]}]
        every = list(dict.fromkeys(cfg for table in tables for cands in table.values() for cfg in cands))
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for bm, bn, w, s in every]

        def prune(configs, named_args, **kwargs):
            q = named_args["Q"]
            wanted = candidates(kind, kwargs["HEAD_D"], q.dtype, _device_arch(q.device))
            return [c for c in configs if _config_tuple(c) in wanted]

        names = kernel.arg_names
        disk = {"cache_results": True} if _AUTOTUNE_DISK_CACHE else {}
        _TUNERS[kind] = triton.autotune(configs=configs, key=[k for k in TUNE_KEY if k in names],
                                        prune_configs_by={"early_config_prune": prune}, **disk)(kernel)
    return _TUNERS[kind]


def _config_tuple(config):
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


_ARCH: dict = {}  # CUDA device index -> compute capability


def _device_arch(device: torch.device):
    """Compute capability of ``device`` as major * 10 + minor; None under the
    interpreter or for a non-CUDA device."""
    if _state.arch is not None:
        return _state.arch
    if INTERPRET or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCH:
        major, minor = torch.cuda.get_device_capability(index)
        _ARCH[index] = 10 * major + minor
    return _ARCH[index]


def _on_device(device: torch.device):
    """Context that makes ``device`` current for the launches (Triton launches on the current CUDA
    device, not necessarily the tensors' one); nothing to do when it already is."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _compile_and_launch(plan, kind, args):
    """Launch kernel ``kind`` through triton: with the autotuned tile config, or the first candidate that
    fits when not tuning; records the choice.  Returns (what triton launched: its CompiledKernel, None
    under the interpreter; the grid; the kernel's named arguments after ``args``), from which the launch
    cache builds its direct launch."""
    kernel, constexprs = KERNELS[kind], plan.constexprs[kind]
    B, H, T, D = plan.shape
    BH = B * H
    if kind == "pre":  # one fixed config: nothing to tune
        grid = (BH, triton.cdiv(T, constexprs["BLOCK_M"]))
        return kernel[grid](*args, num_warps=4, **LAUNCH_OPTS, **constexprs), grid, constexprs
    arch, dtype = plan.arch, plan.dtype
    bucket = t_bucket(T)
    flags = ",".join(name for name, value in constexprs.items() if value is True) or "softmax"
    key = (kind, D, dtype, flags, constexprs.get("PREC"), str(plan.device), arch, bucket)
    tile = "BLOCK_M" if kind in ("fwd", "dq") else "BLOCK_N"
    cands = candidates(kind, D, dtype, arch)
    if _state.candidate is not None:
        cands = [cands[min(_state.candidate, len(cands) - 1)]]
    if not INTERPRET and _autotune_enabled() and len(cands) > 1 and key not in _UNTUNABLE:
        tuner = _tuner(kind, kernel)
        try:
            compiled = tuner[lambda meta: (BH, triton.cdiv(T, meta[tile]))](
                *args, T_BUCKET=bucket, **LAUNCH_OPTS, **constexprs)
        except _FIT_ERRORS:  # pragma: no cover - GPU only: no candidate fits, try them one by one below
            _UNTUNABLE.add(key)
            return _compile_and_launch(plan, kind, args)
        cfg = _config_tuple(tuner.best_config)
        if _state.chosen.get(key) != cfg:
            print(f"fused_attention: autotuned {kind} (D={D}, {str(dtype)[6:]}, {flags}, T<={bucket}, "
                  f"sm_{arch}): BLOCK_M={cfg[0]} BLOCK_N={cfg[1]} num_warps={cfg[2]} num_stages={cfg[3]}",
                  flush=True)
        _state.chosen[key] = cfg
        grid = (BH, triton.cdiv(T, cfg[0] if tile == "BLOCK_M" else cfg[1]))
        return compiled, grid, dict(T_BUCKET=bucket, **constexprs, BLOCK_M=cfg[0], BLOCK_N=cfg[1])
    if key in _state.chosen and _state.candidate is None:
        cands = [_state.chosen[key]]
    last_err = None
    for cfg in cands:
        bm, bn, warps, stages = cfg
        grid = (BH, triton.cdiv(T, bm if tile == "BLOCK_M" else bn))
        named = dict(T_BUCKET=bucket, **constexprs, BLOCK_M=bm, BLOCK_N=bn)
        try:
            compiled = kernel[grid](*args, num_warps=warps, num_stages=stages, **LAUNCH_OPTS, **named)
        except _FIT_ERRORS as err:  # pragma: no cover - GPU only
            last_err = err
            continue
        _state.chosen[key] = cfg
        return compiled, grid, named
    raise RuntimeError(f"fused_attention: no {kind} config fits this GPU "
                       f"({plan.device}, sm_{arch})") from last_err


# ----------------------------------------------------------------------------
# Launch cache
# ----------------------------------------------------------------------------
# Launching through triton costs host time on every call: the autotuner builds its key from every
# argument, and the argument binder specialises each of ~40 arguments (integer divisibility, pointer
# alignment, dtypes) to find the compiled kernel.  For one launch key (the kernel, its flags,
# the arguments' dtypes, shapes, strides and 16-byte pointer alignment, the device) all of that
# gives the same compiled kernel, grid and constexprs every time, so after the first launch of a key
# the cache calls the launcher triton built for that kernel directly.  Any other key goes through
# triton (and then gets its own entry).  Checked against the sources of triton 3.4 to 3.9, where a
# CompiledKernel is launched as
#     kernel.run(grid_x, grid_y, grid_z, stream, kernel.function, kernel.packed_metadata,
#                launch_metadata, launch_enter_hook, launch_exit_hook, *every_argument_in_order)
# (constexprs included; the launcher drops them).  Other versions (a later one may change this
# private convention), the interpreter and launches with triton launch hooks set (profilers such as
# proton want their metadata) always go through triton.

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - triton < 3.4
    _knobs = None
_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split("+")[0].split(".")[:2])
_DIRECT_LAUNCH = _knobs is not None and not INTERPRET and (3, 4) <= _TRITON_VERSION <= (3, 9)


def _launch_hooks_idle():
    # each hook is None (triton 3.4) or a HookChain (3.5+), idle when empty; a plain function is active
    runtime = _knobs.runtime
    return not (getattr(runtime.launch_enter_hook, "calls", runtime.launch_enter_hook)
                or getattr(runtime.launch_exit_hook, "calls", runtime.launch_exit_hook))


class _FastLaunch:
    """One compiled kernel launched directly: triton's launcher for it, with the grid and the trailing
    named arguments (T_BUCKET and the constexprs) of the launch key it was compiled for."""

    __slots__ = ("run", "function", "metadata", "grid", "tail", "device", "stream")

    def __init__(self, run, function, metadata, grid, tail, device, stream):
        self.run, self.function, self.metadata = run, function, metadata
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.tail, self.device, self.stream = tail, device, stream

    def __call__(self, args):
        if self.device is not None and self.device != torch.cuda.current_device():
            with torch.cuda.device(self.device):
                return self(args)
        self.run(*self.grid, self.stream(self.device), self.function, self.metadata, None, None, None,
                 *args, *self.tail)


def _no_stream(device):
    return 0


def _fast_launch(kind, n_args, compiled, grid, named, device):
    """The _FastLaunch of what triton just launched (``n_args`` runtime arguments, then ``named``), or
    None where it cannot be launched directly."""
    run, function = getattr(compiled, "run", None), getattr(compiled, "function", None)
    if not _state.direct or run is None or function is None:
        return None
    names = KERNELS[kind].arg_names[n_args:]
    if set(names) != set(named):  # pragma: no cover - a kernel signature this code does not know
        return None
    cuda = device.type == "cuda"
    return _FastLaunch(run, function, compiled.packed_metadata, grid, tuple(named[n] for n in names),
                       device.index if cuda else None,
                       triton.runtime.driver.active.get_current_stream if cuda else _no_stream)


def run(plan, key, args):
    """Launch kernel ``key[0]`` of ``plan`` with its runtime ``args``: directly when this launch key has
    been launched before, else through triton (and remember how)."""
    fast = plan.launches.get(key)
    if fast is not None and _launch_hooks_idle():
        fast(args)
        return
    with _on_device(plan.device):
        compiled, grid, named = _state.compile_and_launch(plan, key[0], args)
    if len(plan.launches) < 64:  # a few alignments and dO layouts per plan; more are not worth keeping
        plan.launches[key] = _fast_launch(key[0], len(args), compiled, grid, named, plan.device)


def alignment(*tensors) -> int:
    """Bit i is set when tensors[i] is 16-byte aligned (triton specialises pointers on it)."""
    bits = 0
    for i, t in enumerate(tensors):
        if t is not None and t.data_ptr() % 16 == 0:
            bits |= 1 << i
    return bits


# ----------------------------------------------------------------------------
# Plans: what is the same for every call with the same flags and argument metadata
# ----------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def bthd_layout(q: torch.Tensor) -> bool:
    """True when q is a transposed (B, T, H, D) view (the model's layout)."""
    return q.stride(1) < q.stride(2)


def alloc(shape, bthd, dtype, device) -> torch.Tensor:
    """(B, H, T, D) buffer: (B, T, H, D) storage seen through transpose(1, 2) when ``bthd`` (outputs
    follow their input's layout: the model's transposed views give (B, T, H, D) storage), else
    (B, H, T, D) storage."""
    B, H, T, D = shape
    if bthd:
        return torch.empty((B, T, H, D), dtype=dtype, device=device).transpose(1, 2)
    return torch.empty((B, H, T, D), dtype=dtype, device=device)


def _s2(t):
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _meta(t):
    """What a plan depends on in an optional (H, D) sink vector."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        return type(t)  # the argument check rejects it
    return t.shape, t.stride(), t.dtype, t.device


class Plan:
    """Everything about a call that follows from its flags and its arguments' dtypes, shapes, strides and
    devices: the kernels' constexprs and integer arguments, worked out on the first call with that
    metadata.  ``switches`` are the KernelFlags' switches; ``launches`` holds the direct launches of its
    kernels, by (kernel, pointer alignment[, dO strides])."""

    __slots__ = ("switches", "shape", "dtype", "device", "arch", "constexprs", "nblk", "layouts",
                 "fwd_ints", "bwd_ints", "launches")

    def __init__(self, q, k, v, k_bias, v_bias, flags, prec):
        self.switches = flags.switches()
        self.shape = B, H, T, D = tuple(q.shape)
        self.dtype, self.device = q.dtype, q.device
        self.arch = _device_arch(q.device)
        dots = dict(PREC=prec, UPCAST=INTERPRET and q.dtype == torch.bfloat16)
        self.constexprs = {
            "fwd": dict(**switches("fwd", flags), HEAD_D=D, **dots),
            "pre": dict(**switches("pre", flags), HEAD_D=D, BLOCK_M=32 if self.arch is None else 64),
            "dkdv": dict(**switches("dkdv", flags), HEAD_D=D, **dots),
            "dq": dict(**switches("dq", flags), HEAD_D=D, **dots),
        }
        self.nblk = triton.cdiv(T, self.constexprs["pre"]["BLOCK_M"])  # query blocks of the preprocess
        # the layouts of o / dq, dk, dv (each allocated like its input), and the integer arguments that do
        # not depend on dO
        self.layouts = tuple(bthd_layout(t) for t in (q, k, v))
        o, dk, dv = (alloc(self.shape, bthd, q.dtype, "meta") for bthd in self.layouts)
        s_q, s_k, s_v, s_o, s_dk, s_dv = (t.stride() for t in (q, k, v, o, dk, dv))
        s_bias = _s2(k_bias) + _s2(v_bias)
        self.fwd_ints = s_q + s_k + s_v + s_o + s_bias + (H, T)
        self.bwd_ints = {"q": s_q, "k": s_k, "v": s_v, "dk": s_dk, "dv": s_dv, "dq": s_o,
                         "kb": _s2(k_bias), "bias": s_bias}
        self.launches: dict = {}


_MAX_PLANS = 1024  # distinct call metadata kept; past that (e.g. every T of a generation loop) start over


def plan(q, k, v, k_bias, v_bias, sink, sigmoid, check) -> Plan:
    """The Plan of these arguments (q, k, v tensors); ``check(q, k, v, sink, sigmoid, k_bias, v_bias)``
    (the op's argument checks) runs the first time their metadata is seen."""
    prec = _dot_precision(q.dtype)
    key = (sink, sigmoid, prec, q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
           v.shape, v.stride(), v.dtype, v.device, _meta(k_bias), _meta(v_bias))
    plans = _state.plans
    found = plans.get(key)
    if found is None:
        check(q, k, v, sink, sigmoid, k_bias, v_bias)
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        found = plans[key] = Plan(q, k, v, k_bias, v_bias, KernelFlags(sink, sigmoid), prec)
    return found


# ----------------------------------------------------------------------------
# Overrides for tests and benchmarks
# ----------------------------------------------------------------------------


class _State:
    """The launch settings ``overrides`` replaces for the length of its block, with the records made
    under them (plans, whose launch caches may point at a stand-in, and chosen tiles)."""

    __slots__ = ("arch", "candidate", "compile_and_launch", "direct", "plans", "chosen")

    def __init__(self, arch=None, candidate=None, compile_and_launch=None, direct=_DIRECT_LAUNCH):
        self.arch, self.candidate = arch, candidate
        self.compile_and_launch = compile_and_launch or _compile_and_launch
        self.direct = direct
        self.plans: dict = {}
        # (kernel, D, dtype, flags, dot precision, device, compute capability, T bucket) -> tile config
        self.chosen: dict = {}


_state = _State()


@contextlib.contextmanager
def overrides(*, arch=None, candidate=None, compile_and_launch=None):
    """Inside the block, with fresh plans and chosen tiles (the earlier ones are back after it):

    arch                a compute capability (e.g. 90, 80): its GPU tile table, also under the interpreter
    candidate           the i-th tile candidate of every kernel (the last one where there are fewer); no
                        autotuning
    compile_and_launch  stands in for triton: called as (plan, kind, args) on a launch key's first launch, it
                        returns (a compiled kernel with ``run``, ``function`` and ``packed_metadata``; the
                        grid; the named arguments after ``args``); later launches of that key call its
                        ``run`` directly, as the launch cache calls triton's launcher
    """
    global _state
    saved = _state
    _state = _State(arch, candidate, compile_and_launch, direct=saved.direct or compile_and_launch is not None)
    try:
        yield
    finally:
        _state = saved
