"""Train a DiT as a rectified flow. The whole training loop, top to bottom.

    python prepare_data.py                                   # the built-in MNIST digits -> data/mnist
    python train.py config/mnist.py                          # CPU quick start: ~9 minutes (a time budget)
    python train.py config/small.py --data_dir=data/photos   # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/large.py --data_dir=data/photos

Data order and randomness are functions of (seed, epoch, sample), never of the batch split: a run on W ranks with
micro-batch b and accumulation A sees the same samples, timesteps and noise at every optimizer step as any other split
with the same global batch b * A * W, and a resumed run continues exactly where the interrupted one stopped.
"""
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from datetime import timedelta

_t_process = time.time()    # max_minutes counts from here (private: not a setting)

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CHECKPOINT_KEYS, checkpoint_paths, prune_checkpoints, read_checkpoint, write_atomic
from data import ShardStream, configure_cache, image_emb_stats, load_index, loader, to_device, trained_buckets
from evaluate import check_eval_request, validation
from model import (LEGACY_MODEL_ARGS, T_SAMPLING, DiT, DiTConfig, TrainingDraws, bf16_is_native, compile_model,
                   flow_loss, interpolate, keep_freed_cpu_memory, size_report, training_memory)
from monitor import MetricsLog, TrainingEval, TrainingStats
from optim import configure_optimizers, grad_sync, load_optimizer_state, set_lr, shard, state_dicts
from prepare_data import exit_skipping_shutdown, lock_dir
from sample import GUIDANCE, SOLVERS, sampler_settings
from schedule import Schedule, StopRequest, ema_decay_at

# ----------------------------------------------------------------------------------------------
# defaults; override with a config file and --key=value (configurator.py)
# I/O
data_dir = "data/mnist"       # prepare_data.py's output: a folder, an http(s):// prefix or a 'pipe:...{}...' command
cache_dir = ""                # remote data_dir: shards are fetched whole into this folder; '' = ~/.cache/nanodit
cache_max_gb = 100.0          # remote data_dir: least recently used shards are evicted beyond this size, in GB
out_dir = "out/mnist"         # checkpoints, metrics.jsonl, samples/ (one run at a time: out_dir/.lock)
resume = "auto"               # 'auto': newest good checkpoint in out_dir if any; 'never'; or a path
# model (see model.DiTConfig)
patch_size = 2                # input cells per token side
hidden = 384                  # width
depth = 12                    # blocks
heads = 6                     # attention heads
mlp_ratio = 4.0               # MLP width / hidden
qk_norm = True                # RMS-normalise queries and keys
grad_checkpoint = False       # recompute blocks in backward (memory for compute)
attn_impl = "auto"            # 'auto' | 'sdpa' | 'math'
mlp_act = "gelu"              # 'gelu' | 'gelu_tanh' | 'silu' (model.MLP_ACTS)
class_embed_std = 0.02        # std of the class embedding at initialisation: how strongly labels condition at first
moe_experts = 0               # mixture-of-experts MLP: experts per block; 0 = dense
moe_top_k = 2                 # experts per token (token-choice routing)
moe_capacity = 1.25           # expert capacity factor (model.MoE); 0 = no capacity limit
moe_shared_expert = False     # add one always-on dense MLP to the experts
moe_aux_weight = 0.01         # weight of the load-balancing loss (Switch Transformer's 0.01, arXiv:2101.03961)
loss_weighting = False        # learn the expected loss u(t) and train on L / u(t) + log u(t) (EDM2, arXiv:2312.02696)
prediction = "v"              # network output: 'v' (velocity) or 'x' (clean image; the model still returns v)
use_class = True              # condition on class labels when the data has them
use_text = True               # condition on text embeddings when the data has them
use_image = True              # condition on image embeddings when the data has them
image_tokens = 0              # the image embedding also as this many cross-attention tokens (needs text); 0: none
repa_depth = 0                # REPA: the tokens after this many blocks also predict the image embedding; 0: off
repa_weight = 0.5             # REPA: weight of that loss (1 - cosine) beside the flow loss (REPA's 0.5)
text_layers = 0               # transformer blocks over the caption's tokens before cross-attention (needs text)
# rectified flow and guidance dropout (one categorical draw per sample)
t_sampling = "logit_normal"   # 'logit_normal' (SD3, arXiv:2403.03206) or 'uniform'
t_loc = 0.0                   # logit-normal location
t_scale = 1.0                 # logit-normal scale
t_shift = 1.0                 # then t -> s t / (1 + (s - 1) t) (model.shift_time; SD3): s > 1 trains nearer noise
p_uncond = 0.1                # probability of dropping every condition
p_text_only = 0.0             # probability of keeping the text (and class) but dropping the image
p_image_only = 0.0            # probability of keeping the image but dropping the text
flip_prob = 0.0               # probability of using a sample's stored horizontal-flip view
# batch and budget (a max_steps or max_images on the command line turns off a recipe's max_minutes)
batch_size = 32               # micro-batch per rank, in images
grad_accum_steps = 1          # micro-batches per optimizer step; global batch = batch_size * this * ranks
max_steps = 2000              # optimizer steps (ignored when max_images > 0)
max_images = 0                # training budget in images; sets max_steps = ceil(max_images / global batch)
max_minutes = 0.0             # budget in minutes from start: plans max_steps from timed steps (schedule.py); 0 = off
budget_probe_steps = 20       # max_minutes: steps timed for the first plan (the first 5 untimed)
budget_replan_every = 0.1     # max_minutes: revisit the plan each time this share of the budget passed; 0 = plan once
budget_round_steps = 1        # max_minutes: round the planned max_steps down to a multiple of this
# optimizer and schedule
optimizer = "adamw"           # 'adamw', or 'muon': Muon for the blocks' weight matrices, AdamW for the rest (optim.py)
lr = 3e-4                     # peak learning rate (AdamW)
lr_schedule = "cosine"        # after warm-up: 'cosine' to the floor at max_steps, or 'wsd': flat, then 1 - sqrt decay
decay_frac = 0.2              # wsd: share of max_steps spent decaying
min_lr_ratio = 0.1            # the lr at max_steps, as a fraction of lr
warmup_steps = 100            # linear warmup from 0, in optimizer steps
weight_decay = 0.0            # AdamW decoupled decay on matrices only
beta1 = 0.9                   # AdamW's first-moment decay
beta2 = 0.99                  # AdamW's second-moment decay
muon_lr = 0.0                 # peak lr of the Muon group; 0 = lr (its update is scaled to AdamW's RMS)
muon_weight_decay = -1.0      # decoupled weight decay of the Muon group; -1 = weight_decay
muon_momentum = 0.95          # Nesterov momentum of the Muon group
grad_clip = 1.0               # max global grad norm; 0 = off
ema_decay = 0.9999            # final EMA decay per optimizer step
ema_warmup_steps = 1000       # EMA decay ramps linearly from 0 to ema_decay over these steps
# system
device = "auto"               # 'auto' | 'cpu' | 'cuda' | 'mps'
dtype = "auto"                # 'auto' (bf16 where the device runs it natively) | 'bfloat16' | 'float32'
compile = False               # torch.compile the model (first step takes tens of seconds; no C++ compiler: eager)
keep_freed_memory = True      # CPU: malloc keeps the memory a step frees for the next (model.keep_freed_cpu_memory)
fsdp = False                  # shard parameters, gradients and optimizer state with FSDP2 instead of DDP
num_workers = 2               # data-loader processes per rank
seed = 0                      # initial weights, data order and every per-sample draw
dist_timeout_s = 600          # a collective that waits longer than this fails the job
# logging, evaluation and checkpoints
log_interval = 10             # optimizer steps between log lines
ckpt_interval = 500           # optimizer steps between checkpoints (a final one is always written)
keep_last_n = 3               # checkpoints kept, newest first
keep_every = 0                # also keep every checkpoint whose step is a multiple of this; 0 = none
sample_interval = 500         # steps between EMA sample grids in out_dir/samples (and one at the end); 0 = off
sample_steps = 32             # solver steps for sample grids and evaluation
sample_solver = "euler"       # 'euler' | 'heun' (sample.py)
sample_shift = 1.0            # time shift of the sampling grid (sample.py)
sample_temperature = 1.0      # scale of the starting noise (sample.py's temperature)
sample_guidance_interval = (0.0, 1.0)  # guide only for t in [lo, hi] (sample.py)
sample_guidance = "nested"    # with a caption and an image: 'nested' | 'composed' (sample.py)
sample_text_scale = 3.0       # guidance scale (text and class) for sample grids, as sample.py
sample_image_scale = 1.0      # guidance scale (image) for sample grids
val_interval = 0              # steps between validations on the 'val' split; 0 = off
val_batches = 8               # validation batches per rank
eval_interval = 0             # steps between evaluations of the EMA (evaluate.py) and one at the end; 0 = off
eval_samples = 1000           # images generated per evaluation, split across ranks
eval_features = "efficientnet-lite0"  # feature network (evaluate.py): 'efficientnet-lite0' or a HF vision model
eval_batch_size = 100         # images generated per batch, in evaluations and sample grids
best_by = "val_loss"          # what keeps out_dir/best.pt: 'val_loss' (needs val_interval) or 'fd' (eval_interval)
grad_warn = 10.0              # count steps whose grad norm (before clipping) exceeds this; reported at log steps
max_bad_steps = 5             # stop after this many non-finite steps in a row (checked at log steps)
max_hours = 0.0               # save and stop after this many hours; 0 = no limit
tensorboard = False           # also log to out_dir/tb (needs tensorboard)
wandb_project = ""            # also log to this W&B project (needs wandb)
dry_run = False               # print sizes, FLOPs, memory and budget, then exit
# ----------------------------------------------------------------------------------------------
from configurator import apply_overrides, check_values  # noqa: E402
_cli_keys = apply_overrides(globals(), sys.argv[1:])
if max_minutes and {"max_steps", "max_images"} & _cli_keys and "max_minutes" not in _cli_keys:
    max_minutes = 0.0   # a step or image budget on the command line beats a recipe's time budget
config = {k: v for k, v in globals().items() if not k.startswith("_") and not k.isupper() and k != "config"
          and isinstance(v, (int, float, bool, str, tuple))}   # the settings, not imported constants (T_SAMPLING)


def fail(msg):
    raise SystemExit(f"train.py: {msg}")


check_values(globals(), "train.py", dict(optimizer=("adamw", "muon"), best_by=("val_loss", "fd"), sample_solver=SOLVERS,
                                         dtype=("auto", "bfloat16", "float32"), sample_guidance=GUIDANCE,
                                         t_sampling=T_SAMPLING),
             dict(lr="(0, inf)", muon_lr="[0, inf)", sample_temperature="(0, inf)", batch_size="[1, inf)",
                  grad_accum_steps="[1, inf)", keep_last_n="[1, inf)", log_interval="[1, inf)",
                  ckpt_interval="[1, inf)", repa_weight="[0, inf)"))
draws = TrainingDraws(seed, t_sampling, t_loc, t_scale, t_shift)   # each sample's t, noise, dropout (model.py)
if p_uncond + p_text_only + p_image_only > 1:
    fail(f"p_uncond + p_text_only + p_image_only = {p_uncond + p_text_only + p_image_only} > 1")
if optimizer == "muon" and fsdp:
    fail("optimizer='muon' does not work with fsdp=True: Muon orthogonalises each whole weight matrix, and "
         "FSDP2 shards every matrix across ranks; use DDP (fsdp=False) or optimizer='adamw'")
if best_by == "fd" and not eval_interval:
    fail("best_by='fd' needs eval_interval > 0 (evaluation measures FD)")

# ---------------------------------------------------------------------------------------------- device, DDP
ddp = "RANK" in os.environ
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
rank, world_size, local_rank, stop_group = 0, 1, 0, None
if ddp:
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(seconds=dist_timeout_s))
    # the ranks agree every step on whether to stop; over NCCL that flag would be a GPU tensor, whose read waits
    # for the GPU to finish the step, so it goes over a CPU (gloo) group instead (None: the default group)
    stop_group = dist.new_group(backend="gloo") if device.startswith("cuda") else None
if fsdp and not ddp:
    fail("fsdp=True needs torchrun (a process group); use torchrun --nproc_per_node=N")
master = rank == 0
# one run per out_dir: rank 0 holds out_dir/.lock until it exits (kill -9 too); a second run stops, naming the holder
out_dir_lock = lock_dir(out_dir, "train.py") if master and not dry_run else None
device_type = torch.device(device).type
if dtype == "auto":
    dtype = "bfloat16" if bf16_is_native(device_type) else "float32"
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
if keep_freed_memory and device_type == "cpu":
    keep_freed_cpu_memory()
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def log(*args):
    if master:
        print(*args, flush=True)


def all_reduce(tensor, op="SUM", group=None):
    """Reduce a tensor over the ranks in place, op 'SUM' or 'MAX' (every rank must call this); one process: as is."""
    if ddp:
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op), group=group)
    return tensor


# ---------------------------------------------------------------------------------------------- data
configure_cache(cache_dir, cache_max_gb)   # for every reader of a remote data_dir, evaluation's included
index = load_index(data_dir)
if val_interval and not index["splits"].get("val"):
    fail(f"val_interval={val_interval} but {data_dir} has no 'val' split: rerun prepare_data.py with --val_examples=N")
if flip_prob > 0 and not index["has_flip"]:
    fail(f"flip_prob={flip_prob} but {data_dir} was prepared without flip views (prepare_data.py --flip=true)")
global_batch = batch_size * grad_accum_steps * world_size
if eval_interval and not dry_run:
    check_eval_request(index, eval_samples, "auto", data_dir)
if max_images > 0:
    max_steps = math.ceil(max_images / global_batch)
try:   # the lr schedule; with max_minutes its length is planned after budget_probe_steps (schedule.py)
    schedule = Schedule(lr, warmup_steps, lr_schedule, decay_frac, min_lr_ratio, max_steps, max_minutes,
                        budget_probe_steps, budget_replan_every, budget_round_steps, _t_process, global_batch)
except ValueError as e:
    fail(e)
down = index["vae"]["downsample"] if index["vae"] else 1    # image pixels per latent cell
buckets = {name: (H // down, W // down) for name, (H, W) in trained_buckets(index).items()}   # model input sizes

# ---------------------------------------------------------------------------------------------- model, EMA, optimizer
model_args = dict(
    in_channels=index["channels"], patch_size=patch_size, hidden=hidden, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
    qk_norm=qk_norm, grad_checkpoint=grad_checkpoint, attn_impl=attn_impl, mlp_act=mlp_act, prediction=prediction,
    loss_weighting=loss_weighting, class_embed_std=class_embed_std, moe_experts=moe_experts, moe_top_k=moe_top_k,
    moe_capacity=moe_capacity, moe_shared_expert=moe_shared_expert, text_layers=text_layers, repa_depth=repa_depth,
    num_classes=index["num_classes"] if use_class else 0,
    text_dim=index["text_encoder"]["dim"] if use_text and index["text_encoder"] else 0,
    image_dim=index["image_encoder"]["dim"] if use_image and index["image_encoder"] else 0, image_tokens=image_tokens)
model_args.update(image_norm=bool(model_args["image_dim"]), image_stats=bool(model_args["image_dim"]),  # older: raw
                  text_norm=bool(model_args["text_dim"]))
torch.manual_seed(seed)   # the same initial weights on every rank and for every batch split (FSDP does not broadcast)
try:
    raw_model = DiT(DiTConfig(**model_args))
except ValueError as e:
    fail(e)
for name, (H, W) in buckets.items():
    if H % patch_size or W % patch_size:
        fail(f"bucket {name} (model input {H}x{W}) is not divisible by patch_size={patch_size}")
text_len = index["text_encoder"]["max_length"] if model_args["text_dim"] else 0
H_max, W_max = max(buckets.values(), key=lambda hw: hw[0] * hw[1])   # the largest bucket (the first of equals)

log(json.dumps(config, indent=1))
log(f"world size {world_size} | device {device} | dtype {dtype} | global batch {global_batch} = "
    f"{batch_size} per rank x {grad_accum_steps} accumulation x {world_size} ranks | "
    + (f"steps fitted to max_minutes={max_minutes} after {budget_probe_steps} timed steps" if max_minutes else
       f"{schedule.max_steps} steps = {schedule.max_steps * global_batch:,} images")
    + f" | {size_report(raw_model, H_max, W_max, text_len, global_batch)}")
if dry_run:   # memory per rank by term (model.training_memory); SDPA on CUDA runs fused kernels: no N x N scores
    fused = device_type == "cuda" and attn_impl in ("auto", "sdpa")
    memory = training_memory(raw_model.num_params(), (H_max // patch_size) * (W_max // patch_size), batch_size,
                             hidden, heads, depth, grad_checkpoint, fused, world_size, ddp, fsdp, grad_accum_steps)
    log(f"dry run: {size_report(raw_model, H_max, W_max, text_len, global_batch, memory)} | effective batch "
        f"{global_batch} | {schedule.max_steps} steps")
    sys.exit(0)

raw_model.to(device)
ema_model = copy.deepcopy(raw_model).requires_grad_(False).eval()   # fp32 shadow weights


# ---------------------------------------------------------------------------------------------- resume
state, resume_path = {}, None   # resume: 'auto' tries out_dir's checkpoints newest first, a path only that one
for path in {"auto": checkpoint_paths(out_dir), "never": []}.get(resume, [resume]):
    try:   # checkpoint.read_checkpoint: safe (weights only), memory-mapped, holding the keys a resume needs
        state, resume_path = read_checkpoint(path, CHECKPOINT_KEYS + ("optimizer", "micro_batches")), path
        break
    except (ValueError, FileNotFoundError) as e:
        if resume != "auto":
            fail(e)
        log(f"warning: {e}; falling back to the previous checkpoint")
if state:
    saved_args = {**LEGACY_MODEL_ARGS, **state["model_args"]}
    if saved_args != model_args:
        diff = {k: (saved_args.get(k), v) for k, v in model_args.items() if saved_args.get(k) != v}
        fail(f"checkpoint {resume_path} was trained with other model settings (checkpoint, now): {diff}")
    raw_model.load_state_dict(state["model"])
    ema_model.load_state_dict(state["ema"])
    saved_batch = state["config"]["batch_size"] * state["config"]["grad_accum_steps"] * state["world_size"]
    if saved_batch != global_batch:
        fail(f"checkpoint {resume_path} used global batch {saved_batch}; this run has {global_batch}. "
             "Keep batch_size * grad_accum_steps * ranks equal to resume exactly.")
    if state["config"].get("fsdp", False) != fsdp:   # FSDP saves optimizer state by parameter name, DDP by index
        fail(f"checkpoint {resume_path} was written with fsdp={state['config'].get('fsdp', False)}; "
             f"resume it with the same setting")
    schedule.load_state_dict(state)                # a time budget's plan, kept as it stood
elif raw_model.cfg.image_stats:   # a fresh run: the image embedding's per-feature mean and std, from the data
    stats = image_emb_stats(data_dir)
    raw_model.set_image_stats(*stats), ema_model.set_image_stats(*stats)
step = state.get("step", 0)
micro_batches = step * grad_accum_steps    # per rank; every step consumes grad_accum_steps micro-batches
best = {"val_loss": state.get("best_val", math.inf), "fd": state.get("best_fd", math.inf)}   # best validation loss, FD
elapsed_before = state.get("elapsed", 0.0)
log(f"resuming from {resume_path} at step {step}" if state else "starting from scratch")

model = raw_model
if fsdp:   # each block, then the rest; the EMA alike, so its update stays local (optim.shard)
    shard((raw_model, ema_model), bf16=dtype == "bfloat16")
elif ddp:
    model = DDP(raw_model, device_ids=[local_rank] if device_type == "cuda" else None)
if compile:
    model = compile_model(model, log)
found_inf = torch.zeros((), device=device)   # 1 on a non-finite step: the optimizers skip it (set in the loop)
opt = configure_optimizers(raw_model, optimizer, lr, (beta1, beta2), weight_decay, muon_lr, muon_weight_decay,
                           muon_momentum, torch.bfloat16 if dtype == "bfloat16" else torch.float32, found_inf)
try:
    if state:
        load_optimizer_state(opt, raw_model, state["optimizer"], fsdp)   # optim.py (under FSDP: to the shards)
except (ValueError, KeyError) as e:
    fail(f"checkpoint {resume_path}: its optimizer state does not fit optimizer={optimizer!r} ({e})")
del state

stream = ShardStream(data_dir, "train", batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                     start=micro_batches, flip_prob=flip_prob, text_max_length=text_len or None, draws=draws)
batches = iter(loader(stream, num_workers, pin_memory=device_type == "cuda"))   # from the data position on


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path):
    """Write atomically (tmp, fsync, rename). Returns False, keeping older files, if the write fails."""
    model_sd, ema_sd, optim_sd = state_dicts(raw_model, ema_model, opt, fsdp)   # under FSDP collectives: every rank
    ok = True
    if master:
        state = dict(model=model_sd, ema=ema_sd, optimizer=optim_sd, step=step, micro_batches=micro_batches,
                     world_size=world_size, best_val=best["val_loss"], best_fd=best["fd"], **schedule.state_dict(),
                     elapsed=elapsed_before + time.time() - t_start, config=config, model_args=model_args,
                     data={**{k: index[k] for k in ("space", "channels", "vae", "text_encoder", "image_encoder",
                                                    "num_classes", "class_names")}, "buckets": trained_buckets(index)})
        try:
            write_atomic(path, lambda f: torch.save(state, f))   # checkpoint.py: path.tmp, fsync, rename
        except OSError as e:
            ok = False
            print(f"warning: saving {path} failed ({e}); the previous checkpoints are kept", flush=True)
    if ddp:
        dist.barrier()
    return ok


def keep_best(key, value):
    """Note a value of 'val_loss' or 'fd'; a new best of the best_by one saves out_dir/best.pt (which records it)."""
    if value < best[key]:
        best[key] = value
        if key == best_by:
            save_checkpoint(os.path.join(out_dir, "best.pt"))


# ---------------------------------------------------------------------------------------------- evaluation, logging
sampler = sampler_settings(globals(), "sample_")
evals = TrainingEval(raw_model, index, data_dir, out_dir, sampler, eval_samples, eval_features, eval_batch_size, seed,
                     device, autocast, rank, world_size, sample_interval, eval_interval, config)   # grids, references
metrics = MetricsLog(out_dir, tensorboard, wandb_project, config, master)   # metrics.jsonl (tensorboard, W&B)
stats = TrainingStats(moe_experts, repa_depth > 0, grad_warn, device)   # what the log lines report, summed on device
oom_steps = bad_samples = 0
stop_request = StopRequest(rank)   # SIGINT, SIGTERM: finish the step, save, exit (schedule.py); or max_hours, ...


def log_step(lrs, health):
    """The log line and metrics record since the last one: losses summed over ranks, speed, health, MoE routing."""
    global t_log, step_at_log
    for note in stats.notes(health, step, step_at_log):   # steps skipped as non-finite, grad norms above grad_warn
        log(note)
    means = stats.means(all_reduce)                # loss, |v|, loss per t bin, MoE routing, REPA; then starts anew
    now = time.time()
    ips = (step - step_at_log) * global_batch / (now - t_log)
    record = dict(step=step, **means, grad_norm=health["grad_norm"], grad_norm_max=health["grad_norm_max"], **lrs,
                  img_per_s=ips, elapsed_s=elapsed_before + now - t_start,
                  eta_s=(schedule.max_steps - step) * global_batch / max(ips, 1e-9),
                  bad_steps=int(health["bad_steps"]), oom_steps=oom_steps, bad_samples=bad_samples)
    log(f"step {step}/{schedule.max_steps} | loss {record['loss']:.4f} | grad {record['grad_norm']:.3f} | "
        f"lr {lrs['lr']:.2e} | {ips:.1f} img/s | elapsed {record['elapsed_s'] / 60:.1f} min | "
        f"eta {record['eta_s'] / 60:.1f} min")
    metrics.write(record)
    t_log, step_at_log = now, step


def skip_batch_after_oom():
    """Out of memory in one process: drop this step's gradients and the rest of its micro-batches, so the data
    position stays where an uninterrupted run would be, and go on."""
    global micro_batches, oom_steps
    opt.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()   # a no-op without CUDA
    oom_steps += 1
    log(f"step {step}: out of memory; batch skipped ({oom_steps} so far)")
    for _ in range(micro_batches, (step + 1) * grad_accum_steps):
        next(batches)
    micro_batches = (step + 1) * grad_accum_steps


# ---------------------------------------------------------------------------------------------- loop
t_start = t_log = time.time()
step_at_log = last_ckpt_step = step
params, ema_params = list(raw_model.parameters()), list(ema_model.parameters())   # listed once, not every step
if ddp:
    dist.barrier()
while step < schedule.max_steps:
    lrs = set_lr(opt, schedule.lr_at(step), lr)    # {'lr': ...} (and 'lr_muon': Muon's, scaled to its peak)
    loss_step = torch.zeros((), device=device)
    try:
        for micro in range(grad_accum_steps):
            batch = to_device(next(batches), device)
            micro_batches += 1
            x, valid = batch["x"], batch["valid"]                  # (B, C, H, W), (B,) bool
            bad_samples += batch["n_bad"]
            t, noise, u = batch["t"], batch["noise"], batch["u"]   # (B,), (B, C, H, W), (B,): TrainingDraws
            xt = interpolate(x, noise, t)                          # (1 - t) x + t noise
            drop_all, drop_text, drop_image = TrainingDraws.dropout(u, p_uncond, p_text_only, p_image_only)   # (B,)
            with grad_sync(model, micro == grad_accum_steps - 1):   # optim.py
                with autocast:
                    v = model(xt, t, **raw_model.conditions(batch), drop_y=drop_all, drop_text=drop_text,
                              drop_image=drop_image)
                per_sample = flow_loss(v, x, noise, t, raw_model.cfg.prediction)   # (B,): |v - (noise - x)|^2
                objective = per_sample
                if loss_weighting:
                    logvar = raw_model.loss_logvar_t                        # (B,) log u(t), from this forward
                    objective = per_sample * torch.exp(-logvar) + logvar
                repa = raw_model.repa_loss_t if repa_depth else None   # (B,) REPA's 1 - cos, from this forward
                objective = objective if repa is None else objective + repa_weight * repa
                per_sample = per_sample * valid          # unreadable samples add nothing
                # mean over the nominal batch, so k micro-batches sum to the mean of one k-times batch
                loss = (objective * valid).sum() / (batch_size * grad_accum_steps)
                moe = raw_model.moe_stats()   # (aux loss, dropped share, load) or None for a dense model
                if moe is not None:           # the load-balancing loss, on the mean of the micro-batches
                    loss = loss + moe_aux_weight * moe[0] / grad_accum_steps
                loss.backward()
            loss_step += loss.detach()
            stats.add(per_sample, valid, v, t, moe, repa)
    except torch.OutOfMemoryError:
        if ddp:
            raise   # the other ranks are inside a collective: only a restart resynchronises them
        skip_batch_after_oom()
        step += 1
        continue
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm   # FSDP: a DTensor
    # A non-finite loss or gradient skips the update, decided on the device (no host sync; the grad norm is the
    # same on every rank): the optimizers skip where found_inf is 1, the EMA lerps with weight 0 (a tensor: on CUDA
    # the list form runs a kernel per tensor, as no foreach lerp takes one tensor weight for all)
    with torch.no_grad():
        bad = ~(torch.isfinite(grad_norm) & torch.isfinite(loss_step))
        found_inf.copy_(bad)
        opt.step()
        ema_weight = torch.where(bad, 0.0, 1.0 - ema_decay_at(step, ema_decay, ema_warmup_steps))
        torch._foreach_lerp_(ema_params, params, [ema_weight] * len(params))
        stats.count_step(bad, grad_norm)
    opt.zero_grad(set_to_none=True)
    step += 1
    try:
        # max_minutes: times the probe and (re)plans max_steps by the slowest rank (fp32: MPS has no fp64)
        note = schedule.tick(step, lambda values: all_reduce(torch.tensor(values, device=device), "MAX").tolist())
    except ValueError as e:
        fail(e)
    if note:
        log(note)
    final = step == schedule.max_steps
    if max_hours and time.time() - t_start > max_hours * 3600:
        stop_request.set(f"max_hours={max_hours}")
    health = stats.health(grad_norm) if step % log_interval == 0 or final else None
    if health and health["worst_in_a_row"] >= max_bad_steps:
        stop_request.set(f"{int(health['worst_in_a_row'])} non-finite steps in a row (max_bad_steps={max_bad_steps})",
                         failed=True)
    stop = stop_request.reason is not None   # every rank stops at the same step; a CPU flag (gloo): no GPU wait
    stop = bool(all_reduce(torch.tensor(float(stop)), "MAX", stop_group)) if ddp else stop
    if health or stop:
        log_step(lrs, health or stats.health(grad_norm))
    if val_interval and (step % val_interval == 0 or final):
        val = validation(ema_model, data_dir, index, batch_size, val_batches, seed, device, autocast, rank, world_size)
        log(f"step {step} | validation " + " | ".join(f"{k} {v:.4f}" for k, v in val.items()))
        metrics.write(dict(step=step, **val))
        keep_best("val_loss", val["val_loss"])
    if eval_interval and (step % eval_interval == 0 or final):
        scores = evals.evaluate(ema_model, step)
        metrics.write(dict(step=step, **scores))
        keep_best("fd", scores["fd"])
    if sample_interval and (step % sample_interval == 0 or final):   # a collective under FSDP: every rank
        log(f"samples: {evals.sample_grid(ema_model, fsdp, f'step-{step:08d}')}")
    if step % ckpt_interval == 0 or final or stop:
        if save_checkpoint(os.path.join(out_dir, f"ckpt-{step:08d}.pt")) and master:
            prune_checkpoints(out_dir, keep_last_n, keep_every)
        last_ckpt_step = step
    if stop:
        log(f"stopping at step {step}: {stop_request.reason or 'another rank asked to stop'}")
        break

# ---------------------------------------------------------------------------------------------- teardown
metrics.close()
status = 0 if not stop_request.failed else (f"train.py: stopped after {stop_request.reason}; last checkpoint at "
                                           f"step {last_ckpt_step}")
if ddp:
    dist.destroy_process_group()
    del batches                                       # its worker processes stop now (exit skips the interpreter's)
    exit_skipping_shutdown(status)
if status:
    sys.exit(status)
