"""The main job: a tokenizer and a model trained on the built-in corpus, fine-tuned into an assistant, then a report.

Python's standard library source and its documentation text exist wherever Python runs, so this needs no
network. The report compares the model's validation bits per byte with a unigram baseline measured on the
same validation text, and the assistant's answers to held-out questions about the standard library (made from
its docstrings) before and after fine-tuning.
"""

from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

from yunque.config import AlignConfig, LoopConfig, PretrainConfig, SFTConfig, SpeedrunConfig
from yunque.data.chat_data import ChatBatches, Conversation
from yunque.data.loaders import TokenWindows
from yunque.data.shards import held_out, load_manifest, open_split
from yunque.data.sources import builtin_documents
from yunque.data.stdlib_qa import split_heldout, stdlib_qa
from yunque.engine.engine import Engine, SamplingParams
from yunque.eval.harness import benchmark_section
from yunque.eval.perplexity import bits_per_byte, text_perplexity, unigram_loss
from yunque.eval.qa import answer_questions
from yunque.eval.text_tasks import write_text_tasks
from yunque.modeldir import load_model
from yunque.precision import DTYPES, cpu_description, matmul_gflops
from yunque.tokenizer.chat import ChatFormat
from yunque.train.align import main as align
from yunque.train.align import reply_kl, sample_replies
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
    aligned = align_short_replies(cfg, out) if cfg.align_minutes > 0 else None
    bench = benchmark(cfg, out, model, tok, manifest) if cfg.benchmark_items else None
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
        "machine": (f"{cpu_description()}, {platform.machine()}, {torch.get_num_threads()} threads, "
                    f"torch {torch.__version__}"),
        "samples": samples,
        "sft": assistant,
        "align": aligned,
        "benchmark": bench,
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


def benchmark(cfg: SpeedrunConfig, out: Path, model, tok, manifest: dict) -> dict[str, Any]:
    """Zero-shot benchmark of the pretrained and the fine-tuned model, as `yunque eval` scores them: last word,
    cloze and bits per byte on built-in documents the pretraining held out (task files in out/benchmark), and
    HellaSwag where cfg.benchmark_data holds it."""
    docs = [d.text for d in held_out(builtin_documents(), seed=manifest["seed"], val_fraction=manifest["val_fraction"])]
    tasks = [str(p) for p in write_text_tasks(docs, out / "benchmark", items=cfg.benchmark_items, seed=cfg.seed)]
    if cfg.benchmark_data:
        tasks.append("hellaswag")
    chat_model, _ = load_model(out / "chat")
    section = benchmark_section({"pretrained": model, "fine-tuned": chat_model}, tok, tasks=tasks,
                                limit=cfg.benchmark_items, data_dir=cfg.benchmark_data, batch_size=64)
    section["tasks"] = tasks
    return section


ALIGN_QUESTIONS = 600
"""Training questions whose sampled replies make the alignment stage's pairs."""
SAMPLES = 6
"""Replies sampled per question for the pairs."""
MAX_REPLY = 48
"""Longest reply sampled or evaluated in the alignment stage."""
MIN_PAIRS = 16
"""Fewer pairs than this make no alignment stage (the report says why)."""


def words(text: str) -> int:
    return len(text.split())


def sample_texts(model, tok, fmt: ChatFormat, questions: list[str], *, temperature: float, seed: int,
                 n: int = 1, max_new_tokens: int = MAX_REPLY) -> list[str]:
    """n replies to each question (question-major), through the engine in batches of 32; row i seeded seed + i."""
    engine = Engine(model, tok)
    engine.stop_ids |= fmt.stop_ids
    prompts = [fmt.prompt([{"role": "user", "content": q}]) for q in questions for _ in range(n)]
    texts: list[str] = []
    for start in range(0, len(prompts), 32):
        chunk = prompts[start:start + 32]
        params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + start + i)
                  for i in range(len(chunk))]
        texts += [text for _, text, _ in sample_replies(engine, fmt, chunk, params)]
    return texts


def short_reply_pairs(questions: list[str], samples: list[str], n: int, *, seed: int,
                      share: float = 0.15, most: float = 0.3,
                      empty_share: float = 0.25) -> tuple[int, float, list[dict]]:
    """A preference the model does not have, stated only by pairs of its own replies: (limit, the share of its
    samples already that short, pairs). The rule is "1 to limit-1 words"; limit is 20, or less if more than
    `share` of the samples already satisfy it. A pair is a question with one short and one long sampled reply.
    Where the replies are so alike in length that fewer than MIN_PAIRS questions have both at that limit, the
    least longer limit that gives MIN_PAIRS is taken, as long as at most `most` of the samples meet it.
    The rule says too that an empty reply is not a short one, which sampled replies rarely show: for `empty_share`
    of the questions with a short reply, a second pair prefers one of its short replies to an empty reply (without
    them a reward model trained on the pairs may score an empty reply above a short one, and RL finds that out)."""
    counts = [words(s) for s in samples]
    shares = {k: sum(0 < c < k for c in counts) / len(counts) for k in range(2, 41)}
    limit = 20 if shares[20] <= share else max((k for k, v in shares.items() if v <= share), default=2)

    def both(k: int) -> int:  # questions with a sample under k words and one not
        return sum(any(0 < c < k for c in mine) and not all(0 < c < k for c in mine)
                   for mine in (counts[n * i:n * i + n] for i in range(len(questions))))

    if both(limit) < MIN_PAIRS:
        limit = next((k for k in range(limit + 1, 41) if shares[k] <= most and both(k) >= MIN_PAIRS), limit)
    rng = random.Random(seed)
    pairs = []
    for i, q in enumerate(questions):
        mine = samples[n * i:n * i + n]
        short = [s for s in mine if 0 < words(s) < limit]
        long = [s for s in mine if not 0 < words(s) < limit]
        if short and long:
            pairs.append({"prompt": q, "chosen": rng.choice(short), "rejected": rng.choice(long)})
        if short and rng.random() < empty_share:
            pairs.append({"prompt": q, "chosen": rng.choice(short), "rejected": ""})
    return limit, shares[limit], pairs


def align_short_replies(cfg: SpeedrunConfig, out: Path) -> dict[str, Any]:
    """DPO on the assistant: pairs of its own sampled replies prefer the short one; on held-out questions, the share
    of (greedy) replies that short, the KL to the fine-tuned model and the perplexity of ordinary text, before and
    after."""
    t0 = time.perf_counter()
    chat = out / "chat"
    model, tok = load_model(chat)
    model.float()
    fmt = ChatFormat.of(chat, tok)
    train_qa, held = split_heldout(stdlib_qa(), 0.1, seed=cfg.seed)
    rng = random.Random(cfg.seed)
    questions = [c["messages"][0]["content"] for c in rng.sample(train_qa, min(ALIGN_QUESTIONS, len(train_qa)))]
    held_q = [c["messages"][0]["content"] for c in held[:cfg.heldout_questions]]
    ordinary = [d.text for d in builtin_documents() if d.name.startswith("pydoc:")][::8][:40]
    samples = sample_texts(model, tok, fmt, questions, temperature=1.0, seed=cfg.seed + 1000, n=SAMPLES)
    limit, share, pairs = short_reply_pairs(questions, samples, SAMPLES, seed=cfg.seed)
    if (both := sum(p["rejected"] != "" for p in pairs)) < MIN_PAIRS:
        return {"skipped": f"only {both} of {len(questions)} questions had both a short and a long sampled "
                           f"reply (at least {MIN_PAIRS} needed): the assistant's replies barely vary in length"}
    data = out / "align_data"
    data.mkdir(exist_ok=True)
    path = data / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs), encoding="utf-8")

    def measure(m) -> dict[str, Any]:
        texts = sample_texts(m, tok, fmt, held_q, temperature=0.0, seed=0)
        engine = Engine(m, tok)
        engine.stop_ids |= fmt.stop_ids
        prompts = [fmt.prompt([{"role": "user", "content": q}]) for q in held_q]
        return {"rule": sum(0 < words(t) < limit for t in texts) / len(texts),
                "mean_words": sum(map(words, texts)) / len(texts),
                "kl": reply_kl(m, model, engine, fmt, prompts, max_new_tokens=MAX_REPLY, seq_len=cfg.seq_len),
                "perplexity": text_perplexity(m, tok, ordinary)["perplexity"],
                "examples": [{"question": q, "reply": t} for q, t in zip(held_q[:4], texts)]}

    before = measure(model)
    loop = LoopConfig(minutes=cfg.align_minutes, lr=ALIGN_LR, warmup_steps=10, weight_decay=0.0, eval_every=0,
                      progress=cfg.progress)
    summary = align(AlignConfig(model=str(chat), data=(str(path),), out=str(out / "aligned"), method="dpo",
                                beta=0.1, batch_size=8, val_fraction=0.1, seed=cfg.seed, loop=loop))
    aligned, _ = load_model(out / "aligned")
    after = measure(aligned.float())
    return {"rule": f"1 to {limit - 1} words", "sampled_share": share, "pairs": len(pairs),
            "pairs_against_empty": len(pairs) - both,
            "steps": summary["steps"], "seconds": round(time.perf_counter() - t0, 1),
            "reward_accuracy": (summary.get("after") or {}).get("reward_accuracy"), "before": before,
            "after": after}


ALIGN_LR = 5e-5
"""DPO's learning rate on the speedrun's whole (small) model."""


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
    al = r.get("align")
    if al and "skipped" in al:
        lines += ["## Alignment", "", f"Skipped: {al['skipped']}.", ""]
    elif al:
        b, a = al["before"], al["after"]
        lines += [
            "## Alignment: a preference stated only by pairs",
            "",
            f"The assistant does not prefer short replies: {al['sampled_share']:.0%} of its sampled replies to "
            f"training questions have {al['rule']}. {al['pairs']} pairs of its own replies (a short one chosen, a "
            f"long one rejected; in {al.get('pairs_against_empty', 0)} of them an empty reply rejected, which is not "
            f"short either) taught it by DPO ({al['steps']} steps, {al['seconds']:.0f} s with sampling and "
            f"evaluation). On the held-out questions, greedy decoding:",
            "",
            "| held-out figure | before | after |",
            "|---|---|---|",
            f"| replies of {al['rule']} | {b['rule']:.0%} | {a['rule']:.0%} |",
            f"| mean words a reply | {b['mean_words']:.1f} | {a['mean_words']:.1f} |",
            f"| KL to the fine-tuned model (nats per sampled reply) | {b['kl']:.2f} | {a['kl']:.2f} |",
            f"| perplexity of ordinary text (pydoc topics) | {b['perplexity']:.2f} | {a['perplexity']:.2f} |",
            "",
            "| question | reply after alignment |",
            "|---|---|",
            *[f"| {cell(e['question'])} | {cell(e['reply'])} |" for e in a["examples"]],
            "",
            "The aligned model is in `aligned/`.",
            "",
        ]
    if r.get("benchmark"):
        lines += [r["benchmark"]["markdown"], "Zero-shot, scored as `yunque eval` scores them "
                  f"({r['benchmark']['results'][0]['precision']}; "
                  f"{sum(x['seconds'] for x in r['benchmark']['results']):.0f} s in all); the held-out tasks are "
                  "files in `benchmark/`: `yunque eval DIR --tasks DIR/benchmark/heldout_cloze.yaml`.", ""]
    lines += ["The fine-tuned model is in `chat/`: `yunque chat DIR/chat`.", "",
              "Reproduce: `yunque speedrun --out DIR --minutes "
              f"{cfg.minutes:g} --sft-minutes {cfg.sft_minutes:g} --align-minutes {cfg.align_minutes:g} "
              f"--seed {cfg.seed}`."]
    return "\n".join(lines) + "\n"


def cell(text: str) -> str:
    """Text for one markdown table cell."""
    return " ".join(text.replace("|", "\\|").split())[:120] or "(empty)"
