"""`yunque info`, `import`, `export`, `models` and `rm`, on yunque and Hugging Face dirs and the catalogue, in-process
through `yunque.cli.main`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.cli.util import fails
from yunque.cli import main
from yunque.config import preset
from yunque.model.gpt import GPT
from yunque.modeldir import save_model
from yunque.tokenizer.bpe import byte_tokenizer


def test_info(run, capsys):
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "llama-style decoder: 2 layers" in out and "bytes, 263 tokens" in out and "steps=20" in out
    assert main(["info", str(run), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["context"] == 32 and d["training"]["steps"] == 20


def damaged_copy(run, tmp_path, damage):
    out = tmp_path / "damaged"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (out / name).write_bytes((run / name).read_bytes())
    damage(out)
    return out


def truncate_weights(d):
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])


@pytest.mark.parametrize("damage, words", [
    (truncate_weights, ["model.safetensors", "corrupt or truncated"]),
    (lambda d: (d / "config.json").unlink(), ["config.json: missing"]),
])
@pytest.mark.parametrize("command", [["generate", "{dir}", "ROMEO:", "--max-new-tokens", "3"], ["info", "{dir}"]])
def test_corrupt_model_dir(run, tmp_path, capsys, damage, words, command):
    out = damaged_copy(run, tmp_path, damage)
    fails(capsys, [a.format(dir=out) for a in command], *words)


def test_export_import_round_trip_and_hf_dirs_work_as_model_dirs(tmp_path, capsys):
    tok = byte_tokenizer()
    torch.manual_seed(0)
    save_model(tmp_path / "y", GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64)), tok)

    assert main(["export", str(tmp_path / "y"), "--format", "hf", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    assert main(["info", str(tmp_path / "hf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["format"] == "Hugging Face (llama)" and info["context"] == 64

    assert main(["generate", str(tmp_path / "hf"), "ab", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    from_hf = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "y"), "ab", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == from_hf

    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    a, b = load_file(tmp_path / "y" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert main(["export", str(tmp_path / "y"), "--format", "gguf", str(tmp_path / "m.gguf"), "--dtype", "f32"]) == 0
    assert (tmp_path / "m.gguf").stat().st_size > 0


def test_catalogue_names_work_as_model_args(tmp_path, capsys):
    tok = byte_tokenizer()
    cat = tmp_path / "cat"
    save_model(cat / "me--tiny", GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64)), tok)
    assert main(["models", "--catalogue", str(cat)]) == 0
    assert "me/tiny" in capsys.readouterr().out
    assert main(["info", "me/tiny", "--catalogue", str(cat)]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["rm", "me/tiny", "--catalogue", str(cat)]) == 0
    assert not (cat / "me--tiny").exists()
    assert main(["info", "me/tiny", "--catalogue", str(cat)]) == 1
    assert "yunque pull" in capsys.readouterr().err


def test_quantize_writes_a_dir_every_command_loads(run, tmp_path, capsys):
    out = tmp_path / "int4"
    assert main(["quantize", str(run), str(out), "--to", "int4", "--group-size", "16"]) == 0
    assert f"-> {out} (int4 (groups of 16))" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    assert "quantization: int4 (groups of 16), weight-only" in capsys.readouterr().out
    assert main(["generate", str(out), "ab", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    # greedy through the quantized dir == greedy with the float model quantized on load (--quantize)
    assert main(["generate", str(run), "ab", "--max-new-tokens", "8", "--temperature", "0",
                 "--quantize", "int4", "--group-size", "16"]) == 0
    on_load = capsys.readouterr().out
    assert main(["generate", str(out), "ab", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == on_load
    assert main(["export", str(out), "--format", "gguf", str(tmp_path / "m.gguf")]) == 0
    capsys.readouterr()


def test_quantize_bad_input_is_one_line(run, tmp_path, capsys):
    quantized = tmp_path / "int8"
    assert main(["quantize", str(run), str(quantized), "--to", "int8"]) == 0
    fails(capsys, ["quantize", str(quantized), str(tmp_path / "again"), "--to", "int4"], "quantized already")
    fails(capsys, ["generate", str(quantized), "ab", "--quantize", "int8"], "quantized already")
    fails(capsys, ["quantize", str(run), str(tmp_path / "g"), "--to", "int4", "--group-size", "24"],
          "--group-size 24 does not divide the 64 inputs", "e.g. 32")
    fails(capsys, ["generate", str(run), "ab", "--quantize", "int4", "--group-size", "24"], "does not divide")
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(run), str(tmp_path / "x"), "--to", "int2"])
    assert e.value.code == 2 and "invalid choice: 'int2' (choose from 'int8', 'int4')" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not (tmp_path / "x").exists()
