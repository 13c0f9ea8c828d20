"""What people say about replies, kept as training data: the one format that `yunque chat` (/good, /bad, /prefer)
and the chat page write, and that the alignment stage reads.

A feedback file is jsonl, one judgment a line, appended under `yunque_home()/feedback/` in a file a day
(`YYYY-MM-DD.jsonl`). Two kinds of line:

    {"kind": "rating", "model": M, "messages": [...], "reply": "...", "rating": 1 | -1, "source": S, "time": T}
    {"kind": "preference", "model": M, "messages": [...], "chosen": "...", "rejected": "...", "source": S, "time": T}

`messages` is the conversation the reply answers (system, user and assistant turns, the user's last), `source`
says who wrote it ("chat", "page"), `time` is ISO 8601 UTC. Ratings of two different replies to the same
conversation, one up and one down, make a preference pair too (`preference_pairs`); ratings alone stay available
for methods that learn from thumbs (KTO-style).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from yunque.paths import yunque_home

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Rating:
    """A thumbs up (+1) or down (-1) on one reply."""
    model: str
    messages: tuple[dict, ...]
    reply: str
    rating: int
    source: str = "chat"
    time: str = ""


@dataclass(frozen=True)
class Preference:
    """Of two replies to the same conversation, the one a person preferred."""
    model: str
    messages: tuple[dict, ...]
    chosen: str
    rejected: str
    source: str = "chat"
    time: str = ""


def feedback_dir(home: Path | None = None) -> Path:
    """Where feedback files go: `home/feedback` (default: `yunque_home()/feedback`)."""
    return (home or yunque_home()) / "feedback"


def rate(model: str, messages: Iterable[dict], reply: str, rating: int, *, source: str = "chat") -> Rating:
    """A checked rating, stamped with the current time."""
    return _check(Rating(model, tuple(messages), reply, rating, source, _now()))


def prefer(model: str, messages: Iterable[dict], chosen: str, rejected: str, *, source: str = "chat") -> Preference:
    """A checked preference, stamped with the current time."""
    return _check(Preference(model, tuple(messages), chosen, rejected, source, _now()))


def append(record: Rating | Preference, directory: Path | None = None) -> Path:
    """Append one record as a line to today's file under `directory` (default `feedback_dir()`); return the file.

    Writers in other processes (the server, a terminal chat) may append at the same moment: each line is written
    whole under an exclusive lock and fsynced, so no line is lost or interleaved.
    """
    _check(record)
    directory = Path(directory) if directory is not None else feedback_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{(record.time or _now())[:10]}.jsonl"
    line = json.dumps(_to_json(record), ensure_ascii=False) + "\n"
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            _drop_cut_line(f)
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return path


def _drop_cut_line(f) -> None:
    """Truncate a last line that a killed writer left without its newline (under the lock, nobody is writing it)."""
    end = f.seek(0, os.SEEK_END)
    pos = end
    while pos > 0:
        start = max(0, pos - 65536)
        os.lseek(f.fileno(), start, os.SEEK_SET)
        chunk = os.read(f.fileno(), pos - start)
        if pos == end and chunk.endswith(b"\n"):
            return
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            f.truncate(start + newline + 1)
            return
        pos = start
    f.truncate(0)


def read_feedback(paths: Iterable[str | Path]) -> list[Rating | Preference]:
    """Every record in the given files and directories (their *.jsonl files, in name order).

    A bad line raises ValueError "file:line: what is wrong"; a last line cut short by a kill (no newline) is
    skipped, and the next `append` drops it.
    """
    records: list[Rating | Preference] = []
    for path in _files(paths):
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            cut = number == len(lines) and not text.endswith("\n")
            try:
                records.append(_from_json(json.loads(line)))
            except json.JSONDecodeError:
                if cut:
                    continue
                raise ValueError(f"{path}:{number}: not a JSON object; fix or delete the line") from None
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
    return records


def preference_pairs(records: Iterable[Rating | Preference]) -> list[Preference]:
    """Preferences as given, plus one pair for every (up, down) couple of ratings of different replies to the
    same conversation, in the order the records came."""
    pairs = [r for r in records if isinstance(r, Preference)]
    by_conversation: dict[str, dict[int, list[Rating]]] = {}
    for r in records:
        if isinstance(r, Rating):
            key = json.dumps(r.messages, sort_keys=True, ensure_ascii=False)
            by_conversation.setdefault(key, {1: [], -1: []})[r.rating].append(r)
    for ratings in by_conversation.values():
        for good in ratings[1]:
            for bad in ratings[-1]:
                if good.reply != bad.reply:
                    pairs.append(Preference(good.model, good.messages, good.reply, bad.reply, good.source, good.time))
    return pairs


def _files(paths: Iterable[str | Path]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"feedback path {p} does not exist; give a feedback .jsonl file or a directory of them")
    return files


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check(record: Rating | Preference) -> Rating | Preference:
    if not isinstance(record.model, str) or not record.model:
        raise ValueError("'model' must be a non-empty string")
    if not record.messages:
        raise ValueError("'messages' is empty; a judgment needs the conversation it answers")
    for m in record.messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs a role ({', '.join(ROLES)}) and a string content, got {m!r:.80}")
    if record.messages[-1]["role"] != "user":
        raise ValueError("the conversation must end with the user's turn that the reply answers")
    if isinstance(record, Rating):
        if record.rating not in (1, -1):
            raise ValueError(f"'rating' must be 1 (good) or -1 (bad), got {record.rating!r}")
        if not isinstance(record.reply, str):
            raise ValueError("'reply' must be a string")
    else:
        if not isinstance(record.chosen, str) or not isinstance(record.rejected, str):
            raise ValueError("'chosen' and 'rejected' must be strings")
        if record.chosen == record.rejected:
            raise ValueError("'chosen' and 'rejected' are the same reply; a preference needs two different ones")
    return record


def _to_json(record: Rating | Preference) -> dict:
    kind = "rating" if isinstance(record, Rating) else "preference"
    return {"kind": kind, **asdict(record), "messages": [dict(m) for m in record.messages]}


def _from_json(obj: object) -> Rating | Preference:
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    kinds = {"rating": Rating, "preference": Preference}
    cls = kinds.get(obj.get("kind"))
    if cls is None:
        raise ValueError(f"'kind' must be 'rating' or 'preference', got {obj.get('kind')!r}")
    fields = [f for f in cls.__dataclass_fields__ if f not in ("source", "time")]
    missing = [f for f in fields if f not in obj]
    if missing:
        raise ValueError(f"missing field(s): {', '.join(missing)}")
    if not isinstance(obj["messages"], list):
        raise ValueError("'messages' must be a list of {role, content} objects")
    values = {f: obj[f] for f in cls.__dataclass_fields__ if f in obj}
    return _check(cls(**{**values, "messages": tuple(obj["messages"])}))
