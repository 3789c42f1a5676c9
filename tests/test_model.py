"""model.py: adaLN-Zero init, any grid, conditions and their nulls, attention paths, FLOPs."""
import os
import platform
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model import (X_PRED_MIN_T, MoE, DiT, DiTConfig, bf16_is_native, config_from_checkpoint, flow_loss, interpolate,
                   training_memory, velocity_from_x, velocity_target)


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
    with pytest.raises(ValueError, match="class_embed_std=0"):
        DiTConfig(num_classes=10, class_embed_std=0)


def test_class_embed_std_sets_the_class_tables_spread_and_nothing_else():
    torch.manual_seed(0)
    base = DiT(DiTConfig(hidden=64, heads=4, depth=1, num_classes=1000))
    torch.manual_seed(0)
    strong = DiT(DiTConfig(hidden=64, heads=4, depth=1, num_classes=1000, class_embed_std=1.0))
    assert abs(base.y_embed.weight.std().item() - 0.02) < 0.001 and abs(strong.y_embed.weight.std().item() - 1.0) < 0.05
    # the same random draws, scaled: every other weight is the same, so the two runs differ only in this
    assert torch.allclose(strong.y_embed.weight * 0.02, base.y_embed.weight, atol=1e-6)
    other = {k: v for k, v in base.state_dict().items() if not k.startswith("y_embed")}
    assert all(torch.equal(v, strong.state_dict()[k]) for k, v in other.items())


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


def assert_flops_match_torch_counter(model, rel=1e-4):
    """model.flops_per_image equal (within rel) to what torch's FlopCounterMode counts for one 16x8 image."""
    x, t, c = torch.randn(1, 3, 16, 8), torch.rand(1), conds(B=1)
    with FlopCounterMode(display=False) as counter:
        model(x, t, **c)
    counted = counter.get_total_flops()
    ours = model.flops_per_image(16, 8, text_len=5)
    assert abs(ours - counted) / counted < rel, (ours, counted)


def test_flops_match_torch_counter():
    assert_flops_match_torch_counter(tiny(hidden=64, depth=3, attn_impl="math"))  # the counter misses CPU SDPA


def test_x_prediction_returns_the_velocity_its_clean_estimate_implies():
    v_model, x_model = randomise(tiny()), randomise(tiny(prediction="x"))
    x, t, c = torch.randn(3, 3, 8, 8), torch.tensor([0.01, 0.5, 1.0]), conds()
    x_hat = v_model(x, t, **c)           # the same weights: the last layer's output read as a clean image
    v = x_model(x, t, **c)
    assert torch.allclose(v, velocity_from_x(x, x_hat, t), atol=1e-6)
    assert torch.allclose(v[1], (x[1] - x_hat[1]) / 0.5, atol=1e-5)
    assert torch.allclose(v[0], (x[0] - x_hat[0]) / 0.01, atol=1e-3)   # exact below X_PRED_MIN_T too
    assert torch.isfinite(x_model(x, torch.zeros(3), **c)).all()


def test_flow_loss_of_x_prediction_divides_by_t_floored_at_x_pred_min_t():
    x, noise = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    t = torch.tensor([0.0, 0.01, 0.05, 0.5])
    x_hat = x + 0.1 * torch.randn(4, 1, 2, 2)
    xt = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    v = velocity_from_x(xt, x_hat, t)                            # exact: (xt - x_hat) / t
    floored = (xt - x_hat) / t.clamp(min=X_PRED_MIN_T).view(-1, 1, 1, 1)
    want = (floored - velocity_target(x, noise)).pow(2).mean(dim=(1, 2, 3))
    loss = flow_loss(v, x, noise, t, "x")
    assert torch.isfinite(loss).all() and torch.allclose(loss, want, rtol=1e-4)
    plain = (v - velocity_target(x, noise)).pow(2).mean(dim=(1, 2, 3))
    assert torch.equal(flow_loss(v, x, noise, t, "v"), plain)
    assert torch.equal(flow_loss(v, x, noise, t, "x")[2:], plain[2:])   # from X_PRED_MIN_T up: the plain loss, bitwise
    assert not torch.allclose(loss[:2], plain[:2])


def test_checkpoints_from_before_new_settings_load_as_they_were_trained():
    old = {k: v for k, v in vars(DiTConfig()).items() if k not in ("mlp_act", "prediction", "loss_weighting",
                                                                      "image_norm", "text_norm", "image_stats",
                                                                      "repa_depth")}
    cfg = config_from_checkpoint(old)
    assert cfg.mlp_act == "gelu_tanh" and cfg.prediction == "v" and not cfg.loss_weighting and not cfg.image_norm
    assert not cfg.text_norm and not cfg.image_stats and cfg.repa_depth == 0
    # the weights of such a checkpoint load strictly: no image_mean / image_std to find
    assert "image_mean" not in DiT(config_from_checkpoint({**old, "image_dim": 8})).state_dict()
    assert config_from_checkpoint({**old, "mlp_act": "silu"}).mlp_act == "silu"


def test_image_embedding_enters_at_unit_length_whatever_its_scale_and_offset():
    """image_norm: the projection sees the embedding centred and at unit length, so an encoder's scale and common
    offset change nothing (they kept the image condition from being learned; BENCHMARKS.md round 22), while a
    different embedding does; without image_norm (checkpoints from before it) the raw embedding goes in."""
    torch.manual_seed(0)
    xt, t, emb = torch.randn(3, 1, 8, 8), torch.rand(3), torch.randn(3, 40)
    for norm in (True, False):
        model = DiT(DiTConfig(in_channels=1, patch_size=4, hidden=16, depth=1, heads=2, image_dim=40, image_norm=norm))
        with torch.no_grad():
            for p in model.parameters():     # adaLN-Zero starts at zero: random weights, so the condition shows
                p.normal_(0, 0.3)
            v = model(xt, t, image_emb=emb)
            rescaled = model(xt, t, image_emb=7 * emb + 3)
            other = model(xt, t, image_emb=emb.roll(1, dims=1))
        assert torch.allclose(v, rescaled, atol=1e-4) == norm
        assert not torch.allclose(v, other, atol=1e-3)


def test_image_embedding_is_standardised_by_the_data_statistics_it_carries():
    """image_stats: each feature is shifted and scaled by the buffers image_mean / image_std before image_norm, so
    the model's output for an embedding is the output of the same weights without statistics for the embedding
    standardised by hand; the buffers are saved with the weights; identity ones change nothing."""
    torch.manual_seed(0)
    xt, t, emb = torch.randn(3, 1, 8, 8), torch.rand(3), torch.randn(3, 40) * 3 + 5
    mean, std = torch.randn(40), torch.rand(40) + 0.5
    cfg = dict(in_channels=1, patch_size=4, hidden=16, depth=1, heads=2, image_dim=40)
    model, plain = DiT(DiTConfig(**cfg)), DiT(DiTConfig(**cfg, image_stats=False))
    with torch.no_grad():
        for p in model.parameters():     # adaLN-Zero starts at zero: random weights, so the condition shows
            p.normal_(0, 0.3)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if k not in ("image_mean", "image_std")})
        assert torch.equal(model(xt, t, image_emb=emb), plain(xt, t, image_emb=emb))   # identity statistics
        model.set_image_stats(mean, std)
        v = model(xt, t, image_emb=emb)
        assert torch.allclose(v, plain(xt, t, image_emb=(emb - mean) / std), atol=1e-5)
        assert not torch.allclose(v, plain(xt, t, image_emb=emb), atol=1e-3)
    state = model.state_dict()
    assert torch.equal(state["image_mean"], mean) and torch.equal(state["image_std"], std)


def test_image_tokens_join_the_caption_in_cross_attention_and_vanish_where_the_image_is_dropped():
    """image_tokens: the embedding also becomes K context tokens beside the caption's (IP-Adapter). A sample whose
    image is dropped gets exactly the output of no image at all (its tokens are masked out, its adaLN input is the
    null); the tokens carry the image (changing only their projection changes the output); FLOPs count them; and
    they need a caption path to join."""
    model = randomise(tiny(image_tokens=3))
    x, t, c = torch.randn(3, 3, 8, 8), torch.rand(3), conds()
    drop = torch.tensor([True, False, True])
    with torch.no_grad():
        v = model(x, t, **c, drop_image=drop)
        none = model(x, t, **{**c, "image_emb": None})
        assert torch.equal(v[drop], none[drop]) and not torch.allclose(v[1], none[1], atol=1e-3)
        no_caption = model(x, t, image_emb=c["image_emb"])     # the null caption token and the image's tokens
        model.image_ctx.weight.copy_(torch.randn_like(model.image_ctx.weight))   # other tokens, same all else
        assert not torch.allclose(model(x, t, **c, drop_image=drop)[1], v[1], atol=1e-3)
    assert torch.isfinite(no_caption).all()
    assert_flops_match_torch_counter(tiny(hidden=64, depth=3, attn_impl="math", image_tokens=4))
    with pytest.raises(ValueError, match="image_tokens=2: needs image_dim > 0 and text_dim > 0"):
        DiTConfig(image_dim=12, image_tokens=2)


def test_repa_head_reads_the_clean_embedding_from_the_tokens_after_repa_depth_blocks():
    """repa_depth: in training, forward leaves repa_loss_t (B,) = 1 - cos(repa_head(the tokens after block k,
    average-pooled to 2x2), the standardised embedding), for every sample whether or not its image conditions it;
    only blocks 1..k get its gradient; in eval it is not computed, and the output is that of the same weights
    without the head; it needs an image embedding and a block to follow."""
    model, plain = randomise(tiny(depth=3, repa_depth=2)), tiny(depth=3)
    mean, std = torch.randn(12), torch.rand(12) + 0.5
    model.set_image_stats(mean, std)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("repa_head.")})
    x, t, c = torch.randn(3, 3, 8, 12), torch.rand(3), conds()
    tokens = {}
    model.blocks[1].register_forward_hook(lambda module, args, out: tokens.update(x=out))
    model.train()
    model(x, t, **c, drop_image=torch.tensor([True, False, True]))
    grid = tokens["x"].transpose(1, 2).reshape(3, 64, 4, 6)    # 8x12 pixels, patch 2: 4x6 tokens
    pooled = torch.stack([grid[..., r:r + 2, q:q + 3].mean((-2, -1)) for r in (0, 2) for q in (0, 3)], -1).flatten(1)
    cos = torch.nn.functional.cosine_similarity(model.repa_head(pooled), (c["image_emb"] - mean) / std, dim=-1)
    assert torch.allclose(model.repa_loss_t, 1 - cos, atol=1e-5)
    model.repa_loss_t.sum().backward()
    assert all(p.grad is None for p in model.blocks[2].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.blocks[0].attn.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t, **c), plain.eval()(x, t, **c))
    with pytest.raises(ValueError, match=r"repa_depth=1: expected 0 \(off\) or 1..depth=12 with image_dim > 0"):
        DiTConfig(repa_depth=1)
    with pytest.raises(ValueError, match="repa_depth=3: expected"):
        DiTConfig(image_dim=12, depth=2, repa_depth=3)


def test_text_layers_start_as_the_identity_then_mix_the_valid_caption_tokens_only():
    """text_layers: blocks over the caption's tokens before cross-attention. Initialised as the identity (the model
    gives exactly what it gives without them); trained, a token takes in the valid tokens beside it and never the
    padding; a dropped caption stays the null token; FLOPs count them; they need a caption."""
    model = tiny(text_layers=2)
    x, t, c = torch.randn(3, 3, 8, 8), torch.rand(3), conds()
    with torch.no_grad():
        v = model(x, t, **c)
        blocks, model.text_blocks = model.text_blocks, torch.nn.ModuleList()
        assert torch.equal(model(x, t, **c), v)
        model.text_blocks = blocks
        randomise(model)
        block = model.text_blocks[0]
        tokens, mask = torch.randn(1, 5, 64), torch.tensor([[True, True, True, False, False]])
        out = block(tokens, mask[:, None, None, :])
        for j, valid in ((2, True), (4, False)):   # change token j: token 0 moves only when j is valid
            other = tokens.clone()
            other[0, j] = torch.randn(64)
            assert torch.allclose(block(other, mask[:, None, None, :])[0, 0], out[0, 0], atol=1e-6) != valid
        v = model(x, t, **c)
        assert torch.allclose(v, model(x, t, **{**c, "text": torch.where(c["text_mask"][..., None], c["text"], 7.0)}),
                              atol=1e-5)
        drop = torch.tensor([True, False, True])
        assert torch.allclose(model(x, t, **c, drop_text=drop)[drop], model(x, t, **{**c, "text": None})[drop], atol=1e-5)
        block.mlp[-1].weight.add_(0.1)
        assert not torch.allclose(model(x, t, **c), v, atol=1e-4)
    assert_flops_match_torch_counter(tiny(hidden=64, depth=3, attn_impl="math", text_layers=2))
    with pytest.raises(ValueError, match="text_layers=1: needs text_dim > 0"):
        DiTConfig(text_layers=1)


def test_caption_tokens_enter_at_unit_length_whatever_their_scale_and_offset():
    """text_norm: each token embedding is centred and scaled to unit length before the projection, as image_norm
    (raw 384-d MiniLM tokens, pairs of digits were read 3x less often; BENCHMARKS.md round 23); padding stays masked
    and a dropped caption is still the null token; without text_norm (older checkpoints) the raw tokens go in."""
    torch.manual_seed(0)
    xt, t, text = torch.randn(3, 1, 8, 8), torch.rand(3), torch.randn(3, 5, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    for norm in (True, False):
        model = DiT(DiTConfig(in_channels=1, patch_size=4, hidden=16, depth=1, heads=2, text_dim=24, text_norm=norm))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
            v = model(xt, t, text=text, text_mask=mask)
            rescaled = model(xt, t, text=5 * text - 2, text_mask=mask)
            padded = model(xt, t, text=torch.where(mask[..., None], text, 9.0), text_mask=mask)
            other = model(xt, t, text=text.roll(1, dims=2), text_mask=mask)
            dropped = model(xt, t, text=text, text_mask=mask, drop_text=torch.ones(3, dtype=torch.bool))
            null = model(xt, t)
        assert torch.allclose(v, rescaled, atol=1e-4) == norm
        assert torch.allclose(v, padded, atol=1e-5)
        assert not torch.allclose(v, other, atol=1e-3)
        assert torch.allclose(dropped, null, atol=1e-5)


def moe_cfg(**kw):
    return DiTConfig(**{**dict(hidden=16, heads=2, mlp_ratio=2.0, moe_experts=4, moe_top_k=2), **kw})


def test_loss_weighting_learns_log_u_of_t_in_training_forwards_only_and_leaves_the_network_alone():
    plain, weighted = tiny(), tiny(loss_weighting=True)
    extra = set(weighted.state_dict()) - set(plain.state_dict())
    assert extra == {"loss_logvar.weight", "loss_logvar.bias"}
    for k, v in plain.state_dict().items():       # the same initial network: log u(t) is made after it
        assert torch.equal(v, weighted.state_dict()[k]), k
    randomise(weighted)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    weighted.eval()
    weighted(x, t, **conds())
    assert not hasattr(weighted, "loss_logvar_t")   # sampling and validation do not compute it
    weighted.train()
    weighted(x, t, **conds())
    logvar = weighted.loss_logvar_t
    assert logvar.shape == (3,) and logvar.dtype == torch.float32 and len(set(logvar.tolist())) == 3
    logvar.sum().backward()
    assert weighted.loss_logvar.weight.grad.abs().sum() > 0


def test_one_expert_top_1_equals_the_dense_mlp_with_its_weights():
    torch.manual_seed(0)
    dense = randomise(tiny(hidden=32, mlp_ratio=2.0))
    moe = tiny(hidden=32, mlp_ratio=2.0, moe_experts=1, moe_top_k=1, moe_capacity=0)
    sd = dense.state_dict()
    for i in range(2):
        for name, (mlp_key, transpose) in {"w1": ("mlp.0.weight", True), "b1": ("mlp.0.bias", False),
                                           "w2": ("mlp.2.weight", True), "b2": ("mlp.2.bias", False)}.items():
            w = sd.pop(f"blocks.{i}.{mlp_key}")
            sd[f"blocks.{i}.mlp.{name}"] = (w.T if transpose else w)[None].contiguous()
        sd[f"blocks.{i}.mlp.router.weight"] = torch.randn(1, 32)
    moe.load_state_dict(sd)
    x, t, c = torch.randn(3, 3, 8, 8), torch.rand(3), conds()
    assert torch.allclose(moe(x, t, **c), dense(x, t, **c), atol=1e-5)
    aux, dropped, load = moe.moe_stats()
    assert aux.item() == pytest.approx(2.0) and dropped.item() == 0 and torch.equal(load, torch.ones(2, 1))


def test_load_balancing_loss_is_minimal_at_uniform_routing_and_has_a_gradient():
    moe = MoE(moe_cfg())
    x = torch.randn(2, 16, 16)
    with torch.no_grad():
        moe.router.weight.zero_()            # equal probabilities: ties go to the lowest experts, but
    moe(x)                                   # P_e = 1/E makes E * sum f_e P_e = sum f_e = 1 exactly
    assert moe.aux_loss.item() == pytest.approx(1.0)
    x[..., 0] = 1.0
    with torch.no_grad():
        moe.router.weight[0, 0] = 2.0        # every token prefers expert 0: half the assignments
    moe(x)
    assert moe.aux_loss.item() > 1.2 and moe.load[0] == 0.5
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0                  # the loss trains the router
    with torch.no_grad():                                          # and a step down its gradient balances
        moe.router.weight -= 0.5 * moe.router.weight.grad / moe.router.weight.grad.norm()
    before = moe.aux_loss.item()
    moe(x)
    assert moe.aux_loss.item() < before


def test_capacity_drops_are_counted_and_dropped_tokens_keep_only_their_kept_choices():
    torch.manual_seed(0)
    moe = MoE(moe_cfg(moe_capacity=0.5, moe_top_k=1))
    x = torch.randn(1, 32, 16)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 10.0          # every token with x[..., 0] > 0 goes to expert 2
    x[0, :, 0] = 1.0                            # all 32 tokens choose expert 2
    out = moe(x)
    cap = 4                                     # ceil(0.5 * 32 * 1 / 4)
    assert moe.dropped.item() == pytest.approx(1 - cap / 32)
    assert moe.load.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert out[0, :cap].abs().sum() > 0 and out[0, cap:].abs().max() == 0   # tokens in order; the rest drop
    unlimited = MoE(moe_cfg(moe_capacity=0, moe_top_k=1))
    unlimited.load_state_dict(moe.state_dict())
    assert torch.allclose(unlimited(x)[0, :cap], out[0, :cap]) and unlimited.dropped.item() == 0


def test_moe_counts_active_parameters_and_flops():
    dense, moe = tiny(depth=3), tiny(depth=3, moe_experts=4, moe_top_k=2, moe_shared_expert=True)
    expert = 2 * 64 * 256 + 256 + 64
    router = 64 * 4
    assert moe.num_params() == dense.num_params() + 3 * (4 * expert + router)        # 4 experts + shared vs 1
    assert moe.num_params(active=True) == dense.num_params() + 3 * (2 * expert + router)
    # the counter sees each expert's matmul on the tokens routed to it: top_k + shared per token (exactly with no
    # capacity limit; with one, less the tokens that overflow an expert)
    moe_args = dict(depth=3, moe_experts=4, moe_top_k=2, moe_shared_expert=True, attn_impl="math")
    assert_flops_match_torch_counter(tiny(**moe_args, moe_capacity=0))
    assert_flops_match_torch_counter(tiny(**moe_args), rel=0.05)


def test_moe_under_bf16_autocast_close_to_fp32():
    # every token to every expert, so rounding cannot flip a routing decision; only the numbers move
    model = randomise(tiny(moe_experts=2, moe_top_k=2, moe_capacity=0))
    x, t, c = torch.randn(3, 3, 8, 8), torch.rand(3), conds()
    ref = model(x, t, **c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, **c).float()
    assert torch.isfinite(low).all() and (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_class_embedding_is_the_lookup_and_its_gradient():
    """Exact rows on every device: an index, no matmul in the forward that TF32 (train.py allows it on CUDA) or
    autocast could round; the backward is a one-hot matmul (deterministic when compiled: see below)."""
    model = randomise(tiny(text_dim=0, image_dim=0))
    y = torch.tensor([3, 3, 10, 0, 3])                          # repeats, and the null label
    assert torch.equal(model.class_embedding(y), model.y_embed(y))
    with FlopCounterMode(display=False) as counter:
        model.class_embedding(y)
    assert counter.get_total_flops() == 0
    w = model.y_embed.weight
    (g_onehot,) = torch.autograd.grad((model.class_embedding(y) * torch.arange(64.0)).sum(), w)
    (g_lookup,) = torch.autograd.grad((model.y_embed(y) * torch.arange(64.0)).sum(), w)
    assert torch.allclose(g_onehot, g_lookup, atol=0, rtol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):            # the table is not rounded to bf16
        assert torch.equal(model.class_embedding(y), model.y_embed(y).float())


def test_the_residual_stream_is_token_major_in_memory():
    """Every block gets x (B, N, D) contiguous, in training and in its backward: a transposed layout made each
    LayerNorm copy it, forward and backward (BENCHMARKS.md, round 6)."""
    model = randomise(tiny()).train()
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
        block.norm1.register_full_backward_hook(lambda mod, gin, gout: seen.append(gout[0].is_contiguous()))
    model(torch.randn(3, 3, 8, 8), torch.rand(3), **conds()).pow(2).sum().backward()
    assert seen and all(seen), seen


def test_rms_norm_is_torchs_in_fp32_and_close_in_bf16():
    from model import RMSNorm
    norm = RMSNorm(24)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 7, 24, requires_grad=True)
    ours, theirs = norm(x), torch.nn.functional.rms_norm(x, (24,), norm.weight, 1e-6)
    assert torch.equal(ours, theirs)
    g = torch.randn_like(ours)
    assert torch.allclose(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(theirs, x, g)[0], atol=1e-6)
    low = norm(x.detach().bfloat16())
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), theirs.detach(), atol=0.04)


@pytest.mark.slow
def test_compiled_training_step_has_no_atomic_adds(tmp_path, monkeypatch):
    """Inductor's CPU kernels add with atomics from several threads where gradients scatter (an embedding's
    backward): such runs differ in the last bits from run to run. The compiled forward + backward of a
    class-, text- and image-conditioned model must have none, so compiled training is deterministic."""
    from torch._inductor.utils import run_and_get_code
    from model import compile_model
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = randomise(tiny())
    compiled = compile_model(model)
    xt, t = torch.randn(3, 3, 8, 8), torch.rand(3)

    def step():
        model.zero_grad()
        v = compiled(xt, t, **conds(), drop_y=torch.tensor([True, False, False]))
        v.square().mean().backward()
        return model.y_embed.weight.grad.clone()

    grad, code = run_and_get_code(step)
    assert code and any("cpp_fused" in c for c in code)        # inductor generated C++ kernels
    assert not [c for c in code if "atomic_add" in c]
    assert torch.equal(step(), grad)


def test_bf16_is_native_only_with_avx512_bf16_that_the_process_may_use(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert not bf16_is_native("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert bf16_is_native("cpu") and not bf16_is_native("mps")
    for isa, native in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True),
                        ("AVX10_1_512", True), ("ALL", True)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert bf16_is_native("cpu") == native, isa
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not bf16_is_native("cpu")


@pytest.mark.parametrize("major, native", [(7, False), (8, True)])   # V100/T4 emulate bf16; Ampere on runs it
def test_bf16_is_native_on_cuda_only_without_emulation(monkeypatch, major, native):
    """A GPU below compute capability 8 runs bf16 by emulation, which is_bf16_supported() counts by default:
    dtype='auto' must not pick it there. Mocked like torch's own function; also through the fallback for a torch
    whose is_bf16_supported has no including_emulation."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: major >= 8 or including_emulation)
    assert bf16_is_native("cuda") == native
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)   # older signature: counts emulation
    monkeypatch.setattr(torch.version, "hip", None)
    assert bf16_is_native("cuda") == native
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not bf16_is_native("cuda")


def test_aten_cpu_capability_avx2_makes_bf16_not_native_in_a_real_process():
    """The switch the README gives for running as a CPU without bf16, read by torch itself (not a mock): the
    capability that bf16_is_native reads says AVX2, so even a CPU with avx512_bf16 does not count as native."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import model, torch; print(torch.backends.cpu.get_cpu_capability(), model.bf16_is_native('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
                         capture_output=True, text=True, check=True)
    capability, native = out.stdout.split()
    assert native == "False"
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert capability == "AVX2"


FAULTS_PER_ROUND = """
import ctypes, resource, sys, torch
from model import keep_freed_cpu_memory
# glibc's documented starting thresholds (128 KiB: M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1), fixed, so that the
# default does not depend on what the imports happened to free before (glibc raises both as large blocks are freed)
ctypes.CDLL(None).mallopt(-3, 128 << 10), ctypes.CDLL(None).mallopt(-1, 128 << 10)
applied = keep_freed_cpu_memory() if sys.argv[1] == "keep" else None

def one_round():   # a step's worth of activations: 24 buffers of 4 MiB written, then all freed
    buffers = [torch.ones(1 << 20) for _ in range(24)]
    del buffers

one_round(); one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    one_round()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_cpu_memory tunes glibc's malloc")
def test_keep_freed_cpu_memory_stops_the_page_faults_of_buffers_freed_and_made_again():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_ROUND, mode], cwd=root, capture_output=True, text=True,
                             check=True)
        applied, faults = out.stdout.split()
        runs[mode] = (applied, float(faults))
    assert runs["keep"][0] == "True"
    # 24,576 pages a round: by default each 4 MiB block is mapped with mmap and unmapped when freed, and the next
    # round faults every page in again; kept, the rounds reuse the heap (a few pages move, < 5% of them)
    assert runs["default"][1] > 0.9 * 24576, runs
    assert runs["keep"][1] < 0.05 * 24576, runs


def test_training_memory_terms():
    """--dry_run's estimate, term by term: fused attention drops exactly the score matrices (5 heads N^2 b bytes a
    block), DDP adds its fp32 gradient buckets, FSDP shards the states and, with accumulation, adds whole grads."""
    P, N, b, D, heads, depth = 1_000_000, 256, 8, 384, 6, 12
    mem = lambda **kw: training_memory(**{**dict(n_params=P, tokens=N, batch_size=b, hidden=D, heads=heads,   # noqa: E731
                                                 depth=depth, grad_checkpoint=False, fused_attention=False), **kw})
    one = mem()
    assert one == {"states": 20 * P, "activations": depth * N * b * D * (34 + 5 * heads * N / D),
                   "ddp_buckets": 0, "fsdp_unsharded_grads": 0}
    assert one["activations"] - mem(fused_attention=True)["activations"] == pytest.approx(depth * 5 * heads * N * N * b)
    ckpt = mem(grad_checkpoint=True, fused_attention=True)["activations"]
    assert ckpt == depth * 2 * N * b * D + N * b * D * 34          # the stored inputs + one block recomputed
    assert mem(world_size=4, ddp=True) == {**one, "ddp_buckets": 4 * P}
    assert mem(world_size=4, ddp=True, fsdp=True) == {**one, "states": 5 * P}
    assert (mem(world_size=4, ddp=True, fsdp=True, grad_accum_steps=2)
            == {**one, "states": 5 * P, "fsdp_unsharded_grads": 4 * P})

