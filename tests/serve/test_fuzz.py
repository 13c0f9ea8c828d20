"""Robustness: requests generated from the server's own OpenAPI schema (valid and invalid, by schemathesis) never
get a 5xx; 64 streaming clients that disconnect at random leave no sequence running and the memory flat."""

import asyncio
import random
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from tests.serve.conftest import KEY, MODEL

FUZZ_EXAMPLES = 12
"""Examples per operation and mode: ~170 requests in all, well under a minute on the tiny model."""


def test_no_5xx_for_anything_a_client_sends(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
    failures = []
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                served = random.Random(str(case.body)).random() < 0.7
                if isinstance(case.body, dict) and "model" in case.body and served:
                    case.body["model"] = MODEL  # mostly the served model, so that requests get past the 404
                r = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
                if r.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {str(case.body)[:300]} -> {r.status_code} "
                                    f"{r.text[:300]}")
                elif r.status_code >= 400:
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text

            try:
                check()
            except Unsatisfiable:  # no invalid request exists for an operation without inputs (GET /health)
                assert mode is GenerationMode.NEGATIVE
    assert not failures, "\n".join(failures[:5])


def test_64_clients_disconnecting_at_random_leave_nothing_behind(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
            "max_tokens": 200, "temperature": 1.0}

    async def client(c: httpx.AsyncClient, rng: random.Random) -> None:
        keep = rng.randint(0, 6)  # chunks read before hanging up (0: right after the headers)
        async with c.stream("POST", "/v1/chat/completions", json={**body, "seed": rng.randint(0, 10**6)}) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data: ")
                if n >= keep:
                    break  # leaving the block closes the connection mid-stream

    async def round(seed: int) -> None:
        rng = random.Random(seed)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)  # a hang-up closes the socket
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     limits=limits, timeout=60) as c:
            await asyncio.gather(*(client(c, random.Random(rng.random())) for _ in range(64)))

    def settled() -> bool:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if server.metric("running_sequences", model=MODEL) == 0 and server.metric("queue_depth", model=MODEL) == 0:
                return True
            time.sleep(0.1)
        return False

    asyncio.run(round(0))  # warm up: the allocator's pools, the batch sizes
    assert settled()
    before = server.rss()
    cancelled = server.metric("finished_total", model=MODEL, reason="cancelled")
    for seed in (1, 2, 3):
        asyncio.run(round(seed))
    assert settled(), "sequences were left running after their clients went away"
    assert server.metric("finished_total", model=MODEL, reason="cancelled") > cancelled + 64  # cut, not run out
    after = server.rss()
    assert abs(after - before) / before < 0.10, f"RSS {before / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB"

