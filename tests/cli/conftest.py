"""Fixtures of the CLI tests: a few KB of Tiny Shakespeare, a model dir made by `yunque pretrain`, and a file of
short conversations (the tiny chat model `base` is in tests/conftest.py)."""

import json

import pytest

from yunque.cli import main

TRAIN = ["--tokenizer", "bytes", "--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--max-steps", "20",
         "--eval-every", "10", "--no-progress"]
"""Flags of a pretraining run that takes a few seconds."""


@pytest.fixture(scope="session")
def text(shared_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text((shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def run(text, tmp_path_factory):
    """A model dir made by `yunque pretrain` (20 steps of the tiny preset on bytes)."""
    out = tmp_path_factory.mktemp("runs") / "R"
    assert main(["pretrain", "--out", str(out), "--data", str(text), *TRAIN]) == 0
    return out


@pytest.fixture(scope="session")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["hola", "adiós", "gracias", "sí", "no", "luz", "mar", "sol"] * 3]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
