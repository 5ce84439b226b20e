# A tiny model and schedule that train in a few minutes on a laptop CPU (`make demo`, tests).
# Data: the built-in smoke-test corpus (Python standard-library source), made by
#   python prepare_data.py --dataset builtin
# The val loss falls from ~10.8 (uniform over 50k tokens) to about 4 (Python source is repetitive):
# a smoke test of the whole pipeline, not a result.
dataset = "builtin"
out_dir = "out/demo"
# a second run into out/demo is refused; `make demo` starts over with --overwrite=True on its command line
# (a config file never sets overwrite: it would replace the run of whatever --out_dir is named)

n_layer = 2
n_head = 4
n_embd = 64
block_size = 64
vocab_size = 50304
dropout = 0.0
attention = "default"

batch_size = 8
gradient_accumulation_steps = 1
max_iters = 150
lr_decay_iters = 150
warmup_iters = 15
learning_rate = 3e-3
min_lr = 3e-4
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 50
eval_iters = 5
log_interval = 10
outlier_interval = 50
snapshot_interval = 0
compile = False
