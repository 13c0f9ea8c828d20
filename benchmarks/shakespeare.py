"""Tiny Shakespeare, byte tokenizer, nanoGPT's CPU recipe shape: time and tokens/s to validation loss <= 1.88.

The split is nanoGPT's (first 90% train, last 10% validation), so the loss per character is comparable with
nanoGPT's figure for the same recipe (1.886 after 2000 iterations). Validation is measured on the whole
validation split, in consecutive windows.

    python benchmarks/shakespeare.py [--data ../shared/data/tinyshakespeare.txt] [--max-steps 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from yunque.config import ModelConfig  # noqa: E402
from yunque.data.loaders import TokenWindows  # noqa: E402
from yunque.eval.perplexity import score_windows  # noqa: E402
from yunque.model.gpt import GPT  # noqa: E402
from yunque.tokenizer.bpe import byte_tokenizer  # noqa: E402
from yunque.train.loop import LoopConfig, fit  # noqa: E402
from yunque.train.losses import next_token_loss  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--style", choices=["llama", "gpt2"], default="llama")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    tok = byte_tokenizer()
    ids = np.asarray(tok.encode(Path(args.data).read_text(encoding="utf-8")), dtype=np.int64)
    cut = int(0.9 * len(ids))
    train, val = TokenWindows([ids[:cut]]), TokenWindows([ids[cut:]])
    style = {} if args.style == "llama" else dict(pos="learned", norm="layernorm", mlp="gelu", bias=True)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, d_model=128, max_seq_len=args.seq_len, **style)
    torch.manual_seed(0)
    model = GPT(cfg)
    reached: dict[str, float] = {}

    def evaluate(m) -> float:
        nll, n = score_windows(m, val, batch_size=64, seq_len=args.seq_len)
        loss = nll / n
        if loss <= args.target and "seconds" not in reached:
            reached.update(seconds=time.perf_counter() - T0, loss=loss)
        return loss

    def batches(step):
        return train.sample(args.batch_size, args.seq_len, seed=0, step=step)

    with tempfile.TemporaryDirectory() as out:
        loop = LoopConfig(out_dir=out, max_steps=args.max_steps, lr=args.lr, warmup_steps=args.warmup_steps,
                          betas=(0.9, 0.99), precision=args.precision, eval_every=args.eval_every,
                          log_every=args.eval_every, tokens_per_step=args.batch_size * args.seq_len,
                          progress=False)
        t_train = time.perf_counter()
        s = fit(model, batches, lambda m, b: next_token_loss(m(b[0]), b[1]), loop, evaluate=evaluate)
        train_seconds = time.perf_counter() - t_train
        curve = [(r["step"], r["val_loss"]) for r in json.loads("[" + ",".join(
            Path(out, "metrics.jsonl").read_text().splitlines()) + "]") if "val_loss" in r]
    result = {
        "model": f"{args.style}-style 4 layers, 4 heads, d_model 128, context {args.seq_len}, batch {args.batch_size}",
        "parameters": model.num_params(), "precision": s["precision"], "steps": s["steps"],
        "tokens_per_sec": s["tokens_seen"] / train_seconds, "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - T0, "final_val_loss": s["val_loss"],
        "target": args.target, "seconds_to_target": reached.get("seconds"), "val_curve": curve,
    }
    print(f"{'figure':<28}{'value':>14}")
    for key in ("parameters", "precision", "steps", "tokens_per_sec", "train_seconds", "wall_seconds",
                "final_val_loss", "seconds_to_target"):
        v = result[key]
        print(f"{key:<28}{v:>14.3f}" if isinstance(v, float) else f"{key:<28}{str(v):>14}")
    print("val loss by step: " + ", ".join(f"{st}:{v:.3f}" for st, v in curve))
    print("reference: nanoGPT, same recipe, 2000 iterations: ~75 s, ~21k tokens/s, val loss 1.886")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
