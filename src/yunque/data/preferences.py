"""Preference data for alignment: pairs of replies to one conversation, the better one first; and prompts for RL.

Where pairs come from (`load_pairs`), one record a line:

    {"prompt": "...", "chosen": "...", "rejected": "..."}          a single user turn
    {"messages": [...], "chosen": "...", "rejected": "..."}        a conversation ending with the user's turn
    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}   Anthropic HH-RLHF transcripts: the turns
                                                                    both share are the prompt, the last assistant
                                                                    turns are the replies
    feedback files and dirs (yunque/feedback.py)                   what people said in `yunque chat` and on the page:
                                                                    preferences, and up/down ratings of two replies
                                                                    to one conversation

`chosen`/`rejected` may also be TRL's conversational form, a list holding one assistant message. A bad record
(not JSON, a missing field, an empty prompt, identical replies, a transcript that does not parse) is a ValueError
"file:line: what is wrong".

Prompts for PPO/GRPO (`load_prompts`) come from the same files or any chat data (data/chat_data.SHAPES): the
conversation up to its last user turn; assistant replies in the data are ignored.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from yunque.data.chat_data import record_messages
from yunque.feedback import preference_pairs, read_feedback
from yunque.losses import IGNORE
from yunque.tokenizer.chat import ChatFormat, check_messages

SHAPES = (
    '{"prompt", "chosen", "rejected"}',
    '{"messages": [... ending with a user turn], "chosen", "rejected"}',
    '{"chosen", "rejected"} as HH-RLHF transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...")',
    "feedback records ({\"kind\": \"rating\"|\"preference\", ...}) or a dir of them",
)
"""The pair shapes `load_pairs` accepts, as its errors list them."""


@dataclass(frozen=True)
class Pair:
    """Two replies to one conversation, the preferred one first."""

    name: str
    """Where it came from: `file:line`, or `file` for pairs made of feedback ratings."""
    messages: list[dict[str, str]]
    """The conversation the replies answer, ending with the user's turn."""
    chosen: str
    rejected: str


# ---- reading ----

class Diverged(ValueError):
    """Two HH-RLHF transcripts that differ before their last turn: not a pair of replies to one prompt."""


def load_pairs(paths: Sequence[str | Path], skipped: list[str] | None = None) -> list[Pair]:
    """Every preference pair in `paths` (jsonl files, .gz too, in any of `SHAPES`; feedback files and dirs).

    HH-RLHF holds a few pairs whose transcripts differ before their last turn (5 of 2,312 in harmless-base test):
    with a `skipped` list they are left out and named there ("file:line: why"); without one they are errors."""
    pairs: list[Pair] = []
    for path in map(Path, paths):
        if path.is_dir():
            pairs += _feedback_pairs(path)
            continue
        lines = _read_lines(path)
        if _is_feedback(lines):
            pairs += _feedback_pairs(path)
            continue
        for lineno, line in lines:
            try:
                pairs.append(pair_of(json.loads(line), f"{path}:{lineno}"))
            except Diverged as e:
                if skipped is None:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
                skipped.append(f"{path}:{lineno}: {e}")
            except ValueError as e:
                kind = "not valid JSON: " if isinstance(e, json.JSONDecodeError) else ""
                raise ValueError(f"{path}:{lineno}: {kind}{e}") from None
    if not pairs:
        raise ValueError(f"no preference pairs in {', '.join(map(str, paths)) or 'no files'}; pass jsonl files "
                         f"shaped like {SHAPES[0]}, HH-RLHF files, or feedback dirs")
    return pairs


def pair_of(record: Any, name: str = "") -> Pair:
    """The Pair of one record of `SHAPES` (not feedback); ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}; accepted: {'; '.join(SHAPES)}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)} (keys: {', '.join(sorted(record)) or 'none'}); "
                         f"accepted: {'; '.join(SHAPES)}")
    if "messages" in record or "prompt" in record:
        if "messages" in record:
            messages = record["messages"]
            check_messages(messages)
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        else:
            if not isinstance(record["prompt"], str):
                raise ValueError(f"'prompt' is {type(record['prompt']).__name__}, not a string")
            messages = [{"role": "user", "content": record["prompt"]}]
        chosen, rejected = _reply(record, "chosen"), _reply(record, "rejected")
    elif isinstance(record["chosen"], str) and isinstance(record["rejected"], str):
        messages, chosen, rejected = hh_pair(record["chosen"], record["rejected"])
    else:
        raise ValueError("no 'prompt' or 'messages' field, and 'chosen'/'rejected' are not HH-RLHF transcripts; "
                         f"accepted: {'; '.join(SHAPES)}")
    return checked(Pair(name, messages, chosen, rejected))


def checked(pair: Pair) -> Pair:
    """`pair` if it can teach a preference; ValueError saying why not (empty prompt, identical replies, ...)."""
    if not pair.messages or pair.messages[-1]["role"] != "user":
        raise ValueError("the conversation must end with the user's turn that the replies answer")
    if not pair.messages[-1]["content"].strip():
        raise ValueError("the prompt is empty; a pair needs the question its replies answer")
    if not pair.chosen.strip() and not pair.rejected.strip():
        raise ValueError("'chosen' and 'rejected' are both empty")
    if pair.chosen == pair.rejected:
        raise ValueError("'chosen' and 'rejected' are the same reply; a preference needs two different ones")
    return pair


def _reply(record: dict, key: str) -> str:
    value = record[key]
    if isinstance(value, list):  # TRL's conversational form: [{"role": "assistant", "content": ...}]
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant" \
                or not isinstance(value[0].get("content"), str):
            raise ValueError(f"'{key}' as a list must hold exactly one assistant message, got {str(value)[:60]}")
        return value[0]["content"]
    if not isinstance(value, str):
        raise ValueError(f"'{key}' is {type(value).__name__}, not a string")
    return value


_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_transcript(text: str) -> list[dict[str, str]]:
    """Messages of an HH-RLHF transcript "\\n\\nHuman: ...\\n\\nAssistant: ..."; ValueError if it does not parse."""
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"not an HH-RLHF transcript (it must start with '\\n\\nHuman: '): {text[:60]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])]


def hh_pair(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen reply, rejected reply) of two HH-RLHF transcripts that share all but their last
    assistant turn."""
    a, b = parse_transcript(chosen), parse_transcript(rejected)
    for name, t in (("chosen", a), ("rejected", b)):
        if t[-1]["role"] != "assistant":
            raise ValueError(f"the {name} transcript does not end with an Assistant turn")
    if a[:-1] != b[:-1]:
        turn = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)) - 1)
        raise Diverged(f"the chosen and rejected transcripts differ before their last turn (at turn {turn + 1}); "
                       f"a pair must share its prompt")
    return a[:-1], a[-1]["content"], b[-1]["content"]


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a jsonl file (.gz too)."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file or directory; pass jsonl files of preference pairs or feedback dirs")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8; re-encode the file as UTF-8") from None
    return [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _is_feedback(lines: list[tuple[int, str]]) -> bool:
    try:
        first = json.loads(lines[0][1]) if lines else None
    except json.JSONDecodeError:
        return False
    return isinstance(first, dict) and "kind" in first


def _feedback_pairs(path: Path) -> list[Pair]:
    records = read_feedback([path])  # raises "file:line: what is wrong"
    pairs = []
    for p in preference_pairs(records):
        pair = Pair(f"{path} ({p.source}, {p.time})", [dict(m) for m in p.messages], p.chosen, p.rejected)
        try:
            pairs.append(checked(pair))
        except ValueError as e:
            raise ValueError(f"{pair.name}: {e}") from None
    if records and not pairs:
        raise ValueError(f"{path}: {len(records)} feedback record(s) but no preference pair: /prefer a reply, or "
                         f"rate two different replies to one conversation /good and /bad")
    return pairs


def load_prompts(paths: Sequence[str | Path]) -> list[list[dict[str, str]]]:
    """Conversations to sample replies to (PPO/GRPO): from preference files and feedback (their prompts) or any
    chat data (each record's messages up to its last user turn). A record with no user turn is an error."""
    prompts: list[list[dict[str, str]]] = []
    for path in map(Path, paths):
        if path.is_dir():
            prompts += [p.messages for p in _feedback_pairs(path)]
            continue
        lines = _read_lines(path)
        if _is_feedback(lines):
            prompts += [list(map(dict, r.messages)) for r in read_feedback([path])]
            continue
        for lineno, line in lines:
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
                if isinstance(record, dict) and "chosen" in record and "rejected" in record:
                    try:
                        messages = pair_of(record, where).messages
                    except Diverged:  # the chosen transcript's own prompt serves
                        messages = parse_transcript(record["chosen"])[:-1]
                else:
                    messages = record_messages(record)
            except ValueError as e:
                kind = "not valid JSON: " if isinstance(e, json.JSONDecodeError) else ""
                raise ValueError(f"{where}: {kind}{e}") from None
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last_user is None or not messages[last_user]["content"].strip():
                raise ValueError(f"{where}: no user turn with text to answer; a prompt needs a question")
            prompts.append(messages[:last_user + 1])
    if not prompts:
        raise ValueError(f"no prompts in {', '.join(map(str, paths)) or 'no files'}")
    return prompts


def split(items: Sequence[Any], val_fraction: float, *, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held out): round(n * val_fraction) items (at least one if val_fraction > 0), chosen by a hash of
    (seed, content), so the split depends on what the items say, not on their order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction is {val_fraction} but must be at least 0 and below 1")
    n = len(items)
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"{n} items leave none for training with val_fraction={val_fraction}; add data or lower it")

    def key(i: int) -> bytes:
        item = items[i]
        text = f"{seed}:" + json.dumps([item.messages, item.chosen, item.rejected] if isinstance(item, Pair) else item,
                                       sort_keys=True, ensure_ascii=False)
        return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest() + i.to_bytes(8, "little")

    held = set(sorted(range(n), key=key)[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def fingerprint(items: Sequence[Any]) -> str:
    """A content hash of pairs or prompts (what --resume checks the data against)."""
    rows = [[p.messages, p.chosen, p.rejected] if isinstance(p, Pair) else p for p in items]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


# ---- rendering ----

def render_reply(fmt: ChatFormat, messages: list[dict[str, str]], reply: str) -> tuple[list[int], int]:
    """(ids of the conversation with `reply` as the assistant's answer and its end of turn, index of the reply's
    first token): the tokens from that index on are the ones a preference loss scores."""
    prompt = fmt.prompt(messages)
    ids, _ = fmt.render([*messages, {"role": "assistant", "content": reply}])
    if ids[:len(prompt)] != prompt:
        raise ValueError("the chat format renders the prompt differently once a reply follows it, so the reply's "
                         "tokens cannot be told apart; use yunque's chat format")
    return ids, len(prompt)


def _keep_end(ids: list[int], start: int, limit: int) -> tuple[np.ndarray, int]:
    """(ids, start of the reply) cut to `limit` tokens: the prompt's oldest tokens go first (one prompt token stays),
    then the reply's end."""
    if len(ids) > limit:
        cut = min(len(ids) - limit, start - 1)
        ids, start = ids[cut:][:limit], start - cut
    return np.asarray(ids, dtype=np.int64), start


class PairBatches:
    """Rendered pairs as (x, y) batches: rows 0..B-1 the chosen replies, rows B..2B-1 the rejected ones, targets
    IGNORE everywhere but the reply's tokens (and its end of turn). A conversation longer than the context loses
    its prompt's oldest tokens first (the reply and the turns just before it matter most; TRL's "keep_end"), and
    only a reply longer than the context is cut at its end; both are counted in `truncated`."""

    def __init__(self, fmt: ChatFormat, pairs: Sequence[Pair], *, max_seq_len: int) -> None:
        self.max_seq_len = max_seq_len
        tok = fmt.tokenizer
        self.pad_id = tok.pad_id if tok.pad_id is not None else 0
        self.pairs: list[Pair] = []
        self.rows: list[tuple[tuple[np.ndarray, int], tuple[np.ndarray, int]]] = []
        self.truncated = 0
        limit = max_seq_len + 1  # inputs and their targets
        for pair in pairs:
            try:
                both = [render_reply(fmt, pair.messages, r) for r in (pair.chosen, pair.rejected)]
            except ValueError as e:
                raise ValueError(f"{pair.name}: {e}") from None
            self.truncated += any(len(ids) > limit for ids, _ in both)
            self.pairs.append(pair)
            self.rows.append(tuple(_keep_end(ids, start, limit) for ids, start in both))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def mean_len(self) -> float:
        return float(np.mean([len(c) + len(r) - 2 for (c, _), (r, _) in self.rows])) if self.rows else 0.0

    def summary(self) -> str:
        cut = f", {self.truncated} cut to {self.max_seq_len} tokens" if self.truncated else ""
        return f"{len(self.rows)} pairs{cut}"

    def indices(self, batch_size: int, *, seed: int, step: int) -> list[int]:
        """Pairs of training batch `step`: an endless sequence of epochs, each a permutation from (seed, epoch)."""
        n = len(self.rows)
        positions = np.arange(step * batch_size, (step + 1) * batch_size)
        perms = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(positions // n)}
        return [int(perms[p // n][p % n]) for p in positions]

    def collate(self, index: Sequence[int], groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (2B, T): chosen rows first, then rejected, right-padded to the longest. With `groups` g,
        the pairs split into g consecutive groups and each group's chosen-then-rejected rows follow the previous
        group's: under torchrun, process r's rows of the global batch are group r's pairs (see `by_group`)."""
        rows = [self.rows[i][k] for part in by_group(index, groups) for k in (0, 1) for i in part]
        T = max(len(ids) for ids, _ in rows) - 1
        x = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        y = np.full((len(rows), T), IGNORE, dtype=np.int64)
        for b, (ids, start) in enumerate(rows):
            n = len(ids) - 1
            x[b, :n] = ids[:-1]
            y[b, start - 1:n] = ids[start:]  # target t is token t + 1: the reply's tokens from `start` on
        return torch.from_numpy(x), torch.from_numpy(y)

    def collate_full(self, index: Sequence[int], groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (2B, T), last (2B,)): whole sequences, chosen rows first, right-padded, each cut to max_seq_len
        tokens; last is the index of each row's final token (its reply's end of turn), where a reward is read.
        `groups` as in `collate`."""
        rows = [self.rows[i][k][0] for part in by_group(index, groups) for k in (0, 1) for i in part]
        rows = [ids[-self.max_seq_len:] for ids in rows]  # the reply's end is where the reward is read
        ids = np.full((len(rows), max(map(len, rows))), self.pad_id, dtype=np.int64)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = row
        return torch.from_numpy(ids), torch.tensor([len(r) - 1 for r in rows])


def by_group(index: Sequence[int], groups: int) -> list[Sequence[int]]:
    """`index` cut into `groups` equal consecutive parts (pairs per process of a global batch)."""
    if len(index) % groups:
        raise ValueError(f"a batch of {len(index)} pairs does not split over {groups} processes; make the batch a "
                         f"multiple of the number of processes")
    n = len(index) // groups
    return [index[g * n:(g + 1) * n] for g in range(groups)]


def pair_batches(paths: Sequence[str | Path], fmt: ChatFormat, *, max_seq_len: int, val_fraction: float,
                 seed: int) -> tuple[list[Pair], PairBatches, PairBatches | None]:
    """The pairs of `paths` (those left out said in one line), and their training and held-out PairBatches (None
    when nothing is held out); what the reward model and DPO both train on."""
    skipped: list[str] = []
    pairs = load_pairs(paths, skipped)
    if skipped:
        print(left_out(skipped))
    train_pairs, val_pairs = split(pairs, val_fraction, seed=seed)
    train = PairBatches(fmt, train_pairs, max_seq_len=max_seq_len)
    val = PairBatches(fmt, val_pairs, max_seq_len=max_seq_len) if val_pairs else None
    print(f"training on {train.summary()}" + (f"; held out {val.summary()}" if val else ""))
    return pairs, train, val


def left_out(skipped: list[str]) -> str:
    """One line for people about the pairs `load_pairs` left out ("" if none)."""
    if not skipped:
        return ""
    where = ", ".join(s.split(": ", 1)[0] for s in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    return f"left out {len(skipped)} pair(s) whose transcripts differ before their last turn ({where})"


__all__ = ["Pair", "PairBatches", "Diverged", "left_out", "pair_batches", "by_group", "SHAPES", "load_pairs",
           "load_prompts", "pair_of", "parse_transcript", "hh_pair", "render_reply", "split", "fingerprint", "checked"]
