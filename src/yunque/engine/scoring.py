"""What a server computes from a prompt without generating: the log-probability of each prompt token (scoring, as
lm-evaluation-harness asks for with echo + logprobs) and embeddings (pooled final hidden states).

Both run the engine's own copy of the model over whole prompts with no cache; call them from the thread that owns
the engine (`Scheduler.call`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from yunque.engine.engine import Engine

POOLING = ("mean", "last")


@torch.inference_mode()
def prompt_logprobs(engine: Engine, ids: list[int], top: int = 0) -> list[tuple[float | None, tuple]]:
    """For each token of `ids`: (its log-probability given the tokens before it, the `top` most likely
    (id, logprob) pairs at its position). The first token has no context: (None, ())."""
    engine._prepare([ids])
    x = torch.tensor([ids], device=engine.device)
    logits = engine.model(x)[0, :-1].float()  # (T-1, V): position t predicts token t+1
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(-1, x[0, 1:, None]).squeeze(-1).tolist()
    tops = [()] * len(chosen)
    if top:
        values, index = logprobs.topk(top, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(index.tolist(), values.tolist())]
    return [(None, ())] + list(zip(chosen, tops))


EMBED_TOKENS = 16384
"""Tokens (padding included) embedded in one forward at most: bounds the memory of a large request."""


@torch.inference_mode()
def embed(engine: Engine, prompts: list[list[int]], pooling: Literal["mean", "last"] = "mean") -> torch.Tensor:
    """L2-normalised embeddings (N, C) fp32 of token-id prompts: the model's final hidden states (after its last
    norm, before the output head), averaged over each prompt's tokens ("mean") or taken at its last token ("last").

    Prompts run in right-padded batches of at most EMBED_TOKENS tokens: attention is causal, so a real token never
    sees the padding after it, and each embedding equals that of the prompt alone.
    """
    if pooling not in POOLING:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLING)}")
    prompts = engine._prepare(prompts)
    out, start = [], 0
    while start < len(prompts):
        end, T = start + 1, len(prompts[start])
        while end < len(prompts) and max(T, len(prompts[end])) * (end + 1 - start) <= EMBED_TOKENS:
            T = max(T, len(prompts[end]))
            end += 1
        out.append(_embed_batch(engine, prompts[start:end], pooling))
        start = end
    return torch.cat(out)


def _embed_batch(engine: Engine, prompts: list[list[int]], pooling: str) -> torch.Tensor:
    T = max(len(p) for p in prompts)
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=engine.device)  # (N, T)
    lengths = torch.tensor([len(p) for p in prompts], device=engine.device)
    model = engine.model
    head, model.lm_head = model.lm_head, nn.Identity()  # the hidden states, without computing logits
    try:
        h = model(ids).float()  # (N, T, C)
    finally:
        model.lm_head = head
    if pooling == "last":
        pooled = h[torch.arange(len(prompts)), lengths - 1]
    else:
        mask = (torch.arange(T, device=h.device)[None] < lengths[:, None]).unsqueeze(-1)  # (N, T, 1)
        pooled = (h * mask).sum(dim=1) / lengths[:, None]
    return F.normalize(pooled, dim=-1)


__all__ = ["EMBED_TOKENS", "POOLING", "embed", "prompt_logprobs"]
