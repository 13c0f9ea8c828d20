"""`yunque eval` against lm-evaluation-harness (HF backend) on the same model, data and machine: HellaSwag items
(the shared validation set), the time of each, their ratios, and both sets of scores beside the model card's.

The model is SmolLM2-135M-Instruct from ../shared/models (its GGUF weights dequantized to fp32), exported with
`export_hf` so that transformers runs the same weights; `--model PATH` takes any other model yunque loads, and
without the shared file a random ~30M Llama-style model with GPT-2's tokenizer stands in.

Timed, each on the same items with nothing cached:
- yunque in fp32 (its figures are lm-eval's in fp32: per-item log-likelihoods printed against lm-eval's) and in
  `--precision auto` (bf16 where the CPU multiplies bf16 natively, as yunque eval does by default; its acc and
  acc_norm printed beside fp32's), both at --batch-size;
- lm-eval's HF backend in fp32 (what its dtype "auto" gives for this fp32 export) at its default batch size (1) and
  at --batch-size (a tuned one: lm-eval's rows are whole requests, padded to the longest of the batch);
- yunque again, reading every item from its cache.
A tool's time is its whole evaluate call (prompts, scoring, metrics), not loading the model or reading the data
file (both tools do that once per process). Wall time on a shared machine moves with the other jobs; CPU time less.

`--count N` first counts the arithmetic of both on N items (torch.profiler's matrix-product FLOPs, and how many
tensor operations run), which no other job on the machine changes: where the time goes, whatever the load.

    python benchmarks/eval.py [--items 500] [--batch-size 16] [--lm-eval-batch-sizes 1,16] [--threads N]
                              [--num-fewshot 0] [--tasks hellaswag,arc_easy] [--model PATH] [--count 20]
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
from yunque.eval.harness import ResultCache, evaluate
from yunque.eval.lm import LocalLM
from yunque.eval.scoring import score_batched
from yunque.eval.task import load_task
from yunque.interop.hf import export_hf
from yunque.model.gpt import GPT
from yunque.modeldir import load_model, save_model
from yunque.precision import cpu_description, resolve_precision
from yunque.tokenizer.bpe import gpt2_tokenizer_from_files

SHARED = ROOT.parent / "shared" / "data"
SMOLLM2 = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_MODEL = ModelConfig(vocab_size=50257, n_layer=6, n_head=6, d_model=384, max_seq_len=1024)
REFERENCE = {"SmolLM2-135M-Instruct.Q4_1.gguf": {"hellaswag": ("acc_norm", 0.43), "arc_easy": ("acc", 0.54)}}
"""Zero-shot lm-eval scores published for the unquantized model (../shared/models/README.md)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16, help="requests a batch, both tools (default 16)")
    ap.add_argument("--lm-eval-batch-sizes", default="1,16",
                    help="lm-eval's batch sizes to time: its default (1) and a tuned one (default 1,16)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--model", default=str(SMOLLM2) if SMOLLM2.is_file() else None,
                    help="a model yunque loads (a yunque or HF dir, a .gguf file; default: SmolLM2-135M-Instruct "
                         "from ../shared/models, else a random ~30M model)")
    ap.add_argument("--tasks", default="hellaswag", help="hellaswag, arc_easy or both, comma-separated")
    ap.add_argument("--count", type=int, default=20, help="items whose arithmetic is counted first (0: none)")
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
            save_model(ydir, GPT(RANDOM_MODEL), tok)
        export_hf(ydir, root / "hf")
        tasks = write_lm_eval_tasks(SHARED, root)
        model, tok = load_model(ydir, dtype=torch.float32)
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {ydir.name if args.model else 'random Llama-style'} ({n_params / 1e6:.1f}M parameters, "
              f"weights in fp32); {args.items} items a task, {args.num_fewshot}-shot")
        manager = TaskManager(include_path=str(tasks), include_defaults=False)
        for name in args.tasks.split(","):
            if args.count:
                count(name, model, tok, root / "hf", manager, args)
            compare(name, model, tok, root / "hf", manager, args, reference=REFERENCE.get(ydir.name, {}))


def hf_lm(hf_dir: Path, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=batch_size)


def count(name: str, model, tok, hf_dir: Path, manager, args) -> None:
    """The arithmetic of both tools on the first --count items, counted by torch.profiler (fp32, unpacked weights
    on yunque's side: the same products as its packed ones, which the profiler cannot count)."""
    import lm_eval
    from torch.profiler import ProfilerActivity, profile

    task = load_task(name, SHARED)
    lm = LocalLM(model, tok, name="yunque", fingerprint="count", precision="fp32")
    requests = lm.requests([(c, x) for c, x in _pairs(task, lm, args)])
    figures = {}
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as p:
        score_batched(model, requests, batch_size=args.batch_size)
    figures["yunque"] = p
    hflm = hf_lm(hf_dir, args.batch_size)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as p:
        lm_eval.simple_evaluate(model=hflm, tasks=[f"parity_{name}"], num_fewshot=args.num_fewshot, limit=args.count,
                                task_manager=manager, bootstrap_iters=0)
    figures["lm-eval"] = p
    flops = {k: sum(e.flops for e in p.key_averages()) for k, p in figures.items()}
    calls = {k: sum(e.count for e in p.key_averages() if e.key.startswith("aten::")) for k, p in figures.items()}
    mm = {k: sum(e.count for e in p.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
          for k, p in figures.items()}
    print(f"{name}: arithmetic on {args.count} items, batch size {args.batch_size} (torch.profiler counts, "
          f"independent of load):")
    for k in figures:
        print(f"  {k:8s} {flops[k] / 1e9:8.1f} GFLOP in matrix products ({mm[k]} products), {calls[k]} tensor "
              f"operations in all")
    print(f"  lm-eval does {flops['lm-eval'] / flops['yunque']:.2f}x yunque's arithmetic: it runs every context "
          f"once per choice, and the vocabulary projection and log-softmax at every position", flush=True)


def _pairs(task, lm, args):
    """The (context, continuation) pairs of the first --count items, as evaluate asks them."""
    from yunque.eval.harness import _requests
    from yunque.eval.task import context, iter_items

    return [tuple(p) for _, doc, shots in iter_items(task, args.num_fewshot, args.count, 1234)
            for p in _requests(task, doc, context(task, doc, shots))]


def compare(name: str, model, tok, hf_dir: Path, manager, args, reference: dict) -> None:
    """Time one task with yunque (fp32, then auto precision, then a cached rerun) and with lm-eval (at each of its
    batch sizes); print scores, agreement and ratios."""
    import lm_eval

    task = load_task(name, SHARED)
    task.docs()  # the data file is read once per process in either tool: not timed
    ours: dict[str, tuple[float, float, dict]] = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        for precision in ("fp32", "auto"):
            resolved = resolve_precision(precision, "cpu")
            if resolved in ours:
                continue  # auto is fp32 on this CPU: timed already
            lm = LocalLM(model, tok, name="yunque", batch_size=args.batch_size, precision=precision)
            cache = ResultCache(Path(cache_dir) / resolved)  # empty: every item is computed (and written)
            start, cpu0 = time.perf_counter(), time.process_time()
            r = evaluate(task, lm, num_fewshot=args.num_fewshot, limit=args.items, cache=cache)
            ours[resolved] = (time.perf_counter() - start, time.process_time() - cpu0, r)
            _line(name, f"yunque {resolved}, batch {args.batch_size}", *ours[resolved])
        start = time.perf_counter()
        again = evaluate(task, lm, num_fewshot=args.num_fewshot, limit=args.items, cache=cache)
        print(f"{name}: yunque, cached rerun    {time.perf_counter() - start:7.1f} s wall (every item read from the "
              f"cache)", flush=True)
        assert again["cached"] == r["n"] and again["metrics"] == r["metrics"]

    theirs: dict[int, tuple[float, float, dict]] = {}
    for bs in (int(b) for b in args.lm_eval_batch_sizes.split(",")):
        hflm = hf_lm(hf_dir, bs)
        lm_eval.simple_evaluate(model=hflm, tasks=[f"parity_{name}"], num_fewshot=args.num_fewshot, limit=1,
                                task_manager=manager, bootstrap_iters=0)  # its data set read and processed: untimed
        start, cpu0 = time.perf_counter(), time.process_time()
        out = lm_eval.simple_evaluate(model=hflm, tasks=[f"parity_{name}"], num_fewshot=args.num_fewshot,
                                      limit=args.items, task_manager=manager, log_samples=True, bootstrap_iters=0)
        res = out["results"][f"parity_{name}"]
        theirs[bs] = (time.perf_counter() - start, time.process_time() - cpu0,
                      {"metrics": {"acc": res["acc,none"], "acc_norm": res["acc_norm,none"]}, "samples": out})
        _line(name, f"lm-eval fp32, batch {bs}", *theirs[bs])
    if name in reference:
        metric, value = reference[name]
        print(f"{name}: the model card (unquantized, all items, lm-eval): {metric} ~{value:.2f}")

    fp32 = ours["fp32"][2]
    samples = sorted(next(iter(theirs.values()))[2]["samples"]["samples"][f"parity_{name}"], key=lambda s: s["doc_id"])
    worst = max(abs(a - float(b[0])) for i, s in zip(fp32["items"], samples)
                for a, b in zip(i["loglikelihoods"], s["filtered_resps"]))
    same = all(float(s["acc"]) == float(i["pred"] == i["gold"]) and float(s["acc_norm"]) == float(
        i["pred_norm"] == i["gold"]) for i, s in zip(fp32["items"], samples))
    print(f"{name}: yunque fp32 against lm-eval fp32: per-item log-likelihoods within {worst:.1e}; per-item acc and "
          f"acc_norm {'identical' if same else 'DIFFER'}")
    if "bf16" in ours:
        bf16 = ours["bf16"][2]
        moved = sum((a["pred"], a["pred_norm"]) != (b["pred"], b["pred_norm"]) for a, b in zip(fp32["items"],
                                                                                                 bf16["items"]))
        worst = max(abs(x - y) for a, b in zip(fp32["items"], bf16["items"])
                    for x, y in zip(a["loglikelihoods"], b["loglikelihoods"]))
        print(f"{name}: yunque bf16 against its fp32: {moved} of {fp32['n']} items change a prediction; "
              f"log-likelihoods within {worst:.2f}; acc {bf16['metrics']['acc']:.4f} vs {fp32['metrics']['acc']:.4f}, "
              f"acc_norm {bf16['metrics']['acc_norm']:.4f} vs {fp32['metrics']['acc_norm']:.4f}")
    for prec, (t_ours, c_ours, _) in ours.items():
        for bs, (t_theirs, c_theirs, _) in theirs.items():
            print(f"{name}: yunque {prec} (batch {args.batch_size}) is {t_theirs / t_ours:.2f}x faster in wall time, "
                  f"{c_theirs / c_ours:.2f}x in CPU time, than lm-eval fp32 (batch {bs}{', its default' * (bs == 1)})")
    print(f"{name}: (one run each, same machine; a busy machine moves wall times between runs, CPU time less)",
          flush=True)


def _line(name: str, who: str, wall: float, cpu: float, r: dict) -> None:
    m = r["metrics"]
    print(f"{name}: {who:28s} {wall:7.1f} s wall, {cpu:7.1f} s CPU  acc {m['acc']:.4f}  acc_norm "
          f"{m['acc_norm']:.4f}", flush=True)


if __name__ == "__main__":
    main()
