"""The transformer, top to bottom: norms -> rotary -> attention -> MLP -> block -> GPT.

One ModelConfig covers GPT-2 (learned positions, LayerNorm, GELU, biases, tied embeddings) and the
Llama/Mistral/Qwen family (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases).
Shapes: B batch, T time (new tokens), S keys attended, H query heads, K key/value heads, D head dim,
C channels (d_model), V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from yunque.config import ModelConfig
from yunque.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 like the reference implementations."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # training, eager: the cheaper backward
            return _RMSNormGrad.apply(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm's forward: x scaled to unit root mean square over its last dim (in fp32 or wider), times weight."""
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class _RMSNormGrad(torch.autograd.Function):
    """`rms_norm` with its gradient written out: fewer elementwise ops than autograd records for it, which makes
    forward + backward ~1.5x faster at training shapes on CPU (fp32, 12 x 64 x 128 on two AVX2 cores: 340-380 us
    against 540), where the norms are a tenth of a small model's step. Twin tests: tests/model/test_gpt.py."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.rsqrt(wide.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, r, weight)
        return weight * (wide * r).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        n = x.to(r.dtype) * r  # the normalised x, in fp32 or wider
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * n.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(r.dtype)  # the gradient at the normalised x
            grad_x = ((g - n * (g * n).mean(-1, keepdim=True)) * r).to(x.dtype)
        return grad_x, grad_w, None


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (D/2,) of rotary embeddings (Su et al. 2021), with Llama 3 scaling if configured; fp32, on
    the CPU (computed in fp64 there, whatever the default device)."""
    D = cfg.dim_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64, device="cpu") / D))
    s = cfg.rope_scaling
    if s and s.get("rope_type", "llama3") == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_len = s.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif s and s.get("rope_type") == "linear":
        inv_freq = inv_freq / s["factor"]
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by position; cos/sin are (B or 1, 1, T, D). Half-split layout, as in HF Llama."""
    return (x * cos + rotate_half(x) * sin).type_as(x)


def causal_attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal attention (B, H, T, D) as two bf16 matrix products around an fp32 softmax. For bf16 training on
    CPU it runs forward + backward about twice as fast as the fused SDPA kernel at T <= 1024 (measured with
    torch 2.13 on AVX-512-BF16; benchmarks/train.py), at the price of O(B H T^2) memory."""
    T = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return probs.to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.dim_head
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, q + 2 * kv, bias=cfg.bias or cfg.qkv_bias)  # one matmul for q, k, v
        self.proj = nn.Linear(q, cfg.d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * K, D).transpose(1, 2)  # (B, H + 2K, T, D)
        if self.q_norm is not None:
            q, k, v = qkv.split([H, K, K], dim=1)
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        else:
            qk, v = qkv.split([H + K, K], dim=1)
            if rope is not None:
                qk = apply_rope(qk, *rope)  # queries and keys in one go: half the small ops of a decode step
            q, k = qk.split([H, K], dim=1)  # (B, H, T, D), (B, K, T, D)
        y = self.attend(q, k, v, mask, kv_cache, layer)  # (B, H, T, D)
        return self.proj(y.to(x.dtype).transpose(1, 2).reshape(B, T, H * D))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        """Queries (B, H, T, D) over the new keys/values (B, K, T, D) and, with a cache, those before them: the
        attention output (B, H, T, D). The engine's CPU copy replaces this for one-token decode (engine/cpu.py)."""
        H, K, T = q.shape[1], k.shape[1], q.shape[2]
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, K, S, D), in the cache's dtype
            q = q.to(k.dtype)  # a bf16 model may keep an fp32 cache: see Engine.cache_dtype
        causal = mask is None and kv_cache is None
        if causal and self.training and q.dtype == torch.bfloat16 and q.device.type == "cpu" and T <= 1024:
            if K != H:
                k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # (B, H, T, D)
            return causal_attention_bf16(q, k, v, self.dropout)  # the training fast path; twin test in tests/train
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=K != H)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.ff_dim
        self.up = nn.Linear(cfg.d_model, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)  # gate and up fused
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # SwiGLU, Shazeer 2020
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else None  # None: no module call per step

    def forward(self, x, rope, mask, kv_cache, layer):
        a = self.attn(self.norm1(x), rope, mask, kv_cache, layer)
        x = x + (a if self.drop is None else self.drop(a))
        m = self.mlp(self.norm2(x))
        return x + (m if self.drop is None else self.drop(m))


class GPT(nn.Module):
    """Decoder-only transformer: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos == "rope":
            self.register_buffer("inv_freq", rope_frequencies(cfg).to(self.tok_emb.weight.device), persistent=False)
        if self.tok_emb.weight.device.type != "meta":  # on meta (see meta_model) there is nothing to fill
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: torch.Tensor, kv_cache: KVCache | None = None, *, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T). With a cache, ids are the next T tokens after kv_cache.pos.
        logits_to_keep=n > 0: only the last n positions' logits (B, n, V), as transformers' argument of that name;
        a prefill that needs one position's logits skips the vocabulary projection of all the others."""
        B, T = ids.shape
        if kv_cache is not None:
            pos, mask = kv_cache.positions_and_mask(T)  # (B|1, T), (B|1, 1, T, S) or None
        elif T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.cfg.max_seq_len}; "
                             f"shorten the input or use a longer-context model")
        else:
            pos, mask = torch.arange(T, device=ids.device).unsqueeze(0), None  # (1, T); causal attention
        x = self.tok_emb(ids)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        if self.drop is not None:
            x = self.drop(x)
        rope = None
        if self.pos_emb is None:
            angles = pos.unsqueeze(-1).float() * self.inv_freq  # (B|1, T, D/2)
            angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # (B|1, 1, T, D)
            rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.norm_f(x))


def meta_model(cfg: ModelConfig) -> GPT:
    """A GPT on the meta device, without values: a frame for loaded weights (`load_state_dict(..., assign=True)`).

    Layer constructors fill their parameters at random; here that is wasted work, and on meta those fills run
    through kernels whose first use imports torch._dynamo, ~0.9 s of a command's start-up. They are skipped by
    swapping the layers' `reset_parameters` for the duration of the call (not safe while another thread builds
    modules).
    """
    layers = (nn.Linear, nn.Embedding, nn.LayerNorm)
    saved = [(layer, layer.reset_parameters) for layer in layers]
    try:
        for layer in layers:
            layer.reset_parameters = _no_fill
        with torch.device("meta"):
            return GPT(cfg)
    finally:
        for layer, reset in saved:
            layer.reset_parameters = reset


def _no_fill(module: nn.Module) -> None:
    pass
