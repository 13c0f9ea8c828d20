"""Weight-only quantization (model/quant.py): quantize -> dequantize errors stay within half a step; the layer
computes F.linear on its dequantized weight; which layers are quantized; bad group sizes and double quantization
are one clear error each."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from yunque.config import preset
from yunque.model.gpt import GPT
from yunque.model.quant import (
    QuantLinear,
    dequantize_model,
    pack_int4,
    quant_targets,
    quantization_of,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
)


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=256, max_seq_len=32, **overrides)).eval()


def test_int8_round_trip_is_within_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * torch.linspace(0.01, 3, 96)[:, None]  # rows of very different ranges
    w[5] = 0  # an all-zero row stays zero
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scales.shape == (96,)
    deq = q.float() * scales[:, None]
    assert ((w - deq).abs() <= scales[:, None] / 2 + 1e-7).all()
    assert torch.equal(deq[5], torch.zeros(64))
    assert (w - deq).norm() / w.norm() < 0.01


@pytest.mark.parametrize("group_size", [32, 8])
def test_int4_round_trip_is_within_half_a_step_per_group(group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 64) + torch.linspace(-2, 2, 64)  # groups not centred on zero: min-max earns its zero
    q, scales, zeros = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and q.max() <= 15 and scales.shape == zeros.shape == (48, 64 // group_size)
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    deq = (q.float() - 8) * s + z
    # half a step, plus what rounding the zero to bf16 moved the grid by (at most 2^-8 of it)
    assert ((w - deq).abs() <= s / 2 + z.abs() / 256 + 1e-6).all()
    assert (w - deq).norm() / w.norm() < 0.1


def test_int4_packs_two_values_a_byte_and_back():
    q = torch.randint(0, 16, (8, 10), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (8, 5) and packed[0, 0] & 15 == q[0, 0] and packed[0, 0] >> 4 == q[0, 1]
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("bits, group_size", [(8, 0), (4, 32), (4, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_is_f_linear_on_its_dequantized_weight(bits, group_size, bias):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=bias)
    layer = QuantLinear.from_linear(linear, bits, group_size)
    w = layer.dequantize()
    assert (w - linear.weight).abs().max() < (0.01 if bits == 8 else 0.1)
    for shape in [(1, 64), (2, 5, 64)]:
        x = torch.randn(shape)
        torch.testing.assert_close(layer(x), F.linear(x, w, linear.bias), rtol=0, atol=0)


def test_the_blocks_linears_and_the_head_are_quantized_a_tied_head_as_a_copy():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    blocks = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")]
    assert [name for name, *_ in quant_targets(tied)] == [*blocks, "lm_head"]
    assert [name for name, *_ in quant_targets(tied, tied_head=False)] == blocks
    assert [name for name, *_ in quant_targets(untied, tied_head=False)][-1] == "lm_head"
    embedding = tied.tok_emb.weight.detach().clone()
    quantize_model(tied, "int4", 32)
    assert quantization_of(tied) == {"method": "int4", "group_size": 32, "tied_head": True}
    assert type(tied.lm_head) is QuantLinear and type(tied.tok_emb.weight) is nn.Parameter
    torch.testing.assert_close(tied.tok_emb.weight, embedding, rtol=0, atol=0)  # the lookup stays in float
    assert (tied.lm_head.dequantize() - embedding).abs().max() > 0  # the head is the quantized copy
    assert all(type(layer) is QuantLinear for *_, layer in quant_targets(tied))
    assert quantization_of(quantize_model(untied, "int8")) == {"method": "int8"}  # no tie: nothing to say
    old = quantize_model(tiny(), "int4", 32, tied_head=False)  # as quantized before tied heads were
    assert quantization_of(old) == {"method": "int4", "group_size": 32}
    assert type(old.lm_head) is nn.Linear and old.lm_head.weight is old.tok_emb.weight


def test_dequantized_model_gives_the_quantized_models_logits():
    model = quantize_model(tiny(tie_embeddings=False), "int4", 32)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        want = model(ids)
        got = dequantize_model(model)(ids)
    assert quantization_of(model) is None
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_input_is_one_clear_error():
    model = tiny()  # inputs: 64 (d_model) and 192 (ff_dim); 40 divides neither
    with pytest.raises(ValueError, match=r"--group-size 40 does not divide the 64 inputs of blocks.0.attn.qkv; "
                                         r"choose one that does, e.g. 32"):
        quantize_model(model, "int4", 40)
    assert quantization_of(model) is None  # checked before any layer changed
    with pytest.raises(ValueError, match="--group-size must be an even number"):
        quantize_model(model, "int4", 1)
    with pytest.raises(ValueError, match=r"unknown quantization 'int3'; choose one of int8, int4"):
        quantize_model(model, "int3")
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match=r"quantized already \(int8 \(per output channel\)\); quantize its "
                                         r"floating-point original"):
        quantize_model(model, "int4")
