"""What an evaluation asks of a model, for a yunque model in this process (`LocalLM`); `RemoteLM` (eval/remote.py)
asks the same of an OpenAI-compatible server.

A context is text, or chat messages with `--chat` (rendered by the model's ChatFormat). Log-likelihoods come from
eval/scoring.py on the engine's CPU copy of the model (oneDNN-packed weights): in fp32 they are the ones lm-eval's
HF backend computes in fp32 (to 1e-4), in bf16 (where the CPU multiplies it natively) they come about twice as fast
and a little less exact. Generation is greedy, through the engine, in fp32.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from yunque.config import SamplingParams
from yunque.engine.cpu import decode_model
from yunque.engine.engine import Engine
from yunque.eval.scoring import Request, encode_pair, rolling_requests, score_batched
from yunque.model.gpt import GPT
from yunque.precision import DTYPES, resolve_precision
from yunque.tokenizer.bpe import Tokenizer
from yunque.tokenizer.chat import ChatFormat

Context = str | list[dict]
"""Plain text, or chat messages to render with the model's chat format."""


class LM(Protocol):
    name: str
    fingerprint: str
    """Names the weights and tokenizer: cached results are kept under it."""

    def loglikelihood(self, pairs: Sequence[tuple[Context, str]],
                      progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]: ...

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]: ...

    def generate(self, contexts: Sequence[Context], until: Sequence[str], max_gen_toks: int) -> list[str]: ...


class LocalLM:
    """A yunque model and its tokenizer: log-likelihoods in fp32 (the numbers lm-eval's HF backend gets from the
    same weights in fp32) or bf16, greedy generation through the engine in fp32."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, name: str = "model", fmt: ChatFormat | None = None,
                 batch_size: int = 16, fingerprint: str | None = None, max_length: int | None = None,
                 precision: str = "fp32") -> None:
        """`model` itself is left as it is: scoring runs on a copy in `precision` ("fp32", "bf16", or "auto": bf16
        where the device multiplies it natively, fp32 elsewhere), with packed weights on CPU.
        max_length: the window of rolling perplexity (lm-eval's max_length), at most the model's context."""
        self.model = model
        device = next(model.parameters()).device
        self.precision = resolve_precision(precision, device)
        self.scorer = decode_model(model, DTYPES[self.precision], device)
        self.max_length = min(max_length or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.tokenizer, self.name, self.batch_size = tokenizer, name, batch_size
        self.fmt = fmt or ChatFormat.for_tokenizer(tokenizer)
        # the chat format (its template can change with the tokenizer unchanged), the rolling window and the
        # precision change scores: they are part of what the cache keys on
        fmt_key = hashlib.sha256(f"{self.fmt.kind} {self.fmt.template}".encode()).hexdigest()[:8]
        self.fingerprint = (f"{fingerprint or weights_fingerprint(model, tokenizer)}-{fmt_key}-w{self.max_length}"
                            f"-{self.precision}")
        self._engine: Engine | None = None

    def requests(self, pairs: Sequence[tuple[Context, str]]) -> list[Request]:
        """Ids of each (context, continuation): lm-eval's split for text, the chat prompt then the continuation
        (without a start token) for messages."""
        out = []
        for ctx, cont in pairs:
            if isinstance(ctx, str):
                out.append(encode_pair(self.tokenizer, ctx, cont))
            else:
                out.append((self.fmt.prompt(ctx), self.tokenizer.encode(cont)))
        return out

    def loglikelihood(self, pairs, progress=None):
        return score_batched(self.scorer, self.requests(pairs), batch_size=self.batch_size, progress=progress)

    def loglikelihood_rolling(self, texts):
        """Summed log-likelihood of each whole text over lm-eval's rolling windows (each token predicted once,
        the first after the start token, or end-of-text where there is none)."""
        tok = self.tokenizer
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        if prefix is None:
            raise ValueError("rolling perplexity conditions the first token on a start or end-of-text token, and "
                             "this tokenizer has neither")
        windows, owner = [], []
        for i, text in enumerate(texts):
            # transformers adds the start token where the tokenizer's post-processor does; lm-eval keeps it
            ids = tok.encode(text, bos=tok.bos_id is not None)
            for w in rolling_requests(ids, prefix, self.max_length):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, score_batched(self.scorer, windows, batch_size=self.batch_size)):
            totals[i] += ll
        return totals

    def generate(self, contexts, until, max_gen_toks):
        """Greedy continuations, cut at the first of `until` (and at the end-of-text or end-of-turn token), in
        batches sorted by length; a context too long for the window keeps its end, as lm-eval does."""
        engine = self.engine
        room = self.model.cfg.max_seq_len - max_gen_toks
        if room < 1:
            raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the model's "
                             f"{self.model.cfg.max_seq_len}-token context; lower max_gen_toks in the task")
        bos = self.tokenizer.bos_id is not None
        prompts = [(self.tokenizer.encode(c, bos=bos) if isinstance(c, str) else self.fmt.prompt(c))[-room:]
                   for c in contexts]
        stop = tuple(dict.fromkeys([*until, *self.fmt.stop]))
        params = SamplingParams(max_new_tokens=max_gen_toks, temperature=0, stop=stop)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            batch = engine.new_batch()
            rows = engine.add_many(batch, [prompts[i] for i in chunk], params)
            while engine.step(batch):
                engine.remove(batch, *(r for r in batch.rows if r.done))
            for i, row in zip(chunk, rows):
                out[i] = row.text
        return out

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, precision="fp32",
                                  device=next(self.model.parameters()).device)
            self._engine.stop_ids |= self.fmt.stop_ids
        return self._engine


def weights_fingerprint(model: torch.nn.Module, tokenizer: Tokenizer) -> str:
    """sha256 of the model's config, weights and tokenizer: equal for the same model however it was loaded."""
    h = hashlib.sha256(repr(getattr(model, "cfg", "")).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    h.update(tokenizer.fingerprint().encode())
    return h.hexdigest()[:16]


__all__ = ["LM", "LocalLM", "Context", "weights_fingerprint"]
