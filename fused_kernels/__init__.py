"""The fused attention kernels (docs/kernels.md): flags.py (the flags as data; imports neither torch nor
triton), attention_kernels.py (the Triton code), launch.py (tiles, autotuning, launch cache) and
fused_attention.py (the public ``fused_attention``). Importing the package imports none of them.

Not named ``kernels``: that is Hugging Face's kernel-hub package (installed with transformers, pinned in
requirements.lock), which transformers imports by that name; a ``kernels/`` folder at the repo root would
shadow it on sys.path."""
