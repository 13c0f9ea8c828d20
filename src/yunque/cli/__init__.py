"""The `yunque` command: one module per command group, each mapping its flags onto one config and one call.

    train.py     tokenizer train, pretrain, sft, merge
    generate.py  generate, chat, perplexity
    models.py    info, import, export, quantize, pull, models, rm
    speedrun.py  speedrun
    eval.py      eval
    serve.py     serve
    align.py     align, reward train, reward score

Flags, defaults and help come from the config dataclasses (cli/flags.py). Errors a user can fix (bad paths, bad
flags, corrupt files) print one line and exit non-zero; a mistyped command or flag gets a suggestion.
"""

from __future__ import annotations

import argparse
import sys

from yunque.cli import align, generate, models, serve, speedrun, train
from yunque.cli import eval as evaluate
from yunque.cli.common import Parser

GROUPS = (train, align, generate, models, evaluate, serve, speedrun)
"""Command modules, in the order `yunque --help` lists their commands."""


def build_parser() -> Parser:
    p = Parser(prog="yunque", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="yunque: train, fine-tune and run GPT-style language models on a laptop CPU (or a GPU).",
               epilog="start with `yunque speedrun`: it trains a tokenizer and a model on Python's own source code "
                      "and docs in about ten minutes, then writes a report.\n"
                      "`yunque COMMAND --help` shows each command's flags and examples.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:  # `yunque` or `yunque tokenizer` alone
        (getattr(args, "help_parser", None) or parser).print_help()
        return 2
    try:
        return run(args)
    except KeyboardInterrupt as e:
        print(f"yunque: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError, EOFError) as e:
        if args.debug:
            raise
        print(f"yunque {args.command}: error: {e}", file=sys.stderr)
        return 1


__all__ = ["main", "build_parser"]
