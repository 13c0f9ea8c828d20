"""Evaluation tasks: data plus a small declarative spec (YAML or JSON), read with lm-evaluation-harness's rules.

A spec names its data files, how an item becomes a prompt, its choices and its target, and what is measured. The
keys are lm-evaluation-harness's own (`doc_to_text`, `doc_to_target`, `doc_to_choice`, `target_delimiter`,
`fewshot_delimiter`, `output_type`, `generation_kwargs`, `filter_list`, ...), with the same meaning, so that a
task reads the same in both and gives the same number:

    task: arc_easy
    output_type: multiple_choice       # or generate_until, loglikelihood, loglikelihood_rolling
    data_files: {test: arc/arc_easy.jsonl}
    test_split: test
    fewshot_split: test                # the item itself is never its own example
    doc_to_text: "{{query}}\\nAnswer:"
    doc_to_target: gold                # a field name, or a jinja2 template
    doc_to_choice: choices

Relative data paths are read from the spec file's folder; the built-in tasks' (eval/tasks/*.yaml) from the data
dir (`default_data_dir`). Few-shot examples are drawn as lm-eval draws them (`FewshotSampler`).
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).parent / "tasks"
"""The built-in task specs, shipped as package data."""

OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling")
REQUIRED = {
    "multiple_choice": ("doc_to_text", "doc_to_target", "doc_to_choice"),
    "generate_until": ("doc_to_text", "doc_to_target"),
    "loglikelihood": ("doc_to_text", "doc_to_target"),
    "loglikelihood_rolling": ("doc_to_target",),
}
"""Spec fields each kind of task must have, besides task, output_type, data_files and test_split."""
KNOWN = {"task", "output_type", "data_files", "format", "fields", "text_separator", "test_split", "fewshot_split",
         "process_docs", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter", "fewshot_delimiter",
         "num_fewshot", "generation_kwargs", "filter_list", "metric_kwargs", "description", "word_count",
         *REQUIRED}


def default_data_dir() -> Path:
    """Where the built-in tasks find their data: ../shared/data beside the source checkout yunque runs from (the
    project's shared data sets), else ./data. `yunque eval --data-dir` overrides it."""
    shared = Path(__file__).resolve().parents[4] / "shared" / "data"
    return shared if shared.is_dir() else Path("data")


def builtin_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class Task:
    """One evaluation task: its spec (lm-eval's keys) and where it came from."""

    name: str
    spec: dict[str, Any]
    source: Path
    """The spec file: errors name it."""
    data_root: Path
    """Relative data paths are read from here."""
    _docs: dict[str, list[dict]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def output_type(self) -> str:
        return self.spec["output_type"]

    @property
    def target_delimiter(self) -> str:
        return self.spec.get("target_delimiter", " ")

    @property
    def fewshot_delimiter(self) -> str:
        return self.spec.get("fewshot_delimiter", "\n\n")

    @property
    def default_fewshot(self) -> int:
        return int(self.spec.get("num_fewshot") or 0)

    def docs(self, split: str | None = None) -> list[dict]:
        """The processed items of a split (the test split by default), read once."""
        split = split or self.spec["test_split"]
        if split not in self._docs:
            files = self.spec["data_files"]
            if split not in files:
                raise ValueError(f"{self.source}: data_files has no split {split!r} (it has: {', '.join(files)}); "
                                 f"add it or change the split named")
            docs = read_records(self.data_root / files[split], self.spec)
            if name := self.spec.get("process_docs"):
                docs = [PROCESSORS[name](d) for d in docs]
            self._docs[split] = docs
        return self._docs[split]

    def fewshot_docs(self) -> list[dict]:
        """The few-shot pool: fewshot_split, else the test split (lm-eval's last fallback, where an item may then be
        drawn as its own example, as in lm-eval: name fewshot_split to exclude it)."""
        return self.docs(self.spec.get("fewshot_split") or self.spec["test_split"])

    @property
    def fewshot_excludes_item(self) -> bool:
        """lm-eval removes the item itself from its examples only when both come from the same split."""
        return self.spec.get("fewshot_split") == self.spec["test_split"]

    def text(self, doc: dict) -> str:
        return str(self._render("doc_to_text", doc))

    def choices(self, doc: dict) -> list[str]:
        value = self._render("doc_to_choice", doc)
        if isinstance(value, str):
            value = ast.literal_eval(value)
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise ValueError(f"{self.source}: doc_to_choice gave {str(value)[:60]!r}, not a list of strings")
        return value

    def target(self, doc: dict) -> Any:
        """The target as lm-eval reads it: for multiple choice an index (a digit string becomes an int); else text."""
        value = self._render("doc_to_target", doc)
        if self.output_type == "multiple_choice":
            if isinstance(value, str) and value.strip().isdigit():
                return int(value)
            if isinstance(value, str):
                return self.choices(doc).index(value)
            return int(value)
        return value

    def target_text(self, doc: dict) -> str:
        """The answer as a few-shot example shows it: the gold choice's text, or the target."""
        t = self.target(doc)
        return self.choices(doc)[t] if self.output_type == "multiple_choice" else str(t)

    def _render(self, key: str, doc: dict) -> Any:
        """lm-eval's doc_to_* rule: a field name gives that field; anything else is a jinja2 template."""
        how = self.spec[key]
        if isinstance(how, int | list):
            return how
        if how in doc:
            return doc[how]
        import jinja2

        try:
            return _template(how).render(**doc)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.source}: {key}: {e}") from None


@cache
def _template(source: str):
    """A jinja2 template as lm-eval compiles its doc_to_* strings (undefined names are errors)."""
    import jinja2

    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(source)


def load_task(name: str, data_dir: str | Path | None = None) -> Task:
    """A built-in task by name, or a task spec file (.yaml, .yml, .json). ValueError listing the available tasks
    for an unknown name, and `file: field` for a spec that lacks a field."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise ValueError(f"{path}: no such task file; pass a .yaml or .json task spec, or one of the built-in "
                             f"tasks: {', '.join(builtin_tasks())}")
        return parse_task(path, path.parent)
    builtin = TASKS_DIR / f"{name}.yaml"
    if not builtin.is_file():
        import difflib

        close = difflib.get_close_matches(name, builtin_tasks(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown task {name!r}; {hint}available: {', '.join(builtin_tasks())} "
                         f"(or a .yaml/.json task file)")
    return parse_task(builtin, Path(data_dir) if data_dir is not None else default_data_dir())


def parse_task(path: Path, data_root: Path) -> Task:
    """Read and check one spec file."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            spec = json.loads(text)
        else:
            import yaml

            spec = yaml.safe_load(text)
    except Exception as e:  # yaml and json both: the file is not what it claims
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a task spec is a mapping of fields (task, output_type, data_files, ...)")
    for key in ("task", "output_type", "data_files", "test_split"):
        if key not in spec:
            raise ValueError(f"{path}: {key}: missing; every task needs task, output_type, data_files, test_split")
    if spec["output_type"] not in OUTPUT_TYPES:
        raise ValueError(f"{path}: output_type: {spec['output_type']!r} is not one of {', '.join(OUTPUT_TYPES)}")
    for key in REQUIRED[spec["output_type"]]:
        if key not in spec:
            raise ValueError(f"{path}: {key}: missing; a {spec['output_type']} task needs "
                             f"{', '.join(REQUIRED[spec['output_type']])}")
    unknown = sorted(set(spec) - KNOWN)
    if unknown:
        raise ValueError(f"{path}: {unknown[0]}: unknown field; known fields: {', '.join(sorted(KNOWN))}")
    if not isinstance(spec["data_files"], dict) or spec["test_split"] not in spec["data_files"]:
        raise ValueError(f"{path}: data_files: needs a file for the test split {spec['test_split']!r}, as "
                         f"{{{spec['test_split']}: path}}")
    if (p := spec.get("process_docs")) is not None and p not in PROCESSORS:
        raise ValueError(f"{path}: process_docs: unknown processor {p!r}; known: {', '.join(PROCESSORS)}")
    return Task(str(spec["task"]), spec, path, data_root)


# -- data files --------------------------------------------------------------------------------------------------


def read_records(path: Path, spec: dict) -> list[dict]:
    """Items of one data file: jsonl, json (a list), csv, text (documents split on text_separator) or line groups
    (`format: lines` with `fields`, one name per line of a group; a name repeated collects a list). .gz too."""
    if not path.is_file():
        raise ValueError(f"{path}: no such data file; pass --data-dir DIR where it lives, or fix data_files")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8")
    kind = spec.get("format") or _format_of(path)
    if kind == "jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return out
    if kind == "json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a json data file holds a list of items")
        return data
    if kind == "csv":
        return list(csv.DictReader(io.StringIO(text)))
    if kind == "text":
        sep = spec.get("text_separator")
        parts = [text] if sep is None else text.split(sep)
        return [{"text": p} for p in parts if p.strip()]
    if kind == "lines":
        names = spec.get("fields")
        if not names:
            raise ValueError(f"{spec.get('task')}: fields: missing; `format: lines` needs one field name per line")
        lines = text.splitlines()
        if len(lines) % len(names):
            raise ValueError(f"{path}: {len(lines)} lines are not whole groups of {len(names)} ({names})")
        out = []
        for i in range(0, len(lines), len(names)):
            rec: dict[str, Any] = {}
            for name, line in zip(names, lines[i:i + len(names)]):
                if names.count(name) > 1:
                    rec.setdefault(name, []).append(line)
                else:
                    rec[name] = line
            out.append(rec)
        return out
    raise ValueError(f"{path}: format {kind!r} is not one of jsonl, json, csv, text, lines")


def _format_of(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    ext = suffixes[-1] if suffixes else ""
    return {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".txt": "text"}.get(ext, "text")


# -- lm-eval's document processing ---------------------------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's tasks/hellaswag/utils.py `preprocess`: WikiHow's bracketed artifacts removed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


_SENTENCE_END = re.compile(r"[.!?] ")


def hellaswag_doc(doc: dict) -> dict:
    """lm-eval's hellaswag `process_docs`, on the original jsonl or on the shared text form ("activity_label: ctx").

    lm-eval builds the query from ctx_a + " " + ctx_b.capitalize(); the text form keeps only ctx = ctx_a + " " +
    ctx_b. ctx_b, ActivityNet's unfinished noun phrase, is the text after the last sentence end when it begins in
    lower case ("... on a roof. he" -> "... on a roof. He"), and is capitalized as lm-eval does; WikiHow items have
    none.
    """
    if "ctx_a" in doc:  # the original jsonl (Rowan/hellaswag's fields): lm-eval's formula exactly
        label, ctx, endings = doc["activity_label"], doc["ctx_a"] + " " + doc["ctx_b"].capitalize(), doc["endings"]
    else:
        label, _, ctx = doc["query"].partition(": ")
        endings = doc["choices"]
        ends = list(_SENTENCE_END.finditer(ctx))
        if ends and ctx[ends[-1].end():][:1].islower():
            cut = ends[-1].end()
            ctx = ctx[:cut] + ctx[cut:].capitalize()
    return {"query": hellaswag_preprocess(label + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in endings], "gold": int(doc["label"])}


def wikitext_detokenize(doc: dict) -> dict:
    """lm-eval's tasks/wikitext/preprocess_wikitext.py `wikitext_detokenizer` on `page`, kept as `text`; the
    original stays in `page` (words and bytes are counted on it, as lm-eval does)."""
    s = doc["page"]
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" " + chr(176) + " ", chr(176)),
                 (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(a, b)
    return {**doc, "text": s}


def text_page(doc: dict) -> dict:
    """A plain text document as a rolling-perplexity page: scored as it is, words and bytes counted on it."""
    return {"page": doc["text"], "text": doc["text"]}


def last_word(doc: dict) -> dict:
    """A passage as a LAMBADA item: its lines joined with spaces (lm-eval splits on " " only)."""
    return {"text": " ".join(doc["text"].split())}


PROCESSORS: dict[str, Callable[[dict], dict]] = {
    "hellaswag": hellaswag_doc, "wikitext": wikitext_detokenize, "text_page": text_page, "last_word": last_word}
"""Named document processors a spec may use (`process_docs`): lm-eval's, by the name of its task."""


# -- few-shot examples, as lm-eval samples them --------------------------------------------------------------------


class FewshotSampler:
    """lm-eval's ContextSampler: one `random.Random(seed)` for the whole task, drawn from in item order.

    For each item it samples k examples from the pool (k + 1, then the item itself removed and the first k kept, when
    the pool is the item's own split), so the examples of item i depend on every item before it, exactly as in
    lm-eval (its default seed is 1234).
    """

    def __init__(self, pool: list[dict], seed: int, exclude_item: bool) -> None:
        self.pool, self.rnd, self.exclude_item = pool, random.Random(seed), exclude_item

    def sample(self, k: int, doc: dict) -> list[dict]:
        if k == 0:
            return []
        if not self.exclude_item:
            return self.rnd.sample(self.pool, k)
        drawn = [x for x in self.rnd.sample(self.pool, k + 1) if x != doc][:k]
        if len(drawn) < k:  # the pool held copies of the item: draw again without any of them
            drawn = self.rnd.sample([x for x in self.pool if x != doc], k)
        return drawn


def iter_items(task: Task, k: int, limit: int | None, seed: int) -> Iterator[tuple[int, dict, list[dict]]]:
    """(index, item, its k examples) for the first `limit` items, with examples sampled in lm-eval's order."""
    docs = task.docs()
    n = len(docs) if limit is None else min(limit, len(docs))
    pool = task.fewshot_docs() if k else []
    room = len(pool) - (1 if task.fewshot_excludes_item else 0)
    if k and k > room:
        split = task.spec.get("fewshot_split") or task.spec["test_split"]
        raise ValueError(f"--num-fewshot {k} but {task.name}'s few-shot pool (split {split!r}) has {max(room, 0)} "
                         f"examples; pass --num-fewshot {max(room, 0)} or less")
    sampler = FewshotSampler(pool, seed, task.fewshot_excludes_item)
    for i in range(n):
        yield i, docs[i], sampler.sample(k, docs[i])


def context(task: Task, doc: dict, shots: list[dict]) -> str:
    """lm-eval's plain-text context: description, then each example as text + target delimiter + answer +
    few-shot delimiter, then the item's text."""
    parts = [task.spec.get("description", "")]
    for ex in shots:
        parts.append(task.text(ex) + task.target_delimiter + task.target_text(ex) + task.fewshot_delimiter)
    return "".join(parts) + task.text(doc)


def chat_messages(task: Task, doc: dict, shots: list[dict]) -> list[dict]:
    """The same context as chat turns (lm-eval's --apply_chat_template --fewshot_as_multiturn): each example a
    user turn and an assistant turn, then the item as a user turn."""
    messages = [{"role": "system", "content": task.spec["description"]}] if task.spec.get("description") else []
    for ex in shots:
        messages += [{"role": "user", "content": task.text(ex)}, {"role": "assistant", "content": task.target_text(ex)}]
    return [*messages, {"role": "user", "content": task.text(doc)}]


__all__ = ["Task", "load_task", "parse_task", "builtin_tasks", "default_data_dir", "read_records", "FewshotSampler",
           "iter_items", "context", "chat_messages", "PROCESSORS", "TASKS_DIR"]
