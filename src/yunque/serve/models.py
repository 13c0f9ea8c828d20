"""Several models behind one endpoint: each is loaded on its first request (or at start), runs in its own engine and
scheduler, and the least recently used are unloaded when loading one more would exceed the memory budget."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from yunque.config import SchedulerConfig, ServeConfig
from yunque.engine.engine import Engine
from yunque.engine.scheduler import Scheduler
from yunque.tokenizer.chat import ChatFormat


@dataclass(frozen=True)
class ModelSpec:
    """A model the server offers: the name clients ask for and the dir it loads from."""

    name: str
    path: Path


class Loaded:
    """A model in memory: its engine, the scheduler that batches its requests, and its chat format."""

    def __init__(self, spec: ModelSpec, engine: Engine, fmt: ChatFormat, scheduler: Scheduler) -> None:
        self.spec, self.engine, self.format, self.scheduler = spec, engine, fmt, scheduler
        self.bytes = engine_bytes(engine)
        self.last_used = time.monotonic()
        self.created = int(time.time())

    @property
    def max_seq_len(self) -> int:
        return self.engine.model.cfg.max_seq_len


def engine_bytes(engine: Engine) -> int:
    """Memory the engine's copy of a model holds: its parameters and buffers, and the oneDNN-packed weights that
    `PackedLinear` keeps outside both."""
    model = engine.model
    total = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    itemsize = torch.empty((), dtype=engine.dtype).element_size()
    for m in model.modules():
        if getattr(m, "packed", None) is not None:
            total += m.in_features * m.out_features * itemsize
    return total


class ModelNotFound(LookupError):
    pass


class ModelLoading(RuntimeError):
    """The model is still loading after the wait allowed; the server answers 503."""


def load_spec(spec: ModelSpec, cfg: ServeConfig, sched: SchedulerConfig) -> Loaded:
    """Load a model (yunque or Hugging Face dir, GGUF file) into an engine and start its scheduler."""
    from yunque.modeldir import generation_stop_ids, load_model

    model, tokenizer = load_model(spec.path, device=cfg.device)
    fmt = ChatFormat.of(spec.path, tokenizer)
    engine = Engine(model, tokenizer, device=cfg.device, precision=cfg.precision)
    del model  # the engine decodes with its own copy
    engine.stop_ids |= generation_stop_ids(spec.path, tokenizer.vocab_size) | set(fmt.stop_ids)
    return Loaded(spec, engine, fmt, Scheduler(engine, sched))


def weights_bytes(path: Path) -> int:
    """What loading a model will take, estimated by its weight files' size on disk (a one-file model's, GGUF, by
    the file's: low for a quantized one, which loads dequantized; `Registry` checks again once it is loaded)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


class Registry:
    """The models a server offers, by name; `get` loads on demand and evicts by least recent use."""

    def __init__(self, specs: list[ModelSpec], cfg: ServeConfig | None = None, sched: SchedulerConfig | None = None,
                 *, loader: Callable[[ModelSpec], Loaded] | None = None, load_wait: float = 60.0) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"two models are named {dup!r}; name them apart with NAME=PATH")
        self.specs = {s.name: s for s in specs}
        self.cfg, self.sched = cfg or ServeConfig(), sched or SchedulerConfig()
        self.loader = loader or (lambda spec: load_spec(spec, self.cfg, self.sched))
        self.load_wait = load_wait
        """Seconds a request waits for its model to load before a 503 tells it to retry."""
        self.loaded: dict[str, Loaded] = {}
        self.loading: dict[str, asyncio.Future] = {}
        self.unloads = 0
        self._lock = threading.Lock()

    def state(self, name: str) -> str:
        return "loaded" if name in self.loaded else "loading" if name in self.loading else "unloaded"

    async def get(self, name: str) -> Loaded:
        """The loaded model `name`, loading it first if needed. ModelNotFound for a name not offered;
        ModelLoading if it is still loading after `load_wait` seconds; ValueError if it cannot load."""
        if name not in self.specs:
            raise ModelNotFound(f"the model {name!r} does not exist here; GET /v1/models lists them: "
                                f"{', '.join(self.specs)}")
        model = self.loaded.get(name)
        if model is not None:
            model.last_used = time.monotonic()
            return model
        future = self.loading.get(name)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self.loading[name] = future
            asyncio.get_running_loop().create_task(self._load(name, future))
        try:
            model = await asyncio.wait_for(asyncio.shield(future), self.load_wait)
        except asyncio.TimeoutError:
            raise ModelLoading(f"the model {name!r} is loading; retry in a few seconds") from None
        model.last_used = time.monotonic()
        return model

    async def _load(self, name: str, future: asyncio.Future) -> None:
        try:
            spec = self.specs[name]
            self._make_room(weights_bytes(spec.path), name)
            model = await asyncio.to_thread(self.loader, spec)
            self.loaded[name] = model
            self._make_room(0, name)  # the estimate may have been low
            future.set_result(model)
        except Exception as e:
            future.set_exception(e)
        finally:
            del self.loading[name]

    def _make_room(self, need: int, keep: str) -> None:
        """Unload least recently used models until `need` more bytes fit the budget (never `keep`)."""
        if self.cfg.max_memory is None:
            return
        budget = int(self.cfg.max_memory * 2**30)
        if need > budget:
            raise ValueError(f"the model {keep!r} needs {need / 2**30:.2f} GiB, more than --max-memory "
                             f"{self.cfg.max_memory:g}; raise --max-memory")
        while sum(m.bytes for m in self.loaded.values()) + need > budget:
            others = [m for n, m in self.loaded.items() if n != keep]
            if not others:
                return
            self.unload(min(others, key=lambda m: m.last_used).spec.name)

    def unload(self, name: str) -> None:
        """Unload a model: its running requests end (finish_reason "cancelled") and its memory is freed."""
        model = self.loaded.pop(name, None)
        if model is not None:
            model.scheduler.close()
            self.unloads += 1

    async def preload(self) -> None:
        for name in self.specs:
            await self.get(name)

    def close(self) -> None:
        for name in list(self.loaded):
            self.unload(name)
