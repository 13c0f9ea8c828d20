"""`yunque eval` against lm-evaluation-harness (HF backend) on the same model, data and machine: HellaSwag items
(the shared validation set), wall time of each and their ratio, and both sets of scores side by side.

The model is a random Llama-style model (6 layers, width 384, 6 heads, GPT-2's 50257-token BPE, tied embeddings,
~30M parameters), saved as a yunque dir and exported with `export_hf` so that transformers runs the same weights.
Both score in fp32 with the same batch size; yunque's per-item cache starts empty for the timed run (a second,
cached run is timed after it). lm-eval reads the same items through a local task YAML (tests/eval/lm_eval_tasks.py),
offline. lm-eval's time is its whole `simple_evaluate` call, yunque's its whole `evaluate` call (both include
building prompts; neither includes loading the model).

    python benchmarks/eval.py [--items 500] [--num-fewshot 0] [--batch-size 16] [--threads 2] [--model PATH]
                              [--tasks hellaswag,arc_easy]

--model PATH evaluates another model yunque loads instead, dequantized to fp32 if it is a GGUF file, and exported
with `export_hf` for lm-eval: `--model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --tasks hellaswag,arc_easy`
prints yunque's and lm-eval's scores on the same dequantized weights beside the model card's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads: lm-eval reads local files
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.eval.lm_eval_tasks

import torch

from yunque.config import ModelConfig
from yunque.eval.harness import evaluate
from yunque.eval.lm import LocalLM
from yunque.eval.task import load_task
from yunque.interop.hf import export_hf
from yunque.model.gpt import GPT
from yunque.modeldir import load_model, save_model
from yunque.precision import cpu_description
from yunque.tokenizer.bpe import gpt2_tokenizer_from_files

SHARED = ROOT.parent / "shared" / "data"
MODEL = ModelConfig(vocab_size=50257, n_layer=6, n_head=6, d_model=384, max_seq_len=1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--model", default=None,
                    help="a model yunque loads (a yunque or HF dir, a .gguf file; default: the random ~30M model)")
    ap.add_argument("--tasks", default="hellaswag", help="hellaswag, arc_easy or both, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {load:.1f} on {os.cpu_count()} cores at start")
    from lm_eval.tasks import TaskManager

    from tests.eval.lm_eval_tasks import write_lm_eval_tasks

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        if args.model:
            ydir = Path(args.model)
        else:
            tok = gpt2_tokenizer_from_files(SHARED / "gpt2-bpe/gpt2_vocab.json", SHARED / "gpt2-bpe/gpt2_merges.txt")
            torch.manual_seed(0)
            ydir = root / "yunque"
            save_model(ydir, GPT(MODEL), tok)
        export_hf(ydir, root / "hf")
        tasks = write_lm_eval_tasks(SHARED, root)
        model, tok = load_model(ydir, dtype=torch.float32)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {ydir if args.model else 'random Llama-style'} ({n_params / 1e6:.1f}M parameters, fp32); "
              f"{args.items} items a task, {args.num_fewshot}-shot, batch size {args.batch_size}")
        lm = LocalLM(model, tok, name="yunque", batch_size=args.batch_size)
        manager = TaskManager(include_path=str(tasks), include_defaults=False)
        for name in args.tasks.split(","):
            compare(name, lm, root / "hf", manager, args, reference=REFERENCE.get(Path(args.model or "").name, {}))


REFERENCE = {"SmolLM2-135M-Instruct.Q4_1.gguf": {"hellaswag": ("acc_norm", 0.43), "arc_easy": ("acc", 0.54)}}
"""Zero-shot lm-eval scores published for the unquantized model (../shared/models/README.md)."""


def compare(name: str, lm: LocalLM, hf_dir: Path, manager, args, reference: dict) -> None:
    """Time one task with yunque (its cache empty, then a cached rerun) and with lm-eval; print both scores."""
    import lm_eval

    from yunque.eval.harness import ResultCache

    task = load_task(name, SHARED)
    task.docs()  # the data file is read once per process in either tool: not timed
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = ResultCache(cache_dir)  # empty: every item is computed (and written, a few KB)
        start, cpu0 = time.perf_counter(), time.process_time()
        ours = evaluate(task, lm, num_fewshot=args.num_fewshot, limit=args.items, cache=cache)
        t_ours, c_ours = time.perf_counter() - start, time.process_time() - cpu0
        print(f"{name}: yunque eval    {t_ours:7.1f} s wall, {c_ours:7.1f} s CPU  acc {ours['metrics']['acc']:.4f} "
              f"± {ours['stderr']['acc']:.4f}  acc_norm {ours['metrics']['acc_norm']:.4f} "
              f"± {ours['stderr']['acc_norm']:.4f}", flush=True)
        start = time.perf_counter()
        again = evaluate(task, lm, num_fewshot=args.num_fewshot, limit=args.items, cache=cache)
        t_cached = time.perf_counter() - start
    assert again["cached"] == ours["n"] and again["metrics"] == ours["metrics"]
    print(f"{name}: yunque, cached {t_cached:7.1f} s (a rerun reads every item from the cache)", flush=True)

    start, cpu0 = time.perf_counter(), time.process_time()
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"},
        tasks=[f"parity_{name}"], num_fewshot=args.num_fewshot, limit=args.items,
        batch_size=args.batch_size, task_manager=manager, log_samples=True, bootstrap_iters=0)
    t_theirs, c_theirs = time.perf_counter() - start, time.process_time() - cpu0
    res = out["results"][f"parity_{name}"]
    print(f"{name}: lm-eval (HF)   {t_theirs:7.1f} s wall, {c_theirs:7.1f} s CPU  acc {res['acc,none']:.4f}  "
          f"acc_norm {res['acc_norm,none']:.4f}")
    if name in reference:
        metric, value = reference[name]
        print(f"{name}: the model card (unquantized, all items): {metric} ~{value:.2f}")
    theirs = sorted(out["samples"][f"parity_{name}"], key=lambda s: s["doc_id"])
    worst = max(abs(a - float(b[0])) for i, s in zip(ours["items"], theirs)
                for a, b in zip(i["loglikelihoods"], s["filtered_resps"]))
    same = all(float(s["acc"]) == float(i["pred"] == i["gold"]) and float(s["acc_norm"]) == float(
        i["pred_norm"] == i["gold"]) for i, s in zip(ours["items"], theirs))
    print(f"{name}: per-item log-likelihoods differ by {worst:.2e} at most; per-item acc and acc_norm "
          f"{'identical' if same else 'DIFFER'}")
    print(f"{name}: yunque is {t_theirs / t_ours:.2f}x faster than lm-eval's HF backend in wall time, "
          f"{c_theirs / c_ours:.2f}x in CPU time (same batch size {args.batch_size}, fp32, same machine, one "
          f"run each; on a shared machine wall times vary between runs, CPU time less)")

if __name__ == "__main__":
    main()
