import math

import pytest
import torch

from yunque.engine.sampling import (
    CDF_BLOCK,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    inverse_cdf,
    penalize,
    sample,
    token_logprobs,
    top_logprobs,
)


def generators(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def frequencies(logits: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    """Empirical distribution of n draws from one row of logits (V,), with one seeded generator."""
    g = torch.Generator().manual_seed(1234)
    ids = sample(logits.expand(n, -1), generators=[g] * n, **kwargs)
    return torch.bincount(ids, minlength=logits.shape[-1]).float() / n


def test_greedy_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    ids = sample(logits, temperature=0)
    assert ids.dtype == torch.int64 and ids.shape == (4,)
    assert torch.equal(ids, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324, 1e-8])
def test_a_tiny_temperature_is_greedy_not_nan(temperature):
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3)) * 20
    logits[0, :2] = 1000.0  # a tie for the best: a tiny temperature draws between the two
    ids = sample(logits, temperature=temperature, generators=generators(8))
    assert torch.equal(ids[1:], logits[1:].argmax(-1))
    assert ids[0].item() in (0, 1)
    half = logits.bfloat16()
    ids = sample(half, temperature=temperature, top_k=5, top_p=0.5, generators=generators(8))
    assert torch.equal(ids[1:], half[1:].float().argmax(-1))


def test_per_row_generators_may_be_none():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    gens = generators(3, seed=9)
    gens[1] = None  # this row draws from torch's global generator
    ids = sample(logits, temperature=0.9, generators=gens)
    again = sample(logits, temperature=0.9, generators=[gens[0].manual_seed(9), None, gens[2].manual_seed(11)])
    assert ids[0] == again[0] and ids[2] == again[2]


def test_token_logprobs_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    got = token_logprobs(logits, torch.tensor([1, 0]))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([math.log(0.75), math.log(0.5)]))
    assert torch.equal(token_logprobs(logits.bfloat16(), torch.tensor([1, 0])).isfinite(), torch.tensor([True, True]))


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, top_k=1, generators=generators(8)), greedy)
    assert torch.equal(sample(logits, top_p=1e-6, generators=generators(8)), greedy)


def test_seeded_samples_are_reproducible_and_per_row():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(2))
    a = sample(logits, temperature=0.9, top_k=40, top_p=0.95, generators=generators(6, seed=7))
    b = sample(logits, temperature=0.9, top_k=40, top_p=0.95, generators=generators(6, seed=7))
    assert torch.equal(a, b)
    # a row's draw depends only on its own generator: the same as sampling that row alone
    for i in range(6):
        alone = sample(logits[i:i + 1], temperature=0.9, top_k=40, top_p=0.95, generators=generators(1, seed=7 + i))
        assert alone.item() == a[i].item()


def test_bf16_logits_are_sampled_in_fp32():
    logits = torch.randn(3, 20).bfloat16()
    ids = sample(logits, temperature=0.7, top_p=0.9, generators=generators(3))
    assert ids.dtype == torch.int64 and ids.shape == (3,)


def test_frequencies_match_softmax():
    probs = torch.tensor([0.2, 0.3, 0.5])
    freq = frequencies(probs.log(), 20_000)
    assert torch.allclose(freq, probs, atol=0.02), freq
    # temperature 2 flattens: p ** (1/2), renormalized
    hot = probs.sqrt() / probs.sqrt().sum()
    assert torch.allclose(frequencies(probs.log(), 20_000, temperature=2.0), hot, atol=0.02)


def test_a_uniform_draw_of_one_never_picks_a_token_of_probability_zero(monkeypatch):
    # u * total rounding up to the total: the last token of positive probability, not the last of the vocabulary
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(2, 1))
    logits = torch.tensor([[0.0, 1.0, float("-inf"), float("-inf")], [0.0, 0.0, 0.0, 0.0]])
    assert sample(logits).tolist() == [1, 3]


def flat_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The simple path: the first token whose cumulative sum over the whole row exceeds u times the total."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)


def test_inverse_cdf_in_blocks_equals_one_cumulative_sum_over_the_row():
    g = torch.Generator().manual_seed(5)
    V = 3 * CDF_BLOCK + 17  # a last block that is not whole
    # probabilities that are multiples of 2^-12: every sum is exact in fp32, so both paths must agree to the token
    probs = torch.randint(0, 8, (64, V), generator=g).float() / 4096
    probs[:, CDF_BLOCK - 3:2 * CDF_BLOCK + 5] = 0  # a whole block of zeros, and zeros across two block borders
    probs[0] = 0
    probs[0, V - 1] = 1 / 4096  # all the mass in the last, short block
    probs[1, :3] = 0  # u = 0 must skip them
    probs[3, :CDF_BLOCK + 2] = 0  # and this row's first block too, at u = 0
    u = torch.randint(0, 4096, (64, 1), generator=g).float() / 4096
    u[1], u[2], u[3] = 0.0, 4095 / 4096, 0.0
    got = inverse_cdf(probs, u)
    assert torch.equal(got, flat_inverse_cdf(probs, u))
    assert bool((probs.gather(1, got[:, None]) > 0).all())


def test_inverse_cdf_at_the_top_of_a_row_takes_its_last_token_of_positive_probability():
    probs = torch.zeros(2, 2 * CDF_BLOCK)
    probs[0, 5], probs[0, CDF_BLOCK + 9] = 0.25, 0.75  # then zeros to the end of the row
    probs[1, 3] = 1.0
    assert inverse_cdf(probs, torch.ones(2, 1)).tolist() == [CDF_BLOCK + 9, 3]


def test_top_k_2_never_picks_the_third():
    probs = torch.tensor([0.5, 0.2, 0.3])
    freq = frequencies(probs.log(), 5_000, top_k=2)
    assert freq[1] == 0
    assert math.isclose(freq[0].item(), 0.5 / 0.8, abs_tol=0.03)


def test_filter_top_k_by_hand():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    inf = float("-inf")
    assert torch.equal(filter_top_k(logits, 2), torch.tensor([[inf, 4.0, 3.0, inf]]))
    assert torch.equal(filter_top_k(logits, 10), logits)  # k larger than the vocabulary keeps everything


def test_filter_top_p_by_hand():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()

    def kept(p):
        return torch.isfinite(filter_top_p(logits, p)).nonzero().flatten().tolist()

    assert kept(0.1) == [1]  # the top token alone reaches 0.1
    assert kept(0.7) == [1, 3]  # 0.5 < 0.7 <= 0.8
    assert kept(0.85) == [1, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3]


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
])
def test_invalid_values_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample(torch.zeros(1, 3), **kwargs)


def test_filter_min_p_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = filter_min_p(logits, 0.2)  # threshold 0.2 * 0.5 = 0.1: 0.05 goes
    assert torch.isinf(kept[0, 3]) and torch.equal(kept[0, :3], logits[0, :3])
    assert torch.equal(filter_min_p(logits, 0.0), logits)
    only_best = filter_min_p(logits, 1.0)
    assert torch.isfinite(only_best).tolist() == [[True, False, False, False]]


def test_min_p_never_draws_below_the_threshold():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    freq = frequencies(logits, 4000, min_p=0.5)  # keeps 0.5 and 0.3: renormalised to 0.625 / 0.375
    assert freq[2] == freq[3] == 0
    assert freq[0].item() == pytest.approx(0.625, abs=0.03)


def test_penalize_by_hand():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    counts = torch.tensor([[2, 0, 1, 0]])
    got = penalize(logits, counts, frequency=0.5, presence=0.25)
    assert got.tolist() == [[1 - 1 - 0.25, 2.0, -1 - 0.5 - 0.25, 0.5]]
    # repetition: positive logits of seen tokens divided, negative ones multiplied; seen defaults to counts > 0
    assert penalize(logits, counts, repetition=2.0).tolist() == [[0.5, 2.0, -2.0, 0.5]]
    seen = torch.tensor([[False, True, False, True]])  # e.g. prompt tokens
    assert penalize(logits, torch.zeros_like(counts), repetition=2.0, seen=seen).tolist() == [[1.0, 1.0, -1.0, 0.25]]
    assert torch.equal(penalize(logits, counts), logits)


@pytest.mark.parametrize("kwargs", [dict(frequency=2.5), dict(presence=-3.0), dict(repetition=0.0),
                                    dict(repetition=5e-324)])
def test_penalize_refuses_out_of_range(kwargs):
    with pytest.raises(ValueError, match="must be in"):
        penalize(torch.zeros(1, 4), torch.zeros(1, 4), **kwargs)


def test_top_logprobs_agree_with_token_logprobs():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(5))
    ids, values = top_logprobs(logits, 4)
    assert torch.equal(ids[:, 0], logits.argmax(-1))
    assert (values[:, :-1] >= values[:, 1:]).all()
    for j in range(4):
        assert torch.allclose(values[:, j], token_logprobs(logits, ids[:, j]))
