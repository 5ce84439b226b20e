# reproduce.py --scale tiny: config/tiny.py's model (2 layers x 64 dims, 8 x 64 tokens per iteration) on a
# schedule short enough for all eight variants within 10 minutes on 2 CPU cores. Alone, one variant:
#   python prepare_data.py --dataset builtin && python train.py config/reproduce/tiny.py --attention=scaling
# The 50k-entry output layer dominates the cost (~0.2 s per iteration on 2 idle cores); 60 iterations and
# 4 evaluations of 4 batches keep the eight variants, analyses and compression table near 5-6 minutes idle,
# leaving room for a CPU shared with other work (80 iterations took 11 minutes at a load average of 3-4).
# reproduce.py --max_iters N sets lr_decay_iters to N as well, and warmup_iters to at most N / 10.
from config.tiny import *  # noqa: F401,F403  (the model, data and optimizer settings)

out_dir = "out/reproduce_tiny_run"
max_iters = 60
lr_decay_iters = 60
warmup_iters = 6
eval_interval = 20
eval_iters = 4
log_interval = 5
outlier_interval = 10
