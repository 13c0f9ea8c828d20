"""Supervised fine-tuning into a chat assistant: the whole model, or low-rank adapters (LoRA).

base model dir + chat jsonl -> conversations -> ChatBatches -> fit(next-token loss on assistant tokens only)
    -> full fine-tune: a complete model dir in `out`
    -> LoRA: adapter_model.safetensors + adapter_config.json (+ tokenizer) in `out`, a usable adapter at every
       checkpoint; `merge` folds it into a model
The run dir, run.json, resume, lock and cleanup are the skeleton's (train/run.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from yunque.atomic import atomic_write
from yunque.config import LoopConfig, SFTConfig, sft_loop
from yunque.data.chat_data import ChatBatches, load_conversations, split_conversations
from yunque.losses import next_token_loss, nll_over
from yunque.model.lora import apply_adapter, attach_lora, save_adapter_config
from yunque.modeldir import WEIGHTS, load_model, save_config, save_model
from yunque.outputs import staged_dir
from yunque.tokenizer.chat import ChatFormat
from yunque.train.run import Prepared, run_stage
from yunque.train.runtime import Runtime

CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json")
"""Files of the base model dir carried over to the fine-tuned one: chat template, special tokens, generation
defaults."""


def main(cfg: SFTConfig, runtime: Runtime | None = None) -> dict[str, Any]:
    """Run fine-tuning (in one process, or in each of torchrun's with `runtime`); return the loop's summary plus
    the held-out loss before training and data figures."""
    if cfg.loop is None:
        from dataclasses import replace

        cfg = replace(cfg, loop=sft_loop(cfg.lora is not None))
    return run_stage("sft", cfg, prepare, inputs=lambda c: [c.model, *c.data], runtime=runtime)


def sft_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the assistant tokens of a ChatBatches batch (other targets are IGNORE)."""
    x, y = batch
    return next_token_loss(model(x), y)


def assistant_loss(model: torch.nn.Module, batches: ChatBatches, *, batch_size: int, device: str = "cpu",
                   max_batches: int | None = None) -> float:
    """Mean loss in nats per assistant token over held-out conversations (padding and prompts not counted)."""
    nll, n = nll_over(model, batches.iter_eval(batch_size, max_batches=max_batches), device=device)
    return nll / n


def prepare(cfg: SFTConfig, loop: LoopConfig) -> Prepared:
    """Model (adapters attached), training batches and the held-out evaluation; on a fresh run also writes the
    out dir's tokenizer, chat files, config (full) or adapter config (LoRA)."""
    out = Path(cfg.out)
    model, tokenizer = load_model(cfg.model, device=loop.device)
    fmt = ChatFormat.of(cfg.model, tokenizer)
    if not fmt.is_chat:
        raise ValueError(f"{cfg.model}: the tokenizer has no chat tokens (<|user|>, <|assistant|>, ...) and the "
                         f"dir has no chat template; fine-tune a model yunque pretrained, or a Hugging Face model "
                         f"with a chat_template in tokenizer_config.json")
    seq_len = cfg.max_seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"max_seq_len={seq_len} is longer than the model's context ({model.cfg.max_seq_len}); "
                         f"pass --max-seq-len {model.cfg.max_seq_len} or less")
    conversations = load_conversations(cfg.data)
    data_key = hashlib.sha256(json.dumps([c.messages for c in conversations]).encode("utf-8")).hexdigest()
    train_convs, val_convs = split_conversations(conversations, cfg.val_fraction, seed=cfg.seed)
    train = ChatBatches(fmt, train_convs, max_seq_len=seq_len, policy=cfg.truncation)
    val = ChatBatches(fmt, val_convs, max_seq_len=seq_len, policy=cfg.truncation)
    print(f"training on {train.summary()}" + (f"; held out {val.summary()}" if val_convs else ""))

    if cfg.lora is not None:
        torch.manual_seed(cfg.seed)
        layers = attach_lora(model, cfg.lora)
    else:
        model.float()  # fp32 master weights for the optimizer, whatever the checkpoint's dtype
        layers = []
    model.train()
    if not loop.resume:
        tokenizer.save(out)
        for name in CHAT_FILES:
            if (Path(cfg.model) / name).is_file():
                atomic_write(out / name, lambda p, src=Path(cfg.model) / name: shutil.copyfile(src, p))
        if cfg.lora is None:
            save_config(out, model.cfg)  # with the checkpoint's model.safetensors, out is a model dir
        else:  # with the checkpoint's adapter_model.safetensors, out is an adapter dir
            save_adapter_config(out, cfg.lora, base_model=str(Path(cfg.model).resolve()))

    def batches(i: int):  # the global micro-batch: each of world_size processes trains on its batch_size rows
        x, y = train.sample(cfg.batch_size * loop.world_size, seed=cfg.seed, step=i)
        return x.to(loop.device), y.to(loop.device)

    def evaluate(m: torch.nn.Module) -> float:  # every process: the same global batches, whatever their number
        return assistant_loss(m, val, batch_size=cfg.batch_size * loop.world_size, device=loop.device,
                              max_batches=cfg.eval_batches)

    info = {"parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "lora_layers": len(layers), "chat_format": fmt.kind,
            "data": {"train": {**train.counts, "used": len(train)}, "val": {**val.counts, "used": len(val)}}}
    return Prepared(model, batches, sft_loss, evaluate if len(val) else None,
                    tokens_per_step=round(cfg.batch_size * loop.world_size * loop.grad_accum * train.mean_len),
                    trainable_only=cfg.lora is not None, fingerprint=data_key, info=info)


def merge(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> None:
    """Write base + adapter as one ordinary model dir (weights W + scale * B @ A), loadable without yunque's LoRA.
    An existing non-empty `out_dir` is refused unless `force`; a failed merge leaves nothing behind."""
    with staged_dir(out_dir, force=force, sources=(base_dir, adapter_dir)) as tmp:
        model, tokenizer = load_model(base_dir)
        save_model(tmp, apply_adapter(model, adapter_dir), tokenizer)
        for name in CHAT_FILES:
            if (Path(base_dir) / name).is_file():
                shutil.copyfile(Path(base_dir) / name, tmp / name)


__all__ = ["main", "prepare", "merge", "sft_loss", "assistant_loss", "SFTConfig", "WEIGHTS"]
