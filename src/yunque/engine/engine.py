"""Generation: prefill + decode with the KV cache, batching, stop conditions. Token ids in, token ids (or text) out.

The step API is the engine's core, after gpt-fast's prefill / decode-one-token: a `Batch` holds the rows decoding
together over one KV cache; `Engine.add` prefills a new row (or several) and samples its first token, `Engine.step`
decodes one token for every row still running, `Engine.remove` takes rows out. Rows join and leave between steps,
each with its own SamplingParams, random generator and stop conditions (`_Sequence`). A continuous-batching
scheduler and RL rollouts drive it directly; `generate`, `generate_text` and `stream` are loops over it
(`Engine._drain`), so streamed and non-streamed output are the same by construction.

The CPU fast path (engine/cpu.py) sits behind it: the engine decodes with its own copy of the model
(`decode_model`), in bf16 where the CPU multiplies it natively, with weights packed once for oneDNN
(`PackedLinear`) and the KV cache in fp32 on CPU; optionally (`compile=True`) one compiled graph per batch size and
cache length runs each decode step over a static-shape cache.
"""

from __future__ import annotations

import codecs
import copy
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from yunque.config import LoraConfig, SamplingParams
from yunque.engine.cpu import (
    DecodeAttention,
    cache_bucket,
    compiled_decode_step,
    decode_model,
    decode_precision,
    decode_step,
    helper_rows,
)
from yunque.engine.native import helpers, native_kernels
from yunque.engine.sampling import penalize, sample, token_logprobs, top_logprobs
from yunque.model.gpt import GPT
from yunque.model.kv_cache import KVCache
from yunque.model.lora import with_adapter
from yunque.tokenizer.bpe import END_OF_TURN, Tokenizer


@dataclass(frozen=True)
class Completion:
    """One finished generation, as the server reports it."""

    text: str
    """Generated text, cut before any stop string."""
    token_ids: list[int]
    """Generated ids without the stop token; with a stop string, only the tokens wholly before it."""
    finish_reason: str
    """"stop" (a stop token or stop string) or "length" (max_new_tokens or the model's context ran out)."""
    prompt_tokens: int
    """Number of prompt tokens the model saw."""
    logprobs: list[float] | None = None
    """With SamplingParams.logprobs: the log-probability of each of token_ids under the model (before temperature,
    top-k and top-p); None otherwise."""


class _Sequence:
    """Generated ids and released text of one sequence, and the stop conditions that end it.

    Text is decoded incrementally from the tokens' exact bytes, so a UTF-8 character split across tokens is
    released only once whole. Text that could be the beginning of a stop string is held back until it is known
    not to be one; `text` therefore never contains any part of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, *, budget: int, stop_ids: set[int], stop: tuple[str, ...],
                 logprobs: bool = False, top_logprobs: bool = False) -> None:
        self.tokenizer, self.budget, self.stop_ids, self.stop = tokenizer, budget, stop_ids, stop
        self.ids: list[int] = []
        self.logprobs: list[float] | None = [] if logprobs else None
        """Log-probability of each of ids, cut with them; None when not asked for."""
        self.tops: list[tuple[tuple[int, float], ...]] | None = [] if top_logprobs else None
        """The most likely (id, logprob) pairs at each of ids' steps, cut with them; None when not asked for."""
        self.text = ""
        """Text released so far: final, safe to show."""
        self.finish_reason: str | None = None
        self._held = ""  # decoded but not yet released: may be the beginning of a stop string
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ends: list[int] = []  # per token: characters decoded through it, +1 if it ends mid-character

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int, logprob: float | None = None, top: tuple | None = None) -> None:
        """Append one sampled token (and its logprob and top logprobs, if kept): extend the text and decide whether
        the sequence is finished."""
        if token in self.stop_ids:
            return self._finish("stop")
        self.ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.tops is not None:
            self.tops.append(top)
        self._held += self._decoder.decode(self.tokenizer.token_bytes(token))
        mid_char = bool(self._decoder.getstate()[0])
        self._ends.append(len(self.text) + len(self._held) + mid_char)
        # A stop string cannot begin in released text (its beginning would have been held back), so search _held.
        cut = min((i for s in self.stop if (i := self._held.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._held = self._held[:cut]
            keep = bisect_right(self._ends, len(self.text) + cut)  # the tokens wholly before the cut
            del self.ids[keep:]
            if self.logprobs is not None:
                del self.logprobs[keep:]
            if self.tops is not None:
                del self.tops[keep:]
            return self._finish("stop", flush=False)
        if len(self.ids) >= self.budget:
            return self._finish("length")
        hold = max((n for s in self.stop for n in range(1, len(s)) if self._held.endswith(s[:n])), default=0)
        release = len(self._held) - hold
        self.text += self._held[:release]
        self._held = self._held[release:]

    def _finish(self, reason: str, flush: bool = True) -> None:
        if flush:  # an unfinished UTF-8 character at the very end becomes U+FFFD, as in Tokenizer.decode
            self._held += self._decoder.decode(b"", final=True)
        self.text += self._held
        self._held = ""
        self.finish_reason = reason


UNIFORMS_AHEAD = 64
"""Uniform numbers a seeded row draws from its generator at a time: one torch.rand call per row and step took 43 us of
a 16-row step (~5 ms), as many values drawn in one call are the same numbers."""


class Row:
    """One sequence of a running batch: its prompt length, sampling settings, random generator, and what it has
    generated so far. Made by `Engine.add`; read it freely, change it only through the engine."""

    def __init__(self, prompt: list[int], params: SamplingParams, seq: _Sequence,
                 generator: torch.Generator | None) -> None:
        self.prompt_tokens = len(prompt)
        """Number of prompt tokens the model saw."""
        self.params = params
        self.generator = generator
        """Seeded with params.seed when sampling is random and seeded; None draws from torch's global generator."""
        self._seq = seq
        self._sampling = (params.temperature, params.top_k, params.top_p, params.min_p)
        self._prompt = prompt if params.repetition_penalty != 1 else None  # what the repetition penalty also sees
        self._drawn: list[float] = []  # uniform numbers drawn ahead from generator, the next one last

    def _uniform(self) -> float:
        """The next uniform number in [0, 1) of this row's draws: from its generator, UNIFORMS_AHEAD at a time (on
        the CPU the same numbers, in the same order, as one torch.rand(1) a step), or from torch's global one."""
        if self.generator is None:
            return torch.rand(1).item()
        if not self._drawn:
            self._drawn = torch.rand(UNIFORMS_AHEAD, generator=self.generator, device=self.generator.device).tolist()
            self._drawn.reverse()
        return self._drawn.pop()

    @property
    def budget(self) -> int:
        """Most tokens this row generates: max_new_tokens, capped by the model's context (`Engine.token_budget`)."""
        return self._seq.budget

    @property
    def ids(self) -> list[int]:
        """Generated ids without the stop token; with a stop string, only the tokens wholly before it."""
        return self._seq.ids

    @property
    def logprobs(self) -> list[float] | None:
        """With params.logprobs: the log-probability of each of ids under the model (before temperature, top-k and
        top-p); None otherwise."""
        return self._seq.logprobs

    @property
    def top_logprobs(self) -> list[tuple[tuple[int, float], ...]] | None:
        """With params.top_logprobs: for each of ids, the most likely (id, logprob) pairs at its step, most likely
        first; None otherwise."""
        return self._seq.tops

    @property
    def text(self) -> str:
        """Text released so far: final (it only grows), and never any part of a stop string."""
        return self._seq.text

    @property
    def released(self) -> int:
        """How many of ids lie wholly within `text` (all of them once the row is finished): the tokens a stream may
        report along with the text."""
        seq = self._seq
        return len(seq.ids) if seq.done else bisect_right(seq._ends, len(seq.text))

    @property
    def finish_reason(self) -> str | None:
        """None while running; "stop" (a stop token or stop string) or "length" (the budget ran out)."""
        return self._seq.finish_reason

    @property
    def done(self) -> bool:
        return self._seq.done


class Sampled(NamedTuple):
    """The token one step (or a prefill) sampled for one row. (A NamedTuple: made for every row at every step,
    it costs a third of a frozen dataclass.)"""

    row: Row
    id: int
    """The token id; a stop token too, which then ends the row and is not added to row.ids."""
    logprob: float | None
    """With the row's params.logprobs: its log-probability under the model (before temperature, top-k and top-p)."""
    finish_reason: str | None
    """Set when this token finished the row ("stop" or "length"); None while it runs on."""
    top: tuple[tuple[int, float], ...] | None = None
    """With the row's params.top_logprobs: the most likely (id, logprob) pairs at this step, most likely first."""


class Batch:
    """The rows decoding together and their KV cache. Made by `Engine.new_batch`, changed only by the engine.

    Rows are in cache order. A finished row stays (skipped by `Engine.step`) until `Engine.remove` takes it out, or
    until the cache is full, when a step removes finished rows to make room.
    """

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.tokens: torch.Tensor | None = None
        """(B,) the last token sampled for each row: the input of the next step."""
        self.filled = 0
        """cache.pos, counted here so that a step reads nothing back from a static cache."""

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def running(self) -> list[Row]:
        """The rows not finished yet, in batch order."""
        return [r for r in self.rows if not r.done]


class Prefill:
    """A prompt being prefilled a chunk at a time (`Engine.begin`, `Engine.prefill`) in a one-row KV cache of its
    own, or with others in one forward (`Engine.prefill_many`, its cache then that forward's row), until
    `Engine.join` puts it into a batch."""

    def __init__(self, prompt: list[int], row: Row, new_cache: Callable[[], KVCache]) -> None:
        self.prompt, self.row, self._new_cache = prompt, row, new_cache
        self._cache: KVCache | None = None
        self.logits: torch.Tensor | None = None
        """(1, V) at the prompt's last position, once its prefill is done."""
        self.group: tuple[KVCache, int] | None = None
        """Prefilled with others (`Engine.prefill_many`): their cache and its row here; `cache` shows that row."""

    @property
    def cache(self) -> KVCache:
        """Its keys and values: a one-row cache of its own, made when first asked for (a prompt prefilled with
        others never needs one: 12 tensors of zeros a prompt, ~3% of a prefill of 8), or its row of theirs."""
        if self._cache is None:
            self._cache = self._new_cache()
        return self._cache

    @cache.setter
    def cache(self, cache: KVCache) -> None:
        self._cache = cache

    @property
    def filled(self) -> int:
        """Prompt tokens in the cache so far."""
        if self.group is not None:
            return len(self.prompt)
        return self._cache.pos if self._cache is not None else 0

    def load_prefix(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Start from keys and values (one (1, K, n, D) tensor per layer each) of the prompt's first n tokens
        computed before (`PrefixCache.lookup`), which are then not run again; before any `Engine.prefill`."""
        assert self.filled == 0 and k[0].shape[2] < len(self.prompt), "a prefix of a prompt not started yet"
        self.cache.load_prefix(k, v)

    @property
    def done(self) -> bool:
        return self.filled == len(self.prompt)


class Engine:
    """Generates text from a model and its tokenizer: batches of prompts, sampling, stop strings, streaming; and the
    step API under them (`new_batch`, `add`, `step`, `remove`) for schedulers and rollouts."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, device: str | torch.device = "cpu",
                 precision: str = "auto", compile: bool = False) -> None:
        """Decode with a copy of `model` on `device` (see `decode_model`); `model` itself is left as it is.

        precision: "bf16", "fp32", or "auto": bf16 where the device multiplies it natively, fp32 elsewhere and
        for models under SMALL_MODEL parameters on CPU (see `decode_precision`).
        compile: torch.compile the one-token decode step over a static-shape KV cache. It takes seconds per batch
        size and cache length (see `cache_bucket`), so it pays off only for long outputs or a long-lived engine;
        rows joining or leaving a batch change its size, and a size not seen before compiles a new graph.
        """
        self.device = torch.device(device)
        self.dtype, self._pack = decode_precision(model, precision, self.device)
        self.native = self.device.type == "cpu" and native_kernels() is not None
        """Whether the engine's C++ kernels serve this engine (CPU, and they built): its layers, attention and
        sampling."""
        self.compile = compile
        self._use(decode_model(model, self.dtype, self.device, pack=self._pack, native=self.native))
        # On CPU, SDPA's one-token attention over a bf16 cache is 5-7x slower than over an fp32 one (torch 2.13):
        # the cache stays fp32 there. The engine's own kernel reads bf16 faster than fp32 (it reads half the bytes;
        # benchmarks/decode_attention.py), and keys/values computed in bf16 lose nothing in a bf16 cache.
        kernel = not compile and any(isinstance(m, DecodeAttention) for m in self.model.modules())
        self.cache_dtype = torch.float32 if self.device.type == "cpu" and not kernel else self.dtype
        self.tokenizer = tokenizer
        ends = {tokenizer.eos_id, tokenizer.special_ids.get(END_OF_TURN)}
        self.stop_ids: set[int] = {i for i in ends if i is not None}
        """Token ids that end a sequence (end of text, end of a chat turn); never returned."""
        self._decode = compiled_decode_step() if compile else decode_step

    def _use(self, model: GPT) -> None:
        """Decode with `model` (the engine's copy of a model), and set `helper_rows` for it."""
        self.model = model
        # none when compiled: the compiled step's fused operations are OpenMP regions of their own, and its 16-row
        # steps ran 1.7x slower with the helpers (7.9 against 13.7 ms, the 30M GPT-2 shape, Zen 4)
        self.helper_rows = helper_rows(model) if self.native and not self.compile else 0
        """Batches of up to this many rows decode on the kernels' helper threads (see `cpu.helper_rows`)."""

    def load_weights(self, model: GPT) -> None:
        """Decode with `model`'s current weights from now on: the engine's copy is made again from it, and compiled
        graphs (which froze the old weights) are dropped. For RL rollouts after each policy update.

        `model` must have the engine's architecture (config). Rows already in a batch keep the keys and values the
        old weights cached; finish or remove them first for rollouts wholly under the new policy.
        """
        if model.cfg != self.model.cfg:
            raise ValueError(f"the model's config differs from the engine's ({model.cfg} vs {self.model.cfg}); "
                             f"load weights of the same architecture, or make a new Engine")
        # the old copy and the graphs that froze it go before the new copy is made: one copy at a time
        self.model = self._decode = None
        self._use(decode_model(model, self.dtype, self.device, pack=self._pack, native=self.native))
        self._decode = compiled_decode_step() if self.compile else decode_step

    def with_adapter(self, state: dict[str, torch.Tensor], cfg: LoraConfig) -> Engine:
        """An engine decoding this one's model plus a LoRA adapter (as `load_adapter` returns it), unmerged, that
        shares every weight with this engine: one copy of the base for any number of adapters (the server's
        adapter models). Batches and compiled graphs are each engine's own; `load_weights` on this engine later
        does not reach it."""
        engine = copy.copy(self)
        engine._use(with_adapter(self.model, state, cfg))
        engine.stop_ids = set(self.stop_ids)
        engine._decode = compiled_decode_step() if self.compile else decode_step
        return engine

    def token_budget(self, prompt_len: int, max_new_tokens: int) -> int:
        """Tokens generated at most after a prompt of prompt_len tokens: max_new_tokens, or fewer if the prompt plus
        them would not fit in the model's context (the caller may tell the user it was capped)."""
        m = self.model.cfg.max_seq_len
        if prompt_len >= m:
            raise ValueError(f"prompt has {prompt_len} tokens but the model's context is {m}; "
                             f"shorten the prompt or load a longer-context model")
        return min(max_new_tokens, m - prompt_len)

    # -- the step API ----------------------------------------------------------------------------------------------

    def new_batch(self) -> Batch:
        """An empty batch; rows join it with `add`."""
        return Batch()

    def add(self, batch: Batch, prompt: list[int], params: SamplingParams) -> Row:
        """Prefill one prompt into `batch` and sample its first token (`Row.ids`, or a finish if it ends there).

        Checked as in `generate` (an empty prompt becomes [bos_id]; too long or unknown ids raise, leaving the batch
        as it was). The prompt may be shorter or longer than the rows already running: see `KVCache.join`.
        """
        return self.add_many(batch, [prompt], params)[0]

    @torch.inference_mode()
    def add_many(self, batch: Batch, prompts: list[list[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Row]:
        """Prefill several prompts into `batch` with one forward (left-padded), one Row each; as `add`.

        params: one SamplingParams for all, or one per prompt. Each row's generator is seeded with its params.seed.
        Into an empty batch, the prompts are prefilled in place, in a cache sized for their whole generation;
        otherwise in a cache of their own, which then joins the batch's.
        """
        prompts = self._prepare(prompts)
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one, or one each")
        if not prompts:
            return []
        rows = [self._row(p, q) for p, q in zip(prompts, params)]
        cfg = self.model.cfg
        ids, pad = self._left_padded(prompts)  # (N, P)
        P = ids.shape[1]
        if batch.cache is None:
            size = min(cfg.max_seq_len, P + max(r.budget for r in rows) - 1)
            # eager, exactly that: with 256 slots for a 12-token prompt and 1 new token, the first token of
            # `yunque generate` came ~0.1 s later (benchmarks/startup.py, a fresh process); later growth is bucketed
            size = self._cache_len(size) if self.compile else size
            cache = KVCache(cfg, len(prompts), size, device=self.device, dtype=self.cache_dtype, pad=pad,
                            static=self.compile)
        else:
            cache = KVCache(cfg, len(prompts), P, device=self.device, dtype=self.cache_dtype, pad=pad)
        # prefill runs eagerly (its length varies) and projects only the last position onto the vocabulary
        logits = self.model(ids, kv_cache=cache, logits_to_keep=1)[:, -1]  # (N, V)
        return self._enter(batch, rows, cache, logits)

    # -- chunked prefill: a prompt prefilled a part at a time, between steps of a running batch ---------------------

    def begin(self, prompt: list[int], params: SamplingParams) -> Prefill:
        """Start prefilling one prompt outside any batch: `prefill` runs it a chunk at a time, `join` puts it into a
        batch and samples its first token. Checked as `add` (ValueError for a prompt that cannot run)."""
        prompt = self._prepare([prompt])[0]
        return Prefill(prompt, self._row(prompt, params),
                       lambda: KVCache(self.model.cfg, 1, len(prompt), device=self.device, dtype=self.cache_dtype))

    @torch.inference_mode()
    def prefill(self, pending: Prefill, n: int) -> int:
        """Run the next n (at most) tokens of a `begin`-ed prompt through the model; returns how many it ran."""
        start = pending.cache.pos
        ids = torch.tensor([pending.prompt[start:start + n]], device=self.device)  # (1, n)
        logits = self.model(ids, kv_cache=pending.cache, logits_to_keep=1)[:, -1]  # (1, V)
        if pending.done:
            pending.logits = logits
        return ids.shape[1]

    @torch.inference_mode()
    def prefill_many(self, pending: list[Prefill]) -> None:
        """Prefill the whole prompts of `begin`-ed prompts not started yet in one forward (left-padded): the
        weights are read once for all of them. Each ends as `prefill` over its whole prompt leaves it, its last
        position's logits kept, but its keys and values stay where the forward wrote them: its `cache` shows its
        row of the prompts' cache (left-padded), and `join` takes prompts of one such forward into a batch together,
        copied once. One prompt runs in its own cache directly."""
        assert all(p.filled == 0 for p in pending), "prompts whose prefill has not started"
        if len(pending) <= 1:
            for p in pending:  # one prompt: in its own cache directly, no copy
                self.prefill(p, len(p.prompt))
            return
        ids, pad = self._left_padded([p.prompt for p in pending])  # (N, P)
        cache = KVCache(self.model.cfg, len(pending), ids.shape[1], device=self.device, dtype=self.cache_dtype,
                        pad=pad)
        logits = self.model(ids, kv_cache=cache, logits_to_keep=1)[:, -1]  # (N, V)
        for i, p in enumerate(pending):
            p.group, p.cache, p.logits = (cache, i), cache.rows(i, 1), logits[i:i + 1]

    @torch.inference_mode()
    def join(self, batch: Batch, pending: list[Prefill]) -> list[Row]:
        """Put prompts whose prefill is done into `batch` and sample their first tokens; their rows, in order.
        Each row is then what `add` would have made of its prompt."""
        assert all(p.done for p in pending), "join prompts whose prefill is done"
        if not pending:
            return []
        parts = _runs(pending)
        cache = parts[0]
        for part in parts[1:]:
            cache.join(part)  # small caches first: the batch's, the large one, is copied once
        if batch.cache is None:
            batch.cache = KVCache(self.model.cfg, 0, cache.pos, device=self.device, dtype=self.cache_dtype,
                                  static=self.compile)
        return self._enter(batch, [p.row for p in pending], cache, torch.cat([p.logits for p in pending]))

    @torch.inference_mode()
    def step(self, batch: Batch) -> list[Sampled]:
        """Decode one token for every running row of `batch`; returns them in batch order (empty when none runs).

        A row that a token finishes reports it (`Sampled.finish_reason`, `Row.finish_reason`) and is skipped from
        then on; `remove` frees its cache slots.
        """
        running = [i for i, r in enumerate(batch.rows) if r._seq.finish_reason is None]
        if not running:
            return []
        if batch.filled == batch.cache.max_len:
            self._make_room(batch)
            running = list(range(len(batch.rows)))
        with helpers(len(batch.rows) <= self.helper_rows):
            return self._step(batch, running)

    def _step(self, batch: Batch, running: list[int]) -> list[Sampled]:
        logits = self._decode(self.model, batch.tokens, batch.cache)  # (B, V)
        batch.filled += 1
        if len(running) == len(batch.rows):
            batch.tokens, sampled = self._sample(batch.rows, logits)
            return sampled
        index = torch.tensor(running, device=self.device)
        tokens, sampled = self._sample([batch.rows[i] for i in running], logits[index])
        batch.tokens = batch.tokens.index_put((index,), tokens)  # finished rows keep feeding their last token
        return sampled

    @torch.inference_mode()  # the cache may keep a view of its rows, which the step's inference mode made
    def remove(self, batch: Batch, *rows: Row) -> None:
        """Take rows out of `batch` (finished or not) now; their cache rows are freed with the next copy of the cache
        (`KVCache.select` keeps a run of rows as a view) or with the batch. Rows not in it are ignored."""
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(batch.rows) if id(r) not in gone]
        if len(keep) == len(batch.rows):
            return
        if not keep:
            batch.rows, batch.cache, batch.tokens, batch.filled = [], None, None, 0
            return
        index = torch.tensor(keep, device=self.device)
        cache = batch.cache
        cache.select(index)
        batch.tokens = batch.tokens[index]
        batch.rows = [batch.rows[i] for i in keep]
        # Rows joining a running batch are left-padded to its fill level, which grows by one a step for as long as
        # any row runs: under steady arrivals every row would attend over ever more padding. When the rows left
        # share padding of a quarter of the cache or more, it goes now (one copy) rather than when the cache is full.
        if cache.pad is not None and 4 * (common := int(cache.pad.min())) >= batch.filled and common:
            cache.drop_common_padding()
            batch.filled = cache.pos

    # -- whole generations, over the step API ----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Generated token ids for each prompt (without prompt or stop token), generated as one batch.

        An empty prompt is replaced by [bos_id]. If a prompt plus max_new_tokens exceeds the model's context
        (max_seq_len), only as many tokens as fit are generated (`token_budget`). With a seed, prompt i samples
        with seed + i, as it would alone with that seed.
        """
        return [row.ids for row in self._run(prompts, params)]

    def generate_text(self, texts: list[str], params: SamplingParams) -> list[Completion]:
        """Complete each text (encoded with BOS if the tokenizer has one), as one batch."""
        bos = self.tokenizer.bos_id is not None
        return [Completion(r.text, r.ids, r.finish_reason, r.prompt_tokens, r.logprobs)
                for r in self._run([self.tokenizer.encode(t, bos=bos) for t in texts], params)]

    def complete(self, text: str, params: SamplingParams) -> str:
        """The generated continuation of `text`, cut before any stop string."""
        return self.generate_text([text], params)[0].text

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield the continuation of one prompt as text pieces, as soon as each is final.

        A character split across tokens is never split across pieces, and text that may begin a stop string is
        held back until it is known not to; `"".join(stream(...))` equals the text of `generate_text`.
        """
        batch = self.new_batch()
        row = self.add(batch, prompt, params)
        sent = 0
        for _ in self._drain(batch):
            if len(row.text) > sent:
                yield row.text[sent:]
                sent = len(row.text)

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> list[Row]:
        """Run prompts to the end as one batch; prompt i draws with seed + i."""
        each = [params if params.seed is None else replace(params, seed=params.seed + i) for i in range(len(prompts))]
        batch = self.new_batch()
        rows = self.add_many(batch, prompts, each)
        for _ in self._drain(batch):
            pass
        return rows

    def _drain(self, batch: Batch) -> Iterator[None]:
        """The decode loop of whole generations: yields once after the prefill, then after each step, until no row
        runs. Finished rows leave at once; compiled, they ride along instead until the cache is full (`step` removes
        them then), as a new batch size means compiling again."""
        done = [r for r in batch.rows if r.done]  # finished by their first token
        yield
        while True:
            if done and not self.compile:
                self.remove(batch, *done)
            sampled = self.step(batch)
            if not sampled:
                return
            done = [s.row for s in sampled if s.finish_reason is not None]
            yield

    # -- internals -------------------------------------------------------------------------------------------------

    def _prepare(self, prompts: list[list[int]]) -> list[list[int]]:
        """Prompts checked against the model: empty ones become [bos_id]; too long or unknown ids raise."""
        bos, V = self.tokenizer.bos_id, self.model.cfg.vocab_size
        out = []
        for p in prompts:
            if not p:
                if bos is None:
                    raise ValueError("prompt is empty and the tokenizer has no BOS token to start from; "
                                     "pass at least one token")
                p = [bos]
            self.token_budget(len(p), 1)  # raises if the prompt leaves no room
            if min(p) < 0 or max(p) >= V:
                raise ValueError(f"prompt holds token id {min(p) if min(p) < 0 else max(p)} outside the model's "
                                 f"vocabulary [0, {V}); encode with the tokenizer that belongs to this model")
            out.append(list(p))
        return out

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts as one batch of ids (N, P), each left-padded to the longest, and each one's padding (N,) (None
        when none is padded), as KVCache takes it."""
        P = max(len(p) for p in prompts)
        pad = [P - len(p) for p in prompts]
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        ids = torch.tensor([[pad_id] * n + p for n, p in zip(pad, prompts)], device=self.device)
        return ids, (torch.tensor(pad) if any(pad) else None)

    def _row(self, prompt: list[int], params: SamplingParams) -> Row:
        seq = _Sequence(self.tokenizer, budget=self.token_budget(len(prompt), params.max_new_tokens),
                        stop_ids=self.stop_ids, stop=params.stop, logprobs=params.logprobs,
                        top_logprobs=params.top_logprobs > 0)
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        return Row(prompt, params, seq, generator)

    def _enter(self, batch: Batch, rows: list[Row], cache: KVCache, logits: torch.Tensor) -> list[Row]:
        """Rows whose prompts are prefilled in `cache` (logits (N, V) of their last positions) join `batch`, in a
        cache sized for their generation, and sample their first tokens."""
        P = cache.pos
        if batch.cache is None:
            batch.cache = cache
        else:
            pos = max(batch.filled, P)
            steps = max((r.budget - len(r.ids) for r in batch.running), default=0)  # each step fills one slot
            need = pos + max(steps, max(r.budget for r in rows) - 1)  # a new row's first token needs no step
            size = batch.cache.max_len if need <= batch.cache.max_len else self._cache_len(need)
            batch.cache.join(cache, max_len=max(size, pos), room=True)  # a batch that grows keeps growing
        batch.filled = max(batch.filled, P)
        tokens, _ = self._sample(rows, logits)
        batch.rows += rows
        batch.tokens = tokens if batch.tokens is None else torch.cat([batch.tokens, tokens])
        return rows

    def _cache_len(self, n: int) -> int:
        """Slots of a cache for n positions: a `cache_bucket`, at most the model's context."""
        return min(self.model.cfg.max_seq_len, cache_bucket(n))

    def _make_room(self, batch: Batch) -> None:
        """Free a slot at the end of a full cache: finished rows leave, then the padding common to every row goes;
        failing both, the cache grows. The longest running row is shorter than the context, so one of them works."""
        self.remove(batch, *(r for r in batch.rows if r.done))
        cache = batch.cache
        if cache.pad is not None and int(cache.pad.min()) > 0:
            cache.drop_common_padding()
            batch.filled = cache.pos
        if batch.filled == cache.max_len:
            cache.resize(self._cache_len(batch.filled + max(r.budget - len(r.ids) for r in batch.rows)))
        assert batch.filled < cache.max_len, "a running row has outgrown the model's context"

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> tuple[torch.Tensor, list[Sampled]]:
        """Sample a token for each of `rows` (running) from its logits (N, V), with the row's own settings and
        generator, and push it into the row; returns the tokens (N,) and what each row got."""
        drawn = _penalized(rows, logits) if any(r.params.penalised for r in rows) else logits
        first = rows[0]._sampling
        if all(r._sampling == first for r in rows):  # one setting for all rows: one call
            tokens = _draw(rows, drawn, first, self.native)
        else:
            tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
            for key in dict.fromkeys(r._sampling for r in rows):
                group = [i for i, r in enumerate(rows) if r._sampling == key]
                index = torch.tensor(group, device=logits.device)
                tokens[index] = _draw([rows[i] for i in group], drawn[index], key, self.native)
        logprobs = [None] * len(rows)
        if any(r.params.logprobs for r in rows):  # 3-5% of a decode step (mini, gpt2-30M; batch 1, 8): if asked
            logprobs = token_logprobs(logits, tokens).tolist()
        tops = [None] * len(rows)
        if k := max(r.params.top_logprobs for r in rows):
            top_ids, top_values = top_logprobs(logits, k)
            tops = [tuple(zip(i[:r.params.top_logprobs], v[:r.params.top_logprobs])) if r.params.top_logprobs else None
                    for r, i, v in zip(rows, top_ids.tolist(), top_values.tolist())]
        sampled = []
        for row, token, logprob, top in zip(rows, tokens.tolist(), logprobs, tops):
            seq = row._seq
            seq.push(token, logprob, top)
            sampled.append(Sampled(row, token, logprob if seq.logprobs is not None else None, seq.finish_reason, top))
        return tokens, sampled


def _runs(pending: list[Prefill]) -> list[KVCache]:
    """The caches of `pending` (prefilled), in order, with each run of consecutive rows of one `prefill_many`
    forward as one cache of those rows (views, no copy). A join of 16 prompts prefilled together was 15 chained
    joins of one-row caches, a few hundred small copies: at 16 clients of benchmarks/serve.py in the scheduler
    alone, joins took ~5% of the time."""
    runs: list[KVCache] = []
    i = 0
    while i < len(pending):
        j, group = i + 1, pending[i].group
        while group is not None and j < len(pending) and pending[j].group == (group[0], group[1] + j - i):
            j += 1
        runs.append(group[0].rows(group[1], j - i) if j - i > 1 else pending[i].cache)
        i = j
    return runs


def _draw(rows: list[Row], logits: torch.Tensor, settings: tuple, native: bool) -> torch.Tensor:
    """Tokens (N,) for rows sharing sampling settings (temperature, top_k, top_p, min_p), each with its own
    generator; `native`: with the engine's C++ sampling kernel where it applies (`sample`)."""
    temperature, top_k, top_p, min_p = settings
    u = None  # unseeded rows alone: sample draws from torch's global generator
    if temperature > 0 and any(r.generator is not None for r in rows):
        u = torch.tensor([[r._uniform()] for r in rows], device=logits.device)
    return sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, u=u, native=native)


def _penalized(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
    """Logits (N, V) with each penalised row's frequency, presence and repetition penalties applied (fp32)."""
    out = logits.float().clone()
    V = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if not p.penalised:
            continue
        counts = torch.bincount(torch.tensor(row.ids, dtype=torch.long), minlength=V).to(logits.device)[None]
        seen = None
        if row._prompt is not None:
            seen = counts > 0
            seen[0, torch.tensor(row._prompt, device=logits.device)] = True
        out[i:i + 1] = penalize(out[i:i + 1], counts, frequency=p.frequency_penalty, presence=p.presence_penalty,
                                repetition=p.repetition_penalty, seen=seen)
    return out


__all__ = ["Batch", "Completion", "Engine", "Prefill", "Row", "Sampled", "SamplingParams"]
