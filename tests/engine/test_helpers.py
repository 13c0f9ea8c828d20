"""Twin tests of the kernels' own threads (kernels.cpp, `pool::parallel_for`) against OpenMP's (at::parallel_for).

Every kernel gives the same bits with its loops on the library's helper threads as on OpenMP's team, at one, two
and three threads; callers on several Python threads at once each get their own results (one holds the helpers,
the others run on OpenMP); a forked child (where the parent's helpers do not exist) computes the same. The engine
decodes on the helpers where its step runs its own kernels alone (`helper_rows`), and the same tokens as on
OpenMP's team.
"""

import multiprocessing
import threading

import pytest
import torch

from yunque.config import LoraConfig, preset
from yunque.engine import native
from yunque.engine.cpu import NATIVE_ROWS, PAIR_ROWS, decode_model, helper_rows
from yunque.engine.engine import Engine, SamplingParams
from yunque.model.gpt import GPT
from yunque.model.lora import LoRAOver, attach_lora, lora_state_dict
from yunque.model.quant import QuantLinear
from yunque.tokenizer import byte_tokenizer

CPU = torch.device("cpu")
TOK = byte_tokenizer()
kernels = native.native_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="the engine's C++ kernels did not build here (no C++ "
                                "compiler or Python headers)")


def every_kernel() -> dict[str, torch.Tensor]:
    """Each kernel once on inputs large enough to be cut into chunks, with a fixed seed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 384, generator=g)
    w = torch.randn(3000, 384, generator=g)
    out = {
        "rows_linear f32": torch.ops.yunque.rows_linear(x[:1], w, None),
        "rows_linear bf16": torch.ops.yunque.rows_linear(x[:1].bfloat16(), w.bfloat16(), None),
        "rows_linear int8": torch.ops.yunque.rows_linear(x[:1], w.to(torch.int8), torch.rand(3000, generator=g)),
        "gelu_tanh": torch.ops.yunque.gelu_tanh(torch.randn(64, 4096, generator=g).bfloat16()),
        "layer_norm": torch.ops.yunque.layer_norm(torch.randn(300, 384, generator=g), w[0], w[1], 1e-5),
        "sample_rows": torch.ops.yunque.sample_rows(torch.randn(16, 50257, generator=g), torch.rand(16, generator=g),
                                                    1.0),
    }
    q, k, v = (torch.randn(16, 6, 128 if t else 1, 64, generator=g) for t in (0, 1, 1))
    out["decode_attention"] = torch.ops.yunque.decode_attention(q.view(16, 6, 64), k.bfloat16(), v.bfloat16(), None,
                                                                None, 0.125)
    linear = torch.nn.Linear(384, 3000, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = QuantLinear.from_linear(linear, 4, 32)
    args = (layer.qweight, layer.scales, layer.zeros, 32)
    out["rows_int4"] = torch.ops.yunque.rows_int4(x[:1], *args)
    out["dense_int4"] = torch.ops.yunque.dense_int4(x, *args)
    if kernels.has_pairs():
        packed = torch.ops.yunque.pack_pairs(w.bfloat16())
        for rows in (1, 3, 16):
            out[f"pairs_linear {rows}"] = torch.ops.yunque.pairs_linear(x[:rows].bfloat16(), packed, None, 3000)
    return out


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
    kernels.set_helpers(False)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_every_kernel_gives_the_same_bits_on_helpers_as_on_openmp(threads, n):
    threads(n)
    assert kernels.set_helpers(False) is False  # OpenMP's team is the default
    openmp = every_kernel()
    with native.helpers():
        helpers = every_kernel()
        again = every_kernel()
    assert kernels.set_helpers(False) is False  # the block gave the thread its setting back
    assert helpers.keys() == openmp.keys()
    for name in openmp:
        assert torch.equal(helpers[name], openmp[name]), name
        assert torch.equal(again[name], openmp[name]), f"{name}, again"


def test_callers_on_several_threads_each_get_their_own_results(threads):
    threads(2)
    want = every_kernel()
    failures: list[str] = []

    def call() -> None:
        kernels.set_helpers(True)  # this thread's setting: all four ask for the helpers
        for _ in range(5):
            got = every_kernel()
            failures.extend(name for name in want if not torch.equal(got[name], want[name]))

    callers = [threading.Thread(target=call) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in callers), "a caller is stuck"
    assert failures == []


def pool_only(x: torch.Tensor, w: torch.Tensor, logits: torch.Tensor, u: torch.Tensor) -> list:
    """Kernels whose loops are all the module's own, on inputs made beforehand: a forked child cannot run OpenMP
    (libgomp's team does not survive a fork: a torch operation on many elements waits for ever there)."""
    return [torch.ops.yunque.rows_linear(x, w, None).tolist(), torch.ops.yunque.sample_rows(logits, u, 1.0).tolist()]


def _child(queue, inputs) -> None:
    kernels.set_helpers(True)
    queue.put(pool_only(*inputs))


def test_a_forked_child_computes_the_same_without_its_parents_helpers(threads):
    threads(2)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 384, generator=g), torch.randn(3000, 384, generator=g),
              torch.randn(16, 50257, generator=g), torch.rand(16, generator=g))
    with native.helpers():
        want = pool_only(*inputs)  # the parent's helpers exist before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue, inputs))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert got == want


def gpt2(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("gpt2-tiny", vocab_size=TOK.vocab_size, **changes)).eval()


def test_a_step_takes_the_helpers_where_the_engine_s_own_kernels_run_it_alone():
    """bf16 with AVX-512 BF16: products, attention, GELU and layer norms are all the engine's up to PAIR_ROWS rows,
    and a SwiGLU block's elementwise work runs on one thread up to ATen's grain; fp32: products of more than one
    row are oneDNN's; heads of a size the attention kernel is not built for, plain products (not packed) and LoRA
    adapters' products are PyTorch's."""
    if kernels.has_pairs():
        assert helper_rows(decode_model(gpt2(), torch.bfloat16, CPU)) == PAIR_ROWS
        # a SwiGLU block's SiLU and product are ATen's, on OpenMP's team from 32,768 values: 16 rows of 2,048
        llama = GPT(preset("tiny", vocab_size=TOK.vocab_size, d_ff=2048)).eval()
        assert helper_rows(decode_model(llama, torch.bfloat16, CPU)) == 16
    fp32 = decode_model(gpt2(), torch.float32, CPU)
    assert helper_rows(fp32) == NATIVE_ROWS
    assert helper_rows(decode_model(gpt2(), torch.float32, CPU, pack=False)) == 0
    assert helper_rows(decode_model(gpt2(d_model=36), torch.float32, CPU)) == 0  # heads of 9
    assert helper_rows(decode_model(gpt2(), torch.float32, CPU, native=False)) == 0
    qkv = fp32.blocks[0].attn.qkv
    fp32.blocks[0].attn.qkv = LoRAOver(qkv, torch.zeros(4, qkv.in_features), torch.zeros(qkv.out_features, 4), 1.0)
    assert helper_rows(fp32) == 0


def test_the_engine_s_helper_rows_follow_the_model_it_decodes_with():
    """An adapter served over the engine's model puts PyTorch's products into the step (no helpers for that
    engine, the base's unchanged); weights loaded again give the new copy its own figure."""
    model = gpt2(d_model=384, n_head=6, n_layer=3)  # 5.3M parameters: packed products in fp32 (see SMALL_MODEL)
    engine = Engine(model, TOK, precision="fp32")
    assert engine.helper_rows == helper_rows(engine.model) == NATIVE_ROWS
    lora = LoraConfig(rank=4, alpha=8, targets=("qkv",))
    trained = gpt2(d_model=384, n_head=6, n_layer=3)
    attach_lora(trained, lora)
    adapted = engine.with_adapter(lora_state_dict(trained), lora)
    assert adapted.helper_rows == 0 and engine.helper_rows == NATIVE_ROWS
    engine.helper_rows = -1  # anything stale is replaced
    engine.load_weights(model)
    assert engine.helper_rows == NATIVE_ROWS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_engine_decodes_the_same_tokens_on_helpers_as_on_openmp(threads, dtype):
    """A batch of three and one row alone, sampled with a seed: the same tokens with the step's loops on the
    helpers (the engine's choice where `helper_rows` allows) as on OpenMP's team."""
    threads(2)
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    if dtype == torch.bfloat16 and not kernels.has_pairs():
        pytest.skip("no AVX-512 BF16: a bf16 step is oneDNN's, so it never takes the helpers")
    # 5.3M parameters: packed products in fp32 too (see SMALL_MODEL)
    on, off = (Engine(gpt2(d_model=384, n_head=6, n_layer=3), TOK, precision=precision) for _ in range(2))
    off.helper_rows = 0
    assert on.helper_rows > 0
    assert Engine(gpt2(d_model=384, n_head=6, n_layer=3), TOK, precision=precision, compile=True).helper_rows == 0
    prompts = [TOK.encode(t) for t in ("Hola, mundo", "The capital of France is", "1, 2, 3,")]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3)
    assert on.generate(prompts, params) == off.generate(prompts, params)
    assert on.generate(prompts[:1], params) == off.generate(prompts[:1], params)
