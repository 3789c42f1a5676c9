"""The optimizers: AdamW for every parameter, or Muon for the blocks' weight matrices and AdamW for the rest; and
what their updates need across ranks (gradient sync, FSDP2 shards, whole state dicts for a checkpoint).

    opt = configure_optimizers(raw_model, "muon", lr=3e-4, ...)    # train.py, after any sharding (shard)
    lrs = set_lr(opt, lr_at(step), lr)                            # every step: each group at the schedule's lr
    with grad_sync(model, micro == grad_accum_steps - 1): ...     # reduce gradients on the last micro-step only
    model_sd, ema_sd, optim_sd = state_dicts(raw_model, ema_model, opt, fsdp)   # a checkpoint's (load_optimizer_state)

A step whose loss or gradient is not finite is skipped on the device, without a host sync: train.py sets the
0-dim `found_inf` tensor that both read (the fused AdamW kernels read it as they do for torch's GradScaler).
"""
import math
from contextlib import nullcontext

import torch


class Optimizers:
    """Several optimizers stepped as one: param_groups in order, state_dict {name: state}."""

    def __init__(self, **opts):
        self.opts = opts

    @property
    def param_groups(self):   # read each time: load_state_dict replaces the optimizers' group lists
        return [g for o in self.opts.values() for g in o.param_groups]

    def step(self):
        for o in self.opts.values():
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.opts.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: o.state_dict() for name, o in self.opts.items()}

    def load_state_dict(self, sd):
        if set(sd) != set(self.opts):
            raise ValueError(f"optimizer state holds {sorted(sd)}, this run has {sorted(self.opts)}")
        for name, o in self.opts.items():
            o.load_state_dict(sd[name])


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024): momentum SGD whose update of each weight matrix is orthogonalised by
    a quintic Newton-Schulz iteration, scaled by 0.2 sqrt(max(A, B)) so its RMS matches AdamW's
    (Moonshot, arXiv:2502.16982). The math of torch.optim.Muon(adjust_lr_fn='match_rms_adamw'), with
    two changes for speed: the iteration runs in `ns_dtype` (torch's always uses bf16, which is emulated
    and made training 6.5x slower on a CPU without avx512_bf16), and matrices of one shape are
    orthogonalised together, one batched matmul per iteration instead of one per block."""
    NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
    NS_STEPS = 5

    def __init__(self, params, lr, weight_decay, momentum, ns_dtype):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.ns_dtype, self.peak_lr = ns_dtype, lr

    @staticmethod
    def orthogonalise(g, dtype):
        """Newton-Schulz on a stack of matrices (n, A, B) -> ~U V^T of each (singular values ~0.5-1.5)."""
        a, b, c = Muon.NS_COEFFICIENTS
        x = g.to(dtype)
        wide = x.shape[1] <= x.shape[2]
        x = x if wide else x.transpose(1, 2)
        x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=1e-7)   # spectral norm <= 1
        for _ in range(Muon.NS_STEPS):
            gram = x @ x.transpose(1, 2)
            x = a * x + torch.baddbmm(gram, gram, gram, beta=b, alpha=c) @ x
        return (x if wide else x.transpose(1, 2)).to(g.dtype)

    @torch.no_grad()
    def step(self):
        # a 0-dim tensor, nonzero to skip this step on the device, without a host sync (the trainer sets it, as torch's
        # GradScaler sets found_inf for the fused AdamW): the updates are computed, then torch.where keeps the old
        # values, so a finite step is bitwise the in-place one
        skip = getattr(self, "found_inf", torch.zeros(())) != 0
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, ps in by_shape.items():
                updates = []
                for p in ps:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    new_buf = buf.lerp(p.grad, 1 - mu)
                    updates.append(p.grad.lerp(new_buf, mu))                # Nesterov
                    buf.copy_(torch.where(skip, buf, new_buf))
                ortho = self.orthogonalise(torch.stack(updates), self.ns_dtype)
                for p, u in zip(ps, ortho):
                    new_p = p.mul(1 - lr * group["weight_decay"]).add_(u, alpha=-lr * 0.2 * math.sqrt(max(shape)))
                    p.copy_(torch.where(skip, p, new_p))


def configure_optimizers(model, optimizer, lr, betas, weight_decay, muon_lr, muon_weight_decay, muon_momentum,
                         ns_dtype, found_inf):
    """AdamW decays matrices only. With optimizer='muon', Muon takes the 2-D weights inside the blocks (attention,
    MLP, adaLN) at peak lr muon_lr (0 = lr: Muon's update is scaled to AdamW's RMS, so lr carries over; Moonshot,
    arXiv:2502.16982) and weight decay muon_weight_decay (-1 = weight_decay); the embeddings, norms, biases, patch
    embedding and output layers stay with AdamW, as Muon's authors prescribe. Build it after any sharding: FSDP
    replaces the parameters with sharded ones."""
    adamw_decay, adamw_no_decay, muon_params = [], [], []
    for name, p in model.named_parameters():
        if optimizer == "muon" and p.dim() == 2 and name.startswith("blocks."):
            muon_params.append(p)
        else:
            (adamw_decay if p.dim() >= 2 else adamw_no_decay).append(p)
    # fused: one kernel over all tensors. On a CPU, torch defaults to a Python loop per tensor: the fused step of the
    # quick start's 1.9M parameters takes 1.8 ms against 6.8 ms (benchmark.py's "AdamW step" rows, BENCHMARKS.md)
    adamw = torch.optim.AdamW([{"params": adamw_decay, "weight_decay": weight_decay},
                               {"params": adamw_no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, fused=True)
    adamw.found_inf = found_inf
    if optimizer != "muon":
        return adamw
    muon = Muon(muon_params, lr=muon_lr or lr, momentum=muon_momentum,
                weight_decay=weight_decay if muon_weight_decay < 0 else muon_weight_decay, ns_dtype=ns_dtype)
    muon.found_inf = found_inf
    return Optimizers(muon=muon, adamw=adamw)


def set_lr(opt, lr_now, lr):
    """Set this step's learning rate: lr_now for AdamW; Muon's groups follow the same schedule scaled to their own
    peak. Returns {'lr': ..., 'lr_muon': ...} (the latter with Muon) for the log."""
    opts = opt.opts if isinstance(opt, Optimizers) else {"adamw": opt}
    lrs = {}
    for name, o in opts.items():
        lrs["lr" if name == "adamw" else "lr_" + name] = now = lr_now if name == "adamw" else lr_now * o.peak_lr / lr
        for group in o.param_groups:
            group["lr"] = now
    return lrs


def state_dicts(model, ema, opt, fsdp):
    """The state dicts of the model, its EMA and the optimizer for a checkpoint; under FSDP the shards gathered whole
    onto the CPU (collectives: every rank calls this)."""
    if not fsdp:
        return model.state_dict(), ema.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts), get_model_state_dict(ema, options=opts),
            get_optimizer_state_dict(model, opt, options=opts))


def load_optimizer_state(opt, model, state, fsdp):
    """opt.load_state_dict(state); under FSDP the whole saved state goes to this rank's shards (FSDP saves optimizer
    state by parameter name, DDP by index)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def shard(modules, bf16):
    """FSDP2: shard each module's blocks, then the rest, so parameters, gradients and optimizer state live in shards
    (the model and its EMA alike, so the EMA update stays local). bf16: all-gather the parameters in bf16 for forward
    and backward and reduce-scatter the gradients in fp32; the shards (weights, gradients, optimizer state, EMA) stay
    fp32. Forward inputs are left as they come: t keeps fp32 for the timestep features, and autocast casts the rest
    as it does under DDP. Shard before configure_optimizers."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
                 if bf16 else MixedPrecisionPolicy())   # fp32: no policy
    for m in modules:
        for block in m.blocks:
            fully_shard(block, mp_policy=mp_policy)
        fully_shard(m, mp_policy=mp_policy)


def grad_sync(model, sync):
    """Gradients are reduced over the ranks only on the last micro-step of an accumulation (sync); forward and
    backward stay inside the context. DDP's no_sync skips its all-reduce, FSDP2 its reduce-scatter; one process (or
    a compiled wrapper of either, which passes these on): nothing to do."""
    if hasattr(model, "set_requires_gradient_sync"):   # FSDP2 (fully_shard)
        model.set_requires_gradient_sync(sync)
    elif not sync and hasattr(model, "no_sync"):        # DDP
        return model.no_sync()
    return nullcontext()
