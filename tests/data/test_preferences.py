"""Preference pairs and prompts: the jsonl shapes, HH-RLHF transcripts, feedback dirs, bad records named by
file:line, and batches whose targets are the reply's tokens only."""

import gzip
import json

import pytest
import torch

from yunque.data.preferences import (
    PairBatches,
    hh_pair,
    left_out,
    load_pairs,
    load_prompts,
    parse_transcript,
    render_reply,
    split,
)
from yunque.feedback import append, prefer, rate
from yunque.losses import IGNORE
from yunque.tokenizer.bpe import byte_tokenizer
from yunque.tokenizer.chat import ChatFormat

ASK = [{"role": "user", "content": "¿Qué hace json.dumps?"}]


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_the_jsonl_shapes(tmp_path):
    path = write(tmp_path / "p.jsonl", [
        {"prompt": "hola", "chosen": "¡Hola!", "rejected": "adiós"},
        {"messages": [{"role": "system", "content": "Sé breve."}, *ASK], "chosen": "JSON.", "rejected": "No sé."},
        {"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
    ])
    pairs = load_pairs([path])
    assert [p.name for p in pairs] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert pairs[0].messages == [{"role": "user", "content": "hola"}] and pairs[0].chosen == "¡Hola!"
    assert pairs[1].messages[0]["role"] == "system" and pairs[1].rejected == "No sé."
    assert (pairs[2].chosen, pairs[2].rejected) == ("a", "b")


def test_hh_rlhf_transcripts_become_prompt_and_final_turns(shared_data):
    path = shared_data / "hh-rlhf/harmless-base-test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    messages, chosen, rejected = hh_pair(first["chosen"], first["rejected"])
    assert messages[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + ["user"]
    assert first["chosen"].endswith(chosen) and first["rejected"].endswith(rejected) and chosen != rejected
    # the shared file: the 5 pairs whose transcripts differ before their last turn are named, or left out and listed
    with pytest.raises(ValueError, match=r"harmless-base-test.jsonl.gz:1255: .*differ before their last turn"):
        load_pairs([path])
    skipped = []
    assert len(load_pairs([path], skipped)) == 2312 - 5
    assert left_out(skipped).startswith(f"left out 5 pair(s) whose transcripts differ before their last turn "
                                        f"({path}:1255")


def test_parse_transcript():
    assert parse_transcript("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}]
    with pytest.raises(ValueError, match="not an HH-RLHF transcript"):
        parse_transcript("User: hi")


@pytest.mark.parametrize("record, problem", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "the same reply"),
    ({"prompt": "q", "chosen": "a"}, "missing field(s) rejected"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "the prompt is empty"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' is int"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "must end with the user's turn"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"},
     "differ before their last turn"),
    ({"chosen": "just text", "rejected": "other text"}, "not an HH-RLHF transcript"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "one assistant message"),
    ("[1, 2]", "must be a JSON object"),
    ('{"prompt": "q", ', "not valid JSON"),
])
def test_a_bad_record_names_file_line_and_problem(tmp_path, record, problem):
    path = write(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(ValueError) as e:
        load_pairs([path])
    assert str(e.value).startswith(f"{path}:2: ") and problem in str(e.value)


def test_feedback_dirs_and_files_give_pairs(tmp_path):
    fb = tmp_path / "feedback"
    append(prefer("m", ASK, "Convierte a JSON.", "No sé."), fb)
    append(rate("m", ASK, "Devuelve una cadena.", 1), fb)
    append(rate("m", ASK, "Nada.", -1), fb)
    pairs = load_pairs([fb])
    assert [(p.chosen, p.rejected) for p in pairs] == [("Convierte a JSON.", "No sé."),
                                                       ("Devuelve una cadena.", "Nada.")]
    assert pairs[0].messages == ASK
    named = load_pairs(sorted(fb.glob("*.jsonl")))  # a feedback file, named, is read as feedback too
    assert [(p.messages, p.chosen, p.rejected) for p in named] == [(p.messages, p.chosen, p.rejected) for p in pairs]
    lonely = tmp_path / "lonely"
    append(rate("m", ASK, "Sí.", 1), lonely)
    with pytest.raises(ValueError, match="1 feedback record.* but no preference pair"):
        load_pairs([lonely])
    (tmp_path / "bad").mkdir()
    bad = write(tmp_path / "bad" / "2026-01-01.jsonl", [{"kind": "rating", "model": "m", "messages": ASK, "reply": "r",
                                                          "rating": 5}])
    with pytest.raises(ValueError, match=r"2026-01-01.jsonl:1: 'rating' must be 1"):
        load_pairs([bad.parent])
    with pytest.raises(ValueError, match="no such file"):
        load_pairs([tmp_path / "missing.jsonl"])


def test_prompts_from_any_chat_data(tmp_path):
    chats = write(tmp_path / "c.jsonl", [
        {"messages": [*ASK, {"role": "assistant", "content": "ignored"}]},
        {"prompt": "2 + 3 =", "completion": "5"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ])
    assert load_prompts([chats]) == [ASK, [{"role": "user", "content": "2 + 3 ="}], [{"role": "user", "content": "p"}]]
    no_user = write(tmp_path / "n.jsonl", [{"messages": [{"role": "system", "content": "s"}]}])
    with pytest.raises(ValueError, match=r"n.jsonl:1: no user turn"):
        load_prompts([no_user])


def test_split_is_by_content():
    items = [[{"role": "user", "content": str(i)}] for i in range(20)]
    train, val = split(items, 0.2, seed=0)
    assert len(val) == 4 and len(train) == 16
    assert split(items[::-1], 0.2, seed=0)[1] == sorted(val, key=lambda m: -int(m[0]["content"]))


def test_pair_batches_target_the_reply_only(tmp_path):
    fmt = ChatFormat.for_tokenizer(byte_tokenizer())
    path = write(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "abc", "rejected": "z"},
                                        {"prompt": "long " * 40, "chosen": "x", "rejected": "y"}])
    pairs = load_pairs([path])
    batches = PairBatches(fmt, pairs, max_seq_len=64)
    assert len(batches) == 2 and batches.truncated == 1 and batches.summary() == "2 pairs, 1 cut to 64 tokens"
    x, y = batches.collate([1])  # the long prompt lost its beginning, not its reply
    long_ids, long_start = render_reply(fmt, pairs[1].messages, "x")
    assert x.shape[1] == 64 and x[0].tolist() == long_ids[-65:-1]
    assert [t for t in y[0].tolist() if t != IGNORE] == long_ids[long_start:]
    x, y = batches.collate([0])
    ids, start = render_reply(fmt, pairs[0].messages, "abc")
    assert x.shape[0] == 2 and x[0, :len(ids) - 1].tolist() == ids[:-1]
    targets = [t for t in y[0].tolist() if t != IGNORE]
    assert targets == ids[start:] and len(targets) == 4  # "abc" and the end of the turn
    assert [t for t in y[1].tolist() if t != IGNORE] == render_reply(fmt, pairs[0].messages, "z")[0][start:]
    full, last = batches.collate_full([0])
    assert full[0, :len(ids)].tolist() == ids and int(last[0]) == len(ids) - 1


def test_grouped_batches_give_each_process_its_pairs_chosen_then_rejected(tmp_path):
    """Under torchrun process r takes rows [r*2b, (r+1)*2b) of a global batch collated with one group a process:
    its b pairs' chosen rows, then their rejected rows, padded alike, as one process collating them would."""
    fmt = ChatFormat.for_tokenizer(byte_tokenizer())
    path = write(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "chosen": "c" * (i + 1), "rejected": "r"}
                                        for i in range(4)])
    batches = PairBatches(fmt, load_pairs([path]), max_seq_len=64)
    index = [3, 0, 2, 1]
    for collate in (batches.collate, batches.collate_full):
        whole, grouped = collate(index), collate(index, groups=2)
        assert whole[0].shape == grouped[0].shape  # padded to the same length
        for r, part in enumerate((index[:2], index[2:])):
            own = collate(part)
            rows = grouped[0][4 * r:4 * (r + 1)]
            assert torch.equal(rows[:, :own[0].shape[1]], own[0])
            assert torch.equal(grouped[1][4 * r:4 * (r + 1)][..., :own[1].shape[-1]], own[1])
        assert torch.equal(grouped[0][[0, 1, 4, 5]], whole[0][:4])  # the chosen rows are whole's, regrouped
    with pytest.raises(ValueError, match="3 pairs does not split over 2 processes"):
        batches.collate([0, 1, 2], groups=2)
