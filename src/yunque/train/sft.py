"""Supervised fine-tuning into a chat assistant: the whole model, or low-rank adapters (LoRA).

base model dir + chat jsonl -> conversations -> ChatBatches -> fit(next-token loss on assistant tokens only)
    -> full fine-tune: a complete model dir in `out`
    -> LoRA: adapter_model.safetensors + adapter_config.json (+ tokenizer) in `out`; `merge` folds it into a model
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yunque.config import load_json, save_json
from yunque.data.chat_data import POLICIES, ChatBatches, load_conversations, split_conversations
from yunque.model.lora import LoraConfig, apply_adapter, attach_lora, save_adapter
from yunque.modeldir import WEIGHTS, load_model, save_config, save_model
from yunque.precision import resolve_precision
from yunque.tokenizer.chat import has_chat_tokens, load_chat_template
from yunque.train.checkpoint import has_checkpoint
from yunque.train.loop import RUN, LoopConfig, autocast, fit, resumed_loop, saved_run
from yunque.losses import next_token_loss, next_token_nll_sum

CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json")
"""Files of the base model dir carried over to the fine-tuned one: chat template, special tokens, generation
defaults."""


@dataclass(frozen=True)
class SFTConfig:
    """A supervised fine-tuning run."""

    model: str
    """Base model dir (yunque's, or a Hugging Face one with a chat template)."""
    data: tuple[str, ...]
    """jsonl (or .jsonl.gz) files of conversations; see `yunque.data.chat_data.SHAPES` for the record shapes."""
    out: str
    """Directory to create: the fine-tuned model dir, or with `lora` the adapter dir."""
    lora: LoraConfig | None = None
    """Train low-rank adapters on a frozen base instead of every weight; None fine-tunes the whole model."""
    max_seq_len: int | None = None
    """Longest conversation trained on, in tokens; None means the model's max_seq_len."""
    truncation: str = "truncate"
    """A longer conversation is cut at max_seq_len ("truncate") or left out ("drop"); both are counted."""
    batch_size: int = 8
    """Conversations per micro-batch."""
    val_fraction: float = 0.05
    """Share of conversations held out to measure the loss on assistant tokens."""
    eval_batches: int | None = 20
    """Held-out batches per evaluation (each of batch_size conversations); None for all."""
    seed: int = 0
    """Seed for the split, the batch order and the adapters' initialisation."""
    loop: LoopConfig | None = None
    """Optimizer, schedule, precision, budget; out_dir is set to `out`. None means `default_loop(cfg)`."""


def default_loop(cfg: SFTConfig) -> LoopConfig:
    """A short fine-tuning schedule: adapters take a larger learning rate than the whole model."""
    return LoopConfig(out_dir=cfg.out, max_steps=500, lr=1e-3 if cfg.lora else 1e-4, warmup_steps=20,
                      weight_decay=0.0, eval_every=100)


def sft_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the assistant tokens of a ChatBatches batch (other targets are IGNORE)."""
    x, y = batch
    return next_token_loss(model(x), y)


def assistant_loss(model: torch.nn.Module, batches: ChatBatches, *, batch_size: int, device: str = "cpu",
                   max_batches: int | None = None) -> float:
    """Mean loss in nats per assistant token over held-out conversations (padding and prompts not counted)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, y in batches.iter_eval(batch_size, max_batches=max_batches):
            nll, n = next_token_nll_sum(model(x.to(device)), y.to(device))
            total, count = total + float(nll), count + n
    return total / count


def main(cfg: SFTConfig) -> dict[str, Any]:
    """Run fine-tuning; return the loop's summary plus the held-out loss before training and data figures."""
    out = Path(cfg.out)
    loop = cfg.loop or default_loop(cfg)
    if loop.resume:
        cfg, loop = resumed_settings(cfg, loop)
    elif has_checkpoint(out):
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    created = not out.exists()
    try:
        model, train, evaluate, info = prepare(cfg, loop)
    except BaseException:
        if created:  # a run that failed before training leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    loop = dataclasses.replace(loop, out_dir=str(out), trainable_only=cfg.lora is not None,
                               tokens_per_step=round(cfg.batch_size * loop.grad_accum * train.mean_len))
    before = None
    if evaluate is not None and not loop.resume:
        model.eval()
        with torch.no_grad(), autocast(resolve_precision(loop.precision, loop.device), loop.device):
            before = evaluate(model)
        model.train()

    def batches(i: int):
        x, y = train.sample(cfg.batch_size, seed=cfg.seed, step=i)
        return x.to(loop.device), y.to(loop.device)

    summary = fit(model, batches, sft_loss, loop, evaluate=evaluate)
    if cfg.lora is not None:
        save_adapter(out, model, cfg.lora, base_model=str(Path(cfg.model).resolve()))
    summary.update(val_loss_before=before, **info)
    return summary


def prepare(cfg: SFTConfig, loop: LoopConfig):
    """Model (adapters attached), training batches, the held-out evaluation and figures for the summary; on a
    fresh run also writes the out dir's tokenizer, chat files, config and run.json."""
    if cfg.truncation not in POLICIES:
        raise ValueError(f"unknown truncation policy {cfg.truncation!r}; choose one of {', '.join(POLICIES)}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    out = Path(cfg.out)
    model, tokenizer = load_model(cfg.model, device=loop.device)
    template = load_chat_template(cfg.model)
    if template is None and not has_chat_tokens(tokenizer):
        raise ValueError(f"{cfg.model}: the tokenizer has no chat tokens (<|user|>, <|assistant|>, ...) and the "
                         f"dir has no chat template; fine-tune a model yunque pretrained, or a Hugging Face model "
                         f"with a chat_template in tokenizer_config.json")
    seq_len = cfg.max_seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"max_seq_len={seq_len} is longer than the model's context ({model.cfg.max_seq_len}); "
                         f"pass --max-seq-len {model.cfg.max_seq_len} or less")
    conversations = load_conversations(cfg.data)
    fingerprint = hashlib.sha256(json.dumps([c.messages for c in conversations]).encode("utf-8")).hexdigest()
    if loop.resume and fingerprint != load_json(out / RUN).get("data_fingerprint"):
        raise ValueError(f"the conversations in {', '.join(cfg.data)} changed since the run in {out} began, so "
                         f"resuming would not be exact; restore the files or start a new run")
    train_convs, val_convs = split_conversations(conversations, cfg.val_fraction, seed=cfg.seed)
    train = ChatBatches(tokenizer, train_convs, max_seq_len=seq_len, policy=cfg.truncation, template=template)
    val = ChatBatches(tokenizer, val_convs, max_seq_len=seq_len, policy=cfg.truncation, template=template)
    print(f"training on {train.summary()}" + (f"; held out {val.summary()}" if val_convs else ""))

    if cfg.lora is not None:
        torch.manual_seed(cfg.seed)
        layers = attach_lora(model, cfg.lora)
    else:
        model.float()  # fp32 master weights for the optimizer, whatever the checkpoint's dtype
        layers = []
    model.train()
    if not loop.resume:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out)
        for name in CHAT_FILES:
            if (Path(cfg.model) / name).is_file():
                shutil.copyfile(Path(cfg.model) / name, out / name)
        if cfg.lora is None:
            save_config(out, model.cfg)  # with the checkpoint's model.safetensors, out is a model dir
        save_run(out, cfg, loop, fingerprint)

    def evaluate(m: torch.nn.Module) -> float:
        return assistant_loss(m, val, batch_size=cfg.batch_size, device=loop.device, max_batches=cfg.eval_batches)

    info = {"parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "lora_layers": len(layers), "chat_format": "template" if template else "yunque",
            "data": {"train": {**train.counts, "used": len(train)}, "val": {**val.counts, "used": len(val)}}}
    return model, train, evaluate if len(val) else None, info


def save_run(out: Path, cfg: SFTConfig, loop: LoopConfig, fingerprint: str) -> None:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "loop"}
    save_json({"sft": fields, "loop": dataclasses.asdict(loop), "data_fingerprint": fingerprint}, out / RUN)


def resumed_settings(cfg: SFTConfig, loop: LoopConfig) -> tuple[SFTConfig, LoopConfig]:
    """The settings saved in the run dir; from today's flags only the budget (to extend a run), device and
    progress bar count."""
    saved = saved_run(cfg.out)
    old = saved["sft"]
    lora = LoraConfig(**{**old["lora"], "targets": tuple(old["lora"]["targets"])}) if old["lora"] else None
    sft = SFTConfig(**{**old, "data": tuple(old["data"]), "lora": lora, "out": cfg.out})
    return sft, resumed_loop(saved["loop"], loop, cfg.out)


def merge(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> None:
    """Write base + adapter as one ordinary model dir (weights W + scale * B @ A), loadable without yunque's LoRA."""
    out_dir = Path(out_dir)
    if (out_dir / WEIGHTS).exists():
        raise ValueError(f"{out_dir} already holds a model; choose another output directory")
    model, tokenizer = load_model(base_dir)
    save_model(out_dir, apply_adapter(model, adapter_dir), tokenizer)
    for name in CHAT_FILES:
        if (Path(base_dir) / name).is_file():
            shutil.copyfile(Path(base_dir) / name, out_dir / name)
