# Small: 12 blocks x 384 wide (~33M parameters, DiT-S/2-sized), one GPU or a patient CPU.
# Effective batch = batch_size x grad_accum_steps x ranks = 8 x 1 x 1 = 8 images per step
# (with torchrun --nproc_per_node=8: 64). Budget: 400k images = 50k steps at batch 8.
out_dir = "out/small"
depth = 12
hidden = 384
heads = 6            # 64 per head
patch_size = 2
batch_size = 8
grad_accum_steps = 1
lr = 2e-4
warmup_steps = 1000
max_images = 400_000
ema_decay = 0.9995
ema_warmup_steps = 2000
ckpt_interval = 2000
sample_interval = 2000
log_interval = 50
compile = True       # paid back after 3-73 minutes of training (BENCHMARKS.md round 12); no C++ compiler: eager
