"""Shared by the training tests: a tiny model, batches that are a pure function of the step, the next-token loss,
loop settings of a few-second run, and comparisons of weights."""

from __future__ import annotations

import json

import torch

from yunque.config import LoopConfig, ModelConfig
from yunque.losses import next_token_loss
from yunque.model.gpt import GPT
from yunque.tokenizer.bpe import byte_tokenizer


def window_batch(stream: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch i: 4 windows of 17 tokens from `stream`, chosen by a generator seeded with i (as `fit` requires for
    exact resume), as inputs and next-token targets."""
    starts = torch.randint(0, len(stream) - 17, (4,), generator=torch.Generator().manual_seed(i))
    xy = torch.stack([stream[s:s + 17] for s in starts.tolist()])
    return xy[:, :-1], xy[:, 1:]


def loss_fn(model, batch):
    x, y = batch
    return next_token_loss(model(x), y)


TOK = byte_tokenizer()
CFG = ModelConfig(vocab_size=TOK.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=16)
STREAM = torch.randint(0, 64, (4096,), generator=torch.Generator().manual_seed(0))  # the "corpus"

# bf16 autocast against fp32: training loss at every step of 30 on the tiny model below (lr 1e-2, loss 5.6 -> 4.2).
# Measured on an AVX-512-BF16 CPU (torch 2.13): at most 0.0025 at any step, 0.0001 at the last (0.0007 over 4
# seeds); the tolerance leaves a wide margin for other kernels and for CPUs that emulate bf16.
BF16_TOLERANCE = 0.02


def batches(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch i: 4 windows of STREAM, a pure function of i (as `fit` requires for exact resume)."""
    return window_batch(STREAM, i)


def new_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG)


def loop(out, **kw) -> LoopConfig:
    defaults = dict(max_steps=12, lr=3e-3, warmup_steps=3, precision="fp32", eval_every=0, log_every=1,
                    progress=False, tokens_per_step=64)
    return LoopConfig(out_dir=str(out), **{**defaults, **kw})


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def interrupt_at(n: int):
    """batches() that raises KeyboardInterrupt when batch n is asked for: a kill after n steps were taken."""
    def fn(i):
        if i == n:
            raise KeyboardInterrupt
        return batches(i)
    return fn


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
