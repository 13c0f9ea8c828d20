"""Which number format to compute in, and how many CPU threads: bf16 where the hardware multiplies it natively,
fp32 elsewhere.

Shared by training (autocast, thread count) and the engine (bf16 weights for decoding); nothing here has side
effects at import.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch

from yunque.config import PRECISIONS

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


def autocast(precision: str, device: str | torch.device):
    """bf16 autocast context (fp32 master weights) for a resolved precision, or a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def physical_cores() -> int:
    """CPU cores this process may run on, counting hyperthread siblings once (sysfs on Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to `n` (0: one per physical core) inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or physical_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def matmul_gflops(dtype: torch.dtype, *, n: int = 1024, seconds: float = 0.3) -> float:
    """Measured GFLOP/s of n x n matrix products in `dtype` on the CPU with the current threads: what the machine
    does at best, to judge a run's speed against (bf16 is ~4x fp32 on AVX-512 BF16, ~1/100 of it on AVX2)."""
    import time

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: thread pool, oneDNN kernels
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 2:
        a @ b
        count += 1
    return 2 * n**3 * count / elapsed / 1e9



CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
"""The CPU flags that decide the fast paths: AVX2 (fp32), AVX-512, native bf16 products (AVX-512 BF16, AMX)."""


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and which of CPU_FLAGS it has, e.g. "AMD EPYC (avx2, avx512f, avx512_bf16)", from
    /proc/cpuinfo (elsewhere the platform's processor string): what a figure's CPU is named by."""
    name, flags = platform.processor() or "unknown CPU", []
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in CPU_FLAGS if f in have]
                break
    except OSError:
        pass
    return f"{name} ({', '.join(flags)})" if flags else name


__all__ = ["cpu_description", "CPU_FLAGS", "matmul_gflops", "bf16_supported", "resolve_precision", "autocast",
           "num_threads", "physical_cores", "DTYPES", "PRECISIONS"]
