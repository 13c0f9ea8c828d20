"""Hugging Face config.json <-> ModelConfig, on configs written as the Hub's checkpoints write them."""

import pytest

from yunque.config import ModelConfig, preset
from yunque.interop.hf_config import config_from_hf, hf_model_type


def test_config_from_hf_maps_hub_style_configs():
    smollm2 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
               "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
               "rope_theta": 100000, "rope_scaling": None, "tie_word_embeddings": True, "hidden_act": "silu"}
    cfg = config_from_hf(smollm2)
    assert (cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.dim_head, cfg.ff_dim, cfg.max_seq_len) == \
        (576, 9, 3, 64, 1536, 8192)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000 and cfg.rope_scaling is None and cfg.norm_eps == 1e-5
    llama32 = {**smollm2, "rope_theta": 500000.0, "head_dim": 64, "hidden_size": 2048, "num_attention_heads": 32,
               "num_key_value_heads": 8,
               "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert config_from_hf(llama32).rope_scaling == {"rope_type": "llama3", **llama32["rope_scaling"]}
    v5 = {**smollm2, "rope_scaling": None, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                "rope_theta": 1234.0}}
    del v5["rope_theta"]
    assert (config_from_hf(v5).rope_theta, config_from_hf(v5).rope_scaling) == \
        (1234.0, {"rope_type": "linear", "factor": 2.0})
    qwen3 = {**smollm2, "model_type": "qwen3", "head_dim": 128, "hidden_size": 1024, "num_attention_heads": 16,
             "num_key_value_heads": 8}
    cfg = config_from_hf(qwen3)
    assert cfg.qk_norm and not cfg.qkv_bias and cfg.dim_head == 128
    assert config_from_hf({**smollm2, "model_type": "qwen2"}).qkv_bias
    gpt2 = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_ctx": 1024,
            "n_positions": 1024, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
    assert config_from_hf(gpt2) == preset("gpt2-small", vocab_size=50257, max_seq_len=1024)


def test_mistral_sliding_window_shorter_than_the_context_limits_max_seq_len():
    mistral = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 32768, "sliding_window": 4096}
    assert config_from_hf(mistral).max_seq_len == 4096  # within the window, attention is exactly full attention
    assert config_from_hf({**mistral, "sliding_window": None}).max_seq_len == 32768
    assert config_from_hf({**mistral, "model_type": "qwen2", "use_sliding_window": False}).max_seq_len == 32768


@pytest.mark.parametrize("change, message", [
    ({"model_type": "falcon"}, "'falcon' is not supported; yunque reads gpt2, llama, mistral, qwen2, qwen3"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
])
def test_unsupported_configs_say_what_is_supported(change, message):
    base = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4}
    with pytest.raises(ValueError, match=message):
        config_from_hf({**base, **change})


@pytest.mark.parametrize("cfg, why", [
    (ModelConfig(pos="learned", norm="rmsnorm", mlp="swiglu"), "mix GPT-2 and Llama parts"),
    (ModelConfig(pos="learned", norm="layernorm", mlp="gelu", bias=False), "GPT-2 has biases"),
    (ModelConfig(pos="learned", norm="layernorm", mlp="gelu", bias=True, n_kv_head=2), "grouped-query"),
    (ModelConfig(bias=True), "no biases outside q/k/v"),
    (ModelConfig(qkv_bias=True, qk_norm=True), "both qkv_bias"),
])
def test_export_refuses_configs_no_hf_family_holds(cfg, why):
    with pytest.raises(ValueError, match=f"cannot be written as a Hugging Face model.*{why}"):
        hf_model_type(cfg)


# ---- untrusted config.json files: one line each, naming the key, before anything is allocated ----

LLAMA = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4}
GPT2 = {"model_type": "gpt2", "vocab_size": 300, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}


@pytest.mark.parametrize("config, message", [
    ({**LLAMA, "num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({**LLAMA, "num_attention_heads": None}, "num_attention_heads is missing; a llama config needs it"),
    ({**LLAMA, "hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
    ({**LLAMA, "num_hidden_layers": True}, "num_hidden_layers must be a positive integer, got True"),
    ({**LLAMA, "vocab_size": 2**34}, "vocab_size=17179869184 is larger than yunque allows"),
    ({**LLAMA, "num_key_value_heads": 3}, "n_head=4 is not divisible by n_kv_head=3"),
    ({**LLAMA, "max_position_embeddings": -1}, "max_position_embeddings must be a positive integer, got -1"),
    ({**LLAMA, "tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false, got 'yes'"),
    ({**LLAMA, "rms_norm_eps": [1e-5]}, r"rms_norm_eps must be a number, got \[1e-05\]"),
    ({**LLAMA, "rope_scaling": "linear"}, "rope_scaling must be a JSON object, got 'linear'"),
    ({**LLAMA, "rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor is missing"),
    ({**LLAMA, "rope_parameters": {"rope_type": "llama3", "factor": "8"}},
     "rope_parameters.factor must be a number, got '8'"),
    ({**LLAMA, "model_type": "mistral", "sliding_window": "4k"}, "sliding_window must be a positive integer"),
    ({**LLAMA, "model_type": ["llama"]}, r"model_type \['llama'\] is not supported"),
    ({"architectures": "LlamaForCausalLM"}, "model_type 'LlamaForCausalLM' is not supported"),
    ({"architectures": ["LlamaForCausalLM"]}, "hidden_size is missing; a llama config needs it"),
    ({**GPT2, "n_head": 0}, "n_head must be a positive integer, got 0"),
    ({**GPT2, "n_positions": None}, "n_ctx is missing; a gpt2 config needs it"),
    ({**GPT2, "n_embd": 10**9}, "d_model=1000000000 is larger than yunque allows"),
    (["llama"], "the config holds a JSON list, not an object"),
])
def test_untrusted_configs_fail_with_one_line_naming_the_key(config, message):
    with pytest.raises(ValueError, match=message) as e:
        config_from_hf(config)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_optional_keys_may_be_null_or_of_another_family():
    assert config_from_hf({**LLAMA, "num_key_value_heads": None, "head_dim": None}).kv_heads == 4
    assert config_from_hf({**LLAMA, "model_type": "qwen2", "layer_types": 5}).max_seq_len == 2048
