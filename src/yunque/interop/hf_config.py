"""Hugging Face config.json <-> yunque's ModelConfig: model types, rotary scaling, sliding windows.

transformers names the same sizes differently per family (GPT-2's n_embd, n_layer, n_head; the Llama family's
hidden_size, num_hidden_layers, num_attention_heads) and has moved rotary settings between versions (4: rope_theta
and rope_scaling; 5: rope_parameters). This module reads both and writes keys that transformers 4 and 5 and
llama.cpp's converter read.
"""

from __future__ import annotations

from typing import Any

import torch

from yunque.config import ModelConfig

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
"""HF model_type -> architecture class, for every model type yunque reads. SmolLM2 and TinyLlama are "llama"."""


def model_type_of(hf: dict[str, Any]) -> str | None:
    """An HF config's model_type; for old configs that name only the class, the type of a class yunque reads."""
    kind = hf.get("model_type")
    if kind is None:
        kind = next((k for k, a in ARCHITECTURES.items() if a in (hf.get("architectures") or [])), None)
    return kind


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """yunque's ModelConfig for an HF config.json; ValueError for a model type or an option yunque cannot run."""
    kind = model_type_of(hf)
    if kind not in ARCHITECTURES:
        raise ValueError(f"model_type {kind!r} is not supported; yunque reads {', '.join(ARCHITECTURES)} "
                         f"(SmolLM2 and TinyLlama are llama)")
    try:
        return _gpt2_config(hf) if kind == "gpt2" else _llama_config(hf, kind)
    except KeyError as e:
        raise ValueError(f"config.json of a {kind} model has no {e.args[0]!r}") from None


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function {act!r} is not supported; yunque's GPT-2 MLP is GELU with the "
                         f"tanh approximation (gelu_new)")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(key, want) != want:
            raise ValueError(f"GPT-2 option {key}={hf[key]} is not supported; yunque runs {key}={want}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["n_embd"],
        d_ff=hf.get("n_inner"), max_seq_len=hf.get("n_positions") or hf["n_ctx"], pos="learned", norm="layernorm",
        mlp="gelu", bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def _llama_config(hf: dict[str, Any], kind: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; yunque's SwiGLU uses silu")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported; yunque's SwiGLU MLP has no biases")
    if kind != "qwen2" and hf.get("attention_bias"):
        raise ValueError("attention_bias=true (biases on q, k, v and the output projection) is not supported; "
                         "yunque has biases on q, k, v only (Qwen2)")
    d, H = hf["hidden_size"], hf["num_attention_heads"]
    K = hf.get("num_key_value_heads") or H
    head_dim = hf.get("head_dim")
    if head_dim == d // H and d % H == 0:
        head_dim = None  # the default: keeps the config as yunque itself would write it
    max_len = hf.get("max_position_embeddings", 2048)
    window = _sliding_window(hf, kind)
    if window is not None and window < max_len:
        max_len = window  # within the window, sliding-window attention is full causal attention: exact, not approximate
    theta, scaling = _rope(hf)
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=H, n_kv_head=None if K == H else K,
        d_model=d, d_ff=hf["intermediate_size"], head_dim=head_dim,
        max_seq_len=max_len, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=kind == "qwen2",
        qk_norm=kind == "qwen3", tie_embeddings=hf.get("tie_word_embeddings", False),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling)


def _sliding_window(hf: dict[str, Any], kind: str) -> int | None:
    """Mistral's attention window, or Qwen's when it is switched on; None when attention is full."""
    if kind == "mistral":
        return hf.get("sliding_window")
    if kind in ("qwen2", "qwen3") and (hf.get("use_sliding_window")
                                       or "sliding_attention" in (hf.get("layer_types") or [])):
        return hf.get("sliding_window")
    return None


def _rope(hf: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, yunque rope_scaling) from transformers 4 keys (rope_theta, rope_scaling) or 5 (rope_parameters)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, {"rope_type": "llama3", **{k: scaling[k] for k in keys if k in scaling}}
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": scaling["factor"]}
    raise ValueError(f"rope scaling {kind!r} is not supported; yunque runs 'llama3' and 'linear' scaling, or none")


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF model_type that can hold `cfg` ("gpt2", "llama", "qwen2" or "qwen3"); ValueError saying why if none."""
    parts = (cfg.pos, cfg.norm, cfg.mlp)
    why = []
    if parts == ("learned", "layernorm", "gelu"):
        kind = "gpt2"
        if not cfg.bias:
            why.append("GPT-2 has biases in every linear layer and norm, but bias=False")
        if cfg.kv_heads != cfg.n_head:
            why.append(f"GPT-2 has no grouped-query attention, but n_kv_head={cfg.n_kv_head}")
        if cfg.dim_head * cfg.n_head != cfg.d_model:
            why.append(f"GPT-2's head_dim is d_model/n_head, but head_dim={cfg.head_dim}")
        if cfg.qk_norm:
            why.append("GPT-2 has no qk_norm")
    elif parts == ("rope", "rmsnorm", "swiglu"):
        kind = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
        if cfg.bias:
            why.append("Llama-family models have no biases outside q/k/v, but bias=True")
        if cfg.qk_norm and cfg.qkv_bias:
            why.append("no HF family has both qkv_bias (Qwen2) and qk_norm (Qwen3)")
    else:
        kind = ""
        why.append(f"pos={cfg.pos!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r} mix GPT-2 and Llama parts; HF has GPT-2 "
                   f"(learned, layernorm, gelu) and the Llama family (rope, rmsnorm, swiglu)")
    if why:
        raise ValueError(f"this model cannot be written as a Hugging Face model: {'; '.join(why)}")
    return kind


def config_to_hf(cfg: ModelConfig, special_ids: dict[str, int], dtype: torch.dtype) -> dict[str, Any]:
    """HF config.json for `cfg` (with `special_token_ids`), in keys transformers 4 and 5 and llama.cpp read."""
    kind = hf_model_type(cfg)
    common = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": str(dtype).removeprefix("torch."),
              **special_ids}
    if kind == "gpt2":
        return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.ff_dim,
                "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    hf = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim, "num_hidden_layers": cfg.n_layer,
          "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_head,
          "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
          "hidden_act": "silu", "attention_dropout": 0.0}
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", "llama3") == "llama3":
        # transformers wants every llama3 key: fill in the defaults that rope_frequencies uses
        defaults = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        hf["rope_scaling"] = {"rope_type": "llama3", **defaults, **cfg.rope_scaling}
    elif cfg.rope_scaling:
        hf["rope_scaling"] = dict(cfg.rope_scaling)
    if kind == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        hf["attention_bias"] = False
    if kind == "llama":
        hf["mlp_bias"] = False
    return hf


__all__ = ["ARCHITECTURES", "config_from_hf", "config_to_hf", "hf_model_type", "model_type_of"]
