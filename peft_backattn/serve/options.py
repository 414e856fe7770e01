"""The options of `peft-backattn serve`, kept beside the server so that the command line adds them in one call.

This module needs no serving dependency: `peft-backattn --help` works without the `serve` extra.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from ..workbench.base_models import EMBEDDED_DEFAULT
from .registry import head_name_problem

MAX_BATCH_WINDOW_MS = 10_000.0  # a window is a pause of milliseconds; beyond seconds it only delays every request

SERVE_EXAMPLES = """examples:
  peft-backattn serve --head math=runs/demo/math_head --head short=runs/demo/short_head
  peft-backattn serve --model gpt2 --heads-dir heads/ --port 8001 --api-key secret
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "math", "prompt": "What is 7 * 6?", "max_tokens": 32, "temperature": 0}'"""

SERVE_HELP = "Serve heads on one frozen base over an OpenAI-compatible HTTP API, batching requests across heads."


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=EMBEDDED_DEFAULT,
        help=f"base model: a hub name, a local folder, or {EMBEDDED_DEFAULT!r} (default; needs no hub access)",
    )
    parser.add_argument(
        "--head", action="append", default=[], metavar="NAME=PATH",
        help="a head folder to serve as model NAME (repeatable; a bare PATH is named after its folder)",
    )  # fmt: skip
    parser.add_argument(
        "--heads-dir", metavar="DIR", help="serve every head folder inside DIR, each named after its folder"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument(
        "--port", type=_in_range(int, 0, 65535), default=8000,
        help="port to listen on, 0 to 65535 (default 8000; 0: a free port, printed at start)",
    )  # fmt: skip
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 request")
    parser.add_argument(
        "--max-batch", type=_in_range(int, 1), default=32, help="rows decoded together at most (default 32)"
    )
    parser.add_argument(
        "--batch-window-ms", type=_in_range(float, 0, MAX_BATCH_WINDOW_MS), default=10.0,
        help=f"an idle server waits this long for more requests to start a batch with, 0 to {MAX_BATCH_WINDOW_MS:g} "
        "(default 10)",
    )  # fmt: skip
    parser.add_argument(
        "--max-model-len", type=_in_range(int, 2),
        help="context length in tokens, prompt and completion (default: the base's max_position_embeddings)",
    )  # fmt: skip


def _in_range(kind: type[int] | type[float], low: float, high: float | None = None) -> Callable[[str], int | float]:
    """An argparse type: a finite `kind` from `low` to `high`, checked while the command line is read, before
    anything loads; argparse reports a refusal in one line."""
    expected = f"{'an integer' if kind is int else 'a finite number'} " + (
        f"from {low:g} to {high:g}" if high is not None else f">= {low:g}"
    )

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value

    return parse


def head_specs(specs: list[str], heads_dir: str | None) -> dict[str, str]:
    """{name: folder} from `--heads-dir` (sorted folders that hold adapter_config.json) and `--head NAME=PATH`."""
    heads: dict[str, str] = {}
    if heads_dir is not None:
        directory = Path(heads_dir)
        if not directory.is_dir():
            raise ValueError(f"--heads-dir {heads_dir}: no such folder.")
        for folder in sorted(p for p in directory.iterdir() if (p / "adapter_config.json").is_file()):
            problem = head_name_problem(folder.name)
            if problem is not None:
                raise ValueError(f"--heads-dir {heads_dir}: {problem} Rename the folder or pass it with --head.")
            heads[folder.name] = str(folder)
        if not heads:
            raise ValueError(f"--heads-dir {heads_dir} holds no head folder (none with adapter_config.json).")
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator:
            name, path = Path(spec).resolve().name, spec
        if not name or not path:
            raise ValueError(f"--head {spec!r}: expected NAME=PATH.")
        problem = head_name_problem(name)
        if problem is not None:
            raise ValueError(f"--head {spec!r}: {problem}")
        if name in heads:
            raise ValueError(f"--head {spec!r}: the name {name!r} is given twice.")
        heads[name] = path
    return heads
