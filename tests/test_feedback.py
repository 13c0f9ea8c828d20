import json
import multiprocessing

import pytest

from yunque.feedback import (
    Preference,
    Rating,
    append,
    feedback_dir,
    prefer,
    preference_pairs,
    rate,
    read_feedback,
)

ASK = [{"role": "system", "content": "Sé breve."}, {"role": "user", "content": "¿Qué hace json.dumps?"}]


def test_records_round_trip_through_a_day_file(tmp_path):
    up = rate("m", ASK, "Convierte un objeto en texto JSON.", 1, source="page")
    pair = prefer("m", ASK, "Devuelve una cadena JSON.", "No sé.")
    path = append(up, tmp_path)
    assert append(pair, tmp_path) == path and path.name == f"{up.time[:10]}.jsonl"
    assert read_feedback([tmp_path]) == [up, pair]
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0])["kind"] == "rating"


def test_feedback_dir_follows_yunque_home(tmp_path, monkeypatch):
    monkeypatch.setenv("YUNQUE_HOME", str(tmp_path))
    assert feedback_dir() == tmp_path / "feedback"
    assert append(rate("m", ASK, "ok", -1)).parent == tmp_path / "feedback"


def test_opposite_ratings_of_one_conversation_become_a_pair():
    good, bad = rate("m", ASK, "bien", 1), rate("m", ASK, "mal", -1)
    other = rate("m", [{"role": "user", "content": "hola"}], "adiós", -1)
    given = prefer("m", ASK, "a", "b")
    pairs = preference_pairs([good, other, given, bad])
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("bien", "mal")]
    assert preference_pairs([good, rate("m", ASK, "bien", -1)]) == []  # same reply: no pair


@pytest.mark.parametrize("line, problem", [
    ('{"kind": "rating", "model": "m", "messages": [{"role": "user", "content": "q"}], "reply": "r"}', "rating"),
    ('{"kind": "vote"}', "'kind'"),
    ('[1, 2]', "not a JSON object"),
    ('{"kind": "preference", "model": "m", "messages": [{"role": "user", "content": "q"}], '
     '"chosen": "x", "rejected": "x"}', "the same reply"),
    ('{"kind": "rating", "model": "m", "messages": [{"role": "bot", "content": "q"}], "reply": "r", "rating": 1}',
     "role"),
    ('{"kind": "rating", "model": "m", "messages": [], "reply": "r", "rating": 2}', "empty"),
    ('{"kind": "rating", "model": "m", "messages": [{"role": "user", "content": "q"}], "reply": "r", "rating": 2}',
     "'rating'"),
    ('{"kind": "rating", "model": "m" ', "not a JSON object"),
])
def test_a_bad_line_names_file_line_and_problem(tmp_path, line, problem):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"kind": "rating", "model": "m", "messages": ASK, "reply": "r", "rating": 1})
                    + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"f\.jsonl:2: .*{problem}"):
        read_feedback([path])


def test_a_last_line_cut_by_a_kill_is_skipped_and_the_next_append_drops_it(tmp_path):
    path = append(rate("m", ASK, "r", 1), tmp_path)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"kind": "rating", "mod')
    assert len(read_feedback([path])) == 1
    append(rate("m", ASK, "s", -1), tmp_path)
    assert [r.reply for r in read_feedback([path])] == ["r", "s"]
    path.write_text('{"kind": "rat', encoding="utf-8")  # nothing but a cut line
    append(rate("m", ASK, "t", 1), tmp_path)
    assert [r.reply for r in read_feedback([path])] == ["t"]


def test_missing_path_says_what_to_give(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_feedback([tmp_path / "nope.jsonl"])


def _append_many(directory, n):
    for i in range(n):
        append(Rating("m", tuple(ASK), f"reply {i} " + "x" * 5000, 1, "chat", "2026-12-01T00:00:00+00:00"), directory)


def test_concurrent_writers_lose_and_mix_no_line(tmp_path):
    procs = [multiprocessing.get_context("fork").Process(target=_append_many, args=(tmp_path, 50)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    records = read_feedback([tmp_path])
    assert len(records) == 150 and all(isinstance(r, Rating) for r in records)


def test_preference_rejects_identical_replies():
    with pytest.raises(ValueError, match="same reply"):
        prefer("m", ASK, "x", "x")
    assert isinstance(prefer("m", ASK, "x", "y"), Preference)
