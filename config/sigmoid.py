# GPT-2 124M with `sigmoid` attention; everything else as in config/default.py (the authors' recipe).
#   torchrun --standalone --nproc_per_node=8 train.py config/sigmoid.py
from config.default import *  # noqa: F401,F403  (the shared base; only known config keys are accepted)

attention = "sigmoid"
out_dir = "out/sigmoid"
wandb_run_name = "gpt2-124m-sigmoid"
