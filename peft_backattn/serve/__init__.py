"""Serving heads: an OpenAI-compatible HTTP server that batches requests for many heads on one frozen base.

`app` (the HTTP API), `scheduler` (one worker thread that decodes every request together, one head per row),
`registry` (the heads on the base, the tokenizer), `protocol` (request bodies), `server` (building and running it)
and `options` (the command line's options). The HTTP stack is the optional extra `peft-backattn[serve]`; without
it the command line still starts and `peft-backattn serve` says what to install.
"""

from __future__ import annotations

import argparse

from ..validation import given_options
from .options import SERVE_EXAMPLES, SERVE_HELP, ServeOptions, add_serve_options

SERVE_EXTRA_MODULES = ("fastapi", "starlette", "uvicorn", "sse_starlette", "pydantic")

try:
    from .server import run_server
except ModuleNotFoundError as missing:  # the optional extra is not installed
    if missing.name not in SERVE_EXTRA_MODULES:
        raise
    run_server = None
    _MISSING_MODULE = missing.name

__all__ = ["SERVE_EXAMPLES", "SERVE_HELP", "ServeOptions", "add_serve_options", "run_serve_command"]


def run_serve_command(args: argparse.Namespace) -> int:
    """`peft-backattn serve`: load the base and heads, then serve until interrupted."""
    options = ServeOptions(**given_options(ServeOptions, args))  # every value checked before anything loads
    heads = options.heads()
    if run_server is None:
        raise RuntimeError(
            f"serving needs the optional dependencies (no module {_MISSING_MODULE!r}); "
            "install them with: pip install 'peft-backattn[serve]'"
        )
    run_server(
        options.model, heads, host=options.host, port=options.port, api_key=options.api_key,
        max_batch=options.max_batch, batch_window_ms=options.batch_window_ms, max_model_len=options.max_model_len,
    )  # fmt: skip
    return 0
