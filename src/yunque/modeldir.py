"""Model directories on disk: config.json + model.safetensors + tokenizer.json.

Every stage reads and writes this layout. Weights load only from safetensors (no pickled code).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from yunque.atomic import atomic_write, atomic_write_all
from yunque.config import ModelConfig
from yunque.model.gpt import GPT, meta_model, rope_frequencies
from yunque.tokenizer.bpe import Tokenizer, load_tokenizer

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"


def weights_of(model: GPT) -> dict[str, torch.Tensor]:
    """State dict without the tied output head (safetensors stores each tensor once)."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_config(model_dir: str | Path, cfg: ModelConfig) -> None:
    text = json.dumps({"model_type": "yunque", **cfg.to_dict()}, indent=2) + "\n"
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
    save_config(model_dir, model.cfg)
    tokenizer.save(model_dir)
    save_weights(model_dir, model)


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / CONFIG
    if not Path(model_dir).is_dir():
        raise ValueError(f"{model_dir}: not a model directory; pass a directory made by `yunque pretrain`")
    if not path.is_file():
        raise ValueError(f"{path}: missing; a model directory needs {CONFIG}, {WEIGHTS} and {TOKENIZER}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the model directory is corrupt") from None
    d.pop("model_type", None)
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def weights_metadata(model_dir: str | Path) -> dict[str, str]:
    """Safetensors metadata of a model dir's weights, reading only the header (which safetensors checks against
    the file size); a clear error for a missing or truncated file."""
    path = Path(model_dir) / WEIGHTS
    if not path.is_file():
        raise ValueError(f"{path}: missing; the model directory has no weights (was training interrupted "
                         f"before the first checkpoint?)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read weights ({e}); the file is corrupt or truncated") from None


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
    """Load (model in eval mode, tokenizer) from a model dir, ours or a Hugging Face one (see interop/hf.py).

    The weights keep the dtype they were saved in (bf16 stays bf16) unless `dtype` is given, and are held once:
    the model is built on the meta device and takes the loaded tensors as its parameters.
    """
    from yunque.interop.hf import is_hf_dir, load_hf  # imported here: interop sits above modeldir

    if is_hf_dir(model_dir):
        return load_hf(model_dir, device=device, dtype=dtype)
    cfg = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    state, _ = load_weights(model_dir)
    model = meta_model(cfg)
    load_state(model, state, model_dir, assign=True)
    if cfg.pos == "rope":
        model.inv_freq = rope_frequencies(cfg)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tokenizer


def load_state(model: GPT, state: dict[str, torch.Tensor], source: str | Path, *, assign: bool = False) -> None:
    """Put weights into model (copied into its parameters, or taken as them with assign=True), naming missing,
    unexpected or mis-shaped tensors."""
    expected = weights_of(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match config.json (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); the model directory is corrupt")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)} but config.json implies "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False, assign=assign)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight


def generation_stop_ids(model_dir: str | Path, vocab_size: int) -> set[int]:
    """The end-of-sequence ids that the model dir's generation_config.json names (`eos_token_id`: one id or a
    list, as Hugging Face models ship it, e.g. Llama 3's end of text and end of turn); empty without the file."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return set()
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a JSON object ({e}); fix or delete the file") from None
    ids = eos if isinstance(eos, list) else [eos]
    return {i for i in ids if isinstance(i, int) and 0 <= i < vocab_size}


def describe(model_dir: str | Path) -> dict:
    """What `yunque info` shows: architecture, size, cost per token, context, tokenizer, training summary."""
    model_dir = Path(model_dir)
    from yunque.interop.hf import is_hf_dir  # imported here: interop sits above modeldir

    if is_hf_dir(model_dir):
        from yunque.interop.hf import config_from_hf, load_hf_tokenizer

        hf = json.loads((model_dir / CONFIG).read_text(encoding="utf-8"))
        cfg, tokenizer, fmt = config_from_hf(hf), load_hf_tokenizer(model_dir), f"Hugging Face ({hf['model_type']})"
        size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    else:
        cfg, tokenizer, fmt = load_config(model_dir), load_tokenizer(model_dir), "yunque"
        weights_metadata(model_dir)  # a missing or truncated file is an error here too, not a size to report
        size = (model_dir / WEIGHTS).stat().st_size
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
    metrics = model_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        if records:
            last = records[-1]
            vals = [r["val_loss"] for r in records if "val_loss" in r]
            d["training"] = {"steps": last["step"], "final_loss": last["loss"],
                             "val_loss": vals[-1] if vals else None,
                             "minutes": round(last.get("elapsed", 0) / 60, 1)}
    return d
