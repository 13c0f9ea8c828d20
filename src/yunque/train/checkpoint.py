"""Atomic checkpoints: weights in model.safetensors, optimizer/RNG/step in train_state.pt.

Both files are written in full under temporary names and fsynced, then renamed into place under a journal
(yunque/atomic.py): a kill while writing leaves the previous checkpoint, a kill between the two renames is
finished by `recover` on the next load. Both files carry the step, and a pair whose steps differ is refused.

With `trainable_only` (LoRA) the weights file holds only the parameters being trained, under the name a LoRA
adapter dir uses (adapter_model.safetensors): a run stopped at any checkpoint is a usable adapter. The frozen
rest is not saved; it comes back from where the model was loaded (the base model).

A distributed run (train/distributed.py) writes its checkpoints sharded under checkpoint/step-N/ and commits each
with the same pair: train_state.pt naming that dir (`SHARDED`) and the gathered full weights. `load_checkpoint`
reads both kinds, so one process continues a run that many began; a one-file save removes older shards.

A model trained with scalar heads (model/heads.WithHeads: a reward model, PPO's value) saves its GPT as above and
its heads in heads.safetensors, written and renamed with the rest.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from yunque.atomic import atomic_write_all, recover
from yunque.model.gpt import GPT
from yunque.model.heads import HEADS, WithHeads
from yunque.model.lora import ADAPTER_WEIGHTS
from yunque.modeldir import WEIGHTS, load_state, load_weights, write_weights

STATE = "train_state.pt"
TRAINABLE = ADAPTER_WEIGHTS
SHARDS = "checkpoint"
"""Dir of a distributed run's sharded checkpoints (one step-NNNNNNNN dir per step; train/distributed.py)."""
SHARDED = "sharded"
"""Key of train_state.pt naming the sharded checkpoint it completes (relative to the run dir)."""


def save_checkpoint(out_dir: str | Path, model: GPT, optimizer: torch.optim.Optimizer, step: int,
                    extra: dict[str, Any] | None = None, *, trainable_only: bool = False) -> None:
    """Save weights (only the trainable ones if `trainable_only`) and training state after `step` optimizer steps."""
    out_dir = Path(out_dir)
    state = {"step": step, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), **(extra or {})}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    metadata = {"step": str(step)}
    if (extra or {}).get("max_steps") is not None:
        metadata["max_steps"] = str(extra["max_steps"])
    files = [(out_dir / STATE, lambda p: torch.save(state, p))]
    if isinstance(model, WithHeads):
        heads = {k: v.detach().contiguous() for k, v in model.heads.state_dict().items()}
        files.append((out_dir / HEADS, lambda p: save_file(heads, str(p), metadata=metadata)))
        model = model.model
    if trainable_only:
        files.append((out_dir / TRAINABLE, lambda p: save_file(trainable_weights(model), str(p), metadata=metadata)))
    else:
        files.append((out_dir / WEIGHTS, lambda p: write_weights(p, model, metadata=metadata)))
    atomic_write_all(files)
    shutil.rmtree(out_dir / SHARDS, ignore_errors=True)  # a distributed run's shards, older than this checkpoint


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name: what a `trainable_only` checkpoint holds."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def has_checkpoint(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds a training checkpoint (after finishing a save that a kill interrupted)."""
    recover(out_dir)
    return (Path(out_dir) / STATE).is_file()


def load_checkpoint(out_dir: str | Path, model: GPT, optimizer: torch.optim.Optimizer, *,
                    trainable_only: bool = False) -> dict[str, Any]:
    """Restore weights (only the trainable ones if `trainable_only`), optimizer and RNG in place; return the
    saved state (with "step"). A checkpoint a distributed run sharded (any world size) loads here too."""
    recover(out_dir)
    state = read_state(out_dir)
    if SHARDED in state:
        from yunque.train.distributed import load_sharded

        load_sharded(Path(out_dir) / state[SHARDED], model, optimizer, rank=0)
        return state
    if isinstance(model, WithHeads):
        model.heads.load_state_dict(read_heads(out_dir, state)[0])
        model = model.model
    weights = read_weights(out_dir, state, trainable_only=trainable_only)
    weights = {k: v.to(next(model.parameters()).device) for k, v in weights.items()}
    if trainable_only:
        _copy_trainable(model, weights, Path(out_dir) / TRAINABLE)
    else:
        load_state(model, weights, out_dir)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def read_state(out_dir: str | Path) -> dict[str, Any]:
    """train_state.pt of a checkpoint (without finishing an interrupted save: see `recover`)."""
    path = Path(out_dir) / STATE
    if not path.is_file():
        raise ValueError(f"{path}: missing; there is nothing to resume (run without --resume to start afresh)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt pickle zip
        raise ValueError(f"{path}: cannot read training state ({type(e).__name__}); the checkpoint is corrupt, "
                         f"delete it to restart from the weights alone") from None


def read_heads(out_dir: str | Path, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The scalar heads of a one-file checkpoint (heads.safetensors), checked to be of the step of `state`."""
    heads, meta = _read(Path(out_dir) / HEADS)
    if meta.get("step") != str(state["step"]):
        raise ValueError(f"{out_dir}: {HEADS} is from step {meta.get('step')} but {STATE} from step "
                         f"{state['step']} (a save was interrupted); start a new run")
    return heads, meta


def read_weights(out_dir: str | Path, state: dict[str, Any], *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The weights of a one-file checkpoint (only the trainable ones if `trainable_only`), checked to be of the
    step of `state`."""
    weights, metadata = _load_trainable(out_dir) if trainable_only else load_weights(out_dir)
    if metadata.get("step") != str(state["step"]):
        raise ValueError(f"{out_dir}: weights are from step {metadata.get('step')} but {STATE} is from step "
                         f"{state['step']} (a save was interrupted); resume is not exact, start a new run")
    return weights


def _load_trainable(out_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(out_dir) / TRAINABLE
    if not path.is_file():
        raise ValueError(f"{path}: missing; the checkpoint holds no trainable weights (was it made without LoRA?)")
    return _read(path)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise ValueError(f"{path}: missing; the checkpoint is incomplete, start a new run")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read weights ({e}); the file is corrupt or truncated") from None


def _copy_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source}: the saved weights are not the parameters being trained (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); resume with the run's own LoRA settings")
    with torch.no_grad():
        for name, p in params.items():
            if weights[name].shape != p.shape:
                raise ValueError(f"{source}: tensor {name} has shape {tuple(weights[name].shape)} but the model's "
                                 f"is {tuple(p.shape)}")
            p.copy_(weights[name])
