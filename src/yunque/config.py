"""Frozen configuration dataclasses: the model architecture and its named presets.

The same field names are used in config.json, CLI flags and logs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only transformer (GPT-2 style or Llama style)."""

    vocab_size: int = 4096
    """Rows of the token embedding (and of the output head)."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Query heads per attention layer."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention); None means n_head (plain multi-head attention)."""
    d_model: int = 128
    """Width of the residual stream."""
    d_ff: int | None = None
    """Hidden width of the MLP; None means 4*d_model for GELU, or 8/3*d_model rounded up to 64 for SwiGLU."""
    head_dim: int | None = None
    """Width of one attention head; None means d_model // n_head."""
    max_seq_len: int = 256
    """Longest context the model is trained and served with."""
    pos: str = "rope"
    """Position encoding: "rope" (rotary, Llama) or "learned" (absolute embeddings, GPT-2)."""
    norm: str = "rmsnorm"
    """"rmsnorm" (Llama) or "layernorm" (GPT-2)."""
    mlp: str = "swiglu"
    """"swiglu" (Llama) or "gelu" (GPT-2, tanh approximation)."""
    bias: bool = False
    """Biases in every linear layer and norm (GPT-2)."""
    qkv_bias: bool = False
    """Biases on the query/key/value projections only (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm on each query and key head before rotary (Qwen3)."""
    tie_embeddings: bool = True
    """Output head shares the token embedding matrix."""
    norm_eps: float = 1e-5
    """Epsilon of every norm."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    rope_scaling: dict | None = None
    """Llama 3 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}; None for none."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches while training."""

    def __post_init__(self) -> None:
        problem = next(self._problems(), None)
        if problem:
            raise ValueError(problem)

    def _problems(self) -> Iterator[str]:
        # checked in order and lazily: later checks divide by fields that earlier ones have vetted
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) <= 0:
                yield f"{name} must be positive, got {getattr(self, name)}"
        for name in ("n_kv_head", "head_dim", "d_ff"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                yield f"{name} must be positive (or None for the default), got {getattr(self, name)}"
        if self.pos not in ("rope", "learned"):
            yield f"pos must be 'rope' or 'learned', got {self.pos!r}"
        if self.norm not in ("rmsnorm", "layernorm"):
            yield f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}"
        if self.mlp not in ("swiglu", "gelu"):
            yield f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}"
        if self.head_dim is None and self.d_model % self.n_head != 0:
            yield f"d_model={self.d_model} is not divisible by n_head={self.n_head}"
        if self.n_head % self.kv_heads != 0:
            yield f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}"
        if self.pos == "rope" and self.dim_head % 2 != 0:
            yield f"rotary needs an even head_dim, got {self.dim_head}"
        s = self.rope_scaling
        if s and (s.get("rope_type", "llama3") not in ("llama3", "linear") or "factor" not in s):
            yield f"rope_scaling needs a 'factor' and rope_type 'llama3' (the default) or 'linear', got {s!r}"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 64 * -(-(8 * self.d_model // 3) // 64)  # 8/3 d rounded up to 64 for matmul tiles

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count computed from the shapes (matches sum(p.numel()) of the built model)."""
        d, hd, L = self.d_model, self.dim_head, self.n_layer
        q, kv = self.n_head * hd, self.kv_heads * hd
        attn = d * (q + 2 * kv) + q * d
        if self.bias:
            attn += q + 2 * kv + d
        elif self.qkv_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * hd
        n_mats = 3 if self.mlp == "swiglu" else 2
        mlp = n_mats * d * self.ff_dim + (((n_mats - 1) * self.ff_dim + d) if self.bias else 0)  # up (fused), down
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        block = attn + mlp + 2 * norm
        total = L * block + norm
        emb = self.vocab_size * d + (self.max_seq_len * d if self.pos == "learned" else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return total + head + (emb if embeddings else 0)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward = 6N plus attention), as in Kaplan et al. 2020 / PaLM."""
        T = seq_len or self.max_seq_len
        # the output head is a matmul even when its weight is tied to the (lookup-only) embedding
        n = self.num_params(embeddings=False) + (self.vocab_size * self.d_model if self.tie_embeddings else 0)
        return 6 * n + 12 * self.n_layer * self.n_head * self.dim_head * T

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(names)}")
        return cls(**d)


# Named presets. Llama style (RoPE, RMSNorm, SwiGLU, no biases) unless they say otherwise.
# Sizes below are for vocab_size 4096; parameters scale with the vocabulary through the embedding.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=4, d_model=64, max_seq_len=256),  # ~0.36M: tests and quick runs
    "mini": dict(n_layer=4, n_head=4, d_model=128, max_seq_len=256),  # ~1.3M
    "small": dict(n_layer=6, n_head=6, d_model=288, max_seq_len=512),  # ~7M
    "base": dict(n_layer=8, n_head=8, d_model=512, max_seq_len=1024),  # ~27M
    "medium": dict(n_layer=10, n_head=10, n_kv_head=5, d_model=640, max_seq_len=1024),  # ~48M
    "large": dict(n_layer=12, n_head=14, n_kv_head=2, d_model=896, max_seq_len=2048),  # ~104M
    "gpt2-tiny": dict(n_layer=2, n_head=4, d_model=64, max_seq_len=256, pos="learned", norm="layernorm",
                      mlp="gelu", bias=True),
    "gpt2-small": dict(n_layer=12, n_head=12, d_model=768, max_seq_len=1024, pos="learned", norm="layernorm",
                       mlp="gelu", bias=True),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """ModelConfig for a named preset, with fields overridden (e.g. vocab_size from the tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def save_json(obj: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def load_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


__all__ = ["ModelConfig", "PRESETS", "preset", "save_json", "load_json"]
