"""Chat data: record shapes, real data sets, errors with file:line, the held-out split, batches and truncation."""

import gzip
import json

import pytest
import torch

from yunque.data.chat_data import (
    ChatBatches,
    Conversation,
    length_bucket,
    load_conversations,
    record_messages,
    split_conversations,
)
from yunque.losses import IGNORE
from yunque.tokenizer.bpe import END_OF_TURN, byte_tokenizer
from yunque.tokenizer.chat import render

TOK = byte_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_record_shapes():
    assert record_messages({"messages": [{"role": "user", "content": "a", "name": "x"}]}) == \
        [{"role": "user", "content": "a"}]
    assert record_messages({"instruction": "Add", "input": "1 2", "output": "3"}) == \
        [{"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert record_messages({"instruction": "Greet", "input": "", "output": "hi"})[0]["content"] == "Greet"
    assert record_messages({"prompt": "p", "completion": "c"}) == \
        [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert record_messages({"question": "q", "answer": "a"})[1] == {"role": "assistant", "content": "a"}
    assert record_messages({"instruction": "Do", "instances": [{"input": "x", "output": "y"}, {}]}) == \
        [{"role": "user", "content": "Do\n\nx"}, {"role": "assistant", "content": "y"}]


def test_real_data_sets(shared_data):
    gsm = load_conversations([shared_data / "gsm8k/test.jsonl"])
    assert len(gsm) == 1319 and gsm[0].name.endswith("test.jsonl:1")
    assert gsm[0].messages[0]["content"].startswith("Janet") and gsm[0].messages[1]["content"].endswith("#### 18")
    seeds = load_conversations([shared_data / "self-instruct/seed_tasks.jsonl"])
    assert len(seeds) == 175 and all(m["content"] or m["role"] == "user" for c in seeds for m in c.messages)
    train = load_conversations([shared_data / "gsm8k/train.jsonl.gz"])  # .gz
    assert len(train) == 7473


def test_gz_and_blank_lines(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "p", "completion": "c"}) + "\n\n" + json.dumps({"question": "q", "answer": "a"}))
    convs = load_conversations([tmp_path / "a.jsonl.gz"])
    assert [c.name.rsplit(":", 1)[1] for c in convs] == ["1", "3"]


def test_malformed_line_is_reported_as_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p", \n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}:2: not valid JSON"):
        load_conversations([path])
    write_jsonl(path, [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": 3}])
    with pytest.raises(ValueError, match=rf"^{path}:2: 'completion' is int"):
        load_conversations([path])
    write_jsonl(path, [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(ValueError, match=rf"^{path}:1: .*unknown role 'bot'; accepted roles: system, user, assistant"):
        load_conversations([path])


def test_unknown_record_shape_lists_the_accepted_ones(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "just text"}])
    with pytest.raises(ValueError, match=r"d.jsonl:1: unknown record shape \(keys text\); accepted shapes: "
                                         r"\{\"messages\".*Alpaca.*Self-Instruct.*prompt.*GSM8K"):
        load_conversations([path])
    with pytest.raises(ValueError, match="no such file"):
        load_conversations([tmp_path / "missing.jsonl"])
    with pytest.raises(ValueError, match="no conversations"):
        load_conversations([write_jsonl(tmp_path / "empty.jsonl", [])])


def convs(n, length=5):
    return [Conversation(f"f:{i}", [{"role": "user", "content": f"q{i}"},
                                    {"role": "assistant", "content": "a" * length + str(i)}]) for i in range(n)]


def test_split_is_by_conversation_deterministic_and_content_based():
    data = convs(40)
    train, val = split_conversations(data, 0.1, seed=0)
    assert len(val) == 4 and len(train) == 36
    assert {c.name for c in train}.isdisjoint(c.name for c in val)
    assert split_conversations(data, 0.1, seed=0) == (train, val)
    assert split_conversations(data, 0.1, seed=1)[1] != val
    # order does not matter: the same conversations are held out
    assert {c.name for c in split_conversations(data[::-1], 0.1, seed=0)[1]} == {c.name for c in val}
    assert split_conversations(convs(3), 0.01, seed=0)[1]  # at least one when asked for any
    with pytest.raises(ValueError, match="none for training"):
        split_conversations(convs(1), 0.5, seed=0)


def test_batches_targets_are_the_assistant_tokens_and_padding_is_ignored():
    data = convs(3) + [Conversation("long", [{"role": "user", "content": "hello there"},
                                              {"role": "assistant", "content": "a much longer reply"}])]
    batches = ChatBatches(TOK, data, max_seq_len=64)
    x, y = next(batches.iter_eval(4))
    longest = len(render(TOK, data[3].messages)[0]) - 1
    assert 32 < longest < 64  # padded to the second length bucket
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, length_bucket(longest, 64)) == (4, 64)
    for b, conv in enumerate(data):
        ids, mask = render(TOK, conv.messages)
        n = len(ids) - 1
        assert x[b, :n].tolist() == ids[:-1]
        assert y[b, :n].tolist() == [i if m else IGNORE for i, m in zip(ids[1:], mask[1:])]
        assert (x[b, n:] == TOK.pad_id).all() and (y[b, n:] == IGNORE).all()
        assert TOK.decode(y[b][y[b] != IGNORE].tolist()) == conv.messages[1]["content"] + END_OF_TURN


def test_length_buckets_are_few_and_never_cut():
    """Batches are padded to 32, 64, 128, ... (or the context): a compiled step meets a handful of shapes."""
    assert [length_bucket(n, 256) for n in (1, 32, 33, 64, 65, 200, 256)] == [32, 32, 64, 64, 128, 256, 256]
    assert length_bucket(300, 300) == 300 and length_bucket(257, 300) == 300
    assert len({length_bucket(n, 1024) for n in range(1, 1025)}) == 6


def test_sample_is_a_pure_function_of_seed_and_step_and_covers_each_epoch():
    batches = ChatBatches(TOK, convs(10), max_seq_len=64)
    a = batches.sample(4, seed=3, step=7)
    assert all(torch.equal(u, v) for u, v in zip(a, batches.sample(4, seed=3, step=7)))
    assert not torch.equal(a[0], batches.sample(4, seed=4, step=7)[0])
    rows = torch.cat([batches.sample(5, seed=0, step=s)[0] for s in range(2)])  # one epoch of 10
    assert len({tuple(r.tolist()) for r in rows}) == 10


def test_truncation_is_counted_and_drop_policy_leaves_out():
    data = convs(4, length=5) + convs(2, length=100)
    short = len(render(TOK, data[0].messages)[0])
    cut = ChatBatches(TOK, data, max_seq_len=short + 10, policy="truncate")
    assert cut.counts["truncated"] == 2 and len(cut) == 6
    assert "2 truncated to" in cut.summary()
    assert max(len(ids) for ids, _ in cut.examples) == short + 11
    x, _ = cut.sample(6, seed=0, step=0)
    assert x.shape[1] == short + 10
    dropped = ChatBatches(TOK, data, max_seq_len=short + 10, policy="drop")
    assert dropped.counts["dropped_too_long"] == 2 and len(dropped) == 4 and "2 dropped" in dropped.summary()
    # a prompt longer than the context leaves nothing to learn: left out and counted, not trained on as padding
    nothing = ChatBatches(TOK, data[:4] + [Conversation("p", [{"role": "user", "content": "x" * 200},
                                                              {"role": "assistant", "content": "y"}])],
                          max_seq_len=short + 10)
    assert nothing.counts["dropped_no_target"] == 1 and len(nothing) == 4
    with pytest.raises(ValueError, match="truncate, drop"):
        ChatBatches(TOK, data, max_seq_len=64, policy="cut")

