"""Hugging Face causal LMs: the family table (where each family keeps its blocks, branches and norms), the
model view shared with this repo's GPT, loading, and the real model the repo is checked on."""
