import gzip
import itertools
import json
import sysconfig
from pathlib import Path

import pytest

from yunque.data import (
    Document,
    SkipReport,
    builtin_corpus_files,
    iter_documents,
)


def test_folder_yields_good_files_and_reports_the_rest(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# héading\r\nbody\r\n", encoding="utf-8", newline="")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\0\0\0data")
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / ".hidden.txt").write_text("never read", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("never read", encoding="utf-8")

    report = SkipReport()
    docs = list(iter_documents([tmp_path], report=report))

    assert docs == [
        Document(str(tmp_path / "a.txt"), "plain text\n"),
        Document(str(tmp_path / "sub" / "b.md"), "# héading\r\nbody\r\n"),  # CRLF kept
    ]
    assert report.total == 3
    assert report.counts == {"empty": 1, "binary": 1, "not_utf8": 1}
    assert report.examples["not_utf8"] == [str(tmp_path / "latin.txt")]
    summary = report.summary()
    assert summary.startswith("skipped 3 files: ")
    assert "1 not UTF-8 (e.g. " in summary and "latin.txt" in summary


def test_summary_orders_by_count():
    report = SkipReport()
    for name in ["a.bin", "b.bin"]:
        report.add("not_utf8", name)
    report.add("empty", "c.txt")
    assert report.summary() == "skipped 3 files: 2 not UTF-8 (e.g. a.bin, b.bin), 1 empty (e.g. c.txt)"
    assert SkipReport().summary() == "skipped no files"


def test_explicit_non_utf8_file_is_an_error(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"ok so far " + "café".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8") as err:
        list(iter_documents([path]))
    assert str(path) in str(err.value)
    assert "offset 13" in str(err.value)
    assert "iconv" in str(err.value)


def test_explicit_file_may_contain_nul(tmp_path):
    path = tmp_path / "nul.txt"
    path.write_bytes(b"a\0b")
    assert [d.text for d in iter_documents([path])] == ["a\0b"]


def test_explicit_empty_file_is_skipped_not_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    report = SkipReport()
    assert list(iter_documents([path], report=report)) == []
    assert report.counts == {"empty": 1}


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory; check the --data path"):
        list(iter_documents([tmp_path / "nope"]))


def test_bom_is_stripped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello")
    assert [d.text for d in iter_documents([path])] == ["hello"]


def test_gzip_text_file(tmp_path):
    path = tmp_path / "notes.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write("compressed ünïcode\n".encode())
    assert list(iter_documents([path])) == [Document(str(path), "compressed ünïcode\n")]
    assert list(iter_documents(str(path))) == [Document(str(path), "compressed ünïcode\n")]  # a lone path


def _write_jsonl(path: Path, lines: list[str]) -> None:
    data = "\n".join(lines).encode("utf-8") + b"\n"
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz"])
def test_jsonl_one_document_per_line(tmp_path, name):
    path = tmp_path / name
    _write_jsonl(path, [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "third"})])
    docs = list(iter_documents([path]))
    assert docs == [Document(f"{path}:1", "first"), Document(f"{path}:3", "third")]


def test_jsonl_custom_field(tmp_path):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [json.dumps({"content": "x"})])
    assert [d.text for d in iter_documents([path], text_field="content")] == ["x"]


def test_jsonl_malformed_line(tmp_path):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [json.dumps({"text": "ok"}), "{not json"])
    with pytest.raises(ValueError, match="not valid JSON") as err:
        list(iter_documents([path]))
    assert f"{path}:2" in str(err.value)


def test_jsonl_missing_field(tmp_path):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [json.dumps({"body": "no text here"})])
    with pytest.raises(ValueError, match=r"no 'text' field; pass --text-field") as err:
        list(iter_documents([path]))
    assert f"{path}:1" in str(err.value)


def test_builtin_corpus_files():
    files = builtin_corpus_files()
    assert files and files == sorted(files)
    posix = [f.as_posix() for f in files]
    assert any(p.endswith("/json/__init__.py") for p in posix)
    excluded = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert not any(excluded & set(f.relative_to(stdlib).parts[:-1]) for f in files)


def test_builtin_documents_start_with_pydoc_topics():
    docs = list(itertools.islice(iter_documents(None), 3))
    assert all(d.name.startswith("pydoc:") and d.text for d in docs)
