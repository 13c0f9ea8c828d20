"""What a run tells people and programs: metrics.jsonl, the progress bar, loss.png.

Only the main process writes (`enabled`); under torchrun the other ranks keep a silent logger.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from yunque.modeldir import read_metrics

METRICS = "metrics.jsonl"
PLOT = "loss.png"


class TrainLog:
    """metrics.jsonl (one JSON object per logged step), a tqdm progress bar and the loss plot of one run.

    On resume the records after the resumed step are dropped (the run will log them again).
    """

    def __init__(self, out: Path, *, resume_step: int | None, total: int | None, progress: bool,
                 enabled: bool = True) -> None:
        self.path, self.enabled = out / METRICS, enabled
        self.records = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step else []
        if enabled:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")
        self.bar = None
        if progress and enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=resume_step or 0, desc="train", unit="step", dynamic_ncols=True)

    @property
    def elapsed(self) -> float:
        """Training seconds logged before this process (a resumed run's clock carries on)."""
        return self.records[-1].get("elapsed", 0.0) if self.records else 0.0

    @property
    def loss(self) -> float:
        return self.records[-1]["loss"] if self.records else float("nan")

    @property
    def first_loss(self) -> float | None:
        return self.records[0]["loss"] if self.records else None

    @property
    def val_loss(self) -> float | None:
        return next((r["val_loss"] for r in reversed(self.records) if "val_loss" in r), None)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            val = self.val_loss
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", val=f"{val:.3f}" if val is not None else "-",
                                 tok_s=f"{record.get('tokens_per_sec', 0):.0f}")

    def advance(self, total: int | None) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(1)

    def note(self, text: str) -> None:
        """One line for the person watching, above the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self, out: Path) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            plot_losses(self.records, out / PLOT)


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """loss.png: training loss (and validation loss where measured) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["TrainLog", "read_metrics", "plot_losses", "METRICS", "PLOT"]
