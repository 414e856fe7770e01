"""The heads a server holds on its one frozen base, and the tokenizer it encodes and decodes with.

Every loaded head stays resident (a head is a few hundred kB beside a base of hundreds of MB), so a request never
waits for a head to be swapped in. Names are what clients put in `model`: the base's own name, or a head's.
Loading and deleting change the model, so they run in the scheduler's worker between decoding steps; the names
clients may use are read from the event loop, under a lock.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..layer import BASE_ADAPTER_NAME
from .errors import ServeError

UNROUTABLE_CHARACTERS = "./\\"  # PEFT's module names cannot hold a ".", and a path separator is no name


def head_name_problem(name: object) -> str | None:
    """Why `name` cannot name a head (None if it can). Clients put it in `model` as it is and PEFT makes it part of
    module names, so it is non-empty, printable, and holds no whitespace, '.', '/' or backslash."""
    if not isinstance(name, str) or not name:
        return f"A head needs a non-empty name, got {name!r}."
    if any(c.isspace() or not c.isprintable() or c in UNROUTABLE_CHARACTERS for c in name):
        return f"A head's name may hold no whitespace, '.', '/' or backslash, got {name!r}; choose one like 'math'."
    return None


class TextCodec:
    """The tokenizer behind a lock: the event loop encodes prompts while the worker decodes, and a fast
    tokenizer's settings are not safe to change from two threads at once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0  # padded positions are masked out; any id will do
        self._lock = threading.Lock()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._lock:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The chat template's prompt (with the assistant's turn opened), tokenised without extra special tokens."""
        with self._lock:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def vocab_size(self) -> int:
        return len(self.tokenizer)


class HeadRegistry:
    """The model object (the base, or a PeftModel holding every head) and the names clients may request."""

    def __init__(self, base: PreTrainedModel, base_name: str) -> None:
        self.base_name = base_name
        self.model: PreTrainedModel | PeftModel = base.eval()
        self._base = base
        self._paths: dict[str, str] = {}  # head name -> the folder it was loaded from
        self._draining: set[str] = set()  # being unloaded: refused to new requests
        self._lock = threading.Lock()
        # transformers 5 renamed the forward argument `past_key_values` to `cache`; models differ in which they take
        self.cache_argument = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self._base.parameters()).device

    @property
    def has_heads(self) -> bool:
        """Whether the model is a PeftModel, which takes `adapter_names` (one head, or the base, per row)."""
        return isinstance(self.model, PeftModel)

    def names(self) -> list[str]:
        """The base and every head a request may name, in load order."""
        with self._lock:
            return [self.base_name, *(n for n in self._paths if n not in self._draining)]

    def head_paths(self) -> dict[str, str]:
        with self._lock:
            return dict(self._paths)

    def row_name(self, model: str) -> str:
        """What the scheduler runs a request for `model` with: a head's name, or the base ("__base__")."""
        with self._lock:
            if model == self.base_name:
                return BASE_ADAPTER_NAME
            if model in self._paths and model not in self._draining:
                return model
            known = [self.base_name, *(n for n in self._paths if n not in self._draining)]
        raise ServeError(
            404,
            f"The model {model!r} does not exist; known models: {known}.",
            param="model",
            code="model_not_found",
        )

    def check_new_head(self, name: str, path: str | os.PathLike) -> None:
        """Refuse a name that is taken or reserved, and a path that holds no head, before anything is loaded."""
        problem = head_name_problem(name)
        if problem is not None:
            raise ServeError(400, problem, param="lora_name")
        if name in (self.base_name, BASE_ADAPTER_NAME):
            raise ServeError(400, f"The name {name!r} is reserved for the base model; choose another.",
                             param="lora_name")  # fmt: skip
        with self._lock:
            taken = name in self._paths
        if taken:
            raise ServeError(400, f"The head {name!r} has already been loaded; unload it first to replace it.",
                             param="lora_name", code="head_already_loaded")  # fmt: skip
        if not (Path(path) / "adapter_config.json").is_file():
            raise ServeError(
                400,
                f"No head at {str(path)!r} (no adapter_config.json); pass a folder written by save_pretrained "
                "or `peft-backattn train`.",
                param="lora_path",
            )

    def load(self, name: str, path: str | os.PathLike) -> None:
        """Load a head through PEFT's validated loaders; a refused file changes nothing (ServeError 400).

        Runs in the scheduler's worker (or before serving starts).
        """
        self.check_new_head(name, path)
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self._base, str(path), adapter_name=name)
        except (ValueError, KeyError, OSError, RuntimeError) as error:
            message = " ".join(str(error).split()) or type(error).__name__
            raise ServeError(400, f"The head at {str(path)!r} was not loaded: {message}", param="lora_path",
                             code="invalid_head") from error  # fmt: skip
        self.model.eval()
        with self._lock:
            self._paths[name] = str(path)

    def start_unloading(self, name: str) -> None:
        """Refuse new requests for `name` from now on; `unload` deletes it once no row uses it."""
        with self._lock:
            if name not in self._paths or name in self._draining:
                known = [n for n in self._paths if n not in self._draining]
                raise ServeError(404, f"The head {name!r} is not loaded; loaded heads: {known}.",
                                 param="lora_name", code="model_not_found")  # fmt: skip
            self._draining.add(name)

    def unload(self, name: str) -> None:
        """Delete a head (runs in the worker, once no row uses it); deleting the last one gives the bare base back."""
        with self._lock:
            last = len(self._paths) == 1
        if last:
            self.model = self.model.unload().eval()
        else:
            if self.model.active_adapter == name:
                self.model.set_adapter(next(n for n in self.model.peft_config if n != name))
            self.model.delete_adapter(name)
        with self._lock:
            self._paths.pop(name, None)
            self._draining.discard(name)

    def cancel_unloading(self, name: str) -> None:
        with self._lock:
            self._draining.discard(name)

    def head_bytes(self, name: str) -> int:
        """Bytes of one loaded head's tensors."""
        if not isinstance(self.model, PeftModel):
            return 0
        marker = f".backattn_heads.{name}."
        return sum(p.numel() * p.element_size() for key, p in self.model.named_parameters() if marker in key)
