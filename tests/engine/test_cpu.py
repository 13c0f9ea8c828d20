"""Twin tests of the engine's CPU fast path (engine/cpu.py) against the simple one.

oneDNN-packed linear == nn.Linear; compiled decode step == eager, also with rows joining and after new weights;
bf16 decoding == fp32 decoding on a model that has learned something; the int8/int4 kernels == F.linear on the
dequantized weight, and a quantized model's greedy tokens == its dequantized twin's, with each CPU's kernels; the
engine's copy of the model leaves the caller's alone and shares nothing with it. (The static-shape cache's twin
tests are in tests/model/test_kv_cache.py.)
"""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from yunque.config import preset
from yunque.engine.cpu import (
    SMALL_MODEL,
    Int4PackedLinear,
    Int8PackedLinear,
    PackedLinear,
    cache_bucket,
    compiled_decode_step,
    decode_model,
    decode_step,
    quant_kernel,
)
from yunque.engine.engine import Engine, SamplingParams
from yunque.engine.native import native_kernels
from yunque.model.gpt import GPT
from yunque.model.kv_cache import KVCache
from yunque.model.quant import QuantLinear, dequantize_model, quantize_model
from yunque.precision import bf16_supported
from yunque.tokenizer import byte_tokenizer

TOK = byte_tokenizer()
TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(not bf16_supported("cpu"), reason="this CPU has no native bf16 matrix products")
needs_onednn = pytest.mark.skipif(not PackedLinear.supported(CPU, torch.float32), reason="torch built without oneDNN")


def tiny(name: str = "tiny", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset(name, vocab_size=TOK.vocab_size, **overrides)).eval()


@pytest.fixture(scope="module")
def learned() -> GPT:
    """A tiny model that has memorised TEXT (~1 s of training), so that its greedy choices have clear margins."""
    model = tiny(max_seq_len=64).train()
    ids = torch.tensor(TOK.encode(TEXT * 2))
    windows = torch.stack([ids[i:i + 33] for i in range(0, len(ids) - 33, 3)])  # (N, 33)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        logits = model(windows[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    return model.eval()


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
@pytest.mark.parametrize("bias, out_features", [(True, 96), (False, 263)])  # 263: padded to 320 rows inside
def test_packed_linear_equals_linear(dtype, bias, out_features):
    torch.manual_seed(0)
    linear = nn.Linear(64, out_features, bias=bias).to(dtype)
    packed = PackedLinear(linear)
    for shape in [(1, 64), (8, 64), (2, 5, 64)]:
        x = torch.randn(shape, dtype=dtype)
        want = linear(x)
        got = packed(x)
        assert got.shape == want.shape and got.dtype == dtype
        # same products, another summation order; bf16 results are rounded from fp32 sums either way
        tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
        torch.testing.assert_close(got, want, **tol)


def test_decode_model_leaves_the_callers_model_alone():
    model = tiny("gpt2-tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = decode_model(model, torch.bfloat16, CPU)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(type(m) is not PackedLinear for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert copy.tok_emb.weight.dtype == torch.bfloat16 and copy is not model
    same = decode_model(model, torch.float32, CPU, pack=False)
    for (name, p), q in zip(model.named_parameters(), same.parameters()):  # equal values, none shared
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    assert same.lm_head.weight is same.tok_emb.weight  # still tied
    rope = decode_model(tiny("tiny"), torch.bfloat16, CPU)
    assert rope.inv_freq.dtype == torch.float32  # rotary frequencies keep full precision


def test_engine_precision_auto_follows_the_hardware_and_the_model_size():
    want = torch.bfloat16 if bf16_supported("cpu") else torch.float32
    big = tiny("small")
    assert big.num_params() >= SMALL_MODEL
    assert Engine(big, TOK).dtype == want
    assert Engine(big, TOK, precision="fp32").dtype == torch.float32
    small = Engine(tiny(), TOK)  # weights in cache: fp32 with plain F.linear decodes faster
    assert small.dtype == torch.float32 and not any(type(m) is PackedLinear for m in small.model.modules())
    assert Engine(tiny(), TOK, precision="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        Engine(tiny(), TOK, precision="fp16")


def test_engine_precision_auto_decodes_a_quantized_model_in_fp32_and_a_float_one_as_the_cpu_says():
    want = torch.bfloat16 if bf16_supported("cpu") else torch.float32
    big = GPT(preset("small", vocab_size=20_000)).eval()  # an embedding of SMALL_MODEL parameters or more
    assert sum(p.numel() for p in quantize_model(copy.deepcopy(big), "int4", 32).parameters()) >= SMALL_MODEL
    assert Engine(big, TOK).dtype == want
    assert Engine(quantize_model(copy.deepcopy(big), "int8"), TOK).dtype == torch.float32
    assert Engine(quantize_model(copy.deepcopy(big), "int4", 32), TOK).dtype == torch.float32
    assert Engine(quantize_model(copy.deepcopy(big), "int8"), TOK, precision="bf16").dtype == torch.bfloat16


@needs_bf16
def test_bf16_decoding_equals_fp32_on_a_model_that_has_learned(learned):
    fp32, bf16 = Engine(learned, TOK, precision="fp32"), Engine(learned, TOK, precision="bf16")
    prompts = [TOK.encode("the quick"), TOK.encode("a stitch in"), TOK.encode("over the lazy")]
    params = SamplingParams(max_new_tokens=40, temperature=0)
    for prompt, want, got in zip(prompts, fp32.generate(prompts, params), bf16.generate(prompts, params)):
        if got == want:
            continue
        # past the 32 tokens it was trained on the model may meet a near-tie; bf16 may take the other side of one
        # (its logits agree to ~2% of their range, below), and only of one: the first difference must be there
        k = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
        with torch.inference_mode():
            logits = fp32.model(torch.tensor([prompt + want[:k]]))[0, -1].float()
        first, second = logits.topk(2).values
        assert first - second <= 0.02 * logits.abs().max(), f"bf16 left fp32's greedy text at token {k} of {prompt}"
    ids = torch.tensor([TOK.encode(TEXT[:40])])
    with torch.inference_mode():
        a, b = fp32.model(ids).float(), bf16.model(ids).float()
    # bf16 keeps 8 bits of mantissa: logits agree to ~2% of their range
    assert (a - b).abs().max() <= 0.02 * a.abs().max()


@needs_onednn
def test_compiled_decode_equals_eager_at_the_context_limit(learned):
    # Prompts of 20, 30 and 40 tokens in a 64-token context with no stop token: the longest row stops first and
    # rides along in the compiled batch until the cache is full; then finished rows leave and the common padding
    # is dropped (a new batch size: compiled again), as in the eager engine.
    prompts = [TOK.encode((TEXT * 2)[i:i + n]) for i, n in ((0, 20), (7, 30), (3, 40))]
    params = SamplingParams(max_new_tokens=100, temperature=0)
    eager, compiled = Engine(learned, TOK, precision="fp32"), Engine(learned, TOK, precision="fp32", compile=True)
    eager.stop_ids = compiled.stop_ids = set()
    got = compiled.generate(prompts, params)
    assert [len(g) for g in got] == [64 - len(p) for p in prompts]
    assert got == eager.generate(prompts, params)
    # and step by step, the compiled step's logits equal the eager step's (the B=3, 64-slot graph is reused)
    ids = torch.tensor([p[:20] for p in prompts])
    with torch.inference_mode():
        cache, ref = KVCache(learned.cfg, 3, 64, static=True), KVCache(learned.cfg, 3, 64)
        compiled.model(ids, kv_cache=cache)
        compiled.model(ids, kv_cache=ref)
        tokens = ids[:, -1]
        for _ in range(5):
            a, b = compiled._decode(compiled.model, tokens, cache), decode_step(compiled.model, tokens, ref)
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            tokens = b.argmax(-1)


@needs_onednn
def test_compiled_engines_of_two_models_of_one_shape_each_follow_their_own_weights(learned):
    # Compiled steps after the first skip the guards that cannot tell graphs apart; two models of the same shape
    # and dtype have separate frozen graphs, and each engine must keep running its own.
    other = tiny(seed=1, max_seq_len=64)
    prompt = [TOK.encode(TEXT[:24])]
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=3)
    engines = [Engine(m, TOK, precision="fp32", compile=c) for m in (learned, other) for c in (False, True)]
    for e in engines:
        e.stop_ids = set()
    first = [e.generate(prompt, params) for e in engines]
    again = [e.generate(prompt, params) for e in reversed(engines)][::-1]  # the other order, graphs all compiled
    assert first == again
    assert first[0] == first[1] and first[2] == first[3]
    assert first[0] != first[2]  # the two models do differ


@pytest.mark.skipif(native_kernels() is None or not native_kernels().has_pairs(),
                    reason="no AVX-512 BF16 here: bf16 layers keep oneDNN's products (and decode is fp32)")
def test_bf16_products_by_the_pairs_kernel_equal_onednns_eager_and_compiled(learned):
    """On a CPU with AVX-512 BF16 a packed bf16 copy multiplies decode rows (one, and a batch of three) with the
    engine's bf16 dot-product kernel: its greedy tokens are oneDNN's, and its logits within bf16's rounding of
    oneDNN's, eager against eager and compiled against compiled (a compiled step rounds at other places than an
    eager one, kernel or not: up to 0.375 apart with oneDNN alone, at logits of ~15)."""
    fast = decode_model(learned, torch.bfloat16, CPU, pack=True)
    onednn = decode_model(learned, torch.bfloat16, CPU, pack=True, native=False)
    layers = [m for m in fast.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.pairs is not None and m.plain is None for m in layers)
    step = compiled_decode_step()
    for rows in (1, 3):
        prompt = torch.tensor([TOK.encode(TEXT[i:i + 20]) for i in range(rows)])
        with torch.inference_mode():
            caches = [KVCache(learned.cfg, rows, 64, dtype=torch.bfloat16, static=static) for static in (0, 0, 1, 1)]
            models = (fast, onednn, fast, onednn)
            logits = [m(prompt, kv_cache=c)[:, -1].float() for m, c in zip(models, caches)]
            for _ in range(12):
                tokens = logits[1].argmax(-1)
                assert all(torch.equal(x.argmax(-1), tokens) for x in logits)
                logits = [(step if c.static else decode_step)(m, tokens, c).float() for m, c in zip(models, caches)]
                # bf16 keeps 8 bits of mantissa: ~2% of the logits' range
                for mine, theirs in ((logits[0], logits[1]), (logits[2], logits[3])):
                    assert (mine - theirs).abs().max() <= 0.02 * theirs.abs().max()


@needs_onednn
def test_one_row_products_by_the_cpp_kernel_equal_onednns_eager_and_compiled(learned):
    """A packed fp32 copy multiplies one row with the engine's C++ product (where it builds): its greedy tokens are
    the plain model's, and the compiled one-row step's logits the eager step's."""
    fast = decode_model(learned, torch.float32, CPU, pack=True)
    onednn = decode_model(learned, torch.float32, CPU, pack=True, native=False)
    layers = [m for m in fast.modules() if isinstance(m, PackedLinear)]
    assert layers and all((m.plain is not None) == (native_kernels() is not None) for m in layers)
    prompt = torch.tensor([TOK.encode(TEXT[:20])])
    step = compiled_decode_step()
    with torch.inference_mode():
        caches = [KVCache(learned.cfg, 1, 64), KVCache(learned.cfg, 1, 64), KVCache(learned.cfg, 1, 64, static=True)]
        logits = [m(prompt, kv_cache=c)[:, -1] for m, c in zip((fast, onednn, fast), caches)]
        for _ in range(12):
            tokens = logits[1].argmax(-1)
            assert all(torch.equal(x.argmax(-1), tokens) for x in logits)
            logits = [decode_step(fast, tokens, caches[0]), decode_step(onednn, tokens, caches[1]),
                      step(fast, tokens, caches[2])]
            torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(logits[2], logits[0], atol=1e-4, rtol=1e-4)


def test_cache_buckets_hold_the_request_and_waste_at_most_a_third():
    sizes = [cache_bucket(n) for n in range(1, 5000)]
    assert sorted(set(sizes))[:7] == [256, 384, 512, 768, 1024, 1536, 2048]
    assert all(s >= n and (n <= 256 or s < 1.5 * n) for n, s in zip(range(1, 5000), sizes))


def run_out(engine: Engine, batch) -> None:
    while batch.running:
        engine.step(batch)
        engine.remove(batch, *(r for r in batch.rows if r.done))


@needs_onednn
def test_compiled_engine_with_joining_rows_and_new_weights_equals_eager(learned):
    # A row runs alone (a B=1 graph), a shorter prompt joins it (B=2, compiled again), the longer-lived row runs
    # on alone (the B=1 graph, reused); then the model trains on and load_weights replaces the frozen graphs,
    # which let go of the old weights.
    model = copy.deepcopy(learned)
    eager, compiled = Engine(model, TOK, precision="fp32"), Engine(model, TOK, precision="fp32", compile=True)
    eager.stop_ids = compiled.stop_ids = set()
    first, second = TOK.encode(TEXT[:30]), TOK.encode(TEXT[40:50])
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (24, 8)]

    def joined(engine: Engine) -> list[list[int]]:
        batch = engine.new_batch()
        a = engine.add(batch, first, params[0])
        for _ in range(4):
            engine.step(batch)
        b = engine.add(batch, second, params[1])
        run_out(engine, batch)
        return [a.ids, b.ids]

    got = joined(compiled)
    assert [len(ids) for ids in got] == [24, 8] and got == joined(eager)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    ids = torch.tensor([TOK.encode(TEXT[::-1][:60])])
    nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()
    model.eval()
    prompt = [TOK.encode(TEXT[:24])]
    old = compiled.generate(prompt, params[0])
    frozen = weakref.ref(compiled.model.tok_emb.weight)  # a constant of the compiled graphs
    compiled.load_weights(model)
    gc.collect()
    assert frozen() is None  # the graphs that froze the old weights are gone, and the weights with them
    new = compiled.generate(prompt, params[0])
    assert new == Engine(model, TOK, precision="fp32").generate(prompt, params[0])
    assert new != old  # the step moved the greedy output, and the compiled engine followed it


# ---- weight-only quantized layers: ATen's kernels against F.linear on the dequantized weight ----

@pytest.mark.parametrize("bits, group_size", [(8, 0), (4, 32), (4, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_kernels_equal_f_linear_on_the_dequantized_weight(bits, group_size, bias):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(128, 96, bias=bias), bits, group_size)
    fast = Int8PackedLinear(layer) if bits == 8 else Int4PackedLinear(layer)
    w = layer.dequantize()
    for shape in [(1, 128), (8, 128), (2, 5, 128)]:
        x = torch.randn(shape)
        # the kernels take x in bf16 (see quant_kernel), sum in fp32 and return bf16: one bf16 rounding of the
        # result apart (int4's kernel also computes with the bf16 (scale, zero) in another order)
        want = F.linear(x.bfloat16().float(), w, layer.bias)
        got = fast(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2 ** -8, atol=1e-3 if bits == 8 else 1e-2)
        assert fast(x.bfloat16()).dtype == torch.bfloat16


def test_quant_kernel_follows_what_the_cpu_does():
    def kernel(bits, native, out_features=96, group_size=32, device=CPU):
        return quant_kernel(bits, 128, out_features, group_size, native_bf16=native, device=device)

    assert kernel(8, True) == kernel(8, False) == "int8pack"
    assert kernel(4, True) == "int4pack" and kernel(4, False) == "dequant"
    kernels = native_kernels()
    own = kernels is not None and kernels.vector_isa() != "none"  # the engine's int4 kernels, where they build
    assert quant_kernel(4, 128, 96, 32, native_bf16=False, device=CPU, native=True) == ("int4native" if own
                                                                                        else "dequant")
    assert quant_kernel(4, 96, 96, 32, native_bf16=False, device=CPU, native=True) == "dequant"  # K % 64 != 0
    assert quant_kernel(4, 128, 96, 32, native_bf16=True, device=CPU, native=True) == "int4pack"
    assert kernel(4, True, out_features=100) == kernel(4, True, group_size=16) == "dequant"  # what ATen's accepts
    assert kernel(8, True, device=torch.device("cuda")) == "dequant"


@pytest.mark.parametrize("method, group_size", [("int8", 0), ("int4", 32)])
@pytest.mark.parametrize("native_bf16", [True, False])
def test_quantized_greedy_tokens_equal_the_dequantized_models(learned, method, group_size, native_bf16):
    """The engine's copy of a quantized model (each CPU's choice of kernels) generates what the dequantized fp32
    model does, token for token."""
    quantized = quantize_model(copy.deepcopy(learned), method, group_size)
    reference = dequantize_model(copy.deepcopy(quantized))
    prompt = torch.tensor([TOK.encode(TEXT[:20])])
    runs = []
    for model, native in ((quantized, native_bf16), (reference, None)):
        fast = decode_model(model, torch.float32, CPU, pack=False, native_bf16=native)
        kinds = {type(m).__name__ for m in fast.modules()}
        cache = KVCache(fast.cfg, 1, 64)
        logits, tokens = fast(prompt, kv_cache=cache)[:, -1], []
        for _ in range(12):  # within the 32 positions it learned from
            tokens.append(int(logits.argmax(-1)))
            logits = decode_step(fast, logits.argmax(-1), cache)
        runs.append((tokens, kinds))
    (got, kinds), (want, _) = runs
    # int4 without native bf16: the engine's own int4 kernels where they build (no ATen copy), else dequantized
    int4_native = native_kernels() is not None and native_kernels().vector_isa() != "none"
    expected = ("Int8PackedLinear" if method == "int8" else "Int4PackedLinear" if native_bf16 or int4_native
                else "Linear")
    assert expected in kinds and "QuantLinear" not in kinds
    assert got == want
    assert TOK.decode(want) in TEXT * 3  # the dequantized model still recites what it learned
