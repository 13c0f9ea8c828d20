"""LoRA: attach is a no-op until trained, merge equals base + adapter, only adapters train, save/load, resume."""

import pytest
import safetensors.torch
import torch
import torch.nn as nn

from yunque.config import ModelConfig
from yunque.losses import next_token_loss
from yunque.model.gpt import GPT
from yunque.model.lora import (
    LoraConfig,
    LoRALinear,
    attach_lora,
    load_adapter,
    load_lora,
    lora_state_dict,
    merge_lora,
    save_adapter,
    with_adapter,
)
from yunque.modeldir import WEIGHTS
from yunque.train.checkpoint import STATE, TRAINABLE
from yunque.train.loop import LoopConfig, fit
from yunque.train.optim import make_adamw

LLAMA = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16)
GPT2 = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16, pos="learned", norm="layernorm",
                   mlp="gelu", bias=True, tie_embeddings=False)
IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def new_model(cfg=LLAMA, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def randomize_b(model, seed=1):
    """Trained-looking adapters: B is zero at init, which would make every comparison trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.1)


def test_attach_wraps_targets_freezes_the_rest_and_changes_nothing_until_trained():
    model = new_model()
    before = model(IDS)
    names = attach_lora(model, LoraConfig(rank=4, targets=("qkv", "down")))
    assert names == ["blocks.0.attn.qkv", "blocks.0.mlp.down", "blocks.1.attn.qkv", "blocks.1.mlp.down"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{ab}" for n in names for ab in ("lora_a", "lora_b")}
    assert model.blocks[0].attn.qkv.lora_a.shape == (4, 32) and model.blocks[0].attn.qkv.lora_b.shape == (64, 4)
    # base tensors keep their names: a checkpoint of the base still lines up
    assert set(new_model().state_dict()) <= set(model.state_dict())
    assert torch.equal(model(IDS), before)


def test_unknown_target_lists_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) q_proj; accepted: down, lm_head, proj, qkv, up"):
        attach_lora(new_model(), LoraConfig(targets=("qkv", "q_proj")))
    with pytest.raises(ValueError, match="tie_embeddings"):
        attach_lora(new_model(), LoraConfig(targets=("lm_head",)))
    model = new_model()
    attach_lora(model, LoraConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        attach_lora(model, LoraConfig())
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)


@pytest.mark.parametrize("cfg, targets", [(LLAMA, ("qkv", "proj", "up", "down")),
                                          (GPT2, ("qkv", "proj", "up", "down", "lm_head"))])
def test_merged_model_equals_base_plus_adapter(cfg, targets):
    model = new_model(cfg)
    attach_lora(model, LoraConfig(rank=4, alpha=8, targets=targets))
    randomize_b(model)
    with torch.no_grad():
        adapted = model(IDS)
        merged = merge_lora(model)(IDS)
    assert not torch.allclose(adapted, new_model(cfg)(IDS), atol=1e-3)  # the adapters do something
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(targets))
    assert set(model.state_dict()) == set(new_model(cfg).state_dict())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("cfg, targets", [(LLAMA, ("qkv", "proj", "up", "down")),
                                          (GPT2, ("qkv", "proj", "up", "down", "lm_head"))])
def test_with_adapter_computes_base_plus_adapter_over_the_same_weights(cfg, targets):
    lora = LoraConfig(rank=4, alpha=8, targets=targets)
    trained = new_model(cfg)
    attach_lora(trained, lora)
    randomize_b(trained)
    state = lora_state_dict(trained)
    base = new_model(cfg).eval()
    adapted = with_adapter(base, state, lora)
    with torch.no_grad():
        torch.testing.assert_close(adapted(IDS), trained(IDS), atol=1e-5, rtol=0)
        torch.testing.assert_close(base(IDS), new_model(cfg)(IDS), atol=0, rtol=0)  # the base is left as it is
    shared = {p.data_ptr() for p in base.parameters()}
    assert all(p.data_ptr() in shared for p in adapted.parameters())  # one copy of the base's weights
    with pytest.raises(ValueError, match="does not fit the model"):
        with_adapter(new_model(ModelConfig(**{**cfg.__dict__, "d_model": 64})), state, lora)


def test_adapter_save_load_round_trip(tmp_path):
    cfg = LoraConfig(rank=2, alpha=4, dropout=0.1, targets=("qkv", "up"))
    model = new_model()
    attach_lora(model, cfg)
    randomize_b(model)
    save_adapter(tmp_path, model, cfg, base_model="/some/base")
    state, loaded_cfg = load_adapter(tmp_path)
    assert loaded_cfg == cfg
    assert state.keys() == lora_state_dict(model).keys()
    fresh = new_model()
    attach_lora(fresh, loaded_cfg)
    load_lora(fresh, state)
    assert torch.equal(fresh(IDS), model(IDS))
    other = new_model()
    attach_lora(other, LoraConfig(rank=3, targets=("qkv", "up")))
    with pytest.raises(ValueError, match="shape"):
        load_lora(other, state)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors: missing"):
        load_adapter(tmp_path)


def batches(i):
    g = torch.Generator().manual_seed(i)
    xy = torch.randint(0, 64, (4, 17), generator=g)
    return xy[:, :-1], xy[:, 1:]


def loss_fn(model, batch):
    x, y = batch
    return next_token_loss(model(x), y)


def loop(out, **kw):
    return LoopConfig(out_dir=str(out), **{**dict(max_steps=8, lr=1e-2, warmup_steps=1, precision="fp32",
                                                  eval_every=0, log_every=1, progress=False, trainable_only=True),
                                           **kw})


def test_training_changes_only_the_adapters_and_checkpoints_hold_only_them(tmp_path):
    model = new_model().train()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    attach_lora(model, LoraConfig(rank=4))
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    opt = make_adamw(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95))  # what fit makes by default
    summary = fit(model, batches, loss_fn, loop(tmp_path), optimizer=opt)
    assert summary["steps"] == 8
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())  # every base tensor untouched
    assert all(not torch.equal(v, adapters[k]) for k, v in lora_state_dict(model).items() if k.endswith("lora_b"))
    lora_params = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == lora_params
    assert {id(p) for p in opt.state} == lora_params  # optimizer state only for adapters
    # the checkpoint: adapter tensors and optimizer state, no base weights
    saved = safetensors.torch.load_file(str(tmp_path / TRAINABLE))
    assert saved.keys() == lora_state_dict(model).keys()
    assert not (tmp_path / WEIGHTS).exists()
    opt_state = torch.load(tmp_path / STATE, weights_only=True)["optimizer"]
    assert sum(len(g["params"]) for g in opt_state["param_groups"]) == len(saved)


def test_lora_resume_is_exact(tmp_path):
    def run(out, data=batches, resume=False, init_seed=10):
        model = new_model().train()  # on resume the base comes from the base model again
        torch.manual_seed(init_seed)
        attach_lora(model, LoraConfig(rank=4))
        fit(model, data, loss_fn, loop(out, resume=resume, checkpoint_every=4))
        return lora_state_dict(model)

    def killed_at_4(i):
        if i == 4:
            raise KeyboardInterrupt
        return batches(i)

    whole = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "part", killed_at_4)
    resumed = run(tmp_path / "part", resume=True, init_seed=11)  # other adapters at init: restored from the checkpoint
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
