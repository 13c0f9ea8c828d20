"""New outputs that appear whole or not at all, and never replace what a user has without being told to.

Commands that write a dir or a file (`merge`, `import`, `export`, `tokenizer train`) write it under a temporary
sibling name and rename it into place only when it is complete; an existing non-empty output is refused unless
`force`, and even then replaced only once the new one is complete. (Training runs claim their dir through the
stage skeleton instead, which adds resume and a lock: train/run.py.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def check_new(out: str | Path, *, force: bool, inputs: list[str | Path] = ()) -> None:
    """ValueError if `out` exists (a non-empty dir, or a file) and `force` is not given, or if `out` is or holds
    one of `inputs` (which replacing it would destroy)."""
    out = Path(out)
    root = out.resolve()
    for spec in inputs:
        path = Path(spec).resolve()
        if path == root or root in path.parents:
            raise ValueError(f"{out} is where {spec} is read from; choose another output")
    occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if occupied and not force:
        kind = "a model" if (out / "config.json").is_file() else "files" if out.is_dir() else "a file"
        raise ValueError(f"{out} already holds {kind}; pass --force to replace it, or choose another output")


def _partial(out: Path) -> Path:
    return out.with_name(f".{out.name}.yunque-partial-{os.getpid()}")


@contextlib.contextmanager
def new_dir(out: str | Path, *, force: bool = False, inputs: list[str | Path] = ()) -> Iterator[Path]:
    """A fresh temporary dir beside `out` to write into; renamed to `out` when the block ends without error,
    removed when it fails. See `check_new` for what is refused."""
    out = Path(out)
    check_new(out, force=force, inputs=inputs)
    tmp = _partial(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap(tmp, out)


@contextlib.contextmanager
def new_file(out: str | Path, *, force: bool = False, inputs: list[str | Path] = ()) -> Iterator[Path]:
    """A temporary path beside `out` to write one file to; renamed to `out` when the block ends without error."""
    out = Path(out)
    check_new(out, force=force, inputs=inputs)
    if out.is_dir():
        raise ValueError(f"{out} is a directory; pass a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(out)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)


def _swap(tmp: Path, out: Path) -> None:
    """Put `tmp` where `out` is, replacing an old `out` only after the new one is in place."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.yunque-old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


__all__ = ["check_new", "new_dir", "new_file"]
