"""Where a command writes a new output (`import`, `export`, `merge`, `tokenizer train`): never over what exists
unless asked (`force`), never a half-written result. (Training runs claim their dir through the stage skeleton,
train/run.py, which adds resume and a lock.)

A directory output is built under a temporary name beside it (the same filesystem, so the last step is a rename)
and renamed into place only once complete. With `force` the old output is moved aside first and deleted only once
the new one is in place. A failure removes the temporary directory and leaves the old output as it was. (A file
output, the GGUF export, gets the same from `atomic_write`.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from yunque.atomic import fsync_dir

STAGING = ".yunque-tmp"
"""Suffix of the temporary directory an output is built in."""


def check_output(out: str | Path, *, force: bool, sources: tuple[str | Path, ...] = ()) -> None:
    """ValueError unless `out` may be written: it does not exist or is an empty directory, or `force` is given.
    Never the input itself, nor a directory holding it, since replacing `out` would delete it."""
    out = Path(out)
    for source in map(Path, sources):
        if source.resolve() == out.resolve() or out.resolve() in source.resolve().parents:
            raise ValueError(f"{out} holds the input {source}; write the output somewhere else")
    if not (out.exists() or out.is_symlink()) or (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        return
    if not force:
        kind = "a non-empty directory" if out.is_dir() else "a file"
        raise ValueError(f"{out} already exists ({kind}); pass --force to replace it, or choose another output")


@contextmanager
def staged_dir(out: str | Path, *, force: bool, sources: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """A temporary directory beside `out` to write the output into, renamed to `out` when the block completes
    (replacing it if `force`); removed, with `out` untouched, when the block raises."""
    out = Path(out)
    check_output(out, force=force, sources=sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=STAGING, dir=out.parent))
    try:
        yield staging
        fsync_dir(staging)
        check_output(out, force=force, sources=sources)  # again: something may have appeared there meanwhile
        _put_in_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it was renamed into place


def _put_in_place(staging: Path, out: Path) -> None:
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    if out.exists() or out.is_symlink():
        old = staging.with_name(staging.name.removesuffix(STAGING) + ".old" + STAGING)
        os.rename(out, old)  # aside, not deleted, until the new output is in place
        os.rename(staging, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.rename(staging, out)
    fsync_dir(out.parent)


__all__ = ["STAGING", "check_output", "staged_dir"]
