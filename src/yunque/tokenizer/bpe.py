"""Byte-level BPE and plain-byte tokenizers on the Hugging Face `tokenizers` library.

One class, `Tokenizer`, wraps a `tokenizers.Tokenizer` of either kind, or any `tokenizer.json` from the Hub.
Both of our kinds are byte-level: every string is representable and `decode(encode(s)) == s`, with two rules:

- Special tokens are never produced from text. The literal text "<|endoftext|>" in user or pretraining data is
  encoded as ordinary bytes; special ids enter a sequence only through `encode(..., bos=True, eos=True)` or by
  concatenating `special_ids` (the chat template does this), so data cannot forge a turn boundary.
- Lone surrogates (Python strings like "\\ud800", which have no UTF-8 form) are replaced by U+FFFD before
  encoding, so `decode(encode(s))` is `s` with each surrogate code point replaced by "\\ufffd".
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from yunque.atomic import atomic_write_text

BOS = "<|bos|>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN]

_SURROGATES = re.compile("[\ud800-\udfff]")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (Radford et al. 2019, openai/gpt-2 encoder.py).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in chars]
    for n, b in enumerate(shifted):
        chars[b] = chr(256 + n)
    return chars


# Also the byte tokenizer's model vocabulary: token id == byte value.
_CHAR_BYTES = {c: b for b, c in bytes_to_unicode().items()}


def _replace_surrogates(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}; decode bytes to str before encoding")
    return _SURROGATES.sub("\ufffd", text)


def _byte_level(model: models.Model, *, use_regex: bool) -> tokenizers.Tokenizer:
    inner = tokenizers.Tokenizer(model)
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    inner.decoder = decoders.ByteLevel()
    return inner


def is_byte_level(config: dict) -> bool:
    """Whether a tokenizer.json decodes tokens through GPT-2's byte-to-character map."""
    decoder = config.get("decoder") or {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)


class Tokenizer:
    """Text <-> token ids, around a `tokenizers.Tokenizer` (byte-level BPE, plain bytes, or any tokenizer.json).

    The wrapped `inner` tokenizer is treated as frozen: sizes and tables are read from it once. Wrapping sets
    `inner.encode_special_tokens = True` so special tokens' text in data is encoded as plain text.
    """

    def __init__(self, inner: tokenizers.Tokenizer, *, start_token: str | None = None) -> None:
        """`start_token`: the token sequences begin with when `inner` itself adds none (a Hugging Face
        tokenizer_config.json's bos_token, when its add_bos_token is true); see `bos_id`."""
        self.inner = inner
        inner.encode_special_tokens = True
        vocab = inner.get_vocab(with_added_tokens=True)
        # max id + 1, not the token count: Hub vocabularies may have holes, and the embedding needs every id
        self._vocab_size = max(vocab.values(), default=-1) + 1
        self._special_ids = {tok: vocab[tok] for tok in SPECIAL_TOKENS if tok in vocab}
        if start_token is not None and start_token not in vocab:
            raise ValueError(f"the start token {start_token!r} is not in the vocabulary; fix bos_token in "
                             f"tokenizer_config.json or remove its add_bos_token")
        self._bos_id = template_start_id(inner)
        if self._bos_id is None:
            self._bos_id = vocab[start_token] if start_token is not None else self._special_ids.get(BOS)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (largest id + 1)."""
        return self._vocab_size

    @property
    def special_ids(self) -> dict[str, int]:
        """Id of each of `SPECIAL_TOKENS` that this tokenizer has."""
        return dict(self._special_ids)

    @property
    def bos_id(self) -> int | None:
        """The token a sequence starts with, or None: the special token that tokenizer.json's post-processor
        puts first (how Hugging Face tokenizers add <s> or <|begin_of_text|>, what transformers 5 follows), else
        the `start_token` given (tokenizer_config.json's add_bos_token, how transformers 4 added it), else
        yunque's <|bos|>."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._special_ids.get(EOS)

    @property
    def pad_id(self) -> int | None:
        return self._special_ids.get(PAD)

    @cached_property
    def kind(self) -> str:
        """Either "bytes" (model vocabulary is exactly the 256 bytes, id == byte value, no merges) or "bpe"."""
        is_bpe = isinstance(self.inner.model, models.BPE)
        # A merge would produce a token of two or more characters, so this vocab admits no merges.
        return "bytes" if is_bpe and self.inner.get_vocab(with_added_tokens=False) == _CHAR_BYTES else "bpe"

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally wrapped in BOS/EOS.

        Special tokens' text in `text` is encoded as plain text, never as the special id. Lone surrogates are
        replaced by U+FFFD first, since they have no UTF-8 bytes.
        """
        ids = self.inner.encode(_replace_surrogates(text), add_special_tokens=False).ids
        return self._wrap(ids, bos=bos, eos=eos)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`[encode(t, bos=bos, eos=eos) for t in texts]`, encoded in parallel by the library."""
        encodings = self.inner.encode_batch([_replace_surrogates(t) for t in texts], add_special_tokens=False)
        return [self._wrap(e.ids, bos=bos, eos=eos) for e in encodings]

    def _wrap(self, ids: list[int], *, bos: bool, eos: bool) -> list[int]:
        if bos:
            ids = [self._required(self._bos_id, BOS, "bos"), *ids]
        if eos:
            ids = [*ids, self._required(self.eos_id, EOS, "eos")]
        return ids

    def _required(self, i: int | None, token: str, flag: str) -> int:
        if i is None:
            raise ValueError(
                f"{flag}=True but this tokenizer has no {token} token; pass {flag}=False, "
                f"or use a tokenizer made by train_bpe or byte_tokenizer"
            )
        return i

    def _checked(self, ids: Sequence[int]) -> list[int]:
        ids = list(map(int, ids))  # accepts numpy and torch integers too
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            bad = next(i for i in ids if not 0 <= i < self._vocab_size)
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {self._vocab_size}); "
                f"decode ids made by this tokenizer, or check the model's vocab_size matches it"
            )
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens kept as their text. A UTF-8 character cut at either end becomes U+FFFD."""
        return self.inner.decode(self._checked(ids), skip_special_tokens=False)

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        """Exact bytes of every id, built on first use."""
        config = json.loads(self.inner.to_str())
        byte_level = is_byte_level(config)
        added = {t.content for t in self.inner.get_added_tokens_decoder().values()}
        table = []
        for i in range(self._vocab_size):
            token = self.inner.id_to_token(i)
            if token is None:  # a hole in a Hub vocabulary
                table.append(b"")
            elif token in added:
                table.append(token.encode("utf-8"))
            elif byte_level:
                # Same rule as the library's ByteLevel decoder: a token with a character outside the map is
                # taken as its own UTF-8.
                try:
                    table.append(bytes(_CHAR_BYTES[c] for c in token))
                except KeyError:
                    table.append(token.encode("utf-8"))
            elif m := _BYTE_FALLBACK.fullmatch(token):  # sentencepiece byte-fallback token, e.g. <0x0A>
                table.append(bytes([int(m.group(1), 16)]))
            else:  # sentencepiece marks a word start with "▁"
                table.append(token.replace("▁", " ").encode("utf-8"))
        return table

    def token_bytes(self, id: int) -> bytes:
        """Exact bytes of one token; a special token gives its UTF-8 text."""
        return self._token_bytes[self._checked([id])[0]]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Concatenated bytes of `ids`, never lossy: a UTF-8 character split across calls stays intact."""
        table = self._token_bytes
        return b"".join([table[i] for i in self._checked(ids)])

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json into directory `path`, or to `path` itself if it ends in .json; returns the file.
        Atomic: a crash leaves the old file or the new one, never a part of either."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / "tokenizer.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, self.inner.to_str(pretty=True))
        return file

    def fingerprint(self) -> str:
        """sha256 hex of the serialized tokenizer; equal across save/load, different for any other tokenizer."""
        return hashlib.sha256(self.inner.to_str().encode("utf-8")).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a directory holding tokenizer.json, or a tokenizer.json file (ours or any from the Hub)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"no tokenizer.json in {path}; pass a directory holding tokenizer.json or the file itself")
        try:
            inner = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception for bad JSON and for unknown schemas
            raise ValueError(
                f"{file} is not a valid tokenizer.json ({e}); re-save it with Tokenizer.save or point at another file"
            ) from e
        return cls(inner, start_token=_configured_start(file.parent / "tokenizer_config.json"))


def template_start_id(inner: tokenizers.Tokenizer) -> int | None:
    """The id of the one special token that the post-processor's single-sequence template puts before the text
    (a TemplateProcessing, alone or in a Sequence), or None."""
    if inner.post_processor is None:
        return None
    config = json.loads(inner.post_processor.__getstate__())
    parts = config.get("processors", []) if config.get("type") == "Sequence" else [config]
    for part in parts:
        if part.get("type") != "TemplateProcessing":
            continue
        before = []
        for piece in part.get("single", []):
            if "Sequence" in piece:
                break
            before += part["special_tokens"][piece["SpecialToken"]["id"]]["ids"]
        return before[0] if len(before) == 1 else None
    return None


def _configured_start(path: Path) -> str | None:
    """bos_token of a Hugging Face tokenizer_config.json whose add_bos_token is true, else None."""
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); fix or delete the file") from None
    if not isinstance(config, dict) or config.get("add_bos_token") is not True:
        return None
    token = config.get("bos_token")
    token = token.get("content") if isinstance(token, dict) else token  # an AddedToken written out
    return token if isinstance(token, str) else None


def train_bpe(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most `vocab_size` ids, `SPECIAL_TOKENS` included (ids 0..6).

    The vocabulary stops short of `vocab_size` if the texts run out of pairs to merge.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size={vocab_size} is below {min_size} (256 bytes + {len(SPECIAL_TOKENS)} special tokens); "
            f"pass vocab_size >= {min_size}, or use byte_tokenizer()"
        )
    n_chars = 0

    def cleaned() -> Iterator[str]:
        nonlocal n_chars
        for text in texts:
            n_chars += len(text)
            yield _replace_surrogates(text)

    inner = _byte_level(models.BPE(), use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte gets a token, seen or not
        show_progress=show_progress,
    )
    inner.train_from_iterator(cleaned(), trainer=trainer)
    if n_chars == 0:
        raise ValueError(
            "no text to train the tokenizer on; texts was empty or held only empty strings, pass some text"
        )
    return Tokenizer(inner)


def byte_tokenizer() -> Tokenizer:
    """A tokenizer with one id per byte (id == byte value, 0..255) and `SPECIAL_TOKENS` at 256..262."""
    # No merges, so splitting words first (use_regex) would change nothing.
    inner = _byte_level(models.BPE(vocab=dict(_CHAR_BYTES), merges=[]), use_regex=False)
    inner.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(inner)


def gpt2_tokenizer_from_files(vocab_json: str | Path, merges_txt: str | Path) -> Tokenizer:
    """GPT-2's tokenizer from OpenAI's vocab.json and merges.txt, with <|endoftext|> (id 50256) as EOS."""
    inner = _byte_level(models.BPE.from_file(str(vocab_json), str(merges_txt)), use_regex=True)
    inner.add_special_tokens([EOS])
    return Tokenizer(inner)


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """The tokenizer named by a CLI/config value: "bytes", a directory holding tokenizer.json, or the file."""
    if str(spec) == "bytes":
        return byte_tokenizer()
    path = Path(spec)
    if not (path.is_file() or (path / "tokenizer.json").is_file()):
        raise ValueError(
            f"no tokenizer.json in {path}; pass a directory holding tokenizer.json, a tokenizer.json file, or 'bytes'"
        )
    return Tokenizer.load(path)
