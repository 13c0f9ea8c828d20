"""The model: sizes, shapes, causality, the KV cache against full recompute, padding, learning, config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from yunque.config import PRESETS, ModelConfig, preset
from yunque.losses import next_token_loss
from yunque.model.gpt import GPT, RMSNorm, _RMSNormGrad, causal_attention_bf16, rms_norm, rope_frequencies
from yunque.model.kv_cache import KVCache

V = 97  # small vocabulary: tests need shapes, not language


def tiny(name: str = "tiny", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset(name, **{"vocab_size": V, "max_seq_len": 32, **overrides})).eval()


# Configs the KV-cache and padding tests run on: rope, learned positions (GPT-2), grouped-query, qk-norm.
VARIANTS = {
    "rope": ("tiny", {}),
    "learned": ("gpt2-tiny", {}),
    "gqa": ("tiny", {"n_kv_head": 2}),
    "qk_norm": ("tiny", {"qk_norm": True, "qkv_bias": True}),
}


@pytest.mark.parametrize("name", [n for n in PRESETS if preset(n).num_params() < 30_000_000])
def test_preset_parameter_count_matches_built_model(name):
    cfg = preset(name)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = GPT(cfg)
    assert model.num_params() == cfg.num_params()


@pytest.mark.parametrize("overrides", [
    {"bias": True},  # SwiGLU with biases: the fused up projection has 2*d_ff biases
    {"tie_embeddings": False},
    {"n_kv_head": 2, "qk_norm": True, "qkv_bias": True},
    {"norm": "layernorm", "mlp": "gelu", "pos": "learned"},
    {"head_dim": 8, "d_ff": 96},
])
def test_variant_parameter_count_matches_built_model(overrides):
    cfg = preset("tiny", **overrides)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == cfg.num_params()


def test_logits_shape():
    model = tiny()
    ids = torch.randint(0, V, (3, 11))
    with torch.no_grad():
        assert model(ids).shape == (3, 11, V)


@pytest.mark.parametrize("variant", ["rope", "learned"])
def test_causal_changing_a_token_changes_nothing_before_it(variant):
    name, overrides = VARIANTS[variant]
    model = tiny(name, **overrides)
    ids = torch.randint(0, V, (1, 16))
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % V
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_prefill_then_steps_equals_full_forward(variant):
    name, overrides = VARIANTS[variant]
    model = tiny(name, **overrides)
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.cfg, batch_size=2)
        pieces = [model(ids[:, :7], kv_cache=cache)]  # prefill
        pieces += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(7, 20)]  # one token at a time
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_equals_each_row_alone(variant):
    name, overrides = VARIANTS[variant]
    model = tiny(name, **overrides)
    long, short = torch.randint(0, V, (10,)), torch.randint(0, V, (6,))
    steps = torch.randint(0, V, (2, 3))  # tokens fed after the prompts, one per step
    pad = torch.tensor([0, 4])
    batch = torch.stack([long, torch.cat([torch.zeros(4, dtype=torch.long), short])])  # (2, 10)
    with torch.no_grad():
        cache = KVCache(model.cfg, 2, pad=pad)
        prefill = model(batch, kv_cache=cache)
        decoded = [model(steps[:, i:i + 1], kv_cache=cache) for i in range(3)]
        for row, prompt, n_pad in ((0, long, 0), (1, short, 4)):
            alone = model(torch.cat([prompt, steps[row]]).unsqueeze(0))[0]  # (P + 3, V), no cache, no padding
            P = len(prompt)
            torch.testing.assert_close(prefill[row, n_pad:], alone[:P], atol=1e-5, rtol=0)
            got = torch.cat([d[row] for d in decoded])  # (3, V)
            torch.testing.assert_close(got, alone[P:], atol=1e-5, rtol=0)


def test_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=V, n_layer=2, n_head=2, d_model=32, max_seq_len=16))
    x = torch.randint(0, V, (4, 16))
    y = torch.randint(0, V, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(150):  # reaches 0.002; 0.1 leaves a wide margin
        loss = next_token_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] > math.log(V) - 0.5  # started near chance
    assert losses[-1] < 0.1


def test_llama3_rope_scaling_runs_and_scales_only_low_frequencies():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model = tiny(rope_scaling=scaling)
    base = rope_frequencies(preset("tiny"))
    scaled = rope_frequencies(model.cfg)
    assert scaled[0] == base[0]  # wavelength 2*pi is far below 64/4: kept
    torch.testing.assert_close(scaled[-1], base[-1] / 8)  # wavelength far above 64/1: divided by factor
    with torch.no_grad():
        logits = model(torch.randint(0, V, (2, 32)))
    assert torch.isfinite(logits).all()


def test_too_long_input_raises():
    model = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = KVCache(model.cfg, 1)
    with torch.no_grad():
        model(torch.zeros(1, 30, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


def test_bf16_attention_path_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=g) for _ in range(3))
    dy = torch.randn(2, 4, 33, 16, generator=g)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    fast = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    y_ref = F.scaled_dot_product_attention(*ref, is_causal=True)
    y_fast = causal_attention_bf16(*fast, dropout_p=0.0)
    (y_ref * dy).sum().backward()
    (y_fast.float() * dy).sum().backward()
    # bf16 keeps 8 bits of mantissa: inputs, scores and outputs each round to ~0.4%
    torch.testing.assert_close(y_fast.float(), y_ref, atol=3e-2, rtol=3e-2)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=6e-2, rtol=5e-2)


def test_model_takes_the_bf16_path_in_training_with_the_same_logits(monkeypatch):
    """Training mode under bf16 autocast uses causal_attention_bf16 (grouped-query heads repeated); eval mode
    uses SDPA. With dropout 0 both must give the same logits; a counter proves which path ran."""
    import yunque.model.gpt as gpt_module

    calls = []
    fast = gpt_module.causal_attention_bf16
    monkeypatch.setattr(gpt_module, "causal_attention_bf16", lambda *a, **k: calls.append(1) or fast(*a, **k))
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16)
    torch.manual_seed(0)
    model = GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        train_logits = model.train()(ids).float()
        assert len(calls) == cfg.n_layer  # the fast path ran, once per layer
        eval_logits = model.eval()(ids).float()
        assert len(calls) == cfg.n_layer  # and not in eval mode
    torch.testing.assert_close(train_logits, eval_logits, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_written_out_gradient_equals_autograds(dtype):
    """Training uses RMSNorm's hand-written backward; autograd through the plain ops (`rms_norm`, what inference
    runs) is the reference: the same output and the same gradients for x and the weight."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=g).to(dtype)
    dy = torch.randn(3, 5, 24, generator=g)
    norm = RMSNorm(24, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24, generator=g) + 0.5)
    fast_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast = norm(fast_x)
    assert type(y_fast.grad_fn).__name__ == "_RMSNormGradBackward"  # the written-out gradient is the one taken
    (y_fast.float() * dy).sum().backward()
    fast_w, norm.weight.grad = norm.weight.grad, None
    y_ref = rms_norm(ref_x, norm.weight, 1e-5)
    (y_ref.float() * dy).sum().backward()
    assert y_fast.dtype == y_ref.dtype and torch.equal(y_fast, y_ref)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(fast_x.grad, ref_x.grad, **tol)
    torch.testing.assert_close(fast_w, norm.weight.grad, **tol)


def test_rmsnorm_gradient_passes_gradcheck_and_leaves_a_frozen_weight_alone():
    norm = RMSNorm(6, 1e-6).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: _RMSNormGrad.apply(a, w, 1e-6), (x, norm.weight))
    norm.weight.requires_grad_(False)  # a LoRA run freezes it
    norm(x).sum().backward()
    assert norm.weight.grad is None and x.grad is not None


def test_logits_to_keep_is_the_tail_of_all_logits():
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=97, max_seq_len=32)).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full = model(ids)
        assert torch.allclose(model(ids, logits_to_keep=3), full[:, -3:], atol=1e-6)
        cache = KVCache(model.cfg, 2, 9)
        assert torch.allclose(model(ids, kv_cache=cache, logits_to_keep=1), full[:, -1:], atol=1e-6)
