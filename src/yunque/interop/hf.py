"""Hugging Face model dirs in and out: GPT-2, Llama (SmolLM2, TinyLlama), Mistral, Qwen2 and Qwen3.

An HF dir holds config.json (with `model_type`), model.safetensors or a sharded model.safetensors.index.json, and
tokenizer.json (or GPT-2's vocab.json + merges.txt), often with tokenizer_config.json (special tokens, chat
template) and generation_config.json. yunque fuses projections that HF keeps apart:

    yunque                GPT-2 (Conv1D, stored (in, out))    Llama family (nn.Linear, stored (out, in))
    attn.qkv  [q; k; v]   attn.c_attn (already fused)         self_attn.q_proj, k_proj, v_proj
    mlp.up    [gate; up]  mlp.c_fc (GELU: no gate)            mlp.gate_proj, mlp.up_proj

`_layout` writes that table down once: loading concatenates along it, exporting splits along it.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from io import FileIO
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from yunque.config import ModelConfig
from yunque.model.gpt import GPT, meta_model, rope_frequencies
from yunque.modeldir import (
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    atomic_write,
    atomic_write_all,
    load_model,
    save_model,
    weights_of,
)
from yunque.tokenizer.bpe import BOS, EOS, PAD, Tokenizer, gpt2_tokenizer_from_files

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
"""HF model_type -> architecture class, for every model type yunque reads. SmolLM2 and TinyLlama are "llama"."""
INDEX = "model.safetensors.index.json"
EXTRA_FILES = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "chat_template.jinja")
"""Files kept as they are through import and export: special tokens, chat template, generation defaults."""
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
"""safetensors dtype names yunque reads; old checkpoints keep integer and bool buffers next to the weights."""
_MODEL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_IGNORED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # buffers old checkpoints saved


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` holds a Hugging Face model: a config.json naming a model_type other than "yunque", or
    architectures."""
    try:
        d = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("model_type") != "yunque" and ("model_type" in d or "architectures" in d)


# ---- config.json ----

def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """yunque's ModelConfig for an HF config.json; ValueError for a model type or an option yunque cannot run."""
    kind = hf.get("model_type")
    if kind is None:  # some old configs name only the class
        kind = next((k for k, a in ARCHITECTURES.items() if a in (hf.get("architectures") or [])), None)
    if kind not in ARCHITECTURES:
        raise ValueError(f"model_type {kind!r} is not supported; yunque reads {', '.join(ARCHITECTURES)} "
                         f"(SmolLM2 and TinyLlama are llama)")
    try:
        return _gpt2_config(hf) if kind == "gpt2" else _llama_config(hf, kind)
    except KeyError as e:
        raise ValueError(f"config.json of a {kind} model has no {e.args[0]!r}") from None


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function {act!r} is not supported; yunque's GPT-2 MLP is GELU with the "
                         f"tanh approximation (gelu_new)")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(key, want) != want:
            raise ValueError(f"GPT-2 option {key}={hf[key]} is not supported; yunque runs {key}={want}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["n_embd"],
        d_ff=hf.get("n_inner"), max_seq_len=hf.get("n_positions") or hf["n_ctx"], pos="learned", norm="layernorm",
        mlp="gelu", bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def _llama_config(hf: dict[str, Any], kind: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; yunque's SwiGLU uses silu")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported; yunque's SwiGLU MLP has no biases")
    if kind != "qwen2" and hf.get("attention_bias"):
        raise ValueError("attention_bias=true (biases on q, k, v and the output projection) is not supported; "
                         "yunque has biases on q, k, v only (Qwen2)")
    d, H = hf["hidden_size"], hf["num_attention_heads"]
    K = hf.get("num_key_value_heads") or H
    head_dim = hf.get("head_dim")
    if head_dim == d // H and d % H == 0:
        head_dim = None  # the default: keeps the config as yunque itself would write it
    max_len = hf.get("max_position_embeddings", 2048)
    window = _sliding_window(hf, kind)
    if window is not None and window < max_len:
        max_len = window  # within the window, sliding-window attention is full causal attention: exact, not approximate
    theta, scaling = _rope(hf)
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=H, n_kv_head=None if K == H else K,
        d_model=d, d_ff=hf["intermediate_size"], head_dim=head_dim,
        max_seq_len=max_len, pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=kind == "qwen2",
        qk_norm=kind == "qwen3", tie_embeddings=hf.get("tie_word_embeddings", False),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling)


def _sliding_window(hf: dict[str, Any], kind: str) -> int | None:
    """Mistral's attention window, or Qwen's when it is switched on; None when attention is full."""
    if kind == "mistral":
        return hf.get("sliding_window")
    if kind in ("qwen2", "qwen3") and (hf.get("use_sliding_window")
                                       or "sliding_attention" in (hf.get("layer_types") or [])):
        return hf.get("sliding_window")
    return None


def _rope(hf: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, yunque rope_scaling) from transformers 4 keys (rope_theta, rope_scaling) or 5 (rope_parameters)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, {"rope_type": "llama3", **{k: scaling[k] for k in keys if k in scaling}}
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": scaling["factor"]}
    raise ValueError(f"rope scaling {kind!r} is not supported; yunque runs 'llama3' and 'linear' scaling, or none")


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF model_type that can hold `cfg` ("gpt2", "llama", "qwen2" or "qwen3"); ValueError saying why if none."""
    parts = (cfg.pos, cfg.norm, cfg.mlp)
    why = []
    if parts == ("learned", "layernorm", "gelu"):
        kind = "gpt2"
        if not cfg.bias:
            why.append("GPT-2 has biases in every linear layer and norm, but bias=False")
        if cfg.kv_heads != cfg.n_head:
            why.append(f"GPT-2 has no grouped-query attention, but n_kv_head={cfg.n_kv_head}")
        if cfg.dim_head * cfg.n_head != cfg.d_model:
            why.append(f"GPT-2's head_dim is d_model/n_head, but head_dim={cfg.head_dim}")
        if cfg.qk_norm:
            why.append("GPT-2 has no qk_norm")
    elif parts == ("rope", "rmsnorm", "swiglu"):
        kind = "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"
        if cfg.bias:
            why.append("Llama-family models have no biases outside q/k/v, but bias=True")
        if cfg.qk_norm and cfg.qkv_bias:
            why.append("no HF family has both qkv_bias (Qwen2) and qk_norm (Qwen3)")
    else:
        kind = ""
        why.append(f"pos={cfg.pos!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r} mix GPT-2 and Llama parts; HF has GPT-2 "
                   f"(learned, layernorm, gelu) and the Llama family (rope, rmsnorm, swiglu)")
    if why:
        raise ValueError(f"this model cannot be written as a Hugging Face model: {'; '.join(why)}")
    return kind


def config_to_hf(cfg: ModelConfig, special_ids: dict[str, int], dtype: torch.dtype) -> dict[str, Any]:
    """HF config.json for `cfg` (with `special_token_ids`), in keys transformers 4 and 5 and llama.cpp read."""
    kind = hf_model_type(cfg)
    common = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": str(dtype).removeprefix("torch."),
              **special_ids}
    if kind == "gpt2":
        return {**common, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.ff_dim,
                "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    hf = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim, "num_hidden_layers": cfg.n_layer,
          "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_head,
          "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
          "hidden_act": "silu", "attention_dropout": 0.0}
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", "llama3") == "llama3":
        # transformers wants every llama3 key: fill in the defaults that rope_frequencies uses
        defaults = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        hf["rope_scaling"] = {"rope_type": "llama3", **defaults, **cfg.rope_scaling}
    elif cfg.rope_scaling:
        hf["rope_scaling"] = dict(cfg.rope_scaling)
    if kind == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        hf["attention_bias"] = False
    if kind == "llama":
        hf["mlp_bias"] = False
    return hf


def special_token_ids(tokenizer: Tokenizer, tok_config: dict[str, Any]) -> dict[str, int]:
    """{"bos_token_id", "eos_token_id", "pad_token_id"} (those that exist): the tokens tokenizer_config.json
    names (a model from Hugging Face), else yunque's own <|bos|>, <|endoftext|>, <|pad|>."""
    vocab = tokenizer.inner.get_vocab(with_added_tokens=True)
    ours = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    ids = {}
    for kind in ("bos", "eos", "pad"):
        token = tok_config.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token  # an AddedToken written out
        i = vocab.get(token) if isinstance(token, str) else None
        if (i := ours[kind] if i is None else i) is not None:
            ids[f"{kind}_token_id"] = i
    return ids


# ---- tensor names ----

@dataclass(frozen=True)
class _Tensor:
    """One yunque tensor and the HF tensors it is made of, stacked along dim 0."""

    name: str
    hf: tuple[str, ...]
    rows: tuple[int, ...]
    transpose: bool  # GPT-2's Conv1D stores weights as (in, out)


_GPT2 = {"tok_emb": "{p}wte", "pos_emb": "{p}wpe", "norm_f": "{p}ln_f", "lm_head": "lm_head",
         "norm1": "{p}h.{i}.ln_1", "norm2": "{p}h.{i}.ln_2", "attn.qkv": "{p}h.{i}.attn.c_attn",
         "attn.proj": "{p}h.{i}.attn.c_proj", "mlp.up": "{p}h.{i}.mlp.c_fc", "mlp.down": "{p}h.{i}.mlp.c_proj"}
_LLAMA = {"tok_emb": "model.embed_tokens", "norm_f": "model.norm", "lm_head": "lm_head",
          "norm1": "model.layers.{i}.input_layernorm", "norm2": "model.layers.{i}.post_attention_layernorm",
          "attn.qkv": ("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj",
                       "model.layers.{i}.self_attn.v_proj"),
          "attn.proj": "model.layers.{i}.self_attn.o_proj", "attn.q_norm": "model.layers.{i}.self_attn.q_norm",
          "attn.k_norm": "model.layers.{i}.self_attn.k_norm",
          "mlp.up": ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"),
          "mlp.down": "model.layers.{i}.mlp.down_proj"}
_CONV1D = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")


def _layout(model: GPT, *, gpt2_prefix: str = "transformer.") -> list[_Tensor]:
    """Every stored yunque tensor with the HF tensors it maps to (GPT-2 names take `gpt2_prefix`)."""
    cfg = model.cfg
    gpt2 = cfg.pos == "learned"
    table = _GPT2 if gpt2 else _LLAMA
    q, kv = cfg.n_head * cfg.dim_head, cfg.kv_heads * cfg.dim_head
    split = {"attn.qkv": (q, kv, kv), "mlp.up": (cfg.ff_dim, cfg.ff_dim)}
    layout = []
    for name, tensor in weights_of(model).items():
        module, leaf = name.rsplit(".", 1)  # "blocks.3.attn.qkv", "weight"
        i, key = module.split(".", 2)[1:] if module.startswith("blocks.") else ("", module)
        hf = table[key] if isinstance(table[key], tuple) else (table[key],)
        hf = tuple(f"{h.format(p=gpt2_prefix, i=i)}.{leaf}" for h in hf)
        rows = split[key] if len(hf) > 1 else (tensor.shape[0],)
        layout.append(_Tensor(name, hf, rows, gpt2 and leaf == "weight" and key in _CONV1D))
    return layout


# ---- loading ----

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the model directory is corrupt") from None


@dataclass(frozen=True)
class _Stored:
    """Where one tensor lies in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset of its data in the file


def _read_header(path: Path) -> dict[str, _Stored]:
    """Each tensor of a safetensors file -> where it lies, checked against the file's length.

    The format: an 8-byte little-endian header length n, n bytes of JSON {name: {"dtype", "shape",
    "data_offsets": [begin, end]}} (and "__metadata__"), then the data, with offsets counted from its start.
    """
    def corrupt(why: str) -> ValueError:
        return ValueError(f"{path}: {why}; the file is corrupt or truncated")

    size = path.stat().st_size
    if size < 8:
        raise corrupt(f"{size} bytes, too short for a safetensors header")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            raise corrupt(f"header of {n} bytes runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise corrupt(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            kind, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(i, int) and i >= 0 for i in (*shape, begin, end)):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise corrupt(f"tensor {name} has a malformed header entry {entry!r}") from None
        if kind not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {kind!r}; yunque reads {', '.join(_DTYPES)}")
        need = math.prod(shape) * _DTYPES[kind].itemsize
        if end - begin != need:
            raise corrupt(f"tensor {name} holds {end - begin} bytes but {kind} {shape} needs {need}")
        if 8 + n + end > size:
            raise corrupt(f"tensor {name} ends at byte {8 + n + end} but the file has {size} bytes")
        tensors[name] = _Stored(path, _DTYPES[kind], shape, 8 + n + begin)
    return tensors


def _find_weights(model_dir: Path) -> dict[str, _Stored]:
    """Each tensor name -> where it lies, in model.safetensors or the shards of the index."""
    single, index = model_dir / WEIGHTS, model_dir / INDEX
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({model_dir / f for f in _read_json(index).get("weight_map", {}).values()})
    else:
        hint = " (pytorch_model.bin is not read: pickles can run code; re-save it with safetensors)" \
            if (model_dir / "pytorch_model.bin").is_file() else ""
        raise ValueError(f"{single}: missing, and no {INDEX} either; the directory has no weights{hint}")
    stored = {}
    for path in files:
        if not path.is_file():
            raise ValueError(f"{path}: missing; {INDEX} lists it as a shard of the weights")
        stored.update(_read_header(path))
    return stored


def _read_into(f: FileIO, s: _Stored, out: torch.Tensor) -> None:
    """Read tensor `s` from `f`, its file, into `out`: contiguous, on the CPU, of its dtype."""
    buf = memoryview(out.view(-1).view(torch.uint8).numpy())
    f.seek(s.start)
    while buf:  # one read returns at most ~2 GiB on Linux
        n = f.readinto(buf)
        if not n:
            raise ValueError(f"{s.path}: ended inside the tensor at byte {s.start}; the file is corrupt or truncated")
        buf = buf[n:]


def load_hf_tokenizer(model_dir: Path) -> Tokenizer:
    if (model_dir / TOKENIZER).is_file():
        return Tokenizer.load(model_dir)
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    if vocab.is_file() and merges.is_file():
        return gpt2_tokenizer_from_files(vocab, merges)
    raise ValueError(f"{model_dir / TOKENIZER}: missing, and no vocab.json + merges.txt either; "
                     f"copy the model's tokenizer files into {model_dir}")


def load_hf(model_dir: str | Path, *, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """(model in eval mode, tokenizer) from a Hugging Face model dir.

    Tensors are read one at a time into a model built on the meta device, so only one copy of the weights is
    ever held. The model keeps the checkpoint's dtype (a bf16 checkpoint gives bf16 parameters) unless `dtype`.
    """
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG).is_file():
        raise ValueError(f"{model_dir / CONFIG}: missing; a Hugging Face model directory needs {CONFIG}, "
                         f"{WEIGHTS} and {TOKENIZER}")
    try:
        cfg = config_from_hf(_read_json(model_dir / CONFIG))
    except ValueError as e:
        raise ValueError(f"{model_dir / CONFIG}: {e}") from None
    tokenizer = load_hf_tokenizer(model_dir)
    stored = _find_weights(model_dir)
    prefix = "transformer." if "transformer.wte.weight" in stored else ""  # the Hub's gpt2 has none
    model = meta_model(cfg)
    layout = _layout(model, gpt2_prefix=prefix)
    wanted = {h for t in layout for h in t.hf}
    missing = sorted(wanted - set(stored))
    unexpected = sorted(n for n in set(stored) - wanted if not n.endswith(_IGNORED)
                        and not (n == "lm_head.weight" and cfg.tie_embeddings))
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights do not match config.json (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); is config.json from another model?")
    emb = stored[layout[0].hf[0]].dtype  # the token embedding sets the dtype
    dtype = dtype or (emb if emb in _MODEL_DTYPES else torch.float32)
    model = model.to(dtype).to_empty(device=device)  # cast while on meta: nothing is allocated twice
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    state = model.state_dict()
    # Plain reads, not safe_open: the pages of a mapped file count as resident once touched, so mapping the
    # checkpoint while filling the model peaks at twice its size. The page cache is not the process's memory.
    with ExitStack() as stack, torch.no_grad():
        files = {path: stack.enter_context(open(path, "rb", buffering=0))
                 for path in sorted({stored[h].path for t in layout for h in t.hf})}
        for t in layout:
            dest, offset = state[t.name], 0
            for name, rows in zip(t.hf, t.rows):
                s = stored[name]
                want = (rows, *dest.shape[1:])
                want = want[::-1] if t.transpose else want
                if s.shape != want:
                    raise ValueError(f"{s.path}: tensor {name} has shape {s.shape} but config.json implies {want}")
                part = dest.narrow(0, offset, rows)  # contiguous: a run of whole rows of a contiguous tensor
                if part.device.type == "cpu" and s.dtype == part.dtype and not t.transpose:
                    _read_into(files[s.path], s, part)
                else:  # a transpose, a cast or another device: through a copy of this one tensor
                    x = torch.empty(s.shape, dtype=s.dtype)
                    _read_into(files[s.path], s, x)
                    part.copy_(x.T if t.transpose else x)
                offset += rows
    if cfg.pos == "rope":
        model.inv_freq = rope_frequencies(cfg).to(device)
    return model.eval(), tokenizer


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> None:
    """Convert a Hugging Face model dir into a yunque model dir, keeping tokenizer_config.json (special tokens,
    chat template) and generation_config.json as they are."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    model, tokenizer = load_hf(hf_dir)
    save_model(out_dir, model, tokenizer)
    for name in EXTRA_FILES:
        if (hf_dir / name).is_file():
            atomic_write(out_dir / name, lambda p, src=hf_dir / name: shutil.copyfile(src, p))


# ---- export ----

def export_hf(model_dir: str | Path, out_dir: str | Path) -> None:
    """Write a model dir as a Hugging Face dir that `AutoModelForCausalLM` and `AutoTokenizer` load.

    GPT-2-style configs become GPT2LMHeadModel; Llama-style ones LlamaForCausalLM, or Qwen2 (qkv_bias) or Qwen3
    (qk_norm). ValueError saying why for a config no HF family can hold.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model, tokenizer = load_model(model_dir)
    cfg = model.cfg
    state = weights_of(model)
    tensors = {}
    for t in _layout(model):
        pieces = state[t.name].split(list(t.rows))
        for name, x in zip(t.hf, pieces):
            # split pieces share storage, which safetensors refuses: each is written from its own copy
            tensors[name] = x.T.contiguous() if t.transpose else x.clone() if len(pieces) > 1 else x
    extra = {name: _read_json(model_dir / name) for name in ("tokenizer_config.json", "generation_config.json")
             if (model_dir / name).is_file()}
    tok_config = extra.get("tokenizer_config.json", {})
    tok_config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for key, token in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD)):
        if key not in tok_config and token in tokenizer.special_ids:
            tok_config[key] = token
    tok_config.setdefault("model_max_length", cfg.max_seq_len)
    tok_config.setdefault("clean_up_tokenization_spaces", False)  # decode as yunque does
    special_ids = special_token_ids(tokenizer, tok_config)
    hf_config = config_to_hf(cfg, special_ids, state["tok_emb.weight"].dtype)
    gen_config = {**special_ids, **extra.get("generation_config.json", {})}

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [(out_dir / CONFIG, _json_writer(hf_config)),
             (out_dir / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"})),
             (out_dir / TOKENIZER, lambda p: Path(p).write_text(tokenizer.inner.to_str(pretty=True), encoding="utf-8")),
             (out_dir / "tokenizer_config.json", _json_writer(tok_config)),
             (out_dir / "generation_config.json", _json_writer(gen_config))]
    files += [(out_dir / name, lambda p, src=model_dir / name: shutil.copyfile(src, p))
              for name in ("special_tokens_map.json", "chat_template.jinja") if (model_dir / name).is_file()]
    atomic_write_all(files)


def _json_writer(obj: dict[str, Any]):
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    return lambda p: Path(p).write_text(text, encoding="utf-8")


__all__ = ["is_hf_dir", "config_from_hf", "config_to_hf", "hf_model_type", "special_token_ids", "load_hf",
           "import_hf", "export_hf", "ARCHITECTURES"]
