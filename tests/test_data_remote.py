"""Shards from anywhere (data.py's URL layer on webdataset's gopen): an http.server on 127.0.0.1 and a
`pipe:cat` command train the same weights as the local folder, resume bitwise, fetch failures are retried
then named, the cache stays within its size, and plain webdataset reads the shards."""
import functools
import http.server
import os
import threading

import numpy as np
import pytest
import torch
import webdataset as wds

import data as dt  # not `import data`: the fixture `data` below is the prepared folder
import prepare_data as pd
from conftest import TINY, run
from test_train import assert_same_state, ckpts, load

SHARD = 50  # samples per shard: 4 train shards and 1 val shard, so reading spans several fetches


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('remote') / 'data')
    pd.prepare(out_dir=out, max_examples=220, val_examples=20, shard_size=SHARD, flip='true', progress_interval=0)
    return out


class Quiet(http.server.SimpleHTTPRequestHandler):
    requests = []     # paths asked for, by every handler

    def log_request(self, code='-', size='-'):   # once per request, served or not
        Quiet.requests.append(self.path)

    def log_message(self, *args):
        pass


@pytest.fixture(scope='module')
def server(data):
    """http://127.0.0.1:<port>/ serving the prepared folder, from a thread of this process."""
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=data))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_port}'
    httpd.shutdown()
    thread.join()


def shard_bytes(data):
    return sum(s['bytes'] for lst in dt.load_index(data)['splits']['train'].values() for s in lst)


def test_plain_webdataset_reads_the_shards(data):
    index = dt.load_index(data)
    urls = [os.path.join(data, s['path']) for s in index['splits']['train']['28x28']]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == sum(s['count'] for s in index['splits']['train']['28x28']) == 200
    first = next(dt.iterate_split(data, 'train', batch_size=4))
    for i, s in enumerate(samples[:4]):
        assert s['__key__'] == first['key'][i] == f'{i:09d}'
        assert isinstance(s['x.npy'], np.ndarray) and s['x.npy'].dtype == np.float16 and s['x.npy'].shape == (1, 28, 28)
        np.testing.assert_array_equal(s['x.npy'].astype(np.float32), first['x'][i].numpy())
        assert isinstance(s['cls'], int) and s['cls'] == int(first['y'][i])
        assert isinstance(s['txt'], str) and s['txt'] == first['txt'][i]


def test_http_and_pipe_train_the_same_weights_and_resume(tmp_path, data, server):
    """The local folder, http:// (2 workers, a SIGTERM at step 4 and a resume, validation reading val
    over http, a cache too small for all shards) and pipe:cat give bitwise-equal model, EMA and optimizer."""
    common = [*TINY, '--max_steps=8', '--ckpt_interval=100', '--batch_size=16', '--val_interval=4', '--flip_prob=0.5']
    run('train.py', *common, f'--data_dir={data}', f'--out_dir={tmp_path / "local"}')
    small = 2.5 * shard_bytes(data) / 4 / 1e9   # room for about 2 of the 4 train shards
    http_args = [*common, f'--data_dir={server}/', f'--out_dir={tmp_path / "http"}', '--num_workers=2',
                 f'--cache_dir={tmp_path / "cache"}', f'--cache_max_gb={small}']
    first = run('train.py', *http_args, env={'NANODIT_INJECT': 'sigterm@3'})
    assert 'SIGTERM received' in first.stdout and ckpts(tmp_path / 'http') == ['ckpt-00000004.pt']
    second = run('train.py', *http_args)
    assert 'at step 4' in second.stdout
    cached = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / 'cache') for f in fs if f.endswith('.tar')]
    assert 0 < sum(os.path.getsize(p) for p in cached) <= small * 1e9   # evicted down to the limit
    run('train.py', *common, f'--data_dir=pipe:cat {data}/{{}}', f'--out_dir={tmp_path / "pipe"}',
        f'--cache_dir={tmp_path / "cache"}')
    local = load(tmp_path / 'local' / 'ckpt-00000008.pt')
    for other in ('http', 'pipe'):
        b = load(tmp_path / other / 'ckpt-00000008.pt')
        assert_same_state(local, b, exact=True)
        assert b['micro_batches'] == local['micro_batches'] == 8
    assert any(r.endswith('/train/28x28/shard-000000.tar') for r in Quiet.requests)
    folders = sorted(os.listdir(tmp_path / 'cache'))
    assert len(folders) == 2 and folders[0].startswith('http_127.0.0.1_') and folders[1].startswith('pipe_cat_')


def test_cache_evicts_least_recently_used_shards(tmp_path, data, server, monkeypatch):
    monkeypatch.setattr(dt, 'MAX_OPEN_SHARDS', 1)   # the reader holds one shard open: the others may go
    one = shard_bytes(data) / 4
    dt.configure_cache(str(tmp_path / 'c'), 2.5 * one / 1e9)
    try:
        remote = list(dt.iterate_split(server, 'train', batch_size=SHARD))   # shard after shard
        local = list(dt.iterate_split(data, 'train', batch_size=SHARD))
    finally:
        dt.configure_cache()
    assert [b['key'] for b in remote] == [b['key'] for b in local]
    assert all(torch.equal(a['x'], b['x']) and a['n_bad'] == 0 for a, b in zip(remote, local))
    left = sorted(f for _, _, fs in os.walk(tmp_path / 'c') for f in fs if f.endswith('.tar'))
    assert left == ['shard-000002.tar', 'shard-000003.tar']   # the two most recent; never a temporary file


def test_a_failing_fetch_is_retried_then_named(tmp_path, data, server, monkeypatch):
    monkeypatch.setattr(dt, 'FETCH_BACKOFF_S', 0.01)
    with pytest.raises(dt.FetchError, match=f'{server}/missing/index.json .4 attempts'):
        dt.load_index(f'{server}/missing')
    assert Quiet.requests.count('/missing/index.json') == 4
    # a command that fails twice, then works: the third attempt reads the data
    counter = tmp_path / 'tries'
    flaky = (f"pipe:n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}; "
             f"test $n -ge 2 && cat {data}/{{}}")
    assert dt.load_index(flaky)['splits'] == dt.load_index(data)['splits'] and counter.read_text().strip() == '3'
    with pytest.raises(ValueError, match="needs \\{\\} where the file goes"):
        dt.load_index(f'pipe:cat {data}/index.json')
    # a shard that cannot be fetched ends the read naming its URL: it is not a corrupt sample
    only_index = f'pipe:case {{}} in index.json) cat {data}/index.json;; *) exit 3;; esac'
    dt.configure_cache(str(tmp_path / 'c'))
    try:
        with pytest.raises(dt.FetchError, match=r'pipe:case train/28x28/shard-00000\d.tar in .*\(4 attempts\)'):
            next(iter(dt.ShardStream(only_index, batch_size=4)))
    finally:
        dt.configure_cache()
