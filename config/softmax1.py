# GPT-2 124M with `softmax1` attention; everything else as in config/default.py (the paper's setup).
#   torchrun --standalone --nproc_per_node=8 train.py config/softmax1.py
from config.default import *  # noqa: F401,F403  (the shared base; only known config keys are accepted)

attention = "softmax1"
out_dir = "out/softmax1"
wandb_run_name = "gpt2-124m-softmax1"
