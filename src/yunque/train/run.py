"""The stage skeleton: what every training stage does around its own data, model and loss.

    claim --out      refuse a dir that holds something (unless --force, or --resume of a run of this stage);
                     lock it so a second process gets one clear line; recover a save a kill interrupted
    settings         a fresh run writes run.json (stage config, loop config, data fingerprint); --resume reads them
                     back and takes from today's flags only the budget, device, checkpoint cadence and progress
    prepare          the stage's own part: data -> batches, model preparation, loss (a `Prepared`)
    train            the held-out loss before training, then `fit`
    clean up         a run that fails before its first checkpoint removes what it created; one stopped after a
                     checkpoint stays, and `yunque info` says how far it got and that --resume continues it. A run
                     killed before its first checkpoint keeps its run.json: --resume starts it again from step 0

A stage is then a config, a `prepare` function and a call to `run_stage`: pretrain.py and sft.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from yunque.atomic import atomic_write, atomic_write_text, recover
from yunque.config import LoopConfig, from_dict, load_json, to_dict
from yunque.model.lora import save_adapter_config
from yunque.modeldir import checkpoint_progress, save_config
from yunque.precision import autocast, resolve_precision
from yunque.train.checkpoint import has_checkpoint
from yunque.train.loop import LossFn, fit
from yunque.train.runtime import Runtime

RUN = "run.json"
"""File in a run dir holding the settings the run was started with, which --resume restores."""
LOCK = ".lock"
"""Held (flock) by the process writing a run dir; the kernel releases it when that process ends, however it ends."""
FROM_TODAY = ("max_steps", "minutes", "device", "progress", "checkpoint_every", "checkpoint_minutes", "threads",
              "log_every", "parallel", "activation_checkpointing", "peer_timeout", "world_size")
"""Loop settings a resumed run takes from the resuming command; every other setting is the run's own."""


@dataclass
class Prepared:
    """What a stage hands the skeleton: its model and data, ready to train."""

    model: torch.nn.Module
    batches: Callable[[int], Any]
    """Micro-batch i (a pure function of i, so resume is exact)."""
    loss: LossFn
    evaluate: Callable[[torch.nn.Module], float] | None
    """Held-out loss of a model (None: no held-out data)."""
    tokens_per_step: int = 0
    trainable_only: bool = False
    """Checkpoint only the trained parameters (LoRA adapters)."""
    fingerprint: str | None = None
    """What the training data was (a content hash); a resumed run whose data changed is refused."""
    info: dict[str, Any] = field(default_factory=dict)
    """Figures for the summary (parameters, data counts, ...)."""
    facts: dict[str, Any] = field(default_factory=dict)
    """What a fresh run found out and records in run.json beside its settings (e.g. the tokenizer's real size)."""
    loss_falls: bool = True
    """Whether a falling training loss is the sign of learning (not for a policy-gradient surrogate): the loop's
    undertrained warning looks at the loss only if so."""


def run_stage(stage: str, cfg: Any, prepare: Callable[[Any, LoopConfig], Prepared], *,
              inputs: Callable[[Any], list[str]] = lambda cfg: [], runtime: Runtime | None = None) -> dict[str, Any]:
    """Run one training stage: claim cfg.out, restore or record the settings, `prepare(cfg, loop)`, evaluate,
    `fit`. `cfg` is the stage's config dataclass, with `out`, `force` and `loop` fields; `inputs(cfg)` names the
    paths the run reads (never cleared by --force). Returns fit's summary with the stage's info and
    `val_loss_before` (fresh runs).

    Under torchrun (`runtime` from train/distributed.py) rank 0 alone claims and writes the run dir; the others
    wait for it, take its settings and prepare as a resumed run does, from what rank 0 wrote."""
    runtime = runtime or Runtime()
    out = Path(cfg.out)
    loop = dataclasses.replace(cfg.loop, world_size=runtime.world_size, device=runtime.device(cfg.loop.device),
                               threads=runtime.threads(cfg.loop.threads))
    if not runtime.is_main:
        return _follow(prepare, runtime)
    with claim(out, resume=loop.resume, force=cfg.force, inputs=inputs(cfg)) as fresh_dir:
        saved: dict[str, Any] = {}
        if loop.resume:
            cfg, loop, saved = restore(stage, type(cfg), out, loop)
            cfg = per_process_batch(cfg, saved["loop"].get("world_size", 1), loop.world_size)
            if not has_checkpoint(out):  # stopped before its first checkpoint: start again, the same run exactly
                print(f"{out} has no checkpoint yet: starting the run again from step 0 with its saved settings")
                _clear(out, keep=(RUN,))
                loop = dataclasses.replace(loop, resume=False)
        loop = dataclasses.replace(loop, out_dir=str(out))
        with cleanup_on_failure(out, created=fresh_dir):
            if not loop.resume:  # first, so that a kill from here on leaves a run --resume can start again
                record(out, stage, cfg, loop, saved.get("data_fingerprint"))
            run = prepare(cfg, loop)
            before_data = saved.get("data_fingerprint")
            if before_data is not None and run.fingerprint is not None and run.fingerprint != before_data:
                raise ValueError(f"the training data changed since the run in {out} began, so resuming would not "
                                 f"be exact; restore the data, or start a new run (--force)")
            if not loop.resume:
                record(out, stage, cfg, loop, run.fingerprint, run.facts)
            loop = dataclasses.replace(loop, tokens_per_step=run.tokens_per_step, trainable_only=run.trainable_only)
            runtime.broadcast_object((cfg, loop))  # the other processes prepare from what is now on disk
            before = None
            if run.evaluate is not None and not loop.resume:
                before = held_out(run.model, run.evaluate, loop)
            summary = fit(run.model, run.batches, run.loss, loop, evaluate=run.evaluate, runtime=runtime,
                          loss_falls=run.loss_falls)
    return {**summary, **run.info, "val_loss_before": before}


def _follow(prepare: Callable[[Any, LoopConfig], Prepared], runtime: Runtime) -> dict[str, Any]:
    """A process other than rank 0: the run's settings from rank 0 once it has claimed the dir and prepared, then
    the stage prepared read-only (as a resumed run: tokenizer, shards and config from the run dir), then `fit`."""
    cfg, loop = runtime.broadcast_object(None)
    loop = dataclasses.replace(loop, device=runtime.device(loop.device), threads=runtime.threads(loop.threads))
    run = prepare(cfg, dataclasses.replace(loop, resume=True))
    summary = fit(run.model, run.batches, run.loss, loop, evaluate=run.evaluate, runtime=runtime,
                  loss_falls=run.loss_falls)
    return {**summary, **run.info, "val_loss_before": None}


def per_process_batch(cfg: Any, saved_world_size: int, world_size: int) -> Any:
    """`cfg` with the batch per process that keeps a resumed run's global micro-batch (batch_size x world size)
    on another number of processes, so it sees the same data; an error if it does not split evenly. A config
    whose per-process amounts are other fields names them in `per_process` (alignment's rollout prompts)."""
    names = [n for n in getattr(cfg, "per_process", ("batch_size",)) if hasattr(cfg, n)]
    if saved_world_size == world_size or not names:
        return cfg
    changes = {}
    for name in names:
        rows = getattr(cfg, name) * saved_world_size
        if rows % world_size:
            raise ValueError(f"the run's {name} is {getattr(cfg, name)} x {saved_world_size} processes = {rows}, "
                             f"which {world_size} processes cannot share evenly; resume with a number of processes "
                             f"that divides {rows}")
        changes[name] = rows // world_size
        print(f"resuming {saved_world_size}-process run on {world_size}: {name} {rows // world_size} per process "
              f"(the same {rows} in all)")
    return dataclasses.replace(cfg, **changes)


def held_out(model: torch.nn.Module, evaluate: Callable[[torch.nn.Module], float], loop: LoopConfig) -> float:
    """`evaluate(model)` as the loop validates: eval mode, no grad, the run's precision."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(resolve_precision(loop.precision, loop.device), loop.device):
        value = evaluate(model)
    model.train(was_training)
    return value


# ---- the run dir ----

CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json")
"""Files of a base model dir carried over to a model trained from it: chat template, special tokens, generation
defaults."""


def start_model_dir(out: Path, base: str | Path, tokenizer: Any, model_cfg: Any, lora: Any = None) -> None:
    """Make `out` a model dir (with the checkpoint's weights) or, with a LoraConfig, an adapter dir of `base`:
    the tokenizer, the base's chat files, and config.json or adapter_config.json."""
    tokenizer.save(out)
    for name in CHAT_FILES:
        if (Path(base) / name).is_file():
            atomic_write(out / name, lambda p, src=Path(base) / name: shutil.copyfile(src, p))
    if lora is None:
        save_config(out, model_cfg)
    else:
        save_adapter_config(out, lora, base_model=str(Path(base).resolve()))


@contextlib.contextmanager
def claim(out: Path, *, resume: bool, force: bool, inputs: list[str] = ()) -> Iterator[bool]:
    """Hold `out` for this run: lock it, refuse what must not be overwritten, clear it for --force. Yields whether
    the run starts from an empty dir (so that a failure may remove everything in it)."""
    existed = out.exists()
    if existed and not out.is_dir():
        raise ValueError(f"{out} is a file, not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    with lock(out):
        recover(out)
        held = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        if resume:
            if not (out / RUN).is_file():
                raise ValueError(f"{out / RUN}: missing; there is no run to resume in {out} (run without --resume)")
        elif held and not force:
            raise ValueError(f"{out} already holds {what_is_in(out)}; pass --resume to continue a run, --force to "
                             f"replace it, or choose another --out")
        elif held:
            _refuse_clearing_inputs(out, inputs)
            _clear(out)
        try:
            yield not resume
        except BaseException:
            if not existed and not has_checkpoint(out):
                shutil.rmtree(out, ignore_errors=True)  # the lock file goes with it
            raise


@contextlib.contextmanager
def cleanup_on_failure(out: Path, *, created: bool) -> Iterator[None]:
    """A fresh run that fails before its first checkpoint leaves `out` empty (the dir itself goes in `claim`)."""
    try:
        yield
    except BaseException:
        if created and not has_checkpoint(out):
            _clear(out)
        raise


def _clear(out: Path, keep: tuple[str, ...] = ()) -> None:
    """Delete what `out` holds but its lock (and `keep`)."""
    for path in out.iterdir():
        if path.name != LOCK and path.name not in keep:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _refuse_clearing_inputs(out: Path, inputs: list[str]) -> None:
    root = out.resolve()
    for spec in inputs:
        path = Path(spec).resolve()
        if path == root or root in path.parents:
            raise ValueError(f"--force would delete {spec}, which this run reads from {out}; choose another --out")


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """An exclusive lock on `out` (flock on out/.lock): a second process gets one line naming the holder."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ValueError(f"another yunque process (pid {holder}) is writing to {out}; wait for it to finish, "
                             f"or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)


def what_is_in(out: Path) -> str:
    """A few words on what a non-empty dir holds, for the refusal message."""
    if (out / RUN).is_file():
        stage = _read_run(out).get("stage") or "training"
        progress = checkpoint_progress(out)
        if progress is None:
            return f"a `yunque {stage}` run with no checkpoint"
        step, total = progress
        return (f"a `yunque {stage}` run finished at step {step}" if step == total else
                f"a `yunque {stage}` run stopped at step {step}" + (f" of {total}" if total else ""))
    if (out / "config.json").is_file():
        return "a model"
    names = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    return f"{len(names)} file(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


# ---- run.json ----

def record(out: Path, stage: str, cfg: Any, loop: LoopConfig, fingerprint: str | None,
           facts: dict[str, Any] | None = None) -> None:
    """Write run.json: what a --resume needs to continue exactly (paths made absolute, so it works from anywhere),
    and what the run found out (`facts`)."""
    config = {k: v for k, v in to_dict(cfg).items() if k not in ("loop", "force")}
    config = _absolute(config)
    atomic_write_text(out / RUN, _json({"stage": stage, "config": config, "loop": to_dict(loop),
                                        "data_fingerprint": fingerprint, **(facts or {})}))


def restore(stage: str, cls: type, out: Path, today: LoopConfig) -> tuple[Any, LoopConfig, dict[str, Any]]:
    """(stage config, loop config, run.json) of the run in `out`, for --resume: its own settings, with FROM_TODAY
    taken from `today`."""
    saved = _read_run(out)
    if saved.get("stage") != stage:
        raise ValueError(f"{out} holds a {saved.get('stage') or 'different'} run, not a {stage} run; resume it with "
                         f"`yunque {saved.get('stage')} --out {out} --resume`")
    try:
        loop = from_dict(LoopConfig, {**saved["loop"], **{k: getattr(today, k) for k in FROM_TODAY},
                                      "out_dir": str(out), "resume": True})
        cfg = from_dict(cls, {**saved["config"], "out": str(out), "loop": loop})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{out / RUN}: cannot restore the run's settings ({e}); start a new run") from None
    return cfg, loop, saved


def _read_run(out: Path) -> dict[str, Any]:
    try:
        saved = load_json(out / RUN)
    except (OSError, ValueError) as e:
        raise ValueError(f"{out / RUN}: unreadable ({e}); start a new run") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{out / RUN}: not a run record; start a new run")
    return saved


def _absolute(config: dict[str, Any]) -> dict[str, Any]:
    """Input paths (model, data, tokenizer dirs) as absolute paths, so that --resume works from another dir."""
    fixed = dict(config)
    for key in ("model", "tokenizer"):
        value = fixed.get(key)
        if isinstance(value, str) and value != "bytes" and Path(value).exists():
            fixed[key] = str(Path(value).resolve())
    if isinstance(fixed.get("data"), (list, tuple)):
        fixed["data"] = [str(Path(p).resolve()) if Path(p).exists() else p for p in fixed["data"]]
    return fixed


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"


__all__ = ["run_stage", "per_process_batch", "Prepared", "start_model_dir", "CHAT_FILES", "claim", "lock", "record",
           "restore", "held_out", "RUN", "FROM_TODAY"]
