"""Twins of the training fast paths: compiled training equals eager, the bf16 attention path equals SDPA, and
fit leaves torch's thread count as it found it. (bf16 training against fp32 is test_loop.test_bf16_tracks_fp32.)"""

import json

import pytest
import torch
import torch.nn.functional as F

from yunque.config import ModelConfig
from yunque.model.gpt import GPT, causal_attention_bf16
from yunque.train import loop as loop_module
from yunque.precision import physical_cores
from yunque.train.loop import LoopConfig, fit
from tests.train.windows import loss_fn, window_batch

CFG = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16)
STREAM = torch.randint(0, 64, (2048,), generator=torch.Generator().manual_seed(0))


def batches(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return window_batch(STREAM, i)


def train(out, **kw) -> tuple[GPT, dict, list[float]]:
    torch.manual_seed(0)
    model = GPT(CFG)
    cfg = LoopConfig(out_dir=str(out), **{**dict(max_steps=14, lr=3e-3, warmup_steps=2, precision="fp32",
                                                  eval_every=0, log_every=1, progress=False), **kw})
    summary = fit(model, batches, loss_fn, cfg)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return model, summary, losses


def test_auto_compile_switches_on_and_trains_like_eager(tmp_path, monkeypatch):
    eager, s_eager, l_eager = train(tmp_path / "eager", compile="off")
    # auto compiles after step 10 when the time left repays compiling; here it always does
    monkeypatch.setattr(loop_module, "compile_pays", lambda seconds_left: True)
    compiled, s_compiled, l_compiled = train(tmp_path / "compiled", compile="auto")

    assert not s_eager["compiled"] and s_compiled["compiled"]
    # fp32: the compiled kernels sum in another order, so the runs drift apart by rounding only
    assert l_compiled == pytest.approx(l_eager, abs=1e-4)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=name)


def test_auto_compile_stays_off_for_a_short_run(tmp_path):
    _, summary, _ = train(tmp_path, compile="auto")
    assert not summary["compiled"]  # 14 tiny steps: nowhere near the time that repays compiling


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


def test_model_takes_the_bf16_path_in_training_with_the_same_logits():
    """Training mode under bf16 autocast uses causal_attention_bf16 (grouped-query heads repeated); eval mode
    uses SDPA. With dropout 0 both must give the same logits."""
    torch.manual_seed(0)
    model = GPT(CFG)
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        train_logits = model.train()(ids).float()
        eval_logits = model.eval()(ids).float()
    torch.testing.assert_close(train_logits, eval_logits, atol=3e-2, rtol=3e-2)


def test_fit_sets_threads_and_restores_them(tmp_path):
    before = torch.get_num_threads()
    seen = []

    def watching(model, batch):
        seen.append(torch.get_num_threads())
        return loss_fn(model, batch)

    cfg = LoopConfig(out_dir=str(tmp_path), max_steps=2, precision="fp32", compile="off", threads=1,
                     eval_every=0, progress=False)
    fit(GPT(CFG), batches, watching, cfg)
    assert seen == [1, 1] and torch.get_num_threads() == before
    assert 1 <= physical_cores() <= (torch.multiprocessing.cpu_count() or 1)


@pytest.mark.parametrize("bad, message", [({"compile": "yes"}, "compile must be one of 'auto', 'on', 'off'"),
                                          ({"threads": -1}, "threads must be 0")])
def test_fast_path_config_validation(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        LoopConfig(out_dir=str(tmp_path), **bad)
