"""The tokenizer side of an export: what another tool needs to encode a prompt and stop a reply as yunque does.

yunque encodes prompts with the start token first (`Tokenizer.bos_id`) and, for a chat model, renders turns in its
chat format and stops at the end-of-turn token <|end|>. transformers and llama.cpp learn those three things only
from the files, so an export writes them down:

- the start token: a TemplateProcessing post-processor in tokenizer.json (what transformers 5 follows; it ignores
  add_bos_token when tokenizer.json exists) and add_bos_token in tokenizer_config.json (what transformers 4 and
  llama.cpp's converter read), so `AutoTokenizer(text).input_ids == tokenizer.encode(text, bos=True)`;
- the chat template: the model dir's own (an imported model's), else, for a tokenizer with yunque's chat tokens,
  `yunque_template()`, which renders the ids `render_prompt` does;
- the end of a turn: <|end|> as eos_token, and generation_config's eos_token_id [<|end|>, <|endoftext|>], so that
  `generate()` stops where yunque's engine does.

A model dir's own tokenizer_config.json and generation_config.json (kept from an import) win over these defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from yunque import formats
from yunque.modeldir import TOKENIZER
from yunque.tokenizer.bpe import END_OF_TURN, EOS, PAD, Tokenizer, gpt2_tokenizer_from_files, template_start_id
from yunque.tokenizer.chat import has_chat_tokens, load_chat_template, yunque_template

TOKENIZER_CONFIG, GENERATION_CONFIG = "tokenizer_config.json", "generation_config.json"


def load_hf_tokenizer(model_dir: Path) -> Tokenizer:
    """The tokenizer of a Hugging Face dir: tokenizer.json (with tokenizer_config.json's start token), or GPT-2's
    vocab.json + merges.txt."""
    if (model_dir / TOKENIZER).is_file():
        return Tokenizer.load(model_dir)
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    if vocab.is_file() and merges.is_file():
        return gpt2_tokenizer_from_files(vocab, merges)
    raise ValueError(f"{model_dir / TOKENIZER}: missing, and no vocab.json + merges.txt either; "
                     f"copy the model's tokenizer files into {model_dir}")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from `path` ({} when the file is absent); one-line ValueError for anything else."""
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or delete the file") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: holds a JSON {type(d).__name__}, not an object; fix or delete it")  # noqa: TRY004
    return d


def side_file(model_dir: Path, name: str) -> dict[str, Any]:
    """A model's tokenizer_config.json or generation_config.json as a dict ({} when absent): the dir's own file,
    or what a one-file model (GGUF) holds in its place."""
    bundled = formats.bundled_file(model_dir, name)
    return dict(bundled) if bundled is not None else read_json_object(model_dir / name)


def _token(value: Any) -> str | None:
    value = value.get("content") if isinstance(value, dict) else value  # an AddedToken written out
    return value if isinstance(value, str) else None


def special_token_ids(tokenizer: Tokenizer, tok_config: dict[str, Any]) -> dict[str, int]:
    """{"bos_token_id", "eos_token_id", "pad_token_id"} (those that exist): the tokens tokenizer_config.json
    names (a model from Hugging Face, or `export_tokenizer_config`), else the tokenizer's start token,
    <|endoftext|> and <|pad|>."""
    vocab = tokenizer.inner.get_vocab(with_added_tokens=True)
    ours = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    ids = {}
    for kind in ("bos", "eos", "pad"):
        i = vocab.get(_token(tok_config.get(f"{kind}_token")))
        if (i := ours[kind] if i is None else i) is not None:
            ids[f"{kind}_token_id"] = i
    return ids


def chat_template_source(model_dir: Path, tokenizer: Tokenizer) -> str | None:
    """The chat template an export carries: the model dir's own (chat_template.jinja or tokenizer_config.json),
    else yunque's format as a template when the tokenizer has yunque's chat tokens, else None."""
    template = load_chat_template(model_dir)
    if template is not None:
        return template.source
    return yunque_template().source if has_chat_tokens(tokenizer) else None


def export_tokenizer_config(model_dir: Path, tokenizer: Tokenizer, max_seq_len: int) -> dict[str, Any]:
    """tokenizer_config.json for an export of `model_dir`: its own, with what is missing filled in (class, start
    token and add_bos_token, end-of-turn or end-of-text as eos_token, pad token, chat template, length)."""
    config = side_file(model_dir, TOKENIZER_CONFIG)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if tokenizer.bos_id is not None:
        config.setdefault("bos_token", tokenizer.inner.id_to_token(tokenizer.bos_id))
    config.setdefault("add_bos_token", tokenizer.bos_id is not None)
    # a chat model's turn ends with <|end|>: as eos_token, it is where transformers' generate() stops
    eos = END_OF_TURN if has_chat_tokens(tokenizer) else EOS
    if "eos_token" not in config and eos in tokenizer.special_ids:
        config["eos_token"] = eos
    if "pad_token" not in config and PAD in tokenizer.special_ids:
        config["pad_token"] = PAD
    if not (model_dir / "chat_template.jinja").is_file() and not config.get("chat_template"):
        template = chat_template_source(model_dir, tokenizer)
        if template is not None:
            config["chat_template"] = template
    config.setdefault("model_max_length", max_seq_len)
    config.setdefault("clean_up_tokenization_spaces", False)  # decode as yunque does
    return config


def stop_token_ids(tokenizer: Tokenizer, tok_config: dict[str, Any]) -> list[int]:
    """generation_config.json's eos_token_id: the config's eos token, then yunque's end of turn and end of text
    (the engine's own stop ids) when the vocabulary has them."""
    ids = [special_token_ids(tokenizer, tok_config).get("eos_token_id")]
    ids += [tokenizer.special_ids.get(END_OF_TURN), tokenizer.eos_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def export_tokenizer_json(tokenizer: Tokenizer) -> str:
    """tokenizer.json text for an export: the tokenizer's own, with a post-processor that puts its start token
    first when the tokenizer adds one and its post-processor does not (yunque's <|bos|>, or a start token that
    only tokenizer_config.json's add_bos_token named)."""
    inner, bos = tokenizer.inner, tokenizer.bos_id
    if bos is None or template_start_id(inner) == bos:
        return inner.to_str(pretty=True)
    inner = tokenizers.Tokenizer.from_str(inner.to_str())  # a copy: the tokenizer in use stays as it is
    token = inner.id_to_token(bos)
    start = processors.TemplateProcessing(single=f"{token} $A", pair=f"{token} $A {token}:1 $B:1",
                                          special_tokens=[(token, bos)])
    inner.post_processor = start if inner.post_processor is None else processors.Sequence(
        [inner.post_processor, start])
    return inner.to_str(pretty=True)


__all__ = ["GENERATION_CONFIG", "TOKENIZER_CONFIG", "chat_template_source", "export_tokenizer_config",
           "export_tokenizer_json", "load_hf_tokenizer", "read_json_object", "side_file", "special_token_ids",
           "stop_token_ids"]
