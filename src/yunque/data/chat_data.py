"""Chat data for supervised fine-tuning: conversations from jsonl files, a held-out split, padded batches.

jsonl -> Conversation (messages) -> `ChatBatches` (rendered by tokenizer/chat.py, cut to the context) -> (x, y).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from yunque.losses import IGNORE
from yunque.tokenizer.bpe import Tokenizer
from yunque.tokenizer.chat import ChatFormat, check_messages

SHAPES = (
    '{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}',
    '{"instruction", "input" (optional), "output"} (Alpaca)',
    '{"instruction", "instances": [{"input", "output"}, ...]} (Self-Instruct; the first instance)',
    '{"prompt", "completion"}',
    '{"question", "answer"} (GSM8K)',
)
"""The record shapes `record_messages` accepts, as error messages list them."""

POLICIES = ("truncate", "drop")
"""What `ChatBatches` does with a conversation longer than the context: cut its end, or leave it out."""


@dataclass(frozen=True)
class Conversation:
    """One training example: the messages of a chat, and where it came from."""

    name: str
    """`file:line` of the record."""
    messages: list[dict[str, str]]
    """[{"role", "content"}, ...], roles as in `yunque.tokenizer.chat.ROLES`."""


def record_messages(record: Any) -> list[dict[str, str]]:
    """The messages of one record of any of `SHAPES`; ValueError naming the problem otherwise."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}; "
                         f"accepted shapes: {'; '.join(SHAPES)}")
    if "messages" in record:
        messages = record["messages"]
        check_messages(messages)
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in record and "instances" in record:
        instances = record["instances"]
        if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
            raise ValueError("'instances' must be a non-empty list of {\"input\", \"output\"} objects")
        return _instruction(record, instances[0], "instances[0].")
    if "instruction" in record and "output" in record:
        return _instruction(record, record, "")
    for user, assistant in (("prompt", "completion"), ("question", "answer")):
        if user in record and assistant in record:
            return [{"role": "user", "content": _text(record, user)},
                    {"role": "assistant", "content": _text(record, assistant)}]
    raise ValueError(f"unknown record shape (keys {', '.join(sorted(record)) or 'none'}); "
                     f"accepted shapes: {'; '.join(SHAPES)}")


def _instruction(record: dict, io: dict, where: str) -> list[dict[str, str]]:
    """Alpaca's rule: the user turn is the instruction, then a blank line and the input if there is one."""
    instruction, output = _text(record, "instruction"), _text(io, "output", where)
    given = _text(io, "input", where) if io.get("input") is not None else ""
    user = f"{instruction}\n\n{given}" if given else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _text(record: dict, key: str, where: str = "") -> str:
    if key not in record:
        raise ValueError(f"no '{where}{key}' field")
    if not isinstance(record[key], str):
        raise ValueError(f"'{where}{key}' is {type(record[key]).__name__}, not a string")
    return record[key]


def load_conversations(paths: Sequence[str | Path]) -> list[Conversation]:
    """Conversations from jsonl files (`.jsonl.gz` too), one record of any of `SHAPES` per line, in order.

    Blank lines are skipped; a malformed line is a ValueError starting "file:line: ".
    """
    conversations = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"{path}: no such file; pass jsonl files of conversations")
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                lines = f.read().splitlines()
        except (OSError, EOFError) as e:  # EOFError: truncated .gz
            raise ValueError(f"{path}: cannot read ({e})") from None
        for lineno, raw in enumerate(lines, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff")
                if not line.strip():
                    continue
                messages = record_messages(json.loads(line))
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 (first bad byte at offset {e.start} of the line); "
                                 f"re-encode it as UTF-8") from None
            except ValueError as e:  # json.JSONDecodeError is a ValueError too
                kind = "not valid JSON: " if isinstance(e, json.JSONDecodeError) else ""
                raise ValueError(f"{where}: {kind}{e}") from None
            conversations.append(Conversation(where, messages))
    if not conversations:
        raise ValueError(f"no conversations in {', '.join(map(str, paths)) or 'no files'}; pass jsonl files with "
                         f"records shaped like {SHAPES[0]}")
    return conversations


def split_conversations(conversations: Sequence[Conversation], val_fraction: float, *,
                        seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val): round(n * val_fraction) conversations (at least one if val_fraction > 0) held out.

    Chosen by a hash of (seed, messages), so the split depends on content, not order or file names: adding
    data moves no conversation from one side to the other unless it is pushed past the cut.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction is {val_fraction} but must be at least 0 and below 1")
    n = len(conversations)
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"{n} conversations leave none for training with val_fraction={val_fraction}; "
                         f"add data or lower the fraction")

    def key(i: int) -> bytes:
        text = f"{seed}:" + json.dumps(conversations[i].messages, sort_keys=True, ensure_ascii=False)
        return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest() + i.to_bytes(8, "little")

    held = set(sorted(range(n), key=key)[:n_val])
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


def length_bucket(n: int, max_len: int) -> int:
    """The padded length of a batch whose longest row has n tokens: the least of 32, 64, 128, ... that holds n,
    or max_len if that is less. Padding costs at most half the compute of the padded rows; the short rows of a
    batch are padded to its longest row anyway."""
    size = 32
    while size < n:
        size *= 2
    return max(n, min(size, max_len))


class ChatBatches:
    """Rendered conversations as padded batches (x, y) for `fit`: inputs (B, T) and targets (B, T), int64.

    y[:, t] is the token after x[:, t] where the loss mask marks it (assistant tokens), else IGNORE; padding is
    pad_id in x and IGNORE in y. T is the longest sequence of the batch rounded up to a `length_bucket`, at most
    `max_seq_len`: a compiled training step then meets a handful of shapes, each compiled once, instead of a new
    length every step (variable lengths under torch.compile's dynamic shapes crashed SFT runs after ~240 steps).
    """

    def __init__(self, fmt: ChatFormat | Tokenizer, conversations: Sequence[Conversation], *, max_seq_len: int,
                 policy: str = "truncate") -> None:
        """Render every conversation in `fmt` (the model's ChatFormat; a tokenizer means yunque's format). One
        longer than max_seq_len + 1 tokens (max_seq_len inputs and their targets) is cut to that length (policy
        "truncate") or left out ("drop"); one left with no assistant token to learn is left out. Both are counted
        in `counts` and `summary()`."""
        if policy not in POLICIES:
            raise ValueError(f"unknown truncation policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be at least 1, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        fmt = fmt if isinstance(fmt, ChatFormat) else ChatFormat.for_tokenizer(fmt)
        tokenizer = fmt.tokenizer
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.examples: list[tuple[np.ndarray, np.ndarray]] = []
        """(ids, loss_mask) of each kept conversation, cut to max_seq_len + 1 tokens."""
        self.counts = {"conversations": len(conversations), "truncated": 0, "dropped_too_long": 0,
                       "dropped_no_target": 0}
        """How many conversations came in, were cut, and were left out (too long under "drop", or nothing to
        learn within the context)."""
        limit = max_seq_len + 1
        for conv in conversations:
            try:
                ids, mask = fmt.render(conv.messages)
            except ValueError as e:
                raise ValueError(f"{conv.name}: {e}") from None
            if len(ids) > limit:
                if policy == "drop":
                    self.counts["dropped_too_long"] += 1
                    continue
                self.counts["truncated"] += 1
                ids, mask = ids[:limit], mask[:limit]
            if not any(mask[1:]):  # the first token is never a target
                self.counts["dropped_no_target"] += 1
                continue
            self.examples.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
        if conversations and not self.examples:
            raise ValueError(f"none of {len(conversations)} conversations has an assistant token within "
                             f"max_seq_len={max_seq_len} ({self.summary()}); raise max_seq_len or use "
                             f"policy 'truncate'")

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def mean_len(self) -> float:
        """Mean input length (tokens per row before padding)."""
        return float(np.mean([len(ids) - 1 for ids, _ in self.examples])) if self.examples else 0.0

    def summary(self) -> str:
        """One line for people, e.g. "64 conversations: 60 used, 3 truncated to 256 tokens, 1 dropped (...)"."""
        c = self.counts
        parts = [f"{c['conversations']} conversations: {len(self)} used"]
        if c["truncated"]:
            parts.append(f"{c['truncated']} truncated to {self.max_seq_len} tokens")
        if c["dropped_too_long"]:
            parts.append(f"{c['dropped_too_long']} dropped (longer than {self.max_seq_len} tokens)")
        if c["dropped_no_target"]:
            parts.append(f"{c['dropped_no_target']} dropped (no assistant token within {self.max_seq_len} tokens)")
        return ", ".join(parts)

    def sample(self, batch_size: int, *, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch `step`: rows step*B .. step*B+B-1 of an endless sequence of epochs, each epoch a
        permutation from `numpy.random.default_rng([seed, epoch])`. A pure function of (seed, step), so a
        resumed run sees the batches of an uninterrupted one; every conversation is seen once per epoch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        n = len(self.examples)
        positions = np.arange(step * batch_size, (step + 1) * batch_size)
        perms = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(positions // n)}
        return self._collate([self.examples[perms[p // n][p % n]] for p in positions])

    def iter_eval(self, batch_size: int, *,
                  max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches over the conversations in order, each once (the last batch may be smaller)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for k, start in enumerate(range(0, len(self.examples), batch_size)):
            if max_batches is not None and k >= max_batches:
                return
            yield self._collate(self.examples[start:start + batch_size])

    def _collate(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        T = length_bucket(max(len(ids) for ids, _ in rows) - 1, self.max_seq_len)
        x = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        y = np.full((len(rows), T), IGNORE, dtype=np.int64)
        for b, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            x[b, :n] = ids[:-1]
            y[b, :n] = np.where(mask[1:], ids[1:], IGNORE)
        return torch.from_numpy(x), torch.from_numpy(y)
