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

PACKED_TOKENS = 512
"""Continuation tokens packed into one row over their context at most (one continuation longer than this gets a row
of its own): beyond it, the row's attention costs more than running the context again would."""

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

    Requests are grouped by context; each group's context runs once (once per PACKED_TOKENS of its continuations).
    Rows are taken longest first (lm-eval's order: the slowest batch first, padding least), about `batch_size`
    requests at a time: their contexts run as one left-padded batch into a KV cache, then each context's
    continuations run packed into one row over its cached keys and values, each continuation seeing its context and
    its own earlier tokens only (`_PackedCache`). No continuation is padded to another's length and no context is
    copied per continuation: the arithmetic is that of the distinct tokens. Requests that do not fit the model's
    context go one at a time, cut as lm-eval cuts them. progress(n) is called with the number of requests done
    after each batch.
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
    # a row: a context and those of its continuations that fit PACKED_TOKENS together (the others go to rows of their
    # own, the context again), so that a row's attention, quadratic in its length, stays small next to its products
    rows: list[tuple[tuple[int, ...], list[int]]] = []
    for ctx, members in groups.items():
        chunk, n = [], 0
        for i in members:
            k = len(requests[i][1]) - 1  # the continuation's tokens fed: all but its last (predicted, never fed)
            if chunk and n + k > PACKED_TOKENS:
                rows.append((ctx, chunk))
                chunk, n = [], 0
            chunk, n = chunk + [i], n + k
        rows.append((ctx, chunk))
    rows.sort(key=lambda r: -(len(r[0]) + sum(len(requests[i][1]) - 1 for i in r[1])))
    start = 0
    while start < len(rows):
        end, n = start + 1, len(rows[start][1])
        while end < len(rows) and n + len(rows[end][1]) <= batch_size:
            n += len(rows[end][1])
            end += 1
        _score_groups(model, requests, [c for c, _ in rows[start:end]], [m for _, m in rows[start:end]], out)
        if progress:
            progress(n)
        start = end
    return out  # type: ignore[return-value]


class _PackedCache(KVCache):
    """The KV cache of a batch of contexts (left-padded, as KVCache pads), whose next forward is each row's
    continuations packed one after another: `packed` gives that forward's positions (G, T) and attention mask
    (G, 1, T, P + T) in place of the ones a cache computes for a plain continuation of every row."""

    packed: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def causal(self) -> bool:  # type: ignore[override]
        return self.packed is None

    def positions_and_mask(self, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.packed if self.packed is not None else super().positions_and_mask(T)


def _score_groups(model: GPT, requests: Sequence[Request], contexts: list[tuple[int, ...]],
                  members: list[list[int]], out: list) -> None:
    device = _device(model)
    G, P = len(contexts), max(len(c) for c in contexts)
    pad = [P - len(c) for c in contexts]
    conts = [[requests[i][1] for i in m] for m in members]
    T = max(sum(len(c) - 1 for c in cs) for cs in conts)  # the longest row of packed continuations
    ids = torch.tensor([[0] * n + list(c) for n, c in zip(pad, contexts)], device=device)  # (G, P)
    cache = _PackedCache(model.cfg, G, P + T, device=device, dtype=_dtype(model),
                         pad=torch.tensor(pad) if any(pad) else None)
    first = model(ids, kv_cache=cache, logits_to_keep=1)[:, -1]  # (G, V): each continuation's first token
    # which logits predict each continuation token: row g of `first` for its first, then its packed row's positions
    flat = [c for cs in conts for c in cs]  # (R,) continuations, group by group
    pick_first = [g for g, cs in enumerate(conts) for _ in cs]
    pick_rest, x, segment, offset = [], [], [], []
    for g, cs in enumerate(conts):
        row: list[int] = []
        for j, c in enumerate(cs):
            pick_rest += range(g * T + len(row), g * T + len(row) + len(c) - 1)
            segment += [j] * (len(c) - 1)
            offset += range(len(c) - 1)
            row += c[:-1]
        x.append(row + [0] * (T - len(row)))
        segment += [-1] * (T - len(row))
        offset += [0] * (T - len(row))
    lengths = torch.tensor([len(c) for c in flat], device=device)  # (R,)
    owner = torch.repeat_interleave(torch.arange(len(flat), device=device), lengths)  # (N,): each token's request
    targets = torch.tensor([t for c in flat for t in c], device=device)  # (N,)
    is_first = torch.zeros(len(targets), dtype=torch.bool, device=device)
    is_first[lengths.cumsum(0) - lengths] = True
    logits = first.new_empty(len(targets), first.shape[-1])  # (N, V)
    logits[is_first] = first[torch.tensor(pick_first, device=device)]
    if T:
        seg = torch.tensor(segment, device=device).view(G, T)
        off = torch.tensor(offset, device=device).view(G, T)
        n_ctx = torch.tensor([len(c) for c in contexts], device=device)
        positions = n_ctx.unsqueeze(1) + off  # (G, T): each continuation goes on from its context
        q = torch.arange(T, device=device)
        own = (seg.unsqueeze(2) == seg.unsqueeze(1)) & (q.view(1, T, 1) >= q.view(1, 1, T)) & (seg >= 0).unsqueeze(2)
        own |= torch.eye(T, dtype=torch.bool, device=device)  # a padding query sees itself: no empty softmax row
        ctx_keys = (torch.arange(P, device=device).unsqueeze(0) >= torch.tensor(pad, device=device).unsqueeze(1))
        mask = torch.cat([ctx_keys.unsqueeze(1).expand(G, T, P), own], dim=2).unsqueeze(1)  # (G, 1, T, P + T)
        cache.packed = (positions, mask)
        rest = model(torch.tensor(x, device=device), kv_cache=cache).flatten(0, 1)  # (G * T, V)
        logits[~is_first] = rest[torch.tensor(pick_rest, device=device, dtype=torch.long)]
    # one log-softmax, gather and argmax for the whole batch: per-request calls cost more than their arithmetic here
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    ll = torch.zeros(len(flat), device=device).index_add_(0, owner, logp.gather(-1, targets.unsqueeze(-1))[:, 0])
    missed = torch.zeros(len(flat), device=device).index_add_(0, owner, (logp.argmax(-1) != targets).float())
    flat_index = [i for m in members for i in m]
    for i, a, b in zip(flat_index, ll.tolist(), missed.tolist()):
        out[i] = (a, b == 0)

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
