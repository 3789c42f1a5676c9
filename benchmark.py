"""Speed of NanoDiT on this machine: matmul peak, train steps and MFU, attention, sampling, data loading.

    python benchmark.py                     # the full run (~4 minutes on an idle 2-core CPU), a markdown table
    python benchmark.py --quick=true        # tiny sizes and one repeat, a few seconds (the smoke test)
    python benchmark.py --compare_rev=HEAD~1  # also the step of model.py at that commit against this one's

Every timing is the median over `repeats` runs after `warmup` untimed ones; variants compared with
each other run interleaved. MFU = 3 * forward FLOPs (model.flops_per_image) * images/s / matmul peak
of the same dtype: the fraction of what this device's best square matmul does. Numbers: BENCHMARKS.md.
"""
import ast
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import prepare_data
from configurator import apply_overrides
from data import FORMAT, VERSION, ShardStream, load_index, shard_members
from model import (DiT, attention, bf16_is_native, compile_model, flow_loss, interpolate,
                   keep_freed_cpu_memory)
from sample import SOLVERS, guided_velocity, sample_ode

# ----------------------------------------------------------------------------------------------
quick = False             # tiny sizes, one repeat, no train.py subprocess: a smoke test in seconds
repeats = 5               # timed runs per measurement (the median is reported)
warmup = 1                # untimed runs before them
matmul_size = 2048        # side of the square matmuls for the peak
recipes = "mnist,small"   # config/<name>.py recipes to train and sample
sample_steps = 32         # Euler steps per sample (2 guidance branches each)
loader_batches = 50       # batches drawn per data-loader measurement
end_to_end = True         # also run the real train.py on MNIST in a subprocess
e2e_steps = 200           # its optimizer steps (metrics every 50; the first record is warm-up); each run is followed
                          # by as many bare train steps, and the row gives the median ratio of these pairs
bf16 = "auto"             # measure bf16 too: 'auto' (only where the CPU has it natively), 'true', 'false'
batch_sweep = "8,16,32,64"  # batch sizes of the quick-start train step sweep ('' = none)
sampler_sweep = "euler:16,euler:32,heun:16"  # quick-start samplers timed, as solver:steps ('' = none): each guided
                          # on every step and on the recipe's guidance interval (sample_guidance_interval)
profile_top = 8           # operators listed from torch.profiler of one quick-start train step (0 = none)
op_replay = True          # replay each recipe's train step operator by operator: the time of its matmuls and attention
                          # alone (so the MFU the step would reach if nothing else took time), of every operator alone,
                          # and of every operator in order, each on inputs of its own (what caches and dispatch cost)
compare_rev = ""          # also time each recipe's train step (and the quick start's sampling) with model.py as it was
                          # at this git revision (e.g. HEAD~1), interleaved with this one: what a model change gained
keep_freed_memory = True  # as train.py and sample.py: malloc keeps freed memory for the next step (model.keep_freed_cpu_memory);
                          # False measures glibc's default (run both, alternated, for the ratio; the train.py row follows it)
compare_compile = False   # also time each recipe's train step (and the quick start's sampling) with torch.compile
                          # against eager, interleaved (a minute or two of compilation; needs a C++ compiler on a CPU);
                          # with compare_rev also set, that revision's model joins them and is the base of the ratios
# ----------------------------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# recipe -> the input it is measured at (C, H, W): MNIST pixels, and 32x32x4 latents (256x256 images
# through an 8x VAE) for small, which is what small is for; 256 tokens at patch 2
INPUTS = {"mnist": (1, 28, 28), "small": (4, 32, 32), "medium": (4, 32, 32), "large": (4, 64, 64)}
SAMPLE_BATCH = {"mnist": 16, "small": 2, "medium": 2, "large": 1}   # images per sampling call (time, not memory)
IMPLS = ("sdpa", "math")
ADAMW_IMPLS = ("single", "foreach", "fused")


def median_times(fns, n_repeats, n_warmup):
    """{name: median seconds} of each fn() in `fns`, run interleaved (a, b, a, b, ...) so that load
    from other processes hits every variant alike and their ratios stay meaningful."""
    for _ in range(n_warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(n_repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def autocast_for(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()


def train_defaults():
    """train.py's module-level defaults, parsed (not imported: train.py trains on import)."""
    tree = ast.parse(open(os.path.join(HERE, "train.py")).read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def recipe(name):
    """train.py's defaults overridden by config/<name>.py, exactly as train.py resolves them."""
    cfg = train_defaults()
    apply_overrides(cfg, [os.path.join(HERE, "config", f"{name}.py")])
    return cfg


def build_model(cfg, in_channels, num_classes, model_module=None, **changes):
    """The recipe's model (every DiTConfig field the recipe sets), from this model.py or from `model_module`
    (an older model.py: the fields it predates are left out)."""
    mod = model_module or sys.modules[DiT.__module__]
    names = {f.name for f in dataclasses.fields(mod.DiTConfig)}
    args = {k: v for k, v in cfg.items() if k in names}
    args.update(in_channels=in_channels, num_classes=num_classes, **changes)
    return mod.DiT(mod.DiTConfig(**args))


def model_at(rev):
    """model.py as it was at git revision `rev`, imported as a module of its own."""
    out = subprocess.run(["git", "-C", HERE, "show", f"{rev}:model.py"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"compare_rev={rev!r}: git show {rev}:model.py failed: {out.stderr.strip()}")
    path = os.path.join(tempfile.mkdtemp(), "model_at_rev.py")
    with open(path, "w") as f:
        f.write(out.stdout)
    spec = importlib.util.spec_from_file_location("model_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def matmul_fn(n, dtype):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return lambda: a @ b


def train_step_fn(model, batch_size, shape, dtype, p_uncond=0.1):
    """One optimizer step of train.py's loop: forward, the recipe's loss (model.flow_loss with the model's
    prediction, and train.py's learned loss weighting where the model has it), backward, clip, fused AdamW, EMA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, fused=True)
    ema = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(batch_size, *shape)
    y = torch.randint(0, model.cfg.num_classes or 1, (batch_size,))
    prediction = getattr(model.cfg, "prediction", "v")      # an older model.py (compare_rev) may predate these
    weighting = getattr(model.cfg, "loss_weighting", False)

    def step():
        t = torch.sigmoid(torch.randn(batch_size))
        noise = torch.randn_like(x)
        drop = torch.rand(batch_size) < p_uncond
        with autocast_for(dtype):
            v = model(interpolate(x, noise, t), t, y=y if model.cfg.num_classes else None, drop_y=drop)
        per_sample = flow_loss(v, x, noise, t, prediction)             # (B,)
        if weighting:
            logvar = model.loss_logvar_t
            per_sample = per_sample * torch.exp(-logvar) + logvar
        loss = per_sample.sum() / batch_size
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(model.parameters()), 1e-3)
    return step


def adamw_fn(model, impl):
    """One AdamW step over `model`'s parameters with random gradients; impl 'single' (torch's default
    on a CPU: a Python loop over tensors), 'foreach' or 'fused' (what train.py uses)."""
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    kw = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[impl]
    return torch.optim.AdamW(params, lr=1e-4, **kw).step


def attention_fn(impl, dtype, B=8, heads=6, N=256, d=64):
    q, k, v = (torch.randn(B, heads, N, d, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, heads, N, d, dtype=dtype)
    return lambda: attention(q, k, v, None, impl).backward(grad)


def forward_fn(model, n, shape, dtype):
    """One guided sampling step's forward (n images = 2 branches x n/2) without autograd."""
    model.eval()
    x, t, y = torch.randn(n, *shape), torch.rand(n), torch.arange(n) % max(model.cfg.num_classes, 1)

    @torch.no_grad()
    def run():
        with autocast_for(dtype):
            model(x, t, y=y if model.cfg.num_classes else None)
    return run


def sample_fn(model, n, shape, dtype, steps, solver="euler", interval=(0.0, 1.0)):
    """Sampling n images from noise: `steps` of `solver`, class guidance (2 batched branches) while t is in
    `interval`, one conditional forward elsewhere. run() returns the network forwards per image it took."""
    model.eval()
    cond = {"y": torch.arange(n) % model.cfg.num_classes} if model.cfg.num_classes else {}
    noise = torch.randn(n, *shape)

    def run():
        v_fn = guided_velocity(model, cond, 2.0, 1.0, interval)
        with autocast_for(dtype):
            sample_ode(v_fn, noise, steps, solver)
        return v_fn.forwards
    return run


def header_fn(shards, impl):
    """Reading every member header of `shards` as ShardReader opens a shard: impl 'shard_members' (its reader) or
    'tarfile' (tarfile's own parser, member by member). run() returns the number of members."""
    import tarfile

    def run():
        n = 0
        for path in shards:
            with tarfile.open(path) as tar:
                if impl == "tarfile":
                    while tar.next() is not None:
                        n += 1
                else:
                    n += sum(len(fields) for _, fields in shard_members(tar))
        return n
    return run


def parse_sampler_sweep(spec):
    """'euler:16,heun:16' -> [('euler', 16), ('heun', 16)]; an error names the entry that does not parse."""
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        solver, _, steps = entry.partition(":")
        if solver not in SOLVERS or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"benchmark.py: sampler_sweep entry {entry!r}: expected solver:steps with solver one of "
                             f"{', '.join(SOLVERS)} and steps >= 1, e.g. 'euler:32,heun:16'")
        out.append((solver, int(steps)))
    return out


def write_latent_shards(root, n_samples, shape=(4, 32, 32), text_len=77, text_dim=384, shard_size=100):
    """Synthetic shards shaped like the small recipe's data: float16 latents + T5-sized token embeddings."""
    rng = np.random.default_rng(0)
    d = 8
    bucket = f"{shape[1] * d}x{shape[2] * d}"
    shards = []
    for s in range(0, n_samples, shard_size):
        rel = f"train/{bucket}/shard-{s // shard_size:06d}.tar"
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        count = min(shard_size, n_samples - s)
        prepare_data.write_shard(os.path.join(root, rel), (
            (f"{s + i:09d}", {"x.npy": prepare_data.npy_bytes(rng.standard_normal(shape).astype(np.float16)),
                              "txt": b"a synthetic caption",
                              "text.npy": prepare_data.npy_bytes(rng.standard_normal((text_len, text_dim)).astype(np.float16))})
            for i in range(count)))
        shards.append({"path": rel, "count": count})
    index = {"format": FORMAT, "version": VERSION, "complete": True, "space": "latents",
             "channels": shape[0], "vae": {"name": "synthetic", "downsample": d, "scaling_factor": 1.0},
             "text_encoder": {"name": "synthetic", "dim": text_dim, "max_length": text_len}, "image_encoder": None,
             "num_classes": 0, "class_names": [], "has_flip": False, "buckets": {bucket: [shape[1] * d, shape[2] * d]},
             "splits": {"train": {bucket: shards}, "val": {}}}
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    return root


def loader_rate(root, num_workers, n_batches, batch_size=8):
    """Samples/s drawn through a DataLoader as train.py builds it, after the first batch (worker start-up)."""
    stream = ShardStream(root, "train", batch_size=batch_size)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    rate = n_batches * batch_size / (time.perf_counter() - t0)
    del it
    return rate


def prepare_mnist(data):
    subprocess.run([sys.executable, "prepare_data.py", f"--out_dir={data}"], cwd=HERE, check=True, capture_output=True)
    return data


def run_train_py(data, out, steps):
    """img/s of the real `python train.py config/mnist.py`, median over its metrics records after the first."""
    subprocess.run([sys.executable, "train.py", "config/mnist.py", f"--max_steps={steps}", f"--log_interval={steps // 4}",
                    "--sample_interval=0", f"--out_dir={out}", f"--data_dir={data}", "--resume=never",
                    f"--keep_freed_memory={keep_freed_memory}"],
                   cwd=HERE, check=True, capture_output=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if "img_per_s" in line]
    return statistics.median(r["img_per_s"] for r in records[1:])


def measured_dtypes():
    """{name: dtype} to measure: fp32 always; bf16 where the CPU runs it natively (emulated bf16 says nothing)."""
    if bf16 not in ("auto", "true", "false"):
        raise SystemExit(f"benchmark.py: bf16={bf16!r}: expected 'auto', 'true' or 'false'")
    native = bf16_is_native("cpu")
    return {name: DTYPES[name] for name in ("fp32", "bf16")
            if name == "fp32" or bf16 == "true" or bf16 == "auto" and native}


def profile_step(step, n_steps, top):
    """[(operator, % of self CPU time, ms per step)] of the `top` heaviest operators over n_steps calls of step."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n_steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [(e.key, 100 * e.self_cpu_time_total / total, e.self_cpu_time_total / 1e3 / n_steps) for e in events[:top]]


ATEN = torch.ops.aten
MATMULS = (ATEN.mm.default, ATEN.addmm.default, ATEN.bmm.default, ATEN.baddbmm.default)
ATTENTION = tuple(op for name in ("_scaled_dot_product_flash_attention_for_cpu",
                                  "_scaled_dot_product_flash_attention_for_cpu_backward",
                                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
                                  "_scaled_dot_product_efficient_attention",
                                  "_scaled_dot_product_efficient_attention_backward")
                  if hasattr(ATEN, name) for op in [getattr(ATEN, name).default])


@dataclasses.dataclass(frozen=True)
class _Layout:
    shape: tuple
    stride: tuple
    offset: int
    dtype: torch.dtype

    @property
    def storage_size(self):
        """Elements of the smallest storage that holds this layout."""
        if 0 in self.shape:
            return self.offset
        return self.offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))

    def tensor(self):
        """A tensor of this layout on storage of its own: random floats, zeros for integers and bools (valid indices)."""
        base = (torch.randn(self.storage_size, dtype=self.dtype) if self.dtype.is_floating_point
                else torch.zeros(self.storage_size, dtype=self.dtype))
        return base.as_strided(self.shape, self.stride, self.offset)


class _RecordOps(TorchDispatchMode):
    """Every ATen operator that runs while active, with each tensor argument reduced to its layout."""
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        layout = lambda a: _Layout(a.shape, a.stride(), a.storage_offset(), a.dtype) if isinstance(a, torch.Tensor) else a
        self.ops.append((func, tree_map(layout, args), tree_map(layout, kwargs)))
        return func(*args, **kwargs)


def matmul_flops(func, args):
    """FLOPs (2 per multiply-add) of one recorded mm / addmm / bmm / baddbmm."""
    a, b = (args[0], args[1]) if func in (ATEN.mm.default, ATEN.bmm.default) else (args[1], args[2])
    return 2 * math.prod(a.shape) * b.shape[-1]


REPLAY_MAX_BYTES = 2 << 30   # inputs of its own for every operator of a step only up to this much memory


def record_ops(step):
    """[(func, args, kwargs)] of the operators of one call of step (after one untimed call), tensors as _Layout."""
    step()
    with _RecordOps() as rec:
        step()
    return rec.ops


def replay_calls(ops, shared):
    """The recorded operators with tensors made in their recorded layouts: one tensor per distinct layout if
    `shared` (little memory; operators reuse inputs another just used, so caches are warm), else inputs of its own
    for every operator (as the step's saved activations, they are cold by the time they are read)."""
    made = {}
    is_layout = lambda a: isinstance(a, _Layout)
    make = lambda a: (made.setdefault(a, a.tensor()) if shared else a.tensor()) if is_layout(a) else a
    return [(f, tree_map(make, a, is_leaf=is_layout), tree_map(make, k, is_leaf=is_layout)) for f, a, k in ops]


def op_replay_times(step, n_repeats):
    """Where a step's time goes, without a profiler's overhead. Seconds per step of: the step; its matmuls alone
    ('matmul'); its matmuls and attention products alone ('heavy'), both in warm caches (so these give the most the
    step could reach if nothing else took time); every operator alone, each repeated on its inputs ('alone'); every
    operator in the recorded order, each on inputs of its own ('in_order', None where those would take more than
    REPLAY_MAX_BYTES: 'in_order_bytes' says how much). Also the counts ('ops', 'heavy_ops') and the matmuls' FLOPs
    ('flops'). Replaying calls each operator from Python, a few us each that the step pays too. Denormals are
    flushed while replaying, so that in-place operators repeated on the same inputs do not slow down."""
    ops = record_ops(step)
    calls = replay_calls(ops, shared=True)
    mm = [c for c in calls if c[0] in MATMULS]
    heavy = [c for c in calls if c[0] in MATMULS + ATTENTION]
    run = lambda cs: [f(*a, **k) for f, a, k in cs]
    layouts = [x for _, a, k in ops for x in tree_flatten((a, k))[0] if isinstance(x, _Layout)]
    in_order_bytes = sum(x.dtype.itemsize * x.storage_size for x in layouts)
    fns = {"step": step, "matmul": lambda: run(mm), "heavy": lambda: run(heavy)}
    if in_order_bytes <= REPLAY_MAX_BYTES:
        own = replay_calls(ops, shared=False)
        fns["in_order"] = lambda: run(own)
    torch.set_flush_denormal(True)
    try:
        t = median_times(fns, n_repeats, 1)
        t["alone"] = sum(median_times({0: lambda: f(*a, **k)}, 5, 1)[0] for f, a, k in calls)
    finally:
        torch.set_flush_denormal(False)
    return dict(t, in_order=t.get("in_order"), in_order_bytes=in_order_bytes, ops=len(calls), heavy_ops=len(heavy),
                flops=sum(matmul_flops(f, a) for f, a, _ in mm))


def main():
    n_rep, n_warm = (1, 1) if quick else (repeats, warmup)
    kept = keep_freed_memory and keep_freed_cpu_memory()
    tiny = dict(depth=2, hidden=64, heads=4)
    dts = measured_dtypes()
    samplers = parse_sampler_sweep(sampler_sweep)   # a bad entry fails here, not minutes into the run
    auto = "bf16" if "bf16" in dts and bf16_is_native("cpu") else "fp32"   # what dtype=auto trains in
    rows = []   # (section, measurement, value, unit, note)

    def add(*row):
        rows.append(row)
        print(" | ".join(map(str, row)), file=sys.stderr, flush=True)   # progress: a full run takes minutes

    n = 256 if quick else matmul_size
    t = median_times({name: matmul_fn(n, dtype) for name, dtype in dts.items()}, max(n_rep, 5), 2)
    peak = {name: 2 * n ** 3 / t[name] / 1e9 for name in dts}
    for name in dts:
        add("matmul peak", f"{n}x{n}x{n} {name}", peak[name], "GFLOP/s", "")

    def mfu(model, shape, ips, name):
        return f"MFU {100 * 3 * model.flops_per_image(*shape[1:]) * ips / (peak[name] * 1e9):.1f}%"

    train_ips = {}
    for rname in recipes.split(","):
        cfg = recipe(rname)
        shape, batch, n_sample, steps = INPUTS[rname], cfg["batch_size"], SAMPLE_BATCH[rname], sample_steps
        if quick:
            cfg.update(tiny)
            shape, batch, n_sample, steps = (shape[0], 8, 8), 4, 2, 2
        size = "x".join(map(str, shape))
        models = {name: build_model(cfg, shape[0], 10) for name in dts}
        fns = {name: train_step_fn(models[name], batch, shape, dtype) for name, dtype in dts.items()}
        t = median_times(fns, n_rep, max(n_warm, 1))
        for name in dts:
            train_ips[rname, name] = batch / t[name]
            add("train step", f"{rname} {name}, {size}, batch {batch}", batch / t[name], "img/s",
                mfu(models[name], shape, batch / t[name], name))
        fns = {name: sample_fn(models[name], n_sample, shape, dtype, steps) for name, dtype in dts.items()}
        t = median_times(fns, n_rep, 0)
        for name in dts:
            add("sampling", f"{rname} {name}, {size}, {steps} Euler steps x 2 branches, batch {n_sample}",
                n_sample / t[name], "img/s", f"attn_impl={cfg['attn_impl']}" + (
                    f" ({'math' if name == 'bf16' else 'sdpa'} here)" if cfg["attn_impl"] == "auto" else ""))
        if rname == "mnist" and samplers:
            # what a sampler costs: its forwards per image (guidance batches 2 branches where it applies)
            lo, hi = cfg["sample_guidance_interval"]
            sweep = [(solver, 2 if quick else n_steps, interval)
                     for solver, n_steps in samplers for interval in ((0.0, 1.0), (lo, hi))]
            sweep = list(dict.fromkeys(sweep))                     # quick=True makes every step count 2
            fns = {v: sample_fn(models[auto], n_sample, shape, dts[auto], v[1], v[0], v[2]) for v in sweep}
            forwards = {v: fn() for v, fn in fns.items()}          # also the warm-up
            t = median_times(fns, n_rep, 0)
            for v in sweep:
                add("sampler", f"{rname} {auto}, {v[0]} {v[1]} steps, guidance on t in [{v[2][0]:g}, {v[2][1]:g}], "
                    f"batch {n_sample}", n_sample / t[v], "img/s", f"{forwards[v]} forwards per image")
        if rname == "mnist" and batch_sweep:
            # the quick start's batch size is a speed choice too: small batches leave the cores idle
            sizes = [2, 4] if quick else [int(b) for b in batch_sweep.split(",")]
            model = build_model(cfg, shape[0], 10)
            t = median_times({b: train_step_fn(model, b, shape, dts[auto]) for b in sizes}, n_rep, max(n_warm, 1))
            for b in sizes:
                add("train step vs batch", f"{rname} {auto}, {size}, batch {b}", b / t[b], "img/s",
                    mfu(model, shape, b / t[b], auto))
        if rname == "mnist":
            model = build_model(cfg, shape[0], 10)
            t = median_times({impl: adamw_fn(model, impl) for impl in ADAMW_IMPLS}, max(n_rep, 5) * 4, 2)
            for impl in ADAMW_IMPLS:
                add("AdamW step", f"{rname}, {model.num_params() / 1e6:.2f}M parameters, {impl}", 1e3 * t[impl], "ms",
                    f"{t[impl] / t['fused']:.1f}x fused")
        def versus(section, models, base, sampling, first_call=None):
            """Train step (and sampling) of each model in `models`, interleaved; rows say the speed against `base`.
            first_call(fns) runs before the timing and returns a note (compilation)."""
            work = (("train step", batch, lambda m: train_step_fn(m, batch, shape, dts[auto])),
                    ("sampling", n_sample, lambda m: sample_fn(m, n_sample, shape, dts[auto], steps)))
            flops_model = build_model(cfg, shape[0], 10)
            for what, n_img, make in work[:2 if sampling else 1]:
                fns = {name: make(m) for name, m in models.items()}
                note = first_call(fns) if first_call else ""
                t = median_times(fns, max(n_rep, 5) * 2, max(n_warm, 1))
                for name in fns:
                    notes = [f"{t[base] / t[name]:.2f}x {base}{note}"] if name != base else []
                    if what == "train step":   # the same matmul FLOPs, compiled or from another model.py
                        notes.append(mfu(flops_model, shape, n_img / t[name], auto))
                    add(section, f"{rname} {auto} {what}, batch {n_img}" + (
                        f", {steps} Euler steps x 2 branches" if what == "sampling" else "") + f", {name}",
                        n_img / t[name], "img/s", ", ".join(notes))

        if compare_rev:   # the train step of every recipe; sampling only the quick start's (the others take minutes)
            versus("model.py vs git", {"this model.py": build_model(cfg, shape[0], 10),
                                       compare_rev: build_model(cfg, shape[0], 10, model_module=model_at(compare_rev))},
                   compare_rev, sampling=rname == "mnist")
        if compare_compile:   # the train step of every recipe; sampling only the quick start's
            models = {"eager": build_model(cfg, shape[0], 10)}
            models["compiled"] = build_model(cfg, shape[0], 10)
            models["compiled"].load_state_dict(models["eager"].state_dict())
            models["compiled"] = compile_model(models["compiled"])
            if compare_rev:   # the old model.py eager in the same interleaved set: what compiling adds to the rest
                models[compare_rev] = build_model(cfg, shape[0], 10, model_module=model_at(compare_rev))

            def compile_first(fns):
                t0 = time.perf_counter()
                fns["compiled"]()                  # compiles (again for sampling: eval mode, no autograd)
                return f", first call {time.perf_counter() - t0:.0f} s"
            versus("torch.compile", models, compare_rev or "eager", sampling=rname == "mnist", first_call=compile_first)
        if rname == "mnist" and profile_top:
            step = train_step_fn(build_model(cfg, shape[0], 10), batch, shape, dts[auto])
            for op, share, ms in profile_step(step, 2 if quick else 20, profile_top):
                add("profile", f"{rname} {auto} train step, batch {batch}: {op}", share, "% self CPU", f"{ms:.2f} ms/step")
        if op_replay:   # what the step would take if only its matmuls (and attention) ran, and where the rest goes
            r = op_replay_times(train_step_fn(build_model(cfg, shape[0], 10), batch, shape, dts[auto]), n_rep)
            flops_model = build_model(cfg, shape[0], 10)
            what = f"{rname} {auto} train step, batch {batch}"
            share = lambda k: f"{100 * r[k] / r['step']:.0f}% of the step"
            add("op replay", f"{what}: the step", 1e3 * r["step"], "ms", mfu(flops_model, shape, batch / r["step"], auto))
            add("op replay", f"{what}: its matmuls alone", 1e3 * r["matmul"], "ms",
                f"{share('matmul')}, at {r['flops'] / r['matmul'] / (peak[auto] * 1e7):.0f}% of the matmul peak")
            add("op replay", f"{what}: its {r['heavy_ops']} matmuls and attention products alone", 1e3 * r["heavy"],
                "ms", f"{share('heavy')}: the step's {mfu(flops_model, shape, batch / r['heavy'], auto)} "
                      f"if nothing else took time")
            add("op replay", f"{what}: all {r['ops']} operators, each alone (warm caches)", 1e3 * r["alone"], "ms",
                share("alone"))
            if r["in_order"] is None:
                add("op replay", f"{what}: all {r['ops']} operators in order, each on inputs of its own", "-", "ms",
                    f"not run: their inputs would take {r['in_order_bytes'] / 2**30:.1f} GiB "
                    f"(more than REPLAY_MAX_BYTES)")
            else:
                add("op replay", f"{what}: all {r['ops']} operators in order, each on inputs of its own",
                    1e3 * r["in_order"], "ms", f"{share('in_order')} (the rest: autograd and the model's Python)")
    # attention implementations: the kernel alone, then the small model (train step, no-grad forward)
    N = 16 if quick else 256
    for name, dtype in dts.items():
        t = median_times({impl: attention_fn(impl, dtype, N=N) for impl in IMPLS}, max(n_rep, 5), 2)
        for impl in IMPLS:
            add("attention fwd+bwd", f"{impl} {name}, q/k/v 8x6x{N}x64", 1e3 * t[impl], "ms", "")
        add("attention fwd+bwd", f"math / sdpa time, {name}", t["math"] / t["sdpa"], "ratio", "> 1: sdpa faster")
    cfg = recipe("small")
    shape, batch = INPUTS["small"], cfg["batch_size"]
    if quick:
        cfg.update(tiny)
        shape, batch = (4, 8, 8), 4
    models = {impl: build_model(cfg, shape[0], 10, attn_impl=impl) for impl in IMPLS}
    for what, n_img, make in (("train step", batch, train_step_fn), ("no-grad forward", 2 * batch, forward_fn)):
        t = median_times({impl: make(models[impl], n_img, shape, dts[auto]) for impl in IMPLS}, n_rep, max(n_warm, 1))
        for impl in IMPLS:
            add(f"small {auto} {what}", f"attn_impl={impl}, batch {n_img}", n_img / t[impl], "img/s", "")
        add(f"small {auto} {what}", "math / sdpa time", t["math"] / t["sdpa"], "ratio", "> 1: sdpa faster")
    # data loading, against what the small recipe's training consumes (its faster dtype)
    consume = max((v for (r, _), v in train_ips.items() if r == "small"), default=float("nan"))
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"MNIST 28x28x1": prepare_mnist(os.path.join(tmp, "mnist"))}
        if end_to_end and not quick:
            # train.py and the bare step alternate, so that both see the same load on this shared machine
            cfg = recipe("mnist")
            bare_step = train_step_fn(build_model(cfg, 1, 10), cfg["batch_size"], INPUTS["mnist"], dts[auto])
            e2e, ratios = [], []
            for i in range(n_rep):
                e2e.append(run_train_py(sets["MNIST 28x28x1"], os.path.join(tmp, f"out{i}"), e2e_steps))
                for _ in range(5):
                    bare_step()
                n, t0 = e2e_steps - e2e_steps // 4, time.perf_counter()   # as many steps as the records averaged
                for _ in range(n):
                    bare_step()
                bare = cfg["batch_size"] * n / (time.perf_counter() - t0)
                ratios.append(e2e[-1] / bare)
            add("end to end", f"train.py config/mnist.py ({auto}), {e2e_steps} steps, {n_rep} runs",
                statistics.median(e2e), "img/s", f"{statistics.median(ratios):.2f}x the bare {auto} step (median of "
                f"{n_rep} alternated pairs, {min(ratios):.2f}-{max(ratios):.2f})")
        sets["latents 4x32x32 + text 77x384"] = write_latent_shards(os.path.join(tmp, "latents"), 64 if quick else 400)
        for label, root in sets.items():
            shards = [os.path.join(root, shard["path"]) for buckets in load_index(root)["splits"].values()
                      for entries in buckets.values() for shard in entries]
            t = median_times({name: header_fn(shards, name) for name in ("tarfile", "shard_members")}, n_rep, 1)
            members = header_fn(shards, "tarfile")()
            for name in ("tarfile", "shard_members"):
                add("shard headers", f"{label}, {name}", t[name] / members * 1e6, "us/member",
                    f"{t['tarfile'] / t[name]:.1f}x tarfile's parser" if name != "tarfile" else
                    f"{members} members in {len(shards)} shards")
            for w in (0, 1, 2):
                rate = statistics.median(loader_rate(root, w, 4 if quick else loader_batches) for _ in range(n_rep))
                add("data loader", f"{label}, {w} workers, batch 8", rate, "samples/s",
                    f"{rate / consume:.0f}x small's training" if consume == consume else "")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, quick={quick}, "
          f"bf16 {'measured' if 'bf16' in dts else 'not measured (no native bf16 on this CPU)'}, "
          f"freed memory {'kept by malloc' if kept else 'handled by the C library as by default'}\n")
    print("| section | measurement | value | unit | note |\n|---|---|---:|---|---|")
    for section, what, value, unit, note in rows:
        value = f"{value:.3g}" if isinstance(value, (int, float)) else value   # '-' for a measurement not run
        print(f"| {section} | {what} | {value} | {unit} | {note} |")
    return rows


if __name__ == "__main__":
    apply_overrides(globals(), sys.argv[1:])
    main()
