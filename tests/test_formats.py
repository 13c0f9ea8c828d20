"""The registry of model formats: every kind of model dir is found by the same lookup, the lower layers import
nothing above them, and a new format is one more entry."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import yunque
from yunque import formats
from yunque.config import LoraConfig, preset
from yunque.formats import ModelFormat, find_format
from yunque.interop.hf import HF, export_hf
from yunque.model.gpt import GPT
from yunque.model.lora import attach_lora, save_adapter
from yunque.modeldir import ADAPTER, YUNQUE, describe, load_model, save_model
from yunque.tokenizer.bpe import byte_tokenizer

TOK = byte_tokenizer()
SRC = Path(yunque.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of the file names, at any depth (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_modeldir_and_formats_import_nothing_from_interop():
    for module in ("modeldir.py", "formats.py"):
        assert not {m for m in imported_modules(SRC / module) if m.startswith("yunque.interop")}, module
    code = "import sys, yunque.modeldir; print(sorted(m for m in sys.modules if m.startswith('yunque.interop')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_formats_imports_no_other_yunque_module():
    code = "import sys, yunque.formats; print(sorted(m for m in sys.modules if m.startswith('yunque')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "['yunque', 'yunque.formats']\n"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=TOK.vocab_size, max_seq_len=32))
    save_model(root / "yunque", model, TOK)
    export_hf(root / "yunque", root / "hf")
    attach_lora(model, LoraConfig(rank=2, targets=("qkv",)))
    save_adapter(root / "adapter", model, LoraConfig(rank=2, targets=("qkv",)), base_model=str(root / "yunque"))
    (root / "empty").mkdir()
    return root


def test_each_kind_of_dir_finds_its_format(dirs):
    assert find_format(dirs / "yunque") is YUNQUE
    assert find_format(dirs / "hf") is HF
    assert find_format(dirs / "adapter") is ADAPTER
    assert find_format(dirs / "empty") is YUNQUE  # the fallback, whose errors name what is missing
    with pytest.raises(ValueError, match="config.json: missing"):
        load_model(dirs / "empty")
    a, _ = load_model(dirs / "yunque")
    b, _ = load_model(dirs / "hf")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


FAKE = ModelFormat("fake", recognise=lambda p: p.suffix == ".fake",
                   load=lambda p, **kw: ("model of " + p.name, kw), describe=lambda p: {"format": "fake"})


@pytest.mark.parametrize("entry", [FAKE, f"{__name__}:FAKE"])  # the format itself, or its module path
def test_a_new_format_is_one_more_entry(dirs, monkeypatch, entry):
    monkeypatch.setattr(formats, "FORMATS", (*formats.FORMATS, entry))
    assert load_model(dirs / "m.fake", dtype=torch.bfloat16) == ("model of m.fake",
                                                                  {"device": "cpu", "dtype": torch.bfloat16})
    assert describe(dirs / "m.fake") == {"format": "fake"}
    assert describe(dirs / "yunque")["format"] == "yunque"  # the others are still found
