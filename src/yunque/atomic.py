"""Atomic writes of one file or of files that belong together, with a journal so a kill at any moment recovers.

Each file is written in full under a temporary name (`NAME.yunque-tmp`) and fsynced. For a group, a journal listing the
renames is then written (itself atomically); the renames follow, and the journal is removed last. `recover(dir)`
finishes the renames of a journal left by a kill (its temporary files are complete: they were fsynced before the
journal existed), or, without a journal, deletes temporary files left by a kill during the writes. Either way the
group is all old or all new: never a mix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

JOURNAL = ".renames.json"
"""The journal of a group write in progress, in the directory of its files."""
TMP = ".yunque-tmp"
"""Suffix of files being written: distinctive, so that `recover` deletes only files of ours."""


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, write: Callable[[Path], None]) -> Path:
    tmp = path.with_name(path.name + TMP)
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    return tmp


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write a file through `write(tmp_path)`, fsync it and rename it into place, so a crash leaves the old file."""
    path = Path(path)
    try:
        tmp = _write_synced(path, write)
    except BaseException:
        path.with_name(path.name + TMP).unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def atomic_write_all(files: list[tuple[str | Path, Callable[[Path], None]]]) -> None:
    """`atomic_write` for files of one directory that belong together (weights and training state): all of them
    are written and fsynced under temporary names before any is renamed, and a journal makes the renames
    all-or-nothing across a kill (see `recover`)."""
    paths = [Path(p) for p, _ in files]
    folder = paths[0].parent
    if any(p.parent != folder for p in paths):
        raise ValueError(f"atomic_write_all writes files of one directory, got {', '.join(map(str, paths))}")
    recover(folder)
    tmps = []
    try:
        for path, (_, write) in zip(paths, files):
            tmps.append(_write_synced(path, write))
    except BaseException:
        for tmp in tmps + [p.with_name(p.name + TMP) for p in paths]:
            tmp.unlink(missing_ok=True)
        raise
    journal = [[tmp.name, path.name] for tmp, path in zip(tmps, paths)]
    atomic_write(folder / JOURNAL, lambda p: Path(p).write_text(json.dumps(journal), encoding="utf-8"))
    _finish(folder, journal)


def _finish(folder: Path, journal: list[list[str]]) -> None:
    for tmp, name in journal:
        if (folder / tmp).exists():
            os.replace(folder / tmp, folder / name)
    fsync_dir(folder)
    (folder / JOURNAL).unlink(missing_ok=True)
    fsync_dir(folder)


def recover(folder: str | Path) -> bool:
    """Finish a group write that a kill interrupted after its journal was written, and delete temporary files
    of writes that never got that far. Returns True if a journal was finished."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    finished = False
    journal_path = folder / JOURNAL
    if journal_path.is_file():
        try:
            journal = json.loads(journal_path.read_text(encoding="utf-8"))
            ok = isinstance(journal, list) and all(isinstance(r, list) and len(r) == 2 for r in journal)
        except (ValueError, UnicodeDecodeError):
            ok = False
        if ok:
            _finish(folder, journal)
            finished = True
        else:  # cannot happen through atomic_write (the journal is renamed into place whole); be safe anyway
            journal_path.unlink()
    for tmp in folder.glob("*" + TMP):
        if tmp.is_file():
            tmp.unlink()
    return finished


__all__ = ["atomic_write", "atomic_write_all", "atomic_write_text", "recover", "fsync_dir", "JOURNAL"]
