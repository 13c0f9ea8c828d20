"""GGUF in: a llama.cpp / ollama model file read as a yunque model, tokenizer and chat format.

A GGUF file holds metadata (architecture sizes under "{arch}.*", the vocabulary under "tokenizer.ggml.*", the chat
template) and the tensors, most of them quantized in blocks. This module reads it with the `gguf` library (the
one llama.cpp maintains): `GGUFReader` for the file and `gguf.quants.dequantize` for every tensor type, so no
dequantizer is written here. What comes out:

- the config: the metadata renamed to a Hugging Face config (as transformers' GGUF loader does) and read by
  hf_config.py, so one set of checks covers both; tied embeddings when there is no output.weight (or it holds the
  same bytes as token_embd.weight, as llama.cpp writes GPT-2);
- the weights, dequantized one tensor at a time into fp32, with llama.cpp's tensor names mapped by the same table
  as the export (gguf.py). For the "llama" architecture llama.cpp reorders the rows of q and k for its
  adjacent-pairs rotary kernel; `unpermute_rope` undoes that. "qwen2" and "qwen3" are stored unpermuted;
- the tokenizer, rebuilt from the vocabulary as a `tokenizers` tokenizer.json: "gpt2" vocabularies as byte-level
  BPE with the split regex that tokenizer.ggml.pre names (as llama.cpp's llama-vocab.cpp splits), "llama" ones as
  sentencepiece BPE with byte fallback (merges from the file, or rebuilt from the scores as transformers does);
  control tokens as special tokens, the start token (tokenizer.ggml.add_bos_token) as a post-processor;
- the side files a model dir would hold: tokenizer_config.json (chat template, special tokens, add_bos_token) and
  generation_config.json (end-of-sequence and end-of-turn ids), which `GGUF.bundled` serves to the readers of
  those files, and `import_gguf` writes out.

Mistral, TinyLlama, SmolLM2 and Llama 2/3 files are all "llama" in GGUF. Unknown architectures, tokenizers and
tensor types, and truncated or foreign files, are one-line ValueErrors naming the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from yunque.atomic import atomic_write_all
from yunque.config import ModelConfig
from yunque.formats import ModelFormat
from yunque.interop.gguf import gguf_names, unpermute_rope
from yunque.interop.hf_config import config_from_hf
from yunque.interop.hf_tokenizer import GENERATION_CONFIG, TOKENIZER_CONFIG
from yunque.model.gpt import GPT, meta_model, rope_frequencies
from yunque.modeldir import load_state, model_summary, save_model, weights_of
from yunque.outputs import check_output, staged_dir
from yunque.tokenizer.bpe import Tokenizer, bytes_to_unicode

MAGIC = b"GGUF"
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}
"""general.architecture -> the Hugging Face model_type it becomes. Mistral, TinyLlama, SmolLM2 and Llama 2/3 GGUFs
are "llama"."""
SUPPORTED = "llama (Llama 2/3, Mistral, TinyLlama, SmolLM2), qwen2, qwen3, gpt2"

# Split regexes of llama.cpp's byte-level pre-tokenizers (src/llama-vocab.cpp, by tokenizer.ggml.pre), in the form
# the models' own tokenizer.json files write them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
          "falcon3": _LLAMA3_SPLIT, "tekken": _TEKKEN_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
"""tokenizer.ggml.pre -> the regex that splits text before BPE (Llama 3, Mistral's Tekken, Qwen). "smollm" splits
digits one by one and then as GPT-2 does; every other name (gpt-2, default, ...) splits as GPT-2, which is
transformers' choice too."""
WHOLE_WORDS = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "tekken"}
"""Pre-tokenizers whose vocabulary takes a whole word that is a token before merging (llama.cpp: ignore_merges),
and that start text with BOS when the file does not say (llama.cpp's default add_bos)."""

CONTROL, USER_DEFINED = 3, 4
"""tokenizer.ggml.token_type values (llama.cpp's llama_token_type): special tokens, and added plain ones."""


# ---- the file ----

def is_gguf(path: str | Path) -> bool:
    """Whether `path` is a file named *.gguf or starting with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader` of the file (memory-mapped; see `_reader_class`); one-line ValueError for a file that is
    not a complete GGUF."""
    try:
        reader_class = _reader_class()
    except ModuleNotFoundError:
        raise ValueError("reading GGUF files needs the gguf package; pip install 'yunque[gguf]'") from None
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    if head != MAGIC:
        raise ValueError(f"{path}: not a GGUF file (it starts with {head!r}, not {MAGIC!r}); pass a .gguf model "
                         f"file from llama.cpp or ollama")
    try:
        return reader_class(path)
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):  # a tensor type id that this gguf library does not know
            raise ValueError(f"{path}: a tensor has an unknown quantization type ({e}) for gguf {_version()}; "
                             f"re-quantize the model to a common type (F16, Q8_0, Q4_K, ...) with llama-quantize, "
                             f"or upgrade gguf") from None
        raise _damaged(path, e) from None
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError) as e:
        raise _damaged(path, e) from None


@functools.cache
def _reader_class() -> type:
    """gguf.GGUFReader over a plain ndarray view of its np.memmap: slicing a memmap runs Python code for every
    slice (memmap.__array_finalize__), which made parsing SmolLM2's 49k tokens and merges take 3.4x longer
    (8.2 s against 2.4 s on a contended machine). The same bytes, the same fields."""
    import gguf

    class Reader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._data = value.view(np.ndarray)  # still backed by the mapped file

    return Reader


def _damaged(path: Path, e: Exception) -> ValueError:
    return ValueError(f"{path}: not a complete GGUF file ({type(e).__name__}: {str(e)[:100]}); the file is "
                      f"truncated or corrupt, download or convert it again")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(version unknown)"


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata key of a GGUFReader with its value as Python: int, float, bool, str or a list of them."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


_METADATA: dict[tuple[str, int, int], dict[str, Any]] = {}
"""Metadata already read, by (path, mtime, size): GGUFReader takes seconds to parse a large vocabulary, and a
chat asks for the model, its chat template and its stop ids."""


def _key(path: Path) -> tuple[str, int, int]:
    try:
        stat = path.stat()
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def read_gguf(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(GGUFReader, metadata) of a GGUF file; the metadata is kept for `metadata`."""
    path = Path(path)
    key = _key(path)
    reader = open_gguf(path)
    if len(_METADATA) >= 4:
        _METADATA.clear()
    meta = _METADATA[key] = read_metadata(reader)
    return reader, meta


def metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a GGUF file, parsed once per version of the file."""
    path = Path(path)
    meta = _METADATA.get(_key(path))
    return meta if meta is not None else read_gguf(path)[1]


# ---- config ----

def _value(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """meta[key] checked to be of `kind` (bool is not an int); ValueError naming the key when missing or wrong."""
    value = meta.get(key)
    if value is None:
        if default is ...:
            raise ValueError(f"metadata {key} is missing; a {meta.get('general.architecture')} GGUF needs it")
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
        raise ValueError(f"metadata {key} is {shown}, not a single {getattr(kind, '__name__', 'number')}")
    if isinstance(value, float):  # stored as float32: 1e-05, not 9.99999974738e-06, in config.json
        value = float(str(np.float32(value)))
    return value


def config_from_gguf(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                     rope_freqs: np.ndarray | None = None) -> ModelConfig:
    """yunque's ModelConfig for a GGUF's metadata and tensor shapes (PyTorch order); `rope_freqs` is its
    rope_freqs.weight (Llama 3's rotary scaling), if it has one. ValueError naming the key or tensor."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not supported; yunque reads {SUPPORTED}")
    a = f"{arch}."
    if "token_embd.weight" not in shapes:
        raise ValueError("the file has no token_embd.weight tensor; it is not a complete model")
    vocab = shapes["token_embd.weight"][0]
    num = (int, float)
    hf: dict[str, Any] = {"model_type": ARCHITECTURES[arch], "vocab_size": vocab,
                          "tie_word_embeddings": "output.weight" not in shapes}
    d, H = _value(meta, a + "embedding_length", int), _value(meta, a + "attention.head_count", int)
    if arch == "gpt2":
        hf.update(n_embd=d, n_head=H, n_layer=_value(meta, a + "block_count", int),
                  n_positions=_value(meta, a + "context_length", int),
                  n_inner=_value(meta, a + "feed_forward_length", int, None),
                  layer_norm_epsilon=_value(meta, a + "attention.layer_norm_epsilon", num, 1e-5))
        return config_from_hf(hf)
    head_dim = _value(meta, a + "attention.key_length", int, d // H)
    if _value(meta, a + "attention.value_length", int, head_dim) != head_dim:
        raise ValueError(f"metadata {a}attention.value_length differs from key_length; yunque's heads have one width")
    rot = _value(meta, a + "rope.dimension_count", int, head_dim)
    if rot != head_dim:
        raise ValueError(f"metadata {a}rope.dimension_count is {rot}, but heads are {head_dim} wide; yunque rotates "
                         f"whole heads (partial rotary is not supported)")
    hf.update(hidden_size=d, num_attention_heads=H, head_dim=head_dim,
              num_key_value_heads=_value(meta, a + "attention.head_count_kv", int, H),
              num_hidden_layers=_value(meta, a + "block_count", int),
              intermediate_size=_value(meta, a + "feed_forward_length", int),
              max_position_embeddings=_value(meta, a + "context_length", int, 2048),
              rms_norm_eps=_value(meta, a + "attention.layer_norm_rms_epsilon", num, 1e-6),
              rope_theta=_value(meta, a + "rope.freq_base", num, 10000.0))
    scaling = _value(meta, a + "rope.scaling.type", str, "none")
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": _value(meta, a + "rope.scaling.factor", num)}
    elif scaling not in ("none", ""):
        raise ValueError(f"metadata {a}rope.scaling.type is {scaling!r}; yunque runs 'linear' rotary scaling, Llama "
                         f"3's (rope_freqs.weight), or none")
    cfg = config_from_hf(hf)
    if rope_freqs is not None:
        cfg = _with_llama3_scaling(cfg, rope_freqs, _value(meta, a + "rope.scaling.original_context_length", int, 8192))
    return cfg


def _with_llama3_scaling(cfg: ModelConfig, factors: np.ndarray, original: int) -> ModelConfig:
    """`cfg` with the Llama 3 rotary scaling whose per-frequency divisors are `factors` (rope_freqs.weight, as
    llama.cpp's converter writes them); ValueError if no scaling with Llama 3's low and high frequency factors
    (1 and 4) gives them."""
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape != (cfg.dim_head // 2,):
        raise ValueError(f"rope_freqs.weight has {factors.size} factors but heads of {cfg.dim_head} need "
                         f"{cfg.dim_head // 2}")
    scaled = dataclasses.replace(cfg, rope_scaling={"rope_type": "llama3", "factor": float(f"{factors.max():.6g}"),
                                                    "original_max_position_embeddings": original})
    base = rope_frequencies(dataclasses.replace(cfg, rope_scaling=None)).double().numpy()
    ours = base / rope_frequencies(scaled).double().numpy()
    if not np.allclose(ours, factors, rtol=1e-4):
        raise ValueError("rope_freqs.weight holds rotary factors that are not Llama 3's scaling (low and high "
                         f"frequency factors 1 and 4, original context {original}); yunque cannot run them")
    return scaled


# ---- tokenizer ----

def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a GGUF's tokenizer.ggml.* metadata describes, as a `tokenizers` tokenizer; ValueError naming
    what is missing or not supported."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError("metadata tokenizer.ggml.tokens is missing; the file carries no vocabulary")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"metadata tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    added = {i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)}
    if kind == "gpt2":
        inner = _byte_level_bpe(meta, tokens, added)
    elif kind == "llama":
        inner = _sentencepiece_bpe(meta, tokens)
    else:
        raise ValueError(f"metadata tokenizer.ggml.model is {kind!r}; yunque reads 'gpt2' (byte-level BPE) and "
                         f"'llama' (sentencepiece BPE) vocabularies")
    inner.add_tokens([AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False) for i in sorted(added)])
    bos = [_special(meta, tokens, "bos")] if adds_bos(meta) else []
    eos = [_special(meta, tokens, "eos")] if meta.get("tokenizer.ggml.add_eos_token", False) else []
    if bos or eos:  # the start (and end) token, added as transformers 5 and yunque's Tokenizer read it
        single = " ".join([*(t for t, _ in bos), "$A", *(t for t, _ in eos)])
        inner.post_processor = processors.TemplateProcessing(single=single, special_tokens=bos + eos)
    return Tokenizer(inner)


def adds_bos(meta: dict[str, Any]) -> bool:
    """Whether text starts with the BOS token: tokenizer.ggml.add_bos_token, else llama.cpp's default (yes for
    sentencepiece and for Llama 3's and Tekken's byte-level vocabularies)."""
    default = meta.get("tokenizer.ggml.model") == "llama" or meta.get("tokenizer.ggml.pre") in WHOLE_WORDS
    return bool(meta.get("tokenizer.ggml.add_bos_token", default))


def _special(meta: dict[str, Any], tokens: list[str], kind: str) -> tuple[str, int]:
    i = meta.get(f"tokenizer.ggml.{kind}_token_id")
    if not isinstance(i, int) or not 0 <= i < len(tokens):
        raise ValueError(f"metadata tokenizer.ggml.add_{kind}_token is true but tokenizer.ggml.{kind}_token_id is "
                         f"{i!r}, not a token id")
    return tokens[i], i


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], added: set[int]) -> tokenizers.Tokenizer:
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise ValueError("metadata tokenizer.ggml.merges is missing; a 'gpt2' (byte-level BPE) vocabulary needs it")
    alphabet = bytes_to_unicode()
    spelled = set(alphabet.values())
    vocab = {}
    for i, token in enumerate(tokens):
        if i not in added and not set(token) <= spelled:  # respelled as byte characters, as transformers does
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    pre = meta.get("tokenizer.ggml.pre", "default")
    model = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre in WHOLE_WORDS)
    inner = tokenizers.Tokenizer(model)
    if pre in SPLITS:
        inner.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                use_regex=False)])
    elif pre == "smollm":
        inner.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    return inner


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    """llama.cpp's "llama" vocabulary (sentencepiece BPE with byte fallback) as transformers' LlamaTokenizer builds
    it: "▁" for spaces, one prepended to the text when tokenizer.ggml.add_space_prefix (the default)."""
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    merges = meta.get("tokenizer.ggml.merges")
    if isinstance(merges, list):
        merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise ValueError("metadata tokenizer.ggml.scores is missing; a 'llama' (sentencepiece) vocabulary without "
                             "merges needs its scores to rank them")
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None
    inner = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True,
                                            fuse_unk=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    inner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                   split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    inner.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return inner


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens, ranked by the
    token's score, best first (transformers' generate_merges, used for GGUFs without merges)."""
    merges = []
    for token, score in scores.items():
        pieces = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges += [(left, right, score) for left, right in sorted(pieces, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def side_configs(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{"tokenizer_config.json": ..., "generation_config.json": ...}: what a Hugging Face dir would hold for this
    GGUF's special tokens, start token, chat template and stop ids."""
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def token_id(kind: str) -> int | None:
        i = meta.get(f"tokenizer.ggml.{kind}_token_id")
        return i if isinstance(i, int) and 0 <= i < len(tokens) else None

    tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, kind in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        if (i := token_id(kind)) is not None:
            tok_config[name] = tokens[i]
    tok_config["add_bos_token"] = adds_bos(meta)
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        tok_config["chat_template"] = template
    arch = meta.get("general.architecture")
    if isinstance(meta.get(f"{arch}.context_length"), int):
        tok_config["model_max_length"] = meta[f"{arch}.context_length"]
    tok_config["clean_up_tokenization_spaces"] = False
    stops = [i for i in map(token_id, ("eos", "eot", "eom")) if i is not None]
    gen_config = {"bos_token_id": token_id("bos"), "eos_token_id": list(dict.fromkeys(stops)),
                  "pad_token_id": token_id("padding")}
    return {TOKENIZER_CONFIG: tok_config, GENERATION_CONFIG: {k: v for k, v in gen_config.items() if v is not None}}


# ---- weights ----

def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    """One tensor as fp32, in PyTorch's shape, by the gguf library's own dequantizers."""
    import gguf

    try:
        x = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf "
                         f"library cannot dequantize; re-quantize the model to F32, F16, BF16, Q8_0, Q4_0, Q4_1, "
                         f"Q5_0, Q5_1 or a K-quant (llama-quantize)") from None
    x = np.asarray(x, dtype=np.float32).reshape(_shape(tensor))
    return x if x.flags.writeable else x.copy()  # F32 comes back as a view of the read-only mapped file


def _same_bytes(a: Any, b: Any) -> bool:
    return a.tensor_type == b.tensor_type and a.data.shape == b.data.shape and np.array_equal(a.data, b.data)


def _read_model(path: Path) -> tuple[str, dict[str, Any], ModelConfig, Tokenizer]:
    """(architecture, {name: tensor} of the weights, config, tokenizer) of a GGUF file, all checked against each
    other; nothing is dequantized but rope_freqs.weight."""
    reader, meta = read_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    if "output.weight" in tensors and "token_embd.weight" in tensors \
            and _same_bytes(tensors["output.weight"], tensors["token_embd.weight"]):
        del tensors["output.weight"]  # a tied head written out twice (llama.cpp's GPT-2)
    rope_freqs = tensors.pop("rope_freqs.weight", None)
    try:
        cfg = config_from_gguf(meta, {name: _shape(t) for name, t in tensors.items()},
                               None if rope_freqs is None else _dequantize(rope_freqs, path))
        tokenizer = tokenizer_from_gguf(meta)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{path}: the vocabulary has {tokenizer.vocab_size} tokens but token_embd.weight only "
                         f"{cfg.vocab_size} rows; the file is inconsistent")
    return meta["general.architecture"], tensors, cfg, tokenizer


def load_gguf(path: str | Path, *, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """(model in eval mode, tokenizer) from a GGUF file: every tensor dequantized to fp32 (or `dtype`) one at a
    time and taken as a parameter of a model built on the meta device, after every shape has been checked against
    the config."""
    path = Path(path)
    arch, tensors, cfg, tokenizer = _read_model(path)
    model = meta_model(cfg)
    shapes = weights_of(model)
    plan = {name: gguf_names(name, arch) for name in shapes}
    wanted = {g for names in plan.values() for g in names}
    missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match the {arch} metadata (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); yunque reads {SUPPORTED} models without extra tensors")
    q, kv = cfg.n_head * cfg.dim_head, cfg.kv_heads * cfg.dim_head
    for name, names in plan.items():  # every shape before anything is allocated
        shape = tuple(shapes[name].shape)
        rows = (q, kv, kv) if len(names) == 3 else (cfg.ff_dim,) * 2 if len(names) == 2 else shape[:1]
        for g, n in zip(names, rows):
            if _shape(tensors[g]) != (n, *shape[1:]):
                raise ValueError(f"{path}: tensor {g} has shape {_shape(tensors[g])} but the metadata implies "
                                 f"{(n, *shape[1:])}")
    state = {}
    for name, names in plan.items():
        pieces = []
        for g in names:
            x = torch.from_numpy(_dequantize(tensors[g], path))
            if arch == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's rope layout
                x = unpermute_rope(x, cfg.n_head if ".attn_q." in g else cfg.kv_heads)
            pieces.append(x)
        # a tensor stored whole is taken as the parameter as dequantized: no second copy
        state[name] = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(device, dtype or torch.float32)
    load_state(model, state, path, assign=True)
    if cfg.pos == "rope":
        model.inv_freq = rope_frequencies(cfg).to(device)
    return model.eval(), tokenizer


def describe_gguf(path: Path) -> dict[str, Any]:
    """`describe` for a GGUF file: config, tokenizer and tensor types, from the metadata and headers alone."""
    arch, tensors, cfg, tokenizer = _read_model(path)
    d = model_summary(path, cfg, tokenizer, f"GGUF ({arch})", path.stat().st_size)
    types = Counter(t.tensor_type.name for t in tensors.values())
    d["tensor_types"] = ", ".join(f"{name} x{n}" for name, n in types.most_common())
    name = metadata(path).get("general.name")
    if isinstance(name, str):
        d["name"] = name
    return d


def bundled_gguf(path: Path) -> dict[str, dict[str, Any]]:
    return side_configs(metadata(path))


GGUF = ModelFormat("GGUF", is_gguf, load_gguf, describe_gguf, bundled_gguf)
"""The entry of formats.FORMATS that makes a .gguf file work wherever a model dir does."""


def import_gguf(path: str | Path, out_dir: str | Path, *, force: bool = False) -> None:
    """Convert a GGUF file into a yunque model dir (fp32 weights, tokenizer.json) with the tokenizer_config.json
    (chat template, special tokens) and generation_config.json (stop ids) a Hugging Face dir would hold. An
    existing non-empty `out_dir` is refused unless `force`; the output appears whole or not at all."""
    path, out_dir = Path(path), Path(out_dir)
    check_output(out_dir, force=force, sources=(path,))
    model, tokenizer = load_gguf(path)
    configs = side_configs(metadata(path))
    with staged_dir(out_dir, force=force, sources=(path,)) as staging:
        save_model(staging, model, tokenizer)
        atomic_write_all([(staging / name, _json_writer(obj)) for name, obj in configs.items()])


def _json_writer(obj: dict[str, Any]):
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    return lambda p: Path(p).write_text(text, encoding="utf-8")


__all__ = ["ARCHITECTURES", "GGUF", "adds_bos", "config_from_gguf", "describe_gguf", "import_gguf", "is_gguf",
           "load_gguf", "metadata", "open_gguf", "read_gguf", "read_metadata", "side_configs", "tokenizer_from_gguf"]
