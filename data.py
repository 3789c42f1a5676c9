"""
What training reads: the shards and index.json that prepare_data.py writes (its docstring gives the layout),
read by (split, bucket, shard, position) into collated batches: ShardStream for training, iterate_split for
one ordered pass (validation, evaluation). This file owns the shard format that both sides share.

Reading: data_dir (train.py, sample.py) is a folder, an http(s):// prefix (or another scheme of
webdataset's gopen), or a 'pipe:' command in which {} stands for the file, e.g.
'pipe:aws s3 cp s3://bucket/data/{} -'. Remote shards are fetched whole into a local cache, then read
by random access like local ones (configure_cache).

Training's side: loader(stream, ...) is the DataLoader over a ShardStream, to_device moves its batches. The
checkpoint files train.py writes are checkpoint.py's.
"""
import ast
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import struct
import tarfile
import time
from collections import OrderedDict

import numpy as np
import torch
from webdataset.gopen import gopen, gopen_schemes

try:
    import fcntl
except ImportError:       # Windows: no POSIX locks; a shard's download is then not guarded against a second process
    fcntl = None

FORMAT, VERSION = 'nanodit-shards', 1
MAX_OPEN_SHARDS = 4       # open tarfiles cached per reader (per DataLoader worker)
PLAN_RNG, SHARD_RNG, FLIP_RNG = 0, 1, 2  # tags that keep the reader's random streams apart
FETCH_ATTEMPTS = 4        # tries of a remote file before FetchError ...
FETCH_BACKOFF_S = 1.0     # ... waiting 1, 2, 4 s between them (doubling)


# ----------------------------------------------------------------------------- format helpers

@functools.lru_cache(maxsize=256)
def _npy_header(header):
    """(dtype, fortran_order, shape) of a .npy header. np.load re-parses it with ast for every member,
    ~40% of the reader's time (BENCHMARKS.md); a split has only a few distinct headers."""
    d = ast.literal_eval(header.decode('latin1'))
    return np.dtype(d['descr']), d['fortran_order'], tuple(d['shape'])


def load_npy(data):
    """.npy bytes -> read-only array. Never unpickles; a short or foreign member raises ValueError."""
    if data[:6] != b'\x93NUMPY' or len(data) < 12:
        raise ValueError('not a .npy member')
    start = 10 if data[6] == 1 else 12
    (length,) = struct.unpack('<H' if data[6] == 1 else '<I', data[8:start])
    dtype, fortran, shape = _npy_header(bytes(data[start:start + length]))
    if dtype.hasobject:
        raise ValueError('.npy member holds Python objects')
    array = np.frombuffer(data, dtype, count=math.prod(shape), offset=start + length)
    return array.reshape(shape, order='F' if fortran else 'C')

def shard_members(tar):
    """[(key, {field: TarInfo}), ...] in key order, from the tar headers only. Tolerant: a damaged shard
    yields the members before the damage (reading a member cut short then fails on its own)."""
    infos = plain_tar_headers(tar.fileobj) if isinstance(tar.fileobj, (io.BufferedReader, io.FileIO)) else None
    # not a plain uncompressed ustar shard of regular files, or damaged: tarfile decides
    return group_members(tarfile_headers(tar) if infos is None else infos)


def tarfile_headers(tar):
    """The TarInfos of an open tar as tarfile's own parser reads them, up to the end or the first damage. tar.next()
    goes on from where tarfile stands (after the member that open() read), whatever read the file since."""
    infos = []
    while True:
        try:
            info = tar.next()
        except tarfile.TarError:
            return infos
        if info is None:
            return infos
        infos.append(info)


def group_members(infos):
    """TarInfos -> [(key, {field: TarInfo}), ...] in key order: webdataset's 'key.field' member names."""
    members = {}
    for info in infos:
        key, _, field = info.name.partition('.')
        members.setdefault(key, {})[field] = info
    return sorted(members.items())


USTAR_MAGICS = (b'ustar\x0000', b'ustar  \x00')   # POSIX ustar (what tarfile and webdataset write), GNU


def plain_tar_headers(f):
    """The TarInfos of an uncompressed tar whose members are all regular files with plain ustar headers (what
    write_shard and most webdataset writers produce), read with one seek and one 512-byte read per member.
    tarfile's own parser takes ~15 us per member, 3.5x this (BENCHMARKS.md round 17); a reader that opens each
    shard once per epoch pays that for every sample, every epoch. Most of what is left is the checksum's sum.
    None for anything else (pax or GNU long-name headers, other member types, base-256 sizes, a bad checksum, a cut
    header): tarfile reads those, with its own rules."""
    infos, offset = [], 0
    while True:
        f.seek(offset)
        h = f.read(512)
        if not h or h.count(0) == 512:                      # the end of the archive (or of the file, at a boundary)
            return infos
        if len(h) < 512 or h[257:265] not in USTAR_MAGICS or h[156:157] not in (b'0', b'\x00') or h[124] & 0x80:
            return None
        try:
            checksum = int(h[148:156].split(b'\x00', 1)[0].strip() or b'0', 8)
            size = int(h[124:136].split(b'\x00', 1)[0].strip() or b'0', 8)
        except ValueError:
            return None
        if checksum != 256 + sum(h[:148]) + sum(h[156:]):     # the checksum field itself counts as 8 spaces
            return None
        name = h[:100].split(b'\x00', 1)[0]
        if h[257:263] == b'ustar\x00' and h[345]:              # a POSIX name longer than 100 bytes has a prefix
            name = h[345:500].split(b'\x00', 1)[0] + b'/' + name
        if not name or name.endswith(b'/'):
            return None
        info = tarfile.TarInfo(name.decode('utf-8', 'surrogateescape'))
        info.size, info.offset, info.offset_data = size, offset, offset + 512
        infos.append(info)
        offset += 512 + (size + 511) // 512 * 512


def load_index(root):
    """Read and check root/index.json of a finished preparation; root may be remote (fetched once per process)."""
    path = data_url(root, 'index.json')
    if is_remote(root):
        if root not in _remote_index:
            _remote_index[root] = json.loads(fetch(path))
        index = _remote_index[root]
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path} not found: run `python prepare_data.py --out_dir={root}` first')
        with open(path) as f:
            index = json.load(f)
    if index.get('format') != FORMAT or index.get('version') != VERSION:
        raise ValueError(f"{path}: format {index.get('format')!r} version {index.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    if not index.get('complete'):
        raise ValueError(f'{path}: preparation did not finish; rerun the same prepare_data.py command to complete it')
    return index


def trained_buckets(index):
    """{name: [H, W]} of the buckets that hold training samples: a bucket that no image filled is in the index but
    is no size the model ever saw, so grids, evaluation and sampling keep to these."""
    return {name: hw for name, hw in index['buckets'].items() if index['splits']['train'].get(name)}

# ----------------------------------------------------------------------------- shards from anywhere

class FetchError(RuntimeError):
    """A remote file that could not be fetched after FETCH_ATTEMPTS tries (not a corrupt sample: the
    reader lets it end the run, which resumes once the storage is back)."""


_remote_index = {}        # data_dir -> its index, fetched once per process
_cache = {'dir': '', 'max_gb': 100.0}  # where remote shards go (configure_cache)


def is_remote(root):
    """True for URLs webdataset's gopen opens other than local files: 'pipe:', http(s)://, gs://, ..."""
    scheme = re.match(r'([a-z][a-z0-9+.-]+):', root)
    return bool(scheme) and scheme.group(1) in gopen_schemes and scheme.group(1) != 'file'


def data_url(root, rel):
    """Where `rel` ('index.json', 'train/28x28/shard-000000.tar') lives under data_dir `root`: a path, a
    URL prefix + '/' + rel, or the 'pipe:' command with {} replaced by rel."""
    if root.startswith('pipe:'):
        if '{}' not in root:
            raise ValueError(f"data_dir={root!r}: a 'pipe:' command needs {{}} where the file goes, "
                             "e.g. 'pipe:aws s3 cp s3://bucket/data/{} -' or 'pipe:curl -sf https://host/data/{}'")
        return root.replace('{}', rel)
    return root.rstrip('/') + '/' + rel if is_remote(root) else os.path.join(root, rel)


def fetch(url, path=None, size=None):
    """Read `url` whole through webdataset's gopen (http(s) via curl, 'pipe:' commands): into `path`
    (path.<pid>.tmp, then os.replace) or, without a path, return the bytes. A failure or a size other
    than `size` (the index's) is retried after FETCH_BACKOFF_S, doubling, then raises FetchError naming
    the URL; a wrong size on the last try is kept with a warning (its bad samples are then skipped)."""
    error = None
    for attempt in range(FETCH_ATTEMPTS):
        if attempt:
            time.sleep(FETCH_BACKOFF_S * 2 ** (attempt - 1))
        tmp = f'{path}.{os.getpid()}.tmp' if path else None
        try:
            with gopen(url, 'rb') as src:
                if path is None:
                    return src.read()
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(tmp, 'wb') as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            got = os.path.getsize(tmp)
            if size is not None and got != size:
                if attempt < FETCH_ATTEMPTS - 1:
                    raise OSError(f'got {got} bytes, index.json says {size}')
                print(f'warning: {url}: got {got} bytes, index.json says {size}; reading what arrived')
            os.replace(tmp, path)
            return path
        except (OSError, ValueError) as err:  # gopen's pipes raise OSError on a non-zero exit status
            error = err
            if tmp and os.path.exists(tmp):
                os.remove(tmp)
    raise FetchError(f'could not fetch {url} ({FETCH_ATTEMPTS} attempts): {error}')


def configure_cache(cache_dir='', max_gb=100.0):
    """Where remote shards are cached in this process (and the DataLoader workers it forks)."""
    _cache.update(dir=cache_dir, max_gb=max_gb)


def local_dir(root):
    """A local folder for files derived from the data (e.g. sample.py's eval_cache): root itself, or
    for remote data its folder in the shard cache."""
    if not is_remote(root):
        return root
    base = _cache['dir'] or os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'nanodit')
    slug = re.sub(r'[^A-Za-z0-9_.-]+', '_', root)[-60:].strip('_')
    key = hashlib.sha1(json.dumps([root, load_index(root)], sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(base, f'{slug}-{key}')  # a new index (data prepared again) gets a new folder


class ShardCache:
    """Remote shards fetched whole, sequentially, into local_dir(root), then read like local ones.

    Beyond max_gb (all data under the cache's base folder), the least recently used shards are deleted,
    never those this reader holds open. Recency is the file's mtime, touched on every open, so several
    processes share one cache; deleting a file another process has open is safe on POSIX."""

    def __init__(self, root, cache_dir, max_gb):
        self.root, self.max_bytes = root, max_gb * 1e9
        configure_cache(cache_dir, max_gb)
        self.dir = local_dir(root)
        self.base = os.path.dirname(self.dir)

    def open(self, entry, in_use=()):
        """The shard of an index entry as an open local file, fetched first if not cached whole."""
        path = os.path.join(self.dir, entry['path'])  # only ever complete: fetch renames a whole file into place
        for _ in range(2):  # another process may evict it between the check and the open
            if not os.path.isfile(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + '.lock', 'w') as lock:  # one download per shard among this machine's processes
                    if fcntl is not None:
                        fcntl.flock(lock, fcntl.LOCK_EX)
                    if not os.path.isfile(path):
                        fetch(data_url(self.root, entry['path']), path, entry.get('bytes'))
                        self.evict(keep={path, *in_use})
            try:
                f = open(path, 'rb')
                os.utime(path)
                return f
            except FileNotFoundError:
                continue
        raise FetchError(f'{path}: evicted as soon as fetched; raise cache_max_gb above {self.max_bytes / 1e9:g}')

    def evict(self, keep):
        files = []
        for folder, _, names in os.walk(self.base):
            for name in names:
                if name.endswith('.tar'):
                    full = os.path.join(folder, name)
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:
                        continue
                    files.append((st.st_mtime, st.st_size, full))
        total = sum(size for _, size, _ in files)
        for _, size, full in sorted(files):
            if total <= self.max_bytes:
                break
            if full not in keep:
                try:
                    os.remove(full)
                    total -= size
                except FileNotFoundError:
                    pass


# ----------------------------------------------------------------------------- reader

def epoch_plan(index, split, batch_size, epoch, seed):
    """The epoch's global batches: [(bucket, [(shard_idx, sample_idx), ...] * batch_size), ...].

    Per bucket: shards in a random order, samples shuffled within each shard, cut into full batches.
    Buckets are then interleaved by a random permutation of their batch labels, so every batch holds one
    resolution and buckets are drawn in proportion to their size.
    """
    names = sorted(index['splits'][split])
    rng = np.random.default_rng([seed, PLAN_RNG, epoch])
    batches = {}
    for b, name in enumerate(names):
        shards, order = index['splits'][split][name], []
        for s in rng.permutation(len(shards)).tolist():
            positions = np.random.default_rng([seed, SHARD_RNG, epoch, b, s]).permutation(shards[s]['count'])
            order += [(s, p) for p in positions.tolist()]
        batches[name] = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    labels = [name for name in names for _ in batches[name]]
    taken, plan = dict.fromkeys(names, 0), []
    for i in rng.permutation(len(labels)).tolist():
        plan.append((labels[i], batches[labels[i]][taken[labels[i]]]))
        taken[labels[i]] += 1
    return plan


def member_bytes(tar, info):
    """The bytes of a regular member of an open tar, read at its offset: what tar.extractfile(info).read() gives,
    without the file object it builds: read_batch took 7.1 instead of 14.8 us per 28x28 sample (BENCHMARKS.md round
    13). A member cut short by a truncated shard raises EOFError, as extractfile's read does."""
    if not info.isreg() or info.sparse is not None:
        return tar.extractfile(info).read()
    tar.fileobj.seek(info.offset_data)
    data = tar.fileobj.read(info.size)
    if len(data) != info.size:
        raise EOFError(f"{tar.name}: member {info.name} ends after {len(data)} of {info.size} bytes")
    return data


class ShardReader:
    """Reads samples by (split, bucket, shard, position), only their bytes, into collated batches.
    Remote shards come through a ShardCache (cache = (cache_dir, cache_max_gb))."""

    def __init__(self, root, index, text_max_length=None, cache=None):
        self.root, self.index = root, index
        self.text_max_length = text_max_length or (index['text_encoder'] or {}).get('max_length')
        self.remote = ShardCache(root, *(cache or (_cache['dir'], _cache['max_gb']))) if is_remote(root) else None
        self.cache = OrderedDict()  # path -> (file or None, TarFile or None, [(key, {field: TarInfo}), ...]), least recent first

    def shard(self, entry):
        path = entry['path']
        if path not in self.cache:
            if len(self.cache) >= MAX_OPEN_SHARDS:
                f, tar, _ = self.cache.popitem(last=False)[1]
                for handle in (tar, f):
                    if handle is not None:
                        handle.close()
            f = self.remote.open(entry, in_use={f.name for f, _, _ in self.cache.values() if f}) if self.remote else None
            try:  # a FetchError (remote storage down) is not caught: it ends the run, which then resumes
                tar = tarfile.open(fileobj=f) if f else tarfile.open(os.path.join(self.root, path))
                self.cache[path] = (f, tar, shard_members(tar))
            except (OSError, tarfile.TarError):
                self.cache[path] = (f, None, [])  # unreadable shard: all its samples come out invalid
        self.cache.move_to_end(path)
        return self.cache[path][1:]

    def read_batch(self, split, bucket, slots, flips):
        index, B = self.index, len(slots)
        d = index['vae']['downsample'] if index['vae'] else 1
        height, width = index['buckets'][bucket]
        batch = {'x': np.zeros((B, index['channels'], height // d, width // d), np.float32), 'valid': np.zeros(B, bool)}
        if index['num_classes']:
            batch['y'] = np.zeros(B, np.int64)
        if index.get('pair_labels'):  # pairs of digits: y is the left one's class, y_right the right one's (-1: a single)
            batch['y_right'] = np.zeros(B, np.int64)
        if index['text_encoder']:
            batch['text'] = np.zeros((B, self.text_max_length, index['text_encoder']['dim']), np.float32)
            batch['text_mask'] = np.zeros((B, self.text_max_length), bool)
        if index['image_encoder']:
            batch['image_emb'] = np.zeros((B, index['image_encoder']['dim']), np.float32)
        keys, txts, templates, n_bad = [''] * B, [''] * B, [''] * B, 0
        for i, ((s, p), flip) in enumerate(zip(slots, flips)):
            try:
                tar, members = self.shard(index['splits'][split][bucket][s])
                key, fields = members[p]
                read = lambda field: member_bytes(tar, fields[field])
                load = lambda field: load_npy(read(field))
                sample = {'x': load('x_flip.npy' if flip else 'x.npy')}
                if 'y' in batch:
                    sample['y'] = int(read('cls'))
                if 'y_right' in batch:
                    sample['y_right'] = int(read('cls_right')) if 'cls_right' in fields else -1
                if 'text' in batch:
                    sample['text'] = load('text_flip.npy' if flip and 'text_flip.npy' in fields else 'text.npy')[:self.text_max_length]
                if 'image_emb' in batch:
                    sample['image_emb'] = load('image_emb_flip.npy' if flip else 'image_emb.npy')
                txt = read('txt_flip' if flip else 'txt').decode('utf-8')
                template = read('template').decode() if 'template' in fields else ''  # source='mnist-captions'
                for name, value in sample.items():
                    if name == 'text':
                        batch['text'][i, :len(value)] = value
                        batch['text_mask'][i, :len(value)] = True
                    else:
                        batch[name][i] = value
                keys[i], txts[i], templates[i], batch['valid'][i] = key, txt, template, True
            except (OSError, ValueError, KeyError, IndexError, EOFError, tarfile.TarError, UnicodeDecodeError):
                n_bad += 1  # a corrupt sample costs its slot, never the run: zeros, valid=False
                for name in batch:
                    batch[name][i] = 0
        out = {name: torch.from_numpy(value) for name, value in batch.items()}
        return {**out, 'bucket': bucket, 'n_bad': n_bad, 'key': keys, 'txt': txts, 'template': templates}


class ShardStream(torch.utils.data.IterableDataset):
    """Infinite stream of collated batches of one rank; use DataLoader(stream, batch_size=None).

    The epochs' plans, concatenated, form one world-size-independent sequence of global batches
    (P = len(epoch_plan) per epoch). The rank's n-th batch, counting from `start` (the batches it
    already consumed: that is how resume works), is global batch g = n * W + rank, from epoch g // P.
    So ranks x accumulation steps see the same global batches whatever the split, every rank gets
    the same number of batches (the stream never ends, and an epoch may end mid-step), and each
    epoch's samples are read exactly once between them. Each sample also carries `sid` = epoch * N
    + its position in the split; all per-sample randomness (flips here, timesteps and noise in
    train.py) is keyed by it, so it does not depend on how global batches are split either.
    `draws`: None, or a picklable callable (sid (B,), sample shape) -> {name: (B, ...) tensor}, whose
    tensors join each batch (train.py's model.TrainingDraws: timesteps, noise, dropout).
    """

    def __init__(self, root, split='train', batch_size=8, rank=0, world_size=1, seed=0, start=0,
                 flip_prob=0.0, text_max_length=None, draws=None):
        self.index = load_index(root)
        self.cache = (_cache['dir'], _cache['max_gb'])  # kept for DataLoader workers that are spawned, not forked
        if split not in self.index['splits'] or not self.index['splits'][split]:
            raise ValueError(f"{root}: split {split!r} has no shards (splits: {sorted(k for k, v in self.index['splits'].items() if v)})")
        if flip_prob > 0 and not self.index['has_flip']:
            raise ValueError(f'flip_prob={flip_prob} but {root} was prepared without flipped views (has_flip false)')
        self.root, self.split, self.batch_size, self.rank, self.world_size = root, split, batch_size, rank, world_size
        self.seed, self.start, self.flip_prob, self.text_max_length = seed, start, flip_prob, text_max_length
        self.draws = draws
        self.batches_per_epoch = len(epoch_plan(self.index, split, batch_size, 0, seed))  # the same every epoch
        self.first_id, self.n_samples = {}, 0   # bucket -> id of each shard's first sample
        for bucket, shards in sorted(self.index['splits'][split].items()):
            self.first_id[bucket] = []
            for shard in shards:
                self.first_id[bucket].append(self.n_samples)
                self.n_samples += shard['count']
        if self.batches_per_epoch == 0:
            counts = {b: sum(s['count'] for s in lst) for b, lst in self.index['splits'][split].items()}
            raise ValueError(f'{root} split {split!r} has too few samples per bucket {counts} for one full batch of '
                             f'batch_size {batch_size}')

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = ShardReader(self.root, self.index, self.text_max_length, self.cache)
        P, W = self.batches_per_epoch, self.world_size
        plan, plan_epoch = None, -1
        n = self.start + worker  # DataLoader takes workers round-robin, so batches arrive as n = start, start+1, ...
        while True:
            g = n * W + self.rank
            epoch = g // P
            if epoch != plan_epoch:
                plan, plan_epoch = epoch_plan(self.index, self.split, self.batch_size, epoch, self.seed), epoch
            bucket, slots = plan[g % P]
            sid = [epoch * self.n_samples + self.first_id[bucket][s] + p for s, p in slots]
            # a generator per sample costs ~20 us: none where nothing is flipped
            flips = ([np.random.default_rng([self.seed, FLIP_RNG, i]).random() < self.flip_prob for i in sid]
                     if self.flip_prob > 0 else [False] * len(sid))
            batch = {**reader.read_batch(self.split, bucket, slots, flips), 'g': g, 'epoch': epoch,
                     'sid': torch.tensor(sid)}
            if self.draws is not None:
                batch.update(self.draws(batch['sid'], batch['x'].shape[1:]))
            yield batch
            n += workers


def _ignore_sigint(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl+C is the main process's to handle


def loader(stream, num_workers, pin_memory):
    """A DataLoader over a ShardStream (its batches come collated): num_workers processes, which leave Ctrl+C to the
    main process and stay up across epochs."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       worker_init_fn=_ignore_sigint, persistent_workers=num_workers > 0)


def to_device(batch, device):
    """A batch's tensors on the device (pinned memory copies without waiting); its other values as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def shard_slots(shards):
    """(shard, position) of every sample in a bucket's shards, in stored order: what read_batch takes."""
    return [(s, p) for s, shard in enumerate(shards) for p in range(shard['count'])]


def image_emb_stats(root, max_examples=10_000):
    """Mean and std (float64) of each feature of the train split's image embeddings, from up to max_examples taken
    at an even stride through every bucket's stored order: the model's image_mean and image_std."""
    index = load_index(root)
    reader, train = ShardReader(root, index), index['splits']['train']
    stride = max(1, -(-sum(s['count'] for shards in train.values() for s in shards) // max_examples))
    embs = []
    for name, shards in sorted(train.items()):
        slots = shard_slots(shards)[::stride]
        for part in (slots[i:i + 500] for i in range(0, len(slots), 500)):
            batch = reader.read_batch('train', name, part, [False] * len(part))
            embs.append(batch['image_emb'][batch['valid']].double())
    emb = torch.cat(embs)
    std = emb.std(0, correction=0)   # floored: a feature constant over the data would scale a new image's by 1 / 0
    return emb.mean(0), std.clamp_min(1e-2 * std.mean().item() + 1e-6)


def iterate_split(root, split='val', batch_size=8, text_max_length=None, bucket=None):
    """One pass over every sample of a split in a fixed order (no shuffle, no flip), for validation.

    Buckets in sorted order (or only `bucket`), shards and samples in stored order; the last batch of a
    bucket may be short. Each batch carries 'g' (its number) and 'start' (the split-order index of its first
    sample).
    """
    index = load_index(root)
    reader = ShardReader(root, index, text_max_length)
    g = start = 0
    for name, shards in sorted(index['splits'].get(split, {}).items()):
        if bucket is not None and name != bucket:
            start += sum(shard['count'] for shard in shards)
            continue
        slots = shard_slots(shards)
        for i in range(0, len(slots), batch_size):
            part = slots[i:i + batch_size]
            yield {**reader.read_batch(split, name, part, [False] * len(part)), 'g': g, 'start': start, 'epoch': 0}
            g += 1
            start += len(part)
