"""Continuous batching: sequences run concurrently (joining and leaving one batch) equal each run alone; cancel,
timeouts and limits; the asyncio stream."""

import asyncio
import threading
import time
from dataclasses import replace

import pytest
import torch

from yunque.config import SamplingParams, SchedulerConfig, preset
from yunque.engine import Engine
from yunque.engine.prefix import PrefixCache
from yunque.engine.scheduler import QueueFull, Scheduler
from yunque.engine.scoring import embed, prompt_logprobs
from yunque.model import GPT
from yunque.tokenizer import byte_tokenizer

TOK = byte_tokenizer()
PROMPTS = [TOK.encode(t) for t in ("hi", "a longer prompt than that", "x", "def parse(text):", "and the longest "
                                   "prompt of them all, by far")]
PARAMS = [
    SamplingParams(max_new_tokens=30, temperature=0, logprobs=True),
    SamplingParams(max_new_tokens=25, temperature=0.9, seed=3, logprobs=True, top_logprobs=3),
    SamplingParams(max_new_tokens=40, temperature=1.0, top_k=40, seed=5, frequency_penalty=0.8, presence_penalty=0.3),
    SamplingParams(max_new_tokens=20, temperature=0.7, top_p=0.9, min_p=0.05, seed=7, repetition_penalty=1.3),
    SamplingParams(max_new_tokens=35, temperature=0, frequency_penalty=0.5, stop=("66",)),  # stops after "rrr\f\f"
]


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    e = Engine(GPT(preset("tiny", vocab_size=TOK.vocab_size, max_seq_len=128)), TOK)
    e.stop_ids = set()  # rows run to their budget (or a stop string)
    return e


def fold(events):
    """(text, ids, logprobs, tops, finish_reason, completion_tokens) of one sequence's events."""
    tokens = [t for e in events for t in e.tokens]
    return ("".join(e.text for e in events), [t.id for t in tokens], [t.logprob for t in tokens],
            [t.top for t in tokens], events[-1].finish_reason, events[-1].completion_tokens)


def each_alone(engine):
    """fold() of each of PROMPTS with its PARAMS, one at a time on a scheduler of its own."""
    alone = Scheduler(engine)
    try:
        return [fold(alone.generate(p, q)) for p, q in zip(PROMPTS, PARAMS)]
    finally:
        alone.close()


def each_from_a_thread(scheduler, started=lambda: None):
    """fold() of each of PROMPTS with its PARAMS, all submitted at once from threads of their own; started() runs
    once the threads are started. Closes the scheduler."""
    got = [None] * len(PROMPTS)

    def run(i):
        got[i] = fold(scheduler.generate(PROMPTS[i], PARAMS[i]))

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        started()
        for t in threads:
            t.join()
    finally:
        scheduler.close()
    return got


def test_concurrent_sequences_equal_each_alone(engine):
    # Together: submitted from threads at staggered moments into a batch of at most 3 rows, so sequences wait, join
    # a running batch (shorter and longer than it) and leave it.
    want = each_alone(engine)
    together = Scheduler(engine, SchedulerConfig(max_running=3, prefill_tokens=16))
    got = each_from_a_thread(together)
    assert together.stats.steps > 0 and together.stats.step_rows > together.stats.steps  # they did share steps
    for g, w, params in zip(got, want, PARAMS):
        text, ids, logprobs, tops, reason, n = g
        assert (text, ids, reason, n) == (w[0], w[1], w[4], w[5])
        assert n == len(ids) and TOK.decode(ids) == text
        if params.logprobs:
            assert logprobs == pytest.approx(w[2], abs=1e-4)
        if params.top_logprobs:
            assert all(len(t) == params.top_logprobs and t[0][1] >= logprobs[i] - 1e-4 for i, t in enumerate(tops))
    assert got[4][4] == "stop" and got[4][0].startswith("rrr\f\f") and "6" not in got[4][0]


def hold_worker(scheduler):
    """Make the worker wait inside a call until the returned gate is set, and return once it is inside: what is
    submitted meanwhile stays queued (the round that runs the call would admit a submission that came before).
    (the call's Future, the gate)"""
    inside, gate = threading.Event(), threading.Event()
    busy = scheduler.call(lambda: (inside.set(), gate.wait(60)))
    assert inside.wait(30), "the worker did not take the call"
    return busy, gate


def test_prompts_that_wait_together_are_prefilled_in_one_forward_and_equal_each_alone(engine, monkeypatch):
    want = each_alone(engine)
    sizes, prefill_many = [], Engine.prefill_many
    monkeypatch.setattr(Engine, "prefill_many", lambda self, pending: (sizes.append(len(pending)),
                                                                        prefill_many(self, pending))[1])
    together = Scheduler(engine)
    busy, gate = hold_worker(together)  # the worker waits while all five requests queue up

    def release():
        deadline = time.monotonic() + 30
        while together.waiting < len(PROMPTS) and time.monotonic() < deadline:
            threading.Event().wait(0.001)
        gate.set()
        assert together.waiting == len(PROMPTS), "the requests did not all queue behind the busy worker"
        busy.result()

    got = each_from_a_thread(together, release)
    assert sizes == [len(PROMPTS)]  # five prompts of 1-42 tokens, left-padded into one forward
    for g, w in zip(got, want):
        assert g[0:2] == w[0:2] and g[4:] == w[4:]
        assert g[2] == pytest.approx(w[2], abs=1e-4)


def test_a_prompt_that_fits_a_turn_waits_for_the_next_rather_than_split(engine, monkeypatch):
    # A budget of 42 tokens, the longest prompt's length: the first turn takes "hi", the 25-token prompt and "x"
    # whole (28 tokens), and the 16-token prompt, which no longer fits, waits for the next turn instead of being
    # split into a chunk now and the rest then; so does the 42-token one after it. No prompt is split.
    assert [len(p) for p in PROMPTS] == [2, 25, 1, 16, 42]
    want = each_alone(engine)
    sizes, calls = [], []
    prefill_many, prefill = Engine.prefill_many, Engine.prefill
    monkeypatch.setattr(Engine, "prefill_many", lambda self, pending: (sizes.append(len(pending)),
                                                                        prefill_many(self, pending))[1])
    monkeypatch.setattr(Engine, "prefill", lambda self, pending, n: (calls.append((pending.filled, n,
                                                                                   len(pending.prompt))),
                                                                     prefill(self, pending, n))[1])
    s = Scheduler(engine, SchedulerConfig(prefill_tokens=42))
    events = [[] for _ in PROMPTS]
    try:
        busy, gate = hold_worker(s)  # all five queue, in order, while the worker waits
        seqs = [s.submit(p, q, events[i].append) for i, (p, q) in enumerate(zip(PROMPTS, PARAMS))]
        gate.set()
        busy.result(timeout=30)
        deadline = time.monotonic() + 60
        while not all(q.finished for q in seqs) and time.monotonic() < deadline:
            threading.Event().wait(0.005)
    finally:
        s.close()
    assert sizes == [3, 1, 1]
    assert calls and all(filled == 0 and n == length for filled, n, length in calls)  # each prompt whole
    for e, w in zip(events, want):
        g = fold(e)
        assert g[0:2] == w[0:2] and g[4:] == w[4:]


def test_events_equal_the_engine_generating_alone(engine):
    s = Scheduler(engine)
    try:
        for prompt, params in zip(PROMPTS, PARAMS):
            text, ids, logprobs, _, reason, _ = fold(s.generate(prompt, params))
            alone = engine.new_batch()
            row = engine.add(alone, prompt, params)
            while alone.running:
                engine.step(alone)
            assert (text, ids, reason) == (row.text, row.ids, row.finish_reason)
    finally:
        s.close()


def test_cancel_frees_the_row_at_once(engine):
    s = Scheduler(engine)
    long = SamplingParams(max_new_tokens=100, temperature=0)
    first, ended = threading.Event(), threading.Event()
    events = []

    def on_event(e):
        events.append(e)
        first.set()
        if e.finish_reason:
            ended.set()

    try:
        seq = s.submit(PROMPTS[0], long, on_event)
        other = s.submit(PROMPTS[1], long, lambda e: None)
        assert first.wait(10)
        s.cancel(seq)
        assert ended.wait(10)
        assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens < 100
        assert s.running <= 1  # the other one runs on
        s.cancel(other)
        s.call(lambda: None).result(10)  # a turn of the worker after the cancel
        assert s.running == 0
    finally:
        s.close()


def test_timeout_ends_with_length(engine):
    s = Scheduler(engine)
    try:
        events = s.generate(PROMPTS[0], SamplingParams(max_new_tokens=100, temperature=0), timeout=1e-6)
        assert events[-1].finish_reason == "length" and events[-1].completion_tokens < 100
    finally:
        s.close()


def test_limits(engine):
    s = Scheduler(engine, SchedulerConfig(max_queue=1, max_tokens=50))
    gate = None
    try:
        _, gate = hold_worker(s)  # the worker waits: submissions stay queued
        with pytest.raises(ValueError, match="max_tokens 51 is more than"):
            s.submit(PROMPTS[0], SamplingParams(max_new_tokens=51), lambda e: None)
        with pytest.raises(ValueError, match="context is 128"):
            s.submit([65] * 128, SamplingParams(max_new_tokens=5), lambda e: None)
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            s.submit([10**6], SamplingParams(max_new_tokens=5), lambda e: None)
        s.submit(PROMPTS[0], SamplingParams(max_new_tokens=5), lambda e: None)
        with pytest.raises(QueueFull, match="max_queue 1"):
            s.submit(PROMPTS[0], SamplingParams(max_new_tokens=5), lambda e: None)
    finally:
        if gate is not None:
            gate.set()
        s.close()


def test_close_ends_waiting_and_running_sequences(engine):
    s = Scheduler(engine, SchedulerConfig(max_running=1))
    got = []
    s.submit(PROMPTS[0], SamplingParams(max_new_tokens=100, temperature=0), got.append)
    s.submit(PROMPTS[1], SamplingParams(max_new_tokens=100, temperature=0), got.append)
    s.close()
    assert sorted(e.finish_reason for e in got if e.finish_reason) in (["cancelled", "cancelled"],
                                                                        ["cancelled", "length"])


def test_round_end_hooks_follow_each_round_that_sent_events_on_the_worker(engine):
    """A round of the worker's loop (admissions, prefill, one step of every row) ends with the hooks, after its
    events and before the next round's, on the worker thread, and never after a round that sent none."""
    scheduler = Scheduler(engine)
    log, threads = [], set()
    scheduler.on_round_end(lambda: (log.append("end"), threads.add(threading.current_thread())))
    done = threading.Event()
    left = [len(PROMPTS)]

    def sink(i):
        def on_event(e):
            log.append(i)
            threads.add(threading.current_thread())
            if e.finish_reason:
                left[0] -= 1
                if not left[0]:
                    done.set()
        return on_event

    try:
        for i, (p, q) in enumerate(zip(PROMPTS, PARAMS)):
            scheduler.submit(p, q, sink(i))
        assert done.wait(60)
        time.sleep(0.05)  # the last round's hook
    finally:
        scheduler.close()
    assert threads == {scheduler.worker}
    assert log[-1] == "end" and log[0] != "end"
    rounds = [r for r in "".join("|" if x == "end" else "." for x in log).split("|") if r]
    assert len(rounds) == log.count("end")  # no round without events, none without its hook
    # at most a hook per step and per round that only prefilled; rows that hold tokens back (a stop string's) may
    # leave a step with no events. Five rows run together: far fewer hooks than events.
    events = len(log) - log.count("end")
    assert log.count("end") <= scheduler.stats.steps + len(PROMPTS) and log.count("end") < events / 2


def test_stream_yields_events_and_leaving_early_cancels(engine):
    s = Scheduler(engine)

    async def main():
        whole = [e async for e in s.stream(PROMPTS[3], PARAMS[0])]
        async for _ in s.stream(PROMPTS[3], replace(PARAMS[0], max_new_tokens=100)):
            break  # the client went away after one event
        return whole

    try:
        whole = asyncio.run(main())
        assert fold(whole)[:2] == fold(s.generate(PROMPTS[3], PARAMS[0]))[:2]
        s.call(lambda: None).result(10)
        assert s.running == 0 and s.stats.finished.get("cancelled") == 1
    finally:
        s.close()


def test_prompt_logprobs_equal_token_logprobs_of_a_forward(engine):
    ids = PROMPTS[1]
    got = prompt_logprobs(engine, ids, top=2)
    assert got[0] == (None, ()) and len(got) == len(ids)
    logits = engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    for t in range(1, len(ids)):
        assert got[t][0] == pytest.approx(logits[t - 1, ids[t]].item(), abs=1e-5)
        assert got[t][1][0][0] == int(logits[t - 1].argmax())


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_batched_equal_alone_and_are_unit_length(engine, pooling):
    batched = embed(engine, PROMPTS, pooling)
    assert batched.shape == (len(PROMPTS), engine.model.cfg.d_model)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(PROMPTS)), atol=1e-5)
    for i, p in enumerate(PROMPTS):
        assert torch.allclose(batched[i], embed(engine, [p], pooling)[0], atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


@pytest.mark.parametrize("where", ["prefill", "join", "step"])
def test_an_engine_fault_fails_the_sequences_and_the_worker_goes_on(engine, monkeypatch, where):
    s = Scheduler(engine)
    real = getattr(engine, where)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("probability tensor contains inf")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, where, broken)
    try:
        events = s.generate(PROMPTS[0], SamplingParams(max_new_tokens=5, temperature=0))
        assert events[-1].finish_reason == "error" and "probability tensor" in events[-1].error
        assert s.generate(PROMPTS[0], SamplingParams(max_new_tokens=5, temperature=0))[-1].finish_reason == "length"
    finally:
        s.close()


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(engine):
    # A decodes; B's 100-token prompt takes 13 chunks of 8: A gets a token between every two of them instead of
    # waiting for the whole prefill.
    s = Scheduler(engine, SchedulerConfig(prefill_tokens=8))
    order, started, finished = [], threading.Event(), threading.Event()

    def on(name):
        def on_event(e):
            order.append(name)
            if name == "A":
                started.set()
            if name == "B" and e.finish_reason:
                finished.set()
        return on_event

    try:
        s.submit(PROMPTS[0], SamplingParams(max_new_tokens=60, temperature=0), on("A"))
        assert started.wait(10)
        s.submit(TOK.encode("y" * 100), SamplingParams(max_new_tokens=3, temperature=0), on("B"))
        assert finished.wait(30)
    finally:
        s.close()
    b = order.index("B")
    assert order[b:].count("B") >= 1 and order[:b].count("A") >= 12


SYSTEM = TOK.encode("You are a helpful assistant who answers in one short sentence.  ")  # 64 tokens: 4 blocks


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_the_prefix_cache_changes_no_output(engine, mode):
    # Prompts sharing a 64-token start (four blocks), run one after another and then together: with the prefix
    # cache the shared blocks are prefilled once, and every output is what it is without the cache.
    assert len(SYSTEM) == 64
    prompts = [SYSTEM + TOK.encode(q) for q in ("What is a dict?", "hi", "What is a list? " * 3, "x")]
    params = [SamplingParams(max_new_tokens=20, temperature=0 if mode == "greedy" else 0.9, seed=i, logprobs=True)
              for i in range(len(prompts))]
    plain = Scheduler(engine, SchedulerConfig(prefix_cache_tokens=0))
    try:
        want = [fold(plain.generate(p, q)) for p, q in zip(prompts, params)]
    finally:
        plain.close()
    assert plain.stats.cached_tokens == 0
    cached = Scheduler(engine, SchedulerConfig(max_running=2, prefill_tokens=24))
    got = [None] * len(prompts)

    def run(i):
        got[i] = fold(cached.generate(prompts[i], params[i]))

    try:
        for i in range(len(prompts)):  # one after another: each after the first reuses the system prompt
            run(i)
        assert cached.stats.cached_tokens == 3 * 64
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        cached.close()
    assert cached.stats.cached_tokens >= 7 * 64
    for g, w in zip(got, want):
        assert (g[0], g[1], g[4]) == (w[0], w[1], w[4])
        assert g[2] == pytest.approx(w[2], abs=1e-4)


def test_prefix_cache_blocks_lookup_and_eviction(engine):
    cache = PrefixCache(block=4, max_tokens=12)

    def filled(prompt):
        pending = engine.begin(prompt, SamplingParams())
        engine.prefill(pending, len(prompt))
        return pending.cache

    a = list(range(1, 11))  # two whole blocks and 2 tokens
    cache.store(a, filled(a))
    assert cache.tokens == 8 and cache.lookup(a[:8]) is not None and cache.lookup(a[:8])[0][0].shape[2] == 4
    k, v = cache.lookup(a + [5])  # the longest known prefix, in whole blocks
    assert k[0].shape[2] == 8 and len(k) == len(v) == engine.model.cfg.n_layer
    assert torch.equal(k[1], filled(a).k[1][:, :, :8])
    assert cache.lookup([9, 9, 9, 9, 9]) is None and cache.lookup(a[:4]) is None  # one token must be left to run
    b = [1, 2, 3, 4, 7, 7, 7, 7, 8]  # shares the first block with a
    cache.store(b, filled(b))
    assert cache.tokens == 12
    c = [5] * 9
    cache.store(c, filled(c))  # over the budget: a's second block, the least recently used leaf, goes
    assert cache.tokens == 12 and cache.lookup(a + [1])[0][0].shape[2] == 4 and cache.lookup(c)[0][0].shape[2] == 8
