"""Weight-only quantization of the linear layers: int8 per output channel, int4 in groups along the input.

Only the weights are stored as integers; activations, norms, embeddings and attention stay in floating point. A
`QuantLinear` holds what a quantized model dir stores (model.safetensors, beside config.json's "quantization")
and computes the simple way, `F.linear` on its dequantized weight: this is what a quantized model does anywhere,
and the reference the engine's kernels (engine/cpu.py) are tested against.

- int8: w = q * scale, q in [-127, 127], one fp32 scale per output row (absmax / 127).
- int4: w = (q - 8) * scale + zero, q in [0, 15], one bf16 (scale, zero) per group of `group_size` inputs of a
  row, with zero = min + 8 * scale (asymmetric min-max, as gpt-fast and ATen's int4 CPU kernel take them). Two q
  per byte: column 2j in the low nibble, 2j + 1 in the high one.

Which layers: every nn.Linear of the blocks and the output head (`quant_targets`). Where the head is the token
embedding (tied), the head gets a quantized copy of it and the embedding stays in floating point: a lookup reads
one row per token, while the head reads all of it at every step (SmolLM2-135M's is a fifth of its weights; llama.cpp
quantizes a tied head too). Such a model says so in its scheme ("tied_head": true), so that a model dir quantized
before the head was (without it) loads as it was written.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE = ("int8", "int4")
BITS = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 32


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scales fp32 (N,)) of a weight (N, K): symmetric, per output row."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # an all-zero row gets q = 0 and any scale
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 (N, K) in [0, 15], scales bf16 (N, K/G), zeros bf16 (N, K/G)) of a weight (N, K): min-max per group
    of G inputs, w ~ (q - 8) * scale + zero. The bf16 scale and zero are the ones q is rounded against."""
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group_size, group_size)  # (N, K/G, G)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    q = torch.round((g - z) / s + 8).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return q, scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8: column 2j in the low nibble, 2j + 1 in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: (N, K/2) uint8 -> (N, K) uint8 in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def check_group_size(group_size: int, in_features: int, name: str = "a layer") -> None:
    """ValueError unless int4's group size fits a layer with `in_features` inputs."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"--group-size must be an even number >= 2 (two int4 values share a byte), got {group_size}")
    if in_features % group_size:
        divisors = [g for g in (32, 64, 128, 16, 256, 8) if in_features % g == 0]
        hint = f"e.g. {divisors[0]}" if divisors else f"a divisor of {in_features}"
        raise ValueError(f"--group-size {group_size} does not divide the {in_features} inputs of {name}; "
                         f"choose one that does, {hint}")


class QuantLinear(nn.Module):
    """A linear layer with weight-only quantized weights (see the module's docstring for the two schemes).

    Buffers: qweight (int8 (N, K), or uint8 (N, K/2) two int4 per byte), scales (fp32 (N,), or bf16 (N, K/G)),
    zeros (int4 only, bf16 (N, K/G)); bias, when there is one, is a float parameter.
    """

    def __init__(self, in_features: int, out_features: int, *, bits: Literal[8, 4], group_size: int = 0,
                 bias: bool = False, device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else 0
        N, K = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(N, dtype=torch.float32, device=device))
            self.zeros = None
        else:
            check_group_size(group_size, K)
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(N, K // group_size, dtype=torch.bfloat16, device=device))
            self.register_buffer("zeros", torch.zeros(N, K // group_size, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.zeros(N, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: Literal[8, 4], group_size: int = DEFAULT_GROUP_SIZE) -> QuantLinear:
        """Quantize an nn.Linear's weight (its bias is kept as it is)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bits=bits, group_size=group_size,
                    bias=linear.bias is not None, device=w.device)
        if bits == 8:
            layer.qweight, layer.scales = quantize_int8(w)
        else:
            q, layer.scales, layer.zeros = quantize_int4(w, group_size)
            layer.qweight = pack_int4(q)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def int_weight(self) -> torch.Tensor:
        """The integers (N, K): int8 in [-127, 127], or uint8 in [0, 15] for int4."""
        return self.qweight if self.bits == 8 else unpack_int4(self.qweight)

    def dequantize(self) -> torch.Tensor:
        """The weight (N, K) in fp32, as the integers and scales give it."""
        if self.bits == 8:
            return self.qweight.float() * self.scales.float()[:, None]
        N, K, G = self.out_features, self.in_features, self.group_size
        q = unpack_int4(self.qweight).float().reshape(N, K // G, G)
        w = (q - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.reshape(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features): F.linear on the dequantized weight, in x's dtype."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        scheme = "int8" if self.bits == 8 else f"int4, group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {scheme}, "
                f"bias={self.bias is not None}")


def quant_targets(model: nn.Module, *, tied_head: bool = True) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(name, parent, attribute, layer) of every layer a quantized model holds quantized: each linear layer of the
    blocks (plain nn.Linear, not subclasses such as LoRA's, or already a QuantLinear), and the output head, where
    it shares the token embedding's weight only with `tied_head`."""
    targets = []
    for prefix, parent in model.blocks.named_modules(prefix="blocks"):
        for name, child in parent.named_children():
            if type(child) in (nn.Linear, QuantLinear):
                targets.append((f"{prefix}.{name}", parent, name, child))
    head = model.lm_head
    tied = type(head) is nn.Linear and head.weight is model.tok_emb.weight
    if type(head) is QuantLinear or (type(head) is nn.Linear and (tied_head or not tied)):
        targets.append(("lm_head", model, "lm_head", head))
    return targets


def quantization_of(model: nn.Module) -> dict[str, int | str | bool] | None:
    """{"method": "int8"} or {"method": "int4", "group_size": G} for a model whose layers are quantized (what
    config.json's "quantization" holds), with "tied_head": true where its head, tied to the embedding in the
    floating-point model, is quantized too; None for a floating-point model."""
    layer = next((m for m in model.modules() if isinstance(m, QuantLinear)), None)
    if layer is None:
        return None
    scheme: dict[str, int | str | bool] = (
        {"method": "int8"} if layer.bits == 8 else {"method": "int4", "group_size": layer.group_size})
    if model.cfg.tie_embeddings and isinstance(model.lm_head, QuantLinear):
        scheme["tied_head"] = True
    return scheme


def quantize_model(model: nn.Module, method: str, group_size: int = DEFAULT_GROUP_SIZE, *,
                   tied_head: bool = True) -> nn.Module:
    """Replace `model`'s target layers (`quant_targets`, a tied head too unless `tied_head` is False) by
    QuantLinear in place, one at a time (the float weight of each is freed as it goes); returns `model`. On the meta
    device this makes the empty frame of a quantized model dir. ValueError for an unknown method, a group size that
    does not divide a layer's inputs, or a model that is quantized already."""
    if method not in BITS:
        raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZE)}")
    if (done := quantization_of(model)) is not None:
        raise ValueError(f"the model is quantized already ({describe_quantization(done)}); quantize its "
                         f"floating-point original instead")
    bits = BITS[method]
    targets = quant_targets(model, tied_head=tied_head)
    if bits == 4:
        for full, _, _, layer in targets:  # all checked before any layer changes
            check_group_size(group_size, layer.in_features, full)
    for _, parent, name, layer in targets:
        if layer.weight.device.type == "meta":
            new = QuantLinear(layer.in_features, layer.out_features, bits=bits, group_size=group_size,
                              bias=layer.bias is not None, device="meta")
        else:
            new = QuantLinear.from_linear(layer, bits, group_size)
        setattr(parent, name, new)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear of `model` by an nn.Linear holding its dequantized fp32 weight, in place; returns
    `model`. The float model that computes what the quantized one does (exports, twin tests)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, QuantLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device="meta")
                linear.weight = nn.Parameter(child.dequantize(), requires_grad=False)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.detach().float(), requires_grad=False)
                setattr(parent, name, linear)
    return model


def describe_quantization(q: dict[str, int | str | bool]) -> str:
    """"int8 (per output channel)" or "int4 (groups of 32)": how `yunque info` and messages name a scheme."""
    return "int8 (per output channel)" if q["method"] == "int8" else f"int4 (groups of {q['group_size']})"


__all__ = ["BITS", "DEFAULT_GROUP_SIZE", "QUANTIZE", "QuantLinear", "check_group_size", "dequantize_model",
           "describe_quantization", "pack_int4", "quant_targets", "quantization_of", "quantize_int4", "quantize_int8",
           "quantize_model", "unpack_int4"]
