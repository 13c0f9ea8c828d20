"""The kinds of model on disk that `load_model` and `describe` open: how each is recognised, loaded and described.

A format is a `ModelFormat`. `FORMATS` lists them in the order they are tried; a path no entry recognises is read
as yunque's own format, whose errors name what a model dir lacks (config.json, weights, tokenizer).

Entries are named by "module:attribute" strings and imported when first asked for, the way packaging entry points
are. That is what keeps the arrows pointing down: the formats live at different layers (yunque's own in
modeldir.py, Hugging Face's in interop/hf.py, which reads and writes yunque dirs through modeldir), yet
`modeldir.load_model` must open a Hugging Face dir too (`yunque generate HF_DIR`). This module imports no other
yunque module; modeldir imports this module and never interop; interop/hf.py imports modeldir and this module.
A new reader (the GGUF one, say) defines its ModelFormat in its own module and adds one line to FORMATS. Its
module must import without optional packages (import those inside `load`), since every lookup may import it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only
    import torch

    from yunque.model.gpt import GPT
    from yunque.tokenizer.bpe import Tokenizer


@dataclass(frozen=True)
class ModelFormat:
    """One kind of model on disk."""

    name: str
    """What the format is called in messages: "yunque", "Hugging Face", "LoRA adapter"."""
    recognise: Callable[[Path], bool]
    """Whether a path (a directory, or a file) holds this format; cheap: reads at most one small JSON file, and
    says False rather than raising for anything unreadable."""
    load: Callable[..., tuple[GPT, Tokenizer]]
    """load(path, *, device, dtype) -> (model in eval mode, tokenizer); one-line ValueError for a damaged path."""
    describe: Callable[[Path], dict[str, Any]]
    """describe(path) -> what `yunque info` prints, as a dict; one-line ValueError for a damaged path."""
    bundled: Callable[[Path], dict[str, dict[str, Any]]] | None = None
    """For a format that is one file (GGUF): bundled(path) -> {"tokenizer_config.json": {...},
    "generation_config.json": {...}}, what the file holds in place of a model dir's side files (chat template,
    special tokens, stop ids). None for formats that are directories."""


FORMATS: tuple[str | ModelFormat, ...] = (
    "yunque.modeldir:YUNQUE",
    "yunque.modeldir:ADAPTER",
    "yunque.interop.hf:HF",
    "yunque.interop.gguf_reader:GGUF",
)
"""Every format, tried in this order: "module:attribute" naming a ModelFormat (or a ModelFormat itself)."""
FALLBACK = "yunque.modeldir:YUNQUE"
"""The format of a path that no entry recognises."""


def resolve(entry: str | ModelFormat) -> ModelFormat:
    """The ModelFormat an entry of FORMATS names, importing its module."""
    if isinstance(entry, ModelFormat):
        return entry
    module, _, attribute = entry.partition(":")
    return getattr(importlib.import_module(module), attribute)


def find_format(path: str | Path) -> ModelFormat:
    """The first format of FORMATS that recognises `path`, else yunque's own (FALLBACK)."""
    path = Path(path)
    return next((f for f in map(resolve, FORMATS) if f.recognise(path)), None) or resolve(FALLBACK)


def load(path: str | Path, *, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """(model in eval mode, tokenizer) from a path of any format."""
    return find_format(path).load(Path(path), device=device, dtype=dtype)


def describe(path: str | Path) -> dict[str, Any]:
    """What `yunque info` prints for a path of any format."""
    return find_format(path).describe(Path(path))


def bundled_file(path: str | Path, name: str) -> dict[str, Any] | None:
    """The JSON object that a one-file model (GGUF) holds in place of a model dir's file `name`
    (tokenizer_config.json, generation_config.json; {} when it holds none); None for a directory, whose own file
    is read instead."""
    path = Path(path)
    if path.is_dir():
        return None
    fmt = find_format(path)
    return fmt.bundled(path).get(name, {}) if fmt.bundled else None


__all__ = ["FALLBACK", "FORMATS", "ModelFormat", "bundled_file", "describe", "find_format", "load", "resolve"]
