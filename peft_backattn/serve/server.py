"""Building a server (base, heads, tokenizer, scheduler, app) and running it with uvicorn, in the foreground for
the command line or in a background thread for tests and benchmarks."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Mapping

import uvicorn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..validation import check_option
from ..workbench.base_models import load_base_model
from .app import ServerState, create_app
from .errors import ServeError
from .options import ServeOptions
from .registry import HeadRegistry, TextCodec
from .scheduler import BatchScheduler


def build_state(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    base_name: str,
    heads: Mapping[str, str | os.PathLike] = (),
    *,
    api_key: str | None = None,
    max_batch: int = 32,
    batch_window_ms: float = 10.0,
    max_model_len: int | None = None,
) -> ServerState:
    """Load the heads onto the base (each through PEFT's validated loaders) and start the scheduler's worker."""
    check_option(ServeOptions, "max_batch", max_batch)  # the checks of `serve`'s options, for Python callers
    check_option(ServeOptions, "batch_window_ms", batch_window_ms)
    registry = HeadRegistry(base, base_name)
    for name, path in dict(heads).items():
        try:
            registry.load(name, path)
        except ServeError as error:
            raise ValueError(f"--head {name}={path}: {error.message}") from None
    context = context_length(base, tokenizer)
    if max_model_len is not None:
        if not 1 < max_model_len <= context:
            raise ValueError(f"--max-model-len must be from 2 to the base's {context} tokens, got {max_model_len}.")
        context = max_model_len
    codec = TextCodec(tokenizer, eos_token_ids(base, tokenizer))
    scheduler = BatchScheduler(
        registry, codec, max_batch=max_batch, window_s=batch_window_ms / 1000, context_length=context
    )
    return ServerState(registry, scheduler, codec, context, api_key=api_key)


def context_length(base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens of prompt and completion together: the base's position limit (or the tokenizer's, if smaller)."""
    config = base.config
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions", "max_seq_len")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    known = [int(limit) for limit in limits if isinstance(limit, int) and 0 < limit < 10_000_000]
    return min(known) if known else 2048


def eos_token_ids(base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion, as `generate` decides them: the generation config's, else the tokenizer's."""
    configured = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return []
    return [configured] if isinstance(configured, int) else list(configured)


def run_server(
    model: str,
    heads: Mapping[str, str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 32,
    batch_window_ms: float = 10.0,
    max_model_len: int | None = None,
) -> None:
    """Serve until interrupted (the command line's `serve`).

    The address is bound before the model loads, so that a port in use is reported at once, and announced only
    once the model is ready and the socket listens.
    """
    listener = bind_address(host, port)
    try:
        base, tokenizer = load_base_model(model)
        state = build_state(
            base, tokenizer, model, heads, api_key=api_key, max_batch=max_batch, batch_window_ms=batch_window_ms,
            max_model_len=max_model_len,
        )  # fmt: skip
        try:
            listener.listen(2048)
            port = listener.getsockname()[1]  # the one the system chose, for --port 0
            names = state.registry.names()
            print(f"Serving {len(names) - 1} head(s) on {model}: {names[1:]} (and the base as {model!r})")
            shown = f"[{host}]" if ":" in host else host
            print(f"OpenAI-compatible API on http://{shown}:{port}/v1 (Ctrl-C stops)", flush=True)
            config = uvicorn.Config(create_app(state), host=host, port=port, log_level="warning")
            uvicorn.Server(config).run(sockets=[listener])
        finally:
            state.scheduler.close()
    finally:
        listener.close()


def bind_address(host: str, port: int) -> socket.socket:
    """A socket bound to `host`:`port` (not yet listening); an address that cannot be had is one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise ValueError(f"--host {host}: not an address this machine can listen on ({error.strerror}).") from None
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
        listener.bind(address)
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            reason = "the port is already in use (another server?); choose another --port"
        else:
            reason = error.strerror or str(error)
        raise ValueError(f"cannot listen on {host}:{port}: {reason}.") from None
    return listener


class BackgroundServer:
    """The app served by uvicorn in a thread, on `host` and a free port (port 0), for tests and benchmarks.

    `with BackgroundServer(state) as server:` gives `server.base_url` (`http://127.0.0.1:PORT/v1`); leaving the
    block stops uvicorn and the scheduler.
    """

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0):
        self.state = state
        config = uvicorn.Config(create_app(state), host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="peft-backattn-uvicorn", daemon=True)
        self.start_timeout = start_timeout
        self.base_url = ""

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.base_url = f"http://{host}:{port}/v1"
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.state.scheduler.close()
