# reproduce.py --scale gpu-long: a GPT-2-shaped 12-layer model (8 heads, 512 dims, 512-token context) per
# variant on one H100/H200. Alone, one variant:
#   python train.py config/reproduce/gpu_long.py --attention=gated --data_dir=DIR
# 32 x 2 x 512 = 32,768 tokens/iter x 2,000 iters = 65.5M tokens per variant, bf16, compiled; the pysource
# corpus of CPython 3.11 is 15.3M tokens (measured), so about 4 epochs. Estimated (not measured) at 2-3
# minutes per variant on one H100 including compilation, i.e. about 20-25 minutes for all eight.
from config.default import *  # noqa: F401,F403  (GPT-2's layers, vocabulary and optimizer)

out_dir = "out/reproduce_gpu_long_run"
wandb_run_name = ""  # train.py names the run after its variant
n_head = 8
n_embd = 512
block_size = 512
batch_size = 32
gradient_accumulation_steps = 2
max_iters = 2000
lr_decay_iters = 2000
warmup_iters = 200
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 250
eval_iters = 20
outlier_interval = 50
snapshot_interval = 0
