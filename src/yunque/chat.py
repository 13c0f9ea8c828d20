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
from yunque.feedback import append, prefer, rate
from yunque.model.gpt import GPT
from yunque.modeldir import load_model
from yunque.tokenizer.bpe import Tokenizer
from yunque.tokenizer.chat import ChatFormat


def load_chat_model(model_dir: str | Path, adapter: str | Path | None = None, *,
                    device: str = "cpu") -> tuple[GPT, Tokenizer, ChatFormat]:
    """(model, tokenizer, chat format) of a model dir, with a LoRA adapter dir applied if given."""
    model, tokenizer = load_model(model_dir, device=device)
    if adapter is not None:
        from yunque.model.lora import apply_adapter

        apply_adapter(model, adapter).eval()  # merged: one matmul per layer while chatting
    return model, tokenizer, ChatFormat.of(model_dir, tokenizer)


class ChatSession:
    """The turns of one conversation and the model that answers them.

    Before each reply the oldest user/assistant exchanges are dropped until the prompt plus `max_new_tokens` fits
    the model's context; the system message always stays. The history changes only when a reply is complete: a
    message the chat format refuses or the context cannot hold, and a reply that fails or is abandoned, leave it
    as it was.
    """

    def __init__(self, engine: Engine, params: SamplingParams, fmt: ChatFormat | None = None, *,
                 system: str | None = None) -> None:
        """fmt: the model's chat format (`ChatFormat.of`); by default the engine tokenizer's. Replies end where the
        format ends an assistant turn, as well as at `params.stop`. ValueError if the model has no chat format."""
        fmt = fmt or ChatFormat.for_tokenizer(engine.tokenizer)
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
        return self._head() + self.turns

    def _head(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def reset(self) -> None:
        self.turns, self.dropped = [], 0

    def prompt(self) -> tuple[list[int], int]:
        """(prompt ids, messages dropped now) for the current history, fitted to the context window; the history
        keeps only the turns that fit."""
        ids, self.turns, dropped = self._fit(self.turns)
        self.dropped += dropped
        return ids, dropped

    def send(self, text: str) -> tuple[Iterator[str], int]:
        """Prepare the reply to a user message: (an iterator of reply pieces, messages dropped to make room).

        A message that cannot be rendered or does not fit raises ValueError here, the history untouched. The
        message and its reply join the history (and the dropped turns leave it) when the iterator is exhausted.
        """
        ids, turns, dropped = self._fit([*self.turns, {"role": "user", "content": text}])
        return self._reply(ids, turns, dropped), dropped

    def _fit(self, turns: list[dict[str, str]]) -> tuple[list[int], list[dict[str, str]], int]:
        """(prompt ids, turns kept, number dropped): `turns` after the system message, less their oldest exchanges
        until the prompt leaves room for max_new_tokens. `turns` itself is not changed."""
        ctx = self.engine.model.cfg.max_seq_len
        budget = ctx - min(self.params.max_new_tokens, ctx // 2)
        kept = list(turns)
        while True:
            ids = self.format.prompt(self._head() + kept)
            if len(ids) <= budget or len(kept) <= 1:
                break
            del kept[:2 if len(kept) > 2 else 1]  # the oldest exchange: a user turn and its reply
        if len(ids) >= ctx:
            raise ValueError(f"the message is {len(ids)} tokens with the system prompt, but the model's context is "
                             f"{ctx}; send a shorter message or /system a shorter system prompt")
        return ids, kept, len(turns) - len(kept)

    def _reply(self, ids: list[int], turns: list[dict[str, str]], dropped: int) -> Iterator[str]:
        pieces = []
        for piece in self.engine.stream(ids, self.params):
            pieces.append(piece)
            yield piece
        self.turns = [*turns, {"role": "assistant", "content": "".join(pieces)}]
        self.dropped += dropped
        if self.params.seed is not None:  # a new seed per reply, still reproducible for the whole session
            self.params = replace(self.params, seed=self.params.seed + 1)

    def last_exchange(self) -> tuple[list[dict[str, str]], str] | None:
        """(the conversation the last reply answers, that reply), or None before the first reply."""
        if not self.turns or self.turns[-1]["role"] != "assistant":
            return None
        return self._head() + self.turns[:-1], self.turns[-1]["content"]

    def another_reply(self) -> Iterator[str]:
        """A second reply to the last user message, streamed; the history keeps the first until `replace_reply`."""
        if self.last_exchange() is None:
            raise ValueError("there is no reply yet to compare with; send a message first")
        ids, _, _ = self._fit(self.turns[:-1])
        yield from self.engine.stream(ids, self.params)
        if self.params.seed is not None:
            self.params = replace(self.params, seed=self.params.seed + 1)

    def replace_reply(self, text: str) -> None:
        """Make `text` the last reply of the history (the one a person preferred)."""
        if self.last_exchange() is not None:
            self.turns[-1] = {"role": "assistant", "content": text}

    def save(self, path: str | Path) -> None:
        """Write the conversation as one jsonl record ({"messages": [...]}), the format `yunque sft` reads."""
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"messages": self.messages}, ensure_ascii=False) + "\n")


def run_terminal_chat(session: ChatSession, read_line, write, *, model: str = "model",
                      feedback: Path | None = None) -> None:
    """The `yunque chat` loop: read a line, handle /commands, stream the reply. `read_line()` returns None at the
    end of input; works the same on a terminal and on piped input. /good, /bad and /prefer write feedback records
    (yunque/feedback.py) for `model` under `feedback` (default: $YUNQUE_HOME/feedback)."""
    write("chat: /reset clears the history, /system TEXT sets the system prompt, /save FILE appends the "
          "conversation as jsonl, /good or /bad rates the last reply, /prefer shows another reply and asks which "
          "is better, /exit quits\n")
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
        if command in ("/good", "/bad", "/prefer"):
            _feedback(session, command, read_line, write, model, feedback)
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


def _feedback(session: ChatSession, command: str, read_line, write, model: str, directory: Path | None) -> None:
    """/good, /bad: rate the last reply; /prefer: stream a second reply, ask which is better, record the pair."""
    last = session.last_exchange()
    if last is None:
        write("(no reply yet: send a message first)\n")
        return
    messages, reply = last
    if command != "/prefer":
        path = append(rate(model, messages, reply, 1 if command == "/good" else -1), directory)
        write(f"(rated the last reply {command[1:]}: {path})\n")
        return
    write("second reply: ")
    pieces = []
    try:
        for piece in session.another_reply():
            pieces.append(piece)
            write(piece)
    except ValueError as e:
        write(f"\n(error: {e})\n")
        return
    other = "".join(pieces)
    write("\nwhich is better, 1 (the first) or 2 (the second)? ")
    answer = (read_line() or "").strip()
    if answer not in ("1", "2"):
        write("(no preference saved)\n")
        return
    chosen, rejected = (reply, other) if answer == "1" else (other, reply)
    if chosen == rejected:
        write("(the two replies are the same: no preference saved)\n")
        return
    path = append(prefer(model, messages, chosen, rejected), directory)
    session.replace_reply(chosen)
    write(f"(saved: reply {answer} preferred, {path})\n")


__all__ = ["ChatSession", "load_chat_model", "run_terminal_chat"]
