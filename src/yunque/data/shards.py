"""Tokenize once into memory-mapped token shards with a manifest.

A shard directory holds:

    train_000.bin, train_001.bin, ...   token ids, raw little-endian uint16 (vocab_size <= 65536) or uint32;
    val_000.bin, ...                    documents concatenated, each as [bos] + ids (or ids + [eos] without a BOS)
    manifest.json                       written last, atomically: if it exists, the shards are complete

The split into train and validation is by document and depends only on (seed, document name), so the same
corpus and seed always give the same split. A document longer than `part_chars` (a single-file corpus such as
Tiny Shakespeare) is cut at line boundaries into parts that are split like documents, so it still gets a
validation share; only its first part carries the BOS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from yunque.data.sources import Document, SkipReport

MANIFEST = "manifest.json"
VERSION = 1
SPLITS = ("train", "val")
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def build_shards(
    documents: Iterable[Document],
    tokenizer: Any,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    shard_tokens: int = 2**26,
    batch_docs: int = 512,
    progress: bool = False,
    source: str = "",
    report: SkipReport | None = None,
    part_chars: int = 1 << 16,
) -> dict:
    """Tokenize `documents` into train/val shards under `out_dir` and return the manifest.

    With two or more documents both splits get at least one. `source` is stored in the manifest for
    `shards_match`; `report` (filled while `documents` is consumed) is stored under "skipped".
    Any shards and manifest already in `out_dir` are replaced.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction is {val_fraction} but must be between 0 and 1")
    if shard_tokens < 1 or batch_docs < 1:
        raise ValueError(f"shard_tokens ({shard_tokens}) and batch_docs ({batch_docs}) must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_old_build(out)
    dtype_name = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    splits = {name: _Split(_ShardWriter(out, name, _DTYPES[dtype_name], shard_tokens)) for name in SPLITS}

    total = len(documents) if isinstance(documents, Sized) else None
    docs = tqdm(documents, total=total, unit="doc", desc="tokenizing", disable=not progress)
    parts = (part for doc in docs if doc.text for part in _parts(doc, part_chars))
    for batch in _batches(parts, batch_docs):
        for (doc, first, last), ids in zip(batch, tokenizer.encode_batch([doc.text for doc, _, _ in batch])):
            ids = _frame(ids, tokenizer.bos_id, tokenizer.eos_id, first=first, last=last)
            split = "val" if _in_val(doc.name, seed, val_fraction) else "train"
            splits[split].add(np.asarray(ids, dtype=_DTYPES[dtype_name]), len(doc.text.encode("utf-8")))

    train, val = splits["train"], splits["val"]
    if train.documents + val.documents == 0:
        skipped = f" ({report.summary()})" if report is not None and report.total else ""
        raise ValueError(f"the corpus is empty: no document has any text{skipped}; pass --data with text files")
    if train.documents == 0:
        train.add(*val.take_last())
    elif val.documents == 0 and train.documents >= 2:
        val.add(*train.take_last())

    manifest = {
        "version": VERSION,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype_name,
        "seed": seed,
        "val_fraction": val_fraction,
        "source": source,
        "splits": {name: split.finish() for name, split in splits.items()},
        "skipped": dataclasses.asdict(report) if report is not None else {},
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    return manifest


def load_manifest(dir: str | Path) -> dict:
    """The manifest of a complete shard directory; ValueError if it is missing or corrupt."""
    path = Path(dir) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{path}: not found; build the shards first (an interrupted build leaves no manifest: "
            f"delete {dir} and rebuild)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: corrupt ({err}); delete {dir} to rebuild the shards") from err
    required = ("tokenizer_fingerprint", "vocab_size", "dtype", "seed", "val_fraction", "splits")
    if (
        not isinstance(manifest, dict)
        or manifest.get("version") != VERSION
        or any(key not in manifest for key in required)
        or manifest["dtype"] not in _DTYPES
        or any(split not in manifest["splits"] for split in SPLITS)
    ):
        raise ValueError(f"{path}: not a version {VERSION} shard manifest; delete {dir} to rebuild the shards")
    return manifest


def open_split(dir: str | Path, split: str) -> list[np.memmap]:
    """Read-only memory maps of the shards of `split` ("train" or "val"), one 1-D array per shard."""
    manifest = load_manifest(dir)
    dtype = _DTYPES[manifest["dtype"]]
    return [
        np.memmap(path, dtype=dtype, mode="r", shape=(tokens,))
        for path, tokens in _checked_shards(Path(dir), manifest, split)
    ]


def shards_match(
    dir: str | Path, tokenizer: Any, seed: int, val_fraction: float, *, source: str = ""
) -> bool:
    """True if `dir` holds complete shards built with this tokenizer, seed, val_fraction and source, so the
    caller can reuse them instead of tokenizing again.

    Whether the text itself changed is the caller's decision: describe the data in `source` (e.g. the --data
    paths, or a hash of their names, sizes and mtimes) and pass the same string to `build_shards`.
    """
    try:
        manifest = load_manifest(dir)
        for split in SPLITS:
            _checked_shards(Path(dir), manifest, split)
    except ValueError:
        return False
    return (
        manifest["tokenizer_fingerprint"] == tokenizer.fingerprint()
        and manifest["vocab_size"] == tokenizer.vocab_size
        and manifest["seed"] == seed
        and manifest["val_fraction"] == val_fraction
        and manifest.get("source", "") == source
    )


def _checked_shards(dir: Path, manifest: dict, split: str) -> list[tuple[Path, int]]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    itemsize = _DTYPES[manifest["dtype"]].itemsize
    shards = []
    for shard in manifest["splits"][split]["shards"]:
        path, tokens = dir / shard["file"], shard["tokens"]
        size = path.stat().st_size if path.is_file() else None
        if size != tokens * itemsize:
            found = "no file" if size is None else f"{size} bytes"
            raise ValueError(
                f"{path}: expected {tokens * itemsize} bytes ({tokens} tokens) but found {found}; "
                f"the shards are incomplete or damaged: delete {dir} to rebuild them"
            )
        shards.append((path, tokens))
    return shards


def _remove_old_build(out: Path) -> None:
    (out / MANIFEST).unlink(missing_ok=True)  # first, so a crash below never leaves a manifest over new files
    for split in SPLITS:
        for path in out.glob(f"{split}_*.bin*"):
            path.unlink()


def _parts(doc: Document, part_chars: int) -> Iterator[tuple[Document, bool, bool]]:
    """(part, is_first, is_last) pieces of a document, each about part_chars long, cut after a newline where
    possible."""
    text, start, k = doc.text, 0, 0
    while start < len(text):
        end = len(text) if len(text) - start <= part_chars else start + part_chars
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        name = doc.name if start == 0 and end == len(text) else f"{doc.name}#{k}"
        yield Document(name, text[start:end]), k == 0, end == len(text)
        start, k = end, k + 1


def _frame(ids: list[int], bos_id: int | None, eos_id: int | None, *, first: bool = True,
           last: bool = True) -> list[int]:
    """Mark the document boundary: BOS in front of its first part, else EOS behind its last, else nothing."""
    if bos_id is not None:
        return [bos_id, *ids] if first else list(ids)
    if eos_id is not None:
        return [*ids, eos_id] if last else list(ids)
    return list(ids)


def held_out(documents: Iterable[Document], *, seed: int, val_fraction: float,
             part_chars: int = 1 << 16) -> Iterator[Document]:
    """The documents (parts of long ones) that `build_shards` with this seed and val_fraction puts in the validation
    split: text that a model trained on the shards' training split has not seen. (Not so where build_shards had
    to move a document between splits because one came out empty: a corpus of a handful of documents.)"""
    for doc in documents:
        for part, _, _ in _parts(doc, part_chars) if doc.text else ():
            if _in_val(part.name, seed, val_fraction):
                yield part


def _in_val(name: str, seed: int, val_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _batches(items: Iterable[Document], n: int) -> Iterator[list[Document]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class _Split:
    """Documents of one split on their way to disk. The last document is held back until `finish`, so that
    it can still move to the other split if that one would otherwise be empty."""

    def __init__(self, writer: _ShardWriter) -> None:
        self.writer = writer
        self.documents = 0
        self.bytes = 0
        self._last: tuple[np.ndarray, int] | None = None

    def add(self, ids: np.ndarray, n_bytes: int) -> None:
        if self._last is not None:
            self.writer.write(self._last[0])
        self._last = (ids, n_bytes)
        self.documents += 1
        self.bytes += n_bytes

    def take_last(self) -> tuple[np.ndarray, int]:
        assert self._last is not None, "take_last on an empty split"
        last, self._last = self._last, None
        self.documents -= 1
        self.bytes -= last[1]
        return last

    def finish(self) -> dict:
        if self._last is not None:
            self.writer.write(self._last[0])
            self._last = None
        self.writer.close()
        tokens = sum(shard["tokens"] for shard in self.writer.shards)
        return {"documents": self.documents, "tokens": tokens, "bytes": self.bytes, "shards": self.writer.shards}


class _ShardWriter:
    """Appends token ids to `<split>_000.bin`, `<split>_001.bin`, ..., a new file every `shard_tokens` tokens.
    Each file is written under a `.tmp` name and renamed when full or closed."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._room = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._room == 0:
                self._start_shard()
            n = min(self._room, len(ids))
            self._file.write(ids[:n].astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += n
            self._room -= n
            ids = ids[n:]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            os.replace(self._file.name, self.out / self.shards[-1]["file"])
            self._file = None

    def _start_shard(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = open(self.out / (name + ".tmp"), "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._room = self.shard_tokens
