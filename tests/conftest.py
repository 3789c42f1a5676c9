"""Shared fixtures: the repo on sys.path, offline Hugging Face, a small prepared MNIST set, and a
runner for the real scripts exactly as a user types them."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # nothing may download in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# torch.compile's kernel cache, private to this test session (the scripts' subprocesses inherit it): the shared
# /tmp/torchinductor_<user> outlives runs, and one left damaged by runs writing it at once crashed compiled tests
# with "double free or corruption" while loading its kernels
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="nanodit-inductor-"))

# a tiny model for end-to-end runs: a step takes a few milliseconds
TINY = ["--depth=2", "--hidden=32", "--heads=2", "--patch_size=4", "--batch_size=8", "--warmup_steps=2",
        "--log_interval=1", "--sample_interval=0", "--num_workers=0", "--dtype=float32", "--max_images=0"]


def with_faults(env):
    """The launcher to put before a script: tests/faults.py, which installs the faults, where env asks for some
    with NANODIT_INJECT (train.py has no fault injection of its own); the script may itself be a launcher."""
    return [str(REPO / "tests" / "faults.py")] if env.get("NANODIT_INJECT") else []


def run(script, *args, env=None, check=True, timeout=300):
    """Run a top-level script in a subprocess from the repo root; return the CompletedProcess."""
    env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, *with_faults(env), script, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """200 training and 20 validation MNIST digits as shards (about a second to prepare)."""
    out = tmp_path_factory.mktemp("mnist")
    run("prepare_data.py", f"--out_dir={out}", "--max_examples=220", "--val_examples=20")
    return out
