"""The OpenAI-compatible HTTP API on FastAPI: /v1/models, /v1/chat/completions, /v1/completions (JSON and SSE),
/v1/embeddings; /health, /metrics; the chat page at / and the feedback it sends.

Generation has one code path: a request becomes a stream of chunks (`chat_chunks`, `completion_chunks`) built
from the scheduler's events; a streaming reply sends them as server-sent events, a non-streaming one folds them
into the whole response (`fold_chat`, `fold_completion`). Anything a client sends wrong is a 4xx with an OpenAI
error body naming the field and the fix; a 500 is a bug.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import hmac
import json
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from yunque import feedback
from yunque.config import SamplingParams
from yunque.engine.scheduler import Event, QueueFull, Sequence
from yunque.engine.scoring import embed, prompt_logprobs
from yunque.serve.models import Loaded, ModelLoading, ModelNotFound, Registry
from yunque.serve.protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    FeedbackRequest,
    ModelList,
)
from yunque.tokenizer.chat import check_messages

STATIC = Path(__file__).parent / "static"
POOLING = "mean"
"""Embeddings are the mean over the input's tokens of the final hidden states, L2-normalised."""


def create_app(registry: Registry, *, api_key: str | None = None, max_body: int | None = None,
               timeout: float | None = None, feedback_dir: Path | None = None) -> FastAPI:
    """The server for the models of `registry`. api_key: required as `Authorization: Bearer KEY` on /v1 and
    /feedback (None: open). feedback_dir: where the page's ratings go (default feedback.feedback_dir())."""
    max_body = max_body or registry.cfg.max_body
    timeout = timeout or registry.cfg.timeout
    feedback_dir = feedback_dir or feedback.feedback_dir()
    http_counts: dict[tuple[str, int], int] = {}
    boxes: list[_Mailbox] = []

    def mailbox() -> _Mailbox:
        """The app's one mailbox, on the loop serving it (a new one if a test runs the app on another loop)."""
        loop = asyncio.get_running_loop()
        if not boxes or boxes[0].loop is not loop:
            boxes[:] = [_Mailbox(loop)]
        return boxes[0]

    async def lifespan(app: FastAPI):
        if registry.cfg.preload:
            await registry.preload()
        yield
        registry.close()

    app = FastAPI(title="yunque", version="0.1.0", lifespan=lifespan,
                  responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}})
    app.add_middleware(_LimitBody, max_body=max_body, counts=http_counts)

    async def check_key(request: Request) -> None:  # async: FastAPI runs a plain def in its thread pool
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or incorrect API key; send `Authorization: Bearer KEY` with the key the "
                                "server was started with (--api-key or YUNQUE_API_KEY)", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        got = repr(err.get("input"))[:80]
        message = f"{err.get('msg', 'invalid value')}" + (f" (param {param}, got {got})" if param else "")
        return JSONResponse(APIError(400, message, param=param, code="invalid_value").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return JSONResponse(APIError(e.status_code, str(e.detail), code=kinds.get(e.status_code)).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):  # a 500 is the server's fault: say so in the same shape
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    async def model(name: str) -> Loaded:
        try:
            return await registry.get(name)
        except ModelNotFound as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from None
        except ModelLoading as e:
            raise APIError(503, str(e), type="server_error", code="model_loading") from None
        except (ValueError, OSError) as e:
            raise APIError(503, f"the model {name!r} could not be loaded: {e}", type="server_error",
                           code="model_load_failed") from None

    # -- the API ---------------------------------------------------------------------------------------------------

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(check_key)])
    async def list_models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "yunque",
             "created": int(spec.path.stat().st_mtime) if spec.path.exists() else 0}
            for name, spec in registry.specs.items()]}

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=[Depends(check_key)])
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        m = await model(req.model)
        if not m.format.is_chat:
            raise APIError(400, f"the model {req.model!r} has no chat format (no chat tokens, no chat template); "
                                f"use /v1/completions with it, or serve a chat model", param="model")
        messages = [{"role": "system" if x.role == "developer" else x.role, "content": x.text()}
                    for x in req.messages]
        try:
            check_messages(messages)
            prompt = m.format.prompt(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        _check_context(m, prompt, "messages")
        top = req.top_logprobs or 0
        if top and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        max_new = req.max_completion_tokens or req.max_tokens or registry.sched.max_tokens
        params = m.format.reply_params(_params(req, max_new, bool(req.logprobs), top))
        run = _Run(m, [prompt], params, req.n, timeout, mailbox())
        chunks = chat_chunks(run, req, _id("chatcmpl"))
        if req.stream:
            return _sse(chunks, bool(req.stream_options and req.stream_options.include_usage))
        return await _unless_disconnected(request, fold_chat(chunks))

    @app.post("/v1/completions", response_model=Completion, dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest, request: Request):
        m = await model(req.model)
        if req.suffix:
            raise APIError(400, "suffix (fill in the middle) is not supported by yunque's models; put all the text "
                                "in prompt", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, f"best_of {req.best_of} is not supported (only best_of == n); leave it out",
                           param="best_of")
        prompts = _completion_prompts(m, req.prompt)
        for p in prompts:
            _check_context(m, p, "prompt")
        top = req.logprobs or 0
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens 0 generates nothing; with echo=true it scores the prompt",
                           param="max_tokens")
        params = None
        if req.max_tokens:
            params = _params(req, req.max_tokens, req.logprobs is not None, top)
        run = _Run(m, prompts, params, req.n, timeout, mailbox())
        chunks = completion_chunks(run, req, _id("cmpl"), prompts)
        if req.stream:
            return _sse(chunks, bool(req.stream_options and req.stream_options.include_usage))
        return await _unless_disconnected(request, fold_completion(chunks))

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, dependencies=[Depends(check_key)])
    async def embeddings(req: EmbeddingRequest):
        m = await model(req.model)
        C = m.engine.model.cfg.d_model
        if req.dimensions is not None and req.dimensions != C:
            raise APIError(400, f"dimensions {req.dimensions} is not supported: this model's embeddings have {C} "
                                f"dimensions (no shortening); leave dimensions out", param="dimensions")
        inputs = _completion_prompts(m, req.input, bos=False, param="input")
        if len(inputs) > 2048:
            raise APIError(400, f"input holds {len(inputs)} items; send at most 2048 per request", param="input")
        for p in inputs:
            _check_context(m, p, "input")
        try:
            vectors = await asyncio.wrap_future(m.scheduler.call(lambda: embed(m.engine, inputs, POOLING)))
        except ValueError as e:
            raise APIError(400, str(e), param="input") from None
        data = []
        for i, v in enumerate(vectors):
            value = (base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
                     if req.encoding_format == "base64" else v.tolist())
            data.append({"object": "embedding", "embedding": value, "index": i})
        n = sum(len(p) for p in inputs)
        return {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}}

    # -- operations ------------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {name: registry.state(name) for name in registry.specs}}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(_prometheus(registry, http_counts), media_type="text/plain; version=0.0.4")

    # -- the chat page and its feedback ----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.post("/feedback", dependencies=[Depends(check_key)])
    async def post_feedback(req: FeedbackRequest):
        if req.model not in registry.specs:
            raise APIError(404, f"the model {req.model!r} does not exist here", param="model",
                           code="model_not_found")
        messages = [m.model_dump() for m in req.messages]
        try:
            if req.kind == "rating":
                if req.reply is None or req.rating is None:
                    raise ValueError("a rating needs 'reply' and 'rating' (1 or -1)")
                record = feedback.rate(req.model, messages, req.reply, req.rating, source="page")
            else:
                if req.chosen is None or req.rejected is None:
                    raise ValueError("a preference needs 'chosen' and 'rejected'")
                record = feedback.prefer(req.model, messages, req.chosen, req.rejected, source="page")
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        await asyncio.to_thread(feedback.append, record, feedback_dir)
        return {"status": "recorded", "kind": req.kind}

    return app


# -- running a request ---------------------------------------------------------------------------------------------

@dataclass
class _Run:
    """The sequences of one request: each prompt times n choices (choice index = prompt * n + j)."""

    model: Loaded
    prompts: list[list[int]]
    params: SamplingParams | None  # None: nothing to generate (max_tokens 0)
    n: int
    timeout: float | None
    mailbox: _Mailbox

    def __post_init__(self) -> None:
        """Submit every sequence now, so that a full queue or a bad value is an HTTP error, not a broken stream."""
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.seqs: list[Sequence] = []
        if self.params is None:
            return
        mailbox = self.mailbox

        def sink(i: int):
            return lambda e: mailbox.put(self.queue, (i, e))

        scheduler = self.model.scheduler
        mailbox.attach(scheduler)
        try:
            for i, prompt in enumerate(self.prompts):
                for j in range(self.n):
                    p = self.params
                    if p.seed is not None and j:
                        p = replace(p, seed=(p.seed + j) % 2**63)
                    self.seqs.append(scheduler.submit(prompt, p, sink(i * self.n + j), timeout=self.timeout))
        except QueueFull as e:
            self.cancel()
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from None
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e), param="max_tokens" if "max_tokens" in str(e) else None) from None
        except RuntimeError as e:  # the model was unloaded meanwhile
            self.cancel()
            raise APIError(503, f"{e}; retry", type="server_error") from None

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) as they come, until every sequence has finished; leaving early cancels the rest."""
        left = len(self.seqs)
        try:
            while left:
                i, e = await self.queue.get()
                if e.finish_reason == "error":
                    raise RuntimeError(f"generation failed: {e.error}")
                yield i, e
                left -= e.finish_reason is not None
        finally:
            self.cancel()

    def cancel(self) -> None:
        for s in self.seqs:
            if not s.finished:
                self.model.scheduler.cancel(s)


class _Mailbox:
    """Hands events from the schedulers' threads to the event loop's queues with one wake-up of the loop per round of
    a scheduler's loop (one decode step of every row), not one per event: each call_soon_threadsafe writes to the
    loop's wake-up pipe, and the loop woken on the other core took the worker's CPU at every one (8.5 wake-ups a
    step at 16 streaming clients, and 12% of the worker's samples in py-spy inside that write)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False
        # workers whose events wait for the end of their round, and their schedulers (weakly: models unload)
        self.held: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self.attached: weakref.WeakSet = weakref.WeakSet()

    def attach(self, scheduler) -> None:
        """(The loop's thread.) Events from `scheduler`'s worker are delivered at the end of each of its rounds."""
        if scheduler not in self.attached:
            self.attached.add(scheduler)
            scheduler.on_round_end(self.flush)
            self.held.add(scheduler.worker)

    def put(self, queue: asyncio.Queue, item) -> None:
        """(Any thread.) Put item into queue on the loop's thread, soon: at the end of the round on an attached
        scheduler's worker, else now."""
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled or threading.current_thread() in self.held:
                return
            self.scheduled = True
        self._wake()

    def flush(self) -> None:
        """(A worker's thread, at the end of its round.) Deliver what its round put."""
        with self.lock:
            if self.scheduled or not self.items:
                return
            self.scheduled = True
        self._wake()

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody listens
            pass

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


def _params(req, max_new: int, logprobs: bool, top: int) -> SamplingParams:
    top_k = req.top_k if req.top_k and req.top_k > 0 else None
    try:
        return SamplingParams(
            max_new_tokens=max_new, temperature=1.0 if req.temperature is None else req.temperature, top_k=top_k,
            top_p=req.top_p, seed=None if req.seed is None else req.seed % 2**63, stop=req.stop_strings(),
            logprobs=logprobs, top_logprobs=top, min_p=req.min_p, frequency_penalty=req.frequency_penalty or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _check_context(m: Loaded, prompt: list[int], param: str) -> None:
    n, ctx = len(prompt), m.max_seq_len
    if n >= ctx:
        raise APIError(400, f"this model's maximum context length is {ctx} tokens, but the {param} has {n} tokens "
                            f"(at least one more is generated); shorten the {param}", param=param,
                       code="context_length_exceeded")


def _completion_prompts(m: Loaded, prompt, *, bos: bool = True, param: str = "prompt") -> list[list[int]]:
    """Token ids of each prompt: a string, strings, token ids, or lists of them."""
    tok = m.engine.tokenizer
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not items:
        raise APIError(400, f"{param} is empty; send a string, a list of strings or token ids", param=param)
    out = []
    V = m.engine.model.cfg.vocab_size
    for item in items:
        ids = tok.encode(item, bos=bos and tok.bos_id is not None) if isinstance(item, str) else list(item)
        if not ids:
            if tok.bos_id is None:
                raise APIError(400, f"{param} holds an empty text; send at least one character", param=param)
            ids = [tok.bos_id]
        if max(ids) >= V:
            raise APIError(400, f"{param} holds token id {max(ids)} outside the model's vocabulary [0, {V})",
                           param=param)
        out.append(ids)
    return out


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _token_text(m: Loaded, token: int) -> tuple[str, list[int]]:
    b = m.engine.tokenizer.token_bytes(token)
    return b.decode("utf-8", errors="replace"), list(b)


# -- chat: chunks and their fold -----------------------------------------------------------------------------------

async def chat_chunks(run: _Run, req: ChatCompletionRequest, cid: str) -> AsyncIterator[dict[str, Any]]:
    """The chat.completion.chunk objects of a request, the usage chunk last (always: `_sse` drops it unless
    stream_options.include_usage asks for it)."""
    created, m = int(time.time()), run.model

    def chunk(choices: list[dict], usage: dict | None = None) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "system_fingerprint": None, "choices": choices, "usage": usage}

    for i in range(len(run.seqs)):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                      "logprobs": None}])
    completion = 0
    async for i, e in run.events():
        logprobs = None
        if run.params.logprobs:
            content = []
            for t in e.tokens:
                text, raw = _token_text(m, t.id)
                tops = []
                for tid, lp in t.top or ():
                    ttext, traw = _token_text(m, tid)
                    tops.append({"token": ttext, "logprob": lp, "bytes": traw})
                content.append({"token": text, "logprob": t.logprob, "bytes": raw, "top_logprobs": tops})
            logprobs = {"content": content}
        reason = _finish(e)
        if reason:
            completion += e.completion_tokens
        if e.text or reason or logprobs and logprobs["content"]:
            yield chunk([{"index": i, "delta": {"content": e.text} if e.text else {}, "finish_reason": reason,
                          "logprobs": logprobs}])
    prompt = len(run.prompts[0])
    yield chunk([], {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})


async def fold_chat(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The whole chat.completion that the chunks stream."""
    choices: dict[int, dict] = {}
    async for c in chunks:
        head = c
        for ch in c["choices"]:
            got = choices.setdefault(ch["index"], {"index": ch["index"], "message": {"role": "assistant",
                                                                                      "content": ""},
                                                   "finish_reason": None, "logprobs": None})
            got["message"]["content"] += ch["delta"].get("content") or ""
            if ch["logprobs"] is not None:
                got["logprobs"] = got["logprobs"] or {"content": []}
                got["logprobs"]["content"] += ch["logprobs"]["content"]
            got["finish_reason"] = ch["finish_reason"] or got["finish_reason"]
    return {"id": head["id"], "object": "chat.completion", "created": head["created"], "model": head["model"],
            "system_fingerprint": None, "choices": [choices[i] for i in sorted(choices)], "usage": head["usage"]}


# -- completions: chunks and their fold ----------------------------------------------------------------------------

async def completion_chunks(run: _Run, req: CompletionRequest, cid: str,
                            prompts: list[list[int]]) -> AsyncIterator[dict[str, Any]]:
    """The text_completion chunks of a request: the echoed prompt (scored when logprobs are asked for) first, then
    the generated text; the usage chunk last."""
    created, m, k = int(time.time()), run.model, req.logprobs
    # text_offset: characters of the choice's text before each token, decoded as the text is (a character split
    # across tokens counts at its end); a BOS the server put before a text prompt is not in the text: width 0
    offsets = [0] * (len(prompts) * run.n)
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in offsets]
    from_text = isinstance(req.prompt, str) or isinstance(req.prompt[0], str)
    bos = m.engine.tokenizer.bos_id

    def chunk(choices: list[dict], usage: dict | None = None) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                "system_fingerprint": None, "choices": choices, "usage": usage}

    def logprob_block(i: int, entries: list[tuple[int, float | None, tuple | None]],
                      echo: bool = False) -> dict[str, Any]:
        block = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for j, (token, lp, top) in enumerate(entries):
            text, raw = _token_text(m, token)
            block["tokens"].append(text)
            block["token_logprobs"].append(lp)
            block["top_logprobs"].append(None if lp is None else {_token_text(m, t)[0]: v for t, v in top or ()})
            block["text_offset"].append(offsets[i])
            if not (echo and j == 0 and from_text and token == bos):
                offsets[i] += len(decoders[i].decode(bytes(raw)))
        return block

    if req.echo:
        scored = None
        if k is not None:
            scored = [await asyncio.wrap_future(m.scheduler.call(lambda p=p: prompt_logprobs(m.engine, p, k)))
                      for p in prompts]
        for i in range(len(prompts) * run.n):
            p = prompts[i // run.n]
            text = req.prompt if isinstance(req.prompt, str) else (
                req.prompt[i // run.n] if isinstance(req.prompt[0], str) else m.engine.tokenizer.decode(p))
            block = None
            if scored is not None:
                block = logprob_block(i, [(t, lp, top) for t, (lp, top) in zip(p, scored[i // run.n])], echo=True)
            done = "length" if run.params is None else None
            yield chunk([{"index": i, "text": text, "finish_reason": done, "logprobs": block}])
    completion = 0
    if run.params is not None:
        async for i, e in run.events():
            block = logprob_block(i, [(t.id, t.logprob, t.top) for t in e.tokens]) if k is not None else None
            reason = _finish(e)
            if reason:
                completion += e.completion_tokens
            if e.text or reason or block and block["tokens"]:
                yield chunk([{"index": i, "text": e.text, "finish_reason": reason, "logprobs": block}])
    prompt = sum(len(p) for p in prompts)
    yield chunk([], {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})


async def fold_completion(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The whole text_completion that the chunks stream."""
    choices: dict[int, dict] = {}
    async for c in chunks:
        head = c
        for ch in c["choices"]:
            got = choices.setdefault(ch["index"], {"index": ch["index"], "text": "", "finish_reason": None,
                                                   "logprobs": None})
            got["text"] += ch["text"]
            if ch["logprobs"] is not None:
                if got["logprobs"] is None:
                    got["logprobs"] = {key: [] for key in ch["logprobs"]}
                for key, values in ch["logprobs"].items():
                    got["logprobs"][key] += values
            got["finish_reason"] = ch["finish_reason"] or got["finish_reason"]
    return {"id": head["id"], "object": "text_completion", "created": head["created"], "model": head["model"],
            "system_fingerprint": None, "choices": [choices[i] for i in sorted(choices)], "usage": head["usage"]}


async def _unless_disconnected(request: Request, fold) -> dict[str, Any]:
    """Await a non-streaming reply, but stop generating it (its sequences cancelled) if the client goes away."""
    task = asyncio.ensure_future(fold)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "the client closed the connection", code="client_closed")


def _finish(e: Event) -> str | None:
    """The OpenAI finish_reason of an event: stop or length (a timeout and an unload end with length)."""
    if e.finish_reason is None:
        return None
    return "stop" if e.finish_reason == "stop" else "length"


# -- server-sent events --------------------------------------------------------------------------------------------

def _sse(chunks: AsyncIterator[dict[str, Any]], include_usage: bool) -> StreamingResponse:
    """Chunks as server-sent events, ended by `data: [DONE]`; the usage chunk only if include_usage."""
    return _EventStream(_events(chunks, include_usage), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(chunks: AsyncIterator[dict[str, Any]], include_usage: bool) -> AsyncIterator[str]:
    try:
        async for c in chunks:
            if c["usage"] is not None and not c["choices"] and not include_usage:
                continue
            yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
    except RuntimeError as e:  # the engine failed mid-stream: say so in the stream, as OpenAI does
        yield f"data: {json.dumps(APIError(500, str(e), type='server_error').body())}\n\n"
    finally:
        await chunks.aclose()
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """A streaming response that stops as soon as the client disconnects: its chunk generator is cancelled (which
    cancels the request's sequences, freeing their rows) instead of running on until a send fails."""

    async def __call__(self, scope, receive, send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        listen = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, listen}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, listen):
                task.cancel()
            await asyncio.gather(stream, listen, return_exceptions=True)
            await self.body_iterator.aclose()


# -- the request body limit and HTTP counts ------------------------------------------------------------------------

class _LimitBody:
    """ASGI middleware: 413 for a body over max_body bytes (by Content-Length, or counted as it arrives), and a
    count of responses by path and status for /metrics."""

    def __init__(self, app, max_body: int, counts: dict) -> None:
        self.app, self.max_body, self.counts = app, max_body, counts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [0]

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        length = dict(scope.get("headers", ())).get(b"content-length")
        too_big = f"the request body is larger than this server accepts ({self.max_body} bytes); send less"
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0 or n > self.max_body:
                code, msg = (413, too_big) if n > self.max_body else (400, "Content-Length is not a number")
                body = json.dumps(APIError(code, msg, code="request_too_large" if code == 413 else None).body())
                await counting_send({"type": "http.response.start", "status": code,
                                     "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body.encode()})
                self._count(scope, status[0])
                return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, too_big)
            return message

        try:
            await self.app(scope, limited_receive, counting_send)
        finally:
            self._count(scope, status[0])

    def _count(self, scope, status: int) -> None:
        path = scope.get("path", "")
        path = path if path in KNOWN_PATHS else "other"
        self.counts[(path, status)] = self.counts.get((path, status), 0) + 1


KNOWN_PATHS = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/health", "/metrics",
               "/", "/feedback"}


def _prometheus(registry: Registry, http_counts: dict) -> str:
    """The Prometheus text exposition of the server's counters and gauges."""
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP yunque_{name} {help}")
        lines.append(f"# TYPE yunque_{name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"yunque_{name}{{{text}}} {value}" if text else f"yunque_{name} {value}")

    loaded = list(registry.loaded.items())
    metric("http_requests_total", "counter", "HTTP responses by path and status.",
           [({"path": p, "status": str(s)}, n) for (p, s), n in sorted(http_counts.items())])
    metric("model_loaded", "gauge", "1 if the model is in memory.",
           [({"model": n}, int(n in registry.loaded)) for n in registry.specs])
    metric("model_unloads_total", "counter", "Models unloaded to stay within --max-memory.", [({}, registry.unloads)])
    metric("requests_total", "counter", "Sequences submitted (a request with n choices submits n).",
           [({"model": n}, m.scheduler.stats.requests) for n, m in loaded])
    metric("finished_total", "counter", "Sequences ended, by finish reason.",
           [({"model": n, "reason": r}, c) for n, m in loaded for r, c in sorted(m.scheduler.stats.finished.items())])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.",
           [({"model": n}, m.scheduler.stats.prompt_tokens) for n, m in loaded])
    metric("prompt_tokens_cached_total", "counter", "Prompt tokens taken from the shared-prefix cache, not run.",
           [({"model": n}, m.scheduler.stats.cached_tokens) for n, m in loaded])
    metric("generation_tokens_total", "counter", "Tokens generated.",
           [({"model": n}, m.scheduler.stats.generated_tokens) for n, m in loaded])
    metric("queue_depth", "gauge", "Sequences waiting to start.",
           [({"model": n}, m.scheduler.waiting) for n, m in loaded])
    metric("running_sequences", "gauge", "Sequences in the running batch (its batch size).",
           [({"model": n}, m.scheduler.running) for n, m in loaded])
    metric("decode_steps_total", "counter", "Decode steps run.",
           [({"model": n}, m.scheduler.stats.steps) for n, m in loaded])
    metric("decode_rows_total", "counter", "Rows decoded, summed over steps (/ steps = mean batch size).",
           [({"model": n}, m.scheduler.stats.step_rows) for n, m in loaded])
    samples = []
    for n, m in loaded:
        ttft = sorted(m.scheduler.stats.ttft)
        for q in (0.5, 0.9, 0.99):
            if ttft:
                samples.append(({"model": n, "quantile": str(q)}, ttft[min(len(ttft) - 1, int(q * len(ttft)))]))
    metric("time_to_first_token_seconds", "summary", "Seconds from submit to first token (recent sequences).",
           samples)
    return "\n".join(lines) + "\n"


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


__all__ = ["create_app", "chat_chunks", "completion_chunks", "fold_chat", "fold_completion"]
