"""The fused attention kernels (Triton) and what launches them; see kernels/fused_attention.py."""
