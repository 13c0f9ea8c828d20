"""Low-rank adapters (LoRA, Hu et al. 2021): attach to a model's linear layers, merge, save and load.

A targeted linear layer W (out, in) computes y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with A (r, in)
and B (out, r) trained and W frozen. B starts at zero, so an attached model computes exactly what the base did.
`LoRALinear` is an `nn.Linear` that keeps the base `weight` and `bias` under their own names, so the base
tensors keep their state-dict keys and only `<layer>.lora_a` / `<layer>.lora_b` are added.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from yunque.atomic import atomic_write, atomic_write_text
from yunque.config import LoraConfig

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update; built from the layer it replaces, sharing its tensors."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's weight and bias are reused, not allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        # adapters in fp32 even on a bf16 base: they are what the optimizer updates
        self.lora_a = nn.Parameter(torch.empty(cfg.rank, self.in_features, device=device))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear and the reference loralib do
        self.scale = cfg.scale
        self.lora_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        h = F.linear(F.linear(self.lora_dropout(x).to(self.lora_a.dtype), self.lora_a), self.lora_b)
        return y + (h * self.scale).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """The update to the weight, scale * B @ A, (out, in)."""
        return (self.lora_b @ self.lora_a) * self.scale


class LoRAOver(nn.Module):
    """An adapter beside a layer that stays as it is and may be shared with other models: y = layer(x) +
    scale * x A^T B^T, unmerged. (LoRALinear owns its base weight, trains and merges into it; this serves several
    adapters over one copy of the base, whatever the layer is: nn.Linear or the engine's packed one.)"""

    def __init__(self, layer: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("lora_a", lora_a)  # (r, in)
        self.register_buffer("lora_b", lora_b)  # (out, r)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        h = F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b)
        return y + (h * self.scale).to(y.dtype)


def with_adapter(model: nn.Module, state: dict[str, torch.Tensor], cfg: LoraConfig) -> nn.Module:
    """A model computing `model` plus the adapter (state and cfg as `load_adapter` returns them), unmerged, that
    shares every weight with `model`: new containers (blocks, attention, ...) over the same layers, with a
    `LoRAOver` on each adapted one. `model` is left as it is. ValueError naming a layer the adapter does not fit."""
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers(), leaves)}
    out = copy.deepcopy(model, memo)
    layers = sorted({key.rsplit(".", 1)[0] for key in state})
    for name in layers:
        a, b = state.get(f"{name}.lora_a"), state.get(f"{name}.lora_b")
        try:
            layer = out.get_submodule(name)
        except AttributeError:
            layer = None
        fits = (a is not None and b is not None and a.dim() == b.dim() == 2 and a.shape[0] == b.shape[1]
                and getattr(layer, "in_features", None) == a.shape[1]
                and getattr(layer, "out_features", None) == b.shape[0])
        if not fits:
            raise ValueError(f"the adapter's layer {name!r} does not fit the model (no such linear layer, or other "
                             f"shapes); is the adapter for another base model?")
        device = next(model.parameters()).device
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent), child,
                LoRAOver(layer, a.to(device, torch.float32), b.to(device, torch.float32), cfg.scale))
    return out


def linear_names(model: nn.Module) -> list[str]:
    """Last name parts of the model's linear layers: the accepted LoRA targets (e.g. qkv, proj, up, down, lm_head)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def attach_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Replace each targeted nn.Linear by a LoRALinear and freeze every other parameter; return the replaced
    layers' names. The model computes the same as before until the adapters are trained."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("this model already has LoRA adapters; merge them (merge_lora) before attaching new ones")
    accepted = linear_names(model)
    unknown = [t for t in cfg.targets if t not in accepted]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    tied = getattr(model, "lm_head", None) is not None and getattr(model, "tok_emb", None) is not None \
        and model.lm_head.weight is model.tok_emb.weight
    if "lm_head" in cfg.targets and tied:
        raise ValueError("lm_head shares its weight with the token embedding (tie_embeddings), so an adapter on "
                         "it could not be merged; leave lm_head out of the LoRA targets")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.targets]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        base = getattr(owner, child)
        setattr(owner, child, LoRALinear(base, cfg).train(base.training))  # keep the model's train/eval mode
    return names


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors by name ("<layer>.lora_a", "<layer>.lora_b"), detached."""
    state = {}
    for name, m in _lora_layers(model).items():
        state[f"{name}.lora_a"] = m.lora_a.detach().contiguous()
        state[f"{name}.lora_b"] = m.lora_b.detach().contiguous()
    return state


def load_lora(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a model with the same adapters attached; ValueError naming any mismatch."""
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the adapter does not fit this model's LoRA layers (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); attach with the adapter's own LoraConfig")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"adapter tensor {key} has shape {tuple(tensor.shape)} but the model's is "
                             f"{tuple(expected[key].shape)}; is the adapter for another base model or rank?")
    with torch.no_grad():
        for name, m in _lora_layers(model).items():
            m.lora_a.copy_(state[f"{name}.lora_a"])
            m.lora_b.copy_(state[f"{name}.lora_b"])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scale * B @ A) and put plain nn.Linear layers back, with all
    parameters trainable again: the result is an ordinary model. Returns `model`, changed in place."""
    with torch.no_grad():
        for name, m in _lora_layers(model).items():
            m.weight.add_(m.delta().to(m.weight.dtype))
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_adapter(adapter_dir: str | Path, model: nn.Module, cfg: LoraConfig, *, base_model: str | None = None) -> None:
    """Write adapter_model.safetensors (the adapter tensors) and adapter_config.json (cfg, and the base model's
    path if given) into `adapter_dir`, each atomically."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model)
    atomic_write(adapter_dir / ADAPTER_WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    save_adapter_config(adapter_dir, cfg, base_model=base_model)


def save_adapter_config(adapter_dir: str | Path, cfg: LoraConfig, *, base_model: str | None = None) -> None:
    """Write adapter_config.json: the LoraConfig and the base model's path (if given)."""
    config = {"adapter_type": "lora", **asdict(cfg), "base_model": base_model}
    atomic_write_text(Path(adapter_dir) / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")


def load_adapter(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """(adapter tensors, LoraConfig) from a dir written by `save_adapter`; ValueError for missing or bad files."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(f"{path}: missing; an adapter dir (made by `yunque sft --lora`) holds "
                             f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        d = json.loads(config_path.read_text(encoding="utf-8"))
        cfg = LoraConfig(rank=d["rank"], alpha=d["alpha"], dropout=d["dropout"], targets=tuple(d["targets"]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: not a yunque LoRA adapter config ({type(e).__name__}: {e})") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{weights_path}: cannot read adapter weights ({e}); the file is corrupt or "
                         f"truncated") from None
    return state, cfg


def apply_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Fold the adapter saved in `adapter_dir` into `model` (in place): an ordinary model again, as if trained
    whole. ValueError, naming the dir, when the adapter is unreadable or does not fit the model."""
    state, cfg = load_adapter(adapter_dir)
    attach_lora(model, cfg)
    try:
        load_lora(model, state)
    except ValueError as e:
        raise ValueError(f"{adapter_dir}: {e}") from None
    return merge_lora(model)
