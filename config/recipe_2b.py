# The "50,000 iterations, approximately 2 billion tokens" reading of An et al. (ICLR 2025), as an
# overlay for any variant config (it sets no attention, model or out_dir key):
#   python train.py config/scaling.py config/recipe_2b.py --out_dir=out/scaling_2b
# 8 x 5 x 1024 = 40,960 tokens/iter -> 50,000 iters = 2.05B tokens, with the cosine schedule
# ending at the last iteration. config/default.py explains why this is not the default.
batch_size = 5
gradient_accumulation_steps = 8
max_iters = 50000
lr_decay_iters = 50000
