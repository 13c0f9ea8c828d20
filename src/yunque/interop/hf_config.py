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
        classes = hf.get("architectures")
        classes = classes if isinstance(classes, list) else []
        kind = next((k for k, a in ARCHITECTURES.items() if a in classes), None)
    return kind if isinstance(kind, str) else None


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """yunque's ModelConfig for an HF config.json; ValueError, naming the key, for a model type or an option yunque
    cannot run and for a missing or ill-typed value. Sizes are bounded by ModelConfig, so a config from an
    untrusted file fails here, before anything is allocated."""
    if not isinstance(hf, dict):
        raise ValueError(f"the config holds a JSON {type(hf).__name__}, not an object")  # noqa: TRY004
    kind = model_type_of(hf)
    if kind not in ARCHITECTURES:
        named = hf.get("model_type", hf.get("architectures"))
        raise ValueError(f"model_type {_shown(named)} is not supported; yunque reads {', '.join(ARCHITECTURES)} "
                         f"(SmolLM2 and TinyLlama are llama)")
    return _gpt2_config(hf) if kind == "gpt2" else _llama_config(hf, kind)


_REQUIRED = object()


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(d: dict[str, Any], key: str, default: Any, ok: Any, want: str, where: str = "") -> Any:
    """d[key] (or `default` when absent or null), checked with `ok(value)`; ValueError naming the key (as
    `where.key` for a key of a nested object)."""
    name, value = f"{where}.{key}" if where else key, d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"{name} is missing" + ("" if where else f"; a {model_type_of(d)} config needs it"))
        return default
    if not ok(value):
        raise ValueError(f"{name} must be {want}, got {_shown(value)}")
    return value


def _size(d: dict[str, Any], key: str, default: Any = _REQUIRED, where: str = "") -> Any:
    """A positive integer (or `default`, which may be None for "not set")."""
    return _get(d, key, default, lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                "a positive integer", where)


def _number(d: dict[str, Any], key: str, default: Any, where: str = "") -> float:
    number = _get(d, key, default, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number",
                  where)
    return number if number is None else float(number)


def _flag(hf: dict[str, Any], key: str, default: bool) -> bool:
    return _get(hf, key, default, lambda v: isinstance(v, bool), "true or false")


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function {_shown(act)} is not supported; yunque's GPT-2 MLP is GELU with the "
                         f"tanh approximation (gelu_new)")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(key, want) != want:
            raise ValueError(f"GPT-2 option {key}={_shown(hf[key])} is not supported; yunque runs {key}={want}")
    return ModelConfig(
        vocab_size=_size(hf, "vocab_size"), n_layer=_size(hf, "n_layer"), n_head=_size(hf, "n_head"),
        d_model=_size(hf, "n_embd"), d_ff=_size(hf, "n_inner", None),
        max_seq_len=_size(hf, "n_positions", None) or _size(hf, "n_ctx"), pos="learned", norm="layernorm",
        mlp="gelu", bias=True, tie_embeddings=_flag(hf, "tie_word_embeddings", True),
        norm_eps=_number(hf, "layer_norm_epsilon", 1e-5))


def _llama_config(hf: dict[str, Any], kind: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {_shown(hf['hidden_act'])} is not supported; yunque's SwiGLU uses silu")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported; yunque's SwiGLU MLP has no biases")
    if kind != "qwen2" and hf.get("attention_bias"):
        raise ValueError("attention_bias=true (biases on q, k, v and the output projection) is not supported; "
                         "yunque has biases on q, k, v only (Qwen2)")
    d, H = _size(hf, "hidden_size"), _size(hf, "num_attention_heads")
    K = _size(hf, "num_key_value_heads", H)
    head_dim = _size(hf, "head_dim", None)
    if head_dim == d // H and d % H == 0:
        head_dim = None  # the default: keeps the config as yunque itself would write it
    max_len = _size(hf, "max_position_embeddings", 2048)
    window = _sliding_window(hf, kind)
    if window is not None and window < max_len:
        max_len = window  # within the window, sliding-window attention is full causal attention: exact, not approximate
    theta, scaling = _rope(hf)
    return ModelConfig(
        vocab_size=_size(hf, "vocab_size"), n_layer=_size(hf, "num_hidden_layers"), n_head=H,
        n_kv_head=None if K == H else K, d_model=d, d_ff=_size(hf, "intermediate_size"), head_dim=head_dim,
        max_seq_len=max_len, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=kind == "qwen2",
        qk_norm=kind == "qwen3", tie_embeddings=_flag(hf, "tie_word_embeddings", False),
        norm_eps=_number(hf, "rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling)


def _sliding_window(hf: dict[str, Any], kind: str) -> int | None:
    """Mistral's attention window, or Qwen's when it is switched on; None when attention is full."""
    layer_types = hf.get("layer_types")
    if kind == "mistral" or (kind in ("qwen2", "qwen3") and (
            hf.get("use_sliding_window") or isinstance(layer_types, list) and "sliding_attention" in layer_types)):
        return _size(hf, "sliding_window", None)
    return None


def _rope(hf: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, yunque rope_scaling) from transformers 4 keys (rope_theta, rope_scaling) or 5 (rope_parameters)."""
    params = _get(hf, "rope_parameters", {}, lambda v: isinstance(v, dict), "a JSON object")
    scaling = _get(hf, "rope_scaling", None, lambda v: isinstance(v, dict), "a JSON object")
    where = "rope_scaling" if scaling else "rope_parameters"
    scaling = scaling or params
    theta = _number(hf, "rope_theta", _number(params, "rope_theta", 10000.0, "rope_parameters"))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        out = {"rope_type": "llama3", "factor": _number(scaling, "factor", _REQUIRED, where)}
        for key in ("low_freq_factor", "high_freq_factor"):
            if scaling.get(key) is not None:
                out[key] = _number(scaling, key, None, where)
        if scaling.get("original_max_position_embeddings") is not None:
            out["original_max_position_embeddings"] = _size(scaling, "original_max_position_embeddings", None, where)
        return theta, out
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": _number(scaling, "factor", _REQUIRED, where)}
    raise ValueError(f"rope scaling {_shown(kind)} is not supported; yunque runs 'llama3' and 'linear' scaling, "
                     f"or none")


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
