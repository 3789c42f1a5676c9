# Medium: 24 blocks x 512 wide (~115M parameters).
# Effective batch = 16 per rank x 16 accumulation x ranks: 256 on one GPU, 2,048 on 8
# (use grad_accum_steps=2 on 8 GPUs to keep 256). Budget: 25.6M images = 100k steps at 256.
out_dir = "out/medium"
depth = 24
hidden = 512
heads = 8            # 64 per head
patch_size = 2
batch_size = 16
grad_accum_steps = 16
lr = 1e-4
warmup_steps = 2000
max_images = 25_600_000
ema_decay = 0.9999
ema_warmup_steps = 5000
ckpt_interval = 1000
sample_interval = 2000
log_interval = 20
compile = True       # as config/small.py, where it was measured (BENCHMARKS.md round 12)
