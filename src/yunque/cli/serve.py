"""`yunque serve`: an OpenAI-compatible server for one or more models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from yunque.cli.common import add_catalogue_flag, command, model_path
from yunque.cli.flags import add_fields, values
from yunque.config import SchedulerConfig, ServeConfig

SERVE_FLAGS = ["host", "port", "api_key", "preload", "max_memory", "max_body", "timeout", "precision", "device",
               "quantize", "group_size"]
SCHEDULER_FLAGS = ["max_queue", "max_running", "max_tokens", "prefill_tokens", "prefix_cache_tokens"]


def register(sub) -> None:
    p = command(sub, "serve", cmd_serve, help="serve models through an OpenAI-compatible API and a chat page",
                description="Serve MODELs at http://HOST:PORT/v1 (chat completions, completions, embeddings: the "
                            "OpenAI API, so its SDKs and tools work) with continuous batching, and a chat page at "
                            "http://HOST:PORT/ whose thumbs and preferences are saved under $YUNQUE_HOME/feedback. "
                            "Each model loads on its first request (or at start with --preload).",
                examples="  yunque serve runs/speedrun/chat\n"
                         "  yunque serve chat=runs/speedrun/chat base=runs/speedrun --max-memory 2\n"
                         "  yunque serve smol=../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf\n"
                         "  yunque serve base=runs/speedrun tuned=runs/lora   # an adapter over its base\n"
                         "  YUNQUE_API_KEY=secret yunque serve HuggingFaceTB/SmolLM2-135M-Instruct --host 0.0.0.0\n")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="a model dir (yunque or Hugging Face), a .gguf file, a LoRA adapter dir (served over its "
                        "base, which must be served too), a catalogue name, or NAME=PATH to choose the name "
                        "clients ask for (default: the dir's name)")
    add_catalogue_flag(p)
    add_fields(p, ServeConfig, SERVE_FLAGS, metavars={"api_key": "KEY", "max_memory": "GIB"})
    add_fields(p, SchedulerConfig, SCHEDULER_FLAGS)


def model_specs(models: list[str], catalogue: str | None = None) -> list:
    """ModelSpecs for the MODEL arguments: NAME=PATH, a path (named by its dir, or a file by its name without the
    extension: SmolLM2-135M-Instruct.Q4_1 for SmolLM2-135M-Instruct.Q4_1.gguf), or a catalogue name."""
    from yunque.serve.models import ModelSpec

    specs = []
    for arg in models:
        name, sep, where = arg.partition("=")
        if not sep:
            name, where = "", arg
        path = model_path(where, catalogue)
        if not name:
            name = where if not Path(where).exists() else path.stem if path.is_file() else path.resolve().name
        specs.append(ModelSpec(name, path))
    return specs


def cmd_serve(args) -> int:
    import uvicorn

    from yunque.cli.common import check_device
    from yunque.serve.app import create_app
    from yunque.serve.models import Registry

    serve = values(args, SERVE_FLAGS)
    serve["api_key"] = serve["api_key"] or os.environ.get("YUNQUE_API_KEY") or None
    cfg = ServeConfig(**serve)
    check_device(cfg.device)
    registry = Registry(model_specs(args.models, args.catalogue), cfg, SchedulerConfig(**values(args, SCHEDULER_FLAGS)))
    app = create_app(registry, api_key=cfg.api_key)
    shown = "localhost" if cfg.host in ("127.0.0.1", "::1") else cfg.host
    print(f"serving {', '.join(registry.specs)} at http://{shown}:{cfg.port}/v1 (chat page: http://{shown}:"
          f"{cfg.port}/){'; key required' if cfg.api_key else ''}", file=sys.stderr)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0
