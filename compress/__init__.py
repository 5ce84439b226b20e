"""Compression: the method registry (quantizers and pruning, each applied to a fresh model copy) and the
perplexity evaluation of compress_eval.py."""
