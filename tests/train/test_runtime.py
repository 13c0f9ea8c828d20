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


def test_one_process_agrees_with_itself_and_trains_the_whole_batch():
    rt, batch = Runtime(), (torch.arange(6).view(3, 2), torch.ones(3, 2))
    assert rt.agree(True, 12.5) == (True, 12.5) and rt.agree(False, 1.0) == (False, 1.0)
    assert rt.shard(batch) is batch and rt.broadcast_object({"a": 1}) == {"a": 1}
    assert (rt.device("cuda:1"), rt.threads(3)) == ("cuda:1", 3)


def test_nonfinite_parameter_is_named():
    model = torch.nn.Linear(2, 2)
    assert Runtime().nonfinite_parameter(model) is None
    with torch.no_grad():
        model.bias[1] = float("nan")
    assert Runtime().nonfinite_parameter(model) == "bias"
