"""The training loop: exact resume, crash-safe checkpoints, bf16 against fp32, schedules, metrics, budgets, NaN."""

import json
import math

import pytest
import safetensors.torch
import torch

from yunque.config import ModelConfig
from yunque.model.gpt import GPT
from yunque.modeldir import load_model, save_model, weights_metadata
from yunque.tokenizer.bpe import byte_tokenizer
from yunque.train.checkpoint import STATE, load_checkpoint
from yunque.train.loop import LoopConfig, fit
from yunque.train.optim import lr_at, make_adamw, make_optimizer
from tests.train.windows import loss_fn, window_batch

TOK = byte_tokenizer()
CFG = ModelConfig(vocab_size=TOK.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=16)
STREAM = torch.randint(0, 64, (4096,), generator=torch.Generator().manual_seed(0))  # the "corpus"

# bf16 autocast against fp32: training loss at every step of 30 on the tiny model below (lr 1e-2, loss 5.6 -> 4.2).
# Measured on an AVX-512-BF16 CPU (torch 2.13): at most 0.0025 at any step, 0.0001 at the last (0.0007 over 4
# seeds); the tolerance leaves a wide margin for other kernels and for CPUs that emulate bf16.
BF16_TOLERANCE = 0.02


def batches(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch i: 4 windows of STREAM, a pure function of i (as `fit` requires for exact resume)."""
    return window_batch(STREAM, i)


def new_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG)


def loop(out, **kw) -> LoopConfig:
    defaults = dict(max_steps=12, lr=3e-3, warmup_steps=3, precision="fp32", eval_every=0, log_every=1,
                    progress=False, tokens_per_step=64)
    return LoopConfig(out_dir=str(out), **{**defaults, **kw})


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def interrupt_at(n: int):
    """batches() that raises KeyboardInterrupt when batch n is asked for: a kill after n steps were taken."""
    def fn(i):
        if i == n:
            raise KeyboardInterrupt
        return batches(i)
    return fn


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


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


class DiskFull(OSError):
    pass


def half_then_fail(real, calls: list, fail_on_call: int):
    """Wrap a save function: on call `fail_on_call` write half the file, then raise as a full disk would."""
    def save(obj, path, *args, **kwargs):
        calls.append(path)
        real(obj, path, *args, **kwargs)
        if len(calls) == fail_on_call:
            with open(path, "rb+") as f:
                f.truncate(len(f.read()) // 2)
            raise DiskFull("no space left on device")
    return save


@pytest.mark.parametrize("failing", ["weights", "train_state"])
def test_failed_save_leaves_previous_checkpoint_loadable_and_resumable(tmp_path, monkeypatch, failing):
    out = tmp_path / "run"
    save_model(out, new_model(), TOK)  # config.json + tokenizer.json, so load_model can read the dir
    calls: list = []
    if failing == "weights":
        monkeypatch.setattr("yunque.modeldir.save_file", half_then_fail(safetensors.torch.save_file, calls, 2))
    else:
        monkeypatch.setattr(torch, "save", half_then_fail(torch.save, calls, 2))
    with pytest.raises(DiskFull):  # checkpoint at step 6 succeeds, the one at step 12 dies mid-write
        fit(new_model(), batches, loss_fn, loop(out, checkpoint_every=6))
    monkeypatch.undo()

    model, _ = load_model(out)
    assert weights_metadata(out)["step"] == "6"
    assert torch.load(out / STATE, weights_only=True)["step"] == 6
    restored = new_model(seed=1)
    state = load_checkpoint(out, restored, make_adamw(restored, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95)))
    assert state["step"] == 6
    assert_same_weights(restored, model)
    # and the run can go on from there
    assert fit(restored, batches, loss_fn, loop(out, checkpoint_every=6, resume=True))["steps"] == 12


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


def test_lr_warmup_then_cosine():
    kw = dict(peak=1e-3, warmup=10, total=110, min_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(1e-4)  # warmup: (step + 1) / warmup of the peak
    assert lr_at(4, **kw) == pytest.approx(5e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # halfway: cos(pi/2) = 0
    assert lr_at(35, **kw) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert lr_at(110, **kw) == pytest.approx(1e-4)
    assert lr_at(500, **kw) == pytest.approx(1e-4)  # past the end: stays at the floor
    assert lr_at(50, peak=1e-3, warmup=10, total=None) == 1e-3  # time budget not calibrated yet


def test_lr_wsd():
    kw = dict(peak=1e-3, warmup=10, total=110, min_ratio=0.1, kind="wsd")
    assert lr_at(5, **kw) == pytest.approx(6e-4)
    assert lr_at(50, **kw) == 1e-3
    assert lr_at(90, **kw) == pytest.approx(1e-3)  # decay starts at 80% of the post-warmup steps
    assert lr_at(100, **kw) == pytest.approx(1e-3 * (1 - 0.9 * 0.5))
    assert lr_at(110, **kw) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(50, peak=1e-3, warmup=10, total=110, kind="linear")


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


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tmp_path):
    model = new_model()
    opt = make_optimizer(model, "muon", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    muon, adamw = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    assert in_muon == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert sorted([*in_muon, *in_adamw]) == sorted(names.values())  # each parameter once
    assert "tok_emb.weight" in in_adamw
    summary = fit(model, batches, loss_fn, loop(tmp_path, max_steps=30, lr=1e-2, optimizer="muon"))
    first = records(tmp_path)[0]["loss"]
    assert summary["loss"] < first - 0.5  # it trains
    other = make_optimizer(new_model(), "adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    with pytest.raises(ValueError, match="another optimizer"):  # an AdamW checkpoint is not Muon's
        opt.load_state_dict(other.state_dict())
