"""Tests for yunque.tokenizer.bpe: lossless round trips, exact bytes, save/load, GPT-2 parity, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from yunque.tokenizer import SPECIAL_TOKENS, Tokenizer, byte_tokenizer, load_tokenizer, train_bpe
from yunque.tokenizer.bpe import BOS, EOS, PAD, _byte_level, gpt2_tokenizer_from_files

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun all afternoon.",
    "El rápido zorro marrón salta sobre el perro perezoso. El perro duerme al sol toda la tarde.",
    "¿Qué pasó, señor Muñoz? ¡Adiós! Mañana volveremos a la montaña con los niños.",
    "Tokenizers split text into pieces; the pieces become integers that a model can read.",
    "Los tokenizadores dividen el texto en piezas, y las piezas se vuelven números enteros.",
    "In the beginning there was the byte, and the byte was with the merge table.",
    "La canción de la mañana sonaba en la estación mientras el tren partía hacia el norte.",
]
TRAIN_TEXTS = [f"{line} ({i})" for i in range(8) for line in CORPUS]  # ~5 KB

TRICKY = [
    "",
    "¿Qué pasó, señor Muñoz? ¡Adiós!",
    "emoji 👍🏽 family 👨‍👩‍👧‍👦 rainbow 🏳️‍🌈 flags 🇪🇸🇲🇽🇯🇵",
    "line one\r\nline two\r\n\r\n",
    "\ufeffstarts with a BOM",
    "nul \x00 in the middle\x00",
    "  leading and trailing spaces  \t\n",
    "漢字とかな、한국어, Ελληνικά, русский",
    "\U0010ffff\uffff\u200b",
    "".join(SPECIAL_TOKENS),
    f"user data says {EOS} then {BOS}<|end|> and <|endoftext|",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(TRAIN_TEXTS, vocab_size=350)


@pytest.fixture(scope="module")
def byte() -> Tokenizer:
    return byte_tokenizer()


@pytest.fixture(scope="module", params=["bytes", "bpe"])
def tok(request, bpe: Tokenizer, byte: Tokenizer) -> Tokenizer:
    return byte if request.param == "bytes" else bpe


@pytest.fixture(scope="module")
def gpt2(shared_data: Path) -> Tokenizer:
    d = shared_data / "gpt2-bpe"
    return gpt2_tokenizer_from_files(d / "gpt2_vocab.json", d / "gpt2_merges.txt")


def assert_lossless(tok: Tokenizer, s: str) -> None:
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    full = tok.decode_bytes(ids)
    assert full == s.encode("utf-8")
    for k in range(len(ids) + 1):
        assert full.startswith(tok.decode_bytes(ids[:k]))


@settings(max_examples=200, deadline=None)
@given(s=st.text())
def test_round_trip_arbitrary_text_bytes(byte: Tokenizer, s: str) -> None:
    assert_lossless(byte, s)


@settings(max_examples=200, deadline=None)
@given(s=st.text())
def test_round_trip_arbitrary_text_bpe(bpe: Tokenizer, s: str) -> None:
    assert_lossless(bpe, s)


@pytest.mark.parametrize("s", TRICKY)
def test_round_trip_tricky_text(tok: Tokenizer, s: str) -> None:
    assert_lossless(tok, s)


def test_special_text_in_data_is_not_a_special_id(tok: Tokenizer) -> None:
    ids = tok.encode("".join(SPECIAL_TOKENS))
    assert not set(ids) & set(tok.special_ids.values())


def test_specials_decode_as_their_text(tok: Tokenizer) -> None:
    ids = tok.encode("hi", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == f"{BOS}hi{EOS}"
    assert tok.decode_bytes(ids) == f"{BOS}hi{EOS}".encode()
    assert set(tok.special_ids) == set(SPECIAL_TOKENS)
    assert [tok.token_bytes(tok.special_ids[t]) for t in SPECIAL_TOKENS] == [t.encode() for t in SPECIAL_TOKENS]


@pytest.mark.parametrize(
    ("s", "expected"),
    [("a\ud800b", "a\ufffdb"), ("\udfff", "\ufffd"), ("\ud83d\ude00 pair", "\ufffd\ufffd pair")],
)
def test_lone_surrogates_become_replacement_character(tok: Tokenizer, s: str, expected: str) -> None:
    assert tok.decode(tok.encode(s)) == expected
    assert tok.encode_batch([s]) == [tok.encode(expected)]


# st.text() all but never yields surrogates, even from an alphabet that has them; build the strings by hand.
TEXT_WITH_SURROGATES = st.lists(st.characters() | st.characters(categories=["Cs"])).map("".join)


@settings(max_examples=100, deadline=None)
@given(s=TEXT_WITH_SURROGATES)
def test_surrogate_rule_on_arbitrary_text(tok: Tokenizer, s: str) -> None:
    expected = re.sub("[\ud800-\udfff]", "\ufffd", s)
    assert tok.decode(tok.encode(s)) == expected
    assert tok.decode_bytes(tok.encode(s)) == expected.encode("utf-8")


def test_encode_batch_equals_one_at_a_time(tok: Tokenizer) -> None:
    assert tok.encode_batch(TRICKY, bos=True, eos=True) == [tok.encode(s, bos=True, eos=True) for s in TRICKY]


def test_utf8_character_split_across_tokens_survives_decode_bytes(byte: Tokenizer) -> None:
    ids = byte.encode("ñ👍")
    assert len(ids) == 6
    pieces = [byte.decode_bytes([i]) for i in ids]
    assert b"".join(pieces).decode("utf-8") == "ñ👍"
    assert byte.decode(ids[:1]) == "\ufffd"  # the lossy path, which decode_bytes exists to avoid


def test_byte_tokenizer_layout(byte: Tokenizer) -> None:
    assert byte.kind == "bytes"
    assert byte.vocab_size == 263
    assert byte.encode("abc") == [97, 98, 99]
    assert byte.encode("\x00\xff") == [0, 0xC3, 0xBF]
    assert [byte.token_bytes(b) for b in range(256)] == [bytes([b]) for b in range(256)]
    assert byte.special_ids == {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}


def test_bpe_compresses_its_training_text(bpe: Tokenizer) -> None:
    assert bpe.kind == "bpe"
    assert 263 < bpe.vocab_size <= 350
    text = "\n".join(TRAIN_TEXTS)
    assert len(bpe.encode(text)) < 0.6 * len(text.encode("utf-8"))


@pytest.mark.parametrize("as_file", [False, True])
def test_save_load_gives_identical_tokenizer(tok: Tokenizer, tmp_path: Path, as_file: bool) -> None:
    target = tmp_path / "tok.json" if as_file else tmp_path / "model_dir"
    written = tok.save(target)
    assert written == (target if as_file else target / "tokenizer.json")
    loaded = load_tokenizer(target)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.kind == tok.kind and loaded.vocab_size == tok.vocab_size
    assert loaded.special_ids == tok.special_ids
    assert loaded.encode_batch(TRICKY) == tok.encode_batch(TRICKY)
    assert loaded.encode("<|endoftext|>") == tok.encode("<|endoftext|>")  # specials-as-text survives reload


def test_fingerprints_differ_between_tokenizers(bpe: Tokenizer, byte: Tokenizer) -> None:
    assert bpe.fingerprint() != byte.fingerprint()
    assert len(bpe.fingerprint()) == 64


def test_load_tokenizer_bytes() -> None:
    assert load_tokenizer("bytes").fingerprint() == byte_tokenizer().fingerprint()


def test_gpt2_known_ids(gpt2: Tokenizer) -> None:
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" Hello") == [18435]
    assert gpt2.eos_id == 50256 and gpt2.bos_id is None and gpt2.pad_id is None
    assert gpt2.vocab_size == 50257
    assert gpt2.kind == "bpe"
    assert gpt2.token_bytes(18435) == b" Hello"
    assert gpt2.encode("Hi", eos=True) == [*gpt2.encode("Hi"), 50256]
    assert_lossless(gpt2, TRICKY[2])


def test_gpt2_save_load_keeps_ids(gpt2: Tokenizer, tmp_path: Path) -> None:
    loaded = Tokenizer.load(gpt2.save(tmp_path))
    assert loaded.fingerprint() == gpt2.fingerprint()
    assert loaded.encode("Hello world") == [15496, 995]
    assert loaded.eos_id == 50256


def test_foreign_tokenizer_without_our_specials(tmp_path: Path) -> None:
    # A sentencepiece-style BPE with byte fallback, as in Llama 2's tokenizer.json.
    vocab = {"<unk>": 0, "<0x0A>": 1, "<0xC3>": 2, "<0xB1>": 3, "▁hi": 4, "▁": 5, "h": 6, "i": 7, "▁h": 8}
    merges = [("▁", "h"), ("▁h", "i")]
    inner = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    inner.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = load_tokenizer(Tokenizer(inner).save(tmp_path))
    assert tok.bos_id is None and tok.eos_id is None and tok.pad_id is None and tok.special_ids == {}
    assert tok.kind == "bpe"
    assert tok.token_bytes(4) == b" hi"
    assert tok.decode_bytes([4, 1, 2, 3]) == " hi\nñ".encode()
    with pytest.raises(ValueError, match="has no <\\|bos\\|> token; pass bos=False"):
        tok.encode("hi", bos=True)


def test_out_of_range_ids_are_rejected(byte: Tokenizer) -> None:
    for bad in ([263], [-1], [5, 10_000]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            byte.decode(bad)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            byte.decode_bytes(bad)


def test_non_str_input_is_rejected(byte: Tokenizer) -> None:
    with pytest.raises(TypeError, match="got bytes; decode bytes to str"):
        byte.encode(b"abc")  # type: ignore[arg-type]


def test_train_bpe_errors() -> None:
    with pytest.raises(ValueError, match="vocab_size=262 is below 263.*pass vocab_size >= 263"):
        train_bpe(["some text"], vocab_size=262)
    with pytest.raises(ValueError, match="^no text to train the tokenizer on; "):
        train_bpe(iter([]), vocab_size=300)
    with pytest.raises(ValueError, match="^no text to train the tokenizer on; "):
        train_bpe(["", ""], vocab_size=300)


def test_missing_path_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    expected = (
        f"no tokenizer.json in {missing}; pass a directory holding tokenizer.json, a tokenizer.json file, or 'bytes'"
    )
    with pytest.raises(ValueError) as err:
        load_tokenizer(missing)
    assert str(err.value) == expected
    with pytest.raises(ValueError, match="no tokenizer.json in"):
        load_tokenizer(tmp_path)  # a directory without the file


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": "1.0", "model": {"type": "Nope"}})])
def test_corrupt_json_error_names_the_file(tmp_path: Path, content: str) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text(content)
    for spec in (bad, tmp_path):
        with pytest.raises(ValueError, match=f"^{bad} is not a valid tokenizer.json"):
            load_tokenizer(spec)


def test_pad_is_a_special_token(bpe: Tokenizer) -> None:
    assert bpe.pad_id == bpe.special_ids[PAD]
    assert bpe.decode([bpe.pad_id]) == PAD


# ---- start tokens of Hugging Face tokenizers ----

HUB_STYLES = {
    # TinyLlama / Llama 2: <s> added by a TemplateProcessing post-processor, and add_bos_token in the config
    "llama2": (["<unk>", "<s>", "</s>"], "<s>", {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
                                                 "tokenizer_class": "LlamaTokenizer"}),
    # Llama 3: <|begin_of_text|> added by Sequence[ByteLevel, TemplateProcessing]; the config does not say
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>"], "<|begin_of_text|>",
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                "tokenizer_class": "PreTrainedTokenizerFast"}),
    # Qwen2 / GPT-2: no start token at all
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None,
             {"eos_token": "<|im_end|>", "tokenizer_class": "Qwen2Tokenizer"}),
}


def hub_tokenizer_dir(path: Path, style: str, *, template: bool = True) -> Path:
    """A small tokenizer dir as the Hub ships one (tokenizer.json + tokenizer_config.json), built here."""
    specials, start, config = HUB_STYLES[style]
    inner = _byte_level(models.BPE(), use_regex=True)
    inner.train_from_iterator(TRAIN_TEXTS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    steps = [processors.ByteLevel(trim_offsets=False)]
    if start is not None and template:
        single, pair = f"{start} $A", f"{start} $A {start}:1 $B:1"
        steps.append(processors.TemplateProcessing(single=single, pair=pair,
                                                   special_tokens=[(start, inner.token_to_id(start))]))
    inner.post_processor = processors.Sequence(steps) if style == "llama3" else steps[-1]
    path.mkdir(parents=True, exist_ok=True)
    inner.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("style", list(HUB_STYLES))
def test_hub_tokenizers_start_with_their_own_start_token(style: str, tmp_path: Path) -> None:
    tok = load_tokenizer(hub_tokenizer_dir(tmp_path, style))
    start = HUB_STYLES[style][1]
    assert tok.bos_id == (None if start is None else tok.inner.token_to_id(start))
    if start is not None:
        assert tok.encode("Hola", bos=True) == [tok.bos_id, *tok.encode("Hola")]
        assert tok.bos_id not in tok.encode(f"{start} in data is text")


def test_add_bos_token_without_a_template_still_starts_with_it(tmp_path: Path) -> None:
    """A tokenizer.json without a post-processor and a config saying add_bos_token (how transformers 4 added
    <s>): the model was trained with <s> first, so yunque adds it."""
    tok = load_tokenizer(hub_tokenizer_dir(tmp_path, "llama2", template=False))
    assert tok.bos_id == tok.inner.token_to_id("<s>")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<nope>"}))
    with pytest.raises(ValueError, match="start token '<nope>' is not in the vocabulary; fix bos_token"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("style", list(HUB_STYLES))
def test_hub_tokenizers_give_transformers_ids_with_their_start_token(style: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    path = hub_tokenizer_dir(tmp_path, style)
    tok = load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    for text in CORPUS[:3] + TRICKY[1:3]:
        assert theirs(text)["input_ids"] == tok.encode(text, bos=tok.bos_id is not None)


def test_save_is_atomic(bpe: Tokenizer, byte: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    file = byte.save(tmp_path)
    before = file.read_bytes()

    def disk_full(self, text, **kwargs):
        with open(self, "w", encoding="utf-8") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        bpe.save(tmp_path)
    assert file.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
