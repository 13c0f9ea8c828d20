"""The main job: a tokenizer and a model trained on the built-in corpus, fine-tuned into an assistant, then a report.

Python's standard library source and its documentation text exist wherever Python runs, so this needs no
network. The report compares the model's validation bits per byte with a unigram baseline measured on the
same validation text, and the assistant's answers to held-out questions about the standard library (made from
its docstrings) before and after fine-tuning.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yunque.data.chat_data import ChatBatches, Conversation
from yunque.data.loaders import TokenWindows
from yunque.data.shards import load_manifest, open_split
from yunque.data.stdlib_qa import split_heldout, stdlib_qa
from yunque.engine.engine import Engine, SamplingParams
from yunque.eval.perplexity import bits_per_byte, score_windows, unigram_loss
from yunque.eval.qa import answer_questions
from yunque.modeldir import load_model
from yunque.train.loop import LoopConfig
from yunque.train.pretrain import PretrainConfig, main as pretrain
from yunque.train.sft import SFTConfig, assistant_loss, main as sft

SAMPLE_PROMPTS = ("def ", "class Parser:\n    ", "import os\n\n", "The ")


@dataclass(frozen=True)
class SpeedrunConfig:
    """The speedrun: sizes and budgets chosen to finish within ten minutes on two CPU cores."""

    out: str = "runs/speedrun"
    """Run directory; the trained model dir, report.md and report.json go here."""
    minutes: float = 6.0
    """Pretraining wall-clock budget."""
    preset: str = "mini"
    """Model size."""
    vocab_size: int = 4096
    """BPE vocabulary trained on the corpus."""
    seq_len: int = 256
    """Training context."""
    batch_size: int = 16
    """Sequences per step."""
    lr: float = 2e-3
    """Peak learning rate."""
    eval_tokens: int = 262_144
    """Validation tokens scored for the final figures (at most)."""
    sft_minutes: float = 2.0
    """Fine-tuning budget (the whole model, on standard-library questions and answers)."""
    sft_lr: float = 1e-3
    """Peak learning rate of fine-tuning."""
    heldout_questions: int = 120
    """Held-out questions answered before and after fine-tuning."""
    seed: int = 0
    """Seed for everything."""
    progress: bool = True
    """Show progress bars."""


def main(cfg: SpeedrunConfig) -> dict[str, Any]:
    """Run the speedrun and write report.md / report.json; return the report's figures."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    loop = LoopConfig(out_dir=cfg.out, max_steps=None, minutes=cfg.minutes, lr=cfg.lr, warmup_steps=50,
                      eval_every=500, progress=cfg.progress)
    summary = pretrain(PretrainConfig(out=cfg.out, preset=cfg.preset, vocab_size=cfg.vocab_size,
                                      batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, loop=loop))
    model, tok = load_model(out)
    data_dir = Path(summary["data_dir"])
    manifest = load_manifest(data_dir)
    val_split = manifest["splits"]["val"]
    val_shards = open_split(data_dir, "val")
    batches = max(1, cfg.eval_tokens // (cfg.batch_size * cfg.seq_len))
    nll, n = score_windows(model, TokenWindows(val_shards), batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                           max_batches=batches)
    val_loss = nll / n
    ratio = (val_split["tokens"], val_split["bytes"])
    uni_loss = unigram_loss(open_split(data_dir, "train"), val_shards, tok.vocab_size)

    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=120, temperature=0.8, top_k=50, seed=cfg.seed)
    samples = [{"prompt": p, "completion": engine.complete(p, params)} for p in SAMPLE_PROMPTS]
    assistant = fine_tune(cfg, out, model, tok)
    report = {
        "parameters": summary["parameters"],
        "model": summary["model"],
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size},
        "data": {split: {k: manifest["splits"][split][k] for k in ("documents", "tokens", "bytes")}
                 for split in ("train", "val")},
        "steps": summary["steps"],
        "tokens_seen": summary["tokens_seen"],
        "precision": summary["precision"],
        "train_seconds": round(summary["wall_seconds"], 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "final_train_loss": summary["loss"],
        "val_loss": val_loss,
        "val_tokens_scored": n,
        "val_bits_per_byte": bits_per_byte(val_loss, *ratio),
        "unigram_loss": uni_loss,
        "unigram_bits_per_byte": bits_per_byte(uni_loss, *ratio),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "samples": samples,
        "sft": assistant,
    }
    report["bpb_ratio_to_unigram"] = report["val_bits_per_byte"] / report["unigram_bits_per_byte"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_report(report, cfg), encoding="utf-8")
    return report


def fine_tune(cfg: SpeedrunConfig, out: Path, model, tok) -> dict[str, Any]:
    """SFT on standard-library questions; held-out loss, format and correctness before and after."""
    t0 = time.perf_counter()
    train_qa, held = split_heldout(stdlib_qa(), 0.1, seed=cfg.seed)
    held = held[:cfg.heldout_questions]
    data = out / "sft_data"
    data.mkdir(exist_ok=True)
    for name, rows in (("train.jsonl", train_qa), ("heldout.jsonl", held)):
        (data / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    def measure(m) -> dict[str, Any]:
        batches = ChatBatches(tok, [Conversation(f"q{i}", c["messages"]) for i, c in enumerate(held)],
                              max_seq_len=cfg.seq_len)
        loss = assistant_loss(m, batches, batch_size=cfg.batch_size)
        return {"assistant_loss": loss, **answer_questions(Engine(m, tok), held, batch_size=cfg.batch_size)}

    before = measure(model)
    loop = LoopConfig(out_dir=str(out / "chat"), max_steps=None, minutes=cfg.sft_minutes, lr=cfg.sft_lr,
                      warmup_steps=20, weight_decay=0.0, eval_every=200, progress=cfg.progress)
    summary = sft(SFTConfig(model=str(out), data=(str(data / "train.jsonl"),), out=str(out / "chat"),
                            max_seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed, loop=loop))
    chat_model, _ = load_model(out / "chat")
    after = measure(chat_model)
    return {"train_conversations": len(train_qa), "heldout_questions": len(held), "steps": summary["steps"],
            "seconds": round(time.perf_counter() - t0, 1), "before": before, "after": after}


def render_report(r: dict[str, Any], cfg: SpeedrunConfig) -> str:
    m = r["model"]
    lines = [
        "# yunque speedrun",
        "",
        f"A {r['parameters']:,}-parameter model ({m['n_layer']} layers, d_model {m['d_model']}, {m['n_head']} heads, "
        f"context {m['max_seq_len']}) trained from scratch on Python's standard library source and documentation.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| tokenizer | {r['tokenizer']['kind']}, {r['tokenizer']['vocab_size']} tokens |",
        f"| training text | {r['data']['train']['documents']:,} documents, {r['data']['train']['bytes']:,} bytes, "
        f"{r['data']['train']['tokens']:,} tokens |",
        f"| validation text | {r['data']['val']['documents']:,} documents, {r['data']['val']['bytes']:,} bytes |",
        f"| steps / tokens seen | {r['steps']:,} / {r['tokens_seen']:,} |",
        f"| precision | {r['precision']} |",
        f"| training time / whole run | {r['train_seconds']:.0f} s / {r['wall_seconds']:.0f} s |",
        f"| final training loss | {r['final_train_loss']:.3f} nats/token |",
        f"| **validation loss** | **{r['val_loss']:.3f} nats/token** ({r['val_tokens_scored']:,} tokens scored) |",
        f"| **validation bits per byte** | **{r['val_bits_per_byte']:.3f}** |",
        f"| unigram baseline (same validation text) | {r['unigram_loss']:.3f} nats/token, "
        f"{r['unigram_bits_per_byte']:.3f} bits/byte |",
        f"| model / unigram | {r['bpb_ratio_to_unigram']:.2f}x |",
        f"| machine | {r['machine']} |",
        "",
        "![loss](loss.png)",
        "",
        "## Samples",
        "",
        "Temperature 0.8, top-k 50, 120 new tokens each.",
        "",
    ]
    for s in r["samples"]:
        lines += ["```python", s["prompt"] + s["completion"], "```", ""]
    f = r["sft"]
    b, a = f["before"], f["after"]
    lines += [
        "## Fine-tuning into an assistant",
        "",
        f"The pretrained model was fine-tuned ({f['steps']} steps, {f['seconds']:.0f} s, the whole model) on "
        f"{f['train_conversations']:,} questions about the standard library, each answered with the first "
        "sentence of the docstring (half of the questions are in Spanish). Scored on "
        f"{f['heldout_questions']} held-out questions, greedy decoding, at most 64 new tokens:",
        "",
        "| held-out figure | before | after |",
        "|---|---|---|",
        f"| loss on assistant tokens (nats/token) | {b['assistant_loss']:.3f} | {a['assistant_loss']:.3f} |",
        f"| replies that keep the chat format and stop at end of turn | {b['format_rate']:.0%} | "
        f"{a['format_rate']:.0%} |",
        f"| correctness: mean word F1 against the docstring sentence | {b['mean_f1']:.3f} | {a['mean_f1']:.3f} |",
        "",
        "Replies after fine-tuning:",
        "",
        "| question | reply | reference |",
        "|---|---|---|",
    ]
    for e in a["examples"]:
        lines.append(f"| {cell(e['question'])} | {cell(e['reply'])} | {cell(e['reference'])} |")
    lines.append("")
    lines += ["The fine-tuned model is in `chat/`: `yunque chat DIR/chat`.", "",
              "Reproduce: `yunque speedrun --out DIR --minutes "
              f"{cfg.minutes:g} --seed {cfg.seed}`."]
    return "\n".join(lines) + "\n"


def cell(text: str) -> str:
    """Text for one markdown table cell."""
    return " ".join(text.replace("|", "\\|").split())[:120] or "(empty)"
