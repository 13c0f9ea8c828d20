"""`yunque info` (and, with the interop commands, import/export), in-process through `yunque.cli.main`."""

import json

import pytest

from tests.cli.util import fails
from yunque.cli import main


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
