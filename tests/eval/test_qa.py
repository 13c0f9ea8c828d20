"""Held-out questions: word F1, the repetition measure, and the format, repetition and empty rates of replies."""

from types import SimpleNamespace

import pytest
import torch

from yunque.config import preset
from yunque.engine.engine import Engine
from yunque.eval.qa import answer_questions, is_repetitive, repetition, token_f1
from yunque.model.gpt import GPT
from yunque.tokenizer.bpe import END_OF_TURN, Tokenizer, byte_tokenizer


def test_token_f1_by_hand():
    assert token_f1("Return the sum.", "return the sum") == 1.0
    assert token_f1("the sum", "return the sum of a") == pytest.approx(2 * 1.0 * 0.4 / 1.4)
    assert token_f1("", "x") == 0.0 and token_f1("a", "b") == 0.0


class ScriptedModel(GPT):
    """Emits the bytes of a fixed reply, then <|end|>, whatever the prompt."""

    def __init__(self, reply: bytes, end_id: int):
        super().__init__(preset("tiny", vocab_size=263, max_seq_len=128))
        self.script, self.end_id = list(reply) + [end_id], end_id

    def forward(self, ids, kv_cache=None, logits_to_keep=0):  # every position's logits, whatever it keeps
        start = kv_cache.pos if kv_cache is not None else 0
        out = super().forward(ids, kv_cache=kv_cache)
        logits = torch.full_like(out, -1e9)
        # the token after position p is the next script byte; the prompt is at most 40 tokens here
        for t in range(ids.shape[1]):
            k = start + t - self.prompt_len + 1
            logits[:, t, self.script[min(max(k, 0), len(self.script) - 1)]] = 0
        return logits


def test_answer_questions_scores_format_and_f1():
    tok = byte_tokenizer()
    end = tok.special_ids[END_OF_TURN]
    model = ScriptedModel(b"Return the sum.", end)
    conv = [{"role": "user", "content": "What does `f` do?"}, {"role": "assistant", "content": "Return the sum."}]
    from yunque.tokenizer.chat import render_prompt
    model.prompt_len = len(render_prompt(tok, conv[:1]))
    r = answer_questions(Engine(model, tok), [{"messages": conv}], max_new_tokens=32)
    assert r["format_rate"] == 1.0 and r["mean_f1"] == 1.0 and r["examples"][0]["reply"] == "Return the sum."
    r = answer_questions(Engine(model, tok), [{"messages": conv}], max_new_tokens=5)  # cut by the limit
    assert r["format_rate"] == 0.0


def test_repetition_by_hand():
    assert repetition([1, 2, 3, 4] * 3) == pytest.approx(5 / 9)  # 9 4-grams, 4 distinct
    assert repetition([1, 2, 3, 4] * 2) == pytest.approx(1 / 5)
    assert repetition([7] * 6) == pytest.approx(2 / 3) and repetition([7] * 6, n=1) == pytest.approx(5 / 6)
    assert repetition([1, 2, 3]) == 0.0 and repetition([]) == 0.0


def test_what_counts_as_repetitive():
    assert is_repetitive([5, 5]) and is_repetitive(list(b"!!!!!!"))  # one token repeated
    assert is_repetitive(list(b"the sum the sum the sum "))  # a phrase three times: 13 of 21 4-grams repeat
    assert not is_repetitive([5]) and not is_repetitive([])
    assert not is_repetitive(list(b"Return the sum of a and b, then the sum of c and d."))
    assert not is_repetitive(list(b"the sum the sum "))  # twice is not a loop


class FakeEngine:
    """The part of Engine that answer_questions uses, replying with the given ids in turn (an engine returns a
    reply's ids without the token that ended it, so a reply that stopped is shorter than its budget)."""

    def __init__(self, tokenizer: Tokenizer, replies: list[bytes]) -> None:
        self.tokenizer, self.model = tokenizer, SimpleNamespace(cfg=SimpleNamespace(max_seq_len=512))
        self.replies, self.calls = [list(r) for r in replies], []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        return [self.replies.pop(0)[:params.max_new_tokens] for _ in prompts]


def test_degenerate_replies_do_not_keep_the_format():
    replies = [b"Return the sum.",  # stopped, an answer: keeps the format
               b"",  # stopped at once: empty
               b"!!!!!!",  # stopped, one token repeated
               b"ok. ok. ok. ",  # stopped, a phrase three times
               (b"the sum " * 8)[:32],  # a loop cut by max_new_tokens
               b"abcdefghijklmnopqrstuvwxyz012345"]  # cut by max_new_tokens, not a loop
    conv = {"messages": [{"role": "user", "content": "What does `f` do?"},
                         {"role": "assistant", "content": "Return the sum."}]}
    r = answer_questions(FakeEngine(byte_tokenizer(), replies), [conv] * 6, max_new_tokens=32, batch_size=4)
    assert r["format_rate"] == pytest.approx(1 / 6)
    assert r["repetition_rate"] == pytest.approx(3 / 6) and r["empty_rate"] == pytest.approx(1 / 6)
    assert r["mean_f1"] == pytest.approx((1 + 4 / 11) / 6)  # the loop: 2 of its 8 words, 2 of the 3 expected
    assert r["questions"] == 6 and [e["reply"] for e in r["examples"]] == [x.decode().strip() for x in replies[:5]]


def test_replies_end_where_the_format_ends_a_turn(chatml):
    fmt, tok = chatml, chatml.tokenizer
    conv = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    engine = FakeEngine(tok, [b"Hello"])
    assert answer_questions(engine, [conv], fmt)["format_rate"] == 1.0
    [(prompts, params)] = engine.calls
    assert prompts == [fmt.prompt(conv["messages"][:1])] and params.stop == ("<|im_end|>",)
    assert params.temperature == 0
