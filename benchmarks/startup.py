"""Start-up: wall time from process start to the first generated token of `yunque generate` on a 30M model.

Writes a random 30M-parameter GPT-2-shaped model dir (fp32, GPT-2 tokenizer), then runs
`python -m yunque generate DIR PROMPT --max-new-tokens 1 --temperature 0` in fresh processes: the wall time of the
whole process is import + load + prefill + first token + exit (the issue's target: under 3 s). A second child
replays the same steps with timestamps to show where the time goes, and `python -X importtime` lists the slowest
imports.

    python benchmarks/startup.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-bpe"
PROMPT = "The quick brown fox jumps over the lazy dog, and then"
TARGET_S = 3.0

# The steps of `cmd_generate` in cli.py, timed. Keep in step with it.
STEPS = r"""
import sys, time
t0 = time.perf_counter()
marks = {}
import torch
marks["import torch"] = time.perf_counter()
import yunque.cli
marks["import yunque.cli"] = time.perf_counter()
from yunque.engine.engine import Engine, SamplingParams
from yunque.modeldir import load_model
marks["import engine, modeldir"] = time.perf_counter()
model, tok = load_model(sys.argv[1])
marks["load_model"] = time.perf_counter()
engine = Engine(model, tok)
marks["Engine(...)"] = time.perf_counter()
prompt = tok.encode(sys.argv[2], bos=tok.bos_id is not None)
next(engine.stream(prompt, SamplingParams(max_new_tokens=1, temperature=0)), "")
marks["first token"] = time.perf_counter()
prev = t0
for name, t in marks.items():
    print(f"{name}\t{t - prev:.3f}")
    prev = t
"""


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from yunque.config import ModelConfig
    from yunque.model.gpt import GPT
    from yunque.modeldir import save_model
    from yunque.tokenizer.bpe import gpt2_tokenizer_from_files

    with tempfile.TemporaryDirectory() as d:
        model_dir = Path(d) / "gpt2-30M"
        cfg = ModelConfig(vocab_size=50257, n_layer=6, n_head=6, d_model=384, max_seq_len=1024, pos="learned",
                          norm="layernorm", mlp="gelu", bias=True)
        torch.manual_seed(0)
        model = GPT(cfg)
        save_model(model_dir, model, gpt2_tokenizer_from_files(SHARED / "gpt2_vocab.json",
                                                                SHARED / "gpt2_merges.txt"))
        params = model.num_params()
        del model
        py = sys.executable
        generate = [py, "-m", "yunque", "generate", str(model_dir), PROMPT, "--max-new-tokens", "1",
                    "--temperature", "0"]
        wall(generate)  # warm the page cache and .pyc files, as on any second run
        runs = {"python -c 'import torch'": [py, "-c", "import torch"], "yunque generate (1 token)": generate}
        times = {name: statistics.median(wall(cmd) for _ in range(args.repeats)) for name, cmd in runs.items()}
        steps: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            out = subprocess.run([py, "-c", STEPS, str(model_dir), PROMPT], check=True, capture_output=True,
                                 text=True).stdout
            for line in out.splitlines():
                name, s = line.split("\t")
                steps.setdefault(name, []).append(float(s))
        step_s = {name: statistics.median(v) for name, v in steps.items()}
        imports = subprocess.run([py, "-X", "importtime", "-c", "import yunque.cli, yunque.engine.engine, "
                                  "yunque.modeldir"], capture_output=True, text=True).stderr
    slow = []
    for line in imports.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m and int(m.group(2)) > 50_000:
            slow.append((int(m.group(2)) / 1e6, len(m.group(3)) // 2, m.group(4)))

    print(f"model: {params / 1e6:.1f}M parameters (GPT-2 shape, fp32 on disk); median of {args.repeats} runs")
    for name, t in times.items():
        print(f"  {name:<28} {t:6.2f} s")
    ok = times["yunque generate (1 token)"] < TARGET_S
    print(f"target: import to first token < {TARGET_S:.0f} s: {'met' if ok else 'NOT met'}")
    print("where the time goes (same steps as cmd_generate, in one process):")
    for name, t in step_s.items():
        print(f"  {name:<28} {t:6.3f} s")
    print("imports over 50 ms (cumulative, from -X importtime; nesting by indent):")
    for s, depth, name in slow:
        print(f"  {'  ' * depth}{name:<{40 - 2 * depth}} {s:6.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": params, "wall_s": times, "target_s": TARGET_S, "met": ok,
                                               "steps_s": step_s, "slow_imports_s": slow}, indent=2) + "\n")


if __name__ == "__main__":
    main()
