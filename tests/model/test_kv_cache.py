"""The KV cache's layouts and row changes against fresh caches: static == growing; select, dropped padding, joined
rows (shorter and longer than the fill level, copied or written into free rows), views kept by select and resizing
leave every row's logits as a cache of its own gives. Fresh buffers hold NaN there (`nan_buffers`), not the zeros of
new memory: a join that left any slot it reads unwritten would show."""

import pytest
import torch

from yunque.config import preset
from yunque.model.gpt import GPT
from yunque.model.kv_cache import ROOM_ROWS, KVCache

V = 97
TOL = {"atol": 1e-5, "rtol": 0}


def tiny(name: str = "tiny", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset(name, **{"vocab_size": V, "max_seq_len": 64, **overrides})).eval()


def greedy_steps(model: GPT, cache: KVCache, ids: torch.Tensor, n: int) -> tuple[list[torch.Tensor], list]:
    """Prefill ids (B, P), then n greedy steps; returns the last-position logits of each forward and the tokens."""
    logits, tokens = [model(ids, kv_cache=cache)[:, -1]], []
    for _ in range(n):
        tokens.append(logits[-1].argmax(-1))
        logits.append(model(tokens[-1].unsqueeze(1), kv_cache=cache)[:, -1])
    return logits, [t.tolist() for t in tokens]


def alone(model: GPT, prompt: torch.Tensor, feed: list[int]) -> list[torch.Tensor]:
    """Logits of one row in a cache of its own: after its prompt (P,), then after each token of `feed`."""
    cache = KVCache(model.cfg, 1)
    out = [model(prompt.unsqueeze(0), kv_cache=cache)[0, -1]]
    out += [model(torch.tensor([[t]]), kv_cache=cache)[0, -1] for t in feed]
    return out


@pytest.fixture
def nan_buffers(monkeypatch):
    """Tensors made by new_empty (a joined dynamic cache's buffers) start full of NaN instead of what the allocator
    hands out, often zeros: slots a cache reads without writing them first would then spoil the logits."""
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: new_empty(self, *a, **k).fill_(float("nan")))


@pytest.mark.parametrize("name", ["tiny", "gpt2-tiny"])
def test_static_cache_equals_growing_cache(name):
    model = tiny(name)
    pad = torch.tensor([0, 3, 5])
    ids = torch.randint(0, V, (3, 9))
    with torch.inference_mode():
        runs = [greedy_steps(model, KVCache(model.cfg, 3, 40, pad=pad, static=static), ids, 12)
                for static in (False, True)]
    (dyn_logits, dyn_tokens), (sta_logits, sta_tokens) = runs
    assert sta_tokens == dyn_tokens
    for a, b in zip(sta_logits, dyn_logits):
        torch.testing.assert_close(a, b, **TOL)


def test_static_cache_select_and_drop_padding_equal_growing_cache():
    model = tiny("gpt2-tiny")
    pad = torch.tensor([0, 3, 5])
    ids = torch.randint(0, V, (3, 9))
    out = []
    with torch.inference_mode():
        for static in (False, True):
            cache = KVCache(model.cfg, 3, 12, pad=pad, static=static)
            logits, _ = greedy_steps(model, cache, ids, 3)  # 9 + 3 = 12: the cache is full
            cache.select(torch.tensor([1, 2]))
            cache.drop_common_padding()  # frees 3 positions
            assert cache.pos == 9
            token = logits[-1][1:].argmax(-1)
            out.append([model(token.unsqueeze(1), kv_cache=cache)[:, -1] for _ in range(3)])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
@pytest.mark.parametrize("name", ["tiny", "gpt2-tiny"])
def test_joined_rows_give_the_logits_of_fresh_caches(name, static, nan_buffers):
    # A running row at fill level 10 (prompt 6 + 4 steps) is joined by a shorter prompt (3 tokens: padded by 7)
    # and then by a longer one (16 tokens: the rows already there get 6 more padding); every row's logits stay
    # those of a cache of its own, for the joined step and the ones after.
    model = tiny(name)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (6, 3, 16)]
    feeds = [torch.randint(0, V, (12,), generator=g).tolist() for _ in prompts]
    with torch.inference_mode():
        cache = KVCache(model.cfg, 1, 24, static=static)
        model(prompts[0].unsqueeze(0), kv_cache=cache)
        for t in feeds[0][:4]:
            model(torch.tensor([[t]]), kv_cache=cache)
        got = [[], [], []]
        for i in (1, 2):
            newcomer = KVCache(model.cfg, 1, len(prompts[i]))
            got[i].append(model(prompts[i].unsqueeze(0), kv_cache=newcomer)[0, -1])
            cache.join(newcomer)
        assert (cache.pos, cache.max_len, cache.pad.tolist()) == (16, 24, [6, 13, 0])
        done = [4, 0, 0]  # tokens of each row's feed already in the cache
        for _ in range(8):
            tokens = torch.tensor([[feeds[r][done[r]]] for r in range(3)])
            logits = model(tokens, kv_cache=cache)[:, -1]
            for r in range(3):
                got[r].append(logits[r])
                done[r] += 1
        want = [alone(model, p, f) for p, f in zip(prompts, feeds)]
    for r, skip in enumerate((5, 0, 0)):  # row 0 is compared from its fifth token on
        for a, b in zip(got[r], want[r][skip:]):
            torch.testing.assert_close(a, b, **TOL)


def test_joins_with_room_fill_free_rows_and_select_of_a_run_keeps_a_view(nan_buffers):
    # A cache joined with room gets free rows behind its own; the next newcomers no longer than its fill level are
    # written into them (its own rows stay where they are), and keeping a run of consecutive rows keeps a view of
    # them. Every row's logits stay those of a cache of its own.
    model = tiny()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in (6, 3, 5, 8)]
    feeds = [torch.randint(0, V, (12,), generator=g).tolist() for _ in prompts]
    got, done, rows = [[] for _ in prompts], [0] * len(prompts), [0]

    def step(cache):
        logits = model(torch.tensor([[feeds[r][done[r]]] for r in rows]), kv_cache=cache)[:, -1]
        for i, r in enumerate(rows):
            got[r].append(logits[i])
            done[r] += 1

    def newcomer(r):
        cache = KVCache(model.cfg, 1, len(prompts[r]))
        got[r].append(model(prompts[r].unsqueeze(0), kv_cache=cache)[0, -1])
        rows.append(r)
        return cache

    with torch.inference_mode():
        cache = KVCache(model.cfg, 1, 24)
        got[0].append(model(prompts[0].unsqueeze(0), kv_cache=cache)[0, -1])
        for _ in range(4):
            step(cache)
        cache.join(newcomer(1), room=True)  # new buffers, 4 rows for 2
        buffer = cache.k[0].untyped_storage().data_ptr()
        cache.join(newcomer(2), room=True)  # into the third row
        assert (cache.batch_size, cache.pos, cache.pad.tolist()) == (3, 10, [0, 7, 5])
        assert cache.k[0].untyped_storage().data_ptr() == buffer
        step(cache)
        cache.select(torch.tensor([1, 2]))  # a run: rows 1 and 2 of the buffers, nothing copied
        rows = rows[1:]
        assert cache.k[0].untyped_storage().data_ptr() == buffer
        step(cache)
        cache.join(newcomer(3), room=True)  # into the fourth row, the last free one
        assert cache.k[0].untyped_storage().data_ptr() == buffer and cache.batch_size == 3
        cache.select(torch.tensor([0, 2]))  # not a run: copied
        rows = [rows[0], rows[2]]
        assert cache.k[0].untyped_storage().data_ptr() != buffer
        step(cache)
        step(cache)
    for r, prompt in enumerate(prompts):
        want = alone(model, prompt, feeds[r])
        assert len(got[r]) > 1
        for a, b in zip(got[r], want):
            torch.testing.assert_close(a, b, **TOL)


def test_room_is_as_many_rows_again_up_to_room_rows():
    cfg = tiny().cfg
    for rows, free in ((3, 4), (40, ROOM_ROWS)):
        cache = KVCache(cfg, rows, 8)
        cache.join(KVCache(cfg, 1, 8), room=True)
        k = cache.k[0]
        assert k.shape[0] == rows + 1
        assert k.untyped_storage().nbytes() == (rows + 1 + free) * k[0].numel() * k.element_size()


def test_join_checks_the_room():
    model = tiny()
    cache, other = KVCache(model.cfg, 1, 8), KVCache(model.cfg, 1, 12)
    with torch.inference_mode():
        model(torch.zeros(1, 10, dtype=torch.long), kv_cache=other)
    with pytest.raises(ValueError, match="max_len"):
        cache.join(other, max_len=9)  # 10 positions filled do not fit in 9
    cache.join(other)  # by default the cache grows to the fill level
    assert (cache.batch_size, cache.pos, cache.max_len, cache.pad.tolist()) == (2, 10, 10, [10, 0])


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
def test_resize_keeps_the_outputs(static):
    model = tiny()
    ids = torch.randint(0, V, (2, 7))
    with torch.inference_mode():
        small = KVCache(model.cfg, 2, 8, pad=torch.tensor([0, 2]), static=static)
        big = KVCache(model.cfg, 2, 20, pad=torch.tensor([0, 2]), static=static)
        a, _ = greedy_steps(model, small, ids, 1)  # 8 of 8 slots filled
        small.resize(20)
        assert small.max_len == 20
        greedy_steps(model, big, ids, 1)
        token = a[-1].argmax(-1, keepdim=True)
        for _ in range(5):
            torch.testing.assert_close(model(token, kv_cache=small)[:, -1], model(token, kv_cache=big)[:, -1], **TOL)
    with pytest.raises(ValueError, match="max_len"):
        small.resize(5)
