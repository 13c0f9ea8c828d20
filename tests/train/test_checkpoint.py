"""Checkpoints: a failed save leaves the previous one, a kill between the renames is finished, steps agree."""

import pytest
import safetensors.torch
import torch

from tests.train.windows import TOK, assert_same_weights, batches, loop, loss_fn, new_model
from yunque.atomic import JOURNAL, TMP
from yunque.modeldir import WEIGHTS, checkpoint_progress, load_model, save_model, weights_metadata
from yunque.train.checkpoint import STATE, has_checkpoint, load_checkpoint, save_checkpoint
from yunque.train.loop import fit
from yunque.train.optim import make_adamw


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


def test_a_kill_between_the_two_renames_resumes_from_the_new_pair(tmp_path):
    """SIGKILL after the weights were renamed into place but before the training state was: the journal lets the
    next load finish the save instead of refusing a pair from two steps."""
    out = tmp_path / "run"
    out.mkdir()
    model = new_model()
    opt = make_adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    save_checkpoint(out, model, opt, 6, {"max_steps": 12})
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    # what save_checkpoint(out, model, opt, 8) leaves when killed after its first rename
    torch.save({"step": 8, "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "max_steps": 12},
               out / (STATE + TMP))
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()
                                 if k != "lm_head.weight"}, out / WEIGHTS, metadata={"step": "8"})
    (out / JOURNAL).write_text(f'[["{STATE}{TMP}", "{STATE}"], ["{WEIGHTS}{TMP}", "{WEIGHTS}"]]')
    assert has_checkpoint(out) and not (out / JOURNAL).exists()
    restored = new_model(seed=1)
    state = load_checkpoint(out, restored, make_adamw(restored, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95)))
    assert state["step"] == 8
    assert_same_weights(restored, model)
    assert checkpoint_progress(out) == (8, None)  # the hand-made weights carry no planned total


def test_checkpoint_progress_reads_the_step_and_the_plan(tmp_path):
    out = tmp_path / "run"
    fit(new_model(), batches, loss_fn, loop(out, max_steps=4))
    assert checkpoint_progress(out) == (4, 4)
    assert checkpoint_progress(tmp_path / "nothing") is None


def test_cuda_rng_state_is_saved_and_restored(tmp_path, monkeypatch):
    """No GPU here: torch.cuda's RNG calls stand in, to show the state travels through the checkpoint."""
    saved_state, restored = [torch.arange(8, dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    def adamw(model):
        return make_adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    model, other = new_model(), new_model()
    save_checkpoint(tmp_path, model, adamw(model), step=3)
    load_checkpoint(tmp_path, other, adamw(other))
    assert len(restored) == 1 and torch.equal(restored[0][0], saved_state[0])
