"""`yunque sft`, `merge`, `chat` and `generate --few-shot` through the CLI on a tiny model, and ChatSession."""

import json

import pytest
import torch

from yunque.chat import ChatSession
from yunque.cli import main
from yunque.config import preset
from yunque.engine.engine import Engine, SamplingParams
from yunque.model.gpt import GPT
from yunque.modeldir import load_model, save_model
from yunque.tokenizer.bpe import byte_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tok = byte_tokenizer()
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("base")
    save_model(d, GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128)), tok)
    return d


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["hola", "adiós", "gracias", "sí", "no", "luz", "mar", "sol"] * 3]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sft_lora_merge_and_chat(base, chats, tmp_path, capsys, monkeypatch):
    common = ["--data", str(chats), "--max-steps", "6", "--eval-every", "3", "--no-progress", "--batch-size", "4"]
    assert main(["sft", "--model", str(base), "--out", str(tmp_path / "full"), *common]) == 0
    assert "held-out assistant loss" in capsys.readouterr().out
    assert main(["sft", "--model", str(base), "--out", str(tmp_path / "lora"), "--lora", "--lora-rank", "2",
                 *common]) == 0
    assert main(["merge", str(base), str(tmp_path / "lora"), str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    load_model(tmp_path / "merged")

    import io
    import sys
    monkeypatch.setattr(sys, "stdin", io.StringIO("say hola\n/system Be brief.\nsay no\n/save "
                                                  f"{tmp_path / 'conv.jsonl'}\n/reset\n"))
    assert main(["chat", str(tmp_path / "full"), "--max-new-tokens", "5", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant: ") == 2 and "(history cleared)" in out
    saved = json.loads((tmp_path / "conv.jsonl").read_text(encoding="utf-8"))
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant", "user", "assistant"]

    monkeypatch.setattr(sys, "stdin", io.StringIO("say sí\n"))
    assert main(["chat", str(base), "--adapter", str(tmp_path / "lora"), "--max-new-tokens", "3"]) == 0


def test_sft_bad_input(base, chats, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}]}\n{not json\n')
    assert main(["sft", "--model", str(base), "--data", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and len(err.strip().splitlines()) == 1
    weird = tmp_path / "weird.jsonl"
    weird.write_text('{"messages": [{"role": "wizard", "content": "a"}]}\n')
    assert main(["sft", "--model", str(base), "--data", str(weird), "--out", str(tmp_path / "o")]) == 1
    assert "system, user, assistant" in capsys.readouterr().err
    assert main(["sft", "--model", str(base), "--data", str(chats), "--out", str(tmp_path / "o"), "--lora",
                 "--lora-targets", "nope"]) == 1
    assert "qkv" in capsys.readouterr().err


def test_generate_few_shot(base, tmp_path, capsys):
    shots = tmp_path / "shots.jsonl"
    shots.write_text("".join(json.dumps({"input": f"{i}+1", "output": str(i + 1)}) + "\n" for i in range(4)))
    assert main(["generate", str(base), "7+1", "--few-shot", str(shots), "--k", "2", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert main(["generate", str(base), "7+1", "--few-shot", str(shots), "--k", "9"]) == 1
    assert "k=9" in capsys.readouterr().err
