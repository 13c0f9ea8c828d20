"""Rewards for alignment: a reward model dir, or a Python function. Shared by the reward and align stages.

A reward model dir (written by `yunque reward train`, train/reward.py) is a chat model dir or a LoRA adapter dir
of its backbone, with heads.safetensors ("reward.weight", "reward.bias") and reward.json. Its score of a reply is
the head's output at the reply's last token (its end of turn), which reads the whole conversation before it.

A reward function is `module:function`, imported from the working directory, called as f(prompt, completion)
with the last user message and the reply's text; it must return a finite number.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from yunque.data.preferences import render_reply
from yunque.model.heads import HEADS, WithHeads
from yunque.model.lora import ADAPTER_CONFIG, load_adapter
from yunque.modeldir import load_model
from yunque.tokenizer.chat import ChatFormat

REWARD_INFO = "reward.json"
"""File of a reward model dir: what it is and how well it ranked held-out pairs."""


def reward_scores(model: WithHeads, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Reward (B,) of rows x (B, T): the reward head at each row's position `last` (B,), its reply's final token."""
    _, scores = model(x)  # scores["reward"]: (B, T)
    return scores["reward"].gather(1, last.unsqueeze(1)).squeeze(1)


class RewardModel:
    """A reward model loaded for scoring (eval mode, no grad)."""

    def __init__(self, model: WithHeads, fmt: ChatFormat, max_seq_len: int, device: str = "cpu") -> None:
        self.model, self.format, self.max_seq_len, self.device = model.eval(), fmt, max_seq_len, device

    @torch.no_grad()
    def score(self, conversations: Sequence[list[dict[str, str]]], replies: Sequence[str], *,
              batch_size: int = 16) -> list[float]:
        """The reward of each reply to its conversation (replies cut to the reward model's context)."""
        pad = self.format.tokenizer.pad_id or 0
        out: list[float] = []
        for start in range(0, len(replies), batch_size):
            rows = []
            for messages, reply in zip(conversations[start:start + batch_size], replies[start:start + batch_size]):
                ids, _ = render_reply(self.format, messages, reply)
                rows.append(ids[:self.max_seq_len])
            T = max(map(len, rows))
            x = torch.full((len(rows), T), pad, dtype=torch.long)
            for b, ids in enumerate(rows):
                x[b, :len(ids)] = torch.tensor(ids)
            last = torch.tensor([len(ids) - 1 for ids in rows])
            out += reward_scores(self.model, x.to(self.device), last.to(self.device)).tolist()
        return out


def is_reward_dir(path: str | Path) -> bool:
    return (Path(path) / HEADS).is_file() and (Path(path) / REWARD_INFO).is_file()


def load_reward_model(path: str | Path, *, device: str = "cpu") -> RewardModel:
    """A reward model dir, loaded to score; ValueError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"reward model {path} does not exist; train one with `yunque reward train --out {path}`")
    if not is_reward_dir(path):
        raise ValueError(f"{path} is not a reward model dir (no {HEADS} and {REWARD_INFO}); train one with "
                         f"`yunque reward train`")
    if (path / ADAPTER_CONFIG).is_file():  # LoRA: the backbone + the adapter
        from yunque.model.lora import apply_adapter

        base = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model")
        if not base or not Path(base).is_dir():
            raise ValueError(f"{path / ADAPTER_CONFIG}: its base model {base!r} is gone; it must be where the reward "
                             f"model was trained from")
        load_adapter(path)  # checks the adapter before the backbone is loaded
        model, tokenizer = load_model(base, device=device)
        apply_adapter(model, path)
        fmt = ChatFormat.of(base, tokenizer)
    else:
        model, tokenizer = load_model(path, device=device)
        fmt = ChatFormat.of(path, tokenizer)
    model.float()
    rm = WithHeads(model, ("reward",))
    try:
        heads = load_file(str(path / HEADS), device=device)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path / HEADS}: cannot read ({e}); the file is corrupt") from None
    try:
        rm.heads.load_state_dict(heads)
    except RuntimeError as e:
        raise ValueError(f"{path / HEADS}: not a reward head for this backbone ({str(e).splitlines()[0]})") from None
    return RewardModel(rm, fmt, model.cfg.max_seq_len, device)


RewardFn = Callable[[str, str], float]


def import_reward_fn(spec: str) -> RewardFn:
    """The function `module:function` names, imported with the working directory on the path."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"--reward-fn {spec!r} must be module:function, e.g. rewards:ends_with_signoff")
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure while importing user code is one line for the user
        raise ValueError(f"--reward-fn {spec}: cannot import {module_name!r} from {cwd} "
                         f"({type(e).__name__}: {e})") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec}: {module_name} has no function {name!r}")
    return fn


def call_reward_fn(fn: RewardFn, spec: str, prompt: str, completion: str) -> float:
    """fn(prompt, completion) as a float; ValueError naming the function and the input if it raises or returns
    something that is not a finite number."""
    try:
        value = fn(prompt, completion)
    except Exception as e:  # noqa: BLE001 - user code: any exception becomes one line
        raise ValueError(f"--reward-fn {spec} raised {type(e).__name__}: {e} (prompt {prompt[:40]!r}, completion "
                         f"{completion[:40]!r}); fix the function") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"--reward-fn {spec} returned {value!r} for prompt {prompt[:40]!r}, completion "
                         f"{completion[:40]!r}; it must return a finite number")
    return float(value)


__all__ = ["RewardModel", "load_reward_model", "is_reward_dir", "reward_scores", "import_reward_fn",
           "call_reward_fn", "REWARD_INFO"]
