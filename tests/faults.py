"""Fault injection for tests: run a script exactly as `python <script>` would, with faults installed.

    NANODIT_INJECT="nan@2,sigterm@4" python tests/faults.py train.py --max_steps=6 ...
    NANODIT_INJECT="raise@3:1" torchrun --nproc_per_node=2 tests/faults.py train.py ...
    NANODIT_INJECT="nan@6" python tests/faults.py -c "<code that runs train.py>" ...       (as python -c)

NANODIT_INJECT="kind@step[:rank],...", "kind@step:rank" on that rank (RANK) only:
  nan       every micro-batch of the step has sample 0 of its x set to NaN
  oom       the step's first micro-batch raises torch.OutOfMemoryError
  sigterm   the process signals itself with SIGTERM at the step's first micro-batch
  raise     the step's first micro-batch raises RuntimeError("rank R: injected failure at step S ...")
  slow      this step and every later one sleep SLOW_STEP_S (a machine that slows down)
  diskfull  the checkpoint write fails with ENOSPC after torch.save wrote the temporary file

train.py holds no hooks. It runs as the module __main__ (runpy installs a temporary module as
sys.modules["__main__"] whose __dict__ is the script's globals), and its calls are caught from outside:
the iterator that train.py's code makes of a DataLoader applies the faults on each next(), in the main
process, whatever num_workers; torch.save called from train.py's code fails for diskfull. Both read the
current step from train.py's global `step`. The script may itself be a launcher that runs train.py
through runpy.run_path(..., run_name="__main__"): the faults follow whichever script __main__ is then.
"""
import errno
import os
import runpy
import signal
import sys
import time
import types

import torch

SLOW_STEP_S = 0.05    # seconds each step sleeps once "slow" has been injected
KINDS = ("nan", "oom", "sigterm", "raise", "slow", "diskfull")


def parse(spec, rank):
    """NANODIT_INJECT's text -> {step: set of kinds} for this rank."""
    faults = {}
    for item in filter(None, spec.split(",")):
        kind, _, at = item.partition("@")
        at, _, only_rank = at.partition(":")
        if kind not in KINDS or not at:
            raise SystemExit(f"NANODIT_INJECT: cannot read {item!r}; write kind@step[:rank], kind one of {KINDS}")
        if not only_rank or int(only_rank) == rank:
            faults.setdefault(int(at), set()).add(kind)
    return faults


RANK = int(os.environ.get("RANK", 0))          # as train.py: torchrun sets it, a single process is rank 0
FAULTS = parse(os.environ.get("NANODIT_INJECT", ""), RANK)


def script_globals(frame):
    """The running script's globals if `frame` runs the script's own code, else None."""
    main = sys.modules.get("__main__")
    return frame.f_globals if main is not None and frame.f_globals is vars(main) else None


class FaultyBatches:
    """The script's iterator over its DataLoader, with the current step's faults applied on each next()."""

    def __init__(self, batches, script):
        self.batches, self.script = batches, script
        self.step = None          # the step of the last next(): a new one is the step's first micro-batch
        self.slowed = False

    def __iter__(self):
        return self

    def __next__(self):
        step = self.script["step"]
        faults = FAULTS.get(step, ())
        first, self.step = step != self.step, step
        if first:
            self.slowed = self.slowed or "slow" in faults
            if self.slowed:
                time.sleep(SLOW_STEP_S)
        if first and "oom" in faults:
            # Raised before this micro-batch is taken: train.py skips the step by taking its remaining
            # micro-batches, which are then all of them, so the step still uses up grad_accum_steps batches
            if "sigterm" in faults:
                os.kill(os.getpid(), signal.SIGTERM)
            raise torch.OutOfMemoryError("injected out-of-memory (NANODIT_INJECT)")
        batch = next(self.batches)
        if "nan" in faults:
            x = batch["x"].clone()
            x[0] = float("nan")
            batch = {**batch, "x": x}
        if first and "sigterm" in faults:
            os.kill(os.getpid(), signal.SIGTERM)
        if first and "raise" in faults:
            raise RuntimeError(f"rank {RANK}: injected failure at step {step} (NANODIT_INJECT)")
        return batch

    def __getattr__(self, name):
        return getattr(self.batches, name)


def install():
    dataloader_iter, save = torch.utils.data.DataLoader.__iter__, torch.save

    def faulty_iter(loader):
        batches = dataloader_iter(loader)
        script = script_globals(sys._getframe(1))
        return FaultyBatches(batches, script) if script is not None else batches

    def faulty_save(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        script = script_globals(sys._getframe(1))
        if script is not None and "diskfull" in FAULTS.get(script["step"], ()):
            raise OSError(errno.ENOSPC, "No space left on device (NANODIT_INJECT)")

    torch.utils.data.DataLoader.__iter__ = faulty_iter
    torch.save = faulty_save


def main():
    if len(sys.argv) < 2 or sys.argv[1] == "-c" and len(sys.argv) < 3:
        raise SystemExit("usage: python tests/faults.py (script | -c code) [args...]")
    if FAULTS:
        install()
    if sys.argv[1] == "-c":                      # as python -c: argv[0] "-c", the working directory on sys.path
        code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]
        sys.path[0] = ""
        module, launcher = types.ModuleType("__main__"), sys.modules["__main__"]
        sys.modules["__main__"] = module
        try:
            exec(compile(code, "<string>", "exec"), vars(module))
        finally:
            sys.modules["__main__"] = launcher
    else:                                        # as python script: argv as typed, the script's folder on sys.path
        sys.argv = sys.argv[1:]
        sys.path[0] = os.path.dirname(os.path.realpath(sys.argv[0]))
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
