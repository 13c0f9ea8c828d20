"""Many processes under torchrun: the one module that touches torch.distributed.

    torchrun --nproc-per-node 2 -m yunque pretrain --out runs/py ...     (and sft, reward train, align)

`session()` starts the process group from torchrun's environment (gloo on CPU, nccl on CUDA) and yields a
`DistributedRuntime`, which the stage skeleton and the loop ask what `runtime.Runtime` answers for one process:

    wrap        DDP (a whole model per process, gradients all-reduced in buckets) or FSDP2 (`fully_shard` per
                block, then the root: weights, gradients and optimizer state sharded, all-gathered when a block
                runs; bf16 parameters with fp32 gradient reduction under bf16), activation checkpointing if asked
    shard       rank r takes rows [r*b, (r+1)*b) of the global micro-batch: data is a pure function of
                (seed, step, rank, world size), so one process with batch 2b sees what two with batch b see
    no_sync     no gradient all-reduce on the micro-batches of an accumulation but the last
    mean, broadcast_flag, broadcast_object, gather_object, barrier: the few collectives the loop, the skeleton
                and RL rollouts need
    whole       a plain copy of the model with FSDP's shards gathered, for the engine that samples rollouts
    checkpoints torch.distributed.checkpoint: each rank writes its shards into checkpoint/step-N.tmp, rank 0
                renames it whole and then commits the step by writing train_state.pt (naming the dir) and the
                gathered full model.safetensors (and a reward or value head's heads.safetensors) together
                (atomic.py); a step without its train_state is ignored and deleted. Such a checkpoint loads on
                any number of processes, or on one without torchrun.

Only rank 0 writes the run dir, metrics, plot and stdout. A process that fails prints one line naming its rank;
the others, whose collectives then break, exit without adding to it (a timeout says so in one line).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from yunque.atomic import atomic_write_all, fsync_dir, recover
from yunque.config import LoopConfig
from yunque.model.heads import HEADS, WithHeads
from yunque.modeldir import WEIGHTS
from yunque.precision import physical_cores, resolve_precision
from yunque.train.checkpoint import SHARDED, SHARDS, STATE, TRAINABLE, read_heads, read_state, read_weights
from yunque.train.runtime import Runtime, blocks, checkpoint_blocks, gpt_of

DDP_BYTES_PER_PARAM = 16
"""fp32 weight, gradient and AdamW's two moments: what DDP holds per parameter in every process."""


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its environment)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def choose_parallel(n_params: int, memory_per_process: int) -> str:
    """auto's choice: "ddp" if a whole model with its gradients and AdamW state takes at most half the memory a
    process has (the other half for activations), else "fsdp"."""
    return "ddp" if n_params * DDP_BYTES_PER_PARAM <= memory_per_process // 2 else "fsdp"


@contextlib.contextmanager
def session(command: str, loop: LoopConfig) -> Iterator[Runtime]:
    """The runtime of this process: a `DistributedRuntime` under torchrun (the process group lives for the
    block), else the single-process `Runtime`. Under torchrun, errors end the block in one line (see module doc)
    and SystemExit; only rank 0 prints to stdout."""
    if not under_torchrun():
        yield Runtime()
        return
    runtime = DistributedRuntime.from_env(loop.device, loop.peer_timeout)
    try:
        with open(os.devnull, "w") as devnull, contextlib.ExitStack() as quiet:
            if not runtime.is_main:
                quiet.enter_context(contextlib.redirect_stdout(devnull))
            yield runtime
    except BaseException as e:  # noqa: BLE001 - every failure becomes one line and an exit code
        code, line = failure_line(e, runtime, command, loop.peer_timeout)
        if line:
            print(line, file=sys.stderr, flush=True)
        raise SystemExit(code) from None
    finally:
        runtime.close()


def failure_line(error: BaseException, runtime: DistributedRuntime, command: str,
                 timeout: float) -> tuple[int, str | None]:
    """(exit code, the line to print or None) for an error that ends this process's part of a job."""
    who = f"rank {runtime.rank} of {runtime.world_size}"
    if isinstance(error, SystemExit):
        return (error.code if isinstance(error.code, int) else 1), None
    if isinstance(error, KeyboardInterrupt):  # every process stops at the same step: rank 0 says it
        return 130, (f"yunque: interrupted{': ' + str(error) if str(error) else ''}" if runtime.is_main else None)
    if isinstance(error, FloatingPointError) and not runtime.is_main:  # from values all processes agree on
        return 1, None
    text = " ".join(str(error).split())
    if _timed_out(error):
        return 1, (f"yunque {command}: error: {who} waited {timeout:g} s for the other processes (one hangs, or a "
                   f"node is unreachable); raise --peer-timeout if they were busy (a large checkpoint)")
    if _peer_gone(error):
        return 1, None  # the process that failed has said why
    name = "" if isinstance(error, (ValueError, OSError, FloatingPointError, EOFError)) else type(error).__name__ + ": "
    return 1, f"yunque {command}: error: {who}: {name}{text}"


def _timed_out(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, (RuntimeError, dist.DistError)) and ("timed out" in text or "timeout" in text)


def _peer_gone(error: BaseException) -> bool:
    """A collective that broke because another process ended (gloo: connection closed or reset; nccl: aborted)."""
    text = str(error).lower()
    signs = ("connection closed", "connection reset", "broken pipe", "read error", "peer", "aborted", "socket")
    return isinstance(error, (RuntimeError, dist.DistError)) and any(s in text for s in signs)


class DistributedRuntime(Runtime):
    """One process of a torchrun job (see the module doc)."""

    def __init__(self, rank: int, world_size: int, local_rank: int, local_world_size: int, device_type: str) -> None:
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size, self.device_type = local_rank, local_world_size, device_type
        self.parallel: str | None = None  # "ddp" or "fsdp" once a model is wrapped
        self.inner: torch.nn.Module | None = None
        self.skeleton: torch.nn.Module | None = None

    @classmethod
    def from_env(cls, device: str, timeout: float) -> DistributedRuntime:
        """Join the job torchrun describes in the environment: gloo on CPU, nccl on CUDA."""
        kind = torch.device(device).type
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device {device!r} cannot train under torchrun; use --device cpu or cuda")
        env = {k: int(os.environ[k]) for k in ("RANK", "WORLD_SIZE")}
        local = int(os.environ.get("LOCAL_RANK", env["RANK"]))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
        if kind == "cuda":
            if torch.cuda.device_count() < local_world:
                raise ValueError(f"{local_world} processes on this node but {torch.cuda.device_count()} CUDA "
                                 f"GPU(s); pass --nproc-per-node {torch.cuda.device_count()} to torchrun")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if kind == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
        return cls(env["RANK"], env["WORLD_SIZE"], local, local_world, kind)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- where and how much ----

    def device(self, requested: str) -> str:
        return f"cuda:{self.local_rank}" if self.device_type == "cuda" else "cpu"

    @property
    def here(self) -> str:
        """The device of this process's tensors and collectives."""
        return self.device(self.device_type)

    def threads(self, requested: int) -> int:
        """--threads 0 on CPU: the node's physical cores shared among its processes."""
        return requested or max(1, physical_cores() // self.local_world_size)

    def memory_per_process(self) -> int:
        if self.device_type == "cuda":
            return torch.cuda.mem_get_info()[0]
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // self.local_world_size
        except OSError:
            pass
        return 2**62  # unknown: assume it fits

    # ---- the model ----

    def wrap(self, model: torch.nn.Module, cfg: LoopConfig) -> torch.nn.Module:
        """DDP or FSDP2 around `model` (see `choose_parallel` for auto); call before making the optimizer."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.nn.parallel import DistributedDataParallel

        n_params = sum(p.numel() for p in model.parameters())
        parallel = cfg.parallel
        if parallel == "auto":
            parallel = "ddp" if self.world_size == 1 else choose_parallel(n_params, self.memory_per_process())
        if parallel == "fsdp" and cfg.optimizer == "muon":
            raise ValueError("--optimizer muon orthogonalises whole matrices, which --parallel fsdp shards; use "
                             "--parallel ddp or --optimizer adamw")
        self.inner, self.parallel = model, parallel
        if parallel == "fsdp":  # the model's structure without its weights, for `whole`
            self.skeleton = _meta_copy(model)
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)
        if parallel == "ddp":
            ids = [self.local_rank] if self.device_type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
        bf16 = resolve_precision(cfg.precision, cfg.device) == "bf16"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                      reduce_dtype=torch.float32 if bf16 else None)
        for block in blocks(model):  # one all-gather / reduce-scatter per block
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the rest: embeddings, final norm, output head, scalar heads
        return model

    def shard(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            rows = batch.shape[0]
            if rows % self.world_size:
                raise ValueError(f"a global micro-batch of {rows} rows does not split over {self.world_size} "
                                 f"processes; make the batch a multiple of the number of processes")
            per = rows // self.world_size
            return batch[self.rank * per:(self.rank + 1) * per]
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.shard(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self.shard(v) for k, v in batch.items()}
        return batch

    def no_sync(self, model: torch.nn.Module, last_micro_batch: bool):
        if self.parallel == "ddp":
            return contextlib.nullcontext() if last_micro_batch else model.no_sync()
        if self.parallel == "fsdp":
            model.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    # ---- collectives ----

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().float().clone().to(self.here)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def agree(self, flag: bool, now: float) -> tuple[bool, float]:
        t = torch.tensor([float(flag), now if self.is_main else 0.0], dtype=torch.float64, device=self.here)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # one collective a step: the flags' count, rank 0's clock
        return bool(t[0].item() > 0), float(t[1].item())

    def broadcast_flag(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=self.here)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any]:
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, obj)
        return parts

    def whole(self, module: torch.nn.Module):
        from torch.distributed.fsdp import FSDPModule

        if not any(isinstance(m, FSDPModule) for m in module.modules()):  # DDP's, or not yet wrapped: whole
            return contextlib.nullcontext(module)
        return self._gathered(module)

    @contextlib.contextmanager
    def _gathered(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """A plain copy of `module` (a part of the FSDP model) with the full weights all-gathered into every
        process, made on the meta-device skeleton `wrap` kept; it lives for the block."""
        name = next(n for n, m in self.inner.named_modules() if m is module)
        full = get_model_state_dict(self.inner, options=StateDictOptions(full_state_dict=True))
        plain = _meta_copy(self.skeleton)
        plain.load_state_dict(full, assign=True)
        try:
            yield plain.get_submodule(name)
        finally:
            del plain, full

    def barrier(self) -> None:
        dist.barrier()

    def nonfinite_parameter(self, model: torch.nn.Module) -> str | None:
        bad = next((n for n, p in model.named_parameters()
                    if p.requires_grad and not _local(p).isfinite().all()), None)
        return (bad or "a parameter of another process") if self.broadcast_flag(bad is not None) else None

    # ---- checkpoints ----

    def save_checkpoint(self, out: Path, model: torch.nn.Module, optimizer: Any, step: int, extra: dict[str, Any],
                        *, trainable_only: bool) -> None:
        """Every rank writes its shards of the model and optimizer (and its RNG state) into
        checkpoint/step-N.tmp; rank 0 renames the dir whole, then commits the step: train_state.pt naming it and
        the full weights (gathered to rank 0) as model.safetensors, together and atomically."""
        out = Path(out)
        final = out / SHARDS / f"step-{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a kill at this step of an earlier attempt
            tmp.mkdir(parents=True)
        self.barrier()
        model_state, optim_state = get_state_dict(model, optimizers=_optimizers(optimizer))
        with open(tmp / f"rng-{self.rank}.pt", "wb") as f:
            torch.save(_rng_state(), f)
            f.flush()
            os.fsync(f.fileno())  # durable like DCP's own files before rank 0 commits the step
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)  # returns once all have written
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            metadata = {"step": str(step)}
            if extra.get("max_steps") is not None:
                metadata["max_steps"] = str(extra["max_steps"])
            state = {"step": step, SHARDED: f"{SHARDS}/{final.name}", "world_size": self.world_size,
                     "parallel": self.parallel, **extra}
            from safetensors.torch import save_file

            files = _export(full, self.inner or model, trainable_only)
            atomic_write_all([(out / STATE, lambda p: torch.save(state, p))]
                             + [(out / name, lambda p, w=w: save_file(w, str(p), metadata=metadata))
                                for name, w in files.items()])
            for old in (out / SHARDS).iterdir():  # older steps, and steps a kill left uncommitted
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def load_checkpoint(self, out: Path, model: torch.nn.Module, optimizer: Any, *,
                        trainable_only: bool) -> dict[str, Any]:
        """Restore either kind of checkpoint in every process: sharded (by any number of processes: DCP reshards)
        or one file (a single-process run's: every process reads it, and FSDP keeps its shard)."""
        if self.is_main:
            recover(out)  # finish a commit a kill interrupted; only rank 0 writes the run dir
        self.barrier()
        state = read_state(out)
        if SHARDED in state:
            load_sharded(Path(out) / state[SHARDED], model, optimizer, rank=self.rank)
            return state
        weights = read_weights(out, state, trainable_only=trainable_only)
        inner = self.inner or model
        if getattr(getattr(gpt_of(inner), "cfg", None), "tie_embeddings", False) and "tok_emb.weight" in weights:
            weights["lm_head.weight"] = weights["tok_emb.weight"]
        if isinstance(inner, WithHeads):  # the GPT's names under "model.", the heads' from heads.safetensors
            heads, _ = read_heads(out, state)
            weights = {**{f"model.{k}": v for k, v in weights.items()}, **{f"heads.{k}": v for k, v in heads.items()}}
        set_state_dict(model, _optimizers(optimizer), model_state_dict=weights,
                       optim_state_dict=_by_name(state["optimizer"], model, optimizer),
                       options=StateDictOptions(full_state_dict=True, strict=not trainable_only))
        torch.set_rng_state(state["torch_rng"])
        return state


def load_sharded(path: Path, model: torch.nn.Module, optimizer: Any, *, rank: int) -> None:
    """Load a sharded checkpoint into `model` and `optimizer` as they are now (plain, DDP or FSDP2, any number of
    processes, or one process without a process group): DCP reads the parts each rank needs."""
    if not (path / ".metadata").is_file():
        raise ValueError(f"{path}: not a complete sharded checkpoint (no .metadata); the run dir is damaged, start "
                         f"a new run (--force)")
    model_state, optim_state = get_state_dict(model, optimizers=_optimizers(optimizer))
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())  # one process without torchrun too
    set_state_dict(model, _optimizers(optimizer), model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng-{rank}.pt"
    rng = rng if rng.is_file() else path / "rng-0.pt"  # more processes than saved: the main one's stream
    saved = torch.load(rng, weights_only=True)
    torch.set_rng_state(saved["torch_rng"])
    if "cuda_rng" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda_rng"])


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def _optimizers(optimizer: Any) -> tuple[torch.optim.Optimizer, ...]:
    """The torch optimizers behind the loop's one (optim.Optimizers holds Muon and AdamW)."""
    return tuple(getattr(optimizer, "optimizers", (optimizer,)))


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory), buffers copied: a skeleton to load
    a full state dict into with assign=True."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _export(full: dict[str, torch.Tensor], model: torch.nn.Module,
            trainable_only: bool) -> dict[str, dict[str, torch.Tensor]]:
    """A gathered full state dict as the one-file weights every other command reads, by file name: the GPT's
    (tied head stored once; only the trained tensors of a LoRA run) and, for a model with heads, heads.safetensors
    beside it, as a single-process run writes them (train/checkpoint.py)."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    if isinstance(model, WithHeads):
        files[HEADS] = {k.removeprefix("heads."): v.detach().contiguous() for k, v in full.items()
                        if k.startswith("heads.")}
        full = {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
        model = model.model
    if trainable_only:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        full = {k: v for k, v in full.items() if k in names}
    elif getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        full = {k: v for k, v in full.items() if k != "lm_head.weight"}
    files[TRAINABLE if trainable_only else WEIGHTS] = {k: v.detach().contiguous() for k, v in full.items()}
    return files


def _by_name(saved: dict[str, Any], model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """A single-process optimizer state dict (tensors keyed by position) keyed by parameter name instead, as
    set_state_dict takes it: position i is the i-th parameter of the optimizer's groups, in order."""
    parts = saved["optimizers"] if "optimizers" in saved else [saved]
    names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    for opt, part in zip(_optimizers(optimizer), parts):
        for group, saved_group in zip(opt.param_groups, part["param_groups"]):
            fqns = [names[id(p)] for p in group["params"]]
            for fqn, index in zip(fqns, saved_group["params"]):
                if index in part["state"]:
                    state[fqn] = part["state"][index]
            groups.append({**saved_group, "params": fqns})
    return {"state": state, "param_groups": groups}


__all__ = ["session", "DistributedRuntime", "load_sharded", "choose_parallel", "under_torchrun", "failure_line"]
