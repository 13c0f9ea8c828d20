"""The training loop: exact resume, Ctrl-C and timed checkpoints, bf16 against fp32, compiled against eager (and a
failing compile), metrics, budgets, NaN and inf never saved, threads."""

import math
import os
import signal

import pytest
import safetensors.torch
import torch

from tests.train.windows import (
    BF16_TOLERANCE,
    CFG,
    assert_same_weights,
    batches,
    interrupt_at,
    loop,
    loss_fn,
    new_model,
    records,
    window_batch,
)
from yunque.config import ModelConfig
from yunque.model.gpt import GPT
from yunque.modeldir import weights_metadata
from yunque.train import loop as loop_module
from yunque.train.checkpoint import STATE
from yunque.train.loop import fit
from yunque.train.optim import lr_at


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(tmp_path, optimizer):
    whole = new_model()
    fit(whole, batches, loss_fn, loop(tmp_path / "whole", checkpoint_every=6, optimizer=optimizer))

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):  # killed during step 7, after the checkpoint at step 6
        fit(new_model(), interrupt_at(6), loss_fn, loop(part, checkpoint_every=6, optimizer=optimizer))
    assert [r["step"] for r in records(part)] == [1, 2, 3, 4, 5, 6]
    resumed = new_model(seed=1)  # different init: everything must come from the checkpoint
    summary = fit(resumed, batches, loss_fn, loop(part, checkpoint_every=6, resume=True, optimizer=optimizer))

    assert summary["steps"] == 12
    def key(r):
        return r["step"], r["loss"], r["lr"]

    assert [key(r) for r in records(part)] == [key(r) for r in records(tmp_path / "whole")]
    assert_same_weights(resumed, whole)


def test_bf16_tracks_fp32(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        summary = fit(new_model(), batches, loss_fn, loop(out, max_steps=30, lr=1e-2, precision=precision))
        assert summary["precision"] == precision
        losses[precision] = [r["loss"] for r in records(out)]
    assert losses["fp32"][-1] < math.log(CFG.vocab_size) - 1  # it learned, so the comparison means something
    gaps = [abs(a - b) for a, b in zip(losses["fp32"], losses["bf16"], strict=True)]
    assert len(gaps) == 30 and max(gaps) < BF16_TOLERANCE, max(gaps)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="'cuda' is not available"):
        fit(new_model(), batches, loss_fn, loop(tmp_path, device="cuda"))


def test_metrics_and_plot(tmp_path):
    out = tmp_path / "run"
    summary = fit(new_model(), batches, loss_fn, loop(out, max_steps=6, log_every=2, eval_every=3),
                  evaluate=lambda m: 2.5)
    recs = records(out)
    assert [r["step"] for r in recs] == [2, 3, 4, 6]  # every log_every, plus eval steps, plus the last
    for r in recs:
        assert {"step", "loss", "lr", "tokens_per_sec"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["tokens_per_sec"] > 0
        # the rate the step was taken with; warmup is at most a fifth of the run: 1 step of 6
        assert r["lr"] == lr_at(r["step"] - 1, peak=3e-3, warmup=1, total=6)
    assert [r["step"] for r in recs if "val_loss" in r] == [3, 6]
    assert recs[-1]["val_loss"] == 2.5 and summary["val_loss"] == 2.5
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_evaluation_may_skip_a_check(tmp_path):
    out = tmp_path / "run"
    summary = fit(new_model(), batches, loss_fn, loop(out, max_steps=6, log_every=2, eval_every=2),
                  evaluate=lambda m: None if len(records(out)) < 2 else 2.0)
    assert [r["step"] for r in records(out) if "val_loss" in r] == [6]
    assert summary["val_loss"] == 2.0


def test_time_budget_fixes_and_records_max_steps(tmp_path):
    out = tmp_path / "run"
    summary = fit(new_model(), batches, loss_fn, loop(out, max_steps=None, minutes=0.05, log_every=50))
    state = torch.load(out / STATE, weights_only=True)
    assert summary["steps"] == state["step"] == state["max_steps"] > 10
    assert records(out)[-1]["step"] == summary["steps"]


def test_time_budget_run_killed_before_calibration_resumes_and_ends(tmp_path):
    out = tmp_path / "run"
    cfg = {"max_steps": None, "minutes": 0.02, "checkpoint_every": 5, "log_every": 50}
    with pytest.raises(KeyboardInterrupt):  # checkpoint at step 5 has no step count yet (calibrated at 10)
        fit(new_model(), interrupt_at(7), loss_fn, loop(out, **cfg))
    assert torch.load(out / STATE, weights_only=True)["max_steps"] is None

    def bounded(i):  # fail instead of hanging if the resumed run never fixes its step count
        if i > 20_000:
            raise RuntimeError("the resumed time-budget run did not stop")
        return batches(i)

    summary = fit(new_model(), bounded, loss_fn, loop(out, resume=True, **cfg))
    assert torch.load(out / STATE, weights_only=True)["max_steps"] == summary["steps"] > 10


def test_resume_of_a_finished_run_reports_its_last_loss(tmp_path):
    out = tmp_path / "run"
    first = fit(new_model(), batches, loss_fn, loop(out, max_steps=4))
    again = fit(new_model(), batches, loss_fn, loop(out, max_steps=4, resume=True))
    assert again["steps"] == 4
    assert again["loss"] == round(first["loss"], 5)


def test_nan_loss_raises(tmp_path):
    def nan_loss(model, batch):
        return loss_fn(model, batch) * float("nan")

    with pytest.raises(FloatingPointError, match="step 1"):
        fit(new_model(), batches, nan_loss, loop(tmp_path / "a"))


def test_nan_is_caught_before_it_overwrites_a_checkpoint(tmp_path):
    """With rare logging, divergence must still stop the run before the next checkpoint is written."""
    out = tmp_path / "run"

    def nan_from_step_3(model, batch):
        (x, y), i = batch
        return loss_fn(model, (x, y)) * (float("nan") if i >= 2 else 1.0)

    with pytest.raises(FloatingPointError, match="step 4"):
        fit(new_model(), lambda i: (batches(i), i), nan_from_step_3, loop(out, log_every=100, checkpoint_every=2))
    assert weights_metadata(out)["step"] == "2"
    assert torch.load(out / STATE, weights_only=True)["step"] == 2
    weights = safetensors.torch.load_file(out / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())




def test_ctrl_c_saves_a_checkpoint_and_resume_continues_exactly(tmp_path):
    """SIGINT during step 6: the step finishes, a checkpoint is saved, KeyboardInterrupt says where."""
    whole = new_model()
    fit(whole, batches, loss_fn, loop(tmp_path / "whole"))

    def ctrl_c_at_5(i):
        if i == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return batches(i)

    part = tmp_path / "part"
    before = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN where a shell started us in the background
    with pytest.raises(KeyboardInterrupt, match="saved a checkpoint at step 6"):
        fit(new_model(), ctrl_c_at_5, loss_fn, loop(part))
    assert torch.load(part / STATE, weights_only=True)["step"] == 6
    assert signal.getsignal(signal.SIGINT) is before  # put back as it was
    resumed = new_model(seed=1)
    assert fit(resumed, batches, loss_fn, loop(part, resume=True))["steps"] == 12
    assert_same_weights(resumed, whole)


def test_timed_checkpoints_make_any_kill_resumable(tmp_path):
    """With checkpoint_minutes (5 by default; here every step) a run killed without warning resumes from where it
    was, not from the start."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(new_model(), interrupt_at(7), loss_fn, loop(out, checkpoint_minutes=1e-9))
    assert torch.load(out / STATE, weights_only=True)["step"] == 7
    whole = new_model()
    fit(whole, batches, loss_fn, loop(tmp_path / "whole"))
    resumed = new_model(seed=1)
    fit(resumed, batches, loss_fn, loop(out, resume=True))
    assert_same_weights(resumed, whole)


def test_resume_with_minutes_trains_that_much_longer(tmp_path):
    out = tmp_path / "run"
    fit(new_model(), batches, loss_fn, loop(out, max_steps=4))
    summary = fit(new_model(), batches, loss_fn, loop(out, max_steps=None, minutes=0.02, resume=True, log_every=50))
    assert summary["steps"] > 4 + 10  # measured and planned from the resumed step
    assert torch.load(out / STATE, weights_only=True)["max_steps"] == summary["steps"]


def test_a_failing_compile_falls_back_to_eager_and_the_run_finishes(tmp_path, monkeypatch, capsys):
    """The compiled step raising (as inductor did on ragged SFT batches) costs one notice, not the run: the step
    is done again eagerly and the rest of the run is eager, so the weights equal an eager run's."""
    eager = new_model()
    fit(eager, batches, loss_fn, loop(tmp_path / "eager", compile="off"))
    calls = []

    def fragile_compile(fn, **options):
        def compiled(model, batch):
            calls.append(1)
            if len(calls) == 4:
                raise AssertionError("expected size 8==8, stride 32768==32256 at dim=0")
            return fn(model, batch)
        return compiled

    monkeypatch.setattr(loop_module.torch, "compile", fragile_compile)
    model = new_model()
    summary = fit(model, batches, loss_fn, loop(tmp_path / "fragile", compile="on"))
    assert summary["steps"] == 12 and not summary["compiled"] and len(calls) == 4
    assert "torch.compile failed (AssertionError: expected size 8==8" in capsys.readouterr().out
    assert_same_weights(model, eager)


def test_non_finite_weights_are_never_saved(tmp_path):
    """A loss can stay finite while a weight turns inf; the save checks the weights, not only the loss."""
    out = tmp_path / "run"

    def poisons_at_step_5(model, batch):
        (x, y), i = batch
        if i == 4:
            with torch.no_grad():
                model.blocks[0].mlp.down.weight[0, 0] = float("inf")
        return loss_fn(model, (x, y)) if i < 4 else loss_fn(model, (x, y)).nan_to_num(0.0)

    with pytest.raises(FloatingPointError, match=r"parameter \S+ is not finite at step 6"):
        fit(new_model(), lambda i: (batches(i), i), poisons_at_step_5, loop(out, checkpoint_every=3, log_every=100))
    assert weights_metadata(out)["step"] == "3"


def test_a_run_that_learns_nothing_says_so(tmp_path):
    summary = fit(new_model(), batches, loss_fn, loop(tmp_path, max_steps=3, lr=1e-7))
    assert "barely fell" in summary["undertrained"]
    assert fit(new_model(), batches, loss_fn, loop(tmp_path / "ok", max_steps=30, lr=1e-2))["undertrained"] is None


def test_a_loss_that_is_not_a_measure_of_progress_is_not_judged(tmp_path):
    # a policy-gradient surrogate hovers near 0 whatever the policy learns: a loss that did not fall says nothing
    judged = fit(new_model(), batches, loss_fn, loop(tmp_path / "a", max_steps=3, lr=1e-7))
    assert "barely fell" in judged["undertrained"]
    not_judged = fit(new_model(), batches, loss_fn, loop(tmp_path / "b", max_steps=3, lr=1e-7), loss_falls=False)
    assert not_judged["undertrained"] is None


FAST_CFG = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16)
FAST_STREAM = torch.randint(0, 64, (2048,), generator=torch.Generator().manual_seed(0))


def fast_batches(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return window_batch(FAST_STREAM, i)


def train_fast(out, **kw) -> tuple[GPT, dict, list[float]]:
    torch.manual_seed(0)
    model = GPT(FAST_CFG)
    summary = fit(model, fast_batches, loss_fn, loop(out, **{"max_steps": 14, "warmup_steps": 2, **kw}))
    return model, summary, [r["loss"] for r in records(out)]


def test_auto_compile_switches_on_and_trains_like_eager(tmp_path, monkeypatch):
    eager, s_eager, l_eager = train_fast(tmp_path / "eager", compile="off")
    # auto compiles after step 10 when the time left repays compiling; here it always does
    monkeypatch.setattr(loop_module, "compile_pays", lambda seconds_left: True)
    compiled, s_compiled, l_compiled = train_fast(tmp_path / "compiled", compile="auto")

    assert not s_eager["compiled"] and s_compiled["compiled"]
    # fp32: the compiled kernels sum in another order, so the runs drift apart by rounding only
    assert l_compiled == pytest.approx(l_eager, abs=1e-4)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=name)


def test_auto_compile_stays_off_for_a_short_run(tmp_path):
    _, summary, _ = train_fast(tmp_path, compile="auto")
    assert not summary["compiled"]  # 14 tiny steps: nowhere near the time that repays compiling


def test_fit_sets_threads_and_restores_them(tmp_path):
    before = torch.get_num_threads()
    seen = []

    def watching(model, batch):
        seen.append(torch.get_num_threads())
        return loss_fn(model, batch)

    fit(GPT(FAST_CFG), fast_batches, watching, loop(tmp_path, max_steps=2, compile="off", threads=1))
    assert seen == [1, 1] and torch.get_num_threads() == before


