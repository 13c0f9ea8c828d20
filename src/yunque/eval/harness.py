"""Run a task on a model: items -> requests -> scores -> lm-evaluation-harness's metrics, with standard errors.

Per output type, as lm-eval (api/task.py process_results and api/metrics.py) defines them:

- multiple_choice: acc (the highest log-likelihood is the gold choice) and acc_norm (the highest log-likelihood
  per character of the choice); standard error of the mean, sample standard deviation (n - 1).
- generate_until: exact_match after each filter of the task (regex extraction, first match), with the task's
  metric_kwargs (ignore_case, regexes_to_ignore applied to both sides).
- loglikelihood: acc (every continuation token was the model's top choice) and perplexity exp(-mean ll).
- loglikelihood_rolling: word_perplexity, byte_perplexity, bits_per_byte over the whole set (words and bytes of
  the original text).

Each item's result is cached on disk under (model fingerprint, task, the item's requests), so a rerun, or a run
with more items, computes only what it has not seen.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from yunque.eval.lm import LM
from yunque.eval.task import Task, chat_messages, context, iter_items

DEFAULT_FILTERS = [{"name": "none", "filter": [{"function": "take_first"}]}]


class ResultCache:
    """Per-item results on disk: one jsonl file per (model fingerprint, task), keyed by a hash of the item's
    requests; lines are appended whole, a line cut short by a kill is skipped."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def _path(self, fingerprint: str, task: str) -> Path:
        return self.root / fingerprint / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}.jsonl"

    def load(self, fingerprint: str, task: str) -> dict[str, Any]:
        if self.root is None:
            return {}
        path = self._path(fingerprint, task)
        out = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    out[rec["key"]] = rec["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        return out

    def add(self, fingerprint: str, task: str, entries: dict[str, Any]) -> None:
        if self.root is None or not entries:
            return
        path = self._path(fingerprint, task)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"key": k, "value": v}) + "\n" for k, v in entries.items())
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def evaluate(task: Task, lm: LM, *, num_fewshot: int | None = None, limit: int | None = None, seed: int = 1234,
             chat: bool = False, cache: ResultCache | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Scores of `lm` on `task`: {"task", "model", "num_fewshot", "n", "metrics": {name: value},
    "stderr": {name: value or None}, "items": per-item details, "cached": items read from the cache}.

    num_fewshot None takes the task's own default (lm-eval's num_fewshot); examples are drawn with `seed` as lm-eval
    draws them (its default seed is 1234). limit: the first `limit` items. progress(done, total) is told of the
    model's requests as they finish (log-likelihood requests, or texts).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1 item, got {limit}; leave it out to evaluate every item")
    k = task.default_fewshot if num_fewshot is None else num_fewshot
    if k < 0:
        raise ValueError(f"--num-fewshot must be 0 or more, got {k}")
    if chat and task.output_type == "loglikelihood_rolling":
        raise ValueError(f"{task.name} scores raw text (rolling perplexity); --chat does not apply to it")
    cache = cache or ResultCache(None)
    kind = task.output_type
    items = list(iter_items(task, k, limit, seed))
    if kind == "loglikelihood_rolling":  # the whole text is the target: no context
        ctxs = [None] * len(items)
    else:
        ctxs = [chat_messages(task, doc, shots) if chat else context(task, doc, shots) for _, doc, shots in items]
    requests = [_requests(task, doc, ctx) for (_, doc, _), ctx in zip(items, ctxs)]
    keys = [_key(kind, r) for r in requests]
    seen = cache.load(lm.fingerprint, task.name)
    todo = [i for i, key in enumerate(keys) if key not in seen]
    fresh = _run(kind, lm, [requests[i] for i in todo], progress)
    cache.add(lm.fingerprint, task.name, {keys[i]: v for i, v in zip(todo, fresh)})
    values = {keys[i]: v for i, v in zip(todo, fresh)}
    results = [values[key] if key in values else seen[key] for key in keys]
    metrics, stderr, details = _score(task, [doc for _, doc, _ in items], results)
    return {"task": task.name, "model": lm.name, "output_type": kind, "num_fewshot": k, "n": len(items),
            "metrics": metrics, "stderr": stderr, "items": details, "cached": len(items) - len(todo)}


def _requests(task: Task, doc: dict, ctx: Any) -> Any:
    """What one item asks of the model (JSON-able: it is also the cache key)."""
    kind = task.output_type
    if kind == "multiple_choice":
        delim = "" if isinstance(ctx, list) else task.target_delimiter  # lm-eval: no delimiter after a chat prompt
        return [[ctx, delim + c] for c in task.choices(doc)]
    if kind == "loglikelihood":
        return [[ctx, str(task.target(doc))]]
    if kind == "loglikelihood_rolling":
        return str(task.target(doc))
    gen = dict(task.spec.get("generation_kwargs") or {})
    return {"context": ctx, "until": list(gen.get("until", [])), "max_gen_toks": int(gen.get("max_gen_toks", 256))}


def _run(kind: str, lm: LM, requests: list[Any], progress: Callable[[int, int], None] | None) -> list[Any]:
    """Results of the uncached items, each JSON-able: [[ll, greedy], ...] per item, a float, or generated text."""
    if not requests:
        return []
    if kind in ("multiple_choice", "loglikelihood"):
        flat = [(ctx, cont) for r in requests for ctx, cont in r]
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, len(flat))

        scores = lm.loglikelihood(flat, progress=tick)
        out, i = [], 0
        for r in requests:
            out.append([[float(ll), bool(g)] for ll, g in scores[i:i + len(r)]])
            i += len(r)
        return out
    if kind == "loglikelihood_rolling":
        out = [float(x) for x in lm.loglikelihood_rolling(requests)]
        if progress:
            progress(len(out), len(out))
        return out
    out: list[Any] = [None] * len(requests)
    by_kwargs: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        by_kwargs.setdefault((tuple(r["until"]), r["max_gen_toks"]), []).append(i)
    for (until, max_gen), index in by_kwargs.items():
        for i, text in zip(index, lm.generate([requests[i]["context"] for i in index], until, max_gen)):
            out[i] = text
        if progress:
            progress(sum(1 for t in out if t is not None), len(out))
    return out


def _score(task: Task, docs: list[dict], results: list[Any]) -> tuple[dict, dict, list[dict]]:
    kind = task.output_type
    details: list[dict] = []
    per: dict[str, list[float]] = {}
    if kind == "multiple_choice":
        for doc, res in zip(docs, results):
            lls = [ll for ll, _ in res]
            choices = task.choices(doc)
            gold = task.target(doc)
            pred = _argmax(lls)
            pred_norm = _argmax([ll / len(c) for ll, c in zip(lls, choices)])  # characters, as lm-eval counts
            per.setdefault("acc", []).append(float(pred == gold))
            per.setdefault("acc_norm", []).append(float(pred_norm == gold))
            details.append({"loglikelihoods": lls, "gold": gold, "pred": pred, "pred_norm": pred_norm})
        return _means(per) + (details,)
    if kind == "loglikelihood":
        lls = []
        for res in results:
            ll, greedy = res[0]
            lls.append(ll)
            per.setdefault("acc", []).append(float(greedy))
            details.append({"loglikelihood": ll, "greedy": greedy})
        metrics, stderr = _means(per)
        metrics["perplexity"] = math.exp(-sum(lls) / len(lls))
        stderr["perplexity"] = None
        return metrics, stderr, details
    if kind == "loglikelihood_rolling":
        words = bytes_ = 0
        for doc, ll in zip(docs, results):
            page = str(doc.get("page", task.target(doc)))
            w, b = len(re.split(r"\s+", page)), len(page.encode("utf-8"))
            words, bytes_ = words + w, bytes_ + b
            details.append({"loglikelihood": ll, "words": w, "bytes": b})
        total = sum(results)
        metrics = {"word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / bytes_),
                   "bits_per_byte": -total / bytes_ / math.log(2)}
        return metrics, dict.fromkeys(metrics), details
    kwargs = task.spec.get("metric_kwargs") or {}
    for doc, text in zip(docs, results):
        target = str(task.target(doc))
        item = {"response": text, "target": target}
        for f in task.spec.get("filter_list") or DEFAULT_FILTERS:
            answer = apply_filters(text, f["filter"])
            item[f["name"]] = answer
            per.setdefault(f"exact_match,{f['name']}", []).append(exact_match(answer, target, **kwargs))
        details.append(item)
    return _means(per) + (details,)


def apply_filters(text: str, steps: list[dict]) -> str:
    """lm-eval's filter pipeline on one response: `regex` (findall; group_select picks the match, the first
    non-empty group of a tuple, stripped; "[invalid]" when nothing matches) and `take_first`."""
    for step in steps:
        fn = step["function"]
        if fn == "regex":
            found = re.findall(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"), text)
            if found:
                m = found[step.get("group_select", 0)]
                if isinstance(m, tuple):
                    m = next((g for g in m if g), step.get("fallback", "[invalid]"))
                text = m.strip()
            else:
                text = step.get("fallback", "[invalid]")
        elif fn != "take_first":
            raise ValueError(f"filter function {fn!r} is not supported; use regex or take_first")
    return text


def exact_match(prediction: str, reference: str, *, ignore_case: bool = False, ignore_punctuation: bool = False,
                regexes_to_ignore: list[str] | None = None) -> float:
    """lm-eval's exact_match (HF evaluate's): regexes removed from both, then optionally case and punctuation."""
    import string

    for r in regexes_to_ignore or []:
        prediction, reference = re.sub(r, "", prediction), re.sub(r, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first of equals, as numpy's argmax


def _means(per: dict[str, list[float]]) -> tuple[dict, dict]:
    metrics, stderr = {}, {}
    for name, xs in per.items():
        n = len(xs)
        mu = sum(xs) / n
        metrics[name] = mu
        stderr[name] = math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None
    return metrics, stderr


def benchmark_section(models: dict[str, Any], tokenizer, *, tasks: Sequence[str] = ("hellaswag", "arc_easy"),
                      limit: int = 200, data_dir: str | Path | None = None, batch_size: int = 16,
                      precision: str = "auto") -> dict[str, Any]:
    """Zero-shot scores of models in memory (name -> model, all with `tokenizer`) on at most `limit` items of each
    task (built-in names or spec files), for a run's report (the speedrun's benchmark section): {"results":
    [evaluate(...) without items, with "seconds" and "precision"], "markdown": a table per task, a row per model}.
    The models are left as they are (scoring runs on a copy); nothing is cached (the weights may change)."""
    import time

    from yunque.eval.lm import LocalLM
    from yunque.eval.report import markdown
    from yunque.eval.task import load_task

    loaded = [load_task(t, data_dir) for t in tasks]
    results = []
    for name, model in models.items():
        lm = LocalLM(model, tokenizer, name=name, batch_size=batch_size, fingerprint="in-memory",
                     precision=precision)
        for task in loaded:
            start = time.perf_counter()
            r = evaluate(task, lm, num_fewshot=0, limit=limit)
            r["seconds"], r["precision"] = time.perf_counter() - start, lm.precision
            results.append(r)
    text = markdown(results).replace("\n## ", "\n### ").replace("# Evaluation report", "## Benchmarks", 1)
    return {"results": [{k: v for k, v in r.items() if k != "items"} for r in results], "markdown": text}


__all__ = ["evaluate", "ResultCache", "apply_filters", "exact_match", "benchmark_section"]
