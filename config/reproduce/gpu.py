# reproduce.py --scale gpu: GPT-2 124M (config/default.py's model: 12 layers, 12 heads, 768 dims, 1024-token
# context) per variant on one H100/H200 within reproduce.py's --budget-s. Alone, one variant:
#   python train.py config/reproduce/gpu.py --attention=softmax1 --data_dir=DIR
# Batch 16 x 1024 is the shape whose training throughput was measured on an H200 (benchmarks/results/
# train_throughput_nvidia-h200_20261204-021013.json), which sizes max_iters to the budget. Learning rate:
# config/default.py's 6e-4, held constant after a short warmup (min_lr = learning_rate) like Gu et al.'s
# constant-rate runs: a small or early-decayed rate delays the attention sink (Gu et al. 2025); weight decay
# 0.1 as in the paper recipe (Gu et al.: weight decay encourages the sink).
from config.default import *  # noqa: F401,F403  (GPT-2 124M and the paper recipe's optimizer)

out_dir = "out/reproduce_gpu_run"
wandb_run_name = ""  # train.py names the run after its variant
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 1250     # reproduce.py sizes it from --budget-s: 1,250 at 540 s with a carried corpus
warmup_iters = 100
min_lr = 6e-4
eval_iters = 20
outlier_interval = 40
compile = False      # measured for `default` only; about a minute of steps per variant would not pay its compile
snapshot_interval = 0
