import json

import numpy as np
import pytest

from yunque.data import (
    Document,
    SkipReport,
    build_shards,
    iter_documents,
    load_manifest,
    open_split,
    shards_match,
)
from yunque.tokenizer.bpe import byte_tokenizer

TEXTS = ["hello world", "ünïcode ✓ text", "line one\r\nline two\n", "a", "tabs\tand spaces  ", "ZZZ"]
DOCS = [Document(f"doc{i}.txt", text) for i, text in enumerate(TEXTS * 4)]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _decoded_docs(tok, out, split):
    """Texts of a split's documents, recovered from the shards by cutting at each BOS."""
    ids = [i for shard in open_split(out, split) for i in shard.tolist()]
    docs, current = [], None
    for i in ids:
        if i == tok.bos_id:
            if current is not None:
                docs.append(tok.decode(current))
            current = []
        else:
            current.append(i)
    if current is not None:
        docs.append(tok.decode(current))
    return docs


def test_shards_decode_back_to_the_documents(tmp_path, tok):
    manifest = build_shards(DOCS, tok, tmp_path, val_fraction=0.3, seed=1, shard_tokens=37, batch_docs=5)
    train, val = _decoded_docs(tok, tmp_path, "train"), _decoded_docs(tok, tmp_path, "val")
    assert sorted(train + val) == sorted(d.text for d in DOCS)
    assert len(manifest["splits"]["train"]["shards"]) > 1  # shard_tokens=37 forces several files
    assert all(s["tokens"] <= 37 for s in manifest["splits"]["train"]["shards"])


def test_manifest_counts_and_dtype(tmp_path, tok):
    report = SkipReport()
    report.add("empty", "e.txt")
    manifest = build_shards(DOCS, tok, tmp_path, val_fraction=0.3, seed=1, source="unit", report=report)
    assert manifest == load_manifest(tmp_path)
    assert manifest["version"] == 1
    assert manifest["dtype"] == "uint16"
    assert manifest["vocab_size"] == tok.vocab_size
    assert manifest["tokenizer_fingerprint"] == tok.fingerprint()
    assert manifest["source"] == "unit"
    assert manifest["skipped"]["counts"] == {"empty": 1}
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["documents"] + val["documents"] == len(DOCS)
    n_bytes = sum(len(d.text.encode("utf-8")) for d in DOCS)
    assert train["bytes"] + val["bytes"] == n_bytes
    assert train["tokens"] + val["tokens"] == n_bytes + len(DOCS)  # byte tokenizer: one id per byte, plus BOS
    for split in ("train", "val"):
        arrays = open_split(tmp_path, split)
        assert all(a.dtype == np.dtype("<u2") for a in arrays)
        assert sum(len(a) for a in arrays) == manifest["splits"][split]["tokens"]
        assert (tmp_path / manifest["splits"][split]["shards"][0]["file"]).stat().st_size == 2 * len(arrays[0])
    assert not list(tmp_path.glob("*.tmp"))


def _val_texts(docs, tok, out, seed):
    build_shards(docs, tok, out, val_fraction=0.3, seed=seed)
    return _decoded_docs(tok, out, "val")


def test_split_is_by_document_and_deterministic_for_the_seed(tmp_path, tok):
    docs = [Document(f"d{i}", f"text {i}") for i in range(40)]
    first = _val_texts(docs, tok, tmp_path / "a", seed=0)
    again = _val_texts(docs, tok, tmp_path / "b", seed=0)
    other = _val_texts(docs, tok, tmp_path / "c", seed=1)
    assert first == again
    assert first != other
    assert 0 < len(first) < len(docs)


def test_held_out_is_the_validation_split(tmp_path, tok):
    from yunque.data.shards import held_out

    docs = [Document(f"d{i}", f"text {i}\n" * (1 + i % 7)) for i in range(40)]
    docs.append(Document("long", "".join(f"line {i}\n" for i in range(400))))  # cut into parts, split like docs
    val = build_shards(docs, tok, tmp_path, val_fraction=0.3, seed=2, part_chars=512)["splits"]["val"]
    parts = list(held_out(docs, seed=2, val_fraction=0.3, part_chars=512))
    assert any(p.name.startswith("long#") for p in parts) and 0 < len(parts) < len(docs)
    assert (len(parts), sum(len(p.text.encode()) for p in parts)) == (val["documents"], val["bytes"])
    assert "".join(p.text for p in parts) == "".join(_decoded_docs(tok, tmp_path, "val"))


@pytest.mark.parametrize("val_fraction", [0.0, 1.0])
def test_both_splits_nonempty(tmp_path, tok, val_fraction):
    docs = [Document("x", "first"), Document("y", "second"), Document("z", "third")]
    manifest = build_shards(docs, tok, tmp_path, val_fraction=val_fraction)
    assert manifest["splits"]["train"]["documents"] >= 1
    assert manifest["splits"]["val"]["documents"] >= 1
    assert sorted(_decoded_docs(tok, tmp_path, "train") + _decoded_docs(tok, tmp_path, "val")) == [
        "first", "second", "third"
    ]


def test_single_document_goes_to_train(tmp_path, tok):
    manifest = build_shards([Document("only", "just me")], tok, tmp_path, val_fraction=1.0)
    assert manifest["splits"]["train"]["documents"] == 1
    assert manifest["splits"]["val"] == {"documents": 0, "tokens": 0, "bytes": 0, "shards": []}
    assert open_split(tmp_path, "val") == []


def test_folder_to_shards_records_skips(tmp_path, tok):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("alpha", encoding="utf-8")
    (data / "b.txt").write_text("beta", encoding="utf-8")
    (data / "c.bin").write_bytes(b"\0\1\2")
    report = SkipReport()
    manifest = build_shards(iter_documents([data], report=report), tok, tmp_path / "shards", report=report)
    assert manifest["skipped"] == {"counts": {"binary": 1}, "examples": {"binary": [str(data / "c.bin")]}}
    texts = _decoded_docs(tok, tmp_path / "shards", "train") + _decoded_docs(tok, tmp_path / "shards", "val")
    assert sorted(texts) == ["alpha", "beta"]


def test_empty_corpus(tmp_path, tok):
    with pytest.raises(ValueError, match="the corpus is empty.*pass --data with text files"):
        build_shards([Document("e", "")], tok, tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_truncated_shard(tmp_path, tok):
    manifest = build_shards(DOCS, tok, tmp_path, val_fraction=0.3)
    shard = tmp_path / manifest["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match=f"{shard.name}.*delete .* to rebuild"):
        open_split(tmp_path, "train")
    assert not shards_match(tmp_path, tok, 0, 0.3)


def test_missing_and_corrupt_manifest(tmp_path, tok):
    with pytest.raises(ValueError, match="manifest.json: not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{truncated", encoding="utf-8")
    with pytest.raises(ValueError, match="corrupt"):
        load_manifest(tmp_path)


def test_shards_match(tmp_path, tok):
    assert not shards_match(tmp_path, tok, 0, 0.3)
    build_shards(DOCS, tok, tmp_path, val_fraction=0.3, seed=0, source="corpus-a")
    assert shards_match(tmp_path, tok, 0, 0.3, source="corpus-a")
    assert not shards_match(tmp_path, tok, 1, 0.3, source="corpus-a")
    assert not shards_match(tmp_path, tok, 0, 0.1, source="corpus-a")
    assert not shards_match(tmp_path, tok, 0, 0.3, source="corpus-b")
    assert not shards_match(tmp_path, _BigVocab(), 0, 0.3, source="corpus-a")


def test_rebuild_replaces_old_shards(tmp_path, tok):
    build_shards(DOCS, tok, tmp_path, val_fraction=0.3, shard_tokens=10)
    manifest = build_shards(DOCS[:4], tok, tmp_path, val_fraction=0.3)
    files = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
    assert {p.name for p in tmp_path.glob("*.bin")} == files


class _BigVocab:
    """A tokenizer with no BOS and more than 65536 ids: one id per character, offset past uint16."""

    vocab_size = 70_000
    bos_id = None
    eos_id = 69_999

    def encode_batch(self, texts, *, bos=False, eos=False):
        return [[66_000 + ord(c) for c in text] for text in texts]

    def fingerprint(self):
        return "big-vocab"


def test_uint32_and_eos_framing(tmp_path):
    build_shards([Document("a", "ab"), Document("b", "c")], _BigVocab(), tmp_path, val_fraction=0.0)
    manifest = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["dtype"] == "uint32"
    ids = np.concatenate([np.asarray(a) for split in ("train", "val") for a in open_split(tmp_path, split)])
    assert ids.dtype == np.dtype("<u4")
    assert sorted(ids.tolist()) == sorted([66_097, 66_098, 69_999, 66_099, 69_999])
