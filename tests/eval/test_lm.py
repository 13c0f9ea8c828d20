"""LocalLM: what precision it scores in, and the bf16 fast path against the fp32 path it stands in for."""

import pytest
import torch

from yunque.config import preset
from yunque.eval.lm import LocalLM
from yunque.eval.scoring import score_one
from yunque.model.gpt import GPT
from yunque.precision import bf16_supported
from yunque.tokenizer.bpe import byte_tokenizer

PAIRS = [("The cat sat on the", " mat"), ("The cat sat on the", " hat and the rest of it"), ("x = 1\ny =", " 2"),
         ("def f(a, b):\n    return", " a + b"), ("def f(a, b):\n    return", " None")]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=byte_tokenizer().vocab_size, max_seq_len=256)).train()


def test_fp32_scores_are_the_simple_paths_and_leave_the_model_alone(model):
    tok = byte_tokenizer()
    lm = LocalLM(model, tok, precision="fp32")
    assert lm.precision == "fp32" and model.training  # scoring runs on a copy of its own
    got = lm.loglikelihood(PAIRS)
    with torch.no_grad():
        want = [score_one(model.eval(), r) for r in lm.requests(PAIRS)]
    model.train()
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-5)
    assert [g for _, g in got] == [g for _, g in want]


def test_bf16_scores_stay_near_fp32_and_are_cached_apart(model):
    tok = byte_tokenizer()
    fp32, bf16 = LocalLM(model, tok, precision="fp32"), LocalLM(model, tok, precision="bf16")
    assert next(bf16.scorer.parameters()).dtype == torch.bfloat16 and bf16.precision == "bf16"
    a, b = fp32.loglikelihood(PAIRS), bf16.loglikelihood(PAIRS)
    for (x, _), (y, _), (_, cont) in zip(a, b, PAIRS):
        assert y == pytest.approx(x, abs=0.02 * len(cont))  # bf16 rounding: a few hundredths of a nat a byte
    assert fp32.fingerprint != bf16.fingerprint  # the cache never hands bf16 results to an fp32 run
    auto = LocalLM(model, tok, precision="auto")
    assert auto.precision == ("bf16" if bf16_supported("cpu") else "fp32")
