# GPT-2 124M with the standard ("default") softmax attention, trained as in the paper:
# OpenWebText, 50,000 iterations, about 2B tokens, nanoGPT's optimizer settings.
#   torchrun --standalone --nproc_per_node=8 train.py config/default.py
# The five other paper configs import this file and change only `attention` (and the out_dir /
# wandb run name derived from it).
#
# Tokens per iteration = gradient_accumulation_steps x batch_size x block_size.
#   nanoGPT's GPT-2 recipe, 40 x 12 x 1024 = 491,520 tokens/iter, would make 50,000 iterations
#   24.6B tokens, not the paper's "about 2B". 2B / 50,000 = 40,000 tokens/iter, so:
#   8 x 5 x 1024 = 40,960 tokens/iter -> 50,000 iters = 2,048,000,000 tokens (about 2B).
#   gradient_accumulation_steps counts micro-steps over ALL processes: 8 GPUs do one micro-step of
#   5 sequences each; 1 GPU does 8 of them; the update is the same either way.

# data and output
dataset = "openwebtext"          # python prepare_data.py --dataset openwebtext
out_dir = "out/default"
wandb_project = "outlier-gpt"
wandb_run_name = "gpt2-124m-default"

# model: GPT-2 124M (nanoGPT: no biases, no dropout, vocabulary padded to 50304)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50304
bias = False
dropout = 0.0
attention = "default"

# batch: 40,960 tokens per iteration (see above)
batch_size = 5
gradient_accumulation_steps = 8

# AdamW with linear warmup and cosine decay (nanoGPT's recommended settings)
max_iters = 50000
lr_decay_iters = 50000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

# evaluation, checkpoints, outlier telemetry
eval_interval = 1000
eval_iters = 200
log_interval = 10
snapshot_interval = 5000         # ckpt_5000.pt, ..., ckpt_50000.pt: weights for outlier emergence studies
keep_snapshots = 0               # keep all ten
outlier_interval = 500

# system (dtype auto: bf16 on GPUs that have it)
compile = True
