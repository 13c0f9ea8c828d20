"""SIGKILL a real `yunque pretrain` at random moments, resume it each time, and check that the final weights equal an
uninterrupted run's, bit for bit (fp32).

One uninterrupted reference run is timed first: its start-up (process start to the first logged step) and its
span. Then the same run is started, killed with SIGKILL after a moment drawn uniformly from
[start-up / 2, start-up + 2 * (span - start-up) / KILLS] (so kills land in start-up, tokenizing, training and
checkpoint saves alike, and on average the run moves on between kills), and continued (`--resume` once run.json
exists, else started again), KILLS times, before it is let finish. Prints the CPU, each kill's moment and the
checkpoint the run had reached, and whether the final weights are identical.

    python benchmarks/kill_resume.py [--kills 20] [--seed 0] [--data ../shared/data/tinyshakespeare.txt]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from yunque.precision import cpu_description

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
FLAGS = ["--tokenizer", "bytes", "--preset", "tiny", "--seq-len", "64", "--batch-size", "8", "--max-steps", "1500",
         "--eval-every", "500", "--checkpoint-every", "10", "--precision", "fp32", "--compile", "off", "--threads",
         "1", "--no-progress"]
"""A run of some seconds: fp32 and eager, so that the same steps give the same bits in any process."""


def start(out: Path, data: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "yunque", "pretrain", "--out", str(out), "--data", str(data), *FLAGS]
    return subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def reached(out: Path) -> str:
    """The step of the checkpoint in `out` (from the weights' header), or what the dir holds."""
    from yunque.train.checkpoint import checkpoint_progress

    progress = checkpoint_progress(out) if out.is_dir() else None
    if progress:
        return f"checkpoint at step {progress[0]}"
    return "run.json, no checkpoint" if (out / "run.json").is_file() else "nothing yet"


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = ap.parse_args()
    print(f"CPU: {cpu_description()}; python {platform.python_version()}", flush=True)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "text.txt"
        data.write_text(args.data.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
        t0 = time.perf_counter()
        p = start(tmp / "whole", data, resume=False)
        metrics = tmp / "whole" / "metrics.jsonl"
        while p.poll() is None and not (metrics.is_file() and metrics.read_text().strip()):
            time.sleep(0.02)
        startup = time.perf_counter() - t0
        if p.wait() != 0:
            print(p.stderr.read())
            return 1
        span = time.perf_counter() - t0
        print(f"uninterrupted run: {span:.1f} s ({startup:.1f} s to its first logged step)", flush=True)
        out = tmp / "killed"
        for k in range(args.kills):
            p = start(out, data, resume=(out / "run.json").is_file())
            moment = rng.uniform(startup / 2, startup + 2 * (span - startup) / args.kills)
            try:
                p.wait(timeout=moment)
                note = "(it had finished)"
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                note = ""
            print(f"kill {k + 1:2d} at {moment:5.1f} s: {reached(out)} {note}", flush=True)
        p = start(out, data, resume=(out / "run.json").is_file())
        if p.wait() != 0:
            print(p.stderr.read())
            return 1
        steps = json.loads((out / "run.json").read_text())["loop"]["max_steps"]
        identical = same_weights(out, tmp / "whole")
        debris = sorted(x.name for x in out.iterdir() if x.name.endswith(".yunque-tmp") or x.name == ".renames.json")
        print(f"after {args.kills} kills and resumes: {steps} steps, final weights "
              f"{'bit-identical to' if identical else 'DIFFERENT from'} the uninterrupted run's; "
              f"leftover temporary files: {debris or 'none'}")
        return 0 if identical and not debris else 1


if __name__ == "__main__":
    sys.exit(main())
