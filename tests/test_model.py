"""model.py: adaLN-Zero init, any grid, conditions and their nulls, attention paths, FLOPs."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import DiT, DiTConfig, interpolate, velocity_target


def tiny(**kw):
    args = dict(in_channels=3, patch_size=2, hidden=64, depth=2, heads=4, num_classes=10, text_dim=16, image_dim=12)
    args.update(kw)
    torch.manual_seed(0)
    return DiT(DiTConfig(**args))


def randomise(model):
    """Leave the zero init so that every branch contributes."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def conds(B=3, L=5):
    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, :3] = True
    return dict(y=torch.arange(B), text=torch.randn(B, L, 16, generator=g), text_mask=mask,
                image_emb=torch.randn(B, 12, generator=g))


def test_flow_convention():
    x, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert torch.equal(interpolate(x, noise, torch.zeros(4)), x)
    assert torch.allclose(interpolate(x, noise, torch.ones(4)), noise, atol=1e-6)
    t, dt = torch.full((4,), 0.3), 1e-3   # the target is d xt / dt
    fd = (interpolate(x, noise, t + dt) - interpolate(x, noise, t)) / dt
    assert torch.allclose(fd, velocity_target(x, noise), atol=1e-3)


def test_adaln_zero_starts_at_zero_output():
    out = tiny()(torch.randn(3, 3, 8, 8), torch.rand(3), **conds())
    assert out.shape == (3, 3, 8, 8) and out.abs().max() == 0


@pytest.mark.parametrize("hw", [(8, 8), (8, 16), (16, 8), (4, 12)])
def test_any_grid_divisible_by_patch(hw):
    model = randomise(tiny())
    assert model(torch.randn(2, 3, *hw), torch.rand(2)).shape == (2, 3, *hw)


def test_indivisible_input_is_an_error():
    with pytest.raises(ValueError, match="9x8 is not divisible by patch_size=2"):
        tiny()(torch.randn(1, 3, 9, 8), torch.rand(1))


def test_config_errors():
    with pytest.raises(ValueError, match="hidden=65 is not divisible by heads=4"):
        DiTConfig(hidden=65, heads=4)
    with pytest.raises(ValueError, match="patch_size=3"):
        DiTConfig(patch_size=3)


def test_drop_flags_equal_missing_conditions_and_conditions_matter():
    model = randomise(tiny())
    x, t, c = torch.randn(3, 3, 8, 8), torch.rand(3), conds()
    yes = torch.ones(3, dtype=torch.bool)
    dropped = model(x, t, **c, drop_y=yes, drop_text=yes, drop_image=yes)
    assert torch.allclose(dropped, model(x, t), atol=1e-6)           # None == learned nulls
    full = model(x, t, **c)
    for key in ("y", "text", "image_emb"):                            # each condition changes v
        other = dict(c)
        other[key] = c[key].roll(1, 0)
        assert (model(x, t, **other) - full).abs().max() > 1e-4, key
    # padding tokens are ignored
    other = dict(c)
    other["text"] = c["text"].clone()
    other["text"][:, 3:] = 100.0
    assert torch.allclose(model(x, t, **other), full, atol=1e-5)
    # a per-sample drop only affects that sample
    part = model(x, t, **c, drop_text=torch.tensor([True, False, False]))
    assert torch.allclose(part[1:], full[1:], atol=1e-6) and not torch.allclose(part[:1], full[:1])


def test_unconditional_model():
    model = randomise(tiny(num_classes=0, text_dim=0, image_dim=0))
    assert model(torch.randn(2, 3, 8, 8), torch.rand(2)).shape == (2, 3, 8, 8)


def test_attention_paths_and_checkpointing_agree():
    x, t, c = torch.randn(3, 3, 8, 8), torch.rand(3), conds()
    outs, grads = [], []
    for kw in (dict(attn_impl="sdpa"), dict(attn_impl="math"), dict(attn_impl="sdpa", grad_checkpoint=True)):
        model = randomise(tiny(**kw)).train()
        out = model(x, t, **c)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    for o, g in zip(outs[1:], grads[1:]):
        assert torch.allclose(o, outs[0], atol=1e-5)
        assert torch.allclose(g, grads[0], atol=1e-4)


def test_bf16_autocast_close_to_fp32():
    model = randomise(tiny())
    x, t, c = torch.randn(3, 3, 8, 8), torch.rand(3), conds()
    ref = model(x, t, **c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, **c).float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_flops_match_torch_counter():
    model = tiny(hidden=64, depth=3, attn_impl="math")   # the counter does not see CPU SDPA kernels
    x, t, c = torch.randn(1, 3, 16, 8), torch.rand(1), conds(B=1)
    with FlopCounterMode(display=False) as counter:
        model(x, t, **c)
    counted = counter.get_total_flops()
    ours = model.flops_per_image(16, 8, text_len=5)
    assert abs(ours - counted) / counted < 0.05, (ours, counted)
