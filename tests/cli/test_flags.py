"""Flags made from the config dataclasses: every parser default is the dataclass's (or the stage's default
instance's), every flag has help, typed flags are known."""

import argparse
import dataclasses

import pytest

from yunque.cli import build_parser
from yunque.cli.flags import add_fields, field_docs, given
from yunque.cli.generate import CLI_SAMPLING
from yunque.config import ALIGN_LOOP, REWARD_LOOP, SFT_LOOP, LoopConfig, ModelConfig, SamplingParams

STAGE_DEFAULTS = {("sft", LoopConfig): SFT_LOOP, ("generate", SamplingParams): CLI_SAMPLING,
                  ("chat", SamplingParams): CLI_SAMPLING, ("align", LoopConfig): ALIGN_LOOP,
                  ("reward train", LoopConfig): REWARD_LOOP}
"""Commands whose defaults come from a stage's own instance rather than the class (fine-tuning's schedule, the
command line's sampling)."""


def commands(parser=None, prefix=""):
    """(name, parser) of every command, `tokenizer train` included."""
    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix}{name}", sub
                yield from commands(sub, f"{prefix}{name} ")


def flags(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("name, parser", list(commands()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_parser_default_is_its_dataclass_default(name, parser):
    checked = 0
    for action in flags(parser):
        if not hasattr(action, "field"):
            continue
        cls, field = action.field
        if cls is ModelConfig:  # pretrain's overrides: none means "the preset's"
            assert action.default is None, action.dest
            continue
        instance = STAGE_DEFAULTS.get((name, cls))
        f = next(f for f in dataclasses.fields(cls) if f.name == field)
        if instance is not None:
            expected = getattr(instance, field)
        elif f.default is not dataclasses.MISSING:
            expected = f.default
        elif f.default_factory is not dataclasses.MISSING:
            expected = f.default_factory()
        else:
            expected = None  # a required field (sft's --data): no default to copy
        assert action.default == expected, (name, action.dest)
        checked += 1
    assert checked or name in ("tokenizer", "merge", "info", "import", "export", "pull", "models", "rm", "perplexity",
                               "reward", "reward score")


@pytest.mark.parametrize("name, parser", list(commands()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_command_teaches(name, parser):
    """Every flag and argument has a help line, and every command's --help ends with examples."""
    for action in parser._actions:
        if action.dest not in ("help",) and not isinstance(action, argparse._SubParsersAction):
            assert action.help, (name, action.dest)
    if name != "tokenizer":
        assert (parser.epilog or "").startswith("examples:\n  yunque " + name.split()[0]), name


def test_flags_say_whether_they_were_typed():
    p = argparse.ArgumentParser()
    add_fields(p, LoopConfig, ["max_steps", "lr", "progress"])
    args = p.parse_args(["--lr", "0.01", "--no-progress"])
    assert given(args) == {"lr", "progress"} and args.max_steps is None and args.progress is False
    assert "Peak learning rate." in field_docs(LoopConfig)["lr"]
