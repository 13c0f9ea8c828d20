"""A conversation with a model: history, the context budget, streamed replies. Used by `yunque chat`.

The chat format itself, and where a reply ends, is the model's `ChatFormat` (tokenizer/chat.py); this module only
keeps the turns and fits them in the window.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from yunque.engine.engine import Engine, SamplingParams
from yunque.model.gpt import GPT
from yunque.modeldir import load_model
from yunque.tokenizer.bpe import Tokenizer
from yunque.tokenizer.chat import ChatFormat, ChatTemplate


def load_chat_model(model_dir: str | Path, adapter: str | Path | None = None, *,
                    device: str = "cpu") -> tuple[GPT, Tokenizer, ChatFormat]:
    """(model, tokenizer, chat format) of a model dir, with a LoRA adapter dir applied if given."""
    model, tokenizer = load_model(model_dir, device=device)
    if adapter is not None:
        from yunque.model.lora import apply_adapter

        apply_adapter(model, adapter).eval()  # merged: one matmul per layer while chatting
    return model, tokenizer, ChatFormat.of(model_dir, tokenizer)


def turn_end_strings(template: ChatTemplate, tokenizer: Tokenizer) -> tuple[str, ...]:
    """`ChatFormat.for_tokenizer(tokenizer, template).stop`; kept only for tests/test_chat_cli.py's copy of the
    ChatSession tests, and goes with it."""
    return ChatFormat.for_tokenizer(tokenizer, template).stop


class ChatSession:
    """The turns of one conversation and the model that answers them.

    Before each reply the oldest user/assistant exchanges are dropped until the prompt plus `max_new_tokens` fits
    the model's context; the system message always stays.
    """

    def __init__(self, engine: Engine, params: SamplingParams, fmt: ChatFormat | None = None, *,
                 system: str | None = None, template: ChatTemplate | None = None) -> None:
        """fmt: the model's chat format (`ChatFormat.of`); by default the engine tokenizer's, with `template` if
        given. Replies end where the format ends an assistant turn, as well as at `params.stop`. ValueError if the
        model has no chat format."""
        if fmt is None:
            # cli.py still passes template= with what load_chat_model returns, now a ChatFormat; this goes when
            # it passes fmt
            fmt = template if isinstance(template, ChatFormat) else ChatFormat.for_tokenizer(engine.tokenizer,
                                                                                            template)
        if not fmt.is_chat:
            raise ValueError("this model has no chat format (no chat tokens in its tokenizer, no chat template in "
                             "its dir); chat with a chat model: one fine-tuned by `yunque sft`, or a Hugging Face "
                             "chat model")
        self.engine, self.format = engine, fmt
        self.params = fmt.reply_params(params)
        self.system = system
        self.turns: list[dict[str, str]] = []
        self.dropped = 0
        """Messages dropped from the start of the history to fit the context, over the whole session."""

    @property
    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reset(self) -> None:
        self.turns, self.dropped = [], 0

    def prompt(self) -> tuple[list[int], int]:
        """(prompt ids, messages dropped now) for the current history, fitted to the context window."""
        ctx = self.engine.model.cfg.max_seq_len
        budget = ctx - min(self.params.max_new_tokens, ctx // 2)
        dropped = 0
        while True:
            ids = self.format.prompt(self.messages)
            if len(ids) <= budget or len(self.turns) <= 1:
                break
            del self.turns[:2 if len(self.turns) > 2 else 1]  # the oldest exchange: a user turn and its reply
            dropped += 2
        if len(ids) >= ctx:
            if self.turns:
                self.turns.pop()
            raise ValueError(f"the message is {len(ids)} tokens with the system prompt, but the model's context is "
                             f"{ctx}; send a shorter message or /system a shorter system prompt")
        self.dropped += dropped
        return ids, dropped

    def send(self, text: str) -> tuple[Iterator[str], int]:
        """Add a user message; return (an iterator of reply pieces, messages dropped to make room). The reply
        joins the history when the iterator is exhausted."""
        self.turns.append({"role": "user", "content": text})
        ids, dropped = self.prompt()
        return self._reply(ids), dropped

    def _reply(self, ids: list[int]) -> Iterator[str]:
        pieces = []
        for piece in self.engine.stream(ids, self.params):
            pieces.append(piece)
            yield piece
        self.turns.append({"role": "assistant", "content": "".join(pieces)})
        if self.params.seed is not None:  # a new seed per reply, still reproducible for the whole session
            self.params = replace(self.params, seed=self.params.seed + 1)

    def save(self, path: str | Path) -> None:
        """Write the conversation as one jsonl record ({"messages": [...]}), the format `yunque sft` reads."""
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"messages": self.messages}, ensure_ascii=False) + "\n")


def run_terminal_chat(session: ChatSession, read_line, write) -> None:
    """The `yunque chat` loop: read a line, handle /commands, stream the reply. `read_line()` returns None at the
    end of input; works the same on a terminal and on piped input."""
    write("chat: /reset clears the history, /system TEXT sets the system prompt, /save FILE appends the "
          "conversation as jsonl, /exit quits\n")
    while True:
        line = read_line()
        if line is None:
            return
        line = line.rstrip("\n")
        if not line.strip():
            continue
        command, _, arg = line.partition(" ")
        if command == "/exit" or command == "/quit":
            return
        if command == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        if command == "/system":
            session.system = arg.strip() or None
            write(f"(system prompt {'set' if session.system else 'removed'})\n")
            continue
        if command == "/save":
            if not arg.strip():
                write("(usage: /save FILE)\n")
                continue
            session.save(arg.strip())
            write(f"(saved to {arg.strip()})\n")
            continue
        try:
            pieces, dropped = session.send(line)
            if dropped:
                write(f"(dropped the {dropped} oldest messages to fit the context)\n")
            write("assistant: ")
            for piece in pieces:
                write(piece)
            write("\n")
        except ValueError as e:
            write(f"(error: {e})\n")


__all__ = ["ChatSession", "load_chat_model", "run_terminal_chat"]
