"""The single-process runtime: the contract `fit` relies on, which a distributed runtime keeps."""

import torch

from yunque.train.runtime import Runtime


def test_one_process_is_the_main_one_and_changes_nothing():
    rt = Runtime()
    assert rt.is_main and (rt.rank, rt.world_size) == (0, 1)
    value = torch.tensor(2.5)
    assert rt.mean(value) is value
    assert rt.broadcast_flag(True) is True and rt.broadcast_flag(False) is False


def test_no_sync_lets_every_micro_batch_accumulate_gradients():
    model, rt = torch.nn.Linear(3, 1), Runtime()
    for last in (False, True):
        with rt.no_sync(model, last):
            model(torch.ones(1, 3)).sum().backward()
    assert torch.equal(model.weight.grad, 2 * torch.ones(1, 3))
