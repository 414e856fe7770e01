"""The heads in vLLM's OpenAI server: an ASGI middleware (vLLM's `--middleware`) that maps OpenAI's `model` field
onto a head, as vLLM's `--lora-modules` does for LoRA adapters.

- A completion or chat completion whose `model` names a head is passed on without `model` (vLLM then runs its
  base) and with `vllm_xargs["backattn_head"]` naming the head; the `model` of its response (every chunk of a stream)
  is the head's name again. One that names a head through `vllm_xargs` itself goes through as it is (vLLM checks
  it). Both are counted while they run, so that unloading a head can wait for them.
- `GET /v1/models` lists the heads after vLLM's models (`parent`: the base, `root`: the head's folder).
- `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` take vLLM's bodies (`lora_name`, `lora_path`) and load
  or unload a backattn head on every worker between two steps (`collective_rpc`). Unloading first stops new
  requests for the head, then waits for those running to finish. Folders of other adapters, and names that are not
  heads, go on to vLLM's own LoRA endpoints (served when `VLLM_ALLOW_RUNTIME_LORA_UPDATING` is set).

This middleware runs outside vLLM's API-key check, so its own endpoints ask that check first: they answer only a
request that vLLM would answer on `GET /v1/models`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable

from .._peft_type import PEFT_TYPE_NAME
from ..config import CONFIG_NAME
from .bank import HEAD_KEY, check_head_name, served_heads, set_served_heads

Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LOAD, UNLOAD, MODELS = "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/models"
GENERATING = ("/v1/completions", "/v1/chat/completions")  # where `model` may name a head


class HeadRoutes:
    """Pure ASGI middleware; one per server process (its counts of running requests per head live here)."""

    def __init__(self, app) -> None:
        self.app = app
        self.running: Counter[str] = Counter()  # head -> requests in flight that name it
        self.changing = asyncio.Lock()  # one load or unload at a time

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        method = scope["method"]
        if method == "GET" and path == MODELS:
            return await self._models(scope, receive, send)
        if method != "POST":
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        request = parse_json(body)
        if path in (LOAD, UNLOAD) and isinstance(request, dict) and self._is_ours(path, request):
            return await self._change_heads(path, request, scope, send)
        head = named_head(request) if path in GENERATING else None
        if head is None:
            return await self.app(scope, replay(body, receive), send)
        if isinstance(head, Error):
            return await head.send(send)
        by_model = request.get("model") == head
        if by_model:
            del request["model"]  # vLLM runs its base; the head comes in with the sampling parameters
            request["vllm_xargs"] = {**(request.get("vllm_xargs") or {}), HEAD_KEY: head}
            body = json.dumps(request).encode()
            scope = with_content_length(scope, len(body))
        self.running[head] += 1
        try:
            await self.app(scope, replay(body, receive), model_renamed(send, head) if by_model else send)
        finally:
            self.running[head] -= 1

    # -- /v1/models -------------------------------------------------------------------------------------------

    async def _models(self, scope: dict, receive: Receive, send: Send) -> None:
        status, headers, body = await self._inner(scope, receive)
        listing = parse_json(body)
        if status == 200 and isinstance(listing, dict) and listing.get("data"):
            base = listing["data"][0]
            for name, folder in served_heads().items():
                listing["data"].append({**base, "id": name, "root": folder, "parent": base["id"]})
            body = json.dumps(listing).encode()
        await respond(send, status, body, headers)

    async def _inner(self, scope: dict, receive: Receive) -> tuple[int, list, bytes]:
        """vLLM's own answer to `GET /v1/models` with this request's headers (its API-key check included)."""
        probe = {**scope, "method": "GET", "path": scope.get("root_path", "") + MODELS, "query_string": b""}
        probe["raw_path"] = probe["path"].encode()
        captured: dict = {"body": b""}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                captured.update(status=message["status"], headers=message.get("headers", []))
            elif message["type"] == "http.response.body":
                captured["body"] += message.get("body", b"")

        await self.app(probe, replay(b"", receive), capture)
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != b"content-length"]
        return captured["status"], headers, captured["body"]

    # -- loading and unloading ---------------------------------------------------------------------------------

    def _is_ours(self, path: str, request: dict) -> bool:
        """Load and unload requests for backattn heads are ours; others go to vLLM's LoRA endpoints where vLLM
        serves them (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`), else they are ours to refuse."""
        if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() not in ("1", "true"):
            return True
        if path == UNLOAD:
            return request.get("lora_name") in served_heads()
        config = os.path.join(str(request.get("lora_path", "")), CONFIG_NAME)
        try:
            with open(config) as handle:
                return json.load(handle).get("peft_type") == PEFT_TYPE_NAME
        except (OSError, ValueError, AttributeError):
            return False

    async def _change_heads(self, path: str, request: dict, scope: dict, send: Send) -> None:
        status, headers, body = await self._inner(scope, receive_nothing)
        if status != 200:  # vLLM's API-key check refused this request: so do we
            return await respond(send, status, body, headers)
        base_names = [card["id"] for card in json.loads(body)["data"]]
        engine = scope["app"].state.engine_client
        async with self.changing:
            if path == LOAD:
                outcome = await self._load(engine, request, base_names)
            else:
                outcome = await self._unload(engine, request)
        if isinstance(outcome, Error):
            return await outcome.send(send)
        await respond(send, 200, outcome.encode(), [(b"content-type", b"text/plain; charset=utf-8")])

    async def _load(self, engine, request: dict, base_names: list[str]) -> str | Error:
        name, folder = request.get("lora_name"), request.get("lora_path")
        try:
            check_head_name(name)
        except ValueError as error:
            return Error(400, str(error), param="lora_name")
        if name in base_names:
            return Error(400, f"The name {name!r} is reserved for the base model; choose another.", param="lora_name")
        if name in served_heads():
            return Error(400, f"The head {name!r} has already been loaded; unload it first to replace it.",
                         param="lora_name", code="head_already_loaded")  # fmt: skip
        if not isinstance(folder, str) or not folder:
            return Error(400, f"lora_path must name a head folder, got {folder!r}.", param="lora_path")
        results = await engine.collective_rpc("backattn_load_head", args=(name, folder))
        refusals = [reason for reason in results if reason]
        if refusals:
            await engine.collective_rpc("backattn_unload_head", args=(name,))  # where another worker did load it
            return Error(400, f"The head at {folder!r} was not loaded: {refusals[0]}", param="lora_path",
                         code="invalid_head")  # fmt: skip
        set_served_heads({**served_heads(), name: folder})
        return f"Success: LoRA adapter '{name}' added successfully."

    async def _unload(self, engine, request: dict) -> str | Error:
        name = request.get("lora_name")
        heads = served_heads()
        if name not in heads:
            return Error(404, f"The head {name!r} is not loaded; loaded heads: {sorted(heads)}.",
                         param="lora_name", code="model_not_found")  # fmt: skip
        del heads[name]
        set_served_heads(heads)  # from here on, requests for it are refused
        while self.running[name] > 0:  # those running finish on it
            await asyncio.sleep(0.05)
        await engine.collective_rpc("backattn_unload_head", args=(name,))
        return f"Success: LoRA adapter '{name}' removed successfully."


# -- requests and responses ----------------------------------------------------------------------------------


class Error:
    """An error in OpenAI's shape, answered by this middleware."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "Error")
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code or status}}

    async def send(self, send: Send) -> None:
        await respond(send, self.status, json.dumps(self.body).encode(), [(b"content-type", b"application/json")])


def named_head(request: object) -> str | Error | None:
    """The head a request body names by `model` or by `vllm_xargs`, or None; an Error where they disagree."""
    if not isinstance(request, dict):
        return None
    heads = served_heads()
    model = request.get("model")
    by_model = model if isinstance(model, str) and model in heads else None
    xargs = request.get("vllm_xargs")
    by_xargs = xargs.get(HEAD_KEY) if isinstance(xargs, dict) else None
    if by_model and by_xargs is not None and by_xargs != by_model:
        return Error(400, f"model names head {by_model!r} but vllm_xargs names {by_xargs!r}; name one head.",
                     param="vllm_xargs")  # fmt: skip
    head = by_model or by_xargs
    return head if isinstance(head, str) else None


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` once, then the client's own messages (its disconnect, when it goes)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def receive_nothing() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def with_content_length(scope: dict, length: int) -> dict:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


async def respond(send: Send, status: int, body: bytes, headers: list) -> None:
    headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def model_renamed(send: Send, head: str) -> Send:
    """A `send` that writes `head` as the `model` of a JSON response, or of each event of a stream."""
    state: dict = {"start": None, "body": b"", "stream": False, "pending": b""}

    def rename(text: bytes) -> bytes:
        data = parse_json(text)
        if isinstance(data, dict) and "model" in data:
            data["model"] = head
            return json.dumps(data).encode()
        return text

    def rename_events(chunk: bytes) -> bytes:
        lines = (state["pending"] + chunk).split(b"\n")
        state["pending"] = lines.pop()  # an unfinished line waits for the next chunk
        return b"".join(
            (b"data: " + rename(line[6:]) if line.startswith(b"data: {") else line) + b"\n" for line in lines
        )

    async def renamed(message: Message) -> None:
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            state["stream"] = content_type.startswith(b"text/event-stream")
            if state["stream"] or not content_type.startswith(b"application/json"):
                state["stream"] = state["stream"] or None  # None: passed on as it is
                return await send(message)
            state["start"] = message  # a JSON body: sent once its new length is known
            return None
        if message["type"] != "http.response.body" or state["stream"] is None:
            return await send(message)
        more = message.get("more_body", False)
        if state["stream"]:
            body = rename_events(message.get("body", b""))
            if not more:
                body, state["pending"] = body + state["pending"], b""
            return await send({**message, "body": body})
        state["body"] += message.get("body", b"")
        if more:
            return None
        start = state["start"]
        await respond(send, start["status"], rename(state["body"]), start.get("headers", []))
        return None

    return renamed
