"""Perplexity and bits per byte on text, against the unigram baseline."""

import math

import numpy as np
import pytest
import torch

from yunque.config import preset
from yunque.eval.perplexity import bits_per_byte, text_perplexity, unigram_loss
from yunque.model.gpt import GPT
from yunque.tokenizer.bpe import byte_tokenizer


def test_bits_per_byte_converts_nats_per_token():
    assert bits_per_byte(math.log(2), tokens=10, n_bytes=10) == pytest.approx(1.0)
    assert bits_per_byte(math.log(2), tokens=5, n_bytes=10) == pytest.approx(0.5)  # two bytes a token


def test_text_perplexity_of_a_model_on_spanish_text():
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=32)).eval()
    text = "El niño comió una manzana. ¿Dónde está la estación?"
    r = text_perplexity(model, tok, [text], batch_size=2)
    assert r["bytes"] == len(text.encode("utf-8")) and r["tokens"] == r["bytes"] + 1  # bytes + BOS
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert abs(r["loss"] - math.log(tok.vocab_size)) < 0.5  # untrained: near chance
    with pytest.raises(ValueError, match="no text to score"):
        text_perplexity(model, tok, [""])


def test_unigram_loss_is_the_entropy_of_the_counts():
    train = [np.array([0, 0, 1, 1])]
    # add-one counts over 3 tokens: 3/7, 3/7, 1/7
    assert unigram_loss(train, [np.array([0, 1])], 3) == pytest.approx(-math.log(3 / 7))
    assert unigram_loss(train, [np.array([2])], 3) == pytest.approx(-math.log(1 / 7))
