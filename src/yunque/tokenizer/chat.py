"""The chat format: conversations -> token ids and the loss mask. The only module that knows the format.

yunque's own format, for tokenizers made by `train_bpe` or `byte_tokenizer` (they hold the chat special tokens):

    [BOS] <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ...

Role and end tokens enter only as special ids (content text such as "<|end|>" is encoded as plain bytes, so data
cannot forge a turn boundary). The loss mask is True on each assistant turn's content and its <|end|>: the model
learns to answer and to stop, never to write the user's part or the role token (which the prompt supplies).

Models imported from Hugging Face bring their own format as a jinja2 `chat_template` (tokenizer_config.json or
chat_template.jinja in the model dir); `render_with_template` renders it with the same mask semantics.

`ChatFormat` is what the rest of yunque uses: built once per model, it decides which of the two formats applies
(or that the model has none), renders and prompts with it, and says where an assistant turn ends.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from yunque import formats
from yunque.tokenizer.bpe import ASSISTANT, BOS, END_OF_TURN, SYSTEM, USER, Tokenizer

if TYPE_CHECKING:
    from yunque.config import SamplingParams

ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
"""Accepted message roles and the special token that opens each turn."""


@dataclass(frozen=True)
class ChatTemplate:
    """A Hugging Face chat template and the variables it is rendered with."""

    source: str
    """The jinja2 template text."""
    variables: dict[str, Any] = field(default_factory=dict)
    """bos_token, eos_token, pad_token, unk_token as tokenizer_config.json names them."""


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")
"""End-of-turn tokens of the common chat templates (ChatML/Qwen/SmolLM, Llama 3, Phi, Gemma, Llama 2/Mistral)."""


@dataclass(frozen=True)
class ChatFormat:
    """One model's chat format: how a conversation becomes ids, and where an assistant turn ends.

    Build it once per model with `ChatFormat.of(model_dir, tokenizer)` (`for_tokenizer` in memory) and pass it to
    whatever renders conversations or generates replies. `kind` is decided there, in this order:

    - "template": the model's own jinja2 chat template. It wins over yunque's tokens because some Hub tokenizers
      (Phi-3) have tokens named like yunque's while their template lays the turns out differently.
    - "yunque": yunque's format, for a tokenizer that has its chat tokens.
    - "plain": neither; `is_chat` is False and `render`/`prompt` raise a ValueError that says so.
    """

    tokenizer: Tokenizer
    template: ChatTemplate | None
    """The model's chat template (kind "template"), else None."""
    kind: Literal["template", "yunque", "plain"]
    """Which format renders this model's conversations (see above); the values SFT records as "chat_format"."""
    stop: tuple[str, ...]
    """Text that ends an assistant turn, as the engine prints it (special tokens as their text): a template's
    end-of-turn tokens and eos_token; for yunque's format the role tokens, since a reply that opens another turn
    has ended there (its own <|end|> is a stop id). Added to a request by `reply_params`."""
    stop_ids: frozenset[int]
    """Ids of the tokens that end an assistant turn (end of turn, end of text); the engine that serves the model
    should stop at them: `engine.stop_ids |= fmt.stop_ids`."""

    @classmethod
    def of(cls, model_dir: str | Path, tokenizer: Tokenizer) -> ChatFormat:
        """The format of a model dir and its tokenizer: the dir's chat template (`load_chat_template`) if it has
        one, else yunque's format if the tokenizer has its chat tokens, else plain."""
        return cls.for_tokenizer(tokenizer, load_chat_template(model_dir))

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, template: ChatTemplate | None = None) -> ChatFormat:
        """The format of a tokenizer in memory, with the model's chat template if it has one."""
        if template is not None:
            vocab = tokenizer.inner.get_vocab(with_added_tokens=True)
            stop = [t for t in END_OF_TURN_TOKENS if t in vocab and t in template.source]
            eos = template.variables.get("eos_token")
            if eos and eos not in stop:
                stop.append(eos)
            return cls(tokenizer=tokenizer, template=template, kind="template", stop=tuple(stop),
                       stop_ids=frozenset(vocab[t] for t in stop if t in vocab))
        if has_chat_tokens(tokenizer):
            ends = {tokenizer.special_ids[END_OF_TURN], tokenizer.eos_id} - {None}
            return cls(tokenizer=tokenizer, template=None, kind="yunque", stop=tuple(ROLES.values()),
                       stop_ids=frozenset(ends))
        return cls(tokenizer=tokenizer, template=None, kind="plain", stop=(), stop_ids=frozenset())

    @property
    def is_chat(self) -> bool:
        """Whether this model has a chat format. It says what the tokenizer or dir holds, not what the model has
        learned: a base model pretrained by yunque has the chat tokens before any fine-tuning."""
        return self.kind != "plain"

    def render(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """(ids, loss_mask) of a conversation for training; loss_mask marks each assistant reply and its end."""
        return render(self.tokenizer, messages, template=self.template)

    def prompt(self, messages: list[dict]) -> list[int]:
        """Ids of the conversation and the opening of an assistant turn: the prompt to generate a reply from."""
        return render_prompt(self.tokenizer, messages, template=self.template)

    def reply_params(self, params: SamplingParams) -> SamplingParams:
        """`params` with this format's stop strings added after its own (each once): generation ends with the
        assistant turn."""
        return replace(params, stop=(*params.stop, *(s for s in self.stop if s not in params.stop)))


def check_messages(messages: list[dict]) -> None:
    """ValueError naming the first message that is not {"role": one of ROLES, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"a conversation is a non-empty list of messages, got {type(messages).__name__} "
                         f"{str(messages)[:60]}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} is {str(m)[:60]}; each message needs a 'role' and a 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r}; accepted roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} has content of type {type(m['content']).__name__}; it must be a string")


def has_chat_tokens(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer has every special token of yunque's chat format."""
    return all(t in tokenizer.special_ids for t in (*ROLES.values(), END_OF_TURN))


def render(tokenizer: Tokenizer, messages: list[dict], *,
           template: ChatTemplate | None = None) -> tuple[list[int], list[bool]]:
    """(ids, loss_mask) of a conversation; loss_mask[i] is True where ids[i] is an assistant token to learn.

    With a `template` (a Hugging Face model's own format) the template renders it; otherwise yunque's format.
    """
    check_messages(messages)
    if template is not None:
        return render_with_template(template.source, tokenizer, messages, **template.variables)
    specials = _chat_specials(tokenizer)
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    mask = [False] * len(ids)
    for m in messages:
        content = tokenizer.encode(m["content"])
        learn = m["role"] == "assistant"
        ids += [specials[ROLES[m["role"]]], *content, specials[END_OF_TURN]]
        mask += [False] + [learn] * (len(content) + 1)
    return ids, mask


def yunque_template() -> ChatTemplate:
    """yunque's own format written as a Hugging Face chat template (jinja2), for exports: rendered with
    `render_with_template`, or by transformers' `apply_chat_template`, it gives the ids of `render`/`render_prompt`
    for a tokenizer made by yunque (role and end tokens as its special tokens, BOS first)."""
    roles = " ".join(f"'{role}'" for role in ROLES)
    source = ("{{ bos_token }}{% for message in messages %}"
              "{% if message['role'] not in [" + roles.replace(" ", ", ") + "] %}"
              "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
              "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END_OF_TURN + "' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}")
    return ChatTemplate(source, {"bos_token": BOS, "eos_token": END_OF_TURN})


def render_prompt(tokenizer: Tokenizer, messages: list[dict], *, template: ChatTemplate | None = None) -> list[int]:
    """Ids of the conversation followed by the opening of an assistant turn: the prompt to generate a reply from.

    Generation should stop where the assistant turn ends: `ChatFormat.stop` and `ChatFormat.stop_ids` say where.
    """
    check_messages(messages)
    if template is not None:
        return render_with_template(template.source, tokenizer, messages, add_generation_prompt=True,
                                    **template.variables)[0]
    return render(tokenizer, messages)[0] + [_chat_specials(tokenizer)[ASSISTANT]]


def _chat_specials(tokenizer: Tokenizer) -> dict[str, int]:
    if not has_chat_tokens(tokenizer):
        missing = [t for t in (*ROLES.values(), END_OF_TURN) if t not in tokenizer.special_ids]
        raise ValueError(f"this tokenizer has no {', '.join(missing)} tokens, so it cannot use yunque's chat "
                         f"format, and no chat template was given; use a model whose tokenizer yunque made, or one "
                         f"whose dir has a chat template (ChatFormat.of(model_dir, tokenizer) reads it)")
    return tokenizer.special_ids


# ---- Hugging Face chat templates ----

def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The chat template of a model dir (chat_template.jinja, or "chat_template" in tokenizer_config.json) or of
    a one-file model (a GGUF's tokenizer.chat_template), or None if it has none."""
    model_dir = Path(model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config: dict[str, Any] = formats.bundled_file(model_dir, "tokenizer_config.json") or {}  # a GGUF holds its own
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path}: not valid JSON ({e}); fix or delete the file") from None
    source = config.get("chat_template")
    if isinstance(source, list):  # several named templates: [{"name": "default", "template": ...}, ...]
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if (model_dir / "chat_template.jinja").is_file():
        source = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if not source:
        return None
    variables = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):  # an AddedToken written out: {"content": "<s>", ...}
            value = value.get("content")
        if isinstance(value, str):
            variables[key] = value
    return ChatTemplate(source, variables)


def render_with_template(template: str, tokenizer: Tokenizer, messages: list[dict], *,
                         add_generation_prompt: bool = False, **variables: Any) -> tuple[list[int], list[bool]]:
    """(ids, loss_mask) of a conversation in a jinja2 chat template's format, the mask as in `render`.

    The template is rendered prefix by prefix: the text an assistant turn adds after the template's
    generation prompt (the reply and whatever closes the turn) is masked True, everything else False. Each
    piece is encoded on its own, special tokens' text in the template becoming their ids. Message content
    holding a special token's text is refused, since the template would turn it into a real turn boundary.
    """
    check_messages(messages)
    render_text = _compile(template, variables)
    specials = _special_tokens(tokenizer)
    for i, m in enumerate(messages):
        forged = next((s for s in specials if s in m["content"]), None)
        if forged:
            raise ValueError(f"message {i} contains the special token text {forged!r}; the chat template would "
                             f"make it a real special token, remove it from the data")
    ids: list[int] = []
    mask: list[bool] = []
    done = ""

    def add(text: str, learn: bool) -> None:
        nonlocal done
        if not text.startswith(done):
            raise ValueError("the chat template renders a longer conversation with different text before its end "
                             "(it rewrites earlier turns), so the loss mask cannot be found turn by turn; "
                             "fine-tune with yunque's chat format instead")
        piece = _encode_with_specials(tokenizer, text[len(done):], specials)
        ids.extend(piece)
        mask.extend([learn] * len(piece))
        done = text

    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            add(render_text(messages[:k], True), False)
            add(render_text(messages[:k + 1], False), True)
    add(render_text(messages, add_generation_prompt), False)
    return ids, mask


def _compile(template: str, variables: dict[str, Any]):
    """A function (messages, add_generation_prompt) -> text, rendering like transformers' apply_chat_template."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("this model's chat template needs jinja2, which is not installed; "
                         "pip install jinja2") from None

    def raise_exception(message: str):
        raise ValueError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                 ensure_ascii=ensure_ascii)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        compiled = env.from_string(template)
    except TemplateError as e:
        raise ValueError(f"the chat template is not valid jinja2 ({e})") from None

    def render_text(messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError as e:
            raise ValueError(f"the chat template failed to render ({e})") from None

    return render_text


def _special_tokens(tokenizer: Tokenizer) -> list[str]:
    """Text of the tokenizer's special added tokens, longest first (so the longest match wins)."""
    tokens = {t.content for t in tokenizer.inner.get_added_tokens_decoder().values() if t.special}
    return sorted(tokens, key=len, reverse=True)


def _encode_with_specials(tokenizer: Tokenizer, text: str, specials: list[str]) -> list[int]:
    """Ids of template text, special tokens' text becoming their ids (`Tokenizer.encode` never does that)."""
    if not specials:
        return tokenizer.encode(text) if text else []
    ids: list[int] = []
    for part in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if part in specials:
            ids.append(tokenizer.inner.token_to_id(part))
        elif part:
            ids += tokenizer.encode(part)
    return ids
