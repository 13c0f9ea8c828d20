"""Hugging Face model dirs in and out: GPT-2, Llama (SmolLM2, TinyLlama), Mistral, Qwen2 and Qwen3.

An HF dir holds config.json (with `model_type`), model.safetensors or a sharded model.safetensors.index.json, and
tokenizer.json (or GPT-2's vocab.json + merges.txt), often with tokenizer_config.json (special tokens, chat
template) and generation_config.json. The config mapping lives in hf_config.py, the tensor names in
hf_layout.py, the tokenizer's files in hf_tokenizer.py; this module reads and writes the weights and the dirs.
`HF` is the entry of formats.FORMATS that makes an HF dir work wherever a yunque model dir does.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from io import FileIO
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import save_file

from yunque.atomic import atomic_write, atomic_write_all
from yunque.config import ModelConfig
from yunque.formats import ModelFormat
from yunque.interop.hf_config import config_from_hf, config_to_hf, model_type_of
from yunque.interop.hf_layout import layout
from yunque.interop.hf_tokenizer import (
    GENERATION_CONFIG,
    TOKENIZER_CONFIG,
    export_tokenizer_config,
    export_tokenizer_json,
    load_hf_tokenizer,
    side_file,
    special_token_ids,
    stop_token_ids,
)
from yunque.model.gpt import GPT, meta_model, rope_frequencies
from yunque.model.quant import dequantize_model
from yunque.modeldir import (
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    StoredTensor,
    load_model,
    model_summary,
    read_safetensors_header,
    save_model,
    weights_of,
)
from yunque.outputs import check_output, staged_dir
from yunque.tokenizer.bpe import Tokenizer

INDEX = "model.safetensors.index.json"
EXTRA_FILES = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "chat_template.jinja")
"""Files an import keeps as they are: special tokens, chat template, generation defaults (an export keeps them too,
filling in what is missing: see hf_tokenizer.py)."""
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


# ---- loading ----

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the model directory is corrupt") from None


def weight_files(model_dir: Path) -> list[Path]:
    """model.safetensors, or the shards that model.safetensors.index.json names (present or not); [] when there
    is neither. ValueError for an index that is not one, or that names a file outside model_dir."""
    single, index = model_dir / WEIGHTS, model_dir / INDEX
    if single.is_file():
        return [single]
    if not index.is_file():
        return []
    d = _read_json(index)
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no weight_map from tensor names to shard files; the model directory is corrupt")
    files = set()
    for name in weight_map.values():
        # plain names only: a shard is a file of this dir, never "../../x" or "/x" (symlinks in it are followed,
        # as in the Hub's own cache)
        if not isinstance(name, str) or not name or PurePosixPath(name).is_absolute() or ".." in name.split("/") \
                or "\\" in name:
            raise ValueError(f"{index}: weight_map names the shard {name!r:.60}, which is not a file of "
                             f"{model_dir}; yunque reads shards only from the model directory")
        files.add(model_dir / name)
    return sorted(files)


def _find_weights(model_dir: Path) -> dict[str, StoredTensor]:
    """Each tensor name -> where it lies, in model.safetensors or the shards of the index."""
    files = weight_files(model_dir)
    if not files:
        hint = " (pytorch_model.bin is not read: pickles can run code; re-save it with safetensors)" \
            if (model_dir / "pytorch_model.bin").is_file() else ""
        raise ValueError(f"{model_dir / WEIGHTS}: missing, and no {INDEX} either; the directory has no "
                         f"weights{hint}")
    stored = {}
    for path in files:
        if not path.is_file():
            raise ValueError(f"{path}: missing; {INDEX} lists it as a shard of the weights")
        stored.update(read_safetensors_header(path)[0])
    return stored


def _read_into(f: FileIO, s: StoredTensor, out: torch.Tensor) -> None:
    """Read tensor `s` from `f`, its file, into `out`: contiguous, on the CPU, of its dtype."""
    buf = memoryview(out.view(-1).view(torch.uint8).numpy())
    f.seek(s.start)
    while buf:  # one read returns at most ~2 GiB on Linux
        n = f.readinto(buf)
        if not n:
            raise ValueError(f"{s.path}: ended inside the tensor at byte {s.start}; the file is corrupt or truncated")
        buf = buf[n:]


def _read_config(model_dir: Path) -> tuple[dict[str, Any], ModelConfig]:
    """(config.json as read, yunque's ModelConfig for it); one-line ValueError naming the file."""
    if not (model_dir / CONFIG).is_file():
        raise ValueError(f"{model_dir / CONFIG}: missing; a Hugging Face model directory needs {CONFIG}, "
                         f"{WEIGHTS} and {TOKENIZER}")
    hf = _read_json(model_dir / CONFIG)
    try:
        return hf, config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{model_dir / CONFIG}: {e}") from None


def load_hf(model_dir: str | Path, *, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """(model in eval mode, tokenizer) from a Hugging Face model dir.

    Tensors are read one at a time into a model built on the meta device, so only one copy of the weights is
    ever held. The model keeps the checkpoint's dtype (a bf16 checkpoint gives bf16 parameters) unless `dtype`.
    """
    model_dir = Path(model_dir)
    _, cfg = _read_config(model_dir)
    tokenizer = load_hf_tokenizer(model_dir)
    stored = _find_weights(model_dir)
    prefix = "transformer." if "transformer.wte.weight" in stored else ""  # the Hub's gpt2 has none
    model = meta_model(cfg)
    plan = layout(model, gpt2_prefix=prefix)
    wanted = {h for t in plan for h in t.hf}
    missing = sorted(wanted - set(stored))
    unexpected = sorted(n for n in set(stored) - wanted if not n.endswith(_IGNORED)
                        and not (n == "lm_head.weight" and cfg.tie_embeddings))
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights do not match config.json (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); is config.json from another model?")
    shapes = weights_of(model)  # meta tensors: shapes without storage
    for t in plan:  # every shape against the headers before anything is allocated
        for name, rows in zip(t.hf, t.rows):
            want = (rows, *shapes[t.name].shape[1:])
            want = want[::-1] if t.transpose else want
            if stored[name].shape != want:
                raise ValueError(f"{stored[name].path}: tensor {name} has shape {stored[name].shape} but "
                                 f"config.json implies {want}")
    emb = stored[plan[0].hf[0]].torch_dtype  # the token embedding sets the dtype
    dtype = dtype or (emb if emb in _MODEL_DTYPES else torch.float32)
    model = model.to(dtype).to_empty(device=device)  # cast while on meta: nothing is allocated twice
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    state = model.state_dict()
    # Plain reads, not safe_open: the pages of a mapped file count as resident once touched, so mapping the
    # checkpoint while filling the model peaks at twice its size. The page cache is not the process's memory.
    with ExitStack() as stack, torch.no_grad():
        files = {path: stack.enter_context(open(path, "rb", buffering=0))
                 for path in sorted({stored[h].path for t in plan for h in t.hf})}
        for t in plan:
            dest, offset = state[t.name], 0
            for name, rows in zip(t.hf, t.rows):
                s = stored[name]
                part = dest.narrow(0, offset, rows)  # contiguous: a run of whole rows of a contiguous tensor
                if part.device.type == "cpu" and s.torch_dtype == part.dtype and not t.transpose:
                    _read_into(files[s.path], s, part)
                else:  # a transpose, a cast or another device: through a copy of this one tensor
                    x = torch.empty(s.shape, dtype=s.torch_dtype)
                    _read_into(files[s.path], s, x)
                    part.copy_(x.T if t.transpose else x)
                offset += rows
    if cfg.pos == "rope":
        model.inv_freq = rope_frequencies(cfg).to(device)
    return model.eval(), tokenizer


def describe_hf(model_dir: Path) -> dict[str, Any]:
    """`describe` for a Hugging Face dir: config, tokenizer and every weights file's header are read and checked."""
    hf, cfg = _read_config(model_dir)
    tokenizer = load_hf_tokenizer(model_dir)
    files = {s.path for s in _find_weights(model_dir).values()}
    size = sum(p.stat().st_size for p in files)
    return model_summary(model_dir, cfg, tokenizer, f"Hugging Face ({model_type_of(hf)})", size)


HF = ModelFormat("Hugging Face", is_hf_dir, load_hf, describe_hf)
"""The entry of formats.FORMATS that makes an HF dir work wherever a model dir does."""


def import_hf(hf_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> None:
    """Convert a Hugging Face model dir into a yunque model dir, keeping tokenizer_config.json (special tokens,
    chat template) and generation_config.json as they are. An existing non-empty `out_dir` is refused unless
    `force`; the output appears whole or not at all (see output.py)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_output(out_dir, force=force, sources=(hf_dir,))  # before the work, not after it
    model, tokenizer = load_hf(hf_dir)
    with staged_dir(out_dir, force=force, sources=(hf_dir,)) as staging:
        save_model(staging, model, tokenizer)
        for name in EXTRA_FILES:
            if (hf_dir / name).is_file():
                atomic_write(staging / name, lambda p, src=hf_dir / name: shutil.copyfile(src, p))


# ---- export ----

def export_hf(model_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> None:
    """Write a model dir as a Hugging Face dir that `AutoModelForCausalLM` and `AutoTokenizer` load, and that
    encodes, chats and stops as yunque does (start token, chat template, end of turn: see hf_tokenizer.py).

    GPT-2-style configs become GPT2LMHeadModel; Llama-style ones LlamaForCausalLM, or Qwen2 (qkv_bias) or Qwen3
    (qk_norm). ValueError saying why for a config no HF family can hold. An existing non-empty `out_dir` is
    refused unless `force`; the output appears whole or not at all (see output.py).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_output(out_dir, force=force, sources=(model_dir,))
    model, tokenizer = load_model(model_dir)
    dequantize_model(model)  # a quantized model dir (`yunque quantize`) goes out with its dequantized weights
    cfg = model.cfg
    state = weights_of(model)
    tensors = {}
    for t in layout(model):
        pieces = state[t.name].split(list(t.rows))
        for name, x in zip(t.hf, pieces):
            # split pieces share storage, which safetensors refuses: each is written from its own copy
            tensors[name] = x.T.contiguous() if t.transpose else x.clone() if len(pieces) > 1 else x
    tok_config = export_tokenizer_config(model_dir, tokenizer, cfg.max_seq_len)
    special_ids = special_token_ids(tokenizer, tok_config)
    hf_config = config_to_hf(cfg, special_ids, state["tok_emb.weight"].dtype)
    gen_config = {**special_ids, "eos_token_id": stop_token_ids(tokenizer, tok_config),
                  **side_file(model_dir, GENERATION_CONFIG)}
    tokenizer_json = export_tokenizer_json(tokenizer)

    with staged_dir(out_dir, force=force, sources=(model_dir,)) as staging:
        files = [(staging / CONFIG, _json_writer(hf_config)),
                 (staging / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"})),
                 (staging / TOKENIZER, lambda p: Path(p).write_text(tokenizer_json, encoding="utf-8")),
                 (staging / TOKENIZER_CONFIG, _json_writer(tok_config)),
                 (staging / GENERATION_CONFIG, _json_writer(gen_config))]
        files += [(staging / name, lambda p, src=model_dir / name: shutil.copyfile(src, p))
                  for name in ("special_tokens_map.json", "chat_template.jinja") if (model_dir / name).is_file()]
        atomic_write_all(files)


def _json_writer(obj: dict[str, Any]):
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    return lambda p: Path(p).write_text(text, encoding="utf-8")


__all__ = ["HF", "INDEX", "describe_hf", "export_hf", "import_hf", "is_hf_dir", "load_hf", "weight_files"]
