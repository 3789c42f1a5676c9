"""sample.py: the Euler solver, the guidance formulas and the grid writer."""

import numpy as np
import torch
from PIL import Image

from sample import euler_sample, guided_velocity, save_grid


def test_euler_on_the_exact_field_of_one_point_recovers_it():
    x0 = torch.randn(1, 2, 4, 4)
    v = lambda xt, t: (xt - x0) / t.view(-1, 1, 1, 1)          # noqa: E731  exact field for data {x0}
    out = euler_sample(v, torch.randn(5, 2, 4, 4), steps=10)
    assert torch.allclose(out, x0.expand(5, -1, -1, -1), atol=1e-5)


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
    out = euler_sample(v, noise, steps=200)
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


def test_save_grid(tmp_path):
    images = torch.rand(10, 3, 6, 5)
    save_grid(images, str(tmp_path / "g.png"), nrow=4, pad=2)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (3 * 8 + 2, 4 * 7 + 2, 3)
    assert np.abs(grid[2:8, 2:7] / 255.0 - images[0].permute(1, 2, 0).numpy()).max() <= 1 / 255
