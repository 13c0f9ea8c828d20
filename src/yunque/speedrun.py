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
from pathlib import Path
from typing import Any

import torch

from yunque.config import LoopConfig, PretrainConfig, SFTConfig, SpeedrunConfig
from yunque.data.chat_data import ChatBatches, Conversation
from yunque.data.loaders import TokenWindows
from yunque.data.shards import load_manifest, open_split
from yunque.data.stdlib_qa import split_heldout, stdlib_qa
from yunque.engine.engine import Engine, SamplingParams
from yunque.eval.perplexity import bits_per_byte, unigram_loss
from yunque.eval.qa import answer_questions
from yunque.modeldir import load_model
from yunque.precision import DTYPES, matmul_gflops
from yunque.tokenizer.chat import ChatFormat
from yunque.train.pretrain import main as pretrain
from yunque.train.sft import assistant_loss
from yunque.train.sft import main as sft

SAMPLE_PROMPTS = ("def ", "class Parser:\n    ", "import os\n\n", "The ")


def main(cfg: SpeedrunConfig) -> dict[str, Any]:
    """Run the speedrun and write report.md / report.json; return the report's figures."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    # every evaluation scores the same eval_tokens, so the plot's last point is the report's figure
    eval_batches = max(1, cfg.eval_tokens // (cfg.batch_size * cfg.seq_len))
    loop = LoopConfig(minutes=cfg.minutes, lr=cfg.lr, warmup_steps=50, eval_every=500, progress=cfg.progress)
    summary = pretrain(PretrainConfig(out=cfg.out, preset=cfg.preset, vocab_size=cfg.vocab_size,
                                      batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                                      eval_batches=eval_batches, force=cfg.force, loop=loop))
    model, tok = load_model(out)
    data_dir = Path(summary["data_dir"])
    manifest = load_manifest(data_dir)
    val_split = manifest["splits"]["val"]
    val_shards = open_split(data_dir, "val")
    # the loop's last validation (the plot's last point) is the figure: the same windows, scored as it trained
    val_loss = summary["val_loss"]
    n = sum(y.numel() for _, y in TokenWindows(val_shards).iter_eval(cfg.batch_size, cfg.seq_len,
                                                                     max_batches=eval_batches))
    ratio = (val_split["tokens"], val_split["bytes"])
    uni_loss = unigram_loss(open_split(data_dir, "train"), val_shards, tok.vocab_size)

    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=120, temperature=0.8, top_k=50, seed=cfg.seed)
    samples = [{"prompt": p, "completion": engine.complete(p, params)} for p in SAMPLE_PROMPTS]
    assistant = fine_tune(cfg, out, model, tok)
    tokens_per_sec = summary["tokens_seen"] / max(summary["wall_seconds"], 1e-9)
    flops = model.cfg.flops_per_token(cfg.seq_len)
    peak = matmul_gflops(DTYPES[summary["precision"]])
    report = {
        "parameters": summary["parameters"],
        "model": summary["model"],
        "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size},
        "data": {split: {k: manifest["splits"][split][k] for k in ("documents", "tokens", "bytes")}
                 for split in ("train", "val")},
        "steps": summary["steps"],
        "warmup_steps": summary["warmup_steps"],
        "tokens_seen": summary["tokens_seen"],
        "precision": summary["precision"],
        "compiled": summary["compiled"],
        "train_seconds": round(summary["wall_seconds"], 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "tokens_per_sec": round(tokens_per_sec),
        "achieved_gflops": round(tokens_per_sec * flops / 1e9, 1),
        "machine_gflops": round(peak, 1),
        "mfu": tokens_per_sec * flops / 1e9 / peak,
        "undertrained": summary["undertrained"],
        "final_train_loss": summary["loss"],
        "val_loss": val_loss,
        "val_loss_in_training": summary["val_loss"],
        "val_tokens_scored": n,
        "val_bits_per_byte": bits_per_byte(val_loss, *ratio),
        "unigram_loss": uni_loss,
        "unigram_bits_per_byte": bits_per_byte(uni_loss, *ratio),
        "machine": f"{cpu_name()}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "samples": samples,
        "sft": assistant,
    }
    report["bpb_ratio_to_unigram"] = report["val_bits_per_byte"] / report["unigram_bits_per_byte"]
    report["warnings"] = warnings(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_report(report, cfg), encoding="utf-8")
    return report


LOW_MFU = 0.05
"""Below this share of the machine's measured matmul speed, a run was starved (a busy machine, threads fighting)
rather than merely small: the report says so, since its figures then say little about the code."""


def warnings(r: dict[str, Any]) -> list[str]:
    """What makes this run's figures untrustworthy, in words for the report."""
    found = []
    if r["undertrained"]:
        found.append(r["undertrained"])
    if r["mfu"] < LOW_MFU:
        found.append(f"training ran at {r['mfu']:.1%} of the machine's measured {r['precision']} matrix speed "
                     f"({r['achieved_gflops']:.0f} of {r['machine_gflops']:.0f} GFLOP/s): the machine was busy or "
                     f"the threads fought; the figures say little about the model")
    after = r["sft"]["after"]
    if after.get("repetition_rate", 0) > 0.5:
        found.append(f"{after['repetition_rate']:.0%} of the fine-tuned replies repeat themselves: the assistant "
                     f"is degenerate")
    return found


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fine_tune(cfg: SpeedrunConfig, out: Path, model, tok) -> dict[str, Any]:
    """SFT on standard-library questions; held-out loss, format and correctness before and after."""
    t0 = time.perf_counter()
    train_qa, held = split_heldout(stdlib_qa(), 0.1, seed=cfg.seed)
    held = held[:cfg.heldout_questions]
    data = out / "sft_data"
    data.mkdir(exist_ok=True)
    for name, rows in (("train.jsonl", train_qa), ("heldout.jsonl", held)):
        (data / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    fmt = ChatFormat.for_tokenizer(tok)

    def measure(m) -> dict[str, Any]:
        batches = ChatBatches(fmt, [Conversation(f"q{i}", c["messages"]) for i, c in enumerate(held)],
                              max_seq_len=cfg.seq_len)
        loss = assistant_loss(m, batches, batch_size=cfg.batch_size)
        return {"assistant_loss": loss, **answer_questions(Engine(m, tok), held, fmt, batch_size=cfg.batch_size)}

    before = measure(model)
    loop = LoopConfig(minutes=cfg.sft_minutes, lr=cfg.sft_lr, warmup_steps=20, weight_decay=0.0, eval_every=200,
                      progress=cfg.progress)
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
        f"| steps (warmup) / tokens seen | {r['steps']:,} ({r['warmup_steps']}) / {r['tokens_seen']:,} |",
        f"| precision / compiled | {r['precision']} / {'yes' if r['compiled'] else 'no'} |",
        f"| training time / whole run | {r['train_seconds']:.0f} s / {r['wall_seconds']:.0f} s |",
        f"| training speed | {r['tokens_per_sec']:,} tokens/s = {r['achieved_gflops']:.0f} GFLOP/s, "
        f"{r['mfu']:.0%} of this machine's measured {r['precision']} matrix-product speed "
        f"({r['machine_gflops']:.0f} GFLOP/s) |",
        f"| final training loss | {r['final_train_loss']:.3f} nats/token |",
        f"| **validation loss** | **{r['val_loss']:.3f} nats/token** ({r['val_tokens_scored']:,} tokens scored) |",
        f"| **validation bits per byte** | **{r['val_bits_per_byte']:.3f}** |",
        f"| unigram baseline (same validation text) | {r['unigram_loss']:.3f} nats/token, "
        f"{r['unigram_bits_per_byte']:.3f} bits/byte |",
        f"| model / unigram | {r['bpb_ratio_to_unigram']:.2f}x |",
        f"| machine | {r['machine']} |",
        "",
        *(["**Warnings:**", "", *[f"- {w}" for w in r["warnings"]], ""] if r["warnings"] else []),
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
        f"| replies that stop at end of turn, neither empty nor repetitive | {b['format_rate']:.0%} | "
        f"{a['format_rate']:.0%} |",
        f"| replies that repeat themselves (one token, or most 4-grams) | {b.get('repetition_rate', 0):.0%} | "
        f"{a.get('repetition_rate', 0):.0%} |",
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
