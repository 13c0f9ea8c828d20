import numpy as np
import pytest
import torch

from yunque.data import Document, TokenWindows, build_shards, open_split
from yunque.tokenizer.bpe import byte_tokenizer


def _windows(*lengths: int) -> TokenWindows:
    """Shards holding consecutive integers, so a window's values tell where it came from."""
    starts = np.cumsum([0, *lengths[:-1]])
    return TokenWindows([np.arange(s, s + n, dtype=np.uint16) for s, n in zip(starts, lengths)])


def test_sample_is_a_pure_function_of_seed_and_step():
    data = _windows(100, 50, 3)
    x, y = data.sample(4, 8, seed=7, step=3)
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    x2, y2 = data.sample(4, 8, seed=7, step=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, data.sample(4, 8, seed=7, step=4)[0])
    assert not torch.equal(x, data.sample(4, 8, seed=8, step=3)[0])


def test_sample_targets_are_inputs_shifted_by_one():
    x, y = _windows(100, 50, 3).sample(16, 8, seed=0, step=0)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive integers: never crosses a shard end
    assert x.max() < 150  # the 3-token shard is too short for a window and never used


def test_sample_from_memmapped_shards(tmp_path):
    tok = byte_tokenizer()
    docs = [Document(f"d{i}", f"document number {i} " * 3) for i in range(6)]
    build_shards(docs, tok, tmp_path, val_fraction=0.3, shard_tokens=64)
    train = TokenWindows(open_split(tmp_path, "train"))
    x, y = train.sample(3, 16, seed=1, step=0)
    assert x.shape == (3, 16)
    assert 0 <= int(x.min()) and int(x.max()) < tok.vocab_size


def test_iter_eval_covers_the_tokens_in_order():
    data = _windows(23, 10)
    batches = list(data.iter_eval(2, 5))
    assert [x.shape[0] for x, _ in batches] == [2, 2, 1]  # last partial batch included
    xs = torch.cat([x for x, _ in batches]).flatten().tolist()
    ys = torch.cat([y for _, y in batches]).flatten().tolist()
    # shard 0 (0..22): windows at 0, 5, 10, 15 (tail 20..22 skipped); shard 1 (23..32): one window at 0
    assert xs == [*range(0, 20), *range(23, 28)]
    assert ys == [*range(1, 21), *range(24, 29)]
    assert data.num_tokens == 33


def test_iter_eval_max_batches():
    assert len(list(_windows(100).iter_eval(2, 5, max_batches=3))) == 3
    assert list(_windows(100).iter_eval(2, 5, max_batches=0)) == []


def test_too_short_split():
    data = _windows(4, 5)
    with pytest.raises(ValueError, match="the split has 9 tokens.*lower --seq-len or add data"):
        data.sample(1, 8, seed=0, step=0)
    with pytest.raises(ValueError, match="lower --seq-len"):
        next(data.iter_eval(1, 8))
    with pytest.raises(ValueError, match="the split has 0 tokens"):
        TokenWindows([]).sample(1, 8, seed=0, step=0)
