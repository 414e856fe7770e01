"""The OpenAI-compatible HTTP API (FastAPI; Server-Sent Events through sse-starlette) over one BatchScheduler.

`model` in a request names a head or the base. Every request becomes one row per prompt and choice (`n`), and all
rows of all requests are decoded together by the scheduler. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, and never stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import ServeError
from .protocol import ChatCompletionRequest, CompletionRequest, LoadHeadRequest, UnloadHeadRequest
from .registry import HeadRegistry, TextCodec
from .scheduler import BatchScheduler, Event, SamplingParams
from .scheduler import Request as Row

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


@dataclass
class ServerState:
    registry: HeadRegistry
    scheduler: BatchScheduler
    codec: TextCodec
    context_length: int
    api_key: str | None = None
    created: int = 0


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app. The scheduler (and its worker thread) belongs to the caller, who closes it."""
    state.created = state.created or int(time.time())
    app = FastAPI(title="peft-backattn", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, error: ServeError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        # The key comes first, as in OpenAI's API: without it, a client learns nothing about its body (FastAPI
        # parses the JSON before any dependency runs, so a malformed body would otherwise be judged first).
        refused = _key_error(state, request) if request.url.path.startswith("/v1/") else None
        problem = refused or _validation_error(error)
        return JSONResponse(problem.body(), status_code=problem.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        body = ServeError(error.status_code, str(error.detail), type=kind).body()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        message = f"Internal error: {type(error).__name__}: {error}"
        return JSONResponse(ServeError(500, message, type="server_error").body(), status_code=500)

    authorized = Depends(_check_key(state))

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("")

    @app.get("/v1/models", dependencies=[authorized])
    async def models() -> dict:
        base = state.registry.base_name
        data = [_model_card(base, state.created, root=base, parent=None)]
        for name, path in state.registry.head_paths().items():
            if name in state.registry.names():
                data.append(_model_card(name, state.created, root=path, parent=base))
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=[authorized])
    async def completions(body: CompletionRequest, http: Request):
        head = state.registry.row_name(body.model)
        prompts = [_prompt_ids(state, p) for p in body.prompts()]
        limit = body.max_tokens if body.max_tokens is not None else 16
        for ids in prompts:
            _check_length(state, len(ids), limit, "prompt")
        job = _Job(state, head, prompts, body, limit, chat=False)
        return await job.respond(http)

    @app.post("/v1/chat/completions", dependencies=[authorized])
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        head = state.registry.row_name(body.model)
        if not state.codec.has_chat_template:
            raise ServeError(400, f"The tokenizer of {state.registry.base_name!r} has no chat template; use "
                             "/v1/completions.", param="messages")  # fmt: skip
        ids = state.codec.encode_chat(body.template_messages())
        limit = body.token_limit()
        if limit is None:
            _check_length(state, len(ids), 1, "messages")
            limit = state.context_length - len(ids)
        _check_length(state, len(ids), limit, "messages")
        job = _Job(state, head, [ids], body, limit, chat=True)
        return await job.respond(http)

    @app.post("/v1/load_lora_adapter", dependencies=[authorized])
    async def load_head(body: LoadHeadRequest) -> PlainTextResponse:
        state.registry.check_new_head(body.lora_name, body.lora_path)  # quick answers before queueing
        await state.scheduler.call(lambda: state.registry.load(body.lora_name, body.lora_path))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[authorized])
    async def unload_head(body: UnloadHeadRequest) -> PlainTextResponse:
        name = body.lora_name
        state.registry.start_unloading(name)  # new requests for it are refused from here on
        try:
            await state.scheduler.call(
                lambda: state.registry.unload(name), ready=lambda: not state.scheduler.uses_head(name)
            )
        except BaseException:
            state.registry.cancel_unloading(name)
            raise
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


def _check_key(state: ServerState) -> Callable:
    async def check(request: Request) -> None:
        refused = _key_error(state, request)
        if refused is not None:
            raise refused

    return check


def _key_error(state: ServerState, request: Request) -> ServeError | None:
    """The 401 for a request without the right key (None when it has it, or when the server needs none)."""
    if state.api_key is None:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), state.api_key.encode()):
        return None
    return ServeError(
        401,
        "Missing API key (send 'Authorization: Bearer KEY')." if not header else "Incorrect API key provided.",
        code="invalid_api_key",
    )


def _model_card(name: str, created: int, root: str, parent: str | None) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "peft-backattn", "root": root,
            "parent": parent}  # fmt: skip


def _validation_error(error: RequestValidationError) -> ServeError:
    problems = error.errors()
    first = problems[0] if problems else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return ServeError(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    param = ".".join(location) or None
    message = first.get("msg", "Invalid request")
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return ServeError(400, f"{param + ': ' if param else ''}{message}{more}", param=param)


def _prompt_ids(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = state.codec.encode(prompt)
    else:
        vocab = state.codec.vocab_size()
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ServeError(400, f"Token id {bad[0]} is outside the vocabulary (0..{vocab - 1}).", param="prompt")
        ids = list(prompt)
    if not ids:
        raise ServeError(400, "The prompt is empty (no tokens).", param="prompt")
    return ids


def _check_length(state: ServerState, prompt_tokens: int, max_tokens: int, what: str) -> None:
    if prompt_tokens + max_tokens > state.context_length:
        raise ServeError(
            400,
            f"This model's maximum context length is {state.context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {what}, {max_tokens} in the completion). "
            f"Please reduce the length of the {what} or completion.",
            param=what,
            code="context_length_exceeded",
        )


class _Job:
    """One HTTP request's rows (prompts x n choices), their events, and the OpenAI response built from them."""

    def __init__(self, state: ServerState, head: str, prompts: list[list[int]], body, limit: int, chat: bool):
        self.state, self.body, self.chat = state, body, chat
        self.model = body.model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.rows = []
        for p, ids in enumerate(prompts):
            for choice in range(body.n):
                seed = None if body.seed is None else body.seed + choice
                params = SamplingParams(
                    limit, body.temperature, body.top_p, body.stop_strings(), seed, ignore_eos=body.ignore_eos
                )
                self.rows.append(Row(ids, head, params, self.queue, loop, index=p * body.n + choice))
        self.texts = [""] * len(self.rows)
        self.finish: list[str | None] = [None] * len(self.rows)
        self.tokens = [0] * len(self.rows)

    async def respond(self, http: Request):
        self.state.scheduler.submit(self.rows)
        if self.body.stream:
            return EventSourceResponse(self._stream(), ping=15)
        try:
            checked = time.monotonic()
            while None in self.finish:
                try:
                    self._take(await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S))
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() - checked >= DISCONNECT_POLL_S:  # events may come without pause: check by time
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        break
        finally:
            self._release()
        return self._response()

    def _take(self, event: Event) -> None:
        if event.error is not None:
            if isinstance(event.error, ServeError):
                raise event.error
            raise ServeError(500, f"Generation failed: {event.error}", type="server_error") from event.error
        self.texts[event.index] += event.text
        self.tokens[event.index] = event.completion_tokens
        if event.finish_reason is not None:
            self.finish[event.index] = event.finish_reason

    def _release(self) -> None:
        """Rows still decoding (a client that left, an error) leave the batch at the next step."""
        unfinished = [row for row, finish in zip(self.rows, self.finish, strict=True) if finish is None]
        if unfinished:
            self.state.scheduler.cancel(unfinished)

    def _usage(self) -> dict:
        completion = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}  # fmt: skip

    def _response(self) -> dict:
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None,
                }  # fmt: skip
                for i, (text, finish) in enumerate(zip(self.texts, self.finish, strict=True))
            ]
            kind = "chat.completion"
        else:
            choices = [
                {"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                for i, (text, finish) in enumerate(zip(self.texts, self.finish, strict=True))
            ]
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                "usage": self._usage()}  # fmt: skip

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices}  # fmt: skip
        if usage is not None:
            chunk["usage"] = usage
        return json.dumps(chunk)

    def _choice(self, index: int, text: str | None, finish: str | None, first: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}

    async def _stream(self) -> AsyncIterator[str]:
        try:
            if self.chat:
                for index in range(len(self.rows)):
                    yield self._chunk([self._choice(index, "", None, first=True)])
            while None in self.finish:
                event = await self.queue.get()
                if event.error is not None:
                    error = event.error if isinstance(event.error, ServeError) else ServeError(
                        500, f"Generation failed: {event.error}", type="server_error")  # fmt: skip
                    yield json.dumps(error.body())
                    return
                self._take(event)
                if not self.chat:
                    yield self._chunk([self._choice(event.index, event.text, event.finish_reason)])
                    continue
                if event.text:
                    yield self._chunk([self._choice(event.index, event.text, None)])
                if event.finish_reason is not None:
                    yield self._chunk([self._choice(event.index, None, event.finish_reason)])
            if self.body.include_usage():
                yield self._chunk([], usage=self._usage())
            yield "[DONE]"
        finally:
            self._release()
