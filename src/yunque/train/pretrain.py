"""Pretraining: next-token prediction on unlabeled text.

text -> tokenizer (trained or loaded) -> token shards -> GPT -> fit(next-token loss) -> model dir.
The run dir, run.json, resume, lock and cleanup are the skeleton's (train/run.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from yunque.config import LoopConfig, PretrainConfig, preset
from yunque.data.loaders import TokenWindows
from yunque.data.shards import build_shards, open_split, shards_match
from yunque.data.sources import SkipReport, fingerprint, iter_documents
from yunque.losses import next_token_loss, nll_over
from yunque.model.gpt import GPT
from yunque.modeldir import load_config, save_config
from yunque.tokenizer.bpe import Tokenizer, load_tokenizer, train_bpe
from yunque.train.run import Prepared, run_stage
from yunque.train.runtime import Runtime


def main(cfg: PretrainConfig, runtime: Runtime | None = None) -> dict[str, Any]:
    """Run pretraining (in one process, or in each of torchrun's with `runtime`); return the loop's summary plus
    data and model figures."""
    return run_stage("pretrain", cfg, prepare, inputs=lambda c: [*c.data, *([c.tokenizer] if c.tokenizer else [])],
                     runtime=runtime)


def next_token_loss_of(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return next_token_loss(model(x), y)


def prepare(cfg: PretrainConfig, loop: LoopConfig) -> Prepared:
    """Tokenizer, shards, model and the batch/eval functions of a run (fresh or resumed)."""
    out = Path(cfg.out)
    overrides = dict(cfg.model_overrides)
    if cfg.seq_len is not None:  # 0 is an error for ModelConfig to report, not "the preset's"
        overrides["max_seq_len"] = cfg.seq_len
    if not loop.resume:
        preset(cfg.preset, **overrides)  # a bad preset or override fails now, not after tokenizing the corpus
    data_key = fingerprint(list(cfg.data), text_field=cfg.text_field)
    report = SkipReport()
    if loop.resume:
        tokenizer = load_tokenizer(out)
    else:
        tokenizer = _tokenizer(cfg, report)
        tokenizer.save(out)
    # shards are keyed by the data's content and the tokenizer (in the manifest), not by the paths
    data_dir = out / "data"
    if not shards_match(data_dir, tokenizer, cfg.seed, cfg.val_fraction, source=data_key):
        docs = iter_documents(list(cfg.data), text_field=cfg.text_field, report=report)
        build_shards(docs, tokenizer, data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed, source=data_key,
                     progress=loop.progress)
    if report.total:
        print(report.summary())
    train, val = TokenWindows(open_split(data_dir, "train")), TokenWindows(open_split(data_dir, "val"))

    # a resumed run keeps its own architecture: one rebuilt from today's flags could mismatch the saved weights
    model_cfg = load_config(out) if loop.resume else preset(cfg.preset, vocab_size=tokenizer.vocab_size, **overrides)
    seq_len = model_cfg.max_seq_len
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(loop.device)
    if not loop.resume:
        save_config(out, model_cfg)
    # a corpus of one short document puts nothing in the validation split (it is split by document)
    has_val = any(len(shard) > seq_len for shard in val.shards)
    if not has_val:
        print(f"the validation split has no window of {seq_len + 1} tokens; training without validation "
              f"(pass more text, or more than one file)")

    def batches(i: int):  # the global micro-batch: each of world_size processes trains on its batch_size rows
        x, y = train.sample(cfg.batch_size * loop.world_size, seq_len, seed=cfg.seed, step=i)
        return x.to(loop.device), y.to(loop.device)

    def evaluate(m: torch.nn.Module) -> float:  # every process: the same global batches, whatever their number
        batches = val.iter_eval(cfg.batch_size * loop.world_size, seq_len, max_batches=cfg.eval_batches)
        nll, n = nll_over(m, batches, device=loop.device)
        return nll / n

    return Prepared(model, batches, next_token_loss_of, evaluate if has_val else None,
                    tokens_per_step=cfg.batch_size * loop.world_size * seq_len * loop.grad_accum, fingerprint=data_key,
                    info={"parameters": model.num_params(), "model": model_cfg.to_dict(), "data_dir": str(data_dir),
                          "vocab_size": tokenizer.vocab_size},
                    facts={"tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size}})


def _tokenizer(cfg: PretrainConfig, report: SkipReport) -> Tokenizer:
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    texts = (doc.text for doc in iter_documents(list(cfg.data), text_field=cfg.text_field, report=report))
    return train_bpe(texts, cfg.vocab_size, show_progress=False)


__all__ = ["main", "prepare", "PretrainConfig"]
