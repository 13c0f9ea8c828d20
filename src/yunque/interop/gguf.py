"""GGUF export for llama.cpp and ollama: one file holding the architecture, the tokenizer and the weights.

Llama-style models are written as llama.cpp's "llama" architecture ("qwen2" when q/k/v have biases, "qwen3" with
qk_norm), GPT-2-style ones as "gpt2"; configs no such architecture holds are refused, as in `hf_model_type`.

Rotary layout: yunque, like HF, rotates the two halves of each head against each other (rotate_half), while
llama.cpp's "llama" kernel rotates adjacent pairs (GPT-J style). llama.cpp's convert_hf_to_gguf.py therefore
reorders the rows of q and k within each head, and so does `permute_rope` here: head rows [x0 .. x(D/2-1) | y0 ..
y(D/2-1)] become [x0 y0 x1 y1 ...]. The "qwen2" and "qwen3" kernels rotate halves (NEOX), so they get no reordering.
Tensors are written in PyTorch's (out, in) layout, which GGUF stores with its dimensions reversed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from yunque.atomic import atomic_write
from yunque.config import ModelConfig
from yunque.interop.hf_config import hf_model_type
from yunque.interop.hf_tokenizer import chat_template_source, export_tokenizer_config, special_token_ids
from yunque.model.gpt import GPT, rope_frequencies
from yunque.model.quant import dequantize_model, quantization_of
from yunque.modeldir import load_model, weights_of
from yunque.outputs import check_output
from yunque.tokenizer.bpe import END_OF_TURN, Tokenizer, is_byte_level

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
"""Storage types for matrices; norms, biases and rope factors are always f32, as llama.cpp expects. The q types are
the gguf library's own quantizers: Q8_0 (int8, one f16 scale per 32), Q4_0 (int4, one scale per 32), Q4_1 (int4,
a scale and a minimum per 32)."""
QUANTIZED_DTYPE = {"int8": "q8_0", "int4": "q4_0"}
"""The GGUF type a quantized model dir (`yunque quantize`) is written as unless another is asked for."""

TOP_NAMES = {"tok_emb": "token_embd", "pos_emb": "position_embd", "norm_f": "output_norm", "lm_head": "output"}
BLOCK_NAMES = {"norm1": "attn_norm", "norm2": "ffn_norm", "attn.qkv": "attn_qkv", "attn.proj": "attn_output",
               "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm", "mlp.up": "ffn_up", "mlp.down": "ffn_down"}
"""yunque module -> llama.cpp tensor name, outside the blocks and inside block i ("blk.{i}.")."""


def gguf_names(name: str, arch: str) -> tuple[str, ...]:
    """llama.cpp's names for the pieces of one yunque tensor, in the order they are stacked along dim 0: q, k, v
    for a Llama-family attn.qkv, gate and up for its mlp.up, else the one tensor. Export and import both follow it."""
    module, leaf = name.rsplit(".", 1)
    if not module.startswith("blocks."):
        return (f"{TOP_NAMES[module]}.{leaf}",)
    i, key = module.split(".", 2)[1:]
    if key == "attn.qkv" and arch != "gpt2":
        return tuple(f"blk.{i}.attn_{n}.{leaf}" for n in "qkv")
    if key == "mlp.up" and arch != "gpt2":
        return f"blk.{i}.ffn_gate.{leaf}", f"blk.{i}.ffn_up.{leaf}"
    return (f"blk.{i}.{BLOCK_NAMES[key]}.{leaf}",)


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection (n_head * D, ...) from rotate-half pairs to adjacent pairs.

    The same reordering as LlamaModel.permute in llama.cpp's convert_hf_to_gguf.py.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute_rope`: a llama.cpp "llama" q or k projection back to rotate-half pairs (as
    transformers' LlamaTensorProcessor undoes it when it reads a GGUF)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp tensor name, tensor) for every weight of `model`, split and reordered as llama.cpp expects."""
    cfg = model.cfg
    arch = hf_model_type(cfg)  # llama.cpp names these four architectures as transformers does
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.dim_head
    state = weights_of(model)
    for name, x in state.items():
        names = gguf_names(name, arch)
        if len(names) == 3:  # q, k, v
            q, k, v = x.split([H * D, K * D, K * D])
            if arch == "llama":
                q, k = permute_rope(q, H), permute_rope(k, K)
            yield from zip(names, (q, k, v))
        elif len(names) == 2:  # gate, up
            yield from zip(names, x.chunk(2))
        else:
            yield names[0], x
    if arch == "gpt2" and cfg.tie_embeddings:
        yield "output.weight", state["tok_emb.weight"]  # as convert_hf_to_gguf.py writes GPT-2
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", "llama3") == "llama3":
        # llama.cpp divides each rotary frequency by its factor; ours are scaled frequencies, so factor = base/scaled
        base = rope_frequencies(dataclasses.replace(cfg, rope_scaling=None))
        yield "rope_freqs.weight", base / rope_frequencies(cfg)


def export_gguf(model_dir: str | Path, out_path: str | Path, *, dtype: str | None = None,
                force: bool = False) -> None:
    """Write the model dir as one GGUF file: metadata, byte-level BPE vocabulary, weights stored as `dtype` (None:
    f16, or for a quantized model dir its GGUF counterpart, QUANTIZED_DTYPE). A quantized model's weights are
    dequantized and quantized again by the gguf library (an int4 model's groups are not Q4_0's, whose scale is
    symmetric: expect a little more error than either alone). An existing file is refused unless `force`; it is
    replaced only once the new one is complete."""
    try:
        import gguf
    except ModuleNotFoundError:
        raise ModuleNotFoundError("GGUF export needs the gguf package; pip install gguf") from None
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    if out_path.is_dir():
        raise ValueError(f"{out_path} is a directory; name the .gguf file to write")
    check_output(out_path, force=force, sources=(model_dir,))
    model, tokenizer = load_model(model_dir)
    quantization = quantization_of(model)
    if quantization is not None:
        dequantize_model(model)
    dtype = dtype or (QUANTIZED_DTYPE[quantization["method"]] if quantization else "f16")
    cfg = model.cfg
    arch = hf_model_type(cfg)
    # the same start token, chat template and end of turn as a Hugging Face export (see hf_tokenizer.py)
    tok_config = export_tokenizer_config(model_dir, tokenizer, cfg.max_seq_len)
    vocab = _vocab(tokenizer, cfg, tok_config, chat_template_source(model_dir, tokenizer), gguf)  # checked first

    def write(path: Path) -> None:
        w = gguf.GGUFWriter(str(path), arch)
        _metadata(w, cfg, arch, model_dir.resolve().name, dtype, gguf)
        for key, (kind, value) in vocab.items():
            getattr(w, f"add_{kind}")(key, value)  # add_string, add_array, add_bool, add_uint32
        # two passes over the tensors, converting one at a time: never a second copy of the whole model
        for name, x in gguf_tensors(model):
            w.add_tensor_info(name, *_storage(x, _ggml_type(x, dtype, gguf), gguf))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, x in gguf_tensors(model):
            w.write_tensor_data(_encode(x, _ggml_type(x, dtype, gguf), gguf))
        w.close()

    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, write)


def _metadata(w: Any, cfg: ModelConfig, arch: str, name: str, dtype: str, gguf: Any) -> None:
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[dtype]
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ff_dim)
    w.add_head_count(cfg.n_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.dim_head)
    w.add_value_length(cfg.dim_head)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.dim_head)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling["factor"])
    elif cfg.rope_scaling:  # llama3: the factors go in rope_freqs.weight; the original context lets a reader check them
        w.add_rope_scaling_orig_ctx_len(cfg.rope_scaling.get("original_max_position_embeddings", 8192))


def _vocab(tokenizer: Tokenizer, cfg: ModelConfig, tok_config: dict[str, Any], template: str | None,
           gguf: Any) -> dict[str, tuple[str, Any]]:
    """tokenizer.* metadata as {key: (writer type, value)}: llama.cpp's "gpt2" (byte-level BPE) vocabulary."""
    config = json.loads(tokenizer.inner.to_str())
    if config["model"].get("type") != "BPE" or not is_byte_level(config):
        raise ValueError("GGUF export writes byte-level BPE tokenizers (GPT-2 style) only; this model's "
                         f"tokenizer is {config['model'].get('type')} without a byte-level decoder")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size}")
    T = gguf.TokenType
    tokens, types = [f"[PAD{i}]" for i in range(cfg.vocab_size)], [T.UNUSED] * cfg.vocab_size
    for token, i in tokenizer.inner.get_vocab(with_added_tokens=True).items():
        tokens[i], types[i] = token, T.NORMAL
    for i, added in tokenizer.inner.get_added_tokens_decoder().items():
        types[i] = T.CONTROL if added.special else T.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in config["model"]["merges"]]
    pre = config.get("pre_tokenizer") or {}
    # "gpt-2" names GPT-2's split regex, which ByteLevel(use_regex=True) applies; other splits are not named here
    # and llama.cpp then uses its default regex
    plain_gpt2 = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    meta = {gguf.Keys.Tokenizer.MODEL: ("string", "gpt2"),
            gguf.Keys.Tokenizer.PRE: ("string", "gpt-2" if plain_gpt2 else "default"),
            gguf.Keys.Tokenizer.LIST: ("array", tokens),
            gguf.Keys.Tokenizer.TOKEN_TYPE: ("array", [int(t) for t in types]),
            gguf.Keys.Tokenizer.MERGES: ("array", merges),
            gguf.Keys.Tokenizer.ADD_BOS: ("bool", tokenizer.bos_id is not None)}
    ids = special_token_ids(tokenizer, tok_config)
    for kind, key in (("bos", gguf.Keys.Tokenizer.BOS_ID), ("eos", gguf.Keys.Tokenizer.EOS_ID),
                      ("pad", gguf.Keys.Tokenizer.PAD_ID)):
        if f"{kind}_token_id" in ids:
            meta[key] = ("uint32", ids[f"{kind}_token_id"])
    if END_OF_TURN in tokenizer.special_ids:  # llama.cpp stops a chat reply at its end-of-turn token
        meta[gguf.Keys.Tokenizer.EOT_ID] = ("uint32", tokenizer.special_ids[END_OF_TURN])
    if template:
        meta[gguf.Keys.Tokenizer.CHAT_TEMPLATE] = ("string", template)
    return meta


def _ggml_type(x: torch.Tensor, dtype: str, gguf: Any) -> Any:
    """How one tensor is stored: matrices as `dtype`, vectors as f32."""
    Q = gguf.GGMLQuantizationType
    if x.dim() < 2 or dtype == "f32":
        return Q.F32
    if dtype == "f16" or (dtype.startswith("q") and x.shape[-1] % 32):  # q blocks are 32 wide; llama.cpp falls back too
        return Q.F16
    return {"bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[dtype]


def _storage(x: torch.Tensor, qtype: Any, gguf: Any) -> tuple[tuple[int, ...], np.dtype, int, Any]:
    """(shape, numpy dtype, bytes, raw GGML type or None) of `_encode(x, qtype)`, without encoding it."""
    Q = gguf.GGMLQuantizationType
    if qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        return tuple(x.shape), dtype, x.numel() * dtype.itemsize, None
    shape = gguf.quants.quant_shape_to_byte_shape(tuple(x.shape), qtype)  # packed blocks, as uint8
    return shape, np.dtype(np.uint8), math.prod(shape), qtype


def _encode(x: torch.Tensor, qtype: Any, gguf: Any) -> np.ndarray:
    a = x.detach().float().cpu().numpy()
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


__all__ = ["BLOCK_NAMES", "DTYPES", "QUANTIZED_DTYPE", "TOP_NAMES", "export_gguf", "gguf_names", "gguf_tensors",
           "permute_rope", "unpermute_rope"]
