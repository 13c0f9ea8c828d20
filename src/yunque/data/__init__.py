"""Text in, token batches out: sources -> shards -> loaders."""

from yunque.data.loaders import TokenWindows
from yunque.data.shards import build_shards, load_manifest, open_split, shards_match
from yunque.data.sources import Document, SkipReport, builtin_corpus_files, builtin_documents, iter_documents

__all__ = [
    "Document",
    "SkipReport",
    "TokenWindows",
    "build_shards",
    "builtin_corpus_files",
    "builtin_documents",
    "iter_documents",
    "load_manifest",
    "open_split",
    "shards_match",
]
