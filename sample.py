"""Sample images from a trained NanoDiT checkpoint with an Euler ODE solver and guidance.

    python sample.py --ckpt=out/mnist                            # class grid: one row per class
    python sample.py --ckpt=out/mnist/ckpt-00002000.pt --classes=3,7 --per_class=16 --text_scale=3
    python sample.py --ckpt=out/photos --prompts=prompts.txt --text_scale=4.5
    python sample.py --ckpt=out/photos --prompts=prompts.txt --images=ref.jpg --text_scale=4 --image_scale=2

Writes a PNG grid and, beside it, a JSON of the settings that made it. Guidance (all channels):
with text/class condition c_t and image condition c_i, and v(.,.) the model's velocity,
    text only:  v = v(0,0) + s_t * (v(c_t,0) - v(0,0))
    image only: v = v(0,0) + s_i * (v(0,c_i) - v(0,0))
    both:       v = v(0,0) + s_i * (v(0,c_i) - v(0,0)) + s_t * (v(c_t,c_i) - v(0,c_i))
(InstructPix2Pix's dual guidance, arXiv:2211.09800); scales of 1 give the plain conditional model.
"""
import json
import os
import sys

import torch

from model import DiT, DiTConfig

# ----------------------------------------------------------------------------------------------
ckpt = ""            # a checkpoint file, or an out_dir (its newest checkpoint)
out = ""             # output PNG; default <checkpoint folder>/samples/sample-<step>.png
steps = 32           # Euler steps from t=1 to t=0
text_scale = 3.0     # guidance on text and class labels; 1 = none
image_scale = 1.0    # guidance on the image embedding; 1 = none
classes = "all"      # for class-conditional models: 'all' or comma-separated labels, e.g. '3,7'
per_class = 8        # images per class (one grid row per class)
prompts = ""         # text file, one prompt per line (encoded with the checkpoint's text encoder)
images = ""          # comma-separated image paths for image conditioning (checkpoint's image encoder)
num = 16             # images per prompt/image, or in total for an unconditional model
height = 0           # output size in pixels; 0 = the largest training bucket
width = 0
seed = 0
ema = True           # sample with the EMA weights (false: the raw trained weights)
device = "auto"
dtype = "auto"       # 'auto' (bf16 where fast) | 'bfloat16' | 'float32'
# ----------------------------------------------------------------------------------------------


def euler_sample(v_fn, noise, steps):
    """Integrate d xt/dt = v from t=1 (noise) to t=0 (data) in `steps` equal Euler steps."""
    x = noise
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    for i in range(steps):
        t = ts[i].expand(len(x))
        x = x + (ts[i + 1] - ts[i]) * v_fn(x, t).to(x.dtype)
    return x


def guided_velocity(model, cond, text_scale, image_scale):
    """v_fn(xt, t) applying the module docstring's guidance in one batched forward per step.

    `cond` holds the conditions to guide towards (y and/or text + text_mask, image_emb); absent
    conditions are the model's nulls anyway.
    """
    has_text = cond.get("y") is not None or cond.get("text") is not None
    has_image = cond.get("image_emb") is not None
    # branches as (drop text and class, drop image)
    if has_text and has_image and (text_scale != 1 or image_scale != 1):
        branches = [(True, True), (True, False), (False, False)]
    elif has_text and text_scale != 1 or has_image and image_scale != 1:
        branches = [(True, True), (False, False)]
    else:
        branches = [(False, False)]
    k = len(branches)

    @torch.no_grad()
    def v_fn(xt, t):
        B = len(xt)
        rep = {n: c.repeat(k, *([1] * (c.dim() - 1))) for n, c in cond.items() if c is not None}
        drop_t = torch.tensor([d[0] for d in branches], device=xt.device).repeat_interleave(B)
        drop_i = torch.tensor([d[1] for d in branches], device=xt.device).repeat_interleave(B)
        v = model(xt.repeat(k, 1, 1, 1), t.repeat(k), **rep, drop_y=drop_t, drop_text=drop_t, drop_image=drop_i)
        v = v.float().chunk(k)
        if k == 1:
            return v[0]
        if k == 2:
            return v[0] + (text_scale if has_text else image_scale) * (v[1] - v[0])
        return v[0] + image_scale * (v[1] - v[0]) + text_scale * (v[2] - v[1])
    return v_fn


def decode(x, meta):
    """Model space (B, C, H, W) -> images in [0, 1]: pixels are stored in [-1, 1]; latents go
    through the VAE named in the data index, undoing the stored scaling and shift."""
    if meta["space"] == "pixels":
        return ((x + 1) / 2).clamp(0, 1)
    from prepare_data import load_vae
    vae, vae_meta = load_vae(meta["vae"]["name"], x.device)
    z = x / vae_meta["scaling_factor"] + vae_meta["shift_factor"]
    with torch.no_grad():
        images = torch.cat([vae.decode(chunk).sample for chunk in z.split(8)])
    return ((images.float() + 1) / 2).clamp(0, 1)


def save_grid(images, path, nrow=8, pad=2):
    """Save images (N, C, H, W) in [0, 1] as one PNG, nrow images per row."""
    from PIL import Image
    N, C, H, W = images.shape
    rows = (N + nrow - 1) // nrow
    grid = torch.ones(C, rows * (H + pad) + pad, nrow * (W + pad) + pad)
    for i, img in enumerate(images.cpu()):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = img
    array = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(array[..., 0] if C == 1 else array[..., :3]).save(path)


def resolve_checkpoint(path):
    """A checkpoint file as given, or the newest ckpt-*.pt in a folder."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.startswith("ckpt-") and n.endswith(".pt"))
        if not names:
            raise SystemExit(f"sample.py: no ckpt-*.pt checkpoint in {path}")
        return os.path.join(path, names[-1])
    if not os.path.isfile(path):
        raise SystemExit(f"sample.py: ckpt={path!r} is neither a checkpoint file nor a folder")
    return path


def load_model(path, use_ema=True, device="cpu"):
    """(model in eval mode, checkpoint dict) from a checkpoint, loaded without executing code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"sample.py: cannot load checkpoint {path}: {type(e).__name__}: {str(e)[:200]}") from None
    model = DiT(DiTConfig(**state["model_args"]))
    model.load_state_dict(state["ema" if use_ema else "model"])
    return model.to(device).eval(), state


def main():
    dev = device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_checkpoint(ckpt) if ckpt else sys.exit("sample.py: --ckpt=PATH is required")
    model, state = load_model(path, ema, dev)
    meta, cfg = state["data"], model.cfg
    use_bf16 = dtype == "bfloat16" or dtype == "auto" and (
        torch.cuda.is_available() and torch.cuda.is_bf16_supported() if dev.startswith("cuda")
        else torch.cpu._is_avx512_bf16_supported())
    autocast = torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=use_bf16)
    H, W = height, width
    if not (H and W):
        H, W = max(meta["buckets"].values(), key=lambda hw: hw[0] * hw[1])
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
        enc, _ = load_text_encoder(meta["text_encoder"]["name"], L, dev)
        text = torch.zeros(len(lines), L, cfg.text_dim)
        mask = torch.zeros(len(lines), L, dtype=torch.bool)
        for i, emb in enumerate(encode_text(enc, lines, L, dev)):    # (n_valid, D) each, padded here
            text[i, :len(emb)] = torch.from_numpy(emb).float()
            mask[i, :len(emb)] = True
        cond["text"] = text.to(dev).repeat_interleave(num, 0)
        cond["text_mask"] = mask.to(dev).repeat_interleave(num, 0)
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
    with autocast:
        x = euler_sample(guided_velocity(model, cond, text_scale, image_scale), noise, steps)
    target = out or os.path.join(os.path.dirname(path), "samples", f"sample-{state['step']:08d}.png")
    save_grid(decode(x.float(), meta), target, nrow=nrow)
    settings = {k: globals()[k] for k in SETTINGS}
    settings.update(checkpoint=path, step=state["step"], height=H, width=W)
    with open(os.path.splitext(target)[0] + ".json", "w") as f:
        json.dump(settings, f, indent=1)
    print(f"wrote {target} ({n} images, {H}x{W}, {steps} steps, step {state['step']} {'EMA' if ema else 'raw'} weights)")


SETTINGS = [k for k, v in list(globals().items()) if not k.startswith("_") and isinstance(v, (str, int, float, bool))]

if __name__ == "__main__":
    from configurator import apply_overrides
    apply_overrides(globals(), sys.argv[1:])
    main()
