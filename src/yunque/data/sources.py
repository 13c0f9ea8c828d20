"""Where text comes from: the built-in corpus, text files, folders and jsonl files.

Every source yields `Document`s. Inputs that cannot be used (empty, binary, not UTF-8, unreadable) are skipped
inside folders and counted in a `SkipReport`; a file named explicitly that is unusable is an error instead,
because the user asked for it by name.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_PYDOC_TOPICS = Path("pydoc_data") / "topics.py"
_BINARY_PROBE = 8192  # bytes inspected for NUL when deciding whether a file in a folder is binary
_MAX_EXAMPLES = 3
_REASON_WORDS = {"not_utf8": "not UTF-8"}


@dataclass(frozen=True)
class Document:
    """One unit of text; the train/validation split is decided per document, by name."""

    name: str
    """Where the text came from: a path, `file:lineno` for a jsonl record, or `pydoc:<topic>`."""
    text: str
    """The text, exactly as stored (a leading UTF-8 BOM removed, line endings kept)."""


@dataclass
class SkipReport:
    """Inputs that were skipped, counted by reason ("empty", "binary", "not_utf8", "unreadable")."""

    counts: dict[str, int] = field(default_factory=dict)
    """Number of skipped inputs per reason."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """The first few skipped names per reason."""

    def add(self, reason: str, name: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        names = self.examples.setdefault(reason, [])
        if len(names) < _MAX_EXAMPLES:
            names.append(name)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line for people, e.g. "skipped 3 files: 2 not UTF-8 (e.g. a.bin, b.bin), 1 empty (e.g. c.txt)"."""
        if not self.total:
            return "skipped no files"
        noun = "file" if self.total == 1 else "files"
        parts = [
            f"{n} {_REASON_WORDS.get(reason, reason)} (e.g. {', '.join(self.examples[reason])})"
            for reason, n in sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))
        ]
        return f"skipped {self.total} {noun}: " + ", ".join(parts)


def builtin_corpus_files() -> list[Path]:
    """The built-in corpus: every `*.py` of the Python standard library (no tests, no site-packages), sorted.

    The list includes `pydoc_data/topics.py`, the library reference's prose; `builtin_documents` reads it as
    one document per topic rather than as code.
    """
    stdlib = sysconfig.get_paths().get("stdlib")
    if not stdlib or not Path(stdlib).is_dir():
        raise ValueError(
            f"cannot find the Python standard library (sysconfig stdlib = {stdlib!r}) for the built-in corpus; "
            "pass --data with text files"
        )
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]
        files.extend(Path(root, name) for name in names if name.endswith(".py"))
    return sorted(files)


def builtin_documents(report: SkipReport | None = None) -> Iterator[Document]:
    """The built-in corpus as documents: first the pydoc topics (prose, named `pydoc:<topic>`), then each
    standard-library source file (named by its path relative to the standard library)."""
    report = SkipReport() if report is None else report
    files = builtin_corpus_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions ship the standard library without pydoc_data
        topics = {}
    for key in sorted(topics):
        yield Document(f"pydoc:{key}", topics[key])
    for path in files:
        name = str(path.relative_to(stdlib))
        if Path(name) == _PYDOC_TOPICS and topics:
            continue  # already yielded above, topic by topic
        text = _read_text(path, report, name=name)
        if text is not None:
            yield Document(name, text)


def iter_documents(
    paths: Sequence[str | Path] | str | Path | None,
    *,
    text_field: str = "text",
    report: SkipReport | None = None,
) -> Iterator[Document]:
    """Documents from text files, folders (recursive, sorted, hidden entries skipped), `.jsonl` files (one
    document per line, the text under `text_field`) and `.gz` versions of these; None or [] means the built-in
    corpus. Unusable files inside folders are skipped and counted in `report`."""
    report = SkipReport() if report is None else report
    if not paths:
        yield from builtin_documents(report)
        return
    if isinstance(paths, (str, Path)):  # one path, not a sequence of one-character paths
        paths = [paths]
    for path in map(Path, paths):
        if path.is_dir():
            for file in _walk(path):
                yield from _file_documents(file, text_field, report, explicit=False)
        elif path.exists():
            yield from _file_documents(path, text_field, report, explicit=True)
        else:
            raise ValueError(f"{path}: no such file or directory; check the --data path")


def fingerprint(paths: Sequence[str | Path] | None, *, text_field: str = "text") -> str:
    """sha256 hex of the data `iter_documents(paths)` reads: every file's name (relative to what was passed) and
    bytes, in reading order, and the jsonl text field. Editing, adding or removing a file changes it; moving the
    data elsewhere does not. Reads every byte, at disk speed (the built-in corpus: ~0.3 s)."""
    h = hashlib.sha256(f"text_field={text_field}\0".encode())
    if not paths:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = [(str(p.relative_to(stdlib)), p) for p in builtin_corpus_files()]
    else:
        files = []
        for path in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
            if path.is_dir():
                files += [(str(f.relative_to(path)), f) for f in _walk(path)]
            elif path.exists():
                files.append((path.name, path))
            else:
                raise ValueError(f"{path}: no such file or directory; check the --data path")
    for name, path in files:
        h.update(name.encode("utf-8", "surrogateescape") + b"\0")
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            h.update(b"\0unreadable")
        h.update(b"\0")
    return h.hexdigest()


def _walk(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files.extend(Path(root, name) for name in names if not name.startswith("."))
    return sorted(files, key=lambda p: p.relative_to(folder).parts)


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _file_documents(path: Path, text_field: str, report: SkipReport, *, explicit: bool) -> Iterator[Document]:
    if _is_jsonl(path):
        yield from _jsonl_documents(path, text_field, report)
        return
    text = _read_text(path, report, name=str(path), explicit=explicit)
    if text is not None:
        yield Document(str(path), text)


def _read_text(path: Path, report: SkipReport, *, name: str, explicit: bool = False) -> str | None:
    """The file's text, or None after counting it in `report`; an explicit file that is unreadable or not
    UTF-8 raises instead. NUL bytes are allowed in explicit files (the user vouched for them)."""
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # EOFError: truncated .gz; zlib.error: corrupt .gz
        if explicit:
            hint = "; the .gz file is corrupt or truncated" if path.name.endswith(".gz") else ""
            raise ValueError(f"{path}: cannot read ({err}){hint}") from None
        report.add("unreadable", name)
        return None
    if not explicit and b"\0" in data[:_BINARY_PROBE]:
        report.add("binary", name)
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        if explicit:
            raise ValueError(
                f"{path}: not valid UTF-8 (first bad byte at offset {err.start}); "
                "re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8"
            ) from err
        report.add("not_utf8", name)
        return None
    text = text.removeprefix("\ufeff")
    if not text.strip():  # whitespace alone teaches nothing: an empty input, and an empty corpus if it is all
        report.add("empty", name)
        return None
    return text


def _jsonl_documents(path: Path, text_field: str, report: SkipReport) -> Iterator[Document]:
    try:
        yield from _jsonl_records(path, text_field, report)
    except (OSError, EOFError, zlib.error) as err:  # a .gz cut short or damaged, found while reading
        hint = "; the .gz file is corrupt or truncated" if path.name.endswith(".gz") else ""
        raise ValueError(f"{path}: cannot read ({err}){hint}") from None


def _jsonl_records(path: Path, text_field: str, report: SkipReport) -> Iterator[Document]:
    with _open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{where}: not valid UTF-8 (first bad byte at offset {err.start} of the line); "
                    "re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8"
                ) from err
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from err
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{where}: no '{text_field}' field; pass --text-field")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: '{text_field}' is {type(text).__name__}, not a string")
            if not text:
                report.add("empty", where)
                continue
            yield Document(where, text)
