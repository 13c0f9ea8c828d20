"""`yunque quantize` (interop/quantize.py): a quantized model dir loads back as the same model, carries the side
files, and exports to GGUF (Q8_0 / Q4_0) and Hugging Face (dequantized); quantizing twice is refused."""

import json

import pytest
import torch

from yunque.config import preset
from yunque.interop.quantize import quantize_dir
from yunque.model.gpt import GPT
from yunque.model.quant import QuantLinear, dequantize_model, quantization_of, quantize_model
from yunque.modeldir import describe, load_model, save_model
from yunque.tokenizer.bpe import byte_tokenizer

TOK = byte_tokenizer()


@pytest.fixture
def float_dir(tmp_path):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=TOK.vocab_size, max_seq_len=64, tie_embeddings=False)).eval()
    save_model(tmp_path / "float", model, TOK)
    (tmp_path / "float" / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 5]}))
    return tmp_path / "float"


@pytest.mark.parametrize("method, group_size", [("int8", 32), ("int4", 32), ("int4", 16)])
def test_a_quantized_dir_loads_back_as_the_same_model(tmp_path, float_dir, method, group_size):
    out = tmp_path / "q"
    assert quantize_dir(float_dir, out, method=method, group_size=group_size) == quantization_of(
        quantize_model(load_model(float_dir)[0], method, group_size))
    model, _ = load_model(out)
    want = quantize_model(load_model(float_dir)[0], method, group_size)
    assert type(model.lm_head) is QuantLinear and quantization_of(model) == quantization_of(want)
    ids = torch.randint(0, TOK.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want(ids), rtol=0, atol=0)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [3, 5]
    assert describe(out)["quantization"].startswith(method)
    int_bytes = (out / "model.safetensors").stat().st_size
    assert int_bytes < (float_dir / "model.safetensors").stat().st_size * (0.5 if method == "int8" else 0.35)


def test_a_tied_model_quantizes_its_head_as_a_copy_and_an_older_dir_without_it_still_loads(tmp_path):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=TOK.vocab_size, max_seq_len=64)).eval()  # tied
    save_model(tmp_path / "float", model, TOK)
    assert quantize_dir(tmp_path / "float", tmp_path / "q", method="int8") == {"method": "int8", "tied_head": True}
    back, _ = load_model(tmp_path / "q")
    assert type(back.lm_head) is QuantLinear and quantization_of(back) == {"method": "int8", "tied_head": True}
    torch.testing.assert_close(back.tok_emb.weight, model.tok_emb.weight, rtol=0, atol=0)
    ids = torch.randint(0, TOK.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), quantize_model(model, "int8")(ids), rtol=0, atol=0)
    # a dir written before tied heads were quantized: its config has no "tied_head", its file no lm_head
    older = quantize_model(load_model(tmp_path / "float")[0], "int8", tied_head=False)
    save_model(tmp_path / "older", older, TOK)
    assert "tied_head" not in json.loads((tmp_path / "older" / "config.json").read_text())["quantization"]
    again, _ = load_model(tmp_path / "older")
    assert again.lm_head.weight is again.tok_emb.weight
    with torch.no_grad():
        torch.testing.assert_close(again(ids), older(ids), rtol=0, atol=0)


def test_quantizing_twice_or_with_a_bad_group_is_refused_and_writes_nothing(tmp_path, float_dir):
    quantize_dir(float_dir, tmp_path / "q", method="int8")
    with pytest.raises(ValueError, match=r"is quantized already \(int8 \(per output channel\)\); quantize its "
                                         r"floating-point original instead"):
        quantize_dir(tmp_path / "q", tmp_path / "qq", method="int4")
    with pytest.raises(ValueError, match=r"--group-size 24 does not divide the 64 inputs of blocks.0.attn.qkv"):
        quantize_dir(float_dir, tmp_path / "bad", method="int4", group_size=24)
    assert not (tmp_path / "qq").exists() and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method, qtype", [("int8", "Q8_0"), ("int4", "Q4_0")])
def test_a_quantized_dir_exports_to_gguf_as_q8_0_or_q4_0_and_to_hf_dequantized(tmp_path, float_dir, method, qtype):
    gguf = pytest.importorskip("gguf")
    from yunque.interop.gguf import export_gguf
    from yunque.interop.hf import export_hf

    quantize_dir(float_dir, tmp_path / "q", method=method)
    quantized, _ = load_model(tmp_path / "q")
    export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    t = tensors["blk.0.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType[qtype]
    got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    want = quantized.blocks[0].mlp.down.dequantize()
    assert (got - want).abs().max() <= want.abs().max() / (127 if method == "int8" else 7) + 1e-6

    export_hf(tmp_path / "q", tmp_path / "hf")
    back, _ = load_model(tmp_path / "hf")
    ids = torch.randint(0, TOK.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), dequantize_model(quantized)(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", [{"method": "int8", "tied_head": "yes"}, {"method": "int5"}, {"method": "int4"}])
def test_a_config_with_a_broken_quantization_scheme_is_one_clear_error(tmp_path, float_dir, scheme):
    quantize_dir(float_dir, tmp_path / "q", method="int8")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "quantization": scheme}))
    with pytest.raises(ValueError, match=r"config.json: \"quantization\" is .*; the model directory is corrupt"):
        load_model(tmp_path / "q")
