"""Configs: ModelConfig and presets, one config per stage, their checks (which name the field), JSON round trips."""

import dataclasses
import math

import pytest

from yunque.config import (
    LIMITS,
    PRESETS,
    SFT_LOOP,
    LoopConfig,
    LoraConfig,
    ModelConfig,
    PretrainConfig,
    SamplingParams,
    SFTConfig,
    SpeedrunConfig,
    from_dict,
    preset,
    sft_loop,
    to_dict,
)


@pytest.mark.parametrize("overrides, message", [
    ({"d_model": 66}, "d_model=66 is not divisible by n_head=4"),
    ({"n_kv_head": 3}, "n_head=4 is not divisible by n_kv_head=3"),
    ({"head_dim": 7}, "rotary needs an even head_dim"),
    ({"pos": "alibi"}, "pos must be 'rope' or 'learned'"),
    ({"norm": "batchnorm"}, "norm must be"),
    ({"mlp": "relu"}, "mlp must be"),
    ({"vocab_size": 0}, "vocab_size must be positive"),
    ({"max_seq_len": 0}, "max_seq_len must be positive"),
    ({"n_head": 0}, "n_head must be positive"),  # not a ZeroDivisionError from the divisibility check
    ({"d_model": 0}, "d_model must be positive"),
    ({"n_kv_head": -2}, "n_kv_head must be positive"),
    ({"n_kv_head": 0}, "n_kv_head must be positive"),
    ({"d_ff": -1}, "d_ff must be positive"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_scaling": {"low_freq_factor": 1.0}}, "factor"),
])
def test_model_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **overrides)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="nope") as e:
        preset("nope")
    assert all(name in str(e.value) for name in PRESETS)


def test_from_dict_round_trip_and_unknown_keys():
    cfg = preset("gpt2-tiny", n_kv_head=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown model config keys \['n_embd'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_embd": 64})


@pytest.mark.parametrize("field, value, message", [
    ("n_head", "4", "n_head must be an integer, got '4'"),
    ("n_head", None, "n_head must be an integer, got None"),
    ("n_layer", True, "n_layer must be an integer"),
    ("vocab_size", 2**34, "vocab_size=17179869184 is larger than yunque allows"),
    ("d_model", 2**20, "d_model=1048576 is larger than yunque allows"),
    ("norm_eps", float("nan"), "norm_eps must be a finite number"),
    ("pos", 3, "pos must be a string"),
])
def test_untrusted_model_configs_fail_in_one_line_before_anything_is_built(field, value, message):
    """config.json comes from anywhere: wrong types and absurd sizes are named, never allocated."""
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{field: value})
    assert all(limit >= 1 << 10 for limit in LIMITS.values())  # far above any released model's sizes


@pytest.mark.parametrize("bad, message", [
    ({"max_steps": 10, "minutes": 1.0}, "give one budget"),
    ({"max_steps": 0}, "budget must be positive"),
    ({"minutes": 0.0}, "budget must be positive"),
    ({"minutes": float("inf")}, "minutes must be a finite number or null"),
    ({"minutes": float("nan")}, "minutes must be a finite number or null"),
    ({"grad_accum": 0}, "grad_accum must be at least 1"),  # was a ZeroDivisionError mid-run
    ({"log_every": 0}, "log_every must be at least 1"),
    ({"eval_every": -1}, "eval_every must be 0 or more"),
    ({"checkpoint_minutes": -1.0}, "checkpoint_minutes must be 0 or more"),
    ({"lr": 0.0}, "lr must be positive"),
    ({"precision": "fp16"}, "precision must be one of 'auto', 'bf16', 'fp32'"),
    ({"optimizer": "sgd"}, "optimizer must be one of 'adamw', 'muon'"),
    ({"compile": "yes"}, "compile must be one of 'auto', 'on', 'off'"),
    ({"threads": -1}, "threads must be 0"),
    ({"betas": (0.9,)}, "betas must be a list"),
])
def test_loop_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        LoopConfig(**bad)


def test_loop_defaults_leave_the_budget_to_the_run():
    """No budget means 1000 steps on a fresh run and the run's own count on --resume (decided in fit)."""
    assert LoopConfig().max_steps is None and LoopConfig().minutes is None
    assert SFT_LOOP.max_steps == 500 and sft_loop(True).lr == 1e-3 and sft_loop(False).lr == SFT_LOOP.lr


@pytest.mark.parametrize("make, message", [
    (lambda: PretrainConfig(out="o", preset="huge"), "unknown preset 'huge'"),
    (lambda: PretrainConfig(out="o", batch_size=0), "batch_size must be at least 1"),
    (lambda: PretrainConfig(out="o", val_fraction=1.0), "val_fraction"),
    (lambda: SFTConfig(model="m", data=("d",), out="o", truncation="cut"), "truncation must be one of"),
    (lambda: SFTConfig(model="m", data="d.jsonl", out="o"), "data must be a list"),
    (lambda: LoraConfig(rank=0), "LoRA rank must be at least 1"),
    (lambda: LoraConfig(targets=()), "at least one layer"),
    (lambda: SamplingParams(temperature=float("inf")), "temperature must be a finite number"),
    (lambda: SamplingParams(temperature=-1.0), "temperature must be >= 0"),
    (lambda: SamplingParams(top_p=0.0), "top_p must be in"),
    (lambda: SamplingParams(stop=("",)), "stop strings must not be empty"),
    (lambda: SpeedrunConfig(minutes=0.0), "minutes must be positive"),
])
def test_stage_config_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("cfg", [
    PretrainConfig(out="o", data=("a.txt", "b/"), model_overrides={"n_layer": 2}, loop=LoopConfig(minutes=2.0)),
    SFTConfig(model="m", data=("d.jsonl",), out="o", lora=LoraConfig(rank=4, targets=("qkv",)), loop=SFT_LOOP),
    SFTConfig(model="m", data=("d.jsonl",), out="o"),
    SpeedrunConfig(minutes=1.5),
    SamplingParams(stop=("\n\n",), seed=3),
])
def test_configs_round_trip_through_json(cfg):
    """run.json stores configs as JSON (tuples become lists); from_dict gives back the same config."""
    import json

    assert from_dict(type(cfg), json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown LoopConfig keys \['lerning_rate'\]"):
        from_dict(LoopConfig, {"lerning_rate": 1.0})


def test_every_config_field_has_a_docstring():
    """The CLI's help is made from them (cli/flags.py): a field without one would be a flag without help."""
    from yunque.cli.flags import field_docs

    for cls in (ModelConfig, LoopConfig, PretrainConfig, LoraConfig, SFTConfig, SamplingParams, SpeedrunConfig):
        missing = [f.name for f in dataclasses.fields(cls) if not field_docs(cls).get(f.name)]
        assert not missing, (cls.__name__, missing)
    assert math.isfinite(LoopConfig().checkpoint_minutes)
