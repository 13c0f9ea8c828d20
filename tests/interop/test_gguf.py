"""GGUF export, read back with the `gguf` package's own reader: names, shapes, types, metadata and values."""

import json
import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from yunque.config import preset
from yunque.interop.gguf import export_gguf, permute_rope
from yunque.model.gpt import GPT, apply_rope, rope_frequencies
from yunque.modeldir import save_model
from yunque.tokenizer.bpe import train_bpe
from yunque.tokenizer.chat import yunque_template

Q = gguf.GGMLQuantizationType
MODELS = {
    "llama": ("tiny", {"n_kv_head": 2, "tie_embeddings": False}),
    "llama3-rope": ("tiny", {"rope_scaling": {"rope_type": "llama3", "factor": 4.0,
                                              "original_max_position_embeddings": 32}}),
    "qwen2": ("tiny", {"qkv_bias": True, "n_kv_head": 2}),
    "qwen3": ("tiny", {"qk_norm": True, "head_dim": 32}),
    "gpt2": ("gpt2-tiny", {}),
}


@pytest.fixture(scope="module")
def tok(shared_data):
    return train_bpe([(shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000]], 400)


def value(reader, key):
    return reader.fields[key].contents()


def model_dir(tmp_path, tok, kind) -> tuple[GPT, object]:
    name, overrides = MODELS[kind]
    torch.manual_seed(0)
    model = GPT(preset(name, vocab_size=tok.vocab_size, **overrides)).eval()
    save_model(tmp_path / "model", model, tok)
    return model, tmp_path / "model"


def expected_tensors(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """llama.cpp's names for each tensor, written out by hand (not by the code under test)."""
    cfg, sd = model.cfg, model.state_dict()
    H, K, D, F = cfg.n_head, cfg.kv_heads, cfg.dim_head, cfg.ff_dim
    out = {"token_embd.weight": sd["tok_emb.weight"], "output_norm.weight": sd["norm_f.weight"]}
    if not cfg.tie_embeddings or arch == "gpt2":
        out["output.weight"] = sd["lm_head.weight"]
    if arch == "gpt2":
        out["position_embd.weight"] = sd["pos_emb.weight"]
        out["output_norm.bias"] = sd["norm_f.bias"]
    for i in range(cfg.n_layer):
        b, blk = f"blocks.{i}.", f"blk.{i}."
        out[blk + "attn_norm.weight"] = sd[b + "norm1.weight"]
        out[blk + "ffn_norm.weight"] = sd[b + "norm2.weight"]
        out[blk + "attn_output.weight"] = sd[b + "attn.proj.weight"]
        out[blk + "ffn_down.weight"] = sd[b + "mlp.down.weight"]
        if arch == "gpt2":
            for ours, theirs in (("norm1", "attn_norm"), ("norm2", "ffn_norm"), ("attn.qkv", "attn_qkv"),
                                 ("attn.proj", "attn_output"), ("mlp.up", "ffn_up"), ("mlp.down", "ffn_down")):
                out[f"{blk}{theirs}.bias"] = sd[f"{b}{ours}.bias"]
            out[blk + "attn_qkv.weight"] = sd[b + "attn.qkv.weight"]
            out[blk + "ffn_up.weight"] = sd[b + "mlp.up.weight"]
            continue
        q, k, v = sd[b + "attn.qkv.weight"].split([H * D, K * D, K * D])
        if arch == "llama":
            q, k = permute_rope(q, H), permute_rope(k, K)
        out.update({blk + "attn_q.weight": q, blk + "attn_k.weight": k, blk + "attn_v.weight": v})
        out[blk + "ffn_gate.weight"], out[blk + "ffn_up.weight"] = sd[b + "mlp.up.weight"].split([F, F])
        if cfg.qkv_bias:
            for n, t in zip("qkv", sd[b + "attn.qkv.bias"].split([H * D, K * D, K * D])):
                out[f"{blk}attn_{n}.bias"] = t
        if cfg.qk_norm:
            out[blk + "attn_q_norm.weight"] = sd[b + "attn.q_norm.weight"]
            out[blk + "attn_k_norm.weight"] = sd[b + "attn.k_norm.weight"]
    return out


def llama3_rope_factors(cfg) -> list[float]:
    """The factors llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors) computes, restated."""
    s, D = cfg.rope_scaling, cfg.dim_head
    factor, lo, hi, old = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0), \
        s["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_export_reads_back_with_expected_names_shapes_types_and_values(tmp_path, tok, kind, dtype):
    model, path = model_dir(tmp_path, tok, kind)
    cfg = model.cfg
    export_gguf(path, tmp_path / "model.gguf", dtype=dtype)
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    arch = kind.split("-")[0] if kind != "llama3-rope" else "llama"

    # metadata
    assert value(reader, "general.architecture") == arch
    assert value(reader, "general.name") == "model"
    assert value(reader, f"{arch}.context_length") == cfg.max_seq_len
    assert value(reader, f"{arch}.embedding_length") == cfg.d_model
    assert value(reader, f"{arch}.block_count") == cfg.n_layer
    assert value(reader, f"{arch}.feed_forward_length") == cfg.ff_dim
    assert value(reader, f"{arch}.attention.head_count") == cfg.n_head
    if arch == "gpt2":
        assert value(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(cfg.norm_eps)
    else:
        assert value(reader, f"{arch}.attention.head_count_kv") == cfg.kv_heads
        assert value(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
        assert value(reader, f"{arch}.rope.freq_base") == cfg.rope_theta
        assert value(reader, f"{arch}.rope.dimension_count") == cfg.dim_head
        assert value(reader, f"{arch}.attention.key_length") == cfg.dim_head
    assert value(reader, "tokenizer.ggml.model") == "gpt2"
    assert value(reader, "tokenizer.ggml.pre") == "gpt-2"
    vocab = tok.inner.get_vocab(with_added_tokens=True)
    assert value(reader, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    types = value(reader, "tokenizer.ggml.token_type")
    assert types[tok.eos_id] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    assert len(value(reader, "tokenizer.ggml.merges")) == tok.vocab_size - 256 - 7
    assert value(reader, "tokenizer.ggml.merges")[0] == "Ġ t"
    # a yunque tokenizer has the chat tokens: the end of a turn is where llama.cpp stops, and the template is ours
    assert (value(reader, "tokenizer.ggml.bos_token_id"), value(reader, "tokenizer.ggml.eos_token_id"),
            value(reader, "tokenizer.ggml.padding_token_id")) == (tok.bos_id, tok.special_ids["<|end|>"], tok.pad_id)
    assert value(reader, "tokenizer.ggml.eot_token_id") == tok.special_ids["<|end|>"]
    assert value(reader, "tokenizer.ggml.add_bos_token") is True
    assert value(reader, "tokenizer.chat_template") == yunque_template().source

    # tensors
    expected = expected_tensors(model, arch)
    if kind == "llama3-rope":
        expected["rope_freqs.weight"] = torch.tensor(llama3_rope_factors(cfg))
    tensors = {t.name: t for t in reader.tensors}
    assert tensors.keys() == expected.keys()
    matrix_type = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[dtype]
    for name, want in expected.items():
        t = tensors[name]
        assert list(t.shape) == list(want.shape)[::-1], name  # GGUF lists dimensions innermost first
        assert t.tensor_type == (matrix_type if want.dim() == 2 else Q.F32), name
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(want.shape)
        if name == "rope_freqs.weight":
            torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        elif dtype == "f32" or want.dim() == 1:
            assert torch.equal(got, want), name
        elif dtype == "f16":
            assert torch.equal(got, want.half().float()), name
        elif dtype == "bf16":
            assert torch.equal(got, want.bfloat16().float()), name
        elif dtype == "q8_0":  # 8-bit values with one scale per 32
            assert (got - want).abs().max() <= want.abs().max() / 127 + 1e-6, name
        else:  # q4_0: 4-bit values -8..7 with one scale per 32 (the block's largest magnitude is -8 steps)
            assert (got - want).abs().max() <= want.abs().max() / 7 + 1e-6, name


def test_permutation_turns_rotate_half_rope_into_llama_cpp_interleaved_rope():
    """Attention scores are unchanged when permuted q/k weights meet adjacent-pair rotary (llama.cpp's "llama")."""
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=300, n_kv_head=2)
    H, D, T, C = cfg.n_head, cfg.dim_head, 7, cfg.d_model
    wq, x = torch.randn(H * D, C, dtype=torch.float64), torch.randn(T, C, dtype=torch.float64)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * rope_frequencies(cfg).double()  # (T, D/2)

    # ours: halves rotated against each other
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    q = apply_rope((x @ wq.T).view(T, H, D).transpose(0, 1), cos, sin)  # (H, T, D)

    # llama.cpp's: element pairs (2j, 2j+1) rotated by angle j
    p = (x @ permute_rope(wq, H).T).view(T, H, D // 2, 2).transpose(0, 1)
    c, s = angles.cos(), angles.sin()
    q_cpp = torch.stack((p[..., 0] * c - p[..., 1] * s, p[..., 0] * s + p[..., 1] * c), -1).flatten(-2)

    # the same vectors, up to the same reordering of coordinates in every head: dot products agree
    torch.testing.assert_close(q @ q.transpose(-1, -2), q_cpp @ q_cpp.transpose(-1, -2))
    order = permute_rope(torch.arange(D), 1)
    torch.testing.assert_close(q[..., order], q_cpp)


# transformers' own GGUF reader undoes llama.cpp's q/k reordering, so it checks names, layout and vocabulary
# independently. It reads neither rope_freqs (llama3 scaling) nor key_length (qwen3), nor GPT-2's context length:
# those cases are left out or given the values it assumes.
READABLE_BY_TRANSFORMERS = {
    "llama": ("tiny", {"n_kv_head": 2, "tie_embeddings": False}),
    "qwen2": ("tiny", {"qkv_bias": True, "n_kv_head": 2}),
    "qwen3": ("tiny", {"qk_norm": True, "head_dim": 128, "n_kv_head": 2}),
    "gpt2": ("gpt2-tiny", {"max_seq_len": 1024}),
}


@pytest.mark.parametrize("kind", list(READABLE_BY_TRANSFORMERS))
def test_transformers_reads_the_gguf_back_with_identical_logits(tmp_path, tok, kind, shared_data, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    transformers.logging.set_verbosity_error()
    name, overrides = READABLE_BY_TRANSFORMERS[kind]
    torch.manual_seed(0)
    model = GPT(preset(name, vocab_size=tok.vocab_size, **overrides)).eval()
    with torch.no_grad():  # move norm gains and biases off 1 and 0 so that every tensor matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_model(tmp_path, model, tok)
    export_gguf(tmp_path, tmp_path / "model.gguf", dtype="f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert hf.config.model_type == kind
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:2000]
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    ids = torch.tensor([tok.encode(text[:200])])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-5)

def test_bad_dtype_and_inexpressible_configs_are_refused(tmp_path, tok):
    _, path = model_dir(tmp_path, tok, "llama")
    with pytest.raises(ValueError, match="dtype must be one of f32, f16, bf16, q8_0, q4_0, q4_1, got 'q4'"):
        export_gguf(path, tmp_path / "m.gguf", dtype="q4")
    save_model(tmp_path / "mixed", GPT(preset("tiny", vocab_size=tok.vocab_size, pos="learned")), tok)
    with pytest.raises(ValueError, match="mix GPT-2 and Llama parts"):
        export_gguf(tmp_path / "mixed", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_an_existing_file_is_replaced_only_with_force(tmp_path, tok):
    _, path = model_dir(tmp_path, tok, "llama")
    (tmp_path / "m.gguf").write_bytes(b"mine")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'm.gguf'} already exists \\(a file\\); pass --force"):
        export_gguf(path, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"mine"
    with pytest.raises(ValueError, match="is a directory; name the .gguf file to write"):
        export_gguf(path, tmp_path, force=True)
    export_gguf(path, tmp_path / "m.gguf", dtype="f32", force=True)
    assert gguf.GGUFReader(tmp_path / "m.gguf").tensors


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(tmp_path, tok):
    save_model(tmp_path, GPT(preset("tiny", vocab_size=tok.vocab_size, d_model=48)), tok)
    export_gguf(tmp_path, tmp_path / "model.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == Q.F16  # rows of 48
    assert types["blk.0.ffn_down.weight"] == Q.Q8_0  # rows of 128


def test_chat_template_and_named_special_tokens_come_from_tokenizer_config(tmp_path, tok):
    """A model imported from Hugging Face keeps tokenizer_config.json: its template and tokens reach llama.cpp."""
    _, path = model_dir(tmp_path, tok, "llama")
    template = "{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}"
    config = {"chat_template": [{"name": "default", "template": template}], "eos_token": {"content": "<|end|>"}}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    export_gguf(path, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    assert value(reader, "tokenizer.chat_template") == template
    assert value(reader, "tokenizer.ggml.eos_token_id") == tok.special_ids["<|end|>"]
    assert value(reader, "tokenizer.ggml.bos_token_id") == tok.bos_id
