"""What a training run reports: train.py's sample grids and evaluations, its log-line numbers and metrics records.

TrainingEval draws the EMA's grids (sample.py's sampler) and evaluates it (evaluate.py), prepared once before the loop;
TrainingStats keeps the sums behind each log line on the device (a host read waits for the GPU), with the health
counters (non-finite steps, large grad norms) that decide its warnings; MetricsLog writes the records to
out_dir/metrics.jsonl and, if asked, TensorBoard and W&B (optional packages, imported when used).
"""
import json
import math
import os

import torch
import torch.distributed as dist

import evaluate   # a module: tests replace evaluate.load_feature_net (tests/test_ddp.py's slow feature network)
import sample
from data import iterate_split, trained_buckets
from model import DiT


GRID_PER_CLASS, GRID_MAX_CLASSES, GRID_SAMPLES = 8, 16, 16   # train.py's grids: columns and rows of a class grid;
                                                             # images of a text/image grid


def training_grid(net, index, data_dir, device):
    """The conditions of train.py's sample grids, fixed for a run and read once (a moment): up to GRID_MAX_CLASSES
    labels spread over the classes, GRID_PER_CLASS images each, at the largest trained bucket; for text and image
    models, the conditions of the first GRID_SAMPLES samples of that bucket (val, else train). Returns (conditions
    on the device, (h, w) model input size, images per row)."""
    down = index["vae"]["downsample"] if index["vae"] else 1                   # pixels per latent cell
    name, (H, W) = max(trained_buckets(index).items(), key=lambda kv: kv[1][0] * kv[1][1])
    cfg, hw = net.cfg, (H // down, W // down)
    if cfg.num_classes:
        labels = torch.linspace(0, cfg.num_classes - 1, min(cfg.num_classes, GRID_MAX_CLASSES)).round().long()
        return {"y": labels.repeat_interleave(GRID_PER_CLASS).to(device)}, hw, GRID_PER_CLASS
    split = "val" if index["splits"]["val"].get(name) else "train"
    batch = next(iterate_split(data_dir, split, batch_size=GRID_SAMPLES, bucket=name))
    return {k: v.to(device) for k, v in net.conditions(batch).items() if v is not None}, hw, 4


class TrainingEval:
    """train.py's evaluations and sample grids of the EMA. Prepared once, before the loop: the grid's conditions
    (rank 0, training_grid) and, on every rank together, the evaluation's real reference (features of the
    train and val images), so that no rank then waits long in a collective for rank 0 alone."""

    def __init__(self, net, index, data_dir, out_dir, sampler, n, feature_name, batch_size, seed, device, autocast,
                 rank, world_size, grids, evals, config):
        self.index, self.data_dir, self.out_dir, self.sampler, self.n = index, data_dir, out_dir, sampler, n
        self.feature_name, self.batch_size, self.seed, self.device, self.autocast = (feature_name, batch_size, seed,
                                                                                     device, autocast)
        self.rank, self.world_size, self.config = rank, world_size, config
        self.grid = training_grid(net, index, data_dir, device) if rank == 0 and grids else None
        self.features = self.refs = None
        if evals:
            self.features = evaluate.load_feature_net(feature_name, device)
            self.refs = evaluate.references(data_dir, feature_name, self.features, device, rank=rank,
                                            world_size=world_size)

    def plain(self, ema_model, fsdp):
        """The EMA as an ordinary module on rank 0 (None elsewhere). Under FSDP the EMA is sharded and its
        forward needs every rank, so this gathers the full weights into an unsharded copy: call it on
        every rank."""
        if not fsdp:
            return ema_model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        ema_sd = get_model_state_dict(ema_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        with torch.device("meta"):     # no init work and no draws from the global RNG
            net = DiT(ema_model.cfg)
        net.load_state_dict(ema_sd, assign=True)
        return net.to(self.device).requires_grad_(False).eval()

    def sample_grid(self, ema_model, fsdp, tag):
        """Write a sample grid of the EMA with fixed seeds to out_dir/samples/<tag>.png; every rank calls it (a
        collective under FSDP), rank 0 draws and returns the path (None elsewhere)."""
        net = self.plain(ema_model, fsdp)
        if self.rank != 0:
            return None
        cond, (H, W), nrow = self.grid
        noise = torch.randn(len(next(iter(cond.values()))), net.cfg.in_channels, H, W, device=self.device,
                            generator=torch.Generator(device=self.device).manual_seed(self.seed))
        path = os.path.join(self.out_dir, "samples", f"{tag}.png")
        images = sample.generate(net, cond, noise, self.sampler, self.index, self.autocast, self.batch_size)[0]
        sample.save_grid(images, path, nrow=nrow)
        return path

    def evaluate(self, ema_model, step):
        """evaluate.evaluate() on the EMA with the grid's sampler, generation split across ranks (every rank calls it);
        rank 0 prints the table and writes out_dir/samples/eval-<step>.json. Returns the headline numbers on
        every rank."""
        meta = {k: self.index[k] for k in ("space", "channels", "vae", "num_classes", "buckets")}
        result = evaluate.evaluate(ema_model, meta, self.data_dir, self.n, self.sampler, self.feature_name, "auto",
                          self.batch_size, self.seed, self.device, self.autocast, rank=self.rank,
                          world_size=self.world_size, features=self.features, refs=self.refs)
        keys = ("fd", "precision", "recall", "class_acc", "text_acc", "text_acc_pair_held_out",
                "text_acc_phrasing_held_out", "rprec", "image_acc", "image_retrieval", "diverge_text", "diverge_image")
        master = self.rank == 0
        head = torch.tensor([result["model"].get(k, float("nan")) if master else 0.0 for k in keys], device=self.device)
        if self.world_size > 1:
            dist.broadcast(head, 0)   # rank 0's scoring takes a moment: the references were built at the start
        if master:
            print(evaluate.format_eval(result), flush=True)
            os.makedirs(os.path.join(self.out_dir, "samples"), exist_ok=True)
            with open(os.path.join(self.out_dir, "samples", f"eval-{step:08d}.json"), "w") as f:
                json.dump(dict(result, step=step, weights="ema", sampler=self.sampler,
                               checkpoint_config=self.config), f, indent=1)
        out = {k: v for k, v in zip(keys, head.tolist()) if not math.isnan(v)}
        if master and "per_class" in result["model"]:
            out.update({f"class_acc_{c}": e["acc"] for c, e in result["model"]["per_class"].items()})
        return out


class TrainingStats:
    """What train.py's log lines report, kept on the device between them (a host read waits for the GPU): sums of
    the loss, samples, |v| and the loss per t bin; MoE routing; REPA's; non-finite steps in a row (now and the longest
    since the last line), non-finite steps and steps above grad_warn since then, and the largest finite grad norm."""
    T_BINS = 4   # t bins for the per-t loss: [0, .25), ... [.75, 1]

    def __init__(self, moe_experts, repa, grad_warn, device):
        self.sums = torch.zeros(3 + 2 * self.T_BINS, device=device)  # loss, valid count, |v|, bin sums, bin counts
        self.moe = torch.zeros(3 + moe_experts, device=device)  # MoE: aux loss, dropped share, micro-batches, loads
        self.repa = torch.zeros(1, device=device) if repa else None   # REPA: the sum of 1 - cos over valid samples
        self.bad_in_a_row, self.worst_in_a_row, self.bad, self.warned, self.grad_norm_max, self.bad_steps = (
            torch.zeros((), device=device) for _ in range(6))   # bad_steps: since the start of this process
        self.moe_experts, self.grad_warn = moe_experts, grad_warn

    @torch.no_grad()
    def add(self, per_sample, valid, v, t, moe, repa=None):
        """One micro-batch: per-sample losses (B,) (0 where not valid), valid (B,) bool, the output v (B, C, H, W),
        t (B,), the model's moe_stats() (None for a dense model) and REPA's per-sample loss (B,) or None."""
        bins, n = (t * self.T_BINS).long().clamp(max=self.T_BINS - 1), self.T_BINS
        self.sums[0] += per_sample.sum()
        self.sums[1] += valid.sum()
        self.sums[2] += (v.detach().float().pow(2).mean(dim=(1, 2, 3)).sqrt() * valid).sum()
        self.sums[3:3 + n].index_add_(0, bins, per_sample)
        self.sums[3 + n:].index_add_(0, bins, valid.float())
        if moe is not None:
            aux, dropped, load = moe
            self.moe += torch.cat([torch.stack([aux.detach(), dropped, torch.ones_like(dropped)]), load.mean(dim=0)])
        if repa is not None:
            self.repa += (repa.detach() * valid).sum()

    @torch.no_grad()
    def count_step(self, bad, grad_norm):
        """Count a step's health on the device: bad (0-dim bool) when its loss or gradient was not finite."""
        self.bad_in_a_row.add_(1).mul_(bad)                 # reset by a finite step
        torch.maximum(self.worst_in_a_row, self.bad_in_a_row, out=self.worst_in_a_row)
        self.bad.add_(bad)
        self.bad_steps.add_(bad)
        finite_norm = torch.where(bad, 0.0, grad_norm.float())
        torch.maximum(self.grad_norm_max, finite_norm, out=self.grad_norm_max)
        self.warned.add_(finite_norm > self.grad_warn)

    def notes(self, health, step, since):
        """What the log says of a health() read at `step` since step `since`: skipped steps, large grad norms."""
        notes = []
        if health["bad"]:
            notes.append(f"step {step}: {int(health['bad'])} of the last {step - since} steps had a non-finite loss or "
                         f"gradient; their updates were skipped (at most {int(health['worst_in_a_row'])} in a row)")
        if health["warned"]:
            notes.append(f"warning: step {step}: {int(health['warned'])} steps since step {since} had a grad norm "
                         f"above grad_warn={self.grad_warn} (max {health['grad_norm_max']:.2f})")
        return notes

    def health(self, grad_norm):
        """The device-side counters as numbers (a host sync: at log steps only)."""
        values = torch.stack([grad_norm.float(), self.grad_norm_max, self.bad_in_a_row, self.worst_in_a_row,
                              self.bad, self.warned, self.bad_steps]).tolist()
        return dict(zip(("grad_norm", "grad_norm_max", "bad_in_a_row", "worst_in_a_row", "bad", "warned",
                         "bad_steps"), values))

    def means(self, all_sum):
        """The means since the last call, over micro-batches and ranks (all_sum: a sum over ranks that every rank
        calls): loss, |v|, the loss per t bin, MoE routing (load averaged over blocks) and REPA; then starts anew.
        A run of non-finite steps goes on across calls."""
        sums, bins = all_sum(self.sums), self.T_BINS
        n = sums[1].clamp(min=1).item()
        out = dict(loss=sums[0].item() / n, v_norm=sums[2].item() / n)
        if self.moe_experts:
            moe = all_sum(self.moe)
            m = moe[2].clamp(min=1).item()
            out.update(moe_aux=moe[0].item() / m, moe_dropped=moe[1].item() / m,
                       **{f"moe_load_{e}": moe[3 + e].item() / m for e in range(self.moe_experts)})
        if self.repa is not None:
            out["repa"] = all_sum(self.repa).item() / n
            self.repa.zero_()
        out.update({f"loss_t{b}": sums[3 + b].item() / max(sums[3 + bins + b].item(), 1) for b in range(bins)})
        for counter in (self.sums, self.moe, self.worst_in_a_row, self.bad, self.warned, self.grad_norm_max):
            counter.zero_()
        self.worst_in_a_row.copy_(self.bad_in_a_row)
        return out


class MetricsLog:
    """train.py's metrics, written by rank 0 (the other ranks' writes do nothing): a JSON line per record in
    out_dir/metrics.jsonl, with tensorboard also out_dir/tb, with wandb_project also a W&B run (both optional)."""

    def __init__(self, out_dir, tensorboard, wandb_project, config, master):
        self.out_dir, self.master, self.writer, self.wandb = out_dir, master, None, None
        if master and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("train.py: tensorboard=True but the tensorboard package is missing: "
                                 "pip install tensorboard") from None
            self.writer = SummaryWriter(os.path.join(out_dir, "tb"))
        if master and wandb_project:
            try:
                import wandb
            except ImportError:
                raise SystemExit(f"train.py: wandb_project={wandb_project!r} but the wandb package is missing: "
                                 "pip install wandb") from None
            self.wandb = wandb
            wandb.init(project=wandb_project, config=config, resume="allow")

    def write(self, record):
        if not self.master:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log(record, step=record["step"])

    def close(self):
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()
