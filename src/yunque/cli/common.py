"""What every command group shares: the one-line-error parser, model and device arguments."""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (with a suggestion for a mistyped one) instead of usage.
    Flags must be typed whole: a prefix such as --max-step is a typo to point out, not a flag to guess."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)} (see `{self.prog} --help`)\n")

    def _suggestion(self, message: str) -> str:
        if m := re.search(r"invalid choice: '([^']*)'", message):
            choices = [c for a in self._actions if a.choices for c in a.choices]
            word = m.group(1)
        elif m := re.search(r"unrecognized arguments: (\S+)", message):
            choices, word = list(self._option_string_actions), m.group(1).split("=")[0]
        else:
            return ""
        close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
        return f"; did you mean {close[0]!r}?" if close else ""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self.prog == "yunque":
            # report unknown flags from the subcommand's parser, which knows its own flags and help
            command = getattr(parsed, "parser", None)
            (command or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def command(sub, name: str, run, *, help: str, description: str, examples: str) -> Parser:
    """A subcommand parser whose `--help` ends with examples, and that runs `run(args)`."""
    p = sub.add_parser(name, help=help, description=description, epilog="examples:\n" + examples.rstrip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(run=run, parser=p)
    return p


def add_catalogue_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalogue", metavar="DIR",
                   help="model catalogue (default: $YUNQUE_HOME/models, else ~/.cache/yunque/models)")


def add_model_arg(p: argparse.ArgumentParser, name: str = "model", help: str | None = None) -> None:
    p.add_argument(name, metavar=name.upper(),
                   help=help or "a model dir (yunque or Hugging Face), a .gguf file or a name in the local catalogue")
    add_catalogue_flag(p)


def model_path(spec: str, catalogue: str | None = None) -> Path:
    """The model a MODEL argument names: a path (a directory or a .gguf file), or a name in the catalogue."""
    from yunque.interop.catalogue import catalogue_dir, resolve

    return resolve(spec, root=catalogue_dir(catalogue))


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="where to run: cpu, cuda, cuda:1, ... (default: cpu)")


def check_device(device: str) -> str:
    """`device` if this torch can use it; ValueError naming what it has otherwise."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(kind, False):
        have = ", ".join(k for k, ok in available.items() if ok)
        raise ValueError(f"device {device!r} is not available in this torch {torch.__version__} (it has: {have}); "
                         f"use --device cpu")
    return device
