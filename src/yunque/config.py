"""Frozen configuration dataclasses: the model architecture and its presets, and one config per stage.

The same field names are used in config.json, run.json, CLI flags (generated from these fields and the docstring
under each, by cli/flags.py) and logs. This module imports nothing heavy, so `yunque --help` starts fast; each
config checks its own values and names the offending field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


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
        # checked in order and lazily: later checks divide by fields that earlier ones have vetted. Configs come
        # from files anyone can write (config.json of a downloaded model), so types and sizes are checked too,
        # before anything is allocated.
        yield from _type_problems(self)
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is not None and value > limit:
                yield f"{name}={value} is larger than yunque allows ({limit:,}); is config.json from a real model?"
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
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys are {sorted(names)}")
        return cls(**d)


LIMITS = {"vocab_size": 1 << 24, "n_layer": 1024, "n_head": 1024, "n_kv_head": 1024, "d_model": 1 << 16,
          "d_ff": 1 << 18, "head_dim": 1 << 12, "max_seq_len": 1 << 21}
"""Upper bounds on a ModelConfig's sizes: well above any released model (the largest vocabularies hold ~256k
tokens), low enough that a corrupt or hostile config.json fails with one line instead of allocating terabytes."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """typing.get_type_hints(cls), once a class: it evaluates every annotation's string at each call. Making a
    SamplingParams (one a request in a server) took 250 us with a call each time, 36 us with this (medians of 7
    rounds of 500, Zen 4)."""
    return typing.get_type_hints(cls)


def _type_problems(obj: Any) -> Iterator[str]:
    """A dataclass's field values against their annotations: int (not bool), float (finite), str, bool, None,
    Literal choices, tuples and dicts; one message per wrong field."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if not _fits(value, hint):
            shown = repr(value) if len(repr(value)) < 40 else repr(value)[:37] + "..."
            yield f"{f.name} must be {_describe(hint)}, got {shown}"


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        inner = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return len(inner) == len(value) and all(_fits(v, a) for v, a in zip(value, inner))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # nested configs check themselves


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if hint is type(None):
        return "null"
    if hint is float:
        return "a finite number"
    if origin is tuple:
        return "a list"
    return {int: "an integer", str: "a string", bool: "true or false", dict: "an object"}.get(hint, str(hint))


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





# ---- one config per stage ----

Precision = Literal["auto", "bf16", "fp32"]
"""Number format of the matrix products: bf16 where the hardware multiplies it natively ("auto"), or forced."""
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


def check(obj: Any, problems: Iterator[str] | None = None) -> None:
    """ValueError with the first problem of a config: a field of the wrong type, or one of `problems`."""
    problem = next(_type_problems(obj), None) or next(problems or iter(()), None)
    if problem:
        raise ValueError(problem)


@dataclass(frozen=True)
class LoopConfig:
    """How to train: steps or time budget, optimizer, schedule, precision, logging and checkpoints."""

    out_dir: str = ""
    """Run directory: checkpoints, metrics.jsonl and loss.png go here (set by the stage from its --out)."""
    max_steps: int | None = None
    """Optimizer steps to take. None: as many as fit in --minutes if given, the run's own count on --resume, else
    1000. Given on --resume, it is the run's new total (its schedule stretches or shrinks to it)."""
    minutes: float | None = None
    """Wall-clock budget instead of a step count: the steps it affords are measured as the run goes (a slower
    machine shortens it), and warmup and schedule fit them. On --resume: this many more minutes."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 100
    """Linear warmup steps (at most a fifth of the run: a short run warms up for a fifth of its steps)."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """Learning-rate decay after warmup: cosine, or wsd (warmup-stable-decay: flat, then a linear decay over the
    last fifth)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms, biases or embeddings)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """adamw, or muon: Muon on the blocks' matrices and AdamW on the rest. On small CPU runs Muon needs ~10% fewer
    steps but its steps take twice as long (benchmarks/time_to_loss.py)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the batch grows by this factor at the same memory)."""
    precision: Precision = "auto"
    """bf16 autocast with fp32 master weights, fp32, or auto: bf16 where the hardware multiplies it natively
    (CPUs with AVX-512 BF16 or AMX, recent GPUs), fp32 elsewhere."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the training step: on, off, or auto: on once the first steps show that the time left repays
    the 10-45 s that compiling takes on two CPU cores. A compile that fails falls back to eager with a notice."""
    threads: int = 0
    """CPU threads for matrix products (0: one per physical core)."""
    eval_every: int = 250
    """Validate every N steps (and at the end); 0: only at the end."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    checkpoint_every: int = 0
    """Also checkpoint every N steps (0: only by time, on Ctrl-C and at the end)."""
    checkpoint_minutes: float = 5.0
    """Checkpoint after this many minutes of training since the last one (0: never by time). Ctrl-C or SIGTERM
    checkpoints too, so --resume can always continue."""
    resume: bool = False
    """Continue the run in --out from its checkpoint, with the settings saved in its run.json."""
    progress: bool = True
    """Show a progress bar."""
    device: str = "cpu"
    """Where to train: cpu, cuda, cuda:1, ..."""
    tokens_per_step: int = 0
    """Tokens in one optimizer step, for tokens/s (set by the stage; 0 to skip)."""
    trainable_only: bool = False
    """Checkpoint only the parameters being trained (LoRA adapters); the frozen rest comes from the base model."""
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    """Under torchrun: ddp (a whole copy of the model per process, gradients all-reduced), fsdp (FSDP2: weights,
    gradients and optimizer state sharded per block, gathered when used), or auto: ddp where weights, gradients and
    AdamW's state fit in half of each process's memory, fsdp otherwise."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them: less memory, ~1/3 more compute."""
    peer_timeout: float = 600.0
    """Under torchrun: seconds a process waits for the others (a collective, a checkpoint) before the job fails."""
    world_size: int = 1
    """Processes training together (set from torchrun's environment). --batch-size is per process: a step sees
    batch_size x grad_accum x world_size sequences."""

    def __post_init__(self) -> None:
        check(self, self._problems())

    def _problems(self) -> Iterator[str]:
        if self.max_steps is not None and self.minutes is not None:
            yield "give one budget: a step count (--max-steps) or a time budget (--minutes), not both"
        if (self.max_steps is not None and self.max_steps < 1) or (self.minutes is not None and self.minutes <= 0):
            yield f"the budget must be positive, got max_steps={self.max_steps}, minutes={self.minutes}"
        if self.threads < 0:
            yield f"threads must be 0 (one per physical core) or more, got {self.threads}"
        if not self.lr > 0:
            yield f"lr must be positive, got {self.lr}"
        if not 0 <= self.min_lr_ratio <= 1:
            yield f"min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}"
        if self.peer_timeout <= 0:
            yield f"peer_timeout must be positive, got {self.peer_timeout}"
        for name in ("grad_accum", "log_every", "world_size"):
            if getattr(self, name) < 1:
                yield f"{name} must be at least 1, got {getattr(self, name)}"
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "checkpoint_minutes", "weight_decay",
                     "grad_clip"):
            if getattr(self, name) < 0:
                yield f"{name} must be 0 or more, got {getattr(self, name)}"


DEFAULT_STEPS = 1000
"""Steps of a run given neither --max-steps nor --minutes."""


@dataclass(frozen=True)
class PretrainConfig:
    """A pretraining run: next-token prediction on unlabeled text."""

    out: str
    """Run directory to create; it becomes the model dir."""
    data: tuple[str, ...] = ()
    """Text files, folders or jsonl files (.gz too); empty means the built-in corpus (Python's own source and docs)."""
    text_field: str = "text"
    """Field holding the text in jsonl records."""
    preset: str = "mini"
    """Named model size: one of PRESETS (tiny, mini, small, base, medium, large, gpt2-tiny, gpt2-small)."""
    tokenizer: str | None = None
    """"bytes" (one token per byte), or a dir / tokenizer.json to reuse; None trains a byte-level BPE on the data."""
    vocab_size: int = 4096
    """Vocabulary size when a BPE tokenizer is trained."""
    batch_size: int = 16
    """Sequences per micro-batch (per process under torchrun)."""
    seq_len: int | None = None
    """Training context in tokens; None means the preset's max_seq_len."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields that replace the preset's (n_layer, d_model, dropout, ...)."""
    val_fraction: float = 0.05
    """Share of documents held out for validation."""
    eval_batches: int = 20
    """Validation batches per evaluation (each of batch_size sequences)."""
    seed: int = 0
    """Seed for initialisation, the data split and batch order."""
    force: bool = False
    """Replace what --out holds (a model, a run, any files) instead of refusing to touch it."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Optimizer, schedule, precision, budget; its out_dir is set to `out`."""

    def __post_init__(self) -> None:
        check(self, self._problems())

    def _problems(self) -> Iterator[str]:
        if self.preset not in PRESETS:
            yield f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}"
        for name in ("batch_size", "eval_batches", "vocab_size"):
            if getattr(self, name) < 1:
                yield f"{name} must be at least 1, got {getattr(self, name)}"
        if not 0 <= self.val_fraction < 1:
            yield f"val_fraction must be at least 0 and below 1, got {self.val_fraction}"


@dataclass(frozen=True)
class LoraConfig:
    """Which linear layers get low-rank adapters, and their size."""

    rank: int = 8
    """r: inner width of each adapter."""
    alpha: float = 16.0
    """Adapters' output is scaled by alpha / rank, so a rank change needs no new learning rate."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training."""
    targets: tuple[str, ...] = ("qkv", "proj", "up", "down")
    """Linear layers to adapt, by the last part of their module name (qkv, proj, up, down, lm_head)."""

    def __post_init__(self) -> None:
        check(self, self._problems())

    def _problems(self) -> Iterator[str]:
        if self.rank < 1:
            yield f"LoRA rank must be at least 1, got {self.rank}"
        if self.alpha <= 0:
            yield f"LoRA alpha must be positive, got {self.alpha}"
        if not 0.0 <= self.dropout < 1.0:
            yield f"LoRA dropout must be in [0, 1), got {self.dropout}"
        if not self.targets:
            yield "LoRA targets must name at least one layer"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class SFTConfig:
    """A supervised fine-tuning run: a chat assistant from conversations, the whole model or LoRA adapters."""

    model: str
    """Base model dir (yunque's, or a Hugging Face one with a chat template)."""
    data: tuple[str, ...]
    """jsonl (or .jsonl.gz) files of conversations; see `yunque.data.chat_data.SHAPES` for the record shapes."""
    out: str
    """Directory to create: the fine-tuned model dir, or with `lora` the adapter dir."""
    lora: LoraConfig | None = None
    """Train low-rank adapters on a frozen base instead of every weight; None fine-tunes the whole model."""
    max_seq_len: int | None = None
    """Longest conversation trained on, in tokens; None means the model's context."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """A longer conversation is cut at max_seq_len (truncate) or left out (drop); both are counted."""
    batch_size: int = 8
    """Conversations per micro-batch (per process under torchrun)."""
    val_fraction: float = 0.05
    """Share of conversations held out to measure the loss on assistant tokens."""
    eval_batches: int | None = 20
    """Held-out batches per evaluation (each of batch_size conversations); None for all."""
    seed: int = 0
    """Seed for the split, the batch order and the adapters' initialisation."""
    force: bool = False
    """Replace what --out holds instead of refusing to touch it."""
    loop: LoopConfig | None = None
    """Optimizer, schedule, precision, budget; None means `sft_loop(lora)`. Its out_dir is set to `out`."""

    def __post_init__(self) -> None:
        check(self, self._problems())

    def _problems(self) -> Iterator[str]:
        if self.batch_size < 1:
            yield f"batch_size must be at least 1, got {self.batch_size}"
        if self.max_seq_len is not None and self.max_seq_len < 2:
            yield f"max_seq_len must be at least 2, got {self.max_seq_len}"
        if not 0 <= self.val_fraction < 1:
            yield f"val_fraction must be at least 0 and below 1, got {self.val_fraction}"


SFT_LOOP = LoopConfig(max_steps=500, lr=1e-4, warmup_steps=20, weight_decay=0.0, eval_every=100)
"""Fine-tuning's schedule: short, gentle on the whole model."""
LORA_LR = 1e-3
"""Adapters start at zero and are small: they take a larger learning rate than the whole model."""


def sft_loop(lora: bool) -> LoopConfig:
    """The default loop of a fine-tuning run: SFT_LOOP, with LORA_LR for adapters."""
    return dataclasses.replace(SFT_LOOP, lr=LORA_LR) if lora else SFT_LOOP


@dataclass(frozen=True)
class AlignConfig:
    """An alignment run: DPO (or IPO) on preference pairs, or GRPO/PPO on prompts against a reward."""

    model: str
    """The model to align (a fine-tuned chat model dir); it is also the frozen reference."""
    data: tuple[str, ...]
    """DPO: preference pairs (jsonl, HH-RLHF files, feedback dirs); GRPO/PPO: prompts from any of those or any chat
    data (assistant replies are ignored). See `yunque.data.preferences`."""
    out: str
    """Directory to create: the aligned model dir, or with `lora` the adapter dir."""
    method: Literal["dpo", "grpo", "ppo"] = "dpo"
    """dpo: learn from preference pairs directly; grpo: k samples a prompt, rewards relative to their group;
    ppo: a value head, GAE and the clipped objective."""
    loss: Literal["dpo", "ipo"] = "dpo"
    """DPO's loss: dpo (the logistic loss of Rafailov et al. 2023) or ipo (Azar et al. 2023, on per-token mean
    log-probabilities)."""
    reward: str | None = None
    """GRPO/PPO: a reward model dir (`yunque reward train`)."""
    reward_fn: str | None = None
    """GRPO/PPO: module:function, f(prompt: str, completion: str) -> float, imported from the working directory
    (prompt is the last user message)."""
    lora: LoraConfig | None = None
    """Train low-rank adapters on a frozen base instead of every weight."""
    beta: float = 0.1
    """DPO: strength of the leash to the reference (larger: stay closer)."""
    anchor_text: tuple[str, ...] = ()
    """Ordinary text (files, folders, jsonl, as `pretrain --data` reads them) on which the model is held to the
    reference: the KL from the reference's next-token distributions there to the model's is added to the loss, so
    its language outside the chat moves little while its replies change. Empty: no anchor."""
    anchor_coef: float = 1.0
    """Weight of the anchor's KL (nats per token) in the loss."""
    anchor_batch_size: int = 8
    """Windows of anchor text per micro-batch."""
    kl_coef: float = 0.05
    """GRPO/PPO: weight of the per-token KL penalty to the reference."""
    kl_target: float | None = None
    """PPO: adapt kl_coef so the KL per reply approaches this many nats (Ziegler et al. 2019); None keeps it fixed."""
    group_size: int = 8
    """GRPO: samples per prompt (k). PPO: samples per prompt too (1 is plain PPO)."""
    prompts_per_rollout: int = 4
    """Prompts sampled at each rollout (by each process under torchrun); a rollout holds prompts_per_rollout *
    group_size replies (times the number of processes)."""
    max_new_tokens: int = 48
    """Longest reply sampled in a rollout."""
    temperature: float = 1.0
    """Sampling temperature of rollouts."""
    epochs: int = 1
    """GRPO/PPO: passes over each rollout."""
    minibatches: int = 1
    """GRPO/PPO: optimizer steps per pass over a rollout (its replies split evenly)."""
    clip: float = 0.2
    """GRPO/PPO: clipping range of the probability ratio (and of PPO's value change)."""
    gamma: float = 1.0
    """PPO: discount."""
    lam: float = 0.95
    """PPO: GAE's lambda."""
    value_coef: float = 0.5
    """PPO: weight of the value loss."""
    batch_size: int = 8
    """DPO: pairs per micro-batch (of each process under torchrun)."""
    max_seq_len: int | None = None
    """Longest conversation trained on, in tokens; None means the model's context."""
    val_fraction: float = 0.1
    """Share of pairs (DPO) or prompts (GRPO/PPO) held out."""
    eval_batches: int | None = 20
    """DPO: held-out batches per evaluation; None for all."""
    seed: int = 0
    """Seed for the split, batch order, rollouts and adapters."""
    force: bool = False
    """Replace what --out holds instead of refusing to touch it."""
    loop: LoopConfig | None = None
    """Optimizer, schedule, budget; None means `align_loop(method, lora)`. Its out_dir is set to `out`."""

    def __post_init__(self) -> None:
        check(self, self._problems())

    def _problems(self) -> Iterator[str]:
        for name in ("batch_size", "group_size", "prompts_per_rollout", "max_new_tokens", "epochs", "minibatches",
                     "anchor_batch_size"):
            if getattr(self, name) < 1:
                yield f"{name} must be at least 1, got {getattr(self, name)}"
        for name in ("beta", "clip"):
            if not getattr(self, name) > 0:
                yield f"{name} must be positive, got {getattr(self, name)}"
        if self.anchor_coef < 0:
            yield f"anchor_coef must be 0 or more, got {self.anchor_coef}"
        if self.kl_coef < 0 or self.value_coef < 0 or self.temperature <= 0:
            yield (f"kl_coef and value_coef must be 0 or more and temperature positive, got kl_coef={self.kl_coef}, "
                   f"value_coef={self.value_coef}, temperature={self.temperature}")
        if not 0 <= self.val_fraction < 1:
            yield f"val_fraction must be at least 0 and below 1, got {self.val_fraction}"
        if self.method == "dpo" and (self.reward or self.reward_fn):
            yield "DPO learns from preference pairs, not from a reward; drop --reward/--reward-fn or use grpo/ppo"
        if self.method != "dpo" and bool(self.reward) == bool(self.reward_fn):
            yield (f"{self.method} needs one reward: --reward RM_DIR (a reward model) or --reward-fn module:function"
                   + (", not both" if self.reward else ""))
        if (self.prompts_per_rollout * self.group_size) % self.minibatches:
            yield (f"a rollout of {self.prompts_per_rollout * self.group_size} replies does not split into "
                   f"{self.minibatches} equal minibatches; change --minibatches")

    @property
    def per_process(self) -> tuple[str, ...]:
        """The fields that count per process under torchrun (the run's total is that many times them): DPO's
        batch_size, a rollout's prompts_per_rollout."""
        return ("batch_size",) if self.method == "dpo" else ("prompts_per_rollout",)


ALIGN_LOOP = LoopConfig(max_steps=200, lr=5e-6, warmup_steps=10, weight_decay=0.0, eval_every=50, grad_clip=1.0,
                        compile="off")
"""Alignment's schedule: short and gentle (a few hundred steps near the SFT model). Not compiled: rollouts and
pairs come in many lengths."""


def align_loop(method: str, lora: bool) -> LoopConfig:
    """The default loop of an alignment run: ALIGN_LOOP, with a learning rate for the method and for adapters."""
    lr = {"dpo": 5e-6, "grpo": 1e-5, "ppo": 1e-5}[method] * (100 if lora else 1)
    return dataclasses.replace(ALIGN_LOOP, lr=lr)


@dataclass(frozen=True)
class RewardConfig:
    """A reward model: a chat model's backbone and a scalar head on the last token, trained on preference pairs."""

    model: str
    """The backbone: a chat model dir (usually the SFT model the policy starts from)."""
    data: tuple[str, ...]
    """Preference pairs (jsonl, HH-RLHF files, feedback dirs)."""
    out: str
    """The reward model dir to create: the backbone (or its adapter with `lora`) and heads.safetensors."""
    lora: LoraConfig | None = None
    """Train low-rank adapters on a frozen backbone (the head always trains)."""
    batch_size: int = 8
    """Pairs per micro-batch (of each process under torchrun)."""
    max_seq_len: int | None = None
    """Longest conversation trained on, in tokens; None means the model's context."""
    val_fraction: float = 0.1
    """Share of pairs held out for the pairwise accuracy."""
    eval_batches: int | None = None
    """Held-out batches per evaluation; None for all."""
    seed: int = 0
    """Seed for the split, the batch order and the head's initialisation."""
    force: bool = False
    """Replace what --out holds instead of refusing to touch it."""
    loop: LoopConfig | None = None
    """Optimizer, schedule, budget; None means REWARD_LOOP (lr 1e-3 with LoRA). Its out_dir is set to `out`."""

    def __post_init__(self) -> None:
        check(self, self._problems())

    def _problems(self) -> Iterator[str]:
        if self.batch_size < 1:
            yield f"batch_size must be at least 1, got {self.batch_size}"
        if not 0 <= self.val_fraction < 1:
            yield f"val_fraction must be at least 0 and below 1, got {self.val_fraction}"


REWARD_LOOP = LoopConfig(max_steps=300, lr=1e-4, warmup_steps=20, weight_decay=0.0, eval_every=100, compile="off")
"""A reward model's schedule: a short fine-tune of the backbone with its new head."""


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: length, randomness and stop conditions of one request."""

    max_new_tokens: int = 128
    """Most tokens to generate per prompt; fewer if the prompt plus these would not fit in the model's context."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (always the most likely token)."""
    top_k: int | None = None
    """Sample only among the k most likely tokens; None for no limit."""
    top_p: float | None = None
    """Nucleus sampling: only among the fewest most likely tokens whose probability reaches top_p; None for all."""
    seed: int | None = None
    """Seed for reproducible sampling: row i of a batch draws from its own generator seeded with seed + i, so it
    gives the same tokens as prompt i generated alone with seed + i. None uses torch's global generator."""
    stop: tuple[str, ...] = ()
    """Stop strings: a sequence ends just before the first occurrence of any of them, which is not returned."""
    logprobs: bool = False
    """Also report each generated token's log-probability under the model (before temperature, top-k and top-p),
    as a server's `logprobs` or an RL rollout needs; off, no step spends time on them."""
    top_logprobs: int = 0
    """Also report the this many most likely tokens at each step and their log-probabilities (0 to 20, as the
    OpenAI API allows); needs logprobs."""
    min_p: float | None = None
    """Min-p sampling (Nguyen et al. 2024): drop tokens whose probability is below min_p times the most likely
    one's, after the temperature; None for no limit."""
    frequency_penalty: float = 0.0
    """Subtract this times the number of times a token was generated so far from its logit (OpenAI's definition;
    -2 to 2)."""
    presence_penalty: float = 0.0
    """Subtract this from the logit of every token generated at least once so far (OpenAI's definition; -2 to 2)."""
    repetition_penalty: float = 1.0
    """Divide the positive logits (multiply the negative ones) of tokens in the prompt or generated so far by this
    (Keskar et al. 2019, as Hugging Face applies it); 1 for none."""

    def __post_init__(self) -> None:
        check(self, self._problems())

    def _problems(self) -> Iterator[str]:
        if self.max_new_tokens < 1:
            yield f"max_new_tokens must be >= 1, got {self.max_new_tokens}"
        yield from sampling_problems(self.temperature, self.top_k, self.top_p)
        if not all(self.stop):
            yield f"stop strings must not be empty, e.g. stop=('\\n\\n',); got {self.stop!r}"
        if not 0 <= self.top_logprobs <= 20:
            yield f"top_logprobs must be in [0, 20], got {self.top_logprobs}"
        if self.top_logprobs and not self.logprobs:
            yield f"top_logprobs={self.top_logprobs} needs logprobs=True"
        yield from penalty_problems(self.min_p, self.frequency_penalty, self.presence_penalty,
                                    self.repetition_penalty)

    @property
    def penalised(self) -> bool:
        """Whether any frequency, presence or repetition penalty changes the logits."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1)


def sampling_problems(temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None) -> Iterator[str]:
    """What is wrong with sampling settings, naming the value and the accepted range."""
    if not temperature >= 0 or temperature == math.inf:  # also rejects NaN
        yield f"temperature must be >= 0 and finite (0 means greedy), got {temperature}"
    if top_k is not None and top_k < 1:
        yield f"top_k must be an integer >= 1, or None for no limit; got {top_k}"
    if top_p is not None and not 0 < top_p <= 1:
        yield f"top_p must be in (0, 1], or None for no limit; got {top_p}"


def penalty_problems(min_p: float | None = None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                     repetition_penalty: float = 1.0) -> Iterator[str]:
    """What is wrong with min-p and the penalties, naming the value and the accepted range."""
    if min_p is not None and not 0 <= min_p <= 1:
        yield f"min_p must be in [0, 1], or None for no limit; got {min_p}"
    for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if not -2 <= value <= 2:
            yield f"{name} must be in [-2, 2], got {value}"
    if not 0.01 <= repetition_penalty <= 10:  # below 0.01, dividing a logit by it can overflow to inf
        yield f"repetition_penalty must be in [0.01, 10] (1 for none), got {repetition_penalty}"


@dataclass(frozen=True)
class SpeedrunConfig:
    """The speedrun: sizes and budgets chosen to finish within fifteen minutes on two CPU cores."""

    out: str = "runs/speedrun"
    """Run directory; the trained model dir, report.md and report.json go here."""
    minutes: float = 6.0
    """Pretraining wall-clock budget."""
    preset: str = "mini"
    """Model size (one of PRESETS)."""
    vocab_size: int = 4096
    """BPE vocabulary trained on the corpus."""
    seq_len: int = 256
    """Training context."""
    batch_size: int = 16
    """Sequences per step."""
    lr: float = 2e-3
    """Peak learning rate of pretraining."""
    eval_tokens: int = 262_144
    """Validation tokens scored at each evaluation and for the final figures (at most)."""
    benchmark_items: int = 200
    """Items of each benchmark task in the report (last word, cloze and bits per byte on held-out built-in text,
    scored as `yunque eval` scores them); 0 leaves the benchmark section out."""
    benchmark_data: str | None = None
    """A data dir laid out as ../shared/data (hellaswag/hellaswag_val_full.txt.gz): HellaSwag joins the benchmark."""
    sft_minutes: float = 2.0
    """Fine-tuning budget (the whole model, on standard-library questions and answers)."""
    sft_lr: float = 1e-3
    """Peak learning rate of fine-tuning."""
    heldout_questions: int = 120
    """Held-out questions answered before and after fine-tuning."""
    align_minutes: float = 1.0
    """Alignment budget (DPO): the assistant learns a preference for short replies from pairs of its own samples;
    0 skips the stage."""
    seed: int = 0
    """Seed for everything."""
    force: bool = False
    """Replace what --out holds instead of refusing to touch it."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        check(self, self._problems())

    def _problems(self) -> Iterator[str]:
        if self.preset not in PRESETS:
            yield f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}"
        for name in ("minutes", "sft_minutes"):
            if not getattr(self, name) > 0:
                yield f"{name} must be positive, got {getattr(self, name)}"
        if self.align_minutes < 0:
            yield f"align_minutes must be 0 (no alignment) or more, got {self.align_minutes}"
        if self.benchmark_items < 0:
            yield f"benchmark_items must be 0 (no benchmark section) or more, got {self.benchmark_items}"


@dataclass(frozen=True)
class QuantizeConfig:
    """Weight-only quantization of a model's linear layers (model/quant.py): `--quantize` on generate, chat and
    serve, `--to` of `yunque quantize`."""

    quantize: Literal["int8", "int4"] | None = None
    """Compute with the linear layers' weights quantized: int8 (one scale per output channel) or int4 (a scale and
    zero per group of --group-size inputs); none: as the model stores them."""
    group_size: int = 32
    """Inputs per int4 group (it must divide every linear layer's inputs): smaller groups follow the weights more
    closely and take more room for scales."""

    def __post_init__(self) -> None:
        check(self, self._problems())

    def _problems(self) -> Iterator[str]:
        if self.group_size < 2 or self.group_size % 2:
            yield f"group_size must be an even number >= 2 (two int4 values share a byte), got {self.group_size}"


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of continuous batching (engine/scheduler.py): how many requests wait, run, and how long each is."""

    max_queue: int = 256
    """Requests waiting to start at most; one more is refused (the server answers 429)."""
    max_running: int = 64
    """Sequences decoding together at most (each choice of a request is one)."""
    max_tokens: int = 2048
    """Most tokens one sequence may generate; a request asking for more is refused."""
    prefill_tokens: int = 512
    """Prompt tokens prefilled between two decode steps at most: a burst of new requests, or one long prompt
    (prefilled a chunk at a time), delays the running ones by about this many tokens' prefill, not by all of
    theirs."""
    prefix_cache_tokens: int = 4096
    """Prompt tokens whose keys and values are kept to be reused by prompts that begin the same way (a common
    system prompt is prefilled once); least recently used first out; 0 turns the cache off."""

    def __post_init__(self) -> None:
        check(self, self._problems())

    def _problems(self) -> Iterator[str]:
        for name in ("max_queue", "max_running", "max_tokens", "prefill_tokens"):
            if getattr(self, name) < 1:
                yield f"{name} must be >= 1, got {getattr(self, name)}"
        if self.prefix_cache_tokens < 0:
            yield f"prefix_cache_tokens must be >= 0 (0 turns the cache off), got {self.prefix_cache_tokens}"


@dataclass(frozen=True)
class ServeConfig:
    """The OpenAI-compatible server: where it listens, who may call it, and how many models it keeps loaded."""

    host: str = "127.0.0.1"
    """Address to listen on; 127.0.0.1 answers this machine only, 0.0.0.0 every network it is on."""
    port: int = 8000
    """TCP port to listen on."""
    api_key: str | None = None
    """Key every request must bring (`Authorization: Bearer KEY`); default: $YUNQUE_API_KEY, else no key."""
    preload: bool = False
    """Load every model at start instead of on its first request."""
    max_memory: float | None = None
    """GiB of model weights kept loaded at once: loading one more unloads the least recently used first; None for
    no limit."""
    max_body: int = 4_194_304
    """Largest request body accepted, in bytes (the server answers 413 above it)."""
    timeout: float = 600.0
    """Seconds a request may run before it is ended (finish_reason "length" for what it generated)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Decode precision (auto: bf16 where the CPU multiplies it natively, except for models under 4M parameters)."""
    device: str = "cpu"
    """Where models run: cpu, cuda, cuda:1, ..."""
    quantize: Literal["int8", "int4"] | None = None
    """Serve every model with its linear layers' weights quantized (int8 or int4, as `yunque chat --quantize`);
    none: as the models store them."""
    group_size: int = 32
    """Inputs per int4 group with --quantize int4 (it must divide every linear layer's inputs)."""

    def __post_init__(self) -> None:
        check(self, self._problems())

    def _problems(self) -> Iterator[str]:
        if not 0 <= self.port <= 65535:
            yield f"port must be in [0, 65535], got {self.port}"
        if self.max_memory is not None and self.max_memory <= 0:
            yield f"max_memory must be > 0 GiB (or None for no limit), got {self.max_memory}"
        if self.max_body < 1024:
            yield f"max_body must be >= 1024 bytes, got {self.max_body}"
        if self.timeout <= 0:
            yield f"timeout must be > 0 seconds, got {self.timeout}"


@dataclass(frozen=True)
class EvalConfig:
    """`yunque eval`: which tasks, how many examples and items, where results go."""

    tasks: tuple[str, ...] = ("hellaswag", "arc_easy")
    """Built-in task names or task spec files (.yaml/.json), comma- or space-separated."""
    num_fewshot: int | None = None
    """Solved examples before each item; none: the task's own default (gsm8k 5, the others 0)."""
    limit: int | None = None
    """Evaluate only the first N items of each task; none: all of them."""
    seed: int = 1234
    """Seed of the few-shot example draw (lm-evaluation-harness's default, so the prompts are its prompts)."""
    batch_size: int = 16
    """Requests scored (or prompts generated) together."""
    precision: Precision = "fp32"
    """Log-likelihoods in fp32 (the default: lm-evaluation-harness's figures, to 1e-4, the same on every CPU) or
    bf16 (faster where the CPU multiplies bf16 natively, a little less exact: on SmolLM2-135M's HellaSwag items they
    move 0.15 nats on average and 2-3% of the items change a prediction); auto: bf16 where it is native."""
    chat: bool = False
    """Evaluate through each model's chat template: examples and the item as conversation turns."""
    out: str | None = None
    """Write a report card here: report.md, report.json, report.png (and each model's per-item results)."""
    base_url: str | None = None
    """Evaluate an OpenAI-compatible server instead (POST URL/v1/completions, echo + logprobs); MODEL names the
    model on the server."""
    data_dir: str | None = None
    """Where built-in tasks find their data files; default: ../shared/data beside the yunque checkout."""
    cache_dir: str | None = None
    """Per-item results are cached here, so a rerun is free; default: $YUNQUE_HOME/eval-cache."""
    no_cache: bool = False
    """Compute every item again, and keep nothing."""

    def __post_init__(self) -> None:
        check(self, self._problems())

    def _problems(self) -> Iterator[str]:
        if not self.tasks:
            yield "tasks is empty; name at least one task, e.g. --tasks hellaswag"
        if self.limit is not None and self.limit < 1:
            yield f"--limit must be at least 1 item, got {self.limit}; leave it out to evaluate every item"
        if self.num_fewshot is not None and self.num_fewshot < 0:
            yield f"--num-fewshot must be 0 or more, got {self.num_fewshot}"
        if self.batch_size < 1:
            yield f"--batch-size must be at least 1, got {self.batch_size}"


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """A config dataclass from its JSON form (lists back to tuples, nested configs rebuilt); ValueError naming
    unknown keys."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} needs a JSON object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys are {sorted(names)}")
    return cls(**{k: _from_json(v, hints[k]) for k, v in d.items()})


def _from_json(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return None if value is None else _from_json(value, inner[0]) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    """The JSON form of a config dataclass (what `from_dict` reads back)."""
    return dataclasses.asdict(obj)


__all__ = ["ModelConfig", "PRESETS", "preset", "save_json", "load_json", "LoopConfig", "PretrainConfig",
           "LoraConfig", "SFTConfig", "SamplingParams", "SchedulerConfig", "ServeConfig", "SpeedrunConfig",
           "EvalConfig", "from_dict", "to_dict", "PRECISIONS", "DEFAULT_STEPS", "SFT_LOOP", "sft_loop", "AlignConfig",
           "ALIGN_LOOP", "align_loop", "RewardConfig", "REWARD_LOOP", "QuantizeConfig"]
