"""Serving throughput and latency: 1, 4, 16 and 64 concurrent streaming clients (the `openai` async SDK) against
`yunque serve` on loopback, continuous batching included.

The model is the issue's ~30M GPT-2 shape (6 layers, width 384, 6 heads, vocab 50257, learned positions), random
weights with GPT-2's tokenizer (untrained: speed does not depend on what the weights say; sampling at temperature
1 from near-uniform logits, a reply ends early at end of text with probability ~1/50257 a token). Every client
sends --requests completions one after another, each a --prompt-token prompt (different per client) and
--new tokens streamed back. Per level: aggregate generated tokens / wall time (tokens counted by the server's
usage), time to first token and inter-token latency (gaps between streamed chunks) p50 and p99, and the ratio of
aggregate tokens/s to one client's. Beside it, the scheduler alone (engine/scheduler.py in this process, the same
prompts and lengths, no HTTP): what continuous batching gives before the server's own costs. The CPU, its flags
and the load average at the start are printed first: on a shared machine, say so beside the figures.

The issue's comparison with llama.cpp's server (llama-cpp-python[server]) is not run here: building it from source
takes ~10 minutes of both cores, and no wheel installs on this machine.

    python benchmarks/serve.py [--levels 1 4 16 64] [--requests 2] [--prompt 64] [--new 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import torch

from yunque.config import ModelConfig
from yunque.model.gpt import GPT
from yunque.modeldir import save_model
from yunque.precision import cpu_description
from yunque.tokenizer.bpe import byte_tokenizer, gpt2_tokenizer_from_files

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-bpe"
GPT2_30M = ModelConfig(vocab_size=50257, n_layer=6, n_head=6, d_model=384, max_seq_len=1024, pos="learned",
                       norm="layernorm", mlp="gelu", bias=True)
TARGETS = "16 clients >= 6x one client's aggregate tokens/s; time to first token p99 < 1 s at 16 clients"


def make_model(directory: Path) -> None:
    tok = (gpt2_tokenizer_from_files(SHARED / "gpt2_vocab.json", SHARED / "gpt2_merges.txt") if SHARED.is_dir()
           else byte_tokenizer())
    cfg = GPT2_30M if tok.vocab_size == 50257 else ModelConfig(**{**GPT2_30M.__dict__, "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    save_model(directory, GPT(cfg), tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "yunque", "serve", f"bench={model_dir}", "--port", str(port),
                             "--preload", "--max-running", "64"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start within 180 s")


def prompt_ids(client: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(client)
    return torch.randint(0, min(vocab, 50000), (n,), generator=g).tolist()


async def level(url: str, clients: int, args, vocab: int) -> dict:
    ttft, gaps, tokens = [], [], 0

    async def one_client(c: openai.AsyncOpenAI, i: int) -> None:
        nonlocal tokens
        for r in range(args.requests):
            start = time.perf_counter()
            last = None
            stream = await c.completions.create(model="bench", prompt=prompt_ids(1000 * i + r, args.prompt, vocab),
                                                max_tokens=args.new, temperature=1.0, seed=i, stream=True,
                                                stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].text:
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - start)
                    else:
                        gaps.append(now - last)
                    last = now

    # a new connection per request: a kept-alive one that the server closes after 5 s idle could be picked from the
    # pool at that moment and fail the request (a client-side race, not the server's doing)
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600,
                                  http_client=httpx.AsyncClient(limits=limits)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c, i) for i in range(clients)))
        wall = time.perf_counter() - t0

    def q(values, p):
        return statistics.quantiles(values, n=100)[p - 1] if len(values) > 1 else (values[0] if values else 0.0)

    return {"clients": clients, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_p50": q(ttft, 50), "ttft_p99": q(ttft, 99), "itl_p50": q(gaps, 50), "itl_p99": q(gaps, 99)}


def scheduler_alone(model_dir: Path, clients: int, args) -> float:
    """Aggregate generated tokens/s of `clients` threads each running --requests generations through a Scheduler
    in this process (no HTTP, no SSE): the batching's own figure."""
    import threading

    from yunque.config import SamplingParams, SchedulerConfig
    from yunque.engine.engine import Engine
    from yunque.engine.scheduler import Scheduler
    from yunque.modeldir import load_model

    model, tok = load_model(model_dir)
    engine = Engine(model, tok)
    engine.stop_ids = set()
    scheduler = Scheduler(engine, SchedulerConfig(max_running=64))
    tokens = []

    def client(i: int) -> None:
        for r in range(args.requests):
            events = scheduler.generate(prompt_ids(1000 * i + r, args.prompt, GPT2_30M.vocab_size),
                                        SamplingParams(max_new_tokens=args.new, temperature=1.0, seed=i))
            tokens.append(events[-1].completion_tokens)

    try:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(tokens) / (time.perf_counter() - t0)
    finally:
        scheduler.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="tokens generated per request")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"model: GPT-2 shape, ~30M parameters (random weights); prompt {args.prompt} tokens, {args.new} new, "
          f"{args.requests} requests per client, streaming completions")
    with tempfile.TemporaryDirectory() as tmp:
        make_model(Path(tmp) / "model")
        vocab = GPT2_30M.vocab_size
        port = free_port()
        server = start(Path(tmp) / "model", port)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(level(url, 1, argparse.Namespace(**{**vars(args), "requests": 1}), vocab))  # warm up
            rows = []
            for n in args.levels:
                rows.append(asyncio.run(level(url, n, args, vocab)))
                r = rows[-1]
                r["ratio"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
                alone = scheduler_alone(Path(tmp) / "model", n, args)
                r["scheduler_tokens_per_s"] = alone
                r["scheduler_ratio"] = alone / rows[0]["scheduler_tokens_per_s"]
                print(f"{n:3d} clients: {r['tokens_per_s']:7.1f} tok/s aggregate ({r['ratio']:.2f}x one client), "
                      f"TTFT p50 {r['ttft_p50'] * 1000:6.0f} ms p99 {r['ttft_p99'] * 1000:6.0f} ms, "
                      f"inter-token p50 {r['itl_p50'] * 1000:5.1f} ms p99 {r['itl_p99'] * 1000:6.1f} ms "
                      f"({r['tokens']} tokens in {r['seconds']:.1f} s); scheduler alone {alone:6.1f} tok/s "
                      f"({r['scheduler_ratio']:.2f}x)", flush=True)
        finally:
            server.terminate()
            server.wait(30)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(f"targets: {TARGETS}")
    by = {r["clients"]: r for r in rows}
    if 16 in by:
        print(f"  16 clients: {by[16]['ratio']:.2f}x one client ({'met' if by[16]['ratio'] >= 6 else 'NOT met'}); "
              f"TTFT p99 {by[16]['ttft_p99']:.2f} s ({'met' if by[16]['ttft_p99'] < 1 else 'NOT met'})")
    print("llama.cpp's server: not measured (llama-cpp-python builds from source here, ~10 min of both cores)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
