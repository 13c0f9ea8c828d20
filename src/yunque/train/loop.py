"""The one training loop. Every stage (pretraining, fine-tuning, alignment) calls `fit` with its own loss.

Batches are a pure function of the step (`batches(step)`), so a resumed run sees exactly the batches of an
uninterrupted one; with the optimizer and RNG state restored, fp32 runs on CPU resume bit-identically.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from yunque.config import load_json
from yunque.model.gpt import GPT
from yunque.precision import PRECISIONS, resolve_precision
from yunque.train.checkpoint import load_checkpoint, save_checkpoint
from yunque.train.optim import lr_at, make_optimizer


@dataclass(frozen=True)
class LoopConfig:
    """How to train: steps or time budget, optimizer, schedule, precision, logging and checkpoints."""

    out_dir: str
    """Run directory: checkpoints, metrics.jsonl and loss.png go here."""
    max_steps: int | None = 1000
    """Optimizer steps to take; None means "as many as fit in `minutes`", or on resume "the run's own count"
    (a number given on resume extends or shortens the run, and its schedule)."""
    minutes: float | None = None
    """Wall-clock budget; the step count is calibrated from the first steps and then fixed."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    schedule: str = "cosine"
    """"cosine" or "wsd" (warmup-stable-decay)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    optimizer: str = "adamw"
    """"adamw", or "muon": Muon on the blocks' matrices and AdamW on the rest (see optim.make_optimizer). On
    small CPU runs Muon needs ~10% fewer steps but its steps take twice as long (benchmarks/time_to_loss.py)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    precision: str = "auto"
    """"bf16" autocast, "fp32", or "auto" (bf16 where the hardware does it fast)."""
    compile: str | bool = "auto"
    """torch.compile the training step (model forward + loss; backward through AOTAutograd): "on", "off", or
    "auto": on once the first steps show at least COMPILE_PAYS_AFTER seconds of training left, since compiling
    takes 10-45 s on two CPU cores (True/False mean "on"/"off")."""
    threads: int = 0
    """CPU threads for matrix products (torch.set_num_threads during fit); 0 means one per physical core."""
    eval_every: int = 250
    """Validate every N steps (and at the end); 0 only at the end."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    resume: bool = False
    """Continue from the checkpoint in out_dir."""
    progress: bool = True
    """Show a progress bar."""
    device: str = "cpu"
    """Torch device string."""
    tokens_per_step: int = 0
    """Tokens in one optimizer step, for tokens/s (0 to skip)."""
    trainable_only: bool = False
    """Checkpoint only the parameters being trained (LoRA adapters); the frozen rest comes from the base model."""

    def __post_init__(self) -> None:
        if self.max_steps is None and self.minutes is None and not self.resume:
            raise ValueError("give a step budget (--max-steps) or a time budget (--minutes)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.compile not in ("auto", "on", "off", True, False):
            raise ValueError(f"compile must be auto, on or off, got {self.compile!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (one per physical core) or more, got {self.threads}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if (self.max_steps is not None and self.max_steps < 1) or (self.minutes is not None and self.minutes <= 0):
            raise ValueError(f"the budget must be positive, got max_steps={self.max_steps}, minutes={self.minutes}")
        for name in ("grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} is not available (torch {torch.__version__} finds no CUDA GPU); "
                             f"use --device cpu")


RUN = "run.json"
"""File in a run dir holding the settings the run was started with, which --resume restores."""


def saved_run(out: str | Path) -> dict[str, Any]:
    """The run.json of the run in `out`; ValueError if there is none."""
    path = Path(out) / RUN
    if not path.is_file():
        raise ValueError(f"{path}: missing; there is no run to resume in {out} (run without --resume)")
    return load_json(path)


def resumed_loop(saved: dict[str, Any], today: LoopConfig, out: str | Path) -> LoopConfig:
    """The loop settings a run was saved with; from `today` (the flags of the resuming command) only the budget,
    to extend or shorten the run, the device and the progress bar count."""
    return LoopConfig(**{**saved, "betas": tuple(saved["betas"]), "out_dir": out, "resume": True,
                         "max_steps": today.max_steps, "minutes": today.minutes or saved["minutes"],
                         "device": today.device, "progress": today.progress})


COMPILE_PAYS_AFTER = 120.0
"""Seconds of training left at which compile="auto" compiles. Compiling costs 10-45 s on two CPU cores (less
with a warm inductor cache) and saves 15-40% of each bf16 step at 1M-50M parameters (benchmarks/train.py), so it
repays itself after roughly two minutes."""


def physical_cores() -> int:
    """CPU cores this process may run on, counting hyperthread siblings once (sysfs on Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to `n` (0: one per physical core) inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or physical_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def autocast(precision: str, device: str):
    """bf16 autocast context (fp32 master weights), or a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step; truncated to the resume step on resume."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                if rec["step"] <= resume_step:
                    self.records.append(rec)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """loss.png: training loss (and validation loss where measured) against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fit(model: GPT, batches: Callable[[int], Any], loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        cfg: LoopConfig, *, evaluate: Callable[[torch.nn.Module], float] | None = None,
        optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Train `model` on `batches(step)` (one micro-batch per call: step * grad_accum + i) with `loss_fn(model, batch)`.

    Returns a summary: steps, final loss, val_loss, tokens seen, wall seconds, precision, whether it compiled.
    """
    with num_threads(cfg.threads):
        return _fit(model, batches, loss_fn, cfg, evaluate, optimizer)


def _fit(model, batches, loss_fn, cfg: LoopConfig, evaluate, optimizer) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = cfg.device
    precision = resolve_precision(cfg.precision, device)
    opt = optimizer or make_optimizer(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      betas=cfg.betas, device_type=device.split(":")[0])
    step, max_steps = 0, cfg.max_steps
    if cfg.resume:
        state = load_checkpoint(out, model, opt, trainable_only=cfg.trainable_only)
        # the run's own step count unless a new one is given; None if the run was killed before its time budget
        # was calibrated
        step, max_steps = state["step"], cfg.max_steps or state.get("max_steps")
        if max_steps is None and cfg.minutes is None:
            raise ValueError(f"{out} was stopped before its step count was known; pass --max-steps or --minutes")
    log = MetricsLog(out / "metrics.jsonl", step if cfg.resume else None)
    compile_mode = {True: "on", False: "off"}.get(cfg.compile, cfg.compile)
    # the loss is compiled with the model so that the fp32 cast, log-softmax and their backward fuse
    step_loss = torch.compile(loss_fn) if compile_mode == "on" else loss_fn
    params = [p for p in model.parameters() if p.requires_grad]

    def validate() -> float | None:
        if evaluate is None:
            return None
        model.eval()
        # eager: a compiled graph for no_grad and each evaluation shape would cost more than it saves
        with torch.no_grad(), autocast(precision, device):
            value = evaluate(model)
        model.train()
        return value

    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    # elapsed time carries on across a resume, so metrics and `yunque info` show the run's whole time
    start = time.perf_counter() - (log.records[-1].get("elapsed", 0.0) if log.records else 0.0)
    window_start, window_steps = time.perf_counter(), 0
    # a resumed run with no steps left reports where it ended, not nan
    loss_value = log.records[-1]["loss"] if log.records else float("nan")
    val_loss = next((r["val_loss"] for r in reversed(log.records) if "val_loss" in r), None)
    budget = cfg.minutes * 60 if max_steps is None else None
    budget_start = time.perf_counter()
    # steps per second are measured from (rate_step, rate_start), restarted once the step that compiles is done
    rate_step, rate_start = step, budget_start
    compiles_at = step + 1 if compile_mode == "on" else None
    calibrate_at = step + 10 + (compiles_at is not None)
    decide_compile_at = step + 10 if compile_mode == "auto" else None
    model.train()
    while max_steps is None or step < max_steps:
        lr = lr_at(step, peak=cfg.lr, warmup=cfg.warmup_steps, total=max_steps, min_ratio=cfg.min_lr_ratio,
                   kind=cfg.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            batch = batches(step * cfg.grad_accum + micro)
            with autocast(precision, device):
                loss = step_loss(model, batch)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        now = time.perf_counter()
        if step == decide_compile_at:
            seconds_per_step = (now - rate_start) / (step - rate_step)
            left = budget - (now - budget_start) if budget is not None else (max_steps - step) * seconds_per_step
            if left >= COMPILE_PAYS_AFTER:
                step_loss, compile_mode = torch.compile(loss_fn), "on"
                compiles_at, calibrate_at = step + 1, step + 11
        if step == compiles_at:
            rate_step, rate_start = step, now
        elif budget is not None and step >= calibrate_at:
            # time budget: set the step count from the measured speed so that the schedule decays on time;
            # re-estimated every 10 steps until half the budget is spent, then fixed (and saved for resume)
            elapsed = now - budget_start
            rate = (step - rate_step) / (now - rate_start)
            max_steps = max(step + 1, step + int((budget - elapsed) * rate))
            calibrate_at = step + 10 if elapsed < budget / 2 else float("inf")
            if bar is not None:
                bar.total = max_steps
        last = max_steps is not None and step >= max_steps
        eval_now = last or bool(cfg.eval_every and step % cfg.eval_every == 0)
        save_now = last or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        if step % cfg.log_every == 0 or eval_now or save_now:
            loss_value = float(loss_sum) / cfg.grad_accum  # the only host sync of the step, at log steps
            if not math.isfinite(loss_value):  # checked before every save: a diverged run never overwrites a good one
                raise FloatingPointError(f"loss became {loss_value} at step {step}; lower --lr or check the data")
        if step % cfg.log_every == 0 or eval_now:
            record = {"step": step, "loss": round(loss_value, 5), "lr": lr,
                      "tokens_per_sec": round(cfg.tokens_per_step * window_steps / (now - window_start), 1),
                      "elapsed": round(now - start, 2)}
            if eval_now:
                val_loss = validate()
                if val_loss is not None:
                    record["val_loss"] = round(val_loss, 5)
            log.write(record)
            window_start, window_steps = time.perf_counter(), 0  # tokens/s counts training, not validation
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_loss:.3f}" if val_loss else "-",
                                tok_s=f"{record['tokens_per_sec']:.0f}")
        if bar is not None:
            bar.update(1)
        if save_now:
            save_checkpoint(out, model, opt, step, {"max_steps": max_steps}, trainable_only=cfg.trainable_only)
    if bar is not None:
        bar.close()
    plot_losses(log.records, out / "loss.png")
    return {"steps": step, "loss": loss_value, "val_loss": val_loss, "precision": precision,
            "compiled": compile_mode == "on", "wall_seconds": time.perf_counter() - start,
            "tokens_seen": step * cfg.tokens_per_step}
