"""Few-shot prompts: k solved examples before the query, as plain text for base models or as chat turns."""

from __future__ import annotations

import json
from pathlib import Path

from yunque.tokenizer.chat import ChatFormat


def build_prompt(examples: list[dict], query: str, k: int, fmt: ChatFormat, *,
                 chat: bool | None = None) -> list[int]:
    """Prompt ids for `query` after the first k of `examples` (dicts with "input" and "output"); k=0 is zero-shot.

    With a chat format (`fmt.is_chat`): each example a user turn and an assistant turn, then the query as a user
    turn and the opening of the reply. Otherwise plain text: "Input: ...\\nOutput: ...\\n\\n" blocks, then
    "Input: {query}\\nOutput:", with BOS if the tokenizer has one. Generate with `answer_stop(fmt, chat=chat)`.
    chat=False asks for plain text even with a chat format: a base model whose tokenizer has chat tokens it has not
    learned yet.
    """
    chat = fmt.is_chat if chat is None else chat
    if not 0 <= k <= len(examples):
        raise ValueError(f"k={k} but there are {len(examples)} examples; pass 0 <= k <= {len(examples)}")
    shots = examples[:k]
    for i, ex in enumerate(shots):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(ex.get("output"), str):
            raise ValueError(f"example {i} is {str(ex)[:60]}; each example needs string 'input' and 'output'")
    if chat:
        messages = []
        for ex in shots:
            messages += [{"role": "user", "content": ex["input"]}, {"role": "assistant", "content": ex["output"]}]
        return fmt.prompt([*messages, {"role": "user", "content": query}])
    text = "".join(f"Input: {ex['input']}\nOutput: {ex['output']}\n\n" for ex in shots) + f"Input: {query}\nOutput:"
    return fmt.tokenizer.encode(text, bos=fmt.tokenizer.bos_id is not None)


def answer_stop(fmt: ChatFormat, *, chat: bool | None = None) -> tuple[str, ...]:
    """Stop strings that end the answer to `build_prompt(..., fmt, chat=chat)`: where the format ends an assistant
    turn for a chat prompt, the blank line before the next block for plain text. Stop ids: `fmt.stop_ids`."""
    return fmt.stop if (fmt.is_chat if chat is None else chat) else ("\n\n",)


def load_examples(path: str | Path) -> list[dict]:
    """Solved examples from a jsonl file, one {"input": ..., "output": ...} object a line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; pass a jsonl file of {{\"input\", \"output\"}} examples")
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not isinstance(ex.get("output"), str):
            raise ValueError(f"{path}:{n}: each example needs string 'input' and 'output' fields")
        examples.append(ex)
    return examples
