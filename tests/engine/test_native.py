"""Twin tests of the engine's C++ kernels (engine/kernels.cpp, built by engine/native.py) against PyTorch.

decode_attention == SDPA with the decode step's mask (padding, grouped-query heads, fp32 and bf16 caches, views of a
larger cache, every head size it is built for), and prompt_attention with a prompt's (a prompt's rows the same bits
padded or alone); a model decoding with it == the same model with SDPA, step by step, rows joining with padding;
rows_linear == F.linear on a float32, bfloat16 or int8 (dequantized) weight, also compiled, and the engine's float
and int8 layers use it for one row; pairs_linear (AVX-512 BF16) == F.linear on bfloat16 rows, and the engine's bf16
layers use it for up to PAIR_ROWS rows (a block's, PROMPT_PAIR_ROWS); gelu_tanh == F.gelu's tanh form, layer_norm ==
F.layer_norm, and a GELU model decoding with them == the plain model; rows_int4 and dense_int4 == F.linear on an
int4 (dequantized) weight, the engine's int4 layer using them for one row and for many; sample_rows == softmax and
inverse_cdf with the same uniform numbers, and the engine's sampling uses it; the kernels built for AVX2 alone give
the same; without a compiler the engine says so in one line and keeps SDPA.
"""

import pytest
import torch
import torch.nn.functional as F

from yunque.config import preset
from yunque.engine import native
from yunque.engine.cpu import (
    DEQUANT_ROWS,
    NATIVE_ROWS,
    PAIR_ROWS,
    PROMPT_PAIR_ROWS,
    DecodeAttention,
    DecodeLayerNorm,
    DecodeMLP,
    Int4PackedLinear,
    Int8PackedLinear,
    PackedLinear,
    compiled_decode_step,
    decode_model,
    decode_step,
    prompt_kernel,
)
from yunque.engine.engine import Engine, SamplingParams
from yunque.engine.sampling import inverse_cdf, probabilities, sample
from yunque.model.gpt import GPT, Attention
from yunque.model.kv_cache import KVCache
from yunque.model.quant import QuantLinear
from yunque.tokenizer import byte_tokenizer

CPU = torch.device("cpu")
TOK = byte_tokenizer()
kernels = native.native_kernels()
needs_kernels = pytest.mark.skipif(kernels is None, reason="the engine's C++ kernels did not build here "
                                   "(no C++ compiler or Python headers); the engine uses SDPA")
needs_pairs = pytest.mark.skipif(kernels is None or not kernels.has_pairs(), reason="this CPU has no AVX-512 BF16 "
                                 "(bf16 dot products), so the engine decodes in fp32 with no pairs_linear")


def sdpa_step(q, k, v, pad):
    """The model's own path: SDPA with the mask KVCache gives a one-token step. q (B, H, 1, D), k/v (B, K, S, D)."""
    S = k.shape[2]
    mask = None
    if pad is not None:
        mask = torch.arange(S).view(1, 1, 1, S) >= pad.view(-1, 1, 1, 1)
        mask = mask | (torch.arange(S) == S - 1)  # the query's own position, as KVCache's mask
    return F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


@pytest.fixture
def torch_threads():
    """torch.set_num_threads for one test (the tests otherwise run on one thread, conftest.one_thread)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("D", DecodeAttention.HEAD_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, K", [(4, 4), (6, 2), (9, 3), (12, 4)])  # a row in one task, or in 5 + 4, 6 + 6
@pytest.mark.parametrize("S", [1, 37])
@pytest.mark.parametrize("B", [1, 5])  # one row: its heads split between the threads
def test_decode_attention_equals_sdpa(D, dtype, H, K, S, B, torch_threads):
    torch_threads(2)  # as the engine decodes: one row's heads split between the two threads
    g = torch.Generator().manual_seed(D + S)
    slots = S + 7  # views of the first S of more slots, as the cache hands them out
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, K, slots, D, generator=g).to(dtype)[:, :, :S]
    v = torch.randn(B, K, slots, D, generator=g).to(dtype)[:, :, :S]
    pad = torch.tensor([0, S - 1, S // 2, 3 % S, 0])[:B]
    full_k = torch.randn(B, K, slots, D, generator=g).to(dtype)  # a static cache: S filled of `slots`
    full_v = torch.randn(B, K, slots, D, generator=g).to(dtype)
    full_k[:, :, :S], full_v[:, :, :S] = k, v
    for p in (None, pad):
        got = kernels.decode_attention(q.view(B, H, D), k, v, p, None, D ** -0.5)
        want = sdpa_step(q, k, v, p).view(B, H, D)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
        # the dispatcher's operator, as the compiled step calls it, over the filled part of a longer cache
        got = torch.ops.yunque.decode_attention(q.view(B, H, D), full_k, full_v, p, torch.tensor([S]), D ** -0.5)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, K", [(6, 6), (9, 3), (12, 4)])
@pytest.mark.parametrize("threads", [2, 4])
def test_decode_attention_of_a_row_is_the_same_bits_whatever_rows_are_beside_it(dtype, H, K, threads, torch_threads):
    """How many heads a task takes depends on the batch and the threads (one row: its heads split between the
    threads); a row's outputs must not, or a request would decode differently alone and in a server's batch."""
    torch_threads(threads)
    g = torch.Generator().manual_seed(H)
    B, S, D = 7, 53, 64  # 53 positions x heads: scores that fill blocks of 16 and leave some over
    q = torch.randn(B, H, D, generator=g)
    k = torch.randn(B, K, S, D, generator=g).to(dtype)
    v = torch.randn(B, K, S, D, generator=g).to(dtype)
    pad = torch.tensor([0, 5, 17, 0, 52, 1, 9])
    together = kernels.decode_attention(q, k, v, pad, None, D ** -0.5)
    for b in range(B):
        alone = kernels.decode_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], pad[b:b + 1], None, D ** -0.5)
        assert torch.equal(alone[0], together[b]), f"row {b}"
        pair = kernels.decode_attention(q[b:b + 2], k[b:b + 2], v[b:b + 2], pad[b:b + 2], None, D ** -0.5)
        assert torch.equal(pair[0], together[b]), f"row {b} of two"


@needs_kernels
def test_decode_attention_refuses_what_it_cannot_run():
    q, k = torch.randn(2, 4, 24), torch.randn(2, 4, 9, 24)
    with pytest.raises(RuntimeError, match="head size 24"):
        kernels.decode_attention(q, k, k, None, None, 1.0)
    with pytest.raises(RuntimeError, match="does not match"):
        kernels.decode_attention(torch.randn(3, 4, 24), k, k, None, None, 1.0)
    k = torch.randn(2, 4, 9, 32)
    with pytest.raises(RuntimeError, match="10 keys filled of 9"):
        torch.ops.yunque.decode_attention(torch.randn(2, 4, 32), k, k, None, torch.tensor([10]), 1.0)


def sdpa_prompt(q, k, v, pad):
    """The model's own path for a prompt: SDPA with the mask KVCache gives T queries, the last T of S positions,
    row b's keys from pad[b] (a padding query sees itself). q (B, H, T, D), k/v (B, K, S, D); float32 inside."""
    T, S = q.shape[2], k.shape[2]
    qpos, kpos = torch.arange(S - T, S).view(1, 1, T, 1), torch.arange(S).view(1, 1, 1, S)
    mask = kpos <= qpos
    if pad is not None:
        mask = mask & ((kpos >= pad.view(-1, 1, 1, 1)) | (kpos == qpos))
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])


@needs_kernels
@pytest.mark.parametrize("D", DecodeAttention.HEAD_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, K", [(4, 4), (6, 2)])
@pytest.mark.parametrize("T, S", [(1, 1), (23, 23), (7, 40)])  # a whole prompt, or a chunk after 33 positions
def test_prompt_attention_equals_sdpa(D, dtype, H, K, T, S, torch_threads):
    torch_threads(2)
    g = torch.Generator().manual_seed(D + S)
    B, slots = 3, S + 5  # views of the first S of more slots, as the cache hands them out
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, K, slots, D, generator=g).to(dtype)[:, :, :S]
    v = torch.randn(B, K, slots, D, generator=g).to(dtype)[:, :, :S]
    pad = torch.tensor([0, S - 1, S // 2])
    for p in (None, pad):
        want = sdpa_prompt(q, k, v, p)
        got = kernels.prompt_attention(q, k, v, p, D ** -0.5)
        assert got.dtype == dtype and got.shape == q.shape
        # bf16 out: rounded once from float32 sums (a relative step of 2**-8)
        torch.testing.assert_close(got.float(), want, atol=2e-6 if dtype == torch.float32 else 1e-2,
                                   rtol=1e-5 if dtype == torch.float32 else 8e-3)
        got = torch.ops.yunque.prompt_attention(q, k, v, p, D ** -0.5)
        torch.testing.assert_close(got.float(), want, atol=2e-6 if dtype == torch.float32 else 1e-2,
                                   rtol=1e-5 if dtype == torch.float32 else 8e-3)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_prompt_attention_of_a_prompt_is_the_same_bits_padded_in_a_batch_or_alone(threads, torch_threads):
    """Prompts prefilled together are left-padded to the longest; each one's attention must not depend on that."""
    torch_threads(threads)
    g = torch.Generator().manual_seed(0)
    H, K, D, S = 6, 2, 64, 45
    q = torch.randn(3, H, S, D, generator=g).bfloat16()
    k = torch.randn(3, K, S, D, generator=g).bfloat16()
    v = torch.randn(3, K, S, D, generator=g).bfloat16()
    pad = torch.tensor([0, 17, 40])
    together = kernels.prompt_attention(q, k, v, pad, D ** -0.5)
    for b, n in enumerate(pad.tolist()):
        alone = kernels.prompt_attention(q[b:b + 1, :, n:], k[b:b + 1, :, n:], v[b:b + 1, :, n:], None, D ** -0.5)
        assert torch.equal(alone[0], together[b, :, n:]), f"row {b}"
        assert torch.equal(together[b, :, :n], v[b].repeat_interleave(H // K, dim=0)[:, :n])  # padding: itself


def test_prompts_take_the_kernel_where_it_was_measured_faster():
    cfg = preset("tiny", vocab_size=TOK.vocab_size, max_seq_len=4096)
    empty = KVCache(cfg, 1, 4096)
    assert prompt_kernel(empty, 66) and prompt_kernel(empty, 1024) and not prompt_kernel(empty, 2048)
    later = KVCache(cfg, 1, 4096)
    later.advance(512)  # a second chunk of 512 after 512: SDPA
    assert not prompt_kernel(later, 512) and prompt_kernel(later, 1536) is False
    short = KVCache(cfg, 1, 4096)
    short.advance(64)  # a prompt's last token after a shared prefix of 64: few keys
    assert prompt_kernel(short, 2)
    assert not prompt_kernel(KVCache(cfg, 1, 4096, static=True), 66)


@needs_kernels
def test_prompt_attention_refuses_what_it_cannot_run():
    k = torch.randn(2, 4, 9, 24)
    with pytest.raises(RuntimeError, match="head size 24"):
        kernels.prompt_attention(torch.randn(2, 4, 3, 24), k, k, None, 1.0)
    with pytest.raises(RuntimeError, match="does not match"):
        kernels.prompt_attention(torch.randn(2, 4, 10, 24), k, k, None, 1.0)  # more queries than positions


def int16_rounding_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """How far an int8 product may be from F.linear's when the kernel rounds each row of x to 16-bit integers (step
    max|x| / 32767, error at most half a step per element): half a step times the row's sum of |w|, plus fp32's
    own rounding."""
    step = x.float().abs().amax(-1, keepdim=True) / 32767
    return step / 2 * weight.abs().sum(1) + 1e-5 * (1 + (x.float().abs() @ weight.abs().T))


@needs_kernels
@pytest.mark.parametrize("K, N", [(576, 960), (60, 7), (1536, 576), (8256, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_rows_linear_equals_f_linear(K, N, dtype):
    torch.manual_seed(K)
    linear = torch.nn.Linear(K, N, bias=False)
    if dtype == torch.int8:
        layer = QuantLinear.from_linear(linear, 8)
        weight, scales, exact = layer.qweight, layer.scales, layer.dequantize()
    else:
        weight, scales = linear.weight.detach().to(dtype), None
        exact = weight.float()

    def check(got, x):
        want = F.linear(x.float(), exact)
        if dtype == torch.int8:  # x rounded to 16-bit integers (kernels.cpp, int8_rows): within that rounding
            assert ((got - want).abs() <= int16_rounding_bound(x, exact)).all()
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    for shape in [(1, K), (3, K), (2, 1, K)]:
        x = torch.randn(shape) * 3
        check(torch.ops.yunque.rows_linear(x, weight, scales), x)
        check(torch.ops.yunque.rows_linear(x.bfloat16(), weight, scales), x.bfloat16())
    compiled = torch.compile(lambda x: torch.ops.yunque.rows_linear(x, weight, scales) * 2, fullgraph=True)
    check(compiled(x) / 2, x)


@needs_kernels
def test_rows_linear_int8_is_as_close_as_its_rounding_says_and_no_closer():
    """The bound of the test above is tight enough to fail: a kernel that rounded x to 12 bits instead of 16 would
    break it. And x that is all zeros, or holds an inf or a nan, gives what F.linear gives."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(576, 256, bias=False), 8)
    x = torch.randn(1, 576)
    coarse = x.abs().amax() / 2047
    rounded = torch.round(x / coarse) * coarse
    assert not ((F.linear(rounded, layer.dequantize()) - F.linear(x, layer.dequantize())).abs()
                <= int16_rounding_bound(x, layer.dequantize())).all()
    kernel = torch.ops.yunque.rows_linear
    assert torch.equal(kernel(torch.zeros(1, 576), layer.qweight, layer.scales), torch.zeros(1, 256))
    for bad in (float("inf"), float("nan")):
        x[0, 5] = bad
        assert not kernel(x, layer.qweight, layer.scales).isfinite().any()


def int8_group_rounding_bound(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """How far an int4 product may be from F.linear's when the kernel rounds x to 8-bit integers per group of G
    columns (step max|x| / 127 over the group, error at most half a step per element) and sums the weights' offset
    of 8 in integers too: half a step times sum |q - 8| scale, plus fp32's own rounding (of the result, and of
    the weight's zero terms, which it sums against x exactly)."""
    N, K, G = layer.out_features, layer.in_features, layer.group_size
    x2 = x.float().reshape(-1, K // G, G)
    step = (x2.abs().amax(-1, keepdim=True) / 127).expand_as(x2).reshape(*x.shape[:-1], K)
    offsets = (layer.int_weight().float() - 8).reshape(N, K // G, G) * layer.scales.float()[..., None]
    w = layer.dequantize()
    return step / 2 @ offsets.abs().reshape(N, K).T + 1e-5 * (1 + x.float().abs() @ w.abs().T)


@needs_kernels
@pytest.mark.parametrize("K, N, G", [(576, 960, 32), (1536, 7, 64), (640, 5, 128), (256, 3, 256), (96, 4, 32)])
def test_rows_int4_equals_f_linear_within_the_rounding_of_x_to_8_bits(K, N, G):
    """rows_int4 (kernels.cpp: int4_rows, every group size it takes; K = 96 is no multiple of 64 and takes the
    dequantizing path) against F.linear on the dequantized weight, for 1 and more rows, x in fp32 and bf16, and
    compiled."""
    torch.manual_seed(K + G)
    layer = QuantLinear.from_linear(torch.nn.Linear(K, N, bias=False), 4, G)
    w = layer.dequantize()

    def kernel(x):
        return torch.ops.yunque.rows_int4(x, layer.qweight, layer.scales, layer.zeros, G)

    for shape in [(1, K), (3, K), (2, 1, K)]:
        for x in (torch.randn(shape) * 3, torch.randn(shape).bfloat16()):
            got, want = kernel(x), F.linear(x.float(), w)
            assert got.shape == want.shape and got.dtype == torch.float32
            assert ((got - want).abs() <= int8_group_rounding_bound(x, layer)).all()
    compiled = torch.compile(lambda x: kernel(x) * 2, fullgraph=True)
    x = torch.randn(1, K)
    assert ((compiled(x) / 2 - F.linear(x, w)).abs() <= int8_group_rounding_bound(x, layer)).all()


@needs_kernels
def test_rows_int4_is_as_close_as_its_rounding_says_and_no_closer():
    """The bound above is tight enough to fail: with an outlier in x (as a language model's activations have), 8-bit
    rounding with one scale for the whole row breaks it, where the kernel's scale per group keeps it. x all zeros
    gives zeros, and an inf or a nan gives what F.linear gives (the kernel then dequantizes instead)."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(576, 256, bias=False), 4, 32)
    w = layer.dequantize()
    x = torch.randn(1, 576)
    x[0, 7] = 60.0
    step = x.abs().amax() / 127
    per_row = torch.round(x / step) * step
    bound = int8_group_rounding_bound(x, layer)
    assert not ((F.linear(per_row, w) - F.linear(x, w)).abs() <= bound).all()
    got = torch.ops.yunque.rows_int4(x, layer.qweight, layer.scales, layer.zeros, 32)
    assert ((got - F.linear(x, w)).abs() <= bound).all()

    def kernel(x):
        return torch.ops.yunque.rows_int4(x, layer.qweight, layer.scales, layer.zeros, 32)

    torch.testing.assert_close(kernel(torch.zeros(1, 576)), torch.zeros(1, 256), atol=1e-6, rtol=0)
    for bad in (float("inf"), float("nan")):
        x[0, 5] = bad
        torch.testing.assert_close(kernel(x), F.linear(x, w), equal_nan=True)


@needs_kernels
@pytest.mark.parametrize("K, N, G", [(576, 960, 32), (1536, 7, 64), (48, 5, 16), (1024, 20000, 32)])
def test_dense_int4_widens_the_weight_to_the_dtype_of_x(K, N, G):
    """dense_int4 == F.linear on the dequantized weight in x's dtype: fp32 exactly as F.linear's rounding, bf16
    with the weight rounded to bf16 (to nearest even, as .bfloat16()); G = 16 takes the scalar loop, and a weight
    of more than 32 MiB is widened into memory of its own rather than the buffer the kernel keeps."""
    torch.manual_seed(K)
    layer = QuantLinear.from_linear(torch.nn.Linear(K, N, bias=False), 4, G)
    w = layer.dequantize()
    x = torch.randn(40, K)

    def kernel(x):
        return torch.ops.yunque.dense_int4(x, layer.qweight, layer.scales, layer.zeros, G)

    torch.testing.assert_close(kernel(x), F.linear(x, w), atol=1e-5, rtol=1e-5)
    got = kernel(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.linear(x.bfloat16(), w.bfloat16()))
    widened = torch.ops.yunque.dense_int4(torch.eye(K), layer.qweight, layer.scales, layer.zeros, G).T
    assert torch.equal(widened, w)  # the fp32 widening is exact: the identity reads it back


@needs_pairs
@pytest.mark.parametrize("K, N", [(2, 1), (6, 7), (64, 100), (576, 960), (1536, 33), (384, 50257)])
def test_pairs_linear_equals_f_linear(K, N):
    """Every number of rows a decode step may have (blocks of 8 or 16 rows and the rows left over, 1 to 8 tiles of
    16 outputs side by side, outputs past the last whole tile), with and without a bias: F.linear's products in
    float32, rounded to bfloat16."""
    torch.manual_seed(0)
    w, bias = torch.randn(N, K).bfloat16(), torch.randn(N).bfloat16()
    packed = torch.ops.yunque.pack_pairs(w)
    assert packed.shape == ((N + 15) // 16, K // 2, 32)
    for M in [1, 2, 3, 4, 5, 7, 8, 9, 13, 15, 16, 17, 24, 31, 32, 40] if N < 10000 else [1, 3, 16, 19]:
        x = torch.randn(M, 1, K).bfloat16()
        for b in (None, bias):
            got = torch.ops.yunque.pairs_linear(x, packed, b, N)
            want = F.linear(x.float(), w.float(), None if b is None else b.float())
            assert got.shape == (M, 1, N) and got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want, atol=1e-4 * K ** 0.5, rtol=2 ** -8, msg=f"{M} rows")


@needs_pairs
def test_pairs_linear_rows_do_not_depend_on_the_rows_beside_them():
    """A row's outputs are the same bits whatever the number of rows (the blocking changes with it): a sequence
    decodes the same alone and in a batch of the engine's bf16 products."""
    torch.manual_seed(0)
    packed = torch.ops.yunque.pack_pairs(torch.randn(100, 64).bfloat16())
    x = torch.randn(32, 64).bfloat16()
    alone = torch.cat([torch.ops.yunque.pairs_linear(x[i:i + 1], packed, None, 100) for i in range(32)])
    for M in (2, 4, 8, 11, 16, 29, 32):
        assert torch.equal(torch.ops.yunque.pairs_linear(x[:M], packed, None, 100), alone[:M])


@needs_pairs
def test_pairs_linear_of_no_rows_is_empty():
    packed = torch.ops.yunque.pack_pairs(torch.randn(20, 8).bfloat16())
    assert torch.ops.yunque.pairs_linear(torch.randn(0, 1, 8).bfloat16(), packed, None, 20).shape == (0, 1, 20)


@needs_pairs
def test_pairs_linear_refuses_what_it_cannot_run():
    packed = torch.ops.yunque.pack_pairs(torch.randn(20, 8).bfloat16())
    with pytest.raises(RuntimeError, match="K even"):
        torch.ops.yunque.pack_pairs(torch.randn(20, 7).bfloat16())
    with pytest.raises(RuntimeError, match="pairs_linear: x"):
        torch.ops.yunque.pairs_linear(torch.randn(1, 6).bfloat16(), packed, None, 20)
    with pytest.raises(RuntimeError, match="pairs_linear: x"):
        torch.ops.yunque.pairs_linear(torch.randn(1, 8).bfloat16(), packed, None, 40)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.yunque.pairs_linear(torch.randn(1, 8).bfloat16(), packed, torch.zeros(19), 20)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_tanh_equals_f_gelu(dtype):
    """Over -30..30, at 0 and far out (where exp(-2z) would overflow): F.gelu(x, approximate="tanh") computed in
    float32, within a float32 rounding, or one bfloat16 rounding of it; any shape, views too."""
    x = torch.cat([torch.linspace(-30, 30, 100_001), torch.tensor([0.0, -1e4, 1e4, -88.0, 88.0])]).to(dtype)
    got, want = torch.ops.yunque.gelu_tanh(x), F.gelu(x.float(), approximate="tanh")
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-6, "rtol": 2 ** -8}
    torch.testing.assert_close(got.float(), want, **tol)
    view = torch.randn(8, 6, 10).to(dtype).transpose(0, 2)  # not contiguous
    torch.testing.assert_close(torch.ops.yunque.gelu_tanh(view).float(),
                               F.gelu(view.float(), approximate="tanh"), **tol)
    with pytest.raises(RuntimeError, match="gelu_tanh: x float32 or bfloat16"):
        torch.ops.yunque.gelu_tanh(x.half())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_layer_norm_equals_f_layer_norm(dtype, rows):
    """With and without weight and bias, a row at a time or many (on OpenMP's team and on the helpers), views:
    F.layer_norm computed in float32, within a float32 rounding, or one bfloat16 rounding of it."""
    torch.manual_seed(rows)
    x = (torch.randn(rows, 3, 384) * 4 + 2).to(dtype)
    w, b = torch.randn(384).to(dtype), torch.randn(384).to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2 ** -8}
    for on in (False, True):
        with native.helpers(on):
            for weight, bias in [(w, b), (w, None), (None, None)]:
                got = torch.ops.yunque.layer_norm(x, weight, bias, 1e-5)
                want = F.layer_norm(x.float(), (384,), None if weight is None else weight.float(),
                                    None if bias is None else bias.float(), 1e-5)
                assert got.dtype == dtype and got.shape == x.shape
                torch.testing.assert_close(got.float(), want, **tol)
    view = x.transpose(0, 1)  # not contiguous
    torch.testing.assert_close(torch.ops.yunque.layer_norm(view, w, b, 1e-5).float(),
                               F.layer_norm(view.float(), (384,), w.float(), b.float(), 1e-5), **tol)


@needs_kernels
def test_layer_norm_refuses_what_it_cannot_run():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="layer_norm: x float32 or bfloat16"):
        torch.ops.yunque.layer_norm(x.half(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"layer_norm: weight \(8,\) in x's dtype"):
        torch.ops.yunque.layer_norm(x, torch.ones(7), None, 1e-5)
    with pytest.raises(RuntimeError, match=r"layer_norm: bias \(8,\) in x's dtype"):
        torch.ops.yunque.layer_norm(x, None, torch.ones(8).bfloat16(), 1e-5)


@needs_kernels
def test_a_gelu_model_decodes_with_the_kernel_and_equals_the_plain_one():
    """The engine's copy of a GPT-2-shaped model (GELU blocks) runs the activation and layer norm kernels; its
    prompt and step logits equal the model's own, eager and compiled, and a swiglu model keeps its blocks."""
    torch.manual_seed(0)
    model = GPT(preset("gpt2-tiny", vocab_size=TOK.vocab_size)).eval()
    fast = decode_model(model, torch.float32, CPU, pack=False)
    assert any(type(m) is DecodeMLP for m in fast.modules())
    assert any(type(m) is DecodeLayerNorm for m in fast.modules())
    assert not any(type(m) is torch.nn.LayerNorm for m in fast.modules())
    assert not any(type(m) is DecodeMLP for m in decode_model(tiny(), torch.float32, CPU, pack=False).modules())
    prompt = torch.tensor([TOK.encode("a stitch in time")])
    step = compiled_decode_step()
    with torch.inference_mode():
        caches = [KVCache(model.cfg, 1, 40), KVCache(model.cfg, 1, 40), KVCache(model.cfg, 1, 40, static=True)]
        logits = [m(prompt, kv_cache=c)[:, -1] for m, c in zip((fast, model, fast), caches)]
        for _ in range(8):
            tokens = logits[1].argmax(-1)
            torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(logits[2], logits[1], atol=1e-4, rtol=1e-4)
            logits = [decode_step(fast, tokens, caches[0]), decode_step(model, tokens, caches[1]),
                      step(fast, tokens, caches[2])]


AVX2_BUILD = """
import torch, torch.nn.functional as F
from yunque.engine import native
from yunque.model.quant import QuantLinear
{bounds}
native.CFLAGS = (*native.CFLAGS, "-mno-avx512f")  # a build of its own (the flags are in its name), for AVX2 only
kernels = native.native_kernels()
print(kernels.vector_isa(), kernels.has_pairs())
torch.manual_seed(0)
for K, N in [(576, 960), (1536, 7), (8256, 3), (40, 5)]:
    layer = QuantLinear.from_linear(torch.nn.Linear(K, N, bias=False), 8)
    x = torch.randn(2, K) * 3
    got, want = torch.ops.yunque.rows_linear(x, layer.qweight, layer.scales), F.linear(x, layer.dequantize())
    assert ((got - want).abs() <= int16_rounding_bound(x, layer.dequantize())).all(), (K, N)
for K, N, G in [(576, 960, 32), (1536, 7, 64), (96, 4, 32)]:
    layer = QuantLinear.from_linear(torch.nn.Linear(K, N, bias=False), 4, G)
    x = torch.randn(2, K) * 3
    got = torch.ops.yunque.rows_int4(x, layer.qweight, layer.scales, layer.zeros, G)
    assert ((got - F.linear(x, layer.dequantize())).abs() <= int8_group_rounding_bound(x, layer)).all(), (K, N, G)
    got = torch.ops.yunque.dense_int4(x.bfloat16(), layer.qweight, layer.scales, layer.zeros, G)
    torch.testing.assert_close(got, F.linear(x.bfloat16(), layer.dequantize().bfloat16()))
from yunque.engine.sampling import inverse_cdf, probabilities
logits, u = torch.randn(32, 1000) * 3, torch.rand(32)
got = torch.ops.yunque.sample_rows(logits, u, 1.0)
assert (got == inverse_cdf(probabilities(logits, 1.0), u[:, None])).float().mean() > 0.9
print("ok")
"""


@needs_kernels
@pytest.mark.skipif("avx2" not in native.cpu_flags().split(), reason="the CPU has no AVX2 to build for")
def test_the_avx2_build_of_the_integer_kernels_equals_f_linear(tmp_path):
    """Most laptops have AVX2 and no AVX-512: the kernels built without AVX-512 (as there) take their AVX2 branches
    and give F.linear's products within the rounding of x (int8: to 16 bits; int4: to 8 bits per group, with
    8-bit products summed by maddubs/madd instead of VNNI). Builds the kernels once more (~40 s)."""
    import inspect
    import subprocess
    import sys

    # the same bounds as the tests here
    bounds = inspect.getsource(int16_rounding_bound) + inspect.getsource(int8_group_rounding_bound)
    script = AVX2_BUILD.format(bounds=bounds)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["avx2", "False", "ok"]  # no bf16 dot products without AVX-512


@needs_kernels
@pytest.mark.parametrize("V", [7, 256, 300, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_sample_rows_draws_the_tokens_of_the_tensor_path(V, dtype, temperature):
    """The fused draw == softmax, then inverse_cdf, with the same uniform numbers: the same token, but where the
    two sum in another order and u falls within rounding of the boundary between two tokens."""
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(64, V, generator=g) * 3).to(dtype)
    u = torch.rand(64, generator=g)
    got = torch.ops.yunque.sample_rows(logits, u, 1 / temperature)
    want = inverse_cdf(probabilities(logits, temperature), u[:, None])
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(-1)
    for row in (got != want).nonzero().view(-1).tolist():
        assert abs(float(cdf[row, min(got[row], want[row])]) - float(u[row])) < 1e-5, row
    assert (got == want).float().mean() >= 0.95


@needs_kernels
def test_sample_rows_leaves_rows_with_inf_or_nan_to_the_tensor_path():
    logits = torch.randn(4, 600)
    logits[1, 5], logits[2, 300], logits[3, 0] = float("-inf"), float("nan"), float("inf")
    assert torch.ops.yunque.sample_rows(logits, torch.rand(4), 1.0)[1:].tolist() == [-1, -1, -1]
    # sample() draws those rows as without the kernel, with the same uniform numbers: -inf is never drawn
    masked = torch.randn(8, 600)
    masked[:, 1::2] = float("-inf")
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(8)]  # noqa: E731
    assert torch.equal(sample(masked, generators=gens(), native=True), sample(masked, generators=gens()))
    assert bool((sample(masked, generators=gens(), native=True) % 2 == 0).all())
    # fp16 logits, which the kernel does not read: the tensor path
    assert torch.equal(sample(masked.half(), generators=gens(), native=True), sample(masked.half(), generators=gens()))


@needs_kernels
def test_native_sampling_frequencies_match_softmax():
    probs = torch.tensor([0.2, 0.3, 0.5])
    for temperature, want in ((1.0, probs), (2.0, probs.sqrt() / probs.sqrt().sum())):
        g = torch.Generator().manual_seed(7)
        ids = sample(probs.log().expand(20_000, -1), temperature=temperature, generators=[g] * 20_000, native=True)
        freq = torch.bincount(ids, minlength=3).float() / 20_000
        assert torch.allclose(freq, want, atol=0.02), freq


@needs_kernels
def test_the_engine_samples_with_the_kernel_where_no_filter_is_set(monkeypatch):
    calls = []
    kernel = kernels.sample_rows  # what eager code calls (native.kernels)
    monkeypatch.setattr(kernels, "sample_rows", lambda *a: (calls.append(a[0].shape), kernel(*a))[1])
    engine = Engine(tiny(), TOK)
    assert engine.native
    engine.generate([TOK.encode("a b")], SamplingParams(max_new_tokens=4, temperature=0.8, seed=1))
    assert len(calls) == 4
    engine.generate([TOK.encode("a b")], SamplingParams(max_new_tokens=4, temperature=0.8, top_p=0.9, seed=1))
    assert len(calls) == 4  # top-p sorts: the tensor path


def counting_kernel(monkeypatch, op: str = "rows_linear") -> list[torch.Size]:
    """The shapes of x that the kernel `op` is called with from now on (eagerly: native.kernels)."""
    calls = []
    kernel = getattr(kernels, op)
    monkeypatch.setattr(kernels, op, lambda *a: (calls.append(a[0].shape), kernel(*a))[1])
    return calls


@needs_kernels
def test_the_engine_int8_layer_runs_the_kernel_for_one_row_and_aten_or_onednn_for_more(monkeypatch):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 96, bias=True), 8)
    calls = counting_kernel(monkeypatch)
    fast, aten = Int8PackedLinear(layer, native=True, native_bf16=True), Int8PackedLinear(layer)
    for rows in (1, NATIVE_ROWS + 3, DEQUANT_ROWS):  # the C++ kernel, ATen's, the weight widened to bf16
        x = torch.randn(rows, 64)
        got, want = fast(x), F.linear(x, layer.dequantize(), layer.bias)
        if rows <= NATIVE_ROWS:  # the kernel rounds x to 16-bit integers; ATen's rounds it to bf16
            assert ((got - want).abs() <= int16_rounding_bound(x, layer.dequantize())).all()
        else:
            torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)
        torch.testing.assert_close(got, aten(x), atol=0.05, rtol=0.02)
    assert calls == [torch.Size([1, 64])]


@needs_kernels
def test_the_engine_int4_layer_runs_the_kernel_for_one_row_aten_for_a_few_and_onednn_for_many(monkeypatch):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 96, bias=True), 4, 32)
    calls = []
    for op in ("rows_int4", "dense_int4"):
        kernel = getattr(kernels, op)
        monkeypatch.setattr(kernels, op, lambda *a, op=op, k=kernel: (calls.append((op, a[0].shape[0])),
                                                                                k(*a))[1])
    fast, aten = Int4PackedLinear(layer, native=True, native_bf16=True), Int4PackedLinear(layer)
    w = layer.dequantize()
    for rows in (1, NATIVE_ROWS + 3, DEQUANT_ROWS):  # the integer kernel, ATen's, the weight widened to bf16
        x = torch.randn(rows, 128)
        got, want = fast(x), F.linear(x, w, layer.bias)
        if rows <= NATIVE_ROWS:  # x rounded to 8-bit integers per group
            assert ((got - want).abs() <= int8_group_rounding_bound(x, layer)).all()
        else:  # x in bf16, as ATen's takes it
            torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)
        torch.testing.assert_close(got, aten(x), atol=0.05, rtol=0.02)
    assert calls == [("rows_int4", 1), ("dense_int4", DEQUANT_ROWS)]


@needs_kernels
def test_the_engine_int4_layer_without_aten_runs_the_kernel_then_widens_the_weight():
    """Without native bf16 (quant_kernel's "int4native") the layer keeps no ATen copy: up to DEQUANT_ROWS - 1 rows
    take the integer kernel, more the weight widened to x's dtype (fp32 there), which equals F.linear on it."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(128, 96, bias=True), 4, 32)
    fast = Int4PackedLinear(layer, native=True, native_bf16=False, aten=False)
    assert "int4_weight" not in dict(fast.named_buffers())
    w = layer.dequantize()
    for rows in (1, NATIVE_ROWS + 1, DEQUANT_ROWS - 1):
        x = torch.randn(rows, 128)
        assert ((fast(x) - F.linear(x, w, layer.bias)).abs() <= int8_group_rounding_bound(x, layer)).all()
    x = torch.randn(DEQUANT_ROWS, 128)
    torch.testing.assert_close(fast(x), F.linear(x, w, layer.bias), atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.skipif(not PackedLinear.supported(CPU, torch.float32), reason="PyTorch was built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_engine_float_layer_runs_a_kernel_for_a_few_rows_and_onednn_for_more(monkeypatch, dtype):
    if not PackedLinear.supported(CPU, dtype):
        pytest.skip("this CPU has no native bf16 products, so the engine decodes in fp32 and never packs bf16")
    torch.manual_seed(0)
    calls = counting_kernel(monkeypatch)
    pairs = counting_kernel(monkeypatch, "pairs_linear") if kernels.has_pairs() else []
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    # a block's layer (100 outputs: oneDNN's copy is padded to 128) and a head's (40 times as many outputs as inputs)
    for inputs, outputs, rows in ((64, 100, PROMPT_PAIR_ROWS), (16, 640, PAIR_ROWS)):
        calls.clear()
        pairs.clear()
        linear = torch.nn.Linear(inputs, outputs, bias=True).to(dtype)
        fast, onednn = PackedLinear(linear, native=True), PackedLinear(linear)
        shapes = [(1, inputs), (1, 1, inputs), (NATIVE_ROWS + 3, inputs), (rows, 1, inputs), (rows + 1, 1, inputs)]
        for shape in shapes:
            x = torch.randn(shape).to(dtype)
            got = fast(x)
            assert got.shape == (*shape[:-1], outputs) and got.dtype == dtype
            torch.testing.assert_close(got, F.linear(x, linear.weight, linear.bias), **tol)
            torch.testing.assert_close(got, onednn(x), **tol)
        if dtype == torch.bfloat16 and kernels.has_pairs():  # up to `rows` rows the bf16 kernel, then oneDNN
            assert calls == [] and pairs == [torch.Size(s) for s in shapes[:-1]]
        else:
            assert calls == [torch.Size([1, inputs]), torch.Size([1, 1, inputs])] and pairs == []


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=TOK.vocab_size, **overrides)).eval()


@needs_kernels
@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2, "d_model": 128}])
def test_a_model_decoding_with_the_kernel_equals_sdpa(overrides):
    """Prefill two prompts of different lengths (left padding), then decode 12 steps with each path: same logits."""
    model = tiny(**overrides)
    prompts = [TOK.encode("a stitch in time"), TOK.encode("hello")]
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    pad = torch.tensor([P - len(p) for p in prompts])
    outs = {}
    for use in (False, True):
        m = decode_model(model, torch.float32, CPU, pack=False, native=use)
        assert any(type(a) is DecodeAttention for a in m.modules()) == use
        cache = KVCache(model.cfg, 2, P + 12, pad=pad)
        with torch.inference_mode():
            logits = [m(ids, kv_cache=cache)[:, -1]]
            for _ in range(12):
                logits.append(decode_step(m, logits[-1].argmax(-1), cache))
        outs[use] = torch.stack(logits)
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)


@needs_kernels
def test_the_engine_decodes_with_the_kernel_and_batched_equals_alone():
    engine = Engine(tiny(), TOK)
    assert all(type(m) is not Attention for m in engine.model.modules())
    prompts = [TOK.encode(t) for t in ("once upon", "a", "the quick brown fox")]
    params = SamplingParams(max_new_tokens=16, temperature=0.8, seed=3)
    together = engine.generate(prompts, params)
    alone = [engine.generate([p], SamplingParams(max_new_tokens=16, temperature=0.8, seed=3 + i))[0]
             for i, p in enumerate(prompts)]
    assert together == alone


def test_without_a_compiler_one_line_says_so_and_sdpa_decodes(monkeypatch, capsys, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing is built there
    monkeypatch.setattr(cpp_extension, "get_cxx_compiler", lambda: "no-such-c++")
    native.native_kernels.cache_clear()
    try:
        assert native.native_kernels() is None
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no C++ compiler (no-such-c++)" in err[0] and "install g++" in err[0]
        engine = Engine(tiny(), TOK)
        assert not any(type(m) is DecodeAttention for m in engine.model.modules())
        assert len(engine.generate([TOK.encode("hi")], SamplingParams(max_new_tokens=4, temperature=0))[0]) == 4
    finally:
        native.native_kernels.cache_clear()


@needs_kernels
def test_engines_made_at_once_all_get_the_kernels():
    import threading

    native.native_kernels.cache_clear()  # as in a fresh process: the first calls load the library
    try:
        got = []
        threads = [threading.Thread(target=lambda: got.append(native.native_kernels())) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 4 and all(m is not None and hasattr(m, "decode_attention") for m in got)
    finally:
        native.native_kernels.cache_clear()


@needs_kernels
def test_eager_calls_take_the_bindings_and_the_profiler_sees_the_operators():
    """native.kernels: the library's bindings in eager code (one wait for the GIL a call); under torch.profiler
    the operators, so that a profile names the kernels."""
    assert native.kernels() is kernels
    layer = torch.nn.LayerNorm(64)
    with torch.profiler.profile() as prof:
        assert native.kernels() is torch.ops.yunque
        DecodeLayerNorm.forward(layer, torch.randn(2, 64))
    assert any(e.key == "yunque::layer_norm" for e in prof.key_averages())
