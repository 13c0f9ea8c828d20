"""Reward models: a chat model's backbone and a scalar head read at the reply's last token, trained on preference
pairs with the Bradley-Terry loss (Ouyang et al. 2022, eq. 1).

pairs -> PairBatches (whole sequences: chosen rows, then rejected) -> WithHeads(model, ("reward",)) -> the reward
at each row's last token (its end of turn) -> bradley_terry_loss(chosen, rejected); the whole backbone or LoRA
adapters train with the head. Held out: the share of pairs ranked right (pairwise accuracy; chance is 50%).

The out dir is a model dir (or an adapter dir of the backbone, with LoRA) with heads.safetensors and reward.json:
what `yunque reward score` and `yunque align --reward` load (train/scoring.py). Under torchrun each process trains
on its B pairs of a global batch, with the head inside the wrapped model; rank 0 alone writes the dir.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from yunque.atomic import atomic_write_text
from yunque.config import REWARD_LOOP, LoopConfig, RewardConfig
from yunque.data.preferences import PairBatches, fingerprint, pair_batches
from yunque.losses import bradley_terry_loss
from yunque.model.heads import WithHeads
from yunque.model.lora import attach_lora
from yunque.modeldir import load_model
from yunque.tokenizer.chat import ChatFormat
from yunque.train.run import Prepared, held_out, run_stage, start_model_dir
from yunque.train.runtime import Runtime
from yunque.train.scoring import REWARD_INFO, reward_scores


def main(cfg: RewardConfig, runtime: Runtime | None = None) -> dict[str, Any]:
    """Train a reward model (in one process, or in each of torchrun's with `runtime`); return the loop's summary
    with held-out pairwise accuracy before and after."""
    runtime = runtime or Runtime()
    if cfg.loop is None:
        lr = 1e-3 if cfg.lora is not None else REWARD_LOOP.lr
        cfg = dataclasses.replace(cfg, loop=dataclasses.replace(REWARD_LOOP, lr=lr))
    kept: dict[str, Any] = {}

    def prepare_and_measure(c: RewardConfig, loop: LoopConfig) -> Prepared:
        run = prepare(c, loop, kept)
        kept.update(model=run.model, loop=loop, out=Path(c.out))
        if not loop.resume and kept["measure"] is not None:
            kept["before"] = held_out(run.model, kept["measure"], loop)
        return run

    summary = run_stage("reward", cfg, prepare_and_measure, inputs=lambda c: [c.model, *c.data], runtime=runtime)
    # every process measures (FSDP's forward is collective); rank 0 alone writes
    after = held_out(kept["model"], kept["measure"], kept["loop"]) if kept["measure"] is not None else {}
    if runtime.is_main:
        info_path = kept["out"] / REWARD_INFO
        info = json.loads(info_path.read_text(encoding="utf-8"))
        atomic_write_text(info_path, json.dumps({**info, "held_out": after, "steps": summary["steps"]}, indent=2)
                          + "\n")
    return {**summary, "before": kept.get("before"), "after": after}


def prepare(cfg: RewardConfig, loop: LoopConfig, kept: dict[str, Any] | None = None) -> Prepared:
    """The backbone with its reward head (adapters attached), pair batches, the Bradley-Terry loss and the held-out
    evaluation; a fresh run also writes the out dir's tokenizer, config (or adapter config) and reward.json."""
    model, tokenizer = load_model(cfg.model, device=loop.device)
    fmt = ChatFormat.of(cfg.model, tokenizer)
    if not fmt.is_chat:
        raise ValueError(f"{cfg.model}: the model has no chat format; a reward model reads conversations, start "
                         f"from a chat model (`yunque sft` makes one)")
    seq_len = cfg.max_seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"max_seq_len={seq_len} is longer than the model's context ({model.cfg.max_seq_len}); "
                         f"pass --max-seq-len {model.cfg.max_seq_len} or less")
    pairs, train, val = pair_batches(cfg.data, fmt, max_seq_len=seq_len, val_fraction=cfg.val_fraction,
                                     seed=cfg.seed)
    model.float()
    if not model.cfg.tie_embeddings:  # the reward reads hidden states, never the logits: no gradient reaches the
        model.lm_head.requires_grad_(False)  # output head (and DDP wants one for every parameter it trains)
    torch.manual_seed(cfg.seed)
    layers = attach_lora(model, cfg.lora) if cfg.lora is not None else []
    rm = WithHeads(model, ("reward",)).train()
    B, W, device = cfg.batch_size, loop.world_size, loop.device

    def batches(i: int):  # the global micro-batch of B x W pairs, process r's B pairs its r-th rows (runtime.shard)
        ids, last = train.collate_full(train.indices(B * W, seed=cfg.seed, step=i), groups=W)
        return ids.to(device), last.to(device)

    def measure(m: WithHeads) -> dict[str, float]:  # every process: the same global batches, whatever their number
        return pairwise_figures(m, val, B * W, device, max_batches=cfg.eval_batches)

    if kept is not None:
        kept["measure"] = measure if val else None
    if not loop.resume:
        out = Path(cfg.out)
        start_model_dir(out, cfg.model, tokenizer, model.cfg, cfg.lora)
        info = {"kind": "reward_model", "backbone": str(Path(cfg.model).resolve()), "lora": cfg.lora is not None,
                "pairs": {"train": len(train), "val": len(val) if val else 0}}
        atomic_write_text(out / REWARD_INFO, json.dumps(info, indent=2) + "\n")
    info = {"parameters": sum(p.numel() for p in rm.parameters()),
            "trainable_parameters": sum(p.numel() for p in rm.parameters() if p.requires_grad),
            "lora_layers": len(layers), "pairs": {"train": len(train), "val": len(val) if val else 0}}
    return Prepared(rm, batches, pair_loss, (lambda m: measure(m)["loss"]) if val else None,
                    tokens_per_step=round(B * W * loop.grad_accum * train.mean_len),
                    trainable_only=cfg.lora is not None,
                    fingerprint=fingerprint(pairs), info=info)


def pair_loss(model: WithHeads, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Bradley-Terry loss of a batch of whole sequences, chosen rows first."""
    ids, last = batch
    chosen, rejected = reward_scores(model, ids, last).chunk(2)
    return bradley_terry_loss(chosen, rejected)


@torch.no_grad()
def pairwise_figures(model: WithHeads, pairs: PairBatches, batch_size: int, device: str, *,
                     max_batches: int | None = None) -> dict[str, float]:
    """Held-out Bradley-Terry loss, pairwise accuracy (ties count half) and mean reward margin."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for k, start in enumerate(range(0, len(pairs), batch_size)):
        if max_batches is not None and k >= max_batches:
            break
        ids, last = pairs.collate_full(range(start, min(start + batch_size, len(pairs))))
        c, r = reward_scores(model, ids.to(device), last.to(device)).chunk(2)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    margin = c - r
    return {"loss": float(bradley_terry_loss(c, r)),
            "accuracy": float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean()),
            "margin": float(margin.mean()), "pairs": len(c)}


__all__ = ["main", "prepare", "pair_loss", "pairwise_figures", "RewardConfig"]
