"""Generation: prefill + decode with the KV cache, batching, stop conditions. Token ids in, token ids (or text) out.

One decode loop (`Engine._steps`) serves every entry point: `generate` and `generate_text` run it to the end,
`stream` yields the text it releases step by step, so streamed and non-streamed output are the same by
construction. Per-sequence stop logic and text lives in `_Sequence`; the loop only runs the model and samples.

The CPU fast path (engine/cpu.py, twin tests in tests/engine/test_cpu.py) sits behind it: the engine decodes with
its own copy of the model (`decode_model`), in bf16 where the CPU multiplies it natively, with weights packed once
for oneDNN (`PackedLinear`) and the KV cache in fp32 on CPU; optionally (`compile=True`) one compiled graph per
batch size runs each decode step over a static-shape cache.
"""

from __future__ import annotations

import codecs
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from yunque.config import SamplingParams
from yunque.engine.cpu import cache_bucket, compiled_decode_step, decode_model, decode_precision, decode_step
from yunque.engine.sampling import sample
from yunque.model.gpt import GPT
from yunque.model.kv_cache import KVCache
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


class _Sequence:
    """Generated ids and released text of one sequence, and the stop conditions that end it.

    Text is decoded incrementally from the tokens' exact bytes, so a UTF-8 character split across tokens is
    released only once whole. Text that could be the beginning of a stop string is held back until it is known
    not to be one; `text` therefore never contains any part of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, *, budget: int, stop_ids: set[int], stop: tuple[str, ...]) -> None:
        self.tokenizer, self.budget, self.stop_ids, self.stop = tokenizer, budget, stop_ids, stop
        self.ids: list[int] = []
        self.text = ""
        """Text released so far: final, safe to show."""
        self.finish_reason: str | None = None
        self._held = ""  # decoded but not yet released: may be the beginning of a stop string
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ends: list[int] = []  # per token: characters decoded through it, +1 if it ends mid-character

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> None:
        """Append one sampled token: extend the text and decide whether the sequence is finished."""
        if token in self.stop_ids:
            return self._finish("stop")
        self.ids.append(token)
        self._held += self._decoder.decode(self.tokenizer.token_bytes(token))
        mid_char = bool(self._decoder.getstate()[0])
        self._ends.append(len(self.text) + len(self._held) + mid_char)
        # A stop string cannot begin in released text (its beginning would have been held back), so search _held.
        cut = min((i for s in self.stop if (i := self._held.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._held = self._held[:cut]
            del self.ids[bisect_right(self._ends, len(self.text) + cut):]  # keep tokens wholly before the cut
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


class Engine:
    """Generates text from a model and its tokenizer: batches of prompts, sampling, stop strings, streaming."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, device: str | torch.device = "cpu",
                 precision: str = "auto", compile: bool = False) -> None:
        """Decode with a copy of `model` on `device` (see `decode_model`); `model` itself is left as it is.

        precision: "bf16", "fp32", or "auto": bf16 where the device multiplies it natively, fp32 elsewhere and
        for models under SMALL_MODEL parameters on CPU (see `decode_precision`).
        compile: torch.compile the one-token decode step over a static-shape KV cache. It takes seconds per batch
        size and cache length (see `cache_bucket`), so it pays off only for long outputs or a long-lived engine.
        """
        self.device = torch.device(device)
        self.dtype, pack = decode_precision(model, precision, self.device)
        self.model = decode_model(model, self.dtype, self.device, pack=pack)
        # On CPU, one-token attention over a bf16 cache is 5-7x slower than over an fp32 one (torch 2.13), while
        # the cache is small next to the weights: keep it in fp32.
        self.cache_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.tokenizer = tokenizer
        ends = {tokenizer.eos_id, tokenizer.special_ids.get(END_OF_TURN)}
        self.stop_ids: set[int] = {i for i in ends if i is not None}
        """Token ids that end a sequence (end of text, end of a chat turn); never returned."""
        self.compile = compile
        self._decode = compiled_decode_step() if compile else decode_step

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Generated token ids for each prompt (without prompt or stop token), generated as one batch.

        An empty prompt is replaced by [bos_id]. If a prompt plus max_new_tokens exceeds the model's context
        (max_seq_len), only as many tokens as fit are generated.
        """
        return [seq.ids for seq in self._run(self._prepare(prompts), params)]

    def generate_text(self, texts: list[str], params: SamplingParams) -> list[Completion]:
        """Complete each text (encoded with BOS if the tokenizer has one), as one batch."""
        bos = self.tokenizer.bos_id is not None
        prompts = self._prepare([self.tokenizer.encode(t, bos=bos) for t in texts])
        return [Completion(seq.text, seq.ids, seq.finish_reason, len(p))
                for p, seq in zip(prompts, self._run(prompts, params))]

    def complete(self, text: str, params: SamplingParams) -> str:
        """The generated continuation of `text`, cut before any stop string."""
        return self.generate_text([text], params)[0].text

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield the continuation of one prompt as text pieces, as soon as each is final.

        A character split across tokens is never split across pieces, and text that may begin a stop string is
        held back until it is known not to; `"".join(stream(...))` equals the text of `generate_text`.
        """
        [prompt] = self._prepare([prompt])
        [seq] = seqs = self._sequences([prompt], params)
        sent = 0
        for _ in self._steps([prompt], params, seqs):
            if len(seq.text) > sent:
                yield seq.text[sent:]
                sent = len(seq.text)

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> list[_Sequence]:
        """Run prepared prompts to the end as one batch."""
        seqs = self._sequences(prompts, params)
        for _ in self._steps(prompts, params, seqs):
            pass
        return seqs

    def _prepare(self, prompts: list[list[int]]) -> list[list[int]]:
        """Prompts checked against the model: empty ones become [bos_id]; too long or unknown ids raise."""
        bos, m, V = self.tokenizer.bos_id, self.model.cfg.max_seq_len, self.model.cfg.vocab_size
        out = []
        for p in prompts:
            if not p:
                if bos is None:
                    raise ValueError("prompt is empty and the tokenizer has no BOS token to start from; "
                                     "pass at least one token")
                p = [bos]
            if len(p) >= m:
                raise ValueError(f"prompt has {len(p)} tokens but the model's context is {m}; "
                                 f"shorten the prompt or load a longer-context model")
            if min(p) < 0 or max(p) >= V:
                raise ValueError(f"prompt holds token id {min(p) if min(p) < 0 else max(p)} outside the model's "
                                 f"vocabulary [0, {V}); encode with the tokenizer that belongs to this model")
            out.append(list(p))
        return out

    def _sequences(self, prompts: list[list[int]], params: SamplingParams) -> list[_Sequence]:
        m = self.model.cfg.max_seq_len
        return [_Sequence(self.tokenizer, budget=min(params.max_new_tokens, m - len(p)), stop_ids=self.stop_ids,
                          stop=params.stop) for p in prompts]

    @torch.inference_mode()
    def _steps(self, prompts: list[list[int]], params: SamplingParams, seqs: list[_Sequence]) -> Iterator[None]:
        """The decode loop: one prefill forward for the left-padded batch, then one token per step.

        Each sampled token is pushed into its row's sequence, then the loop yields. Rows whose sequence is done
        are dropped from the batch and the cache; compiled, they ride along until the cache is full instead, as a
        new batch size would mean compiling again.
        """
        if not prompts:
            return
        cfg = self.model.cfg
        P = max(len(p) for p in prompts)
        pads = [P - len(p) for p in prompts]
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        ids = torch.tensor([[pad_id] * n + p for n, p in zip(pads, prompts)], device=self.device)  # (B, P)
        size = P + max(s.budget for s in seqs) - 1
        if self.compile:  # one compiled graph per cache length bucket
            size = cache_bucket(size)
        cache = KVCache(cfg, len(prompts), min(cfg.max_seq_len, size), device=self.device, dtype=self.cache_dtype,
                        pad=torch.tensor(pads) if any(pads) else None, static=self.compile)
        generators = None
        if params.seed is not None and params.temperature > 0:
            generators = [torch.Generator(self.device).manual_seed(params.seed + i) for i in range(len(prompts))]
        rows = list(range(len(prompts)))
        logits = self.model(ids, kv_cache=cache)[:, -1]  # (B, V); prefill runs eagerly: its length varies
        filled = P  # cache.pos, counted here so that a step reads nothing back from the cache
        while True:
            tokens = sample(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                            generators=generators)  # (A,)
            for row, token in zip(rows, tokens.tolist()):
                if not seqs[row].done:
                    seqs[row].push(token)
            yield
            keep = [i for i, row in enumerate(rows) if not seqs[row].done]
            if not keep:
                return
            if len(keep) < len(rows) and (not self.compile or filled == cache.max_len):
                index = torch.tensor(keep, device=self.device)
                cache.select(index)
                tokens = tokens[index]
                rows = [rows[i] for i in keep]
                if generators is not None:
                    generators = [generators[i] for i in keep]
            if filled == cache.max_len:
                cache.drop_common_padding()
                filled = cache.pos
            logits = self._decode(self.model, tokens, cache)
            filled += 1


__all__ = ["Completion", "Engine", "SamplingParams"]
