import pytest
import torch

from yunque.config import preset
from yunque.engine.engine import Engine
from yunque.eval.qa import answer_questions, token_f1
from yunque.model.gpt import GPT
from yunque.tokenizer.bpe import END_OF_TURN, byte_tokenizer


def test_token_f1_by_hand():
    assert token_f1("Return the sum.", "return the sum") == 1.0
    assert token_f1("the sum", "return the sum of a") == pytest.approx(2 * 1.0 * 0.4 / 1.4)
    assert token_f1("", "x") == 0.0 and token_f1("a", "b") == 0.0


class ScriptedModel(GPT):
    """Emits the bytes of a fixed reply, then <|end|>, whatever the prompt."""

    def __init__(self, reply: bytes, end_id: int):
        super().__init__(preset("tiny", vocab_size=263, max_seq_len=128))
        self.script, self.end_id = list(reply) + [end_id], end_id

    def forward(self, ids, kv_cache=None):
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
