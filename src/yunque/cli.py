"""The `yunque` command: each subcommand maps its flags onto one config and calls one stage.

Errors a user can fix (bad paths, bad flags, corrupt files) print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG_PRETRAIN = """examples:
  yunque pretrain --out runs/py --minutes 5                 # built-in corpus (Python's own source and docs)
  yunque pretrain --out runs/shakespeare --data input.txt --tokenizer bytes --preset mini --max-steps 2000
  yunque pretrain --out runs/py --resume                     # continue an interrupted run exactly
"""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="yunque", description="yunque: train, fine-tune, evaluate and serve GPT-style language "
                                          "models on a laptop CPU or a GPU cluster.",
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="start with `yunque speedrun`: it trains a tokenizer and a model on Python's own source "
                      "code and docs in about ten minutes, then writes a report.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    toksub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=Parser)
    tt = toksub.add_parser("train", help="train a tokenizer on text files", description=(
        "Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) and save it as OUT/tokenizer.json."))
    tt.add_argument("--data", nargs="+", default=[], metavar="PATH",
                    help="text files, folders or jsonl; default: the built-in corpus")
    tt.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size including special tokens")
    tt.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    tt.add_argument("--out", required=True, help="directory to write tokenizer.json to")

    pt = sub.add_parser("pretrain", help="pretrain a model by next-token prediction",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_PRETRAIN,
                        description="Pretrain a GPT on unlabeled text. Writes a model dir: config.json, "
                                    "model.safetensors, tokenizer.json, train_state.pt, metrics.jsonl, loss.png.")
    pt.add_argument("--out", required=True, help="run directory (becomes the model dir)")
    pt.add_argument("--data", nargs="+", default=[], metavar="PATH",
                    help="text files, folders or jsonl; default: the built-in corpus")
    pt.add_argument("--text-field", default="text", help="jsonl field holding the text")
    pt.add_argument("--preset", default="mini", help="model size: tiny, mini, small, base, medium, large, gpt2-tiny, "
                                                     "gpt2-small (default: mini)")
    pt.add_argument("--tokenizer", default=None, metavar="DIR|bytes",
                    help="reuse a tokenizer dir, or 'bytes' for one token per byte; default: train a BPE")
    pt.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary when a tokenizer is trained")
    for name in ("n_layer", "n_head", "n_kv_head", "d_model"):
        pt.add_argument("--" + name.replace("_", "-"), dest=name, type=int, help=f"override the preset's {name}"
                        + (" (must divide --n-head)" if name == "n_kv_head" else ""))
    pt.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch (default: 16)")
    pt.add_argument("--seq-len", type=int, default=None, help="training context (default: the preset's)")
    pt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    budget = pt.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, default=None,
                        help="optimizer steps (default: 1000; with --resume, the run's own, or a new total)")
    budget.add_argument("--minutes", type=float, default=None, help="train for this wall-clock time instead")
    pt.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    pt.add_argument("--warmup-steps", type=int, default=100)
    pt.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine")
    pt.add_argument("--weight-decay", type=float, default=0.1)
    pt.add_argument("--dropout", type=float, default=0.0)
    pt.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="bf16 autocast where the hardware is fast at it (auto), or force one")
    pt.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile the training step (auto: once the first steps show minutes of training "
                         "left, since compiling takes 10-45 s)")
    pt.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                    help="muon: Muon on the blocks' matrices, AdamW on the rest (on small CPU runs AdamW reaches "
                         "a loss sooner: benchmarks/time_to_loss.py)")
    pt.add_argument("--eval-every", type=int, default=250, help="validate every N steps")
    pt.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    pt.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out")
    pt.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its checkpoint, with the settings saved in its run.json")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    pt.add_argument("--no-progress", action="store_true", help="no progress bar")

    gen = sub.add_parser("generate", help="continue a prompt with a model",
                         description="Generate text from MODEL_DIR, streamed as it is produced.")
    add_model_arg(gen)
    gen.add_argument("prompt")
    add_sampling_flags(gen)
    gen.add_argument("--few-shot", metavar="FILE",
                     help="jsonl of solved examples ({\"input\", \"output\"}) to put before the prompt")
    gen.add_argument("--k", type=int, default=3, help="how many --few-shot examples to use (0: zero-shot)")

    info = sub.add_parser("info", help="describe a model dir")
    add_model_arg(info)
    info.add_argument("--json", action="store_true", help="print JSON")

    ppl = sub.add_parser("perplexity", help="loss, perplexity and bits per byte of a model on text")
    add_model_arg(ppl)
    ppl.add_argument("--data", nargs="+", required=True, metavar="PATH")
    ppl.add_argument("--text-field", default="text")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--json", action="store_true", help="print JSON")

    sft = sub.add_parser("sft", help="fine-tune a model on conversations (full or LoRA)",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Supervised fine-tuning into a chat assistant. The loss covers assistant "
                                     "tokens only. Data: jsonl with {\"messages\": [...]}, alpaca records "
                                     "(instruction/input/output), prompt/completion pairs, or question/answer.",
                         epilog="examples:\n  yunque sft --model runs/speedrun --data chats.jsonl --out runs/chat\n"
                                "  yunque sft --model runs/speedrun --data chats.jsonl --out runs/lora --lora "
                                "--lora-rank 8\n  yunque merge runs/speedrun runs/lora runs/merged")
    sft.add_argument("--model", help="base model (dir or catalogue name)")
    add_catalogue_flag(sft)
    sft.add_argument("--data", nargs="+", default=[], metavar="FILE", help="conversation files (.jsonl, .jsonl.gz)")
    sft.add_argument("--out", required=True, help="output dir: a model dir, or with --lora an adapter dir")
    sft.add_argument("--lora", action="store_true", help="train low-rank adapters instead of every weight")
    sft.add_argument("--lora-rank", type=int, default=8)
    sft.add_argument("--lora-alpha", type=float, default=16.0)
    sft.add_argument("--lora-dropout", type=float, default=0.0)
    sft.add_argument("--lora-targets", nargs="+", default=["qkv", "proj", "up", "down"],
                     help="Linear layers to adapt (default: qkv proj up down)")
    sft.add_argument("--max-seq-len", type=int, default=None, help="longest conversation (default: the model's)")
    sft.add_argument("--truncation", choices=["truncate", "drop"], default="truncate",
                     help="what to do with longer conversations (both are counted and reported)")
    sft.add_argument("--batch-size", type=int, default=8)
    sft.add_argument("--val-fraction", type=float, default=0.05)
    sft_budget = sft.add_mutually_exclusive_group()
    sft_budget.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: 500)")
    sft_budget.add_argument("--minutes", type=float, default=None)
    sft.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 LoRA, 1e-4 full)")
    sft.add_argument("--warmup-steps", type=int, default=20)
    sft.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    sft.add_argument("--eval-every", type=int, default=100)
    sft.add_argument("--checkpoint-every", type=int, default=0)
    sft.add_argument("--resume", action="store_true", help="continue the run in --out with its saved settings")
    sft.add_argument("--seed", type=int, default=0)
    sft.add_argument("--device", default="cpu")
    sft.add_argument("--no-progress", action="store_true")

    merge = sub.add_parser("merge", help="fold a LoRA adapter into its base model")
    merge.add_argument("base", metavar="BASE")
    merge.add_argument("adapter", metavar="ADAPTER_DIR")
    merge.add_argument("out", metavar="OUT_DIR")

    chat = sub.add_parser("chat", help="talk to a chat model in the terminal",
                          description="Multi-turn chat with streamed replies. Commands: /reset, /system TEXT, "
                                      "/save FILE, /exit. Reads piped input too (one message per line).")
    add_model_arg(chat)
    chat.add_argument("--adapter", metavar="DIR", help="a LoRA adapter dir to apply")
    chat.add_argument("--system", help="system prompt")
    add_sampling_flags(chat)

    imp = sub.add_parser("import", help="convert a Hugging Face model dir into a yunque model dir",
                         description="Convert a Hugging Face dir (GPT-2, Llama 2/3, Mistral, Qwen2/3, SmolLM2, "
                                     "TinyLlama; safetensors) into a yunque model dir. HF dirs also work "
                                     "directly wherever a model dir is accepted.")
    imp.add_argument("hf_dir", metavar="HF_DIR")
    imp.add_argument("out", metavar="OUT_DIR")

    exp = sub.add_parser("export", help="write a model as a Hugging Face dir or a GGUF file",
                         description="Export a model dir for transformers (--format hf) or llama.cpp / ollama "
                                     "(--format gguf).")
    add_model_arg(exp)
    exp.add_argument("--format", choices=["hf", "gguf"], required=True)
    exp.add_argument("out", metavar="OUT", help="output dir (hf) or .gguf file")
    exp.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16", help="GGUF tensor type")

    pull = sub.add_parser("pull", help="download a Hugging Face model (safetensors only) into the catalogue")
    pull.add_argument("repo_id", metavar="REPO_ID", help="e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    pull.add_argument("--revision", help="branch, tag or commit")
    pull.add_argument("--token", help="Hugging Face token for gated or private repos (or set HF_TOKEN)")
    add_catalogue_flag(pull)
    models = sub.add_parser("models", help="list the models in the local catalogue")
    add_catalogue_flag(models)
    rm = sub.add_parser("rm", help="delete a model from the local catalogue")
    rm.add_argument("name", metavar="NAME")
    add_catalogue_flag(rm)

    sr = sub.add_parser("speedrun", help="the main job: tokenizer + model on the built-in corpus, then a report",
                        description="Train a BPE tokenizer and a model on Python's standard library source and "
                                    "documentation (no network needed), then write report.md and report.json.")
    sr.add_argument("--out", default="runs/speedrun", help="run directory (default: runs/speedrun)")
    sr.add_argument("--minutes", type=float, default=6.0, help="pretraining budget in minutes (default: 6)")
    sr.add_argument("--sft-minutes", type=float, default=2.0, help="fine-tuning budget in minutes (default: 2)")
    sr.add_argument("--preset", default=None, help="model size (default: the speedrun's own)")
    sr.add_argument("--seed", type=int, default=0)
    sr.add_argument("--no-progress", action="store_true")
    return p


def add_catalogue_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalogue", metavar="DIR",
                   help="model catalogue (default: $YUNQUE_HOME/models, else ~/.cache/yunque/models)")


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a model dir (yunque or Hugging Face) or a catalogue name")
    add_catalogue_flag(p)


def model_path(args) -> Path:
    from yunque.interop.catalogue import catalogue_dir, resolve

    return resolve(args.model, root=catalogue_dir(args.catalogue))


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="decode precision (auto: bf16 where the CPU multiplies it natively, except for models "
                        "under 4M parameters)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: 6-10 s more at start (per batch size and cache length), "
                        "then 5-20%% less time per token; pays off for long outputs")


def cmd_tokenizer(args) -> int:
    from yunque.data.sources import SkipReport, iter_documents
    from yunque.tokenizer.bpe import train_bpe

    report = SkipReport()
    texts = (d.text for d in iter_documents(args.data, text_field=args.text_field, report=report))
    tok = train_bpe(texts, args.vocab_size, show_progress=sys.stderr.isatty())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    if report.total:
        print(report.summary())
    print(f"wrote {Path(args.out) / 'tokenizer.json'} ({tok.vocab_size} tokens)")
    return 0


def cmd_pretrain(args) -> int:
    from yunque.train.loop import LoopConfig
    from yunque.train.pretrain import PretrainConfig, main

    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_kv_head", "d_model")
                 if getattr(args, k) is not None}
    if args.dropout:
        overrides["dropout"] = args.dropout
    # default budget 1000 steps; on --resume the run's own budget unless one is given
    max_steps = args.max_steps
    if max_steps is None and args.minutes is None and not args.resume:
        max_steps = 1000
    loop = LoopConfig(out_dir=args.out, max_steps=max_steps, minutes=args.minutes, lr=args.lr,
                      warmup_steps=args.warmup_steps, schedule=args.schedule, weight_decay=args.weight_decay,
                      grad_accum=args.grad_accum, precision=args.precision, compile=args.compile,
                      optimizer=args.optimizer, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                      resume=args.resume, progress=not args.no_progress, device=args.device)
    cfg = PretrainConfig(out=args.out, data=tuple(args.data), text_field=args.text_field, preset=args.preset,
                         tokenizer=args.tokenizer, vocab_size=args.vocab_size, batch_size=args.batch_size,
                         seq_len=args.seq_len, model_overrides=overrides, val_fraction=args.val_fraction,
                         seed=args.seed, loop=loop)
    s = main(cfg)
    val = f", val loss {s['val_loss']:.4f}" if s["val_loss"] is not None else ""
    print(f"trained {s['parameters']:,} parameters for {s['steps']} steps ({s['tokens_seen']:,} tokens, "
          f"{s['precision']}) in {s['wall_seconds']:.0f}s: loss {s['loss']:.4f}{val} -> {args.out}")
    return 0


def sampling_params(args):
    from yunque.engine.engine import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))


def cmd_generate(args) -> int:
    from yunque.engine.engine import Engine
    from yunque.modeldir import generation_stop_ids, load_model

    params = sampling_params(args)
    model, tok = load_model(model_path(args))
    engine = Engine(model, tok, precision=args.precision, compile=args.compile)
    engine.stop_ids |= generation_stop_ids(model_path(args), tok.vocab_size)  # imported models name their own
    shown = args.prompt
    if args.few_shot:
        from dataclasses import replace

        from yunque.eval.fewshot import build_prompt, load_examples
        from yunque.tokenizer.chat import has_chat_tokens, load_chat_template

        template = load_chat_template(model_path(args))
        chat = template is not None or (has_chat_tokens(tok) and "<|assistant|>" in tok.special_ids)
        examples = load_examples(args.few_shot)
        prompt = build_prompt(examples, args.prompt, args.k, chat=chat, tokenizer=tok, template=template)
        if not chat:
            params = replace(params, stop=(*params.stop, "\n\n"))
        shown = ""
    else:
        prompt = tok.encode(args.prompt, bos=tok.bos_id is not None)
    pieces = engine.stream(prompt, params)
    first = next(pieces, "")  # the prompt is checked (length, ids) before anything is printed
    sys.stdout.write(shown + first)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_info(args) -> int:
    from yunque.modeldir import describe

    d = describe(model_path(args))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for key, value in d.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:>18}: {value}")
    return 0


def cmd_perplexity(args) -> int:
    from yunque.data.sources import SkipReport, iter_documents
    from yunque.eval.perplexity import text_perplexity
    from yunque.modeldir import load_model

    model, tok = load_model(model_path(args))
    report = SkipReport()
    texts = [d.text for d in iter_documents(args.data, text_field=args.text_field, report=report)]
    r = text_perplexity(model, tok, texts, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['tokens']:,} tokens, {r['bytes']:,} bytes: loss {r['loss']:.4f} nats/token, "
              f"perplexity {r['perplexity']:.2f}, {r['bits_per_byte']:.4f} bits/byte")
    if report.total:
        print(report.summary(), file=sys.stderr)
    return 0


def cmd_speedrun(args) -> int:
    from yunque.speedrun import SpeedrunConfig, main

    kwargs = {"preset": args.preset} if args.preset else {}
    r = main(SpeedrunConfig(out=args.out, minutes=args.minutes, sft_minutes=args.sft_minutes, seed=args.seed,
                            progress=not args.no_progress, **kwargs))
    b, a = r["sft"]["before"], r["sft"]["after"]
    print(f"validation {r['val_bits_per_byte']:.3f} bits/byte vs unigram {r['unigram_bits_per_byte']:.3f}; "
          f"assistant: format {b['format_rate']:.0%} -> {a['format_rate']:.0%}, F1 {b['mean_f1']:.2f} -> "
          f"{a['mean_f1']:.2f}; {r['wall_seconds']:.0f}s in all; report: {Path(args.out) / 'report.md'}")
    return 0


def loop_flags(args, **defaults):
    from yunque.train.loop import LoopConfig

    fields = dict(max_steps=args.max_steps, minutes=args.minutes, warmup_steps=args.warmup_steps,
                  precision=args.precision, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                  resume=args.resume, progress=not args.no_progress, device=args.device)
    return LoopConfig(**{**defaults, **{k: v for k, v in fields.items() if v is not None}})


def cmd_sft(args) -> int:
    from dataclasses import replace

    from yunque.model.lora import LoraConfig
    from yunque.train.sft import SFTConfig, default_loop, main

    if not args.resume and (not args.model or not args.data):
        raise ValueError("--model and --data are required (except with --resume)")
    lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      targets=tuple(args.lora_targets)) if args.lora else None
    cfg = SFTConfig(model=str(model_path(args)) if args.model else "", data=tuple(args.data), out=args.out,
                    lora=lora, max_seq_len=args.max_seq_len, truncation=args.truncation, batch_size=args.batch_size,
                    val_fraction=args.val_fraction, seed=args.seed)
    base = default_loop(cfg)
    loop = loop_flags(args, **{**base.__dict__, "lr": args.lr or base.lr,
                               "max_steps": None if args.resume or args.minutes else base.max_steps})
    s = main(replace(cfg, loop=loop))
    before = f"{s['val_loss_before']:.4f} -> " if s.get("val_loss_before") is not None else ""
    after = f"{s['val_loss']:.4f}" if s.get("val_loss") is not None else "n/a"
    print(f"fine-tuned {s['trainable_parameters']:,} of {s['parameters']:,} parameters for {s['steps']} steps: "
          f"held-out assistant loss {before}{after} -> {args.out}")
    return 0


def cmd_merge(args) -> int:
    from yunque.train.sft import merge

    merge(model_path(argparse.Namespace(model=args.base, catalogue=None)), args.adapter, args.out)
    print(f"merged {args.adapter} into {args.base} -> {args.out}")
    return 0


def cmd_chat(args) -> int:
    from yunque.chat import ChatSession, load_chat_model, run_terminal_chat
    from yunque.engine.engine import Engine

    params = sampling_params(args)
    model, tok, template = load_chat_model(model_path(args), args.adapter)
    engine = Engine(model, tok, precision=args.precision, compile=args.compile)
    session = ChatSession(engine, params, system=args.system, template=template)
    from yunque.tokenizer.chat import has_chat_tokens

    if template is None and not has_chat_tokens(tok):  # fail before reading any input
        raise ValueError(f"{args.model} has no chat tokens and no chat template; fine-tune it with `yunque sft` "
                         f"first, or use a chat model")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def read_line():
        if sys.stdin.isatty():
            try:
                return input("you: ") + "\n"
            except EOFError:
                return None
        return sys.stdin.readline() or None

    run_terminal_chat(session, read_line, write)
    return 0


def cmd_import(args) -> int:
    from yunque.interop.hf import import_hf

    import_hf(args.hf_dir, args.out)
    print(f"imported {args.hf_dir} -> {args.out}")
    return 0


def cmd_export(args) -> int:
    src = model_path(args)
    if args.format == "hf":
        from yunque.interop.hf import export_hf

        export_hf(src, args.out)
    else:
        try:
            from yunque.interop.gguf import export_gguf
        except ModuleNotFoundError:
            raise ValueError("GGUF export needs the gguf package; pip install 'yunque[gguf]'") from None
        export_gguf(src, args.out, dtype=args.dtype)
    print(f"exported {src} -> {args.out} ({args.format})")
    return 0


def cmd_pull(args) -> int:
    from yunque.interop.catalogue import catalogue_dir, pull

    path = pull(args.repo_id, root=catalogue_dir(args.catalogue), revision=args.revision, token=args.token)
    print(f"{args.repo_id} -> {path}")
    return 0


def cmd_models(args) -> int:
    from yunque.interop.catalogue import catalogue_dir, format_table, list_models

    root = catalogue_dir(args.catalogue)
    rows = list_models(root)
    print(format_table(rows) if rows else f"no models in {root}; `yunque pull REPO_ID` downloads one")
    return 0


def cmd_rm(args) -> int:
    from yunque.interop.catalogue import catalogue_dir, remove

    print(f"removed {remove(args.name, root=catalogue_dir(args.catalogue))}")
    return 0


COMMANDS = {"tokenizer": cmd_tokenizer, "pretrain": cmd_pretrain, "generate": cmd_generate, "info": cmd_info,
            "perplexity": cmd_perplexity, "speedrun": cmd_speedrun, "import": cmd_import, "export": cmd_export,
            "pull": cmd_pull, "models": cmd_models, "rm": cmd_rm, "sft": cmd_sft, "merge": cmd_merge,
            "chat": cmd_chat}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None or (args.command == "tokenizer" and args.tokenizer_command is None):
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("yunque: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError) as e:
        if args.debug:
            raise
        print(f"yunque {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
