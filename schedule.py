"""The learning-rate schedule, the time budget that fits its length to the clock, and stop requests.

    schedule = Schedule(3e-4, 100, "cosine", 0.2, 0.1, max_steps=2000)            # a fixed length
    schedule = Schedule(3e-4, 100, "wsd", 0.2, 0.1, 0, max_minutes=9, t0=t0)       # as many steps as 9 minutes hold
    lr = schedule.lr_at(step)                                                       # before each optimizer step
    note = schedule.tick(step, slowest)                                             # after it: plans when due
    stop = StopRequest(rank)            # SIGINT/SIGTERM set stop.reason: the trainer finishes the step, saves, exits
    decay = ema_decay_at(step, 0.9999, 1000)                                        # the EMA's decay, ramped up

Warm-up is linear from 0 over warmup_steps; then 'cosine' goes down to lr * min_lr_ratio at max_steps, or 'wsd'
holds the peak and decays by 1 - sqrt over the last decay_frac of max_steps (Hagele et al., arXiv:2405.18392).

With max_minutes, the first PROBE_WARMUP_STEPS steps are left untimed (allocator, caches, workers), the steps up to
probe_steps are timed, and max_steps is planned from that speed so that the run ends about max_minutes after t0
(the process start); until then the lr holds at its peak. Each replan_every share of the budget the plan is revisited
from the speed since the last plan: it lengthens when more rounded steps fit and shortens when it would overrun by
more than 1% of the budget, and the schedule goes on from where it stands, so the lr stays continuous. Plans are
rounded down to a multiple of round_steps, so runs on one machine, whose timings differ by a few %, plan alike.
"""
import math
import os
import signal
import time

PROBE_WARMUP_STEPS = 5    # first steps of a max_minutes probe left untimed
OVERRUN_SHARE = 0.01      # a plan is shortened only when it would overrun the budget by more than this share
SIGNAL_ECHO_S = 2.0       # signals this close together are one request: a terminal's Ctrl+C reaches both torchrun
                          # and the ranks, and torchrun forwards it; SLURM signals every process of the step too


class Schedule:
    def __init__(self, lr, warmup_steps, kind, decay_frac, min_lr_ratio, max_steps, max_minutes=0.0, probe_steps=20,
                 replan_every=0.1, round_steps=1, t0=None, images_per_step=0):
        if kind not in ("cosine", "wsd"):
            raise ValueError(f"lr_schedule={kind!r}: expected 'cosine' or 'wsd'")
        if not 0 < decay_frac <= 1:
            raise ValueError(f"decay_frac={decay_frac} must be in (0, 1]")
        if round_steps < 1:
            raise ValueError(f"budget_round_steps={round_steps} must be at least 1")
        if max_minutes and probe_steps <= PROBE_WARMUP_STEPS:
            raise ValueError(f"budget_probe_steps={probe_steps} must exceed the {PROBE_WARMUP_STEPS} untimed "
                             "warm-up steps")
        if not 0 <= replan_every < 1:
            raise ValueError(f"budget_replan_every={replan_every} must be in [0, 1): a share of max_minutes "
                             "(0 = plan once)")
        self.lr, self.warmup_steps, self.kind, self.decay_frac, self.min_lr_ratio = (lr, warmup_steps, kind,
                                                                                    decay_frac, min_lr_ratio)
        self.max_minutes, self.probe_steps, self.replan_every, self.round_steps = (max_minutes, probe_steps,
                                                                                   replan_every, round_steps)
        self.t0, self.images_per_step = t0 or time.time(), images_per_step
        self.start_step = 0           # where this process began: a resume times its own probe
        self.max_steps = 10 ** 9 if max_minutes else max_steps    # until the first plan
        self.planned = False          # max_minutes: a plan fixed max_steps
        # Where the decay stands: progress plan_from[1] at step plan_from[0], moving linearly to 1 at max_steps;
        # (0, 0.0) for a fixed max_steps. A replan goes on from where it stood, at a new pace.
        self.plan_from = (0, 0.0)
        self.next_plan = None         # the step of the next (re)plan
        self.window = None            # (time, step) where the speed's timing window began

    def state_dict(self):
        return dict(budget_steps=self.max_steps if self.planned else 0, budget_plan_from=self.plan_from)

    def load_state_dict(self, state):
        """A resume (a checkpoint's dict) keeps the time plan as it stood, and makes no more replans: this process's
        clock did not see the earlier steps."""
        self.start_step = state["step"]
        if self.max_minutes and state.get("budget_steps"):
            self.planned = True
            self.max_steps, self.plan_from = state["budget_steps"], tuple(state.get("budget_plan_from", (0, 0.0)))

    def decay_start(self):
        """wsd: the first step of the decay."""
        return max(self.warmup_steps, self.max_steps - round(self.decay_frac * self.max_steps))

    def progress(self, step):
        """How far the decay (cosine, or wsd's last decay_frac) has gone at step: 0 before it starts, 1 at max_steps."""
        if self.max_minutes and not self.planned:
            return 0.0                                   # the lr holds at its peak until the budget's first plan
        s0, p0 = self.plan_from
        start = max(s0, self.warmup_steps if self.kind == "cosine" else self.decay_start())
        return min(1.0, p0 + (1 - p0) * max(0, step - start) / max(1, self.max_steps - start))

    def lr_at(self, step):
        lr, floor = self.lr, self.min_lr_ratio
        if step < self.warmup_steps:
            return lr * (step + 1) / self.warmup_steps
        if self.kind == "wsd":
            return lr * (floor + (1 - floor) * (1 - math.sqrt(self.progress(step))))
        return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * self.progress(step))))

    def tick(self, step, slowest):
        """After the optimizer step that reached `step`: start the probe's clock, or (re)plan when due.
        slowest([s per step, s since t0]) returns the largest of each over the ranks, so every rank plans alike.
        Returns a line for the log, or None; raises ValueError when the budget cannot hold the warm-up."""
        if not self.max_minutes:
            return None
        if step == self.start_step + PROBE_WARMUP_STEPS and not self.planned:
            self.window, self.next_plan = (time.time(), step), self.start_step + self.probe_steps
        if step != self.next_plan:
            return None
        now, (t_window, window_from) = time.time(), self.window
        per_step, elapsed = slowest([(now - t_window) / (step - window_from), now - self.t0])
        fitted = step + max(0, int((self.max_minutes * 60 - elapsed) / per_step))
        planned = max(fitted // self.round_steps * self.round_steps, step)
        rounded = f" ({fitted} rounded down to a multiple of {self.round_steps})" if self.round_steps > 1 else ""
        note = None
        if not self.planned:
            fits = f"max_minutes={self.max_minutes}: at {per_step:.3f} s per step the budget fits {planned} steps"
            if planned < self.warmup_steps:
                raise ValueError(f"{fits}, fewer than warmup_steps={self.warmup_steps}; raise max_minutes or lower "
                                 "warmup_steps")
            self.max_steps, self.planned, self.plan_from = planned, True, (step, 0.0)
            if self.kind == "wsd" and self.decay_start() < step:
                raise ValueError(f"{fits}, whose decay (decay_frac={self.decay_frac}) would start at step "
                                 f"{self.decay_start()}, before the {self.probe_steps} probe steps end; raise "
                                 "max_minutes or lower budget_probe_steps")
            same = self.kind == "wsd" or step <= self.warmup_steps   # else the lr held at its peak until now
            note = (f"time budget: {per_step:.3f} s per step, so max_steps = {planned} "
                    f"({planned * self.images_per_step:,} images) to end near {self.max_minutes} min{rounded}"
                    + (f"; while no replan changes it, the same run as --max_steps={planned} --max_minutes=0"
                       if same else ""))
        elif planned > self.max_steps or (fitted - self.max_steps) * per_step < -OVERRUN_SHARE * self.max_minutes * 60:
            # more room, or an overrun beyond OVERRUN_SHARE of the budget: a plan that still fits stays, so a machine
            # whose speed hovers near a rounding boundary does not flip between two plans
            self.plan_from = (step, self.progress(step))     # go on from where the schedule stands, at a new pace
            note = (f"time budget: step {step}: {per_step:.3f} s per step since step {window_from}, so max_steps "
                    f"{self.max_steps} -> {planned} to end near {self.max_minutes} min{rounded}")
            self.max_steps = planned
        self.window = (time.time(), step)
        self.next_plan = (step + max(1, int(self.replan_every * self.max_minutes * 60 / per_step))
                          if self.replan_every else None)
        if self.next_plan is not None and self.next_plan >= self.max_steps:
            self.next_plan = None
        return note


class StopRequest:
    """Why the run ends before its last step: `reason` is None until SIGINT or SIGTERM arrives (finish the step, save,
    exit; a second signal, more than SIGNAL_ECHO_S later, leaves at once) or the trainer sets it (max_hours,
    max_bad_steps, which also sets `failed`: the run then exits with an error). Installs its handlers when made."""

    def __init__(self, rank):
        self.rank, self.reason, self.signalled_at, self.failed = rank, None, None, False
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)

    def request(self, signum, frame):
        if self.signalled_at is not None:
            if time.time() - self.signalled_at > SIGNAL_ECHO_S:   # a second request: leave now
                os._exit(128 + signum)
            return
        self.signalled_at = time.time()
        self.reason = signal.Signals(signum).name
        print(f"rank {self.rank}: {self.reason} received; finishing this step, saving, exiting (again to quit now)",
              flush=True)

    def set(self, reason, failed=False):
        """The trainer's own reason to stop; a signal's or an earlier one stands unless this one is a failure."""
        if self.reason is None or failed:
            self.reason, self.failed = reason, self.failed or failed


def ema_decay_at(step, decay, warmup_steps):
    """The EMA's decay at an optimizer step: ramps linearly from 0 to `decay` over warmup_steps (0: `decay` at once)."""
    return decay * min(1.0, step / warmup_steps) if warmup_steps else decay
