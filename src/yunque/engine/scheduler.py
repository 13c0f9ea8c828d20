"""Continuous batching: concurrent requests share one running batch of the engine, joining and leaving it between
decode steps.

One worker thread owns the engine and its `Batch`; nothing else touches them. Each turn of its loop it
1. takes out the sequences whose caller cancelled them (or whose time ran out): their KV slots are freed at once;
2. runs calls queued with `call` (embeddings, prompt scoring: whatever needs the model between two steps);
3. admits waiting sequences up to `max_running` (`Engine.begin`: each in a one-row cache of its own), and spends
   at most `prefill_tokens` prompt tokens on prefilling them, in order of arrival (`Engine.prefill`; the whole
   prompts that fit go through one forward together, `Engine.prefill_many`, which reads the weights once for
   all of them, and one that would fit a turn's budget but not what is left of it waits for the next turn): a
   prompt longer than that is prefilled a chunk at a time over several turns, so the running sequences decode a
   token between its chunks instead of waiting for its whole prefill. A prompt's first whole blocks may come
   from the shared-prefix cache (engine/prefix.py: a common system prompt is run once); prompts whose prefill
   is done join the batch and sample their first token (`Engine.join`), and their blocks are kept in the prefix
   cache;
4. decodes one token for every running sequence (`Engine.step`), reports it to its caller and removes the
   sequences that finished.
Every sequence has its own SamplingParams and generator, and a prefill of its own, so what it generates does not
depend on what runs beside it nor on the prefix cache (tests/engine/test_scheduler.py runs requests concurrently
and alone, with and without the cache, and compares them).

Callers are told through a callback run in the worker thread (`submit`); `stream` wraps it in an asyncio queue
for async callers (the server), and `generate` waits for the whole reply (tests, scripts).

Threads and OpenMP: every thread that runs a parallel torch operation keeps a team of OpenMP threads for as long
as it lives. With more such threads than cores, libgomp stops letting a team spin between parallel regions, so
the worker's team is put to sleep and woken for each of its matrix products: a oneDNN bf16 product of a 30M
model's layer took 4x as long (126-166 us against 25-37 us; twice the futex calls a decode). So the torch work
of making an engine (loading, packing weights) is best done `in_passing_thread`, whose team ends with it, and
not in a thread that lives on (asyncio's pool, a server's main thread).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from yunque.config import SamplingParams, SchedulerConfig
from yunque.engine.engine import Engine, Prefill, Row
from yunque.engine.prefix import PrefixCache


def in_passing_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) run in a new thread that has ended when this returns (and its OpenMP team with it: see the module
    doc); its result, or its exception raised here."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="yunque-passing") as pool:
        return pool.submit(fn, *args).result()  # leaving the block joins the pool's one thread


class QueueFull(RuntimeError):
    """The scheduler holds max_queue waiting requests already; the server answers 429."""


class Token(NamedTuple):
    """One generated token as a stream reports it."""

    id: int
    logprob: float | None
    """With params.logprobs: its log-probability under the model (before temperature, penalties and filters)."""
    top: tuple[tuple[int, float], ...] | None
    """With params.top_logprobs: the most likely (id, logprob) pairs at its step, most likely first."""


@dataclass(frozen=True)
class Event:
    """What one sequence produced since its last event: new text and the tokens wholly within it; the last event
    of a sequence has its finish_reason."""

    text: str
    tokens: tuple[Token, ...]
    finish_reason: str | None
    """None while it runs; "stop", "length", "cancelled", or "error" (then `error` says why)."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far (the stop token excluded)."""
    error: str | None = None


class Sequence:
    """One submitted generation: a handle to cancel it and to read its state. Made by `Scheduler.submit`."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], Any],
                 timeout: float | None) -> None:
        self.id = next(self._ids)
        self.prompt, self.params, self.on_event = prompt, params, on_event
        self.submitted = time.perf_counter()
        self.deadline = self.submitted + timeout if timeout else None
        self.first_token: float | None = None
        """perf_counter() when its first token came (prefill done)."""
        self.row: Row | None = None
        self.pending: Prefill | None = None
        """Its prefill while it runs (before it joins the batch)."""
        self.cancelled = False
        self.finished = False
        self._sent_text = 0
        self._sent_tokens = 0


@dataclass
class Stats:
    """Counters since start, and the state now: what /metrics reports."""

    requests: int = 0
    """Sequences submitted."""
    finished: dict[str, int] = field(default_factory=dict)
    """Sequences ended, by finish reason."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens taken from the shared-prefix cache instead of run through the model."""
    generated_tokens: int = 0
    steps: int = 0
    """Decode steps run."""
    step_rows: int = 0
    """Rows decoded, summed over steps: step_rows / steps is the mean batch size."""
    ttft: list[float] = field(default_factory=list)
    """Seconds from submit to first token of the most recent sequences (at most 1024)."""
    waiting: int = 0
    running: int = 0


class Scheduler:
    """Runs an engine in one worker thread over one batch that sequences join and leave at every step."""

    def __init__(self, engine: Engine, cfg: SchedulerConfig | None = None) -> None:
        self.engine, self.cfg = engine, cfg or SchedulerConfig()
        self._lock = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._running: dict[int, Sequence] = {}  # by id(row)
        self._prefilling: list[Sequence] = []  # admitted, prefill not done yet, in order of arrival
        self.prefixes = PrefixCache(max_tokens=self.cfg.prefix_cache_tokens) if self.cfg.prefix_cache_tokens else None
        """The shared-prefix cache (None when prefix_cache_tokens is 0)."""
        self._wake = False  # something for the worker to look at (a cancel)
        self._closed = False
        self._round_hooks: list[Callable[[], Any]] = []
        self._sent = False  # events sent in this round of the worker's loop
        self.stats = Stats()
        self._thread = threading.Thread(target=self._loop, name="yunque-scheduler", daemon=True)
        self._thread.start()

    # -- callers' side (any thread) --------------------------------------------------------------------------------

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """ValueError naming the problem if `prompt` cannot run with `params`: too long for the context, ids outside
        the vocabulary, more new tokens than max_tokens allows."""
        if params.max_new_tokens > self.cfg.max_tokens:
            raise ValueError(f"max_tokens {params.max_new_tokens} is more than this server allows per request "
                             f"({self.cfg.max_tokens}); ask for fewer")
        self.engine._prepare([prompt])

    def submit(self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], Any], *,
               timeout: float | None = None) -> Sequence:
        """Queue one generation; `on_event(Event)` is called in the worker thread as it runs (it must not block).

        Raises ValueError for a prompt or params that cannot run (`check`), QueueFull when max_queue sequences
        wait already, RuntimeError once closed. timeout: seconds after which it ends with finish_reason "length".
        """
        self.check(prompt, params)
        seq = Sequence(list(prompt), params, on_event, timeout)
        with self._lock:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._waiting) >= self.cfg.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (max_queue "
                                f"{self.cfg.max_queue}); retry later")
            self._waiting.append(seq)
            self.stats.requests += 1
            self._lock.notify()
        return seq

    def on_round_end(self, fn: Callable[[], Any]) -> None:
        """Call fn() in the worker thread at the end of each round of its loop (admissions, prefill, one decode
        step) that sent events, and once more after the last events when it closes: a consumer can hold a
        round's events and hand them on together (the server wakes its event loop once a step, not once a row)."""
        self._round_hooks.append(fn)

    @property
    def worker(self) -> threading.Thread:
        """The thread that runs the engine and calls every `on_event` and `on_round_end` callback."""
        return self._thread

    def cancel(self, seq: Sequence) -> None:
        """End `seq` now: it leaves the batch before the next step (no more work for it; its cache memory goes as
        `Engine.remove` says); its last event has finish_reason "cancelled". Cancelling a finished sequence does
        nothing."""
        with self._lock:
            seq.cancelled = True
            self._wake = True
            self._lock.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run fn() in the worker thread between two steps (it may use the engine); its result or exception comes
        through the returned Future."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._calls.append((fn, future))
            self._lock.notify()
        return future

    def close(self) -> None:
        """Stop the worker: waiting and running sequences end with finish_reason "cancelled"."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences admitted now: in the batch, or being prefilled to join it."""
        return len(self._running) + len(self._prefilling)

    def generate(self, prompt: list[int], params: SamplingParams, *, timeout: float | None = None) -> list[Event]:
        """Submit and wait for the whole generation; returns its events (the last one finished)."""
        events: list[Event] = []
        done = threading.Event()

        def on_event(e: Event) -> None:
            events.append(e)
            if e.finish_reason:
                done.set()

        self.submit(prompt, params, on_event, timeout=timeout)
        done.wait()
        return events

    async def stream(self, prompt: list[int], params: SamplingParams, *,
                     timeout: float | None = None) -> AsyncIterator[Event]:
        """Submit and yield its events as they come. Leaving the loop early (a client that disconnects, a
        cancelled task) cancels the sequence."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(e: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, e)
            except RuntimeError:  # the caller's loop is closed: nobody listens
                pass

        seq = self.submit(prompt, params, on_event, timeout=timeout)
        try:
            while True:
                event = await queue.get()
                yield event
                if event.finish_reason:
                    return
        finally:
            if not seq.finished:
                self.cancel(seq)

    # -- the worker ------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        batch = self.engine.new_batch()
        while True:
            with self._lock:
                while not (self._closed or self._waiting or self._calls or self._wake or batch.running
                           or self._prefilling):
                    self._lock.wait()
                if self._closed:
                    break
                self._wake = False
                calls = list(self._calls)
                self._calls.clear()
                admitted = self._admit()
            try:
                self._drop_ended(batch)
                for fn, future in calls:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as e:  # noqa: B036 - handed to the caller
                            future.set_exception(e)
                self._begin(admitted)
                if self._prefilling:
                    self._prefill(batch)
                if batch.running:
                    self._step(batch)
            except Exception as e:  # a fault in the engine: fail what runs, start again with an empty batch
                for seq in [*self._running.values(), *self._prefilling, *admitted]:
                    self._end(seq, "error", error=f"{type(e).__name__}: {e}")
                self._running.clear()
                self._prefilling.clear()
                batch = self.engine.new_batch()
            self.stats.waiting, self.stats.running = len(self._waiting), self.running
            self._end_round()
        with self._lock:
            left = list(self._waiting) + list(self._running.values()) + self._prefilling
            self._waiting.clear()
            for _fn, future in self._calls:
                future.cancel()
        for seq in left:
            self._end(seq, "cancelled")
        self._running.clear()
        self._prefilling.clear()
        self._end_round()

    def _end_round(self) -> None:
        if not self._sent:
            return
        self._sent = False
        for fn in self._round_hooks:
            try:
                fn()
            except Exception:  # as with on_event: a consumer's fault must not stop the worker
                pass

    def _admit(self) -> list[Sequence]:
        """Waiting sequences to start now (under the lock): up to max_running admitted; cancelled ones are dropped."""
        taken: list[Sequence] = []
        while self._waiting and self.running + len(taken) < self.cfg.max_running:
            seq = self._waiting.popleft()
            if seq.cancelled:
                self._end(seq, "cancelled")
            else:
                taken.append(seq)
        return taken

    def _drop_ended(self, batch) -> None:
        """Cancelled sequences and those past their deadline leave the batch (or their prefill) now."""
        now = time.perf_counter()
        ended = [s for s in [*self._running.values(), *self._prefilling]
                 if s.cancelled or (s.deadline is not None and now > s.deadline)]
        if not ended:
            return
        self.engine.remove(batch, *(s.row for s in ended if s.pending is None))
        for seq in ended:
            if seq.pending is None:
                del self._running[id(seq.row)]
            else:
                self._prefilling.remove(seq)
                seq.pending = None  # its cache goes with it
            self._end(seq, "cancelled" if seq.cancelled else "length")

    def _begin(self, admitted: list[Sequence]) -> None:
        for seq in admitted:
            try:
                seq.pending = self.engine.begin(seq.prompt, seq.params)
            except ValueError as e:  # checked at submit, so not expected
                self._end(seq, "error", error=str(e))
                continue
            self._prefilling.append(seq)

    def _prefill(self, batch) -> None:
        """Prefill admitted sequences, first come first, up to prefill_tokens prompt tokens in all (a long prompt
        goes on in the next turns); those done join the batch with their first token. A prompt that does not fit
        what is left of the budget but would fit a whole one waits for the next turn: split, its two parts would
        be two forwards of their own (16-client levels of benchmarks/serve.py, timed in the server: prefill took
        0.90-0.92 s of ~4 s, against 0.93-1.13 s with such prompts split)."""
        budget, whole, ran = self.cfg.prefill_tokens, [], []
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            pending = seq.pending
            if pending.filled == 0 and self.prefixes is not None:
                prefix = self.prefixes.lookup(pending.prompt)
                if prefix is not None:
                    pending.load_prefix(*prefix)
                    self.stats.cached_tokens += pending.filled
            left = len(pending.prompt) - pending.filled
            if ran and budget < left <= self.cfg.prefill_tokens:
                break  # it fits a turn whole: the next one, rather than split into two forwards over two turns
            if pending.filled == 0 and left <= budget:
                whole.append(seq)  # prefilled together below, in one forward
                budget -= left
            else:
                budget -= self.engine.prefill(pending, min(budget, left))
            ran.append(seq)
        self.engine.prefill_many([seq.pending for seq in whole])
        done = [seq for seq in ran if seq.pending.done]
        for seq in done:
            if self.prefixes is not None:
                self.prefixes.store(seq.pending.prompt, seq.pending.cache)
            self._prefilling.remove(seq)
        if not done:
            return
        rows = self.engine.join(batch, [s.pending for s in done])
        now = time.perf_counter()
        for seq, row in zip(done, rows):
            seq.row, seq.pending, seq.first_token = row, None, now
            self._running[id(row)] = seq
            self.stats.prompt_tokens += row.prompt_tokens
            self.stats.ttft.append(now - seq.submitted)
            self._report(seq)
        del self.stats.ttft[:-1024]
        self._remove_finished(batch)

    def _step(self, batch) -> None:
        sampled = self.engine.step(batch)
        self.stats.steps += 1
        self.stats.step_rows += len(sampled)
        for s in sampled:
            self._report(self._running[id(s.row)])
        self._remove_finished(batch)

    def _remove_finished(self, batch) -> None:
        done = [r for r in batch.rows if r.done]
        if done:
            self.engine.remove(batch, *done)
            for row in done:
                self._running.pop(id(row), None)

    def _report(self, seq: Sequence) -> None:
        """Tell the caller what its row released since the last event."""
        row = seq.row
        text = row.text[seq._sent_text:]
        n = row.released
        lp, tops = row.logprobs, row.top_logprobs
        tokens = tuple(Token(row.ids[i], lp[i] if lp is not None else None, tops[i] if tops is not None else None)
                       for i in range(seq._sent_tokens, n))
        if not (text or tokens or row.done):
            return
        seq._sent_text, seq._sent_tokens = len(row.text), n
        if row.done:
            seq.finished = True
            self.stats.generated_tokens += len(row.ids)
            self.stats.finished[row.finish_reason] = self.stats.finished.get(row.finish_reason, 0) + 1
        self._send(seq, Event(text, tokens, row.finish_reason, row.prompt_tokens, len(row.ids)))

    def _end(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Finish a sequence that its row did not finish (cancelled, timed out, failed), with the text it had."""
        if seq.finished:
            return
        seq.finished = True
        row = seq.row
        done = len(row.ids) if row is not None else 0
        self.stats.generated_tokens += done
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        self._send(seq, Event("", (), reason, row.prompt_tokens if row else len(seq.prompt), done, error))

    def _send(self, seq: Sequence, event: Event) -> None:
        self._sent = True
        try:
            seq.on_event(event)
        except Exception:  # a caller's callback must not stop the worker
            pass


__all__ = ["Event", "QueueFull", "Scheduler", "Sequence", "Stats", "Token", "in_passing_thread"]
