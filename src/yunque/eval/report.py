"""The report card: several models on several tasks, side by side, with standard errors.

report.md (a table a person reads), report.json (every metric, its standard error and the settings, for programs)
and report.png (one panel per task, a bar per model, error bars of one standard error), written whole into a dir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from yunque.atomic import atomic_write
from yunque.atomic import atomic_write_text as write_text

PRIMARY = {"multiple_choice": "acc_norm", "generate_until": "exact_match,strict-match", "loglikelihood": "acc",
           "loglikelihood_rolling": "bits_per_byte"}
"""The metric each kind of task is charted by (all of them are in the table and the JSON)."""
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """{"models": [...], "tasks": [...], "results": {model: {task: {metrics, stderr, n, num_fewshot}}}}, items
    left out."""
    models = list(dict.fromkeys(r["model"] for r in results))
    tasks = list(dict.fromkeys(r["task"] for r in results))
    table: dict[str, dict[str, Any]] = {m: {} for m in models}
    for r in results:
        table[r["model"]][r["task"]] = {k: r[k] for k in ("output_type", "metrics", "stderr", "n", "num_fewshot")}
    return {"models": models, "tasks": tasks, "results": table}


def markdown(results: list[dict[str, Any]], settings: dict[str, Any] | None = None) -> str:
    """A table per task: a row per model, a column per metric, "value ± standard error"."""
    s = summary(results)
    lines = ["# Evaluation report", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()), ""]
    for task in s["tasks"]:
        rows = [(m, s["results"][m][task]) for m in s["models"] if task in s["results"][m]]
        metrics = list(dict.fromkeys(name for _, r in rows for name in r["metrics"]))
        first = rows[0][1]
        lines += [f"## {task} ({first['n']} items, {first['num_fewshot']}-shot)", "",
                  "| model | " + " | ".join(_label(m) for m in metrics) + " |",
                  "|---|" + "---:|" * len(metrics)]
        for model, r in rows:
            cells = []
            for name in metrics:
                v, e = r["metrics"].get(name), r["stderr"].get(name)
                cells.append("" if v is None else _num(v) + (f" ± {e:.4f}" if e is not None else ""))
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("± one standard error of the mean (sample standard deviation), as lm-evaluation-harness reports it.")
    return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"


def _label(metric: str) -> str:
    name = metric.replace(",", " (") + (")" if "," in metric else "")
    return name + (" ↓" if metric in LOWER_IS_BETTER else "")


def chart(results: list[dict[str, Any]], path: str | Path) -> None:
    """report.png: a panel per task, a bar per model of the task's primary metric, one standard error as the
    error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(results)
    tasks, models = s["tasks"], s["models"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4, 3.2 * len(tasks)), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes[0], tasks):
        rows = [(m, s["results"][m][task]) for m in models if task in s["results"][m]]
        metric = PRIMARY[rows[0][1]["output_type"]]
        values = [r["metrics"].get(metric, float("nan")) for _, r in rows]
        errors = [r["stderr"].get(metric) or 0.0 for _, r in rows]
        ax.bar(range(len(rows)), values, yerr=errors, capsize=4,
               color=[colors[models.index(m) % len(colors)] for m, _ in rows])
        ax.set_xticks(range(len(rows)), [m for m, _ in rows], rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{task}\n{_label(metric)}", fontsize=9)
        if metric not in LOWER_IS_BETTER:
            ax.set_ylim(0, max(1.0, max(v + e for v, e in zip(values, errors))))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_report(results: list[dict[str, Any]], out: str | Path, settings: dict[str, Any] | None = None) -> Path:
    """Write report.md, report.json and report.png into `out` (made if missing), and each model's per-item
    results as items-<model>-<task>.jsonl; returns the markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.json", json.dumps({**summary(results), "settings": settings or {}}, indent=2) + "\n")
    for r in results:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{r['model']}-{r['task']}")
        write_text(out / f"items-{safe}.jsonl", "".join(json.dumps(i) + "\n" for i in r["items"]))
    chart(results, out / "report.png")
    write_text(out / "report.md", markdown(results, settings))
    return out / "report.md"


__all__ = ["summary", "markdown", "chart", "write_report", "PRIMARY"]
