"""Every head load through PEFT gets the same checks, and a refused load leaves no trace.

Two gaps in PEFT 0.21 that these wrappers close (`_peft_patches.install()` applies them, once per process):

- `PeftModel.load_adapter(path, adapter_name)` reads and checks the saved config only when `adapter_name` is new.
  Into an existing name it loads the weights file as it is (pickle files, NaNs, integer tensors, a head of another
  config), and so does the Trainer's resume (`load_adapter(checkpoint, <active name>)`). For a backattn head the
  wrapper first runs the checks a new name gets and compares the saved config with the head's own. A new name that
  fails after PEFT attached its head (anything the checks could not foresee) is deleted again.
- `PeftModel.from_pretrained` and `load_adapter` look the saved `peft_type` up in a dict, so an unknown one is a
  bare `KeyError: 'X'`. `PeftConfig._get_peft_type`, which reads it for both, now raises a one-line error that is
  a ValueError and still that KeyError.

Both wrappers change nothing for other PEFT methods' adapters beyond that message.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from peft import PeftModel

from .config import CONFIG_NAME, BackAttnConfig, check_peft_type
from .layer import BackAttnLayer

# The fields that decide a head's math and shapes; a checkpoint loads into an existing head only when all agree.
CONFIG_FIELDS = (
    "base_embedding_dim",
    "base_hidden_size",
    "base_vocab_size",
    "combine",
    "context",
    "context_attention",
    "context_dim",
    "context_heads",
    "context_layers",
    "context_window",
    "base_context_width",
    "base_num_layers",
    "head_module",
    "logit_weighting",
    "num_heads",
    "query_activation",
    "r",
    "rms_norm_eps",
    "scaling",
)


def checked_load_adapter(load_adapter):
    """`PeftModel.load_adapter` that checks a reload into an existing head and undoes a failed new head."""

    @functools.wraps(load_adapter)
    def wrapper(self: PeftModel, model_id: str | os.PathLike, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        existing = self.peft_config.get(adapter_name)
        if existing is not None:
            if isinstance(existing, BackAttnConfig):
                check_reload(self, model_id, adapter_name, kwargs)
            return load_adapter(self, model_id, adapter_name, *args, **kwargs)
        if not any(isinstance(config, BackAttnConfig) for config in self.peft_config.values()):
            return load_adapter(self, model_id, adapter_name, *args, **kwargs)
        try:
            return load_adapter(self, model_id, adapter_name, *args, **kwargs)
        except BaseException:
            _remove_head(self, adapter_name)
            raise

    return wrapper


def check_reload(model: PeftModel, model_id: str | os.PathLike, adapter_name: str, kwargs: dict) -> None:
    """The checks of a new head, then the saved config against head `adapter_name`'s; raises before any change."""
    hub_kwargs, _ = model._split_kwargs(dict(kwargs))
    subfolder = hub_kwargs.pop("subfolder", None)
    saved = BackAttnConfig.from_pretrained(model_id, subfolder=subfolder, **hub_kwargs)
    current = model.peft_config[adapter_name]
    differing = [name for name in CONFIG_FIELDS if getattr(current, name) != getattr(saved, name)]
    if differing:
        ours = ", ".join(f"{name}={getattr(current, name)!r}" for name in differing)
        theirs = ", ".join(f"{name}={getattr(saved, name)!r}" for name in differing)
        source = os.path.join(model_id, subfolder) if subfolder else model_id
        raise ValueError(
            f"Head {adapter_name!r} has {ours}, but {source} holds a head with {theirs}; weights load only into a "
            f"head of the same config. Load them under a new adapter_name, or delete_adapter({adapter_name!r}) first."
        )


def _remove_head(model: PeftModel, adapter_name: str) -> None:
    """Undo a half-done load of a new head: its config entry and its weights, wherever they got to."""
    if adapter_name in model.peft_config:
        model.delete_adapter(adapter_name)
        return
    for module in model.modules():
        if isinstance(module, BackAttnLayer) and adapter_name in module.backattn_heads:
            module.delete_adapter(adapter_name)


def checked_get_peft_type(get_peft_type):
    """`PeftConfig._get_peft_type` whose unknown or missing `peft_type` is a one-line error."""

    @functools.wraps(get_peft_type)
    def wrapper(cls: type, model_id: str, **hf_hub_download_kwargs: Any) -> Any:
        try:
            peft_type = get_peft_type(cls, model_id, **hf_hub_download_kwargs)
        except KeyError:  # the config has no peft_type at all
            peft_type = None
        subfolder = hf_hub_download_kwargs.get("subfolder") or ""
        check_peft_type(peft_type, os.path.join(str(model_id), subfolder, CONFIG_NAME))
        return peft_type

    return wrapper
