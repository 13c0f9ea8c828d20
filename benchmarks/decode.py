"""Decode speed: prefill and decode tokens/s of the engine, and generation against `transformers` `generate()`.

Part 1, three sizes (~1M, ~10M, ~50M parameters: the `mini`, `small` and `medium` presets, as in
benchmarks/train.py), prompt 128, 256 new tokens, greedy, batch 1 and 8: the fp32 eager reference (the model with
a growing KV cache, F.linear, one token at a time: what the engine did before its fast paths) against the engine's
default fast path (bf16 where the CPU has it, oneDNN-packed weights, fp32 cache).

Part 2, the issue's comparison: a 30M GPT-2 (6 layers, width 384, 6 heads, vocab 50257, learned positions,
LayerNorm, GELU, tied) and a 35M Llama (6 layers, width 384, 6 heads, no GQA, vocab 32000), exported with
`export_hf` so that `transformers` runs the same weights on the same prompt, in fp32 and in bf16, batch 1 and 8.
Both produce exactly 256 tokens per row (min_new_tokens = max_new_tokens; the engine ignores stop tokens here).
Figures are generated tokens / wall time of the whole call, prefill included, the best of --repeats runs taken
in turn (ours, theirs, ours, ...): on a shared machine the least disturbed run is the one that measures the code.
`--compile` adds the engine with `compile=True` (compiling takes ~10 s per batch size and is excluded from its
figures).

Part 3 (`smollm2`), a real model: SmolLM2-135M-Instruct from the shared GGUF (../shared/models, loaded with
yunque's reader, so "fp32" is its Q4_1 weights dequantized), batch 1, greedy, a Tiny Shakespeare prompt of 128
tokens and --smol-new new ones: yunque fp32, int8 and int4 (model/quant.py, the kernels this CPU gets; with
`--compile` each compiled too), `transformers` fp32 on the same weights exported to a Hugging Face dir, and
llama.cpp (`llama_cpp`, the llama-cpp-python package, optional: skipped with the reason when absent) on GGUFs that
yunque exports from the same fp32 weights as f32, Q8_0 and Q4_0, its context reset before each run so that it
evaluates the prompt as yunque does; plus how many of yunque fp32's greedy tokens llama.cpp f32 produces too (the
same weights, so they differ only by summation order and kernels). Each is also timed generating one token (the
prompt's prefill and the first token, best of --repeats), and the tokens after the first are given apart: their
tokens/s is (--smol-new - 1) / (the whole call's time - that one-token call's).

    python benchmarks/decode.py [--threads 2] [--repeats 3] [--compile] [--parts sizes,versus,smollm2]
                                [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: transformers loads the exported dirs

import torch  # noqa: E402

from yunque.config import ModelConfig, preset  # noqa: E402
from yunque.engine.engine import Engine, SamplingParams  # noqa: E402
from yunque.model.gpt import GPT  # noqa: E402
from yunque.model.kv_cache import KVCache  # noqa: E402
from yunque.precision import bf16_supported, cpu_description  # noqa: E402
from yunque.tokenizer.bpe import gpt2_tokenizer_from_files  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-bpe"
SMOLLM2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT, NEW = 128, 256
SIZES = {
    "mini": preset("mini", vocab_size=4096, max_seq_len=512),
    "small": preset("small", vocab_size=8192, max_seq_len=512),
    "medium": preset("medium", vocab_size=8192, max_seq_len=512),
}
VERSUS = {
    "gpt2-30M": ModelConfig(vocab_size=50257, n_layer=6, n_head=6, d_model=384, max_seq_len=1024, pos="learned",
                            norm="layernorm", mlp="gelu", bias=True),
    "llama-35M": ModelConfig(vocab_size=32000, n_layer=6, n_head=6, d_model=384, max_seq_len=1024,
                             tie_embeddings=False),
}
# Measured by the issue on this machine kind (tokens/s, batch 1 unless noted); the targets follow from them.
ISSUE = {"transformers gpt2-30M fp32": 103, "transformers gpt2-30M bf16": 160, "transformers gpt2-30M fp32 b8": 430,
         "transformers gpt2-30M bf16 b8": 760, "transformers llama-35M bf16": 177,
         "transformers llama-35M bf16 static+compile": 212, "llama.cpp llama-35M bf16": "770-810"}
TARGETS = "batch 1: >= 3x transformers in the same dtype, and bf16 >= 0.75x llama.cpp (~600 tok/s); batch 8: >= 2x"


def prompts(vocab: int, batch: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, PROMPT), generator=g).tolist()


@torch.inference_mode()
def reference_generate(model: GPT, ids: list[list[int]], new: int) -> list[list[int]]:
    """The simple path: fp32 model, growing cache, F.linear, greedy, one token at a time, no stop tokens."""
    x = torch.tensor(ids)
    cache = KVCache(model.cfg, len(ids), PROMPT + new - 1)
    logits = model(x, kv_cache=cache)[:, -1]
    out = []
    for i in range(new):
        token = logits.argmax(-1)
        out.append(token)
        if i + 1 < new:
            logits = model(token.unsqueeze(1), kv_cache=cache)[:, -1]
    return torch.stack(out, 1).tolist()


def engine_generate(engine: Engine, ids: list[list[int]], new: int) -> list[list[int]]:
    return engine.generate(ids, SamplingParams(max_new_tokens=new, temperature=0))


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def best_runs(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Least wall seconds of each function, run in turn `repeats` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn)[0])
    return {name: min(t) for name, t in times.items()}


def sizes_table(tok, repeats: int) -> list[dict]:
    """Part 1: prefill and decode tokens/s of the reference and the fast path for three sizes."""
    rows = []
    for name, cfg in SIZES.items():
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        fast = Engine(model, tok)
        fast.stop_ids = set()
        for batch in (1, 8):
            ids = prompts(cfg.vocab_size, batch)
            t = best_runs({
                "ref prefill": lambda: reference_generate(model, ids, 1),
                "ref total": lambda: reference_generate(model, ids, NEW),
                "fast prefill": lambda: engine_generate(fast, ids, 1),
                "fast total": lambda: engine_generate(fast, ids, NEW),
            }, repeats)
            row = {"model": name, "params_M": round(model.num_params() / 1e6, 1), "batch": batch}
            for kind in ("ref", "fast"):
                row[f"{kind}_prefill_tok_s"] = batch * PROMPT / t[f"{kind} prefill"]
                row[f"{kind}_decode_tok_s"] = batch * (NEW - 1) / (t[f"{kind} total"] - t[f"{kind} prefill"])
            row["fast_precision"] = str(fast.dtype).removeprefix("torch.")
            rows.append(row)
            gain = row["fast_prefill_tok_s"] / row["ref_prefill_tok_s"]
            print(f"{name:>7} {row['params_M']:5.1f}M  b{batch}  prefill {row['ref_prefill_tok_s']:8.0f} -> "
                  f"{row['fast_prefill_tok_s']:8.0f} tok/s ({gain:4.1f}x)"
                  f"   decode {row['ref_decode_tok_s']:7.0f} -> {row['fast_decode_tok_s']:7.0f} tok/s "
                  f"({row['fast_decode_tok_s'] / row['ref_decode_tok_s']:4.1f}x)", flush=True)
    return rows


def versus_table(tok, repeats: int, compile: bool, workdir: Path) -> list[dict]:
    """Part 2: the engine against transformers generate() on the same exported weights and prompts."""
    import transformers
    from transformers import AutoModelForCausalLM

    from yunque.interop.hf import export_hf
    from yunque.modeldir import save_model

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rows = []
    for name, cfg in VERSUS.items():
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        save_model(workdir / name, model, tok)
        export_hf(workdir / name, workdir / f"{name}-hf")
        dtypes = ("fp32", "bf16") if bf16_supported("cpu") else ("fp32",)
        for precision in dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
            hf = AutoModelForCausalLM.from_pretrained(workdir / f"{name}-hf", dtype=dtype).eval()
            ours = Engine(model, tok, precision=precision)
            ours.stop_ids = set()
            compiled = None
            if compile:
                compiled = Engine(model, tok, precision=precision, compile=True)
                compiled.stop_ids = set()
            for batch in (1, 8):
                ids = prompts(cfg.vocab_size, batch, seed=1)
                x = torch.tensor(ids)

                def theirs():
                    with torch.inference_mode():
                        return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW,
                                           min_new_tokens=NEW, do_sample=False, pad_token_id=0)[:, PROMPT:].tolist()

                fns = {"ours": lambda: engine_generate(ours, ids, NEW), "transformers": theirs}
                if compiled is not None:
                    t0 = time.perf_counter()
                    engine_generate(compiled, ids, NEW)  # compiles for this batch size
                    compile_s = time.perf_counter() - t0
                    fns["ours compiled"] = lambda: engine_generate(compiled, ids, NEW)
                t = best_runs(fns, repeats)
                a, b = engine_generate(ours, ids, NEW), theirs()
                same = sum(next((i for i, (u, v) in enumerate(zip(r, s)) if u != v), NEW) for r, s in zip(a, b))
                row = {"model": name, "precision": precision, "batch": batch,
                       "ours_tok_s": batch * NEW / t["ours"], "transformers_tok_s": batch * NEW / t["transformers"],
                       "same_greedy_prefix": same / (batch * NEW)}
                row["ratio"] = row["ours_tok_s"] / row["transformers_tok_s"]
                line = (f"{name:>9} {precision} b{batch}  ours {row['ours_tok_s']:7.0f} tok/s   transformers "
                        f"{row['transformers_tok_s']:6.0f} tok/s   ratio {row['ratio']:4.2f}x")
                if compiled is not None:
                    row["ours_compiled_tok_s"] = batch * NEW / t["ours compiled"]
                    row["compile_s"] = compile_s
                    ratio = row["ours_compiled_tok_s"] / row["transformers_tok_s"]
                    line += (f"   compiled {row['ours_compiled_tok_s']:7.0f} tok/s ({ratio:4.2f}x; "
                             f"compile {compile_s:.0f} s)")
                line += f"   same greedy tokens: {row['same_greedy_prefix']:.0%}"
                rows.append(row)
                print(line, flush=True)
            hf = ours = compiled = None  # free both copies before the next model is made
    return rows


def smollm2_table(repeats: int, new: int, workdir: Path, compile: bool = False) -> dict:
    """Part 3: SmolLM2-135M batch-1 greedy decode, yunque fp32/int8/int4 against transformers fp32 (the same
    weights, exported to a Hugging Face dir) and llama.cpp f32/Q8_0/Q4_0; with `compile`, yunque's engines compiled
    too (each compile timed apart and excluded)."""
    import copy

    import transformers
    from transformers import AutoModelForCausalLM

    from yunque.interop.gguf import export_gguf
    from yunque.interop.hf import export_hf
    from yunque.model.quant import quantize_model
    from yunque.modeldir import load_model, save_model

    fp32, tok = load_model(SMOLLM2)
    text = (SHARED.parent / "tinyshakespeare.txt").read_text(encoding="utf-8")[:4000]
    prompt = tok.encode(text, bos=tok.bos_id is not None)[:PROMPT]
    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=n, temperature=0)

    runs, engines = {}, {}  # name: (function of n generating n tokens, what it runs)
    for name, method, precision in (("yunque fp32", None, "fp32"), ("yunque int8", "int8", "auto"),
                                    ("yunque int4", "int4", "auto")):
        model = fp32 if method is None else quantize_model(copy.deepcopy(fp32), method)
        engine = Engine(model, tok, precision=precision)
        engine.stop_ids = set()  # exactly `new` tokens
        engines[name] = engine
        kernels = sorted({type(m).__name__ for m in engine.model.modules() if "Linear" in type(m).__name__})
        runs[name] = (lambda n, e=engine: e.generate([prompt], greedy(n))[0],
                      f"{engine.dtype}, {', '.join(kernels)}")
        if compile:
            compiled = Engine(model, tok, precision=precision, compile=True)
            compiled.stop_ids = set()
            t0 = time.perf_counter()
            compiled.generate([prompt], greedy(new))
            print(f"{name} compiled in {time.perf_counter() - t0:.0f} s", flush=True)
            runs[f"{name} compiled"] = (lambda n, e=compiled: e.generate([prompt], greedy(n))[0],
                                        f"{engine.dtype}, {', '.join(kernels)}, torch.compile")
        del model
    transformers.logging.set_verbosity_error()
    save_model(workdir / "smollm2", fp32, tok)
    export_hf(workdir / "smollm2", workdir / "smollm2-hf")
    hf = AutoModelForCausalLM.from_pretrained(workdir / "smollm2-hf", dtype=torch.float32).eval()
    x = torch.tensor([prompt])

    def hf_generate(n: int) -> list[int]:
        with torch.inference_mode():
            return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()

    runs["transformers fp32"] = (hf_generate, f"transformers {transformers.__version__}, generate()")
    try:
        from llama_cpp import Llama
    except ImportError as e:
        print(f"llama.cpp rows skipped: {e} (pip install llama-cpp-python)")
        Llama = None
    if Llama is not None:
        for dtype in ("f32", "q8_0", "q4_0"):
            path = workdir / f"smollm2-{dtype}.gguf"
            export_gguf(SMOLLM2, path, dtype=dtype)
            llm = Llama(str(path), n_ctx=PROMPT + new + 16, n_threads=torch.get_num_threads(), verbose=False)

            def theirs(n: int, llm=llm) -> list[int]:
                # From its second call on, generate() would find the prompt in the context the last call left
                # (llama-cpp-python matches the longest common prefix) and evaluate one token of it instead of 128:
                # timed so, llama.cpp would skip the prefill that yunque's figures include. Reset: both do it.
                llm.reset()
                out = []
                for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                    out.append(token)
                    if len(out) == n:
                        break
                return out

            runs[f"llama.cpp {dtype}"] = (theirs, "llama-cpp-python")
    times = best_runs({name: functools.partial(fn, new) for name, (fn, _) in runs.items()}, repeats)
    prefill = best_runs({name: functools.partial(fn, 1) for name, (fn, _) in runs.items()}, repeats)
    rows = []
    print("tokens/s of the whole call (prompt included); the prompt and first token alone (ms); the tokens after it "
          "(tokens/s)")
    for name, (_, how) in runs.items():
        step = (times[name] - prefill[name]) / (new - 1)
        rows.append({"name": name, "tok_s": new / times[name], "prefill_ms": 1000 * prefill[name],
                     "decode_tok_s": 1 / step, "how": how})
        print(f"{name:>20}  {new / times[name]:7.1f} tok/s   prompt {1000 * prefill[name]:6.1f} ms   then "
              f"{1 / step:7.1f} tok/s   ({how})", flush=True)
    result = {"prompt_tokens": len(prompt), "new_tokens": new, "rows": rows}
    if "llama.cpp f32" in runs:
        ours, theirs_ids = runs["yunque fp32"][0](new), runs["llama.cpp f32"][0](new)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs_ids)) if a != b), new)
        result["greedy_agreement_f32"] = same / new
        print(f"greedy tokens, yunque fp32 vs llama.cpp f32 on the same weights: the first {same} of {new} agree")
        tok_s = {r["name"]: r["tok_s"] for r in rows}
        after = {r["name"]: r["decode_tok_s"] for r in rows}
        targets = (("yunque fp32", "llama.cpp f32", 1.0), ("yunque int8", "llama.cpp q8_0", 1.0),
                   ("yunque int4", "llama.cpp q4_0", 0.8))
        for ours_name, theirs_name, need in targets:
            ratio = max(tok_s[ours_name], tok_s.get(f"{ours_name} compiled", 0)) / tok_s[theirs_name]
            ratio_after = max(after[ours_name], after.get(f"{ours_name} compiled", 0)) / after[theirs_name]
            print(f"{ours_name} / {theirs_name}: {ratio:.2f}x (issue 11's target >= {need}x): "
                  f"{'met' if ratio >= need else 'NOT met'}; the tokens after the first alone: {ratio_after:.2f}x")
    tok_s = {r["name"]: r["tok_s"] for r in rows}
    ratio = max(tok_s["yunque fp32"], tok_s.get("yunque fp32 compiled", 0)) / tok_s["transformers fp32"]
    result["fp32_vs_transformers"] = ratio
    print(f"yunque fp32 / transformers fp32: {ratio:.2f}x (issue 11's target >= 3x): "
          f"{'met' if ratio >= 3 else 'NOT met'}")
    return result


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        need = 3.0 if r["batch"] == 1 else 2.0
        best = max(r["ours_tok_s"], r.get("ours_compiled_tok_s", 0))
        ok = best >= need * r["transformers_tok_s"]
        line = (f"{r['model']} {r['precision']} b{r['batch']}: {best / r['transformers_tok_s']:.2f}x transformers "
                f"(target >= {need:.0f}x): {'met' if ok else 'NOT met'}")
        if r["batch"] == 1 and r["precision"] == "bf16" and r["model"].startswith("llama"):  # llama.cpp's figure
            line += f"; {best:.0f} tok/s vs ~600 (0.75x llama.cpp): {'met' if best >= 600 else 'NOT met'}"
        out.append(line)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time Engine(compile=True)")
    ap.add_argument("--parts", default="sizes,versus,smollm2", help="which tables: sizes, versus, smollm2")
    ap.add_argument("--smol-new", type=int, default=128, help="new tokens per SmolLM2 run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.getLogger("torch._inductor").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    tok = gpt2_tokenizer_from_files(SHARED / "gpt2_vocab.json", SHARED / "gpt2_merges.txt")
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "bf16": bf16_supported("cpu")}
    machine["cpu"] = cpu_description()
    print(f"CPU: {machine['cpu']}")
    print(f"torch {machine['torch']}, {machine['threads']} threads, bf16 matmul: {machine['bf16']}; "
          f"prompt {PROMPT}, {NEW} new tokens, greedy, best of {args.repeats}")
    result = {"machine": machine, "issue_reference_tok_s": ISSUE, "targets": TARGETS}
    parts = args.parts.split(",")
    if "sizes" in parts:
        print("\nprefill and decode tokens/s: fp32 eager reference -> engine default fast path")
        result["sizes"] = sizes_table(tok, args.repeats)
    if "versus" in parts:
        print("\nwhole generate() calls, tokens/s (prefill included), against transformers on the same weights")
        with tempfile.TemporaryDirectory() as d:
            result["versus"] = versus_table(tok, args.repeats, args.compile, Path(d))
        print(f"\ntargets: {TARGETS}")
        print(f"the issue's figures for this machine kind: {ISSUE}")
        result["verdicts"] = verdicts(result["versus"])
        print("\n".join(result["verdicts"]))
    if "smollm2" in parts:
        print(f"\nSmolLM2-135M-Instruct, batch 1, greedy, {args.smol_new} new tokens after a {PROMPT}-token prompt")
        with tempfile.TemporaryDirectory() as d:
            result["smollm2"] = smollm2_table(args.repeats, args.smol_new, Path(d), args.compile)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
