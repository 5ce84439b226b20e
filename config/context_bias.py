# GPT-2 124M with `context_bias` attention; everything else as in config/default.py (the authors' recipe).
#   torchrun --standalone --nproc_per_node=8 train.py config/context_bias.py
from config.default import *  # noqa: F401,F403  (the shared base; only known config keys are accepted)

attention = "context_bias"
out_dir = "out/context_bias"
wandb_run_name = "gpt2-124m-context_bias"
