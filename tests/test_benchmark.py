"""benchmark.py: its pieces run at tiny sizes and measure what they claim (the numbers live in BENCHMARKS.md)."""
import re
import subprocess
import time

import pytest
import torch

import benchmark
from data import ShardStream
from sample import velocity_evals


def test_median_times_reports_each_variant_and_keeps_their_ratio():
    t = benchmark.median_times({"short": lambda: time.sleep(0.01), "long": lambda: time.sleep(0.03)}, 3, 1)
    assert set(t) == {"short", "long"}
    assert 0.009 < t["short"] < t["long"]
    assert 1.5 < t["long"] / t["short"] < 5


def test_recipes_resolve_like_train_py():
    mnist, small = benchmark.recipe("mnist"), benchmark.recipe("small")
    assert (mnist["patch_size"], mnist["hidden"], mnist["depth"], mnist["heads"], mnist["batch_size"]) == (4, 96, 4, 4, 16)
    assert mnist["mlp_ratio"] == 3.0
    assert (small["patch_size"], small["hidden"], small["depth"], small["batch_size"]) == (2, 384, 12, 8)
    assert small["mlp_ratio"] == 4.0 and small["attn_impl"] == "auto"   # train.py defaults the recipe keeps


def test_train_step_updates_the_weights_in_both_dtypes():
    cfg = {**benchmark.recipe("mnist"), "depth": 2, "hidden": 32, "heads": 2}
    for dtype in benchmark.DTYPES.values():
        model = benchmark.build_model(cfg, 1, 10)
        out, gate = model.out.weight.detach().clone(), model.blocks[-1].adaLN[-1].weight.detach().clone()
        step = benchmark.train_step_fn(model, 4, (1, 8, 8), dtype)
        for _ in range(3):   # adaLN-Zero: the output layer moves first, then the gates behind it
            step()
        assert not torch.equal(out, model.out.weight) and not torch.equal(gate, model.blocks[-1].adaLN[-1].weight)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_build_model_takes_every_model_field_of_the_recipe_and_an_older_model_py():
    cfg = {**benchmark.recipe("mnist"), "depth": 2, "hidden": 32, "heads": 2, "qk_norm": False}
    model = benchmark.build_model(cfg, 1, 10)
    assert model.cfg.prediction == cfg["prediction"] and not model.cfg.qk_norm
    if subprocess.run(["git", "-C", benchmark.HERE, "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout: compare_rev has no history to read")
    old = benchmark.model_at("HEAD")                       # model.py as committed, imported on its own
    assert old.__name__ == "model_at_rev" and old.DiT is not benchmark.DiT
    model = benchmark.build_model(cfg, 1, 10, model_module=old)
    assert type(model) is old.DiT
    benchmark.train_step_fn(model, 2, (1, 8, 8), torch.float32)()
    with pytest.raises(SystemExit, match="compare_rev='no-such-rev'"):
        benchmark.model_at("no-such-rev")


def test_attention_variants_and_sampling_run():
    for dtype in benchmark.DTYPES.values():
        for impl in benchmark.IMPLS:
            benchmark.attention_fn(impl, dtype, B=1, heads=2, N=8, d=8)()
    cfg = {**benchmark.recipe("small"), "depth": 1, "hidden": 32, "heads": 2}
    model = benchmark.build_model(cfg, 4, 10)
    benchmark.sample_fn(model, 2, (4, 8, 8), torch.float32, steps=2)()
    benchmark.forward_fn(model, 2, (4, 8, 8), torch.bfloat16)()


def test_synthetic_latent_shards_have_the_small_recipe_shapes(tmp_path):
    root = benchmark.write_latent_shards(str(tmp_path), 24, shard_size=10)
    batch = next(iter(ShardStream(root, "train", batch_size=8)))
    assert batch["x"].shape == (8, 4, 32, 32) and batch["text"].shape == (8, 77, 384)
    assert batch["valid"].all() and batch["text_mask"].all() and batch["n_bad"] == 0
    rate = benchmark.loader_rate(root, 0, 2)
    assert 10 < rate < 1e7   # samples/s


def test_bf16_is_measured_only_where_native_unless_forced(monkeypatch):
    # the one function that decides "native" (model.bf16_is_native, tested on its own in test_model.py) is
    # patched, not the CPU facts beneath it: on a CPU without AVX-512 the capability it also reads says AVX2
    for native in (False, True):
        monkeypatch.setattr(benchmark, "bf16_is_native", lambda device_type, native=native: native)
        for setting, want in (("auto", native), ("true", True), ("false", False)):
            monkeypatch.setattr(benchmark, "bf16", setting)
            assert set(benchmark.measured_dtypes()) == ({"fp32", "bf16"} if want else {"fp32"})
    monkeypatch.setattr(benchmark, "bf16", "yes")
    try:
        benchmark.measured_dtypes()
        raise AssertionError("an unknown bf16 setting must be refused")
    except SystemExit as e:
        assert "bf16='yes'" in str(e)


def test_sampler_sweep_times_each_solver_guided_everywhere_and_on_the_recipes_interval(monkeypatch):
    for key, value in dict(quick=True, recipes="mnist", end_to_end=False, batch_sweep="", profile_top=0, bf16="false",
                           sampler_sweep="euler:32, heun:16").items():
        monkeypatch.setattr(benchmark, key, value)
    rows = [r for r in benchmark.main() if r[0] == "sampler"]
    lo, hi = benchmark.recipe("mnist")["sample_guidance_interval"]
    got = [re.fullmatch(r"mnist fp32, (\w+ \d+ steps), guidance on t in \[(.+)\], batch \d+", r[1]).groups() for r in rows]
    assert got == [(f"{solver} 2 steps", f"{a:g}, {b:g}") for solver in ("euler", "heun") for a, b in ((0, 1), (lo, hi))]
    assert all(r[2] > 0 and r[3] == "img/s" for r in rows)
    # quick=True samples 2 steps (t = 1, then 0.5): guided everywhere, each velocity costs 2 forwards; on the
    # interval, the one at t = 1 costs 1
    full = [2 * velocity_evals(2, solver) for solver in ("euler", "heun")]
    assert [int(r[4].split()[0]) for r in rows] == [full[0], full[0] - 1, full[1], full[1] - 1]
    with pytest.raises(SystemExit, match="sampler_sweep entry 'rk4:8'"):
        benchmark.parse_sampler_sweep("euler:8,rk4:8")
    with pytest.raises(SystemExit, match="sampler_sweep entry 'euler'"):
        benchmark.parse_sampler_sweep("euler")
    assert benchmark.parse_sampler_sweep("") == []


def test_adamw_implementations_take_the_same_step():
    cfg = {**benchmark.recipe("mnist"), "depth": 1, "hidden": 32, "heads": 2}
    model = benchmark.build_model(cfg, 1, 10)
    results = {}
    for impl in benchmark.ADAMW_IMPLS:
        torch.manual_seed(0)
        step = benchmark.adamw_fn(model, impl)
        step()
        results[impl] = [p.detach().clone() for p in step.__self__.param_groups[0]["params"]]
    for impl in ("foreach", "fused"):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[impl], results["single"]))
    assert any(not torch.equal(a, p) for a, p in zip(results["fused"], model.parameters()))


def test_profile_lists_the_heaviest_operators_of_a_train_step():
    # 2 x 64 on 16x16 inputs: at 1 x 32 on 8x8 the matmuls were 4th of 5 and one CI run ranked them lower still
    cfg = {**benchmark.recipe("mnist"), "depth": 2, "hidden": 64, "heads": 2}
    step = benchmark.train_step_fn(benchmark.build_model(cfg, 1, 10), 4, (1, 16, 16), torch.float32)
    top = benchmark.profile_step(step, 2, 8)
    assert len(top) == 8 and 0 < sum(share for _, share, _ in top) <= 100.01
    assert [share for _, share, _ in top] == sorted((share for _, share, _ in top), reverse=True)
    assert any("mm" in op for op, _, _ in top)   # matmuls are among the heaviest even at this size


@pytest.mark.slow
@pytest.mark.parametrize("rev", ["", "HEAD"])
def test_compile_comparison_times_both_variants(monkeypatch, rev):
    """--compare_compile: the quick start's train step and sampling, eager and compiled, both measured
    (about 45 s of compilation at tiny sizes); with --compare_rev too, that revision's model joins the same
    interleaved set and is the base of every ratio."""
    if rev and subprocess.run(["git", "-C", benchmark.HERE, "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout: compare_rev has no history to read")
    for key, value in dict(quick=True, recipes="mnist", compare_compile=True, compare_rev=rev, end_to_end=False,
                           batch_sweep="", profile_top=0, bf16="false").items():
        monkeypatch.setattr(benchmark, key, value)
    rows = [r for r in benchmark.main() if r[0] == "torch.compile"]
    names = ["eager", "compiled"] + ([rev] if rev else [])
    assert [r[1].rsplit(", ", 1)[1] for r in rows] == names * 2
    assert all(r[2] > 0 and r[3] == "img/s" for r in rows)
    base = rev or "eager"
    for part in (rows[:len(names)], rows[len(names):]):      # train step, then sampling
        assert f"x {base}, first call" in part[1][4]
        assert "x " not in part[names.index(base)][4]     # the base row carries no ratio
    assert all(re.search(r"MFU \d+\.\d%", r[4]) for r in rows[:len(names)])   # the train step's, each variant's
    assert rows[len(names) + names.index(base)][4] == ""   # the base's sampling row: no ratio and no MFU


def test_op_replay_counts_the_steps_matmul_flops_and_times_every_operator(monkeypatch, capsys):
    cfg = {**benchmark.recipe("mnist"), "depth": 2, "hidden": 32, "heads": 2, "attn_impl": "math"}
    model = benchmark.build_model(cfg, 1, 10)
    step = benchmark.train_step_fn(model, 4, (1, 8, 8), torch.float32)
    # with the explicit softmax, the attention products are matmuls too: forward + backward of every linear
    # layer and product is ~3x the forward FLOPs that flops_per_image counts (the patch embedding is a convolution)
    r = benchmark.op_replay_times(step, 2)
    assert 0.9 < r["flops"] / (3 * model.flops_per_image(8, 8) * 4) < 1.05
    assert r["heavy_ops"] >= 2 * 4 * 3 and r["ops"] > 5 * r["heavy_ops"]
    assert all(r[k] > 0 for k in ("step", "matmul", "heavy", "alone", "in_order"))
    assert r["heavy"] < r["alone"] and r["in_order_bytes"] > 0
    # every recorded operator replays on tensors of its recorded layout
    ops = benchmark.record_ops(step)
    assert any(f is torch.ops.aten._fused_adamw_.default for f, _, _ in ops)
    for (f, a, k), (_, a2, _) in zip(ops, benchmark.replay_calls(ops, shared=False)):
        for lay, x in zip(a, a2):
            if isinstance(lay, benchmark._Layout):
                assert (x.shape, x.stride(), x.dtype) == (lay.shape, lay.stride, lay.dtype)
    # a step whose own inputs would not fit in memory skips that replay, and the table says how much it would take
    monkeypatch.setattr(benchmark, "REPLAY_MAX_BYTES", 1000)
    for key, value in dict(quick=True, recipes="mnist", end_to_end=False, batch_sweep="", sampler_sweep="",
                           profile_top=0, bf16="false", op_replay=True).items():
        monkeypatch.setattr(benchmark, key, value)
    rows = [r for r in benchmark.main() if r[0] == "op replay"]
    assert [r[1].split(": ", 1)[1].split()[0] for r in rows] == ["the", "its", "its", "all", "all"]
    assert rows[-1][2] == "-" and re.fullmatch(r"not run: their inputs would take \d+\.\d GiB \(more than REPLAY_MAX_BYTES\)",
                                              rows[-1][4])
    assert all(r[2] > 0 for r in rows[:-1]) and "if nothing else took time" in rows[2][4]
    assert "| op replay | mnist fp32 train step, batch 4: all" in capsys.readouterr().out
