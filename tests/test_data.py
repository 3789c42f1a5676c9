"""data.py: the stream (DDP equivalence, loader workers, resume, per-sample draws), errors, the tar header
reader, corrupt shards, and one ordered pass over a split. Remote data_dirs: test_data_remote.py."""
import io
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import data as dt  # noqa: E402  (not `import data`: the tests below name the shard's bytes `data`)
import prepare_data as pd  # noqa: E402
from test_prepare_data import npy, read_shards  # noqa: E402


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """MNIST with flipped views forced on: 48 train samples in shards of 10, 12 val."""
    out = str(tmp_path_factory.mktemp('digits') / 'out')
    pd.prepare(out_dir=out, max_examples=60, val_examples=12, shard_size=10, flip='true')
    return out




def test_stream_ddp_equivalence_workers_and_resume(digits):
    B = 4  # 48 train samples -> 12 global batches per epoch, 6 per rank with 2 ranks
    one = dt.ShardStream(digits, batch_size=B, flip_prob=0.5, seed=1)
    assert one.batches_per_epoch == 12
    it = iter(one)
    world1 = [next(it) for _ in range(24)]  # two epochs
    assert [b['g'] for b in world1] == list(range(24)) and [b['epoch'] for b in world1] == [0] * 12 + [1] * 12

    def loader(rank, start=0):
        stream = dt.ShardStream(digits, batch_size=B, rank=rank, world_size=2, flip_prob=0.5, seed=1, start=start)
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))

    ranks = []
    for rank in (0, 1):
        it = loader(rank)
        ranks.append([next(it) for _ in range(12)])
    for rank, batches in enumerate(ranks):
        for i, b in enumerate(batches):
            ref = world1[2 * i + rank]
            assert b['g'] == ref['g'] == 2 * i + rank and b['key'] == ref['key']
            assert torch.equal(b['x'], ref['x']) and torch.equal(b['y'], ref['y'])
    epoch0 = [k for r in ranks for b in r[:6] for k in b['key']]
    assert sorted(epoch0) == [f'{i:09d}' for i in range(48)]  # every sample exactly once
    epoch1 = [k for r in ranks for b in r[6:] for k in b['key']]
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0  # reshuffled
    it = loader(1, start=5)
    for ref in ranks[1][5:]:
        b = next(it)
        assert b['g'] == ref['g'] and b['key'] == ref['key'] and torch.equal(b['x'], ref['x'])

    # flips come from the stored views: each x is the stored image or its mirror, and both occur
    plain = iter(dt.ShardStream(digits, batch_size=B, seed=1))
    mirrored = 0
    for ref in world1[:12]:
        b = next(plain)
        assert b['key'] == ref['key']
        same = (b['x'] == ref['x']).flatten(1).all(1)
        mirror = (b['x'].flip(-1) == ref['x']).flatten(1).all(1)
        assert (same | mirror).all()
        mirrored += int((mirror & ~same).sum())
    assert 0 < mirrored < 48


def test_training_draws_are_keyed_by_sample_in_any_rank_worker_or_spawned_process(digits):
    """train.py's timesteps, noise and dropout draws come with each batch (model.TrainingDraws): per sample id,
    the same on one rank as on two ranks with loader processes (forked or spawned) and after a resume."""
    from model import TrainingDraws, shift_time
    B, draws = 4, TrainingDraws(seed=1, t_shift=1.5)
    it = iter(dt.ShardStream(digits, batch_size=B, seed=1, draws=draws))
    world1 = [next(it) for _ in range(16)]                 # into the second epoch: 48 samples, 12 batches each
    by_sid = {}
    for b in world1:
        assert b['t'].shape == (B,) and b['u'].shape == (B,) and b['noise'].shape == b['x'].shape
        for i, s in enumerate(b['sid'].tolist()):
            by_sid[s] = (b['t'][i], b['noise'][i], b['u'][i])
    assert len(by_sid) == 64
    ts = torch.stack([v[0] for v in by_sid.values()])
    assert ((ts > 0) & (ts < 1)).all() and ts.unique().numel() == 64
    again = min(s for s in by_sid if s >= 48)              # an image of epoch 0 again in epoch 1: a new draw
    assert not torch.equal(by_sid[again - 48][1], by_sid[again][1])

    def check(batches):
        for b in batches:
            for i, s in enumerate(b['sid'].tolist()):
                t, noise, u = by_sid[s]
                assert b['t'][i] == t and torch.equal(b['noise'][i], noise) and b['u'][i] == u

    for rank, ctx in ((0, None), (1, 'spawn')):
        stream = dt.ShardStream(digits, batch_size=B, rank=rank, world_size=2, seed=1, start=2, draws=draws)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2 if ctx is None else 1,
                                             multiprocessing_context=ctx)
        check(b for _, b in zip(range(6), loader))
    # the settings take effect: the shift maps the unshifted draws, uniform t is another draw, a seed changes all
    plain = next(iter(dt.ShardStream(digits, batch_size=B, seed=1, draws=TrainingDraws(seed=1))))
    assert torch.allclose(shift_time(plain['t'], 1.5), world1[0]['t']) and torch.equal(plain['noise'], world1[0]['noise'])
    uniform = next(iter(dt.ShardStream(digits, batch_size=B, seed=1, draws=TrainingDraws(1, 'uniform'))))
    assert torch.equal(uniform['noise'], plain['noise']) and not torch.allclose(uniform['t'], plain['t'])
    other = next(iter(dt.ShardStream(digits, batch_size=B, seed=1, draws=TrainingDraws(seed=2))))
    assert not torch.allclose(other['noise'], plain['noise'])
    with pytest.raises(ValueError, match="t_sampling='beta'"):
        TrainingDraws(t_sampling='beta')


def test_stream_errors(digits, tmp_path):
    with pytest.raises(ValueError, match='for one full batch of batch_size 64'):
        dt.ShardStream(digits, batch_size=64)
    # 12 global batches an epoch over 5 ranks: epochs end mid-step, yet the ranks' batches, merged in
    # g order, are epoch after epoch of every sample exactly once, and every rank keeps getting batches
    streams = [iter(dt.ShardStream(digits, batch_size=4, rank=r, world_size=5)) for r in range(5)]
    merged = sorted((b for s in streams for b in (next(s) for _ in range(6))), key=lambda b: b['g'])
    assert [b['g'] for b in merged] == list(range(30))
    for e in range(2):
        keys = [k for b in merged[12 * e:12 * (e + 1)] for k in b['key']]
        assert sorted(keys) == [f'{i:09d}' for i in range(48)] and {b['epoch'] for b in merged[12 * e:12 * (e + 1)]} == {e}
    plain = str(tmp_path / 'plain')
    pd.prepare(out_dir=plain, max_examples=20)
    with pytest.raises(ValueError, match='has_flip'):
        dt.ShardStream(plain, flip_prob=0.5)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'nothing')):
        dt.load_index(str(tmp_path / 'nothing'))


def test_member_bytes_reads_what_extractfile_reads_and_refuses_a_cut_member(digits, tmp_path):
    index = dt.load_index(digits)
    shard = os.path.join(digits, index['splits']['train']['28x28'][0]['path'])
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.isreg()]
        assert len(members) > 10
        assert all(dt.member_bytes(tar, m) == tar.extractfile(m).read() for m in members)
    cut = tmp_path / 'cut.tar'
    data = Path(shard).read_bytes()
    last = members[-1]
    cut.write_bytes(data[:last.offset_data + last.size // 2])      # the last member loses half its bytes
    with tarfile.open(cut) as tar:     # reads the first header only; `last` comes from the whole shard's listing
        with pytest.raises(EOFError, match=re.escape(last.name)):
            dt.member_bytes(tar, last)
        with pytest.raises((EOFError, tarfile.ReadError)):       # the old path's errors; ShardReader catches both
            tar.extractfile(last).read()


def tarfile_members(path):
    """shard_members as tarfile's own parser reads them: [(key, [(field, name, data offset, size, isreg)])]."""
    with tarfile.open(path) as tar:
        return listing(dt.group_members(dt.tarfile_headers(tar)))


def listing(members):
    return [(key, sorted((f, i.name, i.offset_data, i.size, i.isreg()) for f, i in fields.items()))
            for key, fields in members]


def test_shard_headers_read_fast_agree_with_tarfile_and_leave_other_tars_to_it(digits, tmp_path):
    index = dt.load_index(digits)
    shard = os.path.join(digits, index['splits']['train']['28x28'][0]['path'])
    with open(shard, 'rb') as f:
        assert dt.plain_tar_headers(f) is not None                 # write_shard's shards take the fast path
    with tarfile.open(shard) as tar:
        assert listing(dt.shard_members(tar)) == tarfile_members(shard)
    # tars it leaves to tarfile: pax and GNU long names, a non-ASCII name (pax), a directory member; a ustar
    # name with a prefix it reads itself
    cases = [(tarfile.PAX_FORMAT, ['a' * 120 + '.x.npy'], None), (tarfile.GNU_FORMAT, ['b' * 120 + '.cls'], None),
             (tarfile.PAX_FORMAT, ['\u00e9t\u00e9.txt'], None), (tarfile.USTAR_FORMAT, ['d/'], None),
             (tarfile.USTAR_FORMAT, ['p' * 90 + '/' + 'q' * 60 + '.txt'], 'fast')]
    for i, (fmt, names, path) in enumerate(cases):
        tar_path = tmp_path / f'case{i}.tar'
        with tarfile.open(tar_path, 'w', format=fmt) as tar:
            for name in ['k1.cls', *names, 'k2.txt']:
                info = tarfile.TarInfo(name)
                if name.endswith('/'):
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                else:
                    info.size = len(name.encode()) * 3
                    tar.addfile(info, io.BytesIO(name.encode() * 3))
        with open(tar_path, 'rb') as f:
            assert (dt.plain_tar_headers(f) is not None) == (path == 'fast'), (fmt, names)
        with tarfile.open(tar_path) as tar:
            assert listing(dt.shard_members(tar)) == tarfile_members(tar_path), (fmt, names)
    # damaged shards: cut inside a header, inside a member, and a header with a wrong checksum
    data = Path(shard).read_bytes()
    with open(shard, 'rb') as f:
        tenth = dt.plain_tar_headers(f)[10]
    bad = bytearray(data)
    bad[tenth.offset + 5] ^= 0x20
    for i, damaged in enumerate([data[:tenth.offset + 100], data[:tenth.offset_data + 10], bytes(bad)]):
        path = tmp_path / f'damaged{i}.tar'
        path.write_bytes(damaged)
        with tarfile.open(path) as tar:
            got = listing(dt.shard_members(tar))
        assert got == tarfile_members(path) and 0 < len(got) <= 4, i   # the members before the damage


def test_corrupt_shards_give_invalid_slots(digits, tmp_path):
    root = str(tmp_path / 'copy')
    shutil.copytree(digits, root)
    index = dt.load_index(root)
    shards = [os.path.join(root, s['path']) for s in index['splits']['train']['28x28']]
    with open(shards[1], 'r+b') as f:  # cut mid-way through a member
        f.truncate(os.path.getsize(shards[1]) // 2 + 700)
    Path(shards[2]).write_bytes(np.random.default_rng(0).bytes(5000))  # not a tar at all
    n_bad = 0
    stream = iter(dt.ShardStream(root, batch_size=4))
    for _ in range(12):
        b = next(stream)
        assert b['x'].shape == (4, 1, 28, 28)
        assert int((~b['valid']).sum()) == b['n_bad']
        assert (b['x'][~b['valid']] == 0).all() and (b['y'][~b['valid']] == 0).all()
        n_bad += b['n_bad']
    assert 10 < n_bad < 20  # all of the garbage shard, part of the truncated one
    val = list(dt.iterate_split(root, 'val', batch_size=5))
    assert sum(b['n_bad'] for b in val) == 0


def test_iterate_split(digits):
    batches = list(dt.iterate_split(digits, 'val', batch_size=5))
    assert [len(b['key']) for b in batches] == [5, 5, 2] and all(b['valid'].all() for b in batches)
    assert [k for b in batches for k in b['key']] == [f'{i:09d}' for i in range(12)]
    again = list(dt.iterate_split(digits, 'val', batch_size=5))
    assert all(torch.equal(a['x'], b['x']) for a, b in zip(batches, again))
    samples, _ = read_shards(digits, 'val')
    np.testing.assert_array_equal(batches[0]['x'][0].numpy(), npy(samples['000000000']['x.npy']).astype(np.float32))
