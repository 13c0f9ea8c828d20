"""Quality of weight-only quantization: held-out perplexity of SmolLM2-135M-Instruct in fp32, int8 and int4.

The model is the shared GGUF (../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf) loaded with yunque's loader, so
"fp32" is its weights dequantized from Q4_1 (Q8_0 for the embedding) to fp32. int8 (per output channel) and int4
(groups of --group-size) quantize that fp32 model's linear layers and its tied head (model/quant.py). Each is
scored as the engine decodes it (engine/cpu.py `decode_model` in fp32, with the quantized kernels this CPU gets:
see `quant_kernel`), on the first --tokens tokens of two held-out texts, in windows of --window tokens:

- Tiny Shakespeare (../shared/data/tinyshakespeare.txt): its last 10%, the split yunque's runs hold out;
- the built-in corpus (yunque.data.sources: Python's standard library source and pydoc topics), from the
  document at --stdlib-skip on, in the corpus's own order.

Acceptance (issue 11): int8's perplexity within 1% of fp32's, int4's within 5%.

    python benchmarks/quantize.py [--tokens 4096] [--window 1024] [--group-size 32] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from yunque.data.loaders import TokenWindows
from yunque.data.sources import builtin_documents
from yunque.engine.cpu import decode_model
from yunque.eval.perplexity import score_windows
from yunque.model.quant import quantize_model
from yunque.modeldir import load_model
from yunque.precision import bf16_supported, cpu_description

SHARED = Path(__file__).resolve().parents[2] / "shared"
GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LIMITS = {"int8": 0.01, "int4": 0.05}


def texts(tokens: int, stdlib_skip: int) -> dict[str, str]:
    """Held-out text of each corpus, comfortably more than `tokens` tokens (~3 bytes a token or more)."""
    shakespeare = (SHARED / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    held_out = shakespeare[int(len(shakespeare) * 0.9):]
    parts, size = [], 0
    for i, doc in enumerate(builtin_documents()):
        if i < stdlib_skip:
            continue
        parts.append(doc.text)
        size += len(doc.text)
        if size > 8 * tokens:
            break
    return {"tinyshakespeare": held_out[:8 * tokens], "stdlib": "\n\n".join(parts)}


def perplexity(model: torch.nn.Module, ids: np.ndarray, window: int) -> float:
    nll, n = score_windows(model, TokenWindows([ids]), batch_size=1, seq_len=window)
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens scored per corpus")
    ap.add_argument("--window", type=int, default=1024, help="tokens per scored window")
    ap.add_argument("--group-size", type=int, default=32, help="int4 group size")
    ap.add_argument("--stdlib-skip", type=int, default=200, help="built-in corpus documents to skip first")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"native bf16: {bf16_supported('cpu')}")
    print(f"model: {GGUF.name} loaded with yunque (fp32 = its weights dequantized); {args.tokens} tokens per "
          f"corpus in windows of {args.window}; int4 groups of {args.group_size}")
    fp32, tok = load_model(GGUF)
    ids = {}
    for name, text in texts(args.tokens, args.stdlib_skip).items():
        stream = tok.encode(text, bos=tok.bos_id is not None)
        if len(stream) < args.tokens + 1:
            raise SystemExit(f"{name}: only {len(stream)} tokens of text; lower --tokens")
        ids[name] = np.asarray(stream[:args.tokens + 1], dtype=np.int64)  # +1: the last target
    result = {"cpu": cpu_description(), "model": GGUF.name, "tokens": args.tokens, "window": args.window,
              "group_size": args.group_size, "perplexity": {}}
    for method in ("fp32", "int8", "int4"):
        model = fp32 if method == "fp32" else quantize_model(copy.deepcopy(fp32), method, args.group_size)
        engine_copy = decode_model(model, torch.float32, torch.device("cpu"))  # the kernels this CPU decodes with
        kernels = sorted({type(m).__name__ for m in engine_copy.modules() if "Linear" in type(m).__name__})
        start = time.perf_counter()
        ppl = {name: perplexity(engine_copy, stream, args.window) for name, stream in ids.items()}
        result["perplexity"][method] = ppl
        print(f"{method:>5}: " + "   ".join(f"{name} {p:8.3f}" for name, p in ppl.items())
              + f"   ({', '.join(kernels)}; {time.perf_counter() - start:.0f} s)", flush=True)
        del model, engine_copy
    base = result["perplexity"]["fp32"]
    verdicts = []
    for method, limit in LIMITS.items():
        for name, p in result["perplexity"][method].items():
            ratio = p / base[name]
            verdicts.append(f"{method} / fp32 on {name}: {ratio:.4f} (acceptance <= {1 + limit:.2f}): "
                            f"{'met' if ratio <= 1 + limit else 'NOT met'}")
    result["verdicts"] = verdicts
    print("\n".join(verdicts))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
