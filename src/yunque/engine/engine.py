"""Generation: prefill + decode with the KV cache, batching, stop conditions. Token ids in, token ids (or text) out.

One decode loop (`Engine._steps`) serves every entry point: `generate` and `generate_text` run it to the end,
`stream` yields the text it releases step by step, so streamed and non-streamed output are the same by
construction. Per-sequence stop logic and text lives in `_Sequence`; the loop only runs the model and samples.
"""

from __future__ import annotations

import codecs
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from yunque.engine.sampling import check_sampling, sample
from yunque.model.gpt import GPT
from yunque.model.kv_cache import KVCache
from yunque.tokenizer.bpe import END_OF_TURN, Tokenizer


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: length, randomness and stop conditions of one request."""

    max_new_tokens: int = 128
    """Most tokens to generate per prompt; fewer if the prompt plus these would not fit in the model's context."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (argmax)."""
    top_k: int | None = None
    """Sample only among the k most likely tokens; None for no limit."""
    top_p: float | None = None
    """Nucleus sampling: only among the fewest most likely tokens whose probability reaches top_p; None for all."""
    seed: int | None = None
    """Seed for reproducible sampling: row i of a batch draws from its own generator seeded with seed + i, so it
    gives the same tokens as prompt i generated alone with seed + i. None uses torch's global generator."""
    stop: tuple[str, ...] = ()
    """Stop strings: a sequence ends just before the first occurrence of any of them, which is not returned."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_sampling(self.temperature, self.top_k, self.top_p)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, e.g. stop=('\\n\\n',); got {self.stop!r}")


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

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, device: str | torch.device = "cpu") -> None:
        """Moves `model` to `device` and puts it in eval mode."""
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        ends = {tokenizer.eos_id, tokenizer.special_ids.get(END_OF_TURN)}
        self.stop_ids: set[int] = {i for i in ends if i is not None}
        """Token ids that end a sequence (end of text, end of a chat turn); never returned."""

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
    def _steps(self, prompts: list[list[int]], params: SamplingParams,
               seqs: list[_Sequence]) -> Iterator[tuple[list[int], torch.Tensor]]:
        """The decode loop: one prefill forward for the left-padded batch, then one token per step.

        Each sampled token is pushed into its row's sequence, then (rows, tokens (A,)) is yielded for the A rows
        still running. Rows whose sequence is done are dropped from the batch and the cache.
        """
        if not prompts:
            return
        cfg = self.model.cfg
        P = max(len(p) for p in prompts)
        pads = [P - len(p) for p in prompts]
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        ids = torch.tensor([[pad_id] * n + p for n, p in zip(pads, prompts)], device=self.device)  # (B, P)
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(cfg, len(prompts), min(cfg.max_seq_len, P + max(s.budget for s in seqs) - 1),
                        device=self.device, dtype=dtype, pad=torch.tensor(pads) if any(pads) else None)
        generators = None
        if params.seed is not None and params.temperature > 0:
            generators = [torch.Generator(self.device).manual_seed(params.seed + i) for i in range(len(prompts))]
        rows = list(range(len(prompts)))
        logits = self.model(ids, kv_cache=cache)[:, -1]  # (B, V)
        while True:
            tokens = sample(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                            generators=generators)  # (A,)
            for row, token in zip(rows, tokens.tolist()):
                seqs[row].push(token)
            yield rows, tokens
            keep = [i for i, row in enumerate(rows) if not seqs[row].done]
            if not keep:
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=self.device)
                cache.select(index)
                tokens = tokens[index]
                rows = [rows[i] for i in keep]
                if generators is not None:
                    generators = [generators[i] for i in keep]
            if cache.pos == cache.max_len:
                cache.drop_common_padding()
            logits = self.model(tokens.unsqueeze(1), kv_cache=cache)[:, -1]


__all__ = ["Engine", "SamplingParams", "Completion"]
