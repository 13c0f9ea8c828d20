"""The yunque <-> Hugging Face tensor-name table, against names written out by hand from transformers' models."""

import pytest

from yunque.config import preset
from yunque.interop.hf_layout import layout
from yunque.model.gpt import meta_model


def test_llama_layout_splits_fused_projections_into_transformers_names():
    cfg = preset("tiny", vocab_size=300, n_layer=1, n_kv_head=2, tie_embeddings=False)
    plan = {t.name: t for t in layout(meta_model(cfg))}
    q, kv, ff = cfg.n_head * cfg.dim_head, cfg.kv_heads * cfg.dim_head, cfg.ff_dim
    qkv = plan["blocks.0.attn.qkv.weight"]
    assert qkv.hf == ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                      "model.layers.0.self_attn.v_proj.weight")
    assert qkv.rows == (q, kv, kv) and not qkv.transpose
    up = plan["blocks.0.mlp.up.weight"]
    assert up.hf == ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight")
    assert up.rows == (ff, ff)  # gate first: yunque's SwiGLU takes silu of the first half
    assert {n: t.hf for n, t in plan.items() if len(t.hf) == 1} == {
        "tok_emb.weight": ("model.embed_tokens.weight",), "norm_f.weight": ("model.norm.weight",),
        "lm_head.weight": ("lm_head.weight",), "blocks.0.norm1.weight": ("model.layers.0.input_layernorm.weight",),
        "blocks.0.norm2.weight": ("model.layers.0.post_attention_layernorm.weight",),
        "blocks.0.attn.proj.weight": ("model.layers.0.self_attn.o_proj.weight",),
        "blocks.0.mlp.down.weight": ("model.layers.0.mlp.down_proj.weight",)}


@pytest.mark.parametrize("prefix", ["transformer.", ""])  # the Hub's own gpt2 checkpoint has no prefix
def test_gpt2_layout_transposes_conv1d_weights_only(prefix):
    cfg = preset("gpt2-tiny", vocab_size=300, n_layer=1)
    plan = {t.name: t for t in layout(meta_model(cfg), gpt2_prefix=prefix)}
    assert plan["blocks.0.attn.qkv.weight"].hf == (f"{prefix}h.0.attn.c_attn.weight",)
    transposed = sorted(n for n, t in plan.items() if t.transpose)
    assert transposed == ["blocks.0.attn.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.down.weight",
                          "blocks.0.mlp.up.weight"]
    assert plan["pos_emb.weight"].hf == (f"{prefix}wpe.weight",)
    assert plan["blocks.0.norm1.bias"].hf == (f"{prefix}h.0.ln_1.bias",)
    assert "lm_head.weight" not in plan  # tied: stored once, as the embedding
