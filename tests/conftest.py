"""Shared test fixtures. Real data sets live beside the project in ../shared/data (CI has them there too)."""

from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken

from yunque.config import preset
from yunque.engine.native import native_kernels
from yunque.model.gpt import GPT
from yunque.modeldir import save_model
from yunque.tokenizer.bpe import Tokenizer, byte_tokenizer
from yunque.tokenizer.chat import ChatFormat, ChatTemplate

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMOLLM2_GGUF = SHARED_DATA.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
"""A real instruct model (Apache-2.0), read in place: never copied into the repo."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"{SHARED_DATA} is missing: the tests read real data sets from ../shared/data"
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} is absent: the real-model tests read SmolLM2-135M-Instruct.Q4_1.gguf from "
                    f"../shared/models")
    return SMOLLM2_GGUF


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test models are tiny: threads gain nothing, and on a shared 2-core machine they spin-wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def kernels_built():
    """The engine's C++ kernels compile once per machine (~1 min): here, before a test that runs `yunque` in a
    subprocess under a time limit could be the one to pay for it."""
    native_kernels()


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""ChatML, the template of Qwen's and SmolLM's Hub models."""


@pytest.fixture(scope="session")
def chatml() -> ChatFormat:
    """A Hugging Face style chat format: a byte tokenizer with ChatML's special tokens, and ChatML's template."""
    inner = byte_tokenizer().inner
    inner.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    return ChatFormat.for_tokenizer(Tokenizer(inner), ChatTemplate(CHATML))


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A tiny untrained model dir whose byte tokenizer has yunque's chat tokens."""
    tok = byte_tokenizer()
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("base")
    save_model(d, GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128)), tok)
    return d
