"""The engine's fast path on CPUs: its own copy of the model with packed weights, and the compiled decode step.

What is here chooses itself from what the CPU does (bf16 matrix products, oneDNN) and from the model's size; the
batching and stop logic above it (engine.py) is the same on every device. Each piece has a twin test against the
simple path in tests/engine/test_cpu.py, and figures in benchmarks/decode.py.
"""

from __future__ import annotations

import copy
import sys
import types
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from yunque.engine.native import kernels, native_kernels
from yunque.model.gpt import GPT, MLP, Attention
from yunque.model.kv_cache import KVCache
from yunque.model.lora import LoRAOver
from yunque.model.quant import QuantLinear
from yunque.precision import DTYPES, bf16_supported, resolve_precision

SMALL_MODEL = 4_000_000
"""Parameters below which the fp32 weights (16 MB) stay in a CPU's caches, and a decode step is bound by the cost
of each op rather than by memory: there the engine's "auto" precision is fp32 (bf16 would only add casts) with
plain F.linear (a packed oneDNN product costs ~10 us a call more than MKL's on a small matrix already in cache).
On the 1.4M `mini` preset this decodes one prompt ~1.25x faster than bf16 + packed, within ~6% of the
plain reference loop; a batch of 8 runs ~15% slower than in bf16 (benchmarks/decode.py). One prompt is the common
case: a chat, `yunque generate`."""

DecodeStep = Callable[[nn.Module, torch.Tensor, KVCache], torch.Tensor]


def decode_precision(model: nn.Module, precision: str, device: torch.device) -> tuple[torch.dtype, bool]:
    """(dtype, pack) the engine decodes `model` with on `device`: see `SMALL_MODEL` and `quantized` for what
    "auto" picks.

    precision: "bf16", "fp32", or "auto" (bf16 where the device multiplies it natively, fp32 elsewhere, for models
    under SMALL_MODEL parameters on CPU, which then also keep plain F.linear: pack is False, and for quantized
    models on CPU).
    """
    small = device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL
    fp32 = precision == "auto" and device.type == "cpu" and (small or quantized(model))
    dtype = DTYPES["fp32" if fp32 else resolve_precision(precision, device)]
    return dtype, not (small and dtype == torch.float32)


def quantized(model: nn.Module) -> bool:
    """Whether `model` has quantized layers (int8 or int4). Such a model decodes in fp32 on CPU when asked for
    "auto": the one-row kernels round x to integers themselves, from fp32 as well as from bf16, so bf16 activations
    only add casts at every layer and round the rest of the step (norms, attention, the residual stream) coarser.
    SmolLM2-135M compiled, 128 tokens, alternated in one process (Zen 4, 2 threads), fp32 against bf16: int8
    122.3 against 113.5 tokens/s (8 rounds); int4 with the engine's int4 kernel 166.6 against 153.8 and 160.8
    against 156.0 (two runs of 4 rounds); the same greedy tokens."""
    return any(isinstance(m, QuantLinear) for m in model.modules())


def decode_model(model: nn.Module, dtype: torch.dtype, device: torch.device, *, pack: bool = True,
                 native_bf16: bool | None = None, native: bool = True) -> nn.Module:
    """The engine's own copy of `model`, in eval mode on `device`: floating-point parameters in `dtype`, every
    quantized layer (QuantLinear) replaced by the kernel `quant_kernel` picks for the CPU, with `pack` on CPUs
    with oneDNN, every plain nn.Linear replaced by a `PackedLinear`, and with `native` on CPUs where the engine's
    C++ kernels build, attention by `DecodeAttention` (see there).

    native_bf16: whether the CPU multiplies bf16 natively, which decides the quantized kernels; None asks
    `bf16_supported(device)` (tests force either answer to run both choices on one machine).

    `model` is left as it is, and no parameter is shared with it (even one already in `dtype` on `device`): the
    engine keeps decoding with the weights it was given while `model` trains on (see `Engine.load_weights`).
    Buffers keep their dtype (rotary frequencies stay fp32), and tied parameters stay tied.
    """
    memo = {id(p): nn.Parameter(p.detach().to(device, dtype if p.is_floating_point() else p.dtype, copy=True),
                                requires_grad=False) for p in model.parameters()}
    model = copy.deepcopy(model, memo).to(device).eval()
    if native_bf16 is None:
        native_bf16 = bf16_supported(device)
    native = native and device.type == "cpu" and native_kernels() is not None
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, QuantLinear):
                setattr(parent, name, quantized_layer(child, dtype, device, native_bf16=native_bf16,
                                                      native=native))
    if pack and PackedLinear.supported(device, dtype):
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if type(child) is nn.Linear:  # not subclasses such as LoRA layers, whose forward adds more
                    setattr(parent, name, PackedLinear(child, native=native))
    if native and model.cfg.dim_head in DecodeAttention.HEAD_SIZES:
        for module in model.modules():
            if type(module) is Attention:
                module.__class__ = DecodeAttention  # same parameters and forward; only `attend` differs
    if native:
        for module in model.modules():
            if type(module) is MLP and not module.swiglu:
                module.__class__ = DecodeMLP  # same parameters; the activation by the kernel
            elif type(module) is nn.LayerNorm and module.elementwise_affine and len(module.normalized_shape) == 1:
                module.__class__ = DecodeLayerNorm
    return model


class DecodeMLP(MLP):
    """A GELU block (the GPT-2 family's) whose activation, GELU's tanh form, runs the engine's C++ kernel
    (kernels.cpp, `gelu_tanh`: one pass, float32 inside); everything else is MLP's. Same values as
    F.gelu(x, approximate="tanh") up to rounding (one bf16 rounding in bf16). ATen's tanh form runs ~3x slower than
    its erf form. Zen 4, 2 threads, best of 5, microseconds, ATen's tanh form / the kernel / ATen's erf form:
    320 x 1,536 values (a prefill of 5 prompts of 64 tokens in the GPT-2 30M shape) 489 / 184 / 149 in bf16,
    484 / 196 / 140 in fp32; 16 x 1,536 (a 16-row step) 29 / 14 / 18. That prefill, the two alternated in one
    process (6 rounds, medians, two runs): 1.05x and 1.10x faster; a 16-row step did not move beyond the spread.
    Its exp inline (exp_nonpositive, as sampling's) rather than glibc's vector expf, alternated with the call 3
    times, best of 5, bf16: 320 x 1,536 129-136 (one round 232) against 164-211 us, 1,056 x 1,536 (a prefill of 16
    prompts) 423-434 against 544-693, 16 x 1,536 8.1-9.9 against 9.8-12.2.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(kernels().gelu_tanh(self.up(x)))


class DecodeLayerNorm(nn.LayerNorm):
    """A layer norm (the GPT-2 family's) by the engine's C++ kernel (kernels.cpp, `layer_norm`), whose loops run
    on the kernels' own threads like the others'. ATen's runs every call of more than one row as an OpenMP
    parallel region, 13 a decode step of a 6-block model, and after each OpenMP's team spins on the second core
    where the kernels' helper wants to run: 16-row steps of the 30M GPT-2 shape took 11.6 ms with them against
    7.4 ms on OpenMP's threads alone (Zen 4, 2 threads). Same values as F.layer_norm up to rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels().layer_norm(x, self.weight, self.bias, self.eps)


class DecodeAttention(Attention):
    """Attention whose one-token decode step over a KV cache runs the engine's C++ kernel (kernels.cpp,
    `decode_attention`, an operator a compiled step calls from its graph); everything else is Attention's. Same
    results as SDPA up to summation order.

    `python benchmarks/decode_attention.py` (torch 2.13, Zen 5, 2 threads): one layer of 6 heads of 64 over an
    fp32 cache not in the CPU's caches, 16 rows x 128 positions, SDPA 479 us, the kernel 173 us (2.8x), over a
    bf16 cache 144 us; whole decode steps of the 30M GPT-2 shape 1.2x faster at 1 and at 16 rows. Where the
    kernel decodes, the engine keeps a bf16 model's cache in bf16 (Engine.cache_dtype).

    Over a static cache (the compiled step's) the kernel reads the filled keys only, where SDPA reads every slot
    behind a mask; and compiled, SDPA with grouped-query heads became MKL matrix-vector products over keys and
    values repeated per query head (13% of SmolLM2-135M's int8 decode on a Zen 4, in `perf`).

    Prompts over a dynamic cache (prefill) run the kernels' `prompt_attention` where `prompt_kernel` says it is the
    faster (up to 1,024 keys, most of them the prompt's own): SDPA's flash kernel, built for long queries, spent
    ~100 us on one row of 6 heads of 66 positions. 6 heads of 64, bf16, 2 threads, Zen 4
    (`python benchmarks/decode_attention.py`, one layer): 8 prompts of 66 tokens 384 us against SDPA's 944 us, one
    prompt 59 against 127 us, 16 prompts 697 against 1,527 us, 4 prompts of 256 2,059 against 3,115 us.
    """

    HEAD_SIZES = (16, 32, 48, 64, 80, 96, 128)
    """Head sizes the kernel is compiled for (a template each); other models keep SDPA."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        B, H, T, D = q.shape
        if kv_cache is None or (T != 1 and not prompt_kernel(kv_cache, T)):
            return super().attend(q, k, v, mask, kv_cache, layer)  # training, a compiled step's cache, other masks
        k, v = kv_cache.update(layer, k, v)  # (B, K, S, D)
        if T != 1:  # a prompt (or a chunk of one) over the keys before it and its own
            return kernels().prompt_attention(q, k, v, kv_cache.pad, D ** -0.5)
        # a one-token step sees each row's keys from its first real one (pad) to the one just written
        filled = kv_cache.filled_after(1) if kv_cache.static else None
        y = kernels().decode_attention(q.reshape(B, H, D), k, v, kv_cache.pad, filled, D ** -0.5)
        return y.view(B, H, 1, D)


def prompt_kernel(kv_cache: KVCache, T: int) -> bool:
    """Whether T queries (a prompt, or a chunk of one) over `kv_cache` run the kernels' `prompt_attention` rather than
    SDPA: a dynamic cache with the causal mask, and keys few, or most of them the queries' own. Over long histories
    SDPA's blocked products win (one layer, 6 heads of 64, bf16, 2 threads, Zen 4, ms: 512 queries after 512 keys
    6.1 against the kernel's 12.2, 2,048 over 2,048 73 against 88; 1,024 over 1,024 15.4 against 12.4, 300 after
    300 2.2 against 1.7, 64 after 64 0.13 against 0.11)."""
    if kv_cache.static or not kv_cache.causal:
        return False
    S = kv_cache.pos + T  # the keys they see, their own included
    return S <= 128 or (S <= 1024 and 4 * T >= 3 * S)


NATIVE_ROWS = 1
"""Rows of x up to which a float or int8 layer runs the engine's C++ product (torch.ops.yunque.rows_linear) rather
than oneDNN's or ATen's: one, a decode step of one sequence (benchmarks/quant_kernels.py: at 4 rows theirs are as
fast or faster)."""

PAIR_ROWS = 32
"""Rows of x up to which a bf16 layer on a CPU with AVX-512 BF16 runs the engine's bf16 dot-product kernel
(torch.ops.yunque.pairs_linear) rather than oneDNN's product: a decode step of up to 32 sequences. At 32 rows
the two are even on an output head, and the kernel still 1.1-1.2x faster on a block's layers (see PackedLinear).
A block's layers keep the kernel further, up to PROMPT_PAIR_ROWS."""

PROMPT_PAIR_ROWS = 256
"""Rows of x up to which a block's bf16 layer (at most BLOCK_WIDENING times as many outputs as inputs: an output
head has tens of times more) runs pairs_linear: prompts of a few hundred tokens. Zen 4, 2 threads, best of 7,
against oneDNN's product on its blocked weight: the 30M GPT-2 shape's layers at 66 rows 1.06-1.20x faster, at 264
1.00-1.04x, at 1,056 0.97-1.00x; SmolLM2's shapes 1.02-1.17x at 66, 1.01-1.08x at 264; the 50,257-output head
0.98x at 66. Whole prefills of the 30M shape (64-token prompts, medians of 8 alternated rounds): one prompt 1.21x
faster at 128 and 1.24x at 256 than at 32, two 1.19x / 1.12x, three 1.04x / 1.09x, four 0.98x / 1.06x, eight
1.00x / 1.02x; all 16 of a batch 0.91x with no limit, so oneDNN keeps longer prompts."""

BLOCK_WIDENING = 8
"""A layer with at most this many times as many outputs as inputs is a block's (SwiGLU and GELU blocks widen 2.7-5.4
times); more is an output head (vocabularies of 32k-150k over widths up to 8,192: 18x and more)."""


class PackedLinear(nn.Module):
    """nn.Linear whose weight is laid out once in oneDNN's blocked format instead of on every call.

    On CPU this makes decode's small-batch matrix products up to 4x faster than F.linear (the output head gains
    most) and prefill's 1.1-2.4x (torch 2.13, AVX-512). Results equal F.linear's up to summation order.

    With `native`, one row of x (a decode step of one sequence) is multiplied by the engine's C++ kernel
    (`torch.ops.yunque.rows_linear`) on the weight as it is, which the layer then keeps too. `python
    benchmarks/quant_kernels.py --threads 2` (Zen 4, 2 threads), SmolLM2's layers at one row, microseconds:

    | layer | fp32 oneDNN | fp32 C++ | bf16 oneDNN | bf16 C++ |
    |---|---|---|---|---|
    | qkv (576 -> 960) | 58 | 32 | 51 | 36 |
    | up (576 -> 3072) | 106 | 64 | 69 | 85 |
    | head (576 -> 49152) | 6,663 | 5,752 | 3,112 | 1,826 |

    Cache-hot layers vary; whole eager decodes of SmolLM2 (alternated runs, medians of 5) went 1.44x faster in
    bf16 with these products alone, 1.42x in fp32 with the engine's C++ kernels against none.

    A bf16 layer on a CPU with AVX-512 BF16 keeps, instead of the plain weight, one laid out for the engine's
    bf16 dot-product kernel (`torch.ops.yunque.pairs_linear`), which takes up to PAIR_ROWS rows (a decode step of
    a batch; a block's layers up to PROMPT_PAIR_ROWS, short prompts) and adds the bias itself. Against oneDNN's
    bf16 product, same run of `python benchmarks/quant_kernels.py --threads 2` (Zen 4), microseconds:

    | layer | 1 row | 4 | 16 | 32 |
    |---|---|---|---|---|
    | qkv (576 -> 960) | 27 / 13 | 33 / 17 | 62 / 47 | 105 / 88 |
    | up (576 -> 3072) | 50 / 36 | 67 / 42 | 162 / 140 | 305 / 273 |
    | head (576 -> 49152) | 1,743 / 1,333 | 1,656 / 1,281 | 2,931 / 2,649 | 5,079 / 5,140 |

    Whole decode steps of the 30M GPT-2 shape (benchmarks/serve.py's model), the two alternated in one process, 6
    rounds, medians: 1.09x faster at 1 row, 1.30x at 4, 1.33x at 8, 1.17x at 16, 1.12x at 32.
    The price is memory: a block's float weights are held twice (a tied head's plain weight is the embedding's,
    its pairs are not).
    """

    BATCH_HINT = 8
    """Rows the layout is tuned for; any number of rows works (1 to 1024 are within 10% of their own best)."""

    def __init__(self, linear: nn.Linear, *, native: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        bias = linear.bias.detach() if linear.bias is not None else None
        pairs = (native and weight.dtype == torch.bfloat16 and self.in_features % 2 == 0
                 and native_kernels().has_pairs())
        self.pairs = torch.ops.yunque.pack_pairs(weight) if pairs else None
        self.bias32 = bias.float() if pairs and bias is not None else None
        # a plain attribute too: the tied head's is the embedding's parameter, which state_dict holds already
        self.plain = weight.contiguous() if native and not pairs else None
        if pairs:  # a block's layer (few outputs an input) up to prompt sizes, the output head up to decode batches
            block = self.out_features <= BLOCK_WIDENING * self.in_features
            self.own_rows = PROMPT_PAIR_ROWS if block else PAIR_ROWS
        else:
            self.own_rows = NATIVE_ROWS if native else 0
        """Rows up to which the layer runs the engine's own kernels (see `helper_rows`)."""
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
        if self.pairs is not None and x.numel() <= self.own_rows * self.in_features:
            return kernels().pairs_linear(x, self.pairs, self.bias32, self.out_features)
        if self.plain is not None and x.numel() <= self.own_rows * self.in_features:
            y = kernels().rows_linear(x, self.plain, None).to(x.dtype)
            return y + self.bias[:self.out_features] if self.bias is not None else y
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return y[..., :self.out_features] if self.padded else y


QUANT_KERNELS = ("int8pack", "int4pack", "int4native", "dequant")
"""How the engine computes a quantized layer: ATen's weight-only kernels (`Int8PackedLinear`, `Int4PackedLinear`),
the engine's own int4 kernels alone (`Int4PackedLinear` without ATen's copy), or the weight dequantized once to an
ordinary (packed) linear layer in the decode dtype."""


def quant_kernel(bits: int, in_features: int, out_features: int, group_size: int, *, native_bf16: bool,
                 device: torch.device, native: bool = False) -> str:
    """The kernel (one of QUANT_KERNELS) for a quantized layer on `device`, chosen from what was measured of
    SmolLM2-135M's layers at one row (torch 2.13, one thread, a Zen 5 under a load average of ~3; "AVX2" is the same
    machine with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, which also turns `bf16_supported` off); to be
    confirmed on an idle machine with benchmarks/quant_kernels.py, which prints the choice beside the times:

    - ATen's weight-only kernels are fast only with bf16 activations (their fp32-activation variant ran 3-12x
      slower than fp32 F.linear), and they widen bf16 to fp32 in registers, so they need no native bf16 products:
      int8 ran ~0.5x the time of fp32 F.linear with AVX-512 BF16, ~0.6-0.9x with AVX2 kernels. So int8 always
      takes `_weight_int8pack_mm`, its activations rounded to bf16 (the products stay exact and sum in fp32),
      except one row (the engine's C++ kernel) and, with native bf16, DEQUANT_ROWS rows and more.
    - int4's `_weight_int4pack_mm_for_cpu` ran ~0.5x fp32's time with AVX-512 BF16 but 1.4-1.7x with AVX2 kernels
      on the blocks' layers (0.5x on a 49152-row head, which a tied model keeps in floating point anyway):
      without native bf16 an int4 layer takes the engine's own int4 kernels alone ("int4native", with `native`
      and where they fit: `int4_rows_fit`): up to 31 rows in 8-bit integer products, more by the weight widened
      to fp32 for the call; else it is dequantized once to the decode dtype (the speed of fp32, the accuracy of int4,
      the memory of fp32). SmolLM2-135M int4, eager, 2 threads, on the Zen 4 made an AVX2 CPU
      (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, the engine's kernels built with -mno-avx512f): 128-token
      prompt then 64 tokens, 74.8 tokens/s against 37.8 dequantized (the tokens after the first 98.5 against
      41.6; the prompt 216 against 182 ms), the same 64 greedy tokens. ATen's also needs N % 16 == 0 and a
      group of 32, 64, 128 or 256.
    - Off the CPU (CUDA), layers are dequantized once to the decode dtype.
    """
    if device.type != "cpu":
        return "dequant"
    if bits == 8:
        return "int8pack"
    fits = out_features % 16 == 0 and group_size in (32, 64, 128, 256)
    if native_bf16 and fits:
        return "int4pack"
    return "int4native" if native and int4_rows_fit(in_features, group_size) else "dequant"


def quantized_layer(layer: QuantLinear, dtype: torch.dtype, device: torch.device, *,
                    native_bf16: bool, native: bool = False) -> nn.Module:
    """The engine's module for a QuantLinear (see `quant_kernel`): the same function of x, computed fast.
    native: int8 and int4 layers compute one-row products (and int4 some more) with the engine's C++ kernels."""
    kernel = quant_kernel(layer.bits, layer.in_features, layer.out_features, layer.group_size,
                          native_bf16=native_bf16, device=device, native=native)
    if kernel == "int8pack":
        return Int8PackedLinear(layer, native=native, native_bf16=native_bf16)
    if kernel in ("int4pack", "int4native"):
        return Int4PackedLinear(layer, native=native, native_bf16=native_bf16, aten=kernel == "int4pack")
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(layer.dequantize().to(device, dtype), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(device, dtype), requires_grad=False)
    return linear  # packed by decode_model like any other nn.Linear


DEQUANT_ROWS = 32
"""Rows of x from which an int8 layer, on a CPU with native bf16 products, widens its weight to bf16 for the call
and multiplies with oneDNN instead of `_weight_int8pack_mm`: a prompt's prefill. SmolLM2's up layer (576 -> 3072),
Zen 4, 2 threads: 16 rows 406 vs 359 us, 32 rows 798 vs 479, 128 rows 5.8 vs 1.9 ms (its 30 layers' four products
at 128 rows: 342 vs 119 ms); at 8 rows and fewer ATen's is faster."""


class Int8PackedLinear(nn.Module):
    """An int8 QuantLinear computed by ATen's `_weight_int8pack_mm`: x rounded to bf16, int8 weights widened in
    registers, fp32 sums, the per-row scales applied in fp32 after. With `native`, up to NATIVE_ROWS rows of x
    go through the engine's C++ kernel instead (x rounded to 16-bit integers, integer sums). With `native_bf16`,
    from DEQUANT_ROWS rows on, the weight is widened to bf16 (exactly) for the call and multiplied by oneDNN: x in
    bf16 again, fp32 sums."""

    def __init__(self, layer: QuantLinear, *, native: bool = False, native_bf16: bool = False) -> None:
        super().__init__()
        self.native, self.native_bf16 = native, native_bf16
        self.own_rows = NATIVE_ROWS if native else 0
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("qweight", layer.qweight.contiguous())
        self.register_buffer("scales", layer.scales.float())
        self.register_buffer("ones", torch.ones(self.out_features, dtype=torch.bfloat16, device=layer.qweight.device))
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), in x's dtype."""
        rows = x.numel() // self.in_features
        x2 = x.reshape(-1, self.in_features)
        if self.native and rows <= NATIVE_ROWS:
            y = kernels().rows_linear(x2, self.qweight, self.scales).to(x.dtype)
        else:
            # not in a compiled graph: freezing would fold the widened weight into a bf16 constant kept for good
            if self.native_bf16 and rows >= DEQUANT_ROWS and not torch.compiler.is_compiling():
                y = F.linear(x2.to(torch.bfloat16), self.qweight.to(torch.bfloat16))
            else:
                y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.ones)
            y = (y.float() * self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4PackedLinear(nn.Module):
    """An int4 QuantLinear computed by ATen's `_weight_int4pack_mm_for_cpu`: x in bf16, the weights in ATen's own
    packed layout, (scale, zero) pairs as (K/G, N, 2) in bf16, as the kernel takes them.

    With `native` (the engine's C++ kernels built with their vector instructions), the layer also keeps the weights
    as QuantLinear stores them (a second copy, ~1.25x the int4 bytes) for two kernels of the engine's own:
    - up to NATIVE_ROWS rows of x (a decode step of one sequence), torch.ops.yunque.rows_int4: x rounded to 8-bit
      integers per group of columns, integer sums (as llama.cpp's Q4_0 products do);
    - with `native_bf16`, from DEQUANT_ROWS rows on (a prompt), torch.ops.yunque.dense_int4: the weight widened to
      bf16 for the call and multiplied by oneDNN.
    `python benchmarks/quant_kernels.py --threads 2` (Zen 4, weights in cache, us per call, ATen's against the
    engine's): one row, qkv 48 vs 28, mlp.up 77 vs 47, mlp.down 40 vs 20, the 49152-row head 828 vs 514; 32 rows,
    qkv 231 vs 187, mlp.up 715 vs 535, mlp.down 360 vs 290 (ATen's is faster from 2 rows to ~16). SmolLM2-135M's
    128-token prefill went from ~220 to ~130 ms, its compiled decode from ~125 to ~155 tokens/s.

    Without `aten` (quant_kernel's "int4native", for CPUs without native bf16), the layer keeps no ATen copy: up to
    DEQUANT_ROWS - 1 rows take rows_int4, more the weight widened to x's dtype for the call (dense_int4). On the
    Zen 4 made an AVX2 CPU (see quant_kernel), us per call at 32 rows: rows_int4 qkv 453, mlp.up 1,017, widened to
    fp32 943, 3,274 (the widening costs more than the product until then); SmolLM2's 128-token prompt 254 ms
    with rows_int4 against 223 ms widened.
    """

    def __init__(self, layer: QuantLinear, *, native: bool = False, native_bf16: bool = False,
                 aten: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = layer.in_features, layer.out_features, layer.group_size
        self.native = native and int4_rows_fit(self.in_features, self.group_size)
        self.native_bf16 = native_bf16
        self.aten = aten or not self.native
        self.own_rows = 0 if not self.native else NATIVE_ROWS if self.aten else DEQUANT_ROWS - 1
        if self.aten:
            q = layer.int_weight().to(torch.int32)  # (N, K) in [0, 15]
            self.register_buffer("int4_weight", torch._convert_weight_to_int4pack_for_cpu(q, 1))
            sz = torch.stack([layer.scales, layer.zeros], dim=-1)  # (N, K/G, 2)
            self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous().to(torch.bfloat16))
        if self.native:
            self.register_buffer("qweight", layer.qweight.contiguous())
            self.register_buffer("scales", layer.scales.to(torch.bfloat16).contiguous())
            self.register_buffer("zeros", layer.zeros.to(torch.bfloat16).contiguous())
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features), in x's dtype."""
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if self.native and (rows <= NATIVE_ROWS or (not self.aten and rows < DEQUANT_ROWS)):
            y = kernels().rows_int4(x2, self.qweight, self.scales, self.zeros, self.group_size)
        elif self.native and rows >= DEQUANT_ROWS and (self.native_bf16 or not self.aten):
            x2 = x2.to(torch.bfloat16) if self.native_bf16 else x2
            y = kernels().dense_int4(x2, self.qweight, self.scales, self.zeros, self.group_size)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.int4_weight, self.group_size,
                                                  self.scales_and_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


ELEMENTWISE_GRAIN = 32768
"""Values of an elementwise operation from which ATen runs it on OpenMP's team (at::internal::GRAIN_SIZE)."""


def helper_rows(model: GPT) -> int:
    """Rows up to which a decode step of `model` (the engine's copy) runs the engine's own kernels alone, with no
    OpenMP region of PyTorch's between them: every product (`own_rows`), the attention and the layer norms, and
    ATen's elementwise operations (a SwiGLU block's, the residual sums) under ELEMENTWISE_GRAIN values. Such a
    step runs their loops on the kernels' helper threads (`native.helpers`, kernels.cpp's pool), which a server's
    other threads cannot hold up as they hold up OpenMP's. 0 where some layer is PyTorch's (a plain or LoRA
    linear, SDPA's attention, ATen's layer norm).

    benchmarks/serve.py's server and clients (Zen 4, 2 cores, bf16):
    - each step timed inside the server, two runs each: 16-row steps 9.0 and 9.3 ms with the helpers against 11.2
      and 13.8 ms on OpenMP's team, one-row steps 3.4 and 3.6 against 4.5 and 4.0 ms;
    - tokens/s, 5 runs alternated with the code before (OpenMP's team and ATen's layer norm), medians: one client
      211.7 against 175.2, 16 clients 1,048.2 against 917.5, the new code ahead in each run at both.
    With no other work on the machine the helpers gain nothing: steps of 1 to 32 rows alone, alternated in one
    process, ran at 0.93-1.04x the speed they have on OpenMP's team."""
    rows = min(PAIR_ROWS, ELEMENTWISE_GRAIN // model.cfg.d_model)  # residual sums, RMSNorm, rotary embeddings
    for module in model.modules():
        if isinstance(module, (PackedLinear, Int8PackedLinear, Int4PackedLinear)):
            rows = min(rows, module.own_rows)
        elif type(module) is MLP:  # SwiGLU (GELU blocks are DecodeMLP): ATen's SiLU and product over the hidden
            rows = min(rows, ELEMENTWISE_GRAIN // module.down.in_features)
        elif isinstance(module, (nn.Linear, LoRAOver)) or type(module) in (Attention, nn.LayerNorm):
            return 0
    return rows


def int4_rows_fit(in_features: int, group_size: int) -> bool:
    """Whether the engine's one-row int4 kernel takes a layer: K a multiple of 64, groups of 32 or of a multiple
    of 64, and a build with its vector instructions (AVX2 or more; elsewhere it would only dequantize)."""
    kernels = native_kernels()
    fits = in_features % 64 == 0 and (group_size == 32 or (group_size % 64 == 0 and group_size <= 256))
    return fits and kernels is not None and kernels.vector_isa() != "none"


def cache_bucket(n: int) -> int:
    """The cache length for n positions: the least of 256, 384, 512, 768, 1024, 1536, ... (powers of two and 1.5
    times them) that holds n. Compiled, each length is a graph to compile, and every decode step attends over all
    of it: two lengths an octave waste at most a third of the cache, against half with powers of two alone (on
    the 35M Llama, prompt 128 + 256 new, 384 slots decode 5-10% faster than 512). Eager, a batch's cache grows
    through the same lengths, so that rows joining one by one do not copy it at every join."""
    size = 256
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size // 3 * 4
    return size


def decode_step(model: GPT, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Next-token logits (B, V) after feeding tokens (B,), the ones just sampled, at the cache's position."""
    return model(tokens.unsqueeze(1), kv_cache=cache)[:, -1]


def compiled_decode_step() -> DecodeStep:
    """`decode_step` compiled by inductor with frozen weights and a C++ wrapper, for one engine's model.

    Freezing makes the weights (`PackedLinear`'s oneDNN layouts included) constants of the graph, and inductor
    fuses the pointwise work between the matrix products; the C++ wrapper runs the graph without Python in
    between. The engine's model is its own and changes only by being replaced (`Engine.load_weights`), which is
    what freezing requires. (Left to itself, inductor packs fp32 weights for MKL, whose one-row products run ~1.5x
    slower than oneDNN's here.)

    Every call returns a step with graphs of its own: dynamo keeps compiled graphs on the code object of the
    function it compiles and puts compiled functions in its globals, so each step compiles a fresh copy of
    `decode_step` with code and globals of its own, and its graphs (and the weights frozen into them) are freed
    with it (see `_forget_graphs`). A step is meant for one model at a time.

    Once a (model, batch size, cache length) has been compiled, its later steps skip the guards that could not
    tell that graph from the others compiled so far (`skip_guard_eval_unsafe`): checking every guard costs ~0.1 ms
    a step, 5-10% of a small model's decode step. What varies between such steps (token ids, cache contents, fill
    level and padding) lives in contiguous tensors of fixed shape and dtype, which is all the graph assumes of
    them; an input that would still need a new graph is compiled with every guard checked.
    """
    import torch._dynamo.config  # imported here: torch.compile's machinery takes a second to import
    import torch._inductor.config
    from torch._inductor.codecache import PyCodeCache

    # its own code object and globals: dynamo keeps graphs on the one and installs compiled functions in the other
    fresh = types.FunctionType(decode_step.__code__.replace(), dict(decode_step.__globals__), decode_step.__name__)
    step = torch.compile(fresh, dynamic=False, fullgraph=True)
    compiled: set[tuple[int, int, int]] = set()
    modules: list[types.ModuleType] = []  # inductor's generated modules for this step's graphs
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
        before = len(PyCodeCache.modules)
        with torch._inductor.config.patch(freezing=True, cpp_wrapper=True), torch._dynamo.config.patch(
                recompile_limit=64):
            logits = step(model, tokens, cache)
        modules.extend(PyCodeCache.modules[before:])
        compiled.add(key)
        return logits

    weakref.finalize(frozen_step, _forget_graphs, fresh.__code__, modules)
    return frozen_step


def _forget_graphs(code: types.CodeType, modules: list[types.ModuleType]) -> None:
    """Let go of a dropped step's graphs, and with them the weights frozen into them: without this, each
    `Engine.load_weights` of a compiled engine would keep another copy of the weights for the life of the process.

    Two holders outlive the step: dynamo's cache entries on the code object it compiled (reached from C++, so
    Python's garbage collector never frees them), and inductor's generated modules, which keep the weights they do
    not pack (embeddings, norms) as module globals in PyCodeCache.modules and sys.modules.
    """
    from torch._dynamo.eval_frame import remove_from_cache
    from torch._inductor.codecache import PyCodeCache

    remove_from_cache(code)

    gone = {id(m) for m in modules}
    PyCodeCache.modules[:] = [m for m in PyCodeCache.modules if id(m) not in gone]
    for path, m in list(PyCodeCache.modules_no_attr.items()):
        if id(m) in gone:
            del PyCodeCache.modules_no_attr[path]
    for m in modules:
        if sys.modules.get(m.__name__) is m:
            del sys.modules[m.__name__]
    modules.clear()


__all__ = ["BLOCK_WIDENING", "DEQUANT_ROWS", "PAIR_ROWS", "PROMPT_PAIR_ROWS", "QUANT_KERNELS", "SMALL_MODEL",
           "DecodeLayerNorm", "DecodeMLP", "Int4PackedLinear", "Int8PackedLinear", "PackedLinear", "quant_kernel",
           "quantized_layer", "cache_bucket", "compiled_decode_step", "decode_model", "decode_precision", "decode_step",
           "helper_rows", "prompt_kernel", "quantized"]
