# GPT-2 124M with `scaling` attention; everything else as in config/default.py (the authors' recipe).
#   torchrun --standalone --nproc_per_node=8 train.py config/scaling.py
from config.default import *  # noqa: F401,F403  (the shared base; only known config keys are accepted)

attention = "scaling"
out_dir = "out/scaling"
wandb_run_name = "gpt2-124m-scaling"
