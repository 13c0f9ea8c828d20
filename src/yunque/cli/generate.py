"""Commands that run a model: generate, chat, perplexity."""

from __future__ import annotations

import json
import sys

from yunque.cli.common import add_device_flag, add_model_arg, check_device, command, model_path
from yunque.cli.flags import add_fields
from yunque.config import QuantizeConfig, SamplingParams

CLI_SAMPLING = SamplingParams(max_new_tokens=200, temperature=0.8)
"""The command line's sampling defaults: longer and a little cooler than the library's."""
SAMPLING_FLAGS = ["max_new_tokens", "temperature", "top_k", "top_p", "seed"]


def register(sub) -> None:
    gen = command(sub, "generate", cmd_generate, help="continue a prompt with a model",
                  description="Generate text from MODEL, streamed as it is produced.",
                  examples='  yunque generate runs/speedrun "def parse(" --max-new-tokens 80\n'
                           '  yunque generate runs/shakespeare "ROMEO:" --temperature 0\n'
                           '  yunque generate runs/chat "2 + 3 =" --few-shot sums.jsonl --k 3\n')
    add_model_arg(gen)
    gen.add_argument("prompt", help="the text to continue")
    add_sampling_flags(gen)
    gen.add_argument("--few-shot", metavar="FILE",
                     help="jsonl of solved examples ({\"input\", \"output\"}) to put before the prompt")
    gen.add_argument("--k", type=int, default=3, help="how many --few-shot examples to use (0: zero-shot; default: 3)")

    chat = command(sub, "chat", cmd_chat, help="talk to a chat model in the terminal",
                   description="Multi-turn chat with streamed replies. Commands: /reset, /system TEXT, /save FILE, "
                               "/good and /bad (rate the last reply), /prefer (see a second reply and say which is "
                               "better), /exit. Ratings and preferences go to $YUNQUE_HOME/feedback/, where "
                               "`yunque align --method dpo --data $YUNQUE_HOME/feedback` learns from them. Reads "
                               "piped input too (one message per line).",
                   examples="  yunque chat runs/speedrun/chat\n"
                            "  yunque chat runs/speedrun --adapter runs/lora --temperature 0\n"
                            "  echo 'What does json.dumps do?' | yunque chat runs/speedrun/chat\n")
    add_model_arg(chat)
    chat.add_argument("--adapter", metavar="DIR", help="a LoRA adapter dir to apply")
    chat.add_argument("--system", help="system prompt")
    add_sampling_flags(chat)

    ppl = command(sub, "perplexity", cmd_perplexity, help="loss, perplexity and bits per byte of a model on text",
                  description="Score text with a model: mean loss per token, perplexity and bits per byte.",
                  examples="  yunque perplexity runs/shakespeare --data tinystories.txt\n"
                           "  yunque perplexity runs/speedrun --data docs/ --json\n")
    add_model_arg(ppl)
    ppl.add_argument("--data", nargs="+", required=True, metavar="PATH",
                     help="text files, folders or jsonl files to score")
    ppl.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    ppl.add_argument("--batch-size", type=int, default=8, help="windows scored at once (default: 8)")
    ppl.add_argument("--json", action="store_true", help="print JSON")
    add_device_flag(ppl)


def add_sampling_flags(p) -> None:
    add_fields(p, SamplingParams, SAMPLING_FLAGS, defaults=CLI_SAMPLING)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="decode precision (auto: bf16 where the CPU multiplies it natively, except for models "
                        "under 4M parameters)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: 6-10 s more at start (per batch size and cache length), "
                        "then 5-20%% less time per token; pays off for long outputs")
    add_fields(p, QuantizeConfig, ["quantize", "group_size"])
    add_device_flag(p)


def sampling_params(args) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))


def quantized(model, args):
    """`model` with its linear layers quantized in place as --quantize asks (model/quant.py), or as it is."""
    if args.quantize:
        from yunque.model.quant import quantize_model

        QuantizeConfig(args.quantize, args.group_size)  # checks the flags' values
        quantize_model(model, args.quantize, args.group_size)
    return model


def cmd_generate(args) -> int:
    from yunque.engine.engine import Engine
    from yunque.modeldir import generation_stop_ids, load_model

    params = sampling_params(args)
    device = check_device(args.device)
    path = model_path(args.model, args.catalogue)
    model, tok = load_model(path, device=device)
    engine = Engine(quantized(model, args), tok, precision=args.precision, compile=args.compile, device=device)
    engine.stop_ids |= generation_stop_ids(path, tok.vocab_size)  # imported models name their own
    shown = args.prompt
    if args.few_shot:
        from dataclasses import replace

        from yunque.eval.fewshot import answer_stop, build_prompt, load_examples
        from yunque.tokenizer.chat import ChatFormat

        fmt = ChatFormat.of(path, tok)
        engine.stop_ids |= fmt.stop_ids
        prompt = build_prompt(load_examples(args.few_shot), args.prompt, args.k, fmt)
        params = replace(params, stop=(*params.stop, *answer_stop(fmt)))
        shown = ""
    else:
        prompt = tok.encode(args.prompt, bos=tok.bos_id is not None)
    budget = engine.token_budget(len(prompt), params.max_new_tokens)
    if 0 < budget < params.max_new_tokens:
        print(f"note: --max-new-tokens {params.max_new_tokens} capped to {budget}: the prompt's {len(prompt)} "
              f"tokens leave that much of the model's {model.cfg.max_seq_len}-token context", file=sys.stderr)
    pieces = engine.stream(prompt, params)
    first = next(pieces, "")  # the prompt is checked (length, ids) before anything is printed
    sys.stdout.write(shown + first)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from yunque.chat import ChatSession, load_chat_model
    from yunque.engine.engine import Engine

    params = sampling_params(args)
    device = check_device(args.device)
    model, tok, fmt = load_chat_model(model_path(args.model, args.catalogue), args.adapter, device=device)
    engine = Engine(quantized(model, args), tok, precision=args.precision, compile=args.compile, device=device)
    engine.stop_ids |= fmt.stop_ids
    session = ChatSession(engine, params, fmt, system=args.system)  # refuses a model with no chat format at once

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

    from yunque.chat import run_terminal_chat

    run_terminal_chat(session, read_line, write, model=args.model)
    return 0


def cmd_perplexity(args) -> int:
    from yunque.data.sources import SkipReport, iter_documents
    from yunque.eval.perplexity import text_perplexity
    from yunque.modeldir import load_model

    device = check_device(args.device)
    model, tok = load_model(model_path(args.model, args.catalogue), device=device)
    report = SkipReport()
    texts = [d.text for d in iter_documents(args.data, text_field=args.text_field, report=report)]
    r = text_perplexity(model, tok, texts, batch_size=args.batch_size, device=device)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['tokens']:,} tokens, {r['bytes']:,} bytes: loss {r['loss']:.4f} nats/token, "
              f"perplexity {r['perplexity']:.2f}, {r['bits_per_byte']:.4f} bits/byte")
    if report.total:
        print(report.summary(), file=sys.stderr)
    return 0
