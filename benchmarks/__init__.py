"""GPU and CPU benchmarks, run from the repo root as modules: `python -m benchmarks.attention --help`."""
