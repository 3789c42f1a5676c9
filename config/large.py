# Large: 28 blocks x 1024 wide (~530M parameters without text cross-attention; DiT-XL depth),
# meant for VAE latents (e.g. 1024x1024 images -> 128x128x4 latents -> 4,096 tokens at patch 2).
# Effective batch = 4 per rank x 64 accumulation x 8 ranks = 2,048 images per step; on one GPU
# it is 256. Gradient checkpointing trades ~1/3 more compute for activations of one block at a time.
# Budget: 204.8M images = 100k steps at 2,048.
out_dir = "out/large"
depth = 28
hidden = 1024
heads = 16           # 64 per head
patch_size = 2
batch_size = 4
grad_accum_steps = 64
grad_checkpoint = True
lr = 1e-4
warmup_steps = 5000
max_images = 204_800_000
ema_decay = 0.9999
ema_warmup_steps = 10000
ckpt_interval = 1000
keep_every = 10000
sample_interval = 2000
log_interval = 10
compile = True       # as config/small.py, where it was measured (BENCHMARKS.md round 12)
