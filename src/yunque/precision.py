"""Which number format to compute in: bf16 where the hardware multiplies it natively, fp32 elsewhere.

Shared by training (autocast) and the engine (bf16 weights for decoding); nothing here has side effects.
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "bf16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def bf16_supported(device: str | torch.device) -> bool:
    """True where bf16 matrix products run natively (CUDA Ampere+, CPUs with AVX-512 BF16 / AMX)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """"bf16" or "fp32": "auto" picks bf16 where `bf16_supported(device)`, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


__all__ = ["bf16_supported", "resolve_precision", "DTYPES", "PRECISIONS"]
