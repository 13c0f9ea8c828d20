"""The one training loop. Every stage (pretraining, fine-tuning, alignment) calls `fit` with its own loss.

Batches are a pure function of the step (`batches(step)`), so a resumed run sees exactly the batches of an
uninterrupted one; with the optimizer and RNG state restored, fp32 runs on CPU resume bit-identically.

What is not the step itself lives beside it: the budget and the compile decision (budget.py, pure and unit
tested), metrics, progress and the plot (logger.py), the process group (runtime.py: a distributed runtime is the
only thing that touches torch.distributed), autocast and threads (precision.py), checkpoints (checkpoint.py).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from yunque.config import DEFAULT_STEPS, LoopConfig
from yunque.precision import autocast, num_threads, resolve_precision
from yunque.train.budget import StepBudget, compile_pays, undertrained
from yunque.train.logger import TrainLog
from yunque.train.optim import lr_at, make_optimizer
from yunque.train.runtime import Runtime

Batches = Callable[[int], Any]
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def fit(model: torch.nn.Module, batches: Batches, loss_fn: LossFn, cfg: LoopConfig, *,
        evaluate: Callable[[torch.nn.Module], float | None] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        runtime: Runtime | None = None, loss_falls: bool = True) -> dict[str, Any]:
    """Train `model` on `batches(i)` (micro-batch i = step * grad_accum + k) with `loss_fn(model, batch)`.

    `evaluate(model)` gives the held-out loss every `eval_every` steps and at the end; it may return None to skip
    a check (a benchmark that looks closely only near its target). `loss_falls=False` says the training loss is
    not a measure of progress (a policy-gradient surrogate hovers near 0 whatever the policy learns), so a loss
    that did not fall is no sign of an undertrained model.

    Ctrl-C or SIGTERM stops after the current step with a checkpoint, then raises KeyboardInterrupt. Returns a
    summary: steps, final loss, val_loss, tokens seen, wall seconds, precision, whether it compiled, warmup, and
    `undertrained` (why the model is not worth much yet, or None).
    """
    _check_device(cfg.device)
    with num_threads(cfg.threads), _StopSignals() as stop:
        return _Training(model, batches, loss_fn, cfg, evaluate, optimizer, runtime or Runtime(), loss_falls).run(stop)


class _Training:
    """The state of one `fit` call; `run` is the loop, the other methods are its parts."""

    def __init__(self, model, batches, loss_fn, cfg: LoopConfig, evaluate, optimizer, runtime: Runtime,
                 loss_falls: bool = True) -> None:
        self.batches, self.cfg, self.evaluate, self.runtime = batches, cfg, evaluate, runtime
        self.loss_falls = loss_falls
        # under torchrun DDP (the same parameters) or FSDP (the same module, its parameters now shards), before the
        # optimizer is made; the optimizer sees the model's own parameter names (Muon picks matrices by name)
        self.model = runtime.wrap(model, cfg)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.precision = resolve_precision(cfg.precision, cfg.device)
        self.opt = optimizer or make_optimizer(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               betas=cfg.betas, device_type=torch.device(cfg.device).type)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.start, saved_total = 0, None
        if cfg.resume:
            state = runtime.load_checkpoint(self.out, self.model, self.opt, trainable_only=cfg.trainable_only)
            self.start, saved_total = state["step"], state.get("max_steps")
        _, now = runtime.agree(False, time.perf_counter())
        self.budget = _plan(cfg, self.start, saved_total, now)
        self.log = TrainLog(self.out, resume_step=self.start if cfg.resume else None, total=self.budget.total,
                            progress=cfg.progress, enabled=runtime.is_main)
        self.clock0 = now - self.log.elapsed  # elapsed time carries on across a resume
        self.step_fn = _StepFn(loss_fn, cfg.compile, self.log.note, first_step=self.start + 1)
        self.last_save, self.window = now, (now, 0)

    def run(self, stop: _StopSignals) -> dict[str, Any]:
        cfg, budget = self.cfg, self.budget
        step, loss = self.start, None
        self.model.train()
        while not budget.done(step):
            lr = lr_at(step, peak=cfg.lr, warmup=budget.warmup(cfg.warmup_steps), total=budget.total,
                       min_ratio=cfg.min_lr_ratio, kind=cfg.schedule)
            for group in self.opt.param_groups:
                group["lr"] = lr
            loss = self.train_step(step)
            step += 1
            # every process ends the step with rank 0's clock and with a stop asked of any of them, so that time
            # budgets, timed checkpoints and signals lead all of them to the same decisions
            interrupted, now = self.runtime.agree(stop.requested, time.perf_counter())
            self.window = (self.window[0], self.window[1] + 1)
            if self.step_fn.compiled_at == step:  # the step that compiled says nothing about speed
                budget.restart_clock(step, now)
            else:  # a time budget's step count follows the measured speed; schedule and bar follow it
                budget.observe(step, now)
            if step == self.start + 10 and self.step_fn.mode == "auto" and compile_pays(budget.seconds_left(step, now)):
                self.step_fn.compile(step + 1)
            last = budget.done(step)
            evaluate = last or bool(cfg.eval_every and step % cfg.eval_every == 0)
            save = last or interrupted or self.save_due(step, now)
            if evaluate or save or step % cfg.log_every == 0:
                self.record(step, loss, lr, now, evaluate)
            if save:
                self.save(step)
            self.log.advance(budget.total)
            if interrupted:
                self.log.close(self.out)
                raise KeyboardInterrupt(f"saved a checkpoint at step {step} in {self.out}; --resume continues it")
        return self.finish(step)

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; the mean loss (a tensor: no host sync here). A compiled
        step that fails is done again eagerly, and the run stays eager."""
        cfg = self.cfg
        while True:
            try:
                total = torch.zeros((), device=cfg.device)
                for micro in range(cfg.grad_accum):
                    batch = self.runtime.shard(self.batches(step * cfg.grad_accum + micro))  # this process's rows
                    with self.runtime.no_sync(self.model, micro == cfg.grad_accum - 1):
                        with autocast(self.precision, cfg.device):
                            loss = self.step_fn(self.model, batch)
                        (loss / cfg.grad_accum).backward()
                    total += loss.detach()
                break
            except Exception as e:  # noqa: BLE001 - only a compiled step is retried; an eager error propagates
                if not self.step_fn.compiled:
                    raise
                self.opt.zero_grad(set_to_none=True)
                self.step_fn.fall_back(e)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total / cfg.grad_accum

    def save_due(self, step: int, now: float) -> bool:
        cfg = self.cfg
        by_steps = bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        return by_steps or bool(cfg.checkpoint_minutes and now - self.last_save >= cfg.checkpoint_minutes * 60)

    def record(self, step: int, loss: torch.Tensor, lr: float, now: float, evaluate: bool) -> None:
        value = float(self.runtime.mean(loss))  # the only host sync of a step, at log steps
        if not math.isfinite(value):  # checked before every save: a diverged run never overwrites a good one
            raise FloatingPointError(f"loss became {value} at step {step}; lower --lr or check the data")
        start, steps = self.window
        record = {"step": step, "loss": round(value, 5), "lr": lr,
                  "tokens_per_sec": round(self.cfg.tokens_per_step * steps / max(now - start, 1e-9), 1),
                  "elapsed": round(now - self.clock0, 2)}
        value = self.validate() if evaluate and self.evaluate is not None else None
        if value is not None:
            record["val_loss"] = round(value, 5)
        self.log.write(record)
        self.window = (time.perf_counter(), 0)  # tokens/s counts training, not validation

    def validate(self) -> float | None:
        self.model.eval()
        # eager: a compiled graph for no_grad and each evaluation shape would cost more than it saves
        with torch.no_grad(), autocast(self.precision, self.cfg.device):
            value = self.evaluate(self.model)
        self.model.train()
        return None if value is None else float(self.runtime.mean(torch.tensor(value)))

    def save(self, step: int) -> None:
        bad = self.runtime.nonfinite_parameter(self.model)
        if bad is not None:  # never overwrite a good checkpoint with NaN or inf weights
            raise FloatingPointError(f"parameter {bad} is not finite at step {step}; lower --lr or check the data")
        self.runtime.save_checkpoint(self.out, self.model, self.opt, step, {"max_steps": self.budget.total},
                                     trainable_only=self.cfg.trainable_only)
        self.last_save = self.runtime.agree(False, time.perf_counter())[1]

    def finish(self, step: int) -> dict[str, Any]:
        self.log.close(self.out)
        warmup = self.budget.warmup(self.cfg.warmup_steps)
        losses = (self.log.first_loss, self.log.loss) if self.loss_falls else (None, None)
        why = undertrained(step, warmup, *losses) if step > self.start else None
        if why:
            self.log.note(f"warning: {why}")
        return {"steps": step, "loss": self.log.loss, "val_loss": self.log.val_loss, "precision": self.precision,
                "compiled": self.step_fn.compiled, "wall_seconds": time.perf_counter() - self.clock0,
                "tokens_seen": step * self.cfg.tokens_per_step, "warmup_steps": warmup, "undertrained": why}


def _plan(cfg: LoopConfig, start: int, saved_total: int | None, now: float) -> StepBudget:
    """The step budget: --max-steps, or --minutes from now, or on resume the run's own count, else DEFAULT_STEPS."""
    if cfg.minutes is not None:
        return StepBudget(total=None, seconds=cfg.minutes * 60, start_step=start, start_time=now)
    if cfg.max_steps is not None:
        return StepBudget(total=cfg.max_steps, start_step=start, start_time=now)
    if cfg.resume:
        if saved_total is None:
            raise ValueError(f"{cfg.out_dir} was stopped before its time budget was measured, so its step count is "
                             f"unknown; pass --max-steps or --minutes with --resume")
        return StepBudget(total=saved_total, start_step=start, start_time=now)
    return StepBudget(total=DEFAULT_STEPS, start_step=start, start_time=now)


class _StepFn:
    """`loss_fn(model, batch)`, eager or compiled. Compiled, the model's forward and the loss are one graph (the
    fp32 cast, log-softmax and their backward fuse); a compile that fails falls back to eager with one notice.

    Compiled with static shapes: one graph per batch shape. Pretraining has one shape; fine-tuning pads its
    batches to a few length buckets (data/chat_data.length_bucket). Left to guess, torch.compile turns the second
    shape it meets into a dynamic-shape graph, and that graph failed on CPU with torch 2.13 when a batch of
    another length came ("expected size 4==4, stride 2048==1024 at dim=0": tests/train/test_sft.py)."""

    def __init__(self, loss_fn: LossFn, mode: str, note: Callable[[str], None], first_step: int) -> None:
        self.eager, self.fn, self.mode, self.note = loss_fn, loss_fn, mode, note
        self.compiled_at: int | None = None
        if mode == "on":
            self.compile(first_step)

    @property
    def compiled(self) -> bool:
        return self.fn is not self.eager

    def compile(self, at_step: int) -> None:
        self.fn, self.compiled_at = torch.compile(self.eager, dynamic=False), at_step

    def fall_back(self, error: Exception) -> None:
        first = (str(error).strip().splitlines() or [""])[0][:160]
        self.note(f"torch.compile failed ({type(error).__name__}: {first}); training on without compiling")
        self.fn, self.mode = self.eager, "off"

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.fn(model, batch)


class _StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the step in progress, with a checkpoint; a second
    signal stops at once. Only in the main thread (signal handlers can be set nowhere else).

    A second signal within SAME_SIGNAL seconds is the same request: under torchrun a Ctrl-C reaches each worker
    from the terminal and again, forwarded, from torchrun."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    SAME_SIGNAL = 2.0

    def __init__(self) -> None:
        self.requested = False
        self._first = 0.0
        self._before: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if time.monotonic() - self._first < self.SAME_SIGNAL:
                return
            raise KeyboardInterrupt
        self.requested, self._first = True, time.monotonic()
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
              f"(once more to stop at once)", flush=True)

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._before[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)


def _check_device(device: str) -> None:
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} is not available (torch {torch.__version__} finds no CUDA GPU); "
                         f"use --device cpu")


__all__ = ["fit", "LoopConfig"]
