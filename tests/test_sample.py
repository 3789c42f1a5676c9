"""sample.py: the solvers, time shift, guidance (formulas and interval), the grid writer and its settings' checks."""

import numpy as np
import torch
from PIL import Image

import pytest

from model import velocity_from_x, shift_time
from sample import generate, guided_velocity, sample_ode, save_grid, time_grid, velocity_evals


def test_euler_on_the_exact_field_of_one_point_recovers_it():
    x0 = torch.randn(1, 2, 4, 4)
    v = lambda xt, t: (xt - x0) / t.view(-1, 1, 1, 1)          # noqa: E731  exact field for data {x0}
    out = sample_ode(v, torch.randn(5, 2, 4, 4), steps=10)
    assert torch.allclose(out, x0.expand(5, -1, -1, -1), atol=1e-5)


def test_temperature_scales_the_starting_noise_and_nothing_else():
    noise = torch.randn(3, 1, 4, 4)
    seen = []

    def v(xt, t):
        seen.append(xt.clone())
        return torch.zeros_like(xt)
    out = sample_ode(v, noise, steps=4, shift=0.6, temperature=0.9)
    assert torch.equal(seen[0], noise * 0.9) and torch.equal(out, noise * 0.9)   # a zero field keeps the start
    drift = lambda xt, t: xt * 0.5 + 1                                            # noqa: E731
    assert torch.equal(sample_ode(drift, noise * 0.9, steps=4, shift=0.6),
                       sample_ode(drift, noise, steps=4, shift=0.6, temperature=0.9))


def test_euler_on_a_two_point_mixture_lands_on_the_data():
    data = torch.tensor([[-2.0, 1.0], [3.0, -1.0]])               # two points in 2-D

    def v(xt, t):   # E[noise - x | xt] under xt = (1-t) x + t noise, a posterior over the points
        t = t.view(-1, 1).clamp(min=1e-4)
        d = xt[:, None, :] - (1 - t)[:, None] * data[None]         # (B, 2 points, 2)
        logp = -(d ** 2).sum(-1) / (2 * t ** 2)
        w = logp.softmax(dim=1)[..., None]
        x_hat = (w * data[None]).sum(1)
        return (xt - x_hat) / t
    noise = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    out = sample_ode(v, noise, steps=200)
    dist = torch.cdist(out, data).min(dim=1).values
    assert dist.max() < 0.05
    # and both modes are reached, in about equal shares
    share = (torch.cdist(out, data).argmin(1) == 0).float().mean()
    assert 0.3 < share < 0.7


class Linear(torch.nn.Module):
    """A fake model whose velocity reveals which conditions it received."""
    def forward(self, xt, t, y=None, text=None, text_mask=None, image_emb=None, drop_y=None, drop_text=None,
                drop_image=None):
        v = torch.zeros_like(xt)
        if text is not None:
            v = v + torch.where(drop_text, 0.0, 1.0).view(-1, 1, 1, 1)
        if image_emb is not None:
            v = v + torch.where(drop_image, 0.0, 10.0).view(-1, 1, 1, 1)
        return v


def test_dual_guidance_formula():
    xt, t = torch.zeros(2, 1, 2, 2), torch.ones(2)
    cond = dict(text=torch.zeros(2, 3, 4), text_mask=torch.ones(2, 3, dtype=torch.bool), image_emb=torch.zeros(2, 5))
    # v(0,0)=0, v(0,img)=10, v(txt,img)=11 -> 0 + s_i*10 + s_t*1
    v = guided_velocity(Linear(), cond, text_scale=3.0, image_scale=2.0)(xt, t)
    assert torch.allclose(v, torch.full_like(v, 2.0 * 10 + 3.0 * 1))
    v = guided_velocity(Linear(), cond, text_scale=1.0, image_scale=1.0)(xt, t)
    assert torch.allclose(v, torch.full_like(v, 11.0))             # scales of 1: plain conditional
    v = guided_velocity(Linear(), {"text": cond["text"]}, text_scale=4.0, image_scale=9.0)(xt, t)
    assert torch.allclose(v, torch.full_like(v, 4.0))              # text only: image scale unused


class Interacting(Linear):
    """Linear, plus 100 when the caption and the image are both kept: the two guidance formulas differ on it."""
    def forward(self, xt, t, text=None, image_emb=None, drop_text=None, drop_image=None, **rest):
        both = torch.where(drop_text | drop_image, 0.0, 100.0).view(-1, 1, 1, 1)
        return super().forward(xt, t, text=text, image_emb=image_emb, drop_text=drop_text, drop_image=drop_image) + both


def test_composed_guidance_sums_each_conditions_own_effect_and_nested_adds_the_caption_given_the_image():
    xt, t = torch.zeros(2, 1, 2, 2), torch.full((2,), 0.5)
    cond = dict(text=torch.zeros(2, 3, 4), text_mask=torch.ones(2, 3, dtype=torch.bool), image_emb=torch.zeros(2, 5))
    # v(0,0) = 0, v(txt,0) = 1, v(0,img) = 10, v(txt,img) = 111
    composed = guided_velocity(Interacting(), cond, 3.0, 2.0, guidance="composed")
    assert torch.allclose(composed(xt, t), torch.full_like(xt, 3.0 * 1 + 2.0 * 10)) and composed.forwards == 3
    nested = guided_velocity(Interacting(), cond, 3.0, 2.0, guidance="nested")(xt, t)
    assert torch.allclose(nested, torch.full_like(xt, 2.0 * 10 + 3.0 * 101))
    outside = guided_velocity(Interacting(), cond, 3.0, 2.0, interval=(0.6, 1.0), guidance="composed")(xt, t)
    assert torch.allclose(outside, torch.full_like(xt, 111.0))      # outside the interval: the conditional model
    import sample
    with pytest.raises(SystemExit, match="sample.py: guidance='mixed': expected one of nested, composed"):
        sample.check_settings({**vars(sample), "guidance": "mixed"})


def test_save_grid(tmp_path):
    images = torch.rand(10, 3, 6, 5)
    save_grid(images, str(tmp_path / "g.png"), nrow=4, pad=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (3 * 8 + 2, 4 * 7 + 2, 3)
    assert np.abs(grid[2:8, 2:7] / 255.0 - images[0].permute(1, 2, 0).numpy()).max() <= 1 / 255


def test_heun_is_exact_on_a_velocity_linear_in_t_until_its_last_step_which_is_euler():
    a, b = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    seen = []

    def v(xt, t):
        seen.append(t[0].item())
        return a + b * t.view(-1, 1, 1, 1)                          # x(s) = x(1) - a (1 - s) - b (1 - s^2) / 2
    noise = torch.randn(3, 1, 2, 2)
    at_third = noise - a * 2 / 3 - b * (1 - 1 / 9) / 2               # exact at t = 1/3, after two Heun steps
    heun = sample_ode(v, noise, steps=3, solver="heun")
    assert 0.0 not in seen and len(seen) == velocity_evals(3, "heun") == 5
    assert torch.allclose(heun, at_third - v(None, torch.tensor([1 / 3])) / 3, atol=1e-6)   # then one Euler step
    euler = sample_ode(v, noise, steps=3, solver="euler")
    assert (euler - heun).abs().max() > 0.01


def test_x_prediction_sampling_converges_as_steps_grow():
    """An x-predicting network that knows the answer: every step count lands on it, also grids whose last
    steps come below X_PRED_MIN_T (the loss floor), and Heun, whose last step would otherwise evaluate t = 0."""
    target = torch.randn(2, 1, 4, 4)
    v = lambda xt, t: velocity_from_x(xt, target, t)               # noqa: E731
    noise = torch.randn(2, 1, 4, 4)
    for steps in (4, 16, 64, 200):
        assert torch.allclose(sample_ode(v, noise, steps), target, atol=1e-5), steps
        assert torch.allclose(sample_ode(v, noise, steps, solver="heun"), target, atol=1e-5), steps


def test_time_shift_fixes_the_ends_and_moves_the_grid_towards_noise():
    t = torch.linspace(0, 1, 11)
    s = shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and (s[1:-1] > t[1:-1]).all() and (s.diff() > 0).all()
    assert torch.equal(time_grid(4, 1.0), torch.linspace(1, 0, 5))
    assert torch.allclose(time_grid(4, 3.0), shift_time(torch.linspace(1, 0, 5), 3.0))


def test_guidance_interval_full_range_is_plain_guidance_and_outside_runs_one_conditional_forward():
    xt = torch.zeros(2, 1, 2, 2)
    cond = dict(text=torch.zeros(2, 3, 4), text_mask=torch.ones(2, 3, dtype=torch.bool), image_emb=torch.zeros(2, 5))
    plain = guided_velocity(Linear(), cond, 3.0, 2.0)
    full = guided_velocity(Linear(), cond, 3.0, 2.0, interval=(0.0, 1.0))
    for t in (0.0, 0.3, 1.0):
        assert torch.equal(plain(xt, torch.full((2,), t)), full(xt, torch.full((2,), t)))
    part = guided_velocity(Linear(), cond, 3.0, 2.0, interval=(0.2, 0.8))
    assert torch.allclose(part(xt, torch.full((2,), 0.5)), torch.full_like(xt, 23.0))   # guided, 3 branches
    assert torch.allclose(part(xt, torch.full((2,), 0.9)), torch.full_like(xt, 11.0))   # conditional only
    assert part.forwards == 3 + 1 and plain.forwards == 3 * 3


def test_a_temperature_that_is_not_positive_is_named():
    import evaluate
    import sample
    with pytest.raises(SystemExit, match=r"^sample.py: temperature=0.0: expected > 0"):
        sample.check_settings(dict(vars(sample), temperature=0.0))
    with pytest.raises(SystemExit, match=r"^evaluate.py: temperature=0.0: expected > 0"):   # the script that checks
        sample.check_settings(dict(vars(evaluate), temperature=0.0))


def test_sample_py_no_longer_evaluates_and_points_to_evaluate_py():
    from conftest import run
    proc = run("sample.py", "--ckpt=none", "--eval=true", check=False)
    assert proc.returncode != 0 and "unknown config key 'eval'" in proc.stderr
    assert "python evaluate.py --ckpt=" in run("sample.py", "--help").stdout


def test_generate_in_chunks_draws_the_images_of_one_batch():
    """A grid of many classes is sampled a chunk at a time: the same images as one batch (to float rounding: a
    batch's size may change the matmul kernels' blocking), the same cost per image, in the same order."""
    from model import DiT, DiTConfig
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=1, patch_size=2, hidden=32, depth=2, heads=2, num_classes=5)).eval()
    for p in model.parameters():           # adaLN-Zero starts at zero: give the output layer weights to draw with
        p.data.normal_(0, 0.1)
    cond = {"y": torch.arange(5).repeat_interleave(3), "text": None}
    noise = torch.randn(15, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sampler = dict(steps=3, solver="heun", shift=1.0, temperature=1.0, text_scale=2.0, image_scale=1.0,
                   guidance_interval=(0.0, 1.0), guidance="nested")
    meta = {"space": "pixels", "vae": None}
    whole, forwards = generate(model, cond, noise, sampler, meta, torch.autocast("cpu", enabled=False), chunk=100)
    parts, forwards_parts = generate(model, cond, noise, sampler, meta, torch.autocast("cpu", enabled=False), chunk=4)
    assert whole.shape == (15, 1, 8, 8) and 0 <= whole.min() and whole.max() <= 1 and whole.std() > 0.05
    assert torch.allclose(whole, parts, atol=1e-5) and forwards == forwards_parts == 2 * 5


def test_images_are_embedded_with_the_checkpoints_image_encoder(tmp_path):
    """--images= with a model trained on efficientnet-lite0 embeddings: sample.py encodes the given files with that
    network (896-d, the model's image_dim), and the picture follows them: same noise, same image, same output."""
    from dataclasses import asdict

    import skimage.data as data
    from conftest import run
    from model import DiT, DiTConfig
    cfg = DiTConfig(in_channels=1, patch_size=4, hidden=32, depth=2, heads=2, image_dim=896)
    torch.manual_seed(0)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():       # adaLN-Zero starts at zero: random weights everywhere, so conditions show
            p.normal_(0, 0.1)
        model.image_proj[0].weight.mul_(30)   # the embedding enters at unit length (image_norm): widen its projection
    meta = dict(space="pixels", channels=1, vae=None, num_classes=0, class_names=[], buckets={"16x16": [16, 16]},
                text_encoder=None, image_encoder={"name": "efficientnet-lite0", "dim": 896})
    ckpt = tmp_path / "ckpt-00000001.pt"
    torch.save(dict(model_args=asdict(cfg), model=model.state_dict(), ema=model.state_dict(), step=1, config={},
                    data=meta), ckpt)
    for name in ("chelsea", "coffee"):
        Image.fromarray(getattr(data, name)()).save(tmp_path / f"{name}.png")
    grids = []
    for second in ("chelsea", "coffee"):
        out = tmp_path / f"{second}-grid.png"
        run("sample.py", f"--ckpt={ckpt}", f"--images={tmp_path / 'chelsea.png'},{tmp_path / second}.png", "--num=2",
            "--steps=2", f"--out={out}")
        grids.append(np.asarray(Image.open(out)).astype(int))
    first, second = (g[:, :18] for g in grids), (g[:, 18:] for g in grids)   # 2 images of 16 px + 2 px padding
    assert np.array_equal(*first)                       # noise 0, the cat in both runs
    assert np.abs(np.subtract(*second)).mean() > 1      # noise 1: the cat, then the coffee
