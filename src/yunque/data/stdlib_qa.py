"""Question/answer conversations about the Python standard library, made from its own docstrings.

"What does `json.dumps` do?" is answered with the first sentence of that function's docstring. This gives the
speedrun a supervised set that needs no network and whose answers the pretrained model has read. Half of the
questions are asked in Spanish ("¿Qué hace `json.dumps`?"), with the docstring's (English) sentence as answer.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from pathlib import Path

from yunque.data.sources import builtin_corpus_files

QUESTIONS = ("What does `{name}` do?", "¿Qué hace `{name}`?")


def first_sentence(doc: str, max_chars: int = 160) -> str | None:
    """The first sentence of a docstring's first paragraph, whitespace collapsed; None if it is not prose."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", para)
    sentence = match.group(1) if match else para
    if len(sentence) < 12 or len(sentence) > max_chars or not sentence[0].isalpha():
        return None
    return sentence


def module_name(path: Path, stdlib: Path) -> str:
    parts = list(path.relative_to(stdlib).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stdlib_qa(max_pairs: int | None = None) -> list[dict]:
    """Conversations ({"messages": [user, assistant]}) about public top-level functions of the stdlib, in a
    fixed order; the question language alternates by a hash of the name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pairs = []
    for path in builtin_corpus_files():
        if path.suffix != ".py" or "pydoc_data" in path.parts:
            continue
        module = module_name(path, stdlib)
        if any(part.startswith("_") for part in module.split(".")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            answer = first_sentence(ast.get_docstring(node) or "")
            if answer is None:
                continue
            name = f"{module}.{node.name}"
            lang = hashlib.blake2b(name.encode(), digest_size=1).digest()[0] % 2
            pairs.append({"messages": [{"role": "user", "content": QUESTIONS[lang].format(name=name)},
                                       {"role": "assistant", "content": answer}]})
            if max_pairs is not None and len(pairs) >= max_pairs:
                return pairs
    return pairs


def split_heldout(pairs: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held out), by a hash of the question, deterministic for the seed."""
    train, held = [], []
    for p in pairs:
        h = hashlib.blake2b(f"{seed}:{p['messages'][0]['content']}".encode(), digest_size=8).digest()
        (held if int.from_bytes(h, "little") / 2**64 < fraction else train).append(p)
    return train, held
