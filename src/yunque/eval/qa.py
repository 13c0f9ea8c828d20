"""Answering held-out questions: does the model keep the chat format, stop at the end of its turn, and say
something close to the reference answer?"""

from __future__ import annotations

import re
from collections import Counter

from yunque.engine.engine import Engine, SamplingParams
from yunque.tokenizer.chat import ChatTemplate, render_prompt

_WORD = re.compile(r"\w+")


def token_f1(prediction: str, reference: str) -> float:
    """Word-overlap F1 of two strings (SQuAD's answer metric, Rajpurkar et al. 2016), case-insensitive."""
    p, r = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def answer_questions(engine: Engine, conversations: list[dict], *, max_new_tokens: int = 64,
                     batch_size: int = 16, template: ChatTemplate | None = None) -> dict:
    """Greedy replies to the user turn of each conversation, scored against its assistant turn.

    Returns {"format_rate": share of replies that end with an end-of-turn token within max_new_tokens and are
    not empty, "mean_f1": mean word F1 against the reference, "examples": the first few (question, reply,
    reference)}.
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0)
    stopped, f1s, examples = 0, [], []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        prompts = [render_prompt(engine.tokenizer, c["messages"][:-1], template=template) for c in chunk]
        for conv, ids in zip(chunk, engine.generate(prompts, params)):
            reply = engine.tokenizer.decode(ids).strip()
            reference = conv["messages"][-1]["content"]
            stopped += int(len(ids) < max_new_tokens and bool(reply))  # ended by <|end|>/EOS, not by the limit
            f1s.append(token_f1(reply, reference))
            if len(examples) < 5:
                examples.append({"question": conv["messages"][-2]["content"], "reply": reply,
                                 "reference": reference})
    n = max(1, len(conversations))
    return {"format_rate": stopped / n, "mean_f1": sum(f1s) / n, "questions": len(conversations),
            "examples": examples}
