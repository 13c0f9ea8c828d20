"""Benchmark tasks made from held-out text, for a model whose corpus has no benchmark of its own (the speedrun's
built-in corpus): written as task specs and data files, so that `yunque eval` runs them like any other task.

- heldout_last_word: lm-eval's lambada_openai formulation on passages of the text: the passage without its last
  word is the context, " " + that word the target; acc counts the passages whose every target token is the
  model's top choice, perplexity is exp(-mean log-likelihood).
- heldout_cloze: multiple choice in HellaSwag's shape: a passage, then its true next words against three runs of
  as many words taken from other passages; acc and acc_norm (chance: 0.25).
- heldout_bpb: lm-eval's wikitext scoring (rolling windows, every token once) on the beginnings of whole documents:
  bits per byte, byte and word perplexity.

Passages are paragraphs (text between blank lines) cut at a word that follows a space; which ones, and the cloze's
distractors and answer positions, depend only on the text and the seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

WORD = re.compile(r"(?<=\S) ([A-Za-z_][A-Za-z0-9_]{2,})(?=\W|$)")
"""A word the last-word task may ask for: an identifier-like word of three or more characters after one space."""
CLOZE_WORDS = 8
"""Words of each cloze choice."""
MIN_CONTEXT_WORDS = 12
"""Words a passage gives before what is asked."""
PARAGRAPH_CHARS = 600
"""Longest paragraph asked about: with what is asked, it fits a 256-token context (the speedrun's) in a 4k BPE, so
that every item runs in a batch rather than cut alone."""
PAGE_CHARS = 2000
"""Characters of each document scored for bits per byte (cut at a line end): many documents, each short."""

SPECS = {
    "heldout_last_word": {"output_type": "loglikelihood", "data_files": {"test": "last_word.jsonl"},
                          "test_split": "test", "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                          "doc_to_target": "{{' '+text.split(' ')[-1]}}"},
    "heldout_cloze": {"output_type": "multiple_choice", "data_files": {"test": "cloze.jsonl"}, "test_split": "test",
                      "doc_to_text": "{{query}}", "doc_to_target": "gold", "doc_to_choice": "choices"},
    "heldout_bpb": {"output_type": "loglikelihood_rolling", "data_files": {"test": "pages.jsonl"},
                    "test_split": "test", "process_docs": "text_page", "doc_to_target": "text"},
}


def paragraphs(documents: Sequence[str]) -> list[str]:
    """The paragraphs of the documents that hold at least MIN_CONTEXT_WORDS + CLOZE_WORDS words in at most
    PARAGRAPH_CHARS characters, in order."""
    out = []
    for doc in documents:
        for p in re.split(r"\n\s*\n", doc):
            p = p.strip("\n")
            if len(p) <= PARAGRAPH_CHARS and len(p.split()) >= MIN_CONTEXT_WORDS + CLOZE_WORDS and p.strip():
                out.append(p)
    return out


def last_word_items(paras: Sequence[str]) -> list[dict]:
    """{"text": passage} per paragraph that has an askable word after MIN_CONTEXT_WORDS words: the paragraph cut
    after its last such word."""
    out = []
    for p in paras:
        found = [m for m in WORD.finditer(p) if len(p[:m.start()].split()) >= MIN_CONTEXT_WORDS]
        if found:
            out.append({"text": p[:found[-1].end()]})
    return out


def cloze_items(paras: Sequence[str], seed: int) -> list[dict]:
    """{"query", "choices", "gold"} per paragraph: cut after MIN_CONTEXT_WORDS or more words at a single space, its
    next CLOZE_WORDS words are the answer, three other paragraphs' answers the distractors, the answer's position
    drawn by `seed`."""
    rng = random.Random(seed)
    cut = []
    for p in paras:
        starts = [m.start() for m in re.finditer(r"(?<=\S) (?=\S)", p)]  # single spaces between words
        starts = [s for s in starts if len(p[:s].split()) >= MIN_CONTEXT_WORDS and len(p[s:].split()) >= CLOZE_WORDS]
        if starts:
            s = rng.choice(starts)
            words = list(re.finditer(r"\S+", p[s + 1:]))
            cut.append((p[:s], p[s + 1:s + 1 + words[CLOZE_WORDS - 1].end()]))
    out: list[dict] = []
    if len({answer for _, answer in cut}) < 4:
        return out
    for i, (query, answer) in enumerate(cut):
        others: list[int] = []
        while len(others) < 3:
            j = rng.randrange(len(cut))
            if j != i and j not in others and cut[j][1] != answer:
                others.append(j)
        choices = [cut[j][1] for j in others]
        gold = rng.randrange(4)
        choices.insert(gold, answer)
        out.append({"query": query, "choices": choices, "gold": gold})
    return out


def pages(documents: Sequence[str]) -> list[dict]:
    """{"text": the document's first PAGE_CHARS characters, cut at a line end} per non-empty document."""
    out = []
    for doc in documents:
        text = doc if len(doc) <= PAGE_CHARS else doc[:doc.rfind("\n", 0, PAGE_CHARS) + 1 or PAGE_CHARS]
        if text.strip():
            out.append({"text": text})
    return out


def write_text_tasks(documents: Sequence[str], out_dir: str | Path, *, items: int = 200, seed: int = 0) -> list[Path]:
    """Write heldout_last_word, heldout_cloze and heldout_bpb (their specs and data, at most `items` items each,
    spread over the documents) into out_dir; returns the spec files, for `load_task` or `yunque eval --tasks`.
    A task with no item (text too short for it) is left out."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paras = _spread(paragraphs(documents), 2 * items)  # a few are unusable: enough for `items` of each task
    data = {"heldout_last_word": last_word_items(paras), "heldout_cloze": cloze_items(paras, seed),
            "heldout_bpb": pages(_spread(list(documents), items))}
    written = []
    for name, rows in data.items():
        if not rows:
            continue
        rows = _spread(rows, items)
        spec = {"task": name, **SPECS[name]}
        (out / spec["data_files"]["test"]).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        path = out / f"{name}.yaml"
        path.write_text(f"# {__name__}: {len(rows)} items from held-out text\n" + yaml.safe_dump(spec, sort_keys=False),
                        encoding="utf-8")
        written.append(path)
    return written


def _spread(rows: list, n: int) -> list:
    """At most n of the rows, evenly spaced: from all over the text, not only its first documents."""
    return rows[::max(1, len(rows) // n)][:n]


__all__ = ["write_text_tasks", "paragraphs", "last_word_items", "cloze_items", "pages", "SPECS"]
