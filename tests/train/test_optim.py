"""Optimizers and schedules: warmup then cosine or WSD, Muon on the blocks' matrices and AdamW on the rest."""

import math

import pytest

from tests.train.windows import batches, loop, loss_fn, new_model, records
from yunque.train.loop import fit
from yunque.train.optim import lr_at, make_optimizer


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
