from yunque.data.stdlib_qa import first_sentence, split_heldout, stdlib_qa


def test_first_sentence():
    assert first_sentence("Return the sum of a and b.  More text.\n\nDetails.") == "Return the sum of a and b."
    assert first_sentence("Serialize ``obj`` to a JSON formatted ``str``.\n\nIf ...") == \
        "Serialize ``obj`` to a JSON formatted ``str``."
    assert first_sentence("x") is None and first_sentence(">>> code()") is None and first_sentence("") is None


def test_stdlib_questions_are_real_and_bilingual():
    pairs = stdlib_qa(max_pairs=300)
    assert len(pairs) == 300
    questions = [p["messages"][0]["content"] for p in pairs]
    assert any(q.startswith("What does `") for q in questions) and any(q.startswith("¿Qué hace `") for q in questions)
    assert all(p["messages"][1]["role"] == "assistant" and p["messages"][1]["content"] for p in pairs)
    train, held = split_heldout(pairs, 0.2, seed=0)
    assert len(train) + len(held) == 300 and 30 < len(held) < 90
    assert split_heldout(pairs, 0.2, seed=0) == (train, held)
    assert not {p["messages"][0]["content"] for p in held} & {p["messages"][0]["content"] for p in train}
