"""The local model catalogue: Hugging Face models downloaded by name into one directory, listed, removed, and found
again by name.

Each model is an ordinary model dir, <root>/<owner>--<name> (the repo id with "/" written "--", as the Hub's own
cache names repos; repo ids cannot contain "--", so the name maps back), so every command that takes a MODEL_DIR
can take a catalogue name too (`resolve`). Only safetensors weights are downloaded: pickled weights (.bin, .pt,
.h5, .msgpack) can run code when loaded and are never fetched.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from yunque.interop.hf import INDEX, is_hf_dir, weight_files
from yunque.interop.hf_config import config_from_hf, model_type_of
from yunque.modeldir import CONFIG, TOKENIZER, WEIGHTS, load_config, read_safetensors_header
from yunque.paths import yunque_home

ALLOW_PATTERNS = (
    CONFIG, "generation_config.json",
    WEIGHTS, INDEX, "model-*-of-*.safetensors",  # one file, or shards named by the index
    TOKENIZER, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt",  # GPT-2 repos without tokenizer.json; small enough to fetch always
)
"""What `pull` downloads: root-level files only (no onnx/, no original/ copies of the weights), no pickles."""
_REPO_ID = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?")


def catalogue_dir(override: str | None = None) -> Path:
    """Where catalogue models live: `override` (the --catalogue flag), else `yunque_home()/models`."""
    return Path(override).expanduser() if override else yunque_home() / "models"


# ---- pull ----

def pull(repo_id: str, *, root: Path, revision: str | None = None, token: str | None = None,
         download: Callable[..., Any] | None = None) -> Path:
    """Download a Hub model's config, tokenizer and safetensors weights into root/<owner>--<name>; return that dir.

    Run again to resume: huggingface_hub skips complete files and continues partial ones. `download` stands in for
    `huggingface_hub.snapshot_download` (tests pass a fake). Every failure is a one-line ValueError saying what to do.
    """
    name = _dir_name(repo_id)
    from huggingface_hub import errors  # imported on use: only pulling needs the Hub client

    if download is None:
        from huggingface_hub import snapshot_download as download
    local_dir = Path(root) / name
    Path(root).mkdir(parents=True, exist_ok=True)
    unreachable = _connection_errors()
    try:
        download(repo_id, revision=revision, token=token, allow_patterns=list(ALLOW_PATTERNS), local_dir=local_dir)
    except errors.GatedRepoError:
        raise ValueError(f"{repo_id} is gated: accept its terms at https://huggingface.co/{repo_id}, then pass an "
                         f"access token with --token or set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:  # the Hub also answers so for a private repo without a token
        raise ValueError(f"no model {repo_id} on the Hub; check the name (a private repo also needs --token or "
                         f"HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise ValueError(f"{repo_id} has no revision {revision!r}; check the branch, tag or commit") from None
    except errors.HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a Hub repo id ({_short(e)}); expected OWNER/NAME") from None
    except errors.HfHubHTTPError as e:
        if getattr(getattr(e, "response", None), "status_code", None) in (401, 403):
            raise ValueError(f"the Hugging Face Hub refused the access token for {repo_id} ({_short(e)}); check "
                             f"--token or HF_TOKEN") from None
        raise ValueError(_unreachable(repo_id, e)) from None
    except unreachable as e:
        raise ValueError(_unreachable(repo_id, e)) from None
    _check_complete(local_dir, repo_id)
    return local_dir


def _dir_name(repo_id: str) -> str:
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.startswith("."):
        raise ValueError(f"{repo_id!r} is not a Hub repo id; expected OWNER/NAME, e.g. HuggingFaceTB/SmolLM2-135M")
    return repo_id.replace("/", "--")


def _connection_errors() -> tuple[type[BaseException], ...]:
    """What "the Hub cannot be reached" raises, for whichever HTTP library huggingface_hub uses: requests (before
    1.0; its errors are OSErrors) or httpx (1.0 on; its transport errors are not)."""
    found: list[type[BaseException]] = [OSError]  # LocalEntryNotFoundError, OfflineModeIsEnabled, requests' errors
    found += [sys.modules[m].TransportError for m in ("httpx", "httpx2") if m in sys.modules]
    return tuple(found)


def _unreachable(repo_id: str, e: BaseException) -> str:
    from huggingface_hub.errors import OfflineModeIsEnabled

    # snapshot_download wraps the error that stopped it in a long LocalEntryNotFoundError: the cause is the reason
    cause = e.__cause__ if isinstance(e.__cause__, Exception) else e
    reason = "offline mode: HF_HUB_OFFLINE is set" if isinstance(cause, OfflineModeIsEnabled) else _short(cause)
    return (f"cannot reach the Hugging Face Hub to download {repo_id} ({reason}); check the network, or pass a "
            f"local model directory instead")


def _short(e: BaseException) -> str:
    """The first sentence of an error's first line, at most 100 characters: the reason, without the advice."""
    lines = str(e).strip().splitlines()
    text = re.split(r"(?<=[a-z)])\. ", lines[0])[0].rstrip(".") if lines else ""
    text = text if len(text) <= 100 else text[:97] + "..."
    return text or type(e).__name__


def _check_complete(model_dir: Path, repo_id: str) -> None:
    """ValueError naming what a downloaded dir lacks: config.json, safetensors weights (every shard), a tokenizer."""
    missing = [] if (model_dir / CONFIG).is_file() else [CONFIG]
    shards = weight_files(model_dir)
    missing += [p.name for p in shards if not p.is_file()]
    if not ((model_dir / TOKENIZER).is_file() or (model_dir / "vocab.json").is_file()
            and (model_dir / "merges.txt").is_file()):
        missing.append(f"{TOKENIZER} (or vocab.json + merges.txt)")
    if not missing and shards:
        return
    where = f"the files downloaded are in {model_dir}"
    if any((model_dir / ".cache").rglob("*.incomplete")):  # huggingface_hub's partial downloads
        raise ValueError(f"the download of {repo_id} is incomplete; run `yunque pull {repo_id}` again to resume "
                         f"({where})")
    no_weights = (f"{repo_id} has no safetensors weights; yunque loads only safetensors (pickled .bin/.pt weights "
                  f"can run code)")
    problems = [] if shards else [no_weights]
    if missing:
        problems.append(f"{repo_id} has no {', '.join(missing)}")
    raise ValueError(f"{'; '.join(problems)}; {where} (`yunque rm {repo_id}` deletes them)")


# ---- list ----

def list_models(root: Path) -> list[dict[str, Any]]:
    """One row per model dir under root, sorted by name: name, family, parameters (None when unknown), dtype (None
    when unknown), size (bytes on disk, every file), context (None when unknown), path, and problem: None, or
    one line saying why yunque cannot load the model (a bad entry is listed with it, never stops the listing)."""
    root = Path(root)
    if not root.is_dir():
        return []
    rows = []
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        try:
            rows.append(_row(model_dir))
        except (ValueError, OSError) as e:
            rows.append({"name": model_dir.name.replace("--", "/"), "family": "? (unreadable)", "parameters": None,
                         "dtype": None, "size": 0, "context": None, "path": model_dir,
                         "problem": _one_line(e, model_dir)})
    return rows


def _row(model_dir: Path) -> dict[str, Any]:
    shards = weight_files(model_dir)
    row = {"name": model_dir.name.replace("--", "/"), "family": f"? (no {CONFIG})", "parameters": None,
           "dtype": safetensors_dtype(shards[0]) if shards else None, "size": _size(model_dir), "context": None,
           "path": model_dir, "problem": None if shards else "no safetensors weights"}
    if not (model_dir / CONFIG).is_file():
        return {**row, "problem": f"no {CONFIG}"}
    if is_hf_dir(model_dir):
        hf = json.loads((model_dir / CONFIG).read_text(encoding="utf-8"))
        classes = hf.get("architectures")
        kind = model_type_of(hf) or (classes[0] if isinstance(classes, list) and classes else None)
        kind = kind if isinstance(kind, str) else "?"
        try:
            cfg = config_from_hf(hf)
        except ValueError as e:
            context = hf.get("max_position_embeddings") or hf.get("n_positions")
            return {**row, "family": f"{kind} (unsupported)", "problem": f"{CONFIG}: {_one_line(e, model_dir)}",
                    "context": context if isinstance(context, int) and not isinstance(context, bool) else None}
        family = kind
    else:
        try:
            cfg = load_config(model_dir)
        except ValueError as e:
            return {**row, "family": f"? (bad {CONFIG})", "problem": _one_line(e, model_dir)}
        family = f"yunque ({'llama' if cfg.pos == 'rope' else 'gpt2'}-style)"
    return {**row, "family": family, "parameters": cfg.num_params(), "context": cfg.max_seq_len}


def _one_line(e: BaseException, model_dir: Path) -> str:
    """The error as one line of at most 200 characters, file names relative to the model's dir."""
    text = " ".join(str(e).replace(f"{model_dir}{os.sep}", "").split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def safetensors_dtype(path: Path) -> str | None:
    """The dtype holding most of the elements of a safetensors file ("bf16", "f32", ...), read from its header
    alone; None for a missing or corrupt file."""
    try:
        tensors, _ = read_safetensors_header(path)
    except ValueError:
        return None
    counts = Counter()
    for t in tensors.values():
        counts[t.dtype.lower()] += math.prod(t.shape)
    return counts.most_common(1)[0][0] if counts else None


def _size(model_dir: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(model_dir) for f in files)


def format_table(rows: list[dict[str, Any]]) -> str:
    """`yunque models`: aligned columns, sizes like "487.2 MiB", parameters like "124.4M", "?" for unknowns; then
    one line per model that cannot be loaded, saying why."""
    table = [("NAME", "FAMILY", "PARAMS", "DTYPE", "SIZE", "CONTEXT")]
    table += [(r["name"], r["family"], _human_count(r["parameters"]), r["dtype"] or "?", _human_size(r["size"]),
               "?" if r["context"] is None else str(r["context"])) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    right = {2, 4, 5}  # numbers line up on their last digit
    lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(line, widths))).rstrip() for line in table]
    problems = [f"{r['name']}: {r['problem']}" for r in rows if r.get("problem")]
    return "\n".join(lines + ([""] + problems if problems else []))


def _human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def _human_size(n: int) -> str:
    for power, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if n >= 1024**power:
            return f"{n / 1024**power:.1f} {unit}"
    return f"{n} B"


# ---- remove and resolve ----

def remove(name: str, *, root: Path) -> Path:
    """Delete the catalogue model `name` (OWNER/NAME or OWNER--NAME, as `yunque models` shows) and return its path;
    ValueError for a name not in the catalogue or one that points outside it."""
    root = Path(root)
    model_dir = root / _catalogue_name(name)
    if model_dir.is_symlink() or model_dir.resolve().parent != root.resolve():
        raise ValueError(f"{name!r} points outside the catalogue at {root}; give a model name as `yunque models` "
                         f"shows it")
    if not model_dir.is_dir():
        names = [d.name.replace("--", "/") for d in sorted(root.iterdir()) if d.is_dir()
                 and not d.name.startswith(".")] if root.is_dir() else []
        local = f"local models: {', '.join(names)}" if names else "the catalogue is empty"
        raise ValueError(f"no model {name} in the catalogue at {root}; {local}")
    shutil.rmtree(model_dir)
    return model_dir


def resolve(name_or_path: str, *, root: Path) -> Path:
    """The model for a command's MODEL argument: an existing directory or file (a .gguf) wins, else a catalogue
    name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() or path.is_file():
        return path
    try:
        candidate = Path(root) / _catalogue_name(name_or_path)
    except ValueError:
        candidate = None
    if candidate is not None and candidate.is_dir():
        return candidate
    raise ValueError(f"no model dir or catalogue model named {name_or_path}; `yunque models` lists the local ones, "
                     f"`yunque pull REPO` downloads one")


def _catalogue_name(name: str) -> str:
    """A catalogue dir name for OWNER/NAME or OWNER--NAME; ValueError for anything that could leave the root."""
    parts = name.split("/")
    if "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{name!r} points outside the catalogue; give a model name as `yunque models` shows it")
    return "--".join(parts)


__all__ = ["ALLOW_PATTERNS", "catalogue_dir", "format_table", "list_models", "pull", "remove", "resolve",
           "safetensors_dtype"]
