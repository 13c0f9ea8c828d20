"""Commands that align a model with preferences: align (DPO, GRPO, PPO), reward train, reward score."""

from __future__ import annotations

import argparse
import json
import sys

from yunque.cli.common import add_catalogue_flag, command
from yunque.cli.flags import add_fields
from yunque.cli.train import LOOP_FLAGS, LORA_FLAGS, METAVARS, tuning_config
from yunque.config import ALIGN_LOOP, LORA_LR, REWARD_LOOP, AlignConfig, LoraConfig, RewardConfig, align_loop

ALIGN_FLAGS = ["data", "method", "loss", "reward", "reward_fn", "beta", "anchor_text", "anchor_coef",
               "anchor_batch_size", "kl_coef", "kl_target", "group_size",
               "prompts_per_rollout", "max_new_tokens", "temperature", "epochs", "minibatches", "clip", "gamma",
               "lam", "value_coef", "batch_size", "max_seq_len", "val_fraction", "eval_batches", "seed", "force"]
REWARD_FLAGS = ["data", "batch_size", "max_seq_len", "val_fraction", "eval_batches", "seed", "force"]


def register(sub) -> None:
    al = command(sub, "align", cmd_align, help="align a chat model with preferences (DPO, GRPO, PPO)",
                 description="Align a chat model with what people prefer. dpo learns from preference pairs "
                             "({\"prompt\" or \"messages\", \"chosen\", \"rejected\"}, HH-RLHF files, or the feedback "
                             "dir `yunque chat` writes) against the frozen model it starts from; grpo and ppo sample "
                             "replies to prompts (any chat data) and learn from a reward: a reward model "
                             "(`yunque reward train`) or a Python function f(prompt, completion) -> float.",
                 examples="  yunque align --method dpo --model runs/chat --data pairs.jsonl --out runs/dpo\n"
                          "  yunque align --method dpo --model runs/chat --data ~/.yunque/feedback --out runs/fb "
                          "--lora\n"
                          "  yunque align --method grpo --model runs/chat --data prompts.jsonl --out runs/grpo "
                          "--reward-fn rewards:is_short\n"
                          "  yunque align --method ppo --model runs/chat --data prompts.jsonl --out runs/ppo "
                          "--reward runs/rm --kl-target 2\n"
                          "  yunque align --out runs/dpo --resume\n")
    al.add_argument("--model", help="the chat model to align: a model dir or catalogue name (not needed with "
                                    "--resume)")
    add_catalogue_flag(al)
    al.add_argument("--out", required=True, help="output dir: a model dir, or with --lora an adapter dir")
    add_fields(al, AlignConfig, ALIGN_FLAGS, metavars={**METAVARS, "reward": "RM_DIR", "reward_fn": "MODULE:FN"})
    al.add_argument("--lora", action="store_true", help="train low-rank adapters instead of every weight")
    add_fields(al, LoraConfig, LORA_FLAGS, prefix="lora_")
    add_fields(al, type(ALIGN_LOOP), LOOP_FLAGS, defaults=ALIGN_LOOP, metavars=METAVARS,
               help={"lr": "peak learning rate (default: 5e-06 for dpo, 1e-05 for grpo and ppo; 100x with --lora)"})

    rw = sub.add_parser("reward", help="train a reward model on preference pairs, or score replies with one",
                        description="Reward models: `yunque reward train` fits a chat model's backbone and a scalar "
                                    "head to preference pairs; `yunque reward score` prints the rewards it gives.",
                        epilog="examples:\n  yunque reward train --model runs/chat --data pairs.jsonl --out runs/rm\n"
                               "  yunque reward score runs/rm --data pairs.jsonl",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    rw.set_defaults(help_parser=rw)
    rwsub = rw.add_subparsers(dest="reward_command", metavar="ACTION", parser_class=type(rw))
    tr = command(rwsub, "train", cmd_reward_train, help="train a reward model",
                 description="Train a reward model: the backbone of --model and a scalar head on the reply's last "
                             "token, Bradley-Terry loss on preference pairs; reports held-out pairwise accuracy.",
                 examples="  yunque reward train --model runs/chat --data pairs.jsonl --out runs/rm\n"
                          "  yunque reward train --model runs/chat --data ../shared/data/hh-rlhf/"
                          "harmless-base-test.jsonl.gz --out runs/rm --lora\n")
    tr.add_argument("--model", help="the backbone: a chat model dir or catalogue name")
    add_catalogue_flag(tr)
    tr.add_argument("--out", required=True, help="the reward model dir to create")
    add_fields(tr, RewardConfig, REWARD_FLAGS, metavars=METAVARS)
    tr.add_argument("--lora", action="store_true", help="train low-rank adapters (and the head) on a frozen backbone")
    add_fields(tr, LoraConfig, LORA_FLAGS, prefix="lora_")
    add_fields(tr, type(REWARD_LOOP), LOOP_FLAGS, defaults=REWARD_LOOP, metavars=METAVARS,
               help={"lr": "peak learning rate (default: 0.0001; 0.001 with --lora)"})

    sc = command(rwsub, "score", cmd_reward_score, help="print the rewards a reward model gives",
                 description="Score replies with a reward model: for preference pairs, the reward of each reply and "
                             "whether the chosen one scores higher; for conversations, the reward of the last "
                             "assistant reply.",
                 examples="  yunque reward score runs/rm --data pairs.jsonl\n"
                          "  yunque reward score runs/rm --data chats.jsonl --json\n")
    sc.add_argument("rm", metavar="RM", help="the reward model dir")
    sc.add_argument("--data", nargs="+", required=True, metavar="PATH", help="pairs or conversations (jsonl)")
    sc.add_argument("--json", action="store_true", help="one JSON object a line")


def cmd_align(args) -> int:
    from yunque.train.align import main
    from yunque.train.distributed import session

    cfg = tuning_config(args, AlignConfig, ALIGN_FLAGS, ALIGN_LOOP, lr=align_loop(args.method, args.lora).lr)
    with session("align", cfg.loop) as runtime:  # under torchrun: one of many processes, rank 0 prints
        s = main(cfg, runtime)
        before, after = s.get("before") or {}, s.get("after") or {}
        figures = ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" if k in before else f"{k} {after[k]:.3f}"
                            for k in after if k in ("reward", "kl", "loss", "reward_accuracy"))
        print(f"aligned ({s['method']}) {s['trainable_parameters']:,} of {s['parameters']:,} parameters for "
              f"{s['steps']} steps{': held out ' + figures if figures else ''} -> {args.out}")
    return 0


def cmd_reward_train(args) -> int:
    from yunque.train.distributed import session
    from yunque.train.reward import main

    cfg = tuning_config(args, RewardConfig, REWARD_FLAGS, REWARD_LOOP, lr=LORA_LR if args.lora else None)
    with session("reward train", cfg.loop) as runtime:  # under torchrun: one of many processes, rank 0 prints
        s = main(cfg, runtime)
        b, a = s.get("before") or {}, s.get("after") or {}
        acc = f": held-out pairwise accuracy {b['accuracy']:.1%} -> {a['accuracy']:.1%}" if a and b else ""
        print(f"trained a reward model ({s['trainable_parameters']:,} of {s['parameters']:,} parameters) for "
              f"{s['steps']} steps{acc} -> {args.out}")
    return 0


def cmd_reward_score(args) -> int:
    from yunque.data.chat_data import load_conversations
    from yunque.data.preferences import load_pairs
    from yunque.train.scoring import load_reward_model

    rm = load_reward_model(args.rm)
    try:
        pairs = load_pairs(args.data)
    except ValueError as e:
        if "missing field(s)" not in str(e):
            raise
        pairs = None
    if pairs is not None:
        chosen = rm.score([p.messages for p in pairs], [p.chosen for p in pairs])
        rejected = rm.score([p.messages for p in pairs], [p.rejected for p in pairs])
        for p, c, r in zip(pairs, chosen, rejected):
            print(json.dumps({"name": p.name, "chosen": c, "rejected": r}) if args.json
                  else f"{p.name}\tchosen {c:+.4f}\trejected {r:+.4f}")
        right = sum(c > r for c, r in zip(chosen, rejected))
        print(f"{len(pairs)} pairs: the chosen reply scores higher in {right} ({right / len(pairs):.1%})",
              file=sys.stderr)
        return 0
    conversations = load_conversations(args.data)
    for c in conversations:
        if c.messages[-1]["role"] != "assistant":
            raise ValueError(f"{c.name}: the conversation does not end with an assistant reply to score")
    scores = rm.score([c.messages[:-1] for c in conversations], [c.messages[-1]["content"] for c in conversations])
    for c, s in zip(conversations, scores):
        print(json.dumps({"name": c.name, "reward": s}) if args.json else f"{c.name}\t{s:+.4f}")
    return 0
