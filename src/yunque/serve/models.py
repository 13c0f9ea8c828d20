"""Several models behind one endpoint: each is loaded on its first request (or at start), runs in its own engine and
scheduler, and the least recently used are unloaded when loading one more would exceed the memory budget.

A LoRA adapter dir is a model of its own over a served base model (the one its adapter_config.json names): its
engine shares the base's weights and adds the adapter unmerged (`Engine.with_adapter`), so any number of adapters
cost one copy of the base and their own few tensors. Loading an adapter loads its base; unloading a base unloads
its adapters."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from yunque.config import SchedulerConfig, ServeConfig
from yunque.engine.engine import Engine
from yunque.engine.scheduler import Scheduler, in_passing_thread
from yunque.tokenizer.chat import ChatFormat


@dataclass(frozen=True)
class ModelSpec:
    """A model the server offers: the name clients ask for and the dir it loads from."""

    name: str
    path: Path
    base: str | None = None
    """For a LoRA adapter dir: the name of the served model it applies to (see `find_bases`)."""


class Loaded:
    """A model in memory: its engine, the scheduler that batches its requests, and its chat format."""

    def __init__(self, spec: ModelSpec, engine: Engine, fmt: ChatFormat, scheduler: Scheduler,
                 size: int | None = None) -> None:
        self.spec, self.engine, self.format, self.scheduler = spec, engine, fmt, scheduler
        self.bytes = engine_bytes(engine) if size is None else size
        """Memory this model holds of its own (an adapter's: its tensors, not the base it shares)."""
        self.last_used = time.monotonic()
        self.created = int(time.time())

    @property
    def max_seq_len(self) -> int:
        return self.engine.model.cfg.max_seq_len


def engine_bytes(engine: Engine) -> int:
    """Memory the engine's copy of a model holds: its parameters and buffers, and the oneDNN-packed weights and the
    plain ones for one-row products (or those laid out for the bf16 kernel) that `PackedLinear` keeps outside both
    (a tied head's plain weight is the embedding, counted once)."""
    model = engine.model
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    total = sum(t.numel() * t.element_size() for t in tensors)
    held = {t.untyped_storage().data_ptr() for t in tensors}
    itemsize = torch.empty((), dtype=engine.dtype).element_size()
    for m in model.modules():
        if getattr(m, "packed", None) is not None:
            total += m.in_features * m.out_features * itemsize
        for extra in (getattr(m, "plain", None), getattr(m, "pairs", None)):
            if extra is not None and extra.untyped_storage().data_ptr() not in held:
                total += extra.numel() * extra.element_size()
    return total


class ModelNotFound(LookupError):
    pass


class ModelLoading(RuntimeError):
    """The model is still loading after the wait allowed; the server answers 503."""


def load_spec(spec: ModelSpec, cfg: ServeConfig, sched: SchedulerConfig) -> Loaded:
    """Load a model (yunque or Hugging Face dir, GGUF file) into an engine (its linear layers quantized with
    cfg.quantize) and start its scheduler."""
    from yunque.modeldir import generation_stop_ids, load_model

    model, tokenizer = load_model(spec.path, device=cfg.device)
    if cfg.quantize:
        from yunque.model.quant import quantize_model

        quantize_model(model, cfg.quantize, cfg.group_size)
    fmt = ChatFormat.of(spec.path, tokenizer)
    engine = Engine(model, tokenizer, device=cfg.device, precision=cfg.precision)
    del model  # the engine decodes with its own copy
    engine.stop_ids |= generation_stop_ids(spec.path, tokenizer.vocab_size) | set(fmt.stop_ids)
    return Loaded(spec, engine, fmt, Scheduler(engine, sched))


def load_adapter_spec(spec: ModelSpec, base: Loaded, sched: SchedulerConfig) -> Loaded:
    """An adapter dir over its loaded base: an engine sharing the base's weights (`Engine.with_adapter`), the base's
    chat format, and a scheduler of its own."""
    from yunque.model.lora import load_adapter

    state, lora = load_adapter(spec.path)
    try:
        engine = base.engine.with_adapter(state, lora)
    except ValueError as e:
        raise ValueError(f"{spec.path}: {e}") from None
    size = sum(t.numel() * 4 for t in state.values())  # kept in fp32
    return Loaded(spec, engine, base.format, Scheduler(engine, sched), size)


def find_bases(specs: list[ModelSpec]) -> list[ModelSpec]:
    """`specs` with each LoRA adapter dir's `base` set: the served model whose path its adapter_config.json names
    (or the only one served, when it names none). ValueError when that model is not served."""
    from yunque.model.lora import ADAPTER_CONFIG
    from yunque.modeldir import is_adapter_dir

    models = [s for s in specs if not is_adapter_dir(s.path)]
    out = []
    for spec in specs:
        if spec in models:
            out.append(spec)
            continue
        try:
            recorded = json.loads((spec.path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{spec.path / ADAPTER_CONFIG}: not a LoRA adapter config ({e})") from None
        if recorded:
            base = next((m for m in models if m.path.resolve() == Path(recorded).resolve()), None)
        else:
            base = models[0] if len(models) == 1 else None
        if base is None:
            raise ValueError(f"the adapter {spec.path} was trained on {recorded or 'a base it does not record'}, "
                             f"which is not served; serve the base too: yunque serve BASE {spec.name}={spec.path}")
        out.append(replace(spec, base=base.name))
    return out


def weights_bytes(path: Path) -> int:
    """What loading a model will take, estimated by its weight files' size on disk (a one-file model's, GGUF, by
    the file's: low for a quantized one, which loads dequantized; `Registry` checks again once it is loaded)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


def settle() -> None:
    """Collect what loading (or unloading) left behind, then take every object alive now out of the cyclic
    collector's scans (gc.freeze). A loaded model with its tokenizer is ~240,000 tracked objects, which each full
    collection walks with the GIL held, stopping the decode worker: in one 16-client run of the scheduler alone on
    benchmarks/serve.py's model, 12-13 ms of collection against 140-170 ms without."""
    gc.collect()
    gc.freeze()


class Registry:
    """The models a server offers, by name; `get` loads on demand and evicts by least recent use."""

    def __init__(self, specs: list[ModelSpec], cfg: ServeConfig | None = None, sched: SchedulerConfig | None = None,
                 *, loader: Callable[[ModelSpec], Loaded] | None = None, load_wait: float = 60.0) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"two models are named {dup!r}; name them apart with NAME=PATH")
        self.specs = {s.name: s for s in find_bases(specs)}
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
            if spec.base is not None:
                base = await self.get(spec.base)
                self._make_room(weights_bytes(spec.path), name)
                model = await asyncio.to_thread(in_passing_thread, load_adapter_spec, spec, base, self.sched)
            else:
                self._make_room(weights_bytes(spec.path), name)
                # the torch work of loading runs in a thread that ends (see engine/scheduler.py)
                model = await asyncio.to_thread(in_passing_thread, self.loader, spec)
            self.loaded[name] = model
            settle()
            self._make_room(0, name)  # the estimate may have been low
            future.set_result(model)
        except Exception as e:
            future.set_exception(e)
        finally:
            del self.loading[name]

    def _make_room(self, need: int, keep: str) -> None:
        """Unload least recently used models until `need` more bytes fit the budget (never `keep` nor its base)."""
        if self.cfg.max_memory is None:
            return
        budget = int(self.cfg.max_memory * 2**30)
        if need > budget:
            raise ValueError(f"the model {keep!r} needs {need / 2**30:.2f} GiB, more than --max-memory "
                             f"{self.cfg.max_memory:g}; raise --max-memory")
        while sum(m.bytes for m in self.loaded.values()) + need > budget:
            others = [m for n, m in self.loaded.items() if n not in (keep, self.specs[keep].base)]
            if not others:
                return
            self.unload(min(others, key=lambda m: m.last_used).spec.name)

    def unload(self, name: str) -> None:
        """Unload a model (and the adapters over it): its running requests end (finish_reason "cancelled") and its
        memory is freed."""
        for adapter in [n for n, m in self.loaded.items() if m.spec.base == name]:
            self.unload(adapter)
        model = self.loaded.pop(name, None)
        if model is not None:
            model.scheduler.close()
            self.unloads += 1
            del model
            gc.unfreeze()  # its objects go back to the collector, which frees those held in reference cycles
            settle()

    async def preload(self) -> None:
        for name in self.specs:
            await self.get(name)

    def close(self) -> None:
        for name in list(self.loaded):
            self.unload(name)
