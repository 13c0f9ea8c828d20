"""Peak memory of loading a ~130M-parameter checkpoint, against its size on disk.

Writes a random ~130M-parameter checkpoint (the `large` preset) as a yunque model dir and as a Hugging Face
(Llama) dir, single-file and sharded, in fp32 and bf16, then loads each in a fresh process and reports the growth
of peak resident memory over the process's footprint after imports. The issue's bound is 1.5x the size on disk.

    python benchmarks/load_memory.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import sys, torch
import yunque.interop.hf, yunque.modeldir  # imports first: their memory is not the checkpoint's
from yunque.modeldir import load_model

def high_water():  # peak resident set of this process, in bytes (VmHWM restarts at exec, unlike ru_maxrss)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

torch.ones(1)
base = high_water()
model, tok = load_model(sys.argv[1])
with torch.no_grad():  # touch every weight, so that lazily mapped pages count too
    total = sum(float(p.sum()) for p in model.parameters())  # in its own dtype: p.float() would copy it
print(base, high_water(), next(model.parameters()).dtype)
"""


def write_shards(hf_dir: Path, out: Path, n: int = 4) -> None:
    """Copy an HF dir with its model.safetensors split into `n` shards and a model.safetensors.index.json."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, out, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(hf_dir / "model.safetensors")
    names = list(tensors)
    weight_map = {}
    for i in range(n):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::n]}
        save_file(part, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from yunque.config import preset
    from yunque.interop.hf import export_hf
    from yunque.model.gpt import GPT
    from yunque.modeldir import save_model
    from yunque.tokenizer.bpe import byte_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = byte_tokenizer()
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = GPT(preset("large", vocab_size=32768)).to(dtype)
            n_params = model.num_params()
            name = str(dtype).split(".")[1]
            ours, hf, sharded = Path(tmp, f"yunque-{name}"), Path(tmp, f"hf-{name}"), Path(tmp, f"hf-sharded-{name}")
            save_model(ours, model, tok)
            export_hf(ours, hf)
            write_shards(hf, sharded)
            del model
            for kind, d in (("yunque", ours), ("hf", hf), ("hf x4", sharded)):
                size = sum(p.stat().st_size for p in d.glob("*.safetensors"))
                out = subprocess.run([sys.executable, "-c", CHILD, str(d)], capture_output=True, text=True,
                                     check=True).stdout.split()
                base, peak = int(out[0]), int(out[1])
                rows.append({"format": kind, "dtype": name, "parameters": n_params, "size_on_disk": size,
                             "peak_growth": peak - base, "ratio": (peak - base) / size, "loaded_dtype": out[2]})
    print(f"{'format':<8}{'dtype':<10}{'params':>12}{'on disk MiB':>13}{'peak growth MiB':>17}{'ratio':>8}  loaded as")
    for r in rows:
        print(f"{r['format']:<8}{r['dtype']:<10}{r['parameters']:>12,}{r['size_on_disk'] / 2**20:>13.1f}"
              f"{r['peak_growth'] / 2**20:>17.1f}{r['ratio']:>8.2f}  {r['loaded_dtype']}")
    print("bound: ratio <= 1.5")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
