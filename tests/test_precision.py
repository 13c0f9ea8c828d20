"""Precision and threads: what the hardware does fast, autocast, thread counts restored."""

import pytest
import torch

from yunque.precision import (
    DTYPES,
    autocast,
    bf16_supported,
    matmul_gflops,
    num_threads,
    physical_cores,
    resolve_precision,
)


def test_auto_follows_the_hardware_and_forced_choices_stay():
    assert resolve_precision("auto", "cpu") == ("bf16" if bf16_supported("cpu") else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")


def test_autocast_is_bf16_or_nothing():
    a = torch.randn(4, 4)
    with autocast("bf16", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert (a @ a).dtype == torch.float32


def test_threads_are_set_and_restored():
    before = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert 1 <= physical_cores() <= (torch.multiprocessing.cpu_count() or 1)


def test_matmul_speed_is_measured():
    assert matmul_gflops(DTYPES["fp32"], n=128, seconds=0.05) > 0.1


def test_cpu_description_names_the_model_and_the_flags_that_decide_fast_paths(tmp_path):
    from yunque.precision import cpu_description

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B45\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 sha\n")
    assert cpu_description(info) == "AMD EPYC 9B45 (avx2, avx512f, avx512_bf16)"
    info.write_text("model name\t: Old CPU\nflags\t\t: fpu sse2\n")
    assert cpu_description(info) == "Old CPU"
    assert cpu_description(tmp_path / "missing")  # elsewhere: the platform's processor string, or "unknown CPU"
