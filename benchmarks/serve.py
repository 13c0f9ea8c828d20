"""Serving throughput and latency: 1, 4, 16 and 64 concurrent streaming clients (the `openai` async SDK) against
`yunque serve` on loopback, continuous batching included.

The model is the issue's ~30M GPT-2 shape (6 layers, width 384, 6 heads, vocab 50257, learned positions), random weights
with GPT-2's tokenizer (untrained: speed does not depend on what the weights say; sampling at temperature 1 from
near-uniform logits, a reply ends early at end of text with probability ~1/50257 a token). Every client sends --requests
completions one after another, each a --prompt-token prompt (different per client) and --new tokens streamed back. No
prompt is sent twice: every round of every level has prompts of its own, so the server's shared-prefix cache gains
nothing (it did from the second round on, when the rounds sent the same prompts: a prompt's text comes back as ~66
tokens, and 64 of them were then cached). Before each level is timed, the same number of clients send one request each
with other prompts (untimed, nothing in common with the timed ones): a server that has run a while has seen every batch
size, and the first of each size costs oneDNN time to build its kernels (once, a 16-client level that came first ran at
734 tokens/s, its repeats at 820 and 872). Per level: aggregate generated tokens / wall time (tokens counted by the
server's usage), time to first token and inter-token latency (gaps between streamed chunks) p50 and p99, the ratio of
aggregate tokens/s to one client's, and where the CPU went (Linux, /proc): the server's process, this process's clients
(each also in ms of CPU per generated token), the share of the machine left idle, how much of the time the server's
threads waited for a core while ready to run (summed over its threads, in cores; from /proc/<pid>/task/*/schedstat) and
the share the hypervisor stole; the clients share the machine with the server, so their CPU is the server's loss. They
talk HTTP through the SDK's aiohttp transport (`openai.DefaultAioHttpClient`, the `openai[aiohttp]` extra; --http httpx
for its default): at 16 clients it took 0.19-0.26 ms of CPU a streamed token against 0.39-0.41 for httpx, and 16 clients
ran at 1,178-1,343 tokens/s against 1,058-1,077 (three alternated runs each, Zen 4). Beside it, the scheduler alone
(engine/scheduler.py in this process, the same prompts and lengths, no HTTP): what continuous batching gives before the
server's own costs. The CPU, its flags and the load average at the start are printed first: on a shared machine, say so
beside the figures. The levels run in --repeats rounds (1, 4, 16, 64 clients, then again), and each level's figures are
those of its median round: on these shared machines one level's speed varied by a third between runs minutes apart (16
clients: 958-1,538 tokens/s on one code), which a single run per level puts into the ratio whole; within one run of 3
rounds one client still ranged over ±15% (163-186, 234-271, 195-224 tokens/s), hence 5. Each round's line also gives its
own ratios to one client, levels a minute apart: the spread the machine adds.

After each round, with the server idle, what an engine running at this machine's limits would serve for the same
requests (`EngineBound`): the engine's own product on the output head timed at 16 rows (its FLOP/s) and at one row
(the bytes/s it reads the weight at), and every product of each round's prefill and decode steps at the longer of its
two bounds; attention, HTTP and the clients cost nothing there. One row reads every weight for 2 FLOPs and 16 rows make
32 of each read, so the ratio such an engine gets between 16 clients and one is set by the machine's balance of the
two, and by the share of prefill (which 16 clients pay in full). Each round's line gives it beside the measured
ratios, and the end the median round's: on the Zen 4 of 4 Dec, 409 GFLOP/s and 67.5 GB/s gave 4.70x, and 321 GFLOP/s
with the memory at half its pace (33.9 GB/s) 7.16x: one row is bound by reading, so a neighbour's memory traffic
slows one client and not 16.

Then, where llama-cpp-python[server] imports (`pip install 'llama-cpp-python[server]'`; the `bench` extra), the
same clients against llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`) on the same weights
exported with `yunque export --format gguf` (--gguf-dtype, f16 by default), printed side by side. Both servers get
the same prompts as text (each a decoded --prompt-token sequence). llama.cpp's streams carry no usage, so its
tokens are its streamed chunks (one per token); its levels run once (it serves one request at a time: its 16-client
level alone takes ~40 s). Where it does not import, the reason is printed and it is skipped.

    python benchmarks/serve.py [--levels 1 4 16 64] [--requests 4] [--prompt 64] [--new 64] [--repeats 5]
                               [--json out.json] [--no-llama-cpp] [--gguf-dtype f16]
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
from importlib.metadata import version
from pathlib import Path

import httpx
import openai
import torch

from yunque.config import ModelConfig
from yunque.engine.scheduler import in_passing_thread
from yunque.model.gpt import GPT
from yunque.modeldir import load_model, save_model
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


def prompt_tokens(url: str) -> tuple[float, float]:
    """The server's prompt tokens so far (from /metrics): all of them, and those its shared-prefix cache gave."""
    found = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]  # a sample: name{labels} value, or name value
        if name in ("yunque_prompt_tokens_total", "yunque_prompt_tokens_cached_total"):
            found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[-1])
    return found.get("yunque_prompt_tokens_total", 0.0), found.get("yunque_prompt_tokens_cached_total", 0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir: Path, port: int) -> subprocess.Popen:
    """`yunque serve` with the model preloaded as "bench"."""
    return ready(subprocess.Popen([sys.executable, "-m", "yunque", "serve", f"bench={model_dir}", "--port", str(port),
                                   "--preload", "--max-running", "64"], stderr=subprocess.DEVNULL), port)


def start_llama_cpp(gguf: Path, port: int, threads: int) -> subprocess.Popen:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python) on a GGUF file, its model named "bench". It serves
    one request at a time; by default a new request interrupts the one streaming (--interrupt_requests), which
    would cut the other clients' replies short: off, they queue."""
    return ready(subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias",
                                   "bench", "--port", str(port), "--n_ctx", "1024", "--n_threads", str(threads),
                                   "--verbose", "False", "--interrupt_requests", "False"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port)


def ready(proc: subprocess.Popen, port: int) -> subprocess.Popen:
    """proc once it answers GET /v1/models on port (within 180 s)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"the server on port {port} did not start within 180 s (exit code {proc.poll()})")


def llama_cpp_missing() -> str | None:
    """Why llama.cpp's server cannot run here, or None when it can."""
    try:
        import llama_cpp.server.app  # noqa: F401 - the [server] extra: fastapi, uvicorn, sse-starlette
    except ImportError as e:
        return f"llama-cpp-python[server] does not import ({e}); pip install 'llama-cpp-python[server]'"
    return None


WARM_UP = 500
"""Request index of the warm-up prompts (`prompt_key`): other prompts than the timed ones, which are numbered below."""


def prompt_key(client: int, request: int) -> int:
    return 1000 * client + request


def first_request(run: int, args) -> int:
    """The number of the first request of timed level `run` (yunque's levels round after round, then llama.cpp's):
    each run's prompts are its own (`prompt_key`)."""
    return run * args.requests


def timed_requests(args) -> int:
    """Timed requests a client sends in all: yunque's --repeats rounds of the levels, then llama.cpp's one."""
    return first_request((args.repeats + 1) * len(args.levels), args)


def prompt_ids(client: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(client)
    return torch.randint(0, min(vocab, 50000), (n,), generator=g).tolist()


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) process `pid` has used so far, from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_ticks() -> tuple[int, int, int] | None:
    """(idle, stolen, all) clock ticks of the machine's CPUs so far, from /proc/stat; None where there is none."""
    try:
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return ticks[3] + ticks[4], ticks[7] if len(ticks) > 7 else 0, sum(ticks)  # idle (and I/O wait), steal


def waiting_seconds(pid: int) -> float | None:
    """Seconds the threads of process `pid` have spent ready to run but waiting for a core, summed over its threads
    (the second field of /proc/<pid>/task/<tid>/schedstat); None where that cannot be read."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                pass  # a thread that ended meanwhile
    except OSError:
        return None
    return total / 1e9


def cpu_snapshot(server: int | None) -> tuple:
    """This process's CPU time, the server's and its threads' time waiting for a core (None without its id or
    /proc), and the machine's idle and stolen ticks, now."""
    return (time.process_time(), cpu_seconds(server) if server else None, idle_ticks(),
            waiting_seconds(server) if server else None)


def cpu_use(before: tuple, after: tuple, wall: float) -> dict:
    """Cores used by this process (the clients) and the server, the server's threads' waiting for a core (in cores),
    and the machine's idle and stolen shares, between two cpu_snapshot()s `wall` seconds apart."""
    (mine0, theirs0, idle0, wait0), (mine1, theirs1, idle1, wait1) = before, after
    ticks = [b - a for a, b in zip(idle0, idle1)] if idle0 and idle1 else None
    return {"client_cores": (mine1 - mine0) / wall,
            "server_cores": (theirs1 - theirs0) / wall if theirs0 is not None and theirs1 is not None else None,
            "server_waiting": (wait1 - wait0) / wall if wait0 is not None and wait1 is not None else None,
            "idle": ticks[0] / ticks[2] if ticks and ticks[2] else None,
            "stolen": ticks[1] / ticks[2] if ticks and ticks[2] else None}


async def level(url: str, clients: int, args, texts: dict[int, str], usage: bool = True, first: int = 0,
                server: int | None = None) -> dict:
    """One level of `clients` concurrent streaming clients. texts: the prompt of each (client, request) key
    (`prompt_key`), requests numbered from `first`. usage: the server reports usage in its stream (else tokens are
    counted as streamed chunks). server: the server's process id, for the CPU it uses (Linux)."""
    ttft, gaps, tokens = [], [], 0

    async def one_client(c: openai.AsyncOpenAI, i: int) -> None:
        nonlocal tokens
        for r in range(args.requests):
            start = time.perf_counter()
            last = None
            extra = {"stream_options": {"include_usage": True}} if usage else {}
            stream = await c.completions.create(model="bench", prompt=texts[prompt_key(i, first + r)],
                                                max_tokens=args.new, temperature=1.0, seed=i, stream=True, **extra)
            async for chunk in stream:
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].text:
                    if not usage:
                        tokens += 1
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - start)
                    else:
                        gaps.append(now - last)
                    last = now

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600,
                                  http_client=http_client(args.http)) as c:
        t0, before = time.perf_counter(), cpu_snapshot(server)
        await asyncio.gather(*(one_client(c, i) for i in range(clients)))
        wall = time.perf_counter() - t0
        cpu = cpu_use(before, cpu_snapshot(server), wall)

    def q(values, p):
        return statistics.quantiles(values, n=100)[p - 1] if len(values) > 1 else (values[0] if values else 0.0)

    return {"clients": clients, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_p50": q(ttft, 50), "ttft_p99": q(ttft, 99), "itl_p50": q(gaps, 50), "itl_p99": q(gaps, 99),
            **cpu}


def aiohttp_missing() -> str | None:
    """Why the SDK's aiohttp transport cannot run here, or None."""
    try:
        openai.DefaultAioHttpClient()
    except (RuntimeError, ImportError, AttributeError) as e:
        return f"{e} (pip install 'openai[aiohttp]')"
    return None


def http_client(transport: str):
    """The clients' HTTP client: the `openai` SDK's aiohttp transport (`openai.DefaultAioHttpClient`) or httpx.
    Kept-alive connections are let go after 1 s idle, before a server's own timeout (uvicorn's is 5 s) could close
    one just as it is picked for a request (a client-side race, not the server's doing); httpx keeps none."""
    if transport == "aiohttp":
        return openai.DefaultAioHttpClient(limits=httpx.Limits(max_connections=100, keepalive_expiry=1.0))
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=100, max_keepalive_connections=0))


def cpu_line(r: dict) -> str:
    """Where a level's CPU went: the server, this process's clients (per generated token too), the machine idle, the
    server's threads waiting for a core and what the hypervisor took."""
    per_token = 1000 / r["tokens_per_s"]  # ms of wall time a token
    parts = [] if r["server_cores"] is None else [
        f"server {r['server_cores']:.2f} cores ({r['server_cores'] * per_token:.2f} ms a token)"]
    parts.append(f"the clients {r['client_cores']:.2f} ({r['client_cores'] * per_token:.2f} ms)")
    if r["idle"] is not None:
        parts.append(f"the machine idle {r['idle']:.0%}")
    if r.get("server_waiting") is not None:
        parts.append(f"the server's threads waiting for a core {r['server_waiting']:.2f}")
    if r.get("stolen"):
        parts.append(f"stolen by the hypervisor {r['stolen']:.0%}")
    return "CPU: " + ", ".join(parts)


def lower_median(items: list[dict], key) -> dict:
    """The item of median `key` (the lower middle one of an even number)."""
    return sorted(items, key=key)[(len(items) - 1) // 2]


def median_run(runs: list[dict]) -> dict:
    """The run of median aggregate tokens/s, with `runs`: how many."""
    return {**lower_median(runs, lambda r: r["tokens_per_s"]), "runs": len(runs)}


def warm_up(url: str, clients: int, args, texts: dict[int, str], usage: bool = True) -> None:
    """`clients` clients send one request each, with the warm-up prompts: untimed."""
    asyncio.run(level(url, clients, argparse.Namespace(**{**vars(args), "requests": 1}), texts, usage, WARM_UP))


def scheduler_alone(model_dir: Path, clients: int, args) -> float:
    """Aggregate generated tokens/s of `clients` threads each running --requests generations through a Scheduler
    in this process (no HTTP, no SSE): the batching's own figure, after the same warm-up as the server's."""
    import threading

    from yunque.config import SamplingParams, SchedulerConfig
    from yunque.engine.engine import Engine
    from yunque.engine.scheduler import Scheduler

    # made in a thread that ends: this process's threads must not keep OpenMP teams beside the scheduler's
    # (engine/scheduler.py)
    engine = in_passing_thread(lambda: Engine(*load_model(model_dir)))
    engine.stop_ids = set()
    scheduler = Scheduler(engine, SchedulerConfig(max_running=64))
    tokens = []

    def client(i: int, requests: range) -> None:
        for r in requests:
            events = scheduler.generate(prompt_ids(prompt_key(i, r), args.prompt, GPT2_30M.vocab_size),
                                        SamplingParams(max_new_tokens=args.new, temperature=1.0, seed=i))
            tokens.append(events[-1].completion_tokens)

    def run(requests: range) -> float:
        tokens.clear()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i, requests)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(tokens) / (time.perf_counter() - t0)

    try:
        run(range(WARM_UP, WARM_UP + 1))
        return run(range(args.requests))
    finally:
        scheduler.close()


class EngineBound:
    """What an engine running at this machine's limits, as measured now, would serve for these requests (prompts of
    `prompt` tokens on average, `new` generated). The limits are the pace of the engine's own product on the
    model's output head (its copy, dtype and kernel, both threads; best of 30 calls): 16 rows, bound by the dot
    products (FLOP/s), and one row, bound by reading the weight (bytes/s). Each round of requests (one a client,
    all at once) is prefilled together, then runs its new - 1 decode steps; every product takes the longer of its
    two bounds (its FLOPs at that rate, its weight read once at that bandwidth), and attention and everything else
    are free. The ratios between levels are then set by the machine's balance: one row reads every weight for 2
    FLOPs, 16 rows make 32 of each read."""

    def __init__(self, model_dir: Path, prompt: float, new: int) -> None:
        from yunque.engine.cpu import PackedLinear
        from yunque.engine.engine import Engine

        self.engine = in_passing_thread(lambda: Engine(*load_model(model_dir)))
        self.head, self.prompt, self.new = self.engine.model.lm_head, prompt, new
        self.head_macs = self.head.in_features * self.head.out_features  # multiply-adds a row
        self.block_macs = sum(m.in_features * m.out_features for m in self.engine.model.modules()
                              if isinstance(m, (torch.nn.Linear, PackedLinear)) and m is not self.head)

    def measure(self, levels: list[int]) -> dict:
        """The limits now, and the tokens/s at each of `levels` clients of an engine running at them."""
        from yunque.engine.native import helpers

        engine, size = self.engine, self.engine.dtype.itemsize  # bytes a weight

        def best(rows: int) -> float:
            x = torch.randn(rows, 1, engine.model.cfg.d_model, dtype=engine.dtype)
            times = []
            with torch.inference_mode(), helpers(rows <= engine.helper_rows):
                for _ in range(35):
                    t0 = time.perf_counter()
                    self.head(x)
                    times.append(time.perf_counter() - t0)
            return min(times[5:])  # the first few build and warm what the product uses

        flops, bandwidth = 2 * 16 * self.head_macs / best(16), self.head_macs * size / best(1)

        def product(macs: int, rows: float) -> float:
            return max(macs * size / bandwidth, 2 * rows * macs / flops)

        def tokens_per_s(n: int) -> float:
            prefill = product(self.block_macs, n * self.prompt) + product(self.head_macs, n)
            decode = product(self.block_macs, n) + product(self.head_macs, n)
            return n * self.new / (prefill + (self.new - 1) * decode)

        return {"flops": flops, "bandwidth": bandwidth, "tokens_per_s": {n: tokens_per_s(n) for n in levels}}


def bound_ratio(bound: dict, n: int, levels: list[int]) -> float:
    """An `EngineBound.measure` result's tokens/s at n clients over those at the first level."""
    return bound["tokens_per_s"][n] / bound["tokens_per_s"][levels[0]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=5,
                   help="rounds of yunque's levels, one level after another in each; a level's figures are its "
                        "median round's (default: 5; a shared machine's speed drifts from minute to minute)")
    p.add_argument("--json", help="also write the rows here, with the CPU, the clients' transport, every round's "
                                  "tokens/s and the prompt tokens the shared-prefix cache gave")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp's server")
    p.add_argument("--gguf-dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="tensor type of the GGUF export llama.cpp runs (default: f16)")
    p.add_argument("--http", choices=["aiohttp", "httpx"], default="aiohttp",
                   help="the clients' HTTP transport under the openai SDK (default: aiohttp, the SDK's choice for many "
                        "concurrent requests; httpx where aiohttp is not installed). The clients run on the server's "
                        "cores, and with aiohttp they take ~0.1 ms less CPU a streamed token")
    args = p.parse_args()
    if timed_requests(args) > WARM_UP:
        p.error(f"(--repeats + 1) x the number of --levels x --requests is at most {WARM_UP} (the prompts of a "
                f"client); ask for fewer")
    if args.http == "aiohttp" and (why := aiohttp_missing()):
        print(f"clients: httpx, not aiohttp: {why}")
        args.http = "httpx"
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"model: GPT-2 shape, ~30M parameters (random weights); prompt {args.prompt} tokens, {args.new} new, "
          f"{args.requests} requests per client, streaming completions; clients: the openai SDK over {args.http}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        in_passing_thread(make_model, model_dir)
        _, tok = in_passing_thread(load_model, model_dir)
        keys = [prompt_key(i, r) for i in range(max(args.levels)) for r in [*range(timed_requests(args)), WARM_UP]]
        texts = {k: tok.decode(prompt_ids(k, args.prompt, GPT2_30M.vocab_size)) for k in keys}
        prompt = statistics.mean(len(tok.encode(texts[prompt_key(i, r)], bos=tok.bos_id is not None))
                                 for i in range(max(args.levels)) for r in range(timed_requests(args)))
        limits = EngineBound(model_dir, prompt, args.new)
        port = free_port()
        server = start(model_dir, port)
        try:
            url = f"http://127.0.0.1:{port}"
            for n in args.levels:
                warm_up(url, n, args, texts)
            runs: dict[int, list[dict]] = {n: [] for n in args.levels}
            bounds: list[dict] = []  # the machine's limits after each round, with the server idle
            prompted, cached = prompt_tokens(url)
            for i in range(args.repeats):  # rounds of every level: the host's slow minutes fall on all of them
                for j, n in enumerate(args.levels):
                    first = first_request(i * len(args.levels) + j, args)
                    runs[n].append(asyncio.run(level(url, n, args, texts, first=first, server=server.pid)))
                bound = limits.measure(args.levels)
                bounds.append(bound)
                one = runs[args.levels[0]][-1]["tokens_per_s"]
                ratios = ", ".join(f"{runs[n][-1]['tokens_per_s'] / one:.2f}x" for n in args.levels[1:])
                ideal = ", ".join(f"{bound_ratio(bound, n, args.levels):.2f}x" for n in args.levels[1:])
                print(f"round {i + 1}: " + ", ".join(f"{n} clients {runs[n][-1]['tokens_per_s']:.1f}"
                                                     for n in args.levels) + " tok/s" +
                      (f" ({ratios}; an engine at the machine's limits {ideal}: {bound['flops'] / 1e9:.0f} GFLOP/s, "
                       f"{bound['bandwidth'] / 1e9:.1f} GB/s)" if ratios else ""), flush=True)
            after = prompt_tokens(url)
            prompted, cached = after[0] - prompted, after[1] - cached
            print(f"prompt tokens of the timed rounds: {prompted:.0f}, of which the shared-prefix cache gave "
                  f"{cached:.0f}", flush=True)
            rows = []
            for n in args.levels:
                rows.append(median_run(runs[n]))
                r = rows[-1]
                r["ratio"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
                alone = scheduler_alone(model_dir, n, args)
                r["scheduler_tokens_per_s"] = alone
                r["scheduler_ratio"] = alone / rows[0]["scheduler_tokens_per_s"]
                print(f"yunque    {n:3d} clients: {r['tokens_per_s']:7.1f} tok/s aggregate ({r['ratio']:.2f}x one "
                      f"client), TTFT p50 {r['ttft_p50'] * 1000:6.0f} ms p99 {r['ttft_p99'] * 1000:6.0f} ms, "
                      f"inter-token p50 {r['itl_p50'] * 1000:5.1f} ms p99 {r['itl_p99'] * 1000:6.1f} ms "
                      f"({r['tokens']} tokens in {r['seconds']:.1f} s; median of {r['runs']}); scheduler alone "
                      f"{alone:6.1f} tok/s "
                      f"({r['scheduler_ratio']:.2f}x)", flush=True)
                print(f"            {cpu_line(r)}", flush=True)
        finally:
            server.terminate()
            server.wait(30)
        bound = lower_median(bounds, lambda b: bound_ratio(b, args.levels[-1], args.levels))
        best = bound["tokens_per_s"]
        print(f"an engine at this machine's limits (its median round: products at {bound['flops'] / 1e9:.0f} GFLOP/s, "
              f"weights read at {bound['bandwidth'] / 1e9:.1f} GB/s; prompts of {limits.prompt:.1f} tokens prefilled "
              f"together; attention, HTTP and clients free): " +
              ", ".join(f"{n} clients {best[n]:,.0f} tok/s ({bound_ratio(bound, n, args.levels):.2f}x)"
                        for n in args.levels), flush=True)
        llama = llama_cpp_rows(model_dir, Path(tmp), args, texts)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(f"targets: {TARGETS}")
    by = {r["clients"]: r for r in rows}
    if 16 in by:
        print(f"  16 clients: {by[16]['ratio']:.2f}x one client ({'met' if by[16]['ratio'] >= 6 else 'NOT met'}); "
              f"TTFT p99 {by[16]['ttft_p99']:.2f} s ({'met' if by[16]['ttft_p99'] < 1 else 'NOT met'})")
    if llama:
        print("side by side (aggregate tokens/s; TTFT p99):")
        for r, q in zip(rows, llama):
            print(f"  {r['clients']:3d} clients: yunque {r['tokens_per_s']:7.1f} ({r['ttft_p99']:.2f} s), llama.cpp "
                  f"{q['tokens_per_s']:7.1f} ({q['ttft_p99']:.2f} s): yunque/llama.cpp "
                  f"{r['tokens_per_s'] / q['tokens_per_s']:.2f}x")
        if 16 in by:
            ratio = by[16]["tokens_per_s"] / next(q for q in llama if q["clients"] == 16)["tokens_per_s"]
            print(f"  16 clients: {ratio:.2f}x llama.cpp's server (target >= 1.5x: "
                  f"{'met' if ratio >= 1.5 else 'NOT met'})")
    if args.json:
        rounds = {n: [r["tokens_per_s"] for r in runs[n]] for n in args.levels}  # every round's, in order
        Path(args.json).write_text(json.dumps({"cpu": cpu_description(), "http": args.http, "repeats": args.repeats,
                                              "prompt_tokens": prompted, "prompt_tokens_cached": cached,
                                              "engine_bound": bound, "engine_bound_rounds": bounds,
                                              "yunque": rows, "yunque_rounds": rounds, "llama_cpp": llama}, indent=2))


def llama_cpp_rows(model_dir: Path, tmp: Path, args, texts: dict[int, str]) -> list[dict]:
    """The same levels against llama.cpp's server on the model exported to GGUF; [] (with the reason printed) where
    it cannot run."""
    why = "--no-llama-cpp" if args.no_llama_cpp else llama_cpp_missing()
    if why:
        print(f"llama.cpp's server: skipped: {why}")
        return []
    gguf = tmp / "model.gguf"
    subprocess.run([sys.executable, "-m", "yunque", "export", str(model_dir), "--format", "gguf", str(gguf),
                    "--dtype", args.gguf_dtype], check=True, stdout=subprocess.DEVNULL)
    threads = torch.get_num_threads()
    print(f"llama.cpp's server (llama-cpp-python {version('llama-cpp-python')}), GGUF {args.gguf_dtype}, "
          f"{threads} threads:", flush=True)
    port = free_port()
    server = start_llama_cpp(gguf, port, threads)
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        for j, n in enumerate(args.levels):
            warm_up(url, n, args, texts, usage=False)
            first = first_request(args.repeats * len(args.levels) + j, args)
            rows.append(asyncio.run(level(url, n, args, texts, usage=False, first=first, server=server.pid)))
            r = rows[-1]
            r["ratio"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
            print(f"llama.cpp {n:3d} clients: {r['tokens_per_s']:7.1f} tok/s aggregate ({r['ratio']:.2f}x one "
                  f"client), TTFT p50 {r['ttft_p50'] * 1000:6.0f} ms p99 {r['ttft_p99'] * 1000:6.0f} ms, "
                  f"inter-token p50 {r['itl_p50'] * 1000:5.1f} ms p99 {r['itl_p99'] * 1000:6.1f} ms "
                  f"({r['tokens']} tokens in {r['seconds']:.1f} s)", flush=True)
            print(f"            {cpu_line(r)}", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    return rows


if __name__ == "__main__":
    main()
