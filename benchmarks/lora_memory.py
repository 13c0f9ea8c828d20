"""Peak memory of fine-tuning the largest preset: the whole model vs LoRA adapters.

Each case runs in a fresh process: build the `large` preset (~104M parameters at vocab 4096), take a few
optimizer steps (AdamW, batch 4 x 128 tokens, fp32 master weights) and report the peak resident memory, the
trainable parameters and the optimizer state size.

    python benchmarks/lora_memory.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, torch
from yunque.config import preset
from yunque.model.gpt import GPT
from yunque.model.lora import LoraConfig, attach_lora
from yunque.train.optim import make_adamw
from yunque.losses import next_token_loss

def high_water():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024

torch.manual_seed(0)
model = GPT(preset("large", vocab_size=4096))
if sys.argv[1] == "lora":
    attach_lora(model, LoraConfig(rank=8, alpha=16))
opt = make_adamw(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95))
x = torch.randint(0, 4096, (4, 129))
for _ in range(3):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = next_token_loss(model(x[:, :-1]), x[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
print(json.dumps({"case": sys.argv[1], "parameters": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "optimizer_state_bytes": state, "peak_bytes": high_water()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = [json.loads(subprocess.run([sys.executable, "-c", CHILD, case], capture_output=True, text=True,
                                      check=True).stdout) for case in ("full", "lora")]
    print(f"{'case':<6}{'parameters':>14}{'trainable':>14}{'optimizer state MiB':>21}{'peak RSS MiB':>14}")
    for r in rows:
        print(f"{r['case']:<6}{r['parameters']:>14,}{r['trainable']:>14,}{r['optimizer_state_bytes'] / 2**20:>21.1f}"
              f"{r['peak_bytes'] / 2**20:>14.1f}")
    print(f"LoRA peak / full peak: {rows[1]['peak_bytes'] / rows[0]['peak_bytes']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
