# GPT-2 124M with `gated` attention; everything else as in config/default.py (the paper's setup).
#   torchrun --standalone --nproc_per_node=8 train.py config/gated.py
from config.default import *  # noqa: F401,F403  (the shared base; only known config keys are accepted)

attention = "gated"
out_dir = "out/gated"
wandb_run_name = "gpt2-124m-gated"
