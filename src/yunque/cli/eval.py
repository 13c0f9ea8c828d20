"""`yunque eval`: benchmark scores with lm-evaluation-harness's numbers, and a report card."""

from __future__ import annotations

import json
import sys
import time

from yunque.cli.common import add_device_flag, add_model_arg, check_device, command, model_path
from yunque.cli.flags import add_fields, values
from yunque.config import EvalConfig

EVAL_FLAGS = ["tasks", "num_fewshot", "limit", "seed", "batch_size", "precision", "chat", "out", "base_url", "data_dir",
              "cache_dir", "no_cache"]


def register(sub) -> None:
    from yunque.eval.task import builtin_tasks

    ev = command(sub, "eval", cmd_eval, help="benchmark models: lm-evaluation-harness's tasks and numbers, cached",
                 description="Score models on evaluation tasks as lm-evaluation-harness does (same prompts, "
                             "few-shot draws, log-likelihoods and metrics): multiple choice (acc, acc_norm), "
                             "generation with answer extraction (exact match), rolling perplexity and last-word "
                             f"accuracy. Built-in tasks: {', '.join(builtin_tasks())}; or a task spec file "
                             "(.yaml/.json, lm-eval's keys). Results are cached per model and item.",
                 examples="  yunque eval runs/speedrun --tasks hellaswag,arc_easy --limit 200\n"
                          "  yunque eval runs/a runs/b --tasks arc_easy --num-fewshot 5 --out report/\n"
                          "  yunque eval runs/chat --tasks gsm8k --limit 50 --chat\n"
                          "  yunque eval my-model --base-url http://127.0.0.1:8000 --tasks arc_easy\n"
                          "  yunque eval runs/speedrun --tasks my_task.yaml --json\n")
    add_model_arg(ev, help="model dirs (yunque or Hugging Face) or catalogue names; with --base-url, the model "
                           "name on the server")
    ev._actions[-2].nargs = "+"  # MODEL [MODEL ...]: the positional add_model_arg just made
    add_fields(ev, EvalConfig, EVAL_FLAGS, metavars={"out": "DIR", "base_url": "URL", "data_dir": "DIR",
                                                     "cache_dir": "DIR", "tasks": "TASK"})
    ev.add_argument("--json", action="store_true", help="print the results as JSON (without per-item details)")
    add_device_flag(ev)


def cmd_eval(args) -> int:
    from yunque.eval.harness import ResultCache, evaluate
    from yunque.eval.task import load_task
    from yunque.paths import yunque_home

    tasks = tuple(t for spec in args.tasks for t in spec.split(",") if t)
    cfg = EvalConfig(**{**values(args, EVAL_FLAGS), "tasks": tasks})
    loaded = [load_task(t, cfg.data_dir) for t in cfg.tasks]  # every task checked before any model loads
    cache = ResultCache(None if cfg.no_cache else (cfg.cache_dir or yunque_home() / "eval-cache"))
    results = []
    for spec in args.model:
        lm = _load(spec, cfg, args)
        for task in loaded:
            start = time.perf_counter()
            with _Progress(f"{lm.name} {task.name}") as bar:
                r = evaluate(task, lm, num_fewshot=cfg.num_fewshot, limit=cfg.limit, seed=cfg.seed, chat=cfg.chat,
                             cache=cache, progress=bar.update)
            r["seconds"] = time.perf_counter() - start
            r["precision"] = getattr(lm, "precision", "the server's")
            results.append(r)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
            print(f"{lm.name} {task.name} ({r['n']} items, {r['num_fewshot']}-shot, {r['precision']}, {r['cached']} "
                  f"cached, {r['seconds']:.1f}s): {shown}", file=sys.stderr)
    if cfg.out:
        from yunque.eval.report import write_report

        settings = {"num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "seed": cfg.seed, "chat": cfg.chat,
                    "precision": "/".join(dict.fromkeys(r["precision"] for r in results))}
        path = write_report(results, cfg.out, settings)
        print(f"report: {path}", file=sys.stderr)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "items"} for r in results], indent=2))
    else:
        from yunque.eval.report import markdown

        print(markdown(results), end="")
    return 0


class _Progress:
    """A progress bar on stderr (when it is a terminal) over the requests a task sends the model."""

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None

    def update(self, done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="req", leave=False, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _load(spec: str, cfg: EvalConfig, args):
    if cfg.base_url:
        from yunque.eval.remote import RemoteLM

        if cfg.chat:
            raise ValueError("--chat with --base-url is not supported: /v1/completions takes text; evaluate the "
                             "model dir locally with --chat")
        return RemoteLM(cfg.base_url, spec, batch_size=cfg.batch_size)
    from yunque.eval.lm import LocalLM
    from yunque.modeldir import load_model
    from yunque.tokenizer.chat import ChatFormat

    path = model_path(spec, args.catalogue)
    model, tok = load_model(path, device=check_device(args.device))
    fmt = ChatFormat.of(path, tok)
    if cfg.chat and not fmt.is_chat:
        raise ValueError(f"{spec} has no chat format (no chat template or chat tokens); leave out --chat")
    return LocalLM(model, tok, name=path.name or spec, fmt=fmt, batch_size=cfg.batch_size, precision=cfg.precision)
