"""Model directories on disk: config.json + model.safetensors + tokenizer.json.

Every stage reads and writes this layout. Weights load only from safetensors (no pickled code). `load_model` and
`describe` open any format that formats.py lists (this one, Hugging Face dirs, ...); the yunque format and LoRA
adapter dirs are defined here, as the YUNQUE and ADAPTER entries.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from yunque import formats
from yunque.atomic import atomic_write
from yunque.config import LoraConfig, ModelConfig
from yunque.formats import ModelFormat
from yunque.model.gpt import GPT, meta_model, rope_frequencies
from yunque.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from yunque.model.quant import BITS, describe_quantization, quantization_of, quantize_model
from yunque.tokenizer.bpe import Tokenizer, load_tokenizer

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
                      "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}
"""safetensors dtype names yunque reads; old checkpoints keep integer and bool buffers next to the weights."""
MAX_HEADER = 100 * 2**20
"""Largest safetensors header read (the safetensors library's own limit): a larger one is a corrupt file."""


def weights_of(model: GPT) -> dict[str, torch.Tensor]:
    """State dict without the tied output head (safetensors stores each tensor once)."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_config(model_dir: str | Path, cfg: ModelConfig, quantization: dict[str, Any] | None = None) -> None:
    """config.json: the architecture, and for a quantized model its scheme ("quantization", see model/quant.py)."""
    extra = {"quantization": quantization} if quantization else {}
    text = json.dumps({"model_type": "yunque", **cfg.to_dict(), **extra}, indent=2) + "\n"
    atomic_write(Path(model_dir) / CONFIG, lambda p: Path(p).write_text(text, encoding="utf-8"))


def write_weights(path: str | Path, model: GPT, metadata: dict[str, str] | None = None) -> None:
    """Write the weights to `path` as they are (not atomically: see `save_weights`)."""
    save_file(weights_of(model), str(path), metadata=metadata)


def save_weights(model_dir: str | Path, model: GPT, metadata: dict[str, str] | None = None) -> None:
    atomic_write(Path(model_dir) / WEIGHTS, lambda p: write_weights(p, model, metadata))


def save_model(model_dir: str | Path, model: GPT, tokenizer: Tokenizer) -> None:
    """Write a complete model dir (config, weights, tokenizer)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    save_config(model_dir, model.cfg, quantization_of(model))
    tokenizer.save(model_dir)
    save_weights(model_dir, model)


def load_config(model_dir: str | Path) -> ModelConfig:
    return _read_config(model_dir)[0]


def load_quantization(model_dir: str | Path) -> dict[str, Any] | None:
    """config.json's "quantization" ({"method": "int8"} or {"method": "int4", "group_size": G}, with "tied_head":
    true where a tied output head is quantized too), None for a floating-point model dir."""
    return _read_config(model_dir)[1]


def _read_config(model_dir: str | Path) -> tuple[ModelConfig, dict[str, Any] | None]:
    path = Path(model_dir) / CONFIG
    if not Path(model_dir).is_dir():
        raise ValueError(f"{model_dir}: not a model directory; pass a directory made by `yunque pretrain`")
    if not path.is_file():
        raise ValueError(f"{path}: missing; a model directory needs {CONFIG}, {WEIGHTS} and {TOKENIZER}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the model directory is corrupt") from None
    if not isinstance(d, dict):
        raise ValueError(  # noqa: TRY004 (a ValueError is what the CLI reports as one line)
            f"{path}: holds a JSON {type(d).__name__}, not an object; the model directory is corrupt")
    d.pop("model_type", None)
    quantization = d.pop("quantization", None)
    if quantization is not None and not (
            isinstance(quantization, dict) and quantization.get("method") in BITS
            and (quantization["method"] == "int8" or isinstance(quantization.get("group_size"), int))
            and isinstance(quantization.get("tied_head", False), bool)):
        raise ValueError(f"{path}: \"quantization\" is {json.dumps(quantization)[:80]}, not {{\"method\": \"int8\"}} "
                         f"or {{\"method\": \"int4\", \"group_size\": G}}; the model directory is corrupt")
    try:
        return ModelConfig.from_dict(d), quantization
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file, as its header says (checked against the file's size)."""

    path: Path
    dtype: str
    """safetensors' name for it: "BF16", "F32", ... (a key of SAFETENSORS_DTYPES)."""
    shape: tuple[int, ...]
    start: int
    """Byte offset of its data in the file."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]


def read_safetensors_header(path: str | Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """({tensor name: where it lies}, metadata) of a safetensors file, from its header alone; the one reader of
    safetensors headers in yunque. Every entry is checked against the file's size, so a truncated or corrupt
    file is a one-line ValueError here, before anything is allocated for it.

    The format: an 8-byte little-endian header length n, n bytes of JSON {name: {"dtype", "shape",
    "data_offsets": [begin, end]}} (and "__metadata__": {str: str}), then the data, offsets counted from its start.
    """
    path = Path(path)

    def corrupt(why: str) -> ValueError:
        return ValueError(f"{path}: {why}; the file is corrupt or truncated")

    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            if size < 8:
                raise corrupt(f"{size} bytes, too short for a safetensors header")
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER:
                raise corrupt(f"header of {n} bytes is larger than safetensors allows ({MAX_HEADER} bytes)")
            if 8 + n > size:
                raise corrupt(f"header of {n} bytes runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise ValueError(f"{path}: cannot read weights ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise corrupt(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise corrupt("header's __metadata__ is not a JSON object of strings")
    tensors = {}
    for name, entry in header.items():
        try:
            kind, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(i, int) and i >= 0 for i in (*shape, begin, end)):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise corrupt(f"tensor {name} has a malformed header entry {str(entry)[:80]}") from None
        if kind not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {kind!r}; yunque reads "
                             f"{', '.join(SAFETENSORS_DTYPES)}")
        need = math.prod(shape) * SAFETENSORS_DTYPES[kind].itemsize
        if end - begin != need:
            raise corrupt(f"tensor {name} holds {end - begin} bytes but {kind} {shape} needs {need}")
        if 8 + n + end > size:
            raise corrupt(f"tensor {name} ends at byte {8 + n + end} but the file has {size} bytes")
        tensors[name] = StoredTensor(path, kind, shape, 8 + n + begin)
    return tensors, metadata


def _weights_header(model_dir: str | Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    path = Path(model_dir) / WEIGHTS
    if not path.is_file():
        raise ValueError(f"{path}: missing; the model directory has no weights (was training interrupted "
                         f"before the first checkpoint?)")
    return read_safetensors_header(path)


def weights_metadata(model_dir: str | Path) -> dict[str, str]:
    """Safetensors metadata of a model dir's weights, reading only the header; a clear error for a missing,
    truncated or corrupt file."""
    return _weights_header(model_dir)[1]


def load_weights(model_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of a model dir; a clear error for a missing or truncated file."""
    metadata = weights_metadata(model_dir)
    path = Path(model_dir) / WEIGHTS
    try:
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read weights ({e}); the file is corrupt or truncated") from None


def load_model(model_dir: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """Load (model in eval mode, tokenizer) from a model dir of any format in `formats.FORMATS`: ours, a Hugging
    Face one (interop/hf.py), ... The weights keep the dtype they were saved in (bf16 stays bf16) unless `dtype`
    is given, and are held once."""
    return formats.load(model_dir, device=device, dtype=dtype)


def describe(model_dir: str | Path) -> dict[str, Any]:
    """What `yunque info` shows for a model dir of any format: architecture, size, cost per token, context,
    tokenizer, training summary (or, for a LoRA adapter dir, the adapter and its base model)."""
    return formats.describe(model_dir)


def is_yunque_dir(path: Path) -> bool:
    """Whether `path` holds a config.json that yunque wrote (model_type "yunque")."""
    try:
        d = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("model_type") == "yunque"


def load_yunque(model_dir: str | Path, *, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """(model in eval mode, tokenizer) from a yunque model dir: the model is built on the meta device, every
    tensor's shape is checked against the safetensors header, and only then are the weights read and taken as
    its parameters."""
    cfg, quantization = _read_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    stored, _ = _weights_header(model_dir)
    model = meta_model(cfg)
    if quantization is not None:  # the frame's target layers become empty QuantLinears (model/quant.py)
        try:
            quantize_model(model, quantization["method"], quantization.get("group_size", 0),
                           tied_head=quantization.get("tied_head", False))
        except ValueError as e:
            raise ValueError(f"{Path(model_dir) / CONFIG}: {e}") from None
    check_shapes(model, {name: s.shape for name, s in stored.items()}, model_dir)  # before anything is allocated
    state, _ = load_weights(model_dir)
    load_state(model, state, model_dir, assign=True)
    if cfg.pos == "rope":
        model.inv_freq = rope_frequencies(cfg)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tokenizer


def check_shapes(model: GPT, shapes: dict[str, tuple[int, ...]], source: str | Path) -> None:
    """ValueError naming missing, unexpected or mis-shaped tensors: `shapes` (name -> shape, e.g. read from a
    safetensors header) against what `model`'s config implies."""
    expected = weights_of(model)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match config.json (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); the model directory is corrupt")
    for name, shape in shapes.items():
        if tuple(shape) != tuple(expected[name].shape):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(shape)} but config.json implies "
                             f"{tuple(expected[name].shape)}")


def load_state(model: GPT, state: dict[str, torch.Tensor], source: str | Path, *, assign: bool = False) -> None:
    """Put weights into model (copied into its parameters, or taken as them with assign=True), naming missing,
    unexpected or mis-shaped tensors."""
    check_shapes(model, {name: tuple(t.shape) for name, t in state.items()}, source)
    model.load_state_dict(state, strict=False, assign=assign)
    if model.cfg.tie_embeddings and type(model.lm_head) is nn.Linear:  # not a quantized copy (model/quant.py)
        model.lm_head.weight = model.tok_emb.weight


def generation_stop_ids(model_dir: str | Path, vocab_size: int) -> set[int]:
    """The end-of-sequence ids that the model dir's generation_config.json names (`eos_token_id`: one id or a
    list, as Hugging Face models ship it, e.g. Llama 3's end of text and end of turn), or a GGUF's own; empty
    without the file."""
    path = Path(model_dir) / "generation_config.json"
    bundled = formats.bundled_file(model_dir, "generation_config.json")  # a GGUF's own stop ids
    if bundled is not None:
        eos = bundled.get("eos_token_id")
    elif not path.is_file():
        return set()
    else:
        try:
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{path}: not a JSON object ({e}); fix or delete the file") from None
    ids = eos if isinstance(eos, list) else [eos]
    return {i for i in ids if isinstance(i, int) and 0 <= i < vocab_size}


def describe_yunque(model_dir: Path) -> dict[str, Any]:
    (cfg, quantization), tokenizer = _read_config(model_dir), load_tokenizer(model_dir)
    weights_metadata(model_dir)  # a missing or truncated file is an error here too, not a size to report
    d = model_summary(model_dir, cfg, tokenizer, "yunque", (Path(model_dir) / WEIGHTS).stat().st_size)
    if quantization is not None:
        head = " (the tied output head as a copy; the embedding in float)" if quantization.get("tied_head") else ""
        d["quantization"] = f"{describe_quantization(quantization)}, weight-only, linear layers{head}"
    return d


def model_summary(model_dir: Path, cfg: ModelConfig, tokenizer: Tokenizer, fmt: str, size: int) -> dict[str, Any]:
    """`describe`'s dict for a model of any format, from its config, tokenizer and bytes of weights."""
    style = "llama" if cfg.pos == "rope" else "gpt2"
    d = {
        "model": str(model_dir),
        "format": fmt,
        "architecture": f"{style}-style decoder: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads"
                        + (f" ({cfg.kv_heads} kv heads)" if cfg.kv_heads != cfg.n_head else "")
                        + f", {cfg.pos} positions, {cfg.norm}, {cfg.mlp}",
        "parameters": f"{cfg.num_params():,} ({cfg.num_params(embeddings=False):,} without embeddings)",
        "flops_per_token": f"{cfg.flops_per_token():,} (training, at full context)",
        "context": cfg.max_seq_len,
        "tokenizer": f"{tokenizer.kind}, {tokenizer.vocab_size} tokens",
        "weights": f"{size / 2**20:.1f} MiB",
    }
    return d | training_summary(model_dir)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, one per logged step. Lines that do not parse are skipped: a kill
    while a line was being appended leaves the last one cut."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def checkpoint_progress(run_dir: str | Path) -> tuple[int, int | None] | None:
    """(step, planned steps or None) of the training checkpoint in `run_dir` (train_state.pt beside weights whose
    header carries the step), read from the header alone; None if there is no readable checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "train_state.pt").is_file():
        return None
    for name in (WEIGHTS, ADAPTER_WEIGHTS):
        if (run_dir / name).is_file():
            try:
                meta = read_safetensors_header(run_dir / name)[1]
            except ValueError:
                return None
            step, total = meta.get("step", ""), meta.get("max_steps", "")
            return (int(step), int(total) if total.isdigit() else None) if step.isdigit() else None
    return None


def training_summary(run_dir: Path) -> dict[str, Any]:
    """{"training": steps, final loss, last validation loss, minutes, and for a run dir whether it finished or
    stopped (and how to continue it)} from metrics.jsonl and the checkpoint, or {} without them."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not records:
        return {}
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    summary = {"steps": records[-1]["step"], "final_loss": losses[-1] if losses else None,
               "val_loss": vals[-1] if vals else None, "minutes": round(records[-1].get("elapsed", 0) / 60, 1)}
    progress, stage = checkpoint_progress(run_dir), _run_stage(run_dir)
    if progress is not None and stage is not None:
        step, total = progress
        if step == total:
            summary["status"] = f"finished ({stage})"
        else:
            summary["status"] = (f"stopped at step {step}" + (f" of {total}" if total else "")
                                 + f"; `yunque {stage} --out {run_dir} --resume` continues it")
    return {"training": summary}


def _run_stage(run_dir: Path) -> str | None:
    try:
        stage = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, str) else None


# ---- LoRA adapter dirs: described, not loaded on their own ----

def is_adapter_dir(path: Path) -> bool:
    """Whether `path` holds a LoRA adapter (adapter_config.json) rather than a model (config.json)."""
    return (path / ADAPTER_CONFIG).is_file() and not (path / CONFIG).is_file()


def load_adapter_dir(adapter_dir: Path, **_: Any) -> tuple[GPT, Tokenizer]:
    raise ValueError(f"{adapter_dir} is a LoRA adapter, not a model; apply it to its base model (`yunque chat BASE "
                     f"--adapter {adapter_dir}`) or fold it in (`yunque merge BASE {adapter_dir} OUT`)")


def describe_adapter(adapter_dir: Path) -> dict[str, Any]:
    """`describe` for a LoRA adapter dir: rank, alpha, targets, base model, adapter parameters and size."""
    path = adapter_dir / ADAPTER_CONFIG
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        cfg = LoraConfig(rank=d["rank"], alpha=d["alpha"], dropout=d.get("dropout", 0.0), targets=tuple(d["targets"]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a yunque LoRA adapter config ({type(e).__name__}: {e})") from None
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{weights}: missing; an adapter dir (made by `yunque sft --lora`) holds {ADAPTER_CONFIG} "
                         f"and {ADAPTER_WEIGHTS}")
    tensors, _ = read_safetensors_header(weights)
    return {
        "model": str(adapter_dir),
        "format": "LoRA adapter",
        "adapter": f"rank {cfg.rank}, alpha {cfg.alpha:g}, targets {', '.join(cfg.targets)}",
        "base_model": str(d.get("base_model") or "not recorded"),
        "parameters": f"{sum(math.prod(t.shape) for t in tensors.values()):,} (adapter only)",
        "weights": f"{weights.stat().st_size / 2**20:.1f} MiB",
    } | training_summary(adapter_dir)


YUNQUE = ModelFormat("yunque", is_yunque_dir, load_yunque, describe_yunque)
ADAPTER = ModelFormat("LoRA adapter", is_adapter_dir, load_adapter_dir, describe_adapter)
