"""The server end to end, driven by the official `openai` SDK against a real `yunque serve` on loopback."""

import asyncio
import base64
import struct

import pytest

openai = pytest.importorskip("openai")
import torch

from tests.serve.conftest import KEY, MODEL
from yunque.modeldir import load_model

GREEDY = dict(temperature=0)


def chat(client, content="Tell me about json.", **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          **{"max_tokens": 24, **kwargs})


def stream_chat(client, content="Tell me about json.", **kwargs):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                 stream=True, **{"max_tokens": 24, **kwargs}))
    return chunks


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_stream_equals_non_stream(client):
    for seed in (1, 2, 3):
        whole = chat(client, temperature=1.0, seed=seed)
        chunks = stream_chat(client, temperature=1.0, seed=seed, stream_options={"include_usage": True})
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[0].choices[0].delta.role == "assistant"
        usage = chunks[-1].usage  # include_usage: a last chunk with no choices and the usage
        assert chunks[-1].choices == [] and usage == whole.usage
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.prompt_tokens > 5
    assert any(chat(client, temperature=1.0, seed=s).choices[0].message.content for s in (1, 2, 3))


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = stream_chat(client, temperature=1.0, seed=1)
    assert all(c.choices and c.usage is None for c in chunks)


def test_seeds_reproduce_and_differ(client):
    a, b = (chat(client, temperature=1.0, seed=7, max_tokens=30).choices[0].message.content for _ in range(2))
    others = {chat(client, temperature=1.0, seed=s, max_tokens=30).choices[0].message.content for s in (8, 9, 10)}
    assert a == b
    assert len(others | {a}) > 1


def test_n_choices_are_the_seeds_in_turn(client):
    r = chat(client, temperature=1.0, seed=20, n=3, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1, 2]
    singles = [chat(client, temperature=1.0, seed=20 + j, max_tokens=12) for j in range(3)]
    assert [c.message.content for c in r.choices] == [x.choices[0].message.content for x in singles]
    assert r.usage.completion_tokens == sum(x.usage.completion_tokens for x in singles)
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt counts once
    chunks = stream_chat(client, temperature=1.0, seed=20, n=3, max_tokens=12)
    for j in range(3):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == j)
        assert text == r.choices[j].message.content


def test_chat_logprobs(client):
    r = chat(client, temperature=1.0, seed=3, logprobs=True, top_logprobs=3, max_tokens=10)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert r.choices[0].message.content.startswith(b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace"))
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.logprob - 1e-5
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)


def test_completion_echo_logprobs_score_the_prompt(client, server):
    # lm-evaluation-harness's local-completions: token ids, echo, logprobs=1, max_tokens 0 (or 1)
    ids = list(b"def parse(text):")
    model, _ = load_model(server.model_dir)
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].log_softmax(-1)
    for max_tokens in (0, 1):
        r = client.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, echo=True, logprobs=1,
                                      temperature=0)
        lp = r.choices[0].logprobs
        assert len(lp.token_logprobs) == len(ids) + max_tokens and lp.token_logprobs[0] is None
        for t in range(1, len(ids)):
            assert lp.token_logprobs[t] == pytest.approx(want[t - 1, ids[t]].item(), abs=1e-4)
            greedy = want[t - 1].argmax().item() == ids[t]
            assert (lp.token_logprobs[t] == max(lp.top_logprobs[t].values())) == greedy
        assert r.choices[0].text.startswith("def parse(text):")
        assert lp.text_offset[:3] == [0, 1, 2]
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == max_tokens


def test_completion_of_strings_and_a_list(client):
    r = client.completions.create(model=MODEL, prompt=["hello", "import os"], max_tokens=5, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1]
    alone = client.completions.create(model=MODEL, prompt="import os", max_tokens=5, **GREEDY)
    assert r.choices[1].text == alone.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="import os", max_tokens=5, stream=True, **GREEDY) if c.choices)
    assert streamed == alone.choices[0].text


def test_stop_strings(client):
    free = client.completions.create(model=MODEL, prompt="The answer", max_tokens=30, temperature=1.0,
                                     seed=4).choices[0]
    text = free.text
    stop = text[5:7]
    assert len(stop) == 2
    cut = client.completions.create(model=MODEL, prompt="The answer", max_tokens=30, temperature=1.0, seed=4,
                                    stop=[stop, "never appears"]).choices[0]
    assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop"


def test_embeddings(client):
    texts = ["the cat sat", "import json", "x"]
    r = client.embeddings.create(model=MODEL, input=texts)
    vectors = torch.tensor([d.embedding for d in r.data])
    assert vectors.shape == (3, 64) and [d.index for d in r.data] == [0, 1, 2]
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-4)
    alone = client.embeddings.create(model=MODEL, input="import json").data[0].embedding
    assert alone == pytest.approx(r.data[1].embedding, abs=1e-5)
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=texts, encoding_format="base64").http_response
    packed = base64.b64decode(raw.json()["data"][1]["embedding"])
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == pytest.approx(r.data[1].embedding, abs=1e-6)
    ids = client.embeddings.create(model=MODEL, input=[list(b"import json")]).data[0].embedding
    assert ids == pytest.approx(alone, abs=1e-5)  # strings embed without BOS, so the same ids give the same vector
    assert r.usage.prompt_tokens == sum(len(t.encode()) for t in texts)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=MODEL, input="x", dimensions=16)


def test_wrong_key_is_401(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.code == "invalid_api_key"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found" and "GET /v1/models" in e.value.message


def test_too_long_prompt_is_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, content="word " * 200)
    assert e.value.code == "context_length_exceeded" and "128" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[65] * 128, max_tokens=1)
    assert e.value.code == "context_length_exceeded"


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=3.0), "temperature"),
    (dict(n=0), "n"),
    (dict(top_logprobs=3), "top_logprobs"),
    (dict(max_tokens=10_000), "max_tokens"),
    (dict(frequency_penalty=5), "frequency_penalty"),
])
def test_invalid_parameters_are_400_naming_them(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, **kwargs)
    assert param in str(e.value.message) or e.value.param == param


def test_suffix_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="a", suffix="b", max_tokens=2)


def test_errors_are_openai_shaped(server):
    import httpx

    r = server.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (5 << 20),
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = server.get("/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_concurrent_requests_equal_each_alone(server):
    # the server batches them together (continuous batching); each reply is what it is alone
    prompts = [f"question {i}: what does os.path.join do?"[: 10 + 3 * i] for i in range(8)]
    kinds = [dict(temperature=0), dict(temperature=0.9, seed=11)]

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
            async def one(p, kw):
                r = await c.completions.create(model=MODEL, prompt=p, max_tokens=24, **kw)
                return r.choices[0].text
            together = await asyncio.gather(*(one(p, kw) for kw in kinds for p in prompts))
            alone = [await one(p, kw) for kw in kinds for p in prompts]
            return together, alone

    together, alone = asyncio.run(main())
    assert together == alone


def test_metrics_and_health(server, client):
    chat(client, temperature=0)
    text = server.get("/metrics").text
    for name in ("requests_total", "generation_tokens_total", "queue_depth", "running_sequences",
                 "time_to_first_token_seconds", "http_requests_total"):
        assert f"# TYPE yunque_{name} " in text
    assert server.metric("requests_total", model=MODEL) > 0
    assert server.get("/health").json() == {"status": "ok", "models": {MODEL: "loaded"}}


def test_binds_loopback_by_default():
    from yunque.config import ServeConfig

    assert ServeConfig().host == "127.0.0.1"


def test_text_offsets_index_the_echoed_text(client):
    # the eval client finds a continuation by text_offset: offsets are characters of the choice's text, and the
    # BOS the server puts before a text prompt takes none
    text = "naïve café: 2 + 2"
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=4, echo=True, logprobs=1, temperature=0)
    c = r.choices[0]
    assert c.text.startswith(text)
    offsets = c.logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[0] == 0 and len(offsets) == r.usage.total_tokens
    assert c.text[offsets[-4]:] == c.text[len(text):]  # the generated tokens start where the prompt ends
    colon = text.index(":")
    assert colon in offsets  # a token starts at every ASCII character of a byte-level prompt


def test_the_mailbox_wakes_the_loop_once_a_round_and_delivers_every_event_in_order():
    """Events from a scheduler's worker reach the loop's queues at the end of each round, all of them and in order
    (each stream's tokens are those of the same prompt generated alone), with far fewer wake-ups of the loop than
    events; a put from another thread (not an attached worker) is delivered without waiting for a round."""
    from yunque.config import SamplingParams, preset
    from yunque.engine import Engine
    from yunque.engine.scheduler import Scheduler
    from yunque.model import GPT
    from yunque.serve.app import _Mailbox
    from yunque.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    engine = Engine(GPT(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128)), tok)
    engine.stop_ids = set()
    prompts = [tok.encode(t) for t in ("hi", "def f(x):", "a longer prompt", "z")]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    alone = [engine.generate([p], params)[0] for p in prompts]
    scheduler = Scheduler(engine)

    async def main():
        box = _Mailbox(asyncio.get_running_loop())
        wakes = []
        wake = box._wake
        box._wake = lambda: (wakes.append(1), wake())[1]
        box.attach(scheduler)
        queues = [asyncio.Queue() for _ in prompts]
        for p, q in zip(prompts, queues):
            scheduler.submit(p, params, lambda e, q=q: box.put(q, e))
        got = []
        for q in queues:
            events = [await q.get()]
            while not events[-1].finish_reason:
                events.append(await q.get())
            got.append(events)
        mine = asyncio.Queue()
        box.put(mine, "from the loop's thread")
        assert await asyncio.wait_for(mine.get(), 5) == "from the loop's thread"
        return got, len(wakes) - 1

    try:
        got, wakes = asyncio.run(main())
    finally:
        scheduler.close()
    assert [[t.id for e in events for t in e.tokens] for events in got] == alone
    assert wakes <= scheduler.stats.steps + len(prompts) and wakes < sum(map(len, got)) / 2
