"""Heads on a base served by vLLM: the base runs unmodified in vLLM's engine, the heads on its next-token logits.

`bank` (the heads as functions of the logits, the load checks; no vLLM import), `processor` (vLLM's batch-level
logits processor and the worker methods that load and unload heads while serving), `routes` (the OpenAI server's
`model` field mapped onto a head, and the load and unload endpoints) and `command` (`peft-backattn vllm-serve`).
vLLM is the optional extra `peft-backattn[vllm]`; docs/serving.md says how to serve with it.
"""

from .bank import HEAD_KEY, engine_kwargs

__all__ = ["HEAD_KEY", "engine_kwargs"]
