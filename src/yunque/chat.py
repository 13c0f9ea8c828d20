"""A conversation with a model: history, the context budget, streamed replies. Used by `yunque chat`.

The chat format itself lives in tokenizer/chat.py; this module only keeps the turns and fits them in the window.
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
from yunque.tokenizer.chat import ROLES, ChatTemplate, has_chat_tokens, load_chat_template, render_prompt


def load_chat_model(model_dir: str | Path, adapter: str | Path | None = None, *,
                    device: str = "cpu") -> tuple[GPT, Tokenizer, ChatTemplate | None]:
    """(model, tokenizer, chat template or None) of a model dir, with a LoRA adapter dir applied if given."""
    model, tokenizer = load_model(model_dir, device=device)
    if adapter is not None:
        from yunque.model.lora import apply_adapter

        apply_adapter(model, adapter).eval()  # merged: one matmul per layer while chatting
    return model, tokenizer, load_chat_template(model_dir)


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")
"""End-of-turn tokens of the common chat templates (ChatML/Qwen/SmolLM, Llama 3, Phi, Gemma, Llama 2/Mistral)."""


def turn_end_strings(template: ChatTemplate, tokenizer: Tokenizer) -> tuple[str, ...]:
    """The special tokens that end an assistant turn under `template`: its eos_token and the usual end-of-turn
    tokens that this vocabulary has and the template uses."""
    vocab = tokenizer.inner.get_vocab(with_added_tokens=True)
    ends = [t for t in END_OF_TURN_TOKENS if t in vocab and t in template.source]
    eos = template.variables.get("eos_token")
    if eos and eos not in ends:
        ends.append(eos)
    return tuple(ends)


class ChatSession:
    """The turns of one conversation and the model that answers them.

    Before each reply the oldest user/assistant exchanges are dropped until the prompt plus `max_new_tokens` fits
    the model's context; the system message always stays.
    """

    def __init__(self, engine: Engine, params: SamplingParams, *, system: str | None = None,
                 template: ChatTemplate | None = None) -> None:
        if template is not None:
            # a Hugging Face chat model ends its turn with its own token (<|im_end|>, <|eot_id|>, </s>, ...);
            # the engine prints special tokens as their text, so that text stops the reply
            params = replace(params, stop=(*params.stop, *turn_end_strings(template, engine.tokenizer)))
        elif has_chat_tokens(engine.tokenizer):
            # yunque's format: its end-of-turn token stops the engine; a reply that opens another turn (the model
            # writing the user's next message) has ended too, and the role token's text must not be shown
            params = replace(params, stop=(*params.stop, *(t for t in ROLES.values() if t not in params.stop)))
        self.engine, self.params, self.template = engine, params, template
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
            ids = render_prompt(self.engine.tokenizer, self.messages, template=self.template)
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
