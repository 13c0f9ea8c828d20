"""yunque: a complete GPT-style language-model system on PyTorch.

Public API: GPT, ModelConfig, Tokenizer, Engine, SamplingParams, load_model, save_model. Names are imported on
first use, so `import yunque` (and `yunque --help`) stays fast and has no side effects.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "GPT": "yunque.model.gpt",
    "ModelConfig": "yunque.config",
    "Tokenizer": "yunque.tokenizer.bpe",
    "Engine": "yunque.engine.engine",
    "SamplingParams": "yunque.engine.engine",
    "load_model": "yunque.modeldir",
    "save_model": "yunque.modeldir",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'yunque' has no attribute {name!r}")
