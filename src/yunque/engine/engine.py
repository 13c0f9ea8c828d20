"""Generation: prefill + decode with the KV cache, batching, stop conditions. Token ids in, token ids (or text) out.

One decode loop (`Engine._steps`) serves every entry point: `generate` and `generate_text` run it to the end,
`stream` yields the text it releases step by step, so streamed and non-streamed output are the same by
construction. Per-sequence stop logic and text lives in `_Sequence`; the loop only runs the model and samples.

Fast paths, each with a twin test in tests/engine/test_fast_decode.py and figures in benchmarks/decode.py: the
engine decodes with its own copy of the model (`decode_model`), in bf16 where the CPU multiplies it natively, with
weights packed once for oneDNN (`PackedLinear`) and the KV cache in fp32 on CPU; optionally (`compile=True`) one
compiled graph per batch size runs each decode step over a static-shape cache.
"""

from __future__ import annotations

import codecs
import copy
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from yunque.config import SamplingParams
from yunque.engine.sampling import sample
from yunque.model.gpt import GPT
from yunque.model.kv_cache import KVCache
from yunque.precision import DTYPES, bf16_supported, resolve_precision
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


SMALL_MODEL = 4_000_000
"""Parameters below which the fp32 weights (16 MB) stay in a CPU's caches, and a decode step is bound by the cost
of each op rather than by memory: there the engine's "auto" precision is fp32 (bf16 would only add casts) with
plain F.linear (a packed oneDNN product costs ~10 us a call more than MKL's on a small matrix already in cache).
On the 1.4M `mini` preset this decodes one prompt ~1.25x faster than bf16 + packed, within ~6% of the
plain reference loop; a batch of 8 runs ~15% slower than in bf16 (benchmarks/decode.py). One prompt is the common
case: a chat, `yunque generate`."""


class Engine:
    """Generates text from a model and its tokenizer: batches of prompts, sampling, stop strings, streaming."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, device: str | torch.device = "cpu",
                 precision: str = "auto", compile: bool = False) -> None:
        """Decode with a copy of `model` on `device` (see `decode_model`); `model` itself is left as it is.

        precision: "bf16", "fp32", or "auto": bf16 where the device multiplies it natively, fp32 elsewhere and
        for models under SMALL_MODEL parameters on CPU.
        compile: torch.compile the one-token decode step over a static-shape KV cache. It takes seconds per batch
        size and cache length (see `cache_bucket`), so it pays off only for long outputs or a long-lived engine.
        """
        self.device = torch.device(device)
        small = self.device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL
        self.dtype = DTYPES["fp32" if precision == "auto" and small else resolve_precision(precision, self.device)]
        self.model = decode_model(model, self.dtype, self.device, pack=not (small and self.dtype == torch.float32))
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


def cache_bucket(n: int) -> int:
    """The static cache length for n positions: the least of 256, 384, 512, 768, 1024, 1536, ... (powers of two
    and 1.5 times them) that holds n. Each length is a graph to compile, and every decode step attends over all
    of it: two lengths an octave waste at most a third of the cache, against half with powers of two alone (on
    the 35M Llama, prompt 128 + 256 new, 384 slots decode 5-10% faster than 512)."""
    size = 256
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size // 3 * 4
    return size


def decode_step(model: GPT, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Next-token logits (B, V) after feeding tokens (B,), the ones just sampled, at the cache's position."""
    return model(tokens.unsqueeze(1), kv_cache=cache)[:, -1]


def compiled_decode_step():
    """`decode_step` compiled by inductor with frozen weights and a C++ wrapper.

    Freezing makes the weights (`PackedLinear`'s oneDNN layouts included) constants of the graph, and inductor
    fuses the pointwise work between the matrix products; the C++ wrapper runs the graph without Python in
    between. The engine's model is its own and never changes, which is what freezing requires. (Left to itself,
    inductor packs fp32 weights for MKL, whose one-row products run ~1.5x slower than oneDNN's here.)

    Once a (model, batch size, cache length) has been compiled, its later steps skip the guards that could not
    tell that graph from the others compiled so far (`skip_guard_eval_unsafe`): checking every guard costs ~0.1 ms
    a step, 5-10% of a small model's decode step. What varies between such steps (token ids, cache contents and
    fill level) lives in contiguous tensors of fixed shape and dtype, which is all the graph assumes of them; an
    input that would still need a new graph is compiled with every guard checked.
    """
    import torch._dynamo.config  # imported here: torch.compile's machinery takes a second to import
    import torch._inductor.config

    step = torch.compile(decode_step, dynamic=False, fullgraph=True)
    compiled: set[tuple[int, int, int]] = set()
    # Made once and entered at every step: making a stance costs ~50 us, entering a made one ~3 us. Making it also
    # sets it at once, so its exit puts the stance in force back.
    unguarded = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    unguarded.__exit__(None, None, None)

    def frozen_step(model: GPT, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        tokens = tokens.contiguous()
        key = (id(model), tokens.shape[0], cache.max_len)
        if key in compiled:
            try:
                with unguarded:
                    return step(model, tokens, cache)
            except RuntimeError as e:  # raised before the graph runs, so nothing has changed yet
                if "skip_guard_eval_unsafe" not in str(e):
                    raise
        # read when a (re)compile happens; a long-lived engine meets more than dynamo's default of 8 graphs
        with torch._inductor.config.patch(freezing=True, cpp_wrapper=True), torch._dynamo.config.patch(
                recompile_limit=64):
            logits = step(model, tokens, cache)
        compiled.add(key)
        return logits

    return frozen_step


def decode_model(model: nn.Module, dtype: torch.dtype, device: torch.device, *, pack: bool = True) -> nn.Module:
    """The engine's copy of `model`, in eval mode on `device`: floating-point parameters in `dtype`, and with
    `pack` on CPUs with oneDNN, every plain nn.Linear replaced by a `PackedLinear`.

    `model` is left as it is; parameters already in `dtype` on `device` are shared with it, not copied. Buffers
    keep their dtype (rotary frequencies stay fp32), and tied parameters stay tied.
    """
    memo = {id(p): nn.Parameter(p.detach().to(device, dtype if p.is_floating_point() else p.dtype),
                                requires_grad=False) for p in model.parameters()}
    model = copy.deepcopy(model, memo).to(device).eval()
    if pack and PackedLinear.supported(device, dtype):
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child) is nn.Linear:  # not subclasses such as LoRA layers, whose forward adds more
                    setattr(parent, name, PackedLinear(child))
    return model


class PackedLinear(nn.Module):
    """nn.Linear whose weight is laid out once in oneDNN's blocked format instead of on every call.

    On CPU this makes decode's small-batch matrix products up to 4x faster than F.linear (the output head gains
    most) and prefill's 1.1-2.4x (torch 2.13, AVX-512). Results equal F.linear's up to summation order.
    """

    BATCH_HINT = 8
    """Rows the layout is tuned for; any number of rows works (1 to 1024 are within 10% of their own best)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        bias = linear.bias.detach() if linear.bias is not None else None
        extra = -self.out_features % 64  # whole 64-row tiles: a 50257-row bf16 output head runs ~15% faster
        if extra:
            weight = torch.cat([weight, weight.new_zeros(extra, self.in_features)])
            bias = torch.cat([bias, bias.new_zeros(extra)]) if bias is not None else None
        # opaque oneDNN tensor: a plain attribute, not a parameter, so that no state_dict or .to() sees it
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.BATCH_HINT)
        self.bias = bias
        self.padded = bool(extra)

    @staticmethod
    def supported(device: torch.device, dtype: torch.dtype) -> bool:
        if device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        return dtype == torch.float32 or (dtype == torch.bfloat16 and bf16_supported(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), in x's dtype (that of the weight)."""
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return y[..., :self.out_features] if self.padded else y


__all__ = ["Engine", "SamplingParams", "Completion"]
