"""The tokenizer side of an export, read back with the `tokenizers` library (transformers itself:
test_hf_transformers.py): the start token, the chat template and the end of a turn are written down."""

import json

import pytest
import tokenizers

from yunque.interop.hf_tokenizer import (
    chat_template_source,
    export_tokenizer_config,
    export_tokenizer_json,
    special_token_ids,
    stop_token_ids,
)
from yunque.tokenizer.bpe import Tokenizer, byte_tokenizer, gpt2_tokenizer_from_files
from yunque.tokenizer.chat import yunque_template

TOK = byte_tokenizer()
END, EOT, BOS, PAD = (TOK.special_ids[t] for t in ("<|end|>", "<|endoftext|>", "<|bos|>", "<|pad|>"))


@pytest.fixture(scope="module")
def gpt2(shared_data):
    return gpt2_tokenizer_from_files(shared_data / "gpt2-bpe" / "gpt2_vocab.json",
                                     shared_data / "gpt2-bpe" / "gpt2_merges.txt")


def test_exported_tokenizer_json_adds_the_start_token_once():
    text = export_tokenizer_json(TOK)
    theirs = tokenizers.Tokenizer.from_str(text)
    assert theirs.encode("ab").ids == [BOS, 97, 98]  # what any tokenizers-based reader now does
    assert theirs.encode("ab", add_special_tokens=False).ids == [97, 98]
    again = Tokenizer(tokenizers.Tokenizer.from_str(text))  # read back by yunque: the same start, the same ids
    assert again.bos_id == BOS and again.encode("ab", bos=True) == TOK.encode("ab", bos=True)
    assert export_tokenizer_json(again) == again.inner.to_str(pretty=True)  # already there: not added twice
    assert TOK.inner.post_processor is None  # the tokenizer in use is not changed


def test_a_tokenizer_without_a_start_token_is_written_as_it_is(gpt2):
    assert gpt2.bos_id is None
    assert export_tokenizer_json(gpt2) == gpt2.inner.to_str(pretty=True)


def test_a_yunque_chat_tokenizer_exports_its_template_and_end_of_turn(tmp_path):
    config = export_tokenizer_config(tmp_path, TOK, 256)
    assert config == {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "add_bos_token": True,
                      "eos_token": "<|end|>", "pad_token": "<|pad|>", "chat_template": yunque_template().source,
                      "model_max_length": 256, "clean_up_tokenization_spaces": False}
    assert special_token_ids(TOK, config) == {"bos_token_id": BOS, "eos_token_id": END, "pad_token_id": PAD}
    assert stop_token_ids(TOK, config) == [END, EOT]


def test_a_plain_tokenizer_ends_at_end_of_text(tmp_path, gpt2):
    config = export_tokenizer_config(tmp_path, gpt2, 1024)
    assert (config["eos_token"], config["add_bos_token"], "bos_token" in config, "chat_template" in config) == \
        ("<|endoftext|>", False, False, False)
    assert stop_token_ids(gpt2, config) == [50256]


def test_the_model_dirs_own_config_and_template_win(tmp_path):
    own = {"eos_token": {"content": "<|endoftext|>"}, "chat_template": "{{ messages }}", "model_max_length": 9}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(own))
    config = export_tokenizer_config(tmp_path, TOK, 256)
    assert {k: config[k] for k in own} == own
    assert chat_template_source(tmp_path, TOK) == "{{ messages }}"
    assert stop_token_ids(TOK, config) == [EOT, END]
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "chat_template.jinja").write_text("{{ jinja }}")  # copied beside the config, not into it
    assert "chat_template" not in export_tokenizer_config(tmp_path, TOK, 256)
    assert chat_template_source(tmp_path, TOK) == "{{ jinja }}"


def test_a_bad_tokenizer_config_is_one_line(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(ValueError, match="tokenizer_config.json: holds a JSON list, not an object; fix or delete"):
        export_tokenizer_config(tmp_path, TOK, 256)
