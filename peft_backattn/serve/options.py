"""The options of `peft-backattn serve`, kept beside the server so that the command line adds them in one call.

This module needs no serving dependency: `peft-backattn --help` works without the `serve` extra.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from ..validation import Check, add_dataclass_options, check_fields, is_finite, is_integer
from ..workbench.base_models import EMBEDDED_DEFAULT
from .registry import head_name_problem

MAX_BATCH_WINDOW_MS = 10_000.0  # a window is a pause of milliseconds; beyond seconds it only delays every request

SERVE_EXAMPLES = """examples:
  peft-backattn serve --head math=runs/demo/math_head --head short=runs/demo/short_head
  peft-backattn serve --model gpt2 --heads-dir heads/ --port 8001 --api-key secret
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "math", "prompt": "What is 7 * 6?", "max_tokens": 32, "temperature": 0}'"""

SERVE_HELP = "Serve heads on one frozen base over an OpenAI-compatible HTTP API, batching requests across heads."


def _number_in(kind: type[int] | type[float], low: float, high: float | None = None) -> Check:
    """A finite int (or number) from `low` to `high` (no upper bound when None)."""
    words = f"{'an integer' if kind is int else 'a finite number'} " + (
        f"from {low:g} to {high:g}" if high is not None else f">= {low:g}"
    )
    test = is_integer if kind is int else is_finite
    return Check(words, lambda value: test(value) and low <= value and (high is None or value <= high))


@dataclass
class ServeOptions:
    """How to serve: the options of `peft-backattn serve`, each checked when built, before anything loads."""

    model: str = field(
        default=EMBEDDED_DEFAULT,
        metadata={"help": f"base model: a hub name, a local folder, or {EMBEDDED_DEFAULT!r} (needs no hub access)"},
    )
    head: list[str] = field(
        default_factory=list,
        metadata={
            "help": "a head folder to serve as model NAME (repeatable; a bare PATH is named after its folder)",
            "append": "NAME=PATH",
        },
    )
    heads_dir: str | None = field(
        default=None, metadata={"help": "serve every head folder inside DIR, each named after its folder"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (127.0.0.1: this machine only)"})
    port: int = field(
        default=8000,
        metadata={"help": "port to listen on (0: a free port, printed at start)", "check": _number_in(int, 0, 65535)},
    )
    api_key: str | None = field(
        default=None, metadata={"help": "require 'Authorization: Bearer KEY' on every /v1 request"}
    )
    max_batch: int = field(default=32, metadata={"help": "rows decoded together at most", "check": _number_in(int, 1)})
    batch_window_ms: float = field(
        default=10.0,
        metadata={
            "help": "an idle server waits this long (milliseconds) for more requests to start a batch with",
            "check": _number_in(float, 0, MAX_BATCH_WINDOW_MS),
        },
    )
    max_model_len: int | None = field(
        default=None,
        metadata={
            "help": "context length in tokens, prompt and completion (default: the base's max_position_embeddings)",
            "check": _number_in(int, 2).or_none(),
        },
    )

    def __post_init__(self) -> None:
        check_fields(self)

    def heads(self) -> dict[str, str]:
        """{name: folder} of `--heads-dir` and `--head` (`head_specs`)."""
        return head_specs(self.head, self.heads_dir)


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    add_dataclass_options(parser, ServeOptions)


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
