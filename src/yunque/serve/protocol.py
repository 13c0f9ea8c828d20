"""The OpenAI API's shapes, as the official `openai` SDK sends and parses them: requests (checked here, so a bad
value is a 400 naming its field), responses, stream chunks and error bodies.

Requests accept unknown fields and ignore them, as OpenAI's clients send fields a server may not know; yunque's
own extras (top_k, min_p, repetition_penalty) are accepted where vLLM accepts them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16
"""Choices per request at most."""
MAX_TOP_LOGPROBS = 20


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- errors ------------------------------------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server returns: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorDetail


class APIError(Exception):
    """An error to return as an OpenAI error body with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump()


# -- sampling fields shared by chat and completions ----------------------------------------------------------------

class Sampling(Request):
    model: str = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = Field(None, ge=-1)
    """yunque/vLLM extra: sample among the k most likely tokens (-1 or 0: no limit)."""
    min_p: float | None = Field(None, ge=0, le=1)
    """yunque/vLLM extra: min-p sampling."""
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)
    """yunque/vLLM extra: Hugging Face's repetition penalty (1 for none)."""

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stop if s)  # an empty stop string stops nothing (OpenAI accepts and ignores it)


class StreamOptions(Request):
    include_usage: bool | None = False


# -- chat ----------------------------------------------------------------------------------------------------------

class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# -- completions ---------------------------------------------------------------------------------------------------

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(union_mode="left_to_right")
    max_tokens: int | None = Field(16, ge=0)
    """0 with echo: only score the prompt (lm-evaluation-harness's log-likelihood)."""
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# -- embeddings ----------------------------------------------------------------------------------------------------

class EmbeddingRequest(Request):
    model: str = Field(min_length=1)
    input: str | list[str] | TokenIds | list[TokenIds] = Field(union_mode="left_to_right")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


# -- models --------------------------------------------------------------------------------------------------------

class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "yunque"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# -- feedback from the chat page -----------------------------------------------------------------------------------

class FeedbackMessage(Request):
    role: Literal["system", "user", "assistant"]
    content: str


class FeedbackRequest(Request):
    """A thumbs up/down on one reply, or which of two replies is better: written with yunque.feedback."""

    kind: Literal["rating", "preference"]
    model: str = Field(min_length=1)
    messages: list[FeedbackMessage] = Field(min_length=1)
    reply: str | None = None
    rating: Literal[1, -1] | None = None
    chosen: str | None = None
    rejected: str | None = None


Sampling.model_rebuild()
