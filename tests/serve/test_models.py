"""Several models behind one app, in process: loading on first request, LRU unloading over the memory budget, 503
while a model loads, 429 when the queue is full, loaded models kept out of the cyclic collector's scans."""

import asyncio
import gc
import threading
import time
import weakref

import pytest

httpx = pytest.importorskip("httpx")

from yunque.config import SchedulerConfig, ServeConfig
from yunque.serve.app import create_app
from yunque.serve.models import ModelSpec, Registry, load_spec, weights_bytes


def ask(app, model: str, **extra):
    """POST one short completion to `app` in process; returns the response."""
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3,
                                                         "temperature": 0, **extra})
    return asyncio.run(main())


def test_models_load_on_first_request_and_lru_unloads_over_the_budget(base, tmp_path):
    size = weights_bytes(base)
    budget = 1.5 * size / 2**30  # room for one model, not two
    specs = [ModelSpec("a", base), ModelSpec("b", base), ModelSpec("c", base)]
    registry = Registry(specs, ServeConfig(max_memory=budget))
    app = create_app(registry, feedback_dir=tmp_path)
    try:
        assert registry.loaded == {}
        assert ask(app, "a").status_code == 200 and list(registry.loaded) == ["a"]
        assert ask(app, "b").status_code == 200 and list(registry.loaded) == ["b"]  # a made room
        assert ask(app, "a").status_code == 200 and list(registry.loaded) == ["a"]
        assert registry.unloads == 2
        r = ask(app, "a")
        assert r.json()["choices"][0]["text"] == ask(app, "a").json()["choices"][0]["text"]
    finally:
        registry.close()


@pytest.fixture(autouse=True)
def thawed():
    """Objects that a test's registry froze (serve/models.py's `settle`) are the collector's again after it, for
    the tests that run later in this process."""
    yield
    gc.unfreeze()


def test_a_loaded_model_is_frozen_out_of_collections_and_freed_when_unloaded(base, tmp_path):
    registry = Registry([ModelSpec("a", base)], ServeConfig())
    app = create_app(registry, feedback_dir=tmp_path)
    try:
        assert ask(app, "a").status_code == 200
        engine = registry.loaded["a"].engine
        assert not any(o is engine for o in gc.get_objects())  # in the permanent generation
        engine.itself = engine  # a reference cycle, which only the collector frees: it does once the model goes
        gone = weakref.ref(engine)
        del engine
        registry.unload("a")
        assert gone() is None
    finally:
        registry.close()


def test_a_model_larger_than_the_budget_is_refused(base, tmp_path):
    registry = Registry([ModelSpec("a", base)], ServeConfig(max_memory=1e-6))
    try:
        r = ask(create_app(registry, feedback_dir=tmp_path), "a")
        assert r.status_code == 503 and "--max-memory" in r.json()["error"]["message"]
    finally:
        registry.close()


def test_503_while_loading(base, tmp_path):
    gate = threading.Event()
    cfg = ServeConfig()

    def slow(spec):
        gate.wait(30)
        return load_spec(spec, cfg, SchedulerConfig())

    registry = Registry([ModelSpec("a", base)], cfg, loader=slow, load_wait=0.2)
    app = create_app(registry, feedback_dir=tmp_path)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {"model": "a", "prompt": "hi", "max_tokens": 2}
            first = await c.post("/v1/completions", json=body)
            loading = registry.loading["a"]
            health = (await c.get("/health")).json()
            gate.set()
            # the load's own error if it fails, and a failure, not a hang, if it never ends
            await asyncio.wait_for(loading, 120)
            return first, health, await c.post("/v1/completions", json=body)

    try:
        first, health, later = asyncio.run(main())
        assert first.status_code == 503 and first.json()["error"]["code"] == "model_loading"
        assert first.headers["retry-after"] == "1" and health["models"] == {"a": "loading"}
        assert later.status_code == 200
    finally:
        gate.set()
        registry.close()


def test_429_when_the_queue_is_full(base, tmp_path):
    registry = Registry([ModelSpec("a", base)], ServeConfig(), SchedulerConfig(max_queue=1))
    app = create_app(registry, feedback_dir=tmp_path)
    inside, gate = threading.Event(), threading.Event()

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = {"model": "a", "prompt": "hi", "max_tokens": 2}
            m = await registry.get("a")
            m.scheduler.call(lambda: (inside.set(), gate.wait(60)))  # the worker is busy: requests wait in the queue
            # inside the call before the first request comes, or the round that runs the call would admit it too
            assert await asyncio.to_thread(inside.wait, 30)
            waiting = asyncio.create_task(c.post("/v1/completions", json=body))
            deadline = time.monotonic() + 30
            while m.scheduler.waiting < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert m.scheduler.waiting == 1, "the first request did not queue behind the busy worker"
            refused = await c.post("/v1/completions", json=body)
            gate.set()
            return refused, await waiting

    try:
        refused, served = asyncio.run(main())
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert served.status_code == 200
    finally:
        gate.set()
        registry.close()


def test_feedback_endpoint_writes_records_yunque_reads(base, tmp_path):
    from yunque.feedback import Preference, Rating, read_feedback

    registry = Registry([ModelSpec("a", base)])
    app = create_app(registry, feedback_dir=tmp_path)
    messages = [{"role": "user", "content": "What is 2+2?"}]

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            ok1 = await c.post("/feedback", json={"kind": "rating", "model": "a", "messages": messages,
                                                  "reply": "5", "rating": -1})
            ok2 = await c.post("/feedback", json={"kind": "preference", "model": "a", "messages": messages,
                                                  "chosen": "4", "rejected": "5"})
            bad = await c.post("/feedback", json={"kind": "preference", "model": "a", "messages": messages,
                                                  "chosen": "4", "rejected": "4"})
            return ok1, ok2, bad

    ok1, ok2, bad = asyncio.run(main())
    assert ok1.status_code == ok2.status_code == 200
    assert bad.status_code == 400 and "same reply" in bad.json()["error"]["message"]
    records = read_feedback([tmp_path])
    assert records[0] == Rating("a", tuple(messages), "5", -1, "page", records[0].time)
    assert records[1] == Preference("a", tuple(messages), "4", "5", "page", records[1].time)
    registry.close()


def test_duplicate_names_are_refused(base):
    with pytest.raises(ValueError, match="two models are named 'a'"):
        Registry([ModelSpec("a", base), ModelSpec("a", base)])


def test_cli_model_specs(base, tmp_path):
    from yunque.cli.serve import model_specs

    specs = model_specs([f"chat={base}", str(base)])
    assert [s.name for s in specs] == ["chat", base.name] and specs[0].path == base
    gguf = tmp_path / "Small-1B.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert [s.name for s in model_specs([str(gguf), f"g={gguf}"])] == ["Small-1B.Q4_1", "g"]
    with pytest.raises(ValueError, match="no model dir or catalogue model named nowhere"):
        model_specs(["nowhere"], str(tmp_path))


def test_a_non_streaming_client_that_hangs_up_cancels_its_sequences(base, tmp_path):
    registry = Registry([ModelSpec("a", base)])
    app = create_app(registry, feedback_dir=tmp_path)
    gate = threading.Event()
    body = b'{"model": "a", "prompt": "hi", "max_tokens": 20, "n": 3}'

    async def main():
        m = await registry.get("a")
        m.scheduler.call(lambda: gate.wait(30))  # the sequences wait in the queue while the client hangs up
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent = []

        async def receive():  # the body, then the client is gone
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json"),
                                              (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await app(scope, receive, send)
        gate.set()
        await asyncio.wrap_future(m.scheduler.call(lambda: None))
        return m, sent

    try:
        m, sent = asyncio.run(main())
        assert sent[0]["status"] == 499
        assert m.scheduler.stats.finished == {"cancelled": 3} and m.scheduler.running == 0
    finally:
        gate.set()
        registry.close()


def test_a_gguf_file_is_served_and_answers(smollm2_gguf, tmp_path):
    """The real SmolLM2 GGUF behind `yunque serve NAME=FILE.gguf`, asked through the openai SDK: its own chat
    template and stop ids come from the file."""
    openai = pytest.importorskip("openai")
    from tests.serve.conftest import KEY, start_server, stop_server

    server = start_server(smollm2_gguf, tmp_path, "--preload", name="smol")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["smol"]
        r = client.chat.completions.create(model="smol", temperature=0, max_tokens=20,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    finally:
        stop_server(server)


def make_adapter(base, out, *, record=True):
    """A LoRA adapter dir over `base` whose B is random (trained-looking), and the merged model beside it."""
    import torch

    from yunque.config import LoraConfig
    from yunque.model.lora import LoRALinear, attach_lora, merge_lora, save_adapter
    from yunque.modeldir import load_model, save_model

    model, tok = load_model(base)
    lora = LoraConfig(rank=4, alpha=8)
    attach_lora(model, lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.3)
    save_adapter(out / "adapter", model, lora, base_model=str(base.resolve()) if record else None)
    save_model(out / "merged", merge_lora(model), tok)
    return out / "adapter", out / "merged"


def test_an_adapter_is_served_as_its_own_model_over_one_copy_of_its_base(base, tmp_path):
    adapter, merged = make_adapter(base, tmp_path)
    registry = Registry([ModelSpec("base", base), ModelSpec("tuned", adapter), ModelSpec("merged", merged)])
    app = create_app(registry, feedback_dir=tmp_path)
    try:
        assert registry.specs["tuned"].base == "base"
        prompt = dict(prompt="def parse(", max_tokens=12)
        tuned, plain, folded = (ask(app, name, **prompt).json()["choices"][0]["text"]
                                for name in ("tuned", "base", "merged"))
        assert tuned != plain and tuned == folded  # the adapter answers as `yunque merge` would, not as the base
        base_model, tuned_model = registry.loaded["base"], registry.loaded["tuned"]
        shared = {p.data_ptr() for p in base_model.engine.model.parameters()}
        assert all(p.data_ptr() in shared for p in tuned_model.engine.model.parameters())
        assert tuned_model.bytes < base_model.bytes / 4  # its own tensors only
        registry.unload("base")  # the adapter goes with its base
        assert set(registry.loaded) == {"merged"}
        assert ask(app, "tuned", **prompt).json()["choices"][0]["text"] == tuned  # and comes back with it
    finally:
        registry.close()


def test_an_adapter_whose_base_is_not_served_is_refused(base, tmp_path):
    adapter, merged = make_adapter(base, tmp_path)
    with pytest.raises(ValueError, match="which is not served; serve the base too"):
        Registry([ModelSpec("other", merged), ModelSpec("tuned", adapter)])
    unrecorded, _ = make_adapter(base, tmp_path / "u", record=False)  # no base recorded: the only model served
    assert Registry([ModelSpec("b", base), ModelSpec("t", unrecorded)]).specs["t"].base == "b"


@pytest.mark.parametrize("quantize, group_size", [("int8", 32), ("int4", 32)])
def test_serve_quantize_decodes_with_quantized_layers_and_counts_their_bytes(base, quantize, group_size):
    from yunque.engine.cpu import Int4PackedLinear, Int8PackedLinear
    from yunque.model.quant import QuantLinear

    plain = load_spec(ModelSpec("a", base), ServeConfig(), SchedulerConfig())
    loaded = load_spec(ModelSpec("a", base), ServeConfig(quantize=quantize, group_size=group_size), SchedulerConfig())
    try:
        kinds = {type(m) for m in loaded.engine.model.modules()}
        kernels = kinds & {Int8PackedLinear, Int4PackedLinear}
        assert QuantLinear not in kinds and (kernels or quantize == "int4")  # int4 is dequantized without bf16
        assert (loaded.bytes < plain.bytes) == bool(kernels)
    finally:
        plain.scheduler.close()
        loaded.scheduler.close()


def test_a_model_loads_in_a_thread_that_ends_so_its_openmp_team_ends_too(base, tmp_path):
    """A thread that ran torch's parallel operations keeps its OpenMP team while it lives, and two live teams on
    two cores slow the scheduler's products (engine/scheduler.py): loading must not happen in one that lives on."""
    cfg, where = ServeConfig(), []

    def loader(spec):
        where.append(threading.current_thread())
        return load_spec(spec, cfg, SchedulerConfig())

    registry = Registry([ModelSpec("a", base)], cfg, loader=loader)
    app = create_app(registry, feedback_dir=tmp_path)

    async def main():  # asserted while the event loop (and asyncio's pool of threads) still runs
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 2})
        where[0].join(5)
        return r, where[0].is_alive()

    try:
        r, alive = asyncio.run(main())
        assert r.status_code == 200 and len(where) == 1 and where[0] is not threading.main_thread()
        assert not alive
    finally:
        registry.close()


def test_engine_bytes_counts_packed_and_plain_weights_and_a_tied_heads_plain_one_once():
    import torch

    from yunque.config import preset
    from yunque.engine.cpu import PackedLinear, decode_model
    from yunque.engine.engine import Engine
    from yunque.engine.native import native_kernels
    from yunque.model.gpt import GPT
    from yunque.serve.models import engine_bytes
    from yunque.tokenizer import byte_tokenizer

    if native_kernels() is None or not PackedLinear.supported(torch.device("cpu"), torch.float32):
        pytest.skip("no C++ kernels or no oneDNN here: PackedLinear keeps no plain weight")
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=256)).eval()  # tied
    engine = Engine(model, byte_tokenizer(), precision="fp32")
    engine.model = decode_model(model, torch.float32, torch.device("cpu"), pack=True)
    layers = [m for m in engine.model.modules() if isinstance(m, PackedLinear)]
    head = engine.model.lm_head
    assert head in layers and head.plain.data_ptr() == engine.model.tok_emb.weight.data_ptr()
    own = sum(t.numel() * t.element_size() for t in [*engine.model.parameters(), *engine.model.buffers()])
    packed = sum(m.in_features * m.out_features * 4 for m in layers)
    assert engine_bytes(engine) == own + packed + sum(m.plain.numel() * 4 for m in layers if m is not head)


def test_engine_bytes_counts_the_weights_laid_out_for_the_bf16_kernel():
    import torch

    from yunque.config import preset
    from yunque.engine.cpu import PackedLinear, decode_model
    from yunque.engine.engine import Engine
    from yunque.engine.native import native_kernels
    from yunque.model.gpt import GPT
    from yunque.serve.models import engine_bytes
    from yunque.tokenizer import byte_tokenizer

    if native_kernels() is None or not native_kernels().has_pairs():
        pytest.skip("no AVX-512 BF16 here: no bf16 layer keeps weights for the pairs kernel")
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=256)).eval()  # tied: the head's pairs are a copy all the same
    engine = Engine(model, byte_tokenizer(), precision="bf16")
    engine.model = decode_model(model, torch.bfloat16, torch.device("cpu"), pack=True)
    layers = [m for m in engine.model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.plain is None and m.pairs is not None for m in layers)
    own = sum(t.numel() * t.element_size() for t in [*engine.model.parameters(), *engine.model.buffers()])
    packed = sum(m.in_features * m.out_features * 2 for m in layers)
    assert engine_bytes(engine) == own + packed + sum(m.pairs.numel() * 2 for m in layers)
