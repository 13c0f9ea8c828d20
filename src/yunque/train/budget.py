"""The budget of a training run: how many steps it takes, how long it warms up, whether compiling pays, and
whether it ended undertrained.

Pure: the loop passes in step numbers and times in seconds, so every decision here is unit-tested without a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WARMUP_SHARE = 0.2
"""Warmup takes at most this share of a run's steps: a run that the budget cuts short still leaves warmup and
reaches its peak learning rate and decay (a 100-step warmup in a 95-step run would end still warming up)."""
CALIBRATE_EVERY = 10
"""Steps between re-estimates of what a time budget affords."""
RATE_WINDOW = 10
"""Re-estimates over which the speed is measured (~100 steps): recent enough to follow a machine that slows down
(another job starts), long enough not to chase the noise of single steps."""
COMPILE_SECONDS = 30.0
"""What compiling the training step costs on two CPU cores (10-45 s measured at 1M-50M parameters; less with a
warm inductor cache)."""
COMPILE_GAIN = 0.25
"""Share of a step's time that the compiled step saves (15-40% measured for bf16 at 1M-50M parameters,
benchmarks/train.py). Compiling pays when the time left times this exceeds COMPILE_SECONDS: two minutes."""

SHORT_RUN_MINUTES = 2.0
"""Time budgets up to this many minutes, in fp32 on a CPU, train FP32_SHORT_RUN where not given (measured at
0.3-2 minutes; longer runs keep the preset, whose depth and wider MLP pay back once the tokens are many)."""
FP32_SHORT_RUN: dict[str, Any] = {"n_layer": 2, "batch_size": 12, "seq_len": 64, "d_ff": 256, "n_kv_head": 2,
                                  "lr": 2e-3, "warmup_steps": 50, "min_lr_ratio": 0.05, "betas": (0.9, 0.99)}
"""The mini preset's width (128) in two layers, for the steps a short fp32 budget affords (~0.7M tokens in 30 s on
two AVX2 cores). Measured on Tiny Shakespeare bytes with AVX2 emulated on a Zen 4 (benchmarks/time_to_loss.py,
4 Dec 2026): at this size a step's time is the matrix products' and, as much again, the elementwise and attention
ops of each layer, so two layers take 0.54x the time of four per step (27.7 against 51.3 ms, alternated in one
process) and reach validation loss 1.88 in 1.3x the steps: a 950-step schedule ends at 1.863, four layers' 720-step
one at 1.873, in 0.71x the time; `pretrain --minutes 2` ends at held-out loss 1.725 with two layers, 1.767 with four
(4,456 against 2,281 steps). Three layers fall between; one layer ends at 2.01; lr 3e-3 ends at ~1.98.
A narrower MLP (d_ff 256, not 384) and two key/value heads give 1.1-1.3x the tokens/s; batch 12 at context 64 and
lr 2e-3 need fewer tokens than batch 16-32 or lr 3e-3, and context 128-256 costs more time for the same loss;
torch.compile saves ~10% of a step at this size in fp32 but takes 15-35 s cold. `yunque pretrain --minutes 0.35`
on the first 90% of Tiny Shakespeare: held-out loss 1.93 with four layers of this, 2.81 with the preset's defaults
(76 steps at context 256)."""
SHAPE_FLAGS = ("n_layer", "n_head", "d_model", "d_ff", "n_kv_head")
"""Flags that change the preset's shape: FP32_SHORT_RUN is tuned for the mini preset's width and heads."""


def short_run_choice(minutes: float | None, *, fp32_cpu: bool, preset: str,
                     given: set[str] | frozenset[str]) -> dict[str, Any]:
    """What a `--minutes` run chooses for itself on the CPU it runs on, leaving out the flags in `given`.

    A run of the mini preset in fp32 on a CPU (`fp32_cpu`: one without native bf16, or --precision fp32) with a
    budget of at most SHORT_RUN_MINUTES takes FP32_SHORT_RUN but for the flags given. Other runs (bf16, longer
    budgets, step counts, another preset or shape) take nothing: the preset and the flags' defaults.
    """
    if minutes is None or not fp32_cpu or minutes > SHORT_RUN_MINUTES:
        return {}
    if preset != "mini" or set(given) & set(SHAPE_FLAGS):
        return {}
    return {k: v for k, v in FP32_SHORT_RUN.items() if k not in given}


@dataclass
class StepBudget:
    """How many steps a run takes: a fixed count, or as many as a time budget affords, measured as it goes.

    With a time budget the count is estimated from the recent speed every CALIBRATE_EVERY steps, to the end: a
    machine that slows down halfway (another job starts) shortens the run and its schedule instead of running
    past the budget. The current count is saved with checkpoints, so a resumed run keeps its schedule.
    `restart_clock` restarts the speed measurement, e.g. after the step that compiled.
    """

    total: int | None
    """Steps the run will end at; None while a time budget is not yet calibrated."""
    seconds: float | None = None
    """The time budget, counted from `start_time`; None for a fixed count."""
    start_step: int = 0
    start_time: float = 0.0

    def __post_init__(self) -> None:
        self._samples = [(self.start_step, self.start_time)]  # (step, time) at the start and each re-estimate
        self._next = self.start_step + CALIBRATE_EVERY if self.seconds is not None else None

    def restart_clock(self, step: int, now: float) -> None:
        """Measure speed from here on (the steps before were not representative: a compile, a warm-up)."""
        self._samples = [(step, now)]
        if self._next is not None:
            self._next = step + CALIBRATE_EVERY

    def seconds_per_step(self, step: int, now: float) -> float | None:
        first_step, first_time = self._samples[0]
        return (now - first_time) / (step - first_step) if step > first_step else None

    def seconds_left(self, step: int, now: float) -> float | None:
        """Time the run has left: what the time budget leaves, or the steps left at the measured speed."""
        if self.seconds is not None:
            return self.seconds - (now - self.start_time)
        per_step = self.seconds_per_step(step, now)
        return None if per_step is None or self.total is None else (self.total - step) * per_step

    def observe(self, step: int, now: float) -> bool:
        """After `step` steps at time `now`: re-estimate a time budget's step count when due; True if it changed."""
        if self._next is None or step < self._next:
            return False
        self._samples = [*self._samples[-RATE_WINDOW:], (step, now)]
        (first_step, first_time), elapsed = self._samples[0], now - self.start_time
        rate = (step - first_step) / max(now - first_time, 1e-9)
        total = max(step + 1, step + int((self.seconds - elapsed) * rate))
        self._next = step + CALIBRATE_EVERY
        changed, self.total = total != self.total, total
        return changed

    def done(self, step: int) -> bool:
        return self.total is not None and step >= self.total

    def warmup(self, requested: int) -> int:
        """Warmup steps for this run: `requested`, but at most WARMUP_SHARE of the run (at least 1)."""
        if self.total is None or requested == 0:
            return requested
        return min(requested, max(1, int(self.total * WARMUP_SHARE)))


def compile_pays(seconds_left: float | None) -> bool:
    """Whether compiling the training step now repays its cost within the time the run has left."""
    return seconds_left is not None and seconds_left * COMPILE_GAIN >= COMPILE_SECONDS


def undertrained(step: int, warmup: int, first_loss: float | None, last_loss: float | None) -> str | None:
    """Why a run that ended at `step` gave a model that is not worth much yet, or None.

    Ended inside warmup (the learning rate never reached its peak), or the training loss fell by less than a
    tenth from the first logged value.
    """
    if step <= warmup:
        return (f"the run ended at step {step}, inside its {warmup}-step warmup: the model is undertrained; give it "
                f"more --minutes or --max-steps")
    if first_loss is not None and last_loss is not None and last_loss > 0.9 * first_loss:
        return (f"the training loss barely fell ({first_loss:.3f} -> {last_loss:.3f}): the model is undertrained; "
                f"give it more --minutes or --max-steps, or a higher --lr")
    return None


__all__ = ["StepBudget", "compile_pays", "undertrained", "short_run_choice", "FP32_SHORT_RUN", "SHORT_RUN_MINUTES",
           "WARMUP_SHARE", "COMPILE_SECONDS", "COMPILE_GAIN"]
