"""Pieces shared by the benchmark scripts (attention.py, train_throughput.py): run metadata
and the JSON + markdown result files.

    meta = bench_metadata("attention", "benchmarks.attention", argv, device)
    ...
    write_results(meta, results, table, out_dir, title="Attention benchmark", label=gpu,
                  summary="torch ..., bf16, ...")
"""

import datetime
import os
import re
import shlex
import subprocess
import sys

from runtime import cli, files, outputs, system


def parse_with_smoke(parser, argv, smoke_flag, smoke_sizes):
    """parser.parse_args(argv), where the smoke mode (`smoke_flag`, e.g. '--smoke') fixes the settings
    `smoke_sizes` ({dest: its smoke value}): given together with it, one is refused (cli.UserError) rather
    than ignored while the recorded command line shows it."""
    defaults = {dest: parser.get_default(dest) for dest in smoke_sizes}
    parser.set_defaults(**dict.fromkeys(smoke_sizes))
    args = parser.parse_args(argv)
    smoke = getattr(args, smoke_flag.lstrip("-"))
    given = ["--" + dest for dest in smoke_sizes if getattr(args, dest) is not None]
    if smoke and given:
        raise cli.UserError(f"{smoke_flag} runs its own tiny sizes, so {', '.join(given)} would be ignored (while "
                            f"the results record the command line): leave {'it' if len(given) == 1 else 'them'} "
                            f"out, or drop {smoke_flag}")
    for dest, value in (smoke_sizes if smoke else defaults).items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    return args


def _driver_version():
    """NVIDIA driver version (e.g. '550.54.15') via NVML or nvidia-smi; None if neither answers."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0].strip() if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_info(device):
    """Compute capability, driver version and CUDA driver API version of a CUDA device
    (all None for a CPU run)."""
    import torch
    info = {"compute_capability": None, "driver_version": None, "cuda_driver_api": None}
    if not (str(device).startswith("cuda") and torch.cuda.is_available()):
        return info
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    info["compute_capability"] = f"{major}.{minor}"
    info["driver_version"] = _driver_version()
    get_api = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get_api is not None:
        try:
            api = int(get_api())  # e.g. 12040 -> "12.4"
            info["cuda_driver_api"] = f"{api // 1000}.{api % 1000 // 10}"
        except Exception:
            pass
    return info


def bench_metadata(benchmark, module, argv, device):
    """system.run_metadata() plus the GPU's compute capability / driver; the recorded command
    is the argv given to the script's main (not sys.argv, which differs when main is called
    from Python)."""
    meta = {"benchmark": benchmark}
    meta.update(system.run_metadata(device))
    meta["command"] = shlex.join(["python", "-m", module] + list(argv))
    meta.update(gpu_info(device))
    return meta


def chosen_tile_configs():
    """The tile config each fused-attention kernel ran with (fused_kernels.launch.chosen_tiles()) as JSON rows;
    empty when the fused kernel was not used in this process."""
    launch = sys.modules.get("fused_kernels.launch")
    if launch is None:
        return []
    return [{name: value if isinstance(value, (int, type(None))) else str(value).replace("torch.", "")
             for name, value in row.items()} for row in launch.chosen_tiles()]


def check_out_dir(out_dir, benchmark):
    """--out_dir checked before the measurements (None: the default, chosen later)."""
    if out_dir is not None:
        outputs.check_output_dir(out_dir, f"benchmarks/{benchmark}", [], flag="--out_dir")


def write_results(meta, results, table, out_dir, *, title, label, summary):
    """Write <out_dir>/<benchmark>_<label>_<time>.json (meta + results + tile configs + the
    markdown table) and the .md next to it; prints the table and the paths; returns the stem."""
    meta = dict(meta)
    meta["tile_configs"] = chosen_tile_configs()
    meta["results"] = results
    meta["summary_markdown"] = table
    print()
    print(table)
    slug = re.sub(r"[^a-z0-9]+", "-", str(label).lower()).strip("-")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{meta['benchmark']}_{slug}_{stamp}"
    # the pair lands together, beside the earlier results (never replacing a file the benchmarks did not write)
    with outputs.output_set(out_dir, f"benchmarks/{meta['benchmark']}", [name + ".json", name + ".md"],
                           flag="--out_dir", keep_previous=True) as tmp:
        with open(os.path.join(tmp, name + ".json"), "w", encoding="utf-8") as f:
            f.write(files.json_text(meta))
        with open(os.path.join(tmp, name + ".md"), "w", encoding="utf-8") as f:
            f.write(f"# {title}: {meta.get('gpu')}, {meta.get('date')}\n\n"
                    f"{summary}; commit {meta.get('git_commit')}; `{meta['command']}`\n\n{table}\n")
    stem = os.path.join(out_dir, name)
    print(f"\nwrote {stem}.json and {stem}.md")
    return stem
