"""Conditioning metrics: does a sample follow its caption, its image embedding, its class label? evaluate.py adds them
(evaluate() -> adherence()), each beside the same procedure on the real val images (the floor); adherence_plan() says
which the model and data allow.

- the linear probe (fit_probe) reads a label off image features: the class label (evaluate.py's class accuracy), and
  for captioned digits the digits the caption names (text_acc, by caption group; image_acc);
- R-precision (rprec): a ridge map from image features to caption embeddings, fitted on real train pairs, retrieves
  the sample's own caption among DISTRACTORS others (Xu et al. 2018, AttnGAN), and image retrieval likewise;
- the CLIP score (Hessel et al. 2021), given a CLIP-like model (eval_clip);
- the divergence test: a caption (in a trained phrasing) with the image embedding of other digits, at
  DIVERGENCE_SCALES: which one wins.
"""
import torch
import torch.nn.functional as F

from data import iterate_split, load_index
from prepare_data import decode

RIDGE = 1.0            # ridge penalty of the image-features -> text map, per image, on standardised features
# (text_scale, image_scale) of the divergence test: the caption's guidance 8x and 12x the image's (an image embedding
# says more than a caption; BENCHMARKS.md, rounds 26-27), the image's 4x, both equal. Guided over all of t: outside a
# guidance interval the unguided model decides, and it sides with the image
DIVERGENCE_SCALES = ((8.0, 1.0), (12.0, 1.0), (1.0, 4.0), (2.5, 2.5))
DIVERGENCE_INTERVAL = (0.0, 1.0)
DISTRACTORS = 99   # mismatched candidates per retrieval (AttnGAN's R-precision: 99, R = 1)
CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)   # OpenAI CLIP's input normalisation


def adherence_plan(cfg, index, request, split, clip=""):
    """The conditioning metrics evaluate() adds (adherence()): 'text' (the digit probe on caption-conditioned
    samples), 'rprec' (caption retrieval), 'clip' (CLIP score, given a CLIP model), 'image' (probe and
    retrieval on image-conditioned samples), 'divergence' (captions against disagreeing image embeddings).
    `request`: 'auto' (all the model and data allow), 'none', or names; a named one that they do not allow
    is an error naming what is missing."""
    def has(data_key, model_dim, what, setting):
        if not index[data_key]:
            return False, f"{what} (the data has none: prepare_data.py --{data_key}=...)"
        return bool(model_dim), f"{what} (the model does not use them: trained with {setting}=False)"
    captions = has("text_encoder", cfg.text_dim, "captions' text embeddings", "use_text")
    embeddings = has("image_encoder", cfg.image_dim, "image embeddings", "use_image")
    labels = bool(index["num_classes"]), "class labels (the data has none)"
    val = split == "val", "a val split (prepare_data.py --val_examples=N)"
    needs = {"text": [captions, labels, val], "rprec": [captions, val], "image": [embeddings, val],
             "divergence": [captions, embeddings, labels, val], "clip": [captions, val, (bool(clip), "eval_clip=<model>")]}
    if request == "none":
        return []
    if request == "auto":
        return [m for m, need in needs.items() if all(ok for ok, _ in need)]
    wanted = [w.strip() for w in request.split(",") if w.strip()]
    for w in wanted:
        if w not in needs:
            raise SystemExit(f"eval_adherence={request!r}: no metric {w!r}; 'auto', 'none' or some of {', '.join(needs)}")
        missing = [what for ok, what in needs[w] if not ok]
        if missing:
            raise SystemExit(f"eval_adherence={request!r}: {w} adherence needs {' and '.join(missing)}")
    return wanted


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


def digit_features(images, features, whole, pairs):
    """(B, 2, D) features of the digits of images (B, C, H, W) of one size: for data of pairs of digits
    (`pairs`: index.json's pair_labels) and an image twice as wide as high, its left and right square
    halves, else the whole image (its features `whole`) and zeros."""
    H, W = images.shape[-2:]
    if not pairs or W != 2 * H:
        return torch.stack([whole, torch.zeros_like(whole)], 1)
    return torch.stack([features(images[..., :H]), features(images[..., H:])], 1)


def digit_labels(probe, digits, y_right):
    """(N, 2) predicted (left, right) digits from digit_features (N, 2, D); right -1 where y_right is."""
    pred = probe_predict(probe, digits.flatten(0, 1)).view(-1, 2)
    pred[y_right < 0, 1] = -1
    return pred


def mean_pooled(text, mask):
    """(B, L, E) token embeddings and (B, L) mask -> (B, E): the mean over the caption's tokens."""
    m = mask.float()[..., None]
    return (text.float() * m).sum(1) / m.sum(1).clamp(min=1)


def fit_text_map(features, text):
    """Ridge regression from standardised image features (N, D) to caption embeddings (N, E), fitted on
    real pairs; text_embedding() applies it. Solved in the smaller of the N and D dimensions."""
    mu, sd = features.mean(0).float(), features.std(0).float() + 1e-6
    z, t_mean = (features.float() - mu) / sd, text.mean(0)
    n, d = z.shape
    lam = RIDGE * n
    if n < d:   # W = Z^T (Z Z^T + lam I)^-1 T
        W = z.T @ torch.linalg.solve(z @ z.T + lam * torch.eye(n), text - t_mean)
    else:       # W = (Z^T Z + lam I)^-1 Z^T T
        W = torch.linalg.solve(z.T @ z + lam * torch.eye(d), z.T @ (text - t_mean))
    return {"mu": mu, "sd": sd, "W": W, "t_mean": t_mean}


def text_embedding(text_map, features):
    """Image features (N, D) -> the caption embeddings the map predicts, centred (N, E)."""
    return ((features.float() - text_map["mu"]) / text_map["sd"]) @ text_map["W"]


def disagreeing(labels):
    """For each row of labels (B, 2) (left, right; right -1 for a single digit) the next row, cyclically,
    whose labels differ (itself if none does): whose image embedding the divergence test pairs it with."""
    B = len(labels)
    partner = torch.arange(B)
    for r in range(B):
        for k in range(1, B):
            if not torch.equal(labels[(r + k) % B], labels[r]):
                partner[r] = (r + k) % B
                break
    return partner


def conditions_for(mode, cond, labels):
    """The conditions of one evaluation mode from the data's (None entries: absent): 'data' all of them,
    'text' the caption alone (no class label, no image embedding), 'image' the image embedding alone,
    'divergence' each row's caption with a disagreeing row's image embedding (disagreeing()). Returns
    (conditions, index of the row whose image embedding is used)."""
    rows = torch.arange(len(labels))
    if mode == "data":
        return cond, rows
    if mode == "text":
        return {"text": cond["text"], "text_mask": cond["text_mask"]}, rows
    if mode == "image":
        return {"image_emb": cond["image_emb"]}, rows
    partner = disagreeing(labels)
    return {"text": cond["text"], "text_mask": cond["text_mask"], "image_emb": cond["image_emb"][partner]}, partner


def retrieval(queries, keys, own, buckets, seed, same=None, distractors=DISTRACTORS):
    """Top-1 retrieval (R-precision with R = 1, Xu et al. 2018 AttnGAN): the share of queries (N, E) whose own
    key (row own[n] of keys (M, E)) is more cosine-similar than every one of `distractors` keys drawn at random
    (seeded) from own's bucket (`buckets`: M names), never own itself nor, given `same` (M ids, e.g. of the
    caption text), a key with own's id. Returns (share, fewest distractors any query had)."""
    q, k = F.normalize(queries.float(), dim=1), F.normalize(keys.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    names = sorted(set(buckets))
    bucket = torch.tensor([names.index(b) for b in buckets])
    same = torch.arange(len(keys)) if same is None else same
    hits, fewest = 0, distractors
    for n, o in enumerate(own.tolist()):
        pool = ((bucket == bucket[o]) & (same != same[o])).nonzero().flatten()
        pick = pool[torch.randperm(len(pool), generator=g)[:distractors]]
        fewest = min(fewest, len(pick))
        hits += bool((k[pick] @ q[n] < k[o] @ q[n]).all())
    return hits / max(len(own), 1), fewest


def held_out_phrasings(index):
    """The caption templates that source='mnist-captions' holds out of train (none for other data)."""
    info = index.get("mnist_captions") or {}
    return {name for name, template in info.get("templates", {}).items() if template.get("held_out")}


def caption_groups(val, rows, index):
    """{suffix: mask} of the samples at val reference rows: '' all; for pairs of digits 'single', 'pair';
    for source='mnist-captions' also 'pair_seen', 'pair_held_out' (compositions held out of train; both in seen
    phrasings, so the two axes stay apart) and 'phrasing_seen', 'phrasing_held_out' (templates held out of train)."""
    y_right = val["y_right"][rows]
    pair = y_right >= 0
    groups = {"": torch.ones(len(rows), dtype=torch.bool)}
    if index.get("pair_labels"):
        groups.update(single=~pair, pair=pair)
    info = index.get("mnist_captions")
    if info:
        held = {tuple(p) for p in info["held_out_compositions"]}
        comp = torch.tensor([(a, b) in held for a, b in zip(val["y"][rows].tolist(), y_right.tolist())])
        held_out = held_out_phrasings(index)
        phrasing = torch.tensor([val["template"][r] in held_out for r in rows.tolist()], dtype=torch.bool)
        groups.update(pair_seen=pair & ~comp & ~phrasing, pair_held_out=pair & comp & ~phrasing,
                      phrasing_seen=~phrasing, phrasing_held_out=phrasing)
    return groups


def load_clip(name, device):
    """(image_fn, text_fn) of a Hugging Face CLIP-like model (get_image_features / get_text_features): images
    (B, C, H, W) in [0, 1] or captions -> unit (B, E) embeddings. Images are resized to the model's size and
    normalised with the processor's mean and std (OpenAI CLIP's when the model ships none)."""
    try:
        import transformers
        model = transformers.AutoModel.from_pretrained(name).eval().to(device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except ImportError:
        raise SystemExit("eval_clip needs: pip install transformers") from None
    except (OSError, ValueError) as e:
        raise SystemExit(f"eval_clip={name!r}: not a loadable CLIP-like model ({type(e).__name__}: {str(e)[:200]})") from None
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(name)
        mean, std = proc.image_mean, proc.image_std
    except (OSError, ValueError):
        mean, std = CLIP_MEAN, CLIP_STD
    size, length = model.config.vision_config.image_size, model.config.text_config.max_position_embeddings
    mean, std = torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1)

    def unit(out):   # transformers 5 returns a model output whose pooler_output is the projected embedding
        return F.normalize((out if torch.is_tensor(out) else out.pooler_output).float(), dim=1)

    @torch.no_grad()
    def image_fn(images):
        x = F.interpolate(images.float().expand(-1, 3, -1, -1), size=(size, size), mode="bicubic", antialias=True)
        return unit(model.get_image_features(pixel_values=(x.clamp(0, 1) - mean) / std))

    @torch.no_grad()
    def text_fn(captions):
        tokens = tokenizer(captions, padding=True, truncation=True, max_length=length, return_tensors="pt").to(device)
        return unit(model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]))
    return image_fn, text_fn


def real_images(data_dir, val, fn, device, rows, batch_size=100):
    """fn(images) of the real val images at reference rows (decoded as the reference decodes them)."""
    index, wanted, out = load_index(data_dir), val["index"][rows], {}
    for batch in iterate_split(data_dir, "val", batch_size=batch_size):
        idx = batch["start"] + torch.arange(len(batch["x"]))
        keep = torch.isin(idx, wanted).nonzero().flatten()
        if len(keep):
            for i, e in zip(idx[keep].tolist(), fn(decode(batch["x"][keep].to(device).float(), index)).cpu()):
                out[i] = e
    return torch.stack([out[i] for i in wanted.tolist()])


def adherence(gens, refs, data_dir, index, seed, device, clip=None):
    """Conditioning metrics of generated samples (`gens`: mode -> (features, info) from evaluate.generated_features,
    for 'text', 'image' and (text_scale, image_scale) of the divergence test) next to the same procedure on
    the real val images of the same conditions (their floor; `refs`: evaluate.references(); the CLIP floor reads the
    images from data_dir on `device`). Returns (model, floor, divergence rows):
    - text_acc[_group]: caption-conditioned samples (no class label, no image embedding) whose digits the
      digit probe reads as the caption's (both halves of a pair), by caption_groups();
    - rprec: the sample's features, mapped to a caption embedding by the ridge map fitted on the real train
      split, retrieve its own caption (mean-pooled tokens) among DISTRACTORS other captions (retrieval());
    - clip_score: 100 max(cos, 0) of CLIP embeddings of sample and caption (Hessel et al. 2021);
    - image_acc, image_retrieval: samples conditioned only on a val image's embedding: the probe reads the
      reference's digits; its features retrieve the reference among DISTRACTORS val images (floor: 1);
    - divergence: per (text_scale, image_scale), the shares that follow the caption and the image."""
    train, val = refs["train"][0], refs["val"][0]
    row_of = {i: r for r, i in enumerate(val["index"].tolist())}
    model, floor, divergence = {}, {}, []
    probe = train.get("digit_probe")

    def rows_of(info, key="i"):
        return torch.tensor([row_of[i] for i in info[key].tolist()], dtype=torch.long)

    def follows(digits, label_rows):
        pred = digit_labels(probe, digits, val["y_right"][label_rows])
        return (pred[:, 0] == val["y"][label_rows]) & (pred[:, 1] == val["y_right"][label_rows])

    if "text" in gens:
        fake, info = gens["text"]
        rows = rows_of(info)
        if probe is not None:
            hit, real_hit = follows(info["digits"], rows), follows(val["digits"][rows], rows)
            for group, mask in caption_groups(val, rows, index).items():
                key = "text_acc" + ("_" + group if group else "")
                model[key] = hit[mask].float().mean().item() if mask.any() else float("nan")
                floor[key] = real_hit[mask].float().mean().item() if mask.any() else float("nan")
                model[key + "_n"] = floor[key + "_n"] = int(mask.sum())
        text_map = train["text_map"]
        ids = {t: c for c, t in enumerate(sorted(set(val["txt"])))}
        same = torch.tensor([ids[t] for t in val["txt"]])
        keys = val["text"] - text_map["t_mean"]
        model["rprec"], fewest = retrieval(text_embedding(text_map, fake), keys, rows, val["bucket"], seed, same)
        floor["rprec"], _ = retrieval(text_embedding(text_map, val["features"][rows]), keys, rows, val["bucket"], seed, same)
        model["rprec_distractors"] = floor["rprec_distractors"] = fewest
        if clip is not None:
            captions = clip[1]([val["txt"][r] for r in rows.tolist()])
            model["clip_score"] = 100 * (info["extra"] * captions).sum(1).clamp(min=0).mean().item()
            real = real_images(data_dir, val, clip[0], device, rows)
            floor["clip_score"] = 100 * (real * captions).sum(1).clamp(min=0).mean().item()
    if "image" in gens:
        fake, info = gens["image"]
        rows = rows_of(info)
        if probe is not None:
            model["image_acc"] = follows(info["digits"], rows).float().mean().item()
            floor["image_acc"] = follows(val["digits"][rows], rows).float().mean().item()
        mu, sd = train["mu"].float(), train["cov"].diagonal().float().sqrt() + 1e-6
        keys = (val["features"] - mu) / sd
        model["image_retrieval"], fewest = retrieval((fake.float() - mu) / sd, keys, rows, val["bucket"], seed)
        floor["image_retrieval"], _ = retrieval(keys[rows], keys, rows, val["bucket"], seed)
        model["image_retrieval_distractors"] = floor["image_retrieval_distractors"] = fewest
    for (t_scale, i_scale), (fake, info) in ((m, g) for m, g in gens.items() if isinstance(m, tuple)):
        # generated only for captions in trained phrasings with an image of other digits (evaluate.generated_features)
        rows, image_rows = rows_of(info), rows_of(info, "j")
        text_hit, image_hit = follows(info["digits"], rows), follows(info["digits"], image_rows)
        divergence.append({"text_scale": t_scale, "image_scale": i_scale, "n": len(rows),
                           "follow_text": text_hit.float().mean().item(), "follow_image": image_hit.float().mean().item()})
    if divergence:   # the headline pair: text guidance dominant, image guidance dominant
        model["diverge_text"] = max(divergence, key=lambda d: d["text_scale"] / d["image_scale"])["follow_text"]
        model["diverge_image"] = max(divergence, key=lambda d: d["image_scale"] / d["text_scale"])["follow_image"]
    return model, floor, divergence
