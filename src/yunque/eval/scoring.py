"""Log-likelihoods of continuations, as lm-evaluation-harness's Hugging Face backend computes them, but faster.

A request is (context ids, continuation ids); its score is the summed log-probability of the continuation's tokens
after the context, and whether each of them was the model's top choice (lm-eval's `is_greedy`). A request longer
than the context window keeps its last max_seq_len + 1 tokens, as lm-eval does.

`score_one` is the simple path: one forward over context + continuation. `score_batched` is the fast one: requests
that share a context (the choices of one question) run that context once, many contexts run as one left-padded
batch into a KV cache, and then every continuation runs over its context's cached keys and values, in batches sorted
by length. tests/eval/test_scoring.py holds the two equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from yunque.model.gpt import GPT
from yunque.model.kv_cache import KVCache
from yunque.tokenizer.bpe import Tokenizer

Request = tuple[list[int], list[int]]
"""(context ids, continuation ids); the continuation is never empty and the context holds at least one id."""


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> Request:
    """lm-eval's split of a (context, continuation) pair into ids (HFLM._encode_pair and loglikelihood).

    Trailing spaces of the context move to the continuation; the whole string and the context are encoded (with
    the start token where the tokenizer adds one, as transformers does) and the continuation is what the whole has
    beyond the context's length. An empty context becomes the start token (or end-of-text where there is none).
    """
    bos = tokenizer.bos_id is not None
    if not context:
        cont = tokenizer.encode(continuation)
        prefix = tokenizer.bos_id if bos else tokenizer.eos_id
        if prefix is None:
            raise ValueError("an empty context needs a start or end-of-text token to condition on, and this "
                             "tokenizer has neither; give the task a prompt")
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation, bos=bos)
    ctx = tokenizer.encode(context, bos=bos)
    return ctx, whole[len(ctx):]


def _tail_logprobs(logits: torch.Tensor, cont: Sequence[int]) -> tuple[float, bool]:
    """(summed log-probability of `cont`, whether each was the argmax) from logits (C, V) predicting it."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (C, V)
    target = torch.tensor(cont, device=logits.device)
    ll = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (C,)
    return float(ll.sum()), bool((logp.argmax(-1) == target).all())


@torch.inference_mode()
def score_one(model: GPT, request: Request) -> tuple[float, bool]:
    """The simple path: (log-likelihood, is_greedy) of one request from one forward over context + continuation."""
    ctx, cont = request
    if not cont:
        return 0.0, True
    ids = (ctx + cont)[-(model.cfg.max_seq_len + 1):][:-1]
    logits = model(torch.tensor([ids], device=_device(model)), logits_to_keep=len(cont))[0]  # (C, V)
    return _tail_logprobs(logits, cont)


@torch.inference_mode()
def score_batched(model: GPT, requests: Sequence[Request], *, batch_size: int = 16,
                  progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each request, equal to `score_one` of each (to float rounding).

    Requests are grouped by context; each group's context runs once. Groups are taken longest first (lm-eval's
    order: the slowest batch first, padding least), about `batch_size` requests at a time, their contexts as one
    left-padded batch into a KV cache; the cache's rows are then repeated for each continuation and the
    continuations run as one right-padded batch over it. Requests that do not fit the model's context go one at a
    time, cut as lm-eval cuts them. progress(n) is called with the number of requests done after each batch.
    """
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    L = model.cfg.max_seq_len
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            out[i] = (0.0, True)
        elif len(ctx) + len(cont) - 1 > L:
            out[i] = score_one(model, requests[i])
        else:
            groups.setdefault(tuple(ctx), []).append(i)
    order = sorted(groups, key=lambda c: -(len(c) + max(len(requests[i][1]) for i in groups[c])))
    batch: list[tuple[int, ...]] = []
    P = C = rows = 0
    for c in order + [None]:  # None flushes the last batch
        if c is not None:
            p, n = len(c), max(len(requests[i][1]) for i in groups[c])
            # a batch's cache spans its longest context and longest continuation: keep that within the window
            if not batch or (rows + len(groups[c]) <= max(1, batch_size) and max(P, p) + max(C, n) - 1 <= L):
                batch.append(c)
                P, C, rows = max(P, p), max(C, n), rows + len(groups[c])
                continue
        if batch:
            _score_groups(model, requests, batch, [groups[b] for b in batch], out)
            if progress:
                progress(rows)
        if c is not None:
            batch, P, C, rows = [c], len(c), max(len(requests[i][1]) for i in groups[c]), len(groups[c])
    return out  # type: ignore[return-value]


def _score_groups(model: GPT, requests: Sequence[Request], contexts: list[tuple[int, ...]],
                  members: list[list[int]], out: list) -> None:
    device = _device(model)
    P = max(len(c) for c in contexts)
    pad = [P - len(c) for c in contexts]
    conts = [[requests[i][1] for i in m] for m in members]
    C = max(len(c) for cs in conts for c in cs)
    ids = torch.tensor([[0] * n + list(c) for n, c in zip(pad, contexts)], device=device)  # (G, P)
    cache = KVCache(model.cfg, len(contexts), P + C - 1, device=device, dtype=_dtype(model),
                    pad=torch.tensor(pad) if any(pad) else None)
    first = model(ids, kv_cache=cache, logits_to_keep=1)[:, -1]  # (G, V): each continuation's first token
    rows = torch.tensor([g for g, cs in enumerate(conts) for _ in cs], device=device)  # (R,)
    flat = [c for cs in conts for c in cs]
    logits = first[rows].unsqueeze(1)  # (R, 1, V)
    if C > 1:
        cache.select(rows)  # (R, ...): each context once per continuation
        x = torch.tensor([c[:-1] + [0] * (C - len(c)) for c in flat], device=device)  # (R, C-1), right-padded
        logits = torch.cat([logits, model(x, kv_cache=cache)], dim=1)  # (R, C, V)
    # one log-softmax, gather and argmax for the whole batch: per-row calls cost more than their arithmetic here
    logp = F.log_softmax(logits.float(), dim=-1)  # (R, C, V)
    target = torch.tensor([c + [0] * (C - len(c)) for c in flat], device=device)  # (R, C)
    real = torch.arange(C, device=device) < torch.tensor([len(c) for c in flat], device=device).unsqueeze(1)
    ll = (logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * real).sum(1)  # (R,)
    greedy = ((logp.argmax(-1) == target) | ~real).all(1)  # (R,)
    flat_index = [i for m in members for i in m]
    for i, a, b in zip(flat_index, ll.tolist(), greedy.tolist()):
        out[i] = (a, b)

def rolling_requests(tokens: list[int], prefix_token: int, max_seq_len: int) -> list[Request]:
    """lm-eval's rolling windows over a document (utils.get_rolling_token_windows with context_len=1, then
    make_disjoint_window): every token predicted once, the first from `prefix_token`, each window of at most
    max_seq_len tokens. Their log-likelihoods summed are the document's."""
    if not tokens:
        return []
    windows = []
    first = min(max_seq_len, len(tokens))
    windows.append(([prefix_token] + tokens[:first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_seq_len)
        end = predicted + n
        windows.append((tokens[end - max_seq_len - 1:end - 1], tokens[end - n:end]))
        predicted += n
    return [(a[:len(a) - (len(b) - 1)], b) for a, b in windows]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


__all__ = ["Request", "encode_pair", "score_one", "score_batched", "rolling_requests"]
