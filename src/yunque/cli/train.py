"""Commands that train: tokenizer train, pretrain, sft, merge."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from yunque.cli.common import add_catalogue_flag, command, model_path
from yunque.cli.flags import add_fields, given, values
from yunque.config import LORA_LR, SFT_LOOP, LoopConfig, LoraConfig, ModelConfig, PretrainConfig, SFTConfig

LOOP_FLAGS = ["max_steps", "minutes", "lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "grad_clip",
              "grad_accum", "optimizer", "precision", "compile", "threads", "eval_every", "log_every",
              "checkpoint_every", "checkpoint_minutes", "resume", "progress", "device", "parallel",
              "activation_checkpointing", "peer_timeout"]
"""LoopConfig fields that are flags of every training command."""
OVERRIDES = ["n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "dropout"]
"""ModelConfig fields that `pretrain` can override in its preset (none: the preset's value)."""
PRETRAIN_FLAGS = ["data", "text_field", "preset", "tokenizer", "vocab_size", "batch_size", "seq_len",
                  "val_fraction", "eval_batches", "seed", "force"]
SFT_FLAGS = ["data", "max_seq_len", "truncation", "batch_size", "val_fraction", "eval_batches", "seed", "force"]
LORA_FLAGS = ["rank", "alpha", "dropout", "targets"]
METAVARS = {"data": "PATH", "tokenizer": "DIR|bytes", "device": "DEVICE"}


def register(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer",
                         description="Tokenizers: `yunque tokenizer train` trains a byte-level BPE.")
    tok.set_defaults(help_parser=tok)
    toksub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=type(tok))
    tt = command(toksub, "train", cmd_tokenizer_train, help="train a tokenizer on text files",
                 description="Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) and save it as "
                             "OUT/tokenizer.json, with yunque's special tokens (BOS, end of text, chat roles).",
                 examples="  yunque tokenizer train --data shakespeare.txt --vocab-size 1024 --out tok\n"
                          "  yunque tokenizer train --out tok          # the built-in corpus\n")
    tt.add_argument("--out", required=True, help="directory to write tokenizer.json to")
    add_fields(tt, PretrainConfig, ["data", "text_field", "vocab_size", "force"], metavars=METAVARS)

    pt = command(sub, "pretrain", cmd_pretrain, help="pretrain a model by next-token prediction",
                 description="Pretrain a GPT on unlabeled text. Writes a model dir: config.json, model.safetensors, "
                             "tokenizer.json, run.json, train_state.pt, metrics.jsonl, loss.png. Ctrl-C saves a "
                             "checkpoint; --resume continues exactly where it stopped.",
                 examples="  yunque pretrain --out runs/py --minutes 5                 # the built-in corpus\n"
                          "  yunque pretrain --out runs/shakespeare --data input.txt --tokenizer bytes "
                          "--preset mini --max-steps 2000\n"
                          "  yunque pretrain --out runs/py --resume                     # continue exactly\n"
                          "  yunque pretrain --out runs/py --resume --max-steps 4000    # and train longer\n")
    pt.add_argument("--out", required=True, help="run directory to create (it becomes the model dir)")
    add_fields(pt, PretrainConfig, PRETRAIN_FLAGS, metavars=METAVARS)
    add_fields(pt, ModelConfig, OVERRIDES, defaults=dict.fromkeys(OVERRIDES),
               help={n: f"override the preset's {n}: {d}" for n, d in _model_docs().items()})
    add_fields(pt, LoopConfig, LOOP_FLAGS, metavars=METAVARS)

    sft = command(sub, "sft", cmd_sft, help="fine-tune a model on conversations (full or LoRA)",
                  description="Supervised fine-tuning into a chat assistant. The loss covers assistant tokens only. "
                              "Data: jsonl with {\"messages\": [...]}, alpaca records (instruction/input/output), "
                              "prompt/completion pairs, or question/answer. With --lora the output is an adapter "
                              "dir (`yunque merge` folds it into the base, `yunque chat --adapter` uses it as is).",
                  examples="  yunque sft --model runs/speedrun --data chats.jsonl --out runs/chat\n"
                           "  yunque sft --model runs/speedrun --data chats.jsonl --out runs/lora --lora "
                           "--lora-rank 8\n"
                           "  yunque sft --out runs/chat --resume\n"
                           "  yunque merge runs/speedrun runs/lora runs/merged\n")
    sft.add_argument("--model", help="base model: a model dir or a catalogue name (not needed with --resume)")
    add_catalogue_flag(sft)
    sft.add_argument("--out", required=True, help="output dir: a model dir, or with --lora an adapter dir")
    add_fields(sft, SFTConfig, SFT_FLAGS, metavars=METAVARS)
    sft.add_argument("--lora", action="store_true", help="train low-rank adapters instead of every weight")
    add_fields(sft, LoraConfig, LORA_FLAGS, prefix="lora_")
    add_fields(sft, LoopConfig, LOOP_FLAGS, defaults=SFT_LOOP, metavars=METAVARS,
               help={"lr": f"peak learning rate (default: {SFT_LOOP.lr:g}; {LORA_LR:g} with --lora)"})

    merge = command(sub, "merge", cmd_merge, help="fold a LoRA adapter into its base model",
                    description="Write BASE + ADAPTER_DIR as one ordinary model dir (W + scale * B @ A) that loads "
                                "anywhere a model dir does, without yunque's LoRA code.",
                    examples="  yunque merge runs/speedrun runs/lora runs/merged\n")
    merge.add_argument("base", metavar="BASE", help="the base model the adapter was trained on (dir or catalogue "
                                                     "name)")
    merge.add_argument("adapter", metavar="ADAPTER_DIR", help="the adapter dir `yunque sft --lora` wrote")
    merge.add_argument("out", metavar="OUT_DIR", help="the model dir to write")
    merge.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds something")
    add_catalogue_flag(merge)


def _model_docs() -> dict[str, str]:
    from yunque.cli.flags import field_docs

    docs = field_docs(ModelConfig)
    return {n: docs.get(n, "") for n in OVERRIDES}


def loop_from(args, defaults: LoopConfig) -> LoopConfig:
    """The LoopConfig the flags describe: typed flags over `defaults`; --minutes alone drops the default step count
    (a time budget replaces it)."""
    fields = values(args, LOOP_FLAGS)
    typed = given(args)
    if "minutes" in typed and "max_steps" not in typed:
        fields["max_steps"] = None
    if args.resume and "max_steps" not in typed:
        fields["max_steps"] = None  # the run's own count
    return dataclasses.replace(defaults, **fields)


def warn_ignored_on_resume(args, names: list[str]) -> None:
    """A resumed run keeps its own settings: say so for flags that were typed anyway."""
    from yunque.train.run import FROM_TODAY

    ignored = sorted(n for n in given(args) & set(names) if n not in FROM_TODAY and n not in ("resume", "force"))
    if ignored:
        flags = ", ".join("--" + n.replace("_", "-") for n in ignored)
        print(f"note: {flags} ignored with --resume: the run keeps the settings in its run.json", file=sys.stderr)


def tuning_config(args, cls, flags: list[str], loop_defaults: LoopConfig, *, lr: float | None):
    """The config of a stage that tunes a model on data (`sft`, `align`, `reward train`) from its parsed flags:
    --model and --data required unless --resume (which warns about the flags it ignores), the loop from
    `loop_defaults` with `lr` as its learning rate where --lr is not given, and LoRA where --lora asks for it."""
    if not args.resume and (not args.model or not args.data):
        raise ValueError("--model and --data are required (except with --resume)")
    if args.resume:
        warn_ignored_on_resume(args, [*flags, *LOOP_FLAGS, "lora"])
    loop = loop_from(args, loop_defaults)
    if lr is not None and "lr" not in given(args):
        loop = dataclasses.replace(loop, lr=lr)
    fields = values(args, flags)
    fields["data"] = fields["data"] or ()
    lora = LoraConfig(**values(args, LORA_FLAGS, prefix="lora_")) if args.lora else None
    return cls(model=str(model_path(args.model, args.catalogue)) if args.model else "", out=args.out, lora=lora,
               loop=loop, **fields)


def cmd_tokenizer_train(args) -> int:
    from yunque.data.sources import SkipReport, iter_documents
    from yunque.outputs import staged_dir
    from yunque.tokenizer.bpe import train_bpe

    report = SkipReport()
    texts = (d.text for d in iter_documents(list(args.data), text_field=args.text_field, report=report))
    with staged_dir(args.out, force=args.force, sources=tuple(args.data)) as tmp:
        tok = train_bpe(texts, args.vocab_size, show_progress=sys.stderr.isatty())
        tok.save(tmp)
    if report.total:
        print(report.summary())
    print(f"wrote {Path(args.out) / 'tokenizer.json'} ({tok.vocab_size} tokens)")
    return 0


def cmd_pretrain(args) -> int:
    from yunque.train.distributed import session
    from yunque.train.pretrain import main

    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    if args.resume:
        warn_ignored_on_resume(args, [*PRETRAIN_FLAGS, *OVERRIDES, *LOOP_FLAGS])
    cfg = PretrainConfig(out=args.out, model_overrides=overrides, loop=loop_from(args, LoopConfig()),
                         **values(args, PRETRAIN_FLAGS))
    if not args.resume:
        cfg = with_short_run_choice(cfg, given(args))
    with session("pretrain", cfg.loop) as runtime:  # under torchrun: one of many processes, rank 0 prints
        s = main(cfg, runtime)
        val = f", val loss {s['val_loss']:.4f}" if s["val_loss"] is not None else ""
        print(f"trained {s['parameters']:,} parameters for {s['steps']} steps ({s['tokens_seen']:,} tokens, "
              f"{s['precision']}) in {s['wall_seconds']:.0f}s: loss {s['loss']:.4f}{val} -> {args.out}")
    return 0


def with_short_run_choice(cfg: PretrainConfig, typed: set[str]) -> PretrainConfig:
    """`cfg` with what its --minutes budget chooses on this CPU (train/budget.short_run_choice) for the flags not
    in `typed`."""
    from yunque.precision import resolve_precision
    from yunque.train.budget import short_run_choice

    loop = cfg.loop
    fp32_cpu = loop.device == "cpu" and resolve_precision(loop.precision, loop.device) == "fp32"
    choice = short_run_choice(loop.minutes, fp32_cpu=fp32_cpu, preset=cfg.preset, given=typed)
    if not choice:
        return cfg
    model = {k: choice[k] for k in OVERRIDES if k in choice}
    data = {k: choice[k] for k in ("batch_size", "seq_len") if k in choice}
    loop = dataclasses.replace(loop, **{k: v for k, v in choice.items() if k not in model and k not in data})
    chosen = ", ".join(f"{k}={v}" for k, v in choice.items())
    print(f"note: a {loop.minutes:g}-minute budget in fp32 on this CPU trains with {chosen} (flags you give win)",
          file=sys.stderr)
    return dataclasses.replace(cfg, model_overrides={**cfg.model_overrides, **model}, loop=loop, **data)


def cmd_sft(args) -> int:
    from yunque.train.distributed import session
    from yunque.train.sft import main

    cfg = tuning_config(args, SFTConfig, SFT_FLAGS, SFT_LOOP, lr=LORA_LR if args.lora else None)
    with session("sft", cfg.loop) as runtime:  # under torchrun: one of many processes, rank 0 prints
        s = main(cfg, runtime)
        before = f"{s['val_loss_before']:.4f} -> " if s.get("val_loss_before") is not None else ""
        after = f"{s['val_loss']:.4f}" if s.get("val_loss") is not None else "n/a"
        print(f"fine-tuned {s['trainable_parameters']:,} of {s['parameters']:,} parameters for {s['steps']} "
              f"steps: held-out assistant loss {before}{after} -> {args.out}")
    return 0


def cmd_merge(args) -> int:
    from yunque.train.sft import merge

    merge(model_path(args.base, args.catalogue), args.adapter, args.out, force=args.force)
    print(f"merged {args.adapter} into {args.base} -> {args.out}")
    return 0
