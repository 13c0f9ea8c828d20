"""`yunque generate`, `chat` and `perplexity`, in-process through `yunque.cli.main`."""

import json
import math
import shutil

import pytest

from tests.cli.util import fails
from yunque.cli import main
from yunque.tokenizer.bpe import load_tokenizer


def test_generate(run, capsys):
    args = ["generate", str(run), "ROMEO:", "--max-new-tokens", "10", "--seed", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # seeded sampling repeats


def test_generate_compiled_equals_eager(run, capsys):
    args = ["generate", str(run), "ROMEO:", "--max-new-tokens", "12", "--temperature", "0", "--precision", "fp32"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main([*args, "--compile"]) == 0
    assert capsys.readouterr().out == eager


def test_generate_stops_at_the_ids_generation_config_names(run, tmp_path, capsys):
    # An imported model names its end-of-sequence ids in generation_config.json (one id or a list)
    args = ["--max-new-tokens", "12", "--temperature", "0", "--precision", "fp32"]
    assert main(["generate", str(run), "ROMEO:", *args]) == 0
    free = capsys.readouterr().out.removesuffix("\n")
    tok = load_tokenizer(run)
    first = tok.encode(free, bos=False)[len(tok.encode("ROMEO:", bos=False))]  # the first generated token
    named = tmp_path / "named"
    shutil.copytree(run, named)
    (named / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.vocab_size + 5, first]}))
    assert main(["generate", str(named), "ROMEO:", *args]) == 0
    assert capsys.readouterr().out == "ROMEO:\n" != free + "\n"
    (named / "generation_config.json").write_text(json.dumps({"eos_token_id": first}))
    assert main(["generate", str(named), "ROMEO:", *args]) == 0
    assert capsys.readouterr().out == "ROMEO:\n"
    (named / "generation_config.json").write_text("{not json")
    fails(capsys, ["generate", str(named), "ROMEO:", *args], "generation_config.json", "not a JSON object")


def test_perplexity_json(run, text, capsys):
    assert main(["perplexity", str(run), "--data", str(text), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"} <= r.keys()
    assert r["bytes"] == len(text.read_bytes())
    assert r["tokens"] == r["bytes"] + 1  # one per byte, plus BOS
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2) * r["tokens"] / r["bytes"])
    assert 0 < r["loss"] < math.log(263)


def test_prompt_longer_than_context(run, capsys):
    fails(capsys, ["generate", str(run), "a" * 100, "--max-new-tokens", "3"], "prompt has 101 tokens",
          "context is 32")


def test_generate_few_shot(base, tmp_path, capsys):
    shots = tmp_path / "shots.jsonl"
    shots.write_text("".join(json.dumps({"input": f"{i}+1", "output": str(i + 1)}) + "\n" for i in range(4)))
    assert main(["generate", str(base), "7+1", "--few-shot", str(shots), "--k", "2", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert main(["generate", str(base), "7+1", "--few-shot", str(shots), "--k", "9"]) == 1
    assert "k=9" in capsys.readouterr().err


def test_a_capped_length_is_said(run, capsys):
    assert main(["generate", str(run), "ROMEO:", "--max-new-tokens", "500", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "--max-new-tokens 500 capped to 25" in err and "32-token context" in err
