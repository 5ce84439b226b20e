# GPT-2 124M with `fixed_bias` attention; everything else as in config/default.py (the authors' recipe).
#   torchrun --standalone --nproc_per_node=8 train.py config/fixed_bias.py
from config.default import *  # noqa: F401,F403  (the shared base; only known config keys are accepted)

attention = "fixed_bias"
out_dir = "out/fixed_bias"
wandb_run_name = "gpt2-124m-fixed_bias"
