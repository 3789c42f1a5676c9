"""Sample images from a trained NanoDiT checkpoint (Euler or Heun ODE solver, guidance) into a PNG grid.

    python sample.py --ckpt=out/mnist                            # class grid: one row per class
    python sample.py --ckpt=out/mnist/ckpt-00002000.pt --classes=3,7 --per_class=16 --text_scale=3
    python sample.py --ckpt=out/photos --prompts=prompts.txt [--images=ref.jpg --image_scale=2] --text_scale=4

Writes a PNG grid and a JSON of its settings. `python evaluate.py --ckpt=...` and export.py sample with its functions.
Guidance (all channels), with text/class condition c_t, image condition c_i and v(.,.) the model's velocity:
    text only:  v = v(0,0) + s_t * (v(c_t,0) - v(0,0))
    image only: v = v(0,0) + s_i * (v(0,c_i) - v(0,0))
    both, guidance='nested':   v = v(0,0) + s_i * (v(0,c_i) - v(0,0)) + s_t * (v(c_t,c_i) - v(0,c_i))
    both, guidance='composed': v = v(0,0) + s_t * (v(c_t,0) - v(0,0)) + s_i * (v(0,c_i) - v(0,0))
(InstructPix2Pix, arXiv:2211.09800: the caption given the image; Composable Diffusion, arXiv:2206.01714: each
condition's own effect, so the larger scale wins where they disagree). Scales of 1: the conditional v(c_t,c_i).
"""
import json
import os
import sys

import torch

from checkpoint import load_model, resolve_checkpoint
from model import bf16_is_native, compile_model, keep_freed_cpu_memory, shift_time

SOLVERS = {"euler": 1, "heun": 2}   # velocity evaluations per step

# ----------------------------------------------------------------------------------------------
ckpt = ""            # a checkpoint file, or an out_dir (its newest checkpoint)
out = ""             # output PNG; default <checkpoint folder>/samples/sample[-prompts][-images]-<step>.png
# The sampler (SAMPLER): a checkpoint's recipe (train.py's sample_*) replaces these defaults, the command line both.
steps = 32           # solver steps from t=1 to t=0 (Heun evaluates the velocity twice per step)
solver = "euler"     # 'euler' (1st order) or 'heun' (2nd order)
shift = 1.0          # time shift s of the step grid, t' = s t / (1 + (s - 1) t) (SD3); 1 = uniform
text_scale = 3.0     # guidance on text and class labels; 1 = none
image_scale = 1.0    # guidance on the image embedding; 1 = none
guidance_interval = (0.0, 1.0)  # guide only while lo <= t <= hi; outside, one conditional forward
guidance = "nested"  # with a caption and an image: 'nested' or 'composed' (the formulas above)
temperature = 1.0    # scale of the starting noise: below 1 trades variety (recall) for cleaner images (precision)
classes = "all"      # for class-conditional models: 'all' or comma-separated labels, e.g. '3,7'
per_class = 8        # images per class (one grid row per class)
prompts = ""         # text file, one prompt per line (encoded with the checkpoint's text encoder)
images = ""          # comma-separated image paths for image conditioning (checkpoint's image encoder)
num = 16             # images per prompt/image, or in total for an unconditional model
height = 0           # output size in pixels; 0 = the largest training bucket
width = 0
seed = 0
ema = "true"         # weights: 'true' (EMA), 'false' (raw trained weights) or 'both' (one output each)
device = "auto"
dtype = "auto"       # 'auto' (bf16 where fast) | 'bfloat16' | 'float32'
compile = False      # torch.compile the network: ~30 s once, then 1.3x the img/s on a 2-core CPU (BENCHMARKS.md),
                     # so it pays for large grids; without a C++ compiler (CPU) it says so and runs eager
eval_batch_size = 100  # images generated per batch (as train.py's and evaluate.py's)
# ----------------------------------------------------------------------------------------------
# The sampler settings above, which evaluate.py and export.py import: their one home.
SAMPLER = ("steps", "solver", "shift", "text_scale", "image_scale", "guidance_interval", "guidance", "temperature")
GUIDANCE = ("nested", "composed")   # BOTH_BRANCHES' keys


def time_grid(steps, shift=1.0, device=None):
    """steps + 1 times from 1 (noise) to 0 (data): uniform, then warped by model.shift_time."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def sample_ode(v_fn, noise, steps, solver="euler", shift=1.0, temperature=1.0):
    """Integrate d xt/dt = v from t=1 (temperature x noise) to t=0 (data) on time_grid(steps, shift).

    Euler: one velocity per step. Heun: an Euler predictor, then the average of the velocities at both
    ends of the step (trapezoid rule, exact when v is linear in t), so 2 velocities per step, except on the
    last step: it ends at t = 0, where an x-predicting model's velocity (xt - x_hat) / t is undefined, so it
    stays an Euler step (as in EDM, Karras et al. 2022, Algorithm 1).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {', '.join(SOLVERS)}")
    x = noise * temperature if temperature != 1 else noise
    ts = time_grid(steps, shift, noise.device)
    for i in range(steps):
        t, dt = ts[i].expand(len(x)), ts[i + 1] - ts[i]
        v = v_fn(x, t).to(x.dtype)
        if solver == "heun" and ts[i + 1] > 0:
            v = 0.5 * (v + v_fn(x + dt * v, ts[i + 1].expand(len(x))).to(x.dtype))
        x = x + dt * v
    return x


def velocity_evals(steps, solver):
    """Velocity evaluations per image: what `steps` costs with this solver."""
    return steps * SOLVERS[solver] - (solver == "heun")   # Heun's last step is an Euler step (sample_ode)


# guided branches (drop text and class, drop image); outside the interval only (False, False), the conditional
ONE_BRANCHES = [(True, True), (False, False)]
BOTH_BRANCHES = {"nested": [(True, True), (True, False), (False, False)],
                 "composed": [(True, True), (False, True), (True, False)]}


def combine(v, text_scale, image_scale, text_first, guidance):
    """Guided velocity from v[i] of [(False, False)], ONE_BRANCHES (text_first: text/class, else image) or
    BOTH_BRANCHES[guidance]; export.py's graph calls it too."""
    if len(v) == 1:
        return v[0]
    if len(v) == 2:
        return v[0] + (text_scale if text_first else image_scale) * (v[1] - v[0])
    if guidance == "composed":
        return v[0] + text_scale * (v[1] - v[0]) + image_scale * (v[2] - v[0])
    return v[0] + image_scale * (v[1] - v[0]) + text_scale * (v[2] - v[1])


def guided_velocity(model, cond, text_scale, image_scale, interval=(0.0, 1.0), guidance="nested"):
    """v_fn(xt, t) applying the module docstring's guidance in one batched forward per step.

    `cond` holds the conditions to guide towards (y and/or text + text_mask, image_emb); absent
    conditions are the model's nulls anyway. Guidance applies only while interval[0] <= t <= interval[1]
    (Kynkaenniemi et al. 2024, arXiv:2404.07724); outside it, one conditional forward per step.
    `v_fn.forwards` counts network forwards per image (every branch counts), for honest cost figures.
    """
    has_text = cond.get("y") is not None or cond.get("text") is not None
    has_image = cond.get("image_emb") is not None
    guided = (BOTH_BRANCHES[guidance] if has_text and has_image and (text_scale != 1 or image_scale != 1) else
              ONE_BRANCHES if has_text and text_scale != 1 or has_image and image_scale != 1 else [(False, False)])
    lo, hi = interval

    @torch.no_grad()
    def v_fn(xt, t):
        B, t0 = len(xt), t[0].item()
        use = guided if lo <= t0 <= hi else [(False, False)]
        k = len(use)
        v_fn.forwards += k
        rep = {n: c.repeat(k, *([1] * (c.dim() - 1))) for n, c in cond.items() if c is not None}
        drop_t = torch.tensor([d[0] for d in use], device=xt.device).repeat_interleave(B)
        drop_i = torch.tensor([d[1] for d in use], device=xt.device).repeat_interleave(B)
        v = model(xt.repeat(k, 1, 1, 1), t.repeat(k), **rep, drop_y=drop_t, drop_text=drop_t, drop_image=drop_i)
        return combine(v.float().chunk(k), text_scale, image_scale, has_text, guidance)
    v_fn.forwards = 0
    return v_fn


def sampler_settings(settings, prefix=""):
    """{SAMPLER key: value} from a script's globals (train.py's: prefix 'sample_'), as generate() takes it."""
    return {k: settings[prefix + k] for k in SAMPLER}


def generate(model, cond, noise, sampler, meta, autocast, chunk):
    """Images in [0, 1] on the CPU from `noise` (N, C, h, w) and conditions `cond` (N rows each), sampled with
    `sampler` (sampler_settings), decoded `chunk` at a time (no giant batch). Returns (images, forwards per image)."""
    from prepare_data import decode   # the data's VAE for latents
    images, forwards = [], 0
    for rows in torch.arange(len(noise), device=noise.device).split(chunk):
        v_fn = guided_velocity(model, {k: v[rows] for k, v in cond.items() if v is not None}, sampler["text_scale"],
                               sampler["image_scale"], sampler["guidance_interval"], sampler["guidance"])
        with autocast:
            x = sample_ode(v_fn, noise[rows], *(sampler[k] for k in ("steps", "solver", "shift", "temperature")))
        images.append(decode(x.float(), meta).cpu())
        forwards = v_fn.forwards
    return torch.cat(images), forwards


def save_grid(images, path, nrow=8, pad=2):
    """Save images (N, C, H, W) in [0, 1] as one PNG, nrow images per row."""
    from PIL import Image
    N, C, H, W = images.shape
    grid = torch.ones(C, -(-N // nrow) * (H + pad) + pad, nrow * (W + pad) + pad)   # ceil(N / nrow) rows
    for i, img in enumerate(images.cpu()):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = img
    array = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(array[..., 0] if C == 1 else array[..., :3]).save(path)


def pick_device(device):
    """'auto' -> cuda if there is one, else cpu."""
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if torch.device(dev).type == "cpu":
        keep_freed_cpu_memory()   # as train.py does: no page faults for the buffers every step reallocates
    return dev


def pick_dtype(dev, dtype):
    """The autocast context for `dtype` ('auto': bf16 where the device runs it natively)."""
    use_bf16 = dtype == "bfloat16" or dtype == "auto" and bf16_is_native(torch.device(dev).type)
    return torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=use_bf16)


def use_recipe_sampler(settings, config, given):
    """Adopt into `settings` (a script's globals) the checkpoint recipe's sampler settings (train.py's sample_<key>)
    that the command line left alone (`given`: the keys it set), so a recipe is sampled as tuned."""
    taken = {k: config["sample_" + k] for k in SAMPLER if "sample_" + k in config and k not in given}
    taken = {k: tuple(v) if k == "guidance_interval" else v for k, v in taken.items() if settings[k] != v}
    if taken:
        settings.update(taken)
        print("sampler settings from the checkpoint's recipe: " + ", ".join(f"{k}={v}" for k, v in taken.items()))
        check_settings(settings)


def check_settings(s):
    """The sampler settings and ema of `s`, a script's globals (sample.py's, evaluate.py's or export.py's)."""
    script = os.path.basename(s["__file__"])
    if s["solver"] not in SOLVERS:
        sys.exit(f"{script}: solver={s['solver']!r}: expected one of {', '.join(SOLVERS)}")
    if str(s["ema"]).lower() not in ("true", "false", "both"):
        sys.exit(f"{script}: ema={s['ema']!r}: expected true, false or both")
    if s["steps"] < 1 or s["shift"] <= 0:
        sys.exit(f"{script}: steps={s['steps']} must be >= 1 and shift={s['shift']} > 0")
    if not s["temperature"] > 0:
        sys.exit(f"{script}: temperature={s['temperature']}: expected > 0 (the starting noise's scale; 1 = unit noise)")
    if s["guidance"] not in GUIDANCE:
        sys.exit(f"{script}: guidance={s['guidance']!r}: expected one of {', '.join(GUIDANCE)}")
    lo_hi = s["guidance_interval"]
    if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1] <= 1:
        sys.exit(f"{script}: guidance_interval={lo_hi!r}: expected lo,hi with 0 <= lo <= hi <= 1")


def draw_grid(model, state, path, dev, autocast):
    """The grid of the settings at the top (classes, prompts, images) -> PNG; returns (target, n, forwards)."""
    meta, cfg = state["data"], model.cfg
    H, W = (height, width) if height and width else max(meta["buckets"].values(), key=lambda hw: hw[0] * hw[1])
    down = meta["vae"]["downsample"] if meta["vae"] else 1                    # pixels per latent cell
    if H % (down * cfg.patch_size) or W % (down * cfg.patch_size):
        sys.exit(f"sample.py: height={H}, width={W} must be multiples of {down * cfg.patch_size} "
                 f"(VAE downsampling {down} x patch size {cfg.patch_size})")
    cond, nrow = {}, 8
    if cfg.num_classes and not prompts:
        labels = list(range(cfg.num_classes)) if classes == "all" else [int(c) for c in classes.split(",")]
        bad = [c for c in labels if not 0 <= c < cfg.num_classes]
        if bad:
            sys.exit(f"sample.py: classes={classes!r}: {bad} outside 0..{cfg.num_classes - 1}")
        cond["y"] = torch.tensor(labels, device=dev).repeat_interleave(per_class)
        n, nrow = len(cond["y"]), per_class
    else:
        n = num
    if prompts:
        if not cfg.text_dim:
            sys.exit("sample.py: prompts given but this model has no text conditioning")
        from prepare_data import encode_text, load_text_encoder
        with open(prompts) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        L = meta["text_encoder"]["max_length"]
        embs = encode_text(load_text_encoder(meta["text_encoder"]["name"], L, dev)[0], lines, L, dev)  # (n_valid, D)
        text = torch.stack([torch.nn.functional.pad(torch.from_numpy(e).float(), (0, 0, 0, L - len(e))) for e in embs])
        cond["text"] = text.to(dev).repeat_interleave(num, 0)
        cond["text_mask"] = (torch.arange(L) < torch.tensor([[len(e)] for e in embs])).to(dev).repeat_interleave(num, 0)
        n, nrow = len(lines) * num, num
    if images:
        if not cfg.image_dim:
            sys.exit("sample.py: images given but this model has no image conditioning")
        from PIL import Image
        from prepare_data import encode_images, load_image_encoder
        paths = images.split(",")
        enc, _ = load_image_encoder(meta["image_encoder"]["name"], dev)
        emb = torch.from_numpy(encode_images(enc, [Image.open(p).convert("RGB") for p in paths], dev)).to(dev).float()
        reps = n // len(paths) if n % len(paths) == 0 else sys.exit(
            f"sample.py: {n} images to draw is not a multiple of {len(paths)} conditioning images")
        cond["image_emb"] = emb.repeat_interleave(reps, 0)
    g = torch.Generator(device=dev).manual_seed(seed)
    noise = torch.randn(n, cfg.in_channels, H // down, W // down, generator=g, device=dev)
    drawn, forwards = generate(model, cond, noise, sampler_settings(globals()), meta, autocast, eval_batch_size)
    save_grid(drawn, path, nrow=nrow)
    return (H, W), n, forwards


def weight_sets(script, given, kind):
    """The run of sample.py or evaluate.py (`script`: its globals) over the weight sets its `ema` asks for: checks
    the settings, picks device and dtype, finds the checkpoint, then per set yields (model, checkpoint dict, record of
    the settings and weights, output path less extension: --out (+ '-raw' for the raw set of 'both') or <checkpoint
    folder>/samples/<kind>-<step>[-raw], device, autocast), compiled if asked, the recipe's sampler adopted."""
    check_settings(script)
    settings = [k for k, v in script.items()   # the settings block; constants are UPPER_CASE
                if not k.startswith("_") and not k.isupper() and isinstance(v, (str, int, float, bool, tuple))]
    name, dev = os.path.basename(script["__file__"]), pick_device(script["device"])
    path = resolve_checkpoint(script["ckpt"]) if script["ckpt"] else sys.exit(f"{name}: --ckpt=PATH is required")
    autocast, ema = pick_dtype(dev, script["dtype"]), str(script["ema"]).lower()
    for use_ema in {"true": [True], "false": [False], "both": [True, False]}[ema]:
        model, state = load_model(path, use_ema, dev)
        if script["compile"]:
            model = compile_model(model)
        use_recipe_sampler(script, state["config"], given)
        record = {k: script[k] for k in settings}
        record.update(checkpoint=path, step=state["step"], weights="ema" if use_ema else "raw",
                      velocity_evals_per_image=velocity_evals(script["steps"], script["solver"]))
        raw = "" if use_ema else "-raw"
        stem = (os.path.splitext(script["out"])[0] + (raw if ema == "both" else "") if script["out"] else
                os.path.join(os.path.dirname(path), "samples", f"{kind}-{state['step']:08d}{raw}"))
        yield model, state, record, stem, dev, autocast


def main(given):
    kind = "-".join(["sample"] + [k for k in ("prompts", "images") if globals()[k]])   # a prompt grid keeps its file
    for model, state, settings, stem, dev, autocast in weight_sets(globals(), given, kind):
        target = out if out and stem == os.path.splitext(out)[0] else stem + ".png"
        (H, W), n, forwards = draw_grid(model, state, target, dev, autocast)
        settings.update(height=H, width=W, forwards_per_image=forwards)
        with open(stem + ".json", "w") as f:
            json.dump(settings, f, indent=1)
        print(f"wrote {target} ({n} images, {H}x{W}, {steps} {solver} steps, {forwards} forwards per image, "
              f"step {state['step']} {settings['weights']} weights)")


if __name__ == "__main__":
    from configurator import apply_overrides
    main(apply_overrides(globals(), sys.argv[1:]))
