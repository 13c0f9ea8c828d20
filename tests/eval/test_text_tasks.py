"""Benchmark tasks from held-out text: each item is what the text says, the files load as tasks, and a model that
knows the text scores them above chance."""

import pytest
import torch

from yunque.config import preset
from yunque.eval.harness import evaluate
from yunque.eval.lm import LocalLM
from yunque.eval.task import load_task
from yunque.eval.text_tasks import CLOZE_WORDS, cloze_items, last_word_items, pages, paragraphs, write_text_tasks
from yunque.model.gpt import GPT
from yunque.tokenizer.bpe import byte_tokenizer


@pytest.fixture(scope="module")
def documents(shared_data):
    speeches = (shared_data / "tinyshakespeare.txt").read_text().split("\n\n")
    # documents of several speeches each: paragraphs are the speeches
    return ["\n\n".join(speeches[i:i + 20]) for i in range(0, 2000, 20)]


def test_items_say_what_the_text_says(documents):
    paras = paragraphs(documents)
    assert paras and all(len(p.split()) >= 20 for p in paras)
    for item in last_word_items(paras):
        text = item["text"]
        assert any(p.startswith(text) for p in paras) and text.rsplit(" ", 1)[1].isidentifier()
    items = cloze_items(paras, seed=0)
    assert len(items) > 50
    for item in items:
        answer = item["choices"][item["gold"]]
        assert any(p.startswith(item["query"] + " " + answer) for p in paras)
        assert len(set(item["choices"])) == 4 and all(len(c.split()) == CLOZE_WORDS for c in item["choices"])
    assert sorted({i["gold"] for i in items}) == [0, 1, 2, 3]
    assert cloze_items(paras, seed=0) == items and cloze_items(paras, seed=1) != items
    assert all(len(p["text"]) <= 2000 for p in pages(documents))


def test_written_tasks_load_and_a_model_that_knows_the_text_beats_chance(documents, tmp_path):
    paths = write_text_tasks(documents, tmp_path, items=30, seed=0)
    assert [p.name for p in paths] == ["heldout_last_word.yaml", "heldout_cloze.yaml", "heldout_bpb.yaml"]
    tasks = [load_task(str(p)) for p in paths]
    assert [len(t.docs()) for t in tasks] == [30, 30, 30]
    cloze = tasks[1]
    doc = cloze.docs()[0]
    assert cloze.text(doc) == doc["query"] and cloze.choices(doc)[cloze.target(doc)] == doc["choices"][doc["gold"]]
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256))
    lm = LocalLM(model, tok, precision="fp32", batch_size=32)
    # an untrained model: bits per byte about log2(vocab), the cloze at chance (within its noise)
    bpb = evaluate(tasks[2], lm, limit=5)["metrics"]["bits_per_byte"]
    assert 7 < bpb < 9.5
    r = evaluate(cloze, lm)
    assert r["n"] == 30 and 0 <= r["metrics"]["acc"] <= 0.6


def test_short_text_makes_fewer_tasks(tmp_path):
    assert [p.name for p in write_text_tasks(["just a few words here"], tmp_path)] == ["heldout_bpb.yaml"]
