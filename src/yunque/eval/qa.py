"""Answering held-out questions: does the model keep the chat format, stop at the end of its turn, answer rather
than loop, and say something close to the reference answer?"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from yunque.engine.engine import Engine, SamplingParams
from yunque.tokenizer.chat import ChatFormat

_WORD = re.compile(r"\w+")


def token_f1(prediction: str, reference: str) -> float:
    """Word-overlap F1 of two strings (SQuAD's answer metric, Rajpurkar et al. 2016), case-insensitive."""
    p, r = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def repetition(ids: Sequence[int], n: int = 4) -> float:
    """Share of the n-grams of `ids` that repeat an earlier one: 1 - distinct n-grams / n-grams, the seq-rep-n of
    Welleck et al. 2019 (neural text degeneration). 0.0 for fewer than n ids. A phrase of n tokens said three times
    running scores 5/9; twice, 1/5."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def is_repetitive(ids: Sequence[int]) -> bool:
    """Whether a reply is a loop rather than an answer: at least two tokens that are all the same token, or more
    than half of its token 4-grams repeats of earlier ones (`repetition(ids, 4) > 0.5`, e.g. a short phrase said
    three times or more)."""
    return (len(ids) >= 2 and len(set(ids)) == 1) or repetition(ids, 4) > 0.5


def answer_questions(engine: Engine, conversations: list[dict], fmt: ChatFormat | None = None, *,
                     max_new_tokens: int = 64, batch_size: int = 16) -> dict:
    """Greedy replies to the user turn of each conversation, scored against its assistant turn.

    fmt is the model's chat format (by default the engine tokenizer's); a reply ends where it ends an assistant
    turn. Each reply (its generated ids, without the token that ended it) counts as:

    - empty: nothing but whitespace;
    - repetitive: `is_repetitive` (one token repeated, or most of its 4-grams repeats);
    - keeping the format: ended by the turn's end (a stop id or stop string) before its token budget
      (max_new_tokens, or less where the context runs out), and neither empty nor repetitive.

    Returns {"format_rate", "repetition_rate", "empty_rate": the shares of replies counted so, "mean_f1": mean word
    F1 against the reference, "questions": how many, "examples": the first few (question, reply, reference)}.
    """
    if fmt is None:
        fmt = ChatFormat.for_tokenizer(engine.tokenizer)
    params = fmt.reply_params(SamplingParams(max_new_tokens=max_new_tokens, temperature=0))
    ctx = engine.model.cfg.max_seq_len
    kept, repetitive, empty, f1s, examples = 0, 0, 0, [], []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        prompts = [fmt.prompt(c["messages"][:-1]) for c in chunk]
        for conv, prompt, ids in zip(chunk, prompts, engine.generate(prompts, params)):
            reply = engine.tokenizer.decode(ids).strip()
            reference = conv["messages"][-1]["content"]
            stopped = len(ids) < min(max_new_tokens, ctx - len(prompt))  # a reply cut by the budget uses all of it
            loop = is_repetitive(ids)
            kept += int(stopped and bool(reply) and not loop)
            repetitive += int(loop)
            empty += int(not reply)
            f1s.append(token_f1(reply, reference))
            if len(examples) < 5:
                examples.append({"question": conv["messages"][-2]["content"], "reply": reply,
                                 "reference": reference})
    n = max(1, len(conversations))
    return {"format_rate": kept / n, "repetition_rate": repetitive / n, "empty_rate": empty / n,
            "mean_f1": sum(f1s) / n, "questions": len(conversations), "examples": examples}
