"""Alignment you can check without trusting a model: a preference stated only through pairs, measured by a rule.

1. A small chat model: the speedrun's recipe (`yunque speedrun`: a BPE tokenizer and the mini preset pretrained
   on the built-in corpus, fine-tuned on standard-library questions), or --sft-model DIR.
2. The preference: short replies, of 1 to N-1 words. N is chosen from the SFT model's own samples so that it does not
   already have it (at most ~15% of its sampled replies to training questions are that short; 20 words if that
   is rare enough). Pairs are made of its own samples: for a training question, one of its short replies (chosen)
   and one of its long ones (rejected); for a quarter of the questions, one of its short replies and an empty
   reply, which the rule says is not short either. Nothing else states the preference: DPO reads the pairs, a
   reward model is trained on them, and GRPO and PPO learn from that reward model.
3. Before and after each method, on held-out questions (greedy replies): the share that satisfies the rule, the
   reward model's mean score, the KL to the SFT model (nats per sampled reply), and the perplexity of ordinary
   text (40 pydoc topics, prose); wall time of each run. Every method is anchored (`--anchor-text`) on the other
   pydoc topics: held to the SFT model's next-token distributions there, never trained on the 40 evaluated.
4. A verifiable reward: sums of two 2-digit numbers, spelled digit by digit ("What is 4 7 + 1 2?" -> "5 9"). The
   chat model is fine-tuned on 600 sums, then GRPO on 2,000 others with reward 1 for the right number; held-out
   accuracy (greedy) before -> after.

Every figure comes from this one run, on this machine; the machine may be shared (the load average is printed).

    python benchmarks/align.py --out runs/bench-align [--sft-model DIR] [--quick]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch

from yunque.config import AlignConfig, LoopConfig, LoraConfig, RewardConfig, SFTConfig, SpeedrunConfig
from yunque.data.sources import builtin_documents
from yunque.data.stdlib_qa import split_heldout, stdlib_qa
from yunque.engine.engine import Engine
from yunque.eval.perplexity import text_perplexity
from yunque.modeldir import load_model
from yunque.precision import cpu_description
from yunque.speedrun import MAX_REPLY, sample_texts, short_reply_pairs, words
from yunque.tokenizer.chat import ChatFormat
from yunque.train.align import main as align
from yunque.train.align import reply_kl
from yunque.train.reward import main as train_reward
from yunque.train.scoring import load_reward_model
from yunque.train.sft import main as sft
from yunque.train.sft import merge

MAX_NEW = MAX_REPLY
"""Longest reply sampled or evaluated."""


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu_description()}, {platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; load average {load:.1f} at start")


def replies(model, tok, fmt, questions: list[str], *, temperature: float, seed: int, n: int = 1) -> list[str]:
    return sample_texts(model, tok, fmt, questions, temperature=temperature, seed=seed, n=n)


def evaluate(model_dir: Path, reference, tok, fmt, held: list[str], ordinary: list[str], rule, rm) -> dict:
    """Rule satisfaction and RM score of greedy replies, KL to the reference, perplexity of ordinary text."""
    model, _ = load_model(model_dir)
    model.float().eval()
    texts = replies(model, tok, fmt, held, temperature=0.0, seed=0)
    engine = Engine(model, tok)
    engine.stop_ids |= fmt.stop_ids
    prompts = [fmt.prompt([{"role": "user", "content": q}]) for q in held]
    kl = reply_kl(model, reference, engine, fmt, prompts, max_new_tokens=MAX_NEW, seq_len=model.cfg.max_seq_len)
    scores = rm.score([[{"role": "user", "content": q}] for q in held], texts) if rm is not None else [float("nan")]
    return {"rule": sum(map(rule, texts)) / len(texts), "rm_score": sum(scores) / len(scores), "kl": kl,
            "perplexity": text_perplexity(model, tok, ordinary)["perplexity"],
            "mean_words": sum(map(words, texts)) / len(texts), "examples": texts[:3]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


THREADS = [0]
"""--threads, for every run's loop."""


def loop(out: Path, steps: int, lr: float, **kw) -> LoopConfig:
    kw.setdefault("threads", THREADS[0])
    return LoopConfig(out_dir=str(out), max_steps=steps, lr=lr, warmup_steps=kw.pop("warmup_steps", 5),
                      weight_decay=0.0, eval_every=0, progress=False, compile="off", **kw)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def spell(n: int) -> str:
    """A number digit by digit, "47" -> "4 7": one token a digit for the speedrun's tokenizer (which cuts "47" as
    " 4" "7" but "91" whole), so a sum is a digit-by-digit computation."""
    return " ".join(str(n))


def sum_reward(prompt: str, completion: str) -> float:
    """1 if the digits of the reply, read in order, make the sum the question asks for ("What is 4 7 + 1 2?"
    answered "5 9", "59" or "it is 5 9"), else 0."""
    m = re.search(r"What is ([\d ]+) \+ ([\d ]+)\?", prompt)
    digits = re.findall(r"\d", completion)
    return float(bool(m and digits) and int("".join(digits)) == sum(int(g.replace(" ", "")) for g in m.groups()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench-align")
    p.add_argument("--sft-model", help="a chat model dir to start from (default: build one with the speedrun)")
    p.add_argument("--pretrained", help="a pretrained model dir (e.g. a speedrun's, before its SFT) to fine-tune "
                                        "here by steps instead of running the whole speedrun")
    p.add_argument("--sft-steps", type=int, default=300, help="fine-tuning steps with --pretrained")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: one per physical core)")
    p.add_argument("--minutes", type=float, default=2.0, help="speedrun pretraining budget")
    p.add_argument("--sft-minutes", type=float, default=1.5, help="speedrun fine-tuning budget")
    p.add_argument("--questions", type=int, default=600, help="training questions sampled for pairs and prompts")
    p.add_argument("--held", type=int, default=100, help="held-out questions evaluated")
    p.add_argument("--dpo-steps", type=int, default=150)
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--dpo-lr", type=float, default=1e-4)
    p.add_argument("--rl-lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--anchor-coef", type=float, default=1.0, help="weight of the anchor on ordinary text (0: none)")
    p.add_argument("--rm-steps", type=int, default=150)
    p.add_argument("--lora", action="store_true", help="align LoRA adapters (rank 8) instead of the whole model")
    p.add_argument("--sums-sft-steps", type=int, default=300)
    p.add_argument("--sums-rl-steps", type=int, default=500)
    p.add_argument("--sums-rl-lr", type=float, default=3e-4)
    p.add_argument("--skip", nargs="*", default=[], choices=["dpo", "grpo", "ppo", "sums"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:  # before the machine line, which names the threads
        torch.set_num_threads(args.threads)
        THREADS[0] = args.threads
    print(machine(), flush=True)
    t_all = time.perf_counter()
    figures: dict = {"machine": machine()}

    if args.sft_model:
        chat = Path(args.sft_model)
    elif args.pretrained:  # the speedrun's fine-tuning, by steps: a busy machine makes its time budget useless
        chat = out / "chat"
        train_path = write_jsonl(out / "sft.jsonl", split_heldout(stdlib_qa(), 0.1, seed=0)[0])
        s, seconds = timed(sft, SFTConfig(model=args.pretrained, data=(str(train_path),), out=str(chat),
                                          batch_size=16, val_fraction=0.05, force=True,
                                          loop=loop(chat, args.sft_steps, 1e-3, warmup_steps=20,
                                                    threads=args.threads)))
        figures["sft_steps"], figures["sft_seconds"] = s["steps"], round(seconds)
        print(f"SFT model: {chat}, {s['steps']} steps from {args.pretrained}: held-out assistant loss "
              f"{s['val_loss_before']:.3f} -> {s['val_loss']:.3f} ({seconds:.0f} s)", flush=True)
    else:
        from yunque.speedrun import main as speedrun

        _, seconds = timed(speedrun, SpeedrunConfig(out=str(out / "speedrun"), minutes=args.minutes,
                                                    sft_minutes=args.sft_minutes, align_minutes=0, heldout_questions=40,
                                                    progress=False, force=True, seed=args.seed))
        chat = out / "speedrun" / "chat"
        figures["speedrun_seconds"] = round(seconds)
        print(f"SFT model: {chat} ({seconds:.0f} s)", flush=True)
    reference, tok = load_model(chat)
    reference.float().eval()
    fmt = ChatFormat.of(chat, tok)

    train_qa, held_qa = split_heldout(stdlib_qa(), 0.1, seed=0)  # the speedrun's split: held-out questions unseen
    rng = random.Random(args.seed)
    train_q = [c["messages"][0]["content"] for c in rng.sample(train_qa, min(args.questions, len(train_qa)))]
    held_q = [c["messages"][0]["content"] for c in held_qa[:args.held]]
    ordinary = [d.text for d in builtin_documents() if d.name.startswith("pydoc:")][::8][:40]

    if {"dpo", "grpo", "ppo"} <= set(args.skip):
        return finish(figures, sums(chat, out, args.seed, args.sums_sft_steps, args.sums_rl_steps, args.sums_rl_lr),
                      out, t_all, args)

    # ---- the preference, from the SFT model's own samples ----
    samples, seconds = timed(replies, reference, tok, fmt, train_q, temperature=1.0, seed=1000, n=6)
    limit, share, pairs = short_reply_pairs(train_q, samples, 6, seed=args.seed)
    figures["rule"] = f"a reply of 1 to {limit - 1} words"
    figures["sampled_short_share"] = share

    def rule(text: str) -> bool:  # an empty reply does not count as a short one
        return 0 < words(text) < limit

    figures["pairs"] = len(pairs)
    figures["pairs_against_empty"] = sum(not p["rejected"] for p in pairs)
    print(f"rule: {figures['rule']} ({share:.0%} of {len(samples)} sampled replies satisfy it; "
          f"{seconds:.0f} s to sample); {len(pairs)} pairs, {figures['pairs_against_empty']} of them a short reply "
          f"against an empty one", flush=True)
    pairs_path = write_jsonl(out / "pairs.jsonl", pairs)
    evaluated = set(ordinary)  # the anchor: every other pydoc topic
    anchor_path = write_jsonl(out / "anchor.jsonl", [{"text": d.text} for d in builtin_documents()
                                                     if d.name.startswith("pydoc:") and d.text not in evaluated])
    anchor = dict(anchor_text=(str(anchor_path),), anchor_coef=args.anchor_coef) if args.anchor_coef else {}
    prompts_path = write_jsonl(out / "prompts.jsonl", [{"prompt": q, "completion": ""} for q in train_q])

    # ---- the reward model, on the pairs alone ----
    rm_dir = out / "rm"
    s, seconds = timed(train_reward, RewardConfig(model=str(chat), data=(str(pairs_path),), out=str(rm_dir),
                                                  batch_size=8, val_fraction=0.15, force=True,
                                                  loop=loop(rm_dir, args.rm_steps, 3e-4)))
    figures["reward_model"] = {"held_out_accuracy": s["after"]["accuracy"], "before": s["before"]["accuracy"],
                               "held_out_pairs": s["after"]["pairs"], "steps": s["steps"], "seconds": round(seconds)}
    print(f"reward model: held-out pairwise accuracy {s['before']['accuracy']:.0%} -> {s['after']['accuracy']:.0%} "
          f"({s['after']['pairs']} pairs, {seconds:.0f} s)", flush=True)
    rm = load_reward_model(rm_dir)

    base = evaluate(chat, reference, tok, fmt, held_q, ordinary, rule, rm)
    figures["sft"] = base
    print(f"SFT model: rule {base['rule']:.0%}, RM score {base['rm_score']:+.3f}, perplexity "
          f"{base['perplexity']:.2f}, {base['mean_words']:.1f} words a reply", flush=True)

    runs = {
        "dpo": dict(method="dpo", data=(str(pairs_path),), beta=args.beta, batch_size=8, **anchor,
                    loop_args=(args.dpo_steps, args.dpo_lr)),
        "grpo": dict(method="grpo", data=(str(prompts_path),), reward=str(rm_dir), group_size=8, **anchor,
                     prompts_per_rollout=4, max_new_tokens=MAX_NEW, kl_coef=args.kl_coef,
                     loop_args=(args.rl_steps, args.rl_lr)),
        "ppo": dict(method="ppo", data=(str(prompts_path),), reward=str(rm_dir), group_size=4, **anchor,
                    prompts_per_rollout=8, minibatches=2, max_new_tokens=MAX_NEW, kl_coef=args.kl_coef,
                    kl_target=4.0, loop_args=(args.rl_steps, args.rl_lr)),
    }
    for name, settings in runs.items():
        if name in args.skip:
            continue
        steps, lr = settings.pop("loop_args")
        run_dir = out / name
        s, seconds = timed(align, AlignConfig(model=str(chat), out=str(run_dir), force=True, val_fraction=0.05,
                                              seed=args.seed, loop=loop(run_dir, steps, lr),
                                              lora=LoraConfig(rank=8, alpha=16) if args.lora else None, **settings))
        if args.lora:  # the adapter folded into the model, to evaluate it as an ordinary model dir
            merge(chat, run_dir, out / f"{name}-merged", force=True)
            run_dir = out / f"{name}-merged"
        after = evaluate(run_dir, reference, tok, fmt, held_q, ordinary, rule, rm)
        figures[name] = {**after, "steps": s["steps"], "seconds": round(seconds)}
        print(f"{name}: rule {base['rule']:.0%} -> {after['rule']:.0%}, RM score {base['rm_score']:+.3f} -> "
              f"{after['rm_score']:+.3f}, KL to SFT {after['kl']:.2f} nats/reply, perplexity "
              f"{base['perplexity']:.2f} -> {after['perplexity']:.2f} "
              f"({after['perplexity'] / base['perplexity'] - 1:+.1%}), {after['mean_words']:.1f} words a reply; "
              f"{s['steps']} steps, {seconds:.0f} s", flush=True)

    finish(figures, None if "sums" in args.skip else sums(chat, out, args.seed, args.sums_sft_steps,
                                                          args.sums_rl_steps, args.sums_rl_lr), out, t_all, args)


def acceptance(figures: dict) -> list[str]:
    """The issue's targets against this run's figures, one line each."""
    lines, base = [], figures.get("sft")
    for name in ("dpo", "grpo", "ppo"):
        if base is None or name not in figures:
            continue
        after = figures[name]
        rise = after["perplexity"] / base["perplexity"] - 1
        met = base["rule"] <= 0.2 and after["rule"] >= 0.8 and rise <= 0.1
        lines.append(f"{name}: rule {base['rule']:.0%} -> {after['rule']:.0%} (<= 20% -> >= 80%), perplexity "
                     f"{rise:+.1%} (<= +10%): {'met' if met else 'NOT met'}")
    if "reward_model" in figures:
        acc = figures["reward_model"]["held_out_accuracy"]
        lines.append(f"reward model: held-out accuracy {acc:.0%} (>= 90%): {'met' if acc >= 0.9 else 'NOT met'}")
    if "sums" in figures:
        points = round((figures["sums"]["after"] - figures["sums"]["before"]) * 100, 6)  # 0.41 - 0.21 < 0.2
        lines.append(f"sums: GRPO {points:+.0f} points (>= +20): {'met' if points >= 20 else 'NOT met'}")
    return lines


def finish(figures: dict, sums_figures: dict | None, out: Path, t_all: float, args) -> None:
    if sums_figures is not None:
        figures["sums"] = sums_figures
    figures["acceptance"] = acceptance(figures)
    print("\n".join(["acceptance:", *figures["acceptance"]]), flush=True)
    figures["wall_seconds"] = round(time.perf_counter() - t_all)
    print(f"all in {figures['wall_seconds']} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    (out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


SUMS_PROMPTS = 32
"""Sums: prompts in a GRPO rollout, 8 replies each: 256 replies a step (fewer were too noisy to learn from)."""


def sums(chat: Path, out: Path, seed: int, sft_steps: int, rl_steps: int, rl_lr: float) -> dict:
    """A verifiable reward: sums of two 2-digit numbers spelled digit by digit. The chat model is fine-tuned on 600
    of them, then GRPO on 2,000 other sums with reward 1 for the right sum (`sum_reward`); greedy accuracy on 100
    held-out sums before -> after, and the share of sampled replies (temperature 1, 8 a sum) that are right."""
    out = out.resolve()  # the reward function is imported from `out`, as the working directory
    rng = random.Random(seed)
    problems = sorted({(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(6000)})
    rng.shuffle(problems)
    held, rest = problems[:100], problems[100:]
    sft_rows, rl_rows = rest[:600], rest[600:2600]

    def ask(a: int, b: int) -> str:
        return f"What is {spell(a)} + {spell(b)}?"

    sft_path = write_jsonl(out / "sums_sft.jsonl", [{"prompt": ask(a, b), "completion": spell(a + b)}
                                                    for a, b in sft_rows])
    rl_path = write_jsonl(out / "sums_prompts.jsonl", [{"prompt": ask(a, b), "completion": ""} for a, b in rl_rows])
    sft_dir = out / "sums_sft"
    _, t_sft = timed(sft, SFTConfig(model=str(chat), data=(str(sft_path),), out=str(sft_dir), batch_size=16,
                                    val_fraction=0.05, force=True,
                                    loop=loop(sft_dir, sft_steps, 1e-3, warmup_steps=10)))
    _, tok = load_model(sft_dir)
    fmt = ChatFormat.of(sft_dir, tok)
    questions = [ask(a, b) for a, b in held]

    def accuracy(model_dir: Path) -> dict:
        m, _ = load_model(model_dir)
        m.float().eval()
        greedy = replies(m, tok, fmt, questions, temperature=0.0, seed=0)
        sampled = replies(m, tok, fmt, questions, temperature=1.0, seed=0, n=8)
        right = [sum_reward(q, t) for q, t in zip([q for q in questions for _ in range(8)], sampled)]
        return {"greedy": sum(map(sum_reward, questions, greedy)) / len(held), "sampled": sum(right) / len(right),
                "pass_at_8": sum(max(right[i:i + 8]) for i in range(0, len(right), 8)) / len(held),
                "examples": [f"{q} -> {t}" for q, t in zip(questions[:3], greedy)]}

    before = accuracy(sft_dir)
    print(f"sums: fine-tuned on {len(sft_rows)} sums ({t_sft:.0f} s): held-out accuracy {before['greedy']:.0%} "
          f"(sampled {before['sampled']:.0%}, pass@8 {before['pass_at_8']:.0%})", flush=True)
    (out / "sum_rewards.py").write_text(f"import re\n\n\n{inspect.getsource(sum_reward)}", encoding="utf-8")
    cwd = Path.cwd()
    os.chdir(out)  # --reward-fn imports from the working directory
    try:
        grpo_dir = out / "sums_grpo"
        s, t_rl = timed(align, AlignConfig(model=str(sft_dir), data=(str(rl_path),), out=str(grpo_dir), method="grpo",
                                           reward_fn="sum_rewards:sum_reward", group_size=8,
                                           prompts_per_rollout=SUMS_PROMPTS, max_new_tokens=8, kl_coef=0.02,
                                           temperature=1.0, force=True, val_fraction=0.05,
                                           loop=loop(grpo_dir, rl_steps, rl_lr)))
    finally:
        os.chdir(cwd)
    after = accuracy(grpo_dir)
    print(f"sums: GRPO ({s['steps']} steps, {t_rl:.0f} s): held-out accuracy {before['greedy']:.0%} -> "
          f"{after['greedy']:.0%} (sampled {before['sampled']:.0%} -> {after['sampled']:.0%}, pass@8 "
          f"{before['pass_at_8']:.0%} -> {after['pass_at_8']:.0%}); e.g. {'; '.join(after['examples'])}", flush=True)
    return {"held_out": len(held), "sft_examples": len(sft_rows), "rl_prompts": len(rl_rows),
            "before": before["greedy"], "after": after["greedy"], "sampled": [before["sampled"], after["sampled"]],
            "pass_at_8": [before["pass_at_8"], after["pass_at_8"]], "examples": after["examples"],
            "steps": s["steps"], "sft_seconds": round(t_sft), "grpo_seconds": round(t_rl)}


if __name__ == "__main__":
    sys.exit(main())
