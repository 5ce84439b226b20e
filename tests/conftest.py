"""Shared pytest setup.

Keep each block self-contained: other test helpers/fixtures may be appended below.
"""

# --- Triton interpreter on machines without CUDA --------------------------------
# Triton decides interpreter vs. GPU when a kernel is decorated with @triton.jit,
# i.e. when fused_attention is first imported (possibly lazily, through
# attention_variants / model).  Setting the variable at collection time, before
# any test module is imported, makes the kernels run on CPU tensors in CI.
import os as _os

try:
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing means nothing GPU-ish runs
    _HAS_CUDA = False
if not _HAS_CUDA:
    _os.environ.setdefault("TRITON_INTERPRET", "1")
# ---------------------------------------------------------------------------------
