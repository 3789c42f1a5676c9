"""Export a trained NanoDiT checkpoint's guided velocity network as ONNX, for the browser page in web/.

    python export.py --ckpt=out/mnist --out=web/model.onnx     # writes web/model.onnx + web/model.json

Writes the graph and beside it a JSON of what a sampler needs (shapes, the flow convention, classes, the recipe's
sampler), then checks ONNX Runtime against PyTorch (sample.guided_velocity) and prints the largest difference.
Needs: pip install onnx onnxscript (and onnxruntime for the check).
"""
import io
import json
import os
import sys

import torch

from checkpoint import load_model, resolve_checkpoint
from sample import (BOTH_BRANCHES, ONE_BRANCHES, check_settings, combine, guided_velocity, sampler_settings,
                    use_recipe_sampler)

# ----------------------------------------------------------------------------------------------
ckpt = ""            # a checkpoint file, or an out_dir (its newest checkpoint)
out = ""             # the ONNX file to write (required), e.g. web/model.onnx; its .json is written beside it
ema = "true"         # weights: 'true' (EMA) or 'false' (raw trained weights)
# The sampler the JSON recommends: sample.py's settings (sample.SAMPLER), defaults and comments. A checkpoint's
# recipe (train.py's sample_* settings) replaces them; the command line overrides both (sample.use_recipe_sampler).
from sample import (steps, solver, shift, text_scale, image_scale, guidance_interval, guidance,  # noqa: E402,F401
                    temperature)
# ----------------------------------------------------------------------------------------------

# One graph: (xt, t, scales, interval, the checkpoint's conditions) -> guided_velocity's velocity, the guidance
# branches batched in one forward; batch and text length dynamic. Made by torch.onnx's dynamo exporter
# (torch.export + onnxscript): the TorchScript exporter (dynamo=False) has no ONNX form for aten::rms_norm
# (QK-norm) at its opsets, nor for the text mask's in-place `|=`. SDPA exports as MatMul + Softmax.
ONNX_OPSET = 18
ONNX_FORMAT = "nanodit-onnx/1"   # the JSON's format tag: what web/app.js and other samplers check


class GuidedVelocity(torch.nn.Module):
    """guided_velocity as one module for export. Takes every condition the model has (all real: no nulls),
    scales (2,) = (text/class scale, image scale) and interval (2,) = (lo, hi) in float64. As guided_velocity:
    all branches batched where lo <= t[0] <= hi and a scale is not 1, else one conditional forward (torch.cond,
    an ONNX If), so an exported sampler costs the same forwards."""

    def __init__(self, model, guidance="nested"):
        super().__init__()
        cfg = model.cfg
        self.model, self.text_first = model, bool(cfg.num_classes or cfg.text_dim)
        self.names = [n for n, on in (("y", cfg.num_classes), ("text", cfg.text_dim), ("text_mask", cfg.text_dim),
                                      ("image_emb", cfg.image_dim)) if on]
        has_image = bool(cfg.image_dim)
        self.guidance = guidance   # the branches and their combination: sample.py's, shared
        self.branches = (BOTH_BRANCHES[guidance] if self.text_first and has_image else
                         ONE_BRANCHES if self.text_first or has_image else [(False, False)])

    def velocity(self, branches, xt, t, scales, *conds):
        k = len(branches)
        keep = torch.zeros_like(t, dtype=torch.bool)
        drop_t = torch.cat([keep | d for d, _ in branches])                         # (k B,)
        drop_i = torch.cat([keep | d for _, d in branches])
        rep = {n: torch.cat([c] * k) for n, c in zip(self.names, conds)}
        v = self.model(torch.cat([xt] * k), torch.cat([t] * k), **rep, drop_y=drop_t, drop_text=drop_t,
                       drop_image=drop_i).float()
        if k == 1:
            return v
        v = v.unflatten(0, (k, -1))                     # not chunk(k): torch.export would fix the batch size on it
        return combine(v, scales[0], scales[1], self.text_first, self.guidance)

    def forward(self, xt, t, scales, interval, y=None, text=None, text_mask=None, image_emb=None):
        given = dict(y=y, text=text, text_mask=text_mask, image_emb=image_emb)
        operands = (xt, t, scales, *(given[n] for n in self.names))
        if len(self.branches) == 1:
            return self.velocity(self.branches, *operands)
        t0 = t[0].double()       # compared in float64, as guided_velocity compares t[0] with Python floats
        if len(self.branches) == 3:
            scaled = (scales[0] != 1) | (scales[1] != 1)
        else:
            scaled = scales[0 if self.text_first else 1] != 1
        return torch.cond((interval[0] <= t0) & (t0 <= interval[1]) & scaled,
                          lambda *ops: self.velocity(self.branches, *ops),
                          lambda *ops: self.velocity([(False, False)], *ops), operands)


def export_onnx_model(model, state, path, sampler):
    """Write model + guidance as ONNX at `path` and beside it a JSON of what a sampler needs (shapes, the flow
    convention, classes, the default sampler); check it against guided_velocity with ONNX Runtime at a batch size
    other than the traced one, inside and outside the guidance interval. Returns the JSON dict."""
    cfg, meta = model.cfg, state["data"]
    # requires_grad off: torch.cond traces autograd too otherwise
    net = GuidedVelocity(model.float().eval().requires_grad_(False), sampler.get("guidance", "nested"))
    if cfg.moe_experts and len(net.branches) > 1:
        sys.exit(f"export.py: this checkpoint's MLPs are a mixture of experts (moe_experts="
                 f"{cfg.moe_experts}), which does not export with guidance: the guidance interval is a torch.cond "
                 "(an ONNX If: one conditional forward outside it), and torch.cond cannot trace MoE.forward, which "
                 "stores its routing statistics (aux_loss, dropped, load) on the module (a side effect)")
    try:
        import onnxscript  # noqa: F401  the dynamo exporter builds the ONNX graph with it
    except ImportError:
        sys.exit("export.py needs: pip install onnx onnxscript (and onnxruntime to check the export)")
    H, W = max(meta["buckets"].values(), key=lambda hw: hw[0] * hw[1])
    down = meta["vae"]["downsample"] if meta["vae"] else 1
    shape, L = (cfg.in_channels, H // down, W // down), meta["text_encoder"]["max_length"] if cfg.text_dim else 0
    names = ["xt", "t", "scales", "interval", *net.names]
    lo, hi = sampler["guidance_interval"]

    def example(B, t=None):
        g = torch.Generator().manual_seed(B)
        return {"xt": torch.randn(B, *shape, generator=g), "t": torch.rand(B, generator=g) if t is None else
                torch.full((B,), t), "scales": torch.tensor([sampler["text_scale"], sampler["image_scale"]]),
                "interval": torch.tensor([lo, hi], dtype=torch.float64), "y": torch.arange(B) % max(cfg.num_classes, 1),
                "text": torch.randn(B, L, cfg.text_dim, generator=g), "text_mask": torch.arange(L).expand(B, L) < L - 1,
                "image_emb": torch.randn(B, cfg.image_dim, generator=g)}
    ex = example(2)
    batch, text_len = torch.export.Dim("batch", min=1), torch.export.Dim("text_len", min=2)
    dims = {"xt": {0: batch}, "t": {0: batch}, "scales": None, "interval": None, "y": {0: batch},
            "text": {0: batch, 1: text_len}, "text_mask": {0: batch, 1: text_len}, "image_emb": {0: batch}}
    import contextlib
    import logging
    import warnings
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)              # 'torchvision is not installed' notes
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):   # the exporter's progress lines
            warnings.simplefilter("ignore")
            torch.onnx.export(net, tuple(ex[n] for n in names[:4]), path, kwargs={n: ex[n] for n in names[4:]},
                              input_names=names, output_names=["v"], opset_version=ONNX_OPSET,
                              dynamic_shapes={n: dims[n] for n in names}, dynamo=True, external_data=False)
    except Exception as e:
        summary = str(e).split("## Exception summary")[-1].strip().splitlines()
        sys.exit(f"export.py: torch.onnx.export cannot export this checkpoint's model: "
                 f"{type(e).__name__}: {summary[0] if summary else ''}"[:1500])
    import onnx
    proto = onnx.load(path)

    def strip(graph):    # the exporter's Python stack trace on every node: 3/4 of the file for the quick-start model
        for node in graph.node:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    strip(attr.g)
    strip(proto.graph)
    onnx.save(proto, path)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    names = list(inputs)                                  # an unconditional model needs no scales nor interval
    info = {"format": ONNX_FORMAT, "onnx": os.path.basename(path), "output": "v", "inputs": inputs,
            "flow": "xt = (1 - t) x + t noise: t = 1 noise, t = 0 data; v = noise - x; Euler x <- x + (t_next - t) v "
                    "over the times linspace(1, 0, steps + 1) (float32) warped by t' = shift t / (1 + (shift - 1) t)",
            "guidance": "scales = (text or class, image), interval = (lo, hi) float64: all branches where lo <= t[0] "
                        "<= hi and a scale is not 1, else one conditional forward; formulas in sample.py's docstring",
            "space": meta["space"], "pixel_range": [-1, 1], "vae": meta["vae"], "height": H, "width": W,
            "num_classes": cfg.num_classes, "class_names": meta.get("class_names") or [],
            "text_encoder": meta["text_encoder"], "image_encoder": meta["image_encoder"],
            "sampler": {**sampler, "guidance_interval": [lo, hi]}, "step": state["step"]}
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    for t in [(lo + hi) / 2] + [(1 + hi) / 2] * (hi < 1) + [lo / 2] * (lo > 0) if onnxruntime else []:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3                   # not the notes on initializers the exporter left unused
        ex = example(3, t)                               # not the traced batch size: the batch must be dynamic
        try:
            got = onnxruntime.InferenceSession(path, options).run(None, {n: ex[n].numpy() for n in names})[0]
        except Exception as e:
            sys.exit(f"export.py: ONNX Runtime cannot run the exported {path} at batch size 3 "
                     f"(traced at 2): {type(e).__name__}: {str(e)[:500]}")
        # t inside the interval, and outside where there is
        want = guided_velocity(model, {n: ex[n] for n in net.names}, sampler["text_scale"], sampler["image_scale"],
                               (lo, hi), net.guidance)(ex["xt"], ex["t"])
        info["max_abs_diff_vs_torch"] = max(info.get("max_abs_diff_vs_torch", 0.0),
                                            (torch.from_numpy(got) - want).abs().max().item())
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(info, f, indent=1)
    return info


def main(given):
    check_settings(globals())
    if str(ema).lower() == "both":
        sys.exit("export.py: exports one set of weights: --ema=true or --ema=false")
    path = resolve_checkpoint(ckpt) if ckpt else sys.exit("export.py: --ckpt=PATH is required")
    if not out:
        sys.exit("export.py: --out=PATH.onnx is required")
    model, state = load_model(path, str(ema).lower() == "true")
    use_recipe_sampler(globals(), state["config"], given)
    info = export_onnx_model(model, state, out, sampler_settings(globals()))
    print(f"wrote {out} and {os.path.splitext(out)[0]}.json (inputs {', '.join(info['inputs'])}; "
          f"ONNX Runtime vs PyTorch max |diff| {info.get('max_abs_diff_vs_torch', 'not checked: no onnxruntime')})")


if __name__ == "__main__":
    from configurator import apply_overrides
    main(apply_overrides(globals(), sys.argv[1:]))
