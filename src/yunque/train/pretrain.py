"""Pretraining: next-token prediction on unlabeled text.

text -> tokenizer (trained or loaded) -> token shards -> GPT -> fit(next_token_loss) -> model dir.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from yunque.config import preset, save_json
from yunque.data.loaders import TokenWindows
from yunque.data.shards import build_shards, open_split, shards_match
from yunque.data.sources import SkipReport, iter_documents
from yunque.eval.perplexity import score_windows
from yunque.model.gpt import GPT
from yunque.modeldir import load_config, save_config
from yunque.tokenizer.bpe import Tokenizer, load_tokenizer, train_bpe
from yunque.train.checkpoint import has_checkpoint
from yunque.train.loop import RUN, LoopConfig, fit, resumed_loop, saved_run
from yunque.losses import next_token_loss


@dataclass(frozen=True)
class PretrainConfig:
    """A pretraining run."""

    out: str
    """Run / model directory to create."""
    data: tuple[str, ...] = ()
    """Text files, folders or jsonl files; empty means the built-in corpus (Python's own source and docs)."""
    text_field: str = "text"
    """Field holding the text in jsonl records."""
    preset: str = "mini"
    """Named model size (see `yunque.config.PRESETS`)."""
    tokenizer: str | None = None
    """'bytes', a directory or tokenizer.json to reuse; None trains a byte-level BPE on the data."""
    vocab_size: int = 4096
    """Vocabulary size when a BPE tokenizer is trained."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    seq_len: int | None = None
    """Training context; None means the preset's max_seq_len."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields that replace the preset's (n_layer, d_model, ...)."""
    val_fraction: float = 0.05
    """Share of documents held out for validation."""
    eval_batches: int = 20
    """Validation batches per evaluation (each of batch_size sequences)."""
    seed: int = 0
    """Seed for initialisation, the data split and batch order."""
    loop: LoopConfig | None = None
    """Optimizer, schedule, precision, budget; out_dir is set to `out`."""


def prepare_tokenizer(cfg: PretrainConfig, report: SkipReport) -> Tokenizer:
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    texts = (doc.text for doc in iter_documents(list(cfg.data), text_field=cfg.text_field, report=report))
    return train_bpe(texts, cfg.vocab_size, show_progress=False)


def save_run(out: Path, cfg: PretrainConfig, loop: LoopConfig) -> None:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "loop"}
    save_json({"pretrain": fields, "loop": dataclasses.asdict(loop)}, out / RUN)


def resumed_settings(cfg: PretrainConfig, loop: LoopConfig) -> tuple[PretrainConfig, LoopConfig]:
    """The settings saved in the run dir; from today's flags only the budget (to extend a run), device and
    progress bar count."""
    saved = saved_run(cfg.out)
    pre = PretrainConfig(**{**saved["pretrain"], "data": tuple(saved["pretrain"]["data"]), "out": cfg.out})
    return pre, resumed_loop(saved["loop"], loop, cfg.out)


def main(cfg: PretrainConfig) -> dict[str, Any]:
    """Run pretraining; return the loop's summary plus data and model figures."""
    out = Path(cfg.out)
    loop = cfg.loop or LoopConfig(out_dir=cfg.out)
    if loop.resume:
        cfg, loop = resumed_settings(cfg, loop)
    elif has_checkpoint(out):
        raise ValueError(f"{out} already holds a trained model; pass --resume to continue it or choose another --out")
    created = not out.exists()
    try:
        run = prepare(cfg, loop)
    except BaseException:
        if created:  # a run that failed before training leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    model, model_cfg, batches, evaluate, data_dir = run
    loop = LoopConfig(**{**loop.__dict__, "out_dir": str(out),
                         "tokens_per_step": cfg.batch_size * model_cfg.max_seq_len * loop.grad_accum})
    summary = fit(model, batches, next_token_loss_of, loop, evaluate=evaluate)
    summary.update(parameters=model.num_params(), model=model_cfg.to_dict(), data_dir=str(data_dir))
    return summary


def next_token_loss_of(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return next_token_loss(model(x), y)


def prepare(cfg: PretrainConfig, loop: LoopConfig):
    """Tokenizer, shards, model and the batch/eval functions of a run (fresh or resumed)."""
    out = Path(cfg.out)
    overrides = dict(cfg.model_overrides)
    if cfg.seq_len is not None:  # 0 is an error for ModelConfig to report, not "the preset's"
        overrides["max_seq_len"] = cfg.seq_len
    if not loop.resume:
        preset(cfg.preset, **overrides)  # a bad preset or override fails now, not after tokenizing the corpus
        if cfg.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    out.mkdir(parents=True, exist_ok=True)
    report = SkipReport()
    if loop.resume:
        tokenizer = load_tokenizer(out)
    else:
        tokenizer = prepare_tokenizer(cfg, report)
        tokenizer.save(out)
    data_dir = out / "data"
    source = repr((sorted(cfg.data), cfg.text_field))
    if not shards_match(data_dir, tokenizer, cfg.seed, cfg.val_fraction, source=source):
        docs = iter_documents(list(cfg.data), text_field=cfg.text_field, report=report)
        build_shards(docs, tokenizer, data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed, source=source,
                     progress=loop.progress)
    if report.total:
        print(report.summary())
    train, val = TokenWindows(open_split(data_dir, "train")), TokenWindows(open_split(data_dir, "val"))

    if loop.resume:
        # the run's own architecture: a config rebuilt from today's flags could mismatch the saved weights
        model_cfg = load_config(out)
    else:
        model_cfg = preset(cfg.preset, vocab_size=tokenizer.vocab_size, **overrides)
    seq_len = model_cfg.max_seq_len
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(loop.device)
    if not loop.resume:
        save_config(out, model_cfg)
        save_run(out, cfg, loop)
    # a corpus of one short document puts nothing in the validation split (it is split by document)
    has_val = any(len(shard) > seq_len for shard in val.shards)
    if not has_val:
        print(f"the validation split has no window of {seq_len + 1} tokens; training without validation "
              f"(pass more text, or more than one file)")

    def batches(i: int):
        x, y = train.sample(cfg.batch_size, seq_len, seed=cfg.seed, step=i)
        return x.to(loop.device), y.to(loop.device)

    def evaluate(m) -> float:
        nll, n = score_windows(m, val, batch_size=cfg.batch_size, seq_len=seq_len, max_batches=cfg.eval_batches,
                               device=loop.device)
        return nll / n

    return model, model_cfg, batches, evaluate if has_val else None, data_dir
