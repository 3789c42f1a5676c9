"""export.py: ONNX Runtime against PyTorch on the same inputs (guidance, its interval, dynamic batch
and text length), the same PNG from a full Euler run driven by ONNX Runtime, and the errors."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import run
from PIL import Image

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from model import DiT, DiTConfig  # noqa: E402
from export import export_onnx_model  # noqa: E402
from checkpoint import load_model  # noqa: E402
from sample import guided_velocity, sample_ode, save_grid  # noqa: E402

PARITY = 1e-4   # max |ONNX Runtime - PyTorch| of a velocity, fp32


def tiny_checkpoint(path, text_len=0, **model_args):
    """A checkpoint as train.py writes it, of a tiny model with random weights everywhere (adaLN-Zero's zeros
    too: a zero-initialised model would output 0 whatever the conditions), pixels 16x16, recipe sampler."""
    cfg = DiTConfig(in_channels=1, patch_size=4, hidden=32, depth=2, heads=2, **model_args)
    torch.manual_seed(0)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    data = dict(space="pixels", channels=1, vae=None, num_classes=cfg.num_classes,
                class_names=[f"c{i}" for i in range(cfg.num_classes)], buckets={"16x16": [16, 16]},
                text_encoder={"name": "tiny", "max_length": text_len} if cfg.text_dim else None,
                image_encoder={"name": "tiny"} if cfg.image_dim else None)
    config = dict(sample_steps=6, sample_solver="euler", sample_shift=2.0, sample_text_scale=3.0,
                  sample_image_scale=1.5, sample_guidance_interval=(0.3, 0.8), sample_temperature=0.9)
    torch.save(dict(model_args=asdict(cfg), model=model.state_dict(), ema=model.state_dict(), step=5,
                    config=config, data=data), path)
    return path


def exported_class_model(tmp_path_factory):
    """(checkpoint, model.onnx) of a tiny 4-class model exported as a user types it, once per session (the web
    test samples it too)."""
    root = tmp_path_factory.getbasetemp() / "onnx-class"
    ckpt, onnx_path = root / "ckpt-00000005.pt", root / "model.onnx"
    if not onnx_path.exists():
        root.mkdir(exist_ok=True)
        tiny_checkpoint(ckpt, num_classes=4)
        proc = run("export.py", f"--ckpt={ckpt}", f"--out={onnx_path}", "--steps=12")
        assert f"wrote {onnx_path}" in proc.stdout
    return ckpt, onnx_path


def onnx_v_fn(session, cond, text_scale, image_scale, interval):
    """sample_ode's v_fn from an exported graph: the ONNX counterpart of guided_velocity."""
    fixed = {"scales": np.array([text_scale, image_scale], np.float32), "interval": np.array(interval, np.float64),
             **{n: c.numpy() for n, c in cond.items()}}

    def v_fn(xt, t):
        feed = {"xt": xt.numpy(), "t": np.ascontiguousarray(t.numpy()), **fixed}
        return torch.from_numpy(session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0])
    return v_fn


def conditions(cfg, B, L, seed):
    g = torch.Generator().manual_seed(seed)
    cond = {}
    if cfg.num_classes:
        cond["y"] = torch.arange(B) % cfg.num_classes
    if cfg.text_dim:
        cond["text"] = torch.randn(B, L, cfg.text_dim, generator=g)
        cond["text_mask"] = torch.arange(L)[None] < torch.arange(B)[:, None] % L + 1    # 1..L valid tokens
    if cfg.image_dim:
        cond["image_emb"] = torch.randn(B, cfg.image_dim, generator=g)
    return cond


def ort_session(onnx_path):
    options = ort.SessionOptions()
    options.log_severity_level = 3            # not the notes on an initializer the exporter left unused
    return ort.InferenceSession(str(onnx_path), options)


def check_parity_and_euler(model, onnx_path, png_dir, text_scale, image_scale, interval, L=0, guidance="nested"):
    """Velocities at t inside and outside the guidance interval, at a batch size and text length other than the
    traced ones, then a full Euler run each way written as PNG grids. Returns (max velocity diff, PNG diff)."""
    session = ort_session(onnx_path)
    B = 5
    cond = conditions(model.cfg, B, L, seed=1)
    torch_v = guided_velocity(model, cond, text_scale, image_scale, interval, guidance)
    onnx_v = onnx_v_fn(session, cond, text_scale, image_scale, interval)
    g = torch.Generator().manual_seed(2)
    worst = 0.0
    for t in (0.1, 0.5, 0.9):                           # below, inside and above interval=(0.3, 0.8)
        xt = torch.randn(B, 1, 16, 16, generator=g)
        tt = torch.full((B,), t)
        a, b = torch_v(xt, tt), onnx_v(xt, tt)
        worst = max(worst, (a - b).abs().max().item())
    noise = torch.randn(B, 1, 16, 16, generator=g)
    grids = []
    for name, v_fn in (("torch", torch_v), ("onnx", onnx_v)):
        x = sample_ode(v_fn, noise, steps=6, shift=2.0)
        save_grid(((x + 1) / 2).clamp(0, 1), str(png_dir / f"{name}.png"), nrow=B)
        grids.append(np.asarray(Image.open(png_dir / f"{name}.png")).astype(int))
    return worst, np.abs(grids[0] - grids[1]).max()


def test_class_model_exports_from_the_command_line_with_parity_and_the_same_png(tmp_path, tmp_path_factory):
    ckpt, onnx_path = exported_class_model(tmp_path_factory)
    info = json.loads(onnx_path.with_suffix(".json").read_text())
    assert info["format"] == "nanodit-onnx/1" and info["onnx"] == "model.onnx" and info["space"] == "pixels"
    assert info["inputs"] == {"xt": ["batch", 1, 16, 16], "t": ["batch"], "scales": [2], "interval": [2],
                              "y": ["batch"]}                                # batch dynamic
    assert info["class_names"] == ["c0", "c1", "c2", "c3"] and (info["height"], info["width"]) == (16, 16)
    # the recipe's sampler, with the command line's steps over it
    assert info["sampler"] == {"steps": 12, "solver": "euler", "shift": 2.0, "text_scale": 3.0, "image_scale": 1.5,
                               "guidance_interval": [0.3, 0.8], "guidance": "nested", "temperature": 0.9}
    assert info["max_abs_diff_vs_torch"] <= PARITY
    model, _ = load_model(str(ckpt))
    worst, png = check_parity_and_euler(model, onnx_path, tmp_path, 3.0, 1.0, (0.3, 0.8))
    print(f"class model: max |v_onnx - v_torch| = {worst:.2e}, PNG max diff {png}")
    assert worst <= PARITY and png <= 1


@pytest.mark.slow   # an export of its own: about 30 s on 2 cores
def test_text_and_image_model_exports_with_parity_and_the_same_png(tmp_path):
    """Dual guidance (3 branches), a padding mask, a text length other than the traced one, the image's
    cross-attention tokens beside the caption's, a block over the caption's tokens."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt", text_len=5, text_dim=16, image_dim=8, image_tokens=2, text_layers=1)
    model, state = load_model(str(ckpt))
    sampler = dict(steps=6, solver="euler", shift=2.0, text_scale=3.0, image_scale=1.5, guidance_interval=(0.3, 0.8))
    info = export_onnx_model(model, state, str(tmp_path / "ti.onnx"), sampler)
    assert info["inputs"]["text"] == ["batch", "text_len", 16] and info["inputs"]["image_emb"] == ["batch", 8]
    assert list(info["inputs"]) == ["xt", "t", "scales", "interval", "text", "text_mask", "image_emb"]
    assert info["max_abs_diff_vs_torch"] <= PARITY
    worst, png = check_parity_and_euler(model, tmp_path / "ti.onnx", tmp_path, 3.0, 1.5, (0.3, 0.8), L=3)
    print(f"text + image model: max |v_onnx - v_torch| = {worst:.2e}, PNG max diff {png}")
    assert worst <= PARITY and png <= 1
    # the image scale alone still guides (3 branches); both scales 1 give the conditional velocity
    for scales in ((1.0, 2.0), (1.0, 1.0)):
        w, _ = check_parity_and_euler(model, tmp_path / "ti.onnx", tmp_path, *scales, (0.0, 1.0), L=5)
        assert w <= PARITY
    # composed guidance (sample.py's docstring) is exported as such, and recorded in the JSON
    info = export_onnx_model(model, state, str(tmp_path / "tc.onnx"), {**sampler, "guidance": "composed"})
    assert info["sampler"]["guidance"] == "composed" and info["max_abs_diff_vs_torch"] <= PARITY
    worst, _ = check_parity_and_euler(model, tmp_path / "tc.onnx", tmp_path, 3.0, 1.5, (0.3, 0.8), L=3,
                                      guidance="composed")
    nested, _ = check_parity_and_euler(model, tmp_path / "ti.onnx", tmp_path, 3.0, 1.5, (0.3, 0.8), L=3,
                                       guidance="composed")
    assert worst <= PARITY < nested                  # the nested graph does not compute the composed velocity


def test_a_model_with_an_op_onnx_lacks_is_named(tmp_path, monkeypatch):
    model, state = load_model(str(tiny_checkpoint(tmp_path / "ckpt.pt")))    # unconditional: the quickest export

    class CumMax(torch.nn.Module):   # an op with no ONNX translation in torch.onnx
        def forward(self, x):
            return x + 0 * torch.cummax(x, dim=-1).values
    model.blocks[0].mlp.append(CumMax())
    sampler = dict(steps=4, solver="euler", shift=1.0, text_scale=3.0, image_scale=1.0, guidance_interval=(0.0, 1.0))
    with pytest.raises(SystemExit, match=r"cannot export this checkpoint's model: .*aten\.cummax"):
        export_onnx_model(model, state, str(tmp_path / "bad.onnx"), sampler)


def test_a_mixture_of_experts_with_guidance_is_refused_with_the_reason(tmp_path):
    model, state = load_model(str(tiny_checkpoint(tmp_path / "ckpt.pt", num_classes=4, moe_experts=4)))
    sampler = dict(steps=4, solver="euler", shift=1.0, text_scale=3.0, image_scale=1.0, guidance_interval=(0.0, 1.0))
    with pytest.raises(SystemExit, match=r"mixture of experts \(moe_experts=4\).*cannot trace MoE\.forward"):
        export_onnx_model(model, state, str(tmp_path / "moe.onnx"), sampler)
    assert not (tmp_path / "moe.onnx").exists()


def test_export_refuses_both_weight_sets(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt.pt", num_classes=4)
    proc = run("export.py", f"--ckpt={ckpt}", f"--out={tmp_path / 'm.onnx'}", "--ema=both", check=False)
    assert proc.returncode != 0 and "export.py: exports one set of weights" in proc.stderr
    proc = run("export.py", f"--ckpt={ckpt}", check=False)
    assert proc.returncode != 0 and "--out=PATH.onnx is required" in proc.stderr
    proc = run("sample.py", f"--ckpt={ckpt}", f"--export_onnx={tmp_path / 'm.onnx'}", check=False)   # moved out
    assert proc.returncode != 0 and "unknown config key 'export_onnx'" in proc.stderr
