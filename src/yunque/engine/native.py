"""The engine's C++ kernels (kernels.cpp), compiled once per machine with PyTorch's extension builder.

They are built on first use with -march=native, so the compiler picks the CPU's own vector instructions (AVX2,
AVX-512, ...): what the fast path does follows the CPU it runs on. The build goes under PyTorch's extension
directory (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions) in a folder named by a digest of the source, the
flags, torch's and Python's versions and the CPU's feature flags: a home directory shared by two machines never
loads a build made for the other's CPU. Later processes import the built library directly (no compiler run).

Without a C++ compiler or Python's headers, or if the build fails, `native_kernels()` returns None and says why
in one line; the engine then keeps PyTorch's own kernels, which give the same results.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch._appdirs  # torch's own per-user cache directories (what cpp_extension uses)

SOURCE = Path(__file__).with_name("kernels.cpp")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math")
"""-ffast-math lets `#pragma omp simd` use glibc's vector exp; it is a compile flag only, so the library is not
linked with the startup code that would flush denormals to zero for the whole process."""
LDFLAGS = ("-fopenmp",)  # libgomp.so.1: the one torch has already loaded, so one OpenMP thread pool


def cpu_flags() -> str:
    """The CPU's model and feature flags, as the kernels' build depends on them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(wanted))  # one copy per distinct line, not one per core


def build_name() -> str:
    """The extension's name: `yunque_kernels_` and a digest of everything the binary depends on."""
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (*CFLAGS, *LDFLAGS, torch.__version__, sys.version, cpu_flags()):
        h.update(part.encode())
    return f"yunque_kernels_{h.hexdigest()[:12]}"


_LOADING = threading.Lock()


@functools.cache
def native_kernels() -> types.ModuleType | None:
    """The compiled kernels module, built on the first call of a machine's life (~1 min); None, said once on
    stderr, where they cannot be built."""
    try:
        with _LOADING:  # the server may make two engines at once; one loads, the other then finds it loaded
            return _load()
    except Exception as e:  # no compiler, no headers, a failed build: PyTorch's kernels do the work instead
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"yunque: the engine's C++ kernels are unavailable ({reason}); decoding with PyTorch's own",
              file=sys.stderr)
        return None


def kernels() -> Any:
    """The kernels for a call now: inside torch.compile, the operators torch.ops.yunque (a graph calls operators),
    and under torch.profiler too (which names operators, not bindings); elsewhere the library's own bindings of the
    same functions (`native_kernels()`). A call through torch.ops waits for the GIL twice on its way back
    (kernels.cpp says why) and a binding's once: where another thread runs Python beside the decode (a server's
    event loop), each wait may last until that thread lets go. For callers that know the kernels are built."""
    if torch.compiler.is_compiling() or torch.autograd.profiler._is_profiler_enabled:
        return torch.ops.yunque
    return native_kernels()


@contextlib.contextmanager
def helpers(on: bool = True) -> Iterator[None]:
    """Within the block, the kernels' loops called from this thread run on the library's own helper threads (on)
    or on OpenMP's team (off, the default): see kernels.cpp's pool and `cpu.helper_rows` for where each serves.
    Nothing where the kernels did not build (or on a system without futexes, where the loops stay OpenMP's)."""
    kernels = native_kernels()
    if kernels is None:
        yield
        return
    before = kernels.set_helpers(on)
    try:
        yield
    finally:
        kernels.set_helpers(before)


@functools.cache
def _register_shapes() -> None:
    """What torch.ops.yunque.rows_linear, rows_int4, dense_int4, pairs_linear, pack_pairs, gelu_tanh, layer_norm,
    decode_attention and prompt_attention return, for tracing a compiled step (the kernels themselves are registered
    by the library when it loads). Once per process, even if the library is loaded again."""

    @torch.library.register_fake("yunque::rows_linear")
    def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("yunque::rows_int4")
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
          group_size: int) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("yunque::dense_int4")
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
          group_size: int) -> torch.Tensor:
        dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        return x.new_empty((*x.shape[:-1], qweight.shape[0]), dtype=dtype)

    @torch.library.register_fake("yunque::pairs_linear")
    def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], out_features), dtype=torch.bfloat16)

    @torch.library.register_fake("yunque::gelu_tanh")
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("yunque::layer_norm")
    def _(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("yunque::pack_pairs")
    def _(weight: torch.Tensor) -> torch.Tensor:
        return weight.new_empty(((weight.shape[0] + 15) // 16, weight.shape[1] // 2, 32))

    @torch.library.register_fake("yunque::prompt_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None, scale: float) -> torch.Tensor:
        return q.new_empty(q.shape, dtype=k.dtype)

    @torch.library.register_fake("yunque::decode_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None, filled: torch.Tensor | None,
          scale: float) -> torch.Tensor:
        return q.new_empty(q.shape, dtype=torch.float32)


def _load() -> types.ModuleType:
    module = _build_or_import()
    _register_shapes()
    return module


def _build_or_import() -> types.ModuleType:
    name = build_name()
    # torch's extension root (cpp_extension.get_default_build_root), without importing cpp_extension: it imports
    # setuptools, 0.17 s of every start-up
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or torch._appdirs.user_cache_dir(appname="torch_extensions")
    directory = Path(root).resolve() / name
    built = directory / f"{name}.so"
    if built.is_file():
        try:
            spec = importlib.util.spec_from_file_location(name, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except ImportError:
            pass  # a build cut short: build it again below
    from torch.utils import cpp_extension

    compiler = shutil.which(cpp_extension.get_cxx_compiler())
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({cpp_extension.get_cxx_compiler()}) on PATH; install g++ to get them")
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        raise RuntimeError("Python's C headers are missing; install your Python's -dev package to get them")
    print("yunque: compiling the engine's C++ kernels for this CPU (once, ~1 min)", file=sys.stderr)
    directory.mkdir(parents=True, exist_ok=True)
    # lists of our own: load() appends torch's flags to the ones it is given
    return cpp_extension.load(name, [str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                              build_directory=str(directory))
